#!/usr/bin/env bash
# Start-up of the command line: the commands that need no model, run by the `cpa-stream` front
# (which links no libtorch) and by `cpa-stream-engine` (which links libtorch and CUDA's libraries
# as the single binary before the split did), interleaved, REPS runs each (default 20); medians of
# wall time and of peak RSS, and their ratio. `info`, a model command, runs in the engine either
# way: its line shows what the front's hand-over costs.
#
#   REPS   runs of every command and binary (default 20)
#   OUT    results directory (default $CPA_STREAM_CACHE/bench-start)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
out="${OUT:-$CPA_STREAM_CACHE/bench-start}"
mkdir -p "$out"
store="$out/start.store"
[ -d "$store" ] || "$CARGO_TARGET_DIR/release/cpa-stream" -q synth --cells 2000 --genes 100 --perturbations 4 --out "$store"
REPS="${REPS:-20}" FRONT="$CARGO_TARGET_DIR/release/cpa-stream" ENGINE="$CARGO_TARGET_DIR/release/cpa-stream-engine" \
  STORE="$store" python3 - <<'PY' | tee "$out/start.txt"
import os, statistics, subprocess, time

reps = int(os.environ["REPS"])
front, engine, store = os.environ["FRONT"], os.environ["ENGINE"], os.environ["STORE"]
commands = [
    ["--version"],
    ["--help"],
    ["train", "--help"],
    ["inspect", store],
    ["verify", store],
    ["completions", "bash"],
    ["info", "--json"],
]

def once(binary, args):
    """Wall seconds and peak RSS (MiB) of one run, from the child's own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{binary} {' '.join(args)}: exit {proc.returncode}")
    return wall, usage.ru_maxrss / 1024

results = {}
for _ in range(reps):
    for args in commands:
        for name, binary in (("front", front), ("engine", engine)):
            results.setdefault((tuple(args), name), []).append(once(binary, args))

print(f"load average at the end: {os.getloadavg()[0]:.2f} on {len(os.sched_getaffinity(0))} CPUs; {reps} interleaved runs each, medians")
print(f"{'command':<22} {'front ms':>9} {'engine ms':>10} {'engine/front':>13} {'front MiB':>10} {'engine MiB':>11}")
for args in commands:
    label = " ".join(a if a != store else "STORE" for a in args)
    f = results[(tuple(args), "front")]
    e = results[(tuple(args), "engine")]
    fw, ew = statistics.median(w for w, _ in f) * 1e3, statistics.median(w for w, _ in e) * 1e3
    fr, er = statistics.median(r for _, r in f), statistics.median(r for _, r in e)
    print(f"{label:<22} {fw:>9.1f} {ew:>10.1f} {ew / fw:>12.1f}x {fr:>10.0f} {er:>11.0f}")
PY
