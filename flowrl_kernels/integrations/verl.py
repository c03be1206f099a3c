"""Route verl's per-token log-prob / entropy helpers through flowrl_kernels.

    import flowrl_kernels.integrations.verl as fk_verl
    fk_verl.patch()    # in EVERY process that computes log-probs (verl's Ray workers too), before the
                       # workers are built: verl binds e.g. torch.compile(verl_F.entropy_from_logits)
                       # at engine init. VERL_USE_EXTERNAL_MODULES=flowrl_kernels.integrations.verl_autopatch
                       # makes every process that imports verl run patch().

What is replaced (read from verl 0.9.1 ``verl/utils/torch_functional.py``):

- ``logprobs_from_logits(logits, labels, inplace_backward=True)``: ``log_softmax(logits)[labels]``,
  no temperature (verl's actors divide the logits by T in place before calling it). verl's own path
  is flash-attn's cross-entropy (float32 out) on CUDA, else a row loop. -> ``token_logprobs``.
  ``inplace_backward`` is accepted and ignored (our backward never overwrites the logits).
- ``entropy_from_logits(logits)`` and ``entropy_from_logits_with_chunking(logits, chunk_size=2048)``:
  per-token entropy of ``softmax(logits)`` (shape ``logits.shape[:-1]``). ->
  ``token_logprobs(..., return_entropy=True)``.

Every name bound by ``from verl.utils.torch_functional import ...`` in already-imported verl modules
is swapped too. Half-precision logits give float32 outputs (as verl's flash-attn path does).
"""
from __future__ import annotations

import torch

import flowrl_kernels as _fk

from ._patching import Integration, PatchError, Target

__all__ = ["patch", "unpatch", "patched", "is_patched", "PatchError", "INTEGRATION"]


def _build_logprobs_from_logits(original):
    def logprobs_from_logits(logits, labels, inplace_backward=True):
        return _fk.token_logprobs(logits, labels)

    return logprobs_from_logits


def _entropy(logits):
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _fk.token_logprobs(logits, labels, return_entropy=True)[1]


def _build_entropy_from_logits(original):
    def entropy_from_logits(logits):
        return _entropy(logits)

    return entropy_from_logits


def _build_entropy_from_logits_with_chunking(original):
    def entropy_from_logits_with_chunking(logits, chunk_size=2048):
        return _entropy(logits).float()  # verl's chunked version always returns float32

    return entropy_from_logits_with_chunking


INTEGRATION = Integration(
    dist="verl",
    min_version="0.9.1",
    tested_version="0.9.1",
    targets=[
        Target("verl.utils.torch_functional", "logprobs_from_logits", ("logits", "labels"),
               _build_logprobs_from_logits),
        Target("verl.utils.torch_functional", "entropy_from_logits", ("logits",), _build_entropy_from_logits),
        Target("verl.utils.torch_functional", "entropy_from_logits_with_chunking", ("logits", "chunk_size"),
               _build_entropy_from_logits_with_chunking),
    ],
)

patch = INTEGRATION.patch
unpatch = INTEGRATION.unpatch
patched = INTEGRATION.patched
is_patched = INTEGRATION.is_patched
