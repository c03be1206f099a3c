"""Fused token log-probs (+ entropy) from logits: one streaming read forward, one read + one write backward.

    logp[...]    = log softmax(logits / T)[..., label]
    entropy[...] = H(softmax(logits / T)) = lse - sum_j p_j z_j      (z = logits / T)

Forward (one program per row, one pass over V): an online (max m, sum 2^d, sum 2^d d) with
d = (z - m) log2(e), plus one scalar load of the target logit. It saves lse (and entropy) as fp32 [N] for the
backward: 4-8 bytes per row instead of a [N, V] softmax.
Backward (one program per row, one pass): with p = exp(z - lse),
    dlogp/dz_j = [j == label] - p_j,         dH/dz_j = -p_j (log p_j + H),
    dL/dlogits_j = (g_logp (dlogp/dz_j) + g_H (dH/dz_j)) / T,
read once, written once in the logits' dtype (fp32 math).

Spec: flowrl_kernels.reference.token_logprobs. The native (C++) impl implements the same
fwd/bwd ops (torch.ops.flowrl_kernels_native.token_logprobs_fwd/bwd); the autograd glue is shared.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch

from .._triton_compat import tl, triton
from .. import reference
from . import configs
from ._common import EXP2_FLOOR, K_LN2, K_LOG2E, LN2, LOG2E, M_INIT  # noqa: F401 (re-exported)
from .._utils import (
    INDEX_DTYPES,
    check_int,
    check_labels_in_range,
    check_same_device,
    check_temperature,
    check_tensor,
    check_vocab_contiguous,
    device_guard,
    empty,
    resolve_impl,
)
from .vocab_parallel import group_layout, vocab_parallel_token_logprobs

__all__ = ["token_logprobs"]

# ----------------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------------
# LOG2E, LN2, K_LOG2E, K_LN2, M_INIT, EXP2_FLOOR: ops/_common.py (shared with linear_token_logprobs)
# CUDA grid.x limit; more rows are launched in chunks (row0 offset), so N up to 2^63 rows works.
MAX_GRID = 2**31 - 1
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(V: int, device: Optional[torch.device] = None) -> Tuple[int, int]:
    """(BLOCK_V, num_warps): a fixed, deterministic heuristic (no autotune) over the per-arch entry of
    ops/configs.py (elements per thread, warps per row; ``device`` None: the sm90 entry).

    8 elements per thread per iteration (one 16-byte load for bf16/fp16, two for fp32) and 8 warps per
    row: BLOCK_V = 2048, 75 iterations at V = 151936. Measured with tests/test_codegen.py on sm_90: the
    forward with entropy needs 48 registers/thread at 8 elements (5 CTAs of 256 threads per SM) but 104
    at 16 bf16 elements (2 CTAs/SM): its two per-lane accumulators scale with the elements per thread.
    The forward loop is pipelined (num_stages=3: 2 blocks in flight per CTA); the backward (30-40
    registers, 6-8 CTAs/SM) needs no pipelining. Small V shrinks the block to next_pow2(V) and the warps
    with it (V = 7 -> 8 elements, 1 warp) so no lanes idle.
    """
    if configs.overridden("token_logprobs"):
        cfg = configs.config("token_logprobs", torch.device("cpu"))
        return _block_and_warps(V, cfg["per_thread"], cfg["num_warps"])
    arch = configs.arch_of(device) if device is not None and device.type == "cuda" else "sm90"
    return _config_cached(V, arch)


@functools.lru_cache(maxsize=1024)
def _config_cached(V: int, arch: str) -> Tuple[int, int]:
    cfg = configs.TABLE[arch]["token_logprobs"]["any"]
    return _block_and_warps(V, cfg["per_thread"], cfg["num_warps"])


def _block_and_warps(V: int, per_thread: int, max_warps: int) -> Tuple[int, int]:
    block = min(triton.next_power_of_2(V), per_thread * 32 * max_warps)
    return block, max(1, min(max_warps, block // (per_thread * 32)))


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _row_offsets(row, T1, stride_b, stride_t):
    # logits / labels are [B, T1, ...] views with arbitrary leading strides: row -> (b, t) in int64
    row = row.to(tl.int64)
    b = row // T1
    t = row - b * T1
    return b * stride_b + t * stride_t


@triton.jit
def _online_update(x, inv_temp, m, s_acc, u_acc, RETURN_ENTROPY: tl.constexpr):
    # x: a block of logits (fp32, -inf on masked lanes), z = x / T. State relative to the running max m:
    #   s_acc = sum 2^d,  u_acc = sum 2^d d,   d = (z - m) log2(e)   (per lane; reduced once at the end)
    # One block-wide max per iteration, one exp2 per element. z - m is taken before the log2(e) scaling
    # so the exponent's rounding error is relative to |z - m|, not |z| (as in torch's softmax), and u
    # relative to m makes the entropy a sum of two non-negative terms (log2 S - U/S): no cancellation
    # when lse >> H.
    z = x * inv_temp
    m_new = tl.maximum(m, tl.max(z, 0))
    dm = tl.maximum((m - m_new) * K_LOG2E, EXP2_FLOOR)
    alpha = tl.exp2(dm)
    # NaN must survive this clamp (max.NaN.f32): a NaN logit gives a NaN row, never a finite one
    d = tl.maximum((z - m_new) * K_LOG2E, EXP2_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(d)
    if RETURN_ENTROPY:
        # rebase the old sum to the new max: sum 2^(d + dm) (d + dm) = alpha (U + dm S)
        u_acc = alpha * (u_acc + s_acc * dm) + e * d
    s_acc = s_acc * alpha + e
    return m_new, s_acc, u_acc


# T1 (rows per batch entry) is N for an [N, V] input and 1 for a single row. On a GPU the JIT would
# hand T1 = 1 in as a constexpr: b = row // 1, t = 0 fold to a constant row offset, the compiler then
# proves the row 16-byte aligned and vectorizes the loads, which changes which lane holds which logit
# and so the order of the lane sums. The H200 lane (2026-12-04) saw it: entropy 1 ulp apart between a
# row alone and the same row in a batch, bf16 and fp32, V = 50257. Neither specialization on T1.
_ROWS_GENERIC = dict(do_not_specialize=["T1"], do_not_specialize_on_alignment=["T1"])
# No FMA contraction (Triton's default fuses a*b+c on a GPU; the CPU interpreter never does). The
# backward's (x * inv_temp - lse) must round x * inv_temp exactly as the forward's z = x * inv_temp did:
# fused, the product stays exact, and at T = 1e-4 (z ~ 1e4, ulp 1e-3) the max logit's p moved by ~5e-4,
# times 1/T in the gradient. The H200 lane (2026-12-04) measured grad errors of 19 (x ~ N(0, 1)) and 2382
# (x ~ 300 N(0, 1)) against bounds of 0.06 / 0.03 (tests/test_input_contract.py's temperature-range test).
_LAUNCH_NUMERICS = dict(enable_fp_fusion=False)


@triton.jit(**_ROWS_GENERIC)
def _token_logprobs_fwd_kernel(
    # data ptrs
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, ent_ptr,
    # shapes
    T1, V, label_end, row0,
    # strides
    stride_xb, stride_xt, stride_lb, stride_lt,
    # scalars
    inv_temp, ignore_index,
    BLOCK_V: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) + row0
    x_row = logits_ptr + _row_offsets(row, T1, stride_xb, stride_xt)
    label = tl.load(labels_ptr + _row_offsets(row, T1, stride_lb, stride_lt)).to(tl.int64)
    valid = label != ignore_index
    # ignored rows read nothing: their outputs are 0 and the backward writes 0 without reading lse
    v_lim = tl.where(valid, V, 0)
    v_full = (v_lim // BLOCK_V) * BLOCK_V
    cols = tl.arange(0, BLOCK_V)

    m = tl.full([], M_INIT, tl.float32)
    s_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    u_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    # Full blocks without a mask (16-byte vector loads when the row stride allows), then one masked tail.
    # One block per iteration per CTA is too few loads in flight for HBM (Little's law at ~3 TB/s and
    # ~0.6 us: ~15 KB per SM): num_stages=3 lets Triton prefetch 2 blocks ahead with cp.async (2 x 4 KB
    # bf16 per CTA). The backward (30-40 registers, 6-8 CTAs/SM, stores do not wait) needs no pipelining.
    for start in tl.range(0, v_full, BLOCK_V, num_stages=3):
        x = tl.load(x_row + start + cols).to(tl.float32)
        m, s_acc, u_acc = _online_update(x, inv_temp, m, s_acc, u_acc, RETURN_ENTROPY)
    offs = v_full + cols
    x = tl.load(x_row + offs, mask=offs < v_lim, other=-float("inf")).to(tl.float32)
    m, s_acc, u_acc = _online_update(x, inv_temp, m, s_acc, u_acc, RETURN_ENTROPY)

    s = tl.sum(s_acc, 0)
    s = tl.where(valid, s, 1.0)  # ignored rows read nothing (s = 0): keep their math finite
    log2_s = tl.log2(s)
    lse = m + log2_s * K_LN2
    # A label outside [0, label_end) (possible when unchecked on GPU; label_end = V, or V + 1 under vocab
    # parallelism where V means "target in another shard") reads nothing and poisons its row: NaN logp,
    # entropy and lse (so the backward writes a NaN gradient row), never a finite number.
    in_range = (label >= 0) & (label < V)
    bad = valid & ((label < 0) | (label >= label_end))
    lse = tl.where(bad, float("nan"), lse)
    x_t = tl.load(x_row + label, mask=valid & in_range, other=float("nan")).to(tl.float32)
    logp = x_t * inv_temp - lse
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if RETURN_ENTROPY:
        ent = (log2_s - tl.sum(u_acc, 0) / s) * K_LN2
        tl.store(ent_ptr + row, tl.where(valid, tl.where(bad, float("nan"), ent), 0.0))


@triton.jit
def _grad_block(x, inv_temp, lse, a, b, cols_eq_label, g_t):
    # p * (A d + B) + [j == label] g_logp / T, with d = log2 p (see module docstring); z - lse before
    # the log2(e) scaling, as in the forward
    d = tl.maximum((x * inv_temp - lse) * K_LOG2E, EXP2_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    p = tl.exp2(d)
    return p * (d * a + b) + tl.where(cols_eq_label, g_t, 0.0)


@triton.jit(**_ROWS_GENERIC)
def _token_logprobs_bwd_kernel(
    # data ptrs
    logits_ptr, labels_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, grad_ptr,
    # shapes
    T1, V, row0,
    # strides
    stride_xb, stride_xt, stride_lb, stride_lt, stride_g,
    # scalars
    inv_temp, ignore_index,
    BLOCK_V: tl.constexpr, HAS_GENT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) + row0
    x_row = logits_ptr + _row_offsets(row, T1, stride_xb, stride_xt)
    g_row = grad_ptr + row * stride_g
    label = tl.load(labels_ptr + _row_offsets(row, T1, stride_lb, stride_lt)).to(tl.int64)
    valid = label != ignore_index
    g_lp = tl.where(valid, tl.load(glogp_ptr + row), 0.0)
    lse = tl.load(lse_ptr + row)
    # grad_j = p_j (d_j A + B) + [j == label] g_logp / T,  d_j = log2 p_j:
    #   A = -g_H ln2 / T,  B = -(g_logp + g_H H) / T
    b = -g_lp * inv_temp
    a = 0.0
    if HAS_GENT:
        g_h = tl.where(valid, tl.load(gent_ptr + row), 0.0)
        ent = tl.load(ent_ptr + row)
        a = -g_h * K_LN2 * inv_temp
        b = -(g_lp + g_h * ent) * inv_temp
    g_t = g_lp * inv_temp
    v_full = (V // BLOCK_V) * BLOCK_V
    cols = tl.arange(0, BLOCK_V)
    # fp32 -> bf16/fp16 store: round-to-nearest on GPU (cvt.rn); the triton 3.9 CPU interpreter
    # truncates fp32 -> bf16 instead, so interpreter bf16 gradients carry up to 1 ulp, not 1/2
    dt = grad_ptr.dtype.element_ty
    # ignored rows load nothing and store exact zeros. The row-uniform mask is built as a splat compare:
    # it keeps 16-byte loads on GPU, and the interpreter (triton 3.9) rejects a broadcast scalar mask.
    row_mask = tl.zeros([BLOCK_V], tl.int32) < tl.where(valid, 1, 0)
    for start in range(0, v_full, BLOCK_V):
        offs = start + cols
        x = tl.load(x_row + offs, mask=row_mask, other=0.0).to(tl.float32)
        g = _grad_block(x, inv_temp, lse, a, b, offs == label, g_t)
        tl.store(g_row + offs, tl.where(valid, g, 0.0).to(dt))
    offs = v_full + cols
    mask = offs < V
    x = tl.load(x_row + offs, mask=mask & row_mask, other=0.0).to(tl.float32)
    g = _grad_block(x, inv_temp, lse, a, b, offs == label, g_t)
    tl.store(g_row + offs, tl.where(valid, g, 0.0).to(dt), mask=mask)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _as_3d(t: torch.Tensor, inner: int) -> Optional[torch.Tensor]:
    """View ``t`` [..., *inner dims] as [B, T1, *inner] without a copy (None if the leading dims cannot be
    merged into two strided dims). logits[:, :-1] of a [B, T, V] tensor stays a view: the kernel indexes
    row -> (b, t) with both strides."""
    lead = t.shape[: t.dim() - inner]
    rest = t.shape[t.dim() - inner:]
    if len(lead) == 0:
        return t.reshape((1, 1) + tuple(rest))
    # merge leading dims from the right while they are contiguous w.r.t. each other (size-1 dims are free)
    # all size 1 (one row): keep the row stride the same row has inside a batch (torch keeps it on size-1
    # dims), not 0. Triton specializes the kernel on each stride's divisibility by 16, which sets the
    # vector width of the row loads and with it the order of the BLOCK_V-lane sums: with stride 0 a
    # single row of an odd-V tensor got the aligned variant and a batched one not (batch invariance).
    dims = ([(int(s), int(st)) for s, st in zip(lead, t.stride()[: len(lead)]) if s != 1]
            or [(1, int(t.stride()[len(lead) - 1]))])
    merged = [dims[-1]]
    for s, st in reversed(dims[:-1]):
        ms, mst = merged[0]
        if st == ms * mst:
            merged[0] = (s * ms, mst)
        else:
            merged.insert(0, (s, st))
    if len(merged) > 2:
        return None
    if len(merged) == 1:
        merged.insert(0, (1, 0))
    (b, sb), (t1, st1) = merged
    return t.as_strided((b, t1) + tuple(rest), (sb, st1) + tuple(t.stride()[len(lead):]))


def _prep(logits: torch.Tensor, labels: torch.Tensor):
    x = _as_3d(logits, 1)
    if x is None:  # > 2 non-mergeable strided leading dims: rare, pay one copy
        x = logits.reshape(-1, logits.shape[-1]).unsqueeze(0)
    lab = _as_3d(labels, 0)
    if lab is None or lab.shape[:2] != x.shape[:2]:  # labels laid out differently: O(N) ints, copy
        lab = labels.reshape(x.shape[:2])
    return x, lab


def _fwd_triton(logits, labels, temperature, return_entropy, ignore_index, sharded=False):
    V = logits.shape[-1]
    N = labels.numel()
    dev = logits.device
    logp = empty(labels.shape, dtype=torch.float32, device=dev)
    lse = empty(labels.shape, dtype=torch.float32, device=dev)
    ent = empty(labels.shape if return_entropy else (0,), dtype=torch.float32, device=dev)
    if N == 0:
        return logp, lse, ent
    x, lab = _prep(logits, labels)
    BLOCK_V, num_warps = _config(V, dev)
    with device_guard(logits):
        for row0 in range(0, N, MAX_GRID):
            _token_logprobs_fwd_kernel[(min(N - row0, MAX_GRID),)](
                x, lab, logp, lse, ent if return_entropy else logp,
                x.shape[1], V, V + 1 if sharded else V, row0,
                x.stride(0), x.stride(1), lab.stride(0), lab.stride(1),
                1.0 / temperature, ignore_index,
                BLOCK_V=BLOCK_V, RETURN_ENTROPY=return_entropy, num_warps=num_warps, **_LAUNCH_NUMERICS,
            )
    return logp, lse, ent


def _bwd_triton(logits, labels, lse, ent, grad_logp, grad_ent, temperature, ignore_index):
    V = logits.shape[-1]
    N = labels.numel()
    grad = empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad
    x, lab = _prep(logits, labels)
    has_gent = grad_ent is not None
    lse, ent = lse.reshape(-1).contiguous(), ent.reshape(-1).contiguous()  # [N] fp32, indexed by row
    # upstream grads may be expanded (logp.sum().backward() gives stride 0): O(N) copy to [N] fp32
    grad_logp = grad_logp.reshape(-1).to(torch.float32).contiguous()
    grad_ent = grad_ent.reshape(-1).to(torch.float32).contiguous() if has_gent else grad_logp
    BLOCK_V, num_warps = _config(V, logits.device)
    with device_guard(logits):
        for row0 in range(0, N, MAX_GRID):
            _token_logprobs_bwd_kernel[(min(N - row0, MAX_GRID),)](
                x, lab, lse, ent if has_gent else lse, grad_logp, grad_ent, grad,
                x.shape[1], V, row0,
                x.stride(0), x.stride(1), lab.stride(0), lab.stride(1), V,
                1.0 / temperature, ignore_index,
                BLOCK_V=BLOCK_V, HAS_GENT=has_gent, num_warps=num_warps, **_LAUNCH_NUMERICS,
            )
    return grad


def _native_2d(logits, labels, ignore_index, sharded):
    V = logits.shape[-1]
    x = _as_3d(logits, 1)
    x2 = x[0] if x is not None and x.shape[0] == 1 else logits.reshape(-1, V)
    lab = labels.reshape(-1).to(torch.int64).contiguous()
    if not sharded and ignore_index != V:
        # the native kernels read label == V as "target in another shard" (finite entropy and gradient);
        # outside vocab parallelism it is out of range like any other: map it to one the kernels poison
        lab = torch.where(lab == V, -1 if ignore_index != -1 else -2, lab)
    return x2, lab


# ----------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake kernels and autograd
# ----------------------------------------------------------------------------------------------------
# ``sharded``: the logits are one vocab-parallel shard (ops/vocab_parallel.py) and label == V means "the
# target is in another shard" (lse and entropy as usual, no target term); otherwise V is out of range.
def _fwd_impl(logits, labels, temperature, return_entropy, ignore_index, impl, sharded):
    """The forward of either fast impl -> (logp, lse, entropy | empty): the custom op's body."""
    if impl == "native":
        x2, lab = _native_2d(logits, labels, ignore_index, sharded)
        lp, lse, ent = torch.ops.flowrl_kernels_native.token_logprobs_fwd(
            x2, lab, temperature, return_entropy, ignore_index)
        return lp.view(labels.shape), lse.view(labels.shape), ent.view(labels.shape) if return_entropy else ent
    return _fwd_triton(logits, labels, temperature, return_entropy, ignore_index, sharded)


