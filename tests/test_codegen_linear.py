"""Static sm_90 (H100) code generation check of the linear_token_logprobs kernels, on a machine with no GPU.

The kernels are compiled for GPUTarget("cuda", 90, 32) with the tile configuration the launcher picks
on a GPU, then Triton's bundled cuobjdump reads the cubin: no register spills / local memory, and the
logits tiles run on tensor cores (HGMMA = wgmma in SASS). Under TRITON_INTERPRET=1 (set by conftest)
@triton.jit returns interpreter objects, so the compile runs in a subprocess with TRITON_INTERPRET=0.
Integer args that a real launch specializes as divisible by 16 (pointers, strides, H = 576 / 4096) get
the same attribute here; without it the masked loads cannot use cp.async and the loop is not pipelined.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r'''
import collections, json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import flowrl_kernels.ops.linear_token_logprobs as M
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
ALIGNED_INTS = {"H", "stride_hn", "stride_wv", "stride_dzn"}


def compile_kernel(fn, types, constexprs, num_warps, num_stages):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = types[name]
        if types[name].startswith("*") or name in ALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def inspect(cc):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cc.asm["cubin"])
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path],
                              capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", res))
    ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|STL|LDL)\b", sass))
    return {"regs": int(usage["REG"]), "stack": int(usage["STACK"]), "local": int(usage["LOCAL"]),
            "shared_bytes": cc.metadata.shared, "hgmma": ops["HGMMA"], "hmma": ops["HMMA"],
            "stl": ops["STL"], "ldl": ops["LDL"], "ptx_wgmma": cc.asm["ptx"].count("wgmma.mma_async"),
            "cp_async": cc.asm["ptx"].count("cp.async")}


out = {}
for dtype, bias, n_rows in [(torch.bfloat16, True, 8192), (torch.float16, False, 8192),
                            (torch.bfloat16, False, 16), (torch.float32, True, 8192)]:
    t = TY[dtype]
    cfg = M._tiles(n_rows, 151936, dtype, torch.device("cpu"))  # the sm90 table entry
    block_n, block_v, block_h, warps, stages = (cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps",
                                                                 "num_stages"))
    types = dict(h_ptr="*" + t, w_ptr="*" + t, b_ptr="*fp32", labels_ptr="*i64", ws_ptr="*fp32",
                 lse_ptr="*fp32", ent_ptr="*fp32", glogp_ptr="*fp32", gent_ptr="*fp32", dz_ptr="*" + t,
                 N="i32", V="i32", H="i32", n_row_blocks="i32", tiles_per_split="i32", stride_hn="i32",
                 stride_wv="i32", stride_dzn="i32", inv_temp="fp32", ignore_index="i32")
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
        cc = compile_kernel(getattr(M, kname), types, meta, warps, stages)
        out[f"{kname}[{t},bias={bias},BLOCK_N={block_n}]"] = dict(inspect(cc), dtype=t)
cc = compile_kernel(M._linear_logprobs_merge_kernel,
                    dict(ws_ptr="*fp32", labels_ptr="*i64", logp_ptr="*fp32", ent_ptr="*fp32",
                         lse_ptr="*fp32", N="i32", V="i32", n_splits="i32", ignore_index="i32"),
                    dict(BLOCK=M._MERGE_BLOCK), 4, 1)
out["_linear_logprobs_merge_kernel"] = dict(inspect(cc), dtype="fp32")
print("RESULT" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def sm90_report():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    report = json.loads(line[len("RESULT"):])
    for name, r in report.items():  # shown with pytest -s / -rA
        print(f"{name}: {r}")
    return report


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
