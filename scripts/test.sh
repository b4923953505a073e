#!/usr/bin/env bash
# The test command of the README (and of CI): installs what is missing into the cache, builds,
# and runs every test of the workspace. Tests that need a GPU print why they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
echo "test.sh: libtorch $LIBTORCH, build cache $CARGO_TARGET_DIR" >&2
# The release profile, like the demo. The `polars` feature (the lazy reader of prediction files and
# its test) costs 12-20 minutes of a cold build on 2 cores (polars alone built in 20 minutes on
# the development machine); the binary does not need it.
cargo test --release --locked --workspace --features cpa-stream/polars "$@"
