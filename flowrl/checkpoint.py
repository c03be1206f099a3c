"""Checkpoints (exact resume) and the export of the trained policy as a plain HF folder.

    runs/<name>/checkpoints/step_000004/       a complete checkpoint
        .metadata, __<rank>_0.distcp           policy (log Z head included) + AdamW state, written with
                                               torch.distributed.checkpoint (each rank its own shards;
                                               loads at another world size too)
        trainer_rank<r>.pt                     rank r's RNG states (python, torch CPU, CUDA), the
                                               scheduler, the step, the skip counters
    runs/<name>/checkpoints/.tmp-step_000006/  being written, or left half-written by a crash
    runs/<name>/export/                        the trained policy: config, safetensors, tokenizer

Atomic: every rank writes into the ``.tmp-`` folder; after a barrier rank 0 renames it (one
``os.rename`` on one filesystem) and only then deletes checkpoints beyond the newest ``keep``. A crash
at any point leaves the previous complete checkpoint; resume ignores and deletes ``.tmp-`` folders.

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

import os
import random
import re
import shutil
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from flowrl import distributed, faults

SUBDIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)$")
_TMP = ".tmp-"


def checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (a folder counts once DCP's metadata is in it)."""
    root = Path(run_dir) / SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if _NAME.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(run_dir: Path) -> Optional[Path]:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: Path) -> List[Path]:
    """Delete half-written ``.tmp-`` checkpoint folders (rank 0, before anything is written)."""
    root = Path(run_dir) / SUBDIR
    stale = list(root.glob(_TMP + "*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
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
        if final.exists():  # the same step saved by an earlier attempt
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load(path: Path, policy, opt, sched, env) -> dict:
    """Restore a checkpoint into the (already built and sharded) policy and optimizer; returns the
    trainer state (step, counters) with this rank's RNG states applied."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(policy, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mine = path / f"trainer_rank{env.rank}.pt"
    exact = mine.is_file()
    trainer = torch.load(mine if exact else path / "trainer_rank0.pt", weights_only=False)
    sched.load_state_dict(trainer.pop("scheduler"))
    rng = trainer.pop("rng")
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
