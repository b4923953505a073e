#!/usr/bin/env bash
# Evaluation peak memory and time against the number of cells: synthetic atlases of CELLS_LIST
# cells x GENES genes (same generator seed), one model trained briefly on the smallest, then
# `evaluate` on each, REPS repetitions interleaved. Prints: rep allocator cells peak_RssAnon_MiB
# max_RSS_MiB seconds load. ALLOCATORS lists the environments compared ("default": as the CLI
# runs, which fixes glibc's mmap threshold at 1 MiB itself; e.g. "default MALLOC_ARENA_MAX=2").
#
#   scripts/bench-eval-memory.sh                     10k, 100k, 1M x 5,000 genes (about 7 GB of stores)
#   CELLS_LIST="20000 200000" GENES=200 scripts/bench-eval-memory.sh
#
# Knobs: OUT (default $CPA_STREAM_CACHE/bench-eval-memory), CELLS_LIST, GENES, REPS (3), BATCH
# (evaluate --batch-size; default its own), ALLOCATORS ("default").
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh 2>/dev/null)"
CS="$CARGO_TARGET_DIR/release/cpa-stream"
[ -x "$CS" ] || scripts/build.sh
CELLS_LIST=${CELLS_LIST:-10000 100000 1000000}; GENES=${GENES:-5000}; REPS=${REPS:-3}
OUT=${OUT:-${CPA_STREAM_CACHE:-$HOME/.cache/cpa-stream}/bench-eval-memory}
BATCH_FLAGS=(); [ -n "${BATCH:-}" ] && BATCH_FLAGS=(--batch-size "$BATCH")
mkdir -p "$OUT"
first=""
for n in $CELLS_LIST; do
  [ -d "$OUT/m$n-$GENES.store" ] || "$CS" synth --cells "$n" --genes "$GENES" --perturbations 10 --cell-types 2 \
    --seed 1 --out "$OUT/m$n-$GENES.store" -q
  first=${first:-$n}
done
[ -d "$OUT/run-$GENES/model" ] || "$CS" train --store "$OUT/m$first-$GENES.store" --dose-key dose \
  --covariates cell_type --epochs 5 --out "$OUT/run-$GENES" --overwrite -q
for rep in $(seq "$REPS"); do
  for allocator in ${ALLOCATORS:-default}; do
    for n in $CELLS_LIST; do
      env_args=(); [ "$allocator" != default ] && env_args=("$allocator")
      env "${env_args[@]}" /usr/bin/time -f "%M" -o "$OUT/time.txt" "$CS" evaluate --model "$OUT/run-$GENES" \
        --store "$OUT/m$n-$GENES.store" --out "$OUT/eval" --overwrite --no-plots --json "${BATCH_FLAGS[@]}" \
        > "$OUT/eval.json" 2>/dev/null
      "$CPA_STREAM_PYTHON" - "$rep" "$allocator" "$n" "$OUT" <<'PY'
import json, sys
rep, allocator, n, out = sys.argv[1:]
r = json.load(open(f"{out}/eval.json"))
maxrss = int(open(f"{out}/time.txt").read().split()[-1]) >> 10
load = open("/proc/loadavg").read().split()[0]
print(rep, allocator, n, r["report"]["memory"]["rss_anon"] >> 20, maxrss, round(r["seconds"], 1), load)
PY
    done
  done
done
