"""FlowRL (and GRPO) trainer: rollout -> reward -> log-probs -> loss -> update, with FSDP2.

Launch (from the repo root):
    python flowrl/train.py                                            # default config, one process
    python flowrl/train.py --help                                     # every config field, documented
    torchrun --standalone --nproc_per_node=2 flowrl/train.py --config flowrl/configs/tiny.toml
    torchrun --standalone --nproc_per_node=8 flowrl/train.py --model.path=/models/Qwen2.5-1.5B-Instruct \\
        --task.name=countdown --rollout.prompts_per_step=64 --rollout.group_size=8
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 flowrl/train.py ...
    make train ARGS="--algo.name=grpo --run.name=grpo"                # = torchrun ... flowrl/train.py

Outputs go to runs/<run.name>/ (layout: flowrl/metrics.py, flowrl/checkpoint.py). Launching again
into a run directory that holds a checkpoint continues from it (--checkpoint.resume=off starts over).
"""
from __future__ import annotations

import numbers
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

if __package__ in (None, ""):  # `python flowrl/train.py`: import the package, not its sibling files
    _here = Path(__file__).resolve().parent
    sys.path = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

import torch

from flowrl import algorithms, checkpoint, config, distributed, diversity, faults, model, rollout, tasks
from flowrl.metrics import Metrics, peak_memory_mb, reset_peak_memory


@dataclass
class Trainer:
    """What a training step and an evaluation work with, built once by main(): ``train_step(trainer, step)``,
    ``evaluate(trainer, step)``. Plain references to objects that live for the whole run (nothing is
    copied). An evaluation alone needs cfg, env, policy, sampler, metrics and eval_task."""
    cfg: config.Config
    """The resolved run config (flowrl/config.py)."""
    env: distributed.Env
    """This process: rank, world size, device, device mesh (distributed.init)."""
    policy: model.Policy
    """The policy being trained: model.Policy (LM + log Z head), FSDP2-sharded (model.build)."""
    sampler: Any
    """Draws the responses: rollout.HFRollout or rollout.VLLMRollout (rollout.build_sampler)."""
    metrics: Metrics
    """Writes metrics.jsonl, eval.jsonl and samples.jsonl of the run directory (flowrl/metrics.py)."""
    ref: Optional[model.Policy] = None
    """The frozen reference policy (model.build), None when the algorithm needs none (GRPO, kl_coef 0)."""
    opt: Optional[torch.optim.Optimizer] = None
    """AdamW over the policy (build_optimizer); train_step needs it."""
    sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    """Its learning-rate schedule (torch LambdaLR, build_optimizer); train_step needs it."""
    task: Optional[tasks.Task] = None
    """The training prompts and their reward (tasks.build(cfg, "train")); train_step needs it."""
    eval_task: Optional[tasks.Task] = None
    """The held-out prompts (tasks.build(cfg, "eval")); evaluate needs it."""


# the positional signatures before issue 25 (still accepted, with a DeprecationWarning)
_LEGACY_ARGS = {"train_step": ("step", "cfg", "env", "policy", "ref", "sampler", "task", "opt", "sched", "metrics"),
                "evaluate": ("step", "cfg", "env", "policy", "sampler", "eval_task", "metrics")}


def _legacy_call(name: str, args: tuple, kwargs: dict, stacklevel: int) -> Tuple[Trainer, int]:
    """(trainer, step) from an old-style call ``train_step(step, cfg, env, policy, ...)`` /
    ``evaluate(step, cfg, env, policy, sampler, task, metrics)``, with a DeprecationWarning."""
    names = _LEGACY_ARGS[name]
    if name == "evaluate" and "task" in kwargs:
        kwargs = {("eval_task" if k == "task" else k): v for k, v in kwargs.items()}
    given = dict(zip(names, args))
    if len(args) > len(names) or set(kwargs) - set(names) or set(kwargs) & set(given):
        raise TypeError(f"{name}{tuple(names)}: got {len(args)} positional arguments and {sorted(kwargs)}.")
    given.update(kwargs)
    missing = [n for n in names if n not in given]
    if missing:
        raise TypeError(f"{name}() missing {missing}.")
    warnings.warn(f"{name}({', '.join(names)}) is deprecated: build a flowrl.train.Trainer once and call "
                  f"{name}(trainer, step).", DeprecationWarning, stacklevel=stacklevel)
    step = given.pop("step")
    return Trainer(**given), step


