"""All-or-nothing monkey-patching of other trainers' per-token log-prob helpers.

One ``Integration`` per trainer package lists its ``Target``s (module, attribute, the parameters the
replacement relies on, and a builder that turns the original into the replacement). ``patch()``:

1. checks the package is installed and not older than the oldest version whose semantics we read;
   a version newer than the newest one we read only warns (the signature check below still runs);
2. imports every target module and checks every attribute exists and takes the expected parameters,
   collecting ALL problems; if there is any, raises ``PatchError`` listing them and changes nothing;
3. swaps the attribute in the defining module AND in every already-imported module of the package
   that bound the same object (``from x.utils import f`` copies the reference at import time, so
   patching only ``x.utils.f`` would leave e.g. trl's trainers calling the original). Modules
   imported after ``patch()`` read the patched attribute anyway.

``unpatch()`` restores exactly the bindings it changed (and only those still holding our object).

Shared by the replacements: ``why_not_ours`` (the inputs our ops cannot take with the peer's exact
semantics, so the peer's original runs), ``entropy_rounded_once`` (the builder of OpenRLHF's and verl's
same-contract entropy replacements) and ``note_path`` (one debug line per process per function and
path, so a user can see which path ran: ``logging.getLogger("flowrl_kernels.integrations").setLevel
(logging.DEBUG)``).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..ops.token_logprobs import token_logprobs

__all__ = ["PatchError", "Target", "Integration", "why_not_ours", "note_path", "entropy", "entropy_rounded_once",
           "HALF", "NO_IGNORE"]

HALF = (torch.float16, torch.bfloat16)
# ``ignore_index`` for peers' paths that ignore nothing: -100 must stay an error there (a gather out of range),
# as in the peer; -2**31 fits int32 and int64 indices and is no index anybody passes.
NO_IGNORE = -(2**31)
_OUR_DEVICES = ("cpu", "cuda")
_OUR_DTYPES = HALF + (torch.float32, torch.float64)
_NOTED = set()


def why_not_ours(logits: torch.Tensor, labels: Optional[torch.Tensor] = None, *, name: str = "logits"
                 ) -> Optional[str]:
    """Why ``token_logprobs(logits, labels)`` (or ``linear_token_logprobs`` on ``name``) cannot stand in for
    the peer here (None: it can). The peer's helpers take any device, dtype and layout its torch ops take;
    ours raise a ValueError on these."""
    if logits.device.type not in _OUR_DEVICES:
        return f"{logits.device.type} tensors"
    if logits.dtype not in _OUR_DTYPES:
        return f"{logits.dtype} {name}"
    if logits.dim() == 0 or logits.shape[-1] == 0:
        return f"{name} without a (non-empty) last dim"
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        return f"{name} whose last dim is not stride 1"
    if labels is not None and (labels.shape != logits.shape[:-1] or labels.dtype not in (torch.int32, torch.int64)
                               or labels.device != logits.device):
        return "an index not of shape logits.shape[:-1] (int32 / int64, same device)"
    return None


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) per row from ``token_logprobs`` (fp32, or fp64 for fp64 logits); the label is a
    dummy 0 (an int64 per row is all this adds)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs(logits, labels, return_entropy=True)[1]


def entropy_rounded_once(logger: logging.Logger, function: str, peer: str) -> Callable[[object], object]:
    """``Target.build`` for a peer's ``f(logits) -> entropy in logits.dtype`` (OpenRLHF's compute_entropy,
    verl's entropy_from_logits): ``entropy`` in fp32, rounded once to the logits' dtype; the peer's original
    where ``why_not_ours`` says so. Logged as ``"<function>: <peer>'s own code (<why>)"`` or ours."""

    def build(original):
        def replacement(logits):
            why = why_not_ours(logits)
            if why is not None:
                note_path(logger, function, f"{peer}'s own code ({why})")
                return original(logits)
            note_path(logger, function, f"flowrl_kernels.token_logprobs, {logits.dtype} out (fp32 math, rounded once)")
            return entropy(logits).to(logits.dtype)

        replacement.__name__ = replacement.__qualname__ = function.rsplit(".", 1)[-1]
        return replacement

    return build


def note_path(logger: logging.Logger, function: str, path: str) -> None:
    """``logger.debug("<function>: <path>")`` once per process per (function, path); silent while
    torch.compile traces (a log call there would break the graph; the traced path is the eager one)."""
    if torch.compiler.is_compiling():
        return
    key = (logger.name, function, path)
    if key in _NOTED:
        return
    _NOTED.add(key)
    logger.debug("%s: %s", function, path)


class PatchError(RuntimeError):
    """The integration cannot be applied (package missing, too old, or a target changed); nothing was patched."""


def _version_tuple(v: str) -> Tuple[int, ...]:
    # "1.16.0", "0.9.1.dev0+abc", "0.11.2rc1" -> leading numeric release components only
    out = []
    for part in v.split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(out)


@dataclass(frozen=True)
class Target:
    """One attribute to replace.

    module: dotted module that defines it; name: attribute name; params: names of the leading
    parameters the replacement relies on (checked against ``inspect.signature`` of the original,
    in order); build: ``original -> replacement`` (the replacement may fall back to the original for
    inputs it does not cover, e.g. top-K indices).
    """

    module: str
    name: str
    params: Sequence[str]
    build: Callable[[object], object]


@dataclass
class _Binding:
    module: object
    attr: str
    original: object
    replacement: object


@dataclass
class Integration:
    """A set of targets in one package that are patched together or not at all."""

    dist: str  # distribution name for importlib.metadata ("trl", "verl", "openrlhf")
    min_version: str  # oldest version whose sources we read (older: refuse)
    tested_version: str  # newest version whose sources we read (newer: warn, still patch if targets check out)
    targets: Sequence[Target]
    _bindings: List[_Binding] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------------
    def installed_version(self) -> Optional[str]:
        try:
            return importlib.metadata.version(self.dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def _check(self):
        """Resolved targets [(target, module, original)], or PatchError listing every problem; changes nothing."""
        version = self.installed_version()
        if version is None:
            raise PatchError(
                f"flowrl_kernels: cannot patch {self.dist}: it is not installed (pip install {self.dist})."
            )
        if _version_tuple(version) < _version_tuple(self.min_version):
            raise PatchError(
                f"flowrl_kernels: cannot patch {self.dist} {version}: versions before {self.min_version} were not "
                f"checked for identical semantics; upgrade {self.dist} or call flowrl_kernels ops directly."
            )
        resolved, problems = [], []
        for t in self.targets:
            try:
                mod = importlib.import_module(t.module)
            except Exception as e:  # noqa: BLE001 - any import failure means we cannot patch
                problems.append(f"importing {t.module} failed ({type(e).__name__}: {e})")
                continue
            orig = mod.__dict__.get(t.name)
            if orig is None:
                problems.append(f"{t.module}.{t.name} does not exist in {self.dist} {version}")
                continue
            if not callable(orig):
                problems.append(f"{t.module}.{t.name} is not callable ({type(orig).__name__})")
                continue
            sig_target = getattr(orig, "forward", orig) if inspect.isclass(orig) else orig
            try:
                names = [p for p in inspect.signature(sig_target).parameters]
            except (TypeError, ValueError) as e:
                problems.append(f"cannot read the signature of {t.module}.{t.name} ({e})")
                continue
            if inspect.isclass(orig):
                names = names[1:]  # autograd.Function.forward(ctx, ...)
            if names[: len(t.params)] != list(t.params):
                problems.append(
                    f"{t.module}.{t.name} takes {tuple(names)}, expected it to start with {tuple(t.params)} "
                    "(its semantics may have changed)"
                )
                continue
            resolved.append((t, mod, orig))
        if problems:
            raise PatchError(
                f"flowrl_kernels: cannot patch {self.dist} {version}; nothing was patched:\n  - "
                + "\n  - ".join(problems)
            )
        if _version_tuple(version)[:2] > _version_tuple(self.tested_version)[:2]:
            warnings.warn(
                f"flowrl_kernels: {self.dist} {version} is newer than the newest version checked "
                f"({self.tested_version}); the patched functions' signatures match, but re-run "
                "tests/test_integrations.py against it.",
                stacklevel=3,
            )
        return resolved

    # ------------------------------------------------------------------------------------------------
    def is_patched(self) -> bool:
        return bool(self._bindings)

    def patch(self) -> None:
        """Patch every target or none (raises ``PatchError`` saying why). Idempotent."""
        if self._bindings:
            return
        resolved = self._check()
        replacements = [(t, mod, orig, _mark(t.build(orig), orig)) for t, mod, orig in resolved]
        root = self.dist.replace("-", "_") + "."
        bindings = []
        for t, mod, orig, new in replacements:
            bindings.append(_Binding(mod, t.name, orig, new))
            for other_name, other in list(sys.modules.items()):
                if other is None or other is mod or not (other_name + ".").startswith(root):
                    continue
                # vars(), not getattr: lazy modules (trl's top level) would import on getattr
                for attr, value in list(getattr(other, "__dict__", {}).items()):
                    if value is orig:
                        bindings.append(_Binding(other, attr, orig, new))
        for b in bindings:
            setattr(b.module, b.attr, b.replacement)
        self._bindings = bindings

    def unpatch(self) -> None:
        """Restore every binding ``patch()`` changed. A no-op when not patched."""
        for b in reversed(self._bindings):
            current = b.module.__dict__.get(b.attr)
            if current is b.replacement:
                setattr(b.module, b.attr, b.original)
            else:  # somebody re-patched it after us: leave theirs alone
                warnings.warn(
                    f"flowrl_kernels: {b.module.__name__}.{b.attr} was replaced by something else after "
                    "patch(); leaving it as is.",
                    stacklevel=2,
                )
        self._bindings = []

    @contextlib.contextmanager
    def patched(self):
        """``with patched(): ...`` patches on entry and restores on exit (only if it patched)."""
        was = self.is_patched()
        self.patch()
        try:
            yield
        finally:
            if not was:
                self.unpatch()


def _mark(new, orig):
    """Tag a replacement with its original. Not functools.wraps: copying ``__wrapped__`` / ``__dict__``
    from a torch.compile'd original (OpenRLHF's compute_entropy) would make ours look compiled."""
    try:
        new.__flowrl_kernels_original__ = orig
    except (AttributeError, TypeError):  # pragma: no cover - builtins
        pass
    return new
