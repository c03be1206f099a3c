"""masked_mean, seq_log_ratio, importance_weights, group_normalize vs the float64 reference, edge cases,
argument checks, gradcheck of the differentiable references."""
import math

import pytest
import torch

from flowrl_kernels import group_normalize, importance_weights, masked_mean, reference, seq_log_ratio
from flowrl_kernels._utils import native_has
from helpers import DEVICE, assert_no_worse_than_torch

FAST_IMPLS = ["triton", "torch",
              pytest.param("native", marks=pytest.mark.skipif(not native_has("flowrl_loss_fwd", DEVICE),
                                                              reason=f"native extension without a {DEVICE} flowrl_loss_fwd"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 257), (4, 1000), (257, 3)]


def rand_mask(B, T, kind, device):
    if kind == "bool":
        return torch.rand(B, T, device=device) > 0.3
    if kind == "int":
        return (torch.rand(B, T, device=device) > 0.3).to(torch.int64)
    w = torch.rand(B, T, device=device)
    return torch.where(w > 0.3, w, torch.zeros_like(w))


# ----------------------------------------------------------------------------------------------------
# masked_mean / seq_log_ratio (torch for every impl; checked for routing, dtypes, grads and edge cases)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T", SHAPES)
@pytest.mark.parametrize("mask_kind", ["bool", "int", "float"])
def test_masked_mean(dtype, B, T, mask_kind, device):
    x = torch.randn(B, T, device=device).to(dtype)
    mask = rand_mask(B, T, mask_kind, device)
    mask[0] = 0  # an empty row
    g = torch.randn(B, device=device)
    outs = []
    for xx, mm in ((x, mask), (x.double(), mask.double() if mask.dtype.is_floating_point else mask)):
        xx = xx.detach().clone().requires_grad_()
        y = masked_mean(xx, mm)
        y.backward(g.to(y.dtype))
        outs.append((y, xx.grad))
    (y, gx), (y64, gx64) = outs
    assert y.dtype == torch.float32 and gx.dtype == dtype
    assert y[0] == 0 and torch.equal(gx[0], torch.zeros_like(gx[0]))
    assert_no_worse_than_torch(y, y64, y, name="masked_mean")  # torch path: its error is the bound
    assert_no_worse_than_torch(gx, gx64, gx, name="grad x")
    # against an independent formula: sum m x / sum m
    m64 = mask.double()
    want = (x.double() * m64).sum(-1) / m64.sum(-1).clamp(min=1e-300)
    assert torch.allclose(y64[1:], want[1:], rtol=1e-12, atol=1e-12)


def test_masked_mean_no_leak_and_batch_dims(device):
    x = torch.randn(2, 3, 11, device=device)
    mask = torch.rand(2, 3, 11, device=device) > 0.5
    clean = masked_mean(x, mask)
    x[~mask] = float("nan")
    x[..., 0] = torch.where(mask[..., 0], x[..., 0], torch.full_like(x[..., 0], -float("inf")))
    assert clean.shape == (2, 3) and torch.equal(masked_mean(x, mask), clean)


@pytest.mark.parametrize("normalize", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_seq_log_ratio(normalize, dtype, device):
    B, T = 5, 129
    a = (-3 * torch.rand(B, T, device=device)).to(dtype)
    b = (-3 * torch.rand(B, T, device=device)).to(dtype)
    mask = rand_mask(B, T, "bool", device)
    mask[2] = False
    g = torch.randn(B, device=device)
    res = []
    for aa, bb in ((a, b), (a.double(), b.double())):
        aa, bb = aa.clone().requires_grad_(), bb.clone().requires_grad_()
        y = seq_log_ratio(aa, bb, mask, normalize=normalize)
        y.backward(g.to(y.dtype))
        res.append((y, aa.grad, bb.grad))
    for i, name in enumerate(("ratio", "grad logp", "grad other")):
        assert_no_worse_than_torch(res[0][i], res[1][i], res[0][i], name=name)
    L = mask.double().sum(-1)
    want = ((a.double() - b.double()) * mask).sum(-1) / (L.clamp(min=1) if normalize == "mean" else 1)
    assert torch.allclose(res[1][0], want, rtol=1e-12, atol=1e-12)
    assert res[0][0][2] == 0
    assert torch.equal(res[1][2], -res[1][1])  # d/d other = -d/d logp


@pytest.mark.parametrize("fn", ["masked_mean", "seq_log_ratio"])
def test_reference_gradcheck(fn, device):
    x = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    o = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(3, 7, device=device) > 0.4
    mask[1] = False
    if fn == "masked_mean":
        assert torch.autograd.gradcheck(lambda a: reference.masked_mean(a, mask), (x,))
    else:
        for norm in ("mean", "sum"):
            assert torch.autograd.gradcheck(lambda a, b: reference.seq_log_ratio(a, b, mask, normalize=norm), (x, o))


# ----------------------------------------------------------------------------------------------------
# importance_weights (sequence levels fused on triton / native)
# ----------------------------------------------------------------------------------------------------
def iw_inputs(B, T, dtype, device, mask_kind="bool"):
    logp = (-3 * torch.rand(B, T, device=device)).to(dtype)
    # per-row log-ratio offsets cycling -0.5, 0, +0.5, 0: those rows' sums and means land outside
    # [log .8, log 1.2] on each side; the offset-0 rows (token noise 0.05 / sqrt(T)) stay inside
    offsets = torch.tensor([-0.5, 0.0, 0.5, 0.0], device=device).repeat(B // 4 + 1)[:B]
    old = (logp.float() - offsets[:, None] + 0.05 / math.sqrt(T) * torch.randn(B, T, device=device)).to(dtype)
    mask = rand_mask(B, T, mask_kind, device)
    if B > 2:
        mask[1] = 0
    return logp, old, mask


def check_iw(logp, old, mask, impl, **kw):
    w, frac = importance_weights(logp, old, mask, impl=impl, **kw)
    m64 = mask.double() if mask.dtype.is_floating_point else mask
    w64, frac64 = reference.importance_weights(logp.double(), old.double(), m64, **kw)
    w_t, _ = reference.importance_weights(logp, old, mask, **kw)
    assert w.dtype == torch.float32 and not w.requires_grad
    # exp turns the log-ratio sum's absolute rounding error into w's relative error: slack x |log w|
    pos = w64[w64 > 0]
    ulps = 8.0 * max(1.0, float(pos.log().abs().max())) if pos.numel() else 8.0
    assert_no_worse_than_torch(w, w64, w_t, name="weights", ulps=ulps)
    assert float(frac) == pytest.approx(float(frac64), abs=1e-6)
    return w, frac


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T", SHAPES)
@pytest.mark.parametrize("level", ["sequence", "sequence_mean", "token"])
def test_importance_weights(impl, dtype, B, T, level, device):
    check_iw(*iw_inputs(B, T, dtype, device), impl, level=level)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("clip", [(0.8, 1.2), (None, 1.2), (0.8, None), (None, None), (0.0, 10.0), (1.0, 1.0)])
@pytest.mark.parametrize("level", ["sequence", "sequence_mean", "token"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_importance_weights_clips(impl, clip, level, mask_kind, device):
    logp, old, mask = iw_inputs(9, 45, torch.float32, device, mask_kind)
    logp = logp.requires_grad_()
    w, frac = check_iw(logp, old, mask, impl, level=level, clip=clip)
    if clip not in ((None, None), (0.0, 10.0), (1.0, 1.0)):
        assert 0 < float(frac) < 1  # the bounds really acted, and not on everything
    if clip == (1.0, 1.0):
        valid = (mask != 0) if level == "token" else (mask != 0).any(-1)
        assert torch.equal(w, valid.float())


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("level", ["sequence", "sequence_mean", "token"])
def test_importance_weights_extremes(impl, level, device):
    B, T = 4, 100
    logp = -torch.rand(B, T, device=device)
    old = logp.clone()
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    old[0] += 100.0   # log-ratio -1e4 summed (-100 per token)
    old[1] -= 100.0   # +1e4
    old[2, 3] = -float("inf")  # +inf
    mask[3] = False
    old[3] = float("nan")  # empty row: never read
    for clip, lo, hi in (((0.8, 1.2), 0.8, 1.2), ((None, None), 0.0, math.exp(64.0))):
        w, frac = check_iw(logp, old, mask, impl, level=level, clip=clip)
        row = w if level != "token" else w[:, 3]
        assert float(row[0]) == pytest.approx(lo, rel=1e-6) and float(row[1]) == pytest.approx(hi, rel=1e-6)
        assert float(row[2]) == pytest.approx(hi, rel=1e-6) and torch.equal(w[3], torch.zeros_like(w[3]))
        assert torch.isfinite(w).all()
    # NaN at a valid token -> NaN weight, never silently 0 or a bound
    old[2, 3] = float("nan")
    w, _ = importance_weights(logp, old, mask, level=level, impl=impl)
    assert torch.isnan(w[2] if level != "token" else w[2, 3]).all()


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_importance_weights_all_masked_and_strided(impl, device):
    logp, old, mask = iw_inputs(5, 60, torch.float32, device)
    w, frac = importance_weights(logp, old, torch.zeros_like(mask), impl=impl)
    assert torch.equal(w, torch.zeros(5, device=device)) and float(frac) == 0.0
    big = torch.cat([logp, old], 1)
    check_iw(big[:, :60], old.t().contiguous().t(), mask[:, :].t().contiguous().t(), impl)


# ----------------------------------------------------------------------------------------------------
# group_normalize
# ----------------------------------------------------------------------------------------------------
def test_group_normalize_by_hand(device):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 3.0], device=device)
    got = group_normalize(r, 4)
    # group 1: mean .5, unbiased std sqrt(1/3) -> +-0.5 / (0.57735 + 1e-6); group 2 all equal -> 0
    s = math.sqrt(1.0 / 3.0) + 1e-6
    want = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0, -1.5 / math.sqrt(3.0), 1.5 / math.sqrt(3.0),
            -1.5 / math.sqrt(3.0), 1.5 / math.sqrt(3.0)]
    assert got.tolist()[:8] == pytest.approx(want[:8], rel=1e-6, abs=0)
    assert got.tolist()[8:] == pytest.approx(want[8:], rel=1e-5)  # eps 1e-6 against std sqrt(3)
    assert torch.equal(got[4:8], torch.zeros(4, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_group_normalize_dtypes(dtype, device):
    r = (torch.rand(24, device=device) * 3).to(dtype)
    got = group_normalize(r, 6)
    want = reference.group_normalize(r.double(), 6)
    assert got.dtype == torch.float32
    assert_no_worse_than_torch(got, want, reference.group_normalize(r.float(), 6), name="z")
    assert torch.equal(group_normalize(r, 1), torch.zeros(24, device=device))


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(6), 4), "group_size"), ((torch.zeros(6), 0), "group_size"), ((torch.zeros(6), 2.0), "group_size"),
    ((torch.zeros(2, 3), 3), "rewards"), (([0.0, 1.0], 2), "rewards"),
])
def test_group_normalize_errors(args, match):
    with pytest.raises(ValueError, match=match):
        group_normalize(*args)


# ----------------------------------------------------------------------------------------------------
# argument checks shared by the [B, T] ops
# ----------------------------------------------------------------------------------------------------
def test_argument_errors(device):
    x = torch.randn(3, 5, device=device)
    m = torch.ones(3, 5, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="mask"):
        masked_mean(x, m[:, 1:])
    with pytest.raises(ValueError, match="x"):
        masked_mean(x.long(), m)
    with pytest.raises(ValueError, match="mask"):
        masked_mean(x, m.to("meta"))
    with pytest.raises(ValueError, match="impl"):
        masked_mean(x, m, impl="gpu")
    with pytest.raises(ValueError, match="other_logp"):
        seq_log_ratio(x, x[:2], m)
    with pytest.raises(ValueError, match="normalize"):
        seq_log_ratio(x, x, m, normalize="max")
    with pytest.raises(ValueError, match="old_logp"):
        importance_weights(x, x.to(torch.int32), m)
    with pytest.raises(ValueError, match="level"):
        importance_weights(x, x, m, level="batch")
    with pytest.raises(ValueError, match="lo > hi"):
        importance_weights(x, x, m, clip=(2.0, 1.0))
    with pytest.raises(ValueError, match="float64"):
        importance_weights(x.double(), x, m, impl="triton")
