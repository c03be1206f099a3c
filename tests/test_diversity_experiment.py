"""flowrl/diversity.py (the metrics) on hand-made inputs, and the FlowRL-vs-GRPO experiment
(flowrl/experiments/flowrl_vs_grpo.py, its report flowrl_vs_grpo_report.py): exact metrics of hand-built
answer distributions against values computed by hand, the enumeration against the model's own logits, a
few-step smoke run of the tiny setting, and the deprecated alias flowrl/experiments/diversity.py."""
from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from flowrl import diversity
from flowrl.experiments import flowrl_vs_grpo as exp
from flowrl.experiments import flowrl_vs_grpo_report as report
from flowrl.model import tiny_tokenizer

MAL = exp.MALFORMED


# ----------------------------------------------------------------------------------------------------
# flowrl/diversity.py
# ----------------------------------------------------------------------------------------------------
def test_distinct_correct_counts_distinct_correct_answers_over_solved_prompts():
    answers = [["1 2", " 1  2", "3", None], ["5", "5", "6", "7"], ["x", None, "y", "z"]]
    correct = [[True, True, True, False], [True, True, False, True], [False, False, False, False]]
    # prompt 0: {"1 2", "3"} (whitespace-normalized) = 2; prompt 1: {"5", "7"} = 2; prompt 2 unsolved: left out
    assert diversity.distinct_correct(answers, correct) == 2.0
    assert diversity.distinct_correct([["a"]], [[False]]) == 0.0
    with pytest.raises(ValueError):
        diversity.distinct_correct([["a", "b"]], [[True]])  # mismatched lengths are an error, not a silent zip


def test_answer_entropy_by_hand():
    # prompt 0: {a: 2, b: 1, <none>: 1}; prompt 1: all the same -> 0
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert diversity.answer_entropy([["a", "a", "b", None], ["c", "c", "c", "c"]]) == pytest.approx(h0 / 2, rel=1e-12)
    assert diversity.entropy([1, 1, 1, 1]) == pytest.approx(math.log(4), rel=1e-12)
    assert diversity.entropy([0, 3]) == 0.0 and diversity.entropy([]) == 0.0


def test_target_distribution_and_kl_by_hand():
    ref = {"a": 0.5, "b": 0.3, "c": 0.2}
    r = {"a": 0.0, "b": 1.0, "c": 1.0}
    beta = 2.0
    z = 0.5 + 0.3 * math.e ** 2 + 0.2 * math.e ** 2
    t = diversity.target_distribution(ref, r, beta)
    assert t == pytest.approx({"a": 0.5 / z, "b": 0.3 * math.e ** 2 / z, "c": 0.2 * math.e ** 2 / z}, rel=1e-12)
    # beta * r of 1000 does not overflow (log-space): the target is ref restricted to reward-1 answers
    t_big = diversity.target_distribution(ref, r, 1000.0)
    assert t_big["b"] == pytest.approx(0.6, rel=1e-12) and t_big["a"] < 1e-300
    p = {"a": 0.1, "b": 0.9}
    kl = 0.1 * math.log(0.1 / t["a"]) + 0.9 * math.log(0.9 / t["b"])
    assert diversity.kl_divergence(p, t) == pytest.approx(kl, rel=1e-12)
    assert diversity.kl_divergence(t, t) == pytest.approx(0.0, abs=1e-15)
    assert diversity.kl_divergence({"a": 1.0}, {"b": 1.0}) == math.inf
    with pytest.raises(ValueError):
        diversity.target_distribution({"a": 0.0}, {}, 1.0)


# ----------------------------------------------------------------------------------------------------
# the experiment's exact metrics
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_digit_sum_task_parse_and_reward(tok):
    task = exp.DigitSumTask(tok, 2, [1])
    d, eos = task.digit_ids, task.eos
    assert len(task.answers) == 100 and task.answers[:2] == ["00", "01"]
    assert task.parse([d[1], d[2], eos]) == "12"
    assert task.parse([d[1], d[2], eos, d[3]]) == "12"  # whatever follows EOS is never generated
    assert task.parse([d[1], eos]) is None          # too short
    assert task.parse([d[1], d[2], d[3]]) is None   # no EOS after k digits
    assert task.parse([d[1], tok.convert_tokens_to_ids("a"), eos]) is None
    assert task.correct(1, "10") and task.correct(1, "01") and not task.correct(1, "11")
    assert not task.correct(1, None) and not task.correct(1, MAL)


