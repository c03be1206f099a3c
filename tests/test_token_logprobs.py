"""token_logprobs: Triton kernels (interpreter on CPU) vs the float64 reference, checks, torch.compile.

Bound (tests/helpers.py): kernel error vs float64 <= 2 x PyTorch's error at the same dtype + 8 ulps.
"""
import inspect

import pytest
import torch

import flowrl_kernels
from flowrl_kernels import reference, token_logprobs
from flowrl_kernels._utils import native_has
from helpers import DEVICE, assert_no_worse_than_torch

import flowrl_kernels.ops.token_logprobs as tlp_mod

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(shape, dtype, device, scale=4.0):
    # scale 4: a peaked softmax (max p ~ 0.5 at V=1000), as LM logits are; exercises lse >> H
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _labels(shape, V, device, ignore_frac=0.25, ignore_index=-100, dtype=torch.int64):
    y = torch.randint(0, V, shape, device=device)
    y[torch.rand(shape, device=device) < ignore_frac] = ignore_index
    return y.to(dtype)


def _fwd_bwd(fn, x, y, glp, gent, **kw):
    x = x.detach().requires_grad_()
    lp, ent = fn(x, y, return_entropy=True, **kw)
    (g,) = torch.autograd.grad((lp * glp).sum() + (ent * gent).sum(), x)
    return lp, ent, g


def check_against_reference(x, y, *, temperature=1.0, ignore_index=-100, name=""):
    """Kernel (impl=triton) vs float64 reference, with PyTorch at x.dtype as the error yardstick."""
    glp = torch.randn(y.shape, device=x.device)
    gent = torch.randn(y.shape, device=x.device)
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    out = _fwd_bwd(lambda *a, **k: token_logprobs(*a, impl="triton", **k), x, y, glp, gent, **kw)
    ref = _fwd_bwd(reference.token_logprobs, x.double(), y, glp.double(), gent.double(), **kw)
    tor = _fwd_bwd(reference.token_logprobs, x, y, glp, gent, **kw)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32 and out[2].dtype == x.dtype
    assert out[2].shape == x.shape
    for o, r, t, what in zip(out, ref, tor, ("logp", "entropy", "grad")):
        assert_no_worse_than_torch(o, r, t, name=f"{name} {what}")
    valid = y != ignore_index
    assert (out[0][~valid] == 0).all() and (out[1][~valid] == 0).all()
    assert (out[2][~valid] == 0).all()
    return out


