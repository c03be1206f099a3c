"""FlowRL (and GRPO) trainer: rollout -> reward -> log-probs -> loss -> update, with FSDP2.

Launch (from the repo root):
    python flowrl/train.py                                            # default config, one process
    python flowrl/train.py --help                                     # every config field, documented
    torchrun --standalone --nproc_per_node=2 flowrl/train.py --config flowrl/configs/tiny.toml
    torchrun --standalone --nproc_per_node=8 flowrl/train.py --model.path=/models/Qwen2.5-1.5B-Instruct \\
        --task.name=countdown --rollout.prompts_per_step=64 --rollout.group_size=8
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 flowrl/train.py ...
    make train ARGS="--algo.name=grpo --run.name=grpo"                # = torchrun ... flowrl/train.py

Outputs go to runs/<run.name>/ (layout: flowrl/metrics.py).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python flowrl/train.py`: import the package, not its sibling files
    _here = Path(__file__).resolve().parent
    sys.path = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

import torch

from flowrl import algorithms, config, distributed, model, rollout, tasks
from flowrl.metrics import Metrics, peak_memory_mb


def build_optimizer(policy, cfg: config.Config):
    """AdamW with two groups: the LM (optim.lr, weight decay) and the log Z head (logz.lr, no decay)."""
    groups = [{"params": [p for p in policy.lm.parameters() if p.requires_grad],
               "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}]
    if policy.log_z is not None:
        groups.append({"params": list(policy.log_z.parameters()), "lr": cfg.logz.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas))
    warm = cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def local_prompts(task, cfg: config.Config, env, step: int):
    """This rank's share of step ``step``'s prompts: a seeded permutation walked in order, epoch after epoch."""
    order = torch.randperm(len(task), generator=torch.Generator().manual_seed(cfg.run.seed)).tolist()
    per_rank = cfg.rollout.prompts_per_step // env.world_size
    start = step * cfg.rollout.prompts_per_step + env.rank * per_rank
    return [task[order[(start + j) % len(task)]] for j in range(per_rank)]


@torch.no_grad()
def forward_logp(module, batch: rollout.Batch, cfg: config.Config) -> torch.Tensor:
    """Float32 log-probs [B, R] of the batch's responses under ``module`` (no grad, micro-batched)."""
    mb = cfg.train.micro_batch_size
    # gathered once for all micro-batches (no per-layer all-gathers; resharded on exit, which FSDP
    # would not do by itself for the root after a forward without backward)
    with distributed.gathered(module):
        return torch.cat([module(b.input_ids, b.attention_mask, b.labels, b.prompt_len,
                                 temperature=cfg.rollout.temperature, entropy=False)["logp"]
                          for b in (batch.slice(i, i + mb) for i in range(0, len(batch), mb))])


