#!/usr/bin/env bash
# cpa-stream's loader side by side with annbatch and scDataset, on identical data, in one run.
#
# Builds the data of ../shared/peer/loader once (make_data.py, seed 0), converts it for each tool
# (annbatch's preshuffled zarr stores, lz4 and raw; cpa-stream's raw store and a shuffled zstd
# copy), timing each conversion, then for REPS repetitions runs, interleaved: cpa-stream's
# `bench loader` (raw and zstd stores, batch 128 and 4,096, CSR and dense out) and the peer
# harness (run_bench.py: annbatch on lz4 and raw at its library defaults and at the harness's
# tuned setting; scDataset over the .h5ad). Prints one table of medians and ratios to annbatch.
# COLD=1 adds cold first epochs from disk (page cache dropped before each), cpa-stream against
# annbatch's lz4 store, with the disk's sequential read speed measured in the same rounds.
#
#   REPS   repetitions (default 3)      CELLS / GENES   data shape (default 200000 x 5000)
#   DIR    data and results (default $CPA_STREAM_CACHE/bench-peers)
#   COLD   1 to add the cold table       PEERS  0 to skip the peers (cpa-stream only)
#   WARM   0 to skip the page-cached table (keeps the last one's results)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
bin="$CARGO_TARGET_DIR/release/cpa-stream"
harness="$repo/../shared/peer/loader"
reps="${REPS:-3}"
cells="${CELLS:-200000}"
genes="${GENES:-5000}"
dir="${DIR:-$CPA_STREAM_CACHE/bench-peers}"
mkdir -p "$dir/results"
cd "$dir"
export CPA_STREAM_LOG=warn
peer=$("$repo/scripts/peer-env.sh")
tag="${cells}x${genes}"
h5ad="synth_$tag.h5ad"
res="results"

# Seconds and peak RSS of a command, into $res/$1.time (GNU time's format).
timed() {
  local name=$1
  shift
  /usr/bin/time -f '{"seconds": %e, "peak_rss_kb": %M}' -o "$res/$name.time" "$@"
}

if [ ! -f "$h5ad" ]; then
  echo "== data: $cells x $genes (make_data.py, seed 0)"
  "$peer" "$harness/make_data.py" --n-cells "$cells" --n-genes "$genes" --seed 0 --out "$h5ad"
fi
if [ ! -d "synth_$tag.annbatch.zarr" ]; then
  echo "== annbatch conversion (lz4, its defaults; it also shuffles)"
  timed annbatch-lz4 "$peer" "$harness/prep_annbatch.py" "$h5ad" "synth_$tag.annbatch.zarr"
  timed annbatch-raw "$peer" "$harness/prep_annbatch.py" "$h5ad" "synth_$tag.annbatch-raw.zarr" --compressor none
fi
# Again whenever the binary is newer than the stores: they are written as this build writes them.
if [ ! -f "raw.store/manifest.json" ] || [ ! -f "zstd.store/manifest.json" ] || [ ! -f "$res/convert.time" ] \
  || [ "$bin" -nt zstd.store/manifest.json ]; then
  echo "== cpa-stream import + convert --shuffle to zstd"
  timed import "$bin" import "$h5ad" --out raw.store --overwrite -q
  timed convert "$bin" convert raw.store --codec zstd --shuffle 0 --out zstd.store --overwrite -q
fi
# make_data.py's conditions are cond_0 .. cond_9; the loader needs one named as the control.
control=cond_0

if [ "${WARM:-1}" = 1 ]; then
: > "$res/ours.jsonl"
for rep in $(seq "$reps"); do
  echo "== repetition $rep of $reps"
  for batch in 128 4096; do
    for store in raw zstd; do
      for out in csr dense; do
        flag=()
        [ "$out" = dense ] && flag=(--dense)
        # As the peer harness does: an untimed first epoch (threads, buffers, first touches),
        # then the median of the timed ones.
        "$bin" bench loader "$store.store" --control "$control" --batch-size "$batch" --epochs 3 "${flag[@]}" --json |
          python3 -c "import json,statistics,sys; r=json.load(sys.stdin); r.update(rep=$rep, out='$out', store_name='$store', cells_per_s=statistics.median(x['cells_per_s'] for x in r['rounds'][1:])); print(json.dumps(r))" \
            >> "$res/ours.jsonl"
      done
    done
  done
  if [ "${PEERS:-1}" = 1 ]; then
    "$peer" "$harness/run_bench.py" --h5ad "$h5ad" \
      --annbatch-store "lz4=synth_$tag.annbatch.zarr" --annbatch-store "raw=synth_$tag.annbatch-raw.zarr" \
      --loaders annbatch,scdataset --batch-sizes 4096,128 --workers 0 --outputs csr,dense \
      --ab-chunk-size 512 --ab-preload-nchunks 32 --ab-extra 32:256 \
      --out "$res/peers-$rep.json" > "$res/peers-$rep.log" 2>&1 || echo "peer harness failed: see $dir/$res/peers-$rep.log"
  fi
done
fi

if [ "${COLD:-0}" = 1 ]; then
  : > "$res/cold.jsonl"
  for rep in $(seq "$reps"); do
    for batch in 128 4096; do
      for store in raw zstd; do
        for advice in normal sequential; do
          "$bin" bench loader "$store.store" --control "$control" --batch-size "$batch" --epochs 1 --cold \
            --advice "$advice" --json |
            python3 -c "import json,sys; r=json.load(sys.stdin); r.update(rep=$rep, store_name='$store'); print(json.dumps(r))" \
              >> "$res/cold.jsonl"
        done
      done
      "$peer" "$repo/scripts/peer_cold.py" "$harness" "synth_$tag.annbatch.zarr" --batch-size "$batch" --rounds 1 |
        python3 -c "import json,sys; r=json.load(sys.stdin); r.update(rep=$rep, store_name='annbatch-lz4'); print(json.dumps(r))" \
          >> "$res/cold.jsonl"
    done
  done
fi

python3 "$repo/scripts/peer_table.py" "$dir" "$tag"
