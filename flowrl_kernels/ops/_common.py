"""Shared plumbing of the op files: what more than one op uses, so that no op file imports another.

- Math constants of the online-softmax kernels (token_logprobs, linear_token_logprobs).
- The [B, T] sequence-level layer that flowrl_loss and sequence.importance_weights both run: the dtypes
  and argument checks, ``_fast_impl``, and the FlowRL forward kernel with its launchers and the custom op
  ``flowrl_kernels::flowrl_loss_fwd`` (its autograd, the backward kernel and the loss itself stay in
  flowrl_loss.py; importance_weights is forward only).
Moved here verbatim from token_logprobs.py / flowrl_loss.py (issue 25), which still re-export every name.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._triton_compat import tl, triton
from .._utils import (check_real, check_same_device, check_same_shape, check_tensor, device_guard, empty, resolve_impl,
                      triton_interpret)


# ----------------------------------------------------------------------------------------------------
# online-softmax constants (token_logprobs, linear_token_logprobs)
# ----------------------------------------------------------------------------------------------------
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
K_LOG2E = tl.constexpr(LOG2E)  # the same constants, as globals a @triton.jit function may read
K_LN2 = tl.constexpr(LN2)
# The running max starts at a finite value (not -inf) far below any real logit, so a block of only -inf
# logits gives m - m_new = 0 instead of -inf - (-inf) = NaN; 1e38 (not FLT_MAX) keeps (m - z) * log2(e)
# finite.
M_INIT = tl.constexpr(-1e38)
# Exponent arguments (log2 domain, always <= 0) are clamped here: 2^-160 is below the smallest fp32
# subnormal (2^-149), so exp2 still gives exactly 0, but d * coef stays finite and 0 * d = 0 instead of
# 0 * (-inf) = NaN for -inf logits (masked vocab entries).
EXP2_FLOOR = tl.constexpr(-160.0)


# ----------------------------------------------------------------------------------------------------
# sequence level: dtypes, argument checks
# ----------------------------------------------------------------------------------------------------
IMPORTANCE_CODES = {"none": 0, "sequence": 1, "sequence_mean": 2}
LOGP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64)
# One program per sequence walks T in BLOCK_T chunks. On a GPU 1024 lanes x 4 fp32 accumulators keep
# 32 registers per thread at 4 warps (no spills) and a row of 8192 tokens takes 8 trips. The CPU
# interpreter pays per trip, not per lane, so it gets longer chunks.
BLOCK_T_GPU = 1024
BLOCK_T_INTERPRET = 4096
MAX_T = 2**20


def normalize_clip(clip) -> Tuple[Optional[float], Optional[float]]:
    """clip=(lo, hi) | None -> (lo, hi) as floats or None: lo a finite real (<= 0: no lower bound) or None,
    hi a finite real > 0 or None (no upper bound: the log-weight saturates at 64), lo <= hi. Infinite
    bounds are refused (use None): (inf, inf) used to give inf on triton and 6.2e27 elsewhere."""
    if clip is None:
        return (None, None)
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"clip must be a pair (lo, hi) with either bound None, got {clip!r}.")
    lo, hi = clip
    lo = None if lo is None else check_real("clip[0]", lo)
    hi = None if hi is None else check_real("clip[1]", hi, lo=0.0, lo_open=True)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"clip=({clip[0]!r}, {clip[1]!r}) has lo > hi; swap them.")
    return (lo, hi)


def check_logp_mask(logp, mask, *others, logp_name="logp") -> torch.device:
    """logp [B, T] float; each other (name, tensor) has logp's shape and a float dtype; mask [B, T]."""
    check_tensor(logp_name, logp, dtypes=LOGP_DTYPES, ndim=2)
    for name, t in others:
        check_tensor(name, t, dtypes=LOGP_DTYPES, ndim=2)
        check_same_shape(logp_name, logp, name, t)
    check_tensor("mask", mask, dtypes=MASK_DTYPES, ndim=2)
    check_same_shape(logp_name, logp, "mask", mask)
    if logp.shape[1] > MAX_T:
        raise ValueError(f"{logp_name} has T={logp.shape[1]} tokens per row; at most {MAX_T} are supported.")
    return check_same_device(**{logp_name: logp}, **dict(others), mask=mask)


