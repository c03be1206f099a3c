"""Collect bench/bench_*.py (pytest's default python_files is test_*.py; `pytest bench --benchmark-only`)."""
import pytest


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself; don't collect them twice
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
