"""The launch-side choices of the performance work (issue 18), checked on the CPU: the per-arch table
lookup, the fused lm_head forward's split count (wave balance), its tile shrink for few rows, the torch
path's CUDA chunk size, and the forward kernel under a non-default config (L2 groups that do not divide
the row blocks) against the float64 reference."""
import pytest
import torch

from flowrl_kernels import reference
from flowrl_kernels.ops import configs
from flowrl_kernels.ops import _linear_triton as LT  # linear_token_logprobs's Triton path
from flowrl_kernels.ops import linear_token_logprobs as L
from helpers import assert_no_worse_than_torch


@pytest.mark.parametrize("cc, key", [(75, "sm80"), (80, "sm80"), (86, "sm80"), (89, "sm80"), (90, "sm90"),
                                     (100, "sm90"), (120, "sm90")])
def test_arch_key(cc, key):
    assert configs.arch_key(cc) == key


def test_config_is_a_copy_and_override_restores():
    cpu = torch.device("cpu")
    cfg = configs.config("linear_fwd", cpu, torch.bfloat16)
    assert cfg == configs.TABLE["sm90"]["linear_fwd"]["16bit"]
    cfg["BLOCK_N"] = -1  # a caller's edit never reaches the table
    assert configs.config("linear_fwd", cpu, torch.bfloat16)["BLOCK_N"] > 0
    assert configs.config("linear_fwd", cpu, torch.float32) == configs.TABLE["sm90"]["linear_fwd"]["fp32"]
    mine = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, GROUP_N=3, num_warps=1, num_stages=1, ctas_per_sm=1)
    with configs.override("linear_fwd", mine):
        assert configs.overridden("linear_fwd") and configs.config("linear_fwd", cpu) == mine
    assert not configs.overridden("linear_fwd")


def test_every_table_has_every_kernel():
    for arch, kernels in configs.TABLE.items():
        assert set(kernels) == {"linear_fwd", "linear_fwd_small_n", "linear_bwd", "token_logprobs"}, arch
        for name in ("linear_fwd", "linear_fwd_small_n", "linear_bwd"):
            assert set(kernels[name]) == {"16bit", "fp32"}, (arch, name)
        for per in kernels.values():
            for cfg in per.values():
                for k, v in cfg.items():
                    if k.startswith("BLOCK"):
                        assert v >= 16 and v & (v - 1) == 0, (arch, k, v)  # tl.dot / arange need powers of 2