def _fast_impl(impl: Optional[str], device: torch.device, native_op: str, op: str, **tensors: torch.Tensor) -> str:
    """resolve_impl, except float64 inputs (gradcheck, references) default to the float64 torch path."""
    f64 = [name for name, t in tensors.items() if t.dtype == torch.float64]
    if impl is None and f64:
        return "torch"
    impl = resolve_impl(impl, device, native_op=native_op, op=op)
    if f64 and impl != "torch":
        raise ValueError(f"{', '.join(f64)} {'has' if len(f64) == 1 else 'have'} dtype float64, but impl={impl!r} "
                         "computes in float32; use impl='torch' (or cast to float32).")
    return impl



# ----------------------------------------------------------------------------------------------------
# FlowRL forward kernel (flowrl_loss and importance_weights)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _flowrl_loss_fwd_kernel(
    # data ptrs
    logp_ptr, old_ptr, ref_ptr, mask_ptr, log_z_ptr, rewards_ptr,
    per_seq_ptr, delta_ptr, weight_ptr, clipped_ptr, lp_bar_ptr, ref_bar_ptr, length_ptr,
    # shapes
    T,
    # strides (row strides; the token dim has stride 1)
    stride_logp, stride_old, stride_ref, stride_mask, stride_log_z, stride_rewards,
    # runtime scalars (not constexpr: no recompile per value)
    beta, log_lo, log_hi,
    IMPORTANCE: tl.constexpr,  # 0 none, 1 sequence (token-sum log-ratio), 2 sequence_mean
    HAS_REF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logp_row = logp_ptr + row * stride_logp
    old_row = old_ptr + row * stride_old
    ref_row = ref_ptr + row * stride_ref
    mask_row = mask_ptr + row * stride_mask
    cols0 = tl.arange(0, BLOCK_T).to(tl.int64)

    acc_len = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_lp = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_ref = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_lr = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + cols0
        inb = cols < T
        m = tl.load(mask_row + cols, mask=inb, other=0).to(tl.float32)
        # masked positions are never loaded: inf / NaN there cannot leak into the sums
        valid = inb & (m != 0)
        lp = tl.load(logp_row + cols, mask=valid, other=0.0).to(tl.float32)
        acc_len += m
        acc_lp += lp * m
        if HAS_REF:
            ref = tl.load(ref_row + cols, mask=valid, other=0.0).to(tl.float32)
            acc_ref += ref * m
        if IMPORTANCE != 0:
            old = tl.load(old_row + cols, mask=valid, other=0.0).to(tl.float32)
            acc_lr += (lp - old) * m

    length = tl.sum(acc_len, axis=0)
    nonempty = length != 0
    safe_len = tl.where(nonempty, length, 1.0)
    lp_bar = tl.where(nonempty, tl.sum(acc_lp, axis=0) / safe_len, 0.0)
    ref_bar = tl.where(nonempty, tl.sum(acc_ref, axis=0) / safe_len, 0.0)
    log_z = tl.load(log_z_ptr + row * stride_log_z).to(tl.float32)
    r = tl.load(rewards_ptr + row * stride_rewards).to(tl.float32)
    delta = log_z + lp_bar - beta * r - ref_bar

    if IMPORTANCE == 0:
        w = tl.where(nonempty, 1.0, 0.0)
        clipped = 0.0
    else:
        log_w = tl.sum(acc_lr, axis=0)
        if IMPORTANCE == 2:
            log_w = log_w / safe_len
        out = (log_w < log_lo) | (log_w > log_hi)
        # clip in log space with where (not min/max): a NaN log-ratio stays NaN, never clipped to a bound
        log_w_c = tl.where(log_w < log_lo, log_lo, tl.where(log_w > log_hi, log_hi, log_w))
        w = tl.where(nonempty, tl.exp(log_w_c), 0.0)
        clipped = tl.where(nonempty & out, 1.0, 0.0)

    tl.store(per_seq_ptr + row, w * delta * delta)
    tl.store(delta_ptr + row, delta)
    tl.store(weight_ptr + row, w)
    tl.store(clipped_ptr + row, clipped)
    tl.store(lp_bar_ptr + row, lp_bar)
    tl.store(ref_bar_ptr + row, ref_bar)
    tl.store(length_ptr + row, length)


def _block_t(T: int) -> int:
    cap = BLOCK_T_INTERPRET if triton_interpret() else BLOCK_T_GPU
    return max(16, min(cap, triton.next_power_of_2(max(T, 1))))


