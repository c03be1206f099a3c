"""The native extension flowrl_kernels._C: its ops vs the float64 reference (forward and backward),
the CUDA sources' nvcc compile check, and the package without the extension.

The ops are called directly (torch.ops.flowrl_kernels_native.*), exactly as the public functions call
them for impl="native"; test_token_logprobs.py / test_flowrl_loss.py cover the public functions.
"""
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flowrl_kernels
from flowrl_kernels import reference
from helpers import assert_no_worse_than_torch

ROOT = Path(__file__).resolve().parents[1]
needs_native = pytest.mark.skipif(not flowrl_kernels.native_available(),
                                  reason="native extension not built (pip install --no-build-isolation -e .)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def ops():
    return torch.ops.flowrl_kernels_native


# ----------------------------------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------------------------------
def _logits(N, V, dtype, *, strided, scale=3.0):
    """[N, V] logits; strided=True gives a view with row stride V + 3 and an odd start offset."""
    if strided:
        return (torch.randn(N, V + 3) * scale).to(dtype)[:, 1:V + 1]
    return (torch.randn(N, V) * scale).to(dtype)


def _labels(N, V, *, n_ignored):
    y = torch.randint(0, V, (N,))
    y[torch.randperm(N)[:n_ignored]] = IGNORE
    return y


def _ref_grads(x, y, temperature, gl, ge, *, dtype=None):
    """(logp, entropy, dlogits) of the reference with upstream grads gl, ge; x cast to `dtype` first."""
    xr = x.detach().to(dtype or x.dtype).requires_grad_()
    logp, ent = reference.token_logprobs(xr, y, temperature=temperature, return_entropy=True,
                                         ignore_index=IGNORE)
    (logp * gl.to(logp.dtype) + ent * ge.to(ent.dtype)).sum().backward()
    return logp.detach(), ent.detach(), xr.grad


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V, strided, temperature", [
    (5, 1, False, 1.0),
    (37, 7, True, 0.7),
    (9, 50, False, 1.3),
    (6, 2049, True, 1.0),       # one chunk + 1: the scalar tail of the chunked sweep
    (4, 50257, True, 0.6),      # GPT-2 vocab, odd: unaligned rows
    (3, 151936, False, 1.0),    # Qwen vocab: 75 chunks, the running max grows across chunks
])
def test_token_logprobs_matches_reference(dtype, N, V, strided, temperature):
    x = _logits(N, V, dtype, strided=strided)
    y = _labels(N, V, n_ignored=1)
    logp, lse, ent = ops().token_logprobs_fwd(x, y, temperature, True, IGNORE)
    assert logp.dtype == lse.dtype == ent.dtype == torch.float32 and logp.shape == (N,)

    gl, ge = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    ref_logp, ref_ent, ref_grad = _ref_grads(x, y, temperature, gl, ge, dtype=torch.float64)
    t_logp, t_ent, t_grad = _ref_grads(x, y, temperature, gl, ge)  # PyTorch at the input dtype
    assert_no_worse_than_torch(logp, ref_logp, t_logp, name="logp")
    assert_no_worse_than_torch(ent, ref_ent, t_ent, name="entropy")
    ref_lse = torch.logsumexp(x.double() / temperature, -1)
    t_lse = torch.logsumexp(x.float() / temperature, -1)
    assert_no_worse_than_torch(lse, ref_lse, t_lse, name="lse")

    grad = ops().token_logprobs_bwd(x, y, lse, ent, gl.float(), ge.float(), temperature, IGNORE)
    assert grad.dtype == dtype and grad.shape == (N, V) and grad.is_contiguous()
    assert_no_worse_than_torch(grad, ref_grad, t_grad, name="dlogits")
    assert (grad[y == IGNORE] == 0).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_without_entropy(dtype):
    N, V, T = 11, 3001, 0.9
    x, y = _logits(N, V, dtype, strided=True), _labels(N, V, n_ignored=3)
    logp, lse, ent = ops().token_logprobs_fwd(x, y, T, False, IGNORE)
    assert ent.shape == (0,)
    gl = torch.randn(N, dtype=torch.float64)
    ref_logp, _, ref_grad = _ref_grads(x, y, T, gl, torch.zeros(N), dtype=torch.float64)
    t_logp, _, t_grad = _ref_grads(x, y, T, gl, torch.zeros(N))
    assert_no_worse_than_torch(logp, ref_logp, t_logp, name="logp")
    grad = ops().token_logprobs_bwd(x, y, lse, ent, gl.float(), None, T, IGNORE)
    assert_no_worse_than_torch(grad, ref_grad, t_grad, name="dlogits")


