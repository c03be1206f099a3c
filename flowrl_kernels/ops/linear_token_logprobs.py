"""Fused lm_head -> token log-probs (and entropy) that never materializes the [N, V] logits.

    x      = (hidden @ weight.T + bias) / temperature                      (never stored)
    logp   = x[label] - logsumexp(x)
    entropy = -sum_j p_j log p_j,  p = softmax(x)

Spec: ``flowrl_kernels.reference.linear_token_logprobs`` (naive: full logits, then log-softmax).

Two paths behind one autograd.Function (``LinearTokenLogprobsFunction``), whose forward and backward only
pick one:
- Triton (``impl="triton"``, the CUDA default): ``ops/_linear_triton.py``, this op's private module (its
  kernels, launch parameters, custom ops and chunked backward; its docstring says why the backward is
  chunked rather than fused). The forward's split partials make a row's arithmetic independent of N
  (batch invariance, docs/batch_invariance.md).
- Torch (``impl="torch"``, the CPU default; this file): the same math chunked over tokens; each chunk's
  fp32 logits stay within ``_TORCH_CHUNK_BYTES`` (64 MiB) and the backward recomputes them, so no [N, V]
  tensor ever exists. Unlike other ops, ``impl="torch"`` here is NOT the naive reference (that one stays
  in reference.py, for tests and benchmarks).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._utils import (check_int, check_labels_in_range, check_same_device, check_temperature, check_tensor,
                      resolve_impl, triton_interpret)  # noqa: F401 (triton_interpret: importable from here before)
# _mm_acc: the fp32-accumulating matmul that both paths' backward use
from ._linear_triton import _mm_acc, _triton_backward, _triton_chunk_rows, _triton_forward_op
# Re-exported: tests, bench/ and scripts/ imported these from this module before the Triton path moved to
# _linear_triton.py. Reading them here works; a monkeypatch must target _linear_triton, where they are read.
from ._linear_triton import (_ARITHMETIC, _MAX_WAVES, _MERGE_BLOCK, _balanced_splits, _dot_precision,  # noqa: F401
                             _fwd_launch, _invariant_splits, _linear_logprobs_bwd_kernel,
                             _linear_logprobs_fwd_kernel, _linear_logprobs_merge_kernel, _n_splits, _sm_count,
                             _tiles, _triton_dlogits, _triton_dlogits_op, _triton_forward, _upcast, _vocab_chunk)

# Torch path: each chunk's fp32 logits <= 64 MiB (V=49152: 341 rows). The forward holds 2 such
# buffers (shifted logits, exp) and the backward 2 (log p, p): <= 128 MiB whatever N is.
_TORCH_CHUNK_BYTES = 64 * 2**20
_TORCH_CHUNK_BYTES_CUDA_MAX = 2**30  # CUDA: the budget follows free memory (_torch_chunk_rows)


# ----------------------------------------------------------------------------------------------------
# torch (chunked) path: same math, per chunk of rows
# ----------------------------------------------------------------------------------------------------
def _torch_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The torch path's compute dtype: float64 when either input is (gradchecks, references), else float32."""
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


def _lowp_mm(t: torch.Tensor, cd: torch.dtype) -> bool:
    """True when a bf16 / fp16 matmul with fp32 output (``torch.mm(..., out_dtype=float32)``: tensor
    cores, fp32 accumulation, no fp32 copy of the weight) serves the torch path: CUDA tensors, torch
    >= 2.8 (aten::mm.dtype). The products of two 16-bit floats are exact in fp32, so the logits equal
    the upcast matmul's up to fp32 summation order, as on the Triton path."""
    return (t.device.type == "cuda" and cd == torch.float32 and t.dtype in (torch.float16, torch.bfloat16)
            and hasattr(torch.ops.aten.mm, "dtype"))


def _torch_mm_operands(h2, weight, bias, cd):
    # CPU has no bf16 x bf16 -> fp32 matmul, so low-precision weights are upcast once (V * H * 4 B);
    # the logits themselves must be fp32 (a bf16 logit is off by up to 0.4% of its value). CUDA keeps
    # the 16-bit weight (see _lowp_mm).
    w = weight if weight.dtype == cd or _lowp_mm(weight, cd) else weight.to(cd)
    b = None if bias is None else bias.to(cd)
    return w, b


def _torch_logits(h_c, w, b, inv_temp, cd):
    if w.dtype != cd:  # 16-bit operands on CUDA, fp32 out (the overload _lowp_mm checked for)
        x = torch.ops.aten.mm.dtype(h_c, w.t(), cd)
        if b is not None:
            x.add_(b)
    else:
        x = torch.mm(h_c.to(cd), w.t()) if b is None else torch.addmm(b, h_c.to(cd), w.t())
    return x.mul_(inv_temp)


