"""Answer-diversity METRICS of a policy: the quantities FlowRL claims to preserve (docs/flowrl.md).

Pure functions over extracted answers (strings, or None when a response has no parsable answer), so the
trainer's evaluation (flowrl/train.py) and the FlowRL-vs-GRPO experiment share one definition. The
experiment itself (tasks, training drivers, tables) is ``flowrl/experiments/flowrl_vs_grpo.py``, not
this module.

- ``distinct_correct``: mean number of distinct correct answers per *solved* prompt (the paper's simple
  diversity measure); prompts with no correct sample are left out, so a policy is not rewarded for
  being wrong in many ways.
- ``answer_entropy``: mean over prompts of the entropy (nats) of the empirical distribution of the
  answers a prompt's samples gave (unparsable responses form one category of their own).
- ``target_distribution`` / ``kl_divergence``: where the answer space can be enumerated, the exact
  FlowRL target p*(y|x) ∝ pi_ref(y|x) exp(beta r(x, y)) and KL(pi || p*).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, Hashable, Optional, Sequence

_NO_ANSWER = "<no answer>"


def normalize_answer(answer: Optional[str]) -> str:
    """Collapse whitespace so '1 2' and ' 1  2 ' count as one answer; None -> a single 'no answer' bucket."""
    return _NO_ANSWER if answer is None else " ".join(answer.split())


def distinct_correct(answers: Sequence[Sequence[Optional[str]]], correct: Sequence[Sequence[bool]]) -> float:
    """Mean over solved prompts of |{normalized answers of the correct samples}|; 0.0 if none is solved.

    answers[i][j], correct[i][j]: sample j of prompt i.
    """
    counts = []
    for ans, ok in zip(answers, correct, strict=True):
        distinct = {normalize_answer(a) for a, c in zip(ans, ok, strict=True) if c}
        if distinct:
            counts.append(len(distinct))
    return sum(counts) / len(counts) if counts else 0.0


def entropy(counts: Sequence[float]) -> float:
    """Shannon entropy (nats) of a histogram."""
    total = float(sum(counts))
    if total <= 0:
        return 0.0
    return -sum((c / total) * math.log(c / total) for c in counts if c > 0)


def answer_entropy(answers: Sequence[Sequence[Optional[str]]]) -> float:
    """Mean over prompts of the entropy of that prompt's empirical answer distribution (nats)."""
    if not answers:
        return 0.0
    return sum(entropy(list(Counter(normalize_answer(a) for a in ans).values())) for ans in answers) / len(answers)


def target_distribution(ref_probs: Dict[Hashable, float], rewards: Dict[Hashable, float],
                        beta: float) -> Dict[Hashable, float]:
    """p*(y) ∝ pi_ref(y) exp(beta r(y)) over the keys of ``ref_probs`` (missing rewards count as 0).

    Computed in log space (beta r up to ~1e3 does not overflow).
    """
    logits = {y: math.log(p) + beta * rewards.get(y, 0.0) for y, p in ref_probs.items() if p > 0}
    if not logits:
        raise ValueError("ref_probs has no positive entry; the target distribution is undefined.")
    m = max(logits.values())
    z = sum(math.exp(v - m) for v in logits.values())
    return {y: math.exp(v - m) / z for y, v in logits.items()}


def kl_divergence(p: Dict[Hashable, float], q: Dict[Hashable, float]) -> float:
    """KL(p || q) = sum_y p(y) log(p(y) / q(y)); inf when p puts mass where q has none."""
    total = 0.0
    for y, py in p.items():
        if py <= 0:
            continue
        qy = q.get(y, 0.0)
        if qy <= 0:
            return math.inf
        total += py * math.log(py / qy)
    return total
