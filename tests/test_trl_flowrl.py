"""flowrl.trl_trainer: FlowRL as a TRL GRPOTrainer subclass, against flowrl/'s own implementation.

Tiny random Qwen2 + character-level WordLevel tokenizer (flowrl.model's test model), built in code, CPU.
- one fixed batch: the TRL trainer's loss and the gradients of the policy and of log Z equal flowrl/'s
  (Policy + flowrl_objective) within the fp32 bound (flowrl/ in float64 is the truth, flowrl/ in fp32 sets
  the bound), for each importance variant;
- train() with 1 and 2 updates per generation (num_iterations), gradient accumulation: finite, log Z moves,
  the FlowRL metrics reach TRL's logs;
- save_model writes a plain HF folder without log Z; resume_from_checkpoint continues bit for bit;
- the TRL options FlowRL refuses raise ValueError.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from helpers import assert_no_worse_than_torch, import_or_skip

trl = import_or_skip("trl")
datasets = import_or_skip("datasets")

from flowrl import algorithms, model as fmodel  # noqa: E402
from flowrl.trl_trainer import LOG_Z_FILE, FlowRLConfig, FlowRLTrainer  # noqa: E402

HIDDEN = 32


def _tiny():
    tok = fmodel.tiny_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    lm = fmodel.tiny_lm("tiny-qwen2", len(tok), 2, HIDDEN, ids, "sdpa")
    with torch.no_grad():  # HF's init (std 0.02) gives near-uniform logits: differences would hide
        for p in lm.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return lm, tok


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, use_cpu=True, seed=0,
                per_device_train_batch_size=4, num_generations=4, max_completion_length=6, logging_steps=1,
                learning_rate=1e-3, log_z_dropout=0.0, save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, gradient_checkpointing=False)
    base.update(kw)
    return FlowRLConfig(**base)


def _dataset(n=16):
    return datasets.Dataset.from_dict({"prompt": [f"add {i % 7} and {i % 5}:" + " x" * (i % 3) for i in range(n)]})


def reward_digits(completions, **kw):
    """A reward with signal for a random char-level model: the share of digits in the completion."""
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]


# ----------------------------------------------------------------------------------------------------
# one fixed batch: TRL trainer == flowrl/
# ----------------------------------------------------------------------------------------------------
def _fixed_batch(tok, B=4, R=7):
    g = torch.Generator().manual_seed(1)
    prompts = ["a much longer prompt", "hi", "mid size", "x"]
    tok.padding_side = "left"
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    comp = torch.randint(4, len(tok), (B, R), generator=g)
    cmask = torch.ones(B, R, dtype=torch.long)
    cmask[1, 4:] = 0
    cmask[2, 2:] = 0
    cmask[3, :] = 0  # an empty response: weight 0 (paper) or residual log Z (authors)
    comp[cmask == 0] = tok.pad_token_id
    return enc["input_ids"], enc["attention_mask"], comp, cmask


@pytest.mark.parametrize("kw", [
    dict(flowrl_clip=[0.9, 1.05]),                                                      # paper, tighter clip
    dict(flowrl_importance="sequence_mean", flowrl_clip=[0.9, 1.05], log_z_include_last_prompt_token=False),
    dict(flowrl_importance="none"),
    dict(preset="authors"),                                        # raw weight, empty -> log Z^2, last token out
    dict(preset="verl-recipe", log_z_detach_input=True),
], ids=["paper", "sequence_mean", "none", "authors", "verl-recipe-detach"])
def test_loss_and_grads_equal_flowrl(tmp_path, kw):
    lm, tok = _tiny()
    args = _args(tmp_path, **kw)
    include_last = args.log_z_include_last_prompt_token
    trainer = FlowRLTrainer(model=copy.deepcopy(lm), reward_funcs=reward_digits, args=args,
                            train_dataset=_dataset(), processing_class=tok)
    head = trainer.log_z
    with torch.no_grad():  # a head whose output is not ~0, so log Z's share of delta is visible
        head.mlp[-1].bias.fill_(0.7)
    pids, pmask, comp, cmask = _fixed_batch(tok)
    B, R = comp.shape
    g = torch.Generator().manual_seed(2)
    ref = -3.0 - torch.rand(B, R, generator=g)
    r_hat = torch.randn(B, generator=g)

    # flowrl/: Policy + flowrl_objective, in float64 (the truth) and float32 (the bound)
    def flowrl_side(dtype, old):
        pol = fmodel.Policy(copy.deepcopy(lm).to(dtype), copy.deepcopy(head).to(dtype),
                            include_last_token=include_last, detach_log_z_input=args.log_z_detach_input).train()
        ids, attn = torch.cat([pids, comp], 1), torch.cat([pmask, cmask], 1)
        labels = comp.masked_fill(cmask == 0, fmodel.IGNORE_INDEX)
        out = pol(ids, attn, labels, pids.shape[1])
        if old is None:
            return out["logp"].detach()
        loss, _ = algorithms.flowrl_objective(out, old.to(dtype), ref.to(dtype), r_hat.to(dtype), cmask,
                                              trainer.algo, n_seq=B)
        loss.backward()
        return [loss.detach()] + [p.grad for p in pol.lm.parameters()] + [p.grad for p in pol.log_z.parameters()]

    # old log-probs = the policy's own, shifted per row: weights inside and outside the clip range
    old = flowrl_side(torch.float64, None).float() + torch.tensor([0.02, -0.01, 0.03, -0.05])[:, None] * cmask
    truth, fp32 = flowrl_side(torch.float64, old), flowrl_side(torch.float32, old)

    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = dict(prompt_ids=pids, prompt_mask=pmask, completion_ids=comp, completion_mask=cmask,
                  advantages=r_hat, old_per_token_logps=old, ref_per_token_logps=ref)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    ours = [loss.detach()] + [p.grad for p in trainer.model.parameters()] + [p.grad for p in head.parameters()]
    assert len(ours) == len(truth)
    names = ["loss"] + [n for n, _ in trainer.model.named_parameters()] + [f"log_z.{n}" for n, _ in head.named_parameters()]
    for name, o, t, f in zip(names, ours, truth, fp32):
        assert o is not None and torch.isfinite(o).all(), name
        assert_no_worse_than_torch(o, t, f, name=name)
    assert float(truth[0]) > 0 and any(float(g.abs().max()) > 0 for g in ours[-len(list(head.parameters())):])
    m = trainer._metrics["train"]
    assert {"flowrl/log_z", "flowrl/delta", "flowrl/delta_abs", "flowrl/is_weight", "flowrl/is_clip_frac",
            "flowrl/is_clip_low_frac", "flowrl/is_clip_high_frac", "entropy"} <= set(m)
    if args.flowrl_importance == "sequence" and args.flowrl_clip == [0.9, 1.05]:
        assert 0 < m["flowrl/is_clip_frac"][-1] < 1  # some rows clipped, some not: the weights are exercised


# ----------------------------------------------------------------------------------------------------
# train(), save, resume
# ----------------------------------------------------------------------------------------------------
def _train(tmp_path, max_steps, resume=None, **kw):
    lm, tok = _tiny()
    args = _args(tmp_path, max_steps=max_steps, gradient_accumulation_steps=2, **kw)
    trainer = FlowRLTrainer(model=lm, reward_funcs=reward_digits, args=args, train_dataset=_dataset(),
                            processing_class=tok)
    z0 = [p.detach().clone() for p in trainer.log_z.parameters()]
    trainer.train(resume_from_checkpoint=resume)
    return trainer, z0


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_train_runs(tmp_path, num_iterations):
    trainer, z0 = _train(tmp_path, 2, num_iterations=num_iterations)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for i, h in enumerate(logs):
        # a step that reuses the previous generation (num_iterations=2) logs no reward: TRL's behaviour
        keys = ("loss", "grad_norm", "flowrl/log_z", "flowrl/delta_abs", "flowrl/is_weight", "entropy") + (
            ("reward",) if i % num_iterations == 0 else ())
        for k in keys:
            assert k in h and h[k] is not None and h[k] == h[k] and abs(h[k]) < float("inf"), (k, h)
    assert any(not torch.equal(a, b) for a, b in zip(z0, trainer.log_z.parameters())), "log Z did not move"
    if num_iterations == 2:  # the second pass over a generation is off-policy: weights differ from 1
        assert any(h["flowrl/is_log_w_abs"] > 0 for h in logs)


def test_save_and_resume_exactly(tmp_path):
    full, _ = _train(tmp_path / "a", 4, save_strategy="steps", save_steps=2)
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    assert (ckpt / LOG_Z_FILE).is_file() and (ckpt / "optimizer.pt").is_file()
    # save_model: a plain HF folder, loadable by transformers, without log Z
    export = tmp_path / "export"
    full.save_model(str(export))
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    keys = set(load_file(str(export / "model.safetensors")))
    assert not any("log_z" in k or "mlp.8" in k for k in keys) and not (export / LOG_Z_FILE).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(export))
    for (n, p), q in zip(full.model.named_parameters(), reloaded.parameters()):
        assert torch.equal(p, q), n

    resumed, _ = _train(tmp_path / "b", 4, resume=str(ckpt), save_strategy="steps", save_steps=2)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(full.log_z.parameters(), resumed.log_z.parameters()):
        assert torch.equal(p, q)
    last = lambda t: [h for h in t.state.log_history if "loss" in h][-1]  # noqa: E731
    assert last(full)["loss"] == last(resumed)["loss"]


def test_resume_refuses_checkpoint_without_log_z(tmp_path):
    full, _ = _train(tmp_path / "a", 2, save_strategy="steps", save_steps=2)
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    os.remove(ckpt / LOG_Z_FILE)
    with pytest.raises(ValueError, match=LOG_Z_FILE):
        _train(tmp_path / "b", 4, resume=str(ckpt))


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(beta=0.04), "flowrl_beta"),
    (dict(loss_type="grpo"), "loss_type"),
    (dict(importance_sampling_level="sequence"), "flowrl_importance"),
    (dict(epsilon=0.3), "flowrl_clip"),
    (dict(scale_rewards="batch"), "scale_rewards"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
    (dict(entropy_coef=0.01), "entropy"),
    (dict(sync_ref_model=True), "sync_ref_model"),
    (dict(flowrl_beta=0.0), "flowrl_beta"),
    (dict(flowrl_importance="token"), "flowrl_importance"),
    (dict(flowrl_clip=[1.2, 0.8]), "flowrl_clip"),
    (dict(log_z_lr=0.0), "log_z_lr"),
    (dict(preset="nope"), "preset"),
    (dict(flowrl_empty="one"), "flowrl_empty"),
    (dict(log_z_param_group="shared"), "log_z_param_group"),
])
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kw)


@pytest.mark.parametrize("preset", ["paper", "authors", "verl-recipe"])
def test_config_presets_match_flowrl(tmp_path, preset):
    """FlowRLConfig(preset=...) resolves to the same FlowRL options as flowrl/'s --algo.preset."""
    from flowrl import config as fconfig
    a = _args(tmp_path, preset=preset, log_z_dropout=None)
    c = fconfig.build({"model": {"path": "tiny-qwen2"}, "task": {"name": "synthetic"}, "algo": {"preset": preset}})
    assert (a.flowrl_importance, a.flowrl_clip, a.flowrl_empty, a.log_z_include_last_prompt_token,
            a.log_z_param_group) == (c.algo.importance, c.algo.clip, c.algo.empty, c.logz.include_last_token,
                                     c.logz.param_group)
    assert (a.flowrl_beta, a.log_z_lr, a.log_z_dropout, a.log_z_detach_input) == (
        c.algo.beta, c.logz.lr, c.logz.dropout, c.logz.detach_input)


