"""Launch configurations of the Triton kernels, one table per GPU generation.

Every entry is read by a launcher (``config(kernel, device, dtype)``) and checked on the CPU by
``tests/test_codegen_configs.py``, which compiles it for its arch and reads the SASS: registers, no
spills, shared memory within the SM, and the instructions the entry must produce (``HGMMA`` = wgmma on
sm_90, ``HMMA`` on sm_80, 16-byte loads on the logits stream). ``bench/sweep.py`` times the candidates
of ``CANDIDATES`` on a GPU, prints the best entry per kernel and dtype for that GPU's arch, and with
``--write`` puts them into ``TABLE`` below. Without a GPU, an entry is chosen by that static check and by
reasoning (the comments say which); the sweep's numbers replace the reasoning when a GPU is lent.

Keys: arch "sm90" (H100, H200: Hopper) and "sm80" (A100: Ampere; also used for sm_86 / sm_89). Another
arch takes the nearest lower one in ``ARCHS`` (sm_100 and later take sm90, the newest tuned).
Dtype keys: "16bit" (bf16 / fp16 operands, tensor cores) and "fp32".

Linear forward / backward entries (``linear_fwd``, ``linear_fwd_small_n`` for N <= 64, ``linear_bwd``):
    BLOCK_N x BLOCK_V   logits tile per program (rows x vocab), fp32 accumulator in registers
    BLOCK_H             hidden (K) step of each tl.dot
    GROUP_N             forward only: row blocks per L2 group (see the kernel's comment)
    num_warps, num_stages, ctas_per_sm (programs one SM holds at once: sizes the split count)
token_logprobs entries (``token_logprobs``): elements per thread per block (8 = one 16-byte bf16 load)
and the warps per row (one program per row).
"""
from __future__ import annotations

import functools
import os
from typing import Dict

import torch

ARCHS = ("sm80", "sm90")

# ---- the table (bench/sweep.py --write rewrites the entries between the markers) ----------------
# sweep: begin
TABLE: Dict[str, Dict[str, Dict[str, dict]]] = {
    "sm90": {
        # 128 x 128 x 64 tiles, 8 warps, 4 stages (chosen statically, not yet timed: bench/sweep.py decides
        # on a GPU). Compiled for sm_90 with a bias and V, H, strides divisible by 16 (the Qwen launch):
        # 221 registers, no spills, 128 KiB of shared memory, HGMMA (Triton 3.9; 3.6 checked too). The
        # larger tiles that would need less L2 bandwidth per FLOP (a 128 x 128 tile reads 64 FLOP per
        # operand byte, ~11.7 TB/s at the 746 TFLOP/s an H200 measured; 256 x 128 or 128 x 256, 85 FLOP/B)
        # sit at 255 registers and spill 16-120 B with a bias: they are sweep candidates, not defaults.
        # GROUP_N = 8 row blocks of 128: 7 MiB of Qwen hidden rows resident in L2, each weight tile read
        # from DRAM once per 1024 rows (the old row-major order kept all 58 MiB of hidden in flight).
        "linear_fwd": {
            "16bit": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=4, ctas_per_sm=1),
            # exact fp32 tl.dot runs on FMA units with a larger register footprint: 128 x 128 spilled
            # (255 regs + 48 B stack); 64 x 128 x 32 does not
            "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=3, ctas_per_sm=1),
        },
        "linear_fwd_small_n": {  # N <= 64 (decode-sized batches): wgmma's minimum M is 64
            "16bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_N=1, num_warps=8, num_stages=3, ctas_per_sm=1),
            "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP_N=1, num_warps=8, num_stages=3, ctas_per_sm=1),
        },
        # the dlogits recompute writes a [BLOCK_N, BLOCK_V] tile per program: 128 x 128 (measured at
        # 618 TFLOP/s for the whole backward on an H200, 2026-11-28)
        "linear_bwd": {
            "16bit": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
            "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3),
        },
        # 8 elements per thread: one 16-byte bf16 load; 48 registers per thread for the forward with
        # entropy at 8 elements vs 104 at 16 (5 vs 2 CTAs of 256 threads per SM)
        "token_logprobs": {
            "any": dict(per_thread=8, num_warps=8),
        },
    },
    "sm80": {
        # Ampere: mma.sync (HMMA) from registers, 164 KiB of shared memory per SM: 128 x 128 tiles with
        # 32-wide K steps, 4 stages = 64 KiB, the shape Triton's own A100 matmul configs favour
        "linear_fwd": {
            "16bit": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=4, ctas_per_sm=1),
            "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=3, ctas_per_sm=1),
        },
        "linear_fwd_small_n": {
            "16bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP_N=1, num_warps=4, num_stages=4, ctas_per_sm=1),
            "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP_N=1, num_warps=8, num_stages=3, ctas_per_sm=1),
        },
        "linear_bwd": {
            "16bit": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=4),
            "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3),
        },
        "token_logprobs": {
            "any": dict(per_thread=8, num_warps=8),
        },
    },
}
# sweep: end