def test_exact_metrics_on_a_hand_built_policy(tok):
    """'sum 1' with k=2: correct answers are '01' and '10'. pi and pi_ref are written down; every metric
    is recomputed here from its definition."""
    task = exp.DigitSumTask(tok, 2, [1])
    pi = {a: 0.0 for a in task.answers}
    pi.update({"01": 0.4, "10": 0.2, "55": 0.1, MAL: 0.3})
    ref = {a: 0.0099 for a in task.answers}
    ref[MAL] = 0.01
    beta, n = 2.0, 4
    m = exp.exact_metrics([pi], [ref], task, [1], beta=beta, n=n)

    z = 2 * 0.0099 * math.e ** beta + 98 * 0.0099 + 0.01
    p_star = {"01": 0.0099 * math.e ** beta / z, "10": 0.0099 * math.e ** beta / z, "55": 0.0099 / z, MAL: 0.01 / z}
    kl = sum(pi[y] * math.log(pi[y] / p_star[y]) for y in ("01", "10", "55", MAL))
    pass_n = 1 - 0.4 ** n
    expected = {
        "exact_accuracy": 0.6,
        "exact_pass_at_n": pass_n,
        "exact_distinct_at_n": ((1 - 0.6 ** n) + (1 - 0.8 ** n)) / pass_n,
        "exact_entropy": -(0.4 * math.log(0.4) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1) + 0.3 * math.log(0.3)),
        "exact_eff_correct": math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))),
        "exact_kl": kl,
        "exact_malformed": 0.3,
    }
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-12), k
    assert m["exact_kl_fwd"] == math.inf  # pi has zeros where p* has mass (e.g. '00'): forward KL is infinite

    # a policy equal to its target has KL 0 both ways and the target's effective number of correct answers
    full_star = {a: 0.0099 * (math.e ** beta if a in ("01", "10") else 1.0) / z for a in task.answers}
    full_star[MAL] = 0.01 / z
    m2 = exp.exact_metrics([full_star], [ref], task, [1], beta=beta, n=n)
    assert m2["exact_kl"] == pytest.approx(0.0, abs=1e-14) and m2["exact_kl_fwd"] == pytest.approx(0.0, abs=1e-14)
    assert m2["exact_eff_correct"] == pytest.approx(2.0, rel=1e-12)


def test_sampled_metrics_by_hand():
    answers = [["01", "10", None, "01"], ["22", "22", "13", "40"]]
    correct = [[True, True, False, True], [False, False, True, True]]
    m = exp.sampled_metrics(answers, correct)
    assert m["accuracy"] == 5 / 8 and m["pass_at_n"] == 1.0 and m["distinct_correct"] == 2.0
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert m["answer_entropy"] == pytest.approx((h0 + h1) / 2, rel=1e-12)


