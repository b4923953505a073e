#!/usr/bin/env bash
# Fuzzing of every parser of user files, for SECONDS (default 60) per call:
#
# Coverage-guided (libFuzzer through cargo-fuzz; fuzz/fuzz_targets/, AddressSanitizer on):
#   scripts/fuzz.sh store [SECONDS]       store open + row gather + verify, raw and zstd: one file
#                                         of a valid store edited byte by byte or truncated
#   scripts/fuzz.sh h5ad [SECONDS]        the .h5ad reader (X, adata.raw, a layer, obs, var, DEGs),
#                                         seeded with anndata's archived files 0.5-0.11 and fixtures
#   scripts/fuzz.sh source [SECONDS]      the --source expression parser
#   scripts/fuzz.sh condition [SECONDS]   condition/dose text and --targets specifications
#   scripts/fuzz.sh targets [SECONDS]     the --targets FILE reader (CSV and Parquet)
#   scripts/fuzz.sh config [SECONDS]      the model configuration (TOML)
#   scripts/fuzz.sh zarr [SECONDS]        the zarr reader: one file of an AnnData zarr store (format 2,
#                                         3, sharded, small chunks) edited, truncated or removed
#   scripts/fuzz.sh cell_table [SECONDS]  the Parquet cell-table reader and its gene vocabulary
#   These need cargo-fuzz (installed into the cache on first use, from crates.io) and nightly
#   Rust for the instrumentation flags (a `nightly` rustup toolchain if there is one, otherwise
#   the stable one with RUSTC_BOOTSTRAP=1). The corpus grows in fuzz/corpus/TARGET; a crash is
#   kept in fuzz/artifacts/TARGET and the script fails; add the input as a regression test.
#   FUZZ_ARGS adds libFuzzer flags: `FUZZ_ARGS="-fork=1 -ignore_timeouts=1"` goes on past a hang
#   inside the HDF5 C library (fuzz/known/ lists the one found).
#
# Without instrumentation (the ordinary release build):
#   scripts/fuzz.sh mutate-h5ad [SECONDS]  random byte edits of .h5ad files imported by the CLI in
#                                          a child process each: exit 0 or 1 is fine, else a crash
#   scripts/fuzz.sh prop-store [SECONDS]   the damaged-store property test, in rounds of 5,000
#   scripts/fuzz.sh prop-parsers [SECONDS] the parser property tests, in rounds of 5,000
#   Crashing inputs are kept in out/fuzz/TARGET/ (mutate-h5ad) or in the proptest-regressions
#   files, which the test suite replays.
#
# None of this is part of CI's time budget.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: scripts/fuzz.sh store|h5ad|source|condition|targets|config|zarr|cell_table|mutate-h5ad|prop-store|prop-parsers [SECONDS]}"
seconds="${2:-60}"
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
bin="$CARGO_TARGET_DIR/release/cpa-stream"
deadline=$(( $(date +%s) + seconds ))
out="out/fuzz/$target"
mkdir -p "$out"

