#!/usr/bin/env bash
# The checks that need a GPU, which CI (no GPU) and this machine skip: the test suite's CUDA tests,
# and prediction on CUDA against the CPU on the same model (per-cell values, and aggregates
# computed on the device against the per-cell rows aggregated afterwards).
#
#   scripts/gpu-check.sh build   here: the test executables (the README's test build) and the two
#                                binaries, stripped, in .device/check.tar.xz (ignored by git;
#                                carry it)
#   scripts/gpu-check.sh run     on a machine with libtorch 2.11.0 (CUDA), Python with pandas and
#                                pyarrow, and no Rust; results in OUT (default .device/check-results).
#                                GPU_DEVICE=cpu runs the prediction checks on the CPU alone (a dry
#                                run of this script where there is no GPU; the CUDA tests are left out);
#                                PRESET (default "default") is the `train --preset` of the
#                                prediction checks' model; CONFIG, a TOML file, is passed with it as
#                                `--config` (e.g. model.dispersion_init = "moments"); CUDA_TESTS=0
#                                leaves the CUDA tests out; ENSEMBLE=0 leaves out the ensemble's
#                                check (a second model, `predict --ensemble` on the device against
#                                the CPU and against the two models' predictions averaged, and
#                                `evaluate --ensemble --anchored` on the device against the CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
dev=.device
case "${1:-}" in
build)
  eval "$(scripts/bootstrap.sh)"
  rm -rf "$dev/check" && mkdir -p "$dev/check"
  cargo test --release --locked --workspace --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    name, kind = m["target"]["name"], m["target"]["kind"]
    if (name, kind) in (("integration", ["test"]), ("cpa_stream_engine", ["lib"])):
        print(name, m["executable"])
' | while read -r name path; do strip -o "$dev/check/$name" "$path"; done
  for b in cpa-stream cpa-stream-engine; do strip -o "$dev/check/$b" "$CARGO_TARGET_DIR/release/$b"; done
  # The integration tests start the binaries at the path they were built at, with no
  # LD_LIBRARY_PATH: the engine must find libtorch by its run path, this machine's torch/lib.
  echo "$CARGO_TARGET_DIR/release" > "$dev/check/bin-dir"
  echo "$LIBTORCH/lib" > "$dev/check/torch-dir"
  ls -la "$dev/check"
  (cd "$dev/check" && tar cf - -- *) | xz -T2 -6 > "$dev/check.tar.xz"
  ls -la "$dev/check.tar.xz"
  exit 0
  ;;
run) ;;
*)
  echo "usage: scripts/gpu-check.sh build|run" >&2
  exit 2
  ;;
esac

out="${OUT:-$dev/check-results}"
config=()
if [ -n "${CONFIG:-}" ]; then
  [ -f "$CONFIG" ] || { echo "CONFIG=$CONFIG: no such file" >&2; exit 1; }
  config=(--config "$(realpath "$CONFIG")")
fi
mkdir -p "$out" "$dev/check"
[ -f "$dev/check.tar.xz" ] || { echo "$dev/check.tar.xz: missing; run 'scripts/gpu-check.sh build' first" >&2; exit 1; }
xz -dc "$dev/check.tar.xz" | tar xf - -C "$dev/check"
if [ -z "${TORCH_LIB:-}" ]; then
  TORCH_LIB=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/torch/lib 2>/dev/null | head -1 || true)
fi
[ -d "${TORCH_LIB:-}" ] || { echo "no torch lib/ folder: set TORCH_LIB" >&2; exit 1; }
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
py="${PY:-python3}"
[ -z "${PY:-}" ] && [ -x /opt/torch/.venv/bin/python ] && py=/opt/torch/.venv/bin/python
bin_dir=$(cat "$dev/check/bin-dir")
mkdir -p "$bin_dir"
run_path=$(cat "$dev/check/torch-dir")
if [ ! -e "$run_path" ]; then
  mkdir -p "$(dirname "$run_path")"
  ln -s "$TORCH_LIB" "$run_path"
