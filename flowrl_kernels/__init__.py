"""flowrl_kernels: fused, exact kernels for RL of LLMs.

Every op has a pure-PyTorch spec in ``flowrl_kernels.reference`` and takes ``impl=None|"torch"|
"triton"|"native"`` (default: triton on CUDA, the native C++ extension on CPU when built, else torch;
env var ``FLOWRL_KERNELS_IMPL`` overrides the default).
"""
from . import reference
from ._utils import native_available
from .token_logprobs import token_logprobs
from .flowrl_loss import flowrl_loss
from .grpo_loss import grpo_loss
from .sequence import group_normalize, importance_weights, masked_mean, seq_log_ratio
from .linear_token_logprobs import linear_token_logprobs

__version__ = "0.1.0"

__all__ = [
    "reference",
    "native_available",
    "token_logprobs",
    "masked_mean",
    "seq_log_ratio",
    "importance_weights",
    "group_normalize",
    "flowrl_loss",
    "grpo_loss",
    "linear_token_logprobs",
]
