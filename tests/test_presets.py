"""FlowRL presets (flowrl/presets.py, docs/flowrl.md): each preset resolves to its documented field values
(an explicit TOML / CLI value winning field by field), and its loss and gradients are pinned on hand-built
batches to two computations that share no code with the kernels: the float64 reference with the preset's
options, and the closed form below in plain Python floats."""
from __future__ import annotations

import math

import pytest
import torch

from flowrl import algorithms, config, model, presets, train
from flowrl_kernels import flowrl_loss, reference
from flowrl_kernels._utils import native_has
from helpers import DEVICE, assert_no_worse_than_torch, import_or_skip

try:
    import tomllib
except ModuleNotFoundError:  # python 3.10
    import tomli as tomllib

TINY = str(config.CONFIG_DIR / "tiny.toml")
IMPLS = ["torch", "triton",
         pytest.param("native", marks=pytest.mark.skipif(not native_has("flowrl_loss_fwd", DEVICE),
                                                         reason=f"native extension without a {DEVICE} flowrl_loss_fwd"))]

# docs/flowrl.md's preset table, written out again here: presets.py cannot change without this test
DOCUMENTED = {
    "paper": dict(importance="sequence", clip=[0.8, 1.2], empty="zero", include_last_token=True, param_group="own"),
    "authors": dict(importance="sequence", clip=[-1.0, -1.0], empty="logz", include_last_token=False,
                    param_group="policy"),
    "verl-recipe": dict(importance="sequence", clip=[-1.0, 10.0], empty="logz", include_last_token=False,
                        param_group="policy"),
}
NAMES = sorted(DOCUMENTED)


def _fields(cfg: config.Config) -> dict:
    return dict(importance=cfg.algo.importance, clip=cfg.algo.clip, empty=cfg.algo.empty,
                include_last_token=cfg.logz.include_last_token, param_group=cfg.logz.param_group)


# ----------------------------------------------------------------------------------------------------
# config resolution
# ----------------------------------------------------------------------------------------------------
def test_table_is_the_documented_one():
    assert sorted(presets.PRESETS) == NAMES
    for name in NAMES:
        assert {k.split(".")[1]: v for k, v in presets.PRESETS[name].items()} == DOCUMENTED[name]


def test_default_is_paper():
    import_or_skip("reasoning_gym")  # the default task's generator (CI installs it; the GPU machine has none)
    assert presets.DEFAULT_PRESET == "paper"
    assert config.Config().algo.preset == "paper" and _fields(config.Config()) == DOCUMENTED["paper"]
    assert _fields(config.load(["--config", TINY])) == DOCUMENTED["paper"]
    # the shipped default.toml pins none of the preset's fields (it would override every preset)
    data = tomllib.loads(config.DEFAULT_CONFIG.read_text())
    for dotted in presets.PRESET_FIELDS:
        sec, key = dotted.split(".")
        assert key not in data.get(sec, {}), f"default.toml sets {dotted}"


@pytest.mark.parametrize("name", NAMES)
def test_preset_resolves_and_is_written_to_config_toml(name, tmp_path):
    cfg = config.load(["--config", TINY, f"--algo.preset={name}"])
    assert cfg.algo.preset == name and _fields(cfg) == DOCUMENTED[name]
    text = config.to_toml(cfg)  # what the run writes as config.toml: the resolved values
    assert f'preset = "{name}"' in text and f'empty = "{DOCUMENTED[name]["empty"]}"' in text
    assert f'param_group = "{DOCUMENTED[name]["param_group"]}"' in text
    assert config.build(tomllib.loads(text)) == cfg  # re-reading it gives the same run


@pytest.mark.parametrize("name", NAMES)
def test_one_field_override_wins(name, tmp_path):
    import_or_skip("reasoning_gym")  # the task generator the presets' configs build
    # on the CLI
    cfg = config.load(["--config", TINY, f"--algo.preset={name}", "--algo.clip=[0.5, 2.0]"])
    assert _fields(cfg) == {**DOCUMENTED[name], "clip": [0.5, 2.0]}
    cfg = config.load(["--config", TINY, f"--algo.preset={name}", "--logz.include_last_token=true"])
    assert _fields(cfg) == {**DOCUMENTED[name], "include_last_token": True}
    # in the TOML file (the preset named there, one field overridden there)
    flip = "logz" if DOCUMENTED[name]["empty"] == "zero" else "zero"
    path = tmp_path / "run.toml"
    path.write_text(config.DEFAULT_CONFIG.read_text().replace('preset = "paper"', f'preset = "{name}"\nempty = "{flip}"'))
    cfg = config.build(tomllib.loads(path.read_text()))
    assert _fields(cfg) == {**DOCUMENTED[name], "empty": flip}
    # a preset given on the CLI replaces the TOML's preset, and the TOML's explicit field still wins
    other = next(n for n in NAMES if n != name)
    cfg = config.build(tomllib.loads(path.read_text()), {"algo.preset": (other, other)})
    assert _fields(cfg) == {**DOCUMENTED[other], "empty": flip}


