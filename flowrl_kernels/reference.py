"""Pure-PyTorch reference of every public op: the spec.

Tests compare every fast path (Triton, native C++/CUDA) against these functions evaluated in float64,
and benchmarks import their baseline from here. Math runs in float32 whatever the input dtype
(float64 when given float64). Nothing here is fused or memory-lean on purpose: it is written to be
obviously right (docs/flowrl.md derives every formula of the FlowRL ops).

Shapes: N (or [...]) tokens, V vocab, H hidden, B sequences, T tokens per sequence.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "compute_dtype",
    "token_logprobs",
    "linear_token_logprobs",
    "masked_mean",
    "seq_log_ratio",
    "importance_weights",
    "group_normalize",
    "flowrl_loss",
    "grpo_loss",
]

# log(float32 max) = 88.72: exp() of anything larger overflows float32. The GRPO ratio saturates at
# exp(88); an unbounded importance weight saturates lower, at exp(64) ~ 6.2e27, so that the loss
# w * delta^2 and its gradient 2 w delta stay finite in float32 for |delta| up to ~2e5 (at exp(88) they
# overflow as soon as |delta| > 1, and the result would depend on the order of float32 operations).
_LOG_F32_MAX = 88.0
_LOG_W_MAX = 64.0


def compute_dtype(*ts: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (the math dtype of every op)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


# ----------------------------------------------------------------------------------------------------
# token log-probs (+ entropy)
# ----------------------------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100):
    """logp[...] = log softmax(logits / T)[..., label];  entropy[...] = H(softmax(logits / T)).

    logits [..., V], labels [...]. Returns float32 (float64 for float64 logits) logp, and entropy when
    ``return_entropy``. Positions with label == ignore_index give 0 in both outputs and get zero grad.
    A label outside [0, V) that is not ignore_index poisons its position: NaN logp and entropy, and a
    NaN gradient row (every impl does the same when the range check is skipped, e.g. on GPU).
    """
    cd = compute_dtype(logits)
    x = logits.to(cd) / temperature
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    safe = torch.where(valid & in_range, labels, torch.zeros_like(labels)).long()
    # lse * NaN for an out-of-range label: a NaN value AND a NaN gradient (a where() would pass 0 back)
    poison = torch.where(valid & ~in_range, float("nan"), 1.0).to(cd)
    lse = torch.logsumexp(x, dim=-1) * poison
    logp = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    zero = torch.zeros((), dtype=cd, device=logits.device)
    logp = torch.where(valid, logp, zero)
    if not return_entropy:
        return logp
    p = torch.softmax(x, dim=-1)
    # -inf logits (masked vocab entries) have p = 0 and contribute 0 (p log p -> 0), not 0 * -inf = NaN;
    # the where on x (not on the product) keeps their gradient 0 instead of NaN
    ent = lse - (p * torch.where(p > 0, x, torch.zeros((), dtype=cd, device=x.device))).sum(-1)
    ent = torch.where(valid, ent, zero)
    return logp, ent


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100):
    """token_logprobs(hidden @ weight.T + bias, labels): hidden [..., H], weight [V, H], bias [V].

    Materializes the full [..., V] logits in the compute dtype: the naive path the fused op avoids.
    """
    cd = compute_dtype(hidden, weight, bias)
    logits = hidden.to(cd) @ weight.to(cd).t()
    if bias is not None:
        logits = logits + bias.to(cd)
    return token_logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy,
                          ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------------
# sequence-level ops
# ----------------------------------------------------------------------------------------------------
def _mask(mask: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    return mask.to(cd)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean over the last dim: sum_t m_t x_t / sum_t m_t. x, mask [B, T] -> [B].

    A float mask acts as weights. Rows whose mask sums to 0 give exactly 0 (never NaN); values at masked
    positions never leak in, even when they are inf or NaN.
    """
    cd = compute_dtype(x)
    m = _mask(mask, cd)
    xs = torch.where(m != 0, x.to(cd), torch.zeros((), dtype=cd, device=x.device)) * m
    length = m.sum(-1)
    return torch.where(length != 0, xs.sum(-1) / torch.where(length != 0, length, torch.ones_like(length)),
                       torch.zeros_like(length))


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    cd = compute_dtype(x)
    m = _mask(mask, cd)
    return (torch.where(m != 0, x.to(cd), torch.zeros((), dtype=cd, device=x.device)) * m).sum(-1)


def seq_log_ratio(logp: torch.Tensor, other_logp: torch.Tensor, mask: torch.Tensor, *,
                  normalize: str = "mean") -> torch.Tensor:
    """Per-sequence log-ratio sum_t m_t (logp_t - other_t), divided by L = sum_t m_t if normalize="mean".

    logp, other_logp, mask [B, T] -> [B]. Empty rows give 0. Differentiable w.r.t. both log-probs.
    """
    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}.")
    cd = compute_dtype(logp, other_logp)
    diff = logp.to(cd) - other_logp.to(cd)
    return masked_mean(diff, mask) if normalize == "mean" else _masked_sum(diff, mask)


