"""Determinism check: every public op of flowrl_kernels, forward and backward, run twice on the same
inputs, gives bitwise-identical outputs and gradients, with no switch to turn on (verl documents
flash-attn's cross-entropy as nondeterministic and offers one; ours must need none).

    python scripts/determinism.py                      # CUDA: headline-ish sizes, bf16 and fp32
    python scripts/determinism.py --size tiny          # any device: small odd sizes (CI, dry run; seconds)
    python scripts/determinism.py --impl default,native --out det.json

Cases: token_logprobs (+ entropy, ignored labels, temperature), linear_token_logprobs (+ entropy,
bias), flowrl_loss, grpo_loss (+ KL), importance_weights (sequence and token), masked_mean,
seq_log_ratio, group_normalize; each in bf16 and fp32, with the default impl (triton on CUDA, native
or torch on CPU) and any impl named in --impl ("unsupported" when the op refuses it with a ValueError).
"Bitwise": the bytes of every output and gradient are equal (so -0.0 vs 0.0 or two NaN payloads
differ); every float output must also be finite. Exit code 0 when every case passes, 1 otherwise.
Full sizes on one H200: ~11 GiB peak (token_logprobs fp32 at N=8192, V=151936: logits + grad).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):  # `python scripts/determinism.py` from anywhere: import the repo's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flowrl_kernels as fk  # noqa: E402

# (N rows, V vocab, H hidden) per size; "full" is the benchmark's headline shape (Qwen2.5-7B's vocab
# and hidden size, N=8192) except linear_token_logprobs in fp32 (fp32 'ieee' dot: N=2048 keeps it < 1 s)
SIZES = {
    "tiny": dict(N=37, V=301, H=24, N_linear_fp32=37, B=6, T=13, G=3),
    "full": dict(N=8192, V=151936, H=3584, N_linear_fp32=2048, B=256, T=2048, G=8),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IGNORE = -100


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of the same width (bitwise comparison, NaN-safe)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    t = t.detach().contiguous().reshape(-1)
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def _grads(outs: Dict[str, torch.Tensor], inputs: Dict[str, torch.Tensor],
           gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Backward of sum(out * fixed random upstream grad) w.r.t. every input that requires grad."""
    wrt = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    diff = {k: v for k, v in outs.items() if v.requires_grad}
    if not wrt or not diff:
        return {}
    ups = [torch.randn(v.shape, generator=gen, device="cpu").to(v.device, v.dtype) for v in diff.values()]
    gs = torch.autograd.grad(list(diff.values()), list(wrt.values()), ups, allow_unused=True)
    return {f"grad_{k}": g for k, g in zip(wrt, gs) if g is not None}


def _labels(n: int, v: int, device, gen: torch.Generator) -> torch.Tensor:
    lab = torch.randint(0, v, (n,), generator=gen)
    lab[torch.rand(n, generator=gen) < 0.1] = IGNORE  # some ignored positions
    return lab.to(device)


