#!/usr/bin/env bash
# Benchmarks of the store and the synthetic generator (the figures in docs/benchmarks.md).
#   CELLS   cells of the synthetic atlas (default 1000000)
#   GENES   genes (default 5000)
#   BENCH_DIR  where stores and results go (default: $CPA_STREAM_CACHE/bench; needs ~10 GB at 1M x 5,000)
# Results: $BENCH_DIR/results/*.json and a summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
bin="$CARGO_TARGET_DIR/release/cpa-stream"
cells="${CELLS:-1000000}"
genes="${GENES:-5000}"
dir="${BENCH_DIR:-$CPA_STREAM_CACHE/bench}"
res="$dir/results"
mkdir -p "$res"
raw="$dir/synth-${cells}x${genes}.store"
zst="$dir/synth-${cells}x${genes}-zstd.store"
export CPA_STREAM_LOG=warn

echo "== synth $cells x $genes (raw)"
if [ -f "$raw/manifest.json" ] && [ -f "$res/synth-raw.json" ] && [ -z "${REGENERATE:-}" ]; then
  echo "(reusing $raw and its synth figures; REGENERATE=1 makes it again)"
else
"$bin" synth --cells "$cells" --genes "$genes" --perturbations 20 --doses 4 --cell-types 5 \
  --combinations 10 --seed 1 --out "$raw" --overwrite --json > "$res/synth-raw.json"
fi
python3 - "$res/synth-raw.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
m, r = s["manifest"], s["report"]
print(f"synth: {m['n_obs']} cells, nnz {m['nnz']}, {s['cells_per_s']:.0f} cells/s, {s['mb_per_s']:.1f} MB/s, "
      f"peak RssAnon {r['memory']['rss_anon']/2**20:.1f} MiB, wall {r['wall']['secs']} s")
PY

echo "== convert to zstd (level 3, 256 rows per block)"
"$bin" convert "$raw" --codec zstd --out "$zst" --overwrite --json > "$res/convert.json"
python3 - "$res/convert.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
r = c["report"]
print(f"convert: {r['wall']['secs'] + r['wall']['nanos'] / 1e9:.1f} s, peak RssAnon {r['memory']['rss_anon'] / 2**20:.1f} MiB")
PY

for store in "$raw" "$zst"; do
  name=$(basename "$store" .store)
  echo "== reader $name"
  "$bin" bench reader "$store" --threads 1 --repeats 3 --json > "$res/reader-$name-1t.json"
  "$bin" bench reader "$store" --repeats 3 --json > "$res/reader-$name.json"
  python3 - "$res/reader-$name-1t.json" "$res/reader-$name.json" <<'PY'
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))
    print(f"  {r['codec']:>4} {r['threads']} thread(s): memcpy {r['memcpy_cells_per_s']:.0f} cells/s ({r['memcpy']['gb_per_s']:.2f} GB/s); "
          f"sequential {r['sequential']['cells_per_s']:.0f} cells/s ({r['sequential_vs_memcpy']:.2f} of memcpy); "
          f"block-shuffled {r['block_shuffled']['cells_per_s']:.0f} ({r['block_shuffled_vs_memcpy']:.2f}); "
          f"random {r['random']['cells_per_s']:.0f} cells/s ({r['random_vs_memcpy']:.2f}, {r['random_rows']} rows)")
PY
done

echo "== sizes"
for store in "$raw" "$zst"; do
  "$bin" inspect "$store" --json > "$res/inspect-$(basename "$store" .store).json"
  python3 - "$res/inspect-$(basename "$store" .store).json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
matrix = sum(f["bytes"] for name, f in d["files"].items() if name.startswith("X/"))
print(f"  {d['codec']['name']:>4}: total {d['total_bytes'] / 1e9:.3f} GB, matrix {matrix / 1e9:.3f} GB, "
      f"{d['total_bytes'] / d['n_obs']:.0f} bytes/cell")
PY
done

echo "== .h5ad export and import (uncompressed and gzip)"
for comp in none gzip; do
  h5="$dir/synth-${cells}x${genes}-$comp.h5ad"
  "$bin" export "$raw" --out "$h5" --compression "$comp" --overwrite --json > "$res/export-$comp.json"
  "$bin" import "$h5" --out "$dir/imported-$comp.store" --overwrite --json > "$res/import-$comp.json"
  python3 - "$res/export-$comp.json" "$res/import-$comp.json" "$h5" "$comp" <<'PY'
import json, os, sys
e, i = json.load(open(sys.argv[1]))["report"], json.load(open(sys.argv[2]))
secs = lambda d: d["secs"] + d["nanos"] / 1e9
size = os.path.getsize(sys.argv[3])
print(f"  {sys.argv[4]:>4}: file {size / 1e9:.2f} GB; export {secs(e['wall']):.1f} s, peak RssAnon {e['memory']['rss_anon'] / 2**20:.0f} MiB; "
      f"import {i['cells_per_s']:.0f} cells/s, {i['input_mb_per_s']:.0f} MB/s of file, peak RssAnon {i['report']['memory']['rss_anon'] / 2**20:.0f} MiB")
PY
  rm -rf "$dir/imported-$comp.store"
done

echo "== model training on preloaded batches (5,000 cells x 2,000 genes, reference architecture, CPU)"
for bs in 128 1024; do
  for threads in 1 0; do
    t_arg=(); [ "$threads" != 0 ] && t_arg=(--threads "$threads")
    "$bin" bench model --cells 5000 --genes 2000 --batch-size "$bs" --epochs 4 "${t_arg[@]}" --json \
      > "$res/model-b$bs-t$threads.json"
    python3 - "$res/model-b$bs-t$threads.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  batch {r['batch_size']:>5}, {r['threads']} thread(s), {r['device']} {r['precision']}: "
      f"{r['cells_per_s']:.0f} cells/s, {r['ms_per_batch']:.1f} ms per batch")
