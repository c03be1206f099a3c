"""One module per op: constants, Triton kernels, launchers, ``autograd.Function``, public function.
The op modules are siblings: none imports another (tests/test_import_graph.py). What several share lives
in ``_common.py`` (softmax constants, [B, T] checks, the FlowRL forward kernel and op that
``importance_weights`` runs too); ``configs.py`` holds the per-architecture launch configs.

The public functions are re-exported by ``flowrl_kernels``; import this subpackage for the pieces other
code builds on (e.g. the custom op ``flowrl_kernels.ops.flowrl_loss._fwd_op``, the launchers used by the
benchmarks and the codegen tests).
"""
