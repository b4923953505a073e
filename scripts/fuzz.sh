#!/usr/bin/env bash
# Mutation fuzzing of the parsers of user files, for SECONDS (default 60) per call:
#   scripts/fuzz.sh h5ad [SECONDS]     random byte edits of .h5ad files (anndata's archived 0.5 and 0.7
#                                      files and the bundled atlas), imported by the CLI in a child
#                                      process each: exit 0 or 1 is fine, anything else a crash
#   scripts/fuzz.sh store [SECONDS]    random byte edits of every file of raw and zstd stores:
#                                      open, gather every row, verify (property test, in rounds)
#   scripts/fuzz.sh parsers [SECONDS]  --source expressions, targets, conditions and doses, TOML
#                                      configurations, manifests (property tests, in rounds)
# Crashing inputs are kept in out/fuzz/TARGET/ (h5ad) or in the proptest-regressions files
# (store, parsers), which the test suite replays. Not coverage-guided (no libFuzzer/AFL: those
# need the whole workspace rebuilt with nightly instrumentation); not part of CI's time budget.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: scripts/fuzz.sh h5ad|store|parsers [SECONDS]}"
seconds="${2:-60}"
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
bin="$CARGO_TARGET_DIR/release/cpa-stream"
deadline=$(( $(date +%s) + seconds ))
out="out/fuzz/$target"
mkdir -p "$out"

case "$target" in
  h5ad)
    BIN="$bin" OUT="$out" DEADLINE="$deadline" "$CPA_STREAM_PYTHON" - <<'PY'
import collections, os, random, subprocess, time
inputs = [
    "../shared/data/anndata-archives/v0.7.8/adata.h5ad",
    "../shared/data/anndata-archives/v0.7.0/adata.h5ad",
    "../shared/data/anndata-archives/v0.5.0/adata.h5ad",
    "examples/data/perturbench_devel_cpa.h5ad",
]
inputs = [open(p, "rb").read() for p in inputs if os.path.exists(p)]
rng = random.Random(int(time.time()))
codes, runs, crashes = collections.Counter(), 0, 0
work = os.path.join(os.environ["OUT"], "work")
os.makedirs(work, exist_ok=True)
while time.time() < int(os.environ["DEADLINE"]):
    data = bytearray(rng.choice(inputs[:3] if rng.random() < 0.9 else inputs))
    for _ in range(rng.randint(1, 16)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    path = os.path.join(work, "input.h5ad")
    open(path, "wb").write(data)
    args = ["--use-raw"] if rng.random() < 0.3 else []
    r = subprocess.run([os.environ["BIN"], "import", path, "--out", os.path.join(work, "s.store"), "--overwrite", *args],
                       capture_output=True, timeout=300)
    runs += 1
    codes[r.returncode] += 1
    if r.returncode not in (0, 1):
        crashes += 1
        keep = os.path.join(os.environ["OUT"], f"crash-{runs}.h5ad")
        open(keep, "wb").write(data)
        print(f"crash (exit {r.returncode}) kept as {keep}: {r.stderr[-400:].decode(errors='replace')}")
print(f"h5ad: {runs} inputs executed, exit codes {dict(codes)}, {crashes} crashes")
raise SystemExit(1 if crashes else 0)
PY
    ;;
  store | parsers)
    if [ "$target" = store ]; then
      filter=(--features cpa-stream/polars --test integration store::damaged)
    else
      filter=(-p cpa-stream-pipeline --test parsers_never_panic)
    fi
    rounds=0
    while [ "$(date +%s)" -lt "$deadline" ]; do
      PROPTEST_CASES=5000 cargo test --release --locked "${filter[@]}" --quiet \
        > "$out/last.log" 2>&1 || { cat "$out/last.log"; echo "$target: a failing case (see the proptest-regressions file)"; exit 1; }
      rounds=$((rounds + 1))
    done
    echo "$target: $rounds rounds of 5,000 cases per property, no failure"
    ;;
  *)
    echo "unknown target $target (h5ad, store, parsers)" >&2
    exit 2
    ;;
esac
