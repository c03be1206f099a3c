"""FlowRL and GRPO on one shared pipeline: small pure functions over tensors.

Both algorithms see the same rollout batch, the same float32 token log-probs and the same
group-normalized reward r_hat (GRPO's z-score over the G responses of a prompt). They differ only in
the objective: FlowRL's trajectory balance to pi_ref * exp(beta r_hat) / Z(x), GRPO's clipped
surrogate with advantage r_hat. All math goes through flowrl_kernels' public ops.

Gradient accumulation: each micro-batch returns its share of the mini-batch mean (sum over its rows
divided by the mini-batch's count), so the accumulated gradient equals the unsplit one exactly.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import math

import torch

import flowrl_kernels
from flowrl import presets
from flowrl.config import Algo


def normalized_rewards(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r_hat [B]: (r - group mean) / (group std + 1e-6); all-equal groups give 0."""
    return flowrl_kernels.group_normalize(rewards, group_size)


def zero_std_fraction(groups: torch.Tensor) -> float:
    """The fraction of groups whose rewards are all equal: groups [P, G] (one row per prompt, its G
    rewards) -> a Python float in [0, 1] (one host read). Such a group has r_hat = 0 everywhere, so GRPO
    learns nothing from it (FlowRL still fits log Z and the reference term); logged as ``zero_std_groups``."""
    return float((groups.max(-1).values == groups.min(-1).values).float().mean())


def needs_reference(algo: Algo) -> bool:
    return algo.name == "flowrl" or algo.kl_coef > 0


def clip_bounds(clip) -> Tuple[Optional[float], Optional[float]]:
    """Config [lo, hi] with negative = unbounded -> the (lo, hi) tuple flowrl_loss takes."""
    return presets.clip_tuple(clip)


def _outside(log_w: torch.Tensor, valid: torch.Tensor, lo: Optional[float], hi: Optional[float]
             ) -> Dict[str, torch.Tensor]:
    """Fractions of the valid entries of ``log_w`` below log(lo) / above log(hi), and their mean |log_w|."""
    n = valid.sum().clamp(min=1).float()
    # the ops clip in log space (lo <= 0 means no lower bound); the same comparisons here, so the
    # two fractions add up to the loss's own clip_frac
    low = valid & (log_w < math.log(lo)) if lo is not None and lo > 0 else torch.zeros_like(valid)
    high = valid & (log_w > math.log(hi)) if hi is not None else torch.zeros_like(valid)
    return {"is_clip_low_frac": low.sum() / n, "is_clip_high_frac": high.sum() / n,
            "is_log_w_abs": torch.where(valid, log_w.abs(), torch.zeros_like(log_w)).sum() / n}


@torch.no_grad()
def importance_stats(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, algo: Algo
                     ) -> Dict[str, torch.Tensor]:
    """How far the policy has moved from the one that sampled the batch (detached 0-dim tensors).

    FlowRL (per sequence, the level the loss weights with): log w_i = sum_t (logp - old) for
    importance='sequence', the token mean for 'sequence_mean' (``flowrl_kernels.seq_log_ratio``), over the
    non-empty rows. is_clip_low_frac / is_clip_high_frac: fraction of rows whose raw ratio lies below lo /
    above hi of algo.clip (0 for an absent bound, and for importance='none', which weights nothing);
    is_log_w_abs: mean |log w_i| (for 'none' the token-sum ratio's, as a measure of staleness).
    GRPO (per token, its ratio's level): the same three over valid tokens, with the PPO range
    [1 - eps_low, 1 + eps_high] (a token counts whether or not its advantage's sign makes the clip bind;
    grpo_loss's clip_frac counts only the binding ones). With one update per batch old_logp = logp and
    all three are exactly 0.
    """
    logp = logp.detach()
    if algo.name == "flowrl":
        level = "mean" if algo.importance == "sequence_mean" else "sum"
        log_w = flowrl_kernels.seq_log_ratio(logp, old_logp, mask, normalize=level)
        lo, hi = clip_bounds(algo.clip) if algo.importance != "none" else (None, None)
        return _outside(log_w, mask.sum(-1) != 0, lo, hi)
    valid = mask != 0
    log_r = torch.where(valid, logp.float() - old_logp.float(), torch.zeros((), device=logp.device))
    return _outside(log_r, valid, 1.0 - algo.eps[0], 1.0 + algo.eps[1])


def flowrl_objective(out: Dict[str, torch.Tensor], old_logp: torch.Tensor, ref_logp: torch.Tensor,
                     r_hat: torch.Tensor, mask: torch.Tensor, algo: Algo, n_seq: int
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Micro-batch share of mean_i w_i delta_i^2 over a mini-batch of ``n_seq`` sequences."""
    loss, st = flowrl_kernels.flowrl_loss(out["logp"], old_logp, ref_logp, out["log_z"], r_hat, mask,
                                          beta=algo.beta, importance=algo.importance,
                                          clip=clip_bounds(algo.clip), reduction="sum", empty=algo.empty)
    stats = {"delta": st["delta"].mean(), "delta_abs": st["delta"].abs().mean(), "is_weight": st["weight"].mean(),
             "is_clip_frac": st["clip_frac"], "logp_mean": st["logp_mean"].mean(),
             "ref_logp_mean": st["ref_logp_mean"].mean(), "log_z": out["log_z"].detach().float().mean(),
             **importance_stats(out["logp"], old_logp, mask, algo)}
    return loss / n_seq, stats


def grpo_objective(out: Dict[str, torch.Tensor], old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
                   r_hat: torch.Tensor, mask: torch.Tensor, algo: Algo, n_seq: int, n_tok: int
                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Micro-batch share of the GRPO loss over a mini-batch (``n_seq`` sequences, ``n_tok`` tokens)."""
    kw = dict(eps=tuple(algo.eps), ref_logp=ref_logp, kl_coef=algo.kl_coef)
    if algo.grpo_reduction == "token_mean":
        loss, st = flowrl_kernels.grpo_loss(out["logp"], old_logp, r_hat, mask, reduction="sum", **kw)
        loss = loss / max(n_tok, 1)
    else:
        loss, st = flowrl_kernels.grpo_loss(out["logp"], old_logp, r_hat, mask, reduction="seq_mean", **kw)
        loss = loss * (mask.shape[0] / n_seq)
    stats = {"is_clip_frac": st["clip_frac"], "is_weight": st["ratio_mean"], "kl": st["kl"],
             **importance_stats(out["logp"], old_logp, mask, algo)}
    return loss, stats


def objective(out, old_logp, ref_logp, r_hat, mask, algo: Algo, n_seq: int, n_tok: int):
    if algo.name == "flowrl":
        return flowrl_objective(out, old_logp, ref_logp, r_hat, mask, algo, n_seq)
    return grpo_objective(out, old_logp, ref_logp, r_hat, mask, algo, n_seq, n_tok)
