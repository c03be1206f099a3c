"""The trainer's GPU-only hazards, held on the CPU (review of 2026-11-28, ../shared/gpu/h200-2026-11-28/review.md):

- device choice: more local ranks than GPUs is a clear config error, never "invalid device ordinal";
  run.device='cpu' gives gloo on the CPU even where CUDA exists (item 1);
- run.deterministic switches torch's deterministic algorithms on (item 9);
- bf16 parameters: the log Z head and the prompt pooling stay fp32 under FSDP2 (item 12);
- no host read of a tensor per micro-batch in the training step, and the phase clocks wait for the
  device (items 13, 14);
- peak memory is per step (item 15);
- both models reach FSDP unmoved, so no GPU holds a full copy before sharding (item 16);
- a missing matplotlib does not fail a finished run (issue 14, item 6).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flowrl import config, distributed, metrics, model, plot, rollout, tasks, train

ROOT = Path(__file__).resolve().parents[1]
TINY = str(config.CONFIG_DIR / "tiny.toml")


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices (nothing CUDA is touched by pick_device)."""
    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_count


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group in this process, torn down afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    state = torch.are_deterministic_algorithms_enabled(), dict(os.environ)
    yield
    distributed.cleanup()
    torch.use_deterministic_algorithms(state[0])
    for k in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC"):
        if k not in state[1]:
            os.environ.pop(k, None)


# ----------------------------------------------------------------------------------------------------
# device and backend (item 1), deterministic switch (item 9)
# ----------------------------------------------------------------------------------------------------
def test_more_ranks_than_gpus_is_a_config_error(fake_gpus):
    fake_gpus(1)
    with pytest.raises(config.ConfigError, match=r"2 ranks on this node but only 1 visible CUDA.*run.device=cpu"):
        distributed.pick_device("auto", local_rank=0, local_world=2)
    with pytest.raises(config.ConfigError, match="only 1 visible"):  # every rank stops, not only rank 1
        distributed.pick_device("auto", local_rank=1, local_world=2)
    assert distributed.pick_device("auto", 0, 1) == torch.device("cuda", 0)
    assert distributed.pick_device("cpu", 1, 2) == torch.device("cpu")  # CPU whatever CUDA there is
    fake_gpus(0)
    assert distributed.pick_device("auto", 1, 2) == torch.device("cpu")
    with pytest.raises(config.ConfigError, match="no CUDA device is visible"):
        distributed.pick_device("cuda", 0, 1)
    with pytest.raises(config.ConfigError, match="run.device"):
        config.load(["--config", TINY, "--run.device=gpu"])


def test_cpu_device_uses_gloo_even_with_cuda(fake_gpus, one_rank_group):
    fake_gpus(1)  # init must not call set_device / pick nccl just because CUDA "exists"
    env = distributed.init(1, device="cpu")
    assert env.device.type == "cpu" and dist.get_backend() == "gloo"


