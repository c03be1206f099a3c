"""The peers' contracts, one test per row of the tables in flowrl_kernels/integrations/{trl,verl,openrlhf}.py.

Each row is a path the peer takes (its fused kernel, its torch code), an input dtype, and what it promises:
the output dtype, bitwise equality or a tolerance, the gradient's dtype, ignore / mask handling. The
peers' GPU-only paths (TRL's Triton kernel, flash-attn's cross-entropy) are selected by monkeypatching the
peer's own dispatch flags, so every row runs on every device; on CUDA the real kernels run too. TRL and
verl are the installed packages; OpenRLHF does not import here (deepspeed, flash-attn), so its rows check
the replacements against its documented semantics. Values are judged as in test_integrations.py (no
worse than torch at the same dtype, against float64); bitwise rows compare with torch.equal over many
seeds.
"""
from __future__ import annotations

import logging

import pytest
import torch

from flowrl_kernels import reference as R
from flowrl_kernels.integrations import _patching
from helpers import assert_no_worse_than_torch, import_or_skip

HALF = [torch.float16, torch.bfloat16]
SEEDS = range(16)  # x 31 positions x 2 temperatures: ~1000 bitwise positions per dtype and function


def _cases(device, dtype, seeds=SEEDS):
    """(logits, index, row_mask) over seeds and shapes: strided [B, T, V] views (logits[:, :-1]) and strided
    [N, V] rows (the peers' torch paths loop over dim 0, so a lone [V] row is no case of theirs); odd vocab
    sizes; scale-4 logits (peaked rows, like a trained model)."""
    for seed in seeds:
        torch.manual_seed(seed)
        for lead, V in (((2, 5), 37), ((3, 4), 129), ((9,), 1001)):
            if len(lead) == 2:
                x = (4 * torch.randn(lead[0], lead[1] + 1, V, device=device)).to(dtype)[:, :-1]
            else:
                x = (4 * torch.randn(2 * lead[0], V, device=device)).to(dtype)[::2]
            idx = torch.randint(0, V, lead, device=device)
            yield x, idx, torch.rand(lead, device=device) > 0.3


def _grad(out, x, g=None):
    (dx,) = torch.autograd.grad((out.double() * (torch.ones_like(out, dtype=torch.float64) if g is None else g)).sum(),
                                [x])
    return dx


@pytest.fixture
def noted(monkeypatch):
    """A fresh 'logged once' registry, so each test sees its own first debug lines."""
    monkeypatch.setattr(_patching, "_NOTED", set())


# ----------------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def trl(noted):
    U = import_or_skip("trl.trainer.utils")
    import flowrl_kernels.integrations.trl as fk_trl

    originals = (U.selective_log_softmax, U.entropy_from_logits, U.selective_log_softmax_and_entropy)
    yield U, fk_trl, originals
    fk_trl.unpatch()


def _trl_torch_path(U, monkeypatch):
    # TRL's torch code on every device (on CPU it is the only path; on CUDA it runs when triton is missing)
    monkeypatch.setattr(U, "is_triton_available", lambda: False)


def _trl_kernel_path(U, monkeypatch):
    # TRL's own dispatch says "kernel" (what it says for CUDA tensors with triton): the replacement must
    # return what TRL's Triton kernel returns, float32, on whatever device the tensors are
    monkeypatch.setattr(U, "is_triton_available", lambda: True)
    monkeypatch.setattr(U, "_supports_trl_loss_kernel", lambda logits, index=None, row_mask=None: True)


