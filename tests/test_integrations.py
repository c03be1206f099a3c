"""flowrl_kernels.hf and flowrl_kernels.integrations.{trl,verl,openrlhf}.

The patched helpers are compared with the trainers' OWN functions (imported from the installed
packages): values and gradients, judged against the original evaluated in float64 (the original at
the test dtype sets the error bound). Packages that do not import on this machine are skipped with
the reason (CI installs trl and verl; OpenRLHF's models package imports deepspeed and flash-attn).
Every tensor is made on the test's device (tests/conftest.py); the output-dtype contracts themselves are
tested row by row in tests/test_contracts.py.
"""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from flowrl_kernels.integrations import PatchError
from helpers import assert_no_worse_than_torch, import_or_skip, max_abs_err

DTYPES = [torch.float32, torch.bfloat16]


def _logits(shape, dtype, device, *, strided=True):
    # a strided view (logits[:, :-1]) like every caller passes; scale 4 gives peaked, realistic rows
    B, T, V = shape
    full = (4 * torch.randn(B, T + 1, V, device=device)).to(dtype)
    x = full[:, :-1] if strided else full[:, :-1].contiguous()
    return x.detach().requires_grad_()


def _run(fn, x, *rest, upstream, **kw):
    """fn(x, *rest) -> tuple of outputs; returns (outputs, dx) for sum_i <out_i, g_i>."""
    outs = fn(x, *rest, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, upstream) if o is not None and o.requires_grad)
    (dx,) = torch.autograd.grad(loss, [x])
    return [o.detach() for o in outs], dx


def _spec(x, *rest, n_out, **kw):
    """flowrl_kernels.reference (our ops' spec) on the same call; kw: temperature, row_mask."""
    from flowrl_kernels import reference as R

    labels = rest[0] if rest else torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    if kw.get("row_mask") is not None:
        labels = labels.masked_fill(kw["row_mask"] == 0, -100)
    logp, ent = R.token_logprobs(x, labels, temperature=kw.get("temperature", 1.0), return_entropy=True)
    if not kw.get("entropy_requires_grad", True):
        ent = ent.detach()
    return (logp, ent)[:n_out] if rest else ent


def _compare(ctx, get_ours, orig_fn, x, *rest, n_out, **kw):
    """The patched function (``get_ours()`` inside ``ctx``) at x.dtype vs the ORIGINAL in float64, values and
    grads. Bound: factor x the error of the worse of the two plain-torch computations at x.dtype (the
    original, and our spec flowrl_kernels.reference), so the test checks semantics (temperature, masks,
    shapes, gradients), not which of two fp32 formulas rounds less. The originals run before patching:
    trl's composite helpers call the others through module globals."""
    up = [torch.randn(x.shape[:-1], dtype=torch.float64, device=x.device) for _ in range(n_out)]
    ref, dref = _run(orig_fn, x.detach().double().requires_grad_(), *rest, upstream=up, **kw)
    tor, dtor = _run(orig_fn, x.detach().clone().requires_grad_(), *rest, upstream=up, **kw)
    spec_kw = {k: v for k, v in kw.items() if k in ("temperature", "row_mask", "entropy_requires_grad")}
    spc, dspc = _run(lambda a, *r: _spec(a, *r, n_out=n_out, **spec_kw), x.detach().clone().requires_grad_(),
                     *rest, upstream=up)
    if ref[0].dtype != torch.float64:
        # the original computes in float32 whatever it gets (verl's chunked entropy): the truth is our spec in
        # float64, and the original at x.dtype must itself be within the usual bound of it (same semantics)
        ref, dref = _run(lambda a, *r: _spec(a, *r, n_out=n_out, **spec_kw), x.detach().double().requires_grad_(),
                         *rest, upstream=up)
        for i in range(n_out):
            assert_no_worse_than_torch(tor[i].float(), ref[i], spc[i], name=f"original output {i}")
    with ctx():
        ours_fn = get_ours()
        assert ours_fn is not orig_fn
        ours, dours = _run(ours_fn, x, *rest, upstream=up, **kw)

    def worse(a, b, r):
        return a if max_abs_err(a.double(), r) >= max_abs_err(b.double(), r) else b

    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.shape == r.shape and o.dtype == tor[i].dtype, "the original's output dtype at x.dtype"
        assert_no_worse_than_torch(o, r, worse(tor[i], spc[i], r).to(o.dtype), name=f"output {i}")
    assert_no_worse_than_torch(dours, dref, worse(dtor, dspc, dref), name="grad")


