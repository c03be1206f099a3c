"""bench/common.py:run_case on the CPU with a stand-in for pytest-benchmark's fixture (known round times,
no clock): what each mode of MODE_TABLE puts on the clock, the extra_info keys bench/report.py reads
(order and values), a fresh clone per round for providers that overwrite their inputs, the skips with
their reasons, round sizing, and the device-clock fields (ON_GPU set, device_time replaced by a stand-in).
Every test passes on the commit before run_case became a table of modes (b1a5a1e). Not covered here: the
OOM skips and the real device_time / CUDA peak memory, which bench/gpu.sh runs on a GPU."""
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("pytest_benchmark")
# bench/common.py turns output poisoning off for the whole process at import: restore the suite's value
# (as tests/test_bench_peers.py does)
_POISON = os.environ.get("FLOWRL_KERNELS_POISON")
from bench import common  # noqa: E402
from bench.common import Provider, run_case  # noqa: E402

if _POISON is not None:
    os.environ["FLOWRL_KERNELS_POISON"] = _POISON

pytestmark = pytest.mark.skipif(common.ON_GPU, reason="CPU tensors and CPU peak memory; on a GPU, bench/gpu.sh "
                                                     "runs run_case for real")
CEIL = {"copy_GBps": 10.0, "matmul_TFLOPs": 0.5, "matmul_dtype": "float32"}


class FakeBenchmark:
    """What run_case uses of the fixture: ``pedantic`` runs setup + target once per round and records
    the next of ``times`` (seconds) as that round's time; ``stats.stats.data``; ``extra_info``."""

    def __init__(self, times=(3e-3, 1e-3, 2e-3, 5e-3, 4e-3), disabled=False):
        self.times, self.disabled, self.extra_info = list(times), disabled, {}
        self.stats = SimpleNamespace(stats=SimpleNamespace(data=[]))
        self.log = []  # per round: provider calls in setup, in target

    def pedantic(self, target, setup, rounds, warmup_rounds, iterations):
        assert warmup_rounds == 0 and iterations == 1  # the probe call is the warm-up
        for i in range(rounds):
            n0 = CALLS["n"]
            args, kwargs = setup()
            n1 = CALLS["n"]
            target(*args, **kwargs)
            self.log.append((n1 - n0, CALLS["n"] - n1))
            self.stats.stats.data.append(self.times[i % len(self.times)])


CALLS = {"n": 0}


def _fn(x, w):
    CALLS["n"] += 1
    return (x @ w).sum(-1), torch.tensor(3)  # a second output without grad gets no upstream grad


def _inputs(grad):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(7, 5, generator=g).requires_grad_(grad),
            "w": torch.randn(5, 3, generator=g).requires_grad_(grad)}


@pytest.fixture(autouse=True)
def _fixed_ceilings(monkeypatch):
    monkeypatch.setattr(common, "ceilings", lambda: dict(CEIL))


@pytest.mark.parametrize("mode, in_setup, in_target", [("forward", 0, 1), ("backward", 1, 0), ("full", 0, 1)])
def test_each_mode_times_what_the_table_says(mode, in_setup, in_target):
    seen = {}

    def fn(x, w):
        seen["grad_enabled"] = torch.is_grad_enabled()
        return _fn(x, w)

    inputs = {}
    b = FakeBenchmark()
    run_case(b, Provider(fn), lambda grad: inputs.update(_inputs(grad)) or inputs, mode, info={"op": "t"})
    assert set(b.log) == {(in_setup, in_target)}
    assert inputs["x"].requires_grad == (mode != "forward")
    assert seen["grad_enabled"] == (mode != "forward")
    if mode != "forward":
        assert inputs["x"].grad is not None and inputs["x"].grad.abs().sum() > 0