PY
  done
done

echo "== training pipeline (5,000 genes): loader alone; training vs preloaded batches at 100k cells; one epoch at 10k, 100k and 1M cells (batch 1,024)"
# The default run length is chosen from the store's order (runs of 8 cells on this shuffled-order
# synthetic store); the -single runs shuffle single cells.
loader_runs=()
for b in 1024 256 128; do
  for runs in auto 1; do
    name="loader-$b"; [ "$runs" = auto ] || name="$name-single"
    "$bin" bench loader "$raw" --dose-key dose --covariates cell_type --batch-size "$b" --shuffle-run-cells "$runs" \
      --json > "$res/$name.json"
    loader_runs+=("$res/$name.json")
  done
done
python3 - "${loader_runs[@]}" <<'PY'
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))
    runs = f"runs of {r['run_cells']} cells" if r["run_cells"] > 1 else "single cells"
    bound = r["gather_bound_cells_per_s"]
    print(f"  loader batch {r['batch_size']}, {runs}, {r['workers']} workers: {r['cells_per_s']:.0f} cells/s, "
          f"memcpy bound {r['memcpy_cells_per_s']:.0f} cells/s, ratio {r['vs_memcpy']:.2f}; "
          f"read bound {r['read_bound_cells_per_s']:.0f} cells/s, ratio {r['vs_read_bound']:.2f}; "
          + (f"gather bound {bound:.0f} cells/s, ratio {r['vs_gather_bound']:.2f}" if bound else "no gather bound")
          + "; per epoch " + " ".join(f"{x['vs_memcpy']:.2f}" for x in r["rounds"]))
PY
for n in 10000 100000; do
  small="$dir/train-$n.store"
  [ -d "$small" ] || "$bin" synth --cells "$n" --genes "$genes" --perturbations 20 --doses 4 --cell-types 5 \
    --combinations 10 --seed 1 --truth-samples 8 --out "$small" > /dev/null
done
# Training through the pipeline against the same model on preloaded batches, passes alternating
# (batch 1,024 and 128, 100k cells).
for b in 1024 128; do
  "$bin" bench train "$dir/train-100000.store" --dose-key dose --covariates cell_type --batch-size "$b" --json \
    > "$res/train-vs-preloaded-$b.json"
  python3 - "$res/train-vs-preloaded-$b.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  train through the pipeline, batch {r['batch_size']}, runs of {r['run_cells']}: {r['pipeline_cells_per_s']:.0f} "
      f"cells/s vs {r['preloaded_cells_per_s']:.0f} on preloaded batches, ratio {r['ratio']:.2f} (per epoch "
      + " ".join(f"{x['ratio']:.2f}" for x in r["rounds"]) + "); trainer waited "
      + " ".join(f"{x['trainer_blocked_s']:.2f}" for x in r["rounds"]) + " s")
PY
done
for store in "$dir/train-10000.store" "$dir/train-100000.store" "$raw"; do
  name=$(basename "$store" .store)
  rm -rf "$dir/run-$name"
  "$bin" train --store "$store" --dose-key dose --covariates cell_type --epochs 1 --batch-size 1024 \
    --validation-fraction 0 --test-fraction 0 --out "$dir/run-$name" --json > "$res/train-$name.json"
  python3 - "$res/train-$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["report"]["memory"]
print(f"  train {r['train_cells']} cells: {r['cells_per_s']:.0f} cells/s, peak RssAnon {m['rss_anon'] / 2**20:.1f} MiB")
PY
done

echo "== prediction: every cell of 10k, 200k (a shard) and 1M cells decoded into one target, all genes written"
# The model: one epoch on the 10k store (its quality does not matter to the speed).
rm -rf "$dir/run-predict"
"$bin" train --store "$dir/train-10000.store" --dose-key dose --covariates cell_type --epochs 1 \
  --batch-size 1024 --out "$dir/run-predict" > /dev/null
for run in "10000:$dir/train-10000.store:" "200000:$raw:0/5" "1000000:$raw:"; do
  IFS=: read -r n store shard <<< "$run"
  out="$dir/predict-$n"
  rm -rf "$out" && mkdir -p "$out"
  # A shard writes OUT/part-k-of-n.parquet into a directory; a whole run writes one file.
  shard_arg=(--out "$out/predictions.parquet"); [ -n "$shard" ] && shard_arg=(--shard "$shard" --out "$out")
  "$bin" predict --model "$dir/run-predict" --store "$store" --source all \
    --target "condition=PERT01+PERT02,dose=1+1" "${shard_arg[@]}" --json \
    > "$res/predict-$n.json"
  python3 - "$res/predict-$n.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
busy = {s["name"]: s["busy"]["secs"] + s["busy"]["nanos"] / 1e9 for s in r["report"]["stages"]}
print(f"  predict {r['source_cells']} cells: {r['cells_per_s']:.0f} cells/s ({r['seconds']:.1f} s), "
      f"{r['bytes_per_row']:.0f} bytes per row vs {r['raw_f32_bytes_per_row']:.0f} raw float32, "
      f"peak RssAnon {r['report']['memory']['rss_anon'] / 2**20:.0f} MiB; busy s: "
      + ", ".join(f"{k} {v:.0f}" for k, v in busy.items()))
PY
  rm -rf "$out"
done