# ----------------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def trl_mod():
    U = import_or_skip("trl.trainer.utils")
    import flowrl_kernels.integrations.trl as fk_trl
    yield U, fk_trl
    fk_trl.unpatch()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_selective_log_softmax(trl_mod, device, dtype, temperature):
    U, fk_trl = trl_mod
    orig = U.selective_log_softmax
    x = _logits((3, 7, 1001), dtype, device)
    idx = torch.randint(0, 1001, (3, 7), device=device)
    row_mask = torch.rand(3, 7, device=device) > 0.3
    _compare(fk_trl.patched, lambda: U.selective_log_softmax, orig, x, idx, n_out=1, temperature=temperature,
             row_mask=row_mask)
    assert U.selective_log_softmax is orig


@pytest.mark.parametrize("dtype", DTYPES)
def test_trl_entropy_from_logits(trl_mod, device, dtype):
    U, fk_trl = trl_mod
    orig = U.entropy_from_logits
    x = _logits((2, 9, 517), dtype, device)
    _compare(fk_trl.patched, lambda: U.entropy_from_logits, orig, x, n_out=1)


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_trl_selective_log_softmax_and_entropy(trl_mod, device, entropy_requires_grad):
    U, fk_trl = trl_mod
    orig = U.selective_log_softmax_and_entropy
    x = _logits((2, 5, 333), torch.float32, device)
    idx = torch.randint(0, 333, (2, 5), device=device)
    row_mask = torch.rand(2, 5, device=device) > 0.3
    _compare(fk_trl.patched, lambda: U.selective_log_softmax_and_entropy, orig, x, idx, n_out=2, temperature=0.6,
             row_mask=row_mask, entropy_requires_grad=entropy_requires_grad)
    with fk_trl.patched():
        logp, ent = U.selective_log_softmax_and_entropy(x, idx, entropy_requires_grad=entropy_requires_grad)
        assert ent.requires_grad == entropy_requires_grad and logp.requires_grad


def test_trl_top_k_index_falls_back(trl_mod, device):
    U, fk_trl = trl_mod
    orig = U.selective_log_softmax
    x = torch.randn(2, 4, 50, device=device)
    idx = torch.randint(0, 50, (2, 4, 3), device=device)  # (..., K): a top-K gather, not per-token
    with fk_trl.patched():
        assert torch.equal(U.selective_log_softmax(x, idx, temperature=0.5), orig(x, idx, temperature=0.5))


@pytest.mark.parametrize("temperature, logit_scale, bias", [(1.0, 1.0, False), (0.7, 0.5, True)])
def test_trl_chunked_logprob_function(trl_mod, device, temperature, logit_scale, bias):
    """The helper trl 1.16's GRPO trainer reaches through add_fused_lm_head (hidden states, lm_head weight)."""
    U, fk_trl = trl_mod
    orig = U._ChunkedLogProbFunction
    N, H, V = 37, 24, 301
    h = torch.randn(N, H, dtype=torch.float64, device=device)
    w = torch.randn(V, H, dtype=torch.float64, device=device) / H**0.5
    b = torch.randn(V, dtype=torch.float64, device=device) if bias else None
    y = torch.randint(0, V, (N,), device=device)
    up = [torch.randn(N, dtype=torch.float64, device=device) for _ in range(2)]
    outputs = ("log_probs", "entropy")

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (h, w) + ((b,) if bias else ())]
        res = fn.apply(ins[0], ins[1], ins[2] if bias else None, y, temperature, 128, None, logit_scale, outputs)
        loss = (res[0].double() * up[0]).sum() + (res[1].double() * up[1]).sum()
        return [r.detach() for r in res[:2]] + list(torch.autograd.grad(loss, ins))

    ref = run(orig, torch.float64)
    tor = run(orig, torch.float32)
    with fk_trl.patched():
        assert U._ChunkedLogProbFunction is not orig
        ours = run(U._ChunkedLogProbFunction, torch.float32)
        # soft-capping is TRL-only: the shim must hand it to TRL's own function, result unchanged
        args = (h.float(), w.float(), None, y, temperature, 128, 30.0, logit_scale, outputs)
        assert torch.equal(U._ChunkedLogProbFunction.apply(*args)[0], orig.apply(*args)[0])
    for name, o, r, t in zip(["logp", "entropy", "dh", "dw", "db"], ours, ref, tor):
        assert_no_worse_than_torch(o, r, t, name=name)


