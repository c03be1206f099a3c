"""Tasks: each owns its problems, its prompt format and its reward.

    task = tasks.build(cfg, "train")        # or "eval" (held out)
    p = task[i]                              # Problem(question, answer, entry)
    task.messages(p)                         # chat messages (system, one solved example, question)
    task.reward(p, response_text)            # float in [0, 1]; 1.0 = correct
    task.score(problems, responses)          # (rewards, metrics): a batch at once (the code task's pool)

- ``ReasoningGymTask``: any reasoning-gym dataset by name, deterministic seeds, its own scorer.
- ``JsonlTask``: {"prompt", "answer"} per line, scored with math-verify.
- ``SyntheticTask``: a tiny verifiable task in the tiny models' character vocabulary (tests).
- ``code_task.CodeTask`` ('code', 'humaneval'): the model writes a program, the reward runs its tests in
  flowrl/sandbox.py (docs/code.md).

The prompt carries ONE solved example turn: SmolLM2-135M-Instruct writes <answer> tags 0% of the time
from instructions alone and 57% with one example (docs/flowrl.md, measured).
"""
from __future__ import annotations

import json
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from flowrl.config import Config, ConfigError
from flowrl.task_base import Problem, Task, pass_at_k  # noqa: F401 (the tasks' API, re-exported)

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> Optional[str]:
    """Content of the last <answer>...</answer> in ``response`` (stripped), None if there is none."""
    found = _ANSWER_RE.findall(response)
    return found[-1].strip() if found else None


def _worked_solution(answer: str, expression: Optional[str]) -> str:
    # "4 - 1 = 3\n<answer>3</answer>": with the expression written out the model computes rather
    # than copies the example's number (docs/flowrl.md)
    if expression and expression.strip() != answer.strip():
        return f"{expression} = {answer}\n<answer>{answer}</answer>"
    return f"<answer>{answer}</answer>"


class ReasoningGymTask(Task):
    def __init__(self, name: str, size: int, seed: int, options: Dict[str, Any], system_prompt: str):
        import reasoning_gym
        self.dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
        problems = [Problem(e["question"], str(e["answer"]), e) for e in self.dataset]
        # the worked example comes from a disjoint seed so it is not one of the problems
        ex = reasoning_gym.create_dataset(name, size=1, seed=seed + 7919, **options)[0]
        super().__init__(problems, system_prompt, Problem(ex["question"], str(ex["answer"]), ex),
                         _worked_solution(str(ex["answer"]), ex.get("metadata", {}).get("expression")))

    def reward(self, p: Problem, response: str) -> float:
        answer = extract_answer(response)
        if answer is None:
            return 0.0
        return float(self.dataset.score_answer(answer=answer, entry=p.entry))


class JsonlTask(Task):
    EXAMPLE = Problem("What is 6 * 7?", "42")

    def __init__(self, rows: List[Dict[str, Any]], system_prompt: str):
        problems = [Problem(str(r["prompt"]), str(r["answer"])) for r in rows]
        super().__init__(problems, system_prompt, self.EXAMPLE, _worked_solution("42", "6 * 7"))

    @staticmethod
    def read(path: str) -> List[Dict[str, Any]]:
        rows = []
        for i, line in enumerate(Path(path).read_text().splitlines()):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i + 1} is not a JSON object ({e}).") from None
            if not isinstance(r, dict) or "prompt" not in r or "answer" not in r:
                raise ValueError(f"{path}:{i + 1} needs 'prompt' and 'answer' fields, got {str(r)[:80]}.")
            rows.append(r)
        return rows

    def reward(self, p: Problem, response: str) -> float:
        from math_verify import parse, verify
        # math-verify times out with signal.alarm, which only works in the main thread: elsewhere
        # its timeouts are switched off (our answers are short strings; parsing takes milliseconds)
        t = 5 if threading.current_thread() is threading.main_thread() else None
        pred = extract_answer(response)
        if pred is None:
            return 0.0
        gold = parse(p.answer, parsing_timeout=t) or parse(f"${p.answer}$", parsing_timeout=t)
        guess = parse(pred, parsing_timeout=t) or parse(f"${pred}$", parsing_timeout=t)
        if not gold or not guess:
            return float(pred == p.answer.strip())
        return float(verify(gold, guess, timeout_seconds=t))


class SyntheticTask(Task):
    """'first digit of 3 1 4' -> '3'. Reward 1 if the answer digit is the first digit written after
    the prompt, 0.2 if some other digit is, else 0: a random tiny model earns mixed rewards within a
    group (so GRPO has signal) and a trained one can reach 1."""

    def __init__(self, size: int, seed: int, system_prompt: str):
        rng = random.Random(seed)
        problems = []
        for _ in range(size):
            digits = [str(rng.randrange(10)) for _ in range(3)]
            problems.append(Problem("first digit of " + " ".join(digits), digits[0]))
        super().__init__(problems, system_prompt, Problem("first digit of 5 2 8", "5"), "<answer>5</answer>")

    def reward(self, p: Problem, response: str) -> float:
        digits = re.findall(r"\d", response)
        if not digits:
            return 0.0
        return 1.0 if digits[0] == p.answer else 0.2


def build(cfg: Config, split: str) -> Task:
    """The training set (split='train') or the held-out evaluation set (split='eval'). A dataset that
    refuses its options (reasoning-gym asserts, e.g. ``max_terms must be >= min_terms``) or a bad JSONL
    file raises ``ConfigError`` naming the field; train.py builds both splits before any model."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    t = cfg.task
    field = f"task.path={t.path!r}" if t.name == "jsonl" else f"task.options={t.options!r}"
    try:
        return _build(cfg, split)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a dataset's own checks is a config error
        why = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
        raise ConfigError(f"{field}: task {t.name!r} ({split} split) refused it: {type(e).__name__}: {why}") from e


def _build(cfg: Config, split: str) -> Task:
    t = cfg.task
    seed = t.seed if split == "train" else t.seed + 1
    size = t.size if split == "train" else max(cfg.eval.prompts, 1)
    if t.name in ("code", "humaneval"):
        from dataclasses import fields
        from flowrl import code_task
        default_prompt = next(f.default for f in fields(type(t)) if f.name == "system_prompt")
        prompt = code_task.SYSTEM_PROMPT if t.system_prompt == default_prompt else t.system_prompt
        return code_task.build(t.name, t.path, split, t.seed, t.options, prompt, cfg.eval.prompts)
    if t.name == "synthetic":
        return SyntheticTask(size, seed, "" if t.system_prompt is None else t.system_prompt)
    if t.name == "jsonl":
        rows = JsonlTask.read(t.path)
        if t.eval_path:
            rows = rows if split == "train" else JsonlTask.read(t.eval_path)
        else:
            n_eval = min(cfg.eval.prompts, len(rows) - 1)
            rows = rows[: len(rows) - n_eval] if split == "train" else rows[len(rows) - n_eval:]
        return JsonlTask(rows, t.system_prompt)
    return ReasoningGymTask(t.name, size, seed, t.options, t.system_prompt)
