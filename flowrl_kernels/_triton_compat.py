"""``triton`` / ``triton.language`` for the op modules, or a stand-in where triton is not installed.

Triton ships Linux wheels only; on macOS, Windows or a CPU-only image without it, ``import flowrl_kernels``
must still work and serve ``impl="torch"`` / ``impl="native"``. The stand-in lets the op modules define
their ``@triton.jit`` kernels and ``tl.constexpr`` constants at import time (the decorator returns the
plain function, which is never launched: ``_utils.resolve_impl`` refuses ``impl="triton"`` with a clear
error when triton is missing, and never picks it by default). Any other use raises an ImportError that
names the fix.
"""
from __future__ import annotations

__all__ = ["triton", "tl", "HAS_TRITON"]

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess by tests/test_no_triton.py
    HAS_TRITON = False

    class _MissingTriton:
        """Decorators pass through; ``constexpr(v)`` is ``v``; anything else says how to get triton."""

        def __init__(self, name: str):
            self._name = name

        def jit(self, fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        def constexpr(self, value):
            return value

        def __getattr__(self, attr: str):
            raise ImportError(
                f"{self._name}.{attr} needs triton, which is not installed; `pip install triton` (Linux) "
                "or call the op with impl='torch' or impl='native'."
            )

    triton = _MissingTriton("triton")
    tl = _MissingTriton("triton.language")
