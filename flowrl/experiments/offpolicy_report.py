"""Pooled off-policy report (issue 28): the headline and weight-ablation cells of several disjoint seed
draws of ``flowrl/experiments/offpolicy_grid.sh``, pooled, with the collapse tail measured on its own.

    # every draw's merged JSON (the grid script writes one per draw), NAME=PATH, one or more files per draw
    PYTHONPATH=$PWD python -m flowrl.experiments.offpolicy_report d1=docs/diversity_tiny_offpolicy.json \\
        d2=docs/diversity_tiny_offpolicy_d2.json d3=docs/diversity_tiny_offpolicy_d3.json --out docs
    # provenance of one draw (the grid script calls this): commit, machine, torch, threads, wall time
    PYTHONPATH=$PWD python -m flowrl.experiments.offpolicy_report stamp docs/diversity_tiny_offpolicy_d4.json \\
        --draw d4 --part headline --wall-s 1234 --commit $(git rev-parse HEAD)

Writes ``<out>/diversity_<name>.md`` (tables) and ``<out>/diversity_<name>.json`` (every number in them,
plus which files and seeds each draw holds and their provenance); default name ``tiny_offpolicy_pooled``.

Definitions, stated once (the docs quote them):

- **collapsed run**: its exact malformed mass (``exact_malformed``: the probability of any token sequence
  that is not k digits + EOS) at the last evaluation is > ``COLLAPSE_AT`` = 0.5, i.e. the policy emits
  malformed output more often than not. Per cell: k collapsed of n runs, with the exact (Clopper-Pearson)
  95% interval of the rate.
- **seed-paired contrast** a - b: the per-seed difference of the two cells' final metrics over the seeds
  both hold, pooled over all draws; mean, 95% t-interval (n - 1 d.o.f.), # seeds where a > b. Beside
  it the same without the collapsed runs (**a pair is dropped when either member collapsed**), the 95%
  prediction interval of a fresh 10-seed draw, and each draw's own estimate. A difference of
  differences (a - b) - (c - d) is paired the same way (a seed is dropped when any of its four runs
  collapsed).

Draws must be disjoint in seeds (a redraw of the same seeds with other kernels is not a new draw: it is
refused). Runs are paired by seed only; every run of one seed shares the init, the prompt order and the
log Z init, whatever its update schedule.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from flowrl.experiments import flowrl_vs_grpo_report as vs_report
from flowrl.experiments.flowrl_vs_grpo_report import t_interval

COLLAPSE_KEY = "exact_malformed"
# bimodal in practice: of the 160 off-policy runs of draw 1, 9 end above 0.55 (7 of them > 0.95) and 4
# between 0.4 and 0.5; the count above 0.2 is reported beside it as a looser reading of "collapse"
COLLAPSE_AT = 0.5
LOOSE_AT = 0.2
METRICS = (("exact_accuracy", "accuracy"), ("exact_eff_correct", "eff. # correct"), ("exact_entropy", "entropy"),
           ("exact_kl", "KL(pi‖p*)"), ("exact_kl_fwd", "KL(p*‖pi)"), ("exact_malformed", "malformed"))
# the claims' cells: the headline (1x1 and 4x2, FlowRL and GRPO) and the three weight presets at 4x2
CELL_NAMES = {("1x1", "flowrl"): "FlowRL 1x1", ("1x1", "grpo"): "GRPO 1x1", ("4x2", "flowrl"): "FlowRL 4x2",
              ("4x2", "grpo"): "GRPO 4x2", ("4x2", "flowrl-noclip"): "FlowRL 4x2, no clip (raw w)",
              ("4x2", "flowrl-noweight"): "FlowRL 4x2, no weight (w = 1)",
              ("4x2", "flowrl-seqmean"): "FlowRL 4x2, GSPO ratio (clip [0.8, 1.2])"}
CONTRASTS = ((("1x1", "flowrl"), ("1x1", "grpo")), (("4x2", "flowrl"), ("4x2", "grpo")),
             (("4x2", "flowrl"), ("1x1", "flowrl")), (("4x2", "grpo"), ("1x1", "grpo")),
             (("4x2", "grpo"), ("1x1", "grpo"), ("4x2", "flowrl"), ("1x1", "flowrl")),
             (("4x2", "flowrl-noclip"), ("4x2", "flowrl")), (("4x2", "flowrl-noweight"), ("4x2", "flowrl")),
             (("4x2", "flowrl-seqmean"), ("4x2", "flowrl")), (("4x2", "flowrl-noclip"), ("4x2", "grpo")),
             (("4x2", "flowrl-noweight"), ("4x2", "grpo")), (("4x2", "flowrl-seqmean"), ("4x2", "grpo")))
# trainer means over the 100 steps, shown per cell only (how far the updates move from the sampler)
TRAIN_METRICS = (("train_is_clip_low_frac", "clipped low"), ("train_is_clip_high_frac", "clipped high"),
                 ("train_is_log_w_abs", "mean \\|log w\\|"))
Cell = Tuple[str, str]  # (schedule, method)


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------
def prediction_interval(diffs: Sequence[float], m: int = 10, level: float = 0.95) -> Tuple[float, float]:
    """Where the mean of m NEW seeds' differences should land: mean ± t(n - 1) * s * sqrt(1/n + 1/m).

    The confidence interval of the mean is narrower (s * sqrt(1/n)): a fresh 10-seed draw falls inside a
    30-seed 95% confidence interval only ~70% of the time even when nothing is wrong, inside this ~95%."""
    n = len(diffs)
    if n < 2 or m < 1:
        raise ValueError(f"prediction_interval: {n} differences, m={m}; need n >= 2 and m >= 1.")
    mean = statistics.fmean(diffs)
    half = vs_report.t_quantile(n - 1, 0.5 + level / 2) * statistics.stdev(diffs) * math.sqrt(1 / n + 1 / m)
    return mean - half, mean + half


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k), X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> Tuple[float, float]:
    """Exact two-sided binomial interval of a rate from k events in n trials: lo solves
    P(X >= k | lo) = alpha/2, hi solves P(X <= k | hi) = alpha/2 (bisection, |error| < 1e-12; lo = 0
    at k = 0, hi = 1 at k = n). 0 of 30: [0, 0.116]."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"clopper_pearson: k={k}, n={n}; need 0 <= k <= n and n >= 1.")
    a = (1 - level) / 2

    def solve(f) -> float:  # f increasing in p, f(0) < 0 < f(1)
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: (1 - _binom_cdf(k - 1, n, p)) - a)
    upper = 1.0 if k == n else solve(lambda p: a - _binom_cdf(k, n, p))
    return lower, upper


