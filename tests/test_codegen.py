"""Static codegen checks: compile the Triton kernels for H100 (sm_90) on the CPU and read the SASS.

No GPU needed: triton.compile(ASTSource, target=GPUTarget("cuda", 90, 32)) runs the full pipeline down
to a cubin (ptxas ships with triton), and triton's cuobjdump reads registers, spills and instructions.
Asserted: no local memory (spills) and 16-byte global loads on the logits stream when the row stride is
a multiple of 16 elements (what Triton's launcher specializes on: tt.divisibility=16 for pointers and
ints; 151936, 128256, 256000 all qualify), plus a control that the same kernel WITHOUT that
specialization has no 16-byte loads (so the check can fail).

The compile runs in a subprocess without TRITON_INTERPRET: with it set (conftest does), @triton.jit
returns interpreter objects that the compiler cannot lower, and the helpers the kernels call would be
interpreter objects too.
"""
import pytest

from sm_codegen import run_script

_SCRIPT = r'''
import torch
import flowrl_kernels.ops.token_logprobs as m
from sm_codegen import compile_kernel, emit, inspect_cubin, token_logprobs_types
TD = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}

def build(kind, dtype, flag, aligned, **numerics):
    V = 151936
    block, warps = m._config(V)
    fn = m._token_logprobs_fwd_kernel if kind == "fwd" else m._token_logprobs_bwd_kernel
    # what the launcher specializes for a contiguous [N, 151936] tensor: every pointer 16-byte aligned,
    # every int arg that is a multiple of 16 (V, the strides, the forward's label_end) marked divisible by 16
    ints = ("V", "stride_xb", "stride_xt") + (("stride_g",) if kind == "bwd" else ("label_end",))
    const = {"BLOCK_V": block, ("RETURN_ENTROPY" if kind == "fwd" else "HAS_GENT"): flag}
    # the launcher's numerics options (enable_fp_fusion=False), unless a control overrides them
    opts = dict(m._LAUNCH_NUMERICS, **numerics)
    k = compile_kernel(fn, token_logprobs_types(TD[dtype]), const, ints if aligned else (), num_warps=warps, **opts)
    return dict(inspect_cubin(k), block=block, warps=warps)

out = {}
for kind, flags in (("fwd", (True, False)), ("bwd", (True, False))):
    for dtype in (torch.bfloat16, torch.float32):
        for flag in flags:
            out[f"{kind}-{TD[dtype]}-{flag}"] = build(kind, dtype, flag, True)
    out[f"{kind}-bf16-True-unaligned"] = build(kind, torch.bfloat16, True, False)
    out[f"{kind}-bf16-True-fused"] = build(kind, torch.bfloat16, True, True, enable_fp_fusion=True)
emit(out)
'''


@pytest.fixture(scope="module")
def compiled():
    return run_script(_SCRIPT, timeout=300, skip_on_api_change=True)


@pytest.mark.parametrize("name", ["fwd-bf16-True", "fwd-bf16-False", "fwd-fp32-True", "fwd-fp32-False",
                                  "bwd-bf16-True", "bwd-bf16-False", "bwd-fp32-True", "bwd-fp32-False"])
def test_no_spills_and_16_byte_loads(compiled, name):
    k = compiled[name]
    print(f"{name}: {k}")  # BLOCK_V (block), num_warps (warps), registers, instruction counts
    assert k["local"] == 0 and k["stack"] == 0, f"{name} spills: {k}"
    assert k["stl"] == 0 and k["ldl"] == 0, f"{name}: local-memory traffic in SASS"
    assert k["regs"] <= 255
    # 16-byte global loads: LDG.E.128, or the cp.async form LDGSTS.E[.BYPASS].128 that the pipelined
    # forward loop (num_stages=3) uses to stage blocks in shared memory
    assert k["ldg128"] >= 2, f"{name}: no 16-byte loads of the logits stream"
    if name.startswith("bwd"):
        assert k["stg128"] > 0, f"{name}: gradient stores not 16-byte"


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_unaligned_stride_control(compiled, kind):
    # without the divisibility-16 specialization of V and the strides, Triton cannot prove 16-byte
    # alignment of each row: the same kernel must then fall back to narrower loads (the check is real)
    k = compiled[f"{kind}-bf16-True-unaligned"]
    assert k["ldg128"] == 0
    assert k["local"] == 0


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_no_fma_contraction(compiled, kind):
    """The launcher compiles without FMA contraction, as the CPU interpreter computes: the backward's
    x * inv_temp - lse must round the product as the forward did (the H200 lane, 2026-12-04: fused, the
    gradient at T = 1e-4 was off by 19 to 2382 against bounds of 0.03 to 0.06). Control: the same
    kernel with Triton's default fusion has fma.rn.f32 in its PTX, so the check can fail."""
    for name in (f"{kind}-{dt}-{flag}" for dt in ("bf16", "fp32") for flag in (True, False)):
        assert compiled[name]["ptx_fma"] == 0, f"{name}: {compiled[name]['ptx_fma']} fma.rn.f32 in the PTX"
    assert compiled[f"{kind}-bf16-True-fused"]["ptx_fma"] > 0
