"""Route TRL's per-token log-prob / entropy helpers through flowrl_kernels.

    import flowrl_kernels.integrations.trl as fk_trl
    fk_trl.patch()            # before building the trainer; or: with fk_trl.patched(): build AND train
                              # (a trainer built inside the block keeps the patch for train/evaluate/predict)

The contract each replacement keeps, read from trl 1.16.0 (``trl/trainer/utils.py``,
``trl/kernels/logprob_entropy.py``, ``trl/kernels/chunked_logprob.py``). TRL picks a path per call:
its fused Triton kernel when ``is_triton_available() and _supports_trl_loss_kernel(...)`` (CUDA / XPU
tensors, fp16 / bf16 / fp32, 1-3 dims, stride-1 vocab dim, ``index.shape == logits.shape[:-1]``), else
torch ops. The replacement asks TRL's own predicate, so it takes the same path decision per call.

| function | TRL's path | logits dtype -> output dtype | exactness (TRL's tests) | replacement |
|---|---|---|---|---|
| ``selective_log_softmax`` | Triton kernel (GPU) | fp16 / bf16 / fp32 -> fp32 | tolerance | ours, fp32 |
| | torch (CPU, or no kernel) | fp32 -> fp32, fp64 -> fp64 | tolerance (1e-5) | ours, same dtype |
| | torch | fp16 / bf16 -> same | bitwise ``log_softmax(-1).gather`` | TRL's own code |
| | ``index (..., K)`` (top-K) | as the rows above | as the rows above | TRL's own code |
| ``entropy_from_logits`` | Triton kernel (GPU) | fp16 / bf16 / fp32 -> fp32 | tolerance | ours, fp32 |
| | torch | fp32 -> fp32, fp64 -> fp64 | tolerance (1e-5) | ours, same dtype |
| | torch | fp16 / bf16 -> same | bitwise in effect (1e-5 at bf16) | TRL's own code |
| ``selective_log_softmax_and_entropy`` | Triton kernel (GPU) | fp16 / bf16 / fp32 -> fp32 | tolerance | ours, fp32 |
| | torch | fp32 / fp64 -> same | tolerance | ours, same dtype |
| | torch | fp16 / bf16 -> same | bitwise (the rows above) | TRL's own code |
| ``_ChunkedLogProbFunction`` | every device | any -> fp32 | tolerance | ``linear_token_logprobs``, fp32 |

"ours": ``flowrl_kernels.token_logprobs`` (one call, also for both outputs of the combined helper).

Semantics on every path (and ours):

- Shapes: ``logits (..., V)``, ``index (...)`` -> ``(...)`` (any number of leading dims, any strides on
  them; TRL's kernel takes 1-3 dims, its torch path any). ``entropy_from_logits``: ``(..., V)`` ->
  ``(...)``; ``chunk_size`` only bounds TRL's memory (values do not depend on it; ours ignores it).
- Temperature: ``log_softmax(logits / T)``; ``T <= 0`` raises ``ValueError("temperature must be
  positive")``. TRL's torch path divides in the logits' dtype first; its kernel (and ours) divides in fp32.
  ``entropy_from_logits`` takes no temperature (callers pass scaled logits).
- ``row_mask``: rows with ``row_mask == 0`` give 0 (log-prob and entropy) and zero gradient. Their index
  is never read by TRL's kernel (nor by ours); TRL's torch path still gathers it, so it must be in range
  there. An index outside ``[0, V)`` in an unmasked row is an error on the CPU (TRL: the gather; ours:
  ValueError); on the GPU neither checks.
- ``entropy_requires_grad=False``: the entropy is detached.
- Gradients: in the logits' dtype (autograd's rule), per-row upstream gradients for both outputs.
- ``_ChunkedLogProbFunction.apply(hidden [N, H], weight [V, H], bias, targets [N], temperature,
  chunk_size, final_logit_softcapping, logit_scale, outputs)`` (``add_fused_lm_head``, the GRPO / RLOO
  trainers' log-prob path): TRL projects in the autocast dtype if autocast is on, else ``hidden``'s dtype,
  rounding each logit to it, folds in fp32; gradients accumulate in fp32 and come back in each input's
  dtype. Ours projects in the wider of hidden's and weight's dtypes (under autocast with fp32 parameters:
  fp32, so the gradients reaching an fp32 weight / hidden are fp32-accurate, never bf16 values), folds
  the logit scale into the temperature (``z * s / T = z / (T / s)``) and does not round the logits
  (within tolerance).

Why the half-precision torch paths run TRL's own code: they are bitwise contracts (TRL's tests assert
``torch.equal`` with ``log_softmax(-1).gather`` for fp16 / bf16), and no fp32 result rounded once
reproduces them. torch's CPU log_softmax for fp16 / bf16 rounds the row's sum of exponentials and its
log to the half dtype before ``x - max - log(sum)``; our fp32 log-probs rounded once to the logits'
dtype differ from it at 4.7% (scale-4 logits) to 15.6% (scale-1) of gathered positions, and even
replaying that rounding sequence in fp32 leaves 0-115 of 19.6M log_softmax entries per dtype and scale
different (our fp32 sum differs from torch's by an ulp, which can flip the half rounding; 40 seeds x 6
shapes, V 151-32768, torch 2.13 CPU). So the replacement hands those calls to TRL's
original (same values, same memory: TRL's row loop materializes one ``[T, V]`` half tensor at a time).

Also handed to TRL's original: a top-K ``index (..., K)``; devices other than CPU / CUDA; dtypes other
than fp16 / bf16 / fp32 / fp64; a vocab dim that is not stride 1 (TRL takes any layout, ours refuses
it); and, for the fused lm_head, logit soft-capping, outputs other than log-probs / entropy,
``logit_scale <= 0``, ``temperature <= 0``, ``hidden`` / ``weight`` whose last dim is not stride 1, and
DeepSpeed ZeRO-3 partitioned weights (TRL re-gathers them in its own backward). Each path (ours, or a
fallback with its reason) is logged once per process at DEBUG on ``flowrl_kernels.integrations.trl``.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch

from ..ops.linear_token_logprobs import linear_token_logprobs
from ..ops.token_logprobs import token_logprobs
from .._utils import TEMPERATURE_RANGE
from ._patching import HALF, NO_IGNORE, Integration, PatchError, Target, entropy, note_path, why_not_ours

__all__ = ["patch", "unpatch", "patched", "is_patched", "PatchError", "INTEGRATION"]

_LOG = logging.getLogger(__name__)


def _peer_predicates(original):
    """TRL's own kernel-path test, read from the module that defines ``original`` at call time."""
    g = original.__globals__
    missing = [n for n in ("is_triton_available", "_supports_trl_loss_kernel") if n not in g]
    if missing:
        raise PatchError(f"flowrl_kernels: trl.trainer.utils no longer defines {missing}, which decide whether TRL "
                         "returns float32 (its kernel) or the logits' dtype; nothing was patched.")

    def trl_kernel_path(logits, index=None, row_mask=None) -> bool:
        return bool(g["is_triton_available"]() and g["_supports_trl_loss_kernel"](logits, index, row_mask))

    return trl_kernel_path


