"""flowrl_kernels: fused, exact kernels for RL of LLMs.

Every op has a pure-PyTorch spec in ``flowrl_kernels.reference`` and takes ``impl=None|"torch"|
"triton"|"native"`` (default: triton on CUDA, the native C++ extension on CPU when built, else torch;
env var ``FLOWRL_KERNELS_IMPL`` and ``prefer_impl(...)`` are preferences: an op without that impl runs its
default and logs that once, see ``flowrl_kernels._utils``).

Layout: the public functions live here; each op's kernels, launcher and autograd are one module under
``flowrl_kernels.ops`` (``ops.token_logprobs``, ``ops.linear_token_logprobs``, ``ops.flowrl_loss``,
``ops.grpo_loss``, ``ops.sequence``), so ``flowrl_kernels.token_logprobs`` is always the function.
Importing the package does not need triton (Linux-only wheels): without it, ``impl="triton"`` is
refused with a clear error and the default falls back to native / torch.
"""
from . import ops, reference
from ._utils import native_available, prefer_impl
from .ops.flowrl_loss import flowrl_loss
from .ops.grpo_loss import grpo_loss
from .ops.linear_token_logprobs import linear_token_logprobs
from .ops.sequence import group_normalize, importance_weights, masked_mean, seq_log_ratio
from .ops.token_logprobs import token_logprobs

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "native_available",
    "prefer_impl",
    "token_logprobs",
    "masked_mean",
    "seq_log_ratio",
    "importance_weights",
    "group_normalize",
    "flowrl_loss",
    "grpo_loss",
    "linear_token_logprobs",
]