@needs_native
def test_token_logprobs_edge_rows():
    """-inf logits (masked vocab) give finite entropy and zero grad there; an all-ignored batch, N = 0,
    a stride-0 upstream gradient, and a custom ignore_index."""
    N, V = 4, 40
    x = torch.randn(N, V)
    x[:, 5:9] = -math.inf
    y = torch.tensor([0, 1, 2, 3])
    logp, lse, ent = ops().token_logprobs_fwd(x, y, 1.0, True, IGNORE)
    gl, ge = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    ref_logp, ref_ent, ref_grad = _ref_grads(x, y, 1.0, gl, ge, dtype=torch.float64)
    t_logp, t_ent, t_grad = _ref_grads(x, y, 1.0, gl, ge)
    assert torch.isfinite(ent).all()
    assert_no_worse_than_torch(ent, ref_ent, t_ent, name="entropy")
    grad = ops().token_logprobs_bwd(x, y, lse, ent, gl.float(), ge.float(), 1.0, IGNORE)
    assert_no_worse_than_torch(grad, ref_grad, t_grad, name="dlogits")
    assert (grad[:, 5:9] == 0).all()

    # every row ignored (custom ignore_index), upstream grad expanded from a scalar (stride 0)
    y_ign = torch.full((N,), 7)
    logp, lse, ent = ops().token_logprobs_fwd(x, y_ign, 1.0, True, 7)
    assert (logp == 0).all() and (ent == 0).all() and torch.isfinite(lse).all()
    grad = ops().token_logprobs_bwd(x, y_ign, lse, ent, torch.ones(()).expand(N), None, 1.0, 7)
    assert (grad == 0).all()

    empty = ops().token_logprobs_fwd(torch.randn(0, V), torch.zeros(0, dtype=torch.long), 1.0, True, IGNORE)
    assert all(t.shape == (0,) for t in empty)

    for bad in (V + 1, -1):  # V itself is the vocab-shard sentinel (below); anything else poisons its row
        lab = torch.tensor([0, 1, bad, 3])
        lp, lse, ent = ops().token_logprobs_fwd(x, lab, 1.0, True, IGNORE)
        assert torch.isnan(lp[2]) and torch.isnan(lse[2]) and torch.isnan(ent[2])
        assert torch.isfinite(lp[[0, 1, 3]]).all() and torch.isfinite(ent[[0, 1, 3]]).all()
        g = ops().token_logprobs_bwd(x, lab, lse, ent, torch.ones(N), torch.ones(N), 1.0, IGNORE)
        assert torch.isnan(g[2]).all() and torch.isfinite(g[[0, 1, 3]]).all()
    # label == V: "the target is in another vocab shard" (tensor-parallel vocab): logp NaN, lse and
    # entropy as for any row, and no one-hot term in the backward
    lab = torch.tensor([0, V, 2, V])
    lp, lse, ent = ops().token_logprobs_fwd(x, lab, 1.0, True, IGNORE)
    assert torch.isnan(lp[1]) and torch.isnan(lp[3]) and torch.isfinite(lp[[0, 2]]).all()
    want_lse = torch.logsumexp(x.double(), -1)
    assert torch.allclose(lse.double(), want_lse, rtol=0, atol=1e-5)
    assert torch.allclose(ent.double(), reference.token_logprobs(x.double(), torch.zeros(N, dtype=torch.long),
                                                                 return_entropy=True)[1], rtol=0, atol=1e-5)
    gl = torch.randn(N)
    g = ops().token_logprobs_bwd(x, lab, lse, ent, gl, None, 1.0, IGNORE)
    want = -torch.softmax(x.double(), -1) * gl.double()[:, None]
    want[0, 0] += gl[0]
    want[2, 2] += gl[2]
    assert torch.allclose(g.double(), want, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="unit stride"):
        ops().token_logprobs_fwd(torch.randn(V, N).t(), y, 1.0, False, IGNORE)
    # the per-row inputs of the backward are checked (shape, float dtype, device), not only the labels
    with pytest.raises(RuntimeError, match="lse must be a float tensor"):
        ops().token_logprobs_bwd(x, y, torch.zeros(N, dtype=torch.long), ent, gl, None, 1.0, IGNORE)
    with pytest.raises(RuntimeError, match=r"grad_entropy must be \[N\]"):
        ops().token_logprobs_bwd(x, y, lse, ent, gl, torch.ones(N + 1), 1.0, IGNORE)


