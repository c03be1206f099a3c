"""Issue 22 (library half): hostile-but-honest inputs to the public ops get either a ValueError naming the
argument, or finite results equal to the spec on every impl. One regression test per reproduced bug;
tests/test_properties.py sweeps the same contract with Hypothesis."""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowrl_kernels as fk
from flowrl_kernels import _utils, reference
from helpers import DEVICE, assert_no_worse_than_torch

IMPLS = ["torch", "native", "triton"]
INF, NAN = float("inf"), float("nan")
ROOT = Path(__file__).resolve().parents[1]


def _skip_unavailable(impl):
    if impl == "native" and not fk.native_available():
        pytest.skip("native extension not built")


def _dev(impl):
    """Where ``impl`` runs: Triton on the GPU when there is one (the interpreter is on only without CUDA:
    tests/conftest.py), the CPU otherwise; torch and native on the CPU."""
    return DEVICE if impl == "triton" else "cpu"


def _loss_inputs(B=4, T=7, device="cpu"):
    lp = torch.randn(B, T, device=device) * 0.5 - 2
    mask = torch.rand(B, T, device=device) > 0.3
    mask[:, 0] = True
    return (lp, lp + 0.3 * torch.randn(B, T, device=device), lp + 0.1 * torch.randn(B, T, device=device),
            torch.randn(B, device=device), torch.randn(B, device=device), mask)


# ----------------------------------------------------------------------------------------------------
# linear_token_logprobs(impl="triton") read a strided / expanded fp32 bias as contiguous (2.48 nats off)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["step2", "expanded", "column"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_strided_bias(impl, layout, dtype, device):
    N, H, V = 6, 16, 11
    h, w = torch.randn(N, H, device=device).to(dtype), (torch.randn(V, H, device=device) / 4).to(dtype)
    y = torch.randint(0, V, (N,), device=device)
    # fp32: the case .float() did not copy
    if layout == "step2":
        b = torch.randn(2 * V, device=device).to(dtype)[::2]
    elif layout == "expanded":
        b = torch.randn(1, device=device).to(dtype).expand(V)
    else:
        b = torch.randn(V, 3, device=device).to(dtype)[:, 1]
    assert not b.is_contiguous()
    up = torch.randn(N, dtype=torch.float64, device=device)

    def run(bias, hh, ww, fn):
        ins = [t.detach().requires_grad_() for t in (hh, ww, bias)]
        logp = fn(ins[0], ins[1], y, bias=ins[2])
        return [logp.detach()] + list(torch.autograd.grad((logp.double() * up).sum(), ins))

    ref = run(b.double(), h.double(), w.double(), reference.linear_token_logprobs)
    tor = run(b, h, w, reference.linear_token_logprobs)
    ours = run(b, h, w, lambda *a, **k: fk.linear_token_logprobs(*a, impl=impl, **k))
    for name, o, r, t in zip(["logp", "dh", "dw", "db"], ours, ref, tor):
        assert o.shape == r.shape and o.dtype == t.dtype
        assert_no_worse_than_torch(o, r, t, name=name, ulps=32)


# ----------------------------------------------------------------------------------------------------
# clip: infinite bounds refused everywhere; clip=None the same on every impl; lo beyond saturation
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("clip", [(INF, INF), (INF, None), (None, INF), (0.8, INF), (-INF, 1.2), (NAN, 1.2),
                                  (1.0, 0.0), ("0.8", 1.2), (True, 1.2), (torch.tensor(0.8), 1.2), (0.8,), 1.2])
