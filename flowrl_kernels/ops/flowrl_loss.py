"""Fused FlowRL trajectory-balance loss: one forward and one backward kernel over [B, T].

Spec: ``flowrl_kernels.reference.flowrl_loss`` (docs/flowrl.md). The forward reads each [B, T] input once
(logp, old_logp, ref_logp, mask) and writes seven [B] float32 vectors; the backward reads the mask once
and writes grad_logp once. The reference composes the same loss from ~40 ATen ops, several of which
materialize [B, T] temporaries (see bench/bench_flowrl_loss.py).

Both fast paths share the torch.library ops ``flowrl_kernels::flowrl_loss_fwd/bwd`` below (fake kernels
and autograd registered; opaque to torch.compile): ``impl="triton"`` launches the Triton kernels,
``impl="native"`` calls ``torch.ops.flowrl_kernels_native.flowrl_loss_fwd/bwd`` (CONTRACTS.md, CPU only);
the two have the same inputs and outputs. The forward kernel, its launchers and the forward op live in
ops/_common.py (``sequence.importance_weights`` runs them too) and are re-exported here; the backward
kernel, the autograd and the public op are this file's.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .._triton_compat import tl, triton
from .. import reference
# check_same_shape, resolve_impl, triton_interpret: unused here since issue 25, still importable from here
from .._utils import (COEF_MAX, check_real, check_same_device, check_same_shape, check_tensor, device_guard,  # noqa: F401
                      empty, resolve_impl, triton_interpret)
# The forward kernel, its launchers and custom op, the dtypes and checks are shared with
# sequence.importance_weights: they live in _common.py (re-exported here under their old names).
from ._common import (BLOCK_T_GPU, BLOCK_T_INTERPRET, IMPORTANCE_CODES, LOGP_DTYPES, MASK_DTYPES, MAX_T,  # noqa: F401
                      _block_t, _empty_logz, _fast_impl, _flowrl_loss_fwd_kernel, _flowrl_loss_fwd_native,
                      _flowrl_loss_fwd_triton, _fwd_impl, _fwd_op, _kernel_mask, _rows, _Stats7, check_logp_mask,
                      normalize_clip)

# ----------------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------------
REDUCTIONS = ("mean", "sum", "none")
EMPTY_RULES = ("zero", "logz")  # an empty response (L_i = 0): weight 0, or w = 1 with delta = log_z
# "no upper bound" saturates the log-weight here (same as the reference; see reference._LOG_W_MAX).
LOG_HI_UNBOUNDED = 64.0  # = reference._LOG_W_MAX: w*delta^2 stays finite for |delta| < 2e5


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
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


def _flowrl_loss_bwd_native(grad_per_seq, delta, weight, length, mask, logp_dtype):
    return torch.ops.flowrl_kernels_native.flowrl_loss_bwd(
        grad_per_seq.float().contiguous(), delta, weight, length, mask, logp_dtype)


# ----------------------------------------------------------------------------------------------------
# torch.library registration (shared by the triton and native impls): opaque to torch.compile, with
# fake kernels and autograd. per_seq = w * delta^2 ([B] float32) plus the detached per-sequence stats.
# The forward op flowrl_kernels::flowrl_loss_fwd (_fwd_op) is defined in _common.py (importance_weights
# runs it too); its autograd, which only the loss needs, is registered below.
# ----------------------------------------------------------------------------------------------------
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
def _bwd_fake(grad_per_seq, delta, weight, length, mask, logp_dtype, impl):
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
# argument checks (normalize_clip, check_logp_mask, _fast_impl: _common.py)
# ----------------------------------------------------------------------------------------------------
def check_clip(clip) -> Tuple[float, float]:
    """clip=(lo, hi) -> (log_lo, log_hi) as in the reference (see ``normalize_clip``)."""
    return reference._log_clip(normalize_clip(clip))


def _check_per_seq(name: str, t, B: int) -> None:
    check_tensor(name, t, dtypes=LOGP_DTYPES, ndim=1)
    if t.shape[0] != B:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B] = [{B}] (one value per row of logp).")


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
        beta: reward scale (15 in the paper), a real number in [-1e6, 1e6] (runtime kernel argument).
        clip: (lo, hi) bounds on w, or None (= (None, None)); each bound a finite real or None. lo <= 0 or
            None means no lower bound; hi > 0, hi=None saturates the log-weight at 64 (w ~ 6.2e27), as
            does any hi above exp(64); lo <= hi. Infinite bounds are a ValueError (use None). The clip
            acts on the log-ratio, so |log-ratio| of 1e4 or 32k-token sequences never overflow.
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
    beta = check_real("beta", beta, lo=-COEF_MAX, hi=COEF_MAX)
    clip = normalize_clip(clip)
    log_lo, log_hi = reference._log_clip(clip)
    impl = _fast_impl(impl, device, "flowrl_loss_fwd", "flowrl_loss", logp=logp, old_logp=old_logp,
                      ref_logp=ref_logp, log_z=log_z, rewards=rewards)
    if impl == "torch":
        return reference.flowrl_loss(logp, old_logp, ref_logp, log_z, rewards, mask, beta=beta,
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
