#!/usr/bin/env bash
# Download the peer kernels into .peers/ (git-ignored) for bench/gpu.sh: the lent GPU machines have
# no network, so their wheels travel with the call (run(..., carry=[".peers"])). ~10 MB.
#   liger-kernel, cut-cross-entropy   pure-Python Triton wheels
#   trl (+ datasets, dill, multiprocess, which trl.trainer.utils imports; the GPU image lacks them)
#   flash-attn sdist                  only ops/triton/cross_entropy.py is used (torch + triton only);
#                                     building the CUDA extension would take far longer than a lease
# Run from the repository root of the checkout that the GPU call sends.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p .peers  # in .gitignore: it travels to the device only because the call carries it
# the GPU image runs Python 3.12 (KINDS.md)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .peers liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19
# pip builds an sdist's metadata to download it; flash-attn's setup.py skips its CUDA build on request
# (needs torch and wheel in $PY: the project's .venv has both)
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE $PY -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
    -d .peers flash-attn==2.8.3 || echo "flash-attn sdist not downloaded: gpu.sh will skip that peer" >&2
ls -la .peers