@torch.library.custom_op("flowrl_kernels::token_logprobs_fwd", mutates_args=())
def _fwd_op(logits: torch.Tensor, labels: torch.Tensor, temperature: float, return_entropy: bool,
            ignore_index: int, impl: str, sharded: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(logits, labels, temperature, return_entropy, ignore_index, impl, sharded)


@_fwd_op.register_fake
def _(logits, labels, temperature, return_entropy, ignore_index, impl, sharded):
    out = logits.new_empty(labels.shape, dtype=torch.float32)
    ent = logits.new_empty(labels.shape if return_entropy else (0,), dtype=torch.float32)
    return out, torch.empty_like(out), ent


def _bwd_impl(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, impl, sharded):
    """The backward of either fast impl -> grad_logits: the custom op's body."""
    if impl == "native":
        x2, lab = _native_2d(logits, labels, ignore_index, sharded)
        ge = None if grad_entropy is None else grad_entropy.reshape(-1).float().contiguous()
        g = torch.ops.flowrl_kernels_native.token_logprobs_bwd(
            x2, lab, lse.reshape(-1), entropy.reshape(-1), grad_logp.reshape(-1).float().contiguous(), ge,
            temperature, ignore_index)
        return g.view(logits.shape)
    return _bwd_triton(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index)


@torch.library.custom_op("flowrl_kernels::token_logprobs_bwd", mutates_args=())
def _bwd_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
            grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], temperature: float,
            ignore_index: int, impl: str, sharded: bool) -> torch.Tensor:
    return _bwd_impl(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, impl,
                     sharded)


