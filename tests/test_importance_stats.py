"""flowrl.algorithms.importance_stats on hand-built batches: known log-ratios -> known clip fractions and
mean |log w|, exactly (dyadic values, so every float32 sum and mean is exact); and one trainer step of
tiny.toml with epochs > 1 writes them to metrics.jsonl."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import flowrl_kernels
from flowrl import algorithms, config, distributed, model, rollout, tasks, train
from flowrl.config import Algo
from flowrl.metrics import Metrics

TINY = str(Path(__file__).resolve().parents[1] / "flowrl" / "configs" / "tiny.toml")
CPU_ENV = distributed.Env(0, 0, 1, torch.device("cpu"), None)

# 5 rows, T = 4; row 3 is empty (mask all 0) and must not count. Per-token log-ratios (logp - old) at the
# valid tokens; the masked tokens carry garbage that must not leak in.
LENGTHS = [1, 2, 4, 0, 2]
TOKEN_DIFFS = [[-0.5], [-0.0625, -0.0625], [0.125, 0.0625, 0.0, 0.0625], [], [0.25, 0.25]]
# token sums: -0.5 (w = 0.61 < 0.8: low), -0.125 (0.88: inside), 0.25 (1.28 > 1.2: high), 0.5 (1.65: high)
# token means: -0.5 (low), -0.0625 (inside), 0.0625 (inside), 0.25 (high)


def hand_batch():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(5, 4, generator=g) * 4  # arbitrary float32 old log-probs
    old = torch.round(old * 64) / 64          # dyadic: old + diff is exact in float32
    mask = torch.zeros(5, 4)
    logp = old + 100.0                        # garbage at masked tokens (ratio e^100)
    for i, (n, diffs) in enumerate(zip(LENGTHS, TOKEN_DIFFS)):
        mask[i, :n] = 1
        logp[i, :n] = old[i, :n] + torch.tensor(diffs)
    return logp, old, mask


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.int64])
def test_flowrl_sequence_level_exact(mask_dtype):
    logp, old, mask = hand_batch()
    st = algorithms.importance_stats(logp, old, mask.to(mask_dtype), Algo(name="flowrl"))
    assert st["is_clip_low_frac"].item() == 1 / 4
    assert st["is_clip_high_frac"].item() == 2 / 4
    assert st["is_log_w_abs"].item() == (0.5 + 0.125 + 0.25 + 0.5) / 4
    # the split adds up to the loss's own clip fraction (every impl)
    for impl in ("torch", None):
        _, fl = flowrl_kernels.flowrl_loss(logp, old, old, torch.zeros(5), torch.zeros(5), mask, impl=impl)
        assert fl["clip_frac"].item() == st["is_clip_low_frac"].item() + st["is_clip_high_frac"].item()


def test_flowrl_sequence_mean_level_and_bounds():
    logp, old, mask = hand_batch()
    st = algorithms.importance_stats(logp, old, mask, Algo(name="flowrl", importance="sequence_mean"))
    assert st["is_clip_low_frac"].item() == 1 / 4 and st["is_clip_high_frac"].item() == 1 / 4
    assert st["is_log_w_abs"].item() == (0.5 + 0.0625 + 0.0625 + 0.25) / 4
    # one-sided clip [-1, 1.5]: no lower bound; only 1.65 is above 1.5
    st = algorithms.importance_stats(logp, old, mask, Algo(name="flowrl", clip=[-1.0, 1.5]))
    assert st["is_clip_low_frac"].item() == 0.0 and st["is_clip_high_frac"].item() == 1 / 4
    # no clipping at all, or no weights: nothing clipped, the token-sum ratio's |log w| still reported
    for algo in (Algo(name="flowrl", clip=[-1.0, -1.0]), Algo(name="flowrl", importance="none")):
        st = algorithms.importance_stats(logp, old, mask, algo)
        assert st["is_clip_low_frac"].item() == 0.0 and st["is_clip_high_frac"].item() == 0.0
        assert st["is_log_w_abs"].item() == 1.375 / 4


def test_grpo_token_level_exact():
    logp, old, mask = hand_batch()
    # 9 valid tokens, log-ratios -0.5, -0.0625 x2, 0.125, 0.0625 x2, 0, 0.25 x2; range [0.75, 1.25] in log
    # space [-0.288, 0.223]: -0.5 low; 0.25, 0.25 high
    st = algorithms.importance_stats(logp, old, mask, Algo(name="grpo", eps=[0.25, 0.25]))
    assert st["is_clip_low_frac"].item() == (torch.tensor(1.0) / torch.tensor(9.0)).item()
    assert st["is_clip_high_frac"].item() == (torch.tensor(2.0) / torch.tensor(9.0)).item()
    assert st["is_log_w_abs"].item() == (torch.tensor(1.375) / torch.tensor(9.0)).item()
    # eps_low 0: every token with ratio < 1 is outside [1, 1.25]
    st = algorithms.importance_stats(logp, old, mask, Algo(name="grpo", eps=[0.0, 0.25]))
    assert st["is_clip_low_frac"].item() == (torch.tensor(3.0) / torch.tensor(9.0)).item()


def test_on_policy_is_exactly_zero():
    logp, _, mask = hand_batch()
    for algo in (Algo(name="flowrl"), Algo(name="grpo")):
        st = algorithms.importance_stats(logp, logp, mask, algo)
        assert all(v.item() == 0.0 for v in st.values()), st


def test_objective_stats_carry_them():
    logp, old, mask = hand_batch()
    out = {"logp": logp.requires_grad_(), "log_z": torch.zeros(5, requires_grad=True)}
    _, st = algorithms.objective(out, old, old, torch.zeros(5), mask, Algo(name="flowrl"), n_seq=5, n_tok=9)
    assert st["is_clip_low_frac"].item() == 1 / 4 and st["is_clip_high_frac"].item() == 2 / 4
    _, st = algorithms.objective(out, old, None, torch.zeros(5), mask, Algo(name="grpo"), n_seq=5, n_tok=9)
    assert {"is_clip_low_frac", "is_clip_high_frac", "is_log_w_abs"} <= set(st)


# ----------------------------------------------------------------------------------------------------
# the trainer: metrics.jsonl of tiny.toml runs
# ----------------------------------------------------------------------------------------------------
def test_trainer_logs_them_to_metrics_jsonl(tmp_path):
    """One FlowRL step of tiny.toml (16 sequences), epochs 2 x 2 mini-batches of 8 = 4 updates, 3 of them
    on a policy that has moved since it sampled: the three stats are in metrics.jsonl, |log w| > 0, and the
    low / high split adds up to the loss's own clip fraction (micro-batch by micro-batch)."""
    cfg = config.load(["--config", TINY, "--train.steps=1", "--eval.prompts=0", f"--run.out_dir={tmp_path}",
                       "--train.epochs=2", "--train.mini_batch_size=8"])
    torch.manual_seed(0)
    policy, ref, tok = model.build(cfg, CPU_ENV)
    opt, sched = train.build_optimizer(policy, cfg)
    metrics = Metrics(cfg.run_dir, True, 1)
    train.train_step(train.Trainer(cfg=cfg, env=CPU_ENV, policy=policy, sampler=rollout.HFRollout(tok, CPU_ENV.device),
                                   metrics=metrics, ref=ref, opt=opt, sched=sched, task=tasks.build(cfg, "train")), 0)
    metrics.close()
    rec = json.loads((cfg.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= rec["is_clip_low_frac"] <= 1.0 and 0.0 <= rec["is_clip_high_frac"] <= 1.0
    assert 0.0 < rec["is_log_w_abs"] < math.inf
    assert rec["is_clip_low_frac"] + rec["is_clip_high_frac"] == pytest.approx(rec["is_clip_frac"], abs=1e-6)
