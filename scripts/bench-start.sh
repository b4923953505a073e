#!/usr/bin/env bash
# Start-up of the commands that need no model: `cpa-stream` (the front, which runs them itself)
# against `cpa-stream-engine` (the binary linked with libtorch, which is what `cpa-stream` was
# before the split) given the same arguments, interleaved, REPS fresh processes each; the median
# and the spread of the wall time, and the peak RSS.
#
#   REPS   repetitions per command and binary (default 20)
#   OUT    results directory (default $CPA_STREAM_CACHE/bench-start)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
front="$CARGO_TARGET_DIR/release/cpa-stream"
engine="$CARGO_TARGET_DIR/release/cpa-stream-engine"
reps="${REPS:-20}"
out="${OUT:-$CPA_STREAM_CACHE/bench-start}"
mkdir -p "$out"
store="$out/start.store"
[ -d "$store" ] || "$front" --quiet synth --cells 2000 --genes 100 --perturbations 4 --out "$store"

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs" | tee "$out/summary.txt"
"$CPA_STREAM_PYTHON" - "$front" "$engine" "$store" "$reps" <<'EOF' | tee -a "$out/summary.txt"
import os, resource, statistics, subprocess, sys, time

front, engine, store, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
commands = {
    "--version": ["--version"],
    "--help": ["--help"],
    "inspect": ["inspect", store],
    "verify": ["verify", store],
    "completions bash": ["completions", "bash"],
}
binaries = {"cpa-stream (front)": front, "cpa-stream-engine": engine}
times = {(c, b): [] for c in commands for b in binaries}
rss = {(c, b): 0 for c in commands for b in binaries}
for _ in range(reps):
    for c, args in commands.items():
        for b, path in binaries.items():
            start = time.perf_counter()
            pid = os.posix_spawn(path, [path, *args], os.environ, file_actions=[
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
            _, status, usage = os.wait4(pid, 0)
            times[(c, b)].append(time.perf_counter() - start)
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"{b} {' '.join(args)}: exit {os.waitstatus_to_exitcode(status)}")
            rss[(c, b)] = max(rss[(c, b)], usage.ru_maxrss)
print(f"{'command':<18} {'binary':<20} {'median ms':>10} {'min-max ms':>14} {'peak RSS MiB':>13}")
for c in commands:
    for b in binaries:
        t = sorted(times[(c, b)])
        print(f"{c:<18} {b:<20} {1e3 * statistics.median(t):>10.1f} {f'{1e3 * t[0]:.0f}-{1e3 * t[-1]:.0f}':>14} "
              f"{rss[(c, b)] / 1024:>13.0f}")
    ratio = statistics.median(times[(c, "cpa-stream-engine")]) / statistics.median(times[(c, "cpa-stream (front)")])
    print(f"{'':<18} {'engine / front':<20} {ratio:>10.2f}x")
EOF
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/summary.txt"
