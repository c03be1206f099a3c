"""Every Triton kernel compiles for sm_90 the way Triton's JIT specializes it on a GPU, with no GPU.

On a GPU the JIT hands an int argument equal to 1 to the kernel as a constexpr (a Python int: no
``.to()``, no tensor methods) and marks ints that are multiples of 16 (and 16-byte aligned pointers)
``tt.divisibility=16``. The CPU interpreter never does either, so a kernel can pass every CPU test and
still fail to compile on a GPU the first time N, V, a stride or a split count is 1 (issue 14:
``n_splits.to(tl.int64)`` in the fused lm_head merge kernel, hit whenever N >= 2 * SMs * 128 tokens).

How the test sees what the JIT sees, without hand-written signatures:
1. every ``*_kernel`` JITFunction in the ``flowrl_kernels.ops`` modules is discovered (and must be one
   of EXPECTED, so a new kernel cannot be forgotten);
2. each is replaced by a recorder and the PUBLIC ops run on CPU tensors (GPU tile choices, since
   TRITON_INTERPRET is unset): every launch records its arguments and constexprs;
3. each recorded launch becomes a ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
   target=GPUTarget("cuda", 90, 32))``: tensors -> pointer types, Python ints -> i32 (constexpr when 1,
   divisible when a multiple of 16), floats -> fp32, exactly as the JIT's binder does, honouring
   ``do_not_specialize``.
Compiled: every distinct launch (constexpr / dtype variant) with ALL its int args = 1 at once, and for
one variant per kernel (the cheapest the launchers use) each int arg = 1 alone. ~75 compiles, ~1 min on
2 cores. The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it; with it set,
@triton.jit returns interpreter objects the compiler cannot lower).
"""
import pytest

from sm_codegen import run_script

# kernel -> module; the sweep (each int arg = 1 alone) runs on the variant recorded by the scenario
# marked "sweep" below (the cheapest configuration a launcher uses for that kernel)
EXPECTED = {
    "_token_logprobs_fwd_kernel": "token_logprobs",
    "_token_logprobs_bwd_kernel": "token_logprobs",
    "_linear_logprobs_fwd_kernel": "_linear_triton",
    "_linear_logprobs_merge_kernel": "_linear_triton",
    "_linear_logprobs_bwd_kernel": "_linear_triton",
    "_flowrl_loss_fwd_kernel": "flowrl_loss",
    "_flowrl_loss_bwd_kernel": "flowrl_loss",
}

