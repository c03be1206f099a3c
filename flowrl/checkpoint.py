"""Checkpoints (exact resume) and the export of the trained policy as a plain HF folder.

    runs/<name>/checkpoints/step_000004/       a complete checkpoint
        .metadata, __<rank>_0.distcp           policy (log Z head included) + AdamW state, written with
                                               torch.distributed.checkpoint (each rank its own shards;
                                               loads at another world size too)
        trainer_rank<r>.pt                     rank r's RNG states (python, torch CPU, CUDA), the
                                               scheduler, the step, the skip counters (tensors, numbers,
                                               strings, lists, dicts: loads with weights_only=True)
        manifest.json                          every other file's size and SHA-256, written last
        manifest.json.hmac                     HMAC-SHA256 of manifest.json, when FLOWRL_CHECKPOINT_KEY is set
    runs/<name>/checkpoints/.tmp-step_000006/  being written, or left half-written by a crash
    runs/<name>/export/                        the trained policy: config, safetensors, tokenizer

Atomic: every rank writes into the ``.tmp-`` folder; after a barrier rank 0 renames it (one
``os.rename`` on one filesystem) and only then deletes checkpoints beyond the newest ``keep``. A crash
at any point leaves the previous complete checkpoint; resume ignores and deletes ``.tmp-`` folders.

Trusted (docs/checkpoints.md): resume verifies a checkpoint's manifest (and its signature when
``FLOWRL_CHECKPOINT_KEY`` is set) before reading any other file; a damaged, incomplete or unsigned one
is skipped with a warning naming the file, and resume falls back to the newest intact one. Nothing is
unpickled without a restriction: ``trainer_rank<r>.pt`` and DCP's byte items load with
``weights_only=True``, DCP's ``.metadata`` (a plain pickle) through an unpickler that only builds DCP's
metadata classes. So a checkpoint from elsewhere can hold wrong numbers, never code.

Exact: data order is a function of the step (train.local_prompts) and every random draw of a step
(sampling, log Z dropout) comes from the torch / CUDA generators saved here per rank, so "4 steps" and
"2 steps, kill, resume, 2 steps" give bit-identical parameters and metrics (tests/test_trainer_checkpoint.py):
- on the CPU, always;
- on CUDA, with ``run.deterministic=true`` (torch's deterministic algorithms: the attention backward
  then accumulates in a fixed order; tested by the GPU lane, scripts/gpu_check.sh). Without it the
  resumed run has the same data, sampling streams and optimizer state, but the attention backward
  (memory-efficient or flash) sums in a nondeterministic order, so its numbers differ in the last bits
  from the first step on, exactly as two uninterrupted CUDA runs differ from each other.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from flowrl import distributed, faults

SUBDIR = "checkpoints"
MANIFEST, SIGNATURE = "manifest.json", "manifest.json.hmac"
KEY_ENV = "FLOWRL_CHECKPOINT_KEY"
_NAME = re.compile(r"^step_(\d+)$")
_TMP = ".tmp-"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A checkpoint is damaged, incomplete, unsigned or wrongly signed; the message names the file."""


# ----------------------------------------------------------------------------------------------------
# manifest: sizes + SHA-256 of every file (+ optional HMAC of the manifest)
# ----------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    # SHA-256 over blake2b: 1.7 vs 0.86 GB/s per core on this box's CPU (SHA-NI); hashlib releases the
    # GIL on large updates, so the files of a checkpoint hash in parallel threads
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(paths: List[Path]) -> List[str]:
    with ThreadPoolExecutor(max(1, min(8, len(paths), os.cpu_count() or 1))) as ex:
        return list(ex.map(_sha256, paths))


