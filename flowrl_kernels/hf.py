"""Per-token response log-probs (and entropy) of any Hugging Face causal LM, without the [B, T, V] logits.

    logp = response_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0)
    logp, ent = response_logprobs(..., return_entropy=True)
    logp, hidden = response_logprobs(..., return_hidden=True)   # + the [B, T, H] input of the lm_head

How it works (and why this way). The model's own top-level ``forward`` runs, unchanged, with the
output-embedding module (``model.get_output_embeddings()``, the lm_head) temporarily given a forward
that takes the final hidden states it is called with and returns, instead of logits, a small
[B, T, C] float32 tensor holding the per-token log-prob (and entropy) computed by
``flowrl_kernels.linear_token_logprobs(hidden, lm_head.weight, next_tokens, bias=lm_head.bias)``,
only at the rows that predict a response token. That tensor comes back as ``output.logits``.

- Generic: no per-architecture code. Whatever the body does (embedding scaling, final norm,
  MiniCPM-style hidden scaling before the head) happens before the head is called, so it is included.
  Tied embeddings need nothing special: the head's weight *is* the embedding, and its gradient
  accumulates into the shared parameter.
- FSDP2-safe: calling ``model.model(...)`` (the body) directly on a ``fully_shard``-ed root would skip
  the root's pre-forward (the all-gather of root-owned parameters such as the lm_head weight) and its
  pre-backward / post-backward callback (which reduce-scatters the root's gradients). Here the
  top-level forward runs, so every FSDP hook fires as in a normal step: the head's weight is
  unsharded while our forward runs (also when the head is its own ``fully_shard`` unit), our result
  is the root's output (so FSDP's pre-backward hooks are registered on it), and the backward reaches
  the weight through that graph.
- Post-head transforms: a model may change the logits after the head (Cohere ``logit_scale``,
  Granite ``logits_scaling``, Falcon-H1 ``lm_head_multiplier``, Gemma-2/3 ``final_logit_softcapping``).
  Multiplicative scales named in the config are folded into the temperature
  (``softmax(s z / T) = softmax(z / (T / s))``) and undone on our returned tensor; soft-capping (a
  tanh) cannot be expressed through ``linear_token_logprobs`` and raises. Two probe columns (1.0 and
  2.0) ride along in the returned tensor, so any elementwise post-head transform the config does not
  announce is detected and raises instead of silently corrupting the log-probs.

Output layout: [B, T] float32 (float64 for a float64 model), aligned with ``input_ids``: position t
holds log pi(input_ids[:, t] | input_ids[:, :t]) at the given temperature (computed from the hidden
state at t - 1), and 0 where ``response_mask * attention_mask`` is 0. Position 0 has no context and
is always 0. Entropy (when asked) has the same layout: the entropy of the distribution that produced
token t. Memory: the kernel never allocates [N, V]; the head's output is B * T * C floats (C <= 4).
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch

__all__ = ["response_logprobs", "logit_scale_of", "left_padded_position_ids"]

_IGNORE = -100
# config attributes that multiply (or divide) the logits after the head; read from transformers 5.24
_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
_SOFTCAPS = ("final_logit_softcapping",)


def logit_scale_of(config) -> float:
    """The factor a model multiplies its logits by after the head, from its (text) config (1.0 if none).

    Raises ValueError for transforms that are not a scale (logit soft-capping).
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _SOFTCAPS:
        if getattr(cfg, name, None) is not None:
            raise ValueError(
                f"{type(cfg).__name__}.{name}={getattr(cfg, name)}: this model soft-caps its logits (tanh) after "
                "the lm_head, which linear_token_logprobs does not reproduce. Compute log-probs from "
                "model(...).logits with flowrl_kernels.token_logprobs instead."
            )
    for name in _MULTIPLIERS:
        v = getattr(cfg, name, None)
        if v is not None:
            return float(v)
    v = getattr(cfg, "logits_scaling", None)
    if v is not None:  # Granite / MiniCPM3 divide by it; HyperCLOVA X multiplies
        return float(v) if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / float(v)
    return 1.0


def left_padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, as ``generate()`` uses: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_head(head) -> None:
    if head is None:
        raise ValueError("model.get_output_embeddings() returned None: the model has no lm_head-like output layer.")
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(
            f"the output embedding is a {type(head).__name__}, not a plain nn.Linear (its forward may do more than "
            "hidden @ weight.T + bias, e.g. a LoRA or quantized layer); merge adapters / dequantize first, or "
            "compute log-probs from model(...).logits with flowrl_kernels.token_logprobs."
        )


