"""Checkpoints and faults, end to end through `flowrl/train.py` subprocesses (tiny.toml, CPU, 1 thread;
on a GPU machine: CUDA with run.deterministic, the 2-rank runs on the CPU unless there are 2 GPUs):

- exact resume: "4 steps" == "2 steps, killed, relaunched, 2 more" (parameters, optimizer state and every
  deterministic metric bit-identical), on 1 rank and on 2 FSDP ranks;
- a kill half-way through a checkpoint write leaves the previous checkpoint, which the relaunch uses
  (the half-written folder is deleted) and still ends bit-identical;
- non-finite steps are skipped (no optimizer update), logged, and N in a row stop the run cleanly.
The kills are os._exit from FLOWRL_FAULT hooks (flowrl/faults.py): no cleanup runs, as under SIGKILL.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "flowrl" / "configs" / "tiny.toml")
KILLED = 17  # flowrl.faults.EXIT_CODE
BASE = ["--config", TINY, "--train.steps=4", "--checkpoint.every=2", "--checkpoint.keep=3", "--eval.every=2",
        "--run.cpu_threads=1", "--run.plots=false", "--checkpoint.export=false"]
NONDETERMINISTIC = {"step_time", "time_generate", "time_logprobs", "time_update", "tokens_per_s", "peak_memory_mb"}


def device_args(ranks: int) -> list:
    """CPU machine: nothing (gloo). Fewer GPUs than ranks: those ranks train on the CPU (gloo), not on
    CUDA devices that do not exist. Enough GPUs: CUDA, with the deterministic kernels that bit-exact
    resume on CUDA needs (flowrl/checkpoint.py)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [] if n == 0 else ["--run.device=cpu"] if n < ranks else ["--run.deterministic=true"]


