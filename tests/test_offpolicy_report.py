"""flowrl/experiments/offpolicy_report.py (issue 28) on hand-built runs with answers worked out by hand:
the t-interval and the exact binomial interval, the collapse rule, pooled / collapse-dropped / per-draw
contrasts, the draws' disjointness, the stamp's provenance, and the grid script's seed ranges."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
from pathlib import Path

import pytest

from flowrl.experiments import offpolicy_report as rep

ACC, MAL = "exact_accuracy", "exact_malformed"
METRICS = ((ACC, "accuracy"), (MAL, "malformed"))


def run(algo, seed, acc, mal=0.01, schedule="4x2"):
    return {"algo": algo, "seed": seed, "schedule": schedule,
            "history": [{"step": 0, ACC: 0.1, MAL: 0.0}, {"step": 100, ACC: acc, MAL: mal}]}


# FlowRL - GRPO at 4x2 by seed: +0.3, -0.1, +0.6 (draw A) and -0.1, +0.2, +0.4 (draw B); FlowRL seed 3 collapsed
FLOW = {0: 0.5, 1: 0.3, 2: 0.9, 3: 0.1, 4: 0.4, 5: 0.6}
GRPO = {0: 0.2, 1: 0.4, 2: 0.3, 3: 0.2, 4: 0.2, 5: 0.2}


def draws():
    def draw(seeds):
        return {"setting": "tiny", "args": {"seeds": seeds}, "runs": [r for s in seeds for r in
                                            (run("flowrl", s, FLOW[s], 0.9 if s == 3 else 0.01), run("grpo", s, GRPO[s]))]}
    return {"A": draw([0, 1, 2]), "B": draw([3, 4, 5])}


def test_t_interval_by_hand():
    s = rep.t_interval([0.3, -0.1, 0.6])
    # mean 0.2667, sample std 0.3512, s.e. 0.2028; t(2 d.o.f., 0.975) = 4.3027 -> [-0.606, +1.139]
    assert s["n"] == 3 and s["pos"] == 2
    assert s["mean"] == pytest.approx(0.8 / 3) and s["se"] == pytest.approx(0.20276, abs=1e-5)
    assert (s["lo"], s["hi"]) == (pytest.approx(-0.6058, abs=1e-4), pytest.approx(1.1391, abs=1e-4))
    one = rep.t_interval([0.4])
    assert one["mean"] == 0.4 and one["lo"] == -math.inf and one["hi"] == math.inf
    with pytest.raises(ValueError, match="no differences"):
        rep.t_interval([])


def test_clopper_pearson_known_values():
    # closed forms at the edges: 0 of n -> [0, 1 - 0.025^(1/n)], n of n -> [0.025^(1/n), 1]
    assert rep.clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1, abs=1e-10))  # 0.3085
    assert rep.clopper_pearson(0, 30)[1] == pytest.approx(0.11570, abs=1e-5)
    assert rep.clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1, abs=1e-10), 1.0)
    lo, hi = rep.clopper_pearson(5, 10)  # binomial tables: [0.1871, 0.8129]
    assert (lo, hi) == (pytest.approx(0.18709, abs=1e-5), pytest.approx(0.81291, abs=1e-5))
    lo, hi = rep.clopper_pearson(2, 10)  # [0.0252, 0.5561]
    assert (lo, hi) == (pytest.approx(0.02521, abs=1e-5), pytest.approx(0.55610, abs=1e-5))
    lo3, hi3 = rep.clopper_pearson(3, 30)
    lo27, hi27 = rep.clopper_pearson(27, 30)
    assert lo3 == pytest.approx(1 - hi27, abs=1e-10) and hi3 == pytest.approx(1 - lo27, abs=1e-10)
    for k, n in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="clopper_pearson"):
            rep.clopper_pearson(k, n)


def test_report_pools_draws_and_drops_collapsed_pairs():
    res = rep.report(draws(), cells=[("4x2", "flowrl"), ("4x2", "grpo")],
                     contrasts=[(("4x2", "flowrl"), ("4x2", "grpo"))], metrics=METRICS, cell_metrics=METRICS)
    flow, grpo = res["collapse"]
    assert (flow["collapsed"], flow["n"], flow["per_draw"]) == (1, 6, {"A": [0, 3], "B": [1, 3]})
    assert (grpo["collapsed"], grpo["n"]) == (0, 6)
    assert (flow["lo"], flow["hi"]) == rep.clopper_pearson(1, 6) and flow["max_rest"] == pytest.approx(0.01)
    c = res["contrasts"][0]["metrics"][ACC]
    diffs = [FLOW[s] - GRPO[s] for s in range(6)]
    t5, t4 = 2.5706, 2.7764  # t tables, 0.975 quantile, 5 and 4 d.o.f.
    m, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(6)
    assert c["all"]["mean"] == pytest.approx(m) and c["all"]["pos"] == 4 and c["all"]["n"] == 6
    assert c["all"]["hi"] == pytest.approx(m + t5 * se, abs=1e-4)
    # the pair of seed 3 goes (its FlowRL run collapsed), the others stay
    kept = [d for s, d in enumerate(diffs) if s != 3]
    assert c["dropped"] == 1 and c["kept"]["n"] == 5 and c["kept"]["mean"] == pytest.approx(statistics.mean(kept))
    assert c["kept"]["lo"] == pytest.approx(statistics.mean(kept) - t4 * statistics.stdev(kept) / math.sqrt(5),
                                            abs=1e-4)
    # a fresh 10-seed draw's mean: m ± t5 * s * sqrt(1/6 + 1/10)
    half = t5 * statistics.stdev(diffs) * math.sqrt(1 / 6 + 1 / 10)
    assert c["next10"] == (pytest.approx(m - half, abs=1e-4), pytest.approx(m + half, abs=1e-4))
    assert c["per_draw"]["A"]["mean"] == pytest.approx(0.8 / 3) and c["per_draw"]["B"]["n"] == 3
    # cell means with and without the collapsed run
    row = res["cells"][0]
    assert row["all"][ACC][2] == 6 and row["kept"][ACC] == (pytest.approx(statistics.mean([0.5, 0.3, 0.9, 0.4, 0.6])),
                                                             pytest.approx(statistics.stdev([0.5, 0.3, 0.9, 0.4, 0.6])), 5)
    md = rep.markdown(res, metrics=METRICS, cell_metrics=METRICS)
    assert "| FlowRL 4x2 | 1/6 | 0.167 [0.004, 0.641] | 0/3 | 1/3 | 1/6 | 0.010 |" in md
    assert f"| FlowRL 4x2 − GRPO 4x2 | {rep.fmt_interval(c['all'])} | {rep.fmt_interval(c['kept'])} | 1 | [" in md
    with pytest.raises(ValueError, match="prediction_interval"):
        rep.prediction_interval([0.1])


def test_difference_of_differences_drops_a_seed_when_any_of_its_four_runs_collapsed():
    # (GRPO 4x2 - GRPO 1x1) - (FlowRL 4x2 - FlowRL 1x1) per seed: (0.6-0.2)-(0.3-0.2) = 0.3, (0.7-0.2)-(0.2-0.1)
    # = 0.4, (0.5-0.1)-(0.4-0.2) = 0.2; seed 1's GRPO 1x1 run collapsed
    vals = {0: (0.3, 0.6, 0.2, 0.2), 1: (0.2, 0.7, 0.1, 0.2), 2: (0.4, 0.5, 0.2, 0.1)}  # F4, G4, F1, G1
    runs = []
    for sd, (f4, g4, f1, g1) in vals.items():
        runs += [run("flowrl", sd, f4), run("grpo", sd, g4), run("flowrl", sd, f1, schedule="1x1"),
                 run("grpo", sd, g1, mal=0.7 if sd == 1 else 0.01, schedule="1x1")]
    cs = (("4x2", "grpo"), ("1x1", "grpo"), ("4x2", "flowrl"), ("1x1", "flowrl"))
    res = rep.report({"A": {"runs": runs}}, cells=[], contrasts=[cs], metrics=METRICS)
    c = res["contrasts"][0]["metrics"][ACC]
    assert c["all"]["mean"] == pytest.approx(0.3) and c["all"]["pos"] == 3 and c["all"]["n"] == 3
    assert c["dropped"] == 1 and c["kept"]["mean"] == pytest.approx(0.25) and c["kept"]["n"] == 2
    md = rep.markdown(res, metrics=METRICS, cell_metrics=())
    assert "| (GRPO 4x2 − GRPO 1x1) − (FlowRL 4x2 − FlowRL 1x1) | **+0.300 [+0.052, +0.548] (3/3)** |" in md


def test_holdout_checks_one_draw_against_the_others():
    cs = [(("4x2", "flowrl"), ("4x2", "grpo"))]
    (r,) = rep.holdout(draws(), "B", contrasts=cs, metrics=METRICS[:1])
    # others = draw A: differences +0.3, -0.1, +0.6 (mean 0.267, s 0.351); B's mean (-0.1 + 0.2 + 0.4) / 3
    s = statistics.stdev([0.3, -0.1, 0.6])
    half = 4.3027 * s * math.sqrt(1 / 3 + 1 / 3)
    assert r["mean"] == pytest.approx(0.5 / 3) and r["n"] == 3 and r["in_ci"] and r["in_pred"]
    assert r["pred"] == [pytest.approx(0.8 / 3 - half, abs=1e-3), pytest.approx(0.8 / 3 + half, abs=1e-3)]
    assert r["ci"] == [pytest.approx(-0.6058, abs=1e-4), pytest.approx(1.1391, abs=1e-4)]
    far = draws()
    for x in far["B"]["runs"]:  # B's FlowRL runs 2.0 higher: outside both intervals
        x["history"][-1][ACC] += 2.0 * (x["algo"] == "flowrl")
    (r,) = rep.holdout(far, "B", contrasts=cs, metrics=METRICS[:1])
    assert not r["in_ci"] and not r["in_pred"]
    assert "B: 0 of 1 inside the prediction interval" in rep.holdout_markdown([r], METRICS)
    with pytest.raises(ValueError, match="holdout: draw 'C'"):
        rep.holdout(draws(), "C")


def test_collapse_threshold_is_strict_and_bold_marks_intervals_that_exclude_zero():
    assert rep.collapsed({MAL: 0.51}) and not rep.collapsed({MAL: 0.5}) and rep.collapsed({MAL: 0.3}, at=0.2)
    assert rep.fmt_interval({"mean": 0.2, "lo": 0.1, "hi": 0.3, "pos": 3, "n": 3}) == "**+0.200 [+0.100, +0.300] (3/3)**"
    assert rep.fmt_interval({"mean": 0.2, "lo": -0.1, "hi": 0.5, "pos": 2, "n": 3}) == "+0.200 [-0.100, +0.500] (2/3)"
    assert rep.fmt_interval(None) == "—"


def test_draws_must_be_disjoint_in_seeds():
    d = draws()
    d["B"]["runs"].append(run("grpo", 2, 0.1, schedule="1x1"))  # seed 2 is draw A's
    with pytest.raises(ValueError, match=r"draws 'A' and 'B' share seeds \[2\]"):
        rep.pool(d)


def test_cli_and_stamp(tmp_path):
    """Files in, tables and JSON out; the stamp writes commit, machine and wall time into a draw's JSON."""
    paths = []
    for name, res in draws().items():
        p = tmp_path / f"diversity_{name}.json"
        p.write_text(json.dumps(res))
        (tmp_path / f"diversity_{name}_summary.md").write_text("| table |\n")
        paths.append(f"{name}={p}")
    grid = rep.main(["stamp", str(tmp_path / "diversity_A.json"), "--draw", "A", "--part", "headline",
                     "--wall-s", "12.4", "--parallel", "2", "--commit", "abc123"])
    assert grid["commit"] == "abc123" and grid["wall_s"] == 12 and grid["seeds"] == [0, 1, 2]
    assert grid["nproc"] >= 1 and grid["torch"] and grid["cpu"]
    assert "commit abc123" in (tmp_path / "diversity_A_summary.md").read_text()
    res = rep.main(paths + ["--out", str(tmp_path / "out"), "--name", "pooled", "--holdout"])
    assert {r["held"] for r in res["holdout"]} == {"A", "B"}
    assert "leave one draw out" in (tmp_path / "out" / "diversity_pooled_holdout.md").read_text()
    assert res["draws"]["A"]["grid"]["commit"] == "abc123" and res["draws"]["B"]["grid"] is None
    md = (tmp_path / "out" / "diversity_pooled.md").read_text()
    assert "- A: seeds 0-2 (3); commit abc123" in md and "| FlowRL 4x2 − GRPO 4x2 |" in md
    assert json.loads((tmp_path / "out" / "diversity_pooled.json").read_text())["collapse"][0]["collapsed"] == 1
    with pytest.raises(ValueError, match="write NAME=PATH"):
        rep.load_draws([str(tmp_path / "diversity_A.json")])
    assert rep.git_commit() != "unknown"


