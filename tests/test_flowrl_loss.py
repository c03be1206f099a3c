"""flowrl_loss: every impl vs the float64 reference (loss, stats, grad_logp, grad_log_z), edge cases,
argument checks, the authors' formula on hand-made numbers, and gradcheck of the reference."""
import math

import pytest
import torch

from flowrl_kernels import flowrl_loss, reference
from flowrl_kernels._utils import native_has
from helpers import DEVICE, assert_no_worse_than_torch

import flowrl_kernels.ops._common as common_mod
import flowrl_kernels.ops.flowrl_loss as fl_mod

IMPLS = ["triton", "torch",
         pytest.param("native", marks=pytest.mark.skipif(not native_has("flowrl_loss_fwd", DEVICE),
                                                         reason=f"native extension without a {DEVICE} flowrl_loss_fwd"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CLIPS = [(0.8, 1.2), (None, 1.2), (0.8, None), (None, None), (0.0, 10.0)]


def make_mask(B, T, kind, device):
    if kind == "holes":
        return torch.rand(B, T, device=device) > 0.3
    lengths = torch.randint(0, T + 1, (B,), device=device)
    pos = torch.arange(T, device=device)
    if kind == "right":  # response then padding
        return pos[None, :] < lengths[:, None]
    if kind == "left":  # padding then response
        return pos[None, :] >= (T - lengths)[:, None]
    if kind == "int":
        return (torch.rand(B, T, device=device) > 0.3).to(torch.int32)
    if kind == "float":  # weights, with zeros
        w = torch.rand(B, T, device=device)
        return torch.where(w > 0.3, w, torch.zeros_like(w))
    raise AssertionError(kind)


def make_inputs(B, T, dtype, device, mask="holes", noise=None):
    logp = (-3 * torch.rand(B, T, device=device)).to(dtype)
    # old ~ logp with a per-token spread such that sum_t over T tokens spans the clip range [log .8, log 1.2]
    noise = 0.3 / math.sqrt(max(T, 1)) if noise is None else noise
    old = (logp.float() + noise * torch.randn(B, T, device=device)).to(dtype)
    ref = (-3 * torch.rand(B, T, device=device)).to(dtype)
    log_z = torch.randn(B, device=device)
    rewards = torch.randn(B, device=device)
    return logp, old, ref, log_z, rewards, make_mask(B, T, mask, device)


def run(inputs, impl, reduction="mean", grad=None, to64=False, **kw):
    logp, old, ref, log_z, rewards, mask = inputs
    if to64:
        logp, old, ref, log_z, rewards = (t.double() for t in (logp, old, ref, log_z, rewards))
        mask = mask.double() if mask.dtype.is_floating_point else mask
    logp = logp.detach().clone().requires_grad_(True)
    log_z = log_z.detach().clone().requires_grad_(True)
    if impl == "ref":
        loss, stats = reference.flowrl_loss(logp, old, ref, log_z, rewards, mask, reduction=reduction, **kw)
    else:
        loss, stats = flowrl_loss(logp, old, ref, log_z, rewards, mask, reduction=reduction, impl=impl, **kw)
    loss.backward(grad.to(loss.dtype))
    return loss, stats, logp.grad, log_z.grad


def check_against_reference(inputs, impl, reduction="mean", **kw):
    B = inputs[0].shape[0]
    grad = torch.randn(B if reduction == "none" else (), device=inputs[0].device)
    out = run(inputs, impl, reduction, grad, **kw)
    ref64 = run(inputs, "ref", reduction, grad, to64=True, **kw)
    tor = run(inputs, "ref", reduction, grad, **kw)  # PyTorch's own result at this dtype
    # w = exp(log w): exp turns an absolute rounding error e of the log-ratio sum into a relative error e
    # of w, so the slack scales with the condition number |log w| (84 for an unbounded row of 28 tokens
    # at +3 each; both torch and the kernel round that sum differently)
    w64 = ref64[1]["weight"][ref64[1]["weight"] > 0]
    ulps = 8.0 * max(1.0, float(w64.log().abs().max())) if w64.numel() else 8.0
    for i, name in ((0, "loss"), (2, "grad_logp"), (3, "grad_log_z")):
        assert out[i].dtype == tor[i].dtype, (name, out[i].dtype, tor[i].dtype)
        assert_no_worse_than_torch(out[i], ref64[i], tor[i], name=name, ulps=ulps)
    for k in ("delta", "logp_mean", "ref_logp_mean"):
        assert_no_worse_than_torch(out[1][k], ref64[1][k], tor[1][k], name=k)
    assert_no_worse_than_torch(out[1]["weight"], ref64[1]["weight"], tor[1]["weight"], name="weight", ulps=ulps)
    assert float(out[1]["clip_frac"]) == pytest.approx(float(ref64[1]["clip_frac"]), abs=1e-6)
    assert set(out[1]) == set(ref64[1])
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T", [(1, 1), (3, 257), (4, 1000), (257, 3)])
def test_shapes_dtypes(impl, dtype, B, T, device):
    check_against_reference(make_inputs(B, T, dtype, device), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("importance", ["sequence", "sequence_mean", "none"])
@pytest.mark.parametrize("clip", CLIPS)
def test_importance_clip_reduction(impl, reduction, importance, clip, device):
    # per-row offsets of the token log-ratio put some rows' sum and mean outside every bound above
    # and leave others (offset 0, token noise 0.02) inside them
    inputs = make_inputs(8, 37, torch.float32, device, noise=0.02)
    offsets = torch.tensor([-0.4, -0.1, 0.0, 0.0, 0.005, 0.1, 3.0, -0.01], device=device)
    inputs[1].sub_(offsets[:, None])
    out = check_against_reference(inputs, impl, reduction, importance=importance, clip=clip, beta=3.5)
    if importance != "none" and clip != (None, None):
        assert 0 < float(out[1]["clip_frac"]) < 1  # the test really exercised the clip, both ways


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", ["holes", "right", "left", "int", "float"])
def test_mask_kinds(impl, mask, device):
    check_against_reference(make_inputs(6, 129, torch.float32, device, mask=mask), impl, "none")


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_views(impl, device):
    B, T = 5, 300
    logp_big = -3 * torch.rand(B, T + 9, device=device)
    logp = logp_big[:, 4:4 + T]                                    # row stride T + 9: read in place
    old = (logp + 0.01 * torch.randn(B, T, device=device)).t().contiguous().t()  # token stride B: copied
    ref = (-3 * torch.rand(2 * B, T, device=device))[::2]          # row stride 2T
    mask = (torch.rand(B, 2 * T, device=device) > 0.3)[:, ::2]      # token stride 2: copied
    assert logp.stride(0) == T + 9 and old.stride(1) == B and mask.stride(1) == 2
    inputs = (logp, old, ref, torch.randn(B, device=device)[None].expand(2, B)[1],
              torch.randn(2 * B, device=device)[::2], mask)
    check_against_reference(inputs, impl, "none")


def test_triton_chunk_loop(monkeypatch, device):
    # force many BLOCK_T trips (and a ragged last chunk) on a short row, then a long row of 2^17 + 3 tokens
    monkeypatch.setattr(common_mod, "BLOCK_T_INTERPRET", 64)  # read by _block_t, which lives in ops/_common.py
    monkeypatch.setattr(common_mod, "BLOCK_T_GPU", 64)
    check_against_reference(make_inputs(3, 1000, torch.float32, device), "triton", "none")
    monkeypatch.undo()
    check_against_reference(make_inputs(2, 2**17 + 3, torch.bfloat16, device, mask="right"), "triton", "none")


# ----------------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_empty_rows(impl, device):
    logp, old, ref, log_z, rewards, mask = make_inputs(4, 50, torch.float32, device)
    mask[1] = False
    mask[3] = False
    logp[1] = float("nan")  # nothing of an empty row is read
    ref[3] = -float("inf")
    out = check_against_reference((logp, old, ref, log_z, rewards, mask), impl, "none")
    loss, stats, g_logp, g_log_z = out
    for i in (1, 3):
        assert loss[i] == 0 and stats["weight"][i] == 0 and g_log_z[i] == 0
        assert stats["logp_mean"][i] == 0 and stats["ref_logp_mean"][i] == 0
        assert torch.equal(g_logp[i], torch.zeros_like(g_logp[i]))
    assert torch.isfinite(loss).all() and torch.isfinite(g_logp).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("importance, clip", [("sequence", (None, None)), ("sequence", (None, 10.0)),
                                              ("sequence_mean", (0.8, 1.2)), ("none", (0.8, 1.2))])
def test_empty_rule_logz(impl, dtype, importance, clip, device):
    """empty="logz" (the authors' rule): an empty row has w = 1, delta = log_z, loss log_z^2 and gradient
    2 g log_z to its log_z, whatever its reward (not read) and logp row (0 gradient); other rows as before."""
    logp, old, ref, log_z, rewards, mask = make_inputs(5, 33, dtype, device, noise=0.05)
    mask[1] = False
    mask[4] = False
    logp[1] = float("nan")  # nothing of an empty row's tokens is read
    rewards[4] = float("nan")  # nor its reward
    inputs = (logp, old, ref, log_z, rewards, mask)
    out = check_against_reference(inputs, impl, "none", importance=importance, clip=clip, empty="logz")
    loss, stats, g_logp, g_log_z = out
    zero = check_against_reference((logp, old, ref, log_z, rewards.nan_to_num(0.0), mask), impl, "none",
                                   importance=importance, clip=clip)
    for i in (1, 4):
        assert stats["weight"][i] == 1 and stats["delta"][i] == log_z[i]
        assert float(loss[i]) == pytest.approx(float(log_z[i]) ** 2, rel=1e-6)
        assert torch.equal(g_logp[i], torch.zeros_like(g_logp[i])) and g_log_z[i] != 0
    for i in (0, 2, 3):  # the non-empty rows are the same under both rules (gradients: checked above)
        assert loss[i] == zero[0][i] and stats["weight"][i] == zero[1]["weight"][i]
        assert stats["delta"][i] == zero[1]["delta"][i]
    assert torch.isfinite(loss).all() and torch.isfinite(g_logp).all() and torch.isfinite(g_log_z).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("importance", ["sequence", "none"])
def test_fully_masked_batch(impl, importance, device):
    logp, old, ref, log_z, rewards, mask = make_inputs(3, 20, torch.float32, device)
    loss, stats, g_logp, g_log_z = run((logp, old, ref, log_z, rewards, torch.zeros_like(mask)), impl,
                                       grad=torch.tensor(1.0, device=device), importance=importance)
    assert float(loss) == 0.0 and float(stats["clip_frac"]) == 0.0
    assert torch.equal(g_logp, torch.zeros_like(g_logp)) and torch.equal(g_log_z, torch.zeros_like(g_log_z))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B, T", [(0, 5), (3, 0)])
def test_empty_tensors(impl, B, T, device):
    loss, stats, g_logp, g_log_z = run(make_inputs(B, T, torch.float32, device), impl, grad=torch.tensor(1.0, device=device))
    assert float(loss) == 0.0 and g_logp.shape == (B, T) and torch.equal(g_log_z, torch.zeros(B, device=device))


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_positions_never_leak(impl, device):
    logp, old, ref, log_z, rewards, mask = make_inputs(3, 40, torch.float32, device)
    mask[:, ::3] = False
    clean = run((logp, old, ref, log_z, rewards, mask), impl, "none", torch.ones(3, device=device))
    for t, v in ((logp, float("nan")), (old, -float("inf")), (ref, float("inf"))):
        t[:, ::3] = v
    dirty = run((logp, old, ref, log_z, rewards, mask), impl, "none", torch.ones(3, device=device))
    for a, b in ((clean[0], dirty[0]), (clean[2], dirty[2]), (clean[3], dirty[3])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("clip", [(0.8, 1.2), (None, None)])
def test_neg_inf_old_logp(impl, clip, device):
    # a token the rollout policy could not have produced: log-ratio +inf -> clipped to hi (exp(64) unbounded)
    inputs = make_inputs(3, 30, torch.float32, device)
    inputs[1][1, 5] = -float("inf")
    inputs[5][1, 5] = True
    loss, stats, g_logp, g_log_z = check_against_reference(inputs, impl, "none", clip=clip)
    hi = 1.2 if clip[1] is not None else math.exp(64.0)
    assert float(stats["weight"][1]) == pytest.approx(hi, rel=1e-6)
    if clip[1] is not None:  # unbounded: w delta^2 = 1.65e38 delta^2 may overflow (as in the reference)
        assert torch.isfinite(loss[1]) and torch.isfinite(g_logp).all()
    assert float(stats["clip_frac"]) >= 1 / 3
    # importance="none" never reads old_logp
    loss_none = run(inputs, impl, "none", torch.ones(3, device=device), importance="none")[0]
    assert torch.isfinite(loss_none).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_neg_inf_ref_logp(impl, device):
    # a reference that gives a valid token probability 0: delta = +inf, loss inf (not hidden)
    inputs = make_inputs(3, 30, torch.float32, device)
    inputs[2][2, 7] = -float("inf")
    inputs[5][2, 7] = True
    loss, stats, g_logp, g_log_z = run(inputs, impl, "none", torch.ones(3, device=device))
    assert stats["ref_logp_mean"][2] == -float("inf") and stats["delta"][2] == float("inf")
    assert loss[2] == float("inf") and g_log_z[2] == float("inf")
    assert torch.isfinite(loss[:2]).all() and torch.isfinite(g_logp[:2]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_log_ratio(impl, sign, device):
    # |log-ratio| = 1e4 over one sequence: exp() would overflow / underflow; the clip works in log space
    inputs = make_inputs(2, 100, torch.float32, device)
    inputs[1].copy_(inputs[0] - sign * 100.0)  # 100 tokens x 100 = 1e4
    inputs[5].fill_(True)
    for clip, want in (((0.8, 1.2), 1.2 if sign > 0 else 0.8), ((None, None), math.exp(64.0) if sign > 0 else 0.0)):
        loss, stats, g_logp, g_log_z = check_against_reference(inputs, impl, "none", clip=clip)
        assert torch.allclose(stats["weight"].double(), torch.tensor(want, dtype=torch.float64, device=device), rtol=1e-6)
        if clip[1] is not None or sign < 0:  # else w = exp(64): w delta^2 may overflow, as in the reference
            assert torch.isfinite(loss).all() and torch.isfinite(g_logp).all() and torch.isfinite(g_log_z).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["logp", "old_logp", "ref_logp", "log_z", "rewards"])
def test_nan_input_gives_nan_loss(impl, where, device):
    logp, old, ref, log_z, rewards, mask = make_inputs(3, 20, torch.float32, device)
    mask[1, 4] = True
    {"logp": logp, "old_logp": old, "ref_logp": ref}.get(where, logp)[1, 4] = float("nan") \
        if where in ("logp", "old_logp", "ref_logp") else 0.0
    if where == "log_z":
        log_z[1] = float("nan")
    if where == "rewards":
        rewards[1] = float("nan")
    loss, stats, g_logp, g_log_z = run((logp, old, ref, log_z, rewards, mask), impl, grad=torch.tensor(1.0, device=device))
    assert torch.isnan(loss)
    assert torch.isnan(g_log_z[1])


def test_float64_routes_to_torch_and_triton_refuses(device):
    inputs = [t.double() if t.dtype.is_floating_point else t for t in make_inputs(2, 5, torch.float32, device)]
    loss, _ = flowrl_loss(*inputs)
    assert loss.dtype == torch.float64
    with pytest.raises(ValueError, match="float64"):
        flowrl_loss(*inputs, impl="triton")


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def _bad(i, value):
    def f(inputs):
        inputs = list(inputs)
        inputs[i] = value(inputs[i])
        return inputs
    return f


@pytest.mark.parametrize("make_bad, name", [
    (_bad(0, lambda t: t[:, :-1]), "old_logp"),
    (_bad(1, lambda t: t[:-1]), "old_logp"),
    (_bad(2, lambda t: t[None]), "ref_logp"),
    (_bad(3, lambda t: t[:-1]), "log_z"),
    (_bad(4, lambda t: t[:, None]), "rewards"),
    (_bad(5, lambda t: t[:, 1:]), "mask"),
    (_bad(0, lambda t: t.long()), "logp"),
    (_bad(1, lambda t: t.to(torch.int32)), "old_logp"),
    (_bad(3, lambda t: t.long()), "log_z"),
    (_bad(5, lambda t: t.to(torch.complex64)), "mask"),
    (_bad(3, lambda t: t.to("meta")), "log_z"),
    (_bad(2, lambda t: t.to("meta")), "ref_logp"),
    (_bad(0, lambda t: t.tolist()), "logp"),
])
def test_bad_arguments(make_bad, name, device):
    inputs = make_bad(make_inputs(3, 7, torch.float32, device))
    with pytest.raises(ValueError, match=name):
        flowrl_loss(*inputs, impl="torch")


@pytest.mark.parametrize("kw, match", [
    ({"importance": "token"}, "importance"), ({"reduction": "avg"}, "reduction"),
    ({"beta": torch.tensor(15.0)}, "beta"), ({"beta": float("nan")}, "beta"),
    ({"clip": (1.2, 0.8)}, "lo > hi"), ({"clip": (0.8, 0.0)}, r"clip\[1\]"), ({"clip": 0.2}, "clip"),
    ({"clip": (torch.tensor(0.8), 1.2)}, r"clip\[0\]"), ({"impl": "cuda"}, "impl"),
])
def test_bad_options(kw, match, device):
    with pytest.raises(ValueError, match=match):
        flowrl_loss(*make_inputs(3, 7, torch.float32, device), **kw)


def test_too_long(device):
    T = 2**20 + 1
    x = torch.zeros((), device=device).expand(1, T)  # no memory behind it: the check runs first
    with pytest.raises(ValueError, match="2\\^20|1048576"):
        flowrl_loss(x, x, x, torch.zeros(1, device=device), torch.zeros(1, device=device), x.bool(), impl="torch")


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "torch"])  # the op serves the fused impls
@pytest.mark.parametrize("mask", ["holes", "float"])
def test_opcheck(impl, mask, device):
    # the custom ops torch.compile sees: schema, fake kernels (shapes / dtypes / devices), autograd
    logp, old, ref, log_z, rewards, m = make_inputs(3, 9, torch.bfloat16, device, mask=mask)
    args = (logp.requires_grad_(), old, ref, log_z.requires_grad_(), rewards, m, 3.0, 1, math.log(0.8),
            math.log(1.2), impl, True)
    torch.library.opcheck(torch.ops.flowrl_kernels.flowrl_loss_fwd.default, args)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "torch"])
@pytest.mark.parametrize("empty_logz", [False, True])
def test_eager_twin_is_the_custom_op(impl, empty_logz, monkeypatch, device):
    """Eager calls skip torch.library's dispatch (_EagerFlowRLLoss); its outputs and gradients are the
    custom op's, bit for bit, and flowrl_loss never reaches the op outside torch.compile."""
    logp, old, ref, log_z, rewards, m = make_inputs(5, 37, torch.bfloat16, device)
    m[2] = False  # an empty row, for both empty-response rules
    args = (math.pi, 0, math.log(0.8), math.log(1.2), impl, True, empty_logz)
    g = torch.randn(5, device=device)
    outs, grads = [], []
    for f in (fl_mod._EagerFlowRLLoss.apply, fl_mod._fwd_op):
        lp, lz = logp.detach().clone().requires_grad_(), log_z.detach().clone().requires_grad_()
        out = f(lp, old, ref, lz, rewards, m, *args)
        out[0].backward(g)
        outs.append(out)
        grads.append((lp.grad, lz.grad))
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)

    def refuse(*a, **k):
        raise AssertionError("the custom op ran in eager mode")
    monkeypatch.setattr(fl_mod, "_fwd_op", refuse)
    loss, _ = flowrl_loss(logp.detach().requires_grad_(), old, ref, log_z, rewards, m, impl=impl)
    loss.backward()


