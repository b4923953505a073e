#!/usr/bin/env bash
# cpa-tools' tutorials through cpa-tools 0.8.8 and through cpa_stream.compat, seed by seed,
# interleaved (docs/fidelity.md, "The switch"):
#
#   scripts/switch-ab.sh kang|norman RESULTS.jsonl "SEEDS" [EPOCHS]
#   scripts/switch_summary.py RESULTS.jsonl
#
# Needs the peer environment (../shared/peer/cpa-tools/INSTALL.sh; CPA_PEER_PYTHON) and, for
# kang, KANG_H5AD (scripts/ifnb_rda_to_h5ad.py's file). TOOLS="compat" runs one tool only.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
tutorial=${1:?kang or norman}; results=${2:?results file}; seeds=${3:-"0 1 2"}
epochs=${4:-$([ "$tutorial" = kang ] && echo 40 || echo 50)}
peer=${CPA_PEER_PYTHON:-$CPA_STREAM_CACHE/cpa-peer/bin/python}
[ -x "$peer" ] || peer=$HOME/.cache/cpa-peer/bin/python
out=$(mktemp -d)
for s in $seeds; do
  for tool in ${TOOLS:-compat cpa}; do
    py=$CPA_STREAM_PYTHON; [ "$tool" = cpa ] && py=$peer
    (cd "$out" && "$py" "$OLDPWD/scripts/switch_$tutorial.py" "$tool" "$s" "$epochs" "$out/$tool-s$s") 2>&1 \
      | grep RESULT >> "$results" || echo "switch-ab: $tool seed $s failed (see $out)" >&2
  done
done