# A coverage-guided target: seeds, then cargo fuzz run for SECONDS.
libfuzzer() {
  local fuzz_bin="$CPA_STREAM_CACHE/cargo-fuzz/bin/cargo-fuzz"
  if [ ! -x "$fuzz_bin" ]; then
    echo "fuzz: installing cargo-fuzz into $CPA_STREAM_CACHE/cargo-fuzz" >&2
    cargo install --quiet --locked --root "$CPA_STREAM_CACHE/cargo-fuzz" cargo-fuzz@0.13.2
  fi
  local toolchain=()
  if rustup run nightly rustc --version > /dev/null 2>&1; then
    toolchain=(+nightly)
  else
    echo "fuzz: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1 for the instrumentation flags" >&2
    export RUSTC_BOOTSTRAP=1
  fi
  local seeds="$out/seeds"
  rm -rf "$seeds"
  mkdir -p "$seeds" "fuzz/corpus/$target"
  BIN="$bin" SEEDS="$seeds" TARGET="$target" "$CPA_STREAM_PYTHON" - <<'PY'
import os, pathlib, struct, subprocess, tempfile
seeds, target = pathlib.Path(os.environ["SEEDS"]), os.environ["TARGET"]
def seed(name, data):
    (seeds / name).write_bytes(data if isinstance(data, bytes) else data.encode())
if target == "store":
    for codec in (0, 0x80):
        for f in range(8):
            seed(f"edit-{codec}-{f}", bytes([codec | f, 0]) + struct.pack("<I", 7) + b"\xff")
            seed(f"cut-{codec}-{f}", bytes([codec | f, 1]) + struct.pack("<I", 40) + b"\x00")
elif target == "h5ad":
    files = [pathlib.Path(f"tests/fixtures/anndata-archives/{v}/adata.h5ad") for v in ("v0.5.0", "v0.7.0", "v0.7.8", "v0.11.4")]
    fixtures = pathlib.Path(tempfile.mkdtemp())
    subprocess.run([os.environ["CPA_STREAM_PYTHON"], "tests/fixtures/h5ad_fixtures.py", "make", str(fixtures)],
                   check=True, capture_output=True)
    files += [fixtures / n for n in ("csr_f32.h5ad", "csc.h5ad", "dense_i32.h5ad", "csr_rgg.h5ad", "legacy_v06_csr.h5ad")]
    # The attack files of issue 47 (external storage, links, virtual datasets, filters, sizes).
    attacks, outside = pathlib.Path(tempfile.mkdtemp()), pathlib.Path(tempfile.mkdtemp())
    subprocess.run([os.environ["CPA_STREAM_PYTHON"], "tests/fixtures/untrusted_h5ad.py", "make", str(attacks), str(outside)],
                   check=True, capture_output=True)
    files += sorted(p for p in attacks.glob("*.h5ad"))
    for f in files:
        if f.exists():
            seed(f"{f.parent.name}-{f.name}", f.read_bytes())
elif target == "source":
    for i, t in enumerate(["condition == A", "cell_type in (CT01, 'B c') and not dose == 1.0",
                           "(a != b or c == d) && !(e == 'f')", "all"]):
        seed(f"s{i}", t)
elif target == "condition":
    for i, t in enumerate(["A+B\x001.0+0.5", "ctrl", "condition=A+B,dose=1+10,cell_type=T"]):
        seed(f"c{i}", bytes([2]) + t.encode())
elif target == "targets":
    seed("csv", b"\x00condition,dose,cell_type\nA+B,1.0+0.5,T\nC,,\n")
    with tempfile.TemporaryDirectory() as d:
        p = pathlib.Path(d) / "t.parquet"
        csv = pathlib.Path(d) / "t.csv"
        csv.write_text("condition,dose\nA,1.0\n")
        # A Parquet seed made by cpa-stream itself is not needed: the CSV one is mutated into
        # Parquet-looking bytes rarely, so start from a real file when pyarrow is at hand.
        try:
            import pyarrow as pa, pyarrow.parquet as pq
            pq.write_table(pa.table({"condition": ["A", "B+C"], "dose": ["1.0", "1+2"]}), p)
            seed("parquet", b"\x01" + p.read_bytes())
        except ImportError:
            pass
elif target == "config":
    for f in pathlib.Path("examples").glob("*.toml"):
        seed(f.name, f.read_bytes())
elif target == "zarr":
    # The templates are the stores themselves (CPA_FUZZ_ZARR); a seed picks one and a file, and
    # edits, truncates or removes it.
    for t in range(4):
        for f in range(0, 256, 17):
            seed(f"edit-{t}-{f}", bytes([t, f, 0]) + struct.pack("<I", 9) + b"\xff")
            seed(f"cut-{t}-{f}", bytes([t, f, 1]) + struct.pack("<I", 30) + b"\x00")
            seed(f"gone-{t}-{f}", bytes([t, f, 2]))
elif target == "cell_table":
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq, io
    def parquet(table):
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=3)
        return sink.getvalue()
    vocabularies = {
        "int": pa.table({"token_id": pa.array([0, 10, 11, 12], pa.int64()), "gene_symbol": ["<cls>", "A", "B", "C"]}),
        "uint": pa.table({"token_id": pa.array([0, 10, 11, 12], pa.uint64()), "gene_symbol": ["<cls>", "A", "B", "C"]}),
        "float": pa.table({"token_id": pa.array([0.0, 10.0, 11.0, 12.5]), "gene_symbol": ["<cls>", "A", "B", "C"]}),
    }
    cells = {
        "ints": pa.table({"genes": pa.array([[0, 12, 10], [0, 11], [0]], pa.list_(pa.int64())),
                          "expressions": pa.array([[-2.0, 1.0, 3.0], [-2.0, 2.0], [-2.0]], pa.list_(pa.float32())),
                          "cell_id": ["a", "b", "c"], "drug": ["x", "y", None], "dose": [1.0, None, 2.5]}),
        "names": pa.table({"genes": pa.array([["C", "A"], ["B"], []], pa.list_(pa.string())),
                           "expressions": pa.array([[1, 3], [2], []], pa.list_(pa.int32())),
                           "plate": pa.array([1, 2, 3], pa.int16())}),
        "nulls": pa.table({"genes": pa.array([[10, None], None, [11]], pa.list_(pa.int32())),
                           "expressions": pa.array([[1.0, 2.0], None, [None]], pa.list_(pa.float64()))}),
    }
    for v, vt in vocabularies.items():
        vb = parquet(vt)
        for c, ct in cells.items():
            seed(f"{v}-{c}", struct.pack("<I", len(vb)) + vb + parquet(ct))
