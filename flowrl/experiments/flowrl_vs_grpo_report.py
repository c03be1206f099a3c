"""Reporting of the FlowRL-vs-GRPO experiment (``flowrl/experiments/flowrl_vs_grpo.py``): no training here.

Reading saved results back (``load_runs``), the names of runs (method and update schedule), the
seed-paired statistics (``t_quantile``, ``t_interval``, ``paired``, ``contrasts``), the markdown tables
(``table``) and the plots (``plot``, ``plot_schedules``, ``histogram``). The experiment's ``main`` writes
them after a run or for ``--from-json``; ``flowrl/experiments/offpolicy_report.py`` pools several seed
draws with the same helpers. The answer-diversity metrics themselves are ``flowrl/diversity.py``.

Run records, as the experiment saves them: ``{"algo", "seed", "schedule" ("ExM"), "history": [eval
record per evaluation, {"step", metric: value}], "train_mean": {"train_<stat>": mean over all steps}}``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

COLORS = {"flowrl": "tab:blue", "grpo": "tab:red", "flowrl-raw": "tab:green", "flowrl-noclip": "tab:orange",
          "flowrl-seqmean": "tab:purple", "flowrl-beta5": "tab:olive", "flowrl-beta30": "tab:cyan",
          "flowrl-noweight": "tab:brown"}
LINESTYLES = ("-", "--", "-.", ":")


# ----------------------------------------------------------------------------------------------------
# runs: their names, their final metrics, saved results read back
# ----------------------------------------------------------------------------------------------------
def parse_schedule(text: str) -> tuple:
    """'ExM' -> (epochs E, mini-batches per rollout batch M): E * M optimizer updates per rollout batch."""
    try:
        e, m = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"schedule {text!r}: write EPOCHSxMINIBATCHES, e.g. 4x2") from None
    if e < 1 or m < 1:
        raise argparse.ArgumentTypeError(f"schedule {text!r}: epochs and mini-batches must be >= 1")
    return e, m


def schedule_of(run: dict) -> str:
    return run.get("schedule", "1x1")  # runs saved before issue 17 made one update per batch


def label(run: dict) -> str:
    return run["algo"] if schedule_of(run) == "1x1" else f"{run['algo']} {schedule_of(run)}"


def fmt(rec: Dict[str, float]) -> str:
    """One log line of a record's numbers (3 significant digits), its step left out."""
    return " ".join(f"{k}={v:.3g}" for k, v in rec.items() if isinstance(v, (int, float)) and k != "step")