@pytest.mark.parametrize("dtype", HALF)
def test_trl_half_torch_path_is_bitwise(trl, monkeypatch, device, dtype):
    """fp16 / bf16 on TRL's torch path -> the logits' dtype, bit for bit TRL's (and, on the CPU, bit for
    bit ``log_softmax(-1).gather``, as TRL's own tests assert); gradients in the logits' dtype."""
    U, fk_trl, (sls, efl, _) = trl
    _trl_torch_path(U, monkeypatch)
    n = 0
    with fk_trl.patched():
        for k, (x, idx, mask) in enumerate(_cases(device, dtype)):
            for T in (1.0, 0.7):
                x = x.detach().requires_grad_(k < 6)  # gradients on the first 2 seeds (the slow part on CPU)
                lp = U.selective_log_softmax(x, idx, temperature=T, row_mask=mask)
                lp2, ent2 = U.selective_log_softmax_and_entropy(x, idx, temperature=T, row_mask=mask)
                ent = U.entropy_from_logits(x / T)
                want_lp = sls(x, idx, temperature=T, row_mask=mask)
                want_ent = efl(x / T)  # the combined helper on TRL's torch path: both helpers on x / T
                for got, want in ((lp, want_lp), (lp2, want_lp), (ent, want_ent),
                                  (ent2, want_ent.masked_fill(mask == 0, 0))):
                    assert got.dtype == dtype and torch.equal(got, want)
                if device == "cpu":
                    ls = (x / T).log_softmax(-1)
                    spec = ls.gather(-1, idx[..., None])[..., 0].masked_fill(mask == 0, 0)
                    assert torch.equal(lp, spec) and torch.equal(ent, -(ls.exp() * ls).sum(-1))
                if x.requires_grad:
                    dx = _grad(lp + ent2, x)
                    assert dx.dtype == dtype and torch.equal(dx, _grad(want_lp + want_ent.masked_fill(mask == 0, 0), x))
                n += lp.numel()
    assert n == len(SEEDS) * 2 * (10 + 12 + 9)


