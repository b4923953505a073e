#!/usr/bin/env bash
# Throughput on shared cores: training and prediction idle and beside N busy processes (one per
# core), interleaved, several repetitions; medians and the loaded/idle ratio per setting. With
# cpa-tools' peer venv present (../shared/peer/cpa-tools, VENV below), cpa-tools' training on the
# same cells under the same load too.
#
#   REPS       repetitions (default 3)
#   BUSY       competing busy processes (default: the CPUs this process may use)
#   CELLS      cells of the synthetic store (default 40000), GENES (default 2000)
#   CPA_PEER   cpa-tools venv python (default $CPA_STREAM_CACHE/cpa-peer/bin/python; skipped if absent)
#   OUT        results directory (default $CPA_STREAM_CACHE/bench-busy)
#
# Settings compared (each a line of the table):
#   default          cpa-stream as shipped (planned threads, passive OpenMP)
#   spin             as before the thread plan: libtorch's OpenMP spinning (GOMP_SPINCOUNT=300000,
#                    libgomp's own default, which also stops the re-execution), one libtorch thread
#                    per core and 2 batcher workers
#   threads1         --threads 1
#   python           the same training and prediction from Python in a fresh interpreter
#                    (`cs.train`, `run.predict_to_parquet`), cpa_stream imported first, no setting
#   python-torch     the same with torch imported before cpa_stream (a notebook's usual order);
#                    python-torch-after: the same runs timed from after `import torch`
#   CLI_SETTINGS     the CLI settings to run (default "default spin threads1")
#
# Each run is a fresh process, timed from its start: the CLI's and Python's start-up included.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
bin="$CARGO_TARGET_DIR/release/cpa-stream"
reps="${REPS:-3}"
cpus=$(python3 -c 'import os; print(len(os.sched_getaffinity(0)))')
busy="${BUSY:-$cpus}"
cells="${CELLS:-40000}"
genes="${GENES:-2000}"
out="${OUT:-$CPA_STREAM_CACHE/bench-busy}"
peer="${CPA_PEER:-$CPA_STREAM_CACHE/cpa-peer/bin/python}"
# cpa-tools trains ~1,000 cells/s here: a subsample keeps its runs under a minute.
peer_cells="${PEER_CELLS:-10000}"
mkdir -p "$out"
export CPA_STREAM_LOG=warn

store="$out/synth-${cells}x${genes}.store"
if [ ! -f "$store/manifest.json" ]; then
  "$bin" synth --cells "$cells" --genes "$genes" --perturbations 8 --doses 2 --cell-types 3 --combinations 4 \
    --seed 1 --out "$store" --overwrite -q
fi
h5ad="$out/synth-${cells}x${genes}.h5ad"
if [ -x "$peer" ] && [ ! -f "$h5ad" ]; then
  "$bin" export "$store" --out "$h5ad" --overwrite -q
fi
run="$out/model.run"
if [ ! -d "$run/model" ]; then
  "$bin" train --store "$store" --out "$run" --epochs 1 --overwrite -q
fi

pids=()
start_busy() {
  for _ in $(seq "$busy"); do
    sh -c 'while :; do :; done' &
    pids+=($!)
  done
}
stop_busy() {
  if [ "${#pids[@]}" -gt 0 ]; then kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; fi
  pids=()
}
trap stop_busy EXIT

results="$out/results.jsonl"
: > "$results"
record() { # setting load task seconds cells
  printf '{"setting":"%s","load":%s,"task":"%s","seconds":%s,"cells":%s}\n' "$@" >> "$results"
}
timed() { # prints seconds of the command
  local t0 t1
  t0=$(date +%s.%N)
  "$@" > /dev/null || { echo "failed: $*" >&2; return 1; }
  t1=$(date +%s.%N)
  python3 -c "print($t1 - $t0)"
}

