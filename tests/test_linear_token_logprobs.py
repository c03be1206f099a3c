"""linear_token_logprobs (Triton under the interpreter, and the chunked torch path) vs the float64 reference.

Every case checks logp, entropy and the gradients of hidden, weight and bias under random upstream
gradients for both outputs, against reference.linear_token_logprobs evaluated in float64 on the same
(rounded) inputs; the bound is assert_no_worse_than_torch with PyTorch's own run of the reference at the
test dtype as the baseline.
"""
import pytest
import torch

from flowrl_kernels import reference
import flowrl_kernels.ops.linear_token_logprobs as lin_mod
from flowrl_kernels.ops.linear_token_logprobs import linear_token_logprobs
from helpers import assert_no_worse_than_torch

IMPLS = ["torch", "triton"]


def _inputs(shape, H, V, dtype, device, *, bias=False, ignore_frac=0.25, scale=1.0):
    hidden = (torch.randn(*shape, H, device=device) * scale / H**0.25).to(dtype)
    weight = (torch.randn(V, H, device=device) * scale / H**0.25).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = -100
    return hidden, weight, b, labels


def _run(fn, hidden, weight, bias, labels, g_logp, g_ent, cast=None, **kw):
    """-> (logp, entropy, d hidden, d weight, d bias | None) of fn on leaf copies of the inputs."""
    leaves = [t.detach().clone() if t is not None else None for t in (hidden, weight, bias)]
    if cast is not None:
        leaves = [t.to(cast) if t is not None else None for t in leaves]
    for t in leaves:
        if t is not None:
            t.requires_grad_(True)
    logp, ent = fn(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, **kw)
    (logp * g_logp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return [logp, ent] + [t.grad if t is not None else None for t in leaves]


def _check(impl, hidden, weight, bias, labels, *, temperature=1.0, chunk_size=None, factor=2.0):
    g_logp = torch.randn(labels.shape, device=labels.device)
    g_ent = torch.randn(labels.shape, device=labels.device)
    ref64 = _run(reference.linear_token_logprobs, hidden, weight, bias, labels, g_logp, g_ent,
                 cast=torch.float64, temperature=temperature)
    base = _run(reference.linear_token_logprobs, hidden, weight, bias, labels, g_logp, g_ent,
                temperature=temperature)
    out = _run(linear_token_logprobs, hidden, weight, bias, labels, g_logp, g_ent,
               temperature=temperature, impl=impl, chunk_size=chunk_size)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    for name, o, r, b in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], out, ref64, base):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == b.dtype and o.shape == b.shape, (name, o.dtype, b.dtype)
        assert_no_worse_than_torch(o, r, b, factor=factor, name=name)
    ignored = labels == -100
    assert (out[0][ignored] == 0).all() and (out[1][ignored] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N, H, V, dtype, bias, temperature", [
    (37, 64, 1000, torch.float32, True, 0.7),
    (1, 5, 7, torch.float32, False, 1.0),
    (37, 96, 1, torch.float32, True, 1.0),          # V = 1: logp = entropy = 0, grads 0
    (37, 5, 1000, torch.bfloat16, True, 1.0),
    (37, 64, 1000, torch.float16, False, 1.5),
    (37, 96, 333, torch.bfloat16, False, 0.6),
    (3, 64, 50257, torch.bfloat16, False, 1.0),     # GPT-2 vocab at tiny N
])
def test_matches_reference(impl, N, H, V, dtype, bias, temperature, device):
    hidden, weight, b, labels = _inputs((N,), H, V, dtype, device, bias=bias)
    _check(impl, hidden, weight, b, labels, temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_chunk_backward(impl, dtype, device):
    # 37 rows in chunks of 8 (5 chunks, the last one partial): dW and d bias accumulate across chunks
    hidden, weight, b, labels = _inputs((37,), 64, 257, dtype, device, bias=True)
    _check(impl, hidden, weight, b, labels, temperature=0.9, chunk_size=8)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_leading_dims(impl, device):
    # hidden[:, :-1] of a [B, T, H] tensor (the usual shift), labels[:, 1:]: no copy demanded from the user
    B, T, H, V = 3, 14, 64, 509
    full = torch.randn(B, T, H, device=device) / 3
    hidden = full[:, :-1]
    weight = torch.randn(V, H, device=device) / 3
    labels = torch.randint(0, V, (B, T), device=device)
    labels[0, 5:] = -100
    labels = labels[:, 1:]
    assert not hidden.is_contiguous() and not labels.is_contiguous()
    _check(impl, hidden, weight, None, labels, temperature=1.2, chunk_size=16)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_above_2_pow_17(impl, device):
    # odd V > 2^17 (Qwen's 151936 is above it too), H not a multiple of 16
    hidden, weight, b, labels = _inputs((2,), 24, 131101, torch.bfloat16, device, ignore_frac=0.0)
    _check(impl, hidden, weight, b, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_entropy_stable(impl, device):
    # |logits| ~ 250: lse - E[x] would cancel; the kernels keep sum (x - m) e^(x - m) instead
    hidden, weight, b, labels = _inputs((37,), 64, 300, torch.float32, device, scale=6.0)
    _check(impl, hidden, weight, b, labels, temperature=0.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_and_logp_only(impl, device):
    hidden, weight, _, labels = _inputs((9,), 16, 40, torch.float32, device)
    labels[:] = 7
    labels[:4] = 3  # ignore_index = 3 (a valid vocab id)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp = linear_token_logprobs(h, w, labels, ignore_index=3, impl=impl)
    assert logp.shape == (9,) and logp.dtype == torch.float32
    ref = reference.linear_token_logprobs(hidden.double(), weight.double(), labels, ignore_index=3)
    assert_no_worse_than_torch(logp, ref, reference.linear_token_logprobs(hidden, weight, labels,
                                                                          ignore_index=3), name="logp")
    logp.sum().backward()
    assert (h.grad[:4] == 0).all()
    labels[:] = 3
    h.grad = None
    linear_token_logprobs(h, w, labels, ignore_index=3, impl=impl).sum().backward()
    assert (h.grad == 0).all() and (w.grad is not None)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_and_frozen_weight(impl, device):
    hidden, weight, _, labels = _inputs((5, 3), 32, 100, torch.float32, device)
    with torch.no_grad():
        lp = linear_token_logprobs(hidden, weight, labels, impl=impl)
    assert lp.shape == (5, 3) and not lp.requires_grad
    h = hidden.clone().requires_grad_(True)
    lp2 = linear_token_logprobs(h, weight, labels, impl=impl)  # weight frozen: only dH computed
    lp2.sum().backward()
    assert h.grad is not None and weight.grad is None
    torch.testing.assert_close(lp2.detach(), lp, rtol=0, atol=0)


def test_empty_tokens(device):
    hidden = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=device)
    for impl in IMPLS:
        lp, ent = linear_token_logprobs(hidden, weight, labels, impl=impl, return_entropy=True)
        assert lp.shape == (0,) and ent.shape == (0,)
        (lp.sum() + ent.sum()).backward()
        assert weight.grad.abs().sum() == 0


def test_int32_labels_and_default_impl(device):
    hidden, weight, _, labels = _inputs((11,), 16, 50, torch.float32, device)
    a = linear_token_logprobs(hidden, weight, labels.int())
    b = linear_token_logprobs(hidden, weight, labels, impl="triton")
    ref = reference.linear_token_logprobs(hidden.double(), weight.double(), labels)
    base = reference.linear_token_logprobs(hidden, weight, labels)
    assert_no_worse_than_torch(a, ref, base, name="default impl")
    assert_no_worse_than_torch(b, ref, base, name="triton")


def test_argument_checks(device):
    h = torch.randn(4, 8, device=device)
    w = torch.randn(10, 8, device=device)
    lab = torch.randint(0, 10, (4,), device=device)
    f = linear_token_logprobs
    with pytest.raises(ValueError, match="weight must be"):
        f(h, torch.randn(10, 7, device=device), lab)
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        f(h, w.view(10, 2, 4), lab)
    with pytest.raises(ValueError, match="empty vocab"):
        f(h, w[:0], lab)
    with pytest.raises(ValueError, match="labels has shape"):
        f(h, w, lab[:3])
    with pytest.raises(ValueError, match="weight has dtype"):
        f(h, w.double(), lab)
    with pytest.raises(ValueError, match="labels has dtype"):
        f(h, w, lab.float())
    with pytest.raises(ValueError, match="hidden has dtype"):
        f(h.int(), w.int(), lab)
    with pytest.raises(ValueError, match="stride"):
        f(torch.randn(8, 4, device=device).t(), w, lab)
    with pytest.raises(ValueError, match="stride"):
        f(h, torch.randn(8, 10, device=device).t(), lab)
    with pytest.raises(ValueError, match="bias must be"):
        f(h, w, lab, bias=torch.randn(9, device=device))
    with pytest.raises(ValueError, match="temperature"):
        f(h, w, lab, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        f(h, w, lab, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError, match="outside"):  # CPU: always checked; CUDA: with validate=True
        f(h, w, torch.tensor([0, 1, 10, 2], device=device), validate=True)
    with pytest.raises(ValueError, match="chunk_size"):
        f(h, w, lab, chunk_size=0)
    with pytest.raises(ValueError, match="impl"):
        f(h, w, lab, impl="cuda")
    with pytest.raises(ValueError, match="float64"):
        f(h.double(), w.double(), lab, impl="triton")
    if device == "cpu":
        with pytest.raises(ValueError, match="on cpu|on meta"):
            f(h, w.to("meta"), lab)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_labels_poison_their_row(impl, device, monkeypatch):
    # the policy of token_logprobs (see its test): an unchecked label outside [0, V) gives NaN logp and
    # entropy and NaN dlogits for its row (so NaN grads of hidden at that row, and of the whole weight
    # through the matmul), never a finite logp = -lse; the CPU check is bypassed to run what CUDA runs
    monkeypatch.setattr(lin_mod, "check_labels_in_range", lambda *a, **k: None)
    V = 20
    hidden, weight, _, _ = _inputs((7,), 16, V, torch.float32, device)
    labels = torch.tensor([1, V, -5, -100, V + 3, -1, 19], device=device)
    bad, good = [1, 2, 4, 5], [0, 6]
    h = hidden.clone().requires_grad_(True)
    logp, ent = linear_token_logprobs(h, weight, labels, impl=impl, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert torch.isnan(logp[bad]).all() and torch.isnan(ent[bad]).all() and torch.isnan(h.grad[bad]).all()
    assert logp[3] == 0 and ent[3] == 0 and (h.grad[3] == 0).all()
    assert torch.isfinite(h.grad[good]).all()
    ref = reference.linear_token_logprobs(hidden[good].double(), weight.double(), labels[good], return_entropy=True)
    base = reference.linear_token_logprobs(hidden[good], weight, labels[good], return_entropy=True)
    for o, r, b, name in zip((logp[good], ent[good]), ref, base, ("logp", "entropy")):
        assert_no_worse_than_torch(o, r, b, name=f"{impl} {name} of the in-range rows")


def test_opcheck(device):
    # the Triton launchers as the custom ops torch.compile sees (schema, fake kernels)
    hidden, weight, b, labels = _inputs((13,), 16, 70, torch.bfloat16, device, bias=True)
    b = b.float()
    torch.library.opcheck(torch.ops.flowrl_kernels.linear_token_logprobs_fwd.default,
                          (hidden, weight, b, labels, 0.8, -100))
    lp, ent, lse = torch.ops.flowrl_kernels.linear_token_logprobs_fwd(hidden, weight, b, labels, 0.8, -100)
    g = torch.randn(13, device=device)
    torch.library.opcheck(torch.ops.flowrl_kernels.linear_token_logprobs_dlogits.default,
                          (hidden, weight, b, labels, lse, ent, g, g, 0.8, -100))


def test_float64_torch_path(device):
    hidden, weight, b, labels = _inputs((13,), 16, 97, torch.float64, device, bias=True)
    lp, ent = linear_token_logprobs(hidden, weight, labels, bias=b, impl="torch", return_entropy=True,
                                    temperature=0.8)
    rl, re = reference.linear_token_logprobs(hidden, weight, labels, bias=b, return_entropy=True,
                                             temperature=0.8)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, rl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, re, rtol=1e-12, atol=1e-12)