def _torch_chunk_rows(V: int, device: torch.device) -> int:
    """Rows per chunk of the torch path: each chunk's fp32 logits within 64 MiB on the CPU (a cache-
    and RAM-friendly constant), and on CUDA within 1/16 of the free device memory, capped at 1 GiB
    (V=152064: 1765 rows, so each chunk's matmul runs at cuBLAS speed; 64 MiB chunks of 110 rows ran
    at ~10% of it on an H200). The path holds ~3 such buffers at once."""
    budget = _TORCH_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = max(_TORCH_CHUNK_BYTES, min(_TORCH_CHUNK_BYTES_CUDA_MAX, free // 16))
    return max(1, budget // (V * 4))


def _torch_forward(h2, weight, bias, labels, inv_temp, ignore_index, chunk):
    """-> logp, ent, lse [N] in _torch_dtype, per chunk of ``chunk`` rows (2 [chunk, V] buffers alive)."""
    N = h2.shape[0]
    cd = _torch_dtype(h2, weight)
    w, b = _torch_mm_operands(h2, weight, bias, cd)
    logp = torch.empty(N, dtype=cd, device=h2.device)
    ent = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        x = _torch_logits(h2[r0:r1], w, b, inv_temp, cd)          # [C, V], buffer 1
        m = x.amax(dim=1, keepdim=True)
        x.sub_(m)                                                   # x - m <= 0
        lab = labels[r0:r1]
        valid = lab != ignore_index
        in_range = (lab >= 0) & (lab < x.shape[1])
        xt = x.gather(1, torch.where(valid & in_range, lab, 0).long().unsqueeze(1)).squeeze(1)
        e = torch.exp(x)                                            # buffer 2
        s = e.sum(1)
        u = x.mul_(e).sum(1)                                        # sum (x - m) e^(x - m)
        del x, e
        # an out-of-range label (unchecked on GPU) poisons its row, as in the Triton kernels
        log_s = torch.where(valid & ~in_range, float("nan"), torch.log(s))
        zero = torch.zeros((), dtype=cd, device=h2.device)
        logp[r0:r1] = torch.where(valid, xt - log_s, zero)
        ent[r0:r1] = torch.where(valid, log_s - u / s, zero)
        lse[r0:r1] = m.squeeze(1) + log_s
    return logp, ent, lse


def _torch_dlogits(h_c, w, b, labels, lse, ent, g_logp, g_ent, inv_temp, ignore_index, cd):
    """fp32 dlogits [C, V] of one chunk (2 buffers of [C, V] alive at the peak)."""
    valid = labels != ignore_index
    g_lp = torch.where(valid, g_logp.to(cd), 0.0)
    g_en = torch.where(valid, g_ent.to(cd), 0.0)
    dz = _torch_logits(h_c, w, b, inv_temp, cd).sub_(lse.unsqueeze(1))     # log p
    p = torch.exp(dz)
    # -p (g_lp + g_en (log p + H)), built in place in the log-p buffer
    dz.add_(ent.unsqueeze(1)).mul_(g_en.unsqueeze(1)).add_(g_lp.unsqueeze(1)).mul_(p).neg_()
    del p
    # out-of-range labels (their rows are NaN through lse) must not index out of bounds
    in_range = (labels >= 0) & (labels < dz.shape[1])
    dz.scatter_add_(1, torch.where(valid & in_range, labels, 0).long().unsqueeze(1), g_lp.unsqueeze(1))
    return dz.mul_(inv_temp)



def _torch_backward(hidden, weight, bias, labels, lse, ent, g_logp, g_ent, inv_temp, ignore_index, chunk,
                    needs):
    """(dH, dW, db) of the torch path, None where ``needs`` (hidden, weight, bias) is False: per chunk of
    ``chunk`` rows, fp32 (fp64) dlogits from the recomputed logits, then dH[chunk] = dz @ W and dW += dz^T
    @ h. Holds 2 chunks of dlogits, the upcast weight of _torch_mm_operands and dW in fp32 when there are
    several chunks."""
    need_h, need_w, need_b = needs
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cd = _torch_dtype(hidden, weight)
    g_logp = g_logp.to(cd).contiguous()
    g_ent = g_ent.to(cd).contiguous()
    w_mm, b_k = _torch_mm_operands(hidden, weight, bias, cd)
    # CUDA 16-bit: dz rounded to the input dtype feeds the 16-bit weight's matmuls, as on the Triton path
    # (and as torch's own lm_head backward does)
    mm_dtype = w_mm.dtype
    dH = torch.empty((N, H), dtype=hidden.dtype, device=dev) if need_h else None
    # dW accumulates across chunks in fp32 (the CPU path's dtype anyway; for 16-bit CUDA operands an fp32
    # buffer of V * H * 4 bytes whenever there is more than one chunk, see _mm_acc), or is written by one
    # matmul in the weight dtype when one chunk covers all rows, as in torch's own lm_head backward
    dW = None
    if need_w:
        dW = torch.zeros((V, H), dtype=mm_dtype if N <= chunk else torch.promote_types(mm_dtype, torch.float32),
                         device=dev)
    db = torch.zeros(V, dtype=cd, device=dev) if need_b else None  # fp32 (fp64 for fp64 inputs)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        h_c = hidden[r0:r1]
        dz = _torch_dlogits(h_c, w_mm, b_k, labels[r0:r1], lse[r0:r1], ent[r0:r1], g_logp[r0:r1], g_ent[r0:r1],
                            inv_temp, ignore_index, cd)
        if db is not None:
            db += dz.sum(0, dtype=db.dtype)  # before the rounding to the matmul dtype
        dz = dz.to(mm_dtype)
        if dH is not None:
            if dz.dtype == hidden.dtype:
                torch.mm(dz, w_mm, out=dH[r0:r1])
            else:
                dH[r0:r1] = torch.mm(dz, w_mm)
        if dW is not None:
            _mm_acc(dW, dz.t(), h_c if h_c.dtype == mm_dtype else h_c.to(mm_dtype))
        del dz
    if dW is not None and dW.dtype != weight.dtype:
        dW = dW.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return dH, dW, db


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
class LinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] -> (logp [N], entropy [N]).

    Saves hidden, weight, bias, labels and 2 * N floats (lse, entropy); the backward recomputes the
    logits chunk by chunk. Forward and backward dispatch to the Triton path (_linear_triton.py) or the
    torch path (above), each self-contained.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, impl, chunk):
        inv_temp = 1.0 / temperature
        if impl == "triton":
            logp, ent, lse = _triton_forward_op(hidden, weight, bias, labels, inv_temp, ignore_index)
        else:
            logp, ent, lse = _torch_forward(hidden, weight, bias, labels, inv_temp, ignore_index, chunk)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.cfg = (inv_temp, ignore_index, impl, chunk)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, impl, chunk = ctx.cfg
        path_backward = _triton_backward if impl == "triton" else _torch_backward
        dH, dW, db = path_backward(hidden, weight, bias, labels, lse, ent, g_logp, g_ent, inv_temp, ignore_index,
                                   chunk, ctx.needs_input_grad[:3])
        return dH, dW, db, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------
def _check_args(hidden, weight, labels, bias):
    check_tensor("hidden", hidden, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("labels", labels, dtypes=(torch.int32, torch.int64))
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match "
                         "(cast one with .to(...)).")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {H}, got shape "
                         f"{tuple(weight.shape)}; pass the lm_head weight as stored ([vocab, hidden]).")
    if weight.shape[0] == 0:
        raise ValueError("weight has 0 rows (empty vocab); V must be >= 1.")
    if H == 0:
        raise ValueError(f"hidden has an empty last dim, shape {tuple(hidden.shape)}; H must be >= 1.")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}.")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}'s last (hidden) dim has stride {t.stride(-1)}; it must be contiguous "
                             f"(stride 1). Other dims may be strided; call {name}.contiguous() if it came "
                             "from a transpose.")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                     ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}] (weight.shape[0]), got "
                             f"{tuple(bias.shape)}.")


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100,
                          impl: Optional[str] = None, chunk_size: Optional[int] = None,
                          validate: bool = False):
    """Token log-probs (and entropy) of ``hidden @ weight.T + bias`` without materializing the logits.

    logp[...] = log softmax((hidden @ weight.T + bias) / temperature)[..., labels]
    entropy[...] = H(softmax((hidden @ weight.T + bias) / temperature))

    Args:
        hidden: [..., H] float16 / bfloat16 / float32 (float64: impl="torch" only); last dim stride 1,
            other dims may be strided (a non-viewable [..., H] is reshaped with a copy of N * H elements).
            float32 follows torch's fp32 matmul setting, as torch's own lm_head does: exact fp32 dots
            (CUDA cores) by default, TF32 tensor cores after ``torch.set_float32_matmul_precision("high")``
            or ``torch.backends.cuda.matmul.fp32_precision = "tf32"``.
        weight: [V, H], same dtype as hidden, row stride free, last dim stride 1 (an lm_head's weight).
        labels: [...] int32 / int64. Positions equal to ``ignore_index`` give 0 and get no gradient.
        bias: optional [V] (any float dtype, any stride: the Triton path reads an fp32 contiguous copy,
            V floats, when it is not one already; used in fp32).
        temperature: runtime real number in [1e-4, 1e4] (see ``token_logprobs``; no recompilation per
            value); applied to logp and entropy.
        ignore_index: a Python int (int64 range).
        return_entropy: also return the entropy.
        impl: None (Triton on CUDA, else the chunked torch path), "triton", or "torch" (chunked torch
            path, NOT the naive reference, which is ``flowrl_kernels.reference.linear_token_logprobs``).
        chunk_size: rows per chunk of the backward (and of the torch forward). Default: the torch path
            keeps one chunk's fp32 logits within 64 MiB on the CPU (rows = 64 MiB / (4 V)), within 1/16
            of the free memory (<= 1 GiB) on CUDA. Triton: the dlogits workspace holds chunk_size * V
            elements, 64 MiB by default when N <= V (spread over all N rows as vocab chunks of
            chunk_size * V / N columns, at least V / 32; dH sums the chunks in fp32), 512 MiB when N > V
            (row chunks; dW sums them in fp32). 16-bit gradients are rounded once, at the end.
        validate: check every label is in [0, V) or ignore_index even on CUDA (a device sync). CPU
            labels are always checked (except while torch.compile traces). Unchecked out-of-range
            labels poison their position, as in ``token_logprobs``: NaN logp and entropy, NaN gradient
            rows (never a finite, silently wrong logp; never an out-of-bounds read).

    Returns:
        logp float32 [...] (float64 for float64 inputs), and entropy float32 [...] when
        ``return_entropy``. Differentiable w.r.t. hidden, weight and bias with any upstream gradient
        for both outputs.

    Memory (N tokens), beyond inputs, outputs and gradients:
        Triton forward: 4 * splits * N + 2 * N float32 (splits <= SMs, N-free for batch invariance; saved lse,
        entropy). Triton backward: one dlogits workspace of chunk_size * V * itemsize bytes (64 MiB by
        default for N <= V, 512 MiB above; at least N * V / 32 elements) + V float32 for the bias grad,
        + an fp32 accumulator for 16-bit inputs when there are several chunks (N * H * 4 bytes for dH
        over vocab chunks, V * H * 4 for dW over row chunks). Exact: every dlogit enters the matmuls
        (no filtering).
        Torch path: 2 chunks of chunk_size * V fp32 (<= 128 MiB by default) in forward and backward;
        bf16/fp16 weights are upcast once (V * H * 4 B) and dW accumulates in fp32 (V * H * 4 B),
        because CPU matmuls have no bf16 -> fp32 mode.
    """
    _check_args(hidden, weight, labels, bias)
    dev = check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    temperature = check_temperature(temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, lo=1)
    # float64 inputs (gradchecks, references) default to the torch path, as in every other op
    f64 = hidden.dtype == torch.float64 or weight.dtype == torch.float64
    impl = "torch" if impl is None and f64 else resolve_impl(impl, dev, op="linear_token_logprobs")
    if impl == "triton" and hidden.dtype == torch.float64:
        raise ValueError("hidden and weight have dtype float64, which impl='triton' does not support "
                         "(float16, bfloat16, float32); use impl='torch' or cast hidden and weight.")
    V, H = weight.shape
    check_labels_in_range(labels, V, ignore_index, validate=validate)

    out_shape = hidden.shape[:-1]
    h2 = hidden.reshape(-1, H)
    lab = labels.reshape(-1).contiguous()  # N ints; the kernels read labels with stride 1
    N = h2.shape[0]
    if chunk_size is None:
        chunk_size = (_triton_chunk_rows(N, V, h2.element_size()) if impl == "triton"
                      else _torch_chunk_rows(V, h2.device))
    chunk_size = max(1, min(chunk_size, N))
    if impl == "triton" and bias is not None:
        # [V]: the kernels read fp32 with unit stride. .float() alone does not copy an fp32 bias, so a
        # strided or expanded one (bias[::2], b.expand(V)) was read as if contiguous: log-probs 2.5 nats
        # off. V floats; autograd casts the grad back (and sums it over an expanded dim).
        bias = bias.float().contiguous()
    logp, ent = LinearTokenLogprobsFunction.apply(h2, weight, bias, lab, temperature, ignore_index,
                                                  impl, chunk_size)
    logp = logp.view(out_shape)
    if return_entropy:
        return logp, ent.view(out_shape)
    return logp
