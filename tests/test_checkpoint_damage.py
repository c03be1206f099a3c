"""Damaged and hostile checkpoints (issue 22): one real tiny run (2 steps, a checkpoint after each), then
for its newest checkpoint every kind of file (DCP shard, DCP .metadata, trainer_rank0.pt, manifest.json)
flipped / truncated / deleted, and a pickle payload (an object whose __reduce__ creates a marker file)
planted in each pickled file, with the manifest left alone or forged to match. Resume must fall back to
the older intact checkpoint (a warning naming the file) or stop with a clear CheckpointError, never load
the damaged state, and never run the payload (the marker file never appears). FLOWRL_CHECKPOINT_KEY:
unsigned, wrongly signed and forged checkpoints are refused. Seconds: one 2-step subprocess run, one
in-process model build, one resume subprocess.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flowrl import checkpoint, config, distributed, model, train

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "flowrl" / "configs" / "tiny.toml")
CPU = distributed.Env(0, 0, 1, torch.device("cpu"), None)
ARGS = ["--config", TINY, "--train.steps=2", "--checkpoint.every=1", "--checkpoint.keep=2", "--eval.prompts=0",
        "--run.cpu_threads=1", "--run.plots=false", "--checkpoint.export=false", "--run.name=r"]
FILES = {"shard": "__0_0.distcp", "metadata": ".metadata", "trainer": "trainer_rank0.pt",
         "manifest": checkpoint.MANIFEST}


class Payload:
    """Unpickling it creates ``marker`` (builtins.open): proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _launch(cwd: Path, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FLOWRL_FAULT="")
    env.pop(checkpoint.KEY_ENV, None)
    return subprocess.run([sys.executable, str(ROOT / "flowrl" / "train.py"), *ARGS, *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damage")
    res = _launch(tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp / "runs" / "r"
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_000001", "step_000002"]
    return run


@pytest.fixture
def run(pristine, tmp_path, monkeypatch):
    """A fresh copy of the pristine run (no key set)."""
    monkeypatch.delenv(checkpoint.KEY_ENV, raising=False)
    dst = tmp_path / "runs" / "r"
    shutil.copytree(pristine, dst)
    return dst


def newest(run: Path) -> Path:
    return run / checkpoint.SUBDIR / "step_000002"


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":  # 64 bytes in the middle, as a bad disk or a torn copy would
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid: mid + 64]) + data[mid + 64:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()


def assert_falls_back(run: Path, capsys, name: str) -> None:
    """resume=auto picks step 1 with a warning naming the damaged checkpoint (and file); resume=PATH of
    step 2 is a CheckpointError."""
    capsys.readouterr()
    assert checkpoint.resume_point(run, "auto", CPU) == run / checkpoint.SUBDIR / "step_000001"
    warning = capsys.readouterr().err
    assert "skipping checkpoint step_000002" in warning and name in warning, warning
    with pytest.raises(checkpoint.CheckpointError, match="step_000002"):
        checkpoint.resume_point(run, str(newest(run)), CPU)


# ----------------------------------------------------------------------------------------------------
# damage: every kind of file, three ways
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("kind", sorted(FILES))
def test_damaged_file_falls_back(run, capsys, kind, how):
    assert checkpoint.resume_point(run, "auto", CPU) == newest(run)  # intact: the newest
    damage(newest(run) / FILES[kind], how)
    # a flipped manifest may still parse: then the file whose digest it garbled is the one named
    assert_falls_back(run, capsys, "step_000002" if kind == "manifest" else FILES[kind])


def test_extra_file_and_all_damaged(run, capsys):
    (newest(run) / "__1_0.distcp").write_bytes(b"not from this run")
    assert_falls_back(run, capsys, "__1_0.distcp is not listed")
    damage(run / checkpoint.SUBDIR / "step_000001" / FILES["shard"], "flip")
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint.*resume=off"):
        checkpoint.resume_point(run, "auto", CPU)  # never a silent fresh start over damaged checkpoints


# ----------------------------------------------------------------------------------------------------
# pickle payloads: with the manifest left alone (damage) and forged to match (no key: only the
# restricted loaders stand between the file and code execution)
# ----------------------------------------------------------------------------------------------------
def plant(ckpt: Path, kind: str, marker: Path) -> None:
    if kind == "metadata":
        (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    elif kind == "trainer":
        torch.save({"step": 2, "scheduler": {}, "rng": {}, "x": Payload(marker)}, ckpt / "trainer_rank0.pt")
    else:  # a DCP byte item (an optimizer hyper-parameter) rewritten as the payload: new shard + .metadata
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(ckpt, ckpt.parent / "full.pt")  # the test's own trusted copy
        sd = torch.load(ckpt.parent / "full.pt", weights_only=False)
        (ckpt.parent / "full.pt").unlink()
        sd["optim"]["param_groups"][0]["lr"] = Payload(marker)
        dcp.save(sd, checkpoint_id=str(ckpt), no_dist=True)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["metadata", "trainer", "shard"])
def test_payload_without_manifest_update_is_skipped(run, capsys, tmp_path, kind):
    marker = tmp_path / "PWNED"
    plant(newest(run), kind, marker)
    assert_falls_back(run, capsys, "step_000002")
    assert not marker.exists()


def test_forged_payloads_are_refused_by_the_loaders(run, tmp_path):
    """No key: the manifest is rewritten to match; verification passes, the restricted loaders refuse."""
    marker = tmp_path / "PWNED"
    ckpt = newest(run)
    plant(ckpt, "metadata", marker)
    manifest = checkpoint.write_manifest(ckpt, 2)
    assert checkpoint.resume_point(run, "auto", CPU) == ckpt
    with pytest.raises(checkpoint.CheckpointError, match=r"\.metadata: UnpicklingError: global _?io\.open is not allowed"):
        checkpoint._Reader(ckpt, manifest).read_metadata()
    plant(ckpt, "trainer", marker)
    manifest = checkpoint.write_manifest(ckpt, 2)
    with pytest.raises(checkpoint.CheckpointError, match="trainer_rank0.pt: UnpicklingError"):
        checkpoint.read_trainer_state(ckpt, CPU, manifest)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# loading into a real (FSDP, one rank) policy: the intact fallback loads, forged shard payloads do not
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    yield
    distributed.cleanup()


def test_load_refuses_forged_shard_and_loads_intact(run, tmp_path, one_rank_group):
    cfg = config.load(ARGS[:-1] + [f"--run.out_dir={run.parent}", "--run.name=r"])
    env = distributed.init(1, device="cpu")
    policy, _, _ = model.build(cfg, env)
    opt, sched = train.build_optimizer(policy, cfg)
    marker = tmp_path / "PWNED"
    ckpt = newest(run)
    plant(ckpt, "shard", marker)
    checkpoint.write_manifest(ckpt, 2)
    with pytest.raises(checkpoint.CheckpointError, match="lr.*UnpicklingError|UnpicklingError.*lr"):
        checkpoint.load(ckpt, policy, opt, sched, env)
    assert not marker.exists()
    state = checkpoint.load(run / checkpoint.SUBDIR / "step_000001", policy, opt, sched, env)
    assert state["step"] == 1 and sched.last_epoch == 1
    assert opt.param_groups[0]["lr"] == cfg.optim.lr


# ----------------------------------------------------------------------------------------------------
# FLOWRL_CHECKPOINT_KEY: HMAC-SHA256 of the manifest
# ----------------------------------------------------------------------------------------------------
def test_key_refuses_unsigned_wrong_and_forged(run, capsys, monkeypatch):
    monkeypatch.setenv(checkpoint.KEY_ENV, "secret-a")
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint"):
        checkpoint.resume_point(run, "auto", CPU)  # written without the key: unsigned
    assert "is not signed" in capsys.readouterr().err
    old = run / checkpoint.SUBDIR / "step_000001"
    checkpoint.write_manifest(old, 1)  # signed with secret-a
    checkpoint.write_manifest(newest(run), 2)
    assert checkpoint.resume_point(run, "auto", CPU) == newest(run)
    monkeypatch.setenv(checkpoint.KEY_ENV, "secret-b")
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        checkpoint.resume_point(run, str(newest(run)), CPU)
    monkeypatch.setenv(checkpoint.KEY_ENV, "secret-a")
    # an attacker without the key edits a file and rewrites the manifest's digest, keeping the signature
    damage(newest(run) / FILES["trainer"], "flip")
    sig = (newest(run) / checkpoint.SIGNATURE).read_bytes()
    monkeypatch.delenv(checkpoint.KEY_ENV)
    checkpoint.write_manifest(newest(run), 2)
    (newest(run) / checkpoint.SIGNATURE).write_bytes(sig)
    monkeypatch.setenv(checkpoint.KEY_ENV, "secret-a")
    assert_falls_back(run, capsys, checkpoint.SIGNATURE)


# ----------------------------------------------------------------------------------------------------
# end to end: a relaunch resumes from the older checkpoint; a damaged explicit path stops the run
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_relaunch_falls_back_end_to_end(run):
    cwd = run.parent.parent
    damage(newest(run) / FILES["shard"], "flip")
    res = _launch(cwd, f"--checkpoint.resume={newest(run)}")
    assert res.returncode == 1 and "checkpoint error:" in res.stderr, res.stderr[-2000:]
    assert "__0_0.distcp" in res.stderr
    assert "Traceback" not in res.stderr
    res = _launch(cwd, "--train.steps=3")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "skipping checkpoint step_000002" in res.stderr and "__0_0.distcp" in res.stderr
    assert "resumed from" in res.stdout and "step_000001 (step 1)" in res.stdout
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_000002", "step_000003"]
    checkpoint.verify(newest(run))  # rewritten by the resumed run, intact


@pytest.mark.parametrize("target", ["builtins.getattr", "os.system", "torch.load",
                                    "torch.distributed.checkpoint.filesystem.FileSystemWriter",
                                    "torch.distributed.checkpoint.metadata.Enum"])
def test_metadata_unpickler_allowlist(target):
    """Only DCP's metadata dataclasses / enums (and Size, dtypes, layouts, paths) may be built, not any
    class or function of DCP's own modules."""
    import io
    module, name = target.rsplit(".", 1)
    data = b"\x80\x04c" + f"{module}\n{name}\n".encode() + b")R."  # GLOBAL module.name, call with ()
    with pytest.raises(pickle.UnpicklingError, match=f"global {target} is not allowed"):
        checkpoint._MetadataUnpickler(io.BytesIO(data)).load()