def test_extra_info_keys_order_and_values():
    b = FakeBenchmark()
    run_case(b, Provider(_fn, note="a note"), _inputs, "full", info={"op": "t", "provider": "p", "N": 7},
             bytes_moved={"forward": 1.0, "backward": 2.0, "full": 3e6}, flop={"full": 4e9, "forward": 0},
             count_ops=True)
    ei, data = b.extra_info, b.stats.stats.data
    assert common.MIN_ROUNDS <= len(data) <= common.MAX_ROUNDS
    med = np.percentile(data, 50)
    peak_keys = ["peak_mem_bytes"] + (["peak_rss_bytes"] if "peak_rss_bytes" in ei else [])
    assert list(ei) == ["op", "provider", "N", "dtype", "mode", "rounds", "p20_ms", "median_ms", "p80_ms",
                        *peak_keys, "copy_GBps", "matmul_TFLOPs", "note", "aten_ops", "bytes_floor", "GBps",
                        "pct_floor", "flop", "TFLOPs", "pct_matmul"]
    assert ei["mode"] == "full" and ei["rounds"] == len(data) and ei["note"] == "a note"
    assert ei["dtype"] == str(common.DTYPE).replace("torch.", "")
    for k, q in (("p20_ms", 20), ("median_ms", 50), ("p80_ms", 80)):
        assert ei[k] == pytest.approx(np.percentile(data, q) * 1e3, rel=1e-12)
    assert ei["bytes_floor"] == 3e6 and ei["GBps"] == pytest.approx(3e6 / med / 1e9, rel=1e-12)
    assert ei["pct_floor"] == pytest.approx(100 * ei["GBps"] / CEIL["copy_GBps"], rel=1e-12)
    assert ei["flop"] == 4e9 and ei["TFLOPs"] == pytest.approx(4e9 / med / 1e12, rel=1e-12)
    assert ei["pct_matmul"] == pytest.approx(100 * ei["TFLOPs"] / CEIL["matmul_TFLOPs"], rel=1e-12)
    assert ei["aten_ops"] > 2 and ei["peak_mem_bytes"] > 0  # matmul, sum, the backward's ops
    # info's dtype wins over the run's; no floors, no note, no counts: no keys for them
    b = FakeBenchmark()
    run_case(b, Provider(_fn), _inputs, "forward", info={"op": "t", "dtype": "bfloat16"})
    assert b.extra_info["dtype"] == "bfloat16"
    assert not {"note", "aten_ops", "bytes_floor", "flop", "GBps", "TFLOPs", "device_ms"} & set(b.extra_info)


def test_fresh_provider_gets_a_clone_of_its_inputs_every_round():
    firsts = []

    def overwrites(x, w):  # like Liger's CE, which writes the gradient into the logits
        firsts.append(x[0, 0].item())
        with torch.no_grad():
            x.add_(1.0)
        return (x @ w).sum(-1)

    base = _inputs(True)
    x0 = base["x"][0, 0].item()
    run_case(FakeBenchmark(), Provider(overwrites, fresh=True), lambda grad: base, "full", info={"op": "t"})
    assert len(firsts) > 3 and set(firsts) == {x0}
    firsts.clear()
    run_case(FakeBenchmark(), Provider(overwrites), lambda grad: base, "full", info={"op": "t"})
    assert firsts == pytest.approx([x0 + i for i in range(len(firsts))], abs=1e-4)  # the same tensors


def test_step_mode_calls_fn_without_inputs():
    calls = []
    b = FakeBenchmark()
    run_case(b, Provider(lambda: calls.append(1)), lambda grad: {}, "step", info={"op": "train_step"})
    assert b.extra_info["mode"] == "step" and len(calls) == 1 + len(b.stats.stats.data) + 2  # probe, rounds, peaks


def _raises(exc):
    def fn(x, w):
        raise exc
    return fn


@pytest.mark.parametrize("exc, skip_on_error, reason", [
    (RuntimeError("compile failed\nlong trace"), True, "RuntimeError: compile failed"),
    (ValueError("impl='triton' needs CUDA tensors"), False, "ValueError: impl='triton' needs CUDA tensors"),
])
def test_a_provider_that_cannot_run_skips_with_the_reason(exc, skip_on_error, reason):
    with pytest.raises(pytest.skip.Exception) as e:
        run_case(FakeBenchmark(), Provider(_raises(exc), skip_on_error=skip_on_error), _inputs, "forward",
                 info={"op": "t"})
    assert str(e.value) == reason


