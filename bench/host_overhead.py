"""Host (Python) cost per call of the public ops, over a bare call of the kernel they run.

    python -m bench.host_overhead              # CPU: the native ops; CUDA: the Triton kernels too

On a tiny input (N=4 rows, V=8; B=2 x T=8 for the loss) the kernels' own work is ~1 us, so the
public call's median minus the bare op's median is what the public function adds per call: argument
checks, impl selection, the torch.library / autograd.Function wrapping, output allocation, the grid.
Each timing is the median of 5 batches of 2000 calls. CPU: the thread's CPU time (time.thread_time_ns),
so a shared, busy machine's scheduling waits do not count (cache contention still does: compare
numbers from one run). CUDA: wall time (time.perf_counter_ns), every batch ending with a synchronize;
the kernels are far shorter than their launches, so it is host time.

"bare" is, per op:
  token_logprobs  forward: torch.ops.flowrl_kernels_native.token_logprobs_fwd (CPU) or one launch of
                  _token_logprobs_fwd_kernel with preallocated outputs (CUDA)
  flowrl_loss     forward: its launcher alone (_flowrl_loss_fwd_native / _triton: outputs + one op)
Issue 18's goal: <= 20 us over the bare call for token_logprobs and flowrl_loss.
"""
from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("FLOWRL_KERNELS_QUIET", "1")
os.environ["FLOWRL_KERNELS_POISON"] = "0"

import torch  # noqa: E402

import flowrl_kernels as fk  # noqa: E402
from flowrl_kernels import _utils  # noqa: E402


def _median_us(fn, calls=2000, batches=5, sync=None):
    clock = time.perf_counter_ns if sync else time.thread_time_ns
    for _ in range(200):
        fn()
    if sync:
        sync()
    per = []
    for _ in range(batches):
        t0 = clock()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        per.append((clock() - t0) / calls / 1e3)
    return statistics.median(per)


def _py_calls(fn, calls=200):
    """Python and C function calls per call of ``fn`` (sys.setprofile): a count that a busy machine
    cannot blur, to compare versions where timings are noisy."""
    import sys

    n = [0]

    def prof(frame, event, arg):
        if event in ("call", "c_call"):
            n[0] += 1
    fn()
    sys.setprofile(prof)
    try:
        for _ in range(calls):
            fn()
    finally:
        sys.setprofile(None)
    return n[0] / calls


def measure(device):
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    impl = "triton" if device.type == "cuda" else "native"
    rows = []
    logits = torch.randn(4, 8, device=device)
    labels = torch.randint(0, 8, (4,), device=device)
    lg = logits.clone().requires_grad_(True)

    def public_fwd():
        return fk.token_logprobs(logits, labels, impl=impl)

    def public_fwd_bwd():
        fk.token_logprobs(lg, labels, impl=impl).sum().backward()

    if impl == "native":
        op = torch.ops.flowrl_kernels_native.token_logprobs_fwd

        def bare_fwd():
            return op(logits, labels, 1.0, False, -100)
    else:
        from flowrl_kernels.ops import token_logprobs as T

        out = [torch.empty(4, device=device) for _ in range(3)]
        x, lab = T._prep(logits, labels)
        block, warps = T._config(8, device)

        def bare_fwd():
            T._token_logprobs_fwd_kernel[(4,)](x, lab, out[0], out[1], out[0], x.shape[1], 8, 0, x.stride(0),
                                               x.stride(1), lab.stride(0), lab.stride(1), 1.0, -100,
                                               BLOCK_V=block, RETURN_ENTROPY=False, num_warps=warps)
    with torch.no_grad():
        pub, bare = _median_us(public_fwd, sync=sync), _median_us(bare_fwd, sync=sync)
        n_pub, n_bare = _py_calls(public_fwd), _py_calls(bare_fwd)
    rows.append(("token_logprobs forward", impl, pub, bare, n_pub, n_bare))
    rows.append(("token_logprobs forward+backward", impl, _median_us(public_fwd_bwd, calls=500, sync=sync), None,
                 _py_calls(public_fwd_bwd), None))

    B, Tn = 2, 8
    g = dict(device=device)
    lp = -torch.rand(B, Tn, **g)
    args = (lp, lp + 0.01, lp - 0.01, torch.zeros(B, **g), torch.randn(B, **g), torch.ones(B, Tn, dtype=torch.bool, **g))
    if _utils.native_has("flowrl_loss_fwd") or device.type == "cuda":
        from flowrl_kernels.ops import flowrl_loss as F

        def loss_fwd():
            return fk.flowrl_loss(*args, impl=impl)

        km = F._kernel_mask(args[5], impl)
        lo, hi = F.check_clip((0.8, 1.2))
        launch = F._flowrl_loss_fwd_triton if impl == "triton" else F._flowrl_loss_fwd_native

        def bare_loss():  # the launcher alone: outputs allocated, one kernel / native op
            return launch(args[0], args[1], args[2], args[3], args[4], km, 15.0, F.IMPORTANCE_CODES["sequence"],
                          lo, hi)
        with torch.no_grad():
            pub, bare = _median_us(loss_fwd, sync=sync), _median_us(bare_loss, sync=sync)
            n_pub, n_bare = _py_calls(loss_fwd), _py_calls(bare_loss)
        rows.append(("flowrl_loss forward", impl, pub, bare, n_pub, n_bare))
    return rows


def main():
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native={_utils.native_available()}")
    print(f"{'op':<34}{'impl':<8}{'public us':>11}{'bare us':>10}{'added us':>10}{'py calls':>10}{'bare':>7}")
    for d in devs:
        if d.type == "cpu" and not _utils.native_available():
            print("cpu: native extension not built, skipped")
            continue
        for name, impl, pub, bare, n_pub, n_bare in measure(d):
            add = f"{pub - bare:10.1f}" if bare is not None else f"{'':>10}"
            print(f"{name:<34}{impl:<8}{pub:11.1f}{(f'{bare:10.1f}' if bare is not None else ''):>10}{add}"
                  f"{n_pub:10.0f}{(f'{n_bare:7.0f}' if n_bare is not None else ''):>7}")


if __name__ == "__main__":
    main()
