"""token_logprobs: per-token log-probs (+ entropy) from materialized logits [N, V].

Byte floor (PEERS.md): forward reads the logits once, N*V*s bytes; backward reads them once and
writes grad_logits once, 2*N*V*s; full = 3*N*V*s. Labels and the fp32 [N] outputs are < 0.01% of it.

Providers ("+H" = also returns the entropy, with its gradient):
  triton, triton+H, native, native+H, torch   flowrl_kernels.token_logprobs(impl=...)
  plain, plain+H                              what a user writes instead: log_softmax(logits.float() / T)
                                              .gather(label) (+ entropy from the same log-softmax)
  reference, reference+H                      flowrl_kernels.reference.token_logprobs (the spec: slower than
                                              plain, it guards every edge case in float64-safe steps)
  compile                                     torch.compile of the reference
  trl, trl+H                                  TRL selective_log_softmax / selective_log_softmax_and_entropy
  liger, flash-attn                           cross-entropy kernels with reduction="none": they return
                                              -logp only (no entropy), which is what they are used for.
  quack                                       QuACK cross_entropy (CuTe DSL, Hopper+), reduction="none":
                                              -logp only
"""
import os

import pytest
import torch

from bench import peers
from bench.common import (DEVICE, DTYPE, MODELS, ON_GPU, Provider, Shape, Unavailable, cases, compiled, fk_op,
                          labels_for, logits_shapes, plain_token_logprobs, run_case)

# N = tokens per micro-batch: 8192 is the PEERS.md anchor (H100, bf16); CPU sizes keep the suite short.
N0 = int(os.environ.get("FLOWRL_BENCH_N", 8192 if ON_GPU else 128))
SHAPES = logits_shapes(N0, (N0 // 2, N0, N0 * 2))
if ON_GPU:
    # micro-batches where the host cost of a call (Python, checks, launch) is a large part of the time:
    # device_ms beside median_ms shows it (overhead_ms)
    SHAPES += [Shape("qwen2.5-7b", n, *MODELS["qwen2.5-7b"]) for n in (256, 1024) if n < N0]
if not ON_GPU:
    # bf16 logits on the CPU (a bf16 model's lm_head output): half the bytes, but the reference upcasts
    # them to fp32 first (folded from the native helper's bench_native_token_logprobs.py, bf16 V=151936)
    SHAPES.append(Shape("qwen2.5-7b", N0, *MODELS["qwen2.5-7b"], modes=("forward", "full"), dtype=torch.bfloat16))
TEMPERATURE = 1.0  # the peers without a temperature argument (Liger) are only exact at T = 1
IGNORE = -100
PROVIDERS = ["triton", "triton+H", "native", "native+H", "torch", "plain", "plain+H", "reference", "reference+H",
             "compile", "trl", "trl+H", "liger", "flash-attn", "quack"]



def provider(name: str) -> Provider:
    from flowrl_kernels import reference

    ent = name.endswith("+H")
    base = name[:-2] if ent else name
    if base in ("triton", "native", "torch"):
        op = fk_op("token_logprobs", base)
        return Provider(lambda logits, labels: op(logits, labels, temperature=TEMPERATURE, return_entropy=ent,
                                                  ignore_index=IGNORE, impl=base))
    if base == "plain":
        return Provider(lambda logits, labels: plain_token_logprobs(logits, labels, TEMPERATURE, IGNORE, ent))
    if base == "reference":
        return Provider(lambda logits, labels: reference.token_logprobs(
            logits, labels, temperature=TEMPERATURE, return_entropy=ent, ignore_index=IGNORE))
    if base == "compile":
        f = compiled(reference.token_logprobs)
        return Provider(lambda logits, labels: f(logits, labels, temperature=TEMPERATURE, ignore_index=IGNORE),
                        skip_on_error=True)
    if name == "trl":
        f = peers.trl_selective_log_softmax()
        # TRL has no ignore_index: ignored rows go in as label 0 with row_mask = 0 (its own way)
        return Provider(lambda logits, labels: f(logits, labels.clamp(min=0), temperature=TEMPERATURE,
                                                 row_mask=labels != IGNORE),
                        note="logp only", skip_on_error=True)
    if name == "trl+H":
        f = peers.trl_logprob_entropy()
        return Provider(lambda logits, labels: f(logits, labels.clamp(min=0), temperature=TEMPERATURE,
                                                 row_mask=labels != IGNORE),
                        skip_on_error=True)
    if name == "liger":
        f = peers.liger_cross_entropy()
        return Provider(lambda logits, labels: f(logits, labels, ignore_index=IGNORE, reduction="none"),
                        note="-logp only, no entropy, no temperature", fresh=True, skip_on_error=True)
    if name == "flash-attn":
        f = peers.flash_attn_cross_entropy()
        return Provider(lambda logits, labels: f(logits, labels, logit_scale=1.0 / TEMPERATURE,
                                                 ignore_index=IGNORE)[0],
                        note="-logp only, no entropy", skip_on_error=True)
    if name == "quack":
        f = peers.quack_cross_entropy()
        return Provider(lambda logits, labels: f(logits if TEMPERATURE == 1.0 else logits / TEMPERATURE, labels,
                                                 ignore_index=IGNORE, reduction="none"),
                        note="-logp only, no entropy", skip_on_error=True)
    raise ValueError(name)


@pytest.mark.parametrize("shape, mode, prov", cases(SHAPES, PROVIDERS))
def test_token_logprobs(benchmark, shape, mode, prov):
    try:
        p = provider(prov)
    except Unavailable as e:
        pytest.skip(str(e))
    N, V = shape.N, shape.V
    dtype = shape.dtype or DTYPE
    s = dtype.itemsize
    benchmark.group = f"token_logprobs {shape.id} V{V} {mode}"

    def make_inputs(requires_grad):
        # randn * 2: a spread of logits like a trained model's (max softmax prob ~0.01-0.5), never zeros
        logits = (torch.randn(N, V, device=DEVICE, dtype=torch.float32) * 2).to(dtype)
        return {"logits": logits.requires_grad_(requires_grad), "labels": labels_for(N, V, ignore_index=IGNORE)}

    run_case(benchmark, p, make_inputs, mode,
             info={"op": "token_logprobs", "provider": prov, "model": shape.model, "N": N, "V": V,
                   "dtype": str(dtype).replace("torch.", "")},
             bytes_moved={"forward": N * V * s, "backward": 2 * N * V * s, "full": 3 * N * V * s})

