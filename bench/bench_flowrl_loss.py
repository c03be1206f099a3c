"""FlowRL loss, forward + backward at B=512 sequences x T=8192 tokens (fp32 log-probs, right padding).

    pytest bench/bench_flowrl_loss.py --benchmark-only        (or: make bench)

Compares the fused op (impl="triton" on CUDA, impl="native" when the C++ extension is built) with the
same loss composed from plain torch ops (``flowrl_kernels.reference.flowrl_loss``, the baseline) and
with torch.compile of that reference. Besides time, each case records how many ATen ops it dispatches
(a TorchDispatchMode counter, forward + backward; ops that launch no kernel -- views, empty, detach --
are listed apart) and, for triton, the number of Triton launches. Results: bench/RESULTS.md.
"""
import collections
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flowrl_kernels import flowrl_loss, reference
from flowrl_kernels._utils import native_has

B, T = int(os.environ.get("BENCH_B", 512)), int(os.environ.get("BENCH_T", 8192))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# no kernel behind these: metadata / allocation only
NO_KERNEL = {"empty", "empty_strided", "view", "_unsafe_view", "as_strided", "expand", "detach", "alias",
             "t", "transpose", "unsqueeze", "squeeze", "select", "slice", "permute", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def summary(self):
        kernels = sum(n for k, n in self.ops.items() if k not in NO_KERNEL)
        return kernels, sum(self.ops.values()), dict(self.ops)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device="cpu").manual_seed(0)
    logp = -3 * torch.rand(B, T, generator=g)
    old = logp + 0.01 * torch.randn(B, T, generator=g)
    ref = -3 * torch.rand(B, T, generator=g)
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    log_z, rewards = torch.randn(B, generator=g), torch.randn(B, generator=g)
    return [t.to(DEVICE) for t in (logp, old, ref, log_z, rewards, mask)]


def _step(fn, inputs):
    logp, old, ref, log_z, rewards, mask = inputs
    logp = logp.detach().requires_grad_()
    log_z = log_z.detach().requires_grad_()
    loss, _ = fn(logp, old, ref, log_z, rewards, mask)
    loss.backward()
    return loss


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, inputs, name, count=True):
    _step(fn, inputs)  # warm-up (compiles / autotunes / first-touch allocations)
    benchmark.extra_info.update(B=B, T=T, device=DEVICE)
    if count:  # not for compiled code: a dispatch mode makes dynamo fall back to eager
        counter = OpCounter()
        with counter:
            _step(fn, inputs)
        kernels, total, ops = counter.summary()
        benchmark.extra_info.update(aten_kernel_ops=kernels, aten_ops=total)
        print(f"\n{name}: {kernels} ATen ops with a kernel ({total} dispatched) for fwd+bwd; {ops}")

    def once():
        _step(fn, inputs)
        _sync()

    benchmark.pedantic(once, rounds=int(os.environ.get("BENCH_ROUNDS", 5)), iterations=1, warmup_rounds=1)


def test_reference_torch(benchmark, inputs):
    _run(benchmark, lambda *a: reference.flowrl_loss(*a), inputs, "reference (plain torch)")


def test_reference_compiled(benchmark, inputs):
    from torch._inductor import metrics

    torch._dynamo.reset()
    metrics.reset()
    compiled = torch.compile(reference.flowrl_loss)
    try:
        _step(compiled, inputs)
    except Exception as e:  # no C++ compiler / triton for inductor on this machine
        pytest.skip(f"torch.compile of the reference failed: {type(e).__name__}: {str(e)[:200]}")
    benchmark.extra_info["inductor_kernels"] = metrics.generated_kernel_count
    print(f"\ntorch.compile(reference): {metrics.generated_kernel_count} generated kernels for fwd+bwd")
    _run(benchmark, compiled, inputs, "torch.compile(reference)", count=False)


@pytest.mark.skipif(not native_has("flowrl_loss_fwd"), reason="native extension without flowrl_loss_fwd")
def test_fused_native(benchmark, inputs):
    _run(benchmark, lambda *a: flowrl_loss(*a, impl="native"), inputs, "fused native")


@pytest.mark.skipif(DEVICE != "cuda", reason="triton kernels are benchmarked on CUDA only (the CPU "
                    "interpreter measures Python, not the kernel)")
def test_fused_triton(benchmark, inputs):
    _run(benchmark, lambda *a: flowrl_loss(*a, impl="triton"), inputs, "fused triton")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _step(lambda *a: flowrl_loss(*a, impl="triton"), inputs)
        _sync()
    launches = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    benchmark.extra_info["cuda_kernels"] = launches
    print(f"fused triton: {launches} CUDA kernel launches for fwd+bwd (profiler)")
