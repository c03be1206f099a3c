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

# CPU threads. On a box already busy with other jobs (load average >= cores), torch's OpenMP regions
# stall at every barrier until the descheduled thread runs again: measured here at load ~4 on 2 cores,
# TRL's row loop went from 0.9 ms (1 thread) to 520 ms (2 threads) and the reference from 0.96 to 68 ms.
# So a busy machine is measured on 1 thread (said in the JSON); FLOWRL_BENCH_THREADS overrides.
_THREADS_NOTE = ""
if os.environ.get("FLOWRL_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FLOWRL_BENCH_THREADS"]))
    _THREADS_NOTE = f"{torch.get_num_threads()} thread(s), set by FLOWRL_BENCH_THREADS"
elif not torch.cuda.is_available() and os.getloadavg()[0] >= (os.cpu_count() or 1):
    torch.set_num_threads(1)
    _THREADS_NOTE = (f"1 thread: load average {os.getloadavg()[0]:.1f} >= {os.cpu_count()} cores at start "
                     "(OpenMP barriers stall on a busy machine)")

import pytest  # noqa: E402

from bench import common  # noqa: E402


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself (whatever its name)
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_SKIPPED = {}  # test id -> skip reason (pytest-benchmark's JSON holds only the cases that ran)
_PLANNED = []  # every case id of the collected bench files, before -k / -m deselection


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # runs before the -k filter removes items: bench/gpu.sh runs each file in parts (-k), and the
    # report lists the cases the whole run planned but did not measure (a part out of time)
    _PLANNED.extend(item.name for item in items)
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
    info["planned"] = list(_PLANNED)
    info["torch_threads"] = torch.get_num_threads()
    if _THREADS_NOTE:
        info["threads_note"] = _THREADS_NOTE
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
