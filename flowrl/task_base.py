"""What every task is made of: ``Problem``, the ``Task`` base class, and ``pass_at_k``.

Its own module so that the task registry (flowrl/tasks.py, which builds every task by name) and the
tasks defined elsewhere (flowrl/code_task.py) both stand on it without importing each other (before,
tasks.py imported code_task.py and code_task.py imported tasks.py: an import cycle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple


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

    def score(self, problems: List[Problem], responses: List[str]) -> Tuple[List[float], Dict[str, float]]:
        """Rewards of responses[i] to problems[i], and task metrics (means over the batch) for metrics.jsonl."""
        return [self.reward(p, r) for p, r in zip(problems, responses)], {}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a stable product
        prod *= 1.0 - k / i
    return 1.0 - prod