def _makespan(rows, tiles, slots, splits, per):
    return -(-(rows * splits) // slots) * per


@pytest.mark.parametrize("rows, tiles, slots", [(64, 594, 132), (32, 1188, 132), (1, 1188, 132), (2, 7, 132),
                                                (33, 385, 108), (128, 1002, 132), (3, 1, 4)])
def test_balanced_splits_optimal(rows, tiles, slots):
    splits, per = LT._balanced_splits(rows, tiles, slots)
    assert splits * per >= tiles and (splits - 1) * per < tiles  # covers every tile, no empty split
    best = min(_makespan(rows, tiles, slots, -(-tiles // -(-tiles // s)), -(-tiles // s))
               for s in range(1, min(tiles, max(1, LT._MAX_WAVES * slots // rows)) + 1))
    assert _makespan(rows, tiles, slots, splits, per) == best


def test_balanced_splits_headline():
    # Qwen2.5-7B, N=8192 on an H200 (132 SMs), 128 x 128 tiles: 64 row blocks x 33 splits of 36 tiles =
    # 2112 programs = 16 full waves, the lower bound 64 * 1188 / 132 = 576 tiles per slot
    splits, per = LT._balanced_splits(64, 1188, 132)
    assert (splits, per) == (33, 36)
    assert _makespan(64, 1188, 132, splits, per) * 132 == 64 * 1188


def test_tiles_shrink_for_few_rows(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU branch of _tiles (reads the sm90 entry)
    cpu = torch.device("cpu")
    big = configs.TABLE["sm90"]["linear_fwd"]["16bit"]
    # batch-invariant (default): the forward's tile never follows N; the backward's still shrinks
    assert all(LT._tiles(n, 152064, torch.bfloat16, cpu) == big for n in (1, 40, 100, 8192))
    assert LT._tiles(40, 152064, torch.bfloat16, cpu, "linear_bwd")["BLOCK_N"] == 64
    monkeypatch.setattr(configs, "_BATCH_INVARIANT", False)  # the N-tuned launch
    assert LT._tiles(8192, 152064, torch.bfloat16, cpu) == big
    assert LT._tiles(100, 152064, torch.bfloat16, cpu)["BLOCK_N"] == min(big["BLOCK_N"], 128)
    assert LT._tiles(40, 152064, torch.bfloat16, cpu) == configs.TABLE["sm90"]["linear_fwd_small_n"]["16bit"]
    assert LT._tiles(40, 152064, torch.bfloat16, cpu, "linear_bwd")["BLOCK_N"] == 64


def test_torch_chunk_rows(monkeypatch):
    V = 152064
    assert L._torch_chunk_rows(V, torch.device("cpu")) == L._TORCH_CHUNK_BYTES // (4 * V)
    for free, expect_bytes in [(80 * 2**30, 2**30), (4 * 2**30, 2**28), (2**28, L._TORCH_CHUNK_BYTES)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f, 141 * 2**30))
        assert L._torch_chunk_rows(V, torch.device("cuda", 0)) == expect_bytes // (4 * V)


@pytest.mark.parametrize("block_n, group_n, block_v", [(16, 3, 32), (32, 1, 64), (16, 8, 16)])
def test_forward_under_other_configs(block_n, group_n, block_v, device):
    # the interpreter runs the kernel with the given tiles: 5 row blocks of 16 in groups of 3 leave a
    # partial last group; V = 300 leaves a partial last vocab tile
    if torch.device(device).type != "cpu":
        pytest.skip("the override test runs the interpreter's tiles")
    N, H, V = 77, 32, 300
    g = torch.Generator().manual_seed(block_n * 100 + group_n)
    hidden = torch.randn(N, H, generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, generator=g) / 2).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    cfg = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=16, GROUP_N=group_n, num_warps=1, num_stages=1,
               ctas_per_sm=1)
    with configs.override("linear_fwd", cfg):
        logp, ent = L.linear_token_logprobs(hidden, weight, labels, temperature=0.8, return_entropy=True,
                                            impl="triton")
    ref64 = reference.linear_token_logprobs(hidden.double(), weight.double(), labels, temperature=0.8,
                                            return_entropy=True)
    base = reference.linear_token_logprobs(hidden, weight, labels, temperature=0.8, return_entropy=True)
    for name, o, r, b in zip(("logp", "entropy"), (logp, ent), ref64, base):
        assert_no_worse_than_torch(o, r, b, name=name)


def test_candidates_are_valid():
    # every candidate bench/sweep.py may write back has exactly the keys its launcher reads
    for kernel, per in configs.CANDIDATES.items():
        for dkey, cands in per.items():
            assert cands, (kernel, dkey)
            for cfg in cands:
                assert set(cfg) == set(configs.TABLE["sm90"][kernel][dkey]), (kernel, cfg)


@pytest.mark.parametrize("ignore_index", [-100, -1, 3, 40])
def test_vocab_chunked_backward_labels(ignore_index, device):
    # N <= V: the Triton backward runs over vocab chunks (chunk_size=4 rows of workspace: chunks of
    # 4 * 97 // 23 = 16 columns, 7 chunks). Labels sit on chunk edges (0, 15, 16, 96) and at
    # ignore_index + v0 of a later chunk, which a plain shift would have mapped onto ignore_index.
    N, H, V = 23, 16, 97
    g = torch.Generator().manual_seed(7 + ignore_index)
    hidden = torch.randn(N, H, generator=g).to(device, torch.bfloat16)
    weight = (torch.randn(V, H, generator=g) / 2).to(device, torch.bfloat16)
    bias = torch.randn(V, generator=g).to(device, torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:6] = torch.tensor([0, 15, 16, 96, 32 + 3, 48 + 3])
    if 0 <= ignore_index < V:
        labels[labels == ignore_index] = 5
    labels[6:9] = ignore_index
    labels = labels.to(device)
    assert LT._vocab_chunk(N, V, 4) == 16
    g_logp, g_ent = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)

    def grads(fn, cast=None, **kw):
        leaves = [t.detach().clone() for t in (hidden, weight, bias)]
        if cast is not None:
            leaves = [t.to(cast) for t in leaves]
        for t in leaves:
            t.requires_grad_(True)
        logp, ent = fn(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True,
                       ignore_index=ignore_index, **kw)
        (logp * g_logp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
        return [t.grad for t in leaves]

    out = grads(L.linear_token_logprobs, impl="triton", chunk_size=4)
    ref64 = grads(reference.linear_token_logprobs, cast=torch.float64)
    base = grads(reference.linear_token_logprobs)
    for name, o, r, b in zip(("d_hidden", "d_weight", "d_bias"), out, ref64, base):
        assert_no_worse_than_torch(o, r, b, name=name)
    assert (out[0][6:9] == 0).all()  # ignored rows: no gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vocab_chunks_sum_dhidden_once(dtype, device):
    # dH over 32 vocab chunks must equal dH from a single chunk up to the one final rounding (<= 1 ulp
    # of the 16-bit dtype per element): the chunks' products are summed in fp32. Summing them in the
    # 16-bit dtype (one rounding per chunk, as before) differs by several ulps.
    N, H, V = 32, 48, 2048
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) / 4).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    g_logp = torch.randn(N, generator=g).to(device)
    assert LT._vocab_chunk(N, V, 1) == V // 32 and LT._vocab_chunk(N, V, N) == V

    def d_hidden(chunk_size):
        h = hidden.detach().clone().requires_grad_(True)
        logp = L.linear_token_logprobs(h, weight, labels, impl="triton", chunk_size=chunk_size)
        (logp * g_logp).sum().backward()
        return h.grad

    many, one = d_hidden(1), d_hidden(N)
    assert many.dtype == one.dtype == dtype and torch.isfinite(many).all()
    ulp = torch.finfo(dtype).eps * one.abs().float().clamp(min=torch.finfo(dtype).tiny)
    excess = ((many.float() - one.float()).abs() - ulp).max().item()
    assert excess <= 0, f"dH over 32 chunks differs from one chunk by more than 1 ulp (excess {excess:.3e})"