def test_bad_preset_and_fields():
    for argv, needle in ((["--algo.preset=fork"], "algo.preset"), (["--algo.empty=one"], "algo.empty"),
                         (["--logz.param_group=shared"], "logz.param_group")):
        with pytest.raises(config.ConfigError, match=needle):
            config.load(["--config", TINY] + argv)


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_groups(name):
    cfg = config.load(["--config", TINY, f"--algo.preset={name}", "--optim.weight_decay=0.1", "--optim.lr=1e-6"])

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm, self.log_z = torch.nn.Linear(3, 3), model.LogZHead(8)
    policy = Tiny()
    opt, _ = train.build_optimizer(policy, cfg)
    head = {id(p) for p in policy.log_z.parameters()}
    if DOCUMENTED[name]["param_group"] == "own":
        assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-6, 0.1), (cfg.logz.lr, 0.0)]
        assert {id(p) for p in opt.param_groups[1]["params"]} == head
    else:  # the authors: one group, the head with the policy's lr and weight decay
        assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-6, 0.1)]
        assert head <= {id(p) for p in opt.param_groups[0]["params"]}


def test_loss_options():
    assert presets.loss_options("paper") == dict(importance="sequence", clip=(0.8, 1.2), empty="zero")
    assert presets.loss_options("authors") == dict(importance="sequence", clip=(None, None), empty="logz")
    assert presets.loss_options("verl-recipe") == dict(importance="sequence", clip=(None, 10.0), empty="logz")
    assert presets.loss_options("verl-recipe", clip=[0.8, -1])["clip"] == (0.8, None)
    with pytest.raises(ValueError, match="unknown FlowRL preset"):
        presets.loss_options("fork")
    with pytest.raises(ValueError, match="unknown option"):
        presets.loss_options("paper", beta=1.0)


# ----------------------------------------------------------------------------------------------------
# the loss of each preset, pinned
# ----------------------------------------------------------------------------------------------------
BETA = 15.0
# batch "offpolicy": two responses of 3 and 2 tokens (right padding), sequence log-ratios +3.0 and -0.5
OFFPOLICY = dict(
    logp=[[-0.5, -1.0, -0.25], [-2.0, -0.5, 0.0]],
    old=[[-1.5, -2.0, -1.25], [-1.75, -0.25, 0.0]],
    ref=[[-1.0, -1.0, -1.0], [-1.0, -1.5, -9.0]],
    mask=[[1, 1, 1], [1, 1, 0]],
    log_z=[0.75, -0.5], r_hat=[0.2, -0.1])
# batch "empty": one response of 2 tokens slightly off-policy (log-ratio 0.1) and one empty response
EMPTY = dict(
    logp=[[-0.5, -1.5, 0.0], [-7.0, -7.0, -7.0]],
    old=[[-0.55, -1.55, 0.0], [-1.0, -1.0, -1.0]],
    ref=[[-1.0, -0.5, 0.0], [-2.0, -2.0, -2.0]],
    mask=[[1, 1, 0], [0, 0, 0]],
    log_z=[1.25, -0.75], r_hat=[0.5, -0.5])
# the weights each source gives these batches, by hand
WEIGHTS = {
    ("offpolicy", "paper"): [1.2, 0.8],                       # e^3 and e^-0.5 clipped to [0.8, 1.2]
    ("offpolicy", "authors"): [math.exp(3.0), math.exp(-0.5)],  # raw
    ("offpolicy", "verl-recipe"): [10.0, math.exp(-0.5)],      # clamp(max=10), no lower bound
    ("empty", "paper"): [math.exp(0.1), 0.0],                  # an empty response weighs 0
    ("empty", "authors"): [math.exp(0.1), 1.0],                # ... or 1, with residual log Z
    ("empty", "verl-recipe"): [math.exp(0.1), 1.0],
}
BATCHES = {"offpolicy": OFFPOLICY, "empty": EMPTY}


def closed_form(batch: dict, name: str):
    """loss = (1/2) sum_i w_i d_i^2, d loss/d log_z_i = w_i d_i, d loss/d logp_it = w_i d_i m_it / L_i for
    B = 2, in Python floats from the preset's documented options."""
    opts = DOCUMENTED[name]
    lo, hi = opts["clip"]
    loss, g_z, g_lp, ws = 0.0, [], [], []
    for lp, old, ref, m, z, r in zip(batch["logp"], batch["old"], batch["ref"], batch["mask"], batch["log_z"],
                                     batch["r_hat"]):
        L = sum(m)
        if L == 0:
            w, d = (1.0, z) if opts["empty"] == "logz" else (0.0, z - BETA * r)
        else:
            d = (z + sum(a * k for a, k in zip(lp, m)) / L - BETA * r - sum(a * k for a, k in zip(ref, m)) / L)
            w = math.exp(sum((a - b) * k for a, b, k in zip(lp, old, m)))
            w = min(w, hi) if hi >= 0 else w
            w = max(w, lo) if lo >= 0 else w
        ws.append(w)
        loss += w * d * d / 2
        g_z.append(w * d)
        g_lp.append([w * d * k / L if L else 0.0 for k in m])
    return loss, g_z, g_lp, ws


