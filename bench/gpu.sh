#!/usr/bin/env bash
# The benchmark suite on a lent H100 / H200 in one call, inside a time budget:
#   1. install the peers carried in .peers/ (bench/fetch_peers.sh, run beforehand on a machine with network)
#   2. measure the card: device-to-device copy bandwidth (bytes read + written) and bf16 matmul 8192^3
#   3. run the suite in parts ordered by value (headline shape and modes first), each with its own
#      time limit and JSON; a part that overruns loses only itself, a part that no longer fits is left
#      out (both recorded in the part log, and the report lists every planned case not measured)
#   4. merge the JSON (with the part log), print a compact table
# Interface (make gpu-check calls it last):
#   OUT=<dir> FLOWRL_BENCH_TOTAL_S=<seconds> bash bench/gpu.sh
#     FLOWRL_BENCH_TOTAL_S  the whole script finishes within it (default 520)
#     OUT                   where the JSON, part logs, table.txt and bench.log go (default bench/results)
# From the repository root (the checkout the device call sends):
#   bash bench/fetch_peers.sh                       # here, once: ~10 MB into .peers/ (git-ignored)
#   run(command="FLOWRL_BENCH_COMMIT=<short hash> bash bench/gpu.sh", carry=[".peers"], timeout_s=600)
#     (write the hash into the command here: the device's copy of the tree has no .git)
# Copy the gpu-*.json into bench/results/ and run `python -m bench.report` to regenerate bench/RESULTS.md.
# Without CUDA it dry-runs on the CPU at tiny sizes (every part, the merge and the table; CPU numbers).
# Knobs: FLOWRL_BENCH_N / FLOWRL_BENCH_LINEAR_N / FLOWRL_BENCH_LOSS_BT (sizes), FLOWRL_BENCH_BUDGET_S
# (timed seconds per case), BENCH_K (an extra pytest -k filter, and-ed with each part's),
# BENCH_PARTS (the part numbers to run, e.g. "7 8 9": the parts that did not fit in one call go in a
# second), BENCH_BUILD_NATIVE=1 (build flowrl_kernels._C first), BENCH_SWEEP=1 (run bench/sweep.py first and
# print the tuned config table; it does not write the table back).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TOTAL=${FLOWRL_BENCH_TOTAL_S:-520}
export PYTHONUNBUFFERED=1 FLOWRL_KERNELS_QUIET=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[gpu.sh +$(elapsed)s/${TOTAL}s] $*"; }
# seconds kept for the merge + table at the end
RESERVE=10

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE: CPU dry run at tiny sizes')" || exit 1
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=1
else
  GPU=0
  # the dry run: tiny sizes, a few rounds per case, the flowrl_kernels CPU impls and the plain torch
  # provider only (numbers are CPU numbers, for the plumbing only: every part, the merge, the table)
  export FLOWRL_BENCH_N=${FLOWRL_BENCH_N:-16} FLOWRL_BENCH_LINEAR_N=${FLOWRL_BENCH_LINEAR_N:-4} \
         FLOWRL_BENCH_LOSS_BT=${FLOWRL_BENCH_LOSS_BT:-4x64} FLOWRL_BENCH_BUDGET_S=${FLOWRL_BENCH_BUDGET_S:-0.01}
  BENCH_K=${BENCH_K:-native or plain or triton or default}
fi
# a dry run never writes into bench/results/ (the report would pick its CPU numbers up as a GPU run)
(( GPU )) && OUT=${OUT:-bench/results} || OUT=${OUT:-/tmp/gpu-dryrun}
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/gpu-bench.XXXXXX)
N0=${FLOWRL_BENCH_N:-8192}
NL=${FLOWRL_BENCH_LINEAR_N:-8192}

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
  lim=$(( TOTAL / 3 < 240 ? TOTAL / 3 : 240 ))
  timeout "$lim" $PY setup.py -q build_ext --inplace >"$OUT/native_build.log" 2>&1 && log "native extension built" \
    || log "native build failed or ran past ${lim}s (see native_build.log): native skipped"
fi
if [ "${BENCH_SWEEP:-0}" = 1 ]; then
  lim=$(( TOTAL / 3 < 300 ? TOTAL / 3 : 300 ))
  log "bench/sweep.py (limit ${lim}s)"
  timeout -k 5 "$lim" $PY -m bench.sweep --budget-s $(( lim - 10 )) --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" | tail -n 40
fi

# 2. the card's ceilings, measured once and handed to every bench file
$PY - <<'PY' >"$TMP/ceilings.env" || exit 1
from bench.common import ceilings, machine
c = ceilings()
import sys
print(f"export FLOWRL_BENCH_COPY_GBPS={c['copy_GBps']:.1f} FLOWRL_BENCH_MATMUL_TFLOPS={c['matmul_TFLOPs']:.1f}")
m = machine()
print(f"# {m['device']}: copy {c['copy_GBps']:.0f} GB/s (read+write), {c['matmul_dtype']} matmul "
      f"{c['matmul_TFLOPs']:.1f} TFLOP/s", file=sys.stderr)
PY
source "$TMP/ceilings.env"
log "ceilings: copy ${FLOWRL_BENCH_COPY_GBPS} GB/s, matmul ${FLOWRL_BENCH_MATMUL_TFLOPS} TFLOP/s"

