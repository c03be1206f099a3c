"""pytest setup of the benchmark suite (run with `pytest bench --benchmark-only`).

Collects bench_*.py (the default pattern test_*.py keeps them out of `pytest tests`), drops the
Triton interpreter on GPU machines before anything decorates a kernel, and writes the machine's
measured ceilings into the JSON's machine_info (see bench/common.py).
"""
import os

import torch

if torch.cuda.is_available():
    # must happen before flowrl_kernels (triton.jit) is imported: benchmarks time compiled kernels only
    os.environ.pop("TRITON_INTERPRET", None)

if os.environ.get("FLOWRL_BENCH_THREADS"):
    # e.g. 1 on a CPU box shared with other jobs: OpenMP barriers stall when a thread is descheduled
    torch.set_num_threads(int(os.environ["FLOWRL_BENCH_THREADS"]))

import pytest  # noqa: E402

from bench import common  # noqa: E402


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself (whatever its name)
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_SKIPPED = {}  # test id -> skip reason (pytest-benchmark's JSON holds only the cases that ran)
_LOAD = {"start": os.getloadavg()}  # the CPU machine is shared: say how busy it was


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED[report.nodeid.split("::")[-1]] = reason.removeprefix("Skipped: ")


def pytest_benchmark_update_machine_info(config, machine_info):
    # called when the JSON is written, at the end of the session
    info = dict(common.machine())
    info["loadavg_start"] = _LOAD["start"]
    info["loadavg_end"] = os.getloadavg()
    info["skipped"] = dict(_SKIPPED)
    machine_info["flowrl_bench"] = info


@pytest.fixture(scope="session", autouse=True)
def _ceilings():
    # measured once, before the first case, on an idle device
    common.ceilings()
    if not common.ON_GPU:  # the profiler's first start costs ~1 s and some MB: not in the first case
        common.peak_memory(lambda: torch.ones(8) * 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
