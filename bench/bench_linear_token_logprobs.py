"""linear_token_logprobs: per-token log-probs (+ entropy) of hidden @ weight.T, the fused lm_head.

FLOP (the recompute algorithm a fused kernel runs): forward 2*N*H*V, backward 6*N*H*V (recompute the
logits, then dH and dW), full 8*N*H*V. The same count is used for every provider, so TFLOP/s compares
time; an unfused path does 4*N*H*V in its backward (it keeps the logits) but writes and re-reads the
[N, V] fp32 logits several times, which is what peak memory shows.

Providers ("+H" = also returns the entropy, with its gradient):
  triton(+H), native(+H), torch(+H)           flowrl_kernels.linear_token_logprobs(impl=...); "torch" is
                                              its own chunked autograd path (no [N, V] tensor), not the
                                              reference
  reference, reference+H                      flowrl_kernels.reference.linear_token_logprobs (the spec:
                                              upcasts hidden and weight, fp32 matmul, fp32 logits)
  lm_head                                     what a model does: logits = hidden @ weight.T in the input
                                              dtype, then reference.token_logprobs (skipped at float32,
                                              where it is the reference)
  lm_head-plain                               the same logits, then the plain log_softmax(x.float())
                                              .gather(...) a user writes (common.plain_token_logprobs)
  compile                                     torch.compile of the reference
  liger, cce                                  Liger fused_linear_cross_entropy and Cut Cross-Entropy with
                                              reduction="none": -logp only (no entropy, no temperature)
  liger-sm90                                  Liger >= 0.8's SM90 CuTe-DSL backend of the same op (Hopper+)
  quack-linear                                QuACK's chunked linear cross-entropy (CuTe DSL, Hopper+):
                                              reduction="sum" (it has no per-token output)
Shapes: the models of common.MODELS at N0, plus Liger's own published shape (M=4096, H=4096,
V=131072: "liger-shape"), so our number sits beside theirs on it.
"""
import os

import pytest
import torch

from bench import peers
from bench.common import (DEVICE, DTYPE, MODELS, ON_GPU, Provider, Shape, Unavailable, cases, compiled, fk_op,
                          labels_for, plain_token_logprobs, run_case)