@needs_native
def test_token_logprobs_nan_propagates():
    x = torch.randn(3, 5000)
    x[1, 4321] = math.nan
    logp, lse, ent = ops().token_logprobs_fwd(x, torch.tensor([0, 1, 2]), 1.0, True, IGNORE)
    assert torch.isnan(lse[1]) and torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(lse[[0, 2]]).all()


CAPABILITY_SCRIPT = textwrap.dedent("""
    import torch, flowrl_kernels
    from flowrl_kernels import reference
    assert flowrl_kernels.native_available()
    print(flowrl_kernels._C.cpu_capability())
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for V in (1, 33, 4099):
            x = (torch.randn(7, V + 1) * 3).to(dt)[:, 1:]
            y = torch.randint(0, V, (7,)); y[2] = -100
            logp, lse, ent = torch.ops.flowrl_kernels_native.token_logprobs_fwd(x, y, 0.8, True, -100)
            xr = x.double().requires_grad_()
            rl, re = reference.token_logprobs(xr, y, temperature=0.8, return_entropy=True)
            g = torch.randn(7, dtype=torch.float64)
            (rl * g + re * g).sum().backward()
            grad = torch.ops.flowrl_kernels_native.token_logprobs_bwd(x, y, lse, ent, g.float(), g.float(), 0.8, -100)
            tol = 1e-5 if dt == torch.float32 else 1e-2
            assert (logp - rl).abs().max() < 1e-5 and (ent - re).abs().max() < 1e-5, (dt, V)
            assert (grad.double() - xr.grad).abs().max() < tol * 4, (dt, V)
    print("ok")
""")


