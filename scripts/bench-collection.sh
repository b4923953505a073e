#!/usr/bin/env bash
# Many files into one shuffled training set, side by side in one run (docs/benchmarks.md, "Many
# files, one store"): cpa-stream import --shuffle, annbatch's DatasetCollection.add_adatas
# (shuffled) and anndata.concat in memory (shuffled, written as .h5ad). Repetitions interleave the
# three (the order rotates), and the summary gives medians and ratios.
#   FILES GENES CELLS   the collection: FILES files of CELLS cells x GENES genes, genes in a
#                       shuffled order per file (default 14 x 100000 x 5000)
#   DENSITY             non-zero fraction of the matrix (default 0.05)
#   REPS                repetitions (default 3)
#   ANNBATCH_PYTHON     a Python with annbatch[zarrs] 0.3.1 (default: scripts/peer-env.sh's venv,
#                       made once; where it cannot be made annbatch is skipped, the reason printed)
#   BENCH_DIR           where the files and outputs go (default $CPA_STREAM_CACHE/bench-collection)
# Peak memory is /usr/bin/time's maximum resident set size of each process.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
bin="$CARGO_TARGET_DIR/release/cpa-stream"
files="${FILES:-14}" cells="${CELLS:-100000}" genes="${GENES:-5000}" reps="${REPS:-3}" density="${DENSITY:-0.05}"
dir="${BENCH_DIR:-$CPA_STREAM_CACHE/bench-collection}/${files}x${cells}x${genes}x${density}"
mkdir -p "$dir/out"
export CPA_STREAM_LOG=warn
if [ ! -f "$dir/in/plate$(printf %02d $((files - 1))).h5ad" ]; then
  "$CPA_STREAM_PYTHON" scripts/bench_collection.py make "$dir/in" --files "$files" --cells "$cells" --genes "$genes" \
    --density "$density"
fi
inputs=("$dir"/in/plate*.h5ad)
tools=(cpa-stream annbatch concat)
ANNBATCH_PYTHON="${ANNBATCH_PYTHON:-$(scripts/peer-env.sh || true)}"
if [ -z "$ANNBATCH_PYTHON" ]; then
  echo "annbatch skipped: no Python >= 3.12 with annbatch[zarrs]==0.3.1 (scripts/peer-env.sh could not make one)"
  tools=(cpa-stream concat)
fi
results="$dir/results.tsv"
printf 'rep\ttool\twall_s\tpeak_rss_mib\toutput_mb\n' > "$results"
: > "$dir/anon"
run() { # tool rep
  local tool=$1 rep=$2 out wall
  case "$tool" in
    cpa-stream)
      out="$dir/out/collection.store"
      /usr/bin/time -f '%e %M' -o "$dir/time" "$bin" import "${inputs[@]}" --shuffle 0 --out "$out" --overwrite \
        --json > "$dir/json"
      python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["report"]["memory"]["rss_anon"] / 2**20))' \
        "$dir/json" >> "$dir/anon"
      wall=$(awk '{print $1}' "$dir/time") ;;
    annbatch)
      out="$dir/out/collection.zarr"
      /usr/bin/time -f '%e %M' -o "$dir/time" "$ANNBATCH_PYTHON" scripts/bench_collection.py annbatch "$out" \
        "${inputs[@]}" > "$dir/json"
      wall=$(awk '{print $1}' "$dir/time") ;;
    concat)
      out="$dir/out/collection.h5ad"
      /usr/bin/time -f '%e %M' -o "$dir/time" "$CPA_STREAM_PYTHON" scripts/bench_collection.py concat "$out" \
        "${inputs[@]}" > "$dir/json"
      wall=$(awk '{print $1}' "$dir/time") ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$rep" "$tool" "$wall" "$(awk '{printf "%.0f", $2 / 1024}' "$dir/time")" \
    "$(du -sm "$out" | cut -f1)" >> "$results"
  rm -rf "$out"
}
for ((rep = 0; rep < reps; rep++)); do
  for ((k = 0; k < ${#tools[@]}; k++)); do
    tool=${tools[$(((k + rep) % ${#tools[@]}))]}
    echo "rep $rep: $tool" >&2
    run "$tool" "$rep"
  done
done
echo "cpa-stream's own peak RssAnon (MiB, each repetition): $(paste -sd' ' "$dir/anon"); mapped store pages make up the rest of its RSS"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores; input: $(du -sm "$dir/in" | cut -f1) MB in $files files"
python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
tools = list(dict.fromkeys(r["tool"] for r in rows))
med = {t: {k: statistics.median(float(r[k]) for r in rows if r["tool"] == t)
           for k in ("wall_s", "peak_rss_mib", "output_mb")} for t in tools}
base = med["cpa-stream"]
print(f"{'tool':<12}{'wall s':>10}{'peak RSS MiB':>14}{'output MB':>11}{'wall / ours':>13}{'RSS / ours':>12}")
for t in tools:
    m = med[t]
    print(f"{t:<12}{m['wall_s']:>10.1f}{m['peak_rss_mib']:>14.0f}{m['output_mb']:>11.0f}"
          f"{m['wall_s'] / base['wall_s']:>13.2f}{m['peak_rss_mib'] / base['peak_rss_mib']:>12.2f}")
print(f"(medians of {len(rows) // len(tools)} repetitions, interleaved)")
PY