def test_grid_script_seed_ranges_and_parts(tmp_path):
    script = Path(rep.__file__).with_name("offpolicy_grid.sh")
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "OUT": str(tmp_path)}

    def cells(**kw):
        res = subprocess.run(["bash", str(script)], env={**env, **kw}, capture_output=True, text=True)
        return res.returncode, res.stdout.split("\n")[:-1], res.stderr

    rc, out, _ = cells(SEEDS="30..36", PART="weights", DRAW="d4")
    assert rc == 0 and out == ["4x2_flowrl-noclip,flowrl-noweight_s30 4x2 flowrl-noclip,flowrl-noweight 30,31,32,33,34",
                               "4x2_flowrl-noclip,flowrl-noweight_s35 4x2 flowrl-noclip,flowrl-noweight 35,36",
                               "4x2_flowrl-seqmean_s30 4x2 flowrl-seqmean 30,31,32,33,34",
                               "4x2_flowrl-seqmean_s35 4x2 flowrl-seqmean 35,36"]
    rc, out, _ = cells(FIRST="40", LAST="41", PART="headline weights")
    assert rc == 0 and [c.split()[0] for c in out] == ["1x1_flowrl,grpo_s40", "4x2_flowrl,grpo_s40",
                                                       "4x2_flowrl-noclip,flowrl-noweight_s40", "4x2_flowrl-seqmean_s40"]
    rc, out, _ = cells(SEEDS="3 5")
    assert rc == 0 and len(out) == 7 and out[0] == "1x1_flowrl,grpo_s3 1x1 flowrl,grpo 3,5"  # all: 7 cells
    rc, _, err = cells(SEEDS="1,2")
    assert rc == 2 and "SEEDS=1,2: use a range FIRST..LAST" in err
    rc, _, err = cells(PART="headline nope")
    assert rc == 2 and "use all, main, ablations, headline or weights" in err
    assert list(tmp_path.iterdir()) == []  # a dry run creates nothing
