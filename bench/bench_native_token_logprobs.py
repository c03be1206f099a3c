"""token_logprobs forward + backward on the CPU: the native C++ kernels vs the torch reference vs TRL.

    PYTHONPATH=. python -m pytest bench/bench_native_token_logprobs.py --benchmark-only -q

One call = logp forward, then the gradient of sum(g * logp) w.r.t. the logits (a fresh [N, V] tensor in
the logits dtype), N = 1024 tokens, V = 151936 (Qwen vocab), bf16 logits. Bytes moved by a fused
implementation: read N V 2 (forward) + read N V 2 and write N V 2 (backward) = 0.93 GB.
`test_peak_memory` reports each implementation's peak extra memory beyond the inputs and the gradient
(one subprocess each, from the process's peak RSS).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flowrl_kernels
from flowrl_kernels import reference

N, V, DTYPE = 1024, 151936, torch.bfloat16
GROUP = f"token_logprobs fwd+bwd CPU N={N} V={V} bf16"
BYTES = 3 * N * V * 2


def _trl():
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception:  # noqa: BLE001 - trl is optional (bench extra)
        return None
    return selective_log_softmax


def run_native(x, y, g):
    if hasattr(flowrl_kernels, "token_logprobs"):  # the public op, once it has landed
        xr = x.detach().requires_grad_()
        flowrl_kernels.token_logprobs(xr, y, impl="native").backward(g)
        return xr.grad
    ops = torch.ops.flowrl_kernels_native
    logp, lse, ent = ops.token_logprobs_fwd(x, y, 1.0, False, -100)
    return ops.token_logprobs_bwd(x, y, lse, ent, g, None, 1.0, -100)


def run_torch(x, y, g):
    xr = x.detach().requires_grad_()
    reference.token_logprobs(xr, y).backward(g)
    return xr.grad


def run_trl(x, y, g):
    xr = x.detach().requires_grad_()
    _trl()(xr, y).float().backward(g)
    return xr.grad


IMPLS = {"native": run_native, "torch": run_torch, "trl": run_trl}


def _skip_if_missing(impl):
    if impl == "native" and not flowrl_kernels.native_available():
        pytest.skip("native extension not built")
    if impl == "trl" and _trl() is None:
        pytest.skip("trl not installed")


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=gen).to(DTYPE)
    y = torch.randint(0, V, (N,), generator=gen)
    g = torch.randn(N, generator=gen)
    return x, y, g


@pytest.mark.parametrize("impl", list(IMPLS))
def test_token_logprobs_fwd_bwd(benchmark, impl, inputs):
    _skip_if_missing(impl)
    benchmark.group = GROUP
    benchmark.extra_info["threads"] = torch.get_num_threads()
    grad = benchmark.pedantic(IMPLS[impl], args=inputs, rounds=5, iterations=1, warmup_rounds=2)
    assert grad.shape == (N, V) and grad.dtype == DTYPE
    benchmark.extra_info["GB/s (fused bytes)"] = round(BYTES / benchmark.stats.stats.median / 1e9, 2)


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {bench!r})
    import bench_native_token_logprobs as b
    import flowrl_kernels
    flowrl_kernels.native_available()
    impl = sys.argv[1]
    gen = torch.Generator().manual_seed(0)
    small = (torch.randn(4, 256, generator=gen).to(b.DTYPE), torch.randint(0, 256, (4,)), torch.randn(4))
    b.IMPLS[impl](*small)  # load code paths once
    x = torch.empty(b.N, b.V, dtype=b.DTYPE).normal_(generator=gen)  # no float32 temporary in the peak
    y, g = torch.randint(0, b.V, (b.N,), generator=gen), torch.randn(b.N, generator=gen)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad = b.IMPLS[impl](x, y, g)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - before - grad.numel() * grad.element_size())
""")


def test_peak_memory(capsys):
    """Peak memory beyond the inputs and the gradient: O(N) for native, several [N, V] fp32 for torch."""
    rows = []
    for impl in IMPLS:
        if (impl == "native" and not flowrl_kernels.native_available()) or (impl == "trl" and _trl() is None):
            continue
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(bench=str(Path(__file__).parent)), impl],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        rows.append((impl, int(out.stdout.split()[-1])))
    with capsys.disabled():
        print(f"\npeak extra memory beyond inputs + gradient ({GROUP}):")
        for impl, extra in rows:
            print(f"  {impl:7s} {extra / 2**20:9.1f} MiB")
    native = dict(rows).get("native")
    if native is not None:
        # O(N): a few float32 [N] vectors (logp, lse); allow 16 MiB of allocator / page granularity noise
        assert native < 16 * 2**20, native
