#!/usr/bin/env bash
# Seconds per epoch of cpa-tools' tutorials under cpa-tools 0.8.8 and under cpa_stream.compat,
# both on the same libtorch threads, measured as marginal seconds: each tool trains the tutorial
# for E1 and for E2 epochs and an epoch costs (t(E2) - t(E1)) / (E2 - E1) of `train()`'s time,
# which leaves set-up out. Repetitions interleave the tools, the first alternating
# (docs/fidelity.md, "Per epoch at equal threads"):
#
#   scripts/switch-epoch.sh kang|norman RESULTS.jsonl [REPS] [E1] [E2]
#   scripts/switch_epoch_summary.py RESULTS.jsonl
#
# Needs the peer environment (../shared/peer/cpa-tools/INSTALL.sh; CPA_PEER_PYTHON) and, for
# kang, KANG_H5AD (scripts/ifnb_rda_to_h5ad.py's file). SWITCH_THREADS (default 2) sets both
# tools' threads.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
tutorial=${1:?kang or norman}; results=$(realpath -m "${2:?results file}")
reps=${3:-5}; e1=${4:-10}; e2=${5:-40}
peer=${CPA_PEER_PYTHON:-$CPA_STREAM_CACHE/cpa-peer/bin/python}
[ -x "$peer" ] || peer=$HOME/.cache/cpa-peer/bin/python
export SWITCH_THREADS=${SWITCH_THREADS:-2}
out=$(mktemp -d)
for rep in $(seq 1 "$reps"); do
  order="compat cpa"; (( rep % 2 )) || order="cpa compat"
  for tool in $order; do
    py=$CPA_STREAM_PYTHON; [ "$tool" = cpa ] && py=$peer
    for epochs in "$e1" "$e2"; do
      result=$(cd "$out" && "$py" "$OLDPWD/scripts/switch_$tutorial.py" "$tool" 0 "$epochs" "$out/$tool-$rep-$epochs" 2>&1 \
        | sed -n 's/^RESULT //p')
      if [ -z "$result" ]; then
        echo "switch-epoch: $tool, $epochs epochs, repetition $rep failed (see $out)" >&2
        continue
      fi
      printf '{"rep": %d, "load": %s, "time": "%s", "result": %s}\n' "$rep" "$(cut -d' ' -f1 /proc/loadavg)" \
        "$(date +%T)" "$result" >> "$results"
    done
  done
done
