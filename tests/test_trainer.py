"""Trainer pieces in one process: config errors, task rewards, the log Z head and its pooling,
left-padding invariance of the policy's log-probs, rollout shapes, gradient-accumulation exactness."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from flowrl import algorithms, config, distributed, model, rollout, tasks, train

TINY = str(config.CONFIG_DIR / "tiny.toml")


# ----------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--algo.name=ppo"], "algo.name"),
    (["--algo.betta=3"], "unknown config key algo.betta"),
    (["--optimizer.lr=1e-5"], "unknown config section"),
    (["--optim.lr=fast"], "optim.lr must be a number"),
    (["--train.steps=2.5"], "train.steps must be an integer"),
    (["--rollout.group_size=1"], "rollout.group_size"),
    (["--rollout.top_p=0"], "rollout.top_p"),
    (["--model.path=/no/such/folder"], "model.path"),
    (["--task.name=no_such_dataset"], "task.name"),
    (["--model.path=tiny-llama", "--task.name=synthetic", "--logz.detach_input=maybe"], "logz.detach_input"),
    (["steps=3"], "unexpected argument"),
    # issue 22: every number finite and in range; the task's own checks before any model
    (["--optim.lr=inf"], r"optim.lr=inf must be in \(0, 1\]"),
    (["--optim.lr=nan"], "optim.lr=nan"),
    (["--logz.lr=2.0"], "logz.lr=2.0"),
    (["--algo.clip=[0.8, inf]"], r"algo.clip=\[0.8, inf\] must be a finite number"),
    (["--algo.beta=inf"], "algo.beta=inf must be a finite number"),
    (["--optim.grad_clip=nan"], "optim.grad_clip=nan must be a finite number"),
    (["--optim.betas=[0.9, nan]"], "optim.betas"),
    (["--eval.temperature=inf"], "eval.temperature=inf must be a finite number"),
    (["--run.seed=-1"], r"run.seed=-1 must be in \[0"),
    (["--task.name=basic_arithmetic", "--task.options={min_terms=5, max_terms=2}"],
     "task.options=.*'basic_arithmetic'.*AssertionError: max_terms must be >= min_terms"),
    (["--task.name=basic_arithmetic", "--task.options={no_such_option=1}"], "task.options=.*no_such_option"),
])
def test_bad_config_fails_before_any_model_is_built(argv, needle, monkeypatch, tmp_path):
    def no_build(*a, **k):
        raise AssertionError("a model was built despite a bad config")
    monkeypatch.setattr(model, "build", no_build)
    monkeypatch.setattr(distributed, "init", no_build)
    with pytest.raises(config.ConfigError, match=needle):
        train.main(["--config", TINY, f"--run.out_dir={tmp_path}"] + argv)
    assert not any(tmp_path.iterdir())


def test_bad_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[rollout]\ngroup_size = "four"\n')
    with pytest.raises(config.ConfigError, match="rollout.group_size must be an integer"):
        config.load(["--config", str(p)])
    p.write_text('[rollout]\ngroupsize = 4\n')
    with pytest.raises(config.ConfigError, match="unknown config key rollout.groupsize"):
        config.load(["--config", str(p)])


def test_overrides_and_roundtrip(tmp_path):
    cfg = config.load(["--config", TINY, "--algo.name", "grpo", "--algo.clip=[-1, 10]", "--optim.lr=3e-4",
                       "--run.name=123", "--task.options={a = 1}"])
    assert cfg.algo.name == "grpo" and cfg.algo.clip == [-1.0, 10.0] and cfg.optim.lr == 3e-4
    assert cfg.run.name == "123" and cfg.task.options == {"a": 1}  # a str field keeps the raw CLI text
    assert cfg.rollout.max_new_tokens == 16  # from tiny.toml
    config.save(cfg, tmp_path / "c.toml")
    again = config.load(["--config", str(tmp_path / "c.toml")])
    assert again == cfg
    assert algorithms.clip_bounds(cfg.algo.clip) == (None, 10.0)


def test_world_size_checks():
    cfg = config.load(["--config", TINY, "--rollout.prompts_per_step=3"])
    with pytest.raises(config.ConfigError, match="divisible by the number of ranks"):
        cfg.check_world(2)
    cfg = config.load(["--config", TINY, "--train.mini_batch_size=3"])
    with pytest.raises(config.ConfigError, match="mini_batch_size"):
        cfg.check_world(2)


def test_help_lists_every_field_with_its_doc():
    text = config.help_text()
    assert "--logz.include_last_token=true" in text and "authors' code" in text
    assert text.count("--") > 40


# ----------------------------------------------------------------------------------------------------
# tasks and rewards
# ----------------------------------------------------------------------------------------------------
def test_extract_answer():
    assert tasks.extract_answer("x <answer> 7 </answer> y <answer>8</answer>") == "8"
    assert tasks.extract_answer("<answer>\n-3\n</answer>") == "-3"
    assert tasks.extract_answer("the answer is 7") is None
    assert tasks.extract_answer("<answer>7") is None


def test_reasoning_gym_rewards_and_prompt():
    cfg = config.load(["--model.path=tiny-llama"])  # default task: basic_arithmetic, 1 digit, 2 terms
    task = tasks.build(cfg, "train")
    p = task[0]
    good = f"{p.entry['metadata']['expression']} = {p.answer}\n<answer>{p.answer}</answer>"
    assert task.reward(p, good) == 1.0
    assert task.reward(p, f"<answer>{int(p.answer) + 1}</answer>") == 0.0
    assert task.reward(p, p.answer) == 0.0  # no tags, no reward
    msgs = task.messages(p)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"].endswith("</answer>") and " = " in msgs[2]["content"]
    assert msgs[-1]["content"] == p.question and msgs[1]["content"] != p.question
    again = tasks.build(cfg, "train")
    assert [again[i].question for i in range(20)] == [task[i].question for i in range(20)]  # seeded
    held_out = tasks.build(cfg, "eval")
    assert len(held_out) == cfg.eval.prompts
    assert [held_out[i].question for i in range(10)] != [task[i].question for i in range(10)]


def test_jsonl_rewards_with_math_verify(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "Half of 1?", "answer": "\\\\frac{1}{2}"}\n{"prompt": "2+2?", "answer": "4"}\n'
                    '{"prompt": "held out", "answer": "1"}\n')
    cfg = config.load(["--model.path=tiny-llama", "--task.name=jsonl", f"--task.path={path}", "--eval.prompts=1"])
    task = tasks.build(cfg, "train")
    assert len(task) == 2 and len(tasks.build(cfg, "eval")) == 1
    half, four = task[0], task[1]
    assert task.reward(half, "so <answer>1/2</answer>") == 1.0
    assert task.reward(half, "<answer>0.5</answer>") == 1.0
    assert task.reward(half, "<answer>\\frac{1}{3}</answer>") == 0.0
    assert task.reward(four, "<answer>4</answer>") == 1.0
    assert task.reward(four, "4") == 0.0
    # math-verify's timeouts use signal.alarm (main thread only): the reward must work in a thread too
    out = []
    th = threading.Thread(target=lambda: out.append(task.reward(four, "<answer>4</answer>")))
    th.start()
    th.join()
    assert out == [1.0]


def test_synthetic_reward():
    cfg = config.load(["--config", TINY])
    task = tasks.build(cfg, "train")
    p = task[0]
    assert p.question.startswith("first digit of ") and p.answer == p.question.split()[-3]
    assert task.reward(p, f"<answer>{p.answer}</answer>") == 1.0
    other = str((int(p.answer) + 1) % 10)
    assert task.reward(p, f"{other}{p.answer}") == 0.2
    assert task.reward(p, "no digits") == 0.0


# ----------------------------------------------------------------------------------------------------
# model: log Z head, pooling, log-probs
# ----------------------------------------------------------------------------------------------------
def _tiny_policy(detach=False, include_last=True, head=True):
    tok = model.tiny_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    lm = model.tiny_lm("tiny-qwen2", len(tok), 2, 32, ids, "sdpa")
    with torch.no_grad():  # HF's init (std 0.02) gives near-uniform logits: differences would hide
        for p in lm.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    z = model.LogZHead(32, dropout=0.0) if head else None
    return model.Policy(lm, z, include_last_token=include_last, detach_log_z_input=detach), tok


def test_pooling_masks_left_padding():
    B, P, H = 3, 5, 4
    hidden = torch.randn(B, P, H, dtype=torch.float64)
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    hidden[attn == 0] = 1e6  # padding must not leak in
    pooled = model.masked_mean_pool(hidden, model.prompt_pool_mask(attn))
    for b in range(B):
        torch.testing.assert_close(pooled[b], hidden[b, attn[b].bool()].mean(0))
    drop = model.prompt_pool_mask(attn, include_last_token=False)
    assert drop[:, -1].sum() == 0 and drop[:, :-1].equal(attn[:, :-1].bool())
    pooled = model.masked_mean_pool(hidden, drop)
    torch.testing.assert_close(pooled[0], hidden[0, 2:4].mean(0))
    assert pooled[2].eq(0).all()  # a one-token prompt without its last token pools nothing: 0, not NaN


def test_log_z_head_shape_and_layers():
    head = model.LogZHead(16)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "GELU", "LayerNorm", "Dropout"] * 2 + ["Linear"]
    out = head(torch.randn(5, 16))
    assert out.shape == (5,) and out.dtype == torch.float32


def _left_padded(tok, prompts, responses):
    enc = rollout.encode_prompts(tok, [[{"role": "user", "content": p}] for p in prompts], "cpu")
    R = max(len(r) for r in responses)
    resp = torch.full((len(responses), R), tok.pad_token_id)
    mask = torch.zeros(len(responses), R, dtype=torch.bool)
    for i, r in enumerate(responses):
        ids = tok(r, add_special_tokens=False)["input_ids"]
        resp[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = True
    labels = torch.where(mask, resp, torch.full_like(resp, model.IGNORE_INDEX))
    return (torch.cat([enc["input_ids"], resp], 1), torch.cat([enc["attention_mask"], mask.long()], 1),
            labels, enc["input_ids"].shape[1], mask)


@pytest.mark.parametrize("include_last", [True, False])
def test_policy_left_padding_invariance(include_last):
    """A row scores the same alone and inside a left-padded batch: positions follow the mask."""
    policy, tok = _tiny_policy(include_last=include_last)
    policy.eval()
    prompts, responses = ["a much longer prompt here", "hi"], ["abc", "xy z1"]
    ids, attn, labels, P, mask = _left_padded(tok, prompts, responses)
    out = policy(ids, attn, labels, P, temperature=0.7)
    assert out["logp"].dtype == torch.float32 and out["logp"].shape == labels.shape
    assert out["log_z"].shape == (2,) and out["entropy"].shape == labels.shape
    assert out["logp"][~mask].eq(0).all() and (out["logp"][mask] < 0).all()
    ids1, attn1, labels1, P1, mask1 = _left_padded(tok, prompts[1:], responses[1:])
    assert P1 < P  # the short prompt really was padded in the batch
    alone = policy(ids1, attn1, labels1, P1, temperature=0.7)
    torch.testing.assert_close(out["logp"][1, :mask1.shape[1]], alone["logp"][0], atol=2e-5, rtol=0)
    torch.testing.assert_close(out["log_z"][1], alone["log_z"][0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("detach", [False, True])
def test_log_z_detach_switch(detach):
    policy, tok = _tiny_policy(detach=detach)
    ids, attn, labels, P, _ = _left_padded(tok, ["one", "three"], ["a", "bc"])
    policy(ids, attn, labels, P)["log_z"].sum().backward()
    backbone = [p.grad for n, p in policy.lm.named_parameters() if "layers" in n]
    reached = any(g is not None and g.abs().sum() > 0 for g in backbone)
    assert reached != detach
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.log_z.mlp[-1].parameters())


def test_log_z_head_not_in_exported_weights():
    policy, _ = _tiny_policy()
    assert not any("log_z" in k or "mlp.8" in k for k in policy.lm.state_dict())
    assert any(k.startswith("log_z.") for k in policy.state_dict())


def test_response_mask_first_eos_inclusive():
    eos = 2
    resp = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    m = rollout.response_mask(resp, eos)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_generate_groups_are_adjacent():
    torch.manual_seed(0)
    policy, tok = _tiny_policy()
    msgs = [[{"role": "user", "content": "ab"}], [{"role": "user", "content": "a longer prompt"}]]
    b = rollout.generate(policy, tok, msgs, n=3, max_new_tokens=7, temperature=1.0, top_p=1.0, top_k=0,
                         device="cpu")
    assert len(b) == 6 and len(b.texts) == 6 and b.labels.shape[1] <= 7
    assert b.input_ids.shape[1] == b.prompt_len + b.labels.shape[1]
    prompts = b.input_ids[:, : b.prompt_len]
    assert prompts[0].equal(prompts[2]) and not prompts[2].equal(prompts[3])  # rows i*n .. i*n+n-1
    assert (b.labels[~b.response_mask] == model.IGNORE_INDEX).all()
    assert b.attention_mask[:, b.prompt_len:].bool().equal(b.response_mask)


def test_local_prompts_are_disjoint_across_ranks():
    cfg = config.load(["--config", TINY])
    task = tasks.build(cfg, "train")
    env = lambda r: distributed.Env(r, r, 2, torch.device("cpu"), None)  # noqa: E731
    a, b = train.local_prompts(task, cfg, env(0), 3), train.local_prompts(task, cfg, env(1), 3)
    assert len(a) == len(b) == 2 and not {p.question for p in a} & {p.question for p in b}
    assert [p.question for p in train.local_prompts(task, cfg, env(0), 3)] == [p.question for p in a]


# ----------------------------------------------------------------------------------------------------
# algorithms: micro-batch shares add up to the mini-batch loss (and gradient)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, reduction", [("flowrl", "token_mean"), ("grpo", "token_mean"), ("grpo", "seq_mean")])
def test_micro_batches_add_up(name, reduction):
    B, T, G = 8, 11, 4
    algo = config.Algo(name=name, grpo_reduction=reduction)
    logp = (-torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.01 * torch.randn(B, T, dtype=torch.float64)
    ref = logp.detach() + 0.1 * torch.randn(B, T, dtype=torch.float64)
    log_z = torch.randn(B, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, T) < 0.7
    mask[3] = False  # an empty response
    r_hat = algorithms.normalized_rewards(torch.randint(0, 2, (B,)).double(), G)
    n_tok = int(mask.sum())

    def run(lo, hi):
        out = {"logp": logp[lo:hi], "log_z": log_z[lo:hi]}
        return algorithms.objective(out, old[lo:hi], ref[lo:hi], r_hat[lo:hi], mask[lo:hi], algo, B, n_tok)[0]

    full = run(0, B)
    g_full = torch.autograd.grad(full, (logp, log_z), allow_unused=True)
    parts = run(0, 3) + run(3, B)
    g_parts = torch.autograd.grad(parts, (logp, log_z), allow_unused=True)
    torch.testing.assert_close(parts, full)
    for a, b in zip(g_parts, g_full):
        if b is not None:
            torch.testing.assert_close(a, b)


def test_zero_std_fraction():
    # 4 groups of 3: all-correct, mixed, all-wrong, all equal partial credit -> 3 of 4 carry no GRPO signal
    groups = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    assert algorithms.zero_std_fraction(groups) == 0.75
    assert algorithms.zero_std_fraction(groups[1:2]) == 0.0
    assert (algorithms.normalized_rewards(groups.reshape(-1), 3).view(4, 3)[[0, 2, 3]] == 0).all()


def test_fused_logprob_path_matches_logits_path():
    import flowrl_kernels
    if not hasattr(flowrl_kernels, "linear_token_logprobs"):
        pytest.skip("flowrl_kernels.linear_token_logprobs is not in this install")
    policy, tok = _tiny_policy()
    policy.eval()
    ids, attn, labels, P, mask = _left_padded(tok, ["one prompt", "two"], ["abc", "de"])
    policy.logprob_impl = "logits"
    a = policy(ids, attn, labels, P, temperature=0.8)
    (a["logp"].sum() + a["log_z"].sum()).backward()
    ga = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    policy.logprob_impl = "fused"
    b = policy(ids, attn, labels, P, temperature=0.8)
    (b["logp"].sum() + b["log_z"].sum()).backward()
    for k in ("logp", "entropy", "log_z"):
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    for n, p in policy.named_parameters():  # the fused path trains the same parameters, log Z included
        torch.testing.assert_close(p.grad, ga[n], atol=1e-5, rtol=1e-4, msg=n)


def test_train_step_old_positional_call_still_works(tmp_path):
    """train_step(step, cfg, env, policy, ref, sampler, task, opt, sched, metrics), the call before
    train.Trainer: a DeprecationWarning naming the caller's line, and the same step (record and weights)
    as train_step(trainer, step) from the same start."""
    from flowrl.metrics import Metrics
    cfg = config.load(["--config", TINY, f"--run.out_dir={tmp_path}", "--rollout.prompts_per_step=2",
                       "--rollout.max_new_tokens=6", "--model.tiny_hidden=32"])
    env = distributed.Env(0, 0, 1, torch.device("cpu"), None)
    timing = ("step_time", "tokens_per_s", "peak_memory_mb", "time_generate", "time_logprobs", "time_update")
    runs = []
    for old_call in (False, True):
        policy, ref, tok = model.build(cfg, env)
        opt, sched = train.build_optimizer(policy, cfg)
        sampler, task, m = rollout.HFRollout(tok, env.device), tasks.build(cfg, "train"), Metrics(tmp_path, False, 1)
        torch.manual_seed(1)
        if old_call:
            with pytest.warns(DeprecationWarning, match=r"train_step\(step, cfg, env") as w:
                rec = train.train_step(0, cfg, env, policy, ref, sampler, task, opt, sched, m)
            assert w[0].filename == __file__
        else:
            rec = train.train_step(train.Trainer(cfg=cfg, env=env, policy=policy, sampler=sampler, metrics=m, ref=ref,
                                                 opt=opt, sched=sched, task=task), 0)
        runs.append(({k: v for k, v in rec.items() if k not in timing}, [p.detach() for p in policy.parameters()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    with pytest.raises(ValueError, match="Trainer.opt, Trainer.sched, Trainer.task"):
        train.train_step(train.Trainer(cfg=cfg, env=env, policy=policy, sampler=sampler, metrics=m), 0)


def test_fused_path_requires_the_op(monkeypatch):
    import flowrl_kernels
    monkeypatch.delattr(flowrl_kernels, "linear_token_logprobs", raising=False)
    cfg = config.load(["--config", TINY, "--model.logprob_impl=fused"])
    env = distributed.Env(0, 0, 1, torch.device("cpu"), None)
    with pytest.raises(ValueError, match="linear_token_logprobs"):
        model.build(cfg, env)


# ----------------------------------------------------------------------------------------------------
# issue 22: rewards that fail, non-finite weights, strict-JSON metrics, the stop message
# ----------------------------------------------------------------------------------------------------
class _Rewards(tasks.Task):
    def __init__(self, reward):
        super().__init__([tasks.Problem(f"q{i}", "1") for i in range(3)], "", tasks.Problem("q", "1"), "1")
        self._reward = reward

    def reward(self, p, response):
        return self._reward(p, response)


def _no_bad(p, r):
    if r == "boom" * 100:
        raise KeyError("no such field")
    return {"ok": 1.0, "nan": float("nan"), "none": None, "str": "1.0"}.get(r, 0.0)


def test_reward_failures_name_the_task_and_sample():
    cfg = config.load(["--config", TINY])
    env = distributed.Env(0, 0, 1, torch.device("cpu"), None)
    task = _Rewards(_no_bad)
    probs = [task[0], task[1]]
    r, metrics = train.score(task, probs, ["ok", "x", "nan", "ok"], 2, cfg, env, "step 3")
    assert metrics == {}  # the base Task has no batch metrics
    assert r.dtype == torch.float64 and r[0] == 1.0 and r[1] == 0.0 and r[2].isnan()  # NaN: the step is skipped
    with pytest.raises(train.TrainingStopped, match=r"task 'synthetic' raised KeyError: 'no such field' \(step 3, "
                       r"rank 0, prompt 1 of this rank's batch, sample 1; question 'q1'; "
                       r"completion 'boomboom.*\.\.\.\)"):
        train.score(task, probs, ["ok", "x", "ok", "boom" * 100], 2, cfg, env, "step 3")
    with pytest.raises(train.TrainingStopped, match="returned NoneType None, not a number.*prompt 0 .*sample 1"):
        train.score(task, probs, ["ok", "none", "ok", "ok"], 2, cfg, env, "evaluation at step 0")
    with pytest.raises(train.TrainingStopped, match="returned str '1.0', not a number"):
        train.score(task, probs, ["str", "ok", "ok", "ok"], 2, cfg, env, "step 1")


def test_params_finite_catches_inf_and_nan():
    policy, _ = _tiny_policy()
    env = distributed.Env(0, 0, 1, torch.device("cpu"), None)
    assert train.params_finite(policy, env)
    w = policy.lm.get_output_embeddings().weight
    for bad in (float("inf"), float("nan"), -float("inf")):
        with torch.no_grad():
            old = w[3, 5].item()
            w[3, 5] = bad
        assert not train.params_finite(policy, env)
        with torch.no_grad():
            w[3, 5] = old
    with torch.no_grad():
        w.fill_(3e38)  # finite, and a float32 sum would overflow: not flagged
    assert train.params_finite(policy, env)


def test_metrics_jsonl_is_strict_json(tmp_path):
    from flowrl import plot
    from flowrl.metrics import Metrics
    m = Metrics(tmp_path, True, 2)
    m.step({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "reward_mean": 0.5, "accuracy": 0.0,
            "skipped": 1})
    m.samples({"step": 1, "rewards": [1.0, float("nan")], "responses": ["a", "b"]})
    m.eval({"step": 1, "accuracy": float("-inf"), "samples": 2, "pass_at_k": 0.0, "distinct_correct": 0.0,
            "answer_entropy": 0.0, "format_rate": 0.0, "response_len": 1.0})
    m.close()

    def strict(text):
        return [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {text!r}"))
                for line in text.splitlines()]
    rec, = strict((tmp_path / "metrics.jsonl").read_text())
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["skipped"] == 1 and rec["reward_mean"] == 0.5
    assert strict((tmp_path / "samples.jsonl").read_text())[0]["rewards"] == [1.0, None]
    assert strict((tmp_path / "eval.jsonl").read_text())[0]["accuracy"] is None
    assert plot.read_jsonl(tmp_path / "metrics.jsonl") == [rec]
    Metrics(tmp_path, True, 2, resume_step=1).close()  # resume reads them back
    assert strict((tmp_path / "metrics.jsonl").read_text()) == [rec]


def test_last_good_checkpoint_message(tmp_path):
    cfg = config.load(["--config", TINY, f"--run.out_dir={tmp_path}", "--checkpoint.every=1"])
    assert train.last_good(cfg, None).startswith("none yet (checkpoint.every=1")
    cfg = config.load(["--config", TINY, f"--run.out_dir={tmp_path}"])
    assert train.last_good(cfg, None) == "none (set checkpoint.every)"
    assert train.last_good(cfg, tmp_path / "elsewhere" / "step_000004").endswith("step_000004")


def test_bad_jsonl_task_is_a_config_error_naming_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "init", lambda *a, **k: pytest.fail("built something despite a bad task"))
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+3?", "answer": 6\n')
    with pytest.raises(config.ConfigError, match=r"task.path=.*d.jsonl:2 is not a JSON object"):
        train.main(["--config", TINY, "--task.name=jsonl", f"--task.path={path}", f"--run.out_dir={tmp_path}"])
    path.write_text('["prompt", "answer"]\n')
    with pytest.raises(config.ConfigError, match=r"d.jsonl:1 needs 'prompt' and 'answer' fields"):
        train.main(["--config", TINY, "--task.name=jsonl", f"--task.path={path}", f"--run.out_dir={tmp_path}"])