def _randn(shape, dtype, device, gen, scale=1.0, grad=False) -> torch.Tensor:
    t = (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def cases(size: Dict[str, int], device: torch.device) -> Dict[str, Callable]:
    """name -> make(dtype, gen) returning (inputs, run(inputs, impl) -> outputs dict)."""
    N, V, H, B, T, G = (size[k] for k in ("N", "V", "H", "B", "T", "G"))

    def token_logprobs(dtype, gen):
        inp = dict(logits=_randn((N, V), dtype, device, gen, 2.0, grad=True), labels=_labels(N, V, device, gen))
        return inp, lambda x, impl: dict(zip(("logp", "entropy"), fk.token_logprobs(
            x["logits"], x["labels"], temperature=0.9, return_entropy=True, ignore_index=IGNORE, impl=impl)))

    def linear_token_logprobs(dtype, gen):
        n = size["N_linear_fp32"] if dtype == torch.float32 else N
        inp = dict(hidden=_randn((n, H), dtype, device, gen, grad=True),
                   weight=_randn((V, H), dtype, device, gen, H ** -0.5, grad=True),
                   bias=_randn((V,), torch.float32, device, gen, 0.1, grad=True), labels=_labels(n, V, device, gen))
        return inp, lambda x, impl: dict(zip(("logp", "entropy"), fk.linear_token_logprobs(
            x["hidden"], x["weight"], x["labels"], bias=x["bias"], temperature=0.9, return_entropy=True,
            ignore_index=IGNORE, impl=impl)))

    def seq_inputs(dtype, gen, grad=True):
        logp = -torch.rand((B, T), generator=gen) * 4
        mask = torch.rand((B, T), generator=gen) < 0.8
        mask[0] = False  # an empty response
        return dict(logp=logp.to(device, dtype).requires_grad_(grad),
                    old_logp=(logp + 0.05 * torch.randn((B, T), generator=gen)).to(device, dtype),
                    ref_logp=(logp + 0.3 * torch.randn((B, T), generator=gen)).to(device, dtype),
                    mask=mask.to(device))

    def flowrl_loss(dtype, gen):
        inp = seq_inputs(dtype, gen)
        inp.update(log_z=_randn((B,), torch.float32, device, gen, grad=True),
                   rewards=_randn((B,), torch.float32, device, gen))
        def run(x, impl):
            loss, st = fk.flowrl_loss(x["logp"], x["old_logp"], x["ref_logp"], x["log_z"], x["rewards"], x["mask"],
                                      beta=15.0, importance="sequence", clip=(0.8, 1.2), impl=impl)
            return {"loss": loss, **{f"stats_{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)}}
        return inp, run

    def grpo_loss(dtype, gen):
        inp = seq_inputs(dtype, gen)
        inp["advantages"] = _randn((B,), torch.float32, device, gen)
        def run(x, impl):
            loss, st = fk.grpo_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"], ref_logp=x["ref_logp"],
                                    kl_coef=0.05, impl=impl)
            return {"loss": loss, **{f"stats_{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)}}
        return inp, run

    def importance_weights(dtype, gen):
        inp = seq_inputs(dtype, gen, grad=False)
        def run(x, impl):
            out = {}
            for level in ("sequence", "sequence_mean", "token"):
                w, frac = fk.importance_weights(x["logp"], x["old_logp"], x["mask"], level=level, clip=(0.8, 1.2),
                                                impl=impl)
                out.update({f"{level}_weight": w, f"{level}_clip_frac": frac})
            return out
        return inp, run

    def masked_mean(dtype, gen):
        inp = seq_inputs(dtype, gen)
        return inp, lambda x, impl: {"mean": fk.masked_mean(x["logp"], x["mask"], impl=impl)}

    def seq_log_ratio(dtype, gen):
        inp = seq_inputs(dtype, gen)
        inp["old_logp"].requires_grad_(True)
        return inp, lambda x, impl: {"ratio": fk.seq_log_ratio(x["logp"], x["old_logp"], x["mask"], impl=impl)}

    def group_normalize(dtype, gen):
        inp = dict(rewards=torch.randint(0, 3, (B,), generator=gen).to(device, dtype))
        return inp, lambda x, impl: {"r_hat": fk.group_normalize(x["rewards"], G, impl=impl)}

    return {f.__name__: f for f in (token_logprobs, linear_token_logprobs, flowrl_loss, grpo_loss,
                                    importance_weights, masked_mean, seq_log_ratio, group_normalize)}


def check(name: str, make: Callable, dtype: torch.dtype, impl: Optional[str], device: torch.device, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    inputs, run = make(dtype, gen)
    results, times = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        outs = run(inputs, impl)
        res = {**outs, **_grads(outs, inputs, torch.Generator().manual_seed(seed + 1))}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        results.append({k: v.detach() for k, v in res.items()})
    a, b = results
    differ = sorted(k for k in a if not torch.equal(_bits(a[k]), _bits(b[k])))
    non_finite = sorted(k for k in a if a[k].is_floating_point() and not torch.isfinite(a[k]).all())
    return {"op": name, "dtype": str(dtype).replace("torch.", ""), "impl": impl or "default",
            "tensors": sorted(a), "differ": differ, "non_finite": non_finite,
            "ok": not differ and not non_finite, "seconds": [round(t, 4) for t in times]}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on CUDA, tiny on CPU")
    ap.add_argument("--impl", default="default", help="comma-separated: default, torch, triton, native")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--ops", default="", help="comma-separated subset of the ops (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the per-case results here (JSON)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or ("full" if device.type == "cuda" else "tiny")
    all_cases = cases(SIZES[size], device)
    ops = [o for o in args.ops.split(",") if o] or list(all_cases)
    unknown = set(ops) - set(all_cases)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; pick from {sorted(all_cases)}")
    rows = []
    print(f"determinism: device {device}, size {size} {SIZES[size]}, torch {torch.__version__}", flush=True)
    for impl in [None if i == "default" else i for i in args.impl.split(",")]:
        for dname in args.dtypes.split(","):
            for op in ops:
                try:
                    row = check(op, all_cases[op], DTYPES[dname], impl, device, args.seed)
                except ValueError as e:
                    if impl is None:
                        raise
                    row = {"op": op, "dtype": dname, "impl": impl, "ok": True, "unsupported": str(e)[:200]}
                except Exception as e:  # noqa: BLE001 - one broken op must not hide the others' results
                    row = {"op": op, "dtype": dname, "impl": impl or "default", "ok": False,
                           "error": f"{type(e).__name__}: {str(e)[:300]}"}
                row["dtype"] = dname
                rows.append(row)
                state = ("unsupported" if "unsupported" in row else "bitwise" if row["ok"] else
                         row.get("error") or f"DIFFER {row['differ']} NON-FINITE {row['non_finite']}")
                secs = "/".join(f"{t:.3f}" for t in row.get("seconds", []))
                print(f"  {row['op']:<22} {row['dtype']:<9} {row['impl']:<8} {state}  {secs and secs + ' s'}",
                      flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    bad = [r for r in rows if not r["ok"]]
    print(f"determinism: {len(rows) - len(bad)}/{len(rows)} cases pass" + (f"; FAILED: {len(bad)}" if bad else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": str(device), "size": size, "cases": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