# ----------------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------------
# (N, V): V = 1 and 7 (a block smaller than a warp), 1000 (one masked block), 4100 (two full 2048-blocks
# + a 4-wide tail), 50257 (odd: no 16-byte loads, 24 blocks + tail)
CASES = [(5, 1), (37, 7), (23, 1000), (3, 4100), (3, 50257)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", CASES)
def test_fwd_bwd_2d(N, V, dtype, device):
    x = _logits((N, V), dtype, device)
    check_against_reference(x, _labels((N,), V, device), name=f"{dtype} N={N} V={V}")


def test_qwen_vocab_bf16(device):
    # V = 151936 (Qwen2.5), 74 full blocks + a tail; 2 rows keep the interpreter under ~2 s
    x = _logits((2, 151936), torch.bfloat16, device)
    check_against_reference(x, torch.randint(0, 151936, (2,), device=device), name="V=151936")


@pytest.mark.parametrize("dtype", DTYPES)
def test_temperature_3d_int32_labels(dtype, device):
    # 3-D [B, T, V]; temperature applies to logp AND entropy; int32 labels
    x = _logits((3, 5, 301), dtype, device)
    y = _labels((3, 5), 301, device, dtype=torch.int32)
    for t in (0.7, 1.3):
        check_against_reference(x, y, temperature=t, name=f"T={t}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_views(dtype, device):
    # logits[:, :-1] of a [B, T+1, V] buffer (leading dims not mergeable -> (b, t) strides in the kernel),
    # a row-strided 2-D slice, a transposed leading pair, and a 4-D non-mergeable view (one copy)
    V = 257
    buf = _logits((2, 8, V), dtype, device)
    ids = torch.randint(0, V, (2, 8), device=device)
    x, y = buf[:, :-1], ids[:, 1:]
    assert x.stride() == (8 * V, V, 1)
    check_against_reference(x, y, name="x[:, :-1]")
    flat = _logits((19, V + 3), dtype, device)[::2, 3:]
    check_against_reference(flat, _labels((10,), V, device), name="row-strided")
    tr = buf.transpose(0, 1)
    check_against_reference(tr, _labels(tr.shape[:-1], V, device), name="transposed")
    four = _logits((2, 3, 4, V), dtype, device)[:, ::2, 1:]
    check_against_reference(four, _labels(four.shape[:-1], V, device), name="4-D")


def test_logp_only_and_ignore_index(device):
    # return_entropy=False path (no entropy state in either kernel); a custom ignore_index that is also
    # a valid token id (0); a fully ignored input
    V = 129
    x = _logits((11, V), torch.float32, device).requires_grad_()
    y = _labels((11,), V, device, ignore_frac=0.3, ignore_index=0)
    g = torch.randn(11, device=device)
    lp = token_logprobs(x, y, ignore_index=0, impl="triton")
    (gx,) = torch.autograd.grad((lp * g).sum(), x)
    x64 = x.detach().double().requires_grad_()
    rlp = reference.token_logprobs(x64, y, ignore_index=0)
    (rg,) = torch.autograd.grad((rlp * g.double()).sum(), x64)
    tlp = reference.token_logprobs(x.detach().requires_grad_(), y, ignore_index=0)
    assert_no_worse_than_torch(lp, rlp, tlp, name="logp")
    assert_no_worse_than_torch(gx, rg, rg.float(), name="grad")
    assert (lp[y == 0] == 0).all() and (gx[y == 0] == 0).all()
    y_all = torch.full((11,), -100, device=device)
    lp, ent = token_logprobs(x, y_all, return_entropy=True, impl="triton")
    (gx,) = torch.autograd.grad((lp * g).sum() + ent.sum(), x)
    assert (lp == 0).all() and (ent == 0).all() and (gx == 0).all()


def test_entropy_only_gradient(device):
    # logp unused downstream: its upstream gradient arrives as None (or zeros) and must count as 0
    x = _logits((9, 77), torch.float16, device).requires_grad_()
    y = _labels((9,), 77, device)
    g = torch.randn(9, device=device)
    _, ent = token_logprobs(x, y, return_entropy=True, temperature=0.8, impl="triton")
    (gx,) = torch.autograd.grad((ent * g).sum(), x)
    x64 = x.detach().double().requires_grad_()
    _, rent = reference.token_logprobs(x64, y, return_entropy=True, temperature=0.8)
    (rg,) = torch.autograd.grad((rent * g.double()).sum(), x64)
    xt = x.detach().requires_grad_()
    _, tent = reference.token_logprobs(xt, y, return_entropy=True, temperature=0.8)
    (tg,) = torch.autograd.grad((tent * g).sum(), xt)
    assert_no_worse_than_torch(gx, rg, tg, name="entropy-only grad")


def test_temperature_is_a_runtime_arg():
    # a new temperature must not recompile: the only constexprs are the block size and feature flags
    for kernel, flags in ((tlp_mod._token_logprobs_fwd_kernel, {"BLOCK_V", "RETURN_ENTROPY"}),
                          (tlp_mod._token_logprobs_bwd_kernel, {"BLOCK_V", "HAS_GENT"})):
        fn = getattr(kernel, "fn", kernel)  # JITFunction and the interpreter's wrapper both keep .fn
        sig = inspect.signature(fn)
        const = {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}
        assert const == flags and "inv_temp" in sig.parameters


def test_nan_propagates_and_neg_inf_is_exact(device):
    # a NaN logit makes its row NaN (never a silently finite number), other rows stay exact;
    # -inf logits (masked vocab) are exact: same outputs as dropping those entries, zero grad there
    V = 300
    x = _logits((6, V), torch.float32, device)
    y = torch.randint(0, V, (6,), device=device)
    x[1, 17] = float("nan")
    masked = torch.zeros(V, dtype=torch.bool, device=device)
    masked[::3] = True
    x[3, masked] = float("-inf")
    y[3] = 1  # an unmasked token
    xg = x.clone().requires_grad_()
    lp, ent = token_logprobs(xg, y, return_entropy=True, impl="triton")
    (g,) = torch.autograd.grad(lp.sum() + ent.sum(), xg)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1]) and torch.isnan(g[1]).all()
    keep = torch.tensor([0, 2, 4, 5], device=device)
    assert torch.isfinite(lp[keep]).all() and torch.isfinite(g[keep]).all()
    # row 3 vs the reference on the kept vocab entries
    x3 = x[3:4, ~masked].double().requires_grad_()
    y3 = torch.tensor([int((~masked[:1]).sum())], device=device)  # index of token 1 among kept entries
    rlp, rent = reference.token_logprobs(x3, y3, return_entropy=True)
    (rg,) = torch.autograd.grad(rlp.sum() + rent.sum(), x3)
    assert torch.allclose(lp[3].double(), rlp[0], rtol=0, atol=1e-5)
    assert torch.allclose(ent[3].double(), rent[0], rtol=0, atol=1e-5)
    assert (g[3, masked] == 0).all()
    assert torch.allclose(g[3, ~masked].double(), rg[0], rtol=0, atol=1e-6)
    # the reference agrees (entropy of a row with -inf logits is finite, its grad has no NaN)
    x64 = x[3:4].double().requires_grad_()
    r2lp, r2ent = reference.token_logprobs(x64, y[3:4], return_entropy=True)
    (r2g,) = torch.autograd.grad(r2lp.sum() + r2ent.sum(), x64)
    assert torch.allclose(r2ent, rent) and torch.isfinite(r2g).all()


