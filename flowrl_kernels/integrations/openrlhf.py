"""Route OpenRLHF's per-token log-prob / entropy helpers through flowrl_kernels.

    import flowrl_kernels.integrations.openrlhf as fk_orlhf
    fk_orlhf.patch()    # in every process that computes log-probs (OpenRLHF's Ray actors too)

The contract each replacement keeps, read from OpenRLHF 0.11.2 ``openrlhf/models/utils.py`` (the newest
release on PyPI; the same functions as the v0.11.0 tag on GitHub). ``openrlhf.models.actor`` binds
both names with ``from .utils import ...``; those bindings are swapped too. Its ``Actor.forward`` casts
the logits to float32 and divides them by T in place before calling either.

| function | OpenRLHF's path | logits dtype -> output dtype | exactness | replacement |
|---|---|---|---|---|
| ``log_probs_from_logits`` | flash-attn CE (GPU; when it imports) | fp32 / fp64 -> fp32 | tolerance | ours, fp32 |
| | torch ``x - logsumexp`` (chunked) | fp32 / fp64 -> same | tolerance | ours, same dtype |
| | torch ``log_softmax`` per row, gathered | fp16 / bf16 -> same | bitwise | OpenRLHF's own code |
| ``compute_entropy`` | compiled ``logsumexp - sum(softmax * x)`` | any -> same | tolerance | ours, rounded once |

"ours": ``flowrl_kernels.token_logprobs``.

Semantics on every path (and ours):

- ``log_probs_from_logits(logits, labels, temperature=1.0)``: when ``temperature != 1`` it divides
  ``logits`` IN PLACE by T (the caller sees the scaled logits afterwards, in the logits' dtype), then
  ``log_softmax(logits)[labels]``; ours does the same division, then ``token_logprobs``.
- Shapes: ``logits (..., V)``, ``labels (...)`` -> ``(...)``.
- Ignored labels: the flash-attn path gives 0 (and zero gradient) where ``labels == -100``; the other
  paths gather every label, so -100 is an error on the CPU (OpenRLHF: the gather; ours: ValueError).
- ``compute_entropy(logits)``: entropy of ``softmax(logits)``, no temperature. OpenRLHF compiles it, so
  its half-precision bits depend on Inductor's fusion; ours computes in fp32 and rounds once.
- Gradients: in the logits' dtype (autograd's rule).

Why the half-precision path runs OpenRLHF's own code: it is torch's half ``log_softmax`` gathered,
which no fp32 result rounded once reproduces bit for bit (see ``flowrl_kernels.integrations.trl``). Also
handed to OpenRLHF's original: devices other than CPU / CUDA, other dtypes, a vocab dim that is not
stride 1, labels not of shape ``logits.shape[:-1]``. Each path is logged once per process at DEBUG on
``flowrl_kernels.integrations.openrlhf``.
"""
from __future__ import annotations

import functools
import logging

from ..ops.token_logprobs import token_logprobs

from ._patching import HALF, NO_IGNORE, Integration, PatchError, Target, entropy_rounded_once, note_path, why_not_ours

__all__ = ["patch", "unpatch", "patched", "is_patched", "PatchError", "INTEGRATION"]

_LOG = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _flash_ce_importable() -> bool:
    """OpenRLHF's own test, made once: it tries this import on every call."""
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss  # noqa: F401
    except ImportError:
        return False
    return True


def _build_log_probs_from_logits(original):
    name = "openrlhf.log_probs_from_logits"

    def log_probs_from_logits(logits, labels, temperature=1.0):
        why = (f"{logits.dtype} logits (bitwise half-precision contract)" if logits.dtype in HALF
               else why_not_ours(logits, labels))
        if why is not None:
            note_path(_LOG, name, f"OpenRLHF's own code ({why})")
            return original(logits, labels, temperature)  # it scales the logits in place itself
        if temperature != 1.0:
            logits.div_(temperature)  # OpenRLHF's contract: the caller's logits are scaled in place
        if _flash_ce_importable():
            note_path(_LOG, name, "flowrl_kernels.token_logprobs, float32 out, -100 ignored (flash-attn path)")
            return token_logprobs(logits, labels, ignore_index=-100).float()
        note_path(_LOG, name, f"flowrl_kernels.token_logprobs, {logits.dtype} out")
        return token_logprobs(logits, labels, ignore_index=NO_IGNORE)

    return log_probs_from_logits


_build_compute_entropy = entropy_rounded_once(_LOG, "openrlhf.compute_entropy", "OpenRLHF")


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