def _run(batch, name, impl, dtype, via_trainer=False):
    f = lambda x, dt=dtype: torch.tensor(x, dtype=dt, device=DEVICE)  # noqa: E731
    logp, log_z = f(batch["logp"]).requires_grad_(), f(batch["log_z"]).requires_grad_()
    mask = f(batch["mask"], torch.bool)
    if via_trainer:  # the trainer's own call: flowrl/algorithms.py with the preset's Algo
        algo = config.load(["--config", TINY, f"--algo.preset={name}"]).algo
        loss, _ = algorithms.flowrl_objective({"logp": logp, "log_z": log_z}, f(batch["old"]), f(batch["ref"]),
                                              f(batch["r_hat"]), mask, algo, n_seq=2)
        stats = None
    elif impl == "ref":
        loss, stats = reference.flowrl_loss(logp, f(batch["old"]), f(batch["ref"]), log_z, f(batch["r_hat"]), mask,
                                            beta=BETA, **presets.loss_options(name))
    else:
        loss, stats = flowrl_loss(logp, f(batch["old"]), f(batch["ref"]), log_z, f(batch["r_hat"]), mask,
                                  beta=BETA, impl=impl, **presets.loss_options(name))
    loss.backward()
    return loss, stats, logp.grad, log_z.grad


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("name", NAMES)
def test_reference_equals_closed_form(batch, name):
    loss_h, g_z_h, g_lp_h, w_h = closed_form(BATCHES[batch], name)
    assert w_h == pytest.approx(WEIGHTS[batch, name], rel=1e-15)
    loss, stats, g_lp, g_z = _run(BATCHES[batch], name, "ref", torch.float64)
    assert float(loss) == pytest.approx(loss_h, rel=1e-13)
    assert stats["weight"].tolist() == pytest.approx(w_h, rel=1e-13)
    assert g_z.tolist() == pytest.approx(g_z_h, rel=1e-13)
    for got, want in zip(g_lp.tolist(), g_lp_h):
        assert got == pytest.approx(want, rel=1e-13, abs=1e-300)
    # the trainer's objective with the preset's config gives the same numbers
    loss_t, _, g_lp_t, g_z_t = _run(BATCHES[batch], name, "ref", torch.float64, via_trainer=True)
    assert float(loss_t) == pytest.approx(loss_h, rel=1e-13)
    assert g_z_t.tolist() == pytest.approx(g_z_h, rel=1e-13)
    assert torch.allclose(g_lp_t, g_lp, rtol=1e-13, atol=0)


def test_presets_disagree_off_policy():
    """The pins are not vacuous: the three presets give three different losses on the off-policy batch,
    and the same one on an on-policy batch (old = logp, no empty row)."""
    losses = [closed_form(OFFPOLICY, n)[0] for n in NAMES]
    assert len({round(x, 9) for x in losses}) == 3
    on = {**OFFPOLICY, "old": OFFPOLICY["logp"]}
    assert len({round(closed_form(on, n)[0], 12) for n in NAMES}) == 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("name", NAMES)
def test_kernels_match_pins(impl, batch, name):
    ref64 = _run(BATCHES[batch], name, "ref", torch.float64)
    tor = _run(BATCHES[batch], name, "ref", torch.float32)
    out = _run(BATCHES[batch], name, impl, torch.float32)
    for i, what in ((0, "loss"), (2, "grad_logp"), (3, "grad_log_z")):
        assert_no_worse_than_torch(out[i], ref64[i], tor[i], name=what)
    assert_no_worse_than_torch(out[1]["weight"], ref64[1]["weight"], tor[1]["weight"], name="weight")


@pytest.mark.parametrize("empty", ["zero", "logz"])
def test_compiled_op_takes_the_empty_rule(empty):
    """Under torch.compile flowrl_loss goes through the custom op (its schema carries the rule): same
    loss and gradients as eager, on a batch with an empty response."""
    impl = "native" if native_has("flowrl_loss_fwd", DEVICE) else "triton"
    f = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt, device=DEVICE)  # noqa: E731
    b = EMPTY

    def step(logp, log_z):
        return flowrl_loss(logp, f(b["old"]), f(b["ref"]), log_z, f(b["r_hat"]), f(b["mask"], torch.bool),
                           beta=BETA, impl=impl, empty=empty)[0]
    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        logp, log_z = f(b["logp"]).requires_grad_(), f(b["log_z"]).requires_grad_()
        loss = fn(logp, log_z)
        loss.backward()
        results.append((loss.detach(), logp.grad, log_z.grad))
    for a, c in zip(*results):
        assert torch.equal(a, c)
    assert (float(results[0][2][1]) != 0) == (empty == "logz")  # the empty row's log Z gradient