def _log_clip(clip: Tuple[Optional[float], Optional[float]]):
    lo, hi = clip
    log_lo = -math.inf if lo is None or lo <= 0 else math.log(lo)
    log_hi = _LOG_W_MAX if hi is None else min(math.log(hi), _LOG_W_MAX)
    return log_lo, log_hi


def importance_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *,
                       level: str = "sequence",
                       clip: Tuple[Optional[float], Optional[float]] = (0.8, 1.2)):
    """Detached, clipped importance weights pi_theta / pi_old, computed in log space.

    level="sequence":      w_i = clip(exp(sum_t m_it (logp - old)))          -> [B]
    level="sequence_mean": w_i = clip(exp(sum_t m_it (logp - old) / L_i))     -> [B]   (GSPO)
    level="token":         w_it = clip(exp(logp_it - old_it)) at m_it != 0   -> [B, T] (0 where masked)
    clip=(lo, hi), either may be None (no bound). The clip is applied to the log-ratio
    (log lo, log hi), so |log-ratio| of 1e4 never overflows; an unbounded weight saturates at
    exp(64) ~ 6.2e27. Sequences with L_i = 0 get weight 0. -inf in old_logp at a valid token gives
    log-ratio +inf -> weight hi (or exp(64) unbounded); NaN stays NaN.
    Returns (weights, clipped_fraction): the fraction of valid sequences (or tokens) whose raw ratio
    lies outside [lo, hi], a 0-dim tensor.
    """
    if level not in ("sequence", "sequence_mean", "token"):
        raise ValueError(f"level must be 'sequence', 'sequence_mean' or 'token', got {level!r}.")
    log_lo, log_hi = _log_clip(clip)
    with torch.no_grad():
        cd = compute_dtype(logp, old_logp)
        m = _mask(mask, cd)
        zero = torch.zeros((), dtype=cd, device=logp.device)
        diff = torch.where(m != 0, logp.detach().to(cd) - old_logp.to(cd), zero)
        if level == "token":
            log_w, valid = diff, m != 0
        else:
            log_w = (diff * m).sum(-1)
            length = m.sum(-1)
            valid = length != 0
            if level == "sequence_mean":
                log_w = log_w / torch.where(valid, length, torch.ones_like(length))
        clipped = (log_w < log_lo) | (log_w > log_hi)
        w = torch.exp(log_w.clamp(log_lo, log_hi))
        w = torch.where(valid, w, zero)
        n_valid = valid.sum()
        frac = (clipped & valid).sum().to(cd) / n_valid.clamp(min=1).to(cd)
    return w, frac