def _trainer_and_step(name: str, trainer, step, legacy: tuple, legacy_kw: dict, depth: int) -> Tuple[Trainer, int]:
    """train_step's / evaluate's (trainer, step), also from the old call; ``depth``: frames from there to its
    caller (1, 2 through evaluate's torch.no_grad wrapper), so that the warning names the caller's line."""
    if isinstance(trainer, numbers.Integral):  # the old call: the step came first
        return _legacy_call(name, (trainer, step) + legacy, legacy_kw, stacklevel=3 + depth)
    if not isinstance(trainer, Trainer) or legacy or legacy_kw:
        raise TypeError(f"{name}(trainer, step) takes a flowrl.train.Trainer and the step (an int); got "
                        f"{type(trainer).__name__} and {len(legacy) + len(legacy_kw)} more argument(s).")
    return trainer, step


def _require(name: str, trainer: Trainer, fields) -> None:
    missing = [f for f in fields if getattr(trainer, f) is None]
    if missing:
        raise ValueError(f"{name} needs Trainer.{', Trainer.'.join(missing)}, which is None; set it when building "
                         "the Trainer (main() shows how).")


def build_optimizer(policy, cfg: config.Config):
    """AdamW over the LM (optim.lr, weight decay) and the log Z head: its own group (logz.lr, no decay) for
    logz.param_group='own', or inside the LM's group for 'policy' (the authors' code: one optimizer over
    every parameter of the actor, head included)."""
    groups = [{"params": [p for p in policy.lm.parameters() if p.requires_grad],
               "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}]
    if policy.log_z is not None:
        if cfg.logz.param_group == "policy":
            groups[0]["params"] += list(policy.log_z.parameters())
        else:
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


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many consecutive non-finite steps, non-finite weights after an update, a
    reward function that failed); raised on every rank alike, main() adds the last good checkpoint."""


def params_finite(policy, env) -> bool:
    """Whether every parameter element is finite on every rank: a float64 sum per local shard is finite
    iff its elements are (it cannot overflow: 3.4e38 x 1e12 < 1.8e308). One read of the weights per
    optimizer step (133M fp32 on one busy CPU core: 0.18-0.26 s, under 1% of a step; a float32 sum,
    0.12 s, could overflow on finite weights; isfinite().all(), 1.2 s, allocates), one host sync. An
    update can leave inf weights from finite grads (``lr`` huge); generate then fails on NaN logits."""
    sums = [(p.to_local() if hasattr(p, "to_local") else p).detach().sum(dtype=torch.float64)
            for p in policy.parameters()]
    return not distributed.any_over_ranks(~torch.isfinite(torch.stack(sums).sum()))


def score(task, problems, texts, k, cfg, env, where: str) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Rewards (float64, one per text; text i answers problems[i // k]) and the task's batch metrics, from
    one ``task.score`` call (the code task runs its sandbox pool over the whole batch). A reward function
    that raises or returns anything but a real number stops the run on every rank (TrainingStopped) with
    the task, the prompt and the completion; NaN is a number (that step is skipped by the non-finite guard)."""
    per_text = [problems[i // k] for i in range(len(texts))]
    out, metrics, bad = [float("nan")] * len(texts), {}, None

    def sample(i: int, why: str) -> str:
        return (f"the reward of task {cfg.task.name!r} {why} ({where}, rank {env.rank}, prompt {i // k} of "
                f"this rank's batch, sample {i % k}; question {per_text[i].question[:120]!r}; "
                f"completion {texts[i][:200]!r}{'...' if len(texts[i]) > 200 else ''}).")

    try:
        scores, metrics = task.score(per_text, texts)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported with its sample
        scores, why = None, f"raised {type(e).__name__}: {str(e)[:300]}"
        for i in range(len(texts)):  # the batch call names no sample: find the first one that fails alone
            try:
                task.score([per_text[i]], [texts[i]])
            except Exception as e1:  # noqa: BLE001
                bad = sample(i, f"raised {type(e1).__name__}: {str(e1)[:300]}")
                break
        if bad is None:
            bad = (f"the reward of task {cfg.task.name!r} {why} on the whole batch ({where}, rank {env.rank}; "
                   "every sample scores alone).")
    if scores is not None and len(scores) != len(texts):
        bad = (f"task {cfg.task.name!r} returned {len(scores)} rewards for {len(texts)} completions "
               f"({where}, rank {env.rank}).")
    elif scores is not None:
        for i, r in enumerate(scores):
            r = r.item() if torch.is_tensor(r) and r.numel() == 1 else r
            if not isinstance(r, numbers.Real):
                bad = sample(i, f"returned {type(r).__name__} {repr(r)[:80]}, not a number")
                break
            out[i] = float(r)
    if distributed.any_over_ranks(torch.tensor(bad is not None, device=env.device)):
        raise TrainingStopped(bad or f"a reward function failed on another rank ({where}; its message names "
                                     "the sample).")
    return torch.tensor(out, dtype=torch.float64), metrics


def update_policy(step, cfg, env, policy, ref, batch, r_hat, opt, sched):
    """train.epochs passes over one rollout batch, one optimizer step per mini-batch (gradient accumulated
    over micro-batches). Returns a dict: ``sums`` (micro-batch stats summed on the device, float64 tensors),
    ``n_micro``, ``grad_norms`` (device tensors, one per mini-batch), ``skipped`` (non-finite updates),
    ``t_lp`` (clock after the reference / old log-prob forwards) and the trainer's log-probs of the sampling
    policy for the vLLM gap metric (``trainer_old`` when recomputed, else ``first_logp``, the first
    forward's). No host sync per micro-batch: one per optimizer step (the skip decision).
    flowrl.experiments.flowrl_vs_grpo calls it too."""
    B, mask = len(batch), batch.response_mask
    mini = cfg.train.mini_batch_size or B
    micro = min(cfg.train.micro_batch_size, mini)
    n_updates = cfg.train.epochs * (B // mini)
    ref_logp = forward_logp(ref, batch, cfg) if ref is not None else None
    # one update per batch: the policy that sampled is the one being trained, so old log-probs are the
    # first forward's, detached (bit-identical, and one forward pass cheaper); otherwise recompute them.
    # rollout.old_logp="sampler": vLLM's own log-probs instead (the trainer's are still needed for the gap)
    trainer_old = forward_logp(policy, batch, cfg) if n_updates > 1 else None
    old_logp = batch.sampler_logp if cfg.rollout.old_logp == "sampler" else trainer_old
    first_logp = []  # n_updates == 1: the trainer's log-probs of the sampling policy, for the gap metric
    distributed.synchronize(env.device)
    t_lp = time.perf_counter()

    sums, n_micro, grad_norms, skipped = {}, 0, [], 0
    n_toks = mask.reshape(B // mini, -1).sum(1).tolist()  # response tokens per mini-batch
    for _ in range(cfg.train.epochs):
        for lo in range(0, B, mini):
            opt.zero_grad(set_to_none=True)
            n_tok, mini_loss = n_toks[lo // mini], torch.zeros((), dtype=torch.float64, device=env.device)
            for i in range(lo, lo + mini, micro):
                b = batch.slice(i, i + micro)
                out = policy(b.input_ids, b.attention_mask, b.labels, b.prompt_len,
                             temperature=cfg.rollout.temperature, entropy=True)
                old = out["logp"].detach() if old_logp is None else old_logp[i: i + micro]
                if trainer_old is None and batch.sampler_logp is not None:
                    first_logp.append(out["logp"].detach())
                ref_b = None if ref_logp is None else ref_logp[i: i + micro]
                loss, st = algorithms.objective(out, old, ref_b, r_hat[i: i + micro], b.response_mask,
                                                cfg.algo, n_seq=mini, n_tok=n_tok)
                if faults.active("nan_loss", step + 1):
                    loss = loss * float("nan")
                loss.backward()
                mini_loss += loss.detach()
                st["loss"] = loss.detach() * (mini / micro)  # this micro-batch's own mean loss
                st["entropy"] = (out["entropy"].detach() * b.response_mask).sum() / b.response_mask.sum().clamp(min=1)
                for k, v in st.items():  # summed on the device in float64: no sync here
                    v = v.detach() if torch.is_tensor(v) else v
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64, device=env.device)
                n_micro += 1
            grad_norms.append(distributed.clip_grad_norm(policy.parameters(), cfg.optim.grad_clip))
            # a non-finite loss on any rank or a non-finite global norm: no update anywhere (same decision
            # on every rank), and the optimizer state and schedule do not advance either
            if distributed.any_over_ranks(~torch.isfinite(mini_loss + grad_norms[-1])):
                opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            opt.step()
            sched.step()
            if faults.active("nan_param", step + 1):
                next(policy.parameters()).detach().view(-1)[0:1].fill_(float("nan"))
            if not params_finite(policy, env):  # no checkpoint of this step: main() stops before it
                raise TrainingStopped(f"step {step + 1}: an optimizer step left non-finite weights although the loss "
                                      "and gradient norm were finite; the run stops before they are used. Lower "
                                      "optim.lr / logz.lr or check the data.")
    return dict(sums=sums, n_micro=n_micro, grad_norms=grad_norms, skipped=skipped, t_lp=t_lp,
                trainer_old=trainer_old, first_logp=first_logp)


def update_means(up: dict, device) -> dict:
    """update_policy's stats as Python floats, in one host read: each stat's mean over the micro-batches
    and ``grad_norm``, the mean over the optimizer steps of the pre-clipping norm."""
    keys = sorted(up["sums"])
    flat = torch.stack([up["sums"][k] for k in keys]
                       + [g.to(device, torch.float64) for g in up["grad_norms"]]).tolist()
    norms = flat[len(keys):]
    return {**{k: v / up["n_micro"] for k, v in zip(keys, flat)}, "grad_norm": sum(norms) / len(norms)}


def train_step(trainer: Trainer, step: int, *legacy, **legacy_kw) -> dict:
    """Training step ``step`` (0-based): sample trainer.task's prompts of this step, score them, update the
    policy (update_policy), log one record to metrics.jsonl and return it. The old positional call
    ``train_step(step, cfg, env, policy, ref, sampler, task, opt, sched, metrics)`` still works
    (DeprecationWarning)."""
    trainer, step = _trainer_and_step("train_step", trainer, step, legacy, legacy_kw, depth=1)
    _require("train_step", trainer, ("opt", "sched", "task"))
    t = trainer
    cfg, env, policy, ref, sampler, task, opt, sched, metrics = (t.cfg, t.env, t.policy, t.ref, t.sampler, t.task,
                                                                 t.opt, t.sched, t.metrics)
    # host syncs: one per phase boundary (the clocks must see the GPU work of their phase), one per
    # optimizer step (skip or not), one for the token counts and one for the statistics; none per micro-batch
    reset_peak_memory(env.device)  # peak_memory_mb is this step's peak
    t0 = time.perf_counter()
    G = cfg.rollout.group_size
    problems = local_prompts(task, cfg, env, step)
    policy.train()
    batch = sampler.generate(policy, [task.messages(p) for p in problems], n=G,
                             max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                             top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, version=step)
    rewards, task_metrics = score(task, problems, batch.texts, G, cfg, env, f"step {step + 1}")
    rewards = rewards.float()
    r_hat = algorithms.normalized_rewards(rewards, G).to(env.device)
    distributed.synchronize(env.device)
    t_gen = time.perf_counter()
    up = update_policy(step, cfg, env, policy, ref, batch, r_hat, opt, sched)
    trainer_old, mask = up["trainer_old"], batch.response_mask
    distributed.synchronize(env.device)
    t_end = time.perf_counter()

    groups = rewards.view(-1, G)
    tokens = float(batch.attention_mask.sum())
    record = update_means(up, env.device)
    record.update(reward_mean=float(rewards.mean()), reward_sq=float((rewards ** 2).mean()),
                  accuracy=float((rewards >= 1.0).float().mean()),
                  response_len=float(mask.sum(-1).float().mean()),
                  zero_std_groups=algorithms.zero_std_fraction(groups))
    gap = {} if batch.sampler_logp is None else rollout.logp_mismatch(
        batch.sampler_logp, trainer_old if trainer_old is not None else torch.cat(up["first_logp"]), mask)
    record.update({k: v for k, v in gap.items() if k.endswith("_mean")})
    record.update(task_metrics)  # e.g. the code task's tests_passed, sandbox_s
    record = distributed.mean_over_ranks(record, env.device)
    record.update({k: distributed.max_over_ranks(v, env.device) for k, v in gap.items() if k.endswith("_max")})
    if hasattr(sampler, "sync_time"):
        record["time_weight_sync"] = distributed.max_over_ranks(sampler.sync_time, env.device)
    record["skipped"] = up["skipped"]
    record["reward_std"] = max(record.pop("reward_sq") - record["reward_mean"] ** 2, 0.0) ** 0.5
    step_time = distributed.max_over_ranks(t_end - t0, env.device)
    record.update(step=step + 1, lr=sched.get_last_lr()[0], step_time=step_time,
                  time_generate=t_gen - t0, time_logprobs=up["t_lp"] - t_gen, time_update=t_end - up["t_lp"],
                  tokens_per_s=tokens * env.world_size / step_time,
                  peak_memory_mb=distributed.max_over_ranks(peak_memory_mb(env.device), env.device))
    metrics.step(record)
    metrics.samples({"step": step + 1, "question": problems[0].question, "answer": problems[0].answer,
                     "responses": batch.texts[:G], "rewards": rewards[:G].tolist()})
    return record


@torch.no_grad()
def evaluate(trainer: Trainer, step: int, *legacy, **legacy_kw) -> dict:
    """On trainer.eval_task's held-out prompts, k samples each: Avg@k accuracy, pass@k, distinct correct
    answers per solved prompt and answer entropy (flowrl/diversity.py), mean reward, <answer> format rate,
    response length; logged to eval.jsonl as evaluation after training step ``step`` and returned. The old
    call ``evaluate(step, cfg, env, policy, sampler, task, metrics)`` still works (DeprecationWarning)."""
    trainer, step = _trainer_and_step("evaluate", trainer, step, legacy, legacy_kw, depth=2)
    _require("evaluate", trainer, ("eval_task",))
    t = trainer
    cfg, env, policy, sampler, task, metrics = t.cfg, t.env, t.policy, t.sampler, t.eval_task, t.metrics
    k, per_rank = cfg.eval.samples, cfg.eval.prompts // env.world_size
    chunk = max(cfg.rollout.prompts_per_step // env.world_size, 1)
    mine = [task[env.rank * per_rank + j] for j in range(per_rank)]
    # prompts, correct samples, solved prompts, reward, format, length, distinct correct (sum), entropy (sum)
    sums = torch.zeros(8, dtype=torch.float64)
    task_sums, pass_ks = {}, [j for j in (2, 4, 8, 16, 32) if j < k]
    pass_sums = {j: 0.0 for j in pass_ks}
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed + 7 * env.rank + 1)  # the same draws at every evaluation
        for lo in range(0, per_rank, chunk):
            probs = mine[lo: lo + chunk]
            batch = sampler.generate(policy, [task.messages(p) for p in probs], n=k,
                                     max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                                     temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, top_k=0,
                                     version=step)
            r, extra = score(task, probs, batch.texts, k, cfg, env, f"evaluation at step {step}")
            for key, v in extra.items():  # task metrics, weighted by samples (a per-rank mean)
                task_sums[key] = task_sums.get(key, 0.0) + v * len(batch.texts)
            correct = (r >= 1.0).view(-1, k)
            for j in pass_ks:  # unbiased pass@j from k samples (tasks.pass_at_k); pass@1 = accuracy
                pass_sums[j] += sum(tasks.pass_at_k(k, int(c), j) for c in correct.sum(-1))
            answers = [tasks.extract_answer(t) for t in batch.texts]
            answers = [answers[i: i + k] for i in range(0, len(answers), k)]
            n_solved = int(correct.any(-1).sum())
            sums += torch.tensor([len(probs), correct.sum(), n_solved, r.sum(),
                                  sum(a is not None for row in answers for a in row), batch.response_mask.sum(),
                                  diversity.distinct_correct(answers, correct.tolist()) * n_solved,
                                  diversity.answer_entropy(answers) * len(probs)], dtype=torch.float64)
    sums = distributed.all_reduce_sum(sums.to(env.device)).cpu()
    n = max(sums[0].item() * k, 1)
    record = {"step": step, "prompts": int(sums[0]), "samples": k, "accuracy": sums[1].item() / n,
              "pass_at_k": sums[2].item() / max(sums[0].item(), 1), "reward_mean": sums[3].item() / n,
              "format_rate": sums[4].item() / n, "response_len": sums[5].item() / n,
              "distinct_correct": sums[6].item() / max(sums[2].item(), 1),
              "answer_entropy": sums[7].item() / max(sums[0].item(), 1)}
    record.update({f"pass_at_{j}": distributed.all_reduce_sum(torch.tensor([v], dtype=torch.float64, device=env.device)
                                                             ).item() / max(sums[0].item(), 1)
                   for j, v in pass_sums.items()})
    record.update({key: v / max(per_rank * k, 1) for key, v in task_sums.items()})
    metrics.eval(record)
    return record


def prepare_run_dir(cfg: config.Config, env) -> Optional[Path]:
    """Create the run directory; returns the checkpoint to resume from (None = fresh start), verified
    (checkpoint.resume_point: damaged ones are skipped with a warning, or stop the run)."""
    resume = checkpoint.resume_point(cfg.run_dir, cfg.checkpoint.resume, env)
    if env.is_main:
        if cfg.run_dir.exists() and not cfg.run.overwrite and resume is None:
            raise config.ConfigError(f"{cfg.run_dir} exists; pick another --run.name or set --run.overwrite=true.")
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(cfg.run_dir)  # a crash during a checkpoint write leaves a .tmp- folder
        if resume is None:  # a fresh run must not mix its checkpoints with an earlier run's
            shutil.rmtree(cfg.run_dir / checkpoint.SUBDIR, ignore_errors=True)
        config.save(cfg, cfg.run_dir / "config.toml")
    distributed.barrier()
    return resume


def due(step: int, every: int, last: int) -> bool:
    """After training step ``step`` (1-based): every ``every`` steps (0 = never) and after the last."""
    return step == last or (every > 0 and step % every == 0)


def last_good(cfg: config.Config, resume: Optional[Path]) -> str:
    """Where a stopped run can continue from: the newest intact checkpoint (or the one it resumed from)."""
    found = checkpoint.latest(cfg.run_dir) or resume
    if found is not None:
        return str(found)
    if not cfg.checkpoint.every:
        return "none (set checkpoint.every)"
    return f"none yet (checkpoint.every={cfg.checkpoint.every}: no finite step was due for one)"


def main(argv=None) -> None:
    cfg = config.load(argv)  # every config error is raised here, before anything is built
    train_task, eval_task = tasks.build(cfg, "train"), tasks.build(cfg, "eval")  # task.options errors too
    env = distributed.init(cfg.run.cpu_threads, cfg.run.device, cfg.run.deterministic)
    metrics, sampler, graceful, resume = None, None, True, None
    try:
        cfg.check_world(env.world_size)
        resume = prepare_run_dir(cfg, env)
        t_start = time.perf_counter()
        policy, ref, tok = model.build(cfg, env)
        opt, sched = build_optimizer(policy, cfg)
        torch.manual_seed(cfg.run.seed + env.rank)  # ranks sample different responses
        sampler = rollout.build_sampler(cfg, env, tok, model.resolve_path(cfg, env))
        state = {"step": 0, "consecutive_skips": 0, "skipped_total": 0}
        if resume is not None:
            state = checkpoint.load(resume, policy, opt, sched, env)
            if env.is_main:
                print(f"[flowrl] resumed from {resume} (step {state['step']})", flush=True)
        metrics = Metrics(cfg.run_dir, env.is_main, cfg.train.steps, resume_step=state["step"] if resume else None)
        trainer = Trainer(cfg=cfg, env=env, policy=policy, sampler=sampler, metrics=metrics, ref=ref, opt=opt,
                          sched=sched, task=train_task, eval_task=eval_task)
        evals, steps = [], cfg.train.steps
        if cfg.eval.prompts and state["step"] == 0:
            evals.append(evaluate(trainer, 0))
        for step in range(state["step"] + 1, steps + 1):
            record = train_step(trainer, step - 1)
            state["consecutive_skips"] = state["consecutive_skips"] + 1 if record["skipped"] else 0
            state["skipped_total"] += record["skipped"]
            if state["consecutive_skips"] >= cfg.train.max_consecutive_skips:
                raise TrainingStopped(
                    f"{state['consecutive_skips']} consecutive steps (up to step {step}) had a non-finite loss or "
                    f"gradient norm; their updates were skipped and the run stops here. Lower optim.lr or check "
                    "the data.")
            if cfg.eval.prompts and due(step, cfg.eval.every, steps):
                evals.append(evaluate(trainer, step))
            if cfg.checkpoint.every and due(step, cfg.checkpoint.every, steps) and not record["skipped"]:
                state["step"] = step
                checkpoint.save(cfg.run_dir, step, policy, opt, sched, state, env, cfg.checkpoint.keep)
                faults.exit_if("exit_after_checkpoint", step)
        metrics.close()
        if cfg.checkpoint.export:
            checkpoint.export_hf(policy, tok, cfg.run_dir / "export", env)
        if cfg.run.plots and env.is_main:
            from flowrl import plot
            plot.plot_run_or_warn(cfg.run_dir)
    except TrainingStopped as e:  # raised on every rank alike: a clean stop, the checkpoints are kept
        raise TrainingStopped(f"{e} Last good checkpoint: {last_good(cfg, resume)}.") from None
    except BaseException:
        graceful = False
        print(f"[flowrl] rank {env.rank} failed", file=sys.stderr, flush=True)
        raise
    else:
        if env.is_main:
            curve = " -> ".join(f"{e['accuracy']:.3f}" for e in evals)
            print(f"[flowrl] done in {time.perf_counter() - t_start:.0f} s; eval accuracy {curve or 'n/a'}; "
                  f"outputs in {cfg.run_dir}/", flush=True)
    finally:
        if metrics is not None:
            metrics.close()
        distributed.cleanup(graceful, getattr(sampler, "close", None))


if __name__ == "__main__":
    try:
        main()
    except config.ConfigError as e:
        sys.exit(f"config error: {e}")
    except checkpoint.CheckpointError as e:
        sys.exit(f"[flowrl] checkpoint error: {e}")
    except TrainingStopped as e:
        sys.exit(f"[flowrl] stopped: {e}")