# ----------------------------------------------------------------------------------------------------
# pooling the draws
# ----------------------------------------------------------------------------------------------------
def pool(draws: Dict[str, dict]) -> Dict[Tuple[str, str, int], dict]:
    """{(schedule, method, seed): {"draw", "final"}} over every draw's runs (``draws``: name -> merged
    results of ``flowrl_vs_grpo_report.load_runs``). ValueError when two draws share a seed (not disjoint)."""
    seeds_of = {name: {r["seed"] for r in res["runs"]} for name, res in draws.items()}
    names = list(draws)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if seeds_of[a] & seeds_of[b]:
                raise ValueError(f"draws {a!r} and {b!r} share seeds {sorted(seeds_of[a] & seeds_of[b])}: draws must "
                                 f"be disjoint (a rerun of the same seeds, e.g. with other kernels, is not a new draw).")
    runs = {}
    for name, res in draws.items():
        for r in res["runs"]:
            runs[(vs_report.schedule_of(r), r["algo"], r["seed"])] = {"draw": name, "final": vs_report.final(r)}
    return runs


def collapsed(final: Dict[str, float], at: float = COLLAPSE_AT) -> bool:
    return final[COLLAPSE_KEY] > at


def collapse_table(runs: dict, draws: Sequence[str], cells: Sequence[Cell]) -> List[dict]:
    """Per cell: n runs, k collapsed (malformed > COLLAPSE_AT), the rate's 95% Clopper-Pearson interval,
    k / n per draw, # runs above LOOSE_AT, and the largest malformed mass of a run that did not collapse."""
    rows = []
    for cell in cells:
        rs = [v for (sch, algo, _), v in runs.items() if (sch, algo) == cell]
        if not rs:
            continue
        k = sum(collapsed(v["final"]) for v in rs)
        lo, hi = clopper_pearson(k, len(rs))
        rest = [v["final"][COLLAPSE_KEY] for v in rs if not collapsed(v["final"])]
        rows.append({"cell": list(cell), "n": len(rs), "collapsed": k, "rate": k / len(rs), "lo": lo, "hi": hi,
                     "loose": sum(collapsed(v["final"], LOOSE_AT) for v in rs), "max_rest": max(rest, default=None),
                     "per_draw": {d: [sum(collapsed(v["final"]) for v in rs if v["draw"] == d),
                                      sum(v["draw"] == d for v in rs)] for d in draws}})
    return rows


