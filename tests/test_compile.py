"""torch.compile(fullgraph=True) with the Inductor backend over every public op and a FlowRL step.

One compiled function runs a FlowRL step (token_logprobs -> flowrl_loss, backward into the logits and
log Z) and every other public op (entropy, the fused lm_head, grpo_loss on group_normalize'd rewards,
importance_weights, masked_mean, seq_log_ratio), so one Inductor compile (forward + backward graphs)
covers them all. Each case: the DEFAULT impl (no ``impl=``: native on CPU, triton on CUDA) or one
explicit impl, a bool / uint8 / float mask, fp32 or bf16 logits (and lm_head operands). Checked:
  - compiled outputs and gradients vs the float64 eager reference, no worse than 2x the eager run's
    own error + a few ulps (tests/helpers.py);
  - no ``aten.view.dtype`` of a bool tensor reaches Inductor (the graphs are inspected just before
    Inductor lowers them). On CUDA, Inductor fails to lower that view ("torch.bool is not supported by
    torch.iinfo"); on the CPU it lowers fine, so only this inspection catches it here. A control
    shows the inspection fires.

CI runs a representative subset (every op, the default impl, each mask dtype and both logits dtypes at
least once, plus the Triton impl); FLOWRL_TEST_FULL=1 (the GPU lane) runs the whole impl x mask x dtype
matrix. Inductor compiles take ~20-80 s each on a 2-core CPU.
"""
import pytest
import torch

import flowrl_kernels as fk
from flowrl_kernels import native_available
from flowrl_kernels._utils import native_has
from helpers import assert_no_worse_than_torch

pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")