def _why_temperature(temperature):
    """TRL takes any T > 0; ours refuses T outside TEMPERATURE_RANGE (where fp32 math stops matching)."""
    lo, hi = TEMPERATURE_RANGE
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not lo <= temperature <= hi:
        return f"temperature {temperature!r} outside flowrl_kernels' range [{lo:g}, {hi:g}] or not a float"
    return None


def _why_original(logits, index, row_mask, kernel_path, temperature=1.0):
    """The reason TRL's own code must run for this call (None: ours honours the contract)."""
    t_why = _why_temperature(temperature)
    if t_why is not None:
        return t_why
    if index is not None and index.dim() != logits.dim() - 1:
        return "top-K index (..., K)"
    if not kernel_path and logits.dtype in HALF:
        return f"{logits.dtype} logits on TRL's torch path (bitwise half-precision contract)"
    why = why_not_ours(logits, index)
    if why is None and row_mask is not None and (row_mask.shape != index.shape or row_mask.device != index.device):
        why = "row_mask not of index's shape and device"
    return why


def _labels(index: torch.Tensor, row_mask) -> torch.Tensor:
    return index if row_mask is None else index.masked_fill(row_mask == 0, NO_IGNORE)


def _ours(name, kernel_path, logits):
    note_path(_LOG, name, "flowrl_kernels.token_logprobs, float32 out (TRL's kernel path)" if kernel_path
              else f"flowrl_kernels.token_logprobs, {logits.dtype} out (TRL's torch path)")


