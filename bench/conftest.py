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

import pytest  # noqa: E402

from bench import common  # noqa: E402


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself (whatever its name)
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["flowrl_bench"] = common.machine()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
