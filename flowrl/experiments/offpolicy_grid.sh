#!/usr/bin/env bash
# Issue 17's grid (docs/diversity.md, "Off-policy"): setting 1 (tiny) of flowrl.experiments.flowrl_vs_grpo with
# 1, 2, 4, 8 optimizer updates per rollout batch, FlowRL vs GRPO, plus FlowRL ablations at 4 epochs x 2
# mini-batches, 100 rollout batches each (the on-policy table's 300 would take ~2.5 h on 2 idle cores; by
# step 100 every off-policy run has collapsed). One process per cell and seed chunk (a crash loses one
# cell; a finished cell is skipped on a rerun), PARALLEL processes at a time with one torch thread each,
# then one --from-json merge. Each run is seeded from its own seed alone, so chunking changes nothing.
# Issue 28: a draw = a named seed range (DRAW, SEEDS); the merged JSON records the commit, the machine and
# the wall time (offpolicy_report stamp), and every draw in DOCS is pooled into
# diversity_tiny_offpolicy_pooled.{md,json} (offpolicy_report: collapse rates, pooled paired intervals).
#
#   bash flowrl/experiments/offpolicy_grid.sh                      # draw d1 (seeds 0-9), everything
#   PART=main bash flowrl/experiments/offpolicy_grid.sh            # only FlowRL / GRPO at 1x1 1x2 2x2 4x2
#   DRAW=d4 SEEDS=30..39 PART="headline weights" bash flowrl/experiments/offpolicy_grid.sh   # a new draw
#   FLOWRL_KERNELS_IMPL=torch DRAW=d1-torch PART=headline NAME=tiny_offpolicy_torch POOL=0 \
#       bash flowrl/experiments/offpolicy_grid.sh                  # the rerun with the torch reference kernels
#
# env: PYTHON (default: python), DRAW (draw name, default d1), SEEDS ("30..39" or "30 31 ..."; default
# 0..9; or FIRST and LAST), run in chunks of 5, OUT (per-cell JSON + logs, default runs/offpolicy/DRAW),
# DOCS (merged table / plots; default docs), NAME (merged file stem: tiny_offpolicy for d1, else
# tiny_offpolicy_DRAW), STEPS (rollout batches per run, default 100), PARALLEL (2),
# PART (one or more of: all | main | ablations | headline = 1x1 and 4x2 FlowRL / GRPO | weights = the
# three weight presets at 4x2: no clip, no weight, GSPO ratio), POOL (1: pool every draw in DOCS after
# the merge; 0: don't), PLOTS (the merge's PNGs: 1 for d1, else 0), DRY_RUN (1: print the cells and
# stop), EXTRA (more diversity.py flags, e.g. EXTRA="--steps 2 --layers 1 --hidden 16 --pretrain-steps 3"
# for a quick check of the script).
# Run from the repository root with the package importable (PYTHONPATH=$PWD or the editable install).
set -euo pipefail
PYTHON=${PYTHON:-python}
DRAW=${DRAW:-d1}
OUT=${OUT:-runs/offpolicy/$DRAW}
DOCS=${DOCS:-docs}
if [ "$DRAW" = d1 ]; then NAME=${NAME:-tiny_offpolicy}; else NAME=${NAME:-tiny_offpolicy_$DRAW}; fi
if [ -n "${FIRST:-}${LAST:-}" ]; then SEEDS=${SEEDS:-${FIRST:?set FIRST and LAST}..${LAST:?set FIRST and LAST}}; fi
SEEDS=${SEEDS:-0..9}
if [[ $SEEDS =~ ^([0-9]+)\.\.([0-9]+)$ ]]; then
    SEEDS=($(seq "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"))
elif [[ $SEEDS =~ ^[0-9\ ]+$ ]]; then
    SEEDS=($SEEDS)
else
    echo "SEEDS=$SEEDS: use a range FIRST..LAST (e.g. 30..39) or a list (\"30 31 32\")" >&2; exit 2
