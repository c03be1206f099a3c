"""What the ops do on CUDA, checked on a CPU: impl choice per device, the launch device of every Triton
kernel, the TF32 setting read. (The label-range policy is tested in each op's own test file.)

No GPU is needed: ``torch.device("cuda")`` objects exist without one, FakeTensorMode makes tensors that
claim to live on ``cuda:1`` without any CUDA runtime, and the Triton kernels are swapped for recorders
that note the device the launch would run on (Triton launches on the *current* CUDA device, whatever
the pointers' device).
"""
import types

import pytest
import torch

import flowrl_kernels as fk
import flowrl_kernels.ops._common as common_mod
import flowrl_kernels.ops.flowrl_loss as fl_mod
import flowrl_kernels.ops._linear_triton as lin_mod  # linear_token_logprobs's Triton path (kernels, launchers)
import flowrl_kernels.ops.token_logprobs as tlp_mod
from flowrl_kernels import _utils
from flowrl_kernels._utils import native_available, native_has, resolve_impl

needs_native = pytest.mark.skipif(not native_available(), reason="native extension not built")


# ----------------------------------------------------------------------------------------------------
# impl="native" per device
# ----------------------------------------------------------------------------------------------------
@needs_native
def test_native_has_reads_the_dispatcher_per_device():
    cuda_build = bool(fk._C.with_cuda)
    for op in ("token_logprobs_fwd", "token_logprobs_bwd", "flowrl_loss_fwd", "flowrl_loss_bwd"):
        assert native_has(op, "cpu")
    # the CUDA build registers CUDA kernels for token_logprobs only (csrc/cuda_bindings.cpp)
    assert native_has("token_logprobs_fwd", "cuda") == cuda_build
    assert native_has("token_logprobs_bwd", "cuda") == cuda_build
    assert not native_has("flowrl_loss_fwd", "cuda") and not native_has("flowrl_loss_bwd", "cuda")
    assert not native_has("no_such_op", "cpu")


@needs_native
@pytest.mark.parametrize("op", ["flowrl_loss_fwd", "token_logprobs_fwd", None])
def test_native_on_cuda_without_a_cuda_kernel_names_triton(op):
    cuda = torch.device("cuda")
    if op is not None and native_has(op, "cuda"):
        assert resolve_impl("native", cuda, native_op=op) == "native"
        return
    with pytest.raises(ValueError, match="impl='triton'"):
        resolve_impl("native", cuda, native_op=op)
    # the default on CUDA never picks native; on the CPU it does when the op is built
    assert resolve_impl(None, cuda, native_op=op) == "triton"
    if op is not None:
        assert resolve_impl(None, torch.device("cpu"), native_op=op) == "native"


