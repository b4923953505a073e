#!/usr/bin/env bash
# Installs the peer loaders (annbatch, scDataset; ../shared/peer/loader's harness) into a venv in
# the project's cache, once, and prints its python. annbatch 0.3.x needs Python >= 3.12.
#
#   PEER_PYTHON   the Python 3.12+ to build the venv with (default: python3.12 on PATH, else
#                 pyenv's 3.12.x)
#
# Pins: annbatch and scDataset as ../shared/peer/loader/requirements.lock.txt; torch is the CPU
# work here (annbatch imports it when present, scDataset depends on it), pinned to the project's
# 2.11.0 so pip reuses the wheel the project's own set-up already downloaded.
set -euo pipefail

cache="${CPA_STREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cpa-stream}"
venv="$cache/peer-loader-venv"
stamp="$venv/.peer-1.ok"
log() { printf 'peer-env: %s\n' "$*" >&2; }

if [ ! -f "$stamp" ]; then
  py="${PEER_PYTHON:-}"
  if [ -z "$py" ]; then
    for candidate in python3.13 python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python "$HOME"/.pyenv/versions/3.13*/bin/python; do
      if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        py=$candidate
        break
      fi
    done
  fi
  if [ -z "$py" ]; then
    log "no Python >= 3.12 found (annbatch needs it); set PEER_PYTHON"
    exit 3
  fi
  exec 9>"$cache/.peer-env.lock"
  flock 9
  if [ ! -f "$stamp" ]; then
    log "installing annbatch 0.3.1 and scDataset 0.3.0 into $venv with $py; this happens once"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "annbatch[zarrs]==0.3.1" "scdataset==0.3.0" "torch==2.11.0" "psutil" >&2
    touch "$stamp"
  fi
  flock -u 9
fi
echo "$venv/bin/python"
