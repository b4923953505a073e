#!/usr/bin/env bash
# The test command of the README (and of CI): installs what is missing into the cache, builds,
# and runs every test of the workspace. Tests that need a GPU print why they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
echo "test.sh: libtorch $LIBTORCH, build cache $CARGO_TARGET_DIR" >&2
# The build the demo also uses (scripts/build.sh: release profile, feature cpa-stream/polars for
# the lazy reader of prediction files and its test), then every test.
scripts/build.sh
cargo test --release --locked --workspace --features cpa-stream/polars "$@"
