#!/usr/bin/env bash
# Atlases as they arrive (issue 49, docs/benchmarks.md "Zarr inputs and appends"), in one run:
#   1. import of the same plates from .h5ad and from zarr (format 3 with zstd, as anndata 0.12
#      writes it; format 2 with blosc lz4, as zarr-python 2 did), interleaved: cells/s, MB/s of
#      the input files and of the values decoded (8 bytes an entry);
#   2. appending one plate to a store of 14 plates (1.4 M cells) and to a store of 2, against
#      importing all 15 plates again: wall time, bytes the process wrote (write_bytes from
#      /proc, the storage layer's count) and peak RSS.
#   FILES GENES CELLS DENSITY   the plates, as scripts/bench-collection.sh makes them (default 15 x
#                               100000 x 5000 x 0.05; the last one is the plate appended)
#   ZARR_FILES                  plates imported from each format (default 2)
#   REPS                        repetitions (default 3)
#   BENCH_DIR                   where the files go (default $CPA_STREAM_CACHE/bench-atlas)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
bin="$CARGO_TARGET_DIR/release/cpa-stream"
files="${FILES:-15}" cells="${CELLS:-100000}" genes="${GENES:-5000}" reps="${REPS:-3}" density="${DENSITY:-0.05}"
zarr_files="${ZARR_FILES:-2}"
dir="${BENCH_DIR:-$CPA_STREAM_CACHE/bench-atlas}/${files}x${cells}x${genes}x${density}"
mkdir -p "$dir/out"
export CPA_STREAM_LOG=warn
last=$(printf %02d $((files - 1)))
if [ ! -f "$dir/in/plate$last.h5ad" ]; then
  "$CPA_STREAM_PYTHON" scripts/bench_collection.py make "$dir/in" --files "$files" --cells "$cells" --genes "$genes" \
    --density "$density"
fi
for ((f = 0; f < zarr_files; f++)); do
  p=$(printf %02d "$f")
  [ -d "$dir/in/plate$p.v3.zarr" ] || "$CPA_STREAM_PYTHON" - "$dir/in/plate$p" <<'PY'
import sys, warnings
import anndata as ad
warnings.filterwarnings("ignore")
a = ad.read_h5ad(sys.argv[1] + ".h5ad")
for fmt in (3, 2):
    ad.settings.zarr_write_format = fmt
    a.write_zarr(f"{sys.argv[1]}.v{fmt}.zarr")
PY
done
results="$dir/results.jsonl"
: > "$results"
# Runs a command, appending one JSON line: what, wall s, bytes written (storage layer, and by
# write calls), peak RSS MiB of the command.
measure() { # what command...
  local what=$1
  shift
  "$CPA_STREAM_PYTHON" - "$what" "$results" "$@" <<'PY'
import json, resource, subprocess, sys, time
what, results, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
def io():
    d = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(d["write_bytes"]), int(d["wchar"])
before = io()
start = time.perf_counter()
subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
wall = time.perf_counter() - start
after = io()
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
with open(results, "a") as out:
    out.write(json.dumps({"what": what, "wall_s": wall, "write_bytes": after[0] - before[0],
                          "wchar": after[1] - before[1], "peak_rss_mib": rss}) + "\n")
PY
}
# 1. Import speed by input format.
formats=(h5ad v3.zarr v2.zarr)
for ((rep = 0; rep < reps; rep++)); do
  for ((k = 0; k < ${#formats[@]}; k++)); do
    fmt=${formats[$(((k + rep) % ${#formats[@]}))]}
    inputs=()
    for ((f = 0; f < zarr_files; f++)); do inputs+=("$dir/in/plate$(printf %02d "$f").$fmt"); done
    echo "rep $rep: import from $fmt" >&2
    measure "import $fmt" "$bin" import "${inputs[@]}" --out "$dir/out/format.store" --overwrite
  done
done
# What the inputs of each format hold: their bytes, and the entries they decode to.
input_bytes() { du -sb "$@" | awk '{s += $1} END {print s}'; }
nnz=$("$bin" inspect "$dir/out/format.store" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["nnz"])')
declare -A bytes_of
for fmt in "${formats[@]}"; do
  inputs=()
  for ((f = 0; f < zarr_files; f++)); do inputs+=("$dir/in/plate$(printf %02d "$f").$fmt"); done
  bytes_of[$fmt]=$(input_bytes "${inputs[@]}")
done
# 2. Appends.
plates=("$dir"/in/plate*.h5ad)
added="${plates[$((files - 1))]}"
base_all=("${plates[@]:0:$((files - 1))}")
[ -f "$dir/out/base-all.store/manifest.json" ] || "$bin" import "${base_all[@]}" --out "$dir/out/base-all.store" --overwrite > /dev/null
[ -f "$dir/out/base-two.store/manifest.json" ] || "$bin" import "${plates[@]:0:2}" --out "$dir/out/base-two.store" --overwrite > /dev/null
for ((rep = 0; rep < reps; rep++)); do
  for base in all two; do
    # A copy of the base store made of links (the append grows its files after their bytes, which
    # the base's manifest does not list; the next append removes them again).
    rm -rf "$dir/out/app.store" && cp -al "$dir/out/base-$base.store" "$dir/out/app.store"
    sync
    echo "rep $rep: append to base-$base" >&2
    measure "append to $base" "$bin" import --append "$dir/out/app.store" "$added" --make-unique
  done
  sync
  echo "rep $rep: import all again" >&2
  measure "import all again" "$bin" import "${plates[@]}" --out "$dir/out/again.store" --overwrite --make-unique
  rm -rf "$dir/out/again.store"
done
base_cells=$("$bin" inspect "$dir/out/base-all.store" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["n_obs"])')
two_cells=$("$bin" inspect "$dir/out/base-two.store" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["n_obs"])')
echo "load: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores; stores of $base_cells and $two_cells cells, $cells appended"
python3 - "$results" "$nnz" "$((zarr_files * cells))" "${bytes_of[h5ad]}" "${bytes_of[v3.zarr]}" "${bytes_of[v2.zarr]}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
nnz, cells = int(sys.argv[2]), int(sys.argv[3])
sizes = {"h5ad": int(sys.argv[4]), "v3.zarr": int(sys.argv[5]), "v2.zarr": int(sys.argv[6])}
med = lambda what, key: statistics.median(r[key] for r in rows if r["what"] == what)
n = lambda what: sum(r["what"] == what for r in rows)
print(f"{'input':<10}{'MB':>8}{'wall s':>9}{'cells/s':>10}{'input MB/s':>12}{'decoded MB/s':>14}")
for fmt, size in sizes.items():
    w = med(f"import {fmt}", "wall_s")
    print(f"{fmt:<10}{size / 1e6:>8.0f}{w:>9.2f}{cells / w:>10.0f}{size / 1e6 / w:>12.0f}{nnz * 8 / 1e6 / w:>14.0f}")
print(f"{'':<18}{'wall s':>9}{'written MB':>12}{'write calls MB':>16}{'peak RSS MiB':>14}")
for what in ("append to all", "append to two", "import all again"):
    print(f"{what:<18}{med(what, 'wall_s'):>9.2f}{med(what, 'write_bytes') / 1e6:>12.0f}"
          f"{med(what, 'wchar') / 1e6:>16.0f}{med(what, 'peak_rss_mib'):>14.0f}")
print(f"(medians of {n('append to all')} repetitions, interleaved)")
PY
