"""The GPU lane (scripts/gpu_check.sh, `make gpu-check`) and its determinism check, exercised on the CPU:
the script parses, a dry run of a cheap part passes and writes its summary, a lane that runs out of
time fails, and the determinism check notices a nondeterministic or non-finite op."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LANE = ROOT / "scripts" / "gpu_check.sh"


def _determinism():
    spec = importlib.util.spec_from_file_location("determinism", ROOT / "scripts" / "determinism.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lane(tmp_path, **env):
    full = dict(os.environ, OUT=str(tmp_path), PY=sys.executable, DRY_RUN="1", **env)
    full.pop("FLOWRL_BENCH_COMMIT", None)
    return subprocess.run(["bash", str(LANE)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)


def _summary(tmp_path) -> dict:
    text = (tmp_path / "summary.txt").read_text()
    rows = re.findall(r"^  (\w+)\s+(\S+)\s+\d+\s+\S+\s+(correctness|info)$", text, re.M)
    return {name: status for name, status, _ in rows}


def test_lane_script_parses():
    res = subprocess.run(["bash", "-n", str(LANE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_lane_dry_run_determinism_part(tmp_path):
    res = _lane(tmp_path, GPU_CHECK_PARTS="determinism", GPU_CHECK_DET_ARGS="--ops masked_mean,seq_log_ratio")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _summary(tmp_path) == {"build": "skipped", "tests": "skipped", "train": "skipped", "determinism": "pass",
                                  "batchinv": "skipped", "resume": "skipped", "native": "skipped", "bench": "skipped"}
    cases = json.loads((tmp_path / "determinism.json").read_text())["cases"]
    assert len(cases) == 4 and all(c["ok"] and c["tensors"] for c in cases)
    assert "DRY RUN" in res.stdout and (tmp_path / "env.txt").is_file()


def test_lane_out_of_time_fails(tmp_path):
    """No part gets time: every correctness part is 'no-time' and the lane exits 1 (not run != passed)."""
    res = _lane(tmp_path, GPU_CHECK_TOTAL_S="0")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    status = _summary(tmp_path)
    assert set(status) == {"build", "tests", "train", "determinism", "batchinv", "resume", "native", "bench"}
    assert status["tests"] == status["determinism"] == status["bench"] == "no-time"
    assert "a correctness part did not pass" in res.stdout


def test_determinism_check_catches_nondeterminism_and_nan():
    det = _determinism()

    def make(kind):
        def maker(dtype, gen):
            x = torch.randn(7, 5, generator=gen).to(dtype).requires_grad_(True)

            def run(inp, impl):
                y = inp["x"] * 2
                if kind == "noise":  # a "kernel" whose result depends on something besides its inputs
                    y = y + torch.rand(()) * 1e-3
                if kind == "nan":
                    y = y / torch.zeros(())  # inf / nan
                return {"y": y}
            return {"x": x}, run
        return maker
    cpu = torch.device("cpu")
    assert det.check("same", make("same"), torch.float32, None, cpu, 0)["ok"]
    noisy = det.check("noise", make("noise"), torch.float32, None, cpu, 0)
    assert not noisy["ok"] and noisy["differ"] == ["y"]  # the gradient stays identical: only y differs
    nan = det.check("nan", make("nan"), torch.float32, None, cpu, 0)
    assert not nan["ok"] and "y" in nan["non_finite"]


def test_determinism_bits_compare_bytes_not_values():
    det = _determinism()
    z = torch.tensor([0.0])
    assert torch.equal(z, -z) and not torch.equal(det._bits(z), det._bits(-z))
    n = torch.tensor([float("nan")])
    assert torch.equal(det._bits(n), det._bits(n.clone()))


def test_make_test_does_not_force_the_interpreter(tmp_path):
    """review item 7: on a GPU machine `make test` must run the Triton ops compiled (tests/conftest.py
    turns the interpreter on only where CUDA is absent)."""
    try:  # -n: print the recipes (venv creation, installs, pytest) without running any
        res = subprocess.run(["make", "-n", "test", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("make is not installed")
    recipe = [line for line in res.stdout.splitlines() if "-m pytest tests" in line]
    assert res.returncode == 0 and len(recipe) == 1, res.stdout + res.stderr
    assert "TRITON_INTERPRET" not in recipe[0]


def test_lane_dry_run_batch_invariance_part(tmp_path):
    res = _lane(tmp_path, GPU_CHECK_PARTS="batchinv", GPU_CHECK_BI_ARGS="--size tiny --impl native --dtypes fp32")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _summary(tmp_path)["batchinv"] == "pass"
    out = json.loads((tmp_path / "batch_invariance.json").read_text())
    assert out["failed"] == 0 and out["batch_invariant"] and len(out["cases"]) == 2
    assert all(c["promised"] and c["mismatches"] == 0 for c in out["cases"])
