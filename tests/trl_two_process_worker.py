"""Worker of test_trl_flowrl.test_two_processes: one rank of a 2-process (gloo, CPU) FlowRLTrainer run.

    torchrun --nproc_per_node 2 tests/trl_two_process_worker.py OUT_DIR

Trains the tiny model 2 steps under accelerate's multi-process CPU mode, then checks that every rank holds
the same policy and the same log Z head (DDP averages the policy's gradients; FlowRLTrainer averages the
head's), that each rank scored different completions, and writes rank 0's log history to OUT_DIR/result.json.
"""
import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import test_trl_flowrl as T  # noqa: E402


def main(out: Path) -> None:
    trainer, z0 = T._train(out, 2, ddp_backend="gloo")
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
    flat = lambda ps: torch.cat([p.detach().reshape(-1) for p in ps])  # noqa: E731
    mine = torch.stack([flat(trainer.model.parameters()).sum(), flat(trainer.log_z.parameters()).sum(),
                        flat(trainer.log_z.parameters()).norm()]).double()
    every = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(every, mine)
    same = bool(torch.equal(every[0], every[1]))
    moved = bool(not torch.equal(flat(z0), flat(trainer.log_z.parameters())))
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        (out / "result.json").write_text(json.dumps({"same_on_ranks": same, "log_z_moved": moved, "logs": logs}))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main(Path(sys.argv[1]))