@needs_native
@pytest.mark.parametrize("cap, expect", [("default", "DEFAULT"), ("avx2", "AVX2")])
def test_cpu_capability_variants(cap, expect):
    """The kernels are compiled once per CPU capability; ATEN_CPU_CAPABILITY lowers the choice, so the
    variants this machine does not pick by default are checked too (loose bounds: the tight ones are
    above, on the default variant)."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX") and cap != "default":
        pytest.skip("CPU without AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CAPABILITY_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [expect, "ok"]


@needs_native
def test_opcheck():
    """torch.library.opcheck: schema, fake (Meta) kernels vs the real ones, aot dispatch with dynamic shapes."""
    x, y = torch.randn(5, 33)[:, 1:], torch.tensor([3, -100, 0, 31, 7])
    torch.library.opcheck(ops().token_logprobs_fwd.default, (x, y, 0.9, True, IGNORE))
    torch.library.opcheck(ops().token_logprobs_fwd.default, (x.bfloat16(), y, 1.1, False, IGNORE))
    _, lse, ent = ops().token_logprobs_fwd(x, y, 0.9, True, IGNORE)
    torch.library.opcheck(ops().token_logprobs_bwd.default, (x, y, lse, ent, torch.randn(5), torch.randn(5), 0.9, IGNORE))
    torch.library.opcheck(ops().token_logprobs_bwd.default, (x, y, lse, ent, torch.randn(5), None, 0.9, IGNORE))
    p, mask = torch.randn(4, 9), torch.rand(4, 9) > 0.5
    args = (p, p, p.half(), torch.randn(4), torch.randn(4), mask, 1.0, 1, -0.2, 0.2)
    torch.library.opcheck(ops().flowrl_loss_fwd.default, args)
    o = ops().flowrl_loss_fwd(*args)
    torch.library.opcheck(ops().flowrl_loss_bwd.default, (o[0], o[1], o[2], o[6], mask, torch.bfloat16))


@needs_native
def test_fake_kernels_under_compile():
    """Meta kernels give shapes (symbolic ones under dynamic=True) so the ops trace in torch.compile."""
    def f(x, y):
        logp, lse, ent = ops().token_logprobs_fwd(x, y, 1.0, True, IGNORE)
        return ops().token_logprobs_bwd(x, y, lse, ent, torch.ones_like(logp), torch.ones_like(ent), 1.0, IGNORE)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for N, V in [(3, 17), (5, 29)]:
        x, y = torch.randn(N, V), torch.randint(0, V, (N,))
        torch.testing.assert_close(compiled(x, y), f(x, y))

    with torch._subclasses.fake_tensor.FakeTensorMode():
        p = torch.randn(4, 9, dtype=torch.bfloat16)
        outs = ops().flowrl_loss_fwd(p, p, p, torch.randn(4), torch.randn(4), torch.ones(4, 9, dtype=torch.bool),
                                     1.0, 1, -0.2, 0.2)
        assert all(o.shape == (4,) and o.dtype == torch.float32 for o in outs)
        g, gz = ops().flowrl_loss_bwd(outs[0], outs[1], outs[2], outs[6], torch.ones(4, 9), torch.bfloat16)
        assert g.shape == (4, 9) and g.dtype == torch.bfloat16 and gz.shape == (4,)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, V, temperature", [(2, 9, 1, 1.0), (3, 6, 50257, 0.7), (2, 3, 151936, 1.2)])
def test_public_token_logprobs_native(dtype, B, T, V, temperature):
    """flowrl_kernels.token_logprobs(impl="native") on next-token views logits[:, :-1] (read in place:
    row stride V, a 2-D view of a 3-D tensor), ignored positions, logp and entropy gradients."""
    if not hasattr(flowrl_kernels, "token_logprobs"):
        pytest.skip("flowrl_kernels.token_logprobs not merged yet")
    x = (torch.randn(B, T, V) * 2).to(dtype)
    y = torch.randint(0, V, (B, T))
    y[0, 2] = IGNORE
    xs, ys = x[:, :-1], y[:, 1:]
    gl, ge = torch.randn(B, T - 1, dtype=torch.float64), torch.randn(B, T - 1, dtype=torch.float64)

    def run(fn, xin):
        xr = xin.detach().clone().requires_grad_()
        logp, ent = fn(xr[:, :-1], ys)
        (logp * gl.to(logp.dtype) + ent * ge.to(ent.dtype)).sum().backward()
        return logp.detach(), ent.detach(), xr.grad

    kw = dict(temperature=temperature, return_entropy=True, ignore_index=IGNORE)
    native = run(lambda a, b: flowrl_kernels.token_logprobs(a, b, impl="native", **kw), x)
    ref64 = run(lambda a, b: reference.token_logprobs(a, b, **kw), x.double())
    ref_dt = run(lambda a, b: reference.token_logprobs(a, b, **kw), x)
    for name, out, r64, rdt in zip(["logp", "entropy", "dlogits"], native, ref64, ref_dt):
        assert_no_worse_than_torch(out, r64, rdt, name=name)
    assert native[2].dtype == dtype and (native[2][:, -1] == 0).all()  # the last position is not read
    # the CPU default is native once built
    assert torch.equal(flowrl_kernels.token_logprobs(xs, ys, **kw)[0], native[0])


@needs_native
@pytest.mark.parametrize("importance", ["none", "sequence", "sequence_mean"])
def test_public_flowrl_loss_native(importance):
    if not hasattr(flowrl_kernels, "flowrl_loss"):
        pytest.skip("flowrl_kernels.flowrl_loss not merged yet")
    B, T = 7, 23
    logp, old, ref, log_z, rewards, mask = _loss_inputs(B, T, torch.bfloat16, "bool", strided=True)

    def run(impl, cd):
        lp = logp.detach().to(cd).requires_grad_()
        lz = log_z.detach().to(cd if cd == torch.float64 else torch.float32).requires_grad_()
        fn = reference.flowrl_loss if impl == "ref" else (
            lambda *a, **k: flowrl_kernels.flowrl_loss(*a, impl=impl, **k))
        loss, stats = fn(lp, old.to(cd), ref.to(cd), lz, rewards.to(lz.dtype), mask, beta=10.0,
                         importance=importance, clip=(0.8, 1.25), reduction="mean")
        loss.backward()
        return loss.detach(), stats, lp.grad, lz.grad

    nat, r64, rdt = run("native", torch.bfloat16), run("ref", torch.float64), run("ref", torch.bfloat16)
    assert_no_worse_than_torch(nat[0], r64[0], rdt[0], name="loss")
    assert_no_worse_than_torch(nat[2], r64[2], rdt[2], name="grad_logp")
    assert_no_worse_than_torch(nat[3], r64[3], rdt[3], name="grad_log_z")
    assert abs(float(nat[1]["clip_frac"]) - float(r64[1]["clip_frac"])) < 1e-6  # a count / B in fp32


# ----------------------------------------------------------------------------------------------------
# flowrl_loss
# ----------------------------------------------------------------------------------------------------
IMPORTANCE = {"none": 0, "sequence": 1, "sequence_mean": 2}


def _loss_inputs(B, T, dtype, mask_kind, *, strided):
    def mk():
        t = -torch.rand(B, T + 2 if strided else T) * 3
        return (t[:, 1:T + 1] if strided else t).to(dtype)

    logp, old, ref = mk(), mk(), mk()
    old = (logp.float() + 0.05 * torch.randn(B, T)).to(dtype)  # ratios near 1, some clipped
    if mask_kind == "bool":
        mask = torch.rand(B, T) > 0.3
        mask[1] = False  # an empty row
    else:
        mask = torch.rand(B, T) * (torch.rand(B, T) > 0.3)
        mask[1] = 0.0
    for t in (logp, old, ref):  # masked positions must never leak in
        t[mask == 0] = torch.tensor(math.nan, dtype=dtype)
    return logp, old, ref, torch.randn(B), torch.randn(B), mask


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("importance", ["none", "sequence", "sequence_mean"])
@pytest.mark.parametrize("mask_kind, clip, strided", [
    ("bool", (0.8, 1.2), False),
    ("float", (None, 1.5), True),
    ("bool", (0.5, None), True),
])
def test_flowrl_loss_matches_reference(dtype, importance, mask_kind, clip, strided):
    B, T, beta = 9, 37, 15.0
    logp, old, ref, log_z, rewards, mask = _loss_inputs(B, T, dtype, mask_kind, strided=strided)
    log_lo, log_hi = reference._log_clip(clip)
    per_seq, delta, weight, clipped, lp_bar, ref_bar, length = ops().flowrl_loss_fwd(
        logp, old, ref, log_z, rewards, mask, beta, IMPORTANCE[importance], log_lo, log_hi)

    def run(cd):
        lp = logp.detach().to(cd).requires_grad_()
        lz = log_z.detach().to(torch.float64 if cd == torch.float64 else torch.float32).requires_grad_()
        loss, stats = reference.flowrl_loss(lp, old.to(cd), ref.to(cd), lz, rewards.to(lz.dtype), mask,
                                            beta=beta, importance=importance, clip=clip, reduction="none")
        g = torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (loss * g.to(loss.dtype)).sum().backward()
        return loss.detach(), stats, lp.grad, lz.grad, g

    ref_loss, ref_stats, ref_glp, ref_glz, g = run(torch.float64)
    t_loss, t_stats, t_glp, t_glz, _ = run(dtype)
    assert_no_worse_than_torch(per_seq, ref_loss, t_loss, name="per_seq")
    for name, key, out in [("delta", "delta", delta), ("weight", "weight", weight),
                           ("lp_bar", "logp_mean", lp_bar), ("ref_bar", "ref_logp_mean", ref_bar)]:
        assert_no_worse_than_torch(out, ref_stats[key], t_stats[key], name=name)
    m = mask.double()
    torch.testing.assert_close(length, m.sum(-1).float(), rtol=1e-6, atol=1e-6)
    # clipped: the raw log-ratio outside [log_lo, log_hi] on non-empty rows (count == clip_frac * valid)
    n_valid = int((m.sum(-1) != 0).sum())
    assert int(clipped.sum()) == round(float(ref_stats["clip_frac"]) * n_valid)
    assert set(clipped.tolist()) <= {0.0, 1.0} and (clipped[1] == 0) and (weight[1] == 0)

    grad_logp, grad_log_z = ops().flowrl_loss_bwd(g.float(), delta, weight, length, mask, dtype)
    assert grad_logp.dtype == dtype and grad_logp.shape == (B, T) and grad_log_z.dtype == torch.float32
    assert_no_worse_than_torch(grad_log_z, ref_glz, t_glz, name="grad_log_z")
    assert_no_worse_than_torch(grad_logp, ref_glp, t_glp, name="grad_logp")


# ----------------------------------------------------------------------------------------------------
# the package without the extension
# ----------------------------------------------------------------------------------------------------
NO_NATIVE_SCRIPT = textwrap.dedent("""
    import sys, warnings
    BLOCK = {block}
    if BLOCK:  # as if the build had failed: the module is missing
        sys.modules["flowrl_kernels._C"] = None
    import torch, flowrl_kernels
    from flowrl_kernels import _utils
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert not flowrl_kernels.native_available()
        assert not flowrl_kernels.native_available()  # cached: one warning at most
    print(len([x for x in w if "native extension not available" in str(x.message)]))
    assert _utils.resolve_impl(None, torch.device("cpu"), native_op="token_logprobs_fwd") == "torch"
    x, y = torch.randn(3, 11), torch.tensor([1, 2, -100])
    if hasattr(flowrl_kernels, "token_logprobs"):
        out = flowrl_kernels.token_logprobs(x, y)
    else:
        out = flowrl_kernels.reference.token_logprobs(x, y)
    assert torch.isfinite(out).all()
    print("ok")