_SCRIPT = r'''
import importlib, json, pkgutil, sys, time, traceback
import torch
from triton.runtime.jit import JITFunction
import flowrl_kernels as fk
import flowrl_kernels.ops as ops_pkg
from flowrl_kernels import _utils
from sm_codegen import DIVISIBLE_16, compile_for, emit

# 1. discover every kernel: module-level JITFunctions named *_kernel (helpers are inlined into them)
kernels = {}
for info in pkgutil.iter_modules(ops_pkg.__path__):
    mod = importlib.import_module(f"flowrl_kernels.ops.{info.name}")
    for name, obj in vars(mod).items():
        if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == mod.__name__:
            kernels[name] = (mod, obj)

# 2. record every launch the public ops make
log, tag = [], {"scenario": None}

class Recorder:
    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            log.append((self.name, tag["scenario"], args, kwargs))
        return launch

for name, (mod, fn) in kernels.items():
    setattr(mod, name, Recorder(name))
# resolve_impl lets impl="triton" take CPU tensors; the launchers (their own imported name) keep GPU tiles
_utils.triton_interpret = lambda: True

def scenario(name):
    tag["scenario"] = name
    torch.manual_seed(0)

def tok(dtype, shape, ret_ent, label_dtype=torch.int64):
    x = torch.randn(shape[:-1] + (shape[-1],)).to(dtype)
    x = x[:, :-1] if x.dim() == 3 else x  # a strided [B, T-1, V] view on the 3-D cases
    y = torch.randint(0, shape[-1], x.shape[:-1]).to(label_dtype)
    x.requires_grad_()
    out = fk.token_logprobs(x, y, return_entropy=ret_ent, impl="triton", temperature=0.7)
    (out[0].sum() + out[1].sum() if ret_ent else out.sum()).backward()

def lin(dtype, N, H, V, bias, label_dtype=torch.int64):
    h = torch.randn(N, H).to(dtype).requires_grad_()
    w = torch.randn(V, H).to(dtype).requires_grad_()
    b = torch.randn(V).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,)).to(label_dtype)
    lp, ent = fk.linear_token_logprobs(h, w, y, bias=b, impl="triton", return_entropy=True)
    (lp.sum() + ent.sum()).backward()

def flow(dtype, B, T, mask_dtype, importance):
    logp = (-torch.rand(B, T)).to(dtype).requires_grad_()
    mask = (torch.rand(B, T) > 0.3).to(mask_dtype)
    loss, _ = fk.flowrl_loss(logp, logp.detach(), logp.detach(), torch.zeros(B, requires_grad=True),
                             torch.zeros(B), mask, importance=importance, impl="triton")
    loss.backward()

def iw(level, mask_dtype):
    logp = -torch.rand(5, 40)
    fk.importance_weights(logp, logp, (torch.rand(5, 40) > 0.3).to(mask_dtype), level=level, impl="triton")

SCENARIOS = [
    ("tok_fp16_V7_ent", True, lambda: tok(torch.float16, (5, 7), True, torch.int32)),
    ("tok_bf16_qwen_ent", False, lambda: tok(torch.bfloat16, (2, 4, 151936), True)),
    ("tok_fp32_gpt2_logp", False, lambda: tok(torch.float32, (3, 50257), False)),
    ("lin_fp32_interp_tiles", True, None),  # filled below: the launcher's TRITON_INTERPRET tiles
    ("lin_bf16_bias_N300", False, lambda: lin(torch.bfloat16, 300, 64, 1000, True)),
    ("lin_fp16_N16_int32", False, lambda: lin(torch.float16, 16, 32, 333, False, torch.int32)),
    ("lin_fp32_ieee", False, lambda: lin(torch.float32, 9, 16, 100, True)),
    ("lin_fp32_tf32", False, None),
    ("flow_fp32_bool_T37", True, lambda: flow(torch.float32, 3, 37, torch.bool, "sequence")),
    ("flow_bf16_float_T3000", False, lambda: flow(torch.bfloat16, 2, 3000, torch.float32, "none")),
    ("flow_fp16_uint8_mean", False, lambda: flow(torch.float16, 4, 5, torch.uint8, "sequence_mean")),
    ("flow_fp32_int64", False, lambda: flow(torch.float32, 2, 9, torch.int64, "sequence")),
    ("iw_sequence", False, lambda: iw("sequence", torch.bool)),
    ("iw_sequence_mean", False, lambda: iw("sequence_mean", torch.float32)),
]

import flowrl_kernels.ops._linear_triton as L  # linear_token_logprobs's Triton path (reads triton_interpret)

def lin_interp():
    real = L.triton_interpret
    L.triton_interpret = lambda: True
    try:
        lin(torch.float32, 20, 16, 70, True)
    finally:
        L.triton_interpret = real
    # the patch reached the launchers (they read triton_interpret in _linear_triton): interpreter tiles
    assert any(s == "lin_fp32_interp_tiles" and k.get("BLOCK_N") == L._INTERP_BLOCK_N for _, s, _, k in log)

def lin_tf32():
    m = torch.backends.cuda.matmul
    old = m.fp32_precision
    m.fp32_precision = "tf32"
    try:
        lin(torch.float32, 9, 16, 100, False)
    finally:
        m.fp32_precision = old

sweep_scenarios = {s for s, sweep, _ in SCENARIOS if sweep}
for name, sweep, run in SCENARIOS:
    scenario(name)
    {"lin_fp32_interp_tiles": lin_interp, "lin_fp32_tf32": lin_tf32}.get(name, run)()

# 3. compile each distinct launch the way the JIT would specialize it
TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
      torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
      torch.bool: "i1"}

def spec(fn, args, kwargs):
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    sig, const, attrs, ints = {}, {}, {}, []
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TY[v.dtype]
            if v.data_ptr() % 16 == 0 and not p.do_not_specialize_on_alignment:
                attrs[(i,)] = DIVISIBLE_16
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                sig[p.name], const[(i,)] = "constexpr", 1
            else:
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0 and not p.do_not_specialize_on_alignment:
                    attrs[(i,)] = DIVISIBLE_16
                if not p.do_not_specialize:
                    ints.append(i)
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} = {v!r} has no Triton type")
    return sig, const, attrs, options, ints

def compile_with_ones(fn, sig, const, attrs, options, ones):
    sig, const, attrs = dict(sig), dict(const), dict(attrs)
    for i in ones:
        sig[fn.arg_names[i]], const[(i,)] = "constexpr", 1
        attrs.pop((i,), None)
    compile_for(fn, sig, const, attrs, options)

results, seen, swept = [], set(), set()
for name, scen, args, kwargs in log:
    fn = kernels[name][1]
    sig, const, attrs, options, ints = spec(fn, args, kwargs)
    key = (name, json.dumps(sig, sort_keys=True), repr(sorted(const.items(), key=repr)), repr(sorted(attrs)),
           repr(sorted(options.items())))
    if key in seen:
        continue
    seen.add(key)
    variant = f"{scen}: " + ", ".join(f"{k}={v}" for k, v in const.items() if isinstance(k, str))
    combos = [("all", tuple(ints))]
    if scen in sweep_scenarios and name not in swept:
        swept.add(name)
        combos += [(fn.arg_names[i], (i,)) for i in ints]
    for label, ones in combos:
        t0 = time.time()
        try:
            compile_with_ones(fn, sig, const, attrs, options, ones)
            err = None
        except Exception as e:  # report every failure, not just the first
            err = "".join(traceback.format_exception_only(type(e), e))[-1500:]
        results.append({"kernel": name, "variant": variant, "ones": label, "error": err,
                        "seconds": round(time.time() - t0, 2)})
emit({"discovered": sorted(kernels), "recorded": sorted({r[0] for r in log}), "swept": sorted(swept),
      "results": results})
'''