def _flowrl_loss_fwd_triton(logp, old_logp, ref_logp, log_z, rewards, mask, beta: float, importance: int,
                            log_lo: float, log_hi: float, *, has_ref: bool = True, block_t: Optional[int] = None):
    B, T = logp.shape
    dev = logp.device
    outs = tuple(empty((B,), dtype=torch.float32, device=dev) for _ in range(7))
    if B == 0:
        return outs
    per_seq, delta, weight, clipped, lp_bar, ref_bar, length = outs
    with device_guard(logp):
        _flowrl_loss_fwd_kernel[(B,)](
            logp, old_logp, ref_logp, mask, log_z, rewards,
            per_seq, delta, weight, clipped, lp_bar, ref_bar, length,
            T,
            logp.stride(0), old_logp.stride(0), ref_logp.stride(0), mask.stride(0), log_z.stride(0),
            rewards.stride(0),
            float(beta), float(log_lo), float(log_hi),
            IMPORTANCE=importance, HAS_REF=has_ref, BLOCK_T=block_t or _block_t(T), num_warps=4,
        )
    return outs


def _flowrl_loss_fwd_native(logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance, log_lo, log_hi):
    return torch.ops.flowrl_kernels_native.flowrl_loss_fwd(
        logp, old_logp, ref_logp, log_z.float().contiguous(), rewards.float().contiguous(),
        mask, float(beta), int(importance), float(log_lo), float(log_hi))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T] view with unit token stride (any row stride): copies only when the token dim is strided."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _kernel_mask(mask: torch.Tensor, impl: str) -> torch.Tensor:
    """The mask as the kernels read it. Triton loads any dtype and converts in registers (bool is a byte
    per token, read through a bool pointer: no dtype view, no copy); native takes bool or float32, other
    dtypes are converted to float32 (an int mask of 2 weighs its token twice, exactly as in the
    reference). Runs inside the custom ops below, so under torch.compile Inductor never sees it (a
    bool -> uint8 ``view(dtype)`` in a traced graph fails to lower on CUDA: torch.iinfo(torch.bool))."""
    if impl == "triton" or mask.dtype in (torch.bool, torch.float32):
        return _rows(mask)
    return mask.to(torch.float32)




# ----------------------------------------------------------------------------------------------------
# torch.library op flowrl_kernels::flowrl_loss_fwd (autograd registered in flowrl_loss.py)
# ----------------------------------------------------------------------------------------------------
_Stats7 = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _empty_logz(outs, log_z):
    """The "logz" empty-response rule on the kernels' outputs: rows with L_i = 0 get w = 1, delta = log_z,
    per_seq = log_z^2. The backward kernel then gives d/d log_z = 2 g log_z there with no change (it reads
    the saved delta and weight), and grad_logp of an empty row is 0 whatever the rule. Three [B] where()s,
    run only for empty="logz" (the kernels stay as they are)."""
    per_seq, delta, weight, clipped, lp_bar, ref_bar, length = outs
    is_empty = length == 0
    z = log_z.to(torch.float32)
    return (torch.where(is_empty, z * z, per_seq), torch.where(is_empty, z, delta),
            torch.where(is_empty, torch.ones_like(weight), weight), clipped, lp_bar, ref_bar, length)


def _fwd_impl(logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance, log_lo, log_hi, impl, has_ref,
              empty_logz=False):
    """-> (per_seq, delta, weight, clipped, lp_bar, ref_bar, length), 7 float32 [B]."""
    logp, old_logp, ref_logp, mask = _rows(logp), _rows(old_logp), _rows(ref_logp), _kernel_mask(mask, impl)
    if impl == "triton":
        outs = _flowrl_loss_fwd_triton(logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance,
                                       log_lo, log_hi, has_ref=has_ref)
    else:
        outs = _flowrl_loss_fwd_native(logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance, log_lo,
                                       log_hi)
    return _empty_logz(outs, log_z) if empty_logz else outs


@torch.library.custom_op("flowrl_kernels::flowrl_loss_fwd", mutates_args=())
def _fwd_op(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, log_z: torch.Tensor,
            rewards: torch.Tensor, mask: torch.Tensor, beta: float, importance: int, log_lo: float,
            log_hi: float, impl: str, has_ref: bool, empty_logz: bool = False) -> _Stats7:
    """-> (per_seq, delta, weight, clipped, lp_bar, ref_bar, length), 7 float32 [B]."""
    return _fwd_impl(logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance, log_lo, log_hi, impl,
                     has_ref, empty_logz)


@_fwd_op.register_fake
def _fwd_fake(logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance, log_lo, log_hi, impl, has_ref,
              empty_logz=False):
    return tuple(logp.new_empty((logp.shape[0],), dtype=torch.float32) for _ in range(7))
