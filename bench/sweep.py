"""Tune the Triton kernels' launch configs for the GPU at hand and print (or write) its table entry.

    python -m bench.sweep                       # every kernel, prints the table entry for this arch
    python -m bench.sweep --write               # ... and puts it into flowrl_kernels/ops/configs.py
    python -m bench.sweep --kernels linear_fwd --budget-s 120 --out sweep.json

For each kernel and dtype key, every candidate of ``configs.CANDIDATES`` runs at the headline shape
(Qwen2.5-7B: N=8192, H=3584, V=152064, bf16; fp32 at N=1024), is checked against the current table
entry's output (a candidate that compiles to wrong numbers is never chosen), and is timed on the device
clock (``triton.testing.do_bench``: CUDA events, L2 flushed, median). The fastest correct candidate per
(kernel, dtype) is the new entry. The whole sweep stays within ``--budget-s`` (default 280 s, under the
5 minutes of issue 18): candidates left when it runs out are reported as not tried, and the current
entry is kept for a kernel with none tried.

Without CUDA it dry-runs under TRITON_INTERPRET=1 at tiny sizes (the plumbing, the correctness check
of every candidate config, host-clock times that mean nothing); --write is refused there.
"""
from __future__ import annotations

import argparse
import json
import os
import pprint
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.pop("TRITON_INTERPRET", None)
os.environ["FLOWRL_KERNELS_POISON"] = "0"

from flowrl_kernels.ops import configs  # noqa: E402
from flowrl_kernels.ops import _linear_triton as L  # noqa: E402 (linear_token_logprobs's Triton path)
from flowrl_kernels.ops import token_logprobs as T  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS_PY = os.path.join(os.path.dirname(HERE), "flowrl_kernels", "ops", "configs.py")

# (N, H, V) per kernel and dtype key; CPU: tiny shapes for the interpreter
SHAPES = {
    "linear_fwd": {"16bit": (8192, 3584, 152064), "fp32": (1024, 3584, 152064)},
    "linear_bwd": {"16bit": (1664, 3584, 152064), "fp32": (256, 3584, 152064)},  # one dlogits chunk
    "token_logprobs": {"any": (8192, 0, 152064)},
}
CPU_SHAPES = {"linear_fwd": (37, 64, 1000), "linear_bwd": (37, 64, 1000), "token_logprobs": (37, 0, 1000)}
DTYPES = {"16bit": torch.bfloat16, "fp32": torch.float32, "any": torch.bfloat16}


