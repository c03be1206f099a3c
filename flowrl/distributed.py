"""Everything distributed lives here: process group, device, FSDP2 sharding, collectives.

The training loop sees plain modules and calls only ``init``, ``cleanup``, ``parallelize``,
``gathered`` and the small collectives below; it never imports FSDP.

- Launched by torchrun (RANK/WORLD_SIZE set): one process group, gloo on CPU, nccl on CUDA, any
  world size, multi-node included. Launched as ``python flowrl/train.py``: a one-rank group on an
  in-process store, so the code path is the same (FSDP2 at world size 1 costs nothing measurable
  here: generate and no-grad forwards of SmolLM2-135M within noise of the plain model on CPU).
- ``parallelize``: FSDP2 ``fully_shard`` on every decoder layer, then on the root, with bf16 params /
  fp32 gradient reduction on GPU and fp32 on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mesh: Optional[object]  # DeviceMesh over all ranks (None only for modules built outside init)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(cpu_threads: int = 0) -> Env:
    """Start the process group (if launched by torchrun) and pick this rank's device."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # torchrun exports OMP_NUM_THREADS=1; one process on a 2-core box would then use half of it
        torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // local_world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # the default model is converted once per node (~20 s) while the other ranks wait at a barrier
    kw = dict(timeout=datetime.timedelta(minutes=30), device_id=device if device.type == "cuda" else None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **kw)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))
    return Env(rank, local_rank, world, device, mesh)


def cleanup(graceful: bool = True, before_destroy: Optional[Callable[[], None]] = None) -> None:
    """Tear the process group down. ``graceful`` (the run ended normally on every rank): meet at a
    barrier first, because a rank that destroys its gloo group and exits while a slower rank is still
    finishing aborts that rank ("terminate called without an active exception", SIGABRT; seen in about
    1 of 4 two-rank CPU test runs here). After an error no barrier: a failed peer would never arrive.
    ``before_destroy``: called after the barrier, e.g. a vLLM engine's shutdown (it destroys the
    groups it joined, the default one included, and fails if they are already gone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if graceful and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
            else:
                dist.barrier()
        except RuntimeError:
            pass  # a peer is gone after all: tear down regardless
    if before_destroy is not None:
        before_destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op without a process group). Returns ``t``."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_over_ranks(x: float, device: torch.device) -> float:
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global grad norm (over all ranks' shards) to ``max_norm`` (<= 0: no clip); returns the
    norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # sharded parameters give a DTensor norm
        norm = norm.full_tensor()
    return float(norm)


def mean_over_ranks(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """Average a dict of Python floats over ranks with one collective."""
    if not values or not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def decoder_layers(model: nn.Module):
    """The transformer blocks of any HF model: modules whose class is in ``_no_split_modules``."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def parallelize(model: nn.Module, env: Env, *, activation_checkpointing: bool = False) -> nn.Module:
    """Apply activation checkpointing (optional), then FSDP2: each decoder layer, then the root.

    ``model`` is the root whose forward the loop calls (it owns the embeddings, final norm, lm_head and
    any extra head, e.g. log Z). ``env.mesh`` None (tests building modules without ``init``): unchanged.
    """
    if activation_checkpointing:
        # HF's own switch keeps the layer classes intact (the layer lookup below relies on them)
        lm = next(m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable"))
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if env.mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = env.mesh
    if env.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the full (unsharded) parameters for the duration, e.g. for ``generate``.

    Sharded layers would otherwise all-gather on every generated token, and ranks that stop early
    would leave the others waiting in a collective. Costs one full copy of the parameters per rank.
    """
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True)