# ---- what bench/sweep.py tries (per arch-independent kernel and dtype key) ------------------------
CANDIDATES: Dict[str, Dict[str, list]] = {
    "linear_fwd": {
        "16bit": [dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=64, GROUP_N=g, num_warps=8, num_stages=st, ctas_per_sm=1)
                  for bn, bv, st in ((128, 128, 3), (128, 128, 4), (128, 256, 3), (128, 256, 4), (256, 128, 3))
                  for g in (4, 8, 16)]
        + [dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=4, ctas_per_sm=1)
           for bn, bv in ((128, 256), (256, 128))],
        "fp32": [dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP_N=g, num_warps=8, num_stages=3, ctas_per_sm=1)
                 for g in (4, 8)],
    },
    "linear_bwd": {
        "16bit": [dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=64, num_warps=8, num_stages=st)
                  for bn, bv, st in ((128, 128, 3), (128, 128, 4), (128, 256, 3), (256, 128, 3))],
        "fp32": [dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3)],
    },
    "token_logprobs": {
        "any": [dict(per_thread=pt, num_warps=w) for pt, w in ((8, 8), (8, 4), (8, 16), (16, 8), (16, 4), (4, 8))],
    },
}


def arch_of(device: torch.device) -> str:
    """Table key for a CUDA device: its compute capability, rounded down to a tuned arch."""
    return _arch_of_index(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _arch_of_index(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return arch_key(major * 10 + minor)


def arch_key(cc: int) -> str:
    """"sm90" for compute capability 90 and later, "sm80" for 80-89 (and older: the lowest tuned)."""
    best = ARCHS[0]
    for a in ARCHS:
        if int(a[2:]) <= cc:
            best = a
    return best


def dtype_key(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


@functools.lru_cache(maxsize=None)
def _cached(kernel: str, arch: str, dkey: str) -> dict:
    table = TABLE[arch][kernel]
    return dict(table["any"] if "any" in table else table[dkey])


_OVERRIDE: Dict[str, dict] = {}

# Batch invariance (docs/batch_invariance.md): the fused lm_head forward launches one tile and one vocab
# split per (device, dtype, config table) whatever N is, so a token's logp / entropy do not depend on
# its batch. FLOWRL_KERNELS_BATCH_INVARIANT=0 (read at import; tests flip _BATCH_INVARIANT) restores the
# N-tuned launch (64-row tiles for N <= 64, the wave-balanced split count), whose speed difference only
# a GPU can measure (scripts/batch_invariance.py times both). token_logprobs needs no switch: its
# launch never depended on N.
_BATCH_INVARIANT = os.environ.get("FLOWRL_KERNELS_BATCH_INVARIANT", "1").strip() not in ("0", "false", "no", "off")


def batch_invariant() -> bool:
    """Whether the fused lm_head forward launches batch-invariantly (the default)."""
    return _BATCH_INVARIANT


def config(kernel: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The table entry of ``kernel`` for ``device``'s arch and ``dtype`` (a fresh dict), or the
    override bench/sweep.py set. CPU devices (no arch) get sm90's, which only matters for code that
    inspects a config without launching (the codegen tests)."""
    if kernel in _OVERRIDE:
        return dict(_OVERRIDE[kernel])
    arch = arch_of(device) if device.type == "cuda" else "sm90"
    return dict(_cached(kernel, arch, dtype_key(dtype)))


def overridden(kernel: str) -> bool:
    return kernel in _OVERRIDE


class override:
    """``with override("linear_fwd", cfg):`` launches use ``cfg`` (bench/sweep.py's candidates; also
    under the interpreter, where the launchers otherwise pick their own small tiles)."""

    def __init__(self, kernel: str, cfg: dict):
        self.kernel, self.cfg = kernel, dict(cfg)

    def __enter__(self):
        self.prev = _OVERRIDE.get(self.kernel)
        _OVERRIDE[self.kernel] = self.cfg
        return self.cfg

    def __exit__(self, *exc):
        if self.prev is None:
            _OVERRIDE.pop(self.kernel, None)
        else:
            _OVERRIDE[self.kernel] = self.prev
