"""Compile Triton kernels for an NVIDIA arch and read the cubin, with no GPU: shared by the static codegen
tests (test_codegen.py, test_codegen_linear.py, test_codegen_configs.py, test_specialization.py).

Two sides, one module:
- pytest side: ``run_script`` (skip, with the reason, where this triton cannot compile for a GPU without
  one; else run a test's compile script in a subprocess and return what it ``emit``-ted);
- subprocess side (the scripts ``import sm_codegen``): ``compile_for`` / ``compile_kernel``
  (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``), ``inspect_cubin``
  (triton's bundled cuobjdump: registers, stack, local memory, instruction counts) and ``emit``.

The compile runs in a subprocess without TRITON_INTERPRET: conftest sets it, and with it set @triton.jit
returns interpreter objects that the compiler cannot lower (the helpers the kernels call would be
interpreter objects too). Triton is imported lazily: this module imports where triton does not.
"""
import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
_MARK = "@@SM_CODEGEN_JSON@@"

# what Triton's launcher gives a 16-byte aligned pointer or an int that is a multiple of 16
DIVISIBLE_16 = [["tt.divisibility", 16]]

# 16-byte global loads: LDG.E[.x].128, or the cp.async form LDGSTS.E[.x].128 that a pipelined loop
# (num_stages > 1) uses to stage blocks in shared memory
_LD128 = re.compile(r"\b(?:LDG\.E(?:\.[A-Z0-9_]+)*\.128|LDGSTS\.E(?:\.[A-Z0-9_]+)*\.128)\b")
_ST128 = re.compile(r"\bSTG\.E(?:\.[A-Z0-9_]+)*\.128\b")
_OPS = re.compile(r"\b(HGMMA|HMMA|STL|LDL|LDGSTS)\b")


def cuobjdump() -> pathlib.Path:
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


# ---------------------------------------------------------------------------------------------- pytest side
def require_toolchain(*, cuobjdump_needed: bool = True):
    """Skip the calling test (with the reason) unless this triton can compile for a GPU target without a
    GPU (``ASTSource`` + ``GPUTarget``) and, when ``cuobjdump_needed``, ships cuobjdump. Returns triton."""
    import pytest

    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the triton release
        pytest.skip(f"triton {triton.__version__} has no ASTSource / GPUTarget: {e}")
    if cuobjdump_needed and not cuobjdump().exists():
        pytest.skip(f"cuobjdump not shipped with this triton ({cuobjdump()})")
    return triton


def run_script(script: str, *, timeout: float, cuobjdump_needed: bool = True, skip_on_api_change: bool = False,
               show: bool = False):
    """``require_toolchain``, then run ``script`` in ``sys.executable`` without TRITON_INTERPRET, with the
    repository and tests/ on PYTHONPATH and Triton's default FP fusion (what a GPU launch compiles with);
    return the object it ``emit``-ted (``show``: print each entry of that dict, seen with pytest -s / -rA).
    A failing script fails the test with its stderr; with ``skip_on_api_change``, a failure that reads like
    the ASTSource / attrs API of another triton release skips it instead."""
    import pytest

    triton = require_toolchain(cuobjdump_needed=cuobjdump_needed)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        err = r.stderr[-4000:]
        # the ASTSource / attrs API moved between triton releases: skip (with the reason) rather than fail
        if skip_on_api_change and any(s in err for s in ("TypeError", "unexpected keyword", "KeyError: 'constexpr'")):
            pytest.skip(f"triton {triton.__version__}: ASTSource API differs from the one this test targets:\n{err}")
        raise AssertionError(f"compile subprocess failed:\n{err}")
    out = json.loads(r.stdout.split(_MARK, 1)[1])
    if show:
        for name, entry in out.items():
            print(f"{name}: {entry}")
    return out


# ------------------------------------------------------------------------------------------ subprocess side
def emit(obj) -> None:
    """Hand ``obj`` (JSON) back to ``run_script``."""
    print(_MARK + json.dumps(obj))


def compile_for(fn, signature, constexprs, attrs, options, cc=90):
    """``triton.compile`` of ``fn`` for sm_<cc> (no GPU needed): the full pipeline down to a cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", cc, 32), options=options)


def compile_kernel(fn, types, constexprs, aligned, cc=90, **options):
    """Compile ``fn`` the way the launcher specializes it on a GPU: its parameters in order, those named in
    ``constexprs`` as constexprs, the others typed by ``types`` (name -> "*bf16", "i32", ...); every pointer
    and every int named in ``aligned`` marked divisible by 16. ``options``: num_warps, num_stages, ..."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = types[name]
        if types[name].startswith("*") or name in aligned:
            attrs[(i,)] = DIVISIBLE_16
    return compile_for(fn, sig, constexprs, attrs, options, cc)


def inspect_cubin(k) -> dict:
    """What cuobjdump reads from compiled kernel ``k``: registers, stack and local memory per thread,
    shared memory (bytes, Triton's metadata), and SASS / PTX instruction counts."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([str(cuobjdump()), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([str(cuobjdump()), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", res))
    ops = collections.Counter(_OPS.findall(sass))
    ptx = k.asm["ptx"]
    return {"regs": int(usage["REG"]), "stack": int(usage["STACK"]), "local": int(usage["LOCAL"]),
            "shared": k.metadata.shared, "hgmma": ops["HGMMA"], "hmma": ops["HMMA"], "stl": ops["STL"],
            "ldl": ops["LDL"], "ldgsts": ops["LDGSTS"], "ldg128": len(_LD128.findall(sass)),
            "stg128": len(_ST128.findall(sass)), "ptx_wgmma": ptx.count("wgmma.mma_async"),
            "cp_async": ptx.count("cp.async"), "ptx_fma": ptx.count("fma.rn.f32")}


def token_logprobs_types(t: str) -> dict:
    """Parameter types of the token_logprobs forward and backward kernels, logits / grad in dtype ``t``."""
    return dict(logits_ptr="*" + t, labels_ptr="*i64", logp_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32",
                glogp_ptr="*fp32", gent_ptr="*fp32", grad_ptr="*" + t, T1="i32", V="i32", label_end="i32",
                row0="i32", stride_xb="i32", stride_xt="i32", stride_lb="i32", stride_lt="i32", stride_g="i32",
                inv_temp="fp32", ignore_index="i32")


def linear_types(t: str) -> dict:
    """Parameter types of the linear_token_logprobs forward, merge and backward kernels, h / w / dz in ``t``."""
    return dict(h_ptr="*" + t, w_ptr="*" + t, b_ptr="*fp32", labels_ptr="*i64", ws_ptr="*fp32",
                logp_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32", glogp_ptr="*fp32", gent_ptr="*fp32",
                dz_ptr="*" + t, N="i32", V="i32", H="i32", n_row_blocks="i32", tiles_per_split="i32",
                n_splits="i32", stride_hn="i32", stride_wv="i32", stride_dzn="i32", inv_temp="fp32",
                ignore_index="i32")
