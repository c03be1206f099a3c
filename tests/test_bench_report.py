"""bench/report.py renders what a GPU run of bench/gpu.sh writes (checked on the CPU with a small
synthetic run): the device-clock columns, the host overhead, the part log, and the planned cases a run
did not measure; and merge() unions the parts of one run."""
import json
import os

import pytest

report = pytest.importorskip("bench.report")


def _bench(name, **extra):
    info = dict(op="token_logprobs", provider=name.split("-")[-1].rstrip("]"), model="qwen2.5-7b", N=8192,
                V=152064, dtype="bfloat16", mode="forward", median_ms=1.0, p20_ms=0.9, p80_ms=1.1)
    info.update(extra)
    return {"name": name, "stats": {"median": info["median_ms"] / 1e3}, "extra_info": info}


def _run(path, benchmarks, **mi):
    fb = dict(device="NVIDIA H200", device_type="cuda", dtype="bfloat16", commit="abc1234", copy_GBps=4111.0,
              matmul_TFLOPs=746.0, matmul_dtype="bfloat16")
    fb.update(mi)
    with open(path, "w") as f:
        json.dump({"benchmarks": benchmarks, "machine_info": {"flowrl_bench": fb}, "commit_info": {},
                   "datetime": "2026-11-28"}, f)


def test_gpu_section_device_columns_parts_and_coverage(tmp_path):
    a = tmp_path / "part-1.json"
    b = tmp_path / "part-2.json"
    tid = "test_token_logprobs[qwen2.5-7b-N8192-forward-{}]"
    _run(a, [_bench(tid.format("triton"), device_ms=0.7, overhead_ms=0.3, device_pct_floor=84.0, GBps=3018.0,
                    pct_floor=73.4)],
         planned=[tid.format(p) for p in ("triton", "trl", "liger")], skipped={tid.format("liger"): "no GPU peer"})
    _run(b, [], planned=[tid.format("flash-attn")])
    parts = tmp_path / "parts.jsonl"
    parts.write_text('{"total_budget_s": 300}\n'
                     '{"name": "headline forward", "filter": "x", "limit_s": 55, "took_s": 40, "status": "ok"}\n'
                     '{"name": "other models", "filter": "y", "limit_s": 0, "took_s": 0, "status": "left out: no time"}\n')
    merged = tmp_path / "gpu-nvidia-h200-x.json"
    report.main(["--merge", str(merged), "--parts", str(parts), str(a), str(b)])
    mi = json.load(open(merged))["machine_info"]["flowrl_bench"]
    assert mi["total_budget_s"] == 300 and len(mi["parts"]) == 2
    assert set(mi["planned"]) == {tid.format(p) for p in ("triton", "trl", "liger", "flash-attn")}

    (tmp_path / "gpu-nvidia-h200-x.notes.md").write_text("Hand note: the smollm2 shapes did not fit.")
    out = tmp_path / "RESULTS.md"
    report.main([str(merged), "--out", str(out), "--png-dir", str(tmp_path)])
    text = out.read_text()
    assert "## NVIDIA H200" in text and "Hand note: the smollm2 shapes did not fit." in text
    assert "| device ms | host overhead ms |" in text and "device % floor" in text
    row = next(ln for ln in text.splitlines() if "| triton |" in ln)
    assert "| 0.700 |" in row and "| 0.300 |" in row and "| 84.0 |" in row
    assert "| other models | `y` | 0 | 0 | left out: no time |" in text
    assert "Measured 1 of the 4 cases the run planned for token_logprobs." in text
    missing = next(ln for ln in text.splitlines() if ln.startswith("- qwen2.5-7b-N8192 forward:"))
    assert "trl" in missing and "liger (skipped)" in missing and "flash-attn" in missing
    assert os.path.exists(tmp_path / "gpu-nvidia-h200-x.png")


def test_cpu_run_has_no_device_columns(tmp_path):
    p = tmp_path / "cpu-1.json"
    _run(p, [_bench("test_token_logprobs[qwen2.5-7b-N128-forward-native]")], device="AMD EPYC", device_type="cpu")
    out = tmp_path / "R.md"
    report.main([str(p), "--out", str(out), "--png-dir", str(tmp_path)])
    text = out.read_text()
    assert "device ms" not in text and "| native |" in text
