#!/usr/bin/env bash
# Download the peer kernels into .peers/ (git-ignored) for bench/gpu.sh: the lent GPU machines have
# no network, so their wheels travel with the call (run(..., carry=[".peers"])). ~18 MB.
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
# QuACK and Liger's SM90 (CuTe DSL) backend: quack-kernels and the DSL's small wheels (~8 MB). The DSL's
# CUDA libraries (nvidia-cutlass-dsl-libs-cu13 4.8.1: 92 MB) exceed the device call's 64 MiB carry, so
# they are fetched only with FLOWRL_PEERS_CUTE=1 (a machine whose image or carry allows them); without
# them both providers are skipped with "needs the CuTe DSL" as the reason.
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .peers quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 \
    torch-c-dlpack-ext==0.1.5 einops==0.8.2 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    || echo "quack-kernels / CuTe DSL wheels not downloaded: gpu.sh will skip those peers" >&2
if [ "${FLOWRL_PEERS_CUTE:-0}" = 1 ]; then
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .peers nvidia-cutlass-dsl-libs-cu13==4.8.1
fi
# pip builds an sdist's metadata to download it; flash-attn's setup.py skips its CUDA build on request
# (needs torch and wheel in $PY: the project's .venv has both)
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE $PY -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
    -d .peers flash-attn==2.8.3 || echo "flash-attn sdist not downloaded: gpu.sh will skip that peer" >&2
ls -la .peers
