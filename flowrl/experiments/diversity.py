"""Does distribution matching keep diversity? FlowRL vs GRPO from one initialization (issue 9).

    PYTHONPATH=$PWD python -m flowrl.experiments.diversity tiny        # setting 1: 10 seeds x 2 methods, ~3 min on 2 cores
    PYTHONPATH=$PWD python -m flowrl.experiments.diversity countdown   # setting 2: SmolLM2-135M on countdown, 2 seeds, ~80 min
    PYTHONPATH=$PWD python -m flowrl.experiments.diversity countdown --steps 1 --seeds 0 --eval-prompts 2   # smoke test

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
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from flowrl import algorithms, config, distributed, diversity, model, rollout, tasks, train

MALFORMED = "<malformed>"
# KL(pi || p*) needs p*(y) > 0 wherever pi(y) > 0: the malformed bucket's mass is 1 - sum(enumerated),
# which float rounding can make 0 in one distribution and ~1e-7 in the other; 1e-12 caps that artefact
# at ~1e-6 nats and is far below any real malformed mass (the fine-tuned init has ~1e-3).
MALFORMED_FLOOR = 1e-12
CPU = torch.device("cpu")
COLORS = {"flowrl": "tab:blue", "grpo": "tab:red", "flowrl-raw": "tab:green"}


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


# ----------------------------------------------------------------------------------------------------
# shared training step (the trainer's pieces, single process, one update per rollout batch)
# ----------------------------------------------------------------------------------------------------
def rl_step(policy, ref, tok, opt, sched, cfg: config.Config, messages: List[list],
            score: Callable[[rollout.Batch], torch.Tensor], *, raw_reward: bool = False) -> Dict[str, float]:
    G = cfg.rollout.group_size
    batch = rollout.generate(policy, tok, messages, n=G, max_new_tokens=cfg.rollout.max_new_tokens,
                             temperature=cfg.rollout.temperature, top_p=1.0, top_k=0, device=CPU)
    rewards = score(batch).float()
    # raw_reward ("flowrl-raw"): FlowRL matches pi_ref exp(beta r) with the raw r, a fixed target, instead of
    # the group z-score r_hat (which depends on the rest of the group; all-correct groups get r_hat = 0)
    r_hat = rewards if raw_reward else algorithms.normalized_rewards(rewards, G)
    ref_logp = train.forward_logp(ref, batch, cfg) if ref is not None else None
    B, mask, mb = len(batch), batch.response_mask, cfg.train.micro_batch_size
    n_tok = int(mask.sum())
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(0, B, mb):
        b = batch.slice(i, i + mb)
        out = policy(b.input_ids, b.attention_mask, b.labels, b.prompt_len, temperature=cfg.rollout.temperature,
                     entropy=False)
        ref_b = None if ref_logp is None else ref_logp[i: i + mb]
        # one update per batch: the sampling policy is the one being trained, old log-probs = detached logp
        loss, _ = algorithms.objective(out, out["logp"].detach(), ref_b, r_hat[i: i + mb], b.response_mask,
                                       cfg.algo, n_seq=B, n_tok=n_tok)
        loss.backward()
        total += float(loss.detach())
    gn = distributed.clip_grad_norm(policy.parameters(), cfg.optim.grad_clip)
    opt.step()
    sched.step()
    groups = rewards.view(-1, G)
    return {"loss": total, "grad_norm": gn, "train_accuracy": float((rewards >= 1).float().mean()),
            "zero_std_groups": float((groups.max(-1).values == groups.min(-1).values).float().mean())}


def make_config(args, algo: str, seed: int, **sections) -> config.Config:
    """Trainer config of one run; ``algo`` is a method name ('flowrl-raw' is the 'flowrl' objective)."""
    data = {"run": {"seed": seed}, "algo": {"name": algo.split("-")[0], "beta": args.beta},
            "optim": {"lr": args.lr, "grad_clip": 1.0}, "logz": {"lr": args.logz_lr},
            "rollout": {"prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                        "max_new_tokens": args.max_new_tokens},
            "train": {"micro_batch_size": args.micro_batch_size}}
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
    for seed in args.seeds:
        for algo in args.methods:
            cfg = make_config(args, algo, seed, **sections)
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
                with torch.random.fork_rng():
                    torch.manual_seed(777 + seed)
                    b = rollout.generate(policy, tok, [task.messages(s) for s in task.sums], n=args.eval_samples,
                                         max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0, top_p=1.0,
                                         top_k=0, device=CPU)
                ans = [task.parse(r) for r in b.input_ids[:, b.prompt_len:].tolist()]
                n = args.eval_samples
                answers = [ans[i * n:(i + 1) * n] for i in range(len(task.sums))]
                correct = [[task.correct(s, a) for a in row] for s, row in zip(task.sums, answers)]
                rec.update(sampled_metrics(answers, correct))
                history.append(rec)
                return dists

            evaluate(0)
            for step in range(args.steps):
                idx = torch.randint(len(task.sums), (per_step,), generator=order).tolist()
                sums = [task.sums[i] for i in idx]

                def score(batch, sums=sums):
                    G = cfg.rollout.group_size
                    resp = batch.input_ids[:, batch.prompt_len:].tolist()
                    return torch.tensor([float(task.correct(sums[i // G], task.parse(r))) for i, r in enumerate(resp)])

                rl_step(policy, ref, tok, opt, sched, cfg, [task.messages(s) for s in sums], score,
                        raw_reward=algo == "flowrl-raw")
                if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                    dists = evaluate(step + 1)
            results["runs"].append({"algo": algo, "seed": seed, "history": history, "final_dists": dists})
            print(f"[diversity] {algo} seed {seed} ({time.perf_counter() - t0:.0f} s): {fmt(history[-1])}", flush=True)
    return results


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
    for seed in args.seeds:
        for algo in args.methods:
            cfg = make_config(args, algo, seed, **sections)
            policy, ref, tok = build_policy(cfg)
            opt, sched = train.build_optimizer(policy, cfg)
            env = distributed.Env(0, 0, 1, CPU, None)
            train_task, eval_task = tasks.build(cfg, "train"), tasks.build(cfg, "eval")
            torch.manual_seed(1000 + seed)
            history = []

            def evaluate(step):
                probs = [eval_task[i] for i in range(args.eval_prompts)]
                n = args.eval_samples
                answers, correct = [], []
                with torch.random.fork_rng():
                    torch.manual_seed(777 + seed)
                    for lo in range(0, len(probs), 4):
                        chunk = probs[lo: lo + 4]
                        b = rollout.generate(policy, tok, [eval_task.messages(p) for p in chunk], n=n,
                                             max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0,
                                             top_p=1.0, top_k=0, device=CPU)
                        for j, p in enumerate(chunk):
                            texts = b.texts[j * n:(j + 1) * n]
                            # expressions that differ only in spacing are one answer
                            answers.append([None if (a := tasks.extract_answer(t)) is None else "".join(a.split())
                                            for t in texts])
                            correct.append([eval_task.reward(p, t) >= 1.0 for t in texts])
                history.append({"step": step, **sampled_metrics(answers, correct)})

            evaluate(0)
            for step in range(args.steps):
                problems = train.local_prompts(train_task, cfg, env, step)

                def score(batch, problems=problems):
                    G = cfg.rollout.group_size
                    return torch.tensor([train_task.reward(problems[i // G], t) for i, t in enumerate(batch.texts)])

                st = rl_step(policy, ref, tok, opt, sched, cfg, [train_task.messages(p) for p in problems], score,
                             raw_reward=algo == "flowrl-raw")
                print(f"[diversity] {algo} seed {seed} step {step + 1}: {fmt(st)}", flush=True)
                if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                    evaluate(step + 1)
            results["runs"].append({"algo": algo, "seed": seed, "history": history})
            print(f"[diversity] {algo} seed {seed} ({time.perf_counter() - t0:.0f} s): {fmt(history[-1])}", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------
def fmt(rec: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in rec.items() if isinstance(v, (int, float)) and k != "step")


def table(results: dict) -> str:
    """Markdown: final-step metrics, mean ± sample std over seeds, one row per method (+ pi_ref)."""
    keys = [k for k in results["runs"][0]["history"][-1] if k != "step"]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    if "ref" in results:
        ref = results["ref"]
        lines.append("| pi_ref (init) | " + " | ".join(f"{ref[k]:.3f}" if k in ref else "" for k in keys) + " |")
    for algo in dict.fromkeys(r["algo"] for r in results["runs"]):
        finals = [r["history"][-1] for r in results["runs"] if r["algo"] == algo]
        cells = []
        for k in keys:
            v = [f[k] for f in finals]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} ± {sd:.3f}")
        lines.append(f"| {algo} (n={len(finals)}) | " + " | ".join(cells) + " |")
    # Both methods share each seed's init, prompt order and log Z init, so the per-seed difference is the
    # sharper comparison: mean ± standard error of (method - grpo), and in how many seeds the method is higher.
    by_seed = {(r["algo"], r["seed"]): r["history"][-1] for r in results["runs"]}
    for algo in dict.fromkeys(r["algo"] for r in results["runs"]):
        seeds = [s for s in dict.fromkeys(r["seed"] for r in results["runs"])
                 if algo != "grpo" and (algo, s) in by_seed and ("grpo", s) in by_seed]
        if len(seeds) < 2:
            continue
        cells = []
        for k in keys:
            d = [by_seed[algo, s][k] - by_seed["grpo", s][k] for s in seeds]
            se = statistics.stdev(d) / math.sqrt(len(d))
            cells.append(f"{statistics.mean(d):+.3f} ± {se:.3f} ({sum(x > 0 for x in d)}/{len(d)})")
        lines.append(f"| {algo} - grpo, paired (mean ± s.e., # seeds > 0) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, out: Path, name: str) -> List[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ([("exact_accuracy", "accuracy (exact)"), ("exact_eff_correct", "effective # correct answers (exact)"),
             ("exact_kl", "KL(pi || p*) (exact, nats)"), ("distinct_correct", "distinct correct / 16 samples")]
            if name == "tiny" else
            [("accuracy", "Avg@n"), ("pass_at_n", "pass@n"), ("distinct_correct", "distinct correct"),
             ("answer_entropy", "answer entropy (nats)")])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, (k, title) in zip(axes, keys):
        for algo in dict.fromkeys(r["algo"] for r in results["runs"]):
            hs = [r["history"] for r in results["runs"] if r["algo"] == algo]
            steps = [h["step"] for h in hs[0]]
            vals = torch.tensor([[h[k] for h in hist] for hist in hs], dtype=torch.float64)
            m = vals.mean(0)
            sd = vals.std(0) if len(hs) > 1 else torch.zeros_like(m)
            ax.plot(steps, m, color=COLORS.get(algo), label=f"{algo} (mean of {len(hs)})")
            ax.fill_between(steps, m - sd, m + sd, color=COLORS.get(algo), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if k == "exact_kl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths = [out / f"diversity_{name}_curves.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    if name == "tiny":
        paths.append(histogram(results, out, plt))
    return paths


def histogram(results: dict, out: Path, plt) -> Path:
    """Answer distribution over the correct answers of one prompt: target p*, FlowRL and GRPO (first seed)."""
    args = results["args"]
    if "hist_prompt" in results:  # loaded from a saved JSON: only the histogram prompt's dists are kept
        j, s = 0, results["hist_prompt"]
    else:
        j = len(args["sums"]) // 2
        s = args["sums"][j]
    ref = results["ref_dists"][j]
    correct = [y for y in ref if y != "<malformed>" and sum(map(int, y)) == s]
    z = sum(ref[y] for y in correct)
    correct.sort(key=lambda y: -ref[y])
    seed = args["seeds"][0]
    series = [("p* ~ pi_ref(.|correct)", [ref[y] / z for y in correct], "0.5")]
    for r in results["runs"]:
        if r["seed"] == seed:
            d = r["final_dists"][j]
            series.append((f"{r['algo']} (acc {sum(d[y] for y in correct):.2f})", [d[y] for y in correct],
                           COLORS.get(r["algo"])))
    fig, ax = plt.subplots(figsize=(max(6, 0.13 * len(correct) * len(series)), 3.4))
    w = 0.8 / len(series)
    for i, (label, v, c) in enumerate(series):
        ax.bar([x + i * w for x in range(len(correct))], v, width=w, label=label, color=c)
    ax.set_xticks([x + 0.4 - w / 2 for x in range(len(correct))])
    ax.set_xticklabels(correct, rotation=90, fontsize=6)
    ax.set_ylabel("probability")
    ax.set_title(f"prompt 'sum {s}': probability of each correct answer (seed {seed}, final step)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "diversity_tiny_hist.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("setting", choices=["tiny", "countdown"])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="tiny: 0..9 (10 seeds, ~3 min on 2 idle cores), countdown: 0 1 (~40 min per seed)")
    p.add_argument("--methods", nargs="+", default=["flowrl", "grpo"], choices=["flowrl", "grpo", "flowrl-raw"],
                   help="flowrl-raw: the FlowRL loss on the raw reward r instead of the group z-score r_hat "
                        "(an ablation: its trajectory-balance target is exactly p*)")
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
    return a


def load_runs(paths: Sequence[str], setting: str) -> dict:
    """Merge saved ``diversity_<setting>.json`` files (e.g. seeds run as separate processes) into one
    result: the runs concatenated in file order, everything else from the first file."""
    merged = None
    for path in paths:
        res = json.loads(Path(path).read_text())
        if res.get("setting") != setting:
            raise ValueError(f"--from-json {path}: setting {res.get('setting')!r}, expected {setting!r}.")
        if merged is None:
            merged = res
            merged["args"]["seeds"] = [r["seed"] for r in res["runs"]]
            continue
        have = {(r["algo"], r["seed"]) for r in merged["runs"]}
        for r in res["runs"]:
            if (r["algo"], r["seed"]) in have:
                raise ValueError(f"--from-json {path}: {r['algo']} seed {r['seed']} is already in an earlier file.")
            merged["runs"].append(r)
            merged["args"]["seeds"] = list(dict.fromkeys(merged["args"]["seeds"] + [r["seed"]]))
    return merged


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        results = load_runs(args.from_json, args.setting)
    else:
        results = run_tiny(args) if args.setting == "tiny" else run_countdown(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(results)
    (out / f"diversity_{args.setting}_table.md").write_text(md + "\n")
    print(md, flush=True)
    if not args.no_plots:
        for path in plot(results, out, args.setting):
            print(f"[diversity] wrote {path}", flush=True)
    # keep the committed JSON small: the full distributions only for the histogram's prompt
    if "ref_dists" in results and "hist_prompt" not in results:
        j = len(args.sums) // 2
        results["hist_prompt"] = args.sums[j]
        results["ref_dists"] = [results["ref_dists"][j]]
        for r in results["runs"]:
            r["final_dists"] = [r["final_dists"][j]]
    (out / f"diversity_{args.setting}.json").write_text(json.dumps(results, indent=None))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