MASKS = {"bool": torch.bool, "uint8": torch.uint8, "float": torch.float32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CI_CASES = {(None, "bool", "fp32"), (None, "uint8", "bf16"), ("triton", "float", "bf16")}
OUT_NAMES = ("logp+ent", "ent", "logp", "lin_logp", "lin_ent", "flowrl_loss", "delta", "weight", "clip_frac",
             "grpo_loss", "r_hat", "iw", "iw_frac", "masked_mean", "seq_log_ratio")


def _cases():
    for impl in (None, "torch", "triton", "native"):
        for m in MASKS:
            for d in DTYPES:
                marks = [] if (impl, m, d) in CI_CASES else [pytest.mark.full]
                if impl == "native":
                    marks.append(pytest.mark.skipif(not native_available(), reason="native extension not built"))
                yield pytest.param(impl, m, d, marks=marks, id=f"{impl or 'default'}-{m}-{d}")


def _impl_for(impl, op, device):
    """impl for one op: "native" only where the extension has a kernel for this device, else the default."""
    if impl != "native":
        return impl
    return "native" if op is not None and native_has(op, torch.device(device).type) else None


def _make_fn(impl, device):
    tok = _impl_for(impl, "token_logprobs_fwd", device)
    flow = _impl_for(impl, "flowrl_loss_fwd", device)
    plain = _impl_for(impl, None, device)  # ops with no native kernel (torch compositions, lm_head)

    def step(x, y, h, w, old, ref, log_z, r_hat, mask, rewards):
        lp, ent = fk.token_logprobs(x, y, temperature=0.9, return_entropy=True, impl=tok)
        lp_only = fk.token_logprobs(x, y, impl=tok)
        loss, st = fk.flowrl_loss(lp, old, ref, log_z, r_hat, mask, beta=3.0, impl=flow)
        llp, lent = fk.linear_token_logprobs(h, w, y, return_entropy=True, impl=plain)
        z = fk.group_normalize(rewards, 2, impl=plain)
        g, _ = fk.grpo_loss(llp, old, z, mask, impl=plain)
        iw, frac = fk.importance_weights(lp, old, mask, level="sequence_mean", clip=(0.9, 1.1), impl=flow)
        mm = fk.masked_mean(lent, mask, impl=plain)
        sl = fk.seq_log_ratio(lp_only, old, mask, impl=plain)
        return (lp, ent, lp_only, llp, lent, loss, st["delta"], st["weight"], st["clip_frac"], g, z, iw, frac,
                mm, sl)

    return step


def _inputs(mask_dtype, dtype, device):
    B, T, V, H = 4, 5, 11, 16
    x = (torch.randn(B, T, V, device=device) * 3).to(dtype)
    y = torch.randint(0, V, (B, T), device=device)
    h = (torch.randn(B, T, H, device=device) / 2).to(dtype)
    w = (torch.randn(V, H, device=device) / 2).to(dtype)
    old = -torch.rand(B, T, device=device) * 3
    ref = -torch.rand(B, T, device=device) * 3
    log_z = torch.randn(B, device=device)
    r_hat = torch.randn(B, device=device)
    m = torch.rand(B, T, device=device)
    mask = (m > 0.3).to(mask_dtype) if mask_dtype != torch.float32 else torch.where(m > 0.3, m, torch.zeros_like(m))
    rewards = torch.rand(B, device=device)
    return [x, y, h, w, old, ref, log_z, r_hat, mask, rewards]


_GRAD_ARGS = (0, 2, 3, 6)  # x, h, w, log_z
_DIFF_OUTS = (0, 1, 2, 3, 4, 5, 9, 13, 14)  # outputs that carry a gradient


def _run(fn, args, coefs):
    args = [a.detach().clone().requires_grad_(i in _GRAD_ARGS) for i, a in enumerate(args)]
    outs = fn(*args)
    total = sum(c * outs[i].sum() for c, i in zip(coefs, _DIFF_OUTS))
    grads = torch.autograd.grad(total, [args[i] for i in _GRAD_ARGS])
    return [o.detach() for o in outs], list(grads)


def _assert_no_bool_view(gm):
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.dtype:
            src = node.args[0].meta.get("val") if hasattr(node.args[0], "meta") else None
            assert src is None or src.dtype != torch.bool, (
                f"aten.view.dtype of a bool tensor reaches Inductor ({node.format_node()}); Inductor cannot "
                "lower it on CUDA (torch.iinfo(torch.bool)): convert with .to() or let the kernel read bool")


def inductor_no_bool_view(gm, example_inputs):
    """The Inductor backend, with every ATen graph (forward and backward) inspected before lowering."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner(graph, inputs, *args, **kwargs):
        _assert_no_bool_view(graph)
        return compile_fx_inner(graph, inputs, *args, **kwargs)

    return compile_fx(gm, example_inputs, inner_compile=inner)


@pytest.mark.parametrize("impl, mask, dtype", list(_cases()))
def test_inductor_flowrl_step_and_every_op(impl, mask, dtype, device):
    torch._dynamo.reset()
    fn = _make_fn(impl, device)
    args = _inputs(MASKS[mask], DTYPES[dtype], device)
    coefs = torch.randn(len(_DIFF_OUTS)).tolist()
    eager = _run(fn, args, coefs)
    compiled = _run(torch.compile(fn, fullgraph=True, backend=inductor_no_bool_view), args, coefs)
    # float64 spec: the same function on float64 inputs takes the torch reference path of every op
    args64 = [a.double() if a.is_floating_point() else a for a in args]
    ref64 = _run(_make_fn(None, device), args64, coefs)
    names = list(OUT_NAMES) + ["grad_x", "grad_h", "grad_w", "grad_log_z"]
    for name, c, e, r in zip(names, compiled[0] + compiled[1], eager[0] + eager[1], ref64[0] + ref64[1]):
        assert c.dtype == e.dtype and c.shape == e.shape, (name, c.dtype, e.dtype, c.shape, e.shape)
        assert_no_worse_than_torch(c, r, e, name=f"compiled {name}")


def test_bool_view_inspection_fires(device):
    # control: the backend above must reject exactly the pattern that broke Inductor on CUDA
    torch._dynamo.reset()

    def f(m, x):
        return (m.view(torch.uint8).to(torch.float32) * x).sum()

    m = torch.rand(3, 4, device=device) > 0.5
    with pytest.raises(Exception, match="view.dtype of a bool tensor"):
        torch.compile(f, fullgraph=True, backend=inductor_no_bool_view)(m, torch.randn(3, 4, device=device))