# ----------------------------------------------------------------------------------------------------
# the authors' formula, step by step on hand-made numbers
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_published_formula_by_hand(impl, device):
    """docs/flowrl.md: delta_i = log Z + mean(log pi) - beta r_hat - mean(log pi_ref); w_i = clip(exp(sum_t
    (log pi - log pi_old)), 0.8, 1.2) detached; loss = (1/B) sum_i w_i delta_i^2; beta = 15."""
    logp = [[-1.0, -2.0, -0.5, 0.0], [-0.25, -0.75, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0]]
    old = [[-1.0, -2.1, -0.5, 0.0], [-0.25, -0.35, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0]]
    ref = [[-1.5, -1.5, -1.0, -9.0], [-0.5, -0.5, 0.0, -9.0], [-2.0, 0.0, 0.0, 0.0]]
    lengths = [3, 2, 0]  # right padding; the third response is empty
    mask = [[t < L for t in range(4)] for L in lengths]
    log_z, r_hat = [0.5, -1.0, 2.0], [0.1, -0.2, 0.3]
    beta, B = 15.0, 3
    # by hand: lp_bar = (-1 - 2 - .5)/3 = -7/6, ref_bar = -4/3; delta_0 = .5 - 7/6 - 1.5 + 4/3 = -5/6
    #          lp_bar = -.5, ref_bar = -.5;  delta_1 = -1 - .5 + 3 + .5 = 2
    #          logw_0 = 0.1 -> w = e^.1 = 1.10517 (inside the clip); logw_1 = -0.4 -> e^-.4 = .67 -> 0.8
    delta = [-5.0 / 6.0, 2.0, 2.0 - 4.5]
    w = [math.exp(0.1), 0.8, 0.0]
    loss_hand = sum(wi * di * di for wi, di in zip(w, delta)) / B
    g_log_z_hand = [2.0 / B * wi * di for wi, di in zip(w, delta)]
    g_logp_hand = [[g_log_z_hand[i] / lengths[i] if mask[i][t] else 0.0 for t in range(4)] for i in range(3)]

    f = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    logp_t, log_z_t = f(logp).requires_grad_(), f(log_z).requires_grad_()
    loss, stats = flowrl_loss(logp_t, f(old), f(ref), log_z_t, f(r_hat), f(mask, torch.bool), beta=beta,
                              importance="sequence", clip=(0.8, 1.2), impl=impl)
    loss.backward()
    assert float(loss) == pytest.approx(loss_hand, rel=1e-6)
    assert stats["delta"].tolist() == pytest.approx(delta, rel=1e-6)
    assert stats["weight"].tolist() == pytest.approx(w, rel=1e-6)
    assert float(stats["clip_frac"]) == pytest.approx(0.5)  # 1 of the 2 non-empty rows
    assert stats["logp_mean"].tolist() == pytest.approx([-7 / 6, -0.5, 0.0], rel=1e-6)
    assert stats["ref_logp_mean"].tolist() == pytest.approx([-4 / 3, -0.5, 0.0], rel=1e-6)
    assert log_z_t.grad.tolist() == pytest.approx(g_log_z_hand, rel=1e-6)
    for got, want in zip(logp_t.grad.tolist(), g_logp_hand):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# gradcheck of the spec (w is detached: "none", or every weight clipped so w is locally constant)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("importance, shift", [("none", 0.0), ("sequence", 5.0), ("sequence_mean", -5.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_gradcheck(importance, shift, reduction, device):
    B, T = 3, 6
    logp = (-torch.rand(B, T, dtype=torch.float64, device=device)).requires_grad_()
    old = logp.detach() - shift  # |log-ratio| >= 5 per token: every weight sits on a clip bound
    ref = -torch.rand(B, T, dtype=torch.float64, device=device)
    log_z = torch.randn(B, dtype=torch.float64, device=device, requires_grad=True)
    rewards = torch.randn(B, dtype=torch.float64, device=device)
    mask = torch.rand(B, T, device=device) > 0.3
    mask[:, 0] = True
    mask[2] = False  # an empty row

    def f(lp, lz):
        return reference.flowrl_loss(lp, old, ref, lz, rewards, mask, importance=importance,
                                     reduction=reduction)[0]

    assert torch.autograd.gradcheck(f, (logp, log_z))
