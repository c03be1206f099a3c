"""Fused FlowRL trajectory-balance loss: one forward and one backward kernel over [B, T].

Spec: ``flowrl_kernels.reference.flowrl_loss`` (docs/flowrl.md). The forward reads each [B, T] input once
(logp, old_logp, ref_logp, mask) and writes seven [B] float32 vectors; the backward reads the mask once
and writes grad_logp once. The reference composes the same loss from ~40 ATen ops, several of which
materialize [B, T] temporaries (see bench/bench_flowrl_loss.py).

Both fast paths share the torch.library ops ``flowrl_kernels::flowrl_loss_fwd/bwd`` below (fake kernels
and autograd registered; opaque to torch.compile): ``impl="triton"`` launches the Triton kernels,
``impl="native"`` calls ``torch.ops.flowrl_kernels_native.flowrl_loss_fwd/bwd`` (CONTRACTS.md, CPU only);
the two have the same inputs and outputs.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .._triton_compat import tl, triton
from .. import reference
from .._utils import (check_same_device, check_same_shape, check_tensor, device_guard, empty, resolve_impl,
                      triton_interpret)

# ----------------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------------
IMPORTANCE_CODES = {"none": 0, "sequence": 1, "sequence_mean": 2}
REDUCTIONS = ("mean", "sum", "none")
EMPTY_RULES = ("zero", "logz")  # an empty response (L_i = 0): weight 0, or w = 1 with delta = log_z
LOGP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64)
# One program per sequence walks T in BLOCK_T chunks. On a GPU 1024 lanes x 4 fp32 accumulators keep
# 32 registers per thread at 4 warps (no spills) and a row of 8192 tokens takes 8 trips. The CPU
# interpreter pays per trip, not per lane, so it gets longer chunks.
BLOCK_T_GPU = 1024
BLOCK_T_INTERPRET = 4096
MAX_T = 2**20
# "no upper bound" saturates the log-weight here (same as the reference; see reference._LOG_W_MAX).
LOG_HI_UNBOUNDED = 64.0  # = reference._LOG_W_MAX: w*delta^2 stays finite for |delta| < 2e5


# ----------------------------------------------------------------------------------------------------
# kernels
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


@triton.jit
def _flowrl_loss_bwd_kernel(
    # data ptrs
    grad_per_seq_ptr, delta_ptr, weight_ptr, length_ptr, mask_ptr, grad_logp_ptr, grad_log_z_ptr,
    # shapes
    T,
    # strides
    stride_g, stride_mask, stride_grad_logp,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(grad_per_seq_ptr + row * stride_g).to(tl.float32)
    w = tl.load(weight_ptr + row)
    delta = tl.load(delta_ptr + row)
    length = tl.load(length_ptr + row)
    coef = 2.0 * g * w * delta  # d(w delta^2)/d delta, w detached
    tl.store(grad_log_z_ptr + row, coef)
    nonempty = length != 0
    # an empty row gets exactly 0 (even if its delta is inf/NaN), as the reference's where() does
    # divide w by L before the product: the per-token gradient 2 g w delta / L stays finite in a few
    # cases where 2 g w delta alone would overflow float32 (a huge unbounded weight)
    scale = tl.where(nonempty, (2.0 * g * delta) * (w / tl.where(nonempty, length, 1.0)), 0.0)
    mask_row = mask_ptr + row * stride_mask
    out_row = grad_logp_ptr + row * stride_grad_logp
    cols0 = tl.arange(0, BLOCK_T).to(tl.int64)
    for start in range(0, T, BLOCK_T):
        cols = start + cols0
        inb = cols < T
        m = tl.load(mask_row + cols, mask=inb, other=0).to(tl.float32)
        gl = tl.where(m != 0, scale * m, 0.0)
        tl.store(out_row + cols, gl.to(grad_logp_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------------------------
# launchers (same signatures as the native ops in CONTRACTS.md)
# ----------------------------------------------------------------------------------------------------
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


def _flowrl_loss_bwd_triton(grad_per_seq, delta, weight, length, mask, logp_dtype: torch.dtype, *,
                            block_t: Optional[int] = None):
    B, T = mask.shape
    grad_logp = empty((B, T), dtype=logp_dtype, device=mask.device)
    grad_log_z = empty((B,), dtype=torch.float32, device=mask.device)
    if B == 0:
        return grad_logp, grad_log_z
    with device_guard(mask):
        _flowrl_loss_bwd_kernel[(B,)](
            grad_per_seq, delta, weight, length, mask, grad_logp, grad_log_z,
            T,
            grad_per_seq.stride(0), mask.stride(0), grad_logp.stride(0),
            BLOCK_T=block_t or _block_t(T), num_warps=4,
        )
    return grad_logp, grad_log_z


def _flowrl_loss_fwd_native(logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance, log_lo, log_hi):
    return torch.ops.flowrl_kernels_native.flowrl_loss_fwd(
        logp, old_logp, ref_logp, log_z.float().contiguous(), rewards.float().contiguous(),
        mask, float(beta), int(importance), float(log_lo), float(log_hi))


def _flowrl_loss_bwd_native(grad_per_seq, delta, weight, length, mask, logp_dtype):
    return torch.ops.flowrl_kernels_native.flowrl_loss_bwd(
        grad_per_seq.float().contiguous(), delta, weight, length, mask, logp_dtype)


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
# torch.library registration (shared by the triton and native impls): opaque to torch.compile, with
# fake kernels and autograd. per_seq = w * delta^2 ([B] float32) plus the detached per-sequence stats.
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
def _(logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance, log_lo, log_hi, impl, has_ref,
      empty_logz=False):
    return tuple(logp.new_empty((logp.shape[0],), dtype=torch.float32) for _ in range(7))


def _bwd_impl(grad_per_seq, delta, weight, length, mask, logp_dtype, impl):
    """-> (grad_logp [B, T] in logp_dtype, grad_log_z [B] float32)."""
    mask = _kernel_mask(mask, impl)
    if impl == "triton":
        return _flowrl_loss_bwd_triton(grad_per_seq, delta, weight, length, mask, logp_dtype)
    return _flowrl_loss_bwd_native(grad_per_seq, delta, weight, length, mask, logp_dtype)


@torch.library.custom_op("flowrl_kernels::flowrl_loss_bwd", mutates_args=())
def _bwd_op(grad_per_seq: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, length: torch.Tensor,
            mask: torch.Tensor, logp_dtype: torch.dtype, impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_logp [B, T] in logp_dtype, grad_log_z [B] float32)."""
    return _bwd_impl(grad_per_seq, delta, weight, length, mask, logp_dtype, impl)


