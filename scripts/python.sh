#!/usr/bin/env bash
# Builds the Python package (python/: the cpa_stream package and its native module) into a wheel
# with maturin and installs it into the cache's virtual environment (the one whose torch 2.11.0
# libtorch the module links), with what the package's tests use. Run after
# `eval "$(scripts/bootstrap.sh)"` and scripts/build.sh: the module shares that build's compiled
# dependencies (same target directory and profile), so only the module itself is compiled here.
#   --tests  also install what only the package's tests use (pytest, polars; RDKit and Ray,
#            optional: their tests skip without them). The demo needs none of these.
#   --deps   only install what the demo's Python part uses (maturin, scanpy, tqdm) and stop: the
#            demo runs this beside the build, so that the downloads overlap the compilation.
#   --test-deps  only install what --tests installs and stop (scripts/test.sh, beside its build).
#   Prints the wheel's path on stdout.
set -euo pipefail
tests=false deps_only=false
case "${1:-}" in
  --tests) tests=true ;;
  --deps) deps_only=true ;;
  --test-deps) tests=true deps_only=true ;;
esac
cd "$(dirname "$0")/.."
: "${CPA_STREAM_VENV:?run eval \"\$(scripts/bootstrap.sh)\" first}"
py="$CPA_STREAM_VENV/bin/python"
log() { printf 'python.sh: %s\n' "$*" >&2; }

# maturin builds the wheel; scanpy draws the quickstart's UMAP; tqdm is a dependency of the
# package; pytest (with pytest-xdist's workers) and polars run the tests. Installed once (pip's wheels, no compiler).
install_once() { # NAME STAMP PACKAGES...
  local what=$1 stamp=$2
  shift 2
  [ -f "$stamp" ] && return 0
  exec 9>"$CPA_STREAM_CACHE/.bootstrap.lock"
  flock 9
  if [ ! -f "$stamp" ]; then
    log "installing $what into $CPA_STREAM_VENV"
    "$py" -m pip install --quiet --disable-pip-version-check "$@" >&2
    touch "$stamp"
  fi
  flock -u 9
}
install_once "maturin, scanpy and tqdm" "$CPA_STREAM_VENV/.python-deps-2.ok" \
  maturin==1.16.0 scanpy==1.11.5 tqdm==4.70.1
$deps_only && ! $tests && exit 0
if ! $tests; then
  rdkit_stamp= ray_stamp= cell_eval2_stamp=
else
  install_once "pytest, pytest-xdist and polars" "$CPA_STREAM_VENV/.python-test-deps-2.ok" \
    pytest==9.2.0 pytest-xdist==3.8.0 polars==2.1.0
  rdkit_stamp="$CPA_STREAM_VENV/.rdkit-1.tried"
  ray_stamp="$CPA_STREAM_VENV/.ray-2.tried"
  cell_eval2_stamp="$CPA_STREAM_VENV/.cell-eval2-2.tried"
fi
# RDKit for the drugs-from-SMILES tests: optional (a 32 MB wheel); they skip with the reason without it.
if [ -n "$rdkit_stamp" ] && [ ! -f "$rdkit_stamp" ]; then
  log "installing rdkit (optional: the SMILES tests skip without it)"
  "$py" -m pip install --quiet --disable-pip-version-check "rdkit==2026.9.1" >&2 || log "rdkit could not be installed"
  touch "$rdkit_stamp"
fi
# Ray for the fan-out test: optional (large); its test skips with the reason when it is absent.
if [ -n "$ray_stamp" ] && [ ! -f "$ray_stamp" ]; then
  log "installing ray (optional: the Ray test skips without it)"
  "$py" -m pip install --quiet --disable-pip-version-check "ray[tune]==2.60.0" >&2 || log "ray could not be installed"
  touch "$ray_stamp"
fi

# cell-eval2 (and pdex, its threaded CPU engine for the Wilcoxon tests) for the tests that hold
# `score` to it: optional (on PyPI); those tests skip with the reason when it is absent.
if [ -n "${cell_eval2_stamp:-}" ] && [ ! -f "$cell_eval2_stamp" ]; then
  log "installing cell-eval2 (optional: the counts-scoring test skips without it)"
  "$py" -m pip install --quiet --disable-pip-version-check "cell-eval2==0.20.0" "pdex==0.3.0" >&2 ||
    log "cell-eval2 could not be installed"
  touch "$cell_eval2_stamp"
fi
$deps_only && exit 0

# One build and install at a time: a second run (the demo and the tests side by side) waits,
# rather than removing the wheel the first is about to install.
exec 8>"$CPA_STREAM_CACHE/.python-build.lock"
flock 8
# shellcheck source=scripts/checkout-guard.sh
. scripts/checkout-guard.sh
own_crates_for_this_checkout
wheels="$CPA_STREAM_CACHE/wheels"
rm -rf "$wheels"
started=$(date +%s)
# PYO3_PYTHON: the interpreter the module is built for; maturin sets PYO3_BUILD_EXTENSION_MODULE.
build_log="$CPA_STREAM_CACHE/maturin-build.log"
PYO3_PYTHON="$py" "$CPA_STREAM_VENV/bin/maturin" build --release --locked --manifest-path python/Cargo.toml \
  --interpreter "$py" --out "$wheels" 2>&1 | tee "$build_log" >&2
# After scripts/build.sh only PyO3 (and its build helpers) and the module itself compile; any
# other crate means the features of a shared dependency drifted from the workspace build (see
# the note in python/Cargo.toml).
drifted=$(grep '^ *Compiling ' "$build_log" | grep -vE 'Compiling (pyo3|target-lexicon|cpa-stream-python)' || true)
if [ -n "$drifted" ] && ! $own_crates_cleaned; then
  log "warning: the module's build compiled crates the workspace build had compiled with other features:"
  printf '%s\n' "$drifted" >&2
fi
wheel=$(ls "$wheels"/cpa_stream-*.whl)
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$wheel" >&2
log "built and installed $(basename "$wheel") ($(du -h "$wheel" | cut -f1)) in $(( $(date +%s) - started )) s"
echo "$wheel"
