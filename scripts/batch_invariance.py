"""Batch-invariance check (issue 24): a token's log-prob and entropy are bitwise the same whether it is
computed alone, at another position, or in a batch of any size with any neighbours (for a given
device, dtype and config table), for ``token_logprobs`` and ``linear_token_logprobs``.

    python scripts/batch_invariance.py                     # CUDA: the lane's sizes (and the timing)
    python scripts/batch_invariance.py --size tiny         # any device, seconds (CI, dry run)
    python scripts/batch_invariance.py --out bi.json --impl triton,native

How: P probe tokens are each computed alone (N = 1); then, for every N, batches of N rows with random
neighbours hold the probes at random positions (two different batches per N), and every probe's logp
and entropy must equal its alone result in every bit. Cases: both ops, bf16 / fp32 (fp16 on CUDA),
temperature 1 and 0.7, with and without entropy, odd V. Which impls promise it (docs/batch_invariance.md):
Triton (both ops; the fused lm_head through its fixed tile and N-independent vocab split) and the
native CPU kernels; the CUDA C++ kernels (impl="native" on a CUDA tensor) and the torch paths do not
(their rows are "report" cases: measured, never failing the check). On CUDA, ``--time`` also times the
fused lm_head forward with the batch-invariant launch and with the N-tuned one
(FLOWRL_KERNELS_BATCH_INVARIANT=0) at a few N: the switch's cost. Exit code 0 when every promised case
is bitwise invariant, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter (before triton.jit runs)
    os.environ.setdefault("TRITON_INTERPRET", "1")
if __package__ in (None, ""):  # `python scripts/batch_invariance.py` from anywhere: the repo's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flowrl_kernels as fk  # noqa: E402
from flowrl_kernels.ops import configs  # noqa: E402
from flowrl_kernels.ops import _linear_triton as L  # noqa: E402 (linear_token_logprobs's Triton path)

# batch sizes per size; V odd (no multiple of a tile or vector width), H odd-ish
SIZES = {
    "dry": dict(Ns=(1, 3, 64), V=301, H=24, P=3),  # the lane's CPU dry run: the plumbing, in seconds
    "tiny": dict(Ns=(1, 2, 3, 7, 64, 129), V=1001, H=40, P=4),
    "cuda": dict(Ns=(1, 2, 3, 7, 64, 129, 1000, 4099), V=50257, H=1024, P=6),
}
IGNORE = -100


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.int32)


def run_op(op: str, impl: str, rows: torch.Tensor, weight: Optional[torch.Tensor], labels: torch.Tensor,
           temperature: float, entropy: bool):
    """(logp, entropy | None) of the rows: ``rows`` are logits [N, V] (token_logprobs) or hidden [N, H]
    (linear_token_logprobs with ``weight``)."""
    with torch.no_grad():
        if op == "token_logprobs":
            out = fk.token_logprobs(rows, labels, temperature=temperature, return_entropy=entropy,
                                    ignore_index=IGNORE, impl=impl)
        else:
            out = fk.linear_token_logprobs(rows, weight, labels, temperature=temperature,
                                           return_entropy=entropy, ignore_index=IGNORE, impl=impl)
    return out if entropy else (out, None)


def check_case(op: str, impl: str, dtype: torch.dtype, device: torch.device, Ns: Sequence[int], V: int, H: int,
               P: int, temperature: float, entropy: bool, seed: int = 0) -> dict:
    """One case: P probes alone vs inside two random batches per N. Returns a JSON-able record with
    ``mismatches`` (probe results that differ in any bit) and the first few differences."""
    g = torch.Generator().manual_seed(seed)  # indices (host)
    gd = torch.Generator(device=device).manual_seed(seed)  # data, made where it is used
    pool = max(Ns) + P
    if op == "token_logprobs":
        rows = (torch.randn(pool, V, generator=gd, device=device) * 3).to(dtype)
        weight = None
    else:
        rows = torch.randn(pool, H, generator=gd, device=device).to(dtype)
        weight = (torch.randn(V, H, generator=gd, device=device) / H ** 0.5).to(dtype)
    labels = torch.randint(0, V, (pool,), generator=g).to(device)
    labels[torch.randperm(pool, generator=g)[: pool // 8].to(device)] = IGNORE  # ignored neighbours
    labels[:P] = torch.randint(0, V, (P,), generator=g).to(device)  # the probes themselves are scored
    alone = [run_op(op, impl, rows[p:p + 1], weight, labels[p:p + 1], temperature, entropy) for p in range(P)]
    mismatches, first, checked = 0, [], 0
    for N in Ns:
        for rep in range(2 if N > 1 else 1):
            # N rows: the probes that fit at random positions, the rest random neighbours from the pool
            k = min(P, N)
            idx = torch.cat([torch.arange(k), P + torch.randperm(pool - P, generator=g)[: N - k]])
            perm = torch.randperm(N, generator=g)
            idx = idx[perm]
            pos = {int(idx_j): j for j, idx_j in enumerate(idx.tolist()) if idx_j < k}
            lp, ent = run_op(op, impl, rows[idx.to(device)], weight, labels[idx.to(device)], temperature, entropy)
            for p, j in pos.items():
                checked += 1
                for name, got, ref in (("logp", lp[j:j + 1], alone[p][0]), ("entropy", None if ent is None else
                                       ent[j:j + 1], alone[p][1])):
                    if got is None:
                        continue
                    if not torch.equal(_bits(got.float()), _bits(ref.float())):
                        mismatches += 1
                        if len(first) < 5:
                            first.append(dict(N=N, rep=rep, probe=p, position=j, out=name,
                                              alone=float(ref.float().item()), batched=float(got.float().item())))
    return dict(op=op, impl=impl, dtype=str(dtype).replace("torch.", ""), device=device.type, V=V, H=H,
                Ns=list(Ns), temperature=temperature, entropy=entropy, probes_checked=checked,
                mismatches=mismatches, first=first)


def promised(op: str, impl: str, device: torch.device) -> bool:
    """Which impls promise batch invariance (docs/batch_invariance.md)."""
    if impl == "triton":
        return op == "token_logprobs" or configs.batch_invariant()
    if impl == "native":
        return device.type == "cpu"  # the CUDA C++ kernels split rows by N and by each row's alignment
    return False  # torch: CPU / cuBLAS matmul blocking and torch's softmax kernels may depend on N


def time_linear(device: torch.device, Ns: Sequence[int], V: int, H: int, reps: int = 20) -> List[dict]:
    """The fused lm_head forward (bf16, entropy) per N, batch-invariant launch vs N-tuned launch (ms)."""
    out = []
    w = torch.randn(V, H, device=device, dtype=torch.bfloat16) / H ** 0.5
    for N in Ns:
        h = torch.randn(N, H, device=device, dtype=torch.bfloat16)
        lab = torch.randint(0, V, (N,), device=device)
        rec = dict(N=N, V=V, H=H)
        for mode in (True, False):
            prev, configs._BATCH_INVARIANT = configs._BATCH_INVARIANT, mode
            try:
                run_op("linear_token_logprobs", "triton", h, w, lab, 1.0, True)  # compile / warm
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    run_op("linear_token_logprobs", "triton", h, w, lab, 1.0, True)
                end.record()
                torch.cuda.synchronize()
                launch = L._fwd_launch(N, V, torch.bfloat16, device)
                rec["invariant" if mode else "n_tuned"] = dict(
                    ms=start.elapsed_time(end) / reps, BLOCK_N=launch["BLOCK_N"], n_splits=launch["n_splits"])
            finally:
                configs._BATCH_INVARIANT = prev
        rec["cost"] = rec["invariant"]["ms"] / rec["n_tuned"]["ms"] - 1.0
        out.append(rec)
        print(f"time N={N}: invariant {rec['invariant']} n-tuned {rec['n_tuned']} cost {rec['cost']:+.1%}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: cuda on a GPU, else tiny")
    ap.add_argument("--impl", default=None, help="comma list; default triton,native (+ torch as a report)")
    ap.add_argument("--dtypes", default=None, help="comma list of bf16,fp16,fp32 (default: bf16,fp32 + fp16 on CUDA)")
    ap.add_argument("--time", action="store_true", help="CUDA: time the switch (fused lm_head forward)")
    ap.add_argument("--out", help="JSON with every case")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = SIZES[args.size or ("cuda" if cuda else "tiny")]
    impls = (args.impl or "triton,native,torch").split(",")
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = [names[d] for d in (args.dtypes or ("bf16,fp16,fp32" if cuda else "bf16,fp32")).split(",")]
    cases, failed, t0 = [], 0, time.time()
    for op in ("token_logprobs", "linear_token_logprobs"):
        for impl in impls:
            if op == "linear_token_logprobs" and impl == "native":
                continue  # no native lm_head kernel: impl="torch" is its CPU path
            for dtype in dtypes:
                for temperature, entropy in ((1.0, True), (0.7, False)):
                    try:
                        rec = check_case(op, impl, dtype, device, size["Ns"], size["V"], size["H"], size["P"],
                                         temperature, entropy)
                    except (ValueError, RuntimeError) as e:  # an impl this build / device lacks
                        rec = dict(op=op, impl=impl, dtype=str(dtype), unsupported=str(e).splitlines()[0][:200])
                    rec["promised"] = promised(op, impl, device)
                    ok = "unsupported" in rec or rec["mismatches"] == 0 or not rec["promised"]
                    failed += not ok
                    rec["ok"] = ok
                    cases.append(rec)
                    what = rec.get("unsupported") or (f"{rec['mismatches']} outputs differ over "
                                                      f"{rec['probes_checked']} probes")
                    print(f"{'ok  ' if ok else 'FAIL'} {op} impl={impl} {rec['dtype']} T={temperature} "
                          f"entropy={entropy} ({'promised' if rec['promised'] else 'report'}): {what}", flush=True)
    timing = time_linear(device, (1, 64, 1024, 8192), 152064, 3584) if args.time and cuda else []
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu", batch_invariant=configs.batch_invariant(),
                  seconds=round(time.time() - t0, 1), failed=failed, cases=cases, timing=timing)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"batch invariance: {len(cases) - failed} of {len(cases)} cases ok, {failed} failed "
          f"({result['seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
