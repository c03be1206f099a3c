"""Sequence-level ops over [B, T] token values: masked means, log-ratios, importance weights, and GRPO's
group z-score. Spec: the functions of the same name in ``flowrl_kernels.reference``.

What is fused and what is not (and why):
- ``importance_weights`` at level "sequence" / "sequence_mean" runs the FlowRL forward kernel
  (ops/_common.py, shared with flowrl_loss.py) on impl="triton" / "native": one read of logp, old_logp
  and mask instead of the reference's ~10 ATen ops with three [B, T] temporaries. Forward only (the
  weights are detached).
- ``masked_mean`` and ``seq_log_ratio`` are plain torch for every impl: one masked reduction that needs
  its own backward; inside the loss the fused kernel already computes them, so a standalone kernel would
  only save a few launches for callers that use them alone (logging).
- ``importance_weights(level="token")`` is plain torch: elementwise, output [B, T], nothing to fuse.
- ``group_normalize`` is plain torch: [B] scalars, launch-bound whatever we do.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from .._utils import COEF_MAX, check_int, check_real, check_same_device, check_same_shape, check_tensor, resolve_impl
from ._common import (IMPORTANCE_CODES, LOGP_DTYPES, MASK_DTYPES, _fast_impl, _fwd_impl, _fwd_op, check_logp_mask,
                      normalize_clip)

LEVELS = ("sequence", "sequence_mean", "token")


def _check_x_mask(x_name: str, x, mask) -> torch.device:
    check_tensor(x_name, x, dtypes=LOGP_DTYPES, min_ndim=1)
    check_tensor("mask", mask, dtypes=MASK_DTYPES)
    check_same_shape(x_name, x, "mask", mask)
    return check_same_device(**{x_name: x}, mask=mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, impl: Optional[str] = None) -> torch.Tensor:
    """Per-row mean over the last dim: sum_t m_t x_t / sum_t m_t.  x, mask [..., T] -> [...].

    x float (any float dtype); mask bool / int / float of x's shape (a float mask acts as weights).
    Returns float32 (float64 for float64 x). Rows whose mask sums to 0 give exactly 0 (never NaN); values
    at masked positions (inf, NaN) never leak in. Differentiable w.r.t. x (grad m_t / L).
    Every impl runs the torch composition (see module docstring); ``impl`` is validated only.
    """
    device = _check_x_mask("x", x, mask)
    resolve_impl(impl, device, op="masked_mean")
    return reference.masked_mean(x, mask)


def seq_log_ratio(logp: torch.Tensor, other_logp: torch.Tensor, mask: torch.Tensor, *, normalize: str = "mean",
                  impl: Optional[str] = None) -> torch.Tensor:
    """Per-sequence log-ratio sum_t m_t (logp_t - other_t) ("sum"), divided by L = sum_t m_t ("mean").

    logp, other_logp, mask [..., T] -> [...] float32 (float64 if either log-prob is float64). Empty rows
    give 0. Differentiable w.r.t. both log-probs. -inf in other_logp at a valid token gives +inf.
    Every impl runs the torch composition (see module docstring); ``impl`` is validated only.
    """
    device = _check_x_mask("logp", logp, mask)
    check_tensor("other_logp", other_logp, dtypes=LOGP_DTYPES)
    check_same_shape("logp", logp, "other_logp", other_logp)
    check_same_device(logp=logp, other_logp=other_logp)
    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}.")
    resolve_impl(impl, device, op="seq_log_ratio")
    return reference.seq_log_ratio(logp, other_logp, mask, normalize=normalize)


def importance_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *,
                       level: str = "sequence", clip: Tuple[Optional[float], Optional[float]] = (0.8, 1.2),
                       impl: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Detached, clipped importance weights pi_theta / pi_old, computed in log space.

    level="sequence":      w_i  = clip(exp(sum_t m_it (logp - old)))        [B]   (FlowRL paper)
    level="sequence_mean": w_i  = clip(exp(sum_t m_it (logp - old) / L_i))  [B]   (GSPO)
    level="token":         w_it = clip(exp(logp_it - old_it)), 0 where masked [B, T]
    logp, old_logp [B, T] float, mask [B, T] bool / int / float (weights). clip=(lo, hi) or None: each
    bound a finite real or None, hi > 0, lo <= hi (as in ``flowrl_loss``; inf is a ValueError, use None).
    Returns (weights float32, clipped_fraction 0-dim): the fraction of non-empty rows (valid tokens)
    whose raw ratio lay outside [lo, hi].
    Edge cases: L_i = 0 -> w_i = 0; |log-ratio| 1e4 -> w = lo or hi, never inf/0-from-overflow (an
    unbounded weight saturates at exp(64)); -inf in old_logp at a valid token -> log-ratio +inf -> w = hi;
    NaN in a valid token -> NaN weight (not counted as clipped).
    impl: "triton" / "native" run the fused FlowRL forward kernel for the sequence levels (one pass, see
    module docstring; allocates 7 float32 [B] vectors); "torch" and level="token" run the reference.
    """
    device = check_logp_mask(logp, mask, ("old_logp", old_logp))
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}.")
    clip = normalize_clip(clip)
    log_lo, log_hi = reference._log_clip(clip)
    impl = _fast_impl(impl, device, "flowrl_loss_fwd", "importance_weights", logp=logp, old_logp=old_logp)
    if impl == "torch" or level == "token":
        return reference.importance_weights(logp, old_logp, mask, level=level, clip=clip)
    B = logp.shape[0]
    zeros = torch.zeros((1,), dtype=torch.float32, device=device).expand(B)  # log_z, rewards: unused
    lp = logp.detach()
    with torch.no_grad():
        # ref_logp is not read (has_ref=False): logp stands in for it. Eager: the kernels directly, without
        # the custom op's per-call dispatch; torch.compile traces the op
        fwd = _fwd_op if torch.compiler.is_compiling() else _fwd_impl
        _, _, weight, clipped, _, _, length = fwd(lp, old_logp.detach(), lp, zeros, zeros, mask, 0.0,
                                                  IMPORTANCE_CODES[level], log_lo, log_hi, impl, False)
        frac = clipped.sum() / (length != 0).sum().clamp(min=1)
    return weight, frac


def group_normalize(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, *,
                    impl: Optional[str] = None) -> torch.Tensor:
    """GRPO's group z-score (r - mean_g) / (std_g + eps), std unbiased, over consecutive groups.

    rewards [B] float (or int / bool: promoted to float32), B % group_size == 0, responses of one prompt
    adjacent; group_size a Python int >= 1; eps a real in [0, 1e6] (eps=0 allowed). Returns float32 [B]
    (float64 for float64 rewards). A group of equal rewards gives exactly 0 (also with eps=0), as does a
    spread that underflows the dtype (std + eps == 0); group_size == 1 gives 0. Plain torch for every impl
    ([B] scalars; ``impl`` is validated only).
    """
    check_tensor("rewards", rewards, ndim=1)
    if rewards.dtype.is_complex:
        raise ValueError("rewards must be real (float, int or bool), got a complex tensor.")
    group_size = check_int("group_size", group_size, lo=1)
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of rewards "
                         f"({rewards.shape[0]}); pass the number of responses per prompt.")
    eps = check_real("eps", eps, lo=0.0, hi=COEF_MAX)
    resolve_impl(impl, rewards.device, op="group_normalize")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.float32)
    return reference.group_normalize(rewards, group_size, eps=eps)