train_cells=$(python3 -c "print(int($cells * 0.8))")
epochs=2
for rep in $(seq "$reps"); do
  for load in 0 "$busy"; do
    [ "$load" -gt 0 ] && start_busy
    sleep 1
    for setting in ${CLI_SETTINGS:-default spin threads1}; do
      env_args=() flags=()
      case $setting in
        spin) env_args=(GOMP_SPINCOUNT=300000); flags=(--threads "$cpus" --workers 2) ;;
        threads1) flags=(--threads 1) ;;
      esac
      if s=$(timed env "${env_args[@]}" "$bin" train --store "$store" --out "$out/busy.run" --epochs "$epochs" --overwrite "${flags[@]}" -q); then
        record "$setting" "$load" train "$s" "$((train_cells * epochs))"
      fi
      if s=$(timed env "${env_args[@]}" "$bin" predict --model "$run" --store "$store" --source all --out "$out/pred.parquet" --overwrite "${flags[@]}" -q); then
        record "$setting" "$load" predict "$s" "$cells"
      fi
    done
    for setting in python python-torch; do
      first=""
      # With torch first, the process also reports its time from after `import torch` (the
      # user's import, which cpa_stream does not need): the python-torch-after lines.
      [ "$setting" = python-torch ] && first="import torch, time; t0 = time.perf_counter(); "
      last=""
      [ "$setting" = python-torch ] && last="; open('$out/after.txt', 'w').write(str(time.perf_counter() - t0))"
      if s=$(timed "$CPA_STREAM_PYTHON" -c "${first}import cpa_stream as cs; cs.train('$store', '$out/busy-py.run', max_epochs=$epochs, overwrite=True, progress=False)${last}"); then
        record "$setting" "$load" train "$s" "$((train_cells * epochs))"
        [ -n "$last" ] && record python-torch-after "$load" train "$(cat "$out/after.txt")" "$((train_cells * epochs))"
      fi
      if s=$(timed "$CPA_STREAM_PYTHON" -c "${first}import cpa_stream as cs; cs.Run('$run').predict_to_parquet('$out/pred-py.parquet', '$store', source='all', overwrite=True, progress=False)${last}"); then
        record "$setting" "$load" predict "$s" "$cells"
        [ -n "$last" ] && record python-torch-after "$load" predict "$(cat "$out/after.txt")" "$cells"
      fi
    done
    if [ -x "$peer" ]; then
      # Its own training figure (steady epochs, cells/s), not its wall time with set-up and scoring.
      if "$peer" ../shared/peer/cpa-tools/run_peer.py "$h5ad" --perturbation-key condition \
        --dose-key dose --control-group control --covariate-keys cell_type --max-comb-len 2 \
        --max-cells "$peer_cells" --epochs "$epochs" --threads "$cpus" --json "$out/peer.json" > /dev/null; then
        rate=$(python3 -c "import json; print(json.load(open('$out/peer.json'))['train_cells_per_s'])")
        record cpa-tools "$load" train "$(python3 -c "print(1 / $rate)")" 1
      else
        echo "cpa-tools failed" >&2
      fi
    fi
    stop_busy
    echo "rep $rep load $load done" >&2
  done
done

python3 - "$results" "$busy" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
busy = int(sys.argv[2])
print(f"cells/s, medians of {len(rows) and max(1, len(rows) // len({(r['setting'], r['load'], r['task']) for r in rows}))} runs; "
      f"loaded = {busy} busy processes beside it")
print(f"{'setting':<12} {'task':<8} {'idle':>10} {'loaded':>10} {'loaded/idle':>12}")
keys = sorted({(r['setting'], r['task']) for r in rows})
for setting, task in keys:
    rate = {}
    for load in (0, busy):
        xs = [r['cells'] / r['seconds'] for r in rows if (r['setting'], r['task'], r['load']) == (setting, task, load)]
        rate[load] = statistics.median(xs) if xs else float('nan')
    print(f"{setting:<12} {task:<8} {rate[0]:>10.0f} {rate[busy]:>10.0f} {rate[busy] / rate[0]:>12.2f}")
# Python against the CLI in the same conditions (issue 50: within 1.2x, whichever is imported first).
def median_rate(setting, task, load):
    xs = [r['cells'] / r['seconds'] for r in rows if (r['setting'], r['task'], r['load']) == (setting, task, load)]
    return statistics.median(xs) if xs else float('nan')
for setting in ("python", "python-torch", "python-torch-after"):
    for task in ("train", "predict"):
        cells = []
        for load in (0, busy):
            cli, py = median_rate("default", task, load), median_rate(setting, task, load)
            cells.append(f"{'idle' if load == 0 else 'loaded'} {cli / py:.2f}x")
        print(f"CLI speed / {setting} speed, {task}: " + ", ".join(cells))
PY
