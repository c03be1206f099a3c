"""Route verl's per-token log-prob / entropy helpers through flowrl_kernels.

    import flowrl_kernels.integrations.verl as fk_verl
    fk_verl.patch()    # in EVERY process that computes log-probs (verl's Ray workers too), before the
                       # workers are built: verl binds e.g. torch.compile(verl_F.entropy_from_logits)
                       # at engine init. VERL_USE_EXTERNAL_MODULES=flowrl_kernels.integrations.verl_autopatch
                       # makes every process that imports verl run patch().

The contract each replacement keeps, read from verl 0.9.1 ``verl/utils/torch_functional.py``.
``logprobs_from_logits`` picks a path per process: flash-attn's Triton cross-entropy when
``flash_attn.ops.triton.cross_entropy`` imports (``FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE``, verl's
spelling) and ``VERL_DISABLE_FLASH_ATTN_CE != "1"``; else torch_npu's cross-entropy when available;
else ``logprobs_from_logits_v2`` (torch, a row loop). The replacement reads the same flags per call.

| function | verl's path | logits dtype -> output dtype | exactness | replacement |
|---|---|---|---|---|
| ``logprobs_from_logits`` | flash-attn CE (GPU) | fp16 / bf16 / fp32 -> fp32 | tolerance | ours, fp32 |
| | torch (``_v2``) | fp32 -> fp32, fp64 -> fp64 | tolerance | ours, same dtype |
| | torch (``_v2``) | fp16 / bf16 -> same | bitwise ``log_softmax(-1).gather`` per row | verl's own code |
| | torch_npu CE | any | - | verl's own code |
| ``entropy_from_logits`` | torch (verl's actors compile it) | any -> same | tolerance | ours, rounded once |
| ``entropy_from_logits_with_chunking`` | torch, fp32 chunks | any -> fp32 (default dtype) | tolerance | ours, fp32 |

"ours": ``flowrl_kernels.token_logprobs``.

Semantics on every path (and ours):

- Shapes: ``logits (..., V)``, ``labels (...)`` -> ``(...)`` (flash-attn flattens to ``[N, V]`` and back);
  ``entropy_from_logits_with_chunking`` takes ``[N, V]`` only (verl's code; other shapes run it).
- No temperature: verl's actors divide the logits by T in place before calling these.
- Ignored labels: the flash-attn path gives 0 (and zero gradient) where ``labels == -100`` (its
  ``ignore_index``); the torch path gathers every label, so -100 is an error on the CPU (verl: the
  gather; ours: ValueError). ``inplace_backward`` only changes flash-attn's memory use (ours never
  overwrites the logits); accepted and ignored.
- Gradients: in the logits' dtype (autograd's rule).
- ``entropy_from_logits`` in fp16 / bf16: verl rounds after every op (softmax, logsumexp, product, sum)
  and its actors compile it (Inductor fuses and rounds differently), so its bits are not a contract; ours
  computes in fp32 and rounds once (no less accurate than verl's, tested).

Why the half-precision ``_v2`` path runs verl's own code: it is torch's half ``log_softmax`` gathered,
which no fp32 result rounded once reproduces bit for bit (see ``flowrl_kernels.integrations.trl``: 4.7-15.6%
of positions differ). Also handed to verl's original: torch_npu's path, devices other than CPU / CUDA,
other dtypes, a vocab dim that is not stride 1, labels not of shape ``logits.shape[:-1]``. Each path is
logged once per process at DEBUG on ``flowrl_kernels.integrations.verl``.
"""
from __future__ import annotations

import logging
import os

import torch

from ..ops.token_logprobs import token_logprobs

from ._patching import (HALF, NO_IGNORE, Integration, PatchError, Target, entropy, entropy_rounded_once, note_path,
                        why_not_ours)

__all__ = ["patch", "unpatch", "patched", "is_patched", "PatchError", "INTEGRATION"]

_LOG = logging.getLogger(__name__)
_FLAGS = ("FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", "NPU_CROSS_ENTROPY_LOSS_AVAILABLE")


def _build_logprobs_from_logits(original):
    g = original.__globals__
    if any(f not in g for f in _FLAGS):
        raise PatchError(f"flowrl_kernels: verl.utils.torch_functional no longer defines {_FLAGS}, which decide "
                         "whether verl returns float32 (flash-attn) or the logits' dtype; nothing was patched.")
    name = "verl.logprobs_from_logits"

    def logprobs_from_logits(logits, labels, inplace_backward=True):
        flash = bool(g[_FLAGS[0]]) and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
        if not flash and g[_FLAGS[1]]:
            why = "torch_npu cross-entropy path"
        elif not flash and logits.dtype in HALF:
            why = f"{logits.dtype} logits on verl's torch path (bitwise half-precision contract)"
        else:
            why = why_not_ours(logits, labels)
        if why is not None:
            note_path(_LOG, name, f"verl's own code ({why})")
            return original(logits, labels, inplace_backward=inplace_backward)
        if flash:
            note_path(_LOG, name, "flowrl_kernels.token_logprobs, float32 out, -100 ignored (verl's flash-attn path)")
            return token_logprobs(logits, labels, ignore_index=-100).float()
        note_path(_LOG, name, f"flowrl_kernels.token_logprobs, {logits.dtype} out (verl's torch path)")
        return token_logprobs(logits, labels, ignore_index=NO_IGNORE)

    return logprobs_from_logits


_build_entropy_from_logits = entropy_rounded_once(_LOG, "verl.entropy_from_logits", "verl")


def _build_entropy_from_logits_with_chunking(original):
    name = "verl.entropy_from_logits_with_chunking"

    def entropy_from_logits_with_chunking(logits, chunk_size=2048):
        why = "logits not [N, V]" if logits.dim() != 2 else why_not_ours(logits)
        if why is not None:
            note_path(_LOG, name, f"verl's own code ({why})")
            return original(logits, chunk_size=chunk_size)
        note_path(_LOG, name, "flowrl_kernels.token_logprobs, float32 out")
        # verl writes each fp32 chunk into torch.zeros(N), i.e. torch's default dtype (float32 unless changed)
        return entropy(logits).to(torch.get_default_dtype())

    return entropy_from_logits_with_chunking


INTEGRATION = Integration(
    dist="verl",
    min_version="0.9.1",
    tested_version="0.9.1",
    targets=[
        Target("verl.utils.torch_functional", "logprobs_from_logits", ("logits", "labels"),
               _build_logprobs_from_logits),
        Target("verl.utils.torch_functional", "entropy_from_logits", ("logits",), _build_entropy_from_logits),
        Target("verl.utils.torch_functional", "entropy_from_logits_with_chunking", ("logits", "chunk_size"),
               _build_entropy_from_logits_with_chunking),
    ],
)

patch = INTEGRATION.patch
unpatch = INTEGRATION.unpatch
patched = INTEGRATION.patched
is_patched = INTEGRATION.is_patched