def test_trl_fused_lm_head_end_to_end(trl_mod, device):
    """trl.trainer.utils.add_fused_lm_head (the GRPO trainer's log-prob path) gives the same per-token
    log-probs and entropy, and the same lm_head gradient, with the patch on."""
    U, fk_trl = trl_mod
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _tiny(LlamaForCausalLM, LlamaConfig).to(device)
    U.add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 97, (2, 9), device=device)
    labels = ids.clone()
    labels[:, :4] = -100

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), model.lm_head.weight.grad.clone()

    base = run()
    with fk_trl.patched():
        ours = run()
    for name, o, b in zip(["logp", "entropy", "dW"], ours, base):
        torch.testing.assert_close(o, b, rtol=1e-5, atol=1e-5, msg=name)


def test_trl_unpatch_restores_every_binding(trl_mod):
    U, fk_trl = trl_mod
    import trl.kernels as K

    # a module that did `from trl.trainer.utils import selective_log_softmax as sls` before patch()
    alias = types.ModuleType("trl._flowrl_kernels_test_alias")
    alias.sls = U.selective_log_softmax
    sys.modules[alias.__name__] = alias
    try:
        originals = {n: U.__dict__[n] for n in ("selective_log_softmax", "entropy_from_logits",
                                                "selective_log_softmax_and_entropy", "_ChunkedLogProbFunction")}
        kernel_cls = K.ChunkedLogProbFunction
        fk_trl.patch()
        fk_trl.patch()  # idempotent
        assert fk_trl.is_patched()
        assert all(U.__dict__[n] is not o for n, o in originals.items())
        assert alias.sls is U.selective_log_softmax and K.ChunkedLogProbFunction is U._ChunkedLogProbFunction
        fk_trl.unpatch()
        assert not fk_trl.is_patched()
        assert all(U.__dict__[n] is o for n, o in originals.items())
        assert alias.sls is originals["selective_log_softmax"] and K.ChunkedLogProbFunction is kernel_cls
    finally:
        del sys.modules[alias.__name__]


def test_trl_refuses_cleanly(trl_mod, monkeypatch):
    U, fk_trl = trl_mod
    orig = U.selective_log_softmax
    # a target that disappeared: nothing is patched, the error names it
    monkeypatch.delattr(U, "entropy_from_logits")
    with pytest.raises(PatchError, match="entropy_from_logits does not exist"):
        fk_trl.patch()
    assert U.selective_log_softmax is orig and not fk_trl.is_patched()
    monkeypatch.undo()
    # a target whose signature changed
    monkeypatch.setattr(U, "selective_log_softmax", lambda logits, index: None)
    with pytest.raises(PatchError, match="selective_log_softmax takes"):
        fk_trl.patch()
    monkeypatch.undo()
    # a version older than the ones read
    monkeypatch.setattr(fk_trl.INTEGRATION, "installed_version", lambda: "0.9.6")
    with pytest.raises(PatchError, match="versions before"):
        fk_trl.patch()
    assert U.selective_log_softmax is orig and U.entropy_from_logits.__module__ == "trl.trainer.utils"


def test_patch_refuses_missing_package():
    from flowrl_kernels.integrations._patching import Integration, Target

    integ = Integration(dist="flowrl-kernels-no-such-package", min_version="0", tested_version="0",
                        targets=[Target("no_such_package.mod", "f", ("x",), lambda f: f)])
    with pytest.raises(PatchError, match="not installed"):
        integ.patch()
    assert not integ.is_patched()