def test_errors_that_are_not_skips():
    with pytest.raises(RuntimeError, match="boom"):  # flowrl_kernels impls never skip on an error
        run_case(FakeBenchmark(), Provider(_raises(RuntimeError("boom"))), _inputs, "forward", info={"op": "t"})
    with pytest.raises(ValueError, match=r"mode='fwd' is not one of \('forward', 'backward', 'full', 'step'\)"):
        run_case(FakeBenchmark(), Provider(_fn), _inputs, "fwd", info={"op": "t"})


def test_benchmark_disable_runs_the_probe_only():
    b = FakeBenchmark(disabled=True)
    CALLS["n"] = 0
    run_case(b, Provider(_fn), _inputs, "full", info={"op": "t"})
    assert CALLS["n"] == 1 and b.extra_info == {} and b.stats.stats.data == []


def test_a_slow_probe_gets_fewer_rounds(monkeypatch):
    monkeypatch.setattr(common, "ROUND_BUDGET_S", 0.0)  # rounds = the floor for the probe's speed
    calls = []

    def slow_first(x, w):  # a first call of >= 0.25 s (a compile, or the fp32 reference on a CPU)
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)
        return _fn(x, w)

    for fn, rounds in ((_fn, common.MIN_ROUNDS), (slow_first, max(3, common.MIN_ROUNDS // 2))):
        b = FakeBenchmark()
        run_case(b, Provider(fn), _inputs, "forward", info={"op": "t"})
        assert b.extra_info["rounds"] == len(b.stats.stats.data) == rounds


def test_device_clock_fields(monkeypatch):
    """The GPU branch on the CPU: ON_GPU set, device_time / peak_memory / the syncs replaced by stand-ins
    (device quantiles 0.5 / 1.0 / 1.5 ms); the step mode never reads the device clock."""
    calls = []

    def fake_device_time(setup, body, rounds, host_s):
        calls.append((rounds, host_s))
        body(*setup(sync=False))
        return {0.2: 0.5, 0.5: 1.0, 0.8: 1.5}

    # 40 host rounds (the GPU's bounds are 10-100); the device clock takes at most 30
    for name, value in (("ON_GPU", True), ("MIN_ROUNDS", 40), ("MAX_ROUNDS", 40),
                        ("device_time", fake_device_time), ("_sync", lambda: None),
                        ("_free", lambda: None), ("peak_memory", lambda fn: (fn(), {"peak_mem_bytes": 7})[1])):
        monkeypatch.setattr(common, name, value)
    b = FakeBenchmark()
    run_case(b, Provider(_fn), _inputs, "forward", info={"op": "t"}, bytes_moved={"forward": 3e6},
             flop={"forward": 4e9})
    ei, data = b.extra_info, b.stats.stats.data
    assert len(data) == 40 and calls == [(30, pytest.approx(np.percentile(data, 50), rel=1e-12))]
    assert list(ei) == ["op", "dtype", "mode", "rounds", "p20_ms", "median_ms", "p80_ms", "peak_mem_bytes",
                        "copy_GBps", "matmul_TFLOPs", "device_ms", "device_p20_ms", "device_p80_ms", "overhead_ms",
                        "bytes_floor", "GBps", "pct_floor", "device_GBps", "device_pct_floor", "flop", "TFLOPs",
                        "pct_matmul", "device_TFLOPs", "device_pct_matmul"]
    assert (ei["device_ms"], ei["device_p20_ms"], ei["device_p80_ms"], ei["peak_mem_bytes"]) == (1.0, 0.5, 1.5, 7)
    assert ei["overhead_ms"] == pytest.approx(ei["median_ms"] - 1.0, rel=1e-12)
    assert ei["device_GBps"] == pytest.approx(3e6 / 1.0 / 1e6, rel=1e-12)
    assert ei["device_pct_floor"] == pytest.approx(100 * (3e6 / (CEIL["copy_GBps"] * 1e9)) / 1e-3, rel=1e-12)
    assert ei["device_TFLOPs"] == pytest.approx(4e9 / 1.0 / 1e9, rel=1e-12)
    assert ei["device_pct_matmul"] == pytest.approx(100 * ei["device_TFLOPs"] / CEIL["matmul_TFLOPs"], rel=1e-12)
    b = FakeBenchmark()
    run_case(b, Provider(lambda: None), lambda grad: {}, "step", info={"op": "train_step"})
    assert len(calls) == 1 and "device_ms" not in b.extra_info
