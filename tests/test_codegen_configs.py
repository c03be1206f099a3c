"""Every entry of the per-arch config table (flowrl_kernels/ops/configs.py) compiles for its arch, with no
GPU: registers, spills, shared memory, occupancy and the instructions the entry exists for.

For each arch in configs.TABLE (sm90 -> GPUTarget("cuda", 90, 32), sm80 -> 80) and each entry, the kernel
that reads it is compiled the way the launcher specializes it on a GPU (pointers and the H / stride
ints that are multiples of 16 marked divisible by 16; Qwen2.5's H=3584, V=151936), then Triton's
bundled cuobjdump reads the cubin:
  - no local memory: STACK 0, no STL / LDL in SASS (a spill costs more than any tile size gains);
  - registers * threads * ctas_per_sm <= 65536 and shared memory * ctas_per_sm within the SM (the entry's
    occupancy is what the forward's split count is sized for);
  - linear (16-bit): tensor cores, HGMMA (wgmma) on sm_90, HMMA (mma.sync) on sm_80, operand loads
    pipelined (cp.async / LDGSTS);
  - token_logprobs: 16-byte loads of the logits (LDG.E.128) in the forward and backward.
The compile runs in a subprocess with TRITON_INTERPRET=0 (conftest sets it to 1 for the op tests).
"""
import pytest

from sm_codegen import run_script

_SCRIPT = r'''
import json
import torch
from flowrl_kernels.ops import configs
import flowrl_kernels.ops._linear_triton as L  # the Triton path of linear_token_logprobs
import flowrl_kernels.ops.token_logprobs as T
from sm_codegen import compile_kernel, emit, inspect_cubin, linear_types, token_logprobs_types

ALIGNED = {"H", "stride_hn", "stride_wv", "stride_dzn", "V", "stride_xb", "stride_xt", "stride_g"}
V, H = 151936, 3584


out, seen = {}, {}
for arch, kernels in configs.TABLE.items():
    cc = int(arch[2:])
    for kname, per_dtype in kernels.items():
        for dkey, cfg in per_dtype.items():
            if kname == "token_logprobs":
                block, warps = T._block_and_warps(V, cfg["per_thread"], cfg["num_warps"])
                jobs = [("fwd", T._token_logprobs_fwd_kernel, dict(BLOCK_V=block, RETURN_ENTROPY=True), 1),
                        ("bwd", T._token_logprobs_bwd_kernel, dict(BLOCK_V=block, HAS_GENT=True), 1)]
                types, need = token_logprobs_types("bf16"), "ldg128"
            else:
                dt = torch.float32 if dkey == "fp32" else torch.bfloat16
                meta = dict(HAS_BIAS=True, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
                            DOT_PRECISION=L._dot_precision(dt), UPCAST_OPERANDS=False)
                if kname.startswith("linear_fwd"):
                    jobs = [("", L._linear_logprobs_fwd_kernel, dict(meta, GROUP_N=cfg["GROUP_N"]), cfg["num_stages"])]
                else:
                    jobs = [("", L._linear_logprobs_bwd_kernel, meta, cfg["num_stages"])]
                types = linear_types("fp32" if dkey == "fp32" else "bf16")
                need = None if dkey == "fp32" else ("hgmma" if cc >= 90 else "hmma")
                warps = cfg["num_warps"]
            for suffix, fn, cx, stages in jobs:
                name = f"{arch}/{kname}{('.' + suffix) if suffix else ''}/{dkey}"
                key = (cc, fn.__name__, json.dumps(cx, sort_keys=True), warps, stages)
                if key not in seen:
                    seen[key] = inspect_cubin(compile_kernel(fn, types, cx, ALIGNED, cc, num_warps=warps,
                                                             num_stages=stages))
                out[name] = dict(seen[key], cc=cc, warps=warps, ctas_per_sm=cfg.get("ctas_per_sm", 1), need=need)
emit(out)
'''

# shared memory per SM available to one block's dynamic allocation (CUDA programming guide):
# sm_90 227 KiB, sm_80 163 KiB
_SMEM = {90: 227 * 1024, 80: 163 * 1024}


@pytest.fixture(scope="module")
def report():
    return run_script(_SCRIPT, timeout=900, show=True)


def test_every_entry_compiled(report):
    from flowrl_kernels.ops import configs

    expected = set()
    for arch, kernels in configs.TABLE.items():
        for kname, per_dtype in kernels.items():
            for dkey in per_dtype:
                if kname == "token_logprobs":
                    expected |= {f"{arch}/{kname}.fwd/{dkey}", f"{arch}/{kname}.bwd/{dkey}"}
                else:
                    expected.add(f"{arch}/{kname}/{dkey}")
    assert set(report) == expected
    assert {"sm90", "sm80"} <= {n.split("/")[0] for n in report}


def test_no_spills_and_fits(report):
    for name, r in report.items():
        assert r["stack"] == 0 and r["stl"] == 0 and r["ldl"] == 0, f"{name} spills to local memory: {r}"
        threads = 32 * r["warps"]
        assert r["regs"] * threads * r["ctas_per_sm"] <= 65536, f"{name}: registers exceed the SM: {r}"
        assert r["shared"] * r["ctas_per_sm"] <= _SMEM[r["cc"]], f"{name}: shared memory exceeds the SM: {r}"


def test_required_instructions(report):
    for name, r in report.items():
        if r["need"] is None:
            continue
        assert r[r["need"]] > 0, f"{name}: no {r['need'].upper()} in SASS: {r}"
        if r["need"] in ("hgmma", "hmma"):
            assert r["ldgsts"] > 0 or r["cp_async"] > 0, f"{name}: operand loads not pipelined: {r}"
