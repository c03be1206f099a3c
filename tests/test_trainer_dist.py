"""End-to-end runs of tiny.toml: 2 gloo ranks with FSDP2 (flowrl and grpo), the torchrun CLI, and
a plain one-process `python flowrl/train.py`."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "flowrl" / "configs" / "tiny.toml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(ranks: int) -> str:
    """'cpu' (gloo) when this machine has some GPUs but fewer than ``ranks``; else the default."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "cpu" if 0 < n < ranks else "auto"


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _worker(rank: int, world: int, port: int, argv: list, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from flowrl import config, distributed, model, rollout, tasks, train
    from flowrl.metrics import Metrics
    cfg = config.load(argv)
    env = distributed.init(1, device=_device(world))
    try:
        cfg.check_world(env.world_size)
        policy, ref, tok = model.build(cfg, env)
        opt, sched = train.build_optimizer(policy, cfg)
        task = tasks.build(cfg, "train")
        metrics = Metrics(cfg.run_dir, env.is_main, cfg.train.steps)
        before = {n: _local(p) for n, p in policy.named_parameters()}
        ref_before = {n: _local(p) for n, p in ref.named_parameters()} if ref is not None else {}
        trainer = train.Trainer(cfg=cfg, env=env, policy=policy, sampler=rollout.HFRollout(tok, env.device),
                                metrics=metrics, ref=ref, opt=opt, sched=sched, task=task)
        for step in range(cfg.train.steps):
            train.train_step(trainer, step)
        metrics.close()
        changed = {n: not torch.equal(before[n], _local(p)) for n, p in policy.named_parameters()}
        ref_same = all(torch.equal(ref_before[n], _local(p)) for n, p in ref.named_parameters()) if ref else True
        shards = {n: _local(p).numel() for n, p in policy.named_parameters()}
        full = {n: p.numel() for n, p in policy.named_parameters()}
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(
            {"changed": changed, "ref_unchanged": ref_same, "sharded": shards != full}))
    finally:
        distributed.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["flowrl", "grpo"])
def test_two_rank_fsdp_run(algo, tmp_path):
    argv = ["--config", TINY, f"--run.out_dir={tmp_path}", f"--run.name={algo}", f"--algo.name={algo}"]
    mp.start_processes(_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["sharded"], "FSDP2 should shard the parameters over 2 ranks"
        assert res["ref_unchanged"]
        layer_params = [n for n in res["changed"] if "layers" in n]
        assert layer_params and all(res["changed"][n] for n in layer_params), "every decoder layer must train"
        if algo == "flowrl":
            assert any(res["changed"][n] for n in res["changed"] if n.startswith("log_z."))
        else:
            assert not any(n.startswith("log_z.") for n in res["changed"])
    records = [json.loads(line) for line in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        for key in ("loss", "reward_mean", "reward_std", "accuracy", "is_weight", "is_clip_frac", "entropy",
                    "response_len", "tokens_per_s", "step_time", "peak_memory_mb", "grad_norm"):
            assert math.isfinite(r[key]), (key, r)
        assert r["grad_norm"] > 0
    if algo == "flowrl":
        assert all(math.isfinite(r["log_z"]) and math.isfinite(r["delta"]) for r in records)
        assert all(r["is_weight"] == 1.0 for r in records)  # one update per batch: on-policy
    assert (tmp_path / algo / "samples.jsonl").read_text().count("\n") == 5


def _run(cmd, tmp_path, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    """The documented launch: torchrun flowrl/train.py, with CLI overrides, outputs in runs/<name>/."""
    res = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "flowrl" / "train.py"), "--config", TINY, f"--run.device={_device(2)}",
                "--train.steps=2", "--eval.every=1",
                "--algo.importance=sequence_mean", "--train.epochs=2"], tmp_path)
    run = tmp_path / "runs" / "tiny"
    assert "done in" in res.stdout
    cfg = (run / "config.toml").read_text()
    assert 'importance = "sequence_mean"' in cfg and "steps = 2" in cfg
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 1, 2] and all(0 <= e["accuracy"] <= 1 for e in evals)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= last["is_clip_frac"] <= 1  # two epochs: the second one is off-policy


@pytest.mark.slow
def test_plain_python_single_process(tmp_path):
    _run([sys.executable, str(ROOT / "flowrl" / "train.py"), "--config", TINY, "--train.steps=1",
          "--eval.prompts=0", "--run.name=plain"], tmp_path)
    assert len((tmp_path / "runs" / "plain" / "metrics.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "runs" / "plain" / "eval.jsonl").read_text() == ""


def test_config_error_exits_cleanly(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "flowrl" / "train.py"), "--config", TINY, "--algo.beta=-1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode != 0 and "config error: algo.beta=-1.0 must be > 0" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "runs").exists()