def _time(fn, budget_left):
    if ON_GPU:
        import triton.testing

        fn()  # compile + warm up
        return triton.testing.do_bench(fn, warmup=25, rep=min(200, max(20, int(budget_left * 100))),
                                       return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _case(kernel, dkey):
    """-> (run(), outputs_of(run's result) -> list of tensors, description)."""
    N, H, V = CPU_SHAPES[kernel] if not ON_GPU else SHAPES[kernel][dkey]
    dt = DTYPES[dkey]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    labels = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    if kernel == "token_logprobs":
        logits = (torch.randn(N, V, device=DEVICE, generator=g) * 2).to(dt)
        glogp = torch.randn(N, device=DEVICE, generator=g)

        def run():
            logp, lse, ent = T._fwd_triton(logits, labels, 1.0, True, -100)
            grad = T._bwd_triton(logits, labels, lse, ent, glogp, glogp, 1.0, -100)
            return [logp, ent, grad]
        return run, f"N={N} V={V} {str(dt)[6:]} (forward with entropy + backward)"
    hidden = torch.randn(N, H, device=DEVICE, generator=g).to(dt)
    weight = (torch.randn(V, H, device=DEVICE, generator=g) * (2.0 / H**0.5)).to(dt)
    if kernel == "linear_fwd":
        def run():
            return list(L._triton_forward(hidden, weight, None, labels, 1.0, -100))
        return run, f"N={N} H={H} V={V} {str(dt)[6:]} (forward: logp, entropy, lse)"
    logp, ent, lse = L._triton_forward(hidden, weight, None, labels, 1.0, -100)
    dz = torch.empty(N, V, device=DEVICE, dtype=dt)
    glogp = torch.randn(N, device=DEVICE, generator=g)

    def run():
        L._triton_dlogits(hidden, weight, None, labels, lse, ent, glogp, glogp, 1.0, -100, dz)
        return [dz]
    return run, f"N={N} H={H} V={V} {str(dt)[6:]} (one dlogits chunk)"


def _close(out, ref):
    for o, r in zip(out, ref):
        # candidates differ only in fp32 summation order (tiles, splits, lanes): far below 1e-3 of the
        # scale in fp32; a bf16 output may round the other way (1 ulp = 2^-8 relative)
        tol = 1e-3 if o.dtype == torch.float32 else 2.0**-6
        o, r = o.float(), r.float()
        if not torch.isfinite(o).all():
            return False
        scale = r.abs().max().clamp(min=1e-6)
        if ((o - r).abs().max() / scale) > tol:
            return False
    return True


def sweep(kernels, budget_s):
    t_end = time.perf_counter() + budget_s
    arch = configs.arch_of(DEVICE) if ON_GPU else "sm90"
    results, best = [], {}
    for kernel in kernels:
        for dkey, cands in configs.CANDIDATES[kernel].items():
            current = configs.TABLE[arch][kernel].get(dkey)
            run, desc = _case(kernel, dkey)
            with configs.override(kernel, current):
                ref = [t.clone() for t in run()]
                base_ms = _time(run, t_end - time.perf_counter())
            rec = dict(kernel=kernel, dtype=dkey, shape=desc, config=current, ms=base_ms, status="current")
            results.append(rec)
            print(f"{kernel:<15}{dkey:<6}{base_ms:>9.3f} ms  current  {current}", flush=True)
            chosen = rec
            for cand in cands:
                left = t_end - time.perf_counter()
                if cand == current:
                    continue
                if left < 5:
                    results.append(dict(kernel=kernel, dtype=dkey, config=cand, status="not tried: budget"))
                    continue
                try:
                    with configs.override(kernel, cand):
                        out = run()
                        ok = _close(out, ref)
                        ms = _time(run, left) if ok else None
                    status = "ok" if ok else "WRONG (differs from the current entry)"
                except Exception as e:  # a candidate that does not compile here (shared memory, ...)
                    ms, status = None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rec = dict(kernel=kernel, dtype=dkey, shape=desc, config=cand, ms=ms, status=status)
                results.append(rec)
                print(f"{kernel:<15}{dkey:<6}{(f'{ms:9.3f} ms' if ms else '        -   '):>12}  {status[:40]:<10} {cand}",
                      flush=True)
                if ms is not None and ms < chosen["ms"]:
                    chosen = rec
            best.setdefault(kernel, {})[dkey] = chosen
            if ON_GPU:
                torch.cuda.empty_cache()
    return arch, results, best


def table_entry(arch, best):
    entry = {k: dict(configs.TABLE[arch][k]) for k in configs.TABLE[arch]}
    for kernel, per in best.items():
        for dkey, rec in per.items():
            entry[kernel][dkey] = rec["config"]
    return entry


def write_back(arch, entry):
    """Replace TABLE[arch] in configs.py with ``entry``: the text between the sweep markers is rewritten
    as plain dicts with a note of the sweep (the hand-written comments there go; git diff shows what
    changed, and the commit message should carry the sweep's printout)."""
    src = open(CONFIGS_PY).read()
    begin, end = src.index("# sweep: begin\n"), src.index("# sweep: end\n")
    table = dict(configs.TABLE)
    table[arch] = entry
    body = (f"# {arch}: written by bench/sweep.py on {torch.cuda.get_device_name()} "
            f"({time.strftime('%Y-%m-%d')}), device-clock medians\n"
            "TABLE: Dict[str, Dict[str, Dict[str, dict]]] = " + pprint.pformat(table, width=110, sort_dicts=False) + "\n")
    open(CONFIGS_PY, "w").write(src[:begin] + "# sweep: begin\n" + body + src[end:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="linear_fwd,token_logprobs,linear_bwd",
                    help="comma-separated, in order of value (default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=280.0)
    ap.add_argument("--write", action="store_true", help="write the new entry into flowrl_kernels/ops/configs.py")
    ap.add_argument("--out", help="JSON with every candidate's result")
    a = ap.parse_args(argv)
    kernels = [k for k in a.kernels.split(",") if k]
    for k in kernels:
        if k not in configs.CANDIDATES:
            raise SystemExit(f"--kernels: {k!r} is not one of {sorted(configs.CANDIDATES)}")
    dev = torch.cuda.get_device_name() if ON_GPU else "CPU (TRITON_INTERPRET=1 dry run: times are meaningless)"
    print(f"# sweep on {dev}, budget {a.budget_s:.0f} s", flush=True)
    arch, results, best = sweep(kernels, a.budget_s)
    entry = table_entry(arch, best)
    print(f"\n# table entry for {arch} (paste into flowrl_kernels/ops/configs.py TABLE, or run with --write):")
    print(f'"{arch}": ' + pprint.pformat(entry, width=110, sort_dicts=False) + ",")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=dev, arch=arch, results=results, entry=entry), f, indent=1)
    if a.write:
        if not ON_GPU:
            raise SystemExit("--write needs a GPU: dry-run times must never become the table")
        write_back(arch, entry)
        print(f"wrote {CONFIGS_PY}")


if __name__ == "__main__":
    main()