def contrast(runs: dict, a: Cell, b: Cell, key: str, draws: Sequence[str], c: Optional[Cell] = None,
             d: Optional[Cell] = None) -> Optional[dict]:
    """Seed-paired a - b of final ``key`` (with c and d: the difference of differences (a - b) - (c - d),
    e.g. how much more GRPO gains from extra updates than FlowRL): pooled over all draws ("all"), without
    the seeds where any member collapsed ("kept"), and per draw. None when no seed holds every cell."""
    cells = [x for x in (a, b, c, d) if x is not None]
    signs = (1, -1, -1, 1)[:len(cells)]
    seeds = sorted({sd for (sch, algo, sd), r in runs.items() if (sch, algo) == a})
    seeds = [sd for sd in seeds if all((*x, sd) in runs and key in runs[(*x, sd)]["final"] for x in cells)]
    if not seeds:
        return None
    diff = {sd: sum(sg * runs[(*x, sd)]["final"][key] for sg, x in zip(signs, cells)) for sd in seeds}
    kept = [sd for sd in seeds if not any(collapsed(runs[(*x, sd)]["final"]) for x in cells)]
    d_all = list(diff.values())
    out = {"all": t_interval(d_all), "dropped": len(seeds) - len(kept),
           "next10": prediction_interval(d_all, 10) if len(d_all) > 1 else None,
           "kept": t_interval([diff[sd] for sd in kept]) if kept else None, "per_draw": {}}
    for name in draws:
        ds = [diff[sd] for sd in seeds if runs[(*a, sd)]["draw"] == name]
        if ds:
            out["per_draw"][name] = t_interval(ds)
    return out


def cell_means(runs: dict, cell: Cell, key: str, keep_collapsed: bool = True) -> Optional[Tuple[float, float, int]]:
    """(mean, sample std, n) of final ``key`` over the cell's runs (optionally without collapsed runs)."""
    v = [r["final"][key] for (sch, algo, _), r in runs.items()
         if (sch, algo) == cell and key in r["final"] and (keep_collapsed or not collapsed(r["final"]))]
    if not v:
        return None
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)


def report(draws: Dict[str, dict], cells: Sequence[Cell] = tuple(CELL_NAMES),
           contrasts: Sequence[Tuple[Cell, Cell]] = CONTRASTS, metrics=METRICS,
           cell_metrics=METRICS + TRAIN_METRICS) -> dict:
    """Every number of the pooled report as one JSON-able dict (``markdown`` renders it)."""
    runs = pool(draws)
    names = list(draws)
    present = [c for c in cells if any((sch, algo) == c for (sch, algo, _) in runs)]
    res = {"collapse_at": COLLAPSE_AT, "loose_at": LOOSE_AT, "draws": {}, "collapse": collapse_table(runs, names, present),
           "cells": [], "contrasts": []}
    for d, r in draws.items():
        res["draws"][d] = {"seeds": sorted({x["seed"] for x in r["runs"]}), "files": r.get("files", []),
                           "grid": r.get("grid"), "kernels_impl": r.get("kernels_impl"),
                           "cells": {vs_report.label(x) for x in r["runs"]}}
        res["draws"][d]["cells"] = sorted(res["draws"][d]["cells"])
    for c in present:
        row = {"cell": list(c), "all": {}, "kept": {}}
        for key, _ in cell_metrics:
            row["all"][key] = cell_means(runs, c, key)
            row["kept"][key] = cell_means(runs, c, key, keep_collapsed=False)
        res["cells"].append(row)
    for cs in contrasts:
        row = {"cells": [list(x) for x in cs], "metrics": {}}
        for key, _ in metrics:
            got = contrast(runs, *cs[:2], key, names, *cs[2:])
            if got is not None:
                row["metrics"][key] = got
        if row["metrics"]:
            res["contrasts"].append(row)
    return res