def train_step(step, cfg, env, policy, ref, tok, task, opt, sched, metrics) -> dict:
    t0 = time.perf_counter()
    G = cfg.rollout.group_size
    problems = local_prompts(task, cfg, env, step)
    policy.train()
    batch = rollout.generate(policy, tok, [task.messages(p) for p in problems], n=G,
                             max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                             top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, device=env.device)
    rewards = torch.tensor([task.reward(problems[i // G], t) for i, t in enumerate(batch.texts)])
    r_hat = algorithms.normalized_rewards(rewards, G).to(env.device)
    t_gen = time.perf_counter()

    B, mask = len(batch), batch.response_mask
    mini = cfg.train.mini_batch_size or B
    micro = min(cfg.train.micro_batch_size, mini)
    n_updates = cfg.train.epochs * (B // mini)
    ref_logp = forward_logp(ref, batch, cfg) if ref is not None else None
    # one update per batch: the policy that sampled is the one being trained, so old log-probs are the
    # first forward's, detached (bit-identical, and one forward pass cheaper); otherwise recompute them
    old_logp = forward_logp(policy, batch, cfg) if n_updates > 1 else None
    t_lp = time.perf_counter()

    sums, n_micro, grad_norms = {}, 0, []
    for _ in range(cfg.train.epochs):
        for lo in range(0, B, mini):
            opt.zero_grad(set_to_none=True)
            n_tok = int(mask[lo: lo + mini].sum())
            for i in range(lo, lo + mini, micro):
                b = batch.slice(i, i + micro)
                out = policy(b.input_ids, b.attention_mask, b.labels, b.prompt_len,
                             temperature=cfg.rollout.temperature, entropy=True)
                old = out["logp"].detach() if old_logp is None else old_logp[i: i + micro]
                ref_b = None if ref_logp is None else ref_logp[i: i + micro]
                loss, st = algorithms.objective(out, old, ref_b, r_hat[i: i + micro], b.response_mask,
                                                cfg.algo, n_seq=mini, n_tok=n_tok)
                loss.backward()
                st["loss"] = loss.detach() * (mini / micro)  # this micro-batch's own mean loss
                st["entropy"] = (out["entropy"].detach() * b.response_mask).sum() / b.response_mask.sum().clamp(min=1)
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n_micro += 1
            grad_norms.append(distributed.clip_grad_norm(policy.parameters(), cfg.optim.grad_clip))
            opt.step()
            sched.step()
    t_end = time.perf_counter()

    groups = rewards.view(-1, G)
    tokens = float(batch.attention_mask.sum())
    record = {k: v / n_micro for k, v in sums.items()}
    record.update(reward_mean=float(rewards.mean()), reward_sq=float((rewards ** 2).mean()),
                  accuracy=float((rewards >= 1.0).float().mean()), grad_norm=sum(grad_norms) / len(grad_norms),
                  response_len=float(mask.sum(-1).float().mean()),
                  zero_std_groups=float((groups.max(-1).values == groups.min(-1).values).float().mean()))
    record = distributed.mean_over_ranks(record, env.device)
    record["reward_std"] = max(record.pop("reward_sq") - record["reward_mean"] ** 2, 0.0) ** 0.5
    step_time = distributed.max_over_ranks(t_end - t0, env.device)
    record.update(step=step + 1, lr=sched.get_last_lr()[0], step_time=step_time,
                  time_generate=t_gen - t0, time_logprobs=t_lp - t_gen, time_update=t_end - t_lp,
                  tokens_per_s=tokens * env.world_size / step_time,
                  peak_memory_mb=distributed.max_over_ranks(peak_memory_mb(env.device), env.device))
    metrics.step(record)
    metrics.samples({"step": step + 1, "question": problems[0].question, "answer": problems[0].answer,
                     "responses": batch.texts[:G], "rewards": rewards[:G].tolist()})
    return record


@torch.no_grad()
def evaluate(step, cfg, env, policy, tok, task, metrics) -> dict:
    """Avg@k accuracy, pass@k, mean reward, <answer> format rate and response length on held-out prompts."""
    k, per_rank = cfg.eval.samples, cfg.eval.prompts // env.world_size
    chunk = max(cfg.rollout.prompts_per_step // env.world_size, 1)
    mine = [task[env.rank * per_rank + j] for j in range(per_rank)]
    sums = torch.zeros(6, dtype=torch.float64)  # prompts, correct samples, solved prompts, reward, format, length
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed + 7 * env.rank + 1)  # the same draws at every evaluation
        for lo in range(0, per_rank, chunk):
            probs = mine[lo: lo + chunk]
            batch = rollout.generate(policy, tok, [task.messages(p) for p in probs], n=k,
                                     max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                                     temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, top_k=0,
                                     device=env.device)
            r = torch.tensor([task.reward(probs[i // k], t) for i, t in enumerate(batch.texts)], dtype=torch.float64)
            correct = (r >= 1.0).view(-1, k)
            fmt = sum(tasks.extract_answer(t) is not None for t in batch.texts)
            sums += torch.tensor([len(probs), correct.sum(), correct.any(-1).sum(), r.sum(), fmt,
                                  batch.response_mask.sum()], dtype=torch.float64)
    sums = distributed.all_reduce_sum(sums.to(env.device)).cpu()
    n = max(sums[0].item() * k, 1)
    record = {"step": step, "prompts": int(sums[0]), "samples": k, "accuracy": sums[1].item() / n,
              "pass_at_k": sums[2].item() / max(sums[0].item(), 1), "reward_mean": sums[3].item() / n,
              "format_rate": sums[4].item() / n, "response_len": sums[5].item() / n}
    metrics.eval(record)
    return record


def main(argv=None) -> None:
    cfg = config.load(argv)  # every config error is raised here, before anything is built
    env = distributed.init(cfg.run.cpu_threads)
    metrics = None
    try:
        cfg.check_world(env.world_size)
        if env.is_main:
            if cfg.run_dir.exists() and not cfg.run.overwrite:
                raise config.ConfigError(f"{cfg.run_dir} exists; pick another --run.name or set --run.overwrite=true.")
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            config.save(cfg, cfg.run_dir / "config.toml")
        t_start = time.perf_counter()
        policy, ref, tok = model.build(cfg, env)
        opt, sched = build_optimizer(policy, cfg)
        torch.manual_seed(cfg.run.seed + env.rank)  # ranks sample different responses
        train_task, eval_task = tasks.build(cfg, "train"), tasks.build(cfg, "eval")
        metrics = Metrics(cfg.run_dir, env.is_main, cfg.train.steps)
        evals = []
        if cfg.eval.prompts:
            evals.append(evaluate(0, cfg, env, policy, tok, eval_task, metrics))
        for step in range(cfg.train.steps):
            train_step(step, cfg, env, policy, ref, tok, train_task, opt, sched, metrics)
            if cfg.eval.prompts and ((cfg.eval.every and (step + 1) % cfg.eval.every == 0) or step + 1 == cfg.train.steps):
                evals.append(evaluate(step + 1, cfg, env, policy, tok, eval_task, metrics))
    except Exception:
        print(f"[flowrl] rank {env.rank} failed", file=sys.stderr, flush=True)
        raise
    else:
        metrics.close()
        if env.is_main:
            curve = " -> ".join(f"{e['accuracy']:.3f}" for e in evals)
            print(f"[flowrl] done in {time.perf_counter() - t_start:.0f} s; eval accuracy {curve or 'n/a'}; "
                  f"outputs in {cfg.run_dir}/", flush=True)
    finally:
        if metrics is not None:
            metrics.close()
        distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except config.ConfigError as e:
        sys.exit(f"config error: {e}")