# GPU: 8192 tokens. CPU: fp32 matmuls run at ~0.1-0.2 TFLOP/s on 2 cores, so a full step at N=16,
# V=152064 (8NHV = 70 GFLOP) already takes ~0.5 s; the suite must stay under 10 minutes.
N0 = int(os.environ.get("FLOWRL_BENCH_LINEAR_N", 8192 if ON_GPU else 16))
# Peak memory vs N, full mode only. GPU: the largest vocab around N0. CPU: SmolLM2 (the model the CPU
# trainer runs) at N where the chunked torch path (64 MiB of fp32 logits = 341 rows per chunk) has
# 1, 2 and 3 chunks (N = 128, 384, 768) while the reference's [N, V] fp32 tensors keep growing. The
# issue's N=4096 point (chunked <= 10% of naive) is measured by bench_linear_token_logprobs_memory.py.
# CPU: Llama-3-8B is left out of the fused linear (its H and V lie between the other two; each of its
# cases took ~15 s on 1 core and the CPU suite must stay under 10 minutes).
SHAPES = [Shape(m, N0, h, v) for m, (h, v) in MODELS.items() if ON_GPU or m != "llama3-8b"]
# Liger's published SM90 shape (M=4096, H=4096, V=131072 on an H200: 24.87 ms fwd + bwd)
LIGER_SHAPE = Shape("liger-shape", 4096, 4096, 131072)
if ON_GPU:
    SHAPES += [Shape("qwen2.5-7b", n, *MODELS["qwen2.5-7b"], modes=("full",)) for n in (N0 // 2, N0 * 2)]
    SHAPES += [LIGER_SHAPE]
else:
    SHAPES += [Shape("smollm2-135m", n, *MODELS["smollm2-135m"], modes=("full",)) for n in (128, 384, 768)]
TEMPERATURE = 1.0
IGNORE = -100
PROVIDERS = ["triton", "triton+H", "native", "native+H", "torch", "torch+H", "reference", "reference+H", "lm_head",
             "lm_head-plain", "compile", "liger", "liger-sm90", "quack-linear", "cce"]


def provider(name: str) -> Provider:
    from flowrl_kernels import reference

    ent = name.endswith("+H")
    base = name[:-2] if ent else name
    if base in ("triton", "native", "torch"):
        op = fk_op("linear_token_logprobs", base)
        return Provider(lambda hidden, weight, labels: op(hidden, weight, labels, temperature=TEMPERATURE,
                                                          return_entropy=ent, ignore_index=IGNORE, impl=base))
    if base == "reference":
        return Provider(lambda hidden, weight, labels: reference.linear_token_logprobs(
            hidden, weight, labels, temperature=TEMPERATURE, return_entropy=ent, ignore_index=IGNORE))
    if name == "lm_head":
        if DTYPE == torch.float32:
            raise Unavailable("at float32 the lm_head path is the reference itself")
        return Provider(lambda hidden, weight, labels: reference.token_logprobs(
            hidden @ weight.t(), labels, temperature=TEMPERATURE, ignore_index=IGNORE))
    if name == "lm_head-plain":
        if DTYPE == torch.float32:
            raise Unavailable("at float32 the lm_head path is the reference itself")
        return Provider(lambda hidden, weight, labels: plain_token_logprobs(
            hidden @ weight.t(), labels, TEMPERATURE, IGNORE))
    if name == "compile":
        f = compiled(reference.linear_token_logprobs)
        return Provider(lambda hidden, weight, labels: f(hidden, weight, labels, temperature=TEMPERATURE,
                                                         ignore_index=IGNORE), skip_on_error=True)
    if name == "liger":
        f = peers.liger_fused_linear_cross_entropy()
        return Provider(lambda hidden, weight, labels: f(hidden, weight, labels, ignore_index=IGNORE,
                                                         reduction="none"),
                        note="-logp only, no entropy, no temperature", skip_on_error=True)
    if name == "liger-sm90":
        f = peers.liger_fused_linear_cross_entropy_sm90()
        # the backend returns (loss, z_loss, token accuracy, predicted tokens)
        return Provider(lambda hidden, weight, labels: f(hidden, weight, labels, ignore_index=IGNORE,
                                                         reduction="none")[0],
                        note="-logp only, no entropy, no temperature", skip_on_error=True)
    if name == "quack-linear":
        f = peers.quack_linear_cross_entropy()
        return Provider(lambda hidden, weight, labels: f(hidden, weight, labels, ignore_index=IGNORE,
                                                         reduction="sum"),
                        note="summed -logp only (no per-token output), no entropy, no temperature",
                        skip_on_error=True)
    if name == "cce":
        f = peers.cut_cross_entropy()
        return Provider(lambda hidden, weight, labels: f(hidden, weight, labels, ignore_index=IGNORE,
                                                         reduction="none"),
                        note="-logp only, no entropy, no temperature; default gradient filtering",
                        skip_on_error=True)
    raise ValueError(name)


@pytest.mark.parametrize("shape, mode, prov", cases(SHAPES, PROVIDERS))
def test_linear_token_logprobs(benchmark, shape, mode, prov):
    try:
        p = provider(prov)
    except Unavailable as e:
        pytest.skip(str(e))
    N, H, V = shape.N, shape.H, shape.V
    s = DTYPE.itemsize
    benchmark.group = f"linear_token_logprobs {shape.id} H{H} V{V} {mode}"

    def make_inputs(requires_grad):
        # logits = hidden @ weight.T with std ~2, like a trained lm_head; random data, never zeros
        hidden = torch.randn(N, H, device=DEVICE, dtype=torch.float32).to(DTYPE)
        weight = (torch.randn(V, H, device=DEVICE, dtype=torch.float32) * (2.0 / H**0.5)).to(DTYPE)
        return {"hidden": hidden.requires_grad_(requires_grad), "weight": weight.requires_grad_(requires_grad),
                "labels": labels_for(N, V, ignore_index=IGNORE)}

    nhv = N * H * V
    # bytes: read hidden and weight; backward also writes dH and dW (floor when the logits never exist)
    io_fwd = (N * H + V * H) * s
    run_case(benchmark, p, make_inputs, mode,
             info={"op": "linear_token_logprobs", "provider": prov, "model": shape.model, "N": N, "H": H, "V": V},
             flop={"forward": 2 * nhv, "backward": 6 * nhv, "full": 8 * nhv},
             bytes_moved={"forward": io_fwd, "backward": 2 * io_fwd, "full": 3 * io_fwd})