def launch(tmp_path, name, *, ranks=1, fault="", expect=0, extra=()):
    script = [str(ROOT / "flowrl" / "train.py")]
    if ranks > 1:
        script = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] + script
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FLOWRL_FAULT=fault)
    res = subprocess.run([sys.executable] + script + BASE + device_args(ranks) + [f"--run.name={name}", *extra],
                         cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    if expect == KILLED and ranks > 1:  # torchrun reports its workers' exit code and exits 1
        assert res.returncode == 1 and f"exitcode  : {KILLED}" in res.stderr, res.stderr[-3000:]
    else:
        assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def records(run: Path, name: str):
    return [{k: v for k, v in json.loads(line).items() if k not in NONDETERMINISTIC}
            for line in (run / f"{name}.jsonl").read_text().splitlines()]


def checkpoint_tensors(ckpt: Path, tmp_path: Path) -> dict:
    """Every tensor of a DCP checkpoint (model and optimizer), flattened, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, torch.Tensor):
            flat[prefix] = x
    walk("", torch.load(out, weights_only=False))
    return flat


def assert_same_run(a: Path, b: Path, tmp_path: Path):
    assert records(b, "metrics") == records(a, "metrics")
    assert records(b, "eval") == records(a, "eval")
    assert records(b, "samples") == records(a, "samples")
    ta = checkpoint_tensors(a / "checkpoints" / "step_000004", tmp_path)
    tb = checkpoint_tensors(b / "checkpoints" / "step_000004", tmp_path)
    assert ta.keys() == tb.keys() and any(".optim." in k for k in ta) and any("log_z" in k for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_after_checkpoint_then_resume_is_exact(ranks, tmp_path):
    launch(tmp_path, "straight", ranks=ranks)
    launch(tmp_path, "resumed", ranks=ranks, fault="exit_after_checkpoint@2", expect=KILLED)
    run = tmp_path / "runs" / "resumed"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    assert len(records(run, "metrics")) == 2
    res = launch(tmp_path, "resumed", ranks=ranks)  # the same command again: continues from step 2
    assert "resumed from" in res.stdout and "step 2" in res.stdout
    assert_same_run(tmp_path / "runs" / "straight", run, tmp_path)


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    launch(tmp_path, "straight")
    launch(tmp_path, "torn", fault="checkpoint_write@4", expect=KILLED)
    ckpts = tmp_path / "runs" / "torn" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step_000004", "step_000002"]
    assert any(ckpts.glob(".tmp-step_000004/*.distcp"))  # really half-written: shards, no trainer state
    assert not any(ckpts.glob(".tmp-step_000004/trainer_rank*.pt"))
    res = launch(tmp_path, "torn")
    assert "step 2" in res.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004"]
    assert_same_run(tmp_path / "runs" / "straight", tmp_path / "runs" / "torn", tmp_path)


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    res = launch(tmp_path, "nan", fault="nan_loss@2,nan_loss@4-", expect=1,
                 extra=["--train.steps=6", "--checkpoint.every=1", "--checkpoint.keep=2", "--eval.prompts=0",
                        "--train.max_consecutive_skips=2"])
    assert "stopped: 2 consecutive steps (up to step 5)" in res.stderr and "step_000003" in res.stderr
    assert "Traceback" not in res.stderr
    run = tmp_path / "runs" / "nan"
    recs = records(run, "metrics")
    assert [r["skipped"] for r in recs] == [0, 1, 0, 1, 1]
    assert math.isfinite(recs[2]["loss"]) and recs[1]["loss"] is None  # strict JSON: null, not a bare NaN
    # skipped steps write no checkpoint: the newest is step 3, intact, with 2 optimizer updates (1 and 3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000003"]
    t = checkpoint_tensors(run / "checkpoints" / "step_000003", tmp_path)
    assert all(torch.isfinite(v).all() for v in t.values())
    steps = {float(v) for k, v in t.items() if k.endswith(".step")}
    assert steps == {2.0}, steps


@pytest.mark.slow
def test_non_finite_weights_stop_before_generate(tmp_path):
    """An update that leaves NaN / inf weights (finite loss and grad norm: e.g. a huge lr) stops the run
    before the next rollout samples from them; the checkpoint of the step before is named and kept."""
    res = launch(tmp_path, "w", fault="nan_param@2", expect=1,
                 extra=["--checkpoint.every=1", "--eval.prompts=0", "--checkpoint.keep=5"])
    assert "stopped: step 2: an optimizer step left non-finite weights" in res.stderr, res.stderr[-2000:]
    assert "Last good checkpoint: runs/w/checkpoints/step_000001." in res.stderr and "Traceback" not in res.stderr
    run = tmp_path / "runs" / "w"
    assert len(records(run, "metrics")) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]


@pytest.mark.slow
def test_reward_failure_stops_cleanly_naming_the_sample(tmp_path):
    """A task whose reward returns None at step 2: one message with the task and the sample, exit 1,
    the step-1 checkpoint kept (runs train.py as __main__ with the task's reward patched)."""
    code = ("import runpy, sys\nfrom flowrl import tasks\nseen = []\n"
            "def reward(self, p, response):\n"
            "    seen.append(1)\n"
            "    return None if len(seen) > 16 else 0.5\n"  # step 1: 4 prompts x 4 samples
            "tasks.SyntheticTask.reward = reward\n"
            f"sys.argv = ['train.py'] + {BASE + ['--run.name=rw', '--checkpoint.every=1', '--eval.prompts=0']!r}\n"
            f"runpy.run_path({str(ROOT / 'flowrl' / 'train.py')!r}, run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FLOWRL_FAULT="")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert ("stopped: the reward of task 'synthetic' returned NoneType None, not a number (step 2, rank 0, "
            "prompt 0 of this rank's batch, sample 0; question 'first digit of") in res.stderr, res.stderr[-2000:]
    assert "completion '" in res.stderr and "Last good checkpoint: runs/rw/checkpoints/step_000001." in res.stderr
    assert "Traceback" not in res.stderr