@_bwd_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, impl, sharded):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, return_entropy, ignore_index, impl, sharded = inputs
    _, lse, ent = output
    ctx.save_for_backward(logits, labels, lse, ent)
    ctx.temperature, ctx.ignore_index, ctx.impl, ctx.sharded = temperature, ignore_index, impl, sharded
    ctx.return_entropy = return_entropy
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_lse, grad_ent, bwd=None):
    logits, labels, lse, ent = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.return_entropy:
        grad_ent = None
    grad = (bwd or _bwd_op)(logits, labels, lse, ent, grad_logp, grad_ent, ctx.temperature, ctx.ignore_index,
                            ctx.impl, ctx.sharded)
    return grad, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerTokenLogprobs(torch.autograd.Function):
    """Eager twin of the custom op: the same kernels, context and backward, without torch.library's
    per-call Python dispatch (the custom op's wrapping was ~80% of the public call's host time on a tiny
    input, bench/host_overhead.py). torch.compile traces the custom op instead (token_logprobs picks)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, return_entropy, ignore_index, impl, sharded):
        out = _fwd_impl(logits, labels, temperature, return_entropy, ignore_index, impl, sharded)
        _setup_context(ctx, (logits, labels, temperature, return_entropy, ignore_index, impl, sharded), out)
        ctx.set_materialize_grads(False)  # an unused entropy costs no zero [N] gradient, nor its reads
        return out

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_ent):
        return _backward(ctx, grad_logp, grad_lse, grad_ent, bwd=_bwd_impl)


# ----------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, impl: Optional[str] = None,
                   validate: bool = False, process_group=None
                   ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-token log-probs of ``labels`` under softmax(logits / temperature), and optionally the entropy.

    Args:
        logits: [..., V] bf16 / fp16 / fp32 (fp64 with impl="torch" only). The vocab dim must have stride
            1; leading dims may have any strides (``logits[:, :-1]`` is read in place, no copy).
        labels: [...] int32 / int64, same leading shape as ``logits``. Positions equal to
            ``ignore_index`` give 0 in every output and get zero gradient.
        temperature: runtime real number in [1e-4, 1e4] (``_utils.TEMPERATURE_RANGE``: the range where
            every impl's fp32 math matches the spec), applied to logp AND entropy (a new value does not
            recompile). Outside it, or not a real number (None, a string, a bool, a tensor, NaN):
            ValueError.
        return_entropy: also return H(softmax(logits / T)) per position.
        ignore_index: a Python int (int64 range; -100.0 or True is a ValueError).
        impl: "triton" (default for CUDA tensors), "native" (C++ extension, default on CPU when built),
            "torch" (flowrl_kernels.reference, otherwise the CPU default, and always the default for
            float64 logits); env FLOWRL_KERNELS_IMPL / ``prefer_impl`` are preferences (see _utils).
        process_group: tensor-parallel vocab (Megatron layout): ``logits`` is this rank's shard, the
            columns [rank * V_local, (rank + 1) * V_local) of a vocab of world * V_local; ``labels`` are
            global ids. Every rank gets the full-vocab logp / entropy (2 all-reduces of O(N) floats),
            and the gradient of its shard (no communication); see ``flowrl_kernels.ops.vocab_parallel``.
            Eager only (not traceable by torch.compile). None (default): the logits hold the whole vocab.
        validate: full label range check on GPU tensors (one device sync). CPU tensors are always
            checked (ValueError naming the label and its index), except while torch.compile traces.

    Out-of-range labels (outside [0, V) and not ``ignore_index``) when unchecked (GPU without
    ``validate``, or under torch.compile): every impl poisons that position instead of reading out of
    bounds or returning a number: logp = NaN, entropy = NaN, and that row of the logits gradient is NaN.
    Any loss that uses the position turns NaN, so a bad label is never silently trained on. The same
    policy holds for ``linear_token_logprobs`` and ``reference.token_logprobs``.

    Returns:
        logp [...] float32, or (logp, entropy) both [...] float32 (float64 for float64 logits with
        impl="torch"). Differentiable w.r.t. ``logits`` with per-position upstream gradients for both.

    Memory (triton / native): the forward allocates 4 bytes per position for logp, 4 for the saved lse,
    and 4 for entropy when asked; the backward allocates the [..., V] gradient in logits.dtype. No
    [N, V] float32 intermediate is ever materialized.
    """
    check_tensor("logits", logits, dtypes=KERNEL_DTYPES + (torch.float64,), min_ndim=1)
    check_tensor("labels", labels, dtypes=INDEX_DTYPES)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but logits has shape {tuple(logits.shape)}; labels must "
            f"be logits.shape[:-1] = {tuple(logits.shape[:-1])} (for next-token targets pass "
            "logits[:, :-1] and labels[:, 1:])."
        )
    device = check_same_device(logits=logits, labels=labels)
    check_vocab_contiguous("logits", logits)
    temperature = check_temperature(temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    # float64 logits (gradchecks, references) default to the float64 torch path, like flowrl_loss
    impl = "torch" if impl is None and logits.dtype == torch.float64 else resolve_impl(
        impl, device, native_op="token_logprobs_fwd", op="token_logprobs")
    if impl != "torch" and logits.dtype == torch.float64:
        raise ValueError(f"logits has dtype float64, which impl={impl!r} does not support; use impl='torch' "
                         "or cast logits to float32.")
    if process_group is not None:
        vocab_start, vocab = group_layout(process_group, logits.shape[-1])
        check_labels_in_range(labels, vocab, ignore_index, validate=validate)
        return vocab_parallel_token_logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy,
                                             ignore_index=ignore_index, impl=impl, process_group=process_group,
                                             vocab_start=vocab_start, vocab=vocab)
    check_labels_in_range(labels, logits.shape[-1], ignore_index, validate=validate)
    if impl == "torch":
        return reference.token_logprobs(logits, labels, temperature=temperature,
                                        return_entropy=return_entropy, ignore_index=ignore_index)
    fwd = _fwd_op if torch.compiler.is_compiling() else _EagerTokenLogprobs.apply
    logp, _, ent = fwd(logits, labels, temperature, return_entropy, ignore_index, impl, False)
    return (logp, ent) if return_entropy else logp
