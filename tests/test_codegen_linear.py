"""Static sm_90 (H100) code generation check of the linear_token_logprobs kernels, on a machine with no GPU.

The kernels are compiled for GPUTarget("cuda", 90, 32) with the tile configuration the launcher picks
on a GPU, then Triton's bundled cuobjdump reads the cubin: no register spills / local memory, and the
logits tiles run on tensor cores (HGMMA = wgmma in SASS). Under TRITON_INTERPRET=1 (set by conftest)
@triton.jit returns interpreter objects, so the compile runs in a subprocess with TRITON_INTERPRET=0.
Integer args that a real launch specializes as divisible by 16 (pointers, strides, H = 576 / 4096) get
the same attribute here; without it the masked loads cannot use cp.async and the loop is not pipelined.
"""
import pytest

from sm_codegen import run_script

_SCRIPT = r'''
import torch
import flowrl_kernels.ops._linear_triton as M  # the Triton path of linear_token_logprobs
from sm_codegen import compile_kernel, emit, inspect_cubin, linear_types
TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
ALIGNED_INTS = {"H", "stride_hn", "stride_wv", "stride_dzn"}


out = {}
for dtype, bias, n_rows in [(torch.bfloat16, True, 8192), (torch.float16, False, 8192),
                            (torch.bfloat16, False, 16), (torch.float32, True, 8192)]:
    t = TY[dtype]
    cfg = M._tiles(n_rows, 151936, dtype, torch.device("cpu"))  # the sm90 table entry
    block_n, block_v, block_h, warps, stages = (cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps",
                                                                 "num_stages"))
    types = linear_types(t)
    meta = dict(HAS_BIAS=bias, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
                DOT_PRECISION=M._dot_precision(dtype), UPCAST_OPERANDS=M._upcast(dtype))
    for kname in ("_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel"):
        if kname == "_linear_logprobs_fwd_kernel":
            meta["GROUP_N"] = cfg["GROUP_N"]
        else:
            meta.pop("GROUP_N", None)
            bw = M._tiles(n_rows, 151936, dtype, torch.device("cpu"), "linear_bwd")
            block_n, block_v, block_h, warps, stages = (bw[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H",
                                                                        "num_warps", "num_stages"))
            meta.update(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h)
        k = compile_kernel(getattr(M, kname), types, meta, ALIGNED_INTS, num_warps=warps, num_stages=stages)
        out[f"{kname}[{t},bias={bias},BLOCK_N={block_n}]"] = dict(inspect_cubin(k), dtype=t)
k = compile_kernel(M._linear_logprobs_merge_kernel, linear_types("fp32"), dict(BLOCK=M._MERGE_BLOCK), ALIGNED_INTS,
                   num_warps=4, num_stages=1)
out["_linear_logprobs_merge_kernel"] = dict(inspect_cubin(k), dtype="fp32")
emit(out)
'''


@pytest.fixture(scope="module")
def sm90_report():
    return run_script(_SCRIPT, timeout=600, show=True)


def test_no_spills(sm90_report):
    assert len(sm90_report) == 9
    for name, r in sm90_report.items():
        assert r["stack"] == 0 and r["local"] == 0, f"{name} uses local memory: {r}"
        assert r["stl"] == 0 and r["ldl"] == 0, f"{name} spills (STL/LDL in SASS): {r}"
        assert r["regs"] <= 255, (name, r)


def test_tensor_cores_and_pipelining(sm90_report):
    for name, r in sm90_report.items():
        if "merge" in name or r["dtype"] == "fp32":
            continue  # the merge has no matmul; fp32 follows torch's exact-fp32 default (FMA, no TF32)
        assert r["hgmma"] > 0 and r["ptx_wgmma"] > 0, f"{name}: no wgmma/HGMMA: {r}"
        assert r["cp_async"] > 0, f"{name}: operand loads are not pipelined (no cp.async): {r}"
