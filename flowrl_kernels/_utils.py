"""Shared plumbing for every op: which implementation runs, and argument checks.

Every public op takes ``impl=None | "torch" | "triton" | "native"``:
- explicit ``impl`` wins, and is refused (ValueError naming the impls that exist) when the op or the
  device has no such impl: e.g. ``"native"`` on a device the extension has no kernel for (flowrl_loss on
  CUDA), never a dispatcher NotImplementedError;
- else a *preference*: ``with prefer_impl(name):`` (the trainer's ``model.kernel_impl``), else the env
  var ``FLOWRL_KERNELS_IMPL`` (same values). An op that has the preferred impl on the tensors' device
  runs it; one that does not runs its default (below) and says so once per process and op (a WARNING
  on the ``flowrl_kernels`` logger);
- else the default: ``"triton"`` for CUDA tensors, ``"native"`` for CPU tensors when the compiled
  extension is importable and implements the op, otherwise ``"torch"`` (the reference).

Checks raise ``ValueError`` naming the argument and saying how to fix it, before any kernel runs.
None of them synchronizes with the device (no ``.item()`` on CUDA tensors).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import numbers
import os
import warnings
from typing import Iterable, Optional, Sequence

import torch

IMPLS = ("torch", "triton", "native")
ENV_IMPL = "FLOWRL_KERNELS_IMPL"
_LOG = logging.getLogger("flowrl_kernels")
# the preference set by ``prefer_impl`` (None: the env var, if any)
_PREFERRED: Optional[str] = None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``triton`` imports (GPU, or the CPU interpreter under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _native_module():
    if os.environ.get("FLOWRL_KERNELS_SKIP_NATIVE", "0") not in ("", "0"):
        return None
    try:
        return importlib.import_module("flowrl_kernels._C")
    except ImportError as e:  # the pure-Python install is a supported configuration
        if os.environ.get("FLOWRL_KERNELS_QUIET", "0") in ("", "0"):
            warnings.warn(
                f"flowrl_kernels: native extension not available ({e}); CPU ops use the torch reference. "
                "Rebuild with `pip install --no-build-isolation -e .` to get the fused C++ kernels.",
                stacklevel=3,
            )
        return None


def native_available() -> bool:
    """True when the compiled extension ``flowrl_kernels._C`` is importable."""
    return _native_module() is not None


# The dispatch key the extension registers an op's kernel under, per tensor device type.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


@functools.lru_cache(maxsize=None)
def _native_kernel_registered(op: str, device_type: str) -> bool:
    if not native_available() or not hasattr(torch.ops.flowrl_kernels_native, op):
        return False
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return False
    has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if has_kernel is None:  # pragma: no cover - private API, present in torch 2.5 - 2.13
        # what csrc registers: every op for CPU and Meta, the token_logprobs ops for CUDA when built with it
        return device_type != "cuda" or (bool(getattr(_native_module(), "with_cuda", 0))
                                         and op.startswith("token_logprobs"))
    return bool(has_kernel(f"flowrl_kernels_native::{op}", key))


# torch.compiler.assume_constant_result: Dynamo calls these once, eagerly, when it traces an op and
# bakes the answer into the graph (availability never changes within a process). Without it Dynamo would
# trace into importlib.import_module (marked as skipped: fullgraph=True fails on the default impl).
@torch.compiler.assume_constant_result
def native_has(op: str, device_type: str = "cpu") -> bool:
    """True when the native extension registers a kernel for ``torch.ops.flowrl_kernels_native.<op>`` on
    ``device_type`` ("cpu", "cuda"). The schema alone is not enough: a CPU-only build (and the CUDA build
    for ``flowrl_loss_*``) has no CUDA kernel, and the dispatcher would raise NotImplementedError."""
    return _native_kernel_registered(op, device_type)


@torch.compiler.assume_constant_result
def _triton_usable() -> bool:
    return triton_available()


@torch.compiler.assume_constant_result
def _interpret() -> bool:
    return triton_interpret()


def _default_impl(device: torch.device, native_op: Optional[str]) -> str:
    if device.type == "cuda" and _triton_usable():
        return "triton"
    if device.type == "cpu" and native_op is not None and native_has(native_op, "cpu"):
        return "native"
    return "torch"


def _available(device: torch.device, native_op: Optional[str]) -> str:
    """The impls this op can run on ``device``'s type, for error messages."""
    out = ["torch"]
    if _triton_usable() and (device.type == "cuda" or _interpret()):
        out.append("triton")
    if native_op is not None and native_has(native_op, device.type):
        out.append("native")
    return ", ".join(repr(i) for i in out)


