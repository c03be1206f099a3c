"""Property-based tests (Hypothesis) of the input contract of every public op x impl (issue 22).

For random shapes (0- and 1-sized dims, odd V), dtypes, layouts of EVERY tensor argument (contiguous,
sliced with a step, transposed storage, expanded with stride 0), masks and extreme-but-valid numbers, each
call must either raise a ValueError naming the argument the contract refuses (e.g. a strided vocab dim),
or give finite outputs and gradients equal to the float64 reference within the usual bound
(tests/helpers.py: no worse than PyTorch at the same dtype, plus a few ulps). Invalid numbers (None,
strings, bools, NaN, inf, out of range) must be a ValueError naming the argument, on every impl.

Profiles (env HYPOTHESIS_PROFILE):
- ``ci`` (default): derandomized (a fixed seed: the same examples on every run), a bounded number of
  examples per test; about a minute for the whole file on 2 CPU cores (Triton runs in the interpreter).
- ``long``: 300 random examples per test, for local runs:
  ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py``.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # the `test` extra installs it
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import flowrl_kernels as fk  # noqa: E402
from flowrl_kernels import reference  # noqa: E402
from helpers import assert_no_worse_than_torch  # noqa: E402

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=300, **_COMMON)
PROFILE = settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci")))

IMPLS = ["torch", "native", "triton"]
LAYOUTS = ["contiguous", "sliced", "transposed", "expanded"]
NATIVE_OPS = ("token_logprobs", "flowrl_loss", "importance_weights")


def _impl_or_skip(impl):
    if impl == "native" and not fk.native_available():
        pytest.skip("native extension not built")
    if impl == "triton" and torch.cuda.is_available():
        # the drawn tensors (layouts, generators) are CPU tensors, which impl='triton' runs only in the
        # interpreter, and tests/conftest.py turns it on only without CUDA. Open: draw them on the GPU.
        pytest.skip("CPU-drawn inputs: impl='triton' runs them in the interpreter (CI); on a GPU machine "
                    "the Triton contract is covered by tests/test_input_contract.py and the op tests")


# ----------------------------------------------------------------------------------------------------
# tensors with a drawn layout
# ----------------------------------------------------------------------------------------------------
@st.composite
def layouts(draw, ndim):
    """(kind, dim, dim2): how a tensor of ``ndim`` dims is laid out in memory."""
    kind = draw(st.sampled_from(LAYOUTS if ndim else ["contiguous"]))
    d = draw(st.integers(0, max(ndim - 1, 0)))
    if kind == "transposed" and ndim < 2:
        kind = "sliced"
    d2 = (d + 1) % ndim if ndim else 0
    return kind, d, d2


def make(shape, layout, fill):
    """A tensor of ``shape`` with ``layout``; ``fill(shape)`` makes contiguous values."""
    kind, d, d2 = layout
    shape = tuple(shape)
    if kind == "sliced":
        big = list(shape)
        big[d] = 2 * shape[d] + 1
        t = fill(big).narrow(d, 1, 2 * shape[d]) if shape[d] else fill(big).narrow(d, 0, 0)
        return t[tuple(slice(None, None, 2) if i == d else slice(None) for i in range(len(shape)))]
    if kind == "transposed":
        sw = list(shape)
        sw[d], sw[d2] = sw[d2], sw[d]
        return fill(sw).transpose(d, d2)
    if kind == "expanded":
        one = list(shape)
        one[d] = 1
        return fill(one).expand(shape)
    return fill(list(shape))


def vocab_strided(t):
    """True when ``t``'s last dim breaks the contract of the vocab / hidden dim (stride 1 when size > 1)."""
    return t.shape[-1] > 1 and t.stride(-1) != 1


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def floats_like(g, dtype, scale=1.0, shift=0.0):
    return lambda s: (torch.randn(s, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def ints_like(g, lo, hi, dtype=torch.int64):
    return lambda s: torch.randint(lo, hi, s, generator=g, dtype=dtype)


def _leaf(t):
    return t.detach().requires_grad_()


def compare(ours, spec, args, grads, *, ulps=16.0, scale=0.0, name=""):
    """Run ``ours(*args)`` and ``spec`` (the reference) at float64 and at the test dtype; every output
    finite where the float64 reference is, within the bound, and the same for the gradients of the
    arguments at indices ``grads`` under random upstream gradients."""
    def run(fn, xs):
        xs = [_leaf(x) if i in grads else x for i, x in enumerate(xs)]
        outs = [o for o in fn(*xs) if o is not None]
        g = torch.Generator().manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
                   for o in outs if o.is_floating_point() and o.requires_grad)
        gs = list(torch.autograd.grad(loss, [xs[i] for i in grads], allow_unused=True)) if torch.is_tensor(loss) else []
        gs = [torch.zeros_like(xs[i]) if gi is None else gi for gi, i in zip(gs, grads)] if gs else \
            [torch.zeros_like(xs[i]) for i in grads]
        return [o.detach() for o in outs] + gs

    f64 = [x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in args]
    ref = run(spec, f64)
    tor = run(spec, args)
    got = run(ours, args)
    assert len(got) == len(ref)
    for k, (o, r, t) in enumerate(zip(got, ref, tor)):
        assert o.shape == r.shape, (name, k, o.shape, r.shape)
        # finite wherever the float64 reference is, unless the output dtype itself cannot hold the value
        # (torch at that dtype overflows too: a gradient of w = exp(64) in float16)
        finite = torch.isfinite(r) & torch.isfinite(t)
        assert torch.isfinite(o[finite]).all(), f"{name} output {k}: non-finite where the reference is finite"
        assert_no_worse_than_torch(o, r, t, ulps=ulps, scale=scale, name=f"{name}[{k}]")


# ----------------------------------------------------------------------------------------------------
# token_logprobs (and its vocab-parallel path)
# ----------------------------------------------------------------------------------------------------
TEMPS = st.one_of(st.sampled_from([1e-4, 1e4, 1.0, 0.7]), st.floats(1e-4, 1e4).filter(lambda t: t > 0))
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def token_case(draw):
    lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    V = draw(st.sampled_from([1, 2, 7, 33, 130]))
    T = draw(TEMPS)
    # |logits / T| <= ~1e5: within fp32's reach for every impl; beyond, torch itself loses the digits
    scale = min(draw(st.sampled_from([1.0, 5.0, 60.0])), 1e5 * T / 4)
    return dict(lead=lead, V=V, T=T, scale=scale, dtype=draw(DTYPES), entropy=draw(st.booleans()),
                lx=draw(layouts(len(lead) + 1)), ly=draw(layouts(len(lead))), seed=draw(st.integers(0, 2**31)),
                ignore=draw(st.sampled_from([-100, 0, 2**40])))


def _token_inputs(c):
    g = _gen(c["seed"])
    x = make(c["lead"] + [c["V"]], c["lx"], floats_like(g, c["dtype"], c["scale"]))
    y = make(c["lead"], c["ly"], ints_like(g, 0, c["V"]))
    if y.numel():  # some ignored positions (ignore_index may also be a valid label, 0)
        drop = torch.rand(y.shape, generator=g) < 0.25
        y = torch.where(drop, torch.full_like(y, c["ignore"]), y)
    return x, y


@pytest.mark.parametrize("impl", IMPLS)
@PROFILE
@given(c=token_case())
def test_token_logprobs_property(impl, c):
    _impl_or_skip(impl)
    x, y = _token_inputs(c)
    kw = dict(temperature=c["T"], return_entropy=c["entropy"], ignore_index=c["ignore"])

    def ours(x, y):
        out = fk.token_logprobs(x, y, impl=impl, **kw)
        return out if c["entropy"] else (out,)

    def spec(x, y):
        out = reference.token_logprobs(x, y, **kw)
        return out if c["entropy"] else (out,)

    if vocab_strided(x):
        with pytest.raises(ValueError, match="logits"):
            ours(x, y)
        return
    compare(ours, spec, [x, y], [0], ulps=32, scale=c["scale"] * 4 / c["T"], name="token_logprobs")


@pytest.fixture(scope="module")
def one_rank_group():
    import torch.distributed as dist

    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if mine:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", IMPLS)
@PROFILE
@given(c=token_case())
def test_vocab_parallel_property(impl, c, one_rank_group):
    """token_logprobs(process_group=...) on a one-rank group: the shard statistics and their merge."""
    _impl_or_skip(impl)
    x, y = _token_inputs(c)
    kw = dict(temperature=c["T"], return_entropy=True, ignore_index=c["ignore"])
    if vocab_strided(x):
        with pytest.raises(ValueError, match="logits"):
            fk.token_logprobs(x, y, impl=impl, process_group=one_rank_group, **kw)
        return
    compare(lambda x, y: fk.token_logprobs(x, y, impl=impl, process_group=one_rank_group, **kw),
            lambda x, y: reference.token_logprobs(x, y, **kw), [x, y], [0], ulps=32,
            scale=c["scale"] * 4 / c["T"], name="vocab_parallel")


# ----------------------------------------------------------------------------------------------------
# linear_token_logprobs
# ----------------------------------------------------------------------------------------------------
@st.composite
def linear_case(draw):
    lead = draw(st.lists(st.integers(0, 4), min_size=1, max_size=2))
    return dict(lead=lead, H=draw(st.sampled_from([1, 5, 16])), V=draw(st.sampled_from([1, 3, 17, 70])),
                T=draw(st.sampled_from([1e-2, 0.7, 1.0, 1e4])), dtype=draw(DTYPES),
                bias=draw(st.sampled_from([None, "same", "fp32"])), entropy=draw(st.booleans()),
                lh=draw(layouts(len(lead) + 1)), lw=draw(layouts(2)), lb=draw(layouts(1)),
                ly=draw(layouts(len(lead))), seed=draw(st.integers(0, 2**31)))


@pytest.mark.parametrize("impl", IMPLS)
@PROFILE
@given(c=linear_case())
def test_linear_token_logprobs_property(impl, c):
    _impl_or_skip(impl)
    g = _gen(c["seed"])
    h = make(c["lead"] + [c["H"]], c["lh"], floats_like(g, c["dtype"]))
    w = make([c["V"], c["H"]], c["lw"], floats_like(g, c["dtype"], 1 / math.sqrt(c["H"])))
    y = make(c["lead"], c["ly"], ints_like(g, 0, c["V"]))
    b = None if c["bias"] is None else make([c["V"]], c["lb"], floats_like(
        g, c["dtype"] if c["bias"] == "same" else torch.float32))
    kw = dict(temperature=c["T"], return_entropy=c["entropy"])

    def ours(h, w, y, b):
        out = fk.linear_token_logprobs(h, w, y, bias=b, impl=impl, **kw)
        return out if c["entropy"] else (out,)

    def spec(h, w, y, b):
        out = reference.linear_token_logprobs(h, w, y, bias=b, **kw)
        return out if c["entropy"] else (out,)

    for name, t in (("hidden", h), ("weight", w)):
        if vocab_strided(t):
            with pytest.raises(ValueError, match=name):
                ours(h, w, y, b)
            return
    if impl == "native":
        # names what this op has for CPU tensors: 'torch', and 'triton' where the interpreter is on (CI)
        with pytest.raises(ValueError, match=r"impl='native'.*does not provide this op.*has 'torch'"):
            ours(h, w, y, b)
        return
    # the logits' magnitude (|h| |w| sqrt(H) / T): what the fused path rounds beyond torch's own sums
    compare(ours, spec, [h, w, y, b], [0, 1] + ([3] if b is not None else []), ulps=64,
            scale=4 * (1 + math.sqrt(c["H"])) / c["T"], name="linear_token_logprobs")


# ----------------------------------------------------------------------------------------------------
# sequence-level ops and the losses
# ----------------------------------------------------------------------------------------------------
MASK_DTYPES = st.sampled_from([torch.bool, torch.float32, torch.int64, torch.uint8])
CLIPS = st.sampled_from([(0.8, 1.2), None, (None, None), (None, 2.0), (0.0, None), (-1.0, 1e30), (1e30, None),
                         (1.0, 1.0)])


@st.composite
def seq_case(draw):
    B = draw(st.integers(0, 5))
    T = draw(st.integers(0, 9))
    n_ly = 8
    return dict(B=B, T=T, dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                mdtype=draw(MASK_DTYPES), clip=draw(CLIPS), beta=draw(st.sampled_from([0.0, 1.0, 15.0, -3.5])),
                spread=draw(st.sampled_from([0.01, 0.3, 3.0])),
                ly=[draw(layouts(2)) for _ in range(n_ly)], l1=[draw(layouts(1)) for _ in range(3)],
                seed=draw(st.integers(0, 2**31)))


def _seq_inputs(c):
    g = _gen(c["seed"])
    sh = [c["B"], c["T"]]
    lp = make(sh, c["ly"][0], floats_like(g, c["dtype"], 0.5, -2.0))
    old = make(sh, c["ly"][1], floats_like(g, c["dtype"], c["spread"], -2.0))
    ref = make(sh, c["ly"][2], floats_like(g, c["dtype"], 0.5, -2.0))
    m = make(sh, c["ly"][3], lambda s: (torch.rand(s, generator=g) > 0.3).to(c["mdtype"]))
    lz = make([c["B"]], c["l1"][0], floats_like(g, torch.float32))
    r = make([c["B"]], c["l1"][1], floats_like(g, torch.float32))
    return lp, old, ref, m, lz, r


def _fast(impl, op):
    """The impl an op runs: ops without a native impl refuse impl='native' by name."""
    return impl != "native" or op in NATIVE_OPS


@pytest.mark.parametrize("impl", IMPLS)
@PROFILE
@given(c=seq_case(), importance=st.sampled_from(["sequence", "sequence_mean", "none"]),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_flowrl_loss_property(impl, c, importance, reduction):
    _impl_or_skip(impl)
    lp, old, ref, m, lz, r = _seq_inputs(c)
    kw = dict(beta=c["beta"], importance=importance, reduction=reduction)

    def ours(lp, old, ref, lz, r, m):
        loss, s = fk.flowrl_loss(lp, old, ref, lz, r, m, clip=c["clip"], impl=impl, **kw)
        return loss, s["delta"], s["weight"], s["clip_frac"], s["logp_mean"]

    def spec(lp, old, ref, lz, r, m):
        loss, s = reference.flowrl_loss(lp, old, ref, lz, r, m, clip=c["clip"] or (None, None), **kw)
        return loss, s["delta"], s["weight"], s["clip_frac"], s["logp_mean"]

    # w = exp(<= 64) may be ~6e27: the bound is relative to the outputs' own magnitude
    compare(ours, spec, [lp, old, ref, lz, r, m], [0, 3], ulps=64, name="flowrl_loss")


@pytest.mark.parametrize("impl", IMPLS)
@PROFILE
@given(c=seq_case(), level=st.sampled_from(["sequence", "sequence_mean", "token"]))
def test_importance_weights_property(impl, c, level):
    _impl_or_skip(impl)
    lp, old, _, m, _, _ = _seq_inputs(c)
    compare(lambda lp, old, m: fk.importance_weights(lp, old, m, level=level, clip=c["clip"], impl=impl),
            lambda lp, old, m: reference.importance_weights(lp, old, m, level=level, clip=c["clip"] or (None, None)),
            [lp, old, m], [], ulps=64, name="importance_weights")


@pytest.mark.parametrize("impl", IMPLS)
@PROFILE
@given(c=seq_case(), reduction=st.sampled_from(["token_mean", "seq_mean", "sum", "none"]),
       per_token_adv=st.booleans(), kl=st.sampled_from([0.0, 0.05]), eps=st.sampled_from([(0.2, 0.2), (0.0, 0.28)]))
def test_grpo_loss_property(impl, c, reduction, per_token_adv, kl, eps):
    _impl_or_skip(impl)
    lp, old, ref, m, _, r = _seq_inputs(c)
    adv = make([c["B"], c["T"]], c["ly"][4], floats_like(_gen(c["seed"] + 1), torch.float32)) if per_token_adv else r
    kw = dict(eps=eps, ref_logp=ref, kl_coef=kl, reduction=reduction)

    def ours(lp, old, adv, m):
        loss, s = fk.grpo_loss(lp, old, adv, m, impl=impl, **kw)
        return loss, s["clip_frac"], s["ratio_mean"], s["kl"]

    def spec(lp, old, adv, m):
        loss, s = reference.grpo_loss(lp, old, adv, m, **kw)
        return loss, s["clip_frac"], s["ratio_mean"], s["kl"]

    if not _fast(impl, "grpo_loss"):
        with pytest.raises(ValueError, match="impl='native'"):
            ours(lp, old, adv, m)
        return
    compare(ours, spec, [lp, old, adv, m], [0], ulps=32, name="grpo_loss")


@pytest.mark.parametrize("impl", IMPLS)
@PROFILE
@given(c=seq_case(), normalize=st.sampled_from(["mean", "sum"]))
def test_masked_mean_and_seq_log_ratio_property(impl, c, normalize):
    _impl_or_skip(impl)
    lp, old, _, m, _, _ = _seq_inputs(c)
    if not _fast(impl, "masked_mean"):
        for call in (lambda: fk.masked_mean(lp, m, impl=impl), lambda: fk.seq_log_ratio(lp, old, m, impl=impl)):
            with pytest.raises(ValueError, match="impl='native'"):
                call()
        return
    compare(lambda x, m: (fk.masked_mean(x, m, impl=impl),), lambda x, m: (reference.masked_mean(x, m),),
            [lp, m], [0], name="masked_mean")
    compare(lambda a, b, m: (fk.seq_log_ratio(a, b, m, normalize=normalize, impl=impl),),
            lambda a, b, m: (reference.seq_log_ratio(a, b, m, normalize=normalize),),
            [lp, old, m], [0, 1], name="seq_log_ratio")


@pytest.mark.parametrize("impl", IMPLS)
@PROFILE
@given(groups=st.integers(0, 4), size=st.integers(1, 5), layout=layouts(1), eps=st.sampled_from([0.0, 1e-6, 0.5]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]),
       equal=st.booleans(), seed=st.integers(0, 2**31))
def test_group_normalize_property(impl, groups, size, layout, eps, dtype, equal, seed):
    _impl_or_skip(impl)
    g = _gen(seed)
    B = groups * size
    if equal:
        fill = lambda s: torch.full(s, 0.1 * (seed % 7)).to(dtype)  # noqa: E731
    elif dtype.is_floating_point:
        fill = floats_like(g, dtype, 3.0)
    else:
        fill = lambda s: torch.randint(0, 4, s, generator=g).to(dtype)  # noqa: E731
    r = make([B], layout, fill)
    if not _fast(impl, "group_normalize"):
        with pytest.raises(ValueError, match="impl='native'"):
            fk.group_normalize(r, size, eps=eps, impl=impl)
        return
    out = fk.group_normalize(r, size, eps=eps, impl=impl)
    rf = r if r.is_floating_point() else r.float()
    spec = reference.group_normalize(rf.double(), size, eps=eps)
    assert torch.isfinite(out).all()
    # a group of equal rewards is exactly 0, whatever eps
    same = (rf.reshape(-1, size) == rf.reshape(-1, size)[:, :1]).all(-1).repeat_interleave(size) if B else rf.bool()
    assert (out[same] == 0).all()
    assert_no_worse_than_torch(out, spec, reference.group_normalize(rf, size, eps=eps), ulps=64,
                               scale=1.0 / max(eps, 1e-3), name="group_normalize")


# ----------------------------------------------------------------------------------------------------
# invalid numbers: a ValueError naming the argument, on every impl
# ----------------------------------------------------------------------------------------------------
BAD_NUMBERS = st.sampled_from([None, "1.0", True, float("nan"), float("inf"), -float("inf"), torch.tensor(0.5)])


@pytest.mark.parametrize("impl", IMPLS)
@PROFILE
@given(arg=st.sampled_from(["temperature", "beta", "kl_coef", "eps", "clip_lo", "clip_hi", "ignore_index",
                            "group_eps", "group_size"]),
       bad=st.one_of(BAD_NUMBERS, st.sampled_from([-1.0, 0.0, 1e-5, 2e4, 1e300, -100.0, 2**70])))
def test_invalid_numbers_are_named(impl, arg, bad):
    _impl_or_skip(impl)
    B, T = 2, 3
    lp, m = torch.randn(B, T), torch.ones(B, T, dtype=torch.bool)
    x, y = torch.randn(B, 5), torch.zeros(B, dtype=torch.long)
    nat = impl if impl != "native" else None  # ops without a native impl: their default
    calls = {
        "temperature": ("temperature", lambda: fk.token_logprobs(x, y, temperature=bad, impl=impl),
                        lambda v: 1e-4 <= v <= 1e4),
        "beta": ("beta", lambda: fk.flowrl_loss(lp, lp, lp, torch.zeros(B), torch.zeros(B), m, beta=bad, impl=impl),
                 lambda v: abs(v) <= 1e6),
        "kl_coef": ("kl_coef", lambda: fk.grpo_loss(lp, lp, torch.ones(B), m, ref_logp=lp, kl_coef=bad, impl=nat),
                    lambda v: 0 <= v <= 1e6),
        "eps": (r"eps\[0\]", lambda: fk.grpo_loss(lp, lp, torch.ones(B), m, eps=(bad, 0.2), impl=nat),
                lambda v: 0 <= v <= 1e6),
        "clip_lo": (r"clip(\[0\]|=)", lambda: fk.importance_weights(lp, lp, m, clip=(bad, 2.0), impl=impl),
                    lambda v: v <= 2.0),
        "clip_hi": (r"clip\[1\]", lambda: fk.flowrl_loss(lp, lp, lp, torch.zeros(B), torch.zeros(B), m,
                                                         clip=(None, bad), impl=impl), lambda v: v > 0),
        "ignore_index": ("ignore_index", lambda: fk.token_logprobs(x, y, ignore_index=bad, impl=impl), None),
        "group_eps": ("eps", lambda: fk.group_normalize(torch.randn(4), 2, eps=bad, impl=nat),
                      lambda v: 0 <= v <= 1e6),
        "group_size": ("group_size", lambda: fk.group_normalize(torch.randn(4), bad, impl=nat), None),
    }
    name, call, ok = calls[arg]
    real = isinstance(bad, (int, float)) and not isinstance(bad, bool) and math.isfinite(bad)
    if (ok is not None and real and ok(float(bad))) or (bad is None and arg in ("clip_lo", "clip_hi")):
        out = call()  # a valid value after all: finite output
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all()
        return
    if ok is None and isinstance(bad, int) and not isinstance(bad, bool) and abs(bad) < 2**63:
        if arg == "group_size" and (bad < 1 or 4 % bad):
            with pytest.raises(ValueError, match=name):
                call()
        else:
            call()
        return
    with pytest.raises(ValueError, match=name):
        call()
