"""``import flowrl_kernels`` without triton (macOS, Windows, slim CPU images): the CPU paths work, the
default never picks triton, and asking for it fails with an error that names the fix.

Runs in a subprocess with ``sys.modules["triton"] = None`` (makes ``import triton`` raise ImportError)
and TRITON_INTERPRET unset, so the check sees exactly what a triton-less user sees.
"""
import os
import subprocess
import sys

_SCRIPT = r'''
import sys
sys.modules["triton"] = None
sys.modules["triton.language"] = None
import torch
import flowrl_kernels as fk
from flowrl_kernels import reference
from flowrl_kernels._triton_compat import HAS_TRITON
assert not HAS_TRITON
import flowrl_kernels.ops.token_logprobs as tlp_mod
assert callable(fk.token_logprobs) and tlp_mod.__name__ == "flowrl_kernels.ops.token_logprobs"

torch.manual_seed(0)
x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 7, (3, 5))
for impl in (None, "torch"):
    got = fk.token_logprobs(x, y, impl=impl)
    want = reference.token_logprobs(x, y)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (impl, (got - want).abs().max())
got.sum().backward()
assert torch.isfinite(x.grad).all()

logp = torch.randn(4, 6, dtype=torch.float64)
mask = torch.ones(4, 6)
loss, _ = fk.flowrl_loss(logp, logp, logp - 0.1, torch.zeros(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), mask)
assert torch.isfinite(loss)

for call in (lambda: fk.token_logprobs(x, y, impl="triton"),
             lambda: fk.flowrl_loss(logp, logp, logp, torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), mask, impl="triton")):
    try:
        call()
    except ValueError as e:
        assert "triton" in str(e) and "impl='torch'" in str(e), e
    else:
        raise AssertionError("impl='triton' without triton must raise")

try:
    tlp_mod.triton.cdiv(3, 2)
except ImportError as e:
    assert "pip install triton" in str(e)
else:
    raise AssertionError("the stand-in must refuse real triton calls")
print("OK")
'''


def test_import_and_cpu_ops_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr
