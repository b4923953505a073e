#!/usr/bin/env bash
# A/B of the doser learning rate on dosed synthetic atlases: for each atlas seed and each
# `training.doser_lr`, trains, runs `dose-response` against the atlas's truth and `evaluate` on
# the test split, and prints one line:
#   seed doser_lr  R2(per-gene change vs truth)  R2(response length vs truth)  r2_mean  r2_mean_control  pearson_delta  beats_control
#
#   scripts/dose-ab.sh                         the small configuration (examples/cpa-small.toml), 6,000 cells
#   CONFIG=default CELLS=20000 GENES=300 DOSES=5 PERTS=4 EPOCHS=40 scripts/dose-ab.sh
#
# Knobs: OUT (default $CPA_STREAM_CACHE/dose-ab), SEEDS ("5 7 9"), RATES ("0.0003 0.003 0.03"),
# CONFIG (small | default), CELLS, GENES, PERTS, DOSES, EPOCHS.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh 2>/dev/null)"
CS="$CARGO_TARGET_DIR/release/cpa-stream"
[ -x "$CS" ] || scripts/build.sh
CONFIG=${CONFIG:-small}; CELLS=${CELLS:-6000}; GENES=${GENES:-100}; PERTS=${PERTS:-3}; DOSES=${DOSES:-4}
EPOCHS=${EPOCHS:-100}; SEEDS=${SEEDS:-5 7 9}; RATES=${RATES:-0.0003 0.003 0.03}
OUT=${OUT:-${CPA_STREAM_CACHE:-$HOME/.cache/cpa-stream}/dose-ab}
mkdir -p "$OUT"
for seed in $SEEDS; do
  store="$OUT/atlas-$CELLS-$GENES-$seed.store"
  [ -d "$store" ] || "$CS" synth --cells "$CELLS" --genes "$GENES" --perturbations "$PERTS" --doses "$DOSES" \
    --cell-types 2 --seed "$seed" --out "$store" -q
  for lr in $RATES; do
    config="$OUT/$CONFIG-$lr.toml"
    if [ "$CONFIG" = small ]; then
      sed "s/^\[training\]/[training]\ndoser_lr = $lr/" examples/cpa-small.toml > "$config"
    else
      printf '[training]\ndoser_lr = %s\n' "$lr" > "$config"
    fi
    run="$OUT/run-$CONFIG-$CELLS-$seed-$lr"
    [ -d "$run/model" ] || "$CS" train --store "$store" --dose-key dose --covariates cell_type --config "$config" \
      --epochs "$EPOCHS" --threads 1 --out "$run" --overwrite -q
    "$CS" dose-response --model "$run" --store "$store" --out "$run-dose" --overwrite --no-plots --json > "$run-dose.json"
    "$CS" evaluate --model "$run" --store "$store" --out "$run-eval" --overwrite --no-plots --json > "$run-eval.json"
    "$CPA_STREAM_PYTHON" - "$seed" "$lr" "$run-dose.json" "$run-eval.json" <<'PY'
import json, sys
seed, lr, dose, ev = sys.argv[1:]
d, e = json.load(open(dose)), json.load(open(ev))["summary"]
print(seed, lr, *(round(v, 3) for v in (d["r2_truth_delta"], d["r2_truth_response"], e["r2_mean"],
      e["r2_mean_control"], e["pearson_delta"], e["beats_control"])))
PY
  done
done