@_bwd_op.register_fake
def _(grad_per_seq, delta, weight, length, mask, logp_dtype, impl):
    return (mask.new_empty(mask.shape, dtype=logp_dtype), mask.new_empty((mask.shape[0],), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    logp, _, _, log_z, _, mask, _, _, _, _, impl = inputs[:11]
    _, delta, weight, clipped, lp_bar, ref_bar, length = output
    ctx.save_for_backward(delta, weight, length, mask)
    ctx.impl, ctx.logp_dtype, ctx.log_z_dtype = impl, logp.dtype, log_z.dtype
    ctx.mark_non_differentiable(delta, weight, clipped, lp_bar, ref_bar, length)


def _backward(ctx, grad_per_seq, *_unused, bwd=None):
    delta, weight, length, mask = ctx.saved_tensors
    if grad_per_seq is None:
        grad_per_seq = torch.zeros_like(delta)
    grad_logp, grad_log_z = (bwd or _bwd_op)(grad_per_seq, delta, weight, length, mask, ctx.logp_dtype, ctx.impl)
    return (grad_logp, None, None, grad_log_z.to(ctx.log_z_dtype), None, None,
            None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFlowRLLoss(torch.autograd.Function):
    """Eager twin of the custom op (as token_logprobs has): the same kernels, context and backward,
    without torch.library's per-call Python dispatch (argument default filling, redispatch, alias
    checks: ~half of the public call's host time on a tiny input, bench/host_overhead.py).
    torch.compile traces the custom op instead (flowrl_loss picks)."""

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance, log_lo, log_hi, impl,
                has_ref, empty_logz=False):
        inputs = (logp, old_logp, ref_logp, log_z, rewards, mask, beta, importance, log_lo, log_hi, impl, has_ref,
                  empty_logz)
        out = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, out)
        ctx.set_materialize_grads(False)  # only per_seq is differentiable; _backward zero-fills a None
        return out

    @staticmethod
    def backward(ctx, grad_per_seq, *_unused):
        return _backward(ctx, grad_per_seq, bwd=_bwd_impl)


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def check_clip(clip) -> Tuple[float, float]:
    """clip=(lo, hi) -> (log_lo, log_hi) as in the reference; either bound may be None."""
    if clip is None:
        clip = (None, None)
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"clip must be a pair (lo, hi) with either bound None, got {clip!r}.")
    lo, hi = clip
    for name, v in (("clip[0]", lo), ("clip[1]", hi)):
        if v is not None and (isinstance(v, torch.Tensor) or not isinstance(v, (int, float)) or math.isnan(v)):
            raise ValueError(f"{name} must be a Python float or None (no bound), got {v!r}.")
    if hi is not None and not float(hi) > 0:
        raise ValueError(f"clip[1]={hi!r} must be > 0 (a ratio bound) or None for no upper bound.")
    if lo is not None and hi is not None and float(lo) > float(hi):
        raise ValueError(f"clip=({lo!r}, {hi!r}) has lo > hi; swap them.")
    return reference._log_clip((None if lo is None else float(lo), None if hi is None else float(hi)))


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


