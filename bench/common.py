"""Shared setup of the benchmark suite: shape presets, timing, extra_info (the machine: bench/machine.py).

Every bench file builds a dict of providers (name -> callable or a skip reason) and hands one case to
``run_case``, which times it in one mode of ``MODE_TABLE`` (forward, backward, full, or a training
step) and records what the roofline needs.

Timing, two clocks:
  host    ``benchmark.pedantic`` with one call per round, the GPU synchronized at the end of every
          call, so the host clock covers the device work AND the Python / launch overhead of the call
          (what a training loop that waits on the result pays); ``median_ms``, ``p20_ms``, ``p80_ms``.
  device  GPU only (``device_time``): CUDA events around the same call, the L2 flushed before every
          round (a 256 MiB write, as ``triton.testing.do_bench`` does), rounds queued without a sync so
          the host runs ahead and its overhead is hidden; ``device_ms`` (median) and ``overhead_ms`` =
          host - device, the host cost per call that small micro-batches pay. On the CPU there is no
          device clock: the fields are absent, never copied from the host time.
Rounds are sized from a probe call to spend about ROUND_BUDGET_S per case. ``extra_info`` also gets
GB/s and % of the byte floor (at the copy bandwidth measured on this machine), TFLOP/s and % of the
measured matmul rate, from the host time, and the same from the device time (``device_GBps``,
``device_pct_floor``, ``device_TFLOPs``, ``device_pct_matmul``), and peak memory (see ``peak_memory``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

# Benchmarks time the real kernels: never poisoned outputs (a NaN fill is an extra pass over each
# output), and never the Triton interpreter (conftest.py drops TRITON_INTERPRET on GPU machines).
os.environ["FLOWRL_KERNELS_POISON"] = "0"
os.environ.setdefault("FLOWRL_KERNELS_QUIET", "1")

import torch  # noqa: E402

# the device, the dtype benchmarked, the ceilings, machine() and peak_memory live in bench/machine.py
from bench.machine import DEVICE, DTYPE, ON_GPU, _sync, ceilings, machine, peak_memory  # noqa: E402,F401

MODES = ("forward", "backward", "full")

# (hidden H, vocab V) of the models the project cares about (from their config.json).
MODELS = {
    "smollm2-135m": (576, 49152),
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
}
# The model whose N is swept (peak memory vs N): the largest vocab.
SWEEP_MODEL = "qwen2.5-7b"

# Seconds of timed rounds per case, and round limits. The CPU suite (2 cores) must stay < 10 minutes.
# GPU: ~110 cases per logits op must fit gpu.sh's 9 minutes; GPU timings vary ~1% between rounds.
ROUND_BUDGET_S = float(os.environ.get("FLOWRL_BENCH_BUDGET_S", "0.2" if ON_GPU else "0.6"))
MIN_ROUNDS, MAX_ROUNDS = (10, 100) if ON_GPU else (5, 20)


# ----------------------------------------------------------------------------------------------------
# shape presets
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    model: str
    N: int
    H: int
    V: int
    modes: Sequence[str] = MODES
    dtype: Optional[torch.dtype] = None  # None: the run's DTYPE

    @property
    def id(self) -> str:
        return f"{self.model}-N{self.N}" + (f"-{_dtype_name(self.dtype)}" if self.dtype is not None else "")


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dt, str(dt))


def logits_shapes(n0: int, sweep: Sequence[int]) -> list:
    """Every model at N = n0 in every mode (GB/s vs V), plus SWEEP_MODEL at the other N of ``sweep``
    in full mode only (peak memory vs N; full mode is the one that holds the most)."""
    shapes = [Shape(m, n0, h, v) for m, (h, v) in MODELS.items()]
    h, v = MODELS[SWEEP_MODEL]
    shapes += [Shape(SWEEP_MODEL, n, h, v, modes=("full",)) for n in sweep if n != n0]
    return shapes


def cases(shapes: Sequence[Shape], providers: Sequence[str]):
    """pytest parameters (shape, mode, provider) with readable ids, shape-major."""
    import pytest

    out = []
    for s in shapes:
        for mode in s.modes:
            for p in providers:
                out.append(pytest.param(s, mode, p, id=f"{s.id}-{mode}-{p}"))
    return out


# ----------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """A provider that cannot run here; the message is the skip reason."""


@dataclass
class Provider:
    """``fn(**inputs)`` returns a tensor or a tuple of tensors (the outputs that get upstream grads).

    fresh: the provider overwrites its inputs (e.g. Liger writes the gradient into the logits during
    the forward), so every round gets a fresh clone of the inputs (in setup, untimed).
    note: what differs from the flowrl_kernels op (e.g. "-logp only, no entropy").
    skip_on_error: an exception in the first call (torch.compile failing, a peer that does not run on
    this triton/torch) skips the case with the error as the reason; flowrl_kernels impls never do.
    """
    fn: Callable
    note: str = ""
    fresh: bool = False
    skip_on_error: bool = False


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    # linear interpolation between closest ranks (numpy's default)
    pos = (len(sorted_xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _forward_and_upstream(fn, inp) -> tuple:
    """The tensor outputs of ``fn(**inp)`` that need grads (not counts, detached stats) and random grads."""
    out = fn(**inp)
    outs = [o for o in ((out,) if isinstance(out, torch.Tensor) else out)
            if isinstance(o, torch.Tensor) and o.requires_grad]
    return outs, [torch.randn_like(o) for o in outs]


def _no_grad_forward(fn, inp):
    with torch.no_grad():
        return fn(**inp)


@dataclass(frozen=True)
class ModeSpec:
    """What one mode of ``run_case`` times; the probe, rounds, clocks and memory are the same for all."""
    grad: bool  # the inputs are built with make_inputs(requires_grad=grad)
    prepare: Callable[..., tuple]  # prepare(fn, inputs) -> a round's arguments, built before the clock
    timed: Callable[..., object]  # timed(fn, *arguments): the clocked work (its return counts in the peak)
    device_clock: bool = True  # also timed on the GPU's own clock (device_time)


MODE_TABLE: Dict[str, ModeSpec] = {
    # the op under no_grad: how old / ref log-probs are computed in RL
    "forward": ModeSpec(False, lambda fn, inp: (inp,), _no_grad_forward),
    # only autograd.backward(outputs, random upstream grads); the forward runs in setup
    "backward": ModeSpec(True, _forward_and_upstream, lambda fn, outs, grads: torch.autograd.backward(outs, grads)),
    # forward + backward: what one training step pays for the op
    "full": ModeSpec(True, lambda fn, inp: (inp,),
                     lambda fn, inp: torch.autograd.backward(*_forward_and_upstream(fn, inp))),
    # a whole training step: fn() does its own forward, backward and update (make_inputs returns {}, fn
    # returns nothing); no device clock, the step's host work (sampling, the loop) is the point
    "step": ModeSpec(True, lambda fn, inp: (), lambda fn: fn(), device_clock=False),
}


@dataclass
class _Case:
    """One provider on one input set in one mode. ``setup()``: a round's arguments (untimed); ``body``:
    the timed call (what device_time brackets); ``target``: body + the sync the host clock needs."""
    provider: Provider
    spec: ModeSpec
    inputs: Dict[str, torch.Tensor]

    def setup(self, sync: bool = True) -> tuple:
        if self.provider.fresh:  # it overwrites its inputs: a clone per round
            inp = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                   for k, v in self.inputs.items()}
        else:  # the same tensors every round, the last round's grads dropped
            for t in self.inputs.values():
                if isinstance(t, torch.Tensor):
                    t.grad = None
            inp = self.inputs
        args = self.spec.prepare(self.provider.fn, inp)
        if sync:
            _sync()
        return args

    def body(self, *args):
        return self.spec.timed(self.provider.fn, *args)

    def target(self, *args):
        out = self.body(*args)
        _sync()
        return out

    def once(self, measure: Callable[[Callable[[], object]], object]):
        # measure(call) on one fresh round: peak_memory, count_aten_ops
        args = self.setup()
        return measure(lambda: self.target(*args))


# do_bench's L2 flush: a 256 MiB write evicts the 50-60 MB L2 of an H100 / H200 before every round
_L2_FLUSH_BYTES = 256 * 2**20
_FLUSH: Dict[str, torch.Tensor] = {}


def device_time(setup: Callable[..., tuple], body: Callable, rounds: int, host_s: float) -> Dict[float, float]:
    """Device time of ``body(*setup(sync=False))`` in ms: {0.2: p20, 0.5: median, 0.8: p80} (GPU only).

    Per round: the inputs are made (untimed), the L2 is flushed, then CUDA events bracket the call. No
    round synchronizes, and before each round's start event the GPU is given ``host_s`` (the host
    clock of one whole call, capped at 2.5 ms) of ``torch.cuda._sleep``: the host queues the call while
    the GPU sleeps, so an event pair measures the GPU's work for the call, not the Python and launch
    time in front of it. (At ~2 GHz; on a slower clock the lead is shorter and a call whose host time
    exceeds it shows some host time here: the device time is then an upper bound.)
    """
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE)
    cache = _FLUSH["buf"]
    lead_cycles = int(min(host_s, 2.5e-3) * 2e9)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(5, rounds))]
    torch.cuda.synchronize()
    for start, end in events:
        args = setup(sync=False)
        cache.zero_()
        torch.cuda._sleep(lead_cycles)
        start.record()
        body(*args)  # outputs freed at once: the caching allocator reuses them in stream order
        end.record()
        del args
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) for s, e in events)
    return {q: _percentile(ts, q) for q in (0.2, 0.5, 0.8)}


def _skip(reason: str):
    import pytest  # imported where a case runs: cpu_compare.py and gpu.sh use this module outside pytest

    pytest.skip(reason)


def _probe(case: _Case) -> float:
    """Seconds of one call, the warm-up (compiles / autotunes / warms caches); skips what cannot run here."""
    try:
        args = case.setup()
        t0 = time.perf_counter()
        case.target(*args)
        return time.perf_counter() - t0
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        # impl not provided on this device (resolve_impl's ValueError names `impl`) or a peer /
        # torch.compile that fails here: a skip with the reason, never a silent substitute
        if case.provider.skip_on_error or (isinstance(e, ValueError) and "impl" in str(e)):
            _skip(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        raise


def _time(benchmark, case: _Case, probe_s: float) -> Optional[Dict[float, float]]:
    """About ROUND_BUDGET_S of host-clock rounds into ``benchmark.stats``; GPU: device_time's ms, else None."""
    # slow cases (the fp32 reference of the fused lm_head: seconds on a CPU) get fewer rounds
    min_rounds = MIN_ROUNDS if probe_s < 0.25 else max(3, MIN_ROUNDS // 2)
    rounds = int(min(MAX_ROUNDS, max(min_rounds, ROUND_BUDGET_S / max(probe_s, 1e-6))))
    # the probe was the warm-up
    benchmark.pedantic(case.target, setup=lambda: (case.setup(), {}), rounds=rounds, warmup_rounds=0,
                       iterations=1)
    if not (ON_GPU and case.spec.device_clock):
        return None
    host_median_s = _percentile(sorted(benchmark.stats.stats.data), 0.5)
    # fewer rounds for slow cases (each round re-runs setup, e.g. a forward)
    return device_time(case.setup, case.body, min(rounds, 30), host_median_s)


def _peak_memory_of(case: _Case) -> Dict[str, int]:
    # CPU: once in a full suite run a call read ~1/4 of its peak on both counters (allocator and RSS;
    # not reproducible alone), so the CPU peak is the larger of two measured calls, key by key
    peaks = [case.once(peak_memory) for _ in range(1 if ON_GPU else 2)]
    return {k: max(p.get(k, v) for p in peaks) for k, v in peaks[0].items()}


# floor -> the keys it adds (rate, % of ceiling), unit, ceiling; each also "device_"-prefixed on a GPU
_RATES = {"bytes_floor": ("GBps", "pct_floor", 1e9, "copy_GBps"),
          "flop": ("TFLOPs", "pct_matmul", 1e12, "matmul_TFLOPs")}


def _fill_extra_info(benchmark, info: Dict[str, object], mode: str, note: str, dev_ms: Optional[Dict[float, float]],
                     peak: Dict[str, int], n_ops: Optional[int], floors: Dict[str, Optional[Dict[str, float]]]):
    """What bench/report.py reads (module docstring), in this order: ``info``, dtype, the host clock,
    peak memory, the ceilings, the device clock, the provider's note, ``aten_ops``, the floors' rates."""
    host_s = sorted(benchmark.stats.stats.data)
    ceil, med = ceilings(), _percentile(host_s, 0.5)
    ei = benchmark.extra_info
    ei.update(info)
    ei.setdefault("dtype", str(DTYPE).replace("torch.", ""))
    ei.update(mode=mode, rounds=len(host_s), p20_ms=_percentile(host_s, 0.2) * 1e3, median_ms=med * 1e3,
              p80_ms=_percentile(host_s, 0.8) * 1e3, **peak, copy_GBps=ceil["copy_GBps"],
              matmul_TFLOPs=ceil["matmul_TFLOPs"])
    clocks = {"": med}  # key prefix -> seconds per call
    if dev_ms is not None:
        ei.update(device_ms=dev_ms[0.5], device_p20_ms=dev_ms[0.2], device_p80_ms=dev_ms[0.8],
                  overhead_ms=med * 1e3 - dev_ms[0.5])
        clocks["device_"] = dev_ms[0.5] / 1e3
    if note:
        ei["note"] = note
    if n_ops is not None:
        ei["aten_ops"] = n_ops
    for floor_key, per_mode in floors.items():
        if per_mode is not None:
            rate_key, pct_key, unit, ceil_key = _RATES[floor_key]
            work = ei[floor_key] = per_mode[mode]
            for prefix, seconds in clocks.items():
                rate = ei[prefix + rate_key] = work / seconds / unit
                ei[prefix + pct_key] = 100.0 * rate / ceil[ceil_key]


def run_case(benchmark, provider: Provider, make_inputs: Callable[[bool], Dict[str, torch.Tensor]], mode: str,
             *, info: Dict[str, object], bytes_moved: Optional[Dict[str, float]] = None,
             flop: Optional[Dict[str, float]] = None, count_ops: bool = False) -> None:
    """Time ``provider`` on ``make_inputs(requires_grad)`` in ``mode`` and fill ``benchmark.extra_info``.

    bytes_moved / flop: the floor of each mode (bytes that must cross memory, FLOP that must be done).
    count_ops: also record ``aten_ops``, the ATen ops with a kernel of one timed call (not for
    compiled providers).
    """
    if mode not in MODE_TABLE:
        raise ValueError(f"mode={mode!r} is not one of {tuple(MODE_TABLE)}")
    spec = MODE_TABLE[mode]
    try:
        base = make_inputs(spec.grad)
    except torch.OutOfMemoryError as e:  # pragma: no cover - GPU only
        _free()
        _skip(f"OOM building the inputs: {str(e).splitlines()[0]}")
    case = _Case(provider, spec, base)
    try:
        probe_s = _probe(case)
        if benchmark.disabled:  # --benchmark-disable: one correctness-style run only
            return
        dev_ms = _time(benchmark, case, probe_s)
        peak = _peak_memory_of(case)
        n_ops = case.once(count_aten_ops) if count_ops else None
    except torch.OutOfMemoryError as e:  # pragma: no cover - GPU only
        del base, case
        _free()
        _skip(f"OOM: {str(e).splitlines()[0]}")
    _fill_extra_info(benchmark, info, mode, provider.note, dev_ms, peak, n_ops,
                     floors={"bytes_floor": bytes_moved, "flop": flop})
    del base, case
    _free()


def _free():
    if ON_GPU:
        torch.cuda.empty_cache()


def labels_for(N: int, V: int, ignore_frac: float = 0.05, ignore_index: int = -100) -> torch.Tensor:
    """Random labels with a few ignored positions (prompt tokens / padding in real batches)."""
    lab = torch.randint(0, V, (N,), device=DEVICE)
    lab[torch.rand(N, device=DEVICE) < ignore_frac] = ignore_index
    return lab


def plain_token_logprobs(logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False):
    """What a user writes without this library: fp32 log-softmax, gather, mask (+ entropy from the same
    log-softmax). The baseline the README compares against (not flowrl_kernels.reference, the spec)."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = labels != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1) * valid
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1) * valid


# ----------------------------------------------------------------------------------------------------
# flowrl_kernels providers
# ----------------------------------------------------------------------------------------------------
def fk_op(name: str, impl: str) -> Callable:
    """``flowrl_kernels.<name>`` bound to ``impl``, or ``Unavailable`` with the reason."""
    import flowrl_kernels
    from flowrl_kernels import _utils

    op = getattr(flowrl_kernels, name, None)
    if op is None:
        raise Unavailable(f"flowrl_kernels.{name} is not in this checkout")
    if impl == "triton":
        if not ON_GPU:
            raise Unavailable("impl='triton' runs on CUDA only (the interpreter is never benchmarked)")
        if _utils.triton_interpret():
            raise Unavailable("TRITON_INTERPRET is set: the interpreter is never benchmarked")
        if not _utils.triton_available():
            raise Unavailable("triton is not importable")
    if impl == "native" and not _utils.native_available():
        raise Unavailable("native extension flowrl_kernels._C is not built (native_available() is False)")
    return op


_COMPILED: Dict[object, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=True)``, one per function for the whole session: dynamic shapes let
    one graph serve every N (and V), so the suite pays each compile once, in the probe call."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


# ----------------------------------------------------------------------------------------------------
# launch counts (small-tensor ops are bound by launches, not bytes)
# ----------------------------------------------------------------------------------------------------
# ATen ops that launch no kernel: metadata / allocation only
NO_KERNEL = {"empty", "empty_strided", "view", "_unsafe_view", "as_strided", "expand", "detach", "alias",
             "t", "transpose", "unsqueeze", "squeeze", "select", "slice", "permute", "lift_fresh"}


def count_aten_ops(fn: Callable[[], object]) -> int:
    """ATen ops with a kernel that one call of ``fn`` dispatches (a TorchDispatchMode counter; custom
    ops such as a Triton launch or a native op count as one). Not for torch.compile'd code: a dispatch
    mode makes dynamo fall back to eager."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in NO_KERNEL:
                _Counter.n += 1
            return func(*args, **(kwargs or {}))

    with _Counter():
        fn()
    return _Counter.n