def holdout(draws: Dict[str, dict], held: str, contrasts: Sequence[tuple] = CONTRASTS, metrics=METRICS) -> List[dict]:
    """Does draw ``held`` land where the other draws say a fresh draw should? Per contrast and metric: the
    pooled 95% confidence interval and the prediction interval for a fresh draw of as many seeds as
    ``held`` has, both from the other draws alone, against ``held``'s own mean (a draw of m seeds falls in
    the prediction interval ~95% of the time if nothing changed; in the confidence interval less often)."""
    if held not in draws or len(draws) < 2:
        raise ValueError(f"holdout: draw {held!r} among {list(draws)}; need it and at least one other draw.")
    rest = pool({k: v for k, v in draws.items() if k != held})
    new = pool({held: draws[held]})
    rows = []
    for cs in contrasts:
        for key, _ in metrics:
            got, mine = contrast(rest, *cs[:2], key, [], *cs[2:]), contrast(new, *cs[:2], key, [], *cs[2:])
            if got is None or mine is None or got["all"]["n"] < 2:
                continue
            diffs_mean, n_new = mine["all"]["mean"], mine["all"]["n"]
            # prediction_interval of the other draws' differences, their sample std s = se * sqrt(n)
            se, n = got["all"]["se"], got["all"]["n"]
            half = vs_report.t_quantile(n - 1) * se * math.sqrt(n) * math.sqrt(1 / n + 1 / n_new)
            pred = (got["all"]["mean"] - half, got["all"]["mean"] + half)
            rows.append({"cells": [list(x) for x in cs], "key": key, "held": held, "mean": diffs_mean, "n": n_new,
                         "ci": [got["all"]["lo"], got["all"]["hi"]], "pred": list(pred),
                         "in_ci": got["all"]["lo"] <= diffs_mean <= got["all"]["hi"],
                         "in_pred": pred[0] <= diffs_mean <= pred[1]})
    return rows


