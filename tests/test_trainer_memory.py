"""The trainer's default log-prob path (model.logprob_impl="fused", flowrl_kernels.hf) never holds the
[N, V] logits: one training step at V=151936 needs far less peak memory than the logits path.
Prints the numbers (bench/bench_trainer_logprob_memory.py measures them; fresh subprocesses, Linux RSS)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux peak RSS)")
def test_fused_logprobs_step_peak_memory():
    spec = importlib.util.spec_from_file_location("bench_mem", ROOT / "bench" / "bench_trainer_logprob_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    logits, fused = bench.main(["--response", "64"])  # 512 response rows: [N, V] fp32 = 297 MiB
    assert fused["loss"] == pytest.approx(logits["loss"], rel=1e-5)
    # logits path: >= 2 x 297 MiB (logits + their gradient); fused: 2 chunks of 64 MiB + the embedding grad
    assert fused["peak_extra_mb"] < 0.5 * logits["peak_extra_mb"]