@pytest.mark.parametrize("dtype", HALF)
def test_torch_cpu_half_log_softmax_is_not_fp32_rounded_once(dtype):
    """Why the half-precision torch paths run the peer's own code (integrations/trl.py docstring): torch's
    CPU log_softmax for fp16 / bf16 is not the fp32 result rounded once (it rounds the row sum and its log
    to the half dtype), so our fp32 log-probs rounded once cannot be bitwise equal. If this ever fails,
    torch changed, and the integrations could compute those calls themselves."""
    torch.manual_seed(0)
    x = torch.randn(64, 1001).to(dtype)
    once = x.float().log_softmax(-1).to(dtype)  # any fp32 log_softmax, rounded once
    assert (once != x.log_softmax(-1)).float().mean() > 0.05  # measured here: 17% (bf16), 20% (fp16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trl_torch_path_keeps_fp32_fp64(trl, monkeypatch, device, dtype):
    """fp32 / fp64 on TRL's torch path -> the same dtype, within tolerance of TRL's own result."""
    U, fk_trl, (sls, efl, both) = trl
    _trl_torch_path(U, monkeypatch)
    with fk_trl.patched():
        for x, idx, mask in _cases(device, dtype, seeds=range(2)):
            x = x.detach().requires_grad_()
            outs = [U.selective_log_softmax(x, idx, temperature=0.7, row_mask=mask), U.entropy_from_logits(x),
                    *U.selective_log_softmax_and_entropy(x, idx, temperature=0.7, row_mask=mask)]
            x64 = x.detach().double()
            refs = [sls(x64, idx, temperature=0.7, row_mask=mask), efl(x64), *both(x64, idx, temperature=0.7,
                                                                                 row_mask=mask)]
            tors = [sls(x, idx, temperature=0.7, row_mask=mask), efl(x), *both(x, idx, temperature=0.7,
                                                                             row_mask=mask)]
            for i, (o, r, t) in enumerate(zip(outs, refs, tors)):
                assert o.dtype == dtype == t.dtype and o.shape == r.shape
                # fp64: TRL's own result is the reference (nothing more precise to judge either by), so the
                # bound is the slack alone; 64 ulps covers two fp64 summation orders over V <= 1001 terms
                assert_no_worse_than_torch(o, r, t.detach(), name=f"output {i}",
                                           ulps=64 if dtype == torch.float64 else 8)
            assert _grad(outs[0] + outs[1], x).dtype == dtype


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_trl_kernel_path_returns_float32(trl, monkeypatch, device, dtype):
    """Where TRL runs its Triton kernel (CUDA / XPU tensors), it returns float32 for fp16 / bf16 / fp32
    logits, masked rows 0 with zero gradient: so does the replacement."""
    U, fk_trl, (sls, _, _) = trl
    x, idx, mask = next(_cases(device, dtype, seeds=[0]))
    if device == "cuda" and U.is_triton_available():  # the row itself, from TRL's real kernel
        assert sls(x, idx, temperature=0.7, row_mask=mask).dtype == torch.float32
    _trl_kernel_path(U, monkeypatch)
    with fk_trl.patched():
        for x, idx, mask in _cases(device, dtype, seeds=range(2)):
            x = x.detach().requires_grad_()
            lp = U.selective_log_softmax(x, idx, temperature=0.7, row_mask=mask)
            lp2, ent2 = U.selective_log_softmax_and_entropy(x, idx, temperature=0.7, row_mask=mask)
            ent = U.entropy_from_logits(x)
            assert lp.dtype == lp2.dtype == ent2.dtype == ent.dtype == torch.float32
            labels = idx.masked_fill(mask == 0, -100)
            ref = R.token_logprobs(x.detach().double(), labels, temperature=0.7, return_entropy=True)
            tor = R.token_logprobs(x.detach(), labels, temperature=0.7, return_entropy=True)
            for o, r, t in ((lp, ref[0], tor[0]), (lp2, ref[0], tor[0]), (ent2, ref[1], tor[1])):
                assert_no_worse_than_torch(o, r, t)
            assert (lp[mask == 0] == 0).all() and (ent2[mask == 0] == 0).all()
            dx = _grad(lp + ent2, x)
            assert dx.dtype == dtype and (dx[mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_top_k_index_is_trls_own(trl, device, dtype, caplog):
    U, fk_trl, (sls, _, _) = trl
    caplog.set_level(logging.DEBUG, logger="flowrl_kernels.integrations")
    x = (4 * torch.randn(2, 4, 50, device=device)).to(dtype)
    idx = torch.randint(0, 50, (2, 4, 3), device=device)  # (..., K): a top-K gather, not per-token
    with fk_trl.patched():
        got = U.selective_log_softmax(x, idx, temperature=0.5)
    assert got.shape == (2, 4, 3) and torch.equal(got, sls(x, idx, temperature=0.5))
    assert "trl.selective_log_softmax: TRL's own code (top-K index (..., K))" in caplog.messages


def test_trl_inputs_ours_refuse_are_trls_own(trl, device, caplog):
    """TRL's torch code takes any layout and device; ours refuses a strided vocab dim and devices other
    than CPU / CUDA: those calls run TRL's own code (same result) and say so."""
    U, fk_trl, (sls, efl, _) = trl
    caplog.set_level(logging.DEBUG, logger="flowrl_kernels.integrations")
    x = torch.randn(3, 33, 4, device=device).transpose(1, 2)  # [3, 4, 33], vocab stride 4
    idx = torch.randint(0, 33, (3, 4), device=device)
    meta = torch.empty(3, 4, 33, device="meta")
    with fk_trl.patched():
        assert torch.equal(U.selective_log_softmax(x, idx), sls(x, idx))
        assert torch.equal(U.entropy_from_logits(x), efl(x))
        got = U.entropy_from_logits(meta)
    assert got.device.type == "meta" and got.shape == (3, 4) and got.dtype == torch.float32
    assert {"trl.selective_log_softmax: TRL's own code (logits whose last dim is not stride 1)",
            "trl.entropy_from_logits: TRL's own code (logits whose last dim is not stride 1)",
            "trl.entropy_from_logits: TRL's own code (meta tensors)"} <= set(caplog.messages)


def test_trl_paths_logged_once_each(trl, monkeypatch, device, caplog):
    """One DEBUG line per process per (function, path): which code ran, and why TRL's own code ran."""
    U, fk_trl, _ = trl
    _trl_torch_path(U, monkeypatch)
    caplog.set_level(logging.DEBUG, logger="flowrl_kernels.integrations")
    idx = torch.randint(0, 33, (3, 4), device=device)
    with fk_trl.patched():
        for _ in range(3):
            for dtype in (torch.bfloat16, torch.float32):
                U.selective_log_softmax(torch.randn(3, 4, 33, device=device, dtype=dtype), idx)
    lines = [r.getMessage() for r in caplog.records if r.name == "flowrl_kernels.integrations.trl"]
    assert sorted(lines) == sorted([
        "trl.selective_log_softmax: TRL's own code (torch.bfloat16 logits on TRL's torch path "
        "(bitwise half-precision contract))",
        "trl.selective_log_softmax: flowrl_kernels.token_logprobs, torch.float32 out (TRL's torch path)",
    ])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU contract: on the GPU neither TRL's kernel nor ours "
                    "range-checks the index (no device sync)")
def test_trl_unmasked_out_of_range_index_is_an_error(trl):
    U, fk_trl, (sls, _, _) = trl
    x = torch.randn(2, 3, 17)
    idx = torch.randint(0, 17, (2, 3))
    idx[1, 2] = -100  # TRL's torch path gathers it: an error there, so it must be one with the patch too
    with pytest.raises(RuntimeError):
        sls(x, idx)
    with fk_trl.patched(), pytest.raises(ValueError, match="labels has value -100"):
        U.selective_log_softmax(x, idx)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False  # ... unless the row is masked, where TRL's kernel (and ours) never reads it
    with fk_trl.patched():
        assert U.selective_log_softmax(x, idx, row_mask=mask)[1, 2] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_trl_fused_lm_head_returns_float32(trl, device, dtype):
    """_ChunkedLogProbFunction (add_fused_lm_head): float32 log-probs and entropy on every device for every
    input dtype; gradients in each input's dtype."""
    U, fk_trl, _ = trl
    orig = U._ChunkedLogProbFunction
    h = torch.randn(13, 16, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(41, 16, device=device) / 4).to(dtype).requires_grad_()
    y = torch.randint(0, 41, (13,), device=device)
    args = (h, w, None, y, 0.7, 16, None, 1.0, ("log_probs", "entropy"))
    want = orig.apply(*args)
    with fk_trl.patched():
        got = U._ChunkedLogProbFunction.apply(*args)
    assert len(got) == 5 and got[2:] == (None, None, None)
    assert got[0].dtype == got[1].dtype == want[0].dtype == want[1].dtype == torch.float32
    dh, dw = torch.autograd.grad((got[0] + got[1]).sum(), [h, w])
    assert dh.dtype == dw.dtype == dtype


def test_trl_fused_lm_head_hands_back_what_it_does_not_compute(trl, device, caplog):
    U, fk_trl, _ = trl
    caplog.set_level(logging.DEBUG, logger="flowrl_kernels.integrations")
    orig = U._ChunkedLogProbFunction
    h = torch.randn(9, 8, device=device)
    w = torch.randn(23, 8, device=device)
    y = torch.randint(0, 23, (9,), device=device)
    zero3 = w.clone()
    zero3.ds_id = 7  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    cases = {
        "logit soft-capping": (h, w, None, y, 0.7, 8, 30.0, 1.0, ("log_probs",)),
        "outputs ['is_top1']": (h, w, None, y, 0.7, 8, None, 1.0, ("log_probs", "is_top1")),
        "logit_scale <= 0": (h, w, None, y, 0.7, 8, None, 0.0, ("log_probs",)),
        "a DeepSpeed ZeRO-3 partitioned weight": (h, zero3, None, y, 0.7, 8, None, 1.0, ("log_probs",)),
        "weight whose last dim is not stride 1": (h, w.t().contiguous().t(), None, y, 0.7, 8, None, 1.0,
                                                  ("log_probs",)),
    }
    with fk_trl.patched(), torch.no_grad():
        for reason, args in cases.items():
            got, want = U._ChunkedLogProbFunction.apply(*args), orig.apply(*args)
            assert all((g is None and v is None) or torch.equal(g, v) for g, v in zip(got, want)), reason
            assert f"trl.ChunkedLogProbFunction: TRL's own code ({reason})" in caplog.messages


# ----------------------------------------------------------------------------------------------------
# verl
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def verl(noted, monkeypatch):
    F = import_or_skip("verl.utils.torch_functional")
    import flowrl_kernels.integrations.verl as fk_verl

    # verl's torch path (no flash-attn, no torch_npu) unless a test selects another one
    monkeypatch.setattr(F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)
    monkeypatch.setattr(F, "NPU_CROSS_ENTROPY_LOSS_AVAILABLE", False)
    monkeypatch.delenv("VERL_DISABLE_FLASH_ATTN_CE", raising=False)
    originals = (F.logprobs_from_logits, F.entropy_from_logits, F.entropy_from_logits_with_chunking)
    yield F, fk_verl, originals
    fk_verl.unpatch()


@pytest.mark.parametrize("dtype", HALF)
def test_verl_half_torch_path_is_bitwise(verl, device, dtype):
    F, fk_verl, (lfl, _, _) = verl
    with fk_verl.patched():
        for k, (x, idx, _) in enumerate(_cases(device, dtype)):
            x = x.detach().requires_grad_(k < 6)
            lp = F.logprobs_from_logits(x, idx)
            want = lfl(x, idx)
            assert lp.dtype == dtype and torch.equal(lp, want)
            if device == "cpu":
                assert torch.equal(lp, x.log_softmax(-1).gather(-1, idx[..., None])[..., 0])
            if x.requires_grad:
                dx = _grad(lp, x)
                assert dx.dtype == dtype and torch.equal(dx, _grad(want, x))


@pytest.mark.parametrize("dtype", HALF + [torch.float32, torch.float64])
def test_verl_flash_attn_path_returns_float32(verl, monkeypatch, device, dtype):
    """flash-attn's cross-entropy: float32 out for every input dtype, -100 labels give 0 and zero grad.
    VERL_DISABLE_FLASH_ATTN_CE=1 puts verl back on its torch path (the logits' dtype)."""
    F, fk_verl, _ = verl
    monkeypatch.setattr(F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    x, idx, mask = next(_cases(device, dtype, seeds=[0]))
    x = x.detach().requires_grad_()
    labels = idx.masked_fill(mask == 0, -100)
    with fk_verl.patched():
        lp = F.logprobs_from_logits(x, labels)
        assert lp.dtype == torch.float32 and (lp[mask == 0] == 0).all()
        ref = R.token_logprobs(x.detach().double(), labels)
        assert_no_worse_than_torch(lp, ref, R.token_logprobs(x.detach().float(), labels))
        dx = _grad(lp, x)
        assert dx.dtype == dtype and (dx[mask == 0] == 0).all()
        monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
        assert F.logprobs_from_logits(x, idx).dtype == dtype


def test_verl_npu_path_is_verls_own(verl, monkeypatch, device):
    F, fk_verl, _ = verl
    monkeypatch.setattr(F, "NPU_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    sentinel = torch.full((2, 3), 7.0, device=device)
    monkeypatch.setattr(F, "logprobs_from_logits_torch_npu", lambda logits, labels: sentinel)
    with fk_verl.patched():
        got = F.logprobs_from_logits(torch.randn(2, 3, 11, device=device), torch.zeros(2, 3, dtype=torch.long,
                                                                                       device=device))
    assert got is sentinel


@pytest.mark.parametrize("dtype", HALF + [torch.float32, torch.float64])
def test_verl_entropy_keeps_the_logits_dtype(verl, device, dtype):
    """entropy_from_logits: the logits' dtype out (fp32 math rounded once: no worse than verl's own ops at
    that dtype); entropy_from_logits_with_chunking: float32 out whatever comes in."""
    F, fk_verl, (_, efl, efl_chunk) = verl
    for x, _, _ in _cases(device, dtype, seeds=range(2)):
        x = x.detach().requires_grad_()
        rows = x.reshape(-1, x.shape[-1])
        ref, ref_rows = efl(x.detach().double()), efl(rows.detach().double())
        with fk_verl.patched():
            ent, ent_rows = F.entropy_from_logits(x), F.entropy_from_logits_with_chunking(rows, chunk_size=4)
        assert ent.dtype == dtype and ent.shape == x.shape[:-1]
        assert ent_rows.dtype == efl_chunk(rows.detach(), chunk_size=4).dtype == torch.float32
        assert_no_worse_than_torch(ent, ref, efl(x.detach()), name="entropy")
        assert_no_worse_than_torch(ent_rows, ref_rows, efl_chunk(rows.detach(), chunk_size=4), name="chunked")
        assert _grad(ent, x).dtype == dtype


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_verl_entropy_under_torch_compile(verl, device, dtype):
    """verl's actors call torch.compile(verl_F.entropy_from_logits, dynamic=True) at init, i.e. on the
    patched function: the compiled replacement keeps the dtype and the eager values."""
    F, fk_verl, _ = verl
    x = (4 * torch.randn(3, 5, 41, device=device)).to(dtype)
    torch._dynamo.reset()
    with fk_verl.patched():
        eager = F.entropy_from_logits(x)
        compiled = torch.compile(F.entropy_from_logits, dynamic=True, backend="aot_eager")(x)
    assert compiled.dtype == eager.dtype == dtype and torch.equal(compiled, eager)


def test_verl_chunked_entropy_takes_only_rows(verl, device):
    """verl's chunked entropy is written for [N, V]; any other shape runs verl's own code (same outcome)."""
    F, fk_verl, (_, _, efl_chunk) = verl
    x = torch.randn(2, 3, 19, device=device)
    with pytest.raises(RuntimeError) as want:
        efl_chunk(x, chunk_size=4)
    with fk_verl.patched(), pytest.raises(type(want.value)):
        F.entropy_from_logits_with_chunking(x, chunk_size=4)


# ----------------------------------------------------------------------------------------------------
# OpenRLHF (the package does not import here: its documented semantics stand in for the original)
# ----------------------------------------------------------------------------------------------------
def _openrlhf_log_probs(logits, labels, temperature=1.0):
    """OpenRLHF 0.11.2 log_probs_from_logits without flash-attn, as documented in integrations/openrlhf.py."""
    if temperature != 1.0:
        logits.div_(temperature)
    if logits.dtype in (torch.float32, torch.float64):
        return logits.gather(-1, labels[..., None])[..., 0] - logits.logsumexp(-1)
    return torch.stack([row.log_softmax(-1).gather(-1, lab[..., None])[..., 0] for row, lab in zip(logits, labels)])


def _openrlhf_entropy(logits):
    return logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)


@pytest.fixture
def orlhf(noted):
    import flowrl_kernels.integrations.openrlhf as fk_o

    calls = []

    def original(*args):
        calls.append(args)
        return _openrlhf_log_probs(*args)

    return fk_o, fk_o._build_log_probs_from_logits(original), fk_o._build_compute_entropy(_openrlhf_entropy), calls


@pytest.mark.parametrize("dtype", HALF)
def test_openrlhf_half_is_openrlhfs_own(orlhf, device, dtype):
    """fp16 / bf16: OpenRLHF's own row loop runs (bitwise by construction) and scales the logits in place
    exactly once."""
    _, lp_fn, _, calls = orlhf
    for x, idx, _ in _cases(device, dtype, seeds=range(3)):
        xs = x.clone()
        got = lp_fn(xs, idx, 0.7)
        assert got.dtype == dtype and torch.equal(got, _openrlhf_log_probs(x.clone(), idx, 0.7))
        assert torch.equal(xs, x / 0.7)
    assert len(calls) == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_openrlhf_fp32_fp64_keep_dtype(orlhf, monkeypatch, device, dtype):
    """fp32 / fp64: the same dtype without flash-attn, float32 with it (-100 then gives 0); the logits are
    scaled in place once either way."""
    fk_o, lp_fn, _, calls = orlhf
    x, idx, mask = next(_cases(device, dtype, seeds=[0]))
    xs = x.clone().requires_grad_(False)
    got = lp_fn(xs, idx, 0.7)
    assert got.dtype == dtype and torch.equal(xs, x / 0.7) and not calls
    assert_no_worse_than_torch(got, _openrlhf_log_probs(x.double(), idx, 0.7),
                               _openrlhf_log_probs(x.clone(), idx, 0.7))
    monkeypatch.setattr(fk_o, "_flash_ce_importable", lambda: True)
    labels = idx.masked_fill(mask == 0, -100)
    got = lp_fn(x.clone(), labels)
    assert got.dtype == torch.float32 and (got[mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_openrlhf_entropy_keeps_the_logits_dtype(orlhf, device, dtype):
    _, _, ent_fn, _ = orlhf
    for x, _, _ in _cases(device, dtype, seeds=range(2)):
        x = x.detach().requires_grad_()
        ent = ent_fn(x)
        assert ent.dtype == dtype and _grad(ent, x).dtype == dtype
        assert_no_worse_than_torch(ent, _openrlhf_entropy(x.detach().double()), _openrlhf_entropy(x.detach()))
