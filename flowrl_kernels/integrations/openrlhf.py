"""Route OpenRLHF's per-token log-prob / entropy helpers through flowrl_kernels.

    import flowrl_kernels.integrations.openrlhf as fk_orlhf
    fk_orlhf.patch()    # in every process that computes log-probs (OpenRLHF's Ray actors too)

What is replaced (read from OpenRLHF 0.11.2 ``openrlhf/models/utils.py``):

- ``log_probs_from_logits(logits, labels, temperature=1.0)``: when ``temperature != 1`` it divides
  ``logits`` IN PLACE by T (callers see the scaled logits afterwards), then ``log_softmax(logits)[labels]``
  (flash-attn cross-entropy for float32 logits when installed, else a chunked logsumexp; a row loop of
  log_softmax for half precision). -> the same in-place division, then ``token_logprobs``: the caller
  sees exactly the same side effect and result.
- ``compute_entropy(logits)`` (a ``torch.compile``'d ``logsumexp - sum(p * logits)``): per-token
  entropy of ``softmax(logits)``, no temperature (OpenRLHF's Actor scales the logits first).
  -> ``token_logprobs(..., return_entropy=True)``.

``openrlhf.models.actor`` binds both names with ``from .utils import ...``; those bindings are
swapped too. Half-precision logits give float32 outputs.
"""
from __future__ import annotations

import torch

import flowrl_kernels as _fk

from ._patching import Integration, PatchError, Target

__all__ = ["patch", "unpatch", "patched", "is_patched", "PatchError", "INTEGRATION"]


def _build_log_probs_from_logits(original):
    def log_probs_from_logits(logits, labels, temperature=1.0):
        if temperature != 1.0:
            logits.div_(temperature)  # OpenRLHF's contract: the caller's logits are scaled in place
        return _fk.token_logprobs(logits, labels)

    return log_probs_from_logits


def _build_compute_entropy(original):
    def compute_entropy(logits):
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        return _fk.token_logprobs(logits, labels, return_entropy=True)[1]

    return compute_entropy


INTEGRATION = Integration(
    dist="openrlhf",
    min_version="0.11.2",
    tested_version="0.11.2",
    targets=[
        Target("openrlhf.models.utils", "log_probs_from_logits", ("logits", "labels", "temperature"),
               _build_log_probs_from_logits),
        Target("openrlhf.models.utils", "compute_entropy", ("logits",), _build_compute_entropy),
    ],
)

patch = INTEGRATION.patch
unpatch = INTEGRATION.unpatch
patched = INTEGRATION.patched
is_patched = INTEGRATION.is_patched
