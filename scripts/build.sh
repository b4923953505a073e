#!/usr/bin/env bash
# The one build of the README's two commands: the binary and every test binary, with the features
# the tests use (cpa-stream/polars), so that the demo and the tests share one build instead of
# compiling the workspace twice with different feature sets (a cold build is most of CI's time).
# Prints nothing on stdout; run it after `eval "$(scripts/bootstrap.sh)"`.
#   Extra arguments go to cargo (e.g. --quiet).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:?run eval \"\$(scripts/bootstrap.sh)\" first}"
cargo test --release --locked --workspace --features cpa-stream/polars --no-run "$@" >&2
