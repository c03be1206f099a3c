"""The Triton path of ``linear_token_logprobs``: kernels, launch parameters, the two launchers as
torch.library custom ops, and the chunked backward around them. Private to ops/linear_token_logprobs.py
(the only op file that imports it: its own room, PARTS in tests/test_import_graph.py); imports no op.

Forward: one program owns BLOCK_N tokens x one contiguous range of vocab tiles (a "split").
For every BLOCK_V tile it computes the logits with ``tl.dot`` (fp32 accumulator, on chip) and folds them
into four running row statistics: max m, s = sum e^(x-m), u = sum (x-m) e^(x-m) and the target logit.
The splits give parallelism when N is small (one row block, 151936 vocab: 5+ programs per row block);
a tiny merge kernel combines the 4 * splits * N partial floats. u is kept relative to the max so the
entropy log(s) - u/s never subtracts two large numbers (lse - E[x] cancels when |x| ~ 1e3).
Batch invariance (default, docs/batch_invariance.md): the tile and the split boundaries depend on V,
the dtype, the config entry and the SM count, never on N, so a row's arithmetic is the same in any batch.

Backward: chunked. N <= V (an RL micro-batch below the vocab size): over vocab chunks; for each
chunk [v0, v1) a Triton kernel recomputes the logits tiles of all N rows and writes dlogits
dz [N, v1 - v0] in the input dtype; then cuBLAS does dW[v0:v1] = dz^T @ h (written once) and
dH += dz @ W[v0:v1]. N > V: over row chunks of C rows, dz [C, V], dH[chunk] = dz @ W, dW += dz^T @ h.
Each way one gradient accumulates across chunks, so the smaller one does (dH is N x H, dW is V x H).
Why not fully fused: FLOPs and bytes at N=8192, H=4096, V=151936, bf16 (H100: ~790 TFLOP/s, 3 TB/s):
  - chunked (this): 6*N*H*V = 3.06e16 FLOP (recompute + 2 matmuls) ~ 38.7 ms at peak; dz traffic
    3 * N*V*2 B = 7.5 GB (write once, read by both matmuls) ~ 2.5 ms, i.e. ~6% on top, and both
    matmuls run at cuBLAS speed.
  - fused with atomics: every (row block, vocab tile) program adds a [BLOCK_N, H] fp32 slab into dH
    and a [BLOCK_V, H] slab into dW: N*H*V/128*4 B * 2 ~ 320 GB of atomic traffic (> 100 ms).
  - fused in two passes (dH pass over V, dW pass over N): recomputes the logits twice,
    8*N*H*V = 4.08e16 FLOP, 33% more arithmetic than the chunked path.
The chunked path is exact (no gradient filtering): every dlogit enters both matmuls.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .._triton_compat import tl, triton
from . import configs
from ._common import EXP2_FLOOR, K_LN2, K_LOG2E, M_INIT
from .._utils import device_guard, empty, triton_interpret

# Tiles, warps, stages and L2 groups on the GPU: per arch in ops/configs.py (bench/sweep.py tunes them).
_BLOCK_N_SMALL = 64  # wgmma's minimum M; the "linear_fwd_small_n" entry serves N <= 64 (decode batches)
_BLOCK_N = 128  # the backward's dlogits chunks are rounded to multiples of this
# Under TRITON_INTERPRET=1 cost is per op, not per element; tl.dot needs every block dim >= 16.
# Small vocabs get 64-wide tiles (many tiles per split: the online merge is exercised); large ones
# 1024-wide (V=131101, N=3: 48 s -> 3 s for forward + backward on a 2-core box).
_INTERP_BLOCK_N, _INTERP_BLOCK_H = 16, 16
_INTERP_BLOCK_V, _INTERP_BLOCK_V_LARGE, _INTERP_LARGE_V = 64, 1024, 8192
# The interpreter uses >1 split on tiny inputs so the merge is always exercised by the tests.
_INTERP_TARGET_PROGRAMS = 4
# Split counts considered per launch: up to this many programs per SM slot (more splits = a larger
# [4, splits, N] workspace and merge, for nothing once the waves are balanced)
_MAX_WAVES = 32
_MERGE_BLOCK = 256
# Backward dlogits workspace on the GPU. N <= V (every RL micro-batch below the vocab size): vocab
# chunks [N, Vc] within 64 MiB, at most _MAX_VOCAB_CHUNKS of them; dH sums the chunks' products in
# fp32 (N x H x 4 B, see _mm_acc). Qwen2.5-7B, N=8192 bf16: 33 chunks of 4736 columns (74 MiB), so the
# full step holds dW 1,039 + dH (fp32) 112 + dz 74 = ~1,225 MiB by arithmetic (not yet measured on a
# GPU), where row chunks of 512 MiB peaked at 1,578 on the H200 (Liger: 1,245), and dW is written once
# instead of read + written per row chunk. N > V: row chunks of 512 MiB (dW summed in fp32 when several).
_TRITON_CHUNK_BYTES = 512 * 2**20
_TRITON_VOCAB_CHUNK_BYTES = 64 * 2**20
# more chunks = more, smaller matmuls (each still N x Vc x H: 8192 x 4736 x 3584 at the headline shape)
_MAX_VOCAB_CHUNKS = 32


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows64, row_ok, cols64, col_ok, H, stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 tile of hidden @ weight.T (+ bias), accumulated over H in BLOCK_H steps;
    shared by the forward and the backward's recompute (inlined by the compiler)."""
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if HAS_BIAS:
        # the bias seeds the accumulator: no extra [BLOCK_N, BLOCK_V] value is live after the K loop
        # (adding it afterwards spilled the 256 x 128 sm_90 tile: 120 B of stack)
        acc += tl.load(b_ptr + cols64, mask=col_ok, other=0.0)[None, :]
    for k in range(0, H, BLOCK_H):
        ks = k + offs_h
        k_ok = ks < H
        a = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols64[None, :] * stride_wv + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST_OPERANDS:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_logprobs_fwd_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr, labels_ptr, ws_ptr,
    # shapes
    N, V, H, n_row_blocks, tiles_per_split,
    # strides
    stride_hn, stride_wv,
    # scalars
    inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
):
    # 1-D grid (no 65535 limit on any axis), grouped like a matmul's L2 swizzle: programs come in groups
    # of GROUP_N row blocks x every split, row blocks fastest. The programs resident at one time then
    # cover GROUP_N row blocks (their hidden rows stay in L2: 8 x 128 x 3584 x 2 B = 7 MiB for Qwen)
    # and each weight tile is read from DRAM once per group and shared by its GROUP_N programs from L2.
    # (Row blocks fastest over all of N, as before, kept the whole hidden in flight: 58 MiB at N=8192,
    # H=3584, about the H100/H200 L2, so hidden rows were re-read from DRAM on every vocab tile.)
    pid = tl.program_id(0)
    n_splits = tl.num_programs(0) // n_row_blocks
    per_group = GROUP_N * n_splits
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_row_blocks - first_n, GROUP_N)
    pid_in = pid % per_group
    pid_n = first_n + pid_in % group_rows
    split = pid_in // group_rows

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    # int32 compare against int32 columns: an int64 [BLOCK_N, BLOCK_V] compare costs 2 registers per
    # element, and the 128 x 128 tile already sits at ~250 of the 255 registers (fp16 spilled before)
    label = tl.load(labels_ptr + rows64, mask=row_ok, other=-1).to(tl.int32)
    offs_v = tl.arange(0, BLOCK_V)
    # the online statistics run on the raw logits (hidden @ W.T + b): with c = log2(e) / T > 0,
    # max(z) = max(x) / T and e^(z - max z) = 2^((x - max x) c): one FMA and one exp2 per element
    c = inv_temp * K_LOG2E

    m = tl.full([BLOCK_N], M_INIT, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)   # sum 2^d d, d = (x - m) c: log2 units, relative to m
    xt = tl.zeros([BLOCK_N], tl.float32)  # raw target logit
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(tile_lo, tile_hi):
        cols = t * BLOCK_V + offs_v
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_ok, cols64, col_ok, H, stride_hn, stride_wv,
                           HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_OPERANDS)
        x = tl.where(col_ok[None, :], acc, float("-inf"))
        xt += tl.sum(tl.where(cols[None, :] == label[:, None], x, 0.0), axis=1)
        # every tile has >= 1 valid column, so m_new is finite after the first tile
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # <= 0; the first tile's M_INIT gives 2^(-huge) = 0 (s, u are 0 anyway). Clamped: for T < 0.3,
        # (M_INIT - x) / T overflows to -inf and dm * s = -inf * 0 was NaN (entropy and gradients NaN at
        # T = 0.1); below EXP2_FLOOR alpha is 0 either way
        dm = tl.maximum((m - m_new) * c, EXP2_FLOOR)
        # padded columns: d = -inf clamps to EXP2_FLOOR, 2^d = 0 exactly and d * 2^d = 0 (no NaN, no
        # select); a NaN logit stays NaN (propagate_nan) and poisons its row, as it must
        d = tl.maximum((x - m_new[:, None]) * c, EXP2_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        e = tl.exp2(d)
        alpha = tl.exp2(dm)
        # rebase the old sums to the new max: sum 2^(d + dm) (d + dm) = alpha (u + dm s)
        u = alpha * (u + dm * s) + tl.sum(d * e, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    # workspace [4, n_splits, N] fp32: (m, s, u, x_target) in the units of z = x / T and nats, so the
    # merge is unchanged: m / T, s, u ln(2) (= sum (z - m_z) e^(z - m_z)), x_t / T
    base = split.to(tl.int64) * N + rows64
    plane = n_splits.to(tl.int64) * N
    tl.store(ws_ptr + base, m * inv_temp, mask=row_ok)
    tl.store(ws_ptr + plane + base, s, mask=row_ok)
    tl.store(ws_ptr + 2 * plane + base, u * K_LN2, mask=row_ok)
    tl.store(ws_ptr + 3 * plane + base, xt * inv_temp, mask=row_ok)


@triton.jit
def _linear_logprobs_merge_kernel(
    # data ptrs
    ws_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr,
    # shapes
    N, V, n_splits,
    # scalars
    ignore_index,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    rows64 = rows.to(tl.int64)
    # tl.cast, not n_splits.to(): the JIT hands an int argument equal to 1 over as a Python int
    # (a constexpr), which has no .to(); n_splits is 1 for small V and for N >= 2 * SMs * BLOCK_N rows
    plane = tl.cast(n_splits, tl.int64) * N
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    u = tl.zeros([BLOCK], tl.float32)
    xt = tl.zeros([BLOCK], tl.float32)
    base = rows64  # int64 offsets: splits * N may exceed 2^31
    for _ in range(n_splits):
        mj = tl.load(ws_ptr + base, mask=ok, other=0.0)
        sj = tl.load(ws_ptr + plane + base, mask=ok, other=1.0)
        uj = tl.load(ws_ptr + 2 * plane + base, mask=ok, other=0.0)
        xt += tl.load(ws_ptr + 3 * plane + base, mask=ok, other=0.0)
        m_new = tl.maximum(m, mj)
        a = tl.exp(m - m_new)
        b = tl.exp(mj - m_new)
        # a split with no tile for these rows (trailing splits when tiles % splits != 0, and 3 of the
        # interpreter's 4 splits at V <= BLOCK_V) stored s = 0 and m = M_INIT / T, which is -inf for
        # T < 0.3: (mj - m_new) * sj was then -inf * 0 = NaN (NaN entropy and gradients at T = 0.1)
        u = a * (u + tl.where(s > 0, m - m_new, 0.0) * s) + tl.where(sj == 0, 0.0, b * (uj + (mj - m_new) * sj))
        s = a * s + b * sj
        m = m_new
        base += N
    log_s = tl.log(s)
    label = tl.load(labels_ptr + rows64, mask=ok, other=0).to(tl.int64)
    valid = label != ignore_index
    # a label outside [0, V) (unchecked on GPU) matched no column: poison its row (NaN logp, entropy,
    # and lse, which makes the backward's dlogits row NaN) instead of a finite logp = -lse
    log_s = tl.where(valid & ((label < 0) | (label >= V)), float("nan"), log_s)
    lse = m + log_s
    tl.store(logp_ptr + rows64, tl.where(valid, xt - lse, 0.0), mask=ok)
    tl.store(ent_ptr + rows64, tl.where(valid, log_s - u / s, 0.0), mask=ok)
    tl.store(lse_ptr + rows64, lse, mask=ok)


@triton.jit
def _linear_logprobs_bwd_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dz_ptr,
    # shapes
    N, V, H, n_row_blocks,
    # strides
    stride_hn, stride_wv, stride_dzn,
    # scalars
    inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
):
    # dlogits of one [BLOCK_N, BLOCK_V] tile:
    #   dx_j = g_logp (1[j == y] - p_j) - g_ent p_j (log p_j + H)        (dH/dx_j = -p_j (x_j - E[x]))
    #   dz_j = dx_j / T                                                   (x = z / T)
    # Row blocks vary fastest: the chunk's hidden rows stay in L2 while each weight tile is read from
    # DRAM once per chunk.
    pid = tl.program_id(0)
    pid_n = pid % n_row_blocks
    pid_v = pid // n_row_blocks
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_ok, cols64, col_ok, H, stride_hn, stride_wv,
                       HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_OPERANDS)

    label = tl.load(labels_ptr + rows64, mask=row_ok, other=0)
    valid = row_ok & (label != ignore_index)
    label = label.to(tl.int32)  # int32 tile compare below (valid labels are < V < 2^31)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows64, mask=row_ok, other=0.0)
    g_lp = tl.where(valid, tl.load(glogp_ptr + rows64, mask=row_ok, other=0.0), 0.0)
    g_en = tl.where(valid, tl.load(gent_ptr + rows64, mask=row_ok, other=0.0), 0.0)

    logp = acc * inv_temp - lse[:, None]
    p = tl.exp(logp)
    dx = -p * (g_lp[:, None] + g_en[:, None] * (logp + ent[:, None]))
    dx += tl.where(cols[None, :] == label[:, None], g_lp[:, None], 0.0)
    dz = tl.where(valid[:, None], dx * inv_temp, 0.0)
    tl.store(dz_ptr + rows64[:, None] * stride_dzn + cols64[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _tiles(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, kernel: str = "linear_fwd"):
    """Launch config (dict: BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N, num_warps, num_stages, ctas_per_sm)
    for this device / dtype: the per-arch table on a GPU, small tiles under the interpreter.

    The forward's tile is the same for every N while ``configs.batch_invariant()`` (the default): the
    row tile and warps set the layout of the [BLOCK_N, BLOCK_V] logits tile and so the order of the
    row sums over BLOCK_V, which a batch-invariant forward must not change with N. Only the backward
    (and the forward with FLOWRL_KERNELS_BATCH_INVARIANT=0) shrinks the row tile for few rows."""
    fixed = kernel == "linear_fwd" and configs.batch_invariant()
    if kernel == "linear_fwd" and n_rows <= _BLOCK_N_SMALL and not fixed and not configs.overridden(kernel):
        kernel = "linear_fwd_small_n"
    if triton_interpret() and not configs.overridden(kernel):
        block_v = _INTERP_BLOCK_V if vocab <= _INTERP_LARGE_V else _INTERP_BLOCK_V_LARGE
        return dict(BLOCK_N=_INTERP_BLOCK_N, BLOCK_V=block_v, BLOCK_H=_INTERP_BLOCK_H, GROUP_N=2, num_warps=1,
                    num_stages=1, ctas_per_sm=1)
    cfg = configs.config(kernel, device, dtype)
    if not configs.overridden(kernel) and not fixed:
        # few rows: a smaller row tile (down to wgmma's 64) instead of masked rows doing tensor-core work
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(_BLOCK_N_SMALL, triton.next_power_of_2(n_rows)))
    return cfg


def _cuda_matmul_tf32() -> bool:
    """torch's fp32 CUDA matmul setting. The new API (torch >= 2.9: ``fp32_precision`` "tf32" | "ieee" |
    "none" = inherit ``torch.backends.fp32_precision``) when present: the legacy ``allow_tf32`` read
    raises RuntimeError once a process has set the new one. The legacy flag on older torch."""
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", None)
    if prec is None:
        return bool(m.allow_tf32)
    if prec == "none":
        prec = getattr(torch.backends, "fp32_precision", "none")
    return prec == "tf32"


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting (exact fp32 by default, like the reference and
    # torch's own fp32 lm_head; torch.set_float32_matmul_precision("high") switches both to TF32)
    if dtype == torch.float32 and not triton_interpret() and _cuda_matmul_tf32():
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter keeps bf16 as raw uint16 and its tl.dot is a plain np.matmul of those bits
    # (garbage), so bf16 operands are widened first; bf16 -> fp32 is exact and a bf16 x bf16 product is
    # exact in fp32, so this matches the GPU's tensor-core math. Never set when compiling for a GPU.
    return triton_interpret() and dtype == torch.bfloat16


@functools.lru_cache(maxsize=4096)
def _balanced_splits(n_row_blocks: int, n_tiles: int, slots: int):
    """(splits, tiles_per_split) minimizing the forward's makespan in tiles per SM slot:
    ceil(row blocks * splits / slots) waves of ceil(tiles / splits) tiles each. At N=8192 (64 row
    blocks of 128) and V=152064 (1188 tiles of 128) on 132 SMs: 33 splits of 36 tiles, 16 full waves,
    the lower bound 64 * 1188 / 132 = 576 (the old "2 programs per SM" rule: 5 splits of 238 tiles,
    320 programs = 3 waves of which the last 42% full, 714 tiles per slot: 24% longer). Ties go to
    fewer splits (smaller workspace and merge)."""
    best = None
    for splits in range(1, min(n_tiles, max(1, _MAX_WAVES * slots // n_row_blocks)) + 1):
        per = -(-n_tiles // splits)
        splits_used = -(-n_tiles // per)  # no empty split
        cost = -(-(n_row_blocks * splits_used) // slots) * per
        if best is None or cost < best[0]:
            best = (cost, splits_used, per)
    return best[1], best[2]


def _invariant_splits(n_tiles: int, slots: int):
    """(splits, tiles_per_split) from the vocab tiles and the SM slots alone, not from N: the batch-
    invariant split. Every row's vocab is cut at the same tile boundaries and its partials merged in the
    same order whatever the batch, so a token's logp and entropy are bitwise the same at any N and any
    position. ceil(tiles / slots) tiles per split fill one wave with a single row block, and R row
    blocks take ceil(R * splits / slots) waves: at the headline (1188 tiles of 128, 132 SMs) 132 splits
    of 9 tiles, 576 tiles per slot at N=8192 as the N-tuned _balanced_splits gives (its 33 splits of 36
    tiles), and the same makespan at one row block. The price is the workspace: 4 * splits * N fp32
    (16 * 132 = 2.1 KB per token on an H200, 17 MiB at N=8192, where the N-tuned split held 4.3 MiB)
    and a merge that reads it once (not measured on a GPU yet)."""
    per = -(-n_tiles // max(1, slots))
    return -(-n_tiles // per), per  # no empty split


def _n_splits(n_row_blocks: int, n_tiles: int, device: torch.device, ctas_per_sm: int = 1):
    interp = triton_interpret() or device.type != "cuda"
    if configs.batch_invariant():
        slots = _INTERP_TARGET_PROGRAMS if interp else _sm_count(
            device.index if device.index is not None else torch.cuda.current_device()) * ctas_per_sm
        return _invariant_splits(n_tiles, slots)
    if interp:
        splits = max(1, min(n_tiles, triton.cdiv(_INTERP_TARGET_PROGRAMS, n_row_blocks)))
        tiles_per_split = triton.cdiv(n_tiles, splits)
        return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split  # no empty split
    slots = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * ctas_per_sm
    return _balanced_splits(n_row_blocks, n_tiles, slots)


def _fwd_launch(N: int, V: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Every launch parameter of the forward for N rows: the tile config, the split, the dot precision
    and the grid. ``_ARITHMETIC`` names those that change the arithmetic of a row (what a batch-
    invariant forward keeps independent of N: tests/test_batch_invariance.py checks it for many N)."""
    cfg = _tiles(N, V, dtype, device)
    n_row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    n_splits, tiles_per_split = _n_splits(n_row_blocks, triton.cdiv(V, cfg["BLOCK_V"]), device, cfg["ctas_per_sm"])
    return dict(cfg, n_row_blocks=n_row_blocks, n_splits=n_splits, tiles_per_split=tiles_per_split,
                DOT_PRECISION=_dot_precision(dtype), UPCAST_OPERANDS=_upcast(dtype),
                grid=n_row_blocks * n_splits, MERGE_BLOCK=_MERGE_BLOCK)


# Launch parameters that change a row's arithmetic: the logits tile's shape and warps (layout of the
# BLOCK_V row sums), the K step, where the vocab is cut into splits and how many partials the merge folds
# (in split order), and the dot's precision. GROUP_N, num_stages, the grid and the merge's BLOCK only
# change which program computes a row and when (each row's merge runs in one lane).
_ARITHMETIC = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps", "n_splits", "tiles_per_split", "DOT_PRECISION",
               "UPCAST_OPERANDS")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _triton_forward(h2, weight, bias, labels, inv_temp, ignore_index):
    """-> logp, ent, lse: float32 [N]. Workspace: 4 * splits * N float32."""
    N, H = h2.shape
    V = weight.shape[0]
    dev = h2.device
    logp = empty((N,), dtype=torch.float32, device=dev)
    ent = empty((N,), dtype=torch.float32, device=dev)
    lse = empty((N,), dtype=torch.float32, device=dev)
    if N == 0:
        return logp, ent, lse
    cfg = _fwd_launch(N, V, h2.dtype, dev)
    n_row_blocks, n_splits = cfg["n_row_blocks"], cfg["n_splits"]
    ws = empty((4, n_splits, N), dtype=torch.float32, device=dev)
    b = bias if bias is not None else h2  # dummy pointer, never read when HAS_BIAS=False
    with device_guard(h2):
        _linear_logprobs_fwd_kernel[(cfg["grid"],)](
            h2, weight, b, labels, ws,
            N, V, H, n_row_blocks, cfg["tiles_per_split"],
            h2.stride(0), weight.stride(0),
            inv_temp,
            HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
            GROUP_N=cfg["GROUP_N"], DOT_PRECISION=cfg["DOT_PRECISION"], UPCAST_OPERANDS=cfg["UPCAST_OPERANDS"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        _linear_logprobs_merge_kernel[(triton.cdiv(N, cfg["MERGE_BLOCK"]),)](
            ws, labels, logp, ent, lse, N, V, n_splits, ignore_index, BLOCK=cfg["MERGE_BLOCK"],
        )
    return logp, ent, lse


def _triton_dlogits(h, weight, bias, labels, lse, ent, g_logp, g_ent, inv_temp, ignore_index, dz):
    """dz[:n] <- dlogits of rows h[:n] (dz: [>= n, V] in the input dtype)."""
    n, H = h.shape
    V = weight.shape[0]
    cfg = _tiles(n, V, h.dtype, h.device, "linear_bwd")
    block_n, block_v, block_h, warps, stages = (cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps",
                                                                 "num_stages"))
    n_row_blocks = triton.cdiv(n, block_n)
    b = bias if bias is not None else h
    with device_guard(h):
        _linear_logprobs_bwd_kernel[(n_row_blocks * triton.cdiv(V, block_v),)](
            h, weight, b, labels, lse, ent, g_logp, g_ent, dz,
            n, V, H, n_row_blocks,
            h.stride(0), weight.stride(0), dz.stride(0),
            inv_temp, ignore_index,
            HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
            DOT_PRECISION=_dot_precision(h.dtype), UPCAST_OPERANDS=_upcast(h.dtype),
            num_warps=warps, num_stages=stages,
        )


# The two Triton launchers as torch.library ops: opaque to torch.compile (Dynamo cannot trace a Triton
# launch under the CPU interpreter, and Inductor then sees one op instead of a kernel it would re-wrap),
# with fake kernels for tracing. The autograd around them (chunk loop, cuBLAS matmuls) stays traceable.
@torch.library.custom_op("flowrl_kernels::linear_token_logprobs_fwd", mutates_args=())
def _triton_forward_op(h2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                       inv_temp: float, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_forward(h2, weight, bias, labels, inv_temp, ignore_index)


@_triton_forward_op.register_fake
def _triton_forward_fake(h2, weight, bias, labels, inv_temp, ignore_index):
    return tuple(h2.new_empty((h2.shape[0],), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("flowrl_kernels::linear_token_logprobs_dlogits", mutates_args=())
def _triton_dlogits_op(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                       lse: torch.Tensor, ent: torch.Tensor, g_logp: torch.Tensor, g_ent: torch.Tensor,
                       inv_temp: float, ignore_index: int) -> torch.Tensor:
    """dlogits [n, V] of rows h [n, H] in h's dtype (NaN-poisoned before the kernel in tests)."""
    dz = empty((h.shape[0], weight.shape[0]), dtype=h.dtype, device=h.device)
    _triton_dlogits(h, weight, bias, labels, lse, ent, g_logp, g_ent, inv_temp, ignore_index, dz)
    return dz


@_triton_dlogits_op.register_fake
def _triton_dlogits_fake(h, weight, bias, labels, lse, ent, g_logp, g_ent, inv_temp, ignore_index):
    return h.new_empty((h.shape[0], weight.shape[0]))



# ----------------------------------------------------------------------------------------------------
# backward: dlogits chunks from the Triton kernel, the matmuls in cuBLAS
# ----------------------------------------------------------------------------------------------------
def _triton_chunk_rows(N: int, V: int, itemsize: int) -> int:
    """Default rows per chunk of the backward: the dlogits workspace (chunk rows x V elements) within
    _TRITON_VOCAB_CHUNK_BYTES when N <= V (spread over all N rows as vocab chunks, see _vocab_chunk),
    _TRITON_CHUNK_BYTES when N > V (row chunks); a multiple of _BLOCK_N, at least one."""
    budget = _TRITON_VOCAB_CHUNK_BYTES if N <= V else _TRITON_CHUNK_BYTES
    rows = budget // (V * itemsize)
    return max(_BLOCK_N, rows // _BLOCK_N * _BLOCK_N)


def _vocab_chunk(N: int, V: int, chunk_rows: int) -> int:
    """Columns per vocab chunk: the workspace's chunk_rows * V elements spread over all N rows, at least
    V / _MAX_VOCAB_CHUNKS, a multiple of 128 (whole tiles) when that large."""
    vc = max(chunk_rows * V // max(N, 1), -(-V // _MAX_VOCAB_CHUNKS), 1)
    return min(V, vc // 128 * 128 if vc >= 128 else vc)


def _mm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with the running sum kept in acc's dtype. acc fp32 and a, b 16-bit: on CUDA one cuBLAS
    call that accumulates in fp32 and writes fp32 (aten::addmm.dtype_out, torch >= 2.8), never rounding
    a chunk's product to 16 bits; elsewhere (the CPU interpreter, older torch) the operands are upcast.
    Summing per-chunk products rounded to bf16 drifts: 24 vocab chunks gave up to 24 roundings of dH,
    and TRL reports that such per-chunk rounding biases training (entropy drifts lower)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and hasattr(torch.ops.aten.addmm, "dtype_out"):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _triton_backward_vocab_chunks(hidden, weight, bias, labels, lse, ent, g_logp, g_ent, inv_temp,
                                  ignore_index, vc, dH, dW, db):
    """Backward over vocab chunks [v0, v1) of all N rows (N <= V): dz = dlogits[:, v0:v1] in the input
    dtype, then dW[v0:v1] = dz^T @ hidden (written once, fp32 accumulation over all N inside cuBLAS),
    dH += dz @ W[v0:v1] (dH is fp32 when there are several chunks of 16-bit data: see _mm_acc),
    db[v0:v1] = column sums of dz. The kernel sees the chunk as a vocab of vc columns with its own
    labels: ignored rows -> -1 (the kernel's ignore_index here), a label inside the chunk -> label - v0,
    a label outside it -> -2, which matches no column and keeps the row's softmax term. (Shifting alone
    could map a valid label onto the caller's ignore_index, e.g. 3.) One chunk's dz is alive at a time."""
    V = weight.shape[0]
    ignored = labels == ignore_index
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        w_c = weight[v0:v1]
        inside = (labels >= v0) & (labels < v1)
        lab_c = torch.where(ignored, -1, torch.where(inside, labels - v0, -2))
        dz = _triton_dlogits_op(hidden, w_c, None if bias is None else bias[v0:v1], lab_c, lse, ent, g_logp,
                                g_ent, inv_temp, -1)
        if dH is not None:
            if v0 == 0 and dH.dtype == dz.dtype:
                torch.mm(dz, w_c, out=dH)
            else:
                _mm_acc(dH, dz, w_c)
        if dW is not None:
            torch.mm(dz.t(), hidden, out=dW[v0:v1])
        if db is not None:
            db[v0:v1] = dz.sum(0, dtype=db.dtype)
        del dz



def _triton_backward(hidden, weight, bias, labels, lse, ent, g_logp, g_ent, inv_temp, ignore_index, chunk,
                     needs):
    """(dH, dW, db) of the Triton path, None where ``needs`` (hidden, weight, bias) is False.

    hidden [N, H], weight [V, H] and the forward's lse, ent [N]; bias is the fp32 contiguous copy the
    forward read. 0 < N <= V: vocab chunks of _vocab_chunk(N, V, chunk) columns; else row chunks of
    ``chunk`` rows. dz is in the input dtype and feeds cuBLAS directly (fp32 accumulation inside each
    matmul); one chunk's dz is alive at a time (freed at the end of each iteration, then reused by the
    caching allocator). db is summed in fp32."""
    need_h, need_w, need_b = needs
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    g_logp = g_logp.to(torch.float32).contiguous()
    g_ent = g_ent.to(torch.float32).contiguous()
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None

    vc = _vocab_chunk(N, V, chunk) if 0 < N <= V else 0
    if vc:
        dH = None
        if need_h:
            # several vocab chunks of 16-bit data sum their dH products in an fp32 buffer (N * H * 4 bytes)
            lowp_sum = vc < V and hidden.dtype in (torch.float16, torch.bfloat16)
            dH = (torch.zeros((N, H), dtype=torch.float32, device=dev) if lowp_sum
                  else torch.empty((N, H), dtype=hidden.dtype, device=dev))
        # each vocab chunk writes its dW row range once (no zero fill)
        dW = torch.empty((V, H), dtype=hidden.dtype, device=dev) if need_w else None
        _triton_backward_vocab_chunks(hidden, weight, bias, labels, lse, ent, g_logp, g_ent, inv_temp,
                                      ignore_index, vc, dH, dW, db)
        if dH is not None and dH.dtype != hidden.dtype:
            dH = dH.to(hidden.dtype)
        return dH, dW, (db.to(bias.dtype) if db is not None else None)

    # Row chunks: dW accumulates across chunks in fp32 (for 16-bit operands an fp32 buffer of V * H * 4
    # bytes whenever there is more than one chunk, see _mm_acc), or is written by one matmul in the weight
    # dtype when one chunk covers all rows, as in torch's own lm_head backward.
    dH = torch.empty((N, H), dtype=hidden.dtype, device=dev) if need_h else None
    dW = None
    if need_w:
        dW = torch.zeros((V, H), dtype=hidden.dtype if N <= chunk else torch.promote_types(hidden.dtype,
                         torch.float32), device=dev)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        h_c = hidden[r0:r1]
        # dz [r1 - r0, V] in hidden's dtype (the custom op's and its fake's output dtype)
        dz = _triton_dlogits_op(h_c, weight, bias, labels[r0:r1], lse[r0:r1], ent[r0:r1], g_logp[r0:r1],
                                g_ent[r0:r1], inv_temp, ignore_index)
        if dH is not None:
            torch.mm(dz, weight, out=dH[r0:r1])
        if dW is not None:
            _mm_acc(dW, dz.t(), h_c)
        if db is not None:
            db += dz.sum(0, dtype=db.dtype)
        del dz
    if dW is not None and dW.dtype != weight.dtype:
        dW = dW.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return dH, dW, db