@needs_native
def test_public_ops_refuse_native_on_cuda_before_any_kernel(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    # fail loudly if anything got as far as a kernel
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the impl check")

    for mod in (fl_mod, common_mod):  # the forward launchers live in _common.py, re-exported by flowrl_loss
        monkeypatch.setattr(mod, "_flowrl_loss_fwd_native", boom)
        monkeypatch.setattr(mod, "_flowrl_loss_fwd_triton", boom)
    with FakeTensorMode():
        dev = torch.device("cuda:0")
        logp = torch.zeros(3, 7, device=dev)
        mask = torch.ones(3, 7, dtype=torch.bool, device=dev)
        b = torch.zeros(3, device=dev)
        with pytest.raises(ValueError, match="impl='triton'"):
            fk.flowrl_loss(logp, logp, logp, b, b, mask, impl="native")
        with pytest.raises(ValueError, match="impl='triton'"):
            fk.importance_weights(logp, logp, mask, impl="native")
        with pytest.raises(ValueError, match="impl='triton'"):
            fk.linear_token_logprobs(logp, torch.zeros(5, 7, device=dev), torch.zeros(3, dtype=torch.long, device=dev),
                                     impl="native")
        if not native_has("token_logprobs_fwd", "cuda"):
            with pytest.raises(ValueError, match="impl='triton'"):
                fk.token_logprobs(logp, torch.zeros(3, dtype=torch.long, device=dev), impl="native")


# ----------------------------------------------------------------------------------------------------
# every Triton launch runs on its tensors' device
# ----------------------------------------------------------------------------------------------------
def _is_kernel(name, obj):
    kinds = []
    try:
        from triton.runtime.jit import JITFunction
        kinds.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction
        kinds.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    return name.endswith("_kernel") and kinds and isinstance(obj, tuple(kinds))


def test_every_triton_launch_runs_under_its_tensors_device(monkeypatch):
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    current = []  # the CUDA devices entered, innermost last

    class FakeCudaDevice:  # torch.cuda.device without a CUDA runtime: records what device_guard enters
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                devs = {a.device for a in args if isinstance(a, torch.Tensor)}
                launches.append((self.name, current[-1] if current else None, devs))
            return launch

    kernels = set()
    for mod in (tlp_mod, lin_mod, fl_mod, common_mod):  # _common: the FlowRL forward kernel
        for name, obj in list(vars(mod).items()):
            if _is_kernel(name, obj):
                kernels.add(name)
                monkeypatch.setattr(mod, name, Recorder(name))
    assert len(kernels) == 7, kernels
    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132, major=9, minor=0))

    with FakeTensorMode():
        dev = torch.device("cuda:1")  # not the current device (0): a launch outside the guard runs on 0
        try:
            # (Python indexing of a fake CUDA tensor needs CUDA in torch; narrow / select do not)
            x = torch.zeros(2, 5, 33, device=dev).narrow(1, 0, 4)  # a strided [B, T-1, V] view
        except RuntimeError as e:  # pragma: no cover - a real CUDA runtime may check the ordinal
            pytest.skip(f"no fake cuda:1 tensors on this machine ({e})")
        y = torch.zeros(2, 4, dtype=torch.long, device=dev)
        logp, lse, ent = tlp_mod._fwd_triton(x, y, 1.0, True, -100)
        tlp_mod._bwd_triton(x, y, lse, ent, logp, ent, 1.0, -100)
        h, w, lab = torch.zeros(6, 16, device=dev), torch.zeros(40, 16, device=dev), torch.zeros(6, dtype=torch.long, device=dev)
        lp, le, ls = lin_mod._triton_forward(h, w, None, lab, 1.0, -100)
        lin_mod._triton_dlogits(h, w, None, lab, ls, le, lp, lp, 1.0, -100, torch.empty(6, 40, device=dev))
        seq = torch.zeros(3, 7, device=dev)
        mask = torch.ones(3, 7, dtype=torch.bool, device=dev)
        b = seq.select(1, 0)
        outs = fl_mod._flowrl_loss_fwd_triton(seq, seq, seq, b, b, mask, 1.0, 1, -0.2, 0.2)
        fl_mod._flowrl_loss_bwd_triton(outs[0], outs[1], outs[2], outs[6], mask, torch.float32)

    assert {name for name, _, _ in launches} == kernels, "a launcher above did not launch every kernel"
    for name, guard, devs in launches:
        assert devs == {dev}, (name, devs)
        assert guard == 1, f"{name} launched under CUDA device {guard}, not its tensors' device cuda:1"


def test_cpu_tensors_need_no_guard():
    assert not isinstance(_utils.device_guard(torch.zeros(1)), torch.cuda.device)


# ----------------------------------------------------------------------------------------------------
# TF32: torch's fp32 matmul setting through the API the process used
# ----------------------------------------------------------------------------------------------------
def test_tf32_setting_read_through_the_new_api(monkeypatch):
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API (< 2.9): only the legacy flag exists")
    monkeypatch.setattr(lin_mod, "triton_interpret", lambda: False)  # the launcher's GPU branch
    old = m.fp32_precision
    try:
        # once set, reading the legacy allow_tf32 raises RuntimeError (torch >= 2.9): the old read did
        m.fp32_precision = "tf32"
        assert lin_mod._dot_precision(torch.float32) == "tf32"
        assert lin_mod._dot_precision(torch.bfloat16) == "ieee"
        m.fp32_precision = "ieee"
        assert lin_mod._dot_precision(torch.float32) == "ieee"
        m.fp32_precision = "none"  # inherits torch.backends.fp32_precision ("none": exact fp32)
        assert lin_mod._dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")  # the documented user switch to TF32
        assert lin_mod._dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")
        m.fp32_precision = old