def _build_selective_log_softmax(original):
    trl_kernel_path = _peer_predicates(original)
    name = "trl.selective_log_softmax"

    def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        kernel_path = trl_kernel_path(logits, index, row_mask)
        why = _why_original(logits, index, row_mask, kernel_path, temperature)
        if why is not None:
            note_path(_LOG, name, f"TRL's own code ({why})")
            return original(logits, index, temperature=temperature, row_mask=row_mask)
        _ours(name, kernel_path, logits)
        return token_logprobs(logits, _labels(index, row_mask), temperature=float(temperature),
                                  ignore_index=NO_IGNORE)

    return selective_log_softmax


def _build_entropy_from_logits(original):
    trl_kernel_path = _peer_predicates(original)
    name = "trl.entropy_from_logits"

    def entropy_from_logits(logits, chunk_size=128):
        kernel_path = trl_kernel_path(logits)
        why = _why_original(logits, None, None, kernel_path)
        if why is not None:
            note_path(_LOG, name, f"TRL's own code ({why})")
            return original(logits, chunk_size=chunk_size)
        _ours(name, kernel_path, logits)
        return entropy(logits)

    return entropy_from_logits


def _build_selective_log_softmax_and_entropy(original):
    trl_kernel_path = _peer_predicates(original)
    name = "trl.selective_log_softmax_and_entropy"

    def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
                                          row_mask=None):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        kernel_path = trl_kernel_path(logits, index, row_mask)
        why = _why_original(logits, index, row_mask, kernel_path, temperature)
        if why is not None:
            note_path(_LOG, name, f"TRL's own code ({why})")
            return original(logits, index, entropy_requires_grad=entropy_requires_grad,
                            temperature=temperature, row_mask=row_mask)
        _ours(name, kernel_path, logits)
        logp, ent = token_logprobs(logits, _labels(index, row_mask), temperature=float(temperature),
                                       return_entropy=True, ignore_index=NO_IGNORE)
        return logp, (ent if entropy_requires_grad else ent.detach())

    return selective_log_softmax_and_entropy


_OUR_OUTPUTS = {"log_probs", "entropy"}


def _chunked_why_original(hidden, weight, temperature, final_logit_softcapping, logit_scale, outputs):
    if final_logit_softcapping is not None:
        return "logit soft-capping"
    if not set(outputs) <= _OUR_OUTPUTS:
        return f"outputs {sorted(set(outputs) - _OUR_OUTPUTS)}"
    if not logit_scale > 0:
        return "logit_scale <= 0"
    if not temperature > 0:
        return "temperature <= 0"
    t_why = _why_temperature(float(temperature) / float(logit_scale))
    if t_why is not None:
        return t_why.replace("temperature", "temperature / logit_scale", 1)
    if hasattr(weight, "ds_id"):
        return "a DeepSpeed ZeRO-3 partitioned weight"
    return why_not_ours(hidden, name="hidden") or why_not_ours(weight, name="weight")


