#!/usr/bin/env bash
# Issue 17's grid (docs/diversity.md, "Off-policy"): setting 1 (tiny) of flowrl.experiments.diversity with
# 1, 2, 4, 8 optimizer updates per rollout batch, FlowRL vs GRPO, plus FlowRL ablations at 4 epochs x 2
# mini-batches, 100 rollout batches each (the on-policy table's 300 would take ~2.5 h on 2 idle cores; by
# step 100 every off-policy run has collapsed). One process per cell and seed chunk (a crash loses one
# cell; a finished cell is skipped on a rerun), PARALLEL processes at a time with one torch thread each,
# then one --from-json merge. Each run is seeded from its own seed alone, so chunking changes nothing.
#
#   bash flowrl/experiments/offpolicy_grid.sh                      # everything, into runs/offpolicy/, then docs/
#   PART=main bash flowrl/experiments/offpolicy_grid.sh            # only FlowRL / GRPO at 1x1 1x2 2x2 4x2
#   FLOWRL_KERNELS_IMPL=torch PART=headline OUT=runs/offpolicy_torch NAME=tiny_offpolicy_torch \
#       bash flowrl/experiments/offpolicy_grid.sh                  # the rerun with the torch reference kernels
#
# env: PYTHON (default: python), OUT (per-cell JSON + logs), DOCS (merged table / plots; default docs),
# NAME (merged file stem, default tiny_offpolicy), STEPS (rollout batches per run, default 100), SEEDS (default 0..9, run in chunks of 5), PARALLEL (2),
# PART (all | main | ablations | headline = 1x1 and 4x2 FlowRL / GRPO), EXTRA (more diversity.py flags,
# e.g. EXTRA="--steps 2 --layers 1 --hidden 16 --pretrain-steps 3" for a quick check of the script).
# Run from the repository root with the package importable (PYTHONPATH=$PWD or the editable install).
set -euo pipefail
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/offpolicy}
DOCS=${DOCS:-docs}
NAME=${NAME:-tiny_offpolicy}
SEEDS=(${SEEDS:-0 1 2 3 4 5 6 7 8 9})
PARALLEL=${PARALLEL:-2}
PART=${PART:-all}
STEPS=${STEPS:-100}
EXTRA=${EXTRA:-}

cells=()
add() {  # add SCHEDULE METHODS(comma-separated): one cell per chunk of 5 seeds
    local sch=$1
    for ((i = 0; i < ${#SEEDS[@]}; i += 5)); do
        local chunk=("${SEEDS[@]:i:5}")
        cells+=("${sch}_${2}_s${chunk[0]} $sch $2 $(IFS=,; echo "${chunk[*]}")")
    done
}
case $PART in
    all|main|headline|ablations) ;;
    *) echo "PART=$PART: use all, main, ablations or headline" >&2; exit 2 ;;
esac
part() { [[ " $* " == *" $PART "* ]]; }  # is PART one of the arguments?
# in the order the claims need them: headline first
if part all main headline; then add 1x1 flowrl,grpo; add 4x2 flowrl,grpo; fi
if part all ablations; then add 4x2 flowrl-noclip,flowrl-noweight; fi
if part all main; then add 2x2 flowrl,grpo; add 1x2 flowrl,grpo; fi
if part all ablations; then add 4x2 flowrl-seqmean; add 4x2 flowrl-beta5,flowrl-beta30; fi

mkdir -p "$OUT"
run_cell() {  # NAME SCHEDULE METHODS(comma) SEEDS(comma)
    local dir=$OUT/$1 t0=$SECONDS
    if [ -f "$dir/diversity_tiny.json" ]; then echo "[grid] $1: done before, skipped"; return 0; fi
    mkdir -p "$dir"
    if "$PYTHON" -m flowrl.experiments.diversity tiny --threads 1 --no-plots --steps "$STEPS" --schedules "$2" \
            --methods ${3//,/ } --seeds ${4//,/ } --out "$dir" $EXTRA > "$dir/log.txt" 2>&1; then
        echo "[grid] $1: $((SECONDS - t0)) s"
    else
        echo "[grid] $1: FAILED, see $dir/log.txt" >&2; return 1
    fi
}
export -f run_cell
export OUT PYTHON STEPS EXTRA
t0=$SECONDS
printf '%s\n' "${cells[@]}" | xargs -P "$PARALLEL" -L 1 bash -c 'run_cell "$@"' _
echo "[grid] ${#cells[@]} cells in $((SECONDS - t0)) s"
"$PYTHON" -m flowrl.experiments.diversity tiny --from-json "$OUT"/*/diversity_tiny.json --out "$DOCS" --name "$NAME"
