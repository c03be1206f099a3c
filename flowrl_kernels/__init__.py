"""flowrl_kernels: fused, exact kernels for RL of LLMs.

Every op has a pure-PyTorch spec in ``flowrl_kernels.reference`` and takes ``impl=None|"torch"|
"triton"|"native"`` (default: triton on CUDA, the native C++ extension on CPU when built, else torch;
env var ``FLOWRL_KERNELS_IMPL`` overrides the default).
"""
from . import reference
from ._utils import native_available
from .linear_token_logprobs import linear_token_logprobs

__version__ = "0.1.0"

__all__ = [
    "reference",
    "native_available",
    "linear_token_logprobs",
]