def test_deterministic_switch(one_rank_group):
    torch.use_deterministic_algorithms(False)
    distributed.init(1, device="cpu", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"
    cfg = config.load(["--config", TINY, "--run.deterministic=true"])
    assert cfg.run.deterministic is True and config.load(["--config", TINY]).run.deterministic is False


# ----------------------------------------------------------------------------------------------------
# bf16 parameters: log Z head and pooling in fp32 (item 12); build hands CPU modules to FSDP (item 16)
# ----------------------------------------------------------------------------------------------------
def test_masked_mean_pool_counts_in_fp32():
    B, P, H = 3, 300, 8
    hidden = torch.randn(B, P, H).to(torch.bfloat16)
    mask = torch.zeros(B, P, dtype=torch.bool)
    mask[0, -257:] = True  # 257 is not a bf16 number: a bf16 count gives 256
    mask[1] = True
    mask[2, -1] = True
    pooled = model.masked_mean_pool(hidden, mask)
    assert pooled.dtype == torch.float32
    h64 = hidden.double()
    expect = torch.stack([h64[b, mask[b]].mean(0) for b in range(B)])
    torch.testing.assert_close(pooled.double(), expect, rtol=1e-6, atol=1e-6)


def test_bf16_params_keep_log_z_head_fp32(one_rank_group):
    cfg = config.load(["--config", TINY, "--model.param_dtype=bfloat16", "--model.tiny_hidden=32"])
    env = distributed.init(1, device="cpu")
    policy, ref, tok = model.build(cfg, env)
    seen = {}
    head_in = policy.log_z.mlp[0]
    hooks = [head_in.register_forward_pre_hook(lambda m, a: seen.update(head=(a[0].dtype, m.weight.dtype))),
             policy.lm.get_output_embeddings().register_forward_pre_hook(
                 lambda m, a: seen.update(lm=(a[0].dtype, m.weight.dtype)))]
    prompts = [[{"role": "user", "content": "two"}], [{"role": "user", "content": "a longer one"}]]
    enc = rollout.encode_prompts(tok, prompts, env.device)
    labels = torch.tensor([[40, 41, tok.eos_token_id], [42, tok.eos_token_id, model.IGNORE_INDEX]])
    ids = torch.cat([enc["input_ids"], labels.clamp(min=0)], 1)
    attn = torch.cat([enc["attention_mask"], (labels != model.IGNORE_INDEX).long()], 1)
    out = policy(ids, attn, labels, enc["input_ids"].shape[1])
    for h in hooks:
        h.remove()
    assert seen["lm"] == (torch.bfloat16, torch.bfloat16)  # the LM really computes in bf16
    assert seen["head"] == (torch.float32, torch.float32)   # the head does not
    assert out["log_z"].dtype == torch.float32 and torch.isfinite(out["log_z"]).all()
    out["log_z"].sum().backward()
    grads = [p.grad for p in policy.log_z.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # master weights stay fp32


def test_build_shards_before_moving(monkeypatch):
    """model.build hands both models to parallelize on the CPU: the move happens inside, per FSDP
    unit, after sharding (here: env.device 'meta' and no mesh, so parallelize only moves)."""
    cfg = config.load(["--config", TINY])
    env = distributed.Env(0, 0, 1, torch.device("meta"), None)
    entry_devices = []
    real = distributed.parallelize

    def spy(m, env, **kw):
        entry_devices.append({p.device.type for p in m.parameters()})
        return real(m, env, **kw)
    monkeypatch.setattr(distributed, "parallelize", spy)
    policy, ref, _ = model.build(cfg, env)
    assert entry_devices == [{"cpu"}, {"cpu"}]  # reference, then policy
    assert {p.device.type for p in policy.parameters()} == {"meta"} == {p.device.type for p in ref.parameters()}


# ----------------------------------------------------------------------------------------------------
# host syncs and clocks (items 13, 14), per-step peak memory (item 15)
# ----------------------------------------------------------------------------------------------------
_SYNCING = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
_TRAINER_FILES = tuple(str(ROOT / "flowrl" / f) for f in ("train.py", "distributed.py", "algorithms.py", "model.py"))


def _count_host_reads(monkeypatch):
    """Count tensor -> host reads made by the trainer's own code (a host sync on CUDA tensors)."""
    calls = []
    for name in _SYNCING:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            f = sys._getframe(1).f_code.co_filename
            if f in _TRAINER_FILES:
                calls.append((Path(f).name, sys._getframe(1).f_lineno, _name))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def test_no_host_read_per_micro_batch(monkeypatch):
    """The same step split into 2 or into 8 micro-batches makes the same host reads; and the three
    phase clocks each wait for the device."""
    counts, syncs, losses = [], [], []
    real_sync = distributed.synchronize
    for micro in (4, 1):
        cfg = config.load(["--config", TINY, "--rollout.prompts_per_step=2", "--rollout.max_new_tokens=6",
                           f"--train.micro_batch_size={micro}", "--model.tiny_hidden=32", "--logz.dropout=0"])
        env = distributed.Env(0, 0, 1, torch.device("cpu"), None)
        policy, ref, tok = model.build(cfg, env)
        opt, sched = train.build_optimizer(policy, cfg)
        task = tasks.build(cfg, "train")
        m = metrics.Metrics(Path("unused"), False, 1)
        torch.manual_seed(0)
        with monkeypatch.context() as mp:
            calls = _count_host_reads(mp)
            n_sync = []
            mp.setattr(distributed, "synchronize", lambda d: (n_sync.append(d), real_sync(d)))
            trainer = train.Trainer(cfg=cfg, env=env, policy=policy, sampler=rollout.HFRollout(tok, env.device),
                                    metrics=m, ref=ref, opt=opt, sched=sched, task=task)
            rec = train.train_step(trainer, 0)
        counts.append(sorted(calls))
        syncs.append(len(n_sync))
        losses.append(rec["loss"])
    extra = Counter(counts[1]) - Counter(counts[0])
    assert not extra and counts[0] == counts[1], f"host reads that scale with the number of micro-batches: {extra}"
    assert syncs == [3, 3]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # same batch, same mean loss


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only (/proc/self/clear_refs)")
def test_peak_memory_is_per_step():
    dev = torch.device("cpu")
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    before = metrics.peak_memory_mb(dev)
    del big
    metrics.reset_peak_memory(dev)
    after = metrics.peak_memory_mb(dev)
    if after > before - 100:
        pytest.skip("this kernel does not reset the peak RSS through clear_refs")
    assert after < before - 200


# ----------------------------------------------------------------------------------------------------
# plots are a convenience (issue 14, item 6)
# ----------------------------------------------------------------------------------------------------
def test_plot_without_matplotlib_warns(monkeypatch, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.warns(UserWarning, match="matplotlib is not importable.*pip install matplotlib"):
        assert plot.plot_run_or_warn(tmp_path) is None
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_finished_run_without_matplotlib(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from flowrl import train\n"
            f"train.main(['--config', {TINY!r}, '--train.steps=1', '--eval.prompts=0', '--run.cpu_threads=1'])\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "curves.png not drawn: matplotlib is not importable" in res.stderr
    run = tmp_path / "runs" / "tiny"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run / "export" / "config.json").is_file() and not (run / "curves.png").exists()