def holdout_markdown(rows: List[dict], metrics=METRICS) -> str:
    label = dict(metrics)
    lines = ["| held-out draw | contrast | metric | its mean (n) | others: 95% CI | others: prediction | in CI | in prediction |",
             "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['held']} | {_contrast_name(r['cells'])} | {label[r['key']]} | {r['mean']:+.3f} ({r['n']}) | "
                     f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | [{r['pred'][0]:+.3f}, {r['pred'][1]:+.3f}] | "
                     f"{'yes' if r['in_ci'] else '**no**'} | {'yes' if r['in_pred'] else '**no**'} |")
    for held in dict.fromkeys(r["held"] for r in rows):
        rs = [r for r in rows if r["held"] == held]
        lines.append(f"\n{held}: {sum(r['in_pred'] for r in rs)} of {len(rs)} inside the prediction interval, "
                     f"{sum(r['in_ci'] for r in rs)} of {len(rs)} inside the confidence interval.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------
def fmt_interval(s: Optional[dict], digits: int = 3) -> str:
    """'+m [lo, hi] (pos/n)', bold when the interval excludes 0."""
    if s is None:
        return "—"
    f = f"{{:+.{digits}f}}"
    cell = f"{f.format(s['mean'])} [{f.format(s['lo'])}, {f.format(s['hi'])}] ({s['pos']}/{s['n']})"
    return f"**{cell}**" if s["lo"] > 0 or s["hi"] < 0 else cell


def _name(cell) -> str:
    return CELL_NAMES.get(tuple(cell), f"{cell[1]} {cell[0]}")


def _contrast_name(cells) -> str:
    if len(cells) == 2:
        return f"{_name(cells[0])} − {_name(cells[1])}"
    return f"({_name(cells[0])} − {_name(cells[1])}) − ({_name(cells[2])} − {_name(cells[3])})"


def markdown(res: dict, metrics=METRICS, cell_metrics=METRICS + TRAIN_METRICS) -> str:
    names = list(res["draws"])
    lines = ["<!-- generated by python -m flowrl.experiments.offpolicy_report; do not edit -->", "",
             "Draws (seed range; provenance where the draw was stamped):", ""]
    for d, info in res["draws"].items():
        seeds = info["seeds"]
        grid = info.get("grid") or {}
        prov = (f"; commit {grid.get('commit', '?')[:10]}, {grid.get('cpu', '?')}, {grid.get('nproc', '?')} CPUs, "
                f"torch {grid.get('torch', '?')}, {grid.get('threads', '?')} thread(s) x {grid.get('parallel', '?')} "
                f"processes, wall {grid.get('wall_s', '?')} s") if grid else ""
        lines.append(f"- {d}: seeds {seeds[0]}-{seeds[-1]} ({len(seeds)}){prov}")
    lines += ["", f"Collapsed run := exact malformed mass at the last evaluation > {res['collapse_at']}. "
              "Rate with its exact (Clopper-Pearson) 95% interval; per draw k/n; the looser count "
              f"(> {res['loose_at']}); the largest malformed mass of a run that did not collapse.", "",
              "| cell | collapsed | rate [95% CI] | " + " | ".join(names) + f" | > {res['loose_at']} | max of the rest |",
              "|---" * (5 + len(names)) + "|"]
    for row in res["collapse"]:
        per = " | ".join("{}/{}".format(*row["per_draw"][d]) if row["per_draw"][d][1] else "—" for d in names)
        mr = "—" if row["max_rest"] is None else f"{row['max_rest']:.3f}"
        lines.append(f"| {_name(row['cell'])} | {row['collapsed']}/{row['n']} | {row['rate']:.3f} "
                     f"[{row['lo']:.3f}, {row['hi']:.3f}] | {per} | {row['loose']}/{row['n']} | {mr} |")
    lines += ["", "Final metrics per cell, pooled: mean ± sample std (n); second line of each cell: without "
              "the collapsed runs. The last three columns are trainer means over the run's steps (FlowRL: fraction "
              "of sequences whose ratio lies below / above the clip range; GRPO: of tokens).", "",
              "| cell | " + " | ".join(lab for _, lab in cell_metrics) + " |", "|---" * (len(cell_metrics) + 1) + "|"]
    for row in res["cells"]:
        for which, tag in (("all", ""), ("kept", ", not collapsed")):
            cells = []
            for key, _ in cell_metrics:
                v = row[which].get(key)
                cells.append("—" if v is None else f"{v[0]:.3f} ± {v[1]:.3f} ({v[2]})")
            lines.append(f"| {_name(row['cell'])}{tag} | " + " | ".join(cells) + " |")
    lines += ["", "Seed-paired contrasts a − b: mean [95% t-interval] (# seeds where a > b / n); **bold** = the "
              "interval excludes 0. *pooled*: every seed of every draw; *no collapse*: the pairs where neither "
              "member collapsed (dropped: how many pairs that removes); *next 10 seeds*: the 95% prediction "
              "interval of a fresh 10-seed draw's mean (where a new draw should land); then each draw alone."]
    for key, lab in metrics:
        lines += ["", f"**{lab}** (`{key}`)", "",
                  "| contrast | pooled | no collapse | dropped | next 10 seeds | " + " | ".join(names) + " |",
                  "|---" * (5 + len(names)) + "|"]
        for row in res["contrasts"]:
            c = row["metrics"].get(key)
            if c is None:
                continue
            per = " | ".join(fmt_interval(c["per_draw"].get(d)) for d in names)
            nxt = "—" if c["next10"] is None else "[{:+.3f}, {:+.3f}]".format(*c["next10"])
            lines.append(f"| {_contrast_name(row['cells'])} | {fmt_interval(c['all'])} | "
                         f"{fmt_interval(c['kept'])} | {c['dropped']} | {nxt} | {per} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------------------
def machine() -> dict:
    """The machine a draw ran on: CPU model, # CPUs, torch version, load average, Python, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return {"cpu": cpu, "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def git_commit() -> str:
    """HEAD of the repository this module lives in, '+dirty' when tracked files differ from it."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def stamp(path: str, *, draw: str, part: str, wall_s: float, parallel: int, commit: Optional[str] = None,
          started: Optional[str] = None, cells: Sequence[str] = ()) -> dict:
    """Write ``grid`` (commit, machine, torch threads, wall time, draw, part, seeds, per-cell wall time)
    into a merged draw JSON, and the same as one line at the end of its ``_summary.md`` if present."""
    p = Path(path)
    res = json.loads(p.read_text())
    per_cell = {}
    for c in cells:
        cr = json.loads(Path(c).read_text())
        per_cell[Path(c).parent.name] = round(cr.get("wall_s", float("nan")), 1)
    grid = {"draw": draw, "part": part, "seeds": sorted({r["seed"] for r in res["runs"]}),
            "commit": commit or git_commit(), "started": started,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "wall_s": round(wall_s),
            "parallel": parallel, "threads": res.get("threads"), "kernels_impl": res.get("kernels_impl"),
            **machine(), "cell_wall_s": per_cell}
    res["grid"] = grid
    p.write_text(json.dumps(res, indent=None))
    summary = p.with_name(p.stem + "_summary.md")
    line = (f"\nDraw {draw} ({part}), seeds {grid['seeds'][0]}-{grid['seeds'][-1]}: commit {grid['commit']}, "
            f"{grid['cpu']}, {grid['nproc']} CPUs, torch {grid['torch']}, {grid['threads']} thread(s) per process x "
            f"{parallel} processes, load average at the end {grid['loadavg']}, wall time {grid['wall_s']} s "
            f"(started {started}, finished {grid['finished']}).\n")
    if summary.exists():
        summary.write_text(summary.read_text() + line)
    print(line.strip(), flush=True)
    return grid


def load_draws(specs: Sequence[str]) -> Dict[str, dict]:
    """'NAME=PATH' (repeat a NAME for a draw saved in several files) -> {NAME: merged results}."""
    files: Dict[str, List[str]] = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"draw {s!r}: write NAME=PATH, e.g. d2=docs/diversity_tiny_offpolicy_d2.json.")
        files.setdefault(name, []).append(path)
    draws = {}
    for name, paths in files.items():
        grids = [json.loads(Path(p).read_text()).get("grid") for p in paths]
        res = vs_report.load_runs(paths, "tiny")
        res["files"] = paths
        res["grid"] = grids[0] if len(paths) == 1 else None
        draws[name] = res
    return draws


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stamp"]:
        p = argparse.ArgumentParser(prog="offpolicy_report stamp", description=stamp.__doc__)
        p.add_argument("json")
        p.add_argument("--draw", required=True)
        p.add_argument("--part", default="all")
        p.add_argument("--wall-s", type=float, required=True)
        p.add_argument("--parallel", type=int, default=2)
        p.add_argument("--commit", default=None)
        p.add_argument("--started", default=None)
        p.add_argument("--cells", nargs="*", default=[], help="the per-cell JSONs (their wall_s is recorded)")
        a = p.parse_args(argv[1:])
        return stamp(a.json, draw=a.draw, part=a.part, wall_s=a.wall_s, parallel=a.parallel, commit=a.commit,
                     started=a.started, cells=a.cells)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("draws", nargs="+", metavar="NAME=PATH")
    p.add_argument("--out", default="docs")
    p.add_argument("--name", default="tiny_offpolicy_pooled")
    p.add_argument("--holdout", nargs="*", default=None, metavar="DRAW",
                   help="also check each named draw (none named: every draw) against the others' intervals")
    a = p.parse_args(argv)
    draws = load_draws(a.draws)
    res = report(draws)
    if a.holdout is not None:
        rows = [r for held in (a.holdout or list(draws)) for r in holdout(draws, held)]
        res["holdout"] = rows
        (Path(a.out) / f"diversity_{a.name}_holdout.md").parent.mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"diversity_{a.name}_holdout.md").write_text(
            "<!-- generated by python -m flowrl.experiments.offpolicy_report --holdout; do not edit -->\n\n"
            "Each draw against the intervals of the other draws pooled (leave one draw out).\n\n"
            + holdout_markdown(rows) + "\n")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    (out / f"diversity_{a.name}.md").write_text(md + "\n")
    (out / f"diversity_{a.name}.json").write_text(json.dumps(res, indent=1))
    print(md, flush=True)
    return res


if __name__ == "__main__":
    main()
