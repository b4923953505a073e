#!/usr/bin/env bash
# The same cpa-tools tutorial (examples/cpa-tools/kang.py: Kang's code on the bundled data) under
# cpa-tools 0.8.8 (its import line restored) and under cpa_stream.compat, interleaved, REPS times:
# wall seconds and peak RSS of the whole script (data loading, DEGs, training, latents, UMAPs,
# prediction, scoring) as a notebook user experiences it.
#
#   REPS=3 EPOCHS=30 TUTORIAL=kang scripts/bench-tutorial.sh
#
# Needs the package (scripts/python.sh) and cpa-tools' venv ($CPA_STREAM_CACHE/cpa-peer, installed
# by scripts/fidelity.sh from ../shared/peer/cpa-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CPA_STREAM_PYTHON:?run eval \"\$(scripts/bootstrap.sh)\" first}"
reps=${REPS:-3}
epochs=${EPOCHS:-30}
tutorial=${TUTORIAL:-kang}
peer="${CPA_PEER_PYTHON:-$CPA_STREAM_CACHE/cpa-peer/bin/python}"
[ -x "$peer" ] || { echo "bench-tutorial: no cpa-tools venv at $peer" >&2; exit 3; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp examples/cpa-tools/_data.py "$work/"
# cpa-tools with use_gpu=True on a machine without CUDA stops (Lightning picks an MPS accelerator
# that is not there); its copy asks for the CPU, as a user there has to. Both copies end where the
# example goes beyond the tutorial (cpa-stream's own calls, which cpa-tools has not), as
# python/tests/test_tutorials.py cuts them.
sed -e 's/^import cpa_stream.compat as cpa  # was: import cpa$/import cpa/' -e 's/use_gpu=True/use_gpu=False/' \
  -e '/^# Beyond the tutorial/,$d' "examples/cpa-tools/$tutorial.py" > "$work/peer_$tutorial.py"
sed -e '/^# Beyond the tutorial/,$d' "examples/cpa-tools/$tutorial.py" > "$work/ours_$tutorial.py"
grep -q '^import cpa$' "$work/peer_$tutorial.py"
# Time model.train(...) on its own too, and count the epochs it trained (early stopping may end
# the two tools' runs at different epochs): a line TRAIN <seconds> <epochs> on stderr.
for f in "$work/peer_$tutorial.py" "$work/ours_$tutorial.py"; do
  "$CPA_STREAM_PYTHON" - "$f" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
start = text.index("model.train(")
depth, i = 0, start
while True:
    if text[i] == "(":
        depth += 1
    elif text[i] == ")":
        depth -= 1
        if depth == 0:
            break
    i += 1
call = text[start:i + 1]
timed = ("import time as _time\n_t0 = _time.perf_counter()\n" + call +
         "\nimport sys as _sys\nprint('TRAIN', round(_time.perf_counter() - _t0, 2), "
         "int((model.epoch_history['mode'] == 'train').sum()), file=_sys.stderr)\n")
open(path, "w").write(text[:start] + timed + text[i + 1:])
PY
done
sed -i "s#^BUNDLED = .*#BUNDLED = __import__('pathlib').Path('$PWD/examples/data/perturbench_devel_cpa.h5ad')#" "$work/_data.py"
echo "# $tutorial tutorial, $epochs epochs, $(nproc) CPUs, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "tool rep wall_s peak_rss_mib train_s epochs"
for rep in $(seq 1 "$reps"); do
  for tool in cpa-tools cpa-stream; do
    if [ "$tool" = cpa-tools ]; then py=$peer; script="$work/peer_$tutorial.py"; else py=$CPA_STREAM_PYTHON; script="$work/ours_$tutorial.py"; fi
    rm -rf "$work/out"
    ( cd "$work" && MPLBACKEND=Agg TUTORIAL_EPOCHS="$epochs" /usr/bin/time -f "%e %M" -o "$work/time" \
        "$py" "$script" "$work/out" >"$work/log" 2>&1 ) || { tail -20 "$work/log" >&2; exit 1; }
    read -r wall rss < "$work/time"
    read -r _ train trained < <(grep '^TRAIN ' "$work/log")
    echo "$tool $rep $wall $((rss / 1024)) $train $trained"
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