def _check_forced(impl: str, device: torch.device, native_op: Optional[str], arg: str) -> str:
    """``impl`` if this op has it on ``device``, else a ValueError naming the impls that exist."""
    if impl not in IMPLS:
        raise ValueError(f"{arg}={impl!r} is not one of {IMPLS}.")
    here = f"this op has {_available(device, native_op)} for {device.type} tensors"
    if impl == "triton":
        if not _triton_usable():
            raise ValueError(f"{arg}='triton' but triton is not importable ({here}); install triton or use "
                             "impl='torch'.")
        if device.type != "cuda" and not _interpret():
            raise ValueError(
                f"{arg}='triton' needs CUDA tensors (got {device}; {here}); move the inputs to a GPU, "
                "set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter, or use impl='torch'."
            )
    if impl == "native":
        alt = f"{arg}='triton' (the default for CUDA tensors)" if device.type == "cuda" else f"{arg}='torch'"
        if native_op is None or not native_has(native_op, "cpu"):
            raise ValueError(
                f"{arg}='native' but the native extension does not provide this op "
                f"(native_available()={native_available()}; {here}); use {alt}, or build the "
                "extension with `pip install --no-build-isolation -e .`."
            )
        if device.type != "cpu" and not native_has(native_op, device.type):
            raise ValueError(
                f"{arg}='native' has no {device.type} kernel for this op (the extension's {device.type} "
                f"build provides only some ops; {here}); use {alt}, or move the inputs to the CPU."
            )
    return impl


_FALLBACKS_NOTED: set = set()


@torch.compiler.assume_constant_result
def _preferred(pref: str, device_type: str, native_op: str, op: str) -> str:
    """The impl a preference resolves to (``native_op`` "" = none): ``pref`` when the op has it on this
    device, else the op's default, logged once per (op, preference, device type). A constant to Dynamo."""
    device = torch.device(device_type)
    nop = native_op or None
    try:
        return _check_forced(pref, device, nop, "impl")
    except ValueError:
        chosen = _default_impl(device, nop)
        key = (op, pref, device_type)
        if key not in _FALLBACKS_NOTED:
            _FALLBACKS_NOTED.add(key)
            _LOG.warning("flowrl_kernels.%s: the preferred impl %r is not available for %s tensors (this op has "
                         "%s); running impl=%r instead (said once per op).", op or "op", pref, device_type,
                         _available(device, nop), chosen)
        return chosen


@contextlib.contextmanager
def prefer_impl(impl: Optional[str]):
    """``with prefer_impl("native"): ...``: ops called with ``impl=None`` inside prefer ``impl`` (over
    FLOWRL_KERNELS_IMPL); an op without it on the tensors' device runs its default and logs that once.
    ``None`` or "" leaves the current preference unchanged. Not thread-local (one preference per process)."""
    global _PREFERRED
    if impl in (None, ""):
        yield
        return
    if impl not in IMPLS:
        raise ValueError(f"prefer_impl({impl!r}): the impl must be one of {IMPLS}.")
    old, _PREFERRED = _PREFERRED, impl
    try:
        yield
    finally:
        _PREFERRED = old


def resolve_impl(impl: Optional[str], device: torch.device, *, native_op: Optional[str] = None,
                 arg: str = "impl", op: str = "") -> str:
    """Pick the implementation for one call (see module docstring).

    Traceable by torch.compile (fullgraph=True): the availability checks are constants to Dynamo, so the
    choice is made once, when the call is traced (the env var too: a later change of
    FLOWRL_KERNELS_IMPL does not recompile an already compiled function). ``native_op`` is the op's
    forward in ``torch.ops.flowrl_kernels_native``; "native" needs a kernel for ``device``'s type.
    ``op``: the public op's name, for the once-per-op note when a preference falls back.
    """
    if impl is None:
        pref = _PREFERRED or os.environ.get(ENV_IMPL) or None
        if pref is None:
            return _default_impl(device, native_op)
        if pref not in IMPLS:
            raise ValueError(f"{ENV_IMPL}={pref!r} is not one of {IMPLS}; unset it or pick one of those.")
        return _preferred(pref, device.type, native_op or "", op)
    return _check_forced(impl, device, native_op, arg)


