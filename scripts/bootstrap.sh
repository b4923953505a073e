#!/usr/bin/env bash
# Installs everything cpa-stream needs to build into a cache outside the checkout, then prints the
# environment to use. Idempotent: a second run reuses the cache and returns in a second.
#
#   CPA_STREAM_CACHE   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/cpa-stream)
#
# Usage: eval "$(scripts/bootstrap.sh)"   (the env lines go to stdout, progress to stderr)
#        eval "$(scripts/bootstrap.sh --tools)"   only what the front's build needs (a virtual
#        environment with cmake; no LIBTORCH line). scripts/demo.sh runs this first, then the rest
#        (the test fixtures' packages and PyTorch's gigabytes) installs while the front compiles.
#        scripts/bootstrap.sh --installed   exits 0 when everything is installed, 1 when a run
#        would install something (prints nothing).
set -euo pipefail
tools_only=false installed_only=false
[ "${1:-}" = --tools ] && tools_only=true
[ "${1:-}" = --installed ] && installed_only=true

TORCH_VERSION=2.11.0   # tch =0.24.0 binds exactly this PyTorch
# cmake builds the bundled HDF5 C library (hdf5-metno "static"): all the front's build needs.
CMAKE_VERSION=4.4.4
# anndata and h5py make the .h5ad test fixtures; duckdb and pyarrow: tests read every Parquet
# output as DuckDB and pandas users would.
EXTRAS="anndata==0.12.19 h5py==3.16.0 duckdb==2.0.0 pyarrow==26.0.1"
EXTRAS_VERSION=3
cache="${CPA_STREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cpa-stream}"
venv="$cache/venv"
stamp="$venv/.torch-$TORCH_VERSION.ok"
python="${PYTHON:-python3}"

log() { printf 'bootstrap: %s\n' "$*" >&2; }

if $installed_only; then
  for done_stamp in "$venv/.cmake-$CMAKE_VERSION.ok" "$venv/.extras-$EXTRAS_VERSION.ok" "$stamp"; do
    [ -f "$done_stamp" ] || exit 1
  done
  exit 0
fi

mkdir -p "$cache"
# The virtual environment; a cache made before the environment had its own stamp has PyTorch's.
venv_stamp="$venv/.venv-1.ok"
if [ ! -f "$venv_stamp" ] && [ ! -f "$stamp" ]; then
  # A lock so two concurrent first runs (tests, demo) do not install twice.
  exec 9>"$cache/.bootstrap.lock"
  flock 9
  if [ ! -f "$venv_stamp" ] && [ ! -f "$stamp" ]; then
    log "creating a virtual environment in $venv; this happens once"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    touch "$venv_stamp"
  fi
  flock -u 9
fi

# pip installs PACKAGES into the venv once: STAMP marks it done; a lock keeps two first runs (tests,
# demo) from installing at once.
pip_once() { # WHAT STAMP PACKAGES...
  local what=$1 done_stamp=$2
  shift 2
  [ -f "$done_stamp" ] && return 0
  exec 9>"$cache/.bootstrap.lock"
  flock 9
  if [ ! -f "$done_stamp" ]; then
    log "installing $what into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
    touch "$done_stamp"
  fi
  flock -u 9
}

# cmake alone before the front's build can start (15 s with a fresh venv and no pip cache, against
# 44 s with the test fixtures' packages, which install afterwards, beside the build).
pip_once "cmake" "$venv/.cmake-$CMAKE_VERSION.ok" "cmake==$CMAKE_VERSION"

echo "export CPA_STREAM_CACHE='$cache'"
echo "export CARGO_TARGET_DIR='${CARGO_TARGET_DIR:-$cache/target}'"
echo "export CPA_STREAM_VENV='$venv'"
echo "export CMAKE='$venv/bin/cmake'"
echo "export CPA_STREAM_PYTHON='$venv/bin/python'"
$tools_only && exit 0

# Small; installed once.
# shellcheck disable=SC2086 # the packages are words
pip_once "anndata, h5py, duckdb and pyarrow (the tests' fixtures and readers)" "$venv/.extras-$EXTRAS_VERSION.ok" $EXTRAS

pip_once "PyTorch $TORCH_VERSION (libtorch for tch, about 4.6 GB with its CUDA libraries; this happens once)" \
  "$stamp" "torch==$TORCH_VERSION"

torch_dir="$("$venv/bin/python" - <<'PY'
import os, importlib.util
spec = importlib.util.find_spec("torch")
print(os.path.dirname(spec.origin))
PY
)"
[ -f "$torch_dir/lib/libtorch_cpu.so" ] || { log "no libtorch under $torch_dir/lib; delete $venv and rerun"; exit 1; }

echo "export LIBTORCH='$torch_dir'"
echo "export LIBTORCH_CXX11_ABI=1"
