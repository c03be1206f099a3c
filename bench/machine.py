"""The machine a benchmark runs on: its device and dtype, what it can do (copy bandwidth, matmul rate,
measured here, never from a datasheet), what RESULTS.md prints about it, and the peak memory of a call.

bench/common.py re-exports every name (``from bench.common import ceilings, machine`` keeps working);
this module imports no flowrl_kernels code, so gpu.sh can measure the ceilings before any kernel loads.
"""
from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import time
from typing import Callable, Dict

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# bf16 is what models run in on a GPU; the CPU trainer runs in float32 (and CPU bf16 math is emulated
# in many torch kernels, so bf16 CPU timings would say more about torch than about the kernels).
DTYPE = getattr(torch, os.environ.get("FLOWRL_BENCH_DTYPE", "bfloat16" if ON_GPU else "float32"))


# ----------------------------------------------------------------------------------------------------
# machine ceilings (measured, never datasheet)
# ----------------------------------------------------------------------------------------------------
def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _median_time(fn: Callable, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


@functools.lru_cache(maxsize=None)
def ceilings() -> Dict[str, float]:
    """Copy bandwidth (GB/s, bytes read + bytes written) and matmul rate (TFLOP/s) of this machine.

    GPU: a 2 GiB device-to-device copy and a bf16 8192^3 matmul on random data (zeros run faster).
    CPU: a 256 MiB copy (far above the caches) and a float32 2048^3 matmul, on the threads torch uses.
    Override with FLOWRL_BENCH_COPY_GBPS / FLOWRL_BENCH_MATMUL_TFLOPS (e.g. values gpu.sh printed).
    """
    env_bw, env_mm = os.environ.get("FLOWRL_BENCH_COPY_GBPS"), os.environ.get("FLOWRL_BENCH_MATMUL_TFLOPS")
    if ON_GPU:
        nbytes, mm_n, mm_dtype = 2 << 30, 8192, torch.bfloat16
    else:
        nbytes, mm_n, mm_dtype = 256 << 20, 2048, torch.float32
    out = {}
    if env_bw:
        out["copy_GBps"] = float(env_bw)
    else:
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        t = _median_time(lambda: dst.copy_(src), reps=10 if ON_GPU else 5)
        out["copy_GBps"] = 2 * nbytes / t / 1e9
        del src, dst
    if env_mm:
        out["matmul_TFLOPs"] = float(env_mm)
    else:
        a = torch.randn(mm_n, mm_n, device=DEVICE, dtype=mm_dtype)
        b = torch.randn(mm_n, mm_n, device=DEVICE, dtype=mm_dtype)
        t = _median_time(lambda: a @ b, reps=10 if ON_GPU else 3)
        out["matmul_TFLOPs"] = 2 * mm_n**3 / t / 1e12
        del a, b
    out["matmul_dtype"] = str(mm_dtype).replace("torch.", "")
    if ON_GPU:
        torch.cuda.empty_cache()
    return out


def _git(*args: str) -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


@functools.lru_cache(maxsize=None)
def machine() -> Dict[str, object]:
    """What RESULTS.md prints above every table: the card (or CPU), software versions, ceilings."""
    info: Dict[str, object] = {
        "device": torch.cuda.get_device_name() if ON_GPU else (platform.processor() or platform.machine()),
        "device_type": DEVICE.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(DTYPE).replace("torch.", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # the device tool's copy of the tree has no .git: gpu.sh's caller passes FLOWRL_BENCH_COMMIT
        "commit": os.environ.get("FLOWRL_BENCH_COMMIT") or _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if not ON_GPU:
        try:
            with open("/proc/cpuinfo") as f:
                names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            if names:
                info["device"] = names[0]
        except OSError:
            pass
    info.update(ceilings())
    return info


# ----------------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0])


def peak_memory(fn: Callable[[], object]) -> Dict[str, int]:
    """Peak bytes allocated by ``fn`` above what was live when it started (its inputs excluded).

    GPU: ``peak_mem_bytes`` from ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    CPU, two independent measurements of the same call:
      peak_mem_bytes  the torch profiler's allocator events (``profile_memory=True`` records every
                      allocation and free of torch's CPU allocator with a timestamp; their running
                      sum is the live-bytes curve, its maximum the peak). Never misses a spike between
                      samples and ignores what glibc does with freed pages; like the CUDA counter it
                      sees only memory allocated through torch.
      peak_rss_bytes  Linux's peak RSS: writing "5" to /proc/self/clear_refs resets VmHWM to the
                      current RSS, so VmHWM - VmRSS(before) is the exact high-water mark of the call
                      (no sampling), including oneDNN / OpenMP / C++ scratch outside torch. It can
                      under-count memory glibc reuses from its heap (blocks < 32 MiB), and includes
                      the profiler's own event buffers (a few MB at most).
    (Cross-checked by the linear_token_logprobs helper at N=4096, V=49152, where the two agreed.)
    """
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return {"peak_mem_bytes": int(peak)}
    from torch.profiler import ProfilerActivity, profile

    rss0 = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0 = _status_kb("VmRSS")
    except OSError:  # not Linux, or no permission: the allocator number alone
        pass
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    rss_peak = (_status_kb("VmHWM") - rss0) * 1024 if rss0 is not None else None
    del out
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    res = {"peak_mem_bytes": int(peak)}
    if rss_peak is not None:
        res["peak_rss_bytes"] = int(rss_peak)
    return res


