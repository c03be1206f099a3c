"""Does distribution matching keep diversity? FlowRL vs GRPO from one initialization (issue 9).

    PYTHONPATH=$PWD python -m flowrl.experiments.flowrl_vs_grpo tiny        # setting 1: 10 seeds x 2 methods, ~3 min on 2 cores
    PYTHONPATH=$PWD python -m flowrl.experiments.flowrl_vs_grpo countdown   # setting 2: SmolLM2-135M on countdown, 2 seeds, ~80 min
    PYTHONPATH=$PWD python -m flowrl.experiments.flowrl_vs_grpo countdown --steps 1 --seeds 0 --eval-prompts 2   # smoke test

The EXPERIMENT (tasks, exact answer distributions, the training drivers). Not to be confused with
``flowrl/diversity.py``, the answer-diversity METRICS it and the trainer's evaluation share; its tables
and plots are in ``flowrl_vs_grpo_report.py``. ``python -m flowrl.experiments.diversity`` is a
deprecated alias of this module (its name before issue 25).

Writes ``<out>/diversity_<setting>.json`` (every eval record), ``<out>/diversity_<setting>_table.md``
(final metrics, mean ± sample std over seeds) and PNG plots (default out: docs/). Results: docs/diversity.md.

Both methods run through the trainer's own path: ``rollout.generate`` (HF sampling, T=1, no top-k/p),
``Policy.forward`` (flowrl_kernels token log-probs), ``algorithms.objective`` (flowrl_kernels.flowrl_loss /
grpo_loss on the group z-scored reward r_hat), ``train.build_optimizer`` (AdamW, separate log Z group).
One update per rollout batch (importance weight = 1 for both). Same init, prompts, budget per seed.

Setting 1, "tiny": prompt "sum s" -> any k-digit string (leading zeros allowed) whose digits sum to s,
then EOS; reward 1 if so, else 0 (any other token sequence is malformed, reward 0). The initialization is
a 2-layer tiny Llama (char tokenizer) briefly fine-tuned to emit k random digits + EOS from a fixed
*skewed* per-position digit distribution that ignores s: pi_ref knows the format, not the task, and
prefers some valid answers over others. The answer space (10^k strings + one malformed bucket) is
enumerated, so the policy's answer distribution pi(y|x) = prod_t pi(y_t | x, y_<t) (digits then EOS) is
exact, and so are accuracy, pass@k, expected distinct correct answers, answer entropy and
KL(pi || p*) with p*(y|x) ∝ pi_ref(y|x) exp(beta r(x, y)).

Which reward defines p*: the RAW reward r in {0, 1} with the loss's beta (15). FlowRL's loss uses
beta * r_hat with r_hat the group z-score, which is not a function of (x, y) alone (it depends on the
other samples of the group), so it defines no fixed target; and the length-normalized log-probs in the
loss multiply the effective beta by the response length. Every variant gives correct answers exp(>= 15)
~ 3e6 times the relative weight of wrong ones, so all targets are, to < 1e-5 in KL, pi_ref restricted
to the correct answers and renormalized; the raw-reward p* is the paper's definition and the cleanest.

Setting 2, "countdown": SmolLM2-135M-Instruct on reasoning-gym countdown (default 2 numbers 1-9, target
2-30, + - *: the untrained model solves ~1%, and 24 steps lift it to ~35%; with 3 numbers it stays at ~0
for the budget 2 CPU cores allow), sampled metrics only (Avg@n, pass@n, distinct correct expressions
with spaces removed, answer entropy). ``--from-json`` merges seeds run as separate processes.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from flowrl import algorithms, config, distributed, diversity, model, rollout, tasks, train
from flowrl.experiments.flowrl_vs_grpo_report import final, fmt, label, load_runs, parse_schedule, plot, table

MALFORMED = "<malformed>"
# KL(pi || p*) needs p*(y) > 0 wherever pi(y) > 0: the malformed bucket's mass is 1 - sum(enumerated),
# which float rounding can make 0 in one distribution and ~1e-7 in the other; 1e-12 caps that artefact
# at ~1e-6 nats and is far below any real malformed mass (the fine-tuned init has ~1e-3).
MALFORMED_FLOOR = 1e-12
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# setting 1: the digit-sum task, exact answer distributions
# ----------------------------------------------------------------------------------------------------
class DigitSumTask:
    """'sum s' -> a k-digit string with digit sum s, then EOS (in the tiny models' char vocabulary)."""

    def __init__(self, tok, k: int, sums: Sequence[int]):
        self.k, self.sums = k, list(sums)
        self.digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
        self.eos = tok.eos_token_id
        self.answers = ["".join(t) for t in itertools.product("0123456789", repeat=k)]

    def messages(self, s: int) -> List[dict]:
        return [{"role": "user", "content": f"sum {s}"}]

    def correct(self, s: int, answer: Optional[str]) -> bool:
        return answer is not None and answer != MALFORMED and sum(map(int, answer)) == s

    def answer_ids(self, answer: str) -> List[int]:
        return [self.digit_ids[int(c)] for c in answer] + [self.eos]

    def parse(self, response_ids: Sequence[int]) -> Optional[str]:
        """The answer iff the response is exactly k digit tokens then EOS; None (malformed) otherwise."""
        ids = list(response_ids)[: self.k + 1]
        if len(ids) < self.k + 1 or ids[self.k] != self.eos or any(i not in self.digit_ids for i in ids[: self.k]):
            return None
        return "".join(str(self.digit_ids.index(i)) for i in ids[: self.k])


@torch.no_grad()
def answer_distributions(policy, tok, task: DigitSumTask, sums: Sequence[int], *, temperature: float = 1.0,
                         chunk: int = 1024) -> List[Dict[str, float]]:
    """Exact pi(y | 'sum s') for every k-digit y, plus the malformed mass 1 - sum_y pi(y), per s.

    One teacher-forced forward of [prompt | y | EOS] for all S * 10^k rows through ``Policy.forward``
    (the same log-probs the losses see); float64 from the token log-probs on.
    """
    enc = rollout.encode_prompts(tok, [task.messages(s) for s in sums], CPU)
    S, A = len(sums), len(task.answers)
    resp = torch.tensor([task.answer_ids(a) for a in task.answers]).repeat(S, 1)  # [S*A, k+1]
    ids = torch.cat([enc["input_ids"].repeat_interleave(A, 0), resp], 1)
    attn = torch.cat([enc["attention_mask"].repeat_interleave(A, 0), torch.ones_like(resp)], 1)
    P = enc["input_ids"].shape[1]
    logp = torch.cat([policy(ids[i:i + chunk], attn[i:i + chunk], resp[i:i + chunk], P, temperature=temperature,
                             entropy=False)["logp"].double().sum(-1) for i in range(0, S * A, chunk)]).view(S, A)
    probs = logp.exp().tolist()
    dists = []
    for row in probs:
        d = dict(zip(task.answers, row))
        d[MALFORMED] = max(1.0 - sum(row), MALFORMED_FLOOR)
        dists.append(d)
    return dists


def exact_metrics(dists: Sequence[Dict[str, float]], ref_dists: Sequence[Dict[str, float]], task: DigitSumTask,
                  sums: Sequence[int], *, beta: float, n: int) -> Dict[str, float]:
    """Exact per-prompt quantities from enumerated answer distributions, averaged over prompts.

    accuracy = pi(correct); pass@n = 1 - (1 - acc)^n; distinct@n = E[# distinct correct answers in n
    samples | >= 1 correct] = sum_{y correct} (1 - (1 - pi(y))^n) / pass@n (the exact counterpart of
    ``diversity.distinct_correct``); entropy = H(pi) over answers + the malformed bucket (nats, the
    exact ``answer_entropy``); eff_correct = exp H(pi(. | correct)) (effective number of correct
    answers); kl = KL(pi || p*), kl_fwd = KL(p* || pi), p* = diversity.target_distribution(pi_ref, r, beta).
    """
    keys = ("accuracy", "pass_at_n", "distinct_at_n", "entropy", "eff_correct", "kl", "kl_fwd", "malformed")
    acc = {k: [] for k in keys}
    for d, ref, s in zip(dists, ref_dists, sums, strict=True):
        rewards = {y: float(task.correct(s, y)) for y in d}
        target = diversity.target_distribution(ref, rewards, beta)
        corr = [p for y, p in d.items() if rewards[y] > 0]
        a = sum(corr)
        pass_n = 1.0 - (1.0 - a) ** n
        acc["accuracy"].append(a)
        acc["pass_at_n"].append(pass_n)
        acc["distinct_at_n"].append(sum(1.0 - (1.0 - p) ** n for p in corr) / pass_n if pass_n > 0 else 0.0)
        acc["entropy"].append(diversity.entropy(list(d.values())))
        acc["eff_correct"].append(math.exp(diversity.entropy(corr)) if a > 0 else 0.0)
        acc["kl"].append(diversity.kl_divergence(d, target))
        acc["kl_fwd"].append(diversity.kl_divergence(target, d))
        acc["malformed"].append(d[MALFORMED])
    return {"exact_" + k: sum(v) / len(v) for k, v in acc.items()}


def sampled_metrics(answers: List[List[Optional[str]]], correct: List[List[bool]]) -> Dict[str, float]:
    """Avg@n, pass@n, distinct correct (over solved prompts) and answer entropy from n samples per prompt."""
    n_s = sum(len(c) for c in correct)
    return {"accuracy": sum(map(sum, correct)) / max(n_s, 1),
            "pass_at_n": sum(any(c) for c in correct) / max(len(correct), 1),
            "distinct_correct": diversity.distinct_correct(answers, correct),
            "answer_entropy": diversity.answer_entropy(answers)}


def eval_samples(policy, tok, messages: List[list], *, n: int, max_new_tokens: int, seed: int,
                 chunk: Optional[int] = None) -> List[rollout.Batch]:
    """n samples per prompt for the sampled metrics (T=1, no top-k/p): one ``rollout.Batch`` of n rows per
    prompt. Drawn under torch seed 777 + ``seed`` inside ``fork_rng``: every evaluation of a run sees the
    same noise, and the training draws are left untouched. ``chunk`` prompts per ``rollout.generate``
    call (default: all at once)."""
    chunk = chunk or len(messages)
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(777 + seed)
        for lo in range(0, len(messages), chunk):
            part = messages[lo:lo + chunk]
            b = rollout.generate(policy, tok, part, n=n, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                                 top_k=0, device=CPU)
            out += [b.slice(j * n, (j + 1) * n) for j in range(len(part))]
    return out


# ----------------------------------------------------------------------------------------------------
# shared training step (the trainer's own update loop, single process)
# ----------------------------------------------------------------------------------------------------
def rl_step(policy, ref, tok, opt, sched, cfg: config.Config, messages: List[list],
            score: Callable[[rollout.Batch], torch.Tensor], *, raw_reward: bool = False,
            step: int = 0) -> Dict[str, float]:
    """One rollout batch, then ``train.update_policy`` (cfg.train.epochs x mini-batches, old log-probs
    recomputed when that is more than one update): the trainer's loss, stats and update, verbatim."""
    G = cfg.rollout.group_size
    batch = rollout.generate(policy, tok, messages, n=G, max_new_tokens=cfg.rollout.max_new_tokens,
                             temperature=cfg.rollout.temperature, top_p=1.0, top_k=0, device=CPU)
    rewards = score(batch).float()
    # raw_reward ("flowrl-raw"): FlowRL matches pi_ref exp(beta r) with the raw r, a fixed target, instead of
    # the group z-score r_hat (which depends on the rest of the group; all-correct groups get r_hat = 0)
    r_hat = rewards if raw_reward else algorithms.normalized_rewards(rewards, G)
    env = distributed.Env(0, 0, 1, CPU, None)
    up = train.update_policy(step, cfg, env, policy, ref, batch, r_hat, opt, sched)
    groups = rewards.view(-1, G)
    return {**train.update_means(up, CPU), "skipped": up["skipped"], "train_accuracy": float((rewards >= 1).float().mean()),
            "zero_std_groups": algorithms.zero_std_fraction(groups)}


# FlowRL variants (issue 17's ablations): trainer [algo] overrides, and whether the loss sees the raw reward
METHODS = {"flowrl": ({}, False), "grpo": ({}, False), "flowrl-raw": ({}, True),
           "flowrl-noclip": ({"clip": [-1.0, -1.0]}, False),
           "flowrl-seqmean": ({"importance": "sequence_mean"}, False), "flowrl-noweight": ({"importance": "none"}, False),
           "flowrl-beta5": ({"beta": 5.0}, False), "flowrl-beta30": ({"beta": 30.0}, False)}
SUMMARY_KEYS = ("exact_accuracy", "exact_eff_correct", "exact_entropy", "exact_kl", "exact_kl_fwd", "exact_malformed",
                "train_is_clip_low_frac", "train_is_clip_high_frac", "train_is_log_w_abs", "train_delta_abs")
# per-step trainer stats kept in the results (metrics.jsonl names): how off-policy each update was
TRAIN_KEYS = ("is_clip_low_frac", "is_clip_high_frac", "is_log_w_abs", "is_clip_frac", "delta_abs", "grad_norm",
              "train_accuracy")


def make_config(args, algo: str, seed: int, schedule: tuple = (1, 1), **sections) -> config.Config:
    """Trainer config of one run; ``algo`` is a METHODS name (every 'flowrl-*' is the 'flowrl' objective),
    ``schedule`` (epochs, mini-batches per rollout batch)."""
    batch = args.prompts_per_step * args.group_size
    epochs, n_mini = schedule
    if batch % n_mini or (batch // n_mini) % args.group_size:
        raise ValueError(f"--schedules {epochs}x{n_mini}: {n_mini} mini-batches must split the {batch} sequences "
                         f"of a rollout batch into whole groups of {args.group_size}; pick a divisor of "
                         f"--prompts-per-step ({args.prompts_per_step}).")
    data = {"run": {"seed": seed}, "algo": {"name": algo.split("-")[0], "beta": args.beta, **METHODS[algo][0]},
            "optim": {"lr": args.lr, "grad_clip": 1.0}, "logz": {"lr": args.logz_lr},
            "rollout": {"prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                        "max_new_tokens": args.max_new_tokens},
            "train": {"micro_batch_size": args.micro_batch_size, "epochs": epochs,
                      "mini_batch_size": 0 if n_mini == 1 else batch // n_mini}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config.build(data)


def build_policy(cfg: config.Config, lm_state: Optional[dict] = None):
    env = distributed.Env(0, 0, 1, CPU, None)  # single process, no FSDP
    policy, ref, tok = model.build(cfg, env)
    if lm_state is not None:  # the shared initialization (setting 1)
        policy.lm.load_state_dict(lm_state)
        if ref is not None:
            ref.lm.load_state_dict(lm_state)
    return policy, ref, tok


# ----------------------------------------------------------------------------------------------------
# setting 1 driver
# ----------------------------------------------------------------------------------------------------
def digit_weights(k: int, skew: float, seed: int = 1234) -> torch.Tensor:
    """[k, 10] per-position digit probabilities of the fine-tuning data: softmax(skew * N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(skew * torch.randn(k, 10, generator=g, dtype=torch.float64), -1)


def pretrain(args) -> dict:
    """Fine-tune a random tiny Llama to emit k digits (drawn from ``digit_weights``, independent of s) + EOS."""
    cfg = make_config(args, "grpo", 0, model={"path": "tiny-llama", "tiny_layers": args.layers,
                                                "tiny_hidden": args.hidden}, task={"name": "synthetic"})
    policy, _, tok = build_policy(cfg)
    task = DigitSumTask(tok, args.k, args.sums)
    w = digit_weights(args.k, args.skew)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(policy.lm.parameters(), lr=3e-3, weight_decay=0.0)
    enc = rollout.encode_prompts(tok, [task.messages(s) for s in task.sums], CPU)
    P = enc["input_ids"].shape[1]
    for _ in range(args.pretrain_steps):
        rows = torch.randint(len(task.sums), (64,), generator=g)
        digits = torch.stack([torch.multinomial(w[j], 64, replacement=True, generator=g) for j in range(args.k)], 1)
        resp = torch.tensor([[task.digit_ids[d] for d in r] + [task.eos] for r in digits.tolist()])
        ids = torch.cat([enc["input_ids"][rows], resp], 1)
        attn = torch.cat([enc["attention_mask"][rows], torch.ones_like(resp)], 1)
        loss = -policy(ids, attn, resp, P, entropy=False)["logp"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"[diversity] pretrained init: final NLL/token {loss.item():.3f}", flush=True)
    return copy.deepcopy(policy.lm.state_dict())


def run_tiny(args) -> dict:
    t0 = time.perf_counter()
    lm_state = pretrain(args)
    sections = dict(model={"path": "tiny-llama", "tiny_layers": args.layers, "tiny_hidden": args.hidden},
                    task={"name": "synthetic"})
    ref_policy, _, tok = build_policy(make_config(args, "grpo", 0, **sections), lm_state)
    task = DigitSumTask(tok, args.k, args.sums)
    ref_dists = answer_distributions(ref_policy, tok, task, task.sums)
    results = {"setting": "tiny", "args": vars(args), "ref": exact_metrics(ref_dists, ref_dists, task, task.sums,
                                                                         beta=args.beta, n=args.eval_samples),
               "ref_dists": ref_dists, "runs": []}
    print(f"[diversity] pi_ref: {fmt(results['ref'])}", flush=True)
    for schedule, seed, algo in itertools.product(args.schedules, args.seeds, args.methods):
        cfg = make_config(args, algo, seed, schedule, **sections)
        policy, ref, tok = build_policy(cfg, lm_state)
        opt, sched = train.build_optimizer(policy, cfg)
        torch.manual_seed(1000 + seed)  # the rollouts' draws; same stream for both methods at step 0
        per_step = cfg.rollout.prompts_per_step
        order = torch.Generator().manual_seed(seed)
        history = []

        def evaluate(step):
            dists = answer_distributions(policy, tok, task, task.sums)
            rec = {"step": step, **exact_metrics(dists, ref_dists, task, task.sums, beta=args.beta,
                                                 n=args.eval_samples)}
            samples = eval_samples(policy, tok, [task.messages(s) for s in task.sums], n=args.eval_samples,
                                   max_new_tokens=cfg.rollout.max_new_tokens, seed=seed)
            answers = [[task.parse(r) for r in b.input_ids[:, b.prompt_len:].tolist()] for b in samples]
            correct = [[task.correct(s, a) for a in row] for s, row in zip(task.sums, answers)]
            history.append({**rec, **sampled_metrics(answers, correct)})
            return dists

        evaluate(0)
        window, steps_all = [], []
        for step in range(args.steps):
            idx = torch.randint(len(task.sums), (per_step,), generator=order).tolist()
            sums = [task.sums[i] for i in idx]

            def score(batch, sums=sums):
                G = cfg.rollout.group_size
                resp = batch.input_ids[:, batch.prompt_len:].tolist()
                return torch.tensor([float(task.correct(sums[i // G], task.parse(r))) for i, r in enumerate(resp)])

            st = rl_step(policy, ref, tok, opt, sched, cfg, [task.messages(s) for s in sums], score,
                         raw_reward=METHODS[algo][1], step=step)
            window.append(st)
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                dists = evaluate(step + 1)
                history[-1].update(train_means(window))  # trainer stats over the steps since the last eval
                steps_all += window
                window = []
        results["runs"].append({"algo": algo, "seed": seed, "schedule": "x".join(map(str, schedule)),
                                "history": history, "train_mean": train_means(steps_all), "final_dists": dists})
        print(f"[diversity] {label(results['runs'][-1])} seed {seed} ({time.perf_counter() - t0:.0f} s): "
              f"{fmt(history[-1])}", flush=True)
    return results


def train_means(steps: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean over training steps of each TRAIN_KEYS stat the method logs, prefixed 'train_'."""
    keys = [k for k in TRAIN_KEYS if steps and k in steps[0]]
    return {"train_" + k: sum(st[k] for st in steps) / len(steps) for k in keys}


# ----------------------------------------------------------------------------------------------------
# setting 2 driver
# ----------------------------------------------------------------------------------------------------
def run_countdown(args) -> dict:
    t0 = time.perf_counter()
    sections = dict(model={"path": "smollm2-135m-instruct"},
                    task={"name": "countdown", "size": 2000, "seed": 0,
                          "options": {"min_numbers": args.numbers, "max_numbers": args.numbers, "min_value": 1,
                                      "max_value": 9, "min_target": 2, "max_target": args.max_target,
                                      "operators": ["+", "-", "*"]}},
                    eval={"prompts": args.eval_prompts})
    results = {"setting": "countdown", "args": vars(args), "runs": []}
    for schedule, seed, algo in itertools.product(args.schedules, args.seeds, args.methods):
        cfg = make_config(args, algo, seed, schedule, **sections)
        policy, ref, tok = build_policy(cfg)
        opt, sched = train.build_optimizer(policy, cfg)
        env = distributed.Env(0, 0, 1, CPU, None)
        train_task, eval_task = tasks.build(cfg, "train"), tasks.build(cfg, "eval")
        torch.manual_seed(1000 + seed)
        history = []

        def evaluate(step):
            probs = [eval_task[i] for i in range(args.eval_prompts)]
            samples = eval_samples(policy, tok, [eval_task.messages(p) for p in probs], n=args.eval_samples,
                                   max_new_tokens=cfg.rollout.max_new_tokens, seed=seed, chunk=4)
            # expressions that differ only in spacing are one answer
            answers = [[None if (a := tasks.extract_answer(t)) is None else "".join(a.split()) for t in b.texts]
                       for b in samples]
            correct = [[eval_task.reward(p, t) >= 1.0 for t in b.texts] for p, b in zip(probs, samples)]
            history.append({"step": step, **sampled_metrics(answers, correct)})

        evaluate(0)
        for step in range(args.steps):
            problems = train.local_prompts(train_task, cfg, env, step)

            def score(batch, problems=problems):
                G = cfg.rollout.group_size
                return torch.tensor([train_task.reward(problems[i // G], t) for i, t in enumerate(batch.texts)])

            st = rl_step(policy, ref, tok, opt, sched, cfg, [train_task.messages(p) for p in problems], score,
                         raw_reward=METHODS[algo][1], step=step)
            print(f"[diversity] {algo} {schedule} seed {seed} step {step + 1}: {fmt(st)}", flush=True)
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                evaluate(step + 1)
        results["runs"].append({"algo": algo, "seed": seed, "schedule": "x".join(map(str, schedule)),
                                "history": history})
        print(f"[diversity] {label(results['runs'][-1])} seed {seed} ({time.perf_counter() - t0:.0f} s): "
              f"{fmt(history[-1])}", flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("setting", choices=["tiny", "countdown"])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="tiny: 0..9 (10 seeds, ~3 min on 2 idle cores), countdown: 0 1 (~40 min per seed)")
    p.add_argument("--methods", nargs="+", default=["flowrl", "grpo"], choices=list(METHODS),
                   help="flowrl-raw: the FlowRL loss on the raw reward r instead of the group z-score r_hat "
                        "(an ablation: its trajectory-balance target is exactly p*); flowrl-noclip: unclipped "
                        "importance weights; flowrl-seqmean: the per-token-mean ratio (GSPO), same clip; "
                        "flowrl-noweight: no importance weights (w = 1); "
                        "flowrl-beta5 / -beta30: loss beta 5 / 30 (p* of the metrics keeps --beta)")
    p.add_argument("--schedules", nargs="+", type=parse_schedule, default=[(1, 1)], metavar="ExM",
                   help="update schedules: E epochs over each rollout batch, M mini-batches each (E * M optimizer "
                        "updates per rollout batch; the rollout budget is the same). Default 1x1: on-policy")
    p.add_argument("--steps", type=int, default=None, help="tiny: 300, countdown: 24")
    p.add_argument("--lr", type=float, default=None, help="policy lr (tiny: 5e-4, countdown: 2e-5)")
    p.add_argument("--logz-lr", type=float, default=None, help="log Z head lr (tiny: 1e-2, countdown: 1e-3)")
    p.add_argument("--beta", type=float, default=15.0)
    p.add_argument("--prompts-per-step", type=int, default=None, help="tiny: 8, countdown: 4")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="tiny: k + 1, countdown: 24")
    p.add_argument("--micro-batch-size", type=int, default=None, help="tiny: 64, countdown: 8")
    p.add_argument("--eval-every", type=int, default=None, help="tiny: 25, countdown: 8")
    p.add_argument("--eval-samples", type=int, default=None, help="samples per eval prompt (tiny: 16, countdown: 8)")
    p.add_argument("--eval-prompts", type=int, default=16, help="countdown: held-out prompts per eval")
    p.add_argument("--numbers", type=int, default=2, help="countdown: source numbers per puzzle (1-9 each)")
    p.add_argument("--max-target", type=int, default=30, help="countdown: largest target (smallest: 2)")
    p.add_argument("--k", type=int, default=2, help="tiny: answer length (digits)")
    p.add_argument("--sums", type=int, nargs="+", default=[5, 7, 9, 11, 13], help="tiny: target digit sums")
    p.add_argument("--skew", type=float, default=1.0, help="tiny: skew of the init's digit distribution")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--out", default="docs", help="folder for the JSON, table and PNGs")
    p.add_argument("--name", default=None, help="output file stem diversity_<name> (default: the setting)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="train nothing: merge saved diversity_<setting>.json files (e.g. one per seed) and "
                        "write the table, plots and merged JSON to --out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = p.parse_args(argv)
    tiny = a.setting == "tiny"
    defaults = dict(seeds=list(range(10)) if tiny else [0, 1], steps=300 if tiny else 24,
                    lr=5e-4 if tiny else 2e-5, logz_lr=1e-2 if tiny else 1e-3,
                    prompts_per_step=8 if tiny else 4, max_new_tokens=a.k + 1 if tiny else 24,
                    micro_batch_size=64 if tiny else 8, eval_every=25 if tiny else 8,
                    eval_samples=16 if tiny else 8)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.name = a.name or a.setting
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.from_json:
        results = load_runs(args.from_json, args.setting)
    else:
        results = run_tiny(args) if args.setting == "tiny" else run_countdown(args)
        # provenance: a torch-kernel rerun is a fresh draw of the float rounding (docs/diversity.md)
        results.update(wall_s=time.perf_counter() - t0, threads=torch.get_num_threads(),
                       kernels_impl=os.environ.get("FLOWRL_KERNELS_IMPL", "default"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(results)
    (out / f"diversity_{args.name}_table.md").write_text(md + "\n")
    print(md, flush=True)
    if args.setting == "tiny":  # the columns docs/diversity.md quotes
        summary = table(results, [k for k in SUMMARY_KEYS if any(k in final(r) for r in results["runs"])], "all")
        (out / f"diversity_{args.name}_summary.md").write_text(summary + "\n")
    if not args.no_plots:
        for path in plot(results, out, args.name):
            print(f"[diversity] wrote {path}", flush=True)
    # keep the committed JSON small: the full distributions only for the histogram's prompt
    if "ref_dists" in results and "hist_prompt" not in results:
        j = len(args.sums) // 2
        results["hist_prompt"] = args.sums[j]
        results["ref_dists"] = [results["ref_dists"][j]]
        for r in results["runs"]:
            r["final_dists"] = [r["final_dists"][j]]
    (out / f"diversity_{args.name}.json").write_text(json.dumps(results, indent=None))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