def test_config_preset_field_overrides(tmp_path):
    b = _args(tmp_path, preset="authors", flowrl_clip=[0.8, 1.2], flowrl_beta=5)
    assert b.flowrl_clip == [0.8, 1.2] and b.flowrl_beta == 5       # the fields set win ...
    assert b.flowrl_empty == "logz" and b.log_z_include_last_prompt_token is False  # ... the rest is the preset's
    assert b.log_z_param_group == "policy" and b.flowrl_algo().empty == "logz"


def test_log_z_param_group(tmp_path):
    lm, tok = _tiny()
    for group, lr, wd in [("own", 1e-3, 0.0), ("policy", 1e-5, 0.1)]:
        args = _args(tmp_path, learning_rate=1e-5, weight_decay=0.1, log_z_param_group=group)
        t = FlowRLTrainer(model=copy.deepcopy(lm), reward_funcs=reward_digits, args=args, train_dataset=_dataset(),
                          processing_class=tok)
        opt = t.create_optimizer()
        (g,) = [g for g in opt.param_groups if any(p is t.log_z.mlp[0].weight for p in g["params"])]
        assert (g["lr"], g["weight_decay"], len(g["params"])) == (lr, wd, len(list(t.log_z.parameters())))


def test_args_must_be_flowrl_config(tmp_path):
    lm, tok = _tiny()
    grpo = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                          per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match="FlowRLConfig"):
        FlowRLTrainer(model=lm, reward_funcs=reward_digits, args=grpo, train_dataset=_dataset(), processing_class=tok)


# ----------------------------------------------------------------------------------------------------
# two processes (accelerate multi-process CPU, gloo): the suite's "full" lane only (FLOWRL_TEST_FULL=1):
# two fresh interpreters importing TRL cost more than this file's whole budget on the 2-core CI box
# ----------------------------------------------------------------------------------------------------
@pytest.mark.full
def test_two_processes(tmp_path):
    """2 ranks under torchrun: each generates its share, r_hat over the whole group, the policy's gradients
    averaged by DDP and log Z's by the trainer: the ranks end with identical policy and log Z."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(root / "tests" / "trl_two_process_worker.py"), str(tmp_path)], check=True, env=env,
                   timeout=900)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["same_on_ranks"] and res["log_z_moved"] and len(res["logs"]) == 2
    assert all(h["loss"] == h["loss"] and abs(h["loss"]) < float("inf") for h in res["logs"])
