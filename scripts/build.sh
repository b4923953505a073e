#!/usr/bin/env bash
# The build of the README's two commands: the release binaries (cpa-stream, cpa-stream-engine)
# with the workspace's features. The demo needs nothing more; scripts/test.sh then builds the test
# binaries on top of it, reusing every library compiled here (same profile, same features: the
# dev-dependencies add crates, not features of shared ones; tests/integration/layout.rs checks the
# Python module's build against the workspace's). Prints nothing on stdout; run it after
# `eval "$(scripts/bootstrap.sh)"`. Extra arguments, and $CPA_STREAM_BUILD_FLAGS (for the demo and
# the tests, which call this script: e.g. --timings), go to cargo.
#
# `scripts/build.sh --front` builds only the front (`cpa-stream`: every command that needs no model)
# without libtorch's binding, the engine crate or PyTorch (`eval "$(scripts/bootstrap.sh --tools)"`
# is enough): the demo's first part runs on it while the rest compiles. The same features as the
# full build (tests/integration/layout.rs checks), so the full build reuses all of it.
#
# `scripts/build.sh --tests` builds the same and every test binary of the workspace in one cargo run
# (scripts/test.sh): the tests' own crates compile while libtorch's binding and the engine, which
# follow one another, leave cores idle.
#
# A cold build takes minutes (libtorch's bindings, HDF5 from source); off a terminal, where cargo
# shows no progress bar, a line every minute says it is still going.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:?run eval \"\$(scripts/bootstrap.sh)\" first}"
# shellcheck source=scripts/checkout-guard.sh
. scripts/checkout-guard.sh
own_crates_for_this_checkout
command=build what=(--workspace --bins)
case "${1:-}" in
  --front)
    shift
    what=(-p cpa-stream --bin cpa-stream --no-default-features)
    ;;
  --tests)
    shift
    command=test what=(--workspace --no-run)
    ;;
esac
heartbeat=
if [ ! -t 2 ]; then
  (
    minutes=0
    while sleep 60; do
      minutes=$((minutes + 1))
      echo "build.sh: still building ($minutes min)" >&2
    done
  ) &
  heartbeat=$!
fi
status=0
# shellcheck disable=SC2086 # the flags are words
cargo "$command" --release --locked "${what[@]}" ${CPA_STREAM_BUILD_FLAGS:-} "$@" >&2 || status=$?
[ -z "$heartbeat" ] || kill "$heartbeat" 2>/dev/null || true
exit "$status"