# 3. the parts, by value: name file -k-filter cap-seconds. The headline shape (Qwen2.5-7B, N=8192) of
#    the two logits ops first, mode by mode, without the slow providers (the fp32 reference and
#    torch.compile: its compile alone overran a part on 2026-11-28); then the small micro-batches
#    (host overhead), the loss, the other models, the N sweep, the slow providers, the train step.
#    Caps come from the first H200 run (~0.5-1 s per case with the device clock, + 10-20 s of start-up:
#    imports, the Triton JIT of our kernels and of the peers'). Parts 1-8 fit the default 520 s before
#    part 7 (Liger's shape) was added; the rest is for a second call (BENCH_PARTS="10 11 12 13 14 15 16").
CARD=$($PY -c "import torch,re; print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-') if torch.cuda.is_available() else 'cpu')")
STAMP=$(date -u +%Y%m%d-%H%M)
HT="qwen2.5-7b-N$N0"
HL="qwen2.5-7b-N$NL"
FAST="not reference and not compile"
SLOW="(reference or compile)"
PARTS_LOG="$OUT/parts.jsonl"
echo "{\"total_budget_s\": $TOTAL}" >"$PARTS_LOG"
PARTS=()
i=0
part() {  # part NAME FILE FILTER CAP
  local name=$1 f=$2 filt=$3 cap=$4
  i=$((i + 1))
  if [ -n "${BENCH_PARTS:-}" ] && [[ " $BENCH_PARTS " != *" $i "* ]]; then
    printf '{"name": "%s", "filter": "", "limit_s": 0, "took_s": 0, "status": "not asked for (BENCH_PARTS)"}\n' \
      "$name" >>"$PARTS_LOG"
    return
  fi
  local left=$(( TOTAL - RESERVE - $(elapsed) )) lim=$cap t1 rc status
  (( lim > left )) && lim=$left
  [ -n "${BENCH_K:-}" ] && filt="${filt:+($filt) and }($BENCH_K)"
  if [ ! -f "bench/bench_$f.py" ]; then
    status="absent"
  elif (( lim < 15 )); then
    status="left out: no time"; lim=0
  else
    log "part $i $name: bench_$f.py -k '$filt' (limit ${lim}s)"
    t1=$(date +%s)
    timeout -k 5 "$lim" $PY -m pytest "bench/bench_$f.py" --benchmark-only -q -p no:cacheprovider \
        ${filt:+-k "$filt"} --benchmark-json="$TMP/part-$i.json" --benchmark-columns=median,iqr,rounds \
        >"$TMP/part-$i.log" 2>&1
    rc=$?
    tail -n 2 "$TMP/part-$i.log"
    case $rc in
      0) status="ok" ;;
      5) status="nothing selected" ;;
      124|137) status="ran past its limit: results lost" ;;
      *) status="pytest exit $rc (see bench.log)" ;;
    esac
    [ -f "$TMP/part-$i.json" ] && PARTS+=("$TMP/part-$i.json")
    { echo "=== part $i $name ($status)"; cat "$TMP/part-$i.log"; } >> "$OUT/bench.log"
    t1=$(( $(date +%s) - t1 ))
  fi
  log "part $i $name: $status"
  printf '{"name": "%s", "filter": "%s", "limit_s": %s, "took_s": %s, "status": "%s"}\n' \
    "$name" "$filt" "$lim" "${t1:-0}" "$status" >>"$PARTS_LOG"
}

part "token_logprobs headline forward"  token_logprobs        "$HT-forward and $FAST"  55
part "token_logprobs headline backward" token_logprobs        "$HT-backward and $FAST" 55
part "token_logprobs headline full"     token_logprobs        "$HT-full and $FAST"     60
part "fused lm_head headline forward"   linear_token_logprobs "$HL-forward and $FAST"  60
part "fused lm_head headline backward"  linear_token_logprobs "$HL-backward and $FAST" 70
part "fused lm_head headline full"      linear_token_logprobs "$HL-full and $FAST"     80
# Liger's own published shape (M=4096, H=4096, V=131072), our number beside theirs; cap by arithmetic
# (issue 24 added it without a GPU: ~10 fast providers x 3 modes at ~1 s each + start-up)
part "fused lm_head Liger's shape"      linear_token_logprobs "liger-shape and $FAST"  70
part "token_logprobs small N (host overhead)" token_logprobs  "(qwen2.5-7b-N256- or qwen2.5-7b-N1024-) and $FAST" 50
part "flowrl_loss"                      flowrl_loss           ""                       40
part "token_logprobs other models"      token_logprobs        "(smollm2 or llama3) and $FAST" 60
part "fused lm_head other models"       linear_token_logprobs "(smollm2 or llama3) and $FAST" 80
part "token_logprobs N sweep"           token_logprobs        "qwen2.5-7b and full and not $HT- and not -N256- and not -N1024- and $FAST" 50
part "fused lm_head N sweep"            linear_token_logprobs "qwen2.5-7b and full and not $HL- and $FAST" 60
part "token_logprobs slow providers"    token_logprobs        "$SLOW"                  90
part "fused lm_head slow providers"     linear_token_logprobs "$SLOW"                  120
part "train_step"                       train_step            ""                       30

# 4. one JSON for this run (with the part log), and the compact table
(( ${#PARTS[@]} )) || { log "no results"; exit 1; }
J="$OUT/gpu-$CARD-$STAMP.json"
(( GPU )) || J="$OUT/dryrun-$CARD-$STAMP.json"
$PY -m bench.report --merge "$J" --parts "$PARTS_LOG" "${PARTS[@]}" && log "wrote $J"
$PY -m bench.report --compact "$J" | tee "$OUT/table.txt"
log "done"