def final(run: dict) -> Dict[str, float]:
    """A run's result: its last evaluation, with the trainer stats averaged over all of its steps."""
    rec = {k: v for k, v in run["history"][-1].items() if k != "step" and not k.startswith("train_")}
    return {**rec, **run.get("train_mean", {})}


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
        have = {(r["algo"], schedule_of(r), r["seed"]) for r in merged["runs"]}
        for r in res["runs"]:
            if (r["algo"], schedule_of(r), r["seed"]) in have:
                raise ValueError(f"--from-json {path}: {label(r)} seed {r['seed']} is already in an earlier file.")
            merged["runs"].append(r)
            merged["args"]["seeds"] = list(dict.fromkeys(merged["args"]["seeds"] + [r["seed"]]))
    return merged


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------
def t_quantile(df: int, q: float = 0.975) -> float:
    """Student-t quantile (df >= 1) by bisection on the CDF, the CDF by Simpson's rule on the density
    (no scipy here); |error| < 1e-6 for 0.5 <= q < 0.9995 (df 9, q 0.975: 2.2622)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf_above_half(x: float, n: int = 2000) -> float:  # P(T <= x) - 1/2 for x >= 0
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf_above_half(hi) < q - 0.5:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_above_half(mid) < q - 0.5 else (lo, mid)
    return (lo + hi) / 2


def t_interval(diffs: Sequence[float], level: float = 0.95, *,
               mean: Callable[[Sequence[float]], float] = statistics.fmean) -> Dict[str, float]:
    """Mean, standard error and the two-sided t-interval (n - 1 d.o.f.) of ``diffs``, and # > 0.

    n = 1 gives an infinite interval (no spread to estimate), n = 0 a ValueError. ``mean``: fmean (the
    pooled report's) or statistics.mean (correctly rounded; ``paired``'s): they differ by 1 ulp in ~1 of 5
    draws, which is enough to flip a printed digit (-0.292 vs -0.293 in the committed
    docs/diversity_tiny_offpolicy_table.md), so each report keeps the one its saved outputs were made with."""
    n = len(diffs)
    if n == 0:
        raise ValueError("t_interval: no differences (no seed holds both cells); run the missing cells first.")
    m = mean(diffs)
    if n == 1:
        return {"n": 1, "mean": m, "se": math.inf, "lo": -math.inf, "hi": math.inf, "pos": int(diffs[0] > 0)}
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = t_quantile(n - 1, 0.5 + level / 2) * se
    return {"n": n, "mean": m, "se": se, "lo": m - half, "hi": m + half, "pos": sum(d > 0 for d in diffs)}


def paired(diffs: Sequence[float]) -> str:
    """'mean ± s.e. [95% t-interval] (# > 0 / n)' of ``t_interval(diffs)``, in bold where the interval
    excludes 0."""
    s = t_interval(diffs, mean=statistics.mean)
    cell = f"{s['mean']:+.3f} ± {s['se']:.3f} [{s['lo']:+.3f}, {s['hi']:+.3f}] ({s['pos']}/{s['n']})"
    return f"**{cell}**" if s["lo"] > 0 or s["hi"] < 0 else cell


def contrasts(groups: Sequence[tuple], kind: str = "grpo") -> List[tuple]:
    """Pairs ((schedule, method), (schedule, baseline)) of the (schedule, method) groups present.

    kind 'grpo': every method against GRPO at its schedule. 'all' adds every FlowRL variant against
    plain FlowRL at its schedule (what clipping, the GSPO ratio, beta change) and every method at each
    off-policy schedule against itself on-policy (1x1: what the extra updates change)."""
    have = set(groups)
    pairs = [(g, (g[0], "grpo")) for g in groups if g[1] != "grpo" and (g[0], "grpo") in have]
    if kind == "all":
        pairs += [(g, (g[0], "flowrl")) for g in groups if g[1] not in ("flowrl", "grpo") and (g[0], "flowrl") in have]
        pairs += [(g, ("1x1", g[1])) for g in groups if g[0] != "1x1" and ("1x1", g[1]) in have]
    return pairs


# ----------------------------------------------------------------------------------------------------
# tables and plots
# ----------------------------------------------------------------------------------------------------
def table(results: dict, keys: Optional[Sequence[str]] = None, kind: str = "grpo") -> str:
    """Markdown: final metrics, mean ± sample std over seeds, one row per method and update schedule
    (+ pi_ref), then seed-paired differences (``contrasts(kind)``; default: each method - GRPO)."""
    runs = results["runs"]
    if keys is None:
        keys = list(dict.fromkeys(k for r in runs for k in final(r)))
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    if "ref" in results:
        ref = results["ref"]
        lines.append("| pi_ref (init) | " + " | ".join(f"{ref[k]:.3f}" if k in ref else "" for k in keys) + " |")
    groups = list(dict.fromkeys((schedule_of(r), r["algo"]) for r in runs))
    by_seed = {(schedule_of(r), r["algo"], r["seed"]): final(r) for r in runs}
    name = {g: label({"schedule": g[0], "algo": g[1]}) for g in groups}
    for g in groups:
        finals = [f for (sch, algo, _), f in by_seed.items() if (sch, algo) == g]
        cells = []
        for k in keys:
            v = [f[k] for f in finals if k in f]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} ± {sd:.3f}" if v else "")
        lines.append(f"| {name[g]} (n={len(finals)}) | " + " | ".join(cells) + " |")
    # Every run of one seed shares the init, the prompt order and the log Z init, so the per-seed difference
    # is the sharper comparison: mean ± standard error of (a - b), its 95% t-interval (n - 1 degrees of
    # freedom) and in how many seeds a is higher.
    for a, b in contrasts(groups, kind):
        seeds = [sd for (sch, algo, sd) in by_seed if (sch, algo) == a and (*b, sd) in by_seed]
        if len(seeds) < 2:
            continue
        cells = []
        for k in keys:
            d = [by_seed[(*a, sd)][k] - by_seed[(*b, sd)][k] for sd in seeds
                 if k in by_seed[(*a, sd)] and k in by_seed[(*b, sd)]]
            cells.append(paired(d) if len(d) == len(seeds) else "")
        lines.append(f"| {name[a]} - {name[b]}, paired (mean ± s.e. [95% t-interval], # seeds > 0) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, out: Path, name: str) -> List[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ([("exact_accuracy", "accuracy (exact)"), ("exact_eff_correct", "effective # correct answers (exact)"),
             ("exact_kl", "KL(pi || p*) (exact, nats)"), ("distinct_correct", "distinct correct / 16 samples")]
            if results["setting"] == "tiny" else
            [("accuracy", "Avg@n"), ("pass_at_n", "pass@n"), ("distinct_correct", "distinct correct"),
             ("answer_entropy", "answer entropy (nats)")])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    schedules = list(dict.fromkeys(schedule_of(r) for r in results["runs"]))
    for ax, (k, title) in zip(axes, keys):
        for lab in dict.fromkeys(label(r) for r in results["runs"]):
            runs = [r for r in results["runs"] if label(r) == lab]
            hs = [r["history"] for r in runs]
            steps = [h["step"] for h in hs[0]]
            vals = torch.tensor([[h[k] for h in hist] for hist in hs], dtype=torch.float64)
            m = vals.mean(0)
            sd = vals.std(0) if len(hs) > 1 else torch.zeros_like(m)
            color, style = COLORS.get(runs[0]["algo"]), LINESTYLES[schedules.index(schedule_of(runs[0])) % 4]
            ax.plot(steps, m, color=color, linestyle=style, label=f"{lab} (mean of {len(hs)})")
            if len(schedules) == 1:  # bands only where they stay readable
                ax.fill_between(steps, m - sd, m + sd, color=color, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if k == "exact_kl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths = [out / f"diversity_{name}_curves.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    if results["setting"] == "tiny":
        paths.append(histogram(results, out, plt, name))
    if len(schedules) > 1:
        paths += plot_schedules(results, out, name, plt)
    return paths


def plot_schedules(results: dict, out: Path, name: str, plt) -> List[Path]:
    """Final metrics vs updates per rollout batch (one line per method, mean ± s.e. over seeds; methods
    run at one schedule only are points), and the trainer's importance-weight stats per step."""
    runs = results["runs"]
    schedules = sorted(dict.fromkeys(schedule_of(r) for r in runs), key=lambda t: math.prod(parse_schedule(t)))
    xs = {sch: i for i, sch in enumerate(schedules)}
    keys = [("exact_kl_fwd", "KL(p* || pi) (exact, nats)"), ("exact_eff_correct", "effective # correct (exact)"),
            ("exact_accuracy", "accuracy (exact)"), ("exact_entropy", "answer entropy (exact, nats)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
    algos = list(dict.fromkeys(r["algo"] for r in runs))
    for ax, (k, title) in zip(axes, keys):
        for n_algo, algo in enumerate(algos):
            pts = []
            for sch in schedules:
                v = [final(r)[k] for r in runs if r["algo"] == algo and schedule_of(r) == sch]
                if v:
                    se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0
                    pts.append((xs[sch] + 0.04 * (n_algo - len(algos) / 2), statistics.mean(v), se))
            x, m, e = zip(*pts)
            ax.errorbar(x, m, yerr=e, color=COLORS.get(algo), marker="o", ms=4, capsize=2,
                        linestyle="-" if len(pts) > 1 else "none", label=algo)
        ax.set_xticks(range(len(schedules)))
        ax.set_xticklabels(schedules)
        ax.set_xlabel("epochs x mini-batches per rollout batch")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths = [out / f"diversity_{name}_schedules.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    stats = [("train_is_clip_low_frac", "weight clipped low (frac. of seqs / tokens)"),
             ("train_is_clip_high_frac", "weight clipped high (frac.)"), ("train_is_log_w_abs", "mean |log w|"),
             ("train_delta_abs", "FlowRL |delta|")]
    fig, axes = plt.subplots(1, len(stats), figsize=(4.2 * len(stats), 3.4))
    for ax, (k, title) in zip(axes, stats):
        # on-policy (1x1) runs are exactly 0 here: left out
        for lab in dict.fromkeys(label(r) for r in runs
                                 if r["algo"] in ("flowrl", "grpo") and schedule_of(r) != "1x1"):
            rs = [r for r in runs if label(r) == lab and k in r["history"][-1]]
            if not rs:
                continue
            steps = [h["step"] for h in rs[0]["history"][1:]]
            m = torch.tensor([[h[k] for h in r["history"][1:]] for r in rs], dtype=torch.float64).mean(0)
            ax.plot(steps, m, color=COLORS.get(rs[0]["algo"]),
                    linestyle=LINESTYLES[schedules.index(schedule_of(rs[0])) % 4], label=lab)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"step (mean over the {results['args']['eval_every']} steps before)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / f"diversity_{name}_weights.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def histogram(results: dict, out: Path, plt, name: str = "tiny") -> Path:
    """Answer distribution over the correct answers of one prompt: target p*, and every method of the
    first update schedule (first seed)."""
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
    seed, sch = args["seeds"][0], schedule_of(results["runs"][0])
    series = [("p* ~ pi_ref(.|correct)", [ref[y] / z for y in correct], "0.5")]
    for r in results["runs"]:
        if r["seed"] == seed and schedule_of(r) == sch:
            d = r["final_dists"][j]
            series.append((f"{label(r)} (acc {sum(d[y] for y in correct):.2f})", [d[y] for y in correct],
                           COLORS.get(r["algo"])))
    fig, ax = plt.subplots(figsize=(max(6, 0.13 * len(correct) * len(series)), 3.4))
    w = 0.8 / len(series)
    for i, (lab, v, c) in enumerate(series):
        ax.bar([x + i * w for x in range(len(correct))], v, width=w, label=lab, color=c)
    ax.set_xticks([x + 0.4 - w / 2 for x in range(len(correct))])
    ax.set_xticklabels(correct, rotation=90, fontsize=6)
    ax.set_ylabel("probability")
    ax.set_title(f"prompt 'sum {s}': probability of each correct answer (seed {seed}, final step)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"diversity_{name}_hist.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
