#!/bin/bash
# `cpa-stream score` against `cell-eval2 run --preset vcc2026` (0.20.0) on synthetic atlases of
# 18,000 genes, on this machine's CPU: wall time and peak resident memory (/usr/bin/time), the
# two tools interleaved, and their values compared (docs/evaluation.md, "Speed and memory").
#
#   WORK   scratch directory (default: out/bench-score); the atlases take 14 GB with ROWS=abc
#   ROWS   which rows: a (60 perturbations x 400 cells, both tools, REPS times), b (300 x 400,
#          both tools once; cell-eval2 takes hours there), c (a million predicted cells, ours),
#          d (row a's reference: the baseline arm and the split-half replicate, `score --baseline
#          --replicate` against `cell-eval2 baseline` + `prep-real-bundle`, once each)
#   REPS   repetitions of row a (default 3)
#
# Needs the release build (scripts/build.sh) and cell-eval2 in $CPA_STREAM_PYTHON's environment
# (scripts/python.sh --tests installs it).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
eval "$("$repo/scripts/bootstrap.sh")"
work="${WORK:-$repo/out/bench-score}"
rows="${ROWS:-a}"
reps="${REPS:-3}"
mkdir -p "$work" && cd "$work"
bin="$CARGO_TARGET_DIR/release/cpa-stream"
ce="$(dirname "$CPA_STREAM_PYTHON")/cell-eval2"
[ -x "$ce" ] || { echo "cell-eval2 is not installed beside $CPA_STREAM_PYTHON (scripts/python.sh --tests)"; exit 1; }
preset=(--preset vcc2026 --pert-col condition --control control --no-target-genes)
log() { echo "$(date +%T) $*" | tee -a bench.log; }
# atlas NAME CELLS PERTURBATIONS SEED: a synthetic atlas exported as .h5ad of raw counts.
atlas() {
  [ -f "$1.h5ad" ] && return
  "$bin" -q synth --cells "$2" --genes 18000 --perturbations "$3" --doses 1 --cell-types 1 --combinations 0 \
    --heldout-combinations 0 --control-fraction 0.05 --seed "$4" --out "$1.store" --overwrite
  "$bin" -q export "$1.store" --out "$1.h5ad" --overwrite
  rm -rf "$1.store"
}
ours() {
  /usr/bin/time -f "%e s, %M KiB" -o time.txt "$bin" -q score --prediction "$1" --reference "$2" --no-target-genes \
    --out "$3" --overwrite
  log "cpa-stream score $1: $(cat time.txt) (load $(cut -d' ' -f1 /proc/loadavg))"
}
theirs() {
  rm -rf "$3"
  /usr/bin/time -f "%e s, %M KiB" -o time.txt "$ce" run -ap "$1" -ar "$2" "${preset[@]}" -o "$3" > "$3.log" 2>&1 || true
  log "cell-eval2 run $1: $(cat time.txt) (load $(cut -d' ' -f1 /proc/loadavg))"
}
compare() {
  "$CPA_STREAM_PYTHON" - "$1" "$2" <<'PY' | tee -a bench.log
import json, sys
import pandas as pd
ce, cs = sys.argv[1], sys.argv[2]
theirs = pd.read_csv(f"{ce}/results.csv")
mine = pd.read_parquet(f"{cs}/results.parquet")
both = theirs.merge(mine, on=["perturbation", "metric"], suffixes=("_ce", "_cs"))
print(f"{len(both)} values compared, largest difference {(both.value_ce - both.value_cs).abs().max():.2g}")
PY
}
log "start, rows $rows"
if [[ $rows == *a* ]]; then
  atlas a_real 25260 60 11 && atlas a_pred 25260 60 12
  for _ in $(seq "$reps"); do
    ours a_pred.h5ad a_real.h5ad a_cs
    theirs a_pred.h5ad a_real.h5ad a_ce
  done
  compare a_ce a_cs
fi
if [[ $rows == *b* || $rows == *c* ]]; then
  atlas b_real 126316 300 21
fi
if [[ $rows == *b* ]]; then
  atlas b_pred 126316 300 22
  ours b_pred.h5ad b_real.h5ad b_cs
  theirs b_pred.h5ad b_real.h5ad b_ce
  compare b_ce b_cs
fi
if [[ $rows == *c* ]]; then
  atlas c_pred 1052632 300 23
  ours c_pred.h5ad b_real.h5ad c_cs
fi
if [[ $rows == *d* ]]; then
  atlas a_real 25260 60 11 && atlas a_pred 25260 60 12
  /usr/bin/time -f "%e s, %M KiB" -o time.txt "$bin" -q score --prediction a_pred.h5ad --reference a_real.h5ad \
    --no-target-genes --baseline --replicate --out d_cs --overwrite
  log "cpa-stream score --baseline --replicate: $(cat time.txt) (load $(cut -d' ' -f1 /proc/loadavg))"
  rm -rf d_base d_bundle d_base.h5ad
  /usr/bin/time -f "%e s, %M KiB" -o time.txt "$ce" baseline -ar a_real.h5ad "${preset[@]}" -o d_base \
    --save-pred d_base.h5ad > d_base.log 2>&1 || true
  log "cell-eval2 baseline: $(cat time.txt) (load $(cut -d' ' -f1 /proc/loadavg))"
  /usr/bin/time -f "%e s, %M KiB" -o time.txt "$ce" prep-real-bundle --real a_real.h5ad --baseline d_base.h5ad \
    "${preset[@]}" -o d_bundle > d_bundle.log 2>&1 || true
  log "cell-eval2 prep-real-bundle: $(cat time.txt) (load $(cut -d' ' -f1 /proc/loadavg))"
  "$CPA_STREAM_PYTHON" - d_cs d_base d_bundle <<'PY' | tee -a bench.log
import json, os, sys
import pandas as pd
cs, base_dir, bundle = sys.argv[1:4]
summary = json.loads(open(f"{cs}/summary.json").read())
base = pd.read_csv(f"{base_dir}/baseline_agg.csv").set_index("statistic").loc["mean"]
b = max(abs(v - float(base[m])) for m, v in summary["baseline"]["aggregates"].items())
print(f"baseline aggregates: largest difference {b:.2g}")
if os.path.exists(f"{bundle}/anchor_agg.parquet"):
    anchor = pd.read_parquet(f"{bundle}/anchor_agg.parquet").set_index("metric")["replicate"]
    r = max(abs(v - float(anchor[m])) for m, v in summary["replicate"]["aggregates"].items())
    print(f"replicate aggregates: largest difference {r:.2g}")
else:
    print(f"no bundle (cell-eval2 refused it); cpa-stream: {summary['scale_error']}")
PY
fi
log "end"