def test_outputs_fully_written_and_grid_chunks(device, monkeypatch):
    # outputs start as NaN (FLOWRL_KERNELS_POISON): every row must be written; MAX_GRID = 4 forces the
    # row0 chunking that N >= 2^31 rows takes on a GPU
    monkeypatch.setattr(tlp_mod, "MAX_GRID", 4)
    assert flowrl_kernels._utils.poison_enabled()
    x = _logits((11, 33), torch.bfloat16, device)
    out = check_against_reference(x, _labels((11,), 33, device), name="chunked")
    assert all(torch.isfinite(o).all() for o in out)


IMPLS = ["torch", "triton",
         pytest.param("native", marks=pytest.mark.skipif(not native_has("token_logprobs_fwd", DEVICE),
                                                         reason=f"native extension without a {DEVICE} kernel"))]


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_labels_poison_their_row(impl, device, monkeypatch):
    # The documented policy for an unchecked label outside [0, V) (GPU without validate=True; here the
    # CPU check is bypassed to run what CUDA runs): NaN logp, NaN entropy, NaN gradient row, in every
    # impl; never an out-of-bounds read, never a finite logp. V itself is out of range too (it is the
    # vocab-shard sentinel only under process_group=). Other rows are untouched.
    monkeypatch.setattr(tlp_mod, "check_labels_in_range", lambda *a, **k: None)
    V = 10
    x = _logits((7, V), torch.float32, device)
    y = torch.tensor([1, V, -5, -100, V + 3, -1, 9], device=device)  # -100 = ignore_index
    bad, good = [1, 2, 4, 5], [0, 6]
    glp, gent = torch.randn(7, device=device), torch.randn(7, device=device)
    lp, ent, g = _fwd_bwd(lambda *a, **k: token_logprobs(*a, impl=impl, **k), x, y, glp, gent)
    assert torch.isnan(lp[bad]).all() and torch.isnan(ent[bad]).all() and torch.isnan(g[bad]).all()
    assert lp[3] == 0 and ent[3] == 0 and (g[3] == 0).all()
    ref = _fwd_bwd(reference.token_logprobs, x[good].double(), y[good], glp[good].double(), gent[good].double())
    tor = _fwd_bwd(reference.token_logprobs, x[good], y[good], glp[good], gent[good])
    for o, r, t, name in zip((lp[good], ent[good], g[good]), ref, tor, ("logp", "entropy", "grad")):
        assert_no_worse_than_torch(o, r, t, name=f"{impl} {name} of the in-range rows")


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def _xy(device, V=7, N=4):
    return torch.randn(N, V, device=device), torch.randint(0, V, (N,), device=device)


