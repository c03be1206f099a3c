"""The README's CPU claim, measured against what a user would run instead of flowrl_kernels.

    python -m bench.cpu_compare [--n 1024] [--v 151936] [--threads 2] [--rounds 7]

token_logprobs on bf16 logits [N, V] (a bf16 model's lm_head output), forward and forward + backward
(upstream gradient ones), for: the native extension (impl="native"), the two lines a user writes
(``log_softmax(logits.float()).gather(...)``, bench.common.plain_token_logprobs), torch.compile of those
lines, and flowrl_kernels.reference (the spec; slower than plain by design). Per provider: median wall
time and median process CPU time (all threads) per call over ``--rounds`` calls after 2 warm-ups. On a
shared machine the wall time is inflated by other jobs; the CPU time counts only this process's work
(caches are still shared), so its ratios are the steadier number.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("FLOWRL_KERNELS_QUIET", "1")
os.environ["FLOWRL_KERNELS_POISON"] = "0"

import torch  # noqa: E402

import flowrl_kernels as fk  # noqa: E402
from bench.common import plain_token_logprobs  # noqa: E402
from flowrl_kernels import reference  # noqa: E402


def _run(fn, x, labels, backward, rounds):
    walls, cpus = [], []
    for i in range(rounds + 2):
        xi = x.detach().requires_grad_(backward)
        w0, c0 = time.perf_counter(), time.process_time()
        if backward:
            fn(xi, labels).sum().backward()
        else:
            with torch.no_grad():
                fn(xi, labels)
        if i >= 2:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = (torch.randn(a.n, a.v) * 2).to(torch.bfloat16)
    labels = torch.randint(0, a.v, (a.n,))
    plain = plain_token_logprobs
    provs = {
        "native": lambda t, y: fk.token_logprobs(t, y, impl="native"),
        "plain": plain,
        "compile(plain)": torch.compile(plain, dynamic=False),
        "reference": lambda t, y: reference.token_logprobs(t, y),
    }
    print(f"# token_logprobs CPU, N={a.n} V={a.v} bf16, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'mode':<18}{'provider':<16}{'wall ms':>10}{'CPU ms':>10}{'x native (wall)':>17}{'x native (CPU)':>16}")
    for backward in (False, True):
        res = {name: _run(fn, x, labels, backward, a.rounds) for name, fn in provs.items()}
        base = res["native"]
        for name, (w, c) in res.items():
            print(f"{('forward+backward' if backward else 'forward'):<18}{name:<16}{w:10.1f}{c:10.1f}"
                  f"{w / base[0]:17.2f}{c / base[1]:16.2f}")


if __name__ == "__main__":
    main()
