"""token_logprobs over a vocabulary sharded across ranks (tensor-parallel lm_head: Megatron, verl-Megatron).

Reached through ``flowrl_kernels.token_logprobs(logits_shard, labels, process_group=pg)``. Rank r of the
group holds ``logits[..., V_local]``, the columns [r * V_local, (r + 1) * V_local) of the full vocabulary
V = world * V_local (equal shards, the partition of Megatron's ColumnParallelLinear / vocab-parallel
embedding); ``labels`` are global ids, the same on every rank. Every rank gets the logp (and entropy) that
``token_logprobs`` gives on the gathered [..., V] logits, and the gradient w.r.t. its own shard.

Forward, per shard: the single-device kernel (one read of the shard; ``impl`` as usual) gives per row the
shard's lse_r and entropy H_r, with the label remapped to the shard's local id or to the sentinel
V_local ("the target is in another shard"), which the kernels accept. The rank that holds the target reads
its logit directly (one gathered element per row). Then two all-reduces of O(N) floats merge the shards,
with M = max_r lse_r and e_r = exp(lse_r - M):

    lse = M + log S,  S = sum_r e_r,    logp = z_target - lse,
    H   = Q / S + log S,  Q = sum_r e_r (H_r + M - lse_r)

(H = sum_r w_r (H_r + lse - lse_r) with w_r = e_r / S: every term is >= 0, so the merge adds no
cancellation; all-reduce #1 is the MAX of lse_r, #2 the SUM of the stacked [S, z_target, Q] terms).

Backward: no communication. d logp / dz_j = [j == t] - p_j and d H / dz_j = -p_j (z_j - lse + H) need only
the global lse and H, which the forward kept: the single-device backward kernel, given those and the
sentinel label, writes each shard's exact gradient. Convention (Megatron's vocab-parallel cross entropy):
the outputs are replicated, every rank backpropagates the same loss, and the gradient w.r.t. a shard is
that one loss's gradient (no all-reduce of the upstream gradient).

Memory: the kernel path allocates 4 bytes x {logp, lse, entropy} x N per shard plus a [3, N] fp32 merge
buffer; the backward allocates the shard's gradient. The "torch" path materializes [N, V_local] in the
compute dtype (it is the readable spec of the shard math, not a fast path).
Not traceable by torch.compile (the collectives run eagerly inside an autograd.Function).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .. import reference

# The single-device kernels are reached as the torch.library ops that ops/token_logprobs.py registers
# (torch.ops.flowrl_kernels.token_logprobs_fwd / _bwd; the only way here is token_logprobs(process_group=),
# so they exist by then): importing that module instead would make an import cycle.


# ----------------------------------------------------------------------------------------------------
# shard statistics and their merge
# ----------------------------------------------------------------------------------------------------
def _shard_stats_torch(logits: torch.Tensor, temperature: float, return_entropy: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lse_r, H_r) of one shard in the compute dtype (H_r = 0 without ``return_entropy``)."""
    cd = reference.compute_dtype(logits)
    z = logits.to(cd) / temperature
    lse = torch.logsumexp(z, dim=-1)
    if not return_entropy:
        return lse, torch.zeros_like(lse)
    d = lse.unsqueeze(-1) - z  # -log p >= 0
    p = torch.exp(-d)
    zero = torch.zeros((), dtype=cd, device=z.device)
    # H = sum p (lse - z): every term >= 0, so no cancellation (the reference's lse - sum p z loses
    # ~ulp(|z|) in fp32, which the backward would carry through H); -inf logits have p = 0 and add 0
    ent = (p * torch.where(p > 0, d, zero)).sum(-1)
    return lse, ent