# ----------------------------------------------------------------------------------------------------
# verl
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def verl_mod():
    F = import_or_skip("verl.utils.torch_functional")
    import flowrl_kernels.integrations.verl as fk_verl
    yield F, fk_verl
    fk_verl.unpatch()


@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_logprobs_and_entropy(verl_mod, device, dtype):
    F, fk_verl = verl_mod
    names = ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")
    origs = {n: getattr(F, n) for n in names}
    x = _logits((3, 6, 771), dtype, device)
    y = torch.randint(0, 771, (3, 6), device=device)
    _compare(fk_verl.patched, lambda: F.logprobs_from_logits, origs["logprobs_from_logits"], x, y, n_out=1)
    _compare(fk_verl.patched, lambda: F.entropy_from_logits, origs["entropy_from_logits"], x, n_out=1)
    x2 = _logits((1, 11, 771), dtype, device)[0]  # the chunked entropy takes [N, V]
    _compare(fk_verl.patched, lambda: F.entropy_from_logits_with_chunking,
             origs["entropy_from_logits_with_chunking"], x2, n_out=1, chunk_size=4)
    assert all(getattr(F, n) is origs[n] for n in names)


def test_verl_refuses_cleanly(verl_mod, monkeypatch):
    F, fk_verl = verl_mod
    orig = F.logprobs_from_logits
    monkeypatch.delattr(F, "entropy_from_logits_with_chunking")
    with pytest.raises(PatchError, match="entropy_from_logits_with_chunking"):
        fk_verl.patch()
    assert F.logprobs_from_logits is orig and not fk_verl.is_patched()


# ----------------------------------------------------------------------------------------------------
# OpenRLHF
# ----------------------------------------------------------------------------------------------------
def test_openrlhf_replacements_semantics(device):
    """Without the package: OpenRLHF's contract as read from openrlhf/models/utils.py (0.11.2):
    log_probs_from_logits divides the caller's logits in place by T, then log_softmax-gathers."""
    import flowrl_kernels.integrations.openrlhf as fk_o

    lp_fn = fk_o._build_log_probs_from_logits(None)
    ent_fn = fk_o._build_compute_entropy(None)
    x = 3 * torch.randn(2, 5, 211, device=device)
    y = torch.randint(0, 211, (2, 5), device=device)
    xs = x.clone()
    lp = lp_fn(xs, y, temperature=0.5)
    assert torch.equal(xs, x / 0.5)  # the in-place side effect is kept
    ls = torch.log_softmax(x.double() / 0.5, -1)
    torch.testing.assert_close(lp.double(), ls.gather(-1, y[..., None])[..., 0], rtol=1e-5, atol=1e-5)
    ls1 = torch.log_softmax(x.double(), -1)  # compute_entropy takes already-scaled logits: no temperature
    torch.testing.assert_close(ent_fn(x).double(), -(ls1.exp() * ls1).sum(-1), rtol=1e-5, atol=1e-5)


def test_openrlhf_against_package(device):
    U = import_or_skip("openrlhf.models.utils")
    import flowrl_kernels.integrations.openrlhf as fk_o

    orig_lp, orig_ent = U.log_probs_from_logits, U.compute_entropy
    x = _logits((2, 5, 331), torch.float32, device)
    y = torch.randint(0, 331, (2, 5), device=device)
    # clone: log_probs_from_logits scales the caller's logits in place
    _compare(fk_o.patched, lambda: (lambda a, b, temperature: U.log_probs_from_logits(a.clone(), b, temperature)),
             lambda a, b, temperature: orig_lp(a.clone(), b, temperature), x, y, n_out=1, temperature=0.7)
    _compare(fk_o.patched, lambda: U.compute_entropy, orig_ent, x, n_out=1)
    assert U.log_probs_from_logits is orig_lp and U.compute_entropy is orig_ent


def test_openrlhf_patch_says_why():
    import importlib.util

    import flowrl_kernels.integrations.openrlhf as fk_o

    if importlib.util.find_spec("openrlhf") is not None:
        pytest.skip("openrlhf is installed; covered by test_openrlhf_against_package")
    with pytest.raises(PatchError, match="openrlhf"):
        fk_o.patch()
    assert not fk_o.is_patched()