def device_guard(t: torch.Tensor):
    """Context for a kernel launch on ``t``'s device.

    Triton (and raw CUDA launches) run on the *current* CUDA device, not on the device of the pointers
    they get: inputs on ``cuda:1`` while ``cuda:0`` is current would run on the wrong GPU (an illegal
    access). Every launcher wraps its launches in ``with device_guard(x):``. CPU tensors (the
    interpreter) need no guard.
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = None,
                 ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of ({_names(dtypes)}). Cast it with .to(...).")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}.")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dim(s), got shape {tuple(t.shape)}.")


def check_same_shape(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{b_name} has shape {tuple(b.shape)} but {a_name} has shape {tuple(a.shape)}; they must match."
        )


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(
                f"{k} is on {v.device} but {items[0][0]} is on {dev}; move all inputs to one device."
            )
    return dev


def check_vocab_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last (vocab) dim, shape {tuple(t.shape)}; V must be >= 1.")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name}'s last (vocab) dim has stride {t.stride(-1)}; it must be contiguous (stride 1). "
            f"Other dims may be strided (e.g. logits[:, :-1] is fine); call {name}.contiguous() "
            "if it came from a transpose."
        )


# The temperature range every impl supports in fp32 with results equal to the torch spec: the kernels
# scale by 1 / T (one fp32 multiply), so 1 / T must be a normal fp32 number far from overflow and z = x / T
# must stay finite for any logits a model produces (|x| <~ 1e4: |z| <~ 1e8 at T = 1e-4). Outside it the
# impls used to disagree: T = 1e-39 gave NaN everywhere (1 / T overflows fp32), the native kernels gave
# +-inf log-probs for T <= 1e-10, Triton NaN at T = 1e300 (1 / T underflows to 0).
TEMPERATURE_RANGE = (1e-4, 1e4)
# Coefficients (flowrl_loss's beta, grpo_loss's kl_coef and clip widths eps, group_normalize's eps) are
# kept within 1e6: far inside fp32 (beta = 1e300 became inf in the kernels, and inf * 0 = NaN), and far
# beyond any useful value (beta is 15 in the paper, eps ~ 0.2, kl_coef ~ 0.04).
COEF_MAX = 1e6
_I64 = (-(2**63), 2**63 - 1)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor))


def check_real(name: str, value, *, lo: Optional[float] = None, hi: Optional[float] = None,
               lo_open: bool = False, hi_open: bool = False, finite: bool = True) -> float:
    """The one check of every numeric (scalar) argument of the public ops -> ``float(value)``.

    Accepts a Python int / float (or a numpy real); refuses bools, strings, None, tensors (a tensor scalar
    would be a device sync per call; use ``float(t)``) and NaN. ``finite``: also refuse +-inf. ``lo`` /
    ``hi``: the allowed range, closed unless ``lo_open`` / ``hi_open``. Raises a ValueError naming the
    argument, the value and the allowed range."""
    rng = "({}{}, {}{})".format("(" if lo_open else "[", "-inf" if lo is None else f"{lo:g}",
                                "inf" if hi is None else f"{hi:g}", ")" if hi_open else "]")[1:-1]
    rng = ("finite " if finite else "") + "real number" + ("" if lo is None and hi is None else " in " + rng)
    if not _is_real(value):
        hint = "; use float(t)" if isinstance(value, torch.Tensor) else ""
        raise ValueError(f"{name} must be a {rng} (a Python int or float), got {type(value).__name__} "
                         f"{value!r}{hint}.")
    v = float(value)
    bad = math.isnan(v) or (finite and math.isinf(v))
    if lo is not None and (v < lo or (lo_open and v == lo)):
        bad = True
    if hi is not None and (v > hi or (hi_open and v == hi)):
        bad = True
    if bad:
        raise ValueError(f"{name}={value!r} is outside its range: it must be a {rng}.")
    return v


def check_int(name: str, value, *, lo: int = _I64[0], hi: int = _I64[1]) -> int:
    """A Python int (not bool, not a float such as -100.0) in [lo, hi] -> int(value); else a ValueError
    naming the argument, the value and the range (default: int64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a Python int in [{lo}, {hi}], got {type(value).__name__} {value!r}.")
    v = int(value)
    if not lo <= v <= hi:
        raise ValueError(f"{name}={v} is outside its range: it must be an int in [{lo}, {hi}].")
    return v


def check_temperature(temperature) -> float:
    """A real number in TEMPERATURE_RANGE = [1e-4, 1e4] (see there why) -> float."""
    lo, hi = TEMPERATURE_RANGE
    return check_real("temperature", temperature, lo=lo, hi=hi)


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int, *, validate: bool,
                          arg: str = "labels") -> None:
    """Full range check when ``validate`` or when it costs no device sync (CPU tensors).

    Skipped while torch.compile traces (a data-dependent branch cannot be traced): unchecked out-of-range
    labels never read out of bounds, they give NaN rows (see token_logprobs' docstring)."""
    if not (validate or labels.device.type == "cpu") or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{arg} has value {int(labels[idx])} at index {idx}, outside [0, {vocab}) and not "
            f"ignore_index={ignore_index}; fix the labels or mark the position with ignore_index."
        )


# ----------------------------------------------------------------------------------------------------
# output allocation
# ----------------------------------------------------------------------------------------------------
def poison_enabled() -> bool:
    """``FLOWRL_KERNELS_POISON=1`` (set by the test suite): fresh kernel outputs are filled with NaN
    (or -1 for integer buffers) so a position a kernel forgets to write can never pass a test."""
    return os.environ.get("FLOWRL_KERNELS_POISON", "0") not in ("", "0")


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; poisoned under ``FLOWRL_KERNELS_POISON=1``."""
    if poison_enabled():
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
