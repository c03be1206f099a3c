"""Cost of the checkpoint manifest (flowrl/checkpoint.py): DCP save of a state dict the size of
SmolLM2-135M's training state (policy fp32 + AdamW exp_avg + exp_avg_sq = 3 x 134.5M floats, 1.61 GB),
then ``write_manifest`` (SHA-256 of every file) and ``verify`` (sizes + SHA-256 again), wall clock.

    python -m bench.bench_checkpoint_manifest                 # full size (needs ~2 GB of disk and RAM)
    python -m bench.bench_checkpoint_manifest --scale 0.25    # a quarter of it, then read the ratio

Single process, no process group (DCP's no_dist save); one shard file, as a one-rank run writes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 1.61 GB state to write")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = ap.parse_args(argv)
    import torch.distributed.checkpoint as dcp
    from flowrl import checkpoint

    n = int(134_515_008 * args.scale)  # SmolLM2-135M's parameter count (policy; log Z head adds 0.1%)
    rows = 4096
    state = {k: torch.randn(rows, n // rows) for k in ("model", "exp_avg", "exp_avg_sq")}
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        folder = root / "step_000001"
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
        torch.save({"step": 1}, folder / "trainer_rank0.pt")
        os.sync()
        t1 = time.perf_counter()
        checkpoint.write_manifest(folder, 1)
        t2 = time.perf_counter()
        checkpoint.verify(folder)
        t3 = time.perf_counter()
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"checkpoint {size / 1e9:.3f} GB: DCP save + sync {t1 - t0:.2f} s, manifest {t2 - t1:.2f} s "
              f"({size / 1e9 / (t2 - t1):.2f} GB/s, {100 * (t2 - t1) / (t1 - t0):.0f}% of the save), "
              f"verify {t3 - t2:.2f} s ({size / 1e9 / (t3 - t2):.2f} GB/s); threads {os.cpu_count()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
