"""Training and evaluation curves of one or several runs (matplotlib, Agg backend: no display needed).

    python flowrl/plot.py runs/flowrl                        # -> runs/flowrl/curves.png
    python flowrl/plot.py runs/flowrl runs/grpo --out flowrl_vs_grpo.png   # runs overlaid, one colour each

Reads metrics.jsonl and eval.jsonl of each run directory; a panel whose key a run lacks (GRPO has no
log Z) just has no line for that run. train.py calls ``plot_run_or_warn(run_dir)`` at the end of every
run: without matplotlib (or if drawing fails) it warns and the run still ends normally, since its
metrics and checkpoint are already written.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# (file, key, panel title); IS stats: the mean importance weight and the clipped fraction
PANELS = [
    ("metrics", ["reward_mean"], "reward (train)"),
    ("metrics", ["accuracy"], "accuracy (train)"),
    ("metrics", ["loss"], "loss"),
    ("metrics", ["entropy"], "entropy (nats / token)"),
    ("metrics", ["log_z"], "log Z"),
    ("metrics", ["is_weight", "is_clip_frac"], "IS weight (solid), clip fraction (dashed)"),
    ("eval", ["accuracy", "pass_at_k"], "eval Avg@k (solid), pass@k (dashed)"),
    ("eval", ["distinct_correct"], "eval distinct correct answers / solved prompt"),
    ("eval", ["answer_entropy"], "eval answer entropy (nats)"),
]


def read_jsonl(path: Path) -> List[Dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: Sequence[Path], out: Path, labels: Sequence[str] = ()) -> Path:
    """Draw the panels for ``run_dirs`` (overlaid) into ``out`` (PNG). Returns ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [Path(d) for d in run_dirs]
    labels = list(labels) or [d.name for d in runs]
    data = [{"metrics": read_jsonl(d / "metrics.jsonl"), "eval": read_jsonl(d / "eval.jsonl")} for d in runs]
    fig, axes = plt.subplots(3, 3, figsize=(15, 10.5))
    for ax, (file, keys, title) in zip(axes.flat, PANELS):
        for i, (run, label) in enumerate(zip(data, labels)):
            for key, style in zip(keys, ("-", "--")):
                pts = [(r["step"], r[key]) for r in run[file]
                       if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, color=f"C{i}", marker="o" if file == "eval" else None, markersize=3,
                            label=label if style == "-" else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="upper center", ncol=len(names))
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run_or_warn(run_dir: Path) -> Optional[Path]:
    """``run_dir/curves.png``, or None and a warning naming the fix when it cannot be drawn."""
    run_dir = Path(run_dir)
    try:
        return plot_runs([run_dir], run_dir / "curves.png")
    except ImportError as e:
        why = f"matplotlib is not importable ({e}); pip install matplotlib"
    except Exception as e:  # noqa: BLE001 - a convenience must not fail a finished run
        why = f"{type(e).__name__}: {e}"
    warnings.warn(f"curves.png not drawn: {why}, then `python flowrl/plot.py {run_dir}`. "
                  "The run's metrics and checkpoints are written.", stacklevel=2)
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    ap.add_argument("--out", type=Path, default=None,
                    help="PNG path; default RUN_DIR/curves.png for one run, curves.png for several")
    ap.add_argument("--labels", nargs="*", default=(), help="legend labels (default: the folder names)")
    args = ap.parse_args(argv)
    for d in args.run_dirs:
        if not (d / "metrics.jsonl").is_file():
            ap.error(f"{d} has no metrics.jsonl (not a run directory?)")
    if args.labels and len(args.labels) != len(args.run_dirs):
        ap.error(f"--labels needs one label per run ({len(args.run_dirs)}), got {len(args.labels)}")
    out = args.out or (args.run_dirs[0] / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png"))
    print(plot_runs(args.run_dirs, out, args.labels))


if __name__ == "__main__":
    sys.exit(main())
