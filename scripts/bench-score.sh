#!/bin/bash
# `cpa-stream score` against `cell-eval2 run --preset vcc2026` (0.20.0) on synthetic atlases of
# 18,000 genes, on this machine's CPU: wall time and peak resident memory (/usr/bin/time), the
# two tools interleaved, and their values compared (docs/evaluation.md, "Speed and memory").
#
#   WORK   scratch directory (default: out/bench-score); the atlases take 14 GB with ROWS=abc
#   ROWS   which rows: a (60 perturbations x 400 cells, both tools, REPS times), b (300 x 400,
#          ours and cell-eval2 with pdex, REPS_B times), c (a million predicted cells, ours),
#          d (row a's reference: the baseline arm and the split-half replicate, `score --baseline
#          --replicate` against `cell-eval2 baseline` + `prep-real-bundle`, once each)
#   REPS   repetitions of row a (default 3); REPS_B of row b (default 2)
#
# cell-eval2 runs with each of its two CPU engines for the Wilcoxon tests: scanpy (what
# `pip install cell-eval2` brings; single-threaded, hours on row b) and pdex (threaded, chosen
# when installed; its DE values differ from scanpy's in the third decimal, and cpa-stream
# computes scanpy's). Needs the release build (scripts/build.sh) and cell-eval2 in
# $CPA_STREAM_PYTHON's environment (scripts/python.sh --tests installs it); the pdex engine gets a
# venv of its own under $CPA_STREAM_CACHE (made on the first run, from PyPI) so that the tests'
# environment keeps scanpy's.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
eval "$("$repo/scripts/bootstrap.sh")"
work="${WORK:-$repo/out/bench-score}"
rows="${ROWS:-a}"
reps="${REPS:-3}"
reps_b="${REPS_B:-2}"
mkdir -p "$work" && cd "$work"
bin="$CARGO_TARGET_DIR/release/cpa-stream"
ce="$(dirname "$CPA_STREAM_PYTHON")/cell-eval2"
[ -x "$ce" ] || { echo "cell-eval2 is not installed beside $CPA_STREAM_PYTHON (scripts/python.sh --tests)"; exit 1; }
pdex_env="$CPA_STREAM_CACHE/bench/cell-eval2-pdex"
if [[ ! -x $pdex_env/bin/cell-eval2 ]]; then
  echo "bench-score: installing cell-eval2 0.20.0 with pdex into $pdex_env" >&2
  python3 -m venv "$pdex_env"
  "$pdex_env/bin/pip" install -q 'cell-eval2==0.20.0' 'pdex==0.3.0'
fi
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
# theirs ENGINE PRED REAL OUT: `cell-eval2 run` with the Wilcoxon engine ENGINE (scanpy, pdex).
theirs() {
  local run="$ce"
  [[ $1 == pdex ]] && run="$pdex_env/bin/cell-eval2"
  rm -rf "$4"
  /usr/bin/time -f "%e s, %M KiB" -o time.txt "$run" run -ap "$2" -ar "$3" "${preset[@]}" --set "de.backend=$1" \
    -o "$4" > "$4.log" 2>&1 || true
  log "cell-eval2 run ($1) $2: $(cat time.txt) (load $(cut -d' ' -f1 /proc/loadavg))"
}
compare() {
  "$CPA_STREAM_PYTHON" - "$1" "$2" <<'PY' | tee -a bench.log
import json, sys
import pandas as pd
ce, cs = sys.argv[1], sys.argv[2]
theirs = pd.read_csv(f"{ce}/results.csv")
mine = pd.read_parquet(f"{cs}/results.parquet")
both = theirs.merge(mine, on=["perturbation", "metric"], suffixes=("_ce", "_cs"))
diff = (both.value_ce - both.value_cs).abs()
print(f"{ce}: {len(both)} values compared, largest difference {diff.max():.2g}", end="")
de = both.metric.str.startswith("de_")
print(f" ({diff[~de].max():.2g} outside the DE members)")
PY
}
log "start, rows $rows"
if [[ $rows == *a* ]]; then
  atlas a_real 25260 60 11 && atlas a_pred 25260 60 12
  for _ in $(seq "$reps"); do
    ours a_pred.h5ad a_real.h5ad a_cs
    theirs pdex a_pred.h5ad a_real.h5ad a_ce_pdex
    theirs scanpy a_pred.h5ad a_real.h5ad a_ce
  done
  compare a_ce a_cs
  compare a_ce_pdex a_cs
fi
if [[ $rows == *b* || $rows == *c* ]]; then
  atlas b_real 126316 300 21
fi
if [[ $rows == *b* ]]; then
  atlas b_pred 126316 300 22
  for _ in $(seq "$reps_b"); do
    ours b_pred.h5ad b_real.h5ad b_cs
    theirs pdex b_pred.h5ad b_real.h5ad b_ce_pdex
  done
  ours b_pred.h5ad b_real.h5ad b_cs
  compare b_ce_pdex b_cs
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
