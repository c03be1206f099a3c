"""Everything distributed lives here: process group, device, FSDP2 sharding, collectives.

The training loop sees plain modules and calls only ``init``, ``cleanup``, ``parallelize``,
``gathered`` and the small collectives below; it never imports FSDP.

- Launched by torchrun (RANK/WORLD_SIZE set): one process group, gloo on CPU, nccl on CUDA, any
  world size, multi-node included. Launched as ``python flowrl/train.py``: a one-rank group on an
  in-process store, so the code path is the same (FSDP2 at world size 1 costs nothing measurable
  here: generate and no-grad forwards of SmolLM2-135M within noise of the plain model on CPU).
- Device (``run.device``): 'auto' = one CUDA device per local rank when CUDA is visible, else the CPU;
  more local ranks than visible GPUs is an error naming the fix (it would otherwise die in
  ``set_device`` with "invalid device ordinal"), never a silent fall-back to the CPU. 'cpu' forces
  gloo on the CPU even where CUDA exists (tests of 2 ranks on a one-GPU machine).
- ``run.deterministic``: ``torch.use_deterministic_algorithms(True)`` plus the settings cuBLAS and
  flash-attention read, so that two runs (or a run and its resume) on CUDA match bit for bit; an op
  without a deterministic CUDA kernel then raises instead of drifting. Off by default: on CUDA the
  memory-efficient / flash attention backward accumulates in a nondeterministic order. On the CPU
  every run is bit-identical without it.
- ``parallelize``: FSDP2 ``fully_shard`` on every decoder layer, then on the root, with bf16 params /
  fp32 gradient reduction on GPU and fp32 on CPU (``param_dtype`` overrides). Modules listed in
  ``fp32_modules`` (the log Z head) get their own FSDP unit whose parameters and inputs stay fp32.
  Modules arrive on the CPU: ``fully_shard`` moves each unit to the device and shards it there, one
  unit at a time, so no rank ever holds a full copy of the model on the GPU.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence

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


DEVICES = ("auto", "cpu", "cuda")


def pick_device(requested: str = "auto", local_rank: int = 0, local_world: int = 1) -> torch.device:
    """This rank's device for ``run.device`` (see the module docstring). Raises ConfigError when the
    node has fewer visible GPUs than local ranks (checked on every rank, so all of them stop)."""
    from flowrl.config import ConfigError
    if requested not in DEVICES:
        raise ConfigError(f"run.device={requested!r}: use one of {DEVICES}.")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ConfigError("run.device='cuda' but no CUDA device is visible (check CUDA_VISIBLE_DEVICES); "
                          "use run.device='cpu' or 'auto'.")
    if local_world > n:
        raise ConfigError(f"{local_world} ranks on this node but only {n} visible CUDA device(s): launch at most "
                          f"{n} (torchrun --nproc_per_node={n}), or train on the CPU with --run.device=cpu (gloo).")
    return torch.device("cuda", local_rank)


def set_deterministic(on: bool = True) -> None:
    """Deterministic kernels for the rest of the process (``run.deterministic``). Call before the
    first CUDA op: cuBLAS reads its workspace setting when it creates its handle."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch refuses cuBLAS >= 10.2 without it
    os.environ.setdefault("FLASH_ATTENTION_DETERMINISTIC", "1")  # HF's flash_attention_2 path reads it
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def init(cpu_threads: int = 0, device: str = "auto", deterministic: bool = False) -> Env:
    """Start the process group (if launched by torchrun) and pick this rank's device."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dev = pick_device(device, local_rank, local_world)
    set_deterministic(deterministic)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        # torchrun exports OMP_NUM_THREADS=1; one process on a 2-core box would then use half of it
        torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // local_world))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    # the default model is converted once per node (~20 s) while the other ranks wait at a barrier
    kw = dict(timeout=datetime.timedelta(minutes=30), device_id=dev if dev.type == "cuda" else None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **kw)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(dev.type, (world,))
    return Env(rank, local_rank, world, dev, mesh)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): host clocks around GPU work measure
    the launches, not the work, without it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def any_over_ranks(flag: torch.Tensor) -> bool:
    """True when ``flag`` (a 0-dim bool / number tensor, nonzero = true) is set on any rank. One host
    sync (plus one collective with several ranks)."""
    t = flag.detach().to(torch.float64).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip the global grad norm (over all ranks' shards) to ``max_norm`` (<= 0: no clip); returns the
    norm before clipping as a 0-dim tensor on the device (no host sync)."""
    grads = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # sharded parameters give a DTensor norm
        norm = norm.full_tensor()
    return norm.detach()


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


def parallelize(model: nn.Module, env: Env, *, activation_checkpointing: bool = False,
                param_dtype: Optional[torch.dtype] = None, fp32_modules: Sequence[nn.Module] = ()) -> nn.Module:
    """Apply activation checkpointing (optional), then FSDP2: each decoder layer, then the root.

    ``model`` is the root whose forward the loop calls (it owns the embeddings, final norm, lm_head and
    any extra head, e.g. log Z); pass it on the CPU: ``fully_shard`` moves one unit at a time to the
    device and shards it there. ``param_dtype``: the compute dtype of the parameters (None: bf16 on
    CUDA, fp32 on CPU); gradients are reduced and kept in fp32 either way. ``fp32_modules``: sub-modules
    of ``model`` that compute in fp32 whatever ``param_dtype`` (their own FSDP unit casts their inputs
    to fp32). ``env.mesh`` None (tests building modules without ``init``): moved to ``env.device``, not sharded.
    """
    if activation_checkpointing:
        # HF's own switch keeps the layer classes intact (the layer lookup below relies on them)
        lm = next(m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable"))
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if env.mesh is None:
        return model.to(env.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = env.mesh
    if param_dtype is None:
        param_dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    for m in fp32_modules:
        fully_shard(m, mesh=mesh, mp_policy=fp32)
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
