"""flowrl_loss: the FlowRL trajectory-balance loss over [B, T] token log-probs (docs/flowrl.md).

Byte floor: forward reads logp, old_logp, ref_logp (fp32 [B, T]) and the bool mask once, 13 B/token;
backward reads the mask and writes grad_logp, 5 B/token; full = 18 B/token ([B] vectors are noise).
No peer fuses this loss: the baseline is the reference (the ~10 torch ops the authors' code composes)
and torch.compile of it.

At these sizes the loss is bound by launches and passes, not by one kernel's speed, so every eager
provider also records ``aten_ops``: the ATen ops with a kernel one call dispatches (the fused op's
Triton / native launch counts as one). The fused op's remaining ATen ops work on [B] vectors or
scalars only (loss = per_seq.sum() / B, clip_frac, the backward's seed and the / B of "mean"); the
reference's include ~30 that read or write [B, T] tensors (masked means, the log-ratio sum, the
where/mul temporaries, the backward's grad_logp built from where/mul/div/expand).
(Folded from the issue-3 helper's first version of this file, which measured B=512 x T=8192.)
"""
import os

import pytest
import torch

from bench.common import DEVICE, MODES, ON_GPU, Provider, Unavailable, compiled, fk_op, run_case

# (B sequences, T tokens): a training batch of the paper's setup (512 prompts x 8 rollouts split in
# mini-batches; responses up to 8192 tokens) and a long-context one; CPU sizes keep the suite short.
# GPU also 8 x 128: a micro-batch where the host cost per call is most of the time (device_ms vs median_ms)
SHAPES = [(512, 8192), (64, 32768), (8, 128)] if ON_GPU else [(128, 8192), (16, 32768)]
if os.environ.get("FLOWRL_BENCH_LOSS_BT"):
    SHAPES = [tuple(int(x) for x in os.environ["FLOWRL_BENCH_LOSS_BT"].split("x"))]
PROVIDERS = ["triton", "native", "torch", "reference", "compile"]
KW = dict(beta=15.0, importance="sequence", clip=(0.8, 1.2), reduction="mean")


def provider(name: str) -> Provider:
    from flowrl_kernels import reference

    if name in ("triton", "native", "torch"):
        op = fk_op("flowrl_loss", name)
        return Provider(lambda **t: op(**t, **KW, impl=name)[0])
    if name == "reference":
        return Provider(lambda **t: reference.flowrl_loss(**t, **KW)[0])
    if name == "compile":
        f = compiled(reference.flowrl_loss)
        return Provider(lambda **t: f(**t, **KW)[0], skip_on_error=True)
    raise ValueError(name)


@pytest.mark.parametrize("B, T, mode, prov", [
    pytest.param(b, t, m, p, id=f"B{b}xT{t}-{m}-{p}") for b, t in SHAPES for m in MODES for p in PROVIDERS])
def test_flowrl_loss(benchmark, B, T, mode, prov):
    try:
        p = provider(prov)
    except Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = f"flowrl_loss B{B}xT{T} {mode}"

    def make_inputs(requires_grad):
        g = dict(device=DEVICE, dtype=torch.float32)
        logp = -torch.rand(B, T, **g) * 3  # token log-probs of sampled text: mostly in (-3, 0)
        # old/ref differ by a few % per token: sequence ratios over thousands of tokens get clipped
        old = logp + 0.05 * torch.randn(B, T, **g)
        ref = logp + 0.1 * torch.randn(B, T, **g)
        lengths = torch.randint(T // 4, T + 1, (B,), device=DEVICE)
        mask = torch.arange(T, device=DEVICE)[None, :] < lengths[:, None]
        return {"logp": logp.requires_grad_(requires_grad), "old_logp": old, "ref_logp": ref,
                "log_z": torch.randn(B, **g).requires_grad_(requires_grad),
                "rewards": torch.randn(B, **g), "mask": mask}

    bt = B * T
    run_case(benchmark, p, make_inputs, mode,
             info={"op": "flowrl_loss", "provider": prov, "model": f"B{B}xT{T}", "N": bt, "B": B, "T": T},
             bytes_moved={"forward": 13 * bt, "backward": 5 * bt, "full": 18 * bt},
             count_ops=prov != "compile")
