"""grpo_loss: the torch composition vs an independent per-token loop in float64, vs the float64
reference at every dtype, edge cases (huge log-ratios, -inf, NaN, empty/fully masked rows), errors."""
import math

import pytest
import torch

from flowrl_kernels import group_normalize, grpo_loss, reference
from helpers import assert_no_worse_than_torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def loop_grpo(logp, old, adv, mask, eps, ref, kl_coef, reduction):
    """Per-token scalar math (Python floats): loss and d loss / d logp, written independently of torch."""
    B, T = len(logp), len(logp[0])
    per_tok = [[0.0] * T for _ in range(B)]
    dtok = [[0.0] * T for _ in range(B)]  # d per_tok / d logp
    for i in range(B):
        for t in range(T):
            m = mask[i][t]
            if m == 0:
                continue
            a = adv[i] if not isinstance(adv[i], list) else adv[i][t]
            ratio = math.exp(min(logp[i][t] - old[i][t], 88.0))
            clipped = min(max(ratio, 1 - eps[0]), 1 + eps[1])
            if -a * ratio >= -a * clipped:  # unclipped branch (ties: both have the same value)
                v, d = -a * ratio, -a * ratio
            else:
                v, d = -a * clipped, 0.0
            if ref is not None and kl_coef:
                x = ref[i][t] - logp[i][t]
                v += kl_coef * (math.exp(x) - x - 1)
                d += kl_coef * (-math.exp(x) + 1)
            per_tok[i][t], dtok[i][t] = v * m, d * m
    n = sum(sum(row) for row in mask)
    if reduction == "token_mean":
        s = 1.0 / max(n, 1)
        return sum(map(sum, per_tok)) * s, [[d * s for d in row] for row in dtok]
    if reduction == "seq_mean":
        Ls = [max(sum(row), 1) for row in mask]
        return (sum(sum(per_tok[i]) / Ls[i] for i in range(B)) / B,
                [[d / Ls[i] / B for d in dtok[i]] for i in range(B)])
    if reduction == "sum":
        return sum(map(sum, per_tok)), dtok
    return per_tok, dtok


def make(B, T, device, dtype=torch.float32, per_token_adv=False):
    logp = (-3 * torch.rand(B, T, device=device)).to(dtype)
    old = (logp.float() + 0.3 * torch.randn(B, T, device=device)).to(dtype)  # ratios across both clip edges
    ref = (logp.float() + 0.5 * torch.randn(B, T, device=device)).to(dtype)
    adv = torch.randn(B, T, device=device) if per_token_adv else group_normalize(torch.rand(B, device=device), 1 if B % 2 else 2)
    if not per_token_adv and B % 2:
        adv = torch.randn(B, device=device)
    mask = torch.rand(B, T, device=device) > 0.25
    mask[0, :] = False  # an empty row
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "sum", "none"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_against_scalar_loop(reduction, kl_coef, eps, per_token_adv, device):
    logp, old, adv, mask, ref = make(4, 40, device, per_token_adv=per_token_adv)
    lp = logp.double().requires_grad_()
    loss, stats = grpo_loss(lp, old.double(), adv.double(), mask, eps=eps, ref_logp=ref.double(), kl_coef=kl_coef,
                            reduction=reduction)
    loss.sum().backward()
    want, dwant = loop_grpo(logp.double().tolist(), old.double().tolist(), adv.double().tolist(),
                            mask.double().tolist(), eps, ref.double().tolist(), kl_coef, reduction)
    assert torch.allclose(loss, torch.tensor(want, dtype=torch.float64, device=device), rtol=1e-12, atol=1e-14)
    assert torch.allclose(lp.grad, torch.tensor(dwant, dtype=torch.float64, device=device), rtol=1e-12, atol=1e-14)
    assert 0 < float(stats["clip_frac"]) < 1 and float(stats["ratio_mean"]) > 0
    assert float(stats["kl"]) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T", [(1, 1), (3, 257), (4, 1000), (257, 3)])
