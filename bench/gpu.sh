#!/usr/bin/env bash
# The full-size benchmark suite on a lent H100 / H200, in one call (< 9 minutes):
#   1. install the peers carried in .peers/ (bench/fetch_peers.sh, run beforehand on a machine with network)
#   2. measure the card: device-to-device copy bandwidth (bytes read + written) and bf16 matmul 8192^3
#   3. run each bench file, one mode at a time, with its own time limit and JSON (an overrun loses one part)
#   4. merge the JSON, print a compact table
# From the repository root (the checkout the device call sends):
#   bash bench/fetch_peers.sh                       # here, once: ~10 MB into .peers/ (git-ignored)
#   run(command="FLOWRL_BENCH_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu.sh", carry=[".peers"], timeout_s=600)
#     (write the hash into the command here: the device's copy of the tree has no .git)
# Files go to $OUT (the device tool brings them back) or bench/results/ when OUT is unset; copy the
# gpu-*.json into bench/results/ and run `python -m bench.report` to regenerate bench/RESULTS.md.
# Knobs: FLOWRL_BENCH_N / FLOWRL_BENCH_LINEAR_N / FLOWRL_BENCH_LOSS_BT (sizes), FLOWRL_BENCH_BUDGET_S
# (timed seconds per case), BENCH_K (a pytest -k filter), BENCH_BUILD_NATIVE=1 (build flowrl_kernels._C).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLOWRL_KERNELS_QUIET=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
T0=$(date +%s)
log() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE: CPU sizes')" || exit 1

# 1. peers (no network on the device machine: wheels travel in .peers/)
if [ -d .peers ]; then
  if ls .peers/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .peers/*.whl \
      && export PYTHONPATH=$PYTHONPATH:/tmp/peers && log "peers installed: $(ls .peers/*.whl | xargs -n1 basename | tr '\n' ' ')"
  fi
  fa=$(ls .peers/flash_attn-*.tar.gz 2>/dev/null | head -1)
  if [ -n "$fa" ]; then
    tar xzf "$fa" -C /tmp --wildcards '*/flash_attn/ops/triton/cross_entropy.py' \
      && export FLOWRL_BENCH_FLASH_ATTN_CE=$(ls /tmp/flash_attn-*/flash_attn/ops/triton/cross_entropy.py | head -1) \
      && log "flash-attn triton cross_entropy from $fa"
  fi
else
  log "no .peers/ carried: liger, flash-attn and cce are skipped (run bench/fetch_peers.sh and carry .peers)"
fi
if [ "${BENCH_BUILD_NATIVE:-0}" = 1 ]; then
  timeout 240 $PY setup.py -q build_ext --inplace >"$OUT/native_build.log" 2>&1 && log "native extension built" \
    || log "native build failed or timed out (see native_build.log): native skipped"
fi

# 2. the card's ceilings, measured once and handed to every bench file
$PY - <<'PY' >/tmp/ceilings.env || exit 1
from bench.common import ceilings, machine
c = ceilings()
import sys
print(f"export FLOWRL_BENCH_COPY_GBPS={c['copy_GBps']:.1f} FLOWRL_BENCH_MATMUL_TFLOPS={c['matmul_TFLOPs']:.1f}")
m = machine()
print(f"# {m['device']}: copy {c['copy_GBps']:.0f} GB/s (read+write), {c['matmul_dtype']} matmul "
      f"{c['matmul_TFLOPs']:.1f} TFLOP/s", file=sys.stderr)
PY
source /tmp/ceilings.env
log "ceilings: copy ${FLOWRL_BENCH_COPY_GBPS} GB/s, matmul ${FLOWRL_BENCH_MATMUL_TFLOPS} TFLOP/s"

# 3. the suite in parts (bench file x mode filter), each with its own time limit and JSON: a part that
#    overruns loses only itself. Seconds of limit; the whole call must stay under 9 minutes.
CARD=$($PY -c "import torch,re; print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-') if torch.cuda.is_available() else 'cpu')")
STAMP=$(date -u +%Y%m%d-%H%M)
PARTS=()
i=0
# (each part pays its own start: imports, torch.compile of the reference, Triton JIT; the most
#  important parts go first, the last ones get what is left of the 520 s)
for spec in token_logprobs:forward:70 token_logprobs:backward:80 token_logprobs:full:90 \
            linear_token_logprobs:forward:70 linear_token_logprobs:backward:80 linear_token_logprobs:full:90 \
            flowrl_loss::40 train_step::30; do
  IFS=: read -r f k lim <<<"$spec"
  i=$((i + 1))
  [ -f "bench/bench_$f.py" ] || { log "bench/bench_$f.py absent, skipped"; continue; }
  left=$(( 520 - ($(date +%s) - T0) ))
  (( lim > left )) && lim=$left
  (( lim < 15 )) && { log "no time left for $f $k"; continue; }
  filt=$k
  [ -n "${BENCH_K:-}" ] && filt="${k:+$k and }($BENCH_K)"
  log "bench_$f.py ${k:-all modes} (limit ${lim}s)"
  timeout -k 5 "$lim" $PY -m pytest "bench/bench_$f.py" --benchmark-only -q -p no:cacheprovider \
      ${filt:+-k "$filt"} --benchmark-json="/tmp/part-$i.json" --benchmark-columns=median,iqr,rounds \
      >"/tmp/part-$i.log" 2>&1
  rc=$?
  tail -n 3 "/tmp/part-$i.log"
  (( rc == 124 || rc == 137 )) && log "bench_$f.py $k ran past ${lim}s: that part's results are lost"
  [ -f "/tmp/part-$i.json" ] && PARTS+=("/tmp/part-$i.json")
  cat "/tmp/part-$i.log" >> "$OUT/bench.log"
done

# 4. one JSON for this run, and the compact table
(( ${#PARTS[@]} )) || { log "no results"; exit 1; }
J="$OUT/gpu-$CARD-$STAMP.json"
$PY -m bench.report --merge "$J" "${PARTS[@]}" && log "wrote $J"
$PY -m bench.report --compact "$J" | tee "$OUT/table.txt"
log "done"
