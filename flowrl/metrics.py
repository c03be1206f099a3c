"""Run outputs on rank 0: a tqdm bar (reward, loss) and JSON-lines files in the run directory.

    runs/<name>/config.toml     resolved config (every field, after CLI overrides)
    runs/<name>/metrics.jsonl   one record per training step (keys: see train.py::train_step)
    runs/<name>/eval.jsonl      one record per evaluation (step, Avg@k accuracy, pass@k, distinct correct
                                answers, answer entropy, reward, format rate, length)
    runs/<name>/samples.jsonl   the first prompt's group of responses each step (text, reward)
    runs/<name>/curves.png      the curves of both files (flowrl/plot.py)
    runs/<name>/checkpoints/    see flowrl/checkpoint.py;  runs/<name>/export/: the trained HF model

Strict JSON (RFC 8259): a non-finite number (a skipped step's NaN loss) is written as ``null``; the
step still counts as skipped (its ``skipped`` field). On resume from step s the files keep their
records up to step s (a crashed run may have logged steps after its last checkpoint: those are
dropped, then written again by the resumed run) and append.
"""
from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (train.py: at the start of every step, so ``peak_memory_mb`` is
    that step's peak, not the peak since the process started). CUDA: the allocator's peak counter;
    Linux CPU: the resident-set high-water mark (VmHWM; writing 5 to /proc/self/clear_refs resets it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or on CPU this process's peak resident set size (MiB), since the last
    ``reset_peak_memory`` (or the process start)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS; never reset
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def strict_json(x: Any) -> Any:
    """``x`` with every non-finite float (in dicts, lists, tuples) replaced by None: Python's json writes
    bare NaN / Infinity, which jq, browsers and strict parsers reject."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.files = {}
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics", "eval", "samples"):
            path = run_dir / f"{name}.jsonl"
            kept = []
            if resume_step is not None and path.is_file():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
            self.files[name] = open(path, "a", buffering=1)  # line-buffered
        from tqdm import tqdm
        self.bar = tqdm(total=total_steps, initial=resume_step or 0, desc="flowrl", dynamic_ncols=True,
                        file=sys.stdout)

    def _write(self, name: str, record: Dict[str, Any]) -> None:
        if self.enabled:
            self.files[name].write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    def step(self, record: Dict[str, Any]) -> None:
        self._write("metrics", record)
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}", loss=f"{record['loss']:.3g}",
                                 acc=f"{record['accuracy']:.2f}", skipped=record.get("skipped", 0),
                                 refresh=False)
            self.bar.update(1)

    def eval(self, record: Dict[str, Any]) -> None:
        self._write("eval", record)
        if self.bar is not None:
            self.bar.write(f"[eval step {record['step']}] accuracy {record['accuracy']:.3f} "
                           f"pass@{record['samples']} {record['pass_at_k']:.3f} "
                           f"distinct correct {record['distinct_correct']:.2f} "
                           f"answer entropy {record['answer_entropy']:.2f} "
                           f"format {record['format_rate']:.2f} length {record['response_len']:.1f}")

    def samples(self, record: Dict[str, Any]) -> None:
        self._write("samples", record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for f in self.files.values():
            f.close()
        self.files = {}