def _build_chunked_logprob(original):
    name = "trl.ChunkedLogProbFunction"

    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        why = _chunked_why_original(hidden, weight, temperature, final_logit_softcapping, logit_scale, outputs)
        if why is not None:
            note_path(_LOG, name, f"TRL's own code ({why})")
            return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                  final_logit_softcapping, logit_scale, outputs)
        note_path(_LOG, name, "flowrl_kernels.linear_token_logprobs, float32 out")
        device = hidden.device.type
        # Our op returns its gradients in its operands' dtype. TRL accumulates them in fp32 and casts back
        # to each input's dtype, so an fp32 input gets an fp32-accurate gradient. Casting fp32 hidden /
        # weight down to the autocast dtype here (as this did) made those gradients bf16 values
        # (g == g.bfloat16().float() exactly): instead the operands are promoted to the wider of their
        # dtypes. Under autocast with fp32 parameters that means an fp32 projection (exact logits where TRL
        # rounds them to the autocast dtype; on GPU an fp32 / TF32 matmul, slower than TRL's bf16 one),
        # and 16-bit inputs stay 16-bit.
        dt = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dt), weight.to(dt)
        if bias is not None and torch.promote_types(bias.dtype, dt) != dt:
            bias = bias.to(dt)  # our op reads the bias in fp32 whatever its dtype; only a wider one is cast
        with torch.autocast(device, enabled=False):
            out = linear_token_logprobs(hidden, weight, targets, bias=bias,
                                            temperature=float(temperature) / float(logit_scale),
                                            return_entropy="entropy" in outputs)
        logp, ent = out if isinstance(out, tuple) else (out, None)
        # TRL's outputs are float32 whatever the inputs (fp64 inputs included: its running sums are fp32)
        return logp.float(), (None if ent is None else ent.float()), None, None, None

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
is_patched = INTEGRATION.is_patched

# the Trainer methods that run TRL's helpers; a trainer built inside ``patched()`` keeps the patch for them
_TRAINER_ENTRY_POINTS = ("train", "evaluate", "predict")


def _bind_to_patch(trainer) -> None:
    """Make ``trainer``'s entry points run under ``patched()`` wherever they are called from."""
    for name in _TRAINER_ENTRY_POINTS:
        method = getattr(trainer, name, None)
        if method is None or getattr(method, "__flowrl_kernels_bound__", False):
            continue

        def bound(*args, __method=method, __name=name, **kwargs):
            if not is_patched():
                note_path(_LOG, f"trl.Trainer.{__name}", "re-patched: the trainer was built inside "
                          "fk_trl.patched() and is used after the block")
            with INTEGRATION.patched():
                return __method(*args, **kwargs)

        bound = functools.wraps(method)(bound)
        bound.__flowrl_kernels_bound__ = True
        setattr(trainer, name, bound)


@contextlib.contextmanager
def patched():
    """``with fk_trl.patched(): ...`` patches on entry and restores on exit (only if it patched).

    TRL looks its helpers up at call time, so a trainer built inside the block and trained after it
    would silently run TRL's own code. It cannot: every ``transformers.Trainer`` (all TRL trainers)
    constructed inside the block has its ``train`` / ``evaluate`` / ``predict`` bound to the patch (each
    call re-enters ``patched()``, noted once at DEBUG). ``patch()`` before building the trainer is the
    plain way; ``unpatch()`` does not undo such a binding."""
    try:
        import transformers
        base = transformers.Trainer
    except Exception:  # noqa: BLE001 - without transformers there is no trainer to bind
        base = None
    if base is not None:
        original_init = base.__dict__["__init__"]

        @functools.wraps(original_init)
        def init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            _bind_to_patch(self)

        base.__init__ = init
    try:
        with INTEGRATION.patched():
            yield
    finally:
        if base is not None:
            base.__init__ = original_init