@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_dtypes_vs_float64(dtype, B, T, reduction, device):
    logp, old, adv, mask, ref = make(B, T, device, dtype)
    g = torch.randn(B, T, device=device) if reduction == "none" else torch.randn((), device=device)
    res = []
    for cast in (lambda t: t, lambda t: t.double()):
        lp = cast(logp).clone().requires_grad_()
        loss, _ = grpo_loss(lp, cast(old), cast(adv), mask, ref_logp=cast(ref), kl_coef=0.04, reduction=reduction)
        loss.backward(g.to(loss.dtype))
        res.append((loss, lp.grad))
    assert res[0][0].dtype == torch.float32 and res[0][1].dtype == dtype
    assert_no_worse_than_torch(res[0][0], res[1][0], res[0][0], name="loss")
    assert_no_worse_than_torch(res[0][1], res[1][1], res[0][1], name="grad_logp")


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_huge_log_ratio_no_nan_grad(adv_sign, device):
    # |log-ratio| = 1e4: the reference used to give 0 * inf = NaN for the branch max() did not pick
    logp = torch.tensor([[0.0, -1.0, -2.0]], device=device, requires_grad=True)
    old = torch.tensor([[-1e4, -1.0, 1e4]], device=device)
    mask = torch.ones(1, 3, dtype=torch.bool, device=device)
    loss, stats = grpo_loss(logp, old, torch.tensor([adv_sign], device=device), mask, reduction="none")
    loss.sum().backward()
    assert not torch.isnan(loss).any() and not torch.isnan(logp.grad).any()
    if adv_sign > 0:  # ratio >> 1+eps: clipped, constant 1.2 -> zero gradient; ratio ~0: unclipped 0
        assert float(loss[0, 0]) == pytest.approx(-1.2) and logp.grad[0, 0] == 0
        assert torch.isfinite(loss).all()
    else:  # A < 0, ratio saturated at exp(88): PPO's pessimistic branch is ~1.65e38, no gradient past 88
        assert float(loss[0, 0]) == pytest.approx(math.exp(88.0), rel=1e-6) and logp.grad[0, 0] == 0
    assert float(stats["clip_frac"]) > 0


def test_inf_and_nan(device):
    logp, old, adv, mask, ref = make(3, 8, device)
    adv = torch.tensor([0.5, 1.0, -1.0], device=device)
    mask[1, 2] = True
    old2 = old.clone()
    old2[1, 2] = -float("inf")  # log-ratio +inf: same as a huge one, finite
    loss, _ = grpo_loss(logp, old2, adv, mask)
    assert torch.isfinite(loss)
    ref2 = ref.clone()
    ref2[1, 2] = -float("inf")
    assert torch.isfinite(grpo_loss(logp, old, adv, mask, ref_logp=ref2)[0])  # kl_coef 0: KL not in the loss
    # with the KL on: k3 = exp(-inf) + inf - 1 = inf (the reference forbids a sampled token)
    assert grpo_loss(logp, old, adv, mask, ref_logp=ref2, kl_coef=0.1)[0] == float("inf")
    for t in (logp, old, ref):
        bad = t.clone()
        bad[1, 2] = float("nan")
        args = [bad if t is logp else logp, bad if t is old else old]
        loss, _ = grpo_loss(*args, adv, mask, ref_logp=bad if t is ref else ref, kl_coef=0.1)
        assert torch.isnan(loss)
    # masked positions never leak
    mask[2, 5] = False
    dirty = [t.clone() for t in (logp, old, ref)]
    for t in dirty:
        t[2, 5] = float("nan")
    clean = grpo_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, reduction="none")[0]
    assert torch.equal(grpo_loss(dirty[0], dirty[1], adv, mask, ref_logp=dirty[2], kl_coef=0.1,
                                 reduction="none")[0], clean)


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "sum", "none"])
def test_fully_masked(reduction, device):
    logp, old, adv, mask, ref = make(3, 8, device)
    lp = logp.clone().requires_grad_()
    loss, stats = grpo_loss(lp, old, adv, torch.zeros_like(mask), ref_logp=ref, kl_coef=0.1, reduction=reduction)
    loss.sum().backward()
    assert float(loss.abs().sum()) == 0 and torch.equal(lp.grad, torch.zeros_like(lp))
    assert all(float(v) == 0 for v in stats.values())


def test_reference_gradcheck(device):
    logp, old, adv, mask, ref = make(3, 5, device)
    lp = logp.double().requires_grad_()
    for reduction in ("token_mean", "seq_mean"):
        f = lambda x: reference.grpo_loss(x, old.double(), adv.double(), mask, ref_logp=ref.double(),  # noqa: E731
                                          kl_coef=0.1, reduction=reduction)[0]
        assert torch.autograd.gradcheck(f, (lp,))


def test_errors(device):
    logp, old, adv, mask, ref = make(3, 8, device)
    cases = [
        (dict(old_logp=old[:, 1:]), "old_logp"), (dict(advantages=adv[:2]), "advantages"),
        (dict(advantages=adv.long()), "advantages"), (dict(mask=mask[None]), "mask"),
        (dict(ref_logp=ref[:2]), "ref_logp"), (dict(kl_coef=0.1), "ref_logp"),
        (dict(eps=0.2), "eps"), (dict(eps=(0.2, -0.1)), "eps"), (dict(reduction="mean"), "reduction"),
        (dict(advantages=adv.to("meta")), "advantages"), (dict(impl="cuda"), "impl"),
    ]
    for kw, match in cases:
        args = dict(logp=logp, old_logp=old, advantages=adv, mask=mask)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            grpo_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)