def test_enumeration_matches_the_models_own_logits(tok):
    """answer_distributions (Policy.forward / flowrl_kernels log-probs, padded batch) == product of
    softmax(lm logits) token probabilities computed one unpadded sequence at a time."""
    args = exp.parse_args(["tiny", "--k", "2", "--sums", "3", "12"])
    cfg = exp.make_config(args, "grpo", 0, model={"path": "tiny-llama", "tiny_layers": 1, "tiny_hidden": 16},
                          task={"name": "synthetic"})
    policy, _, tok = exp.build_policy(cfg)
    task = exp.DigitSumTask(tok, 2, [3, 12])
    dists = exp.answer_distributions(policy, tok, task, task.sums, chunk=77)  # odd chunk: crosses prompts
    for d in dists:
        assert sum(d.values()) == pytest.approx(1.0, abs=1e-9)
    with torch.no_grad():
        for i, s in enumerate(task.sums):
            prompt = tok.apply_chat_template(task.messages(s), add_generation_prompt=True, tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            for a in ("00", "39", "93"):
                r = task.answer_ids(a)
                logits = policy.lm(torch.tensor([p_ids + r])).logits[0, len(p_ids) - 1: -1].double()
                lp = torch.log_softmax(logits, -1)[torch.arange(len(r)), torch.tensor(r)].sum()
                assert dists[i][a] == pytest.approx(float(lp.exp()), rel=1e-4)


def test_tiny_setting_smoke(tmp_path):
    """Two training steps per method and update schedule (1x1 on-policy, 2x2 = 2 epochs x 2 mini-batches)
    from a briefly fine-tuned init: every metric is finite and in range, and the trainer's importance-weight
    stats are exactly 0 on-policy and > 0 for FlowRL off-policy."""
    res = exp.main(["tiny", "--seeds", "0", "--steps", "2", "--eval-every", "1", "--pretrain-steps", "3",
                    "--eval-samples", "4", "--layers", "1", "--hidden", "16", "--out", str(tmp_path), "--no-plots",
                    "--methods", "flowrl", "grpo", "flowrl-raw", "--schedules", "1x1", "2x2"])
    assert [report.label(r) for r in res["runs"]] == ["flowrl", "grpo", "flowrl-raw", "flowrl 2x2", "grpo 2x2",
                                                   "flowrl-raw 2x2"]
    for r in res["runs"]:
        assert [h["step"] for h in r["history"]] == [0, 1, 2]
        for h in r["history"]:
            assert 0 <= h["exact_accuracy"] <= 1 and 0 <= h["accuracy"] <= 1 and 0 <= h["exact_malformed"] <= 1
            assert math.isfinite(h["exact_kl"]) and h["exact_kl"] >= 0 and h["exact_entropy"] >= 0
        tm = r["train_mean"]
        assert 0 <= tm["train_is_clip_low_frac"] <= 1 and 0 <= tm["train_is_clip_high_frac"] <= 1
        if r["schedule"] == "1x1":
            assert tm["train_is_log_w_abs"] == 0.0 and tm["train_is_clip_frac"] == 0.0
        elif r["algo"] != "grpo":  # GRPO's init here gets no reward, so no gradient: it never moves
            assert tm["train_is_log_w_abs"] > 0
    saved = json.loads((tmp_path / "diversity_tiny.json").read_text())
    assert saved["runs"][0]["history"] == res["runs"][0]["history"]
    assert saved["kernels_impl"] in ("default", "torch", "triton", "native")
    assert "± " in (tmp_path / "diversity_tiny_table.md").read_text()
    summary = (tmp_path / "diversity_tiny_summary.md").read_text()
    assert "train_is_clip_high_frac" in summary and "| flowrl-raw 2x2 (n=1) |" in summary


def test_table_paired_row():
    """The table's per-method mean ± std and the seed-paired FlowRL - GRPO row, on hand-made finals."""
    acc = {("flowrl", 0): 0.5, ("grpo", 0): 0.2, ("flowrl", 1): 0.3, ("grpo", 1): 0.4, ("flowrl", 2): 0.9,
           ("grpo", 2): 0.3}
    runs = [{"algo": a, "seed": s, "history": [{"step": 0, "acc": 0.0}, {"step": 5, "acc": v}]}
            for (a, s), v in acc.items()]
    md = report.table({"runs": runs}).splitlines()
    assert md[2].startswith("| flowrl (n=3) | 0.567 ± 0.306 |")  # mean 1.7 / 3, sample std 0.306
    assert md[3].startswith("| grpo (n=3) | 0.300 ± 0.100 |")
    # differences +0.3, -0.1, +0.6: mean 0.267, sample std 0.351, s.e. 0.351 / sqrt(3) = 0.203, 2 of 3 > 0;
    # 95% t-interval with 2 d.o.f.: 0.2667 ± 4.3027 * 0.2028 = [-0.606, +1.139] (contains 0: not bold)
    assert md[4].endswith("| +0.267 ± 0.203 [-0.606, +1.139] (2/3) |"), md[4]
    # one method only: no paired row
    assert len(report.table({"runs": [r for r in runs if r["algo"] == "flowrl"]}).splitlines()) == 3


def test_table_pairs_within_a_schedule_and_bolds_intervals_that_exclude_zero():
    """Runs of several update schedules: each method is paired with GRPO of ITS schedule (same seeds), an
    ablation run at one schedule only gets a paired row too, and trainer means (train_mean) are columns."""
    runs = []
    for sch, base in (("1x1", 0.0), ("4x2", 1.0)):
        for seed, noise in enumerate((0.01, -0.02, 0.03)):
            for algo, shift in (("flowrl", 0.5), ("grpo", 0.0)) + ((("flowrl-noclip", -0.5),) if sch == "4x2" else ()):
                runs.append({"algo": algo, "seed": seed, "schedule": sch, "train_mean": {"train_x": base},
                             "history": [{"step": 3, "kl": base + shift + noise * (algo != "grpo"),
                                          "train_kl": 99.0}]})  # window means of the last eval: not a column
    md = report.table({"runs": runs}).splitlines()
    assert md[0] == "| method | kl | train_x |"
    rows = {line.split(" |")[0][2:]: line for line in md[2:]}
    assert rows["flowrl 4x2 (n=3)"] == "| flowrl 4x2 (n=3) | 1.507 ± 0.025 | 1.000 ± 0.000 |"
    # differences 0.51, 0.48, 0.53: mean 0.507, s.e. 0.0145, t(2) interval [+0.444, +0.569]: bold
    paired = "paired (mean ± s.e. [95% t-interval], # seeds > 0)"
    assert "| **+0.507 ± 0.015 [+0.444, +0.569] (3/3)** |" in rows[f"flowrl 4x2 - grpo 4x2, {paired}"]
    assert "**-0.493 ± 0.015 [-0.556, -0.431] (0/3)**" in rows[f"flowrl-noclip 4x2 - grpo 4x2, {paired}"]
    assert len(rows) == 5 + 3  # 5 groups; flowrl 1x1, flowrl 4x2, flowrl-noclip 4x2 against GRPO
    # kind="all": + the variant against plain FlowRL, + each method against itself on-policy
    rows = {line.split(" |")[0][2:]: line for line in report.table({"runs": runs}, kind="all").splitlines()[2:]}
    assert len(rows) == 5 + 3 + 1 + 2
    assert "| **-1.000 ± 0.000 [-1.000, -1.000] (0/3)** |" in rows[f"flowrl-noclip 4x2 - flowrl 4x2, {paired}"]
    one = "**+1.000 ± 0.000 [+1.000, +1.000] (3/3)**"  # 4x2 - 1x1 of GRPO: +1 in kl and train_x, every seed
    assert rows[f"grpo 4x2 - grpo, {paired}"].endswith(f"| {one} | {one} |")


def test_t_quantile_and_schedules():
    for df, t in ((1, 12.7062), (2, 4.3027), (9, 2.2622), (19, 2.0930), (29, 2.0452)):  # standard t tables
        assert report.t_quantile(df) == pytest.approx(t, abs=1e-4)
    assert report.parse_schedule("4x2") == (4, 2) and report.parse_schedule("1X1") == (1, 1)
    for bad in ("4", "0x2", "ax2"):
        with pytest.raises(Exception, match="schedule"):
            report.parse_schedule(bad)
    args = exp.parse_args(["tiny", "--schedules", "2x3"])  # 8 prompts x 8: 3 mini-batches do not split it
    with pytest.raises(ValueError, match="--schedules 2x3: 3 mini-batches"):
        exp.make_config(args, "flowrl", 0, args.schedules[0])
    cfg = exp.make_config(args, "flowrl-noclip", 0, (4, 2))
    assert (cfg.train.epochs, cfg.train.mini_batch_size, cfg.algo.clip) == (4, 32, [-1.0, -1.0])
    cfg = exp.make_config(args, "flowrl-seqmean", 0, (1, 1))
    assert (cfg.train.epochs, cfg.train.mini_batch_size, cfg.algo.importance) == (1, 0, "sequence_mean")
    assert exp.make_config(args, "flowrl-beta5", 0).algo.beta == 5.0


@pytest.mark.parametrize("raw", [False, True])
def test_rl_step_reward_given_to_the_loss(monkeypatch, raw):
    """flowrl-raw hands FlowRL the raw rewards; flowrl (and grpo) the group z-score."""
    args = exp.parse_args(["tiny", "--layers", "1", "--hidden", "16", "--group-size", "4", "--micro-batch-size", "8"])
    sections = dict(model={"path": "tiny-llama", "tiny_layers": 1, "tiny_hidden": 16}, task={"name": "synthetic"})
    cfg = exp.make_config(args, "flowrl-raw" if raw else "flowrl", 0, **sections)
    assert cfg.algo.name == "flowrl"
    policy, ref, tok = exp.build_policy(cfg)
    opt, sched = exp.train.build_optimizer(policy, cfg)
    task = exp.DigitSumTask(tok, 2, [5, 9])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # 2 prompts x G=4
    seen = []
    real = exp.algorithms.objective

    def spy(out, old_logp, ref_logp, r_hat, *a, **k):
        seen.append(r_hat.clone())
        return real(out, old_logp, ref_logp, r_hat, *a, **k)

    monkeypatch.setattr(exp.algorithms, "objective", spy)
    exp.rl_step(policy, ref, tok, opt, sched, cfg, [task.messages(5), task.messages(9)], lambda b: rewards,
                raw_reward=raw)
    got = torch.cat(seen)
    want = rewards if raw else exp.algorithms.normalized_rewards(rewards, 4)
    assert torch.equal(got, want) and (raw or not torch.equal(got, rewards))


def test_from_json_merges_runs_saved_by_separate_processes(tmp_path):
    """--from-json: seeds run as separate processes give one table; duplicates and wrong settings are refused."""
    def saved(seed, acc):
        runs = [{"algo": a, "seed": seed, "history": [{"step": 0, "accuracy": 0.0}, {"step": 4, "accuracy": v}]}
                for a, v in (("flowrl", acc), ("grpo", acc / 2))]
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"setting": "countdown", "args": {"seeds": [seed]}, "runs": runs}))
        return str(path)

    a, b = saved(0, 0.4), saved(1, 0.2)
    res = exp.main(["countdown", "--from-json", a, b, "--out", str(tmp_path / "out"), "--no-plots"])
    assert [(r["algo"], r["seed"]) for r in res["runs"]] == [("flowrl", 0), ("grpo", 0), ("flowrl", 1), ("grpo", 1)]
    assert res["args"]["seeds"] == [0, 1]
    md = (tmp_path / "out" / "diversity_countdown_table.md").read_text().splitlines()
    assert md[2].startswith("| flowrl (n=2) | 0.300 ± 0.141 |") and md[3].startswith("| grpo (n=2) | 0.150 ± 0.071 |")
    with pytest.raises(ValueError, match="already in an earlier file"):
        report.load_runs([a, a], "countdown")
    other = json.loads(Path(a).read_text())  # the same seed at another update schedule is a different run
    for r in other["runs"]:
        r["schedule"] = "4x2"
    (tmp_path / "s0_4x2.json").write_text(json.dumps(other))
    assert len(report.load_runs([a, str(tmp_path / "s0_4x2.json")], "countdown")["runs"]) == 4
    with pytest.raises(ValueError, match="expected 'tiny'"):
        report.load_runs([a], "tiny")