def _scored_rows(response_mask: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which hidden-state rows the head scores: (next_sel [B, T-1] bool, src [n] int64).

    Row t-1 of the hidden states predicts token t, so next_sel[b, t] says whether token t + 1 of row b
    is a response token (and not padding); position 0 has no context and is never scored. src holds
    the row of the [B * T, H] hidden states for each selected position: (b, t), flat index
    f = b * (T-1) + t of next_sel, is row b * T + t = f + f // (T-1); its target token is entry src + 1
    of the flat input_ids. The ``nonzero`` is the call's one host sync.
    """
    T = response_mask.shape[1]
    scored = (response_mask != 0) & (attention_mask != 0)
    scored[:, 0] = False  # no context before the first position
    next_sel = scored[:, 1:]
    flat = next_sel.reshape(-1).nonzero().squeeze(1)
    return next_sel, (flat + flat // (T - 1) if T > 1 else flat)


def _gather_rows(hidden: torch.Tensor, input_ids: torch.Tensor, src: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows [n, H], labels [n]): the scored rows of hidden [B, T, H] and the tokens they predict (one
    [n, H] copy). With no scored row, row 0 and token 0 stand in (n = 1), so the graph still reaches
    the weight: a step where one rank has no response token must still produce a (zero) gradient for
    every parameter, or FSDP ranks disagree; _pack_columns zeroes their result."""
    H = hidden.shape[-1]
    if src.numel() == 0:
        return hidden.reshape(-1, H)[:1], input_ids.reshape(-1)[:1]
    return hidden.reshape(-1, H).index_select(0, src), input_ids.reshape(-1).index_select(0, src + 1)


def _pack_columns(cols, next_sel: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """The head's output [B, T, C + 2] from the per-row results ``cols`` (each [n]): column c of
    position t is cols[c] scattered to the scored positions (0 elsewhere, 0 at t = 0), then two probe
    columns of 1.0 and 2.0; all divided by ``scale``, which the model multiplies back after the head.
    Allocates the [B, T, C + 2] output and two [B, T] temporaries per column."""
    B = next_sel.shape[0]
    packed = []
    for c in cols:
        if n == 0:  # the stand-in row of _gather_rows: a zero that keeps the graph connected
            c = c * 0
            full = c.new_zeros(next_sel.shape) + c.sum()
        else:
            full = c.new_zeros(next_sel.shape).masked_scatter(next_sel, c)
        packed.append(torch.cat([full.new_zeros((B, 1)), full], dim=1))
    ref = packed[0]
    # probes: any elementwise post-head transform shows up as f(1), f(2) != scale * (1, 2)
    packed += [torch.ones_like(ref).detach(), torch.full_like(ref, 2.0).detach()]
    return torch.stack(packed, dim=-1) / scale


def _head_params_for(head, hidden: torch.Tensor):
    """(hidden, weight, bias) as nn.Linear would compute with them here: cast to the autocast dtype
    when autocast is on for hidden's device (a [B, T, H] and a [V, H] copy then), else unchanged."""
    weight, bias = head.weight, head.bias
    # outside the forward FSDP2 parameters are sharded DTensors; inside it they are plain unsharded tensors
    if type(weight).__name__ == "DTensor":
        raise ValueError(
            "the lm_head weight is a DTensor inside the forward (tensor parallel?); response_logprobs needs the "
            "full [V, H] weight there. FSDP2 alone is fine (it unshards the weight for the forward)."
        )
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):  # what nn.Linear would compute in
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    return hidden, weight, bias


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, *, temperature: float = 1.0,
                      return_entropy: bool = False, return_hidden: bool = False,
                      position_ids: Optional[torch.Tensor] = None,
                      impl: Optional[str] = None, **model_kwargs):
    """log pi(token_t | <t) (and entropy) at the response tokens, through the model's final hidden states.

    model: a transformers causal LM (FSDP2-wrapped is fine). input_ids, attention_mask, response_mask:
    [B, T] (left padding fine). position_ids: [B, T]; default ``left_padded_position_ids(attention_mask)``
    (what ``generate`` used while sampling, so rollout and training log-probs agree). temperature: the
    sampling temperature (a Python float). impl: passed to ``linear_token_logprobs``. Extra
    ``model_kwargs`` go to ``model(...)`` (not ``labels``).

    Returns logp [B, T] (and entropy [B, T] if ``return_entropy``); see the module docstring for the
    layout. ``return_hidden=True`` appends hidden [B, T, H]: the final hidden states exactly as the
    model passed them to its lm_head (the model's own tensor, same dtype, before any autocast cast; no
    copy, nothing allocated), e.g. to pool them for a value or log Z head; gradients through it reach
    the backbone. Differentiable w.r.t. the model's parameters. One host sync per call (the number of
    response tokens, to compact the rows the kernel sees), plus one on a model's first call (the
    check that nothing transforms the logits after the head).
    """
    from .ops.linear_token_logprobs import linear_token_logprobs
    from ._utils import check_temperature

    temperature = check_temperature(temperature)
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a [B, T] tensor, got {getattr(t, 'shape', type(t).__name__)}.")
    if attention_mask.shape != input_ids.shape or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} and response_mask {tuple(response_mask.shape)} must both "
            f"have input_ids' shape {tuple(input_ids.shape)}."
        )
    if "labels" in model_kwargs:
        raise ValueError("do not pass labels: the response tokens are read from input_ids.")
    head = model.get_output_embeddings()
    _check_head(head)
    scale = logit_scale_of(model.config)
    if not scale > 0:
        raise ValueError(f"the model's logit scale is {scale}; only a positive scale folds into the temperature.")
    if position_ids is None:
        position_ids = left_padded_position_ids(attention_mask)

    B, T = input_ids.shape
    next_sel, src = _scored_rows(response_mask, attention_mask)
    seen = []  # the hidden states of each call of the head (exactly one is expected)

    def fused_head_forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:2] != (B, T):
            raise ValueError(
                f"the lm_head was called with hidden states of shape {tuple(hidden.shape)}, expected [{B}, {T}, H]: "
                "the model slices positions before its head (logits_to_keep?) and cannot be scored this way."
            )
        seen.append(hidden)
        hidden, weight, bias = _head_params_for(head, hidden)
        rows, labels = _gather_rows(hidden, input_ids, src)
        with torch.autocast(hidden.device.type, enabled=False):
            out = linear_token_logprobs(rows, weight, labels, bias=bias, temperature=temperature / scale,
                                        return_entropy=return_entropy, ignore_index=_IGNORE, impl=impl)
        return _pack_columns(out if isinstance(out, tuple) else (out,), next_sel, src.numel(), scale)

    had_forward = "forward" in head.__dict__
    saved = head.__dict__.get("forward")
    head.forward = fused_head_forward
    try:
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, **model_kwargs)
    finally:
        if had_forward:
            head.forward = saved
        else:
            del head.forward
    if len(seen) != 1:
        raise ValueError(
            f"the model's forward called its output embedding {len(seen)} times (expected once); it computes "
            "logits some other way and cannot be scored through its hidden states."
        )
    packed = output.logits if hasattr(output, "logits") else output[0]
    k = 2 if return_entropy else 1
    if packed.shape != (B, T, k + 2):
        raise ValueError(f"the model reshaped its logits after the head (got {tuple(packed.shape)}); not supported.")
    if model not in _PROBED:  # checked once per model: a bool() of a device tensor is a host sync
        _check_probe(packed[0, 0, k:], scale)
        _PROBED.add(model)
    res = (packed[..., 0], packed[..., 1]) if return_entropy else (packed[..., 0],)
    if return_hidden:
        res += (seen[0],)
    return res if len(res) > 1 else res[0]


# models whose post-head transform was checked (weak: a deleted model leaves the set)
_PROBED: "weakref.WeakSet" = weakref.WeakSet()


def _check_probe(probe: torch.Tensor, scale: float) -> None:
    probe = probe.detach().double()
    expect = torch.tensor([1.0, 2.0], dtype=torch.float64, device=probe.device)
    if not torch.allclose(probe, expect, rtol=1e-5, atol=0.0):
        raise ValueError(
            f"the model transforms its logits after the lm_head in a way its config does not announce "
            f"(f(1)={float(probe[0]):.6g}, f(2)={float(probe[1]):.6g} after folding logit scale {scale}); "
            "linear_token_logprobs cannot reproduce it. Use model(...).logits with flowrl_kernels.token_logprobs."
        )
