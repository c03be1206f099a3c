"""Test-suite setup. Triton kernels run on the CPU through the interpreter unless a GPU is present;
kernel outputs are poisoned with NaN before every run (flowrl_kernels._utils.empty).

Environment knobs (the GPU lane sets them; CI leaves them unset):
- FLOWRL_TEST_FULL=1: also run the tests marked ``full`` (the whole torch.compile matrix); otherwise
  they are skipped with that reason.
- FLOWRL_TEST_DEFAULT_DEVICE=meta: ``torch.set_default_device`` for the whole run while the ``device``
  fixture stays cpu/cuda, so a tensor a device-parametrized test makes without ``device=`` lands on
  another device and fails loudly (tests/test_device_clean.py runs the op tests that way).
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates anything (at flowrl_kernels import time)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FLOWRL_KERNELS_POISON", "1")
os.environ.setdefault("FLOWRL_KERNELS_QUIET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from helpers import DEVICE  # noqa: E402
FULL = os.environ.get("FLOWRL_TEST_FULL", "0") not in ("", "0")
DEFAULT_DEVICE = os.environ.get("FLOWRL_TEST_DEFAULT_DEVICE") or None


def pytest_configure(config):
    config.addinivalue_line("markers", "full: the whole matrix of a slow family (runs with FLOWRL_TEST_FULL=1)")
    if DEFAULT_DEVICE is not None:
        torch.set_default_device(DEFAULT_DEVICE)


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    skip = pytest.mark.skip(reason="part of the full matrix: set FLOWRL_TEST_FULL=1 (the GPU lane does)")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible seed per test: failures can be replayed, inputs differ between tests
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def device():
    return DEVICE