def _key() -> Optional[bytes]:
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def write_manifest(folder: Path, step: int) -> dict:
    """Write ``manifest.json`` (and its HMAC when FLOWRL_CHECKPOINT_KEY is set) over every file in
    ``folder``. Called by rank 0 once every rank's files are complete, before the rename."""
    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir() if p.name not in (MANIFEST, SIGNATURE))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(paths, _hash_all(paths))}
    manifest = {"format": 1, "step": step, "files": files}
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    (folder / MANIFEST).write_bytes(body)
    key = _key()
    if key is not None:
        (folder / SIGNATURE).write_text(hmac.new(key, body, hashlib.sha256).hexdigest() + "\n")
    else:
        (folder / SIGNATURE).unlink(missing_ok=True)  # a stale signature would not match anyway
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest, its signature checked when FLOWRL_CHECKPOINT_KEY is set (CheckpointError if not)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete, or older than manifests "
                              "(written before this version); it cannot be verified.")
    body = path.read_bytes()
    key = _key()
    if key is not None:
        sig = folder / SIGNATURE
        if not sig.is_file():
            raise CheckpointError(f"{sig} is missing: {KEY_ENV} is set and this checkpoint is not signed.")
        want = hmac.new(key, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig.read_bytes().strip(), want.encode()):
            raise CheckpointError(f"{sig} does not match {path} under {KEY_ENV}: signed with another key, or "
                                  "the manifest was changed.")
    try:
        manifest = json.loads(body)
        files = manifest["files"]
        ok = isinstance(files, dict) and files and all(
            isinstance(e, dict) and type(e.get("bytes")) is int and isinstance(e.get("sha256"), str)
            and _HEX64.match(e["sha256"]) for e in files.values())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path} is not a valid manifest (damaged).")
    return manifest


def verify(folder: Path) -> dict:
    """Check ``folder`` against its manifest before anything in it is read: the same set of files, each
    with its size and SHA-256. Returns the manifest; raises CheckpointError naming the first bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder.")
    manifest = read_manifest(folder)
    files = manifest["files"]
    present = {p.name: p for p in folder.iterdir() if p.name not in (MANIFEST, SIGNATURE)}
    for name in sorted(set(files) - set(present)):
        raise CheckpointError(f"{folder / name} is missing (listed in {MANIFEST}).")
    for name in sorted(set(present) - set(files)):
        raise CheckpointError(f"{folder / name} is not listed in {MANIFEST}.")
    for name, p in sorted(present.items()):
        if not p.is_file() or p.stat().st_size != files[name]["bytes"]:
            raise CheckpointError(f"{p} has {p.stat().st_size if p.is_file() else 'no'} bytes, the manifest says "
                                  f"{files[name]['bytes']} (truncated or damaged).")
    names = sorted(present)
    for name, digest in zip(names, _hash_all([present[n] for n in names])):
        if digest != files[name]["sha256"]:
            raise CheckpointError(f"{present[name]}: its SHA-256 differs from the manifest's (damaged).")
    return manifest


def _why(e: BaseException) -> str:
    """One line for an unpickling error: torch's weights_only message is a page whose first lines
    suggest weights_only=False; the line that matters names the refused global."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    hit = [ln for ln in lines if "Unsupported global" in ln or "not allowed" in ln]
    return f"{type(e).__name__}: {(hit or lines or [''])[0][:300]}"


def _verified_bytes(path: Path, manifest: dict) -> bytes:
    """A file's bytes, checked against the manifest (read once: no window between check and use)."""
    data = path.read_bytes()
    entry = manifest["files"].get(path.name)
    if entry is None or len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path} does not match {MANIFEST} (changed after it was verified?).")
    return data