fi
if [ ${#SEEDS[@]} -eq 0 ]; then echo "SEEDS: empty range" >&2; exit 2; fi
PARALLEL=${PARALLEL:-2}
PART=${PART:-all}
STEPS=${STEPS:-100}
POOL=${POOL:-1}
if [ "$DRAW" = d1 ]; then PLOTS=${PLOTS:-1}; else PLOTS=${PLOTS:-0}; fi  # later draws: JSON + tables, no PNGs
EXTRA=${EXTRA:-}

cells=()
add() {  # add SCHEDULE METHODS(comma-separated): one cell per chunk of 5 seeds
    local sch=$1
    for ((i = 0; i < ${#SEEDS[@]}; i += 5)); do
        local chunk=("${SEEDS[@]:i:5}")
        cells+=("${sch}_${2}_s${chunk[0]} $sch $2 $(IFS=,; echo "${chunk[*]}")")
    done
}
for p in $PART; do
    case $p in
        all|main|headline|ablations|weights) ;;
        *) echo "PART=$PART: use all, main, ablations, headline or weights (or several, space-separated)" >&2; exit 2 ;;
    esac
done
part() { local p; for p in $PART; do [[ " $* " == *" $p "* ]] && return 0; done; return 1; }  # any PART word listed?
# in the order the claims need them: headline first
if part all main headline; then add 1x1 flowrl,grpo; add 4x2 flowrl,grpo; fi
if part all ablations weights; then add 4x2 flowrl-noclip,flowrl-noweight; fi
if part all main; then add 2x2 flowrl,grpo; add 1x2 flowrl,grpo; fi
if part all ablations weights; then add 4x2 flowrl-seqmean; fi
if part all ablations; then add 4x2 flowrl-beta5,flowrl-beta30; fi
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%s\n' "${cells[@]}"; exit 0; fi

mkdir -p "$OUT"
run_cell() {  # NAME SCHEDULE METHODS(comma) SEEDS(comma)
    local dir=$OUT/$1 t0=$SECONDS
    if [ -f "$dir/diversity_tiny.json" ]; then echo "[grid] $1: done before, skipped"; return 0; fi
    mkdir -p "$dir"
    if "$PYTHON" -m flowrl.experiments.flowrl_vs_grpo tiny --threads 1 --no-plots --steps "$STEPS" --schedules "$2" \
            --methods ${3//,/ } --seeds ${4//,/ } --out "$dir" $EXTRA > "$dir/log.txt" 2>&1; then
        echo "[grid] $1: $((SECONDS - t0)) s"
    else
        echo "[grid] $1: FAILED, see $dir/log.txt" >&2; return 1
    fi
}
export -f run_cell
export OUT PYTHON STEPS EXTRA
# provenance, taken before the runs (the tree may move on while they run)
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT+dirty"
STARTED=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
t0=$SECONDS
printf '%s\n' "${cells[@]}" | xargs -P "$PARALLEL" -L 1 bash -c 'run_cell "$@"' _
wall=$((SECONDS - t0))
echo "[grid] ${#cells[@]} cells in $wall s"
# merge every finished cell of the draw (OUT is the draw's folder: a draw run in several PARTs is one file)
jsons=("$OUT"/*/diversity_tiny.json)
"$PYTHON" -m flowrl.experiments.flowrl_vs_grpo tiny --from-json "${jsons[@]}" --out "$DOCS" --name "$NAME" \
    $([ "$PLOTS" = 1 ] || echo --no-plots)
"$PYTHON" -m flowrl.experiments.offpolicy_report stamp "$DOCS/diversity_$NAME.json" --draw "$DRAW" --part "$PART" \
    --wall-s "$wall" --parallel "$PARALLEL" --commit "$COMMIT" --started "$STARTED" --cells "${jsons[@]}"
if [ "$POOL" = 1 ]; then  # every draw in DOCS: d1 = diversity_tiny_offpolicy.json, dN = diversity_tiny_offpolicy_dN.json
    draws=()
    [ -f "$DOCS/diversity_tiny_offpolicy.json" ] && draws+=("d1=$DOCS/diversity_tiny_offpolicy.json")
    for f in "$DOCS"/diversity_tiny_offpolicy_d*.json; do
        d=${f##*_offpolicy_}; d=${d%.json}
        [[ -f $f && $d =~ ^d[0-9]+$ ]] && draws+=("$d=$f")  # d2, d3, ... (not d4check or other reports)
    done
    "$PYTHON" -m flowrl.experiments.offpolicy_report "${draws[@]}" --out "$DOCS" > /dev/null
    echo "[grid] pooled ${#draws[@]} draws -> $DOCS/diversity_tiny_offpolicy_pooled.md"
fi