def _check_per_seq(name: str, t, B: int) -> None:
    check_tensor(name, t, dtypes=LOGP_DTYPES, ndim=1)
    if t.shape[0] != B:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B] = [{B}] (one value per row of logp).")


def _fast_impl(impl: Optional[str], device: torch.device, native_op: str, *tensors: torch.Tensor) -> str:
    """resolve_impl, except float64 inputs (gradcheck, references) default to the float64 torch path."""
    f64 = any(t.dtype == torch.float64 for t in tensors)
    if impl is None and f64:
        return "torch"
    impl = resolve_impl(impl, device, native_op=native_op)
    if f64 and impl != "torch":
        raise ValueError(f"impl={impl!r} computes in float32; float64 inputs need impl='torch' (or cast them).")
    return impl


# ----------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------
def flowrl_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, log_z: torch.Tensor,
                rewards: torch.Tensor, mask: torch.Tensor, *, beta: float = 15.0, importance: str = "sequence",
                clip: Tuple[Optional[float], Optional[float]] = (0.8, 1.2), reduction: str = "mean",
                empty: str = "zero", impl: Optional[str] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """FlowRL trajectory-balance loss (docs/flowrl.md; spec: ``reference.flowrl_loss``).

        delta_i = log_z_i + mean_t logp_it - beta * rewards_i - mean_t ref_logp_it   (means over the mask)
        w_i     = detach(exp(clamp(logr_i, log lo, log hi)))
                  importance="sequence":      logr_i = sum_t m_it (logp_it - old_logp_it)   (the paper)
                  importance="sequence_mean": logr_i = that sum / L_i                       (GSPO)
                  importance="none":          w_i = 1  (an ablation; neither the paper nor the authors' code)
        loss    = sum_i w_i delta_i^2 / B (reduction "mean"), the sum ("sum"), or per_seq [B] ("none")

    Args:
        logp: [B, T] float32 / bfloat16 / float16 (float64: torch path only), the policy's token log-probs;
            the only [B, T] input that receives a gradient. Any row stride; a strided token dim is copied.
        old_logp, ref_logp: [B, T] float (dtypes may differ from logp's), rollout and reference policy
            log-probs; constants. ``old_logp`` is not read when importance="none".
        log_z: [B] float, log Z_phi(x_i); receives a gradient (in log_z's dtype).
        rewards: [B] float, the normalized reward r_hat (see ``group_normalize``); a constant.
        mask: [B, T] bool / int / float. A float (or int) mask acts as per-token weights: L_i = sum_t m_it
            and the means are weighted means, exactly as in the reference. Holes, left or right padding
            are all the same to the op: only m_it matters.
        beta: reward scale (15 in the paper), a Python float (runtime kernel argument).
        clip: (lo, hi) bounds on w, either may be None; lo <= 0 means no lower bound, hi=None saturates
            the log-weight at 64 (w ~ 6.2e27). The clip acts on the log-ratio, so |log-ratio| of 1e4 or
            32k-token sequences never overflow.
        reduction: "mean" | "sum" | "none".
        empty: the rule for an empty row (L_i = 0): "zero" (weight 0, the default) or "logz" (w_i = 1 and
            delta_i = log_z_i: the row adds log_z_i^2, as in the FlowRL authors' code; docs/flowrl.md).
        impl: None | "torch" | "triton" | "native" (see ``flowrl_kernels._utils.resolve_impl``).

    Returns ``(loss, stats)``: loss float32 (float64 on the float64 torch path) 0-dim, or [B] for
    reduction="none"; stats (all detached) = {delta [B], weight [B], clip_frac (0-dim: fraction of
    non-empty rows whose raw ratio lay outside [lo, hi]), logp_mean [B], ref_logp_mean [B]}.

    Edge cases (all tested):
      - empty row (L_i = 0), empty="zero": weight 0, logp_mean = ref_logp_mean = 0, delta = log_z - beta * r,
        no loss, zero gradient to its logp row; a fully masked batch gives loss 0 and zero gradients.
        empty="logz": weight 1, delta = log_z, loss log_z^2, gradient 2 log_z / B to its log_z (its reward
        is not read); its logp row still gets 0. Either way it is not counted in clip_frac.
      - values at masked positions (inf, NaN, garbage) never leak into anything.
      - -inf in old_logp at a valid token: log-ratio +inf -> the row is clipped to hi (w = exp(64) when
        hi is None); with importance="none" it is not read at all.
      - -inf in ref_logp at a valid token: ref_logp_mean = -inf, delta = +inf, loss = +inf and the
        gradients of that row are inf (a reference that gives the sample probability 0 is an error the
        loss must not hide).
      - unbounded clip (hi=None): w saturates at exp(64) ~ 6.2e27, so w * delta^2 and its gradient
        stay finite for |delta| < ~2e5, exactly as in the reference (keep an upper bound anyway: such a
        weight makes one sequence dominate the batch).
      - NaN in any valid input value gives a NaN loss (never a silent 0).
    Errors: ValueError naming the argument for wrong types, dtypes, shapes or devices, T > 2^20, bad clip.

    Implementations: "torch" runs the reference composition (~40 ATen ops, [B, T] temporaries).
    "triton" (default on CUDA) runs one forward kernel (one program per row, T in chunks of BLOCK_T; reads
    logp, old_logp, ref_logp and mask once) and one backward kernel (reads the mask, writes grad_logp).
    Allocated: 7 float32 [B] vectors in the forward (28 B bytes), and grad_logp (B T logp.element_size()
    bytes) plus grad_log_z (4 B) in the backward. "native" calls the C++ ops of the same contract.
    """
    device = check_logp_mask(logp, mask, ("old_logp", old_logp), ("ref_logp", ref_logp))
    B = logp.shape[0]
    _check_per_seq("log_z", log_z, B)
    _check_per_seq("rewards", rewards, B)
    check_same_device(logp=logp, log_z=log_z, rewards=rewards)
    if importance not in IMPORTANCE_CODES:
        raise ValueError(f"importance must be one of {tuple(IMPORTANCE_CODES)}, got {importance!r}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty must be one of {EMPTY_RULES} ('zero': an empty response weighs 0; 'logz': it "
                         f"adds log_z^2, the FlowRL authors' rule), got {empty!r}.")
    if isinstance(beta, torch.Tensor) or not math.isfinite(float(beta)):
        raise ValueError(f"beta must be a finite Python float, got {beta!r}.")
    log_lo, log_hi = check_clip(clip)
    impl = _fast_impl(impl, device, "flowrl_loss_fwd", logp, old_logp, ref_logp, log_z, rewards)
    if impl == "torch":
        return reference.flowrl_loss(logp, old_logp, ref_logp, log_z, rewards, mask, beta=float(beta),
                                     importance=importance, clip=clip, reduction=reduction, empty=empty)

    fwd = _fwd_op if torch.compiler.is_compiling() else _EagerFlowRLLoss.apply
    per_seq, delta, weight, clipped, lp_bar, ref_bar, length = fwd(
        logp, old_logp, ref_logp, log_z, rewards, mask, float(beta), IMPORTANCE_CODES[importance], log_lo, log_hi,
        impl, True, empty == "logz")
    if reduction == "mean":
        loss = per_seq.sum() / max(B, 1)
    elif reduction == "sum":
        loss = per_seq.sum()
    else:
        loss = per_seq
    n_valid = (length != 0).sum().clamp(min=1)
    stats = {"delta": delta, "weight": weight, "clip_frac": clipped.sum() / n_valid,
             "logp_mean": lp_bar, "ref_logp_mean": ref_bar}
    return loss, stats