def group_normalize(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group z-score: (r - mean_g) / (std_g + eps), std unbiased, over consecutive groups.

    rewards [B] with B % group_size == 0 (responses of one prompt are adjacent). A group whose rewards
    are all equal gives exactly 0; group_size == 1 gives 0 (no spread to normalize by).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}.")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must be >= 1 and divide the number of rewards ({rewards.shape[0]})."
        )
    cd = compute_dtype(rewards)
    r = rewards.to(cd).view(-1, group_size)
    centered = r - r.mean(-1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(centered).view(-1)
    std = r.std(-1, unbiased=True, keepdim=True)
    return (centered / (std + eps)).view(-1)


# ----------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------
def flowrl_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, log_z: torch.Tensor,
                rewards: torch.Tensor, mask: torch.Tensor, *, beta: float = 15.0,
                importance: str = "sequence",
                clip: Tuple[Optional[float], Optional[float]] = (0.8, 1.2),
                reduction: str = "mean", empty: str = "zero") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """FlowRL trajectory-balance loss (docs/flowrl.md).

    delta_i = log_z_i + mean_t logp_it - beta * r_i - mean_t ref_logp_it     (means over m_it, L_i)
    w_i     = detach(clip(pi_theta / pi_old))   importance: "sequence" (token-sum ratio, the paper),
              "sequence_mean" (GSPO, exp of the token mean) or "none" (w_i = 1 for non-empty rows)
    loss    = mean_i w_i delta_i^2   (reduction "mean": / B, "sum", or "none": per-sequence [B])

    logp, old_logp, ref_logp, mask [B, T]; log_z, rewards [B]. ``rewards`` is the normalized reward
    r_hat (see group_normalize). Gradients reach ``logp`` and ``log_z`` only: old_logp, ref_logp and
    rewards are constants, and w is detached.
    Rows with L_i = 0 (empty responses), by ``empty``:
      "zero": w_i = 0 (no loss, no gradient; delta_i = log_z_i - beta r_i is still reported);
      "logz": w_i = 1 and delta_i = log_z_i, so the row adds log_z_i^2 and pushes log Z towards 0 (the
              FlowRL authors' code: its reward is a masked mean of token-level advantages, 0 over no tokens).
    Returns (loss, stats) with stats = {delta, weight, clip_frac, logp_mean, ref_logp_mean} (detached);
    clip_frac counts non-empty rows only.
    """
    if importance not in ("sequence", "sequence_mean", "none"):
        raise ValueError(f"importance must be 'sequence', 'sequence_mean' or 'none', got {importance!r}.")
    if empty not in ("zero", "logz"):
        raise ValueError(f"empty must be 'zero' (an empty response weighs 0) or 'logz' (it adds log_z^2, "
                         f"the FlowRL authors' rule), got {empty!r}.")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    cd = compute_dtype(logp, log_z)
    lp_bar = masked_mean(logp.to(cd), mask)
    ref_bar = masked_mean(ref_logp.detach().to(cd), mask)
    delta = log_z.to(cd) + lp_bar - beta * rewards.detach().to(cd) - ref_bar
    if importance == "none":
        length = _mask(mask, cd).sum(-1)
        w = (length != 0).to(cd)
        frac = torch.zeros((), dtype=cd, device=logp.device)
    else:
        w, frac = importance_weights(logp, old_logp, mask,
                                     level="sequence" if importance == "sequence" else "sequence_mean",
                                     clip=clip)
        w = w.to(cd)
    if empty == "logz":
        is_empty = _mask(mask, cd).sum(-1) == 0
        delta = torch.where(is_empty, log_z.to(cd), delta)
        w = torch.where(is_empty, torch.ones((), dtype=cd, device=w.device), w)
    per_seq = w * delta * delta
    if reduction == "mean":
        loss = per_seq.sum() / max(per_seq.shape[0], 1)
    elif reduction == "sum":
        loss = per_seq.sum()
    else:
        loss = per_seq
    stats = {"delta": delta.detach(), "weight": w.detach(), "clip_frac": frac.detach(),
             "logp_mean": lp_bar.detach(), "ref_logp_mean": ref_bar.detach()}
    return loss, stats


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              eps: Tuple[float, float] = (0.2, 0.2), ref_logp: Optional[torch.Tensor] = None,
              kl_coef: float = 0.0, reduction: str = "token_mean"
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO / PPO-clip surrogate, the baseline.

    ratio_t = exp(logp_t - old_t);  pg_t = max(-A_i ratio_t, -A_i clip(ratio_t, 1 - eps[0], 1 + eps[1]))
    plus kl_coef * k3_t with k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 when ref_logp is given.
    logp, old_logp, mask (and ref_logp) [B, T]; advantages [B] (one per sequence) or [B, T].
    reduction: "token_mean" (sum over valid tokens / number of valid tokens, DAPO-style),
    "seq_mean" (mean over sequences of each sequence's token mean, the original GRPO), "sum", or
    "none" ([B, T], 0 where masked). Gradient reaches ``logp`` only. The log-ratio saturates at 88 before
    exp (ratio <= ~1.65e38, as for importance_weights), so a huge log-ratio never gives a NaN gradient.
    Returns (loss, stats) with stats = {clip_frac, ratio_mean, kl} (token means over valid tokens).
    """
    if reduction not in ("token_mean", "seq_mean", "sum", "none"):
        raise ValueError(f"reduction must be 'token_mean', 'seq_mean', 'sum' or 'none', got {reduction!r}.")
    cd = compute_dtype(logp)
    m = _mask(mask, cd)
    valid = m != 0
    zero = torch.zeros((), dtype=cd, device=logp.device)
    lp = logp.to(cd)
    log_ratio = torch.where(valid, lp - old_logp.detach().to(cd), zero)
    # saturate at exp(88) (float32 max ~ exp(88.7)): an inf ratio on the branch max() does not pick
    # gives 0 * inf = NaN in the backward (log-ratio 1e4 with A > 0 was a NaN gradient)
    ratio = torch.exp(log_ratio.clamp(max=_LOG_F32_MAX))
    adv = advantages.detach().to(cd)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - eps[0], 1.0 + eps[1])
    per_tok = torch.maximum(pg1, pg2)
    kl = torch.zeros_like(per_tok)
    if ref_logp is not None:
        d = torch.where(valid, ref_logp.detach().to(cd) - lp, zero)
        kl = torch.exp(d) - d - 1.0
        if kl_coef != 0.0:
            per_tok = per_tok + kl_coef * kl
    per_tok = torch.where(valid, per_tok, zero) * m
    n_tok = m.sum()
    if reduction == "token_mean":
        loss = per_tok.sum() / n_tok.clamp(min=1)
    elif reduction == "seq_mean":
        length = m.sum(-1)
        loss = (per_tok.sum(-1) / length.clamp(min=1)).sum() / max(per_tok.shape[0], 1)
    elif reduction == "sum":
        loss = per_tok.sum()
    else:
        loss = per_tok
    with torch.no_grad():
        clipped = valid & (pg2 > pg1)
        denom = valid.sum().clamp(min=1).to(cd)
        stats = {"clip_frac": clipped.sum().to(cd) / denom,
                 "ratio_mean": torch.where(valid, ratio, zero).sum() / denom,
                 "kl": torch.where(valid, kl, zero).sum() / denom}
    return loss, stats
