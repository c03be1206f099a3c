"""Peak extra CPU memory of linear_token_logprobs forward + backward: chunked torch path vs the naive path.

Run: ``PYTHONPATH=. python -m pytest bench/bench_linear_token_logprobs_memory.py --benchmark-only -s``

Shape: N=4096 tokens, H=576, V=49152 (SmolLM2-135M's lm_head), float32 (what the CPU trainer runs),
logp and entropy both returned and both given random upstream gradients, 10% ignored labels.
  naive:   flowrl_kernels.reference.linear_token_logprobs (hidden @ weight.T, then log-softmax /
           softmax over the [N, V] fp32 logits = 805 MB each), autograd through it.
  chunked: flowrl_kernels.linear_token_logprobs(impl="torch") (chunks of 341 rows = 64 MiB of logits).

"Peak extra" = the highest memory use during forward + backward minus what was live before it
(inputs, weights, the interpreter). The gradients dH (9 MB) and dW (113 MB) are outputs both paths
must produce, so they are inside both numbers. Two independent measurements, each in a fresh
subprocess (nothing left from an earlier case, no allocator cache):
  rss:   Linux peak RSS (VmHWM). Writing "5" to /proc/self/clear_refs resets the high-water mark to
         the current RSS right before the run, so VmHWM - VmRSS(before) is the exact peak of the run
         (no sampling gaps) and counts every allocation, including oneDNN/MKL scratch. glibc serves
         these multi-MB blocks with mmap and unmaps them on free, so freed memory does not linger.
  torch: the running sum of torch's CPU allocator events from torch.profiler(profile_memory=True);
         sees only torch tensors, but is immune to what the C library does with pages.
(tracemalloc would see none of this: torch allocates outside Python's allocator.)
The pass criterion is chunked <= 10% of naive on both measurements, with the same results.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

N, H, V = 4096, 576, 49152
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r'''
import gc, json, sys
import torch
from flowrl_kernels import reference
from flowrl_kernels.ops.linear_token_logprobs import linear_token_logprobs

which, N, H, V, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
hidden = torch.randn(N, H)
weight = torch.randn(V, H) * (2.0 / H**0.5)   # logits std ~2, like a trained lm_head
labels = torch.randint(0, V, (N,))
labels[torch.rand(N) < 0.1] = -100
g_logp, g_ent = torch.randn(N), torch.randn(N)
hidden.requires_grad_(True)
weight.requires_grad_(True)


def step(n=N):
    h = hidden if n == N else hidden[:n]
    if which == "naive":
        logp, ent = reference.linear_token_logprobs(h, weight, labels[:n], return_entropy=True)
    else:
        logp, ent = linear_token_logprobs(h, weight, labels[:n], return_entropy=True, impl="torch")
    (logp * g_logp[:n] + ent * g_ent[:n]).sum().backward()
    return logp.detach(), ent.detach()


def status_kb(key):
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0])


def fresh():
    hidden.grad = weight.grad = None
    gc.collect()


# warm-up at a small size: lazy library init (oneDNN primitives, thread pools) is not the op's memory
step(64)
fresh()

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                         # VmHWM := VmRSS
rss0 = status_kb("VmRSS")
logp, ent = step()
rss_peak = (status_kb("VmHWM") - rss0) * 1024
result = {"logp": logp, "ent": ent, "d_hidden": hidden.grad.clone(), "d_weight": weight.grad.clone()}
fresh()

from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    step()
events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
live = torch_peak = 0
for _, nbytes in events:
    live += nbytes
    torch_peak = max(torch_peak, live)
torch.save(result, out_path)
print("RESULT" + json.dumps({"rss": rss_peak, "torch": torch_peak}))
'''


def _measure(which: str, tmp: str):
    out = os.path.join(tmp, f"{which}.pt")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FLOWRL_KERNELS_POISON="0", FLOWRL_KERNELS_QUIET="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, which, str(N), str(H), str(V), out], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):]), torch.load(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via /proc is Linux-only")
def test_peak_memory_chunked_vs_naive(benchmark):
    with tempfile.TemporaryDirectory() as tmp:
        mem_naive, res_naive = _measure("naive", tmp)
        mem_chunk, res_chunk = _measure("chunked", tmp)
    # same results: both are fp32 computations of the same math, so they agree to fp32 rounding
    for k in res_naive:
        a, b = res_chunk[k], res_naive[k]
        scale = float(b.abs().max())
        err = float((a - b).abs().max())
        assert err <= 1e-4 * max(scale, 1.0), f"{k}: chunked vs naive differ by {err:.3e} (scale {scale:.3e})"
    mb = 2.0**20
    info = {
        "N": N, "H": H, "V": V, "dtype": "float32",
        "naive_peak_rss_MiB": mem_naive["rss"] / mb, "chunked_peak_rss_MiB": mem_chunk["rss"] / mb,
        "naive_peak_torch_MiB": mem_naive["torch"] / mb, "chunked_peak_torch_MiB": mem_chunk["torch"] / mb,
        "ratio_rss": mem_chunk["rss"] / mem_naive["rss"], "ratio_torch": mem_chunk["torch"] / mem_naive["torch"],
    }
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info, indent=1))

    # time one chunked forward + backward in this process (a benchmark needs a timed call)
    from flowrl_kernels.ops.linear_token_logprobs import linear_token_logprobs
    torch.manual_seed(0)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) * (2.0 / H**0.5)).requires_grad_(True)
    labels = torch.randint(0, V, (N,))

    def step():
        logp, ent = linear_token_logprobs(hidden, weight, labels, return_entropy=True, impl="torch")
        (logp.sum() + ent.sum()).backward()

    benchmark.pedantic(step, rounds=1, iterations=1)
    assert info["ratio_rss"] <= 0.10 and info["ratio_torch"] <= 0.10, info
