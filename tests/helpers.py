"""Error bounds shared by the kernel tests.

The rule (STYLE.md #2): a kernel's error against the float64 reference must be no worse than what
PyTorch itself gets at the same dtype, times a small factor, plus a small slack. NaN never passes.
"""
from __future__ import annotations

import torch

# the device every device-parametrized test runs on (the `device` fixture): the GPU when there is one
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> unit roundoff of the OUTPUT dtype; slack is a few ulps of the reference's magnitude
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert x.shape == ref.shape, (x.shape, ref.shape)
    x64, r64 = x.detach().double(), ref.detach().double()
    bad_nan = torch.isnan(x64) & ~torch.isnan(r64)
    assert not bad_nan.any(), f"NaN in output at {bad_nan.nonzero()[:5].tolist()} where the reference is finite"
    both_inf = torch.isinf(r64) & (x64 == r64)
    d = torch.where(both_inf | (torch.isnan(x64) & torch.isnan(r64)), torch.zeros_like(x64), (x64 - r64).abs())
    return float(d.max()) if d.numel() else 0.0


def assert_no_worse_than_torch(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, *,
                               factor: float = 2.0, ulps: float = 8.0, name: str = "output",
                               scale: float = 0.0) -> None:
    """|out - ref64| <= factor * |torch_out - ref64| + ulps * eps(out.dtype) * max(1, |ref64|, scale).

    ``scale``: the magnitude of an intermediate the op must round once more than PyTorch does (e.g. the
    log-sum-exp, ~|logits / T|, re-merged across vocab shards); 0 = the output's own magnitude."""
    err = max_abs_err(out, ref64)
    base = max_abs_err(torch_out, ref64)
    scale = max(1.0, scale, float(ref64.detach().double().abs().nan_to_num(0.0, 0.0, 0.0).max()) if ref64.numel() else 1.0)
    bound = factor * base + ulps * EPS[out.dtype] * scale
    assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e} (torch at this dtype: {base:.3e})"


def import_or_skip(module: str):
    """Import a peer package's module, or skip the test with the reason (printed by ``-ra``)."""
    import pytest

    try:
        return __import__(module, fromlist=["_"])
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        # allow_module_level: test files call it at import (test_trl_flowrl.py); inside a test it is a plain skip
        pytest.skip(f"{module} does not import here ({type(e).__name__}: {e}); "
                    "see pyproject extra 'integrations' for what CI installs", allow_module_level=True)


class ScriptedSampler:
    """A rollout sampler that returns fixed completions (texts[:B]) with dummy token tensors: the trainer's
    evaluate / train_step on hand-written answers without a model's generate."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, policy, messages, *, n, **kw):
        from flowrl import rollout
        B = len(messages) * n
        mask = torch.ones(B, 3, dtype=torch.bool)
        return rollout.Batch(torch.zeros(B, 5, dtype=torch.long), torch.ones(B, 5), torch.zeros(B, 3), mask, 2,
                             self.texts[: B])
