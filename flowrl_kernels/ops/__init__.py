"""One module per op: constants, Triton kernels, launchers, ``autograd.Function``, public function.

The public functions are re-exported by ``flowrl_kernels``; import this subpackage for the pieces other
code builds on (e.g. the custom op ``flowrl_kernels.ops.flowrl_loss._fwd_op``, the launchers used by the
benchmarks and the codegen tests).
"""