fi
# The binaries go where the test executables start them. Where that folder is this machine's own
# build (a dry run where the tarball was built), binaries built after the tarball are not replaced
# by its older ones: that would leave the build folder stale, and the run would check old code.
for b in cpa-stream cpa-stream-engine; do
  if [ "$bin_dir/$b" -nt "$dev/check.tar.xz" ]; then
    echo "$bin_dir/$b is newer than $dev/check.tar.xz: run 'scripts/gpu-check.sh build' first" >&2
    exit 1
  fi
done
cp -p "$dev/check/cpa-stream" "$dev/check/cpa-stream-engine" "$bin_dir/"
export CARGO_MANIFEST_DIR="$PWD"
gpu="${GPU_DEVICE:-cuda}"
preset="${PRESET:-default}"
status=0

: > "$out/summary.txt"
cuda_tests=$([ "$gpu" = cpu ] || [ "${CUDA_TESTS:-1}" = 0 ] || echo integration cpa_stream_engine)
[ -z "$cuda_tests" ] || echo "== the test suite's CUDA tests" | tee -a "$out/summary.txt"
for t in $cuda_tests; do
  "$dev/check/$t" cuda --test-threads 1 2>&1 | tee "$out/tests-$t.txt" | grep -E "^test |test result" | tee -a "$out/summary.txt" \
    || status=1
  grep -q "skipped: no CUDA" "$out/tests-$t.txt" && { echo "   CUDA not visible to libtorch" | tee -a "$out/summary.txt"; status=1; }
done

echo "== prediction on $gpu against the CPU, a model of the $preset preset${CONFIG:+ with $CONFIG}" | tee -a "$out/summary.txt"
bin="$bin_dir/cpa-stream"
work=$(mktemp -d)
"$bin" synth --cells 20000 --genes 500 --perturbations 10 --doses 2 --cell-types 3 --seed 1 --out "$work/s.store" > /dev/null
"$bin" train --store "$work/s.store" --dose-key dose --covariates cell_type --epochs 3 --device "$gpu" \
  --preset "$preset" "${config[@]}" --seed 1 --out "$work/run" -q
[ -z "${CONFIG:-}" ] || sed 's/^/   /' "$work/run/config.toml" | grep -E "dispersion_init|doser_type|recon_loss" | tee -a "$out/summary.txt"
for device in cpu "$gpu"; do
  "$bin" predict --model "$work/run" --store "$work/s.store" --source all --target PERT01 --device "$device" \
    --out "$work/cells-$device.parquet" -q --overwrite
  "$bin" predict --model "$work/run" --store "$work/s.store" --source all --target PERT01 --device "$device" \
    --aggregate mean,var --out "$work/groups-$device.parquet" -q --overwrite
done
"$py" - "$work" "$gpu" <<'PY' 2>&1 | tee -a "$out/summary.txt" || status=1
import sys
import numpy as np
import pyarrow.parquet as pq

work, gpu = sys.argv[1], sys.argv[2]
def values(path, column):
    t = pq.read_table(path)
    return t, np.stack(t.column(column).to_numpy(zero_copy_only=False))
_, cpu = values(f"{work}/cells-cpu.parquet", "mean")
cells, cuda = values(f"{work}/cells-{gpu}.parquet", "mean")
rel = np.abs(cuda - cpu) / np.maximum(np.abs(cpu), 1e-3)
print(f"   per-cell means, {cpu.shape[0]} cells x {cpu.shape[1]} genes: {gpu} against the CPU, "
      f"largest relative difference {rel.max():.2e}, median {np.median(rel):.2e}")