""")


@pytest.mark.parametrize("how", ["skip_env", "missing_module"])
def test_package_works_without_extension(how):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FLOWRL_KERNELS_QUIET", None)
    if how == "skip_env":
        env["FLOWRL_KERNELS_SKIP_NATIVE"] = "1"
    out = subprocess.run([sys.executable, "-c", NO_NATIVE_SCRIPT.format(block=how == "missing_module")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    n_warnings, status = out.stdout.split()
    # an explicit opt-out is silent; a missing extension warns exactly once
    assert (int(n_warnings), status) == ((0 if how == "skip_env" else 1), "ok")


# ----------------------------------------------------------------------------------------------------
# CUDA sources: compile with nvcc (no GPU, no torch needed) and report registers / spills
# ----------------------------------------------------------------------------------------------------
def _nvcc():
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_cuda_kernels_compile(arch, tmp_path, capsys):
    """csrc/cuda/*.cu compile with nvcc alone, without spills (ptxas -v)."""
    nvcc = _nvcc()
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        out = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-c", str(cu),
                              "-o", str(tmp_path / (cu.stem + ".o"))], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-4000:]
        report = []
        for fn, body in re.findall(r"Compiling entry function '(\w+)' for '\w+'\n(.*?)(?=ptxas info\s+: Compiling|\Z)",
                                   out.stderr, flags=re.S):
            regs = int(re.search(r"Used (\d+) registers", body).group(1))
            spill = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", body)]
            kernel = re.search(r"\d(token_logprobs_[a-z]+_kernel)I(\w+?)E", fn)  # name<type> from the mangling
            report.append((f"{kernel.group(1)}<{kernel.group(2).lstrip('0123456789_')}>" if kernel else fn, regs, spill))
        assert report, out.stderr
        with capsys.disabled():
            print(f"\n[nvcc {arch}] {cu.name}: " + "; ".join(f"{k} {r} regs, spill {s[0]}+{s[1]} B"
                                                           for k, r, s in report))
        assert all(s == [0, 0] for _, _, s in report), report
        assert all(r <= 64 for _, r, _ in report), report  # full occupancy at 256 threads/block needs <= 64


@pytest.mark.skipif(_nvcc() is None or shutil.which("c++") is None, reason="nvcc / c++ not found")
def test_cuda_bindings_compile_against_torch_headers(tmp_path):
    """csrc/cuda_bindings.cpp only builds where torch has CUDA; check its syntax against the installed
    torch headers anyway (a CPU wheel lacks the one CMake-generated c10/cuda header: stub it)."""
    inc = Path(torch.__file__).parent / "include"
    cuda_inc = Path(_nvcc()).parent.parent / "include"
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    out = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", "-isystem", str(tmp_path), "-isystem", str(inc),
                          "-isystem", str(inc / "torch" / "csrc" / "api" / "include"), "-isystem", str(cuda_inc),
                          "-I", str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda_bindings.cpp")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
