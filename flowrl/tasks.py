"""Tasks: each owns its problems, its prompt format and its reward.

    task = tasks.build(cfg, "train")        # or "eval" (held out)
    p = task[i]                              # Problem(question, answer, entry)
    task.messages(p)                         # chat messages (system, one solved example, question)
    task.reward(p, response_text)            # float in [0, 1]; 1.0 = correct

- ``ReasoningGymTask``: any reasoning-gym dataset by name, deterministic seeds, its own scorer.
- ``JsonlTask``: {"prompt", "answer"} per line, scored with math-verify.
- ``SyntheticTask``: a tiny verifiable task in the tiny models' character vocabulary (tests).

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
from typing import Any, Dict, List, Optional

from flowrl.config import Config

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> Optional[str]:
    """Content of the last <answer>...</answer> in ``response`` (stripped), None if there is none."""
    found = _ANSWER_RE.findall(response)
    return found[-1].strip() if found else None


@dataclass
class Problem:
    question: str
    answer: str
    entry: Any = None  # the dataset's own record (reasoning-gym scorers need it)


class Task:
    """Base: a list of problems, a system prompt and a worked example; subclasses define reward()."""

    def __init__(self, problems: List[Problem], system_prompt: str, example: Problem, example_solution: str):
        self.problems = problems
        self.system_prompt = system_prompt
        self.example = example
        self.example_solution = example_solution

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> Problem:
        return self.problems[i]

    def messages(self, p: Problem) -> List[Dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [
            {"role": "user", "content": self.example.question},
            {"role": "assistant", "content": self.example_solution},
            {"role": "user", "content": p.question},
        ]

    def reward(self, p: Problem, response: str) -> float:
        raise NotImplementedError


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
            r = json.loads(line)
            if "prompt" not in r or "answer" not in r:
                raise ValueError(f"{path}:{i + 1} needs 'prompt' and 'answer' fields, got {sorted(r)}.")
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
    """The training set (split='train') or the held-out evaluation set (split='eval')."""
    t = cfg.task
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    seed = t.seed if split == "train" else t.seed + 1
    size = t.size if split == "train" else max(cfg.eval.prompts, 1)
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