# ----------------------------------------------------------------------------------------------------
# loading without unrestricted unpickling
# ----------------------------------------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle of dataclasses; this unpickler builds those (the dataclasses and
    enums defined in DCP's metadata module, filesystem's _StorageInfo) plus torch.Size, dtypes, layouts
    and paths, and nothing else (no functions, no other classes): a payload fails with UnpicklingError
    before it can run."""
    METADATA = "torch.distributed.checkpoint.metadata"
    OTHER = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}

    def find_class(self, module, name):
        obj = getattr(sys.modules.get(module), name, None) if module in (self.METADATA, "torch") else None
        ok = (module, name) in self.OTHER or (module == "torch" and isinstance(obj, torch.dtype)) or (
            module == self.METADATA and isinstance(obj, type) and obj.__module__ == module
            and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)))
        if not ok:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")
        return super().find_class(module, name)


class _Reader(dcp.FileSystemReader):
    """DCP's reader with ``.metadata`` checked against the manifest and read by _MetadataUnpickler."""

    def __init__(self, path: Path, manifest: dict):
        super().__init__(str(path))
        self._ckpt, self._manifest = Path(path), manifest

    def read_metadata(self, *args, **kwargs):
        data = _verified_bytes(self._ckpt / ".metadata", self._manifest)
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except Exception as e:  # noqa: BLE001 - anything wrong in it is a damaged checkpoint
            raise CheckpointError(f"{self._ckpt / '.metadata'}: {type(e).__name__}: {e}") from None
        if not isinstance(metadata, dcp.metadata.Metadata):
            raise CheckpointError(f"{self._ckpt / '.metadata'} holds a {type(metadata).__name__}, not DCP Metadata.")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(dcp.DefaultLoadPlanner):
    """DCP's default planner, with its non-tensor items (optimizer hyper-parameters) loaded with
    ``weights_only=True`` (the default planner uses weights_only=False)."""

    def load_bytes(self, read_item, value):
        try:
            value = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a global outside weights_only's types: damaged or hostile
            raise CheckpointError(f"item {read_item.dest_index.fqn}: {_why(e)}") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes (torch 2.13), but weights_only
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value


# ----------------------------------------------------------------------------------------------------
# finding a checkpoint to resume from
# ----------------------------------------------------------------------------------------------------
def checkpoints(run_dir: Path) -> List[Path]:
    """Complete (renamed) checkpoint folders in ``run_dir``, oldest first; not yet verified."""
    root = Path(run_dir) / SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(run_dir: Path, warn=None) -> Optional[Path]:
    """The newest checkpoint that verifies; each damaged newer one is skipped with ``warn(message)``."""
    for ckpt in reversed(checkpoints(run_dir)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            if warn is not None:
                warn(f"[flowrl] WARNING: skipping checkpoint {ckpt.name}: {e}")
    return None


def resume_point(run_dir: Path, setting: str, env) -> Optional[Path]:
    """The checkpoint to resume from under ``checkpoint.resume=setting`` ('auto', 'off', a path), or None.
    Rank 0 verifies (hashing each file once), every rank gets its answer. A damaged explicit path, or
    checkpoints in the run directory none of which is intact, raise CheckpointError on every rank."""
    answer = [None, None]  # path, error
    if env.is_main:
        warn = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        try:
            if setting == "auto":
                found = latest(run_dir, warn)
                if found is None and checkpoints(run_dir):
                    raise CheckpointError(f"no intact checkpoint in {Path(run_dir) / SUBDIR} (see the warnings "
                                          "above); --checkpoint.resume=off starts over (and deletes them).")
                answer[0] = found and str(found)
            elif setting != "off":
                verify(Path(setting))
                answer[0] = setting
        except CheckpointError as e:
            answer[1] = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)  # strings between our own ranks
    if answer[1] is not None:
        raise CheckpointError(answer[1])
    return None if answer[0] is None else Path(answer[0])


