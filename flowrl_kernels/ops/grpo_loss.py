"""GRPO / PPO-clip surrogate, the baseline FlowRL is compared against. Spec: ``reference.grpo_loss``.

Plain torch for every impl (no fused kernel yet): the trainer calls it once per micro-batch on [B, T]
values it already holds, and it is here so both algorithms share one argument-checked interface.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import reference
from .._utils import COEF_MAX, check_real, check_same_device, check_same_shape, check_tensor, resolve_impl
from ._common import LOGP_DTYPES, check_logp_mask

REDUCTIONS = ("token_mean", "seq_mean", "sum", "none")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              eps: Tuple[float, float] = (0.2, 0.2), ref_logp: Optional[torch.Tensor] = None,
              kl_coef: float = 0.0, reduction: str = "token_mean",
              impl: Optional[str] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO-clip surrogate with GRPO advantages and an optional k3 KL penalty to a reference.

        ratio_t = exp(min(logp_t - old_t, 88))
        pg_t    = max(-A ratio_t, -A clip(ratio_t, 1 - eps[0], 1 + eps[1]))
        loss_t  = pg_t + kl_coef * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)   (KL only with ref_logp)

    Args:
        logp: [B, T] float, receives the gradient. old_logp, ref_logp: [B, T] float constants.
        advantages: [B] (one per sequence, e.g. ``group_normalize(rewards, G)``) or [B, T], float.
        mask: [B, T] bool / int / float (weights).
        eps: (low, high) clip widths, reals in [0, 1e6] (DAPO's clip-higher: e.g. (0.2, 0.28)).
        kl_coef: weight of the k3 KL term, a real in [0, 1e6] (needs ref_logp when != 0).
        reduction: "token_mean" (over all valid tokens), "seq_mean" (mean of per-sequence token means),
            "sum", or "none" ([B, T], 0 where masked).
    Returns (loss, stats): stats = {clip_frac, ratio_mean, kl} token means over valid tokens (detached).

    Edge cases: a fully masked batch gives loss 0 and zero grads; empty rows add nothing; masked
    positions never leak. The log-ratio saturates at 88 before exp, so log-ratios of +-1e4 give finite
    ratios and no NaN gradient (the clipped branch's gradient is 0; with A < 0 and a huge ratio the
    unclipped branch's loss is ~1.65e38 |A|, per PPO's unbounded pessimistic term). -inf in old_logp at a
    valid token = log-ratio +inf: treated the same way. -inf in ref_logp at a valid token with
    kl_coef > 0: k3 = inf (the reference forbids that token) -> loss inf; -inf in logp itself with kl_coef > 0
    gives k3 = inf - inf = NaN (the policy cannot have sampled that token). NaN at a valid token -> NaN loss.
    Implementation: plain torch composition for every impl (``impl`` is validated only).
    """
    device = check_logp_mask(logp, mask, ("old_logp", old_logp))
    check_tensor("advantages", advantages, dtypes=LOGP_DTYPES)
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected [B] = [{logp.shape[0]}] "
                             "or logp's shape [B, T].")
    else:
        check_same_shape("logp", logp, "advantages", advantages)
    check_same_device(logp=logp, advantages=advantages)
    if ref_logp is not None:
        check_tensor("ref_logp", ref_logp, dtypes=LOGP_DTYPES)
        check_same_shape("logp", logp, "ref_logp", ref_logp)
        check_same_device(logp=logp, ref_logp=ref_logp)
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"eps must be a pair of floats >= 0 (low, high clip widths), got {eps!r}.")
    eps = tuple(check_real(f"eps[{i}]", e, lo=0.0, hi=COEF_MAX) for i, e in enumerate(eps))
    kl_coef = check_real("kl_coef", kl_coef, lo=0.0, hi=COEF_MAX)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference policy's token log-probs).")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    resolve_impl(impl, device, op="grpo_loss")
    return reference.grpo_loss(logp, old_logp, advantages, mask, eps=eps, ref_logp=ref_logp, kl_coef=kl_coef,
                               reduction=reduction)