ok = rel.max() < 1e-2
types = cells.column("cell_type").to_pandas().astype(str).to_numpy()
for device in sorted({gpu, "cpu"}):
    groups, mean = values(f"{work}/groups-{device}.parquet", "mean")
    _, var = values(f"{work}/groups-{device}.parquet", "mean_var")
    worst = 0.0
    for k, name in enumerate(groups.column("cell_type").to_pandas().astype(str)):
        rows = cuda[types == name].astype(np.float64)
        expect_mean, expect_var = rows.mean(axis=0), rows.var(axis=0, ddof=1)
        worst = max(worst,
                    np.max(np.abs(mean[k] - expect_mean) / np.maximum(np.abs(expect_mean), 1e-3)),
                    np.max(np.abs(var[k] - expect_var) / np.maximum(np.abs(expect_var), 1e-3)))
        if groups.column("n_cells")[k].as_py() != len(rows):
            print(f"   {device}: group {name} counts {groups.column('n_cells')[k]} cells, the rows {len(rows)}")
            ok = False
    print(f"   aggregates on {device} against {gpu}'s per-cell rows aggregated afterwards "
          f"({groups.num_rows} groups): largest relative difference {worst:.2e}")
    ok = ok and worst < 1e-2
print("   agreement: " + ("yes" if ok else "NO"))
sys.exit(0 if ok else 1)
PY

if [ "${ENSEMBLE:-1}" != 0 ]; then
  echo "== an ensemble of two models on $gpu against the CPU and against the two averaged" | tee -a "$out/summary.txt"
  "$bin" train --store "$work/s.store" --dose-key dose --covariates cell_type --epochs 3 --device "$gpu" \
    --preset "$preset" "${config[@]}" --seed 2 --split-seed 1 --out "$work/run2" -q
  "$bin" predict --model "$work/run2" --store "$work/s.store" --source all --target PERT01 --device "$gpu" \
    --out "$work/cells2-$gpu.parquet" -q --overwrite
  for device in cpu "$gpu"; do
    "$bin" predict --model "$work/run" --ensemble "$work/run2" --store "$work/s.store" --source all --target PERT01 \
      --device "$device" --anchored --out "$work/ensemble-$device.parquet" -q --overwrite
    "$bin" evaluate --model "$work/run" --ensemble "$work/run2" --anchored --store "$work/s.store" --split all \
      --no-plots --device "$device" --out "$work/eval-ensemble-$device" -q --overwrite
  done
  "$py" - "$work" "$gpu" <<'PY' 2>&1 | tee -a "$out/summary.txt" || status=1
import sys
import numpy as np
import pyarrow.parquet as pq

work, gpu = sys.argv[1], sys.argv[2]
def values(path, column):
    return np.stack(pq.read_table(path).column(column).to_numpy(zero_copy_only=False)).astype(np.float64)
def rel(a, b):
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-3)
ok = True
for column in ("mean", "anchored"):
    r = rel(values(f"{work}/ensemble-{gpu}.parquet", column), values(f"{work}/ensemble-cpu.parquet", column))
    print(f"   ensemble's {column}: {gpu} against the CPU, largest relative difference {r.max():.2e}, "
          f"median {np.median(r):.2e}")
    ok = ok and r.max() < 1e-2
first, second = values(f"{work}/cells-{gpu}.parquet", "mean"), values(f"{work}/cells2-{gpu}.parquet", "mean")
r = rel(values(f"{work}/ensemble-{gpu}.parquet", "mean"), (first + second) / 2)
apart = rel(second, first)
print(f"   ensemble's mean on {gpu} against the two models' means averaged: largest relative difference "
      f"{r.max():.2e} (the two models differ by up to {apart.max():.2e})")
ok = ok and r.max() < 1e-4 and apart.max() > 1e-3
# `evaluate --ensemble --anchored`: the same conditions, and their scores within 1e-3.
scores = {d: pq.read_table(f"{work}/eval-ensemble-{d}/metrics.parquet").to_pandas() for d in ("cpu", gpu)}
same = scores["cpu"]["condition"].tolist() == scores[gpu]["condition"].tolist()
for column in ("r2_mean", "r2_var", "pearson_delta"):
    d = np.nanmax(np.abs(scores[gpu][column].to_numpy(float) - scores["cpu"][column].to_numpy(float)))
    print(f"   evaluate --ensemble --anchored, {column}: {gpu} against the CPU, largest difference {d:.2e}")
    ok = ok and same and d < 1e-3
print("   agreement: " + ("yes" if ok else "NO"))
sys.exit(0 if ok else 1)
PY
fi
rm -rf "$work"
exit $status
