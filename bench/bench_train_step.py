"""One training step of the trainer (flowrl/train.py::train_step) on its tiny config, one process.

A step = rollout (sampling) -> rewards -> reference log-probs -> forward + backward of the FlowRL loss
-> optimizer update, exactly as `make train` runs it (flowrl/configs/tiny.toml: a random 2-layer
Llama, hidden 64, character tokenizer, 4 prompts x 4 rollouts, 16 new tokens). The tiny model makes
this a measure of the trainer's overhead and of end-to-end wiring, not of kernel speed.

Providers: how the trainer gets its log-probs
  logits / fused        model.logprob_impl: lm_head then token_logprobs, or linear_token_logprobs
  -default / -torch     model.kernel_impl: the library's default impl, or "torch" (the reference)
extra_info splits the step into generate / logprobs / update seconds (the trainer's own timers).
FLOWRL_BENCH_TRAIN_ARGS adds trainer overrides (e.g. "--model.tiny_hidden=256 --rollout.group_size=8").
"""
import os
import shlex

import pytest
import torch

from bench.common import ON_GPU, Provider, run_case

PROVIDERS = ["logits-default", "logits-torch", "fused-default", "fused-torch"]


@pytest.mark.parametrize("prov", PROVIDERS)
def test_train_step(benchmark, prov, tmp_path):
    try:
        from flowrl import config, distributed, model, rollout, tasks, train
        from flowrl.metrics import Metrics
    except ImportError as e:
        pytest.skip(f"the trainer (flowrl/) is not importable here: {e}")
    logprob_impl, kernel = prov.split("-")
    argv = ["--config", str(config.CONFIG_DIR / "tiny.toml"), f"--run.out_dir={tmp_path}", "--run.name=bench",
            f"--model.logprob_impl={logprob_impl}", f"--model.kernel_impl={'' if kernel == 'default' else kernel}",
            "--eval.prompts=0", *shlex.split(os.environ.get("FLOWRL_BENCH_TRAIN_ARGS", ""))]
    if not ON_GPU:  # keep the suite's thread count (the trainer would take every core)
        argv.append(f"--run.cpu_threads={torch.get_num_threads()}")
    cfg = config.load(argv)
    env = distributed.init(cfg.run.cpu_threads)  # a one-rank process group, torn down below
    metrics = None
    try:
        try:
            policy, ref, tok = model.build(cfg, env)
        except ValueError as e:  # e.g. logprob_impl='fused' without linear_token_logprobs in this checkout
            pytest.skip(str(e))
        opt, sched = train.build_optimizer(policy, cfg)
        sampler = rollout.build_sampler(cfg, env, tok, model.resolve_path(cfg, env))
        task = tasks.build(cfg, "train")
        metrics = Metrics(cfg.run_dir, env.is_main, 10**6)
        trainer = train.Trainer(cfg=cfg, env=env, policy=policy, sampler=sampler, metrics=metrics, ref=ref, opt=opt,
                                sched=sched, task=task)
        state = {"step": 0, "record": {}}

        def step():
            state["record"] = train.train_step(trainer, state["step"])
            state["step"] += 1

        benchmark.group = "train_step tiny"
        run_case(benchmark, Provider(step), lambda _: {}, "step",
                 info={"op": "train_step", "provider": prov, "model": f"tiny ({cfg.model.path}, "
                       f"{cfg.model.tiny_layers}L H{cfg.model.tiny_hidden})", "N": 0})
    finally:
        if metrics is not None:
            metrics.close()
        distributed.cleanup()
    rec = state["record"]
    benchmark.extra_info.update({k: rec[k] for k in ("time_generate", "time_logprobs", "time_update",
                                                     "tokens_per_s") if k in rec})
