"""The new peer providers of issue 24 (Liger's SM90 CuTe-DSL fused lm_head, QuACK's cross-entropy and
linear cross-entropy) are in the benchmark tables, Liger's own shape is a fused lm_head case on the GPU,
and on a machine that cannot run them each provider is skipped with its reason (never imitated)."""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")
# bench/common.py turns output poisoning off for the whole process at import (benchmarks time the real
# kernels); this suite runs with it on (conftest.py), and the tests that follow in this xdist worker
# rely on it (test_token_logprobs asserts it): restore the suite's value after importing the bench
_POISON = os.environ.get("FLOWRL_KERNELS_POISON")
from bench import bench_linear_token_logprobs as BL  # noqa: E402
from bench import bench_token_logprobs as BT  # noqa: E402
from bench import peers  # noqa: E402
from bench.common import ON_GPU, Unavailable  # noqa: E402

if _POISON is not None:
    os.environ["FLOWRL_KERNELS_POISON"] = _POISON


def test_tables_list_the_new_peers():
    assert {"liger-sm90", "quack-linear", "liger", "cce"} <= set(BL.PROVIDERS)
    assert "quack" in BT.PROVIDERS
    assert (BL.LIGER_SHAPE.N, BL.LIGER_SHAPE.H, BL.LIGER_SHAPE.V) == (4096, 4096, 131072)
    assert (BL.LIGER_SHAPE in BL.SHAPES) == ON_GPU  # a GPU run measures it; the CPU suite would take minutes


@pytest.mark.skipif(ON_GPU and torch.cuda.get_device_capability() >= (9, 0), reason="a Hopper GPU may run them")
@pytest.mark.parametrize("loader, bench, name", [
    (peers.liger_fused_linear_cross_entropy_sm90, BL, "liger-sm90"),
    (peers.quack_linear_cross_entropy, BL, "quack-linear"),
    (peers.quack_cross_entropy, BT, "quack"),
])
def test_unrunnable_peers_skip_with_a_reason(loader, bench, name):
    with pytest.raises(Unavailable) as e:
        loader()
    why = str(e.value)
    assert ("CUDA device" in why or "compute capability" in why or "not importable" in why
            or "CuTe DSL" in why or "no linear_cross_entropy" in why), why
    with pytest.raises(Unavailable):  # the benchmark's provider() is what turns this into a skip
        bench.provider(name)