def test_clip_out_of_contract_is_a_named_value_error(impl, clip):
    _skip_unavailable(impl)
    lp, old, ref, lz, r, m = _loss_inputs()
    with pytest.raises(ValueError, match="clip"):
        fk.flowrl_loss(lp, old, ref, lz, r, m, clip=clip, impl=impl)
    with pytest.raises(ValueError, match="clip"):
        fk.importance_weights(lp, old, m, clip=clip, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("clip", [None, (None, None), (1e30, None), (1e30, 1e40), (-3.0, 2)])
def test_clip_extremes_agree_with_the_spec(impl, clip):
    """clip=None crashed impl='torch' (TypeError); lo above exp(64) clamped differently per impl."""
    _skip_unavailable(impl)
    lp, old, ref, lz, r, m = _loss_inputs(device=_dev(impl))
    spec_clip = (None, None) if clip is None else clip
    lp64 = lp.double().requires_grad_()
    loss64, st64 = reference.flowrl_loss(lp64, old.double(), ref.double(), lz.double(), r.double(), m,
                                         clip=spec_clip)
    g64, = torch.autograd.grad(loss64, lp64)
    x = lp.clone().requires_grad_()
    loss, st = fk.flowrl_loss(x, old, ref, lz, r, m, clip=clip, impl=impl)
    g, = torch.autograd.grad(loss, x)
    assert math.isfinite(float(loss))
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=0)
    torch.testing.assert_close(st["weight"].double(), st64["weight"], rtol=1e-4, atol=0)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-30)
    w, _ = fk.importance_weights(lp, old, m, clip=clip, impl=impl)
    w64, _ = reference.importance_weights(lp.double(), old.double(), m, clip=spec_clip)
    torch.testing.assert_close(w.double(), w64, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------------------------------
# temperature: one range, [1e-4, 1e4], where every impl matches the spec; outside it a ValueError
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1e-4, 3e-3, 1e4])
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_temperature_range_ends_match_the_spec(impl, temperature, scale, device):
    _skip_unavailable(impl)
    if impl == "native" and device == "cuda" and not _utils.native_has("token_logprobs_fwd", "cuda"):
        pytest.skip("no native CUDA kernels in this build")
    x = (torch.randn(3, 2, 37, device=device) * scale).requires_grad_()
    y = torch.randint(0, 37, (3, 2), device=device)
    up = [torch.randn(3, 2, dtype=torch.float64, device=device) for _ in range(2)]

    def run(fn, xx):
        xx = xx.detach().requires_grad_()
        lp, ent = fn(xx, y, temperature=temperature, return_entropy=True)
        loss = (lp.double() * up[0]).sum() + (ent.double() * up[1]).sum()
        return [lp.detach(), ent.detach(), torch.autograd.grad(loss, xx)[0]]

    ref = run(reference.token_logprobs, x.double())
    tor = run(reference.token_logprobs, x)
    ours = run(lambda *a, **k: fk.token_logprobs(*a, impl=impl, **k), x)
    for name, o, r, t in zip(["logp", "entropy", "grad"], ours, ref, tor):
        assert torch.isfinite(o).all(), name
        assert_no_worse_than_torch(o, r, t, name=name, ulps=64)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [1e-4, 0.1, 0.29, 1e4])
def test_linear_temperature_range_matches_the_spec(impl, temperature, device):
    """Triton's forward rebased its running sums with (M_INIT - x) / T, -inf for T < 0.3, times s = 0:
    NaN entropy, and NaN gradients through the saved entropy, at any vocab size (T = 0.1, V = 300)."""
    N, H, V = 5, 16, 300
    h, w = torch.randn(N, H, device=device), torch.randn(V, H, device=device) / 4
    y = torch.randint(0, V, (N,), device=device)
    up = [torch.randn(N, dtype=torch.float64, device=device) for _ in range(2)]

    def run(fn, hh, ww):
        ins = [hh.detach().requires_grad_(), ww.detach().requires_grad_()]
        lp, ent = fn(ins[0], ins[1], y, temperature=temperature, return_entropy=True)
        loss = (lp.double() * up[0]).sum() + (ent.double() * up[1]).sum()
        return [lp.detach(), ent.detach()] + list(torch.autograd.grad(loss, ins))

    ref = run(reference.linear_token_logprobs, h.double(), w.double())
    tor = run(reference.linear_token_logprobs, h, w)
    ours = run(lambda *a, **k: fk.linear_token_logprobs(*a, impl=impl, **k), h, w)
    # the fused path rounds z = logits / T in another order than torch: an error of ~|z| ulps in logp and
    # entropy, and of ~|z| ulps relative in the gradients (p = e^(z - lse))
    z = float((h @ w.t()).abs().max()) / temperature
    for name, o, r, t in zip(["logp", "entropy", "dh", "dw"], ours, ref, tor):
        assert torch.isfinite(o).all(), name
        scale = z * (1.0 if name in ("logp", "entropy") else float(r.abs().max()))
        assert_no_worse_than_torch(o, r, t, name=name, ulps=16, scale=scale)


BAD_TEMPERATURES = [0, -1.0, 9e-5, 1.1e4, 1e-39, 1e-10, 1e300, INF, NAN, None, "1.0", True, torch.tensor(1.0)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", BAD_TEMPERATURES, ids=repr)
def test_temperature_outside_the_range_is_a_named_value_error(impl, temperature):
    _skip_unavailable(impl)
    with pytest.raises(ValueError, match=r"temperature.*\[0\.0001, 10000\]"):
        fk.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature, impl=impl)
    if impl != "native":
        with pytest.raises(ValueError, match="temperature"):
            fk.linear_token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                                     temperature=temperature, impl=impl)