# ----------------------------------------------------------------------------------------------------
# flowrl_kernels.hf
# ----------------------------------------------------------------------------------------------------
def _tiny(model_cls, config_cls, **kw):
    cfg = config_cls(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def _batch(B=3, T=13, V=97, device="cpu"):
    ids = torch.randint(0, V, (B, T), device=device)
    am = torch.ones(B, T, dtype=torch.long, device=device)
    am[0, :4] = 0  # left padding
    am[1, :1] = 0
    rm = torch.zeros(B, T, dtype=torch.long, device=device)
    rm[:, 7:] = 1
    rm[2, 11:] = 0  # right-padded response
    return ids, am, rm


def _logits_path(model, ids, am, rm, temperature):
    """The spec: log_softmax(model(...).logits / T), shifted, masked (B, T) in the model's dtype."""
    from flowrl_kernels.hf import left_padded_position_ids

    logits = model(input_ids=ids, attention_mask=am, position_ids=left_padded_position_ids(am)).logits
    ls = torch.log_softmax(logits / temperature, -1)
    m = (rm * am).bool()
    m[:, 0] = False
    logp = torch.zeros(ids.shape, dtype=ls.dtype, device=ls.device)
    ent = torch.zeros(ids.shape, dtype=ls.dtype, device=ls.device)
    logp[:, 1:] = ls[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    ent[:, 1:] = -(ls.exp() * ls).sum(-1)[:, :-1]
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    return torch.where(m, logp, zero), torch.where(m, ent, zero)


def _model_cases():
    from transformers import (CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    def llama_bias():
        m = _tiny(LlamaForCausalLM, LlamaConfig)
        head = torch.nn.Linear(32, 97, bias=True)
        torch.nn.init.normal_(head.bias)
        m.set_output_embeddings(head)
        return m

    return {
        "llama": lambda: _tiny(LlamaForCausalLM, LlamaConfig),
        "qwen2_tied": lambda: _tiny(Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=True),
        "llama_head_bias": llama_bias,
        "cohere_logit_scale": lambda: _tiny(CohereForCausalLM, CohereConfig, logit_scale=0.3),
    }


HF_CASES = [(c, t, None) for c in ("llama", "qwen2_tied", "llama_head_bias", "cohere_logit_scale") for t in (1.0, 0.6)]
HF_CASES.append(("llama", 0.6, "triton"))  # the fused kernel itself (CPU interpreter here) on the gathered rows


@pytest.mark.parametrize("case, temperature, impl", HF_CASES)
def test_hf_response_logprobs(case, temperature, impl, device):
    from flowrl_kernels._utils import triton_available
    from flowrl_kernels.hf import response_logprobs

    if impl == "triton" and not triton_available():
        pytest.skip("triton is not importable")

    model = _model_cases()[case]().to(device)
    model64 = copy.deepcopy(model).double()
    ids, am, rm = _batch(device=device)
    g = torch.randn(2, *ids.shape, dtype=torch.float64, device=device)

    def run(m, fn):
        m.zero_grad()
        logp, ent = fn(m)
        ((logp.double() * g[0]).sum() + (ent.double() * g[1]).sum()).backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    spec = lambda m: _logits_path(m, ids, am, rm, temperature)  # noqa: E731
    ours = run(model, lambda m: response_logprobs(m, ids, am, rm, temperature=temperature, return_entropy=True,
                                                  impl=impl))
    ref = run(model64, spec)
    tor = run(model, spec)
    assert ours[0].dtype == torch.float32
    masked = ~((rm * am).bool())
    masked[:, 0] = True
    assert (ours[0][masked] == 0).all() and (ours[1][masked] == 0).all()
    assert_no_worse_than_torch(ours[0], ref[0], tor[0], name="logp")
    assert_no_worse_than_torch(ours[1], ref[1], tor[1], name="entropy")
    assert set(ours[2]) == set(ref[2]), "every parameter the logits path trains gets a gradient"
    for n in ref[2]:
        # the body's backward is shared; a few extra ulps for the different op order in the head
        assert_no_worse_than_torch(ours[2][n], ref[2][n], tor[2][n], factor=4.0, ulps=64, name=f"grad {n}")
    if case == "qwen2_tied":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_hf_logprobs_only_and_no_response(device):
    from flowrl_kernels.hf import response_logprobs
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _tiny(LlamaForCausalLM, LlamaConfig).to(device)
    ids, am, rm = _batch(device=device)
    logp = response_logprobs(model, ids, am, rm)
    ref, _ = _logits_path(model, ids, am, rm, 1.0)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    # no response token at all: zeros, and still a (zero) gradient for the head (FSDP ranks must agree)
    logp = response_logprobs(model, ids, am, torch.zeros_like(rm))
    assert (logp == 0).all()
    logp.sum().backward()
    assert model.lm_head.weight.grad is not None and (model.lm_head.weight.grad == 0).all()
    assert "forward" not in model.lm_head.__dict__  # the head is restored


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_hf_return_hidden_is_the_heads_input(device, entropy, autocast):
    """return_hidden hands back the very tensor the lm_head was called with (what a forward pre-hook on
    the head sees: same object, the model's dtype even under autocast), and gradients through it reach the
    backbone; without it the outputs are unchanged (a tensor, or (logp, entropy))."""
    from flowrl_kernels.hf import response_logprobs
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _tiny(LlamaForCausalLM, LlamaConfig).to(device)
    ids, am, rm = _batch(device=device)
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            got = response_logprobs(model, ids, am, rm, return_entropy=entropy, return_hidden=True)
            plain = response_logprobs(model, ids, am, rm, return_entropy=entropy)
    finally:
        hook.remove()
    assert isinstance(got, tuple) and len(got) == (3 if entropy else 2)
    hidden = got[-1]
    assert hidden is seen[0] and hidden.shape == (*ids.shape, 32)  # the same object: no cast, no copy
    if entropy:
        assert isinstance(plain, tuple) and len(plain) == 2
        assert torch.equal(plain[0], got[0]) and torch.equal(plain[1], got[1])
    else:
        assert isinstance(plain, torch.Tensor) and torch.equal(plain, got[0])
    model.zero_grad()
    hidden.float().pow(2).sum().backward()  # the hidden states alone: the head's weight gets no gradient
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad is not None
    assert "forward" not in model.lm_head.__dict__


def test_hf_refuses_what_it_cannot_reproduce(device):
    from flowrl_kernels.hf import response_logprobs
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    ids, am, rm = _batch(device=device)
    gemma = _tiny(Gemma2ForCausalLM, Gemma2Config, head_dim=8, final_logit_softcapping=30.0).to(device)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        response_logprobs(gemma, ids, am, rm)
    # a post-head scale the config does not announce is caught by the probe columns
    cohere = _tiny(CohereForCausalLM, CohereConfig, logit_scale=0.3).to(device)
    cohere.config.logit_scale = None
    with pytest.raises(ValueError, match="does not announce"):
        response_logprobs(cohere, ids, am, rm)
    assert "forward" not in cohere.lm_head.__dict__


def test_hf_probe_checked_once_per_model(device, monkeypatch):
    # the post-head probe costs a host sync: it runs on a model's first call only, and later calls
    # still give the model's own log-probs
    import flowrl_kernels.hf as hf
    from transformers import LlamaConfig, LlamaForCausalLM

    seen = []
    real = hf._check_probe
    monkeypatch.setattr(hf, "_check_probe", lambda probe, scale: (seen.append(1), real(probe, scale)))
    model = _tiny(LlamaForCausalLM, LlamaConfig).to(device)
    for _ in range(3):
        ids, am, rm = _batch(device=device)
        logp = hf.response_logprobs(model, ids, am, rm)
        expect = torch.log_softmax(model(input_ids=ids, attention_mask=am,
                                         position_ids=hf.left_padded_position_ids(am)).logits.float(), -1)
        expect = expect[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        sel = ((rm != 0) & (am != 0))[:, 1:]
        assert torch.allclose(logp[:, 1:][sel], expect[sel], atol=1e-4)
        assert (logp[:, 1:][~sel] == 0).all() and (logp[:, 0] == 0).all()
    assert len(seen) == 1


def _fsdp2_worker(rank, world, init_file, queue):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from flowrl_kernels.hf import response_logprobs

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _tiny(LlamaForCausalLM, LlamaConfig)
        plain = copy.deepcopy(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)  # the head as its own unit: resharded after forward, re-gathered for backward
        fully_shard(model)
        torch.manual_seed(1 + rank)
        ids, am, rm = _batch()
        errs = []
        for m in (model, plain):
            logp, ent = response_logprobs(m, ids, am, rm, temperature=0.7, return_entropy=True)
            (logp.sum() + 0.3 * ent.sum()).backward()
            errs.append(torch.stack([logp, ent]))
        errs = [float((errs[0] - errs[1]).abs().max())]
        for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
            g = q.grad.clone()
            dist.all_reduce(g)  # FSDP averages the gradient over ranks
            errs.append(float((p.grad.full_tensor() - g / world).abs().max()))
        queue.put((rank, max(errs)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_hf_response_logprobs_under_fsdp2(tmp_path):
    """2 ranks (gloo, CPU), fully_shard on every block, the lm_head and the root: the same log-probs and
    entropy per rank and the same (rank-averaged) gradients as the unsharded model. CPU tensors on every
    machine by design (gloo ranks in spawned processes)."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fsdp2_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = dict(queue.get(timeout=5) for _ in procs)
    # the same fp32 ops run on the same rows: only the rank-average of the gradients may round
    assert max(results.values()) <= 1e-6, results


def test_trl_chunked_logprob_under_autocast_keeps_fp32_gradients(trl_mod, device):
    """bf16=True with fp32 parameters: the shim cast hidden and weight to bf16, so the gradients reaching
    the fp32 lm_head weight were bf16 values (g == g.bfloat16().float() exactly); TRL accumulates them in
    fp32. Now fp32 values, at least as close to the float64 result as TRL's own autocast path."""
    U, fk_trl = trl_mod
    orig = U._ChunkedLogProbFunction
    N, H, V = 29, 24, 301
    h = torch.randn(N, H, device=device)
    w = torch.randn(V, H, device=device) / H**0.5
    y = torch.randint(0, V, (N,), device=device)
    up = torch.randn(N, dtype=torch.float64, device=device)

    def run(fn, dtype, autocast):
        ins = [t.to(dtype).requires_grad_() for t in (h, w)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            res = fn.apply(ins[0], ins[1], None, y, 0.9, 128, None, 1.0, ("log_probs",))
        return list(torch.autograd.grad((res[0].double() * up).sum(), ins))

    ref = run(orig, torch.float64, False)
    trl = run(orig, torch.float32, True)
    with fk_trl.patched():
        ours = run(U._ChunkedLogProbFunction, torch.float32, True)
    for name, o, t, r in zip(["dh", "dw"], ours, trl, ref):
        assert o.dtype == torch.float32, name
        assert not torch.equal(o, o.bfloat16().float()), f"{name}: bf16-rounded values"
        assert max_abs_err(o, r) <= max_abs_err(t, r), name
        assert max_abs_err(o, t) <= 2 * max_abs_err(t, r) + 1e-6, name


def test_trl_patched_binds_trainers_built_inside(trl_mod, tmp_path):
    """`with fk_trl.patched():` around building the trainer only, then train() outside: TRL looks its
    helpers up at call time, so TRL's original ran, silently. A trainer built inside keeps the patch."""
    U, fk_trl = trl_mod
    transformers = import_or_skip("transformers")
    orig = U.selective_log_softmax

    class Probe(transformers.Trainer):
        def train(self, *args, **kwargs):  # what TRL's code reaches at call time
            return U.selective_log_softmax is not orig

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model = torch.nn.Linear(2, 2)
    with fk_trl.patched():
        trainer = Probe(model=model, args=args)
        assert trainer.train()
    assert U.selective_log_softmax is orig and not fk_trl.is_patched()
    assert trainer.train()  # built inside: patched for the call ...
    assert U.selective_log_softmax is orig and not fk_trl.is_patched()  # ... and only for it
    assert not Probe(model=model, args=args).train()  # built outside: TRL's own code, as asked
    assert transformers.Trainer.__init__.__module__ == "transformers.trainer"  # the construction hook is gone