@pytest.fixture(scope="module")
def report():
    out = run_script(_SCRIPT, timeout=900, cuobjdump_needed=False)
    total = sum(x["seconds"] for x in out["results"])
    print(f"{len(out['results'])} sm_90 compiles in {total:.0f} s")
    return out


def test_every_kernel_is_discovered_and_launched(report):
    assert set(report["discovered"]) == set(EXPECTED), (
        "Triton kernels in flowrl_kernels.ops changed: add the new kernel to EXPECTED and a scenario that "
        f"launches it; discovered {report['discovered']}")
    assert set(report["recorded"]) == set(EXPECTED), f"kernels no scenario launched: {set(EXPECTED) - set(report['recorded'])}"
    assert set(report["swept"]) == set(EXPECTED), f"kernels without the each-arg-alone sweep: {set(EXPECTED) - set(report['swept'])}"


@pytest.mark.parametrize("kernel", sorted(EXPECTED))
def test_compiles_with_any_int_arg_equal_to_1(report, kernel):
    mine = [r for r in report["results"] if r["kernel"] == kernel]
    assert any(r["ones"] == "all" for r in mine) and any(r["ones"] != "all" for r in mine), mine
    bad = [r for r in mine if r["error"]]
    assert not bad, "\n\n".join(f"{r['variant']} with {r['ones']} = 1:\n{r['error']}" for r in bad)
