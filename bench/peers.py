"""The real peer kernels, imported lazily. Each loader returns the peer's own function or raises
``Unavailable`` with the reason; a peer is never imitated under its name.

Install them with the ``bench`` extra (``pip install -e ".[bench]"``); Liger, flash-attn's Triton
cross-entropy and Cut Cross-Entropy are Triton kernels that need a CUDA device. On machines without
network (the lent GPUs), ``bench/fetch_peers.sh`` downloads them into ``.peers/`` and ``bench/gpu.sh``
installs them from there.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from .common import ON_GPU, Unavailable


def _need_gpu(name: str):
    if not ON_GPU:
        raise Unavailable(f"{name} is a Triton kernel that needs a CUDA device (this machine has none)")


def trl_selective_log_softmax():
    """TRL ``selective_log_softmax(logits, index, temperature)`` -> logp. On CUDA it dispatches to TRL's
    fused Triton kernel; on CPU to its row loop (logsumexp per row for fp32, log_softmax for bf16)."""
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception as e:
        raise Unavailable(f"trl not importable ({type(e).__name__}: {e}); pip install trl") from None
    return selective_log_softmax


def trl_logprob_entropy():
    """TRL ``selective_log_softmax_and_entropy(logits, index, temperature)`` -> (logp, entropy): a fused
    Triton kernel with gradients for both outputs (the closest peer of token_logprobs)."""
    _need_gpu("trl.kernels.selective_log_softmax_and_entropy")
    try:
        from trl.kernels import selective_log_softmax_and_entropy
    except Exception as e:
        raise Unavailable(f"trl.kernels.selective_log_softmax_and_entropy not importable ({type(e).__name__}: {e})") from None
    return selective_log_softmax_and_entropy


def liger_cross_entropy():
    """Liger ``liger_cross_entropy(input, target, ignore_index, reduction)`` -> per-token -logp with
    reduction="none". It writes the gradient into ``input`` during the forward."""
    _need_gpu("Liger-Kernel cross_entropy")
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as f
    except Exception as e:
        raise Unavailable(f"liger-kernel not importable ({type(e).__name__}: {e}); pip install liger-kernel") from None
    return f


def liger_fused_linear_cross_entropy():
    """Liger ``liger_fused_linear_cross_entropy(input, weight, target, ..., reduction)`` -> per-token
    -logp with reduction="none"; chunks the lm_head and computes dH, dW during the forward."""
    _need_gpu("Liger-Kernel fused_linear_cross_entropy")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as f
    except Exception as e:
        raise Unavailable(f"liger-kernel not importable ({type(e).__name__}: {e}); pip install liger-kernel") from None
    return f


def flash_attn_cross_entropy():
    """flash-attn ``ops/triton/cross_entropy.py::cross_entropy_loss(logits, labels, logit_scale=...,
    ignore_index=...)`` -> (per-token -logp, z_loss).

    The file needs only torch and triton, but ``import flash_attn`` loads the compiled CUDA extension
    first; where that is not built, the file is loaded on its own from the installed package or from
    the path in FLOWRL_BENCH_FLASH_ATTN_CE (gpu.sh points it into the flash-attn sdist).
    """
    _need_gpu("flash-attn's Triton cross_entropy")
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
        return cross_entropy_loss
    except Exception as e:
        first_err = f"{type(e).__name__}: {e}"
    path = os.environ.get("FLOWRL_BENCH_FLASH_ATTN_CE")
    if not path:
        try:
            spec = importlib.util.find_spec("flash_attn")
        except Exception:
            spec = None
        if spec is not None and spec.submodule_search_locations:
            cand = os.path.join(list(spec.submodule_search_locations)[0], "ops", "triton", "cross_entropy.py")
            path = cand if os.path.exists(cand) else None
    if not path or not os.path.exists(path):
        raise Unavailable(f"flash-attn not importable ({first_err}) and no ops/triton/cross_entropy.py found; "
                          "pip install flash-attn or set FLOWRL_BENCH_FLASH_ATTN_CE")
    name = "flash_attn_ops_triton_cross_entropy"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.cross_entropy_loss


def cut_cross_entropy():
    """Apple CCE ``linear_cross_entropy(e, c, targets, reduction="none")`` -> per-token -logp; the
    backward recomputes the logits blockwise and, by default, skips blocks whose softmax is below
    ``filter_eps`` (so its gradient is approximate by design)."""
    _need_gpu("Cut Cross-Entropy")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        raise Unavailable(f"cut-cross-entropy not importable ({type(e).__name__}: {e}); pip install cut-cross-entropy") from None
    return linear_cross_entropy


def _need_sm90(name: str):
    """SM90 (Hopper) CuTe-DSL kernels: a CUDA device of compute capability >= 9.0 and ``cutlass.cute``
    (the nvidia-cutlass-dsl wheel) importable."""
    _need_gpu(name)
    import torch

    cc = torch.cuda.get_device_capability()
    if cc < (9, 0):
        raise Unavailable(f"{name} needs compute capability >= 9.0 (Hopper); this card is sm_{cc[0]}{cc[1]}")
    if importlib.util.find_spec("cutlass") is None:
        raise Unavailable(f"{name} needs the CuTe DSL (pip install nvidia-cutlass-dsl); not installed")


def liger_fused_linear_cross_entropy_sm90():
    """Liger's SM90 CuTe-DSL fused lm_head (Liger-Kernel 0.8.5: the ``nvidia-cutedsl`` backend of
    ``fused_linear_cross_entropy``, cuBLAS matmuls + a CuTe online-softmax CE; needs the ``cutedsl``
    extra: nvidia-cutlass-dsl, apache-tvm-ffi) -> (per-token -logp with reduction="none", ...).
    Called through the backend's own entry point so the Triton fallback never stands in for it under
    this name. (Liger's separate ``liger-cute-kernels`` package, extra "lck", is not covered.)"""
    _need_sm90("Liger-Kernel SM90 (CuTe DSL) fused_linear_cross_entropy")
    try:
        from liger_kernel.ops.backends._cutedsl.fused_linear_cross_entropy import (
            fused_linear_cross_entropy_cutedsl as f)
    except Exception as e:
        raise Unavailable(f"liger-kernel's CuTe DSL backend not importable ({type(e).__name__}: {e}); "
                          "needs liger-kernel >= 0.8 with nvidia-cutlass-dsl") from None
    return f


def quack_cross_entropy():
    """QuACK ``quack.cross_entropy.cross_entropy(x, target, ignore_index=, reduction="none")`` -> per-token
    -logp (CuTe DSL, SM90+); backward writes the logits gradient."""
    _need_sm90("QuACK cross_entropy")
    try:
        from quack.cross_entropy import cross_entropy
    except Exception as e:
        raise Unavailable(f"quack-kernels not importable ({type(e).__name__}: {e}); "
                          "pip install quack-kernels") from None
    return cross_entropy


def quack_linear_cross_entropy():
    """QuACK's chunked linear cross-entropy (quack-kernels 0.6: ``quack.linear_cross_entropy.
    chunked_linear_cross_entropy(x, weight, target, chunk_size=4096, ignore_index=, reduction=)``; the
    SM90 bf16 "scaled-exp" fused-backward pipeline is picked automatically where eligible). It has no
    per-token output: reduction is "mean" or "sum" only."""
    _need_sm90("QuACK chunked_linear_cross_entropy")
    try:
        from quack.linear_cross_entropy import chunked_linear_cross_entropy
    except Exception as e:
        raise Unavailable(f"quack-kernels' linear_cross_entropy not importable ({type(e).__name__}: {e}); "
                          "pip install quack-kernels (needs nvidia-cutlass-dsl)") from None
    return chunked_linear_cross_entropy