# ----------------------------------------------------------------------------------------------------
# every other numeric argument: the same one check (named, with value and range)
# ----------------------------------------------------------------------------------------------------
NOT_REAL = [None, "1.0", True, torch.tensor(1.0), NAN, INF, -INF]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", NOT_REAL, ids=repr)
def test_numeric_arguments_refused_by_name(impl, value):
    _skip_unavailable(impl)
    lp, old, ref, lz, r, m = _loss_inputs()
    with pytest.raises(ValueError, match="beta"):
        fk.flowrl_loss(lp, old, ref, lz, r, m, beta=value, impl=impl)
    with pytest.raises(ValueError, match="kl_coef"):
        fk.grpo_loss(lp, old, r, m, ref_logp=ref, kl_coef=value, impl=None if impl == "native" else impl)
    with pytest.raises(ValueError, match=r"eps\[1\]"):
        fk.grpo_loss(lp, old, r, m, eps=(0.2, value))
    with pytest.raises(ValueError, match="eps"):
        fk.group_normalize(torch.randn(8), 4, eps=value)
    with pytest.raises(ValueError, match="group_size"):
        fk.group_normalize(torch.randn(8), 4.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ignore_index", [-100.0, True, None, "-100", 2**64, torch.tensor(-100)], ids=repr)
def test_ignore_index_must_be_an_int_on_every_impl(impl, ignore_index):
    """-100.0 was accepted by impl='torch' and failed inside the triton launcher."""
    _skip_unavailable(impl)
    y = torch.tensor([1, -100, 2])
    with pytest.raises(ValueError, match="ignore_index"):
        fk.token_logprobs(torch.randn(3, 5), y, ignore_index=ignore_index, impl=impl)
    if impl != "native":
        with pytest.raises(ValueError, match="ignore_index"):
            fk.linear_token_logprobs(torch.randn(3, 4), torch.randn(5, 4), y, ignore_index=ignore_index, impl=impl)


@pytest.mark.parametrize("eps", [0, 0.0, 1e-6])
@pytest.mark.parametrize("value", [0.1, 1 / 3, -7.3, 1e30])
def test_group_normalize_equal_group_is_exactly_zero(eps, value):
    """eps=0 on a group of equal rewards gave NaN (0 / 0); with an ulp-off mean, +-0.58 instead of 0."""
    r = torch.tensor([value] * 3 + [1.0, 2.0, 4.0])
    for dt in (torch.float32, torch.float64):
        out = fk.group_normalize(r.to(dt), 3, eps=eps)
        assert torch.equal(out[:3], torch.zeros(3, dtype=dt)), out
        x = r[3:].double()
        expect = (x - x.mean()) / (x.std() + eps)
        torch.testing.assert_close(out[3:].double(), expect, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", ["native", "triton"])
def test_float64_mix_errors_name_the_argument(impl):
    _skip_unavailable(impl)
    dev = _dev(impl)
    lp, old, ref, lz, r, m = _loss_inputs(device=dev)
    with pytest.raises(ValueError, match="old_logp has dtype float64"):
        fk.flowrl_loss(lp.bfloat16(), old.double(), ref, lz, r, m, impl=impl)
    with pytest.raises(ValueError, match="ref_logp, log_z have dtype float64"):
        fk.flowrl_loss(lp.bfloat16(), old, ref.double(), lz.double(), r, m, impl=impl)
    with pytest.raises(ValueError, match="old_logp has dtype float64"):
        fk.importance_weights(lp.bfloat16(), old.double(), m, impl=impl)
    with pytest.raises(ValueError, match="logits has dtype float64"):
        fk.token_logprobs(torch.randn(2, 5, dtype=torch.float64, device=dev), torch.zeros(2, dtype=torch.long, device=dev),
                          impl=impl)
    if impl == "triton":
        with pytest.raises(ValueError, match="hidden and weight have dtype float64"):
            fk.linear_token_logprobs(torch.randn(2, 4, device=dev).double(), torch.randn(5, 4, device=dev).double(),
                                     torch.zeros(2, dtype=torch.long, device=dev), impl=impl)


# ----------------------------------------------------------------------------------------------------
# impl selection: forced impl refuses naming what exists; env var / prefer_impl are preferences
# ----------------------------------------------------------------------------------------------------
def _all_ops(device="cpu"):
    lp, old, ref, lz, r, m = _loss_inputs(device=device)
    x, y = torch.randn(3, 9, device=device), torch.randint(0, 9, (3,), device=device)
    h, w = torch.randn(3, 4, device=device), torch.randn(9, 4, device=device)
    return {
        "token_logprobs": lambda **k: fk.token_logprobs(x, y, **k),
        "linear_token_logprobs": lambda **k: fk.linear_token_logprobs(h, w, y, **k),
        "flowrl_loss": lambda **k: fk.flowrl_loss(lp, old, ref, lz, r, m, **k)[0],
        "grpo_loss": lambda **k: fk.grpo_loss(lp, old, r, m, **k)[0],
        "importance_weights": lambda **k: fk.importance_weights(lp, old, m, **k)[0],
        "masked_mean": lambda **k: fk.masked_mean(lp, m, **k),
        "seq_log_ratio": lambda **k: fk.seq_log_ratio(lp, old, m, **k),
        "group_normalize": lambda **k: fk.group_normalize(r, 2, **k),
    }


@pytest.mark.parametrize("pref", IMPLS)
def test_env_impl_is_a_preference_for_all_8_ops(pref, monkeypatch, caplog):
    """FLOWRL_KERNELS_IMPL=native made 5 of the 8 ops refuse (and the trainer die at step 1)."""
    _skip_unavailable(pref)
    ops = _all_ops(_dev(pref))
    monkeypatch.setattr(_utils, "_FALLBACKS_NOTED", set())
    monkeypatch.setenv(_utils.ENV_IMPL, pref)
    with caplog.at_level(logging.WARNING, logger="flowrl_kernels"):
        for name, op in ops.items():
            for _ in range(2):  # said once per op
                out = op()
                assert torch.isfinite(out).all(), name
            has = pref in ("torch", "triton") or name in ("token_logprobs", "flowrl_loss", "importance_weights")
            if pref != "triton" or name != "linear_token_logprobs":  # triton does not follow torch's order of sums
                torch.testing.assert_close(out, op(impl="torch" if not has else pref), rtol=0, atol=0)
    noted = [rec.getMessage() for rec in caplog.records]
    expect = [] if pref != "native" else ["linear_token_logprobs", "grpo_loss", "masked_mean", "seq_log_ratio",
                                          "group_normalize"]
    assert sorted(msg.split(":")[0] for msg in noted) == sorted(f"flowrl_kernels.{n}" for n in expect), noted
    for msg in noted:
        assert "running impl='torch'" in msg and "'torch'" in msg


def test_prefer_impl_and_forced_impl(monkeypatch):
    if not fk.native_available():
        pytest.skip("native extension not built")
    x, y = torch.randn(3, 9), torch.randint(0, 9, (3,))
    monkeypatch.setenv(_utils.ENV_IMPL, "triton")
    with fk.prefer_impl("native"):  # wins over the env var
        assert _utils.resolve_impl(None, x.device, native_op="token_logprobs_fwd") == "native"
        fk.masked_mean(x, x > 0)  # no native masked_mean: runs torch
    assert _utils.resolve_impl(None, x.device, native_op="token_logprobs_fwd") == "triton"
    with fk.prefer_impl(""):
        assert _utils.resolve_impl(None, x.device) == "triton"
    with pytest.raises(ValueError, match="prefer_impl"):
        with fk.prefer_impl("cuda"):
            pass
    # a forced impl the op lacks is refused, naming the impls there are
    for call in (lambda: fk.linear_token_logprobs(torch.randn(3, 4), torch.randn(9, 4), y, impl="native"),
                 lambda: fk.masked_mean(x, x > 0, impl="native")):
        with pytest.raises(ValueError, match=r"this op has 'torch', 'triton' for cpu tensors"):
            call()
    monkeypatch.setenv(_utils.ENV_IMPL, "gpu")
    with pytest.raises(ValueError, match="FLOWRL_KERNELS_IMPL='gpu'"):
        fk.masked_mean(x, x > 0)


@pytest.mark.slow
def test_trainer_step_with_native_preference(tmp_path):
    """FLOWRL_KERNELS_IMPL=native and model.kernel_impl=native crashed step 1 (linear_token_logprobs has
    no native impl, nor do grpo_loss / group_normalize / masked_mean)."""
    if not fk.native_available():
        pytest.skip("native extension not built")
    code = ("from flowrl import train\n"
            f"train.main(['--config', {str(ROOT / 'flowrl' / 'configs' / 'tiny.toml')!r}, '--train.steps=1', "
            "'--eval.prompts=0', '--run.cpu_threads=1', '--model.kernel_impl=native', '--algo.name=grpo'])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FLOWRL_KERNELS_IMPL="native")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len((tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()) == 1
    # the fallbacks are said, once each
    assert res.stderr.count("flowrl_kernels.linear_token_logprobs: the preferred impl 'native'") == 1