def _merge(lse_r: torch.Tensor, ent_r: torch.Tensor, z_t: torch.Tensor, return_entropy: bool, group
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (lse, logp, H) from every rank's (lse_r, H_r, z_target or 0): two all-reduces."""
    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # a shard whose row is all -inf has lse_r = -inf: it weighs 0 (its H_r + M - lse_r is inf or NaN);
    # a row that is -inf in every shard has M = -inf and stays -inf / NaN, as on one device
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(lse_r - m_safe)
    q = torch.where(e > 0, e * (ent_r + (m_safe - lse_r)), torch.zeros_like(e)) if return_entropy else e
    buf = torch.stack([e, z_t, q])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    s, z_t, q = buf.unbind(0)
    log_s = torch.log(s)
    lse = m_safe + log_s
    ent = q / s + log_s if return_entropy else torch.zeros_like(lse)
    return lse, z_t - lse, ent


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
class VocabParallelTokenLogprobs(torch.autograd.Function):
    """(logits_shard, labels) -> replicated (logp, entropy); see the module docstring."""

    @staticmethod
    def forward(ctx, logits, labels, temperature: float, return_entropy: bool, ignore_index: int, impl: str,
                group, vocab_start: int, vocab: int):
        V_local = logits.shape[-1]
        valid = labels != ignore_index
        local = labels - vocab_start
        here = valid & (local >= 0) & (local < V_local)
        # the kernels' contract: ignore_index, a local id, or V_local = "target in another shard"
        k_labels = torch.where(here, local, torch.full_like(local, V_local))
        k_labels = torch.where(valid, k_labels, labels)
        # the target logit, exactly, from the rank that holds it (0 elsewhere, summed in the merge)
        x_t = logits.gather(-1, torch.where(here, local, torch.zeros_like(local)).long().unsqueeze(-1)).squeeze(-1)
        if impl == "torch":
            cd = reference.compute_dtype(logits)
            lse_r, ent_r = _shard_stats_torch(logits, temperature, return_entropy)
            z_t = x_t.to(cd) / temperature
        else:
            _, lse_r, ent_r = torch.ops.flowrl_kernels.token_logprobs_fwd(
                logits, k_labels, temperature, return_entropy, ignore_index, impl, True)
            if not return_entropy:
                ent_r = torch.zeros_like(lse_r)
            z_t = x_t.float() * (1.0 / temperature)  # as the kernels scale: x * (1 / T) in fp32
        z_t = torch.where(here, z_t, torch.zeros_like(z_t))
        lse, logp, ent = _merge(lse_r, ent_r, z_t, return_entropy, group)
        # a label outside the full vocab (unchecked on GPU) is in no shard: poison its row (NaN logp,
        # entropy, and through lse the gradient), as token_logprobs does on one device
        bad = valid & ((labels < 0) | (labels >= vocab))
        nan = torch.full_like(lse, float("nan"))
        lse, logp = torch.where(bad, nan, lse), torch.where(bad, nan, logp)
        ent = torch.where(bad, nan, ent) if return_entropy else ent
        zero = torch.zeros_like(logp)
        logp, ent = torch.where(valid, logp, zero), torch.where(valid, ent, zero)
        ctx.save_for_backward(logits, k_labels, lse, ent)
        ctx.temperature, ctx.ignore_index, ctx.impl, ctx.return_entropy = temperature, ignore_index, impl, return_entropy
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, k_labels, lse, ent = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        if not ctx.return_entropy:
            grad_ent = None
        if ctx.impl != "torch":
            grad = torch.ops.flowrl_kernels.token_logprobs_bwd(
                logits, k_labels, lse.float(), ent.float(), grad_logp, grad_ent, ctx.temperature, ctx.ignore_index,
                ctx.impl, True)
            return grad, None, None, None, None, None, None, None, None
        # torch: g_z = g_logp ([j == t] - p) - g_H p (z - lse + H), then / T
        cd = lse.dtype
        z = logits.to(cd) / ctx.temperature
        u = z - lse.unsqueeze(-1)
        p = torch.exp(u)
        valid = (k_labels != ctx.ignore_index).unsqueeze(-1)
        gl = grad_logp.to(cd).unsqueeze(-1)
        coef = gl
        if grad_ent is not None:
            ge = grad_ent.to(cd).unsqueeze(-1)
            # p (u + H) with p = 0 where z = -inf (not 0 * -inf = NaN)
            coef = coef + ge * (torch.where(p > 0, u, torch.zeros_like(u)) + ent.unsqueeze(-1))
        g = -p * coef
        V_local = logits.shape[-1]
        hit = (k_labels >= 0) & (k_labels < V_local) & (k_labels != ctx.ignore_index)
        onehot = torch.zeros_like(g).scatter_(-1, torch.where(hit, k_labels, 0).long().unsqueeze(-1),
                                              hit.unsqueeze(-1).to(cd))
        g = torch.where(valid, g + onehot * gl, torch.zeros_like(g)) / ctx.temperature
        return g.to(logits.dtype), None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# entry point (argument checks are done by token_logprobs)
# ----------------------------------------------------------------------------------------------------
def group_layout(process_group, V_local: int) -> Tuple[int, int]:
    """(vocab_start of this rank, full vocab size) for equal shards of ``V_local`` columns."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group is set but torch.distributed is not initialized; call "
                         "dist.init_process_group first, or pass process_group=None for unsharded logits.")
    rank = dist.get_rank(group=process_group)
    world = dist.get_world_size(group=process_group)
    return rank * V_local, world * V_local


def vocab_parallel_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                                  return_entropy: bool, ignore_index: int, impl: str, process_group,
                                  vocab_start: int, vocab: int):
    logp, ent = VocabParallelTokenLogprobs.apply(logits, labels, temperature, return_entropy, ignore_index, impl,
                                                 process_group, vocab_start, vocab)
    return (logp, ent) if return_entropy else logp
