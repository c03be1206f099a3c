"""Fault injection for tests: the environment variable FLOWRL_FAULT names points where a run fails.

    FLOWRL_FAULT="checkpoint_write@4"             die (os._exit) half-way through step 4's checkpoint
    FLOWRL_FAULT="exit_after_checkpoint@2"        die right after step 2's checkpoint is complete
    FLOWRL_FAULT="nan_loss@2,nan_loss@4-"         NaN loss at step 2 and at every step from 4 on
    FLOWRL_FAULT="nan_param@2"                    a NaN weight after step 2's optimizer step (finite loss)

Steps are 1-based training steps: ``N``, ``N-M`` or ``N-`` (from N on). ``os._exit`` skips every
``finally`` and atexit handler, like a SIGKILL from the scheduler would. Unset, every check is False.
"""
from __future__ import annotations

import os

ENV = "FLOWRL_FAULT"
EXIT_CODE = 17


def active(point: str, step: int) -> bool:
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        name, _, steps = item.strip().partition("@")
        if name != point:
            continue
        lo, dash, hi = steps.partition("-")
        if int(lo) <= step and (int(hi) >= step if hi else bool(dash) or int(lo) == step):
            return True
    return False


def exit_if(point: str, step: int) -> None:
    """Kill this process now (no cleanup) when ``point@step`` is set."""
    if active(point, step):
        print(f"[flowrl] FLOWRL_FAULT: {point}@{step}, exiting", flush=True)
        os._exit(EXIT_CODE)