@pytest.mark.parametrize("case,match", [
    ("shape", "labels has shape"),
    ("logits_dtype", "logits has dtype"),
    ("float64_triton", "float64"),
    ("labels_dtype", "labels has dtype"),
    ("device", "device"),
    ("vocab_stride", "stride 1"),
    ("empty_vocab", "empty last"),
    ("temp_zero", "temperature"),
    ("temp_neg", "temperature"),
    ("temp_tensor", "temperature"),
    ("label_high", "outside"),
    ("label_neg", "outside"),
    ("impl", "impl="),
    ("ignore_index", "ignore_index"),
])
def test_value_errors(case, match, device):
    x, y = _xy(device)
    kw = dict(impl="triton")
    if case == "shape":
        y = y[:3]
    elif case == "logits_dtype":
        x = x.to(torch.int32)
    elif case == "float64_triton":
        x = x.double()
    elif case == "labels_dtype":
        y = y.float()
    elif case == "device":
        y = y.to("meta")
    elif case == "vocab_stride":
        x = torch.randn(7, 4, device=device).t()
    elif case == "empty_vocab":
        x = x[:, :0]
    elif case == "temp_zero":
        kw["temperature"] = 0.0
    elif case == "temp_neg":
        kw["temperature"] = -1.0
    elif case == "temp_tensor":
        kw["temperature"] = torch.tensor(1.0)
    elif case == "label_high":  # checked on CPU always, on CUDA with validate=True (one sync)
        y[2] = 7
        kw["validate"] = True
    elif case == "label_neg":
        y[1] = -1
        kw["validate"] = True
    elif case == "impl":
        kw["impl"] = "cuda"
    elif case == "ignore_index":
        kw["ignore_index"] = -100.0
    with pytest.raises(ValueError, match=match):
        token_logprobs(x, y, **kw)


def test_validate_and_float64_torch(device):
    x, y = _xy(device)
    y[0] = -100
    lp = token_logprobs(x.double(), y, impl="torch", validate=True)  # float64 is fine for the reference
    assert lp.dtype == torch.float64 and lp[0] == 0
    # the default (impl=None) takes the float64 path instead of refusing float64 logits
    assert torch.equal(token_logprobs(x.double(), y), lp)
    y[1] = 99
    with pytest.raises(ValueError, match="outside"):
        token_logprobs(x, y, impl="torch", validate=True)


# ----------------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ----------------------------------------------------------------------------------------------------
def test_opcheck(device):
    x = _logits((5, 19), torch.bfloat16, device).requires_grad_()
    y = _labels((5,), 19, device)
    torch.library.opcheck(torch.ops.flowrl_kernels.token_logprobs_fwd.default, (x, y, 0.8, True, -100, "triton", False))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("impl,backend", [("torch", "aot_eager"), ("triton", "inductor")])
def test_torch_compile_fullgraph(impl, backend, device):
    # the custom op stays opaque (inductor compiles the code around it); inductor over the reference
    # costs ~20 s of C++ compilation on a 2-core machine, so the reference path traces with aot_eager
    def f(x, y):
        lp, ent = token_logprobs(x[:, :-1], y[:, 1:], temperature=0.9, return_entropy=True, impl=impl)
        return (lp * 2.0).sum() + (ent * ent).sum()

    torch._dynamo.reset()
    x = _logits((2, 6, 23), torch.float32, device)
    y = _labels((2, 6), 23, device)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    le = f(xe, y)
    le.backward()
    lc = torch.compile(f, fullgraph=True, backend=backend)(xc, y)
    lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not native_has("token_logprobs_fwd", DEVICE), reason=f"native extension without a {DEVICE} kernel")
def test_native_matches_triton(device):
    x = _logits((2, 7, 1000), torch.bfloat16, device)[:, :-1]
    y = _labels((2, 6), 1000, device)
    ones = torch.ones(2, 6, device=device)
    outs = [_fwd_bwd(lambda *a, **k: token_logprobs(*a, impl=i, **k), x, y, ones, ones,
                     temperature=0.8) for i in ("native", "triton")]
    ref = _fwd_bwd(reference.token_logprobs, x.double(), y, ones.double(), ones.double(),
                   temperature=0.8)
    for o, t, r in zip(*outs, ref):
        assert_no_worse_than_torch(o, r, t)