def remove_partial(run_dir: Path) -> List[Path]:
    """Delete half-written ``.tmp-`` checkpoint folders (rank 0, before anything is written)."""
    root = Path(run_dir) / SUBDIR
    stale = list(root.glob(_TMP + "*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# ----------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """This process's RNG states as tensors and numbers (weights_only-loadable)."""
    version, words, gauss = random.getstate()
    state = {"python_version": version, "python": torch.tensor(words, dtype=torch.int64),
             "python_gauss": gauss, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(run_dir: Path, step: int, policy, opt, sched, trainer_state: dict, env, keep: int) -> Path:
    """Write step ``step``'s checkpoint (collective: every rank calls it). Returns its folder."""
    root = Path(run_dir) / SUBDIR
    final, tmp = root / f"step_{step:06d}", root / f"{_TMP}step_{step:06d}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    model_sd, optim_sd = get_state_dict(policy, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    faults.exit_if("checkpoint_write", step)  # shards written, trainer state and rename not yet
    torch.save({**trainer_state, "step": step, "scheduler": sched.state_dict(), "rng": rng_state(env.device),
                "world_size": env.world_size}, tmp / f"trainer_rank{env.rank}.pt")
    distributed.barrier()  # every rank's files are complete
    if env.is_main:
        write_manifest(tmp, step)
        if final.exists():  # the same step saved by an earlier attempt
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def read_trainer_state(path: Path, env, manifest: dict) -> dict:
    """This rank's ``trainer_rank<r>.pt`` (rank 0's when this rank has none: another world size),
    checked against the manifest and loaded with ``weights_only=True``; adds ``exact`` (own file)."""
    mine = Path(path) / f"trainer_rank{env.rank}.pt"
    exact = mine.is_file()
    src = mine if exact else Path(path) / "trainer_rank0.pt"
    data = _verified_bytes(src, manifest)
    try:
        trainer = torch.load(io.BytesIO(data), weights_only=True)
        ok = isinstance(trainer, dict) and {"step", "scheduler", "rng"} <= set(trainer)
    except Exception as e:  # noqa: BLE001 - a global outside weights_only's types: damaged or hostile
        raise CheckpointError(f"{src}: {_why(e)}") from None
    if not ok:
        raise CheckpointError(f"{src} is not a trainer state (no step / scheduler / rng).")
    return {**trainer, "exact": exact}


def load(path: Path, policy, opt, sched, env) -> dict:
    """Restore a checkpoint (verified by resume_point) into the (already built and sharded) policy and
    optimizer; returns the trainer state (step, counters) with this rank's RNG states applied. Each file
    this rank reads itself is checked against the manifest as it is read; the shards were hashed by
    rank 0 in resume_point."""
    path = Path(path)
    manifest = read_manifest(path)
    trainer = read_trainer_state(path, env, manifest)  # the small file first: fail before the shards
    model_sd, optim_sd = get_state_dict(policy, opt)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, storage_reader=_Reader(path, manifest), planner=_Planner())
    except CheckpointError:
        raise
    except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - DCP wraps our errors per rank
        inner = re.findall(r"CheckpointError: (.*)", str(e))  # ours, raised inside DCP's reader or planner
        raise CheckpointError(f"{path}: {inner[-1] if inner else 'DCP could not load it: ' + _why(e)}") from None
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(trainer.pop("scheduler"))
    rng, exact = trainer.pop("rng"), trainer.pop("exact")
    if exact and trainer.get("world_size") == env.world_size:
        set_rng_state(rng, env.device)
    else:  # another world size: the weights and optimizer reshard, the sampling streams cannot
        torch.manual_seed(1_000_003 * trainer["step"] + env.rank)
        if env.is_main:
            print(f"[flowrl] {path} was written by {trainer.get('world_size')} ranks, this run has "
                  f"{env.world_size}: resuming with fresh sampling seeds (not bit-exact)", flush=True)
    return trainer


def export_hf(policy, tokenizer, out_dir: Path, env) -> Path:
    """Save the policy's language model (no log Z head) as a plain HF folder that
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads. Collective; rank 0 writes.

    The full state dict is gathered to rank 0's CPU one tensor at a time (cpu_offload), so no GPU
    ever holds a second full copy.
    """
    out_dir = Path(out_dir)
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        from transformers import AutoModelForCausalLM
        lm_sd = {k[len("lm."):]: v for k, v in full.items() if k.startswith("lm.")}
        cfg = policy.lm.config
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(lm_sd, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(cfg, "tie_word_embeddings", False)}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"export: state dict mismatch (missing {sorted(set(missing) - tied)}, "
                               f"unexpected {sorted(unexpected)})")
        plain.generation_config = policy.lm.generation_config
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    distributed.barrier()
    return out_dir
