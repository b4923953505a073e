#!/usr/bin/env bash
# The demo of the README: runs the main job on bundled and built-in data, in a few minutes on a
# laptop CPU.
#   OUT  output directory (default: out/demo)
#
# The first run builds everything (docs/install.md: 22 to 28 minutes on 2 cores). It builds the
# front first (the data commands, no libtorch) and runs the demo's first part on it, while PyTorch
# downloads and the model's engine and the Python module compile in the background; later runs
# find everything built and start at once.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/demo}"
mkdir -p "$out"
eval "$(scripts/bootstrap.sh --tools)"
work="$(mktemp -d "${TMPDIR:-/tmp}/cpa-stream-demo.XXXXXX")"
log="$work/build.log"
first=false
[ -x "$CARGO_TARGET_DIR/release/cpa-stream-engine" ] || first=true

# In the background, in its own process group: PyTorch (the first time: gigabytes), then, once the
# front is built, the full build (beside it the Python part's packages download), then the Python
# package. Each step leaves a mark the foreground waits for.
setsid bash -c '
  set -euo pipefail
  work=$1
  scripts/bootstrap.sh >"$work/env.sh"
  eval "$(cat "$work/env.sh")"
  while [ ! -f "$work/front.ok" ]; do sleep 1; done
  # The Python part'"'"'s packages download while the engine compiles.
  scripts/python.sh --deps &
  deps=$!
  scripts/build.sh
  touch "$work/engine.ok"
  wait "$deps"
  scripts/python.sh >/dev/null
  touch "$work/python.ok"
' background "$work" >"$log" 2>&1 &
background=$!
trap 'kill -TERM -- -"$background" 2>/dev/null || true; rm -rf "$work"' EXIT

# Waits for the background's mark NAME, a line a minute meanwhile; its log and exit 1 if it failed.
wait_for() { # NAME WHAT
  local waited=0
  while [ ! -f "$work/$1.ok" ]; do
    if ! kill -0 "$background" 2>/dev/null && [ ! -f "$work/$1.ok" ]; then
      echo "demo: building $2 failed; its log:" >&2
      tail -n 40 "$log" >&2
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
    if [ $((waited % 60)) -eq 0 ]; then
      local last
      last="$(grep -Eo '(Compiling|installing) [^ ]+( v[^ ]+)?' "$log" | tail -n 1 || true)"
      echo "demo: waiting for $2 ($((waited / 60)) min${last:+; $last})" >&2
    fi
  done
}

$first && echo "demo: the first run compiles cpa-stream: the data commands first (11 to 15 minutes on 2" \
  "cores), then the model's engine while the demo's first part runs (PyTorch downloads meanwhile)" >&2
scripts/build.sh --front
# The first part runs a copy: the full build replaces the front's file when it finishes.
front="$work/cpa-stream"
cp "$CARGO_TARGET_DIR/release/cpa-stream" "$front"
touch "$work/front.ok"

step() { printf '\n== %s\n' "$*"; }

step "real data: import the bundled .h5ad (Norman 2019 + McFaline-Figueroa 2023 subset)"
"$front" import examples/data/perturbench_devel_cpa.h5ad --out "$out/perturbench.store" --overwrite
"$front" inspect "$out/perturbench.store"
"$front" verify "$out/perturbench.store"

step "export it back to .h5ad (gzip) and import that again"
"$front" export "$out/perturbench.store" --out "$out/perturbench-roundtrip.h5ad" --compression gzip --overwrite
"$front" import "$out/perturbench-roundtrip.h5ad" --out "$out/perturbench-roundtrip.store" --overwrite

step "synthetic atlas with ground truth: 20,000 cells x 2,000 genes"
"$front" synth --cells 20000 --genes 2000 --perturbations 8 --doses 3 --cell-types 3 \
  --combinations 4 --seed 42 --out "$out/atlas.store" --overwrite

step "inspect"
"$front" inspect "$out/atlas.store"

step "verify"
"$front" verify "$out/atlas.store"

step "zstd copy"
"$front" convert "$out/atlas.store" --codec zstd --out "$out/atlas-zstd.store" --overwrite

step "reader throughput (raw, then zstd)"
"$front" bench reader "$out/atlas.store" --repeats 2
"$front" bench reader "$out/atlas-zstd.store" --repeats 2

wait_for engine "the model's engine (libtorch's binding)"
# The Python module builds next (under a minute): the training below plans its threads on the load
# it finds when it starts, so it starts once nothing of the build runs beside it.
wait_for python "the Python package"
eval "$(cat "$work/env.sh")"
bin="$CARGO_TARGET_DIR/release/cpa-stream"

step "libtorch and devices"
"$bin" info

step "CPA training throughput (reference architecture, 5,000 x 2,000 synthetic cells in memory, CPU)"
"$bin" bench model --cells 5000 --genes 2000 --batch-size 128 --epochs 2

# The held-out pair: the bundled pair with the largest measured effect whose two genes are each
# measured alone (its cells' mean is 0.938 R2 from the control mean's, against 0.97-0.99 for the
# others), so predicting it means predicting a change.
pair="MAPK1+TGFBR2"
step "train CPA on the real data through the streaming pipeline (held-out pair $pair)"

"$bin" train --store "$out/perturbench.store" --dose-key dose --covariates cell_type \
  --holdout "$pair" --epochs 100 --out "$out/run" --overwrite

step "predict the held-out pair $pair from K562 control cells (Parquet, streamed)"
"$bin" predict --model "$out/run" --store "$out/perturbench.store" \
  --source "condition == control and cell_type == k562" \
  --target "condition=$pair,dose=1+1,cell_type=k562" --latents z_basal \
  --out "$out/held_out_pair.parquet" --overwrite

step "evaluate: the held-out pair (ood split), anchored (the default) and plain; then the test split"
"$bin" evaluate --model "$out/run" --store "$out/perturbench.store" --split ood --out "$out/eval-ood" --overwrite
"$bin" evaluate --model "$out/run" --store "$out/perturbench.store" --split ood --plain --no-plots \
  --out "$out/eval-ood-plain" --overwrite
echo "(R2 of log1p means over the 500 genes, 1 is perfect: r2_mean is the model's, which never saw the two genes"
echo " together: first anchored, the K562 controls' observed log1p counts moved by the predicted change (all"
echo " 100 controls: an anchor needs 30 or more), then plain (--plain), log1p of the model's decoded mean as"
echo " cpa-tools predicts, from the 22 held-out controls; ctrl_bl is what predicting 'no change' (the same"
echo " controls' mean) scores, lin_bl a linear baseline's.)"
"$bin" evaluate --model "$out/run" --store "$out/perturbench.store" --split test --out "$out/eval-test" --overwrite

step "synthetic atlas with a held-back combination: train, then score against the true means"
"$bin" synth --cells 6000 --genes 200 --perturbations 4 --doses 1 --cell-types 2 --combinations 2 \
  --heldout-combinations 1 --seed 5 --out "$out/small.store" --overwrite

"$bin" train --store "$out/small.store" --dose-key dose --covariates cell_type \
  --config examples/cpa-small.toml --epochs 100 --out "$out/small-run" --overwrite
"$bin" evaluate --model "$out/small-run" --store "$out/small.store" --out "$out/small-eval" --overwrite
echo "(rows with 0 cells are the held-back combination, scored only against the truth: column 'truth')"

# 30 epochs: the route is what this part shows; the 100-epoch model above is the one to judge.
step "the same from Python: the cpa_stream package on an in-memory AnnData (examples/python/quickstart.py, 30 epochs)"
"$CPA_STREAM_VENV/bin/python" examples/python/quickstart.py "$out/python" 30
