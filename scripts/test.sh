#!/usr/bin/env bash
# The test command of the README (and of CI): installs what is missing into the cache, builds,
# runs every test of the workspace, then builds the Python package and runs its tests (pytest).
# Tests that need a GPU or an optional tool print why they skip. Arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
# A first run installs PyTorch (gigabytes) while the front, which needs only cmake, compiles (as
# the demo does): a minute or two of downloads off a cold run.
if ! scripts/bootstrap.sh --installed; then
  eval "$(scripts/bootstrap.sh --tools)"
  setsid scripts/bootstrap.sh >/dev/null &
  setup=$!
  trap 'kill -TERM -- -"$setup" 2>/dev/null || true' EXIT
  scripts/build.sh --front
  if ! wait "$setup"; then
    echo "test.sh: installing PyTorch failed (the lines above say why)" >&2
    exit 1
  fi
fi
eval "$(scripts/bootstrap.sh)"
echo "test.sh: libtorch $LIBTORCH, build cache $CARGO_TARGET_DIR" >&2
# The tests' Python packages (a first run's, or the first after the demo, which installs PyTorch
# but not these) install while the test binaries build and the Rust suites run, not after them (a
# no-op once installed).
setsid scripts/python.sh --test-deps &
test_deps=$!
trap 'kill -TERM -- -"$test_deps" 2>/dev/null || true' EXIT
# The build the demo also uses (the release binaries, the front's crates reused) and every test
# binary on top of it, in one cargo run (the same profile and features: the tests add their own
# code and a few crates), then the tests.
scripts/build.sh --tests
# One test thread more than cores: a test that waits for a fixture another test is training (on
# one thread) leaves its core to a third (the integration suite 341 and 362 s against 365 and
# 393 s on two threads, interleaved, 2 cores).
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-$(($(nproc 2>/dev/null || echo 1) + 1))}"
cargo test --release --locked --workspace "$@"
# The Python package, built from the same compiled dependencies, and its tests.
if ! wait "$test_deps"; then
  echo "test.sh: installing the tests' Python packages failed (the lines above say why)" >&2
  exit 1
fi
scripts/python.sh --tests >/dev/null
export CPA_STREAM_BIN="$CARGO_TARGET_DIR/release/cpa-stream"
status=0
# The tests pin libtorch to one thread (conftest.py's COMPUTE), so one pytest process leaves the
# other cores idle: pytest-xdist deals the test files out to one worker per core (at most 4; each
# worker its own store cache and an idle machine's thread plan, conftest.py). No test waits on
# time: test_trust.py's Ctrl-C test holds its child until the signal (CPA_STREAM_FAULT=hold).
# Without pytest-xdist, one process.
workers=$(nproc 2>/dev/null || echo 1)
[ "$workers" -gt 4 ] && workers=4
parallel=()
if [ "$workers" -gt 1 ] && "$CPA_STREAM_VENV/bin/python" -c "import xdist" 2>/dev/null; then
  parallel=(-n "$workers" --dist loadfile)
fi
# Temporary folders of passing tests are removed (pytest keeps three runs' by default: gigabytes on
# a shared disk). The ten slowest tests are listed at the end: where the suite's minutes go.
"$CPA_STREAM_VENV/bin/python" -m pytest python/tests "${parallel[@]}" -q -rs -o tmp_path_retention_policy=failed \
  --durations=10 || status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests in python/tests" >&2
fi
exit "$status"
