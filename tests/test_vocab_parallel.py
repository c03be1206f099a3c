"""token_logprobs(process_group=...): tensor-parallel vocab shards on real gloo ranks (2 and 3 processes).

Every rank slices its shard out of the same full logits (a strided view: row stride V, vocab stride 1),
so the float64 reference on the full logits is the spec for the merged logp / entropy (replicated on every
rank) and for each rank's slice of the gradient. Bound: no worse than PyTorch on the full logits at the
same dtype, plus a few ulps (tests/helpers.py). Odd shard widths (1, 7, 301, 4100), ignore_index,
temperature, a shard that is all -inf (vocab padding), per-position upstream gradients, every impl.
"""
from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowrl_kernels import reference, token_logprobs
from flowrl_kernels._utils import native_has, triton_interpret
from helpers import assert_no_worse_than_torch

# CPU tensors on gloo ranks: impl="triton" runs them only through the interpreter (conftest sets
# TRITON_INTERPRET=1 where there is no GPU; on a GPU machine it would refuse CPU tensors)
IMPLS = (["torch"] + (["triton"] if triton_interpret() else [])
         + (["native"] if native_has("token_logprobs_fwd", "cpu") else []))
DTYPES = {"torch": [torch.float64, torch.float32, torch.bfloat16],
          "triton": [torch.float32, torch.bfloat16, torch.float16],
          "native": [torch.float32, torch.bfloat16, torch.float16]}
# (leading shape, V_local, temperature, ignore fraction)
CASES = [((5,), 1, 1.0, 0.0), ((4, 3), 7, 0.7, 0.25), ((6,), 301, 1.0, 0.3), ((2,), 4100, 1.3, 0.0)]


def _fwd_bwd(fn, x, y, glp, gent, **kw):
    x = x.detach().requires_grad_()
    lp, ent = fn(x, y, return_entropy=True, **kw)
    (g,) = torch.autograd.grad((lp * glp).sum() + (ent * gent).sum(), x)
    return lp, ent, g


def _check_case(impl, dtype, lead, V_local, temperature, ignore_frac, seed, rank, world, pad_last=False):
    g = torch.Generator().manual_seed(seed)  # the same full inputs on every rank
    V = V_local * world
    full = (torch.randn(lead + (V,), generator=g) * 4.0).to(dtype)
    if pad_last:  # the last shard is vocab padding (-inf), as a padded TP vocab has
        full[..., (world - 1) * V_local:] = float("-inf")
    hi = (world - 1) * V_local if pad_last else V
    y = torch.randint(0, hi, lead, generator=g)
    y[torch.rand(lead, generator=g) < ignore_frac] = -100
    if len(lead) == 2:
        y = y.to(torch.int32)  # int32 labels too
    glp, gent = torch.randn(lead, generator=g), torch.randn(lead, generator=g)
    shard = full[..., rank * V_local:(rank + 1) * V_local]
    kw = dict(temperature=temperature)
    out = _fwd_bwd(lambda a, b, **k: token_logprobs(a, b, impl=impl, process_group=dist.group.WORLD, **k),
                   shard, y, glp, gent, **kw)
    ref = _fwd_bwd(reference.token_logprobs, full.double(), y, glp.double(), gent.double(), **kw)
    tor = _fwd_bwd(reference.token_logprobs, full, y, glp.to(reference.compute_dtype(full)),
                   gent.to(reference.compute_dtype(full)), **kw)
    sl = (Ellipsis, slice(rank * V_local, (rank + 1) * V_local))
    name = f"{impl} {dtype} lead={lead} V_local={V_local} world={world} rank={rank}"
    assert out[0].dtype == reference.compute_dtype(full) if impl == "torch" else out[0].dtype == torch.float32
    assert out[2].dtype == dtype and out[2].shape == shard.shape
    for o, r, t, what in ((out[0], ref[0], tor[0], "logp"), (out[1], ref[1], tor[1], "entropy"),
                          (out[2], ref[2][sl], tor[2][sl], "grad")):
        if pad_last and what == "grad" and rank == world - 1:
            assert (o == 0).all(), name  # p = 0 on padding: exactly zero gradient
            continue
        # The merge rounds the global lse (magnitude ~max |z|, z = x / T) once more than one device does,
        # and the gradient and logp inherit that: the ulps slack is taken of max |z|, not of |output|.
        # float64: PyTorch IS the reference (error 0, no yardstick), so the slack is all there is.
        zmax = float(full.double().abs().nan_to_num(0.0, 0.0, 0.0).max()) / temperature
        assert_no_worse_than_torch(o, r, t, name=f"{name} {what}", scale=zmax,
                                   ulps=32.0 if dtype == torch.float64 else 8.0)
    ign = y == -100
    assert (out[0][ign] == 0).all() and (out[1][ign] == 0).all() and (out[2][ign] == 0).all(), name


def _logp_only_and_errors(impl, rank, world):
    V_local = 9
    g = torch.Generator().manual_seed(7)
    full = torch.randn(4, V_local * world, generator=g)
    y = torch.randint(0, V_local * world, (4,), generator=g)
    shard = full[:, rank * V_local:(rank + 1) * V_local].detach().requires_grad_()
    lp = token_logprobs(shard, y, impl=impl, process_group=dist.group.WORLD)
    assert not isinstance(lp, tuple)
    lp.sum().backward()
    x64 = full.double().requires_grad_()
    ref = reference.token_logprobs(x64, y)
    ref.sum().backward()
    assert torch.allclose(lp.double(), ref, rtol=0, atol=1e-5)
    assert torch.allclose(shard.grad.double(), x64.grad[:, rank * V_local:(rank + 1) * V_local], rtol=0, atol=1e-6)
    bad = y.clone()
    bad[1] = V_local * world  # one past the FULL vocab: caught on every rank before any collective
    with pytest.raises(ValueError, match=rf"outside \[0, {V_local * world}\)"):
        token_logprobs(shard, bad, impl=impl, process_group=dist.group.WORLD)


def _worker(rank, world, init_file, results):
    try:
        # a rank that fails stops calling collectives: the others give up after 120 s instead of 30 min
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        seed = 0
        for impl in IMPLS:
            for dtype in DTYPES[impl]:
                for lead, V_local, temperature, ignore_frac in CASES:
                    seed += 1
                    _check_case(impl, dtype, lead, V_local, temperature, ignore_frac, seed, rank, world)
            seed += 1
            _check_case(impl, torch.float32, (3, 2), 5, 1.0, 0.2, seed, rank, world, pad_last=True)
            _logp_only_and_errors(impl, rank, world)
        dist.barrier()
        results[rank] = "ok"
    except BaseException:  # noqa: BLE001 - report the traceback to the parent
        results[rank] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_full_vocab(world, tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), results), nprocs=world, join=True)
    bad = {r: results.get(r) for r in range(world) if results.get(r) != "ok"}
    assert not bad, "\n".join(f"rank {r}:\n{msg}" for r, msg in bad.items())


def test_process_group_without_init_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(ValueError, match="not initialized"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), process_group=object())