def test_offpolicy_grid_script_parses(tmp_path):
    """flowrl/experiments/offpolicy_grid.sh: valid bash, and a bad PART stops before any run."""
    script = Path(exp.__file__).with_name("offpolicy_grid.sh")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    res = subprocess.run(["bash", str(script)], env={"PART": "nope", "OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert res.returncode == 2 and "PART=nope: use all, main, ablations, headline or weights" in res.stderr
    assert list(tmp_path.iterdir()) == []


# every public name of flowrl/experiments/diversity.py before issue 25 renamed it
OLD_PUBLIC_NAMES = (
    "COLORS", "CPU", "DigitSumTask", "LINESTYLES", "MALFORMED", "MALFORMED_FLOOR", "METHODS", "SUMMARY_KEYS",
    "TRAIN_KEYS", "answer_distributions", "build_policy", "contrasts", "digit_weights", "exact_metrics", "final",
    "fmt", "histogram", "label", "load_runs", "main", "make_config", "paired", "parse_args", "parse_schedule",
    "plot", "plot_schedules", "pretrain", "rl_step", "run_countdown", "run_tiny", "sampled_metrics",
    "schedule_of", "t_quantile", "table", "train_means")


def test_deprecated_alias_warns_once_and_reexports_the_same_objects():
    """``from flowrl.experiments import diversity`` (the experiment's old name) still works: one
    DeprecationWarning naming the new module, and every old public name is the renamed modules' object."""
    sys.modules.pop("flowrl.experiments.diversity", None)
    with pytest.warns(DeprecationWarning, match="flowrl.experiments.flowrl_vs_grpo"):
        shim = importlib.import_module("flowrl.experiments.diversity")
    for name in OLD_PUBLIC_NAMES:
        owner = exp if hasattr(exp, name) else report
        assert getattr(shim, name) is getattr(owner, name), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module("flowrl.experiments.diversity")  # imported already: no second warning


def test_deprecated_alias_runs_as_a_script(tmp_path):
    """``python -m flowrl.experiments.diversity`` runs the experiment's main (here --from-json) and shows
    the warning (the default filters show a DeprecationWarning raised in __main__)."""
    runs = [{"algo": a, "seed": 0, "history": [{"step": 0, "accuracy": 0.0}, {"step": 4, "accuracy": v}]}
            for a, v in (("flowrl", 0.4), ("grpo", 0.2))]
    (tmp_path / "s0.json").write_text(json.dumps({"setting": "countdown", "args": {"seeds": [0]}, "runs": runs}))
    root = Path(exp.__file__).parents[2]
    res = subprocess.run([sys.executable, "-m", "flowrl.experiments.diversity", "countdown", "--from-json",
                          str(tmp_path / "s0.json"), "--out", str(tmp_path / "out"), "--no-plots"],
                         cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "DeprecationWarning" in res.stderr and "flowrl.experiments.flowrl_vs_grpo" in res.stderr
    assert (tmp_path / "out" / "diversity_countdown_table.md").read_text().splitlines()[2].startswith(
        "| flowrl (n=1) | 0.400 ± 0.000 |")