PY
  if [ "$target" = zarr ]; then
    rm -rf "$out/templates"
    "$CPA_STREAM_PYTHON" tests/fixtures/zarr_fixtures.py make "$out/templates" > /dev/null
    export CPA_FUZZ_ZARR
    CPA_FUZZ_ZARR=$(printf '%s\n' "$PWD/$out/templates/"{v2_chunked,v3,v3_sharded_small,v3_csc}.zarr)
  fi
  if [ "$target" = store ]; then
    for codec in raw zstd; do
      rm -rf "$out/template-$codec.store"
      "$bin" synth --cells 300 --genes 40 --perturbations 4 --cell-types 2 --codec "$codec" \
        --out "$out/template-$codec.store" > /dev/null 2>&1
    done
    export CPA_FUZZ_STORE_RAW="$PWD/$out/template-raw.store" CPA_FUZZ_STORE_ZSTD="$PWD/$out/template-zstd.store"
  fi
  local max_len=$(( $(find "$seeds" -type f -printf '%s\n' | sort -n | tail -1) + 4096 ))
  # The fuzz binaries link libtorch (through the stages crate) without the CLI's rpath.
  # allocator_may_return_null: a damaged .h5ad makes the HDF5 C library ask for absurd buffers;
  # glibc's malloc returns NULL and HDF5 reports "memory allocation failed" (an error, as the CLI
  # shows), whereas AddressSanitizer's allocator would abort by default. fuzz/lsan-hdf5.supp:
  # leaks inside the HDF5 C library on damaged files (fuzz/known/README.md), not cpa-stream's.
  PATH="$(dirname "$fuzz_bin"):$PATH" CARGO_TARGET_DIR="$CPA_STREAM_CACHE/fuzz-target" \
    LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    ASAN_OPTIONS="allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    LSAN_OPTIONS="suppressions=$PWD/fuzz/lsan-hdf5.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}" \
    cargo "${toolchain[@]}" fuzz run --fuzz-dir fuzz -O \
    "$target" "fuzz/corpus/$target" "$seeds" -- \
    -max_total_time="$seconds" -max_len="$max_len" -rss_limit_mb=4096 -timeout=60 -print_final_stats=1 \
    ${FUZZ_ARGS:-} \
    2>&1 | tee "$out/last.log" | grep -E "^#[0-9]+[[:space:]]+(INITED|DONE|pulse)|ERROR|SUMMARY|stat::|panicked|Done " || true
  # cargo-fuzz's exit status is lost in the pipe: a crash leaves an artifact and no DONE line.
  # Fork mode (FUZZ_ARGS="-fork=1 ...") ends with "INFO: exiting: N" instead, N = 70 when it went
  # past timeouts; its status lines count "oom/timeout/crash: O/T/C", so it is clean when the last
  # one shows no OOM and no crash.
  local executed timeouts=""
  if grep -aqE "^#[0-9]+[[:space:]]+DONE" "$out/last.log"; then
    executed=$(grep -aoE 'stat::number_of_executed_units: [0-9]+' "$out/last.log" | grep -oE '[0-9]+$' | tail -1)
    [ -n "$executed" ] || executed=$(grep -aoE '^#[0-9]+' "$out/last.log" | tail -1 | tr -d '#')
  elif grep -aqE "^INFO: exiting: (0|70) " "$out/last.log"; then
    local status
    status=$(grep -aoE '^#[0-9]+: cov: .* oom/timeout/crash: [0-9]+/[0-9]+/[0-9]+' "$out/last.log" | tail -1)
    if [ -z "$status" ] || ! [[ "$status" =~ oom/timeout/crash:\ 0/([0-9]+)/0$ ]]; then
      echo "$target: crash, out-of-memory or failure in fork mode (${status##*: }), see $out/last.log and fuzz/artifacts/$target/" >&2
      exit 1
    fi
    timeouts=${BASH_REMATCH[1]}
    executed=$(echo "$status" | grep -oE '^#[0-9]+' | tr -d '#')
  else
    echo "$target: crash or failure, see $out/last.log and fuzz/artifacts/$target/" >&2
    exit 1
  fi
  [ -n "$timeouts" ] || timeouts=$(grep -acE "ERROR: libFuzzer: timeout" "$out/last.log" || true)
  [ "$timeouts" != 0 ] || timeouts=""
  echo "$target: $executed inputs executed in ${seconds} s, no crash${timeouts:+, $timeouts timeouts past}"
}

case "$target" in
  store | h5ad | source | condition | targets | config | zarr | cell_table)
    libfuzzer
    ;;
  mutate-h5ad)
    BIN="$bin" OUT="$out" DEADLINE="$deadline" "$CPA_STREAM_PYTHON" - <<'PY'
import collections, os, random, subprocess, time
inputs = [
    "tests/fixtures/anndata-archives/v0.7.8/adata.h5ad",
    "tests/fixtures/anndata-archives/v0.7.0/adata.h5ad",
    "tests/fixtures/anndata-archives/v0.5.0/adata.h5ad",
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
print(f"mutate-h5ad: {runs} inputs executed, exit codes {dict(codes)}, {crashes} crashes")
raise SystemExit(1 if crashes else 0)
PY
    ;;
  prop-store | prop-parsers)
    if [ "$target" = prop-store ]; then
      filter=(--test integration store::damaged)
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
    echo "unknown target $target (store, h5ad, source, condition, targets, config, mutate-h5ad, prop-store, prop-parsers)" >&2
    exit 2
    ;;
esac
