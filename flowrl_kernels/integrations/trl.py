"""Route TRL's per-token log-prob / entropy helpers through flowrl_kernels.

    import flowrl_kernels.integrations.trl as fk_trl
    fk_trl.patch()            # before building the trainer; or: with fk_trl.patched(): ...

What is replaced (read from trl 1.16 ``trl/trainer/utils.py`` and ``trl/kernels/chunked_logprob.py``):

- ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``: ``log_softmax(logits / T)``
  gathered at ``index``; rows with ``row_mask == 0`` give 0. -> ``flowrl_kernels.token_logprobs``
  (``row_mask == 0`` becomes ``ignore_index``). A top-K ``index`` of shape ``(..., K)`` falls back to
  TRL's own code.
- ``entropy_from_logits(logits, chunk_size=128)``: entropy of ``softmax(logits)`` (no temperature;
  callers pass already-scaled logits). -> ``token_logprobs(..., return_entropy=True)``.
- ``selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
  row_mask=None)``: both from one pass over the logits (one kernel call instead of two).
- ``_ChunkedLogProbFunction`` (``trl.kernels.ChunkedLogProbFunction``, used by ``add_fused_lm_head``,
  which is how trl 1.16's GRPO/RLOO trainers compute ``per_token_logps`` from hidden states):
  ``.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
  logit_scale, outputs)`` -> ``flowrl_kernels.linear_token_logprobs`` with the logit scale folded into
  the temperature (``z * s / T = z / (T / s)``). Falls back to TRL's function for what our op does
  not compute: logit soft-capping, outputs other than log-probs / entropy, ``logit_scale <= 0``, and
  DeepSpeed ZeRO-3 partitioned weights (TRL re-gathers them in its own backward).

Results equal TRL's (tests/test_integrations.py checks values and gradients). Half-precision logits
give float32 log-probs / entropy, as TRL's own Triton kernels do on GPU (its CPU fallback returns the
logits' dtype).
"""
from __future__ import annotations

import torch

import flowrl_kernels as _fk

from ._patching import Integration, PatchError, Target

__all__ = ["patch", "unpatch", "patched", "is_patched", "PatchError", "INTEGRATION"]

_IGNORE = -100  # never a real token id; TRL's own label padding value


def _labels(index: torch.Tensor, row_mask) -> torch.Tensor:
    return index if row_mask is None else index.masked_fill(row_mask == 0, _IGNORE)


def _build_selective_log_softmax(original):
    def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if index.dim() != logits.dim() - 1:  # top-K gather: not a per-token op
            return original(logits, index, temperature=temperature, row_mask=row_mask)
        return _fk.token_logprobs(logits, _labels(index, row_mask), temperature=float(temperature),
                                  ignore_index=_IGNORE)

    return selective_log_softmax


def _build_entropy_from_logits(original):
    def entropy_from_logits(logits, chunk_size=128):
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        return _fk.token_logprobs(logits, labels, return_entropy=True)[1]

    return entropy_from_logits


def _build_selective_log_softmax_and_entropy(original):
    def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
                                          row_mask=None):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if index.dim() != logits.dim() - 1:
            return original(logits, index, entropy_requires_grad=entropy_requires_grad,
                            temperature=temperature, row_mask=row_mask)
        logp, ent = _fk.token_logprobs(logits, _labels(index, row_mask), temperature=float(temperature),
                                       return_entropy=True, ignore_index=_IGNORE)
        return logp, (ent if entropy_requires_grad else ent.detach())

    return selective_log_softmax_and_entropy


_OUR_OUTPUTS = {"log_probs", "entropy"}


def _build_chunked_logprob(original):
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        if (final_logit_softcapping is not None or not set(outputs) <= _OUR_OUTPUTS or not logit_scale > 0
                or hasattr(weight, "ds_id")):  # ds_id: a DeepSpeed ZeRO-3 partitioned parameter
            return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                  final_logit_softcapping, logit_scale, outputs)
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            # TRL projects in the autocast dtype; we take the same inputs (our op accumulates in fp32)
            dt = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        elif weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        with torch.autocast(device, enabled=False):
            out = _fk.linear_token_logprobs(hidden, weight, targets, bias=bias,
                                            temperature=float(temperature) / float(logit_scale),
                                            return_entropy="entropy" in outputs)
        logp, ent = out if isinstance(out, tuple) else (out, None)
        return logp, ent, None, None, None

    # a class with the same call surface (``X.apply(...)``) as the torch.autograd.Function it replaces
    return type("ChunkedLogProbFunction", (), {
        "apply": staticmethod(apply),
        "__doc__": "flowrl_kernels replacement of trl's ChunkedLogProbFunction (see flowrl_kernels.integrations.trl).",
        "__module__": __name__,
    })


INTEGRATION = Integration(
    dist="trl",
    min_version="1.16.0",
    tested_version="1.16.0",
    targets=[
        Target("trl.trainer.utils", "selective_log_softmax",
               ("logits", "index", "temperature", "row_mask"), _build_selective_log_softmax),
        Target("trl.trainer.utils", "entropy_from_logits", ("logits",), _build_entropy_from_logits),
        Target("trl.trainer.utils", "selective_log_softmax_and_entropy",
               ("logits", "index", "entropy_requires_grad", "temperature", "row_mask"),
               _build_selective_log_softmax_and_entropy),
        Target("trl.trainer.utils", "_ChunkedLogProbFunction",
               ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                "logit_scale", "outputs"), _build_chunked_logprob),
    ],
)

patch = INTEGRATION.patch
unpatch = INTEGRATION.unpatch
patched = INTEGRATION.patched
is_patched = INTEGRATION.is_patched
