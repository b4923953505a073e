#!/usr/bin/env bash
# Fidelity against the reference: cpa-stream and cpa-tools 0.8.8 trained on the same cells (one
# split column), with cpa-tools' hyper-parameters translated key by key (python -m cpa_stream.fidelity
# `translate`), equal epochs, the same counterfactual control-cell draws, scored by one script;
# prints a table of means and spreads over seeds with the control-mean baseline, and each variant
# paired by seed against cpa-tools (difference and its standard error, ratio of the spreads).
#
#   scripts/fidelity.sh [H5AD ...]        default: the bundled data and the synthetic atlas
#
#   EPOCHS    epochs, space-separated (default "10 50")
#   SEEDS     seeds, space-separated (default "0 1 2")
#   SPLIT     random (stratified 80/10/10 per group, the default), combos (combinations held out),
#             celltype (one covariate value's perturbed cells held out: the unseen cell type; HELDOUT=V
#             picks it) or doses (each perturbation's second and second-largest doses held out, the
#             middle one for validation: dose interpolation, for bulk drug x dose data)
#   VARIANTS  cpa-stream variants, space-separated NAME[:preset=P][:KEY=VALUE...]; default
#             "cpa-stream" (the translation as is). Example: "cpa-stream ref:preset=reference
#             drop:model.dropout_rate_decoder=0.1"; `last` also scores the last epoch's weights;
#             `defaults` starts from cpa-stream's own defaults instead of the translation (only the
#             epochs, validation cadence, seed and max_comb_len are set, as for the translation)
#   RESCORE   variants scored again as VARIANT-elog (expected log1p of the predicted counts),
#             VARIANT-elog-allctrl (every control cell decoded once), VARIANT-elog-allctrl-delta
#             (anchored on the observed controls: the recipe) and VARIANT-delta (anchored, log1p
#             of the mean, the draws: like for like with cpa-tools-delta), comma-separated
#   PEER      0 to leave cpa-tools out (kept results are still tabled); it is left out by itself
#             on bulk data scored per sample (SPLIT=doses), which run_peer.py cannot score
#   PREPARE   more arguments of `cpa_stream.fidelity prepare` (e.g. "--subset dataset=norman19",
#             "--covariates cell_type,batch"); with NAME, the data set's directory name
#   NAME      name of the data set's directory (default: the file's name); one data set only
#   DIR       results (default $CPA_STREAM_CACHE/fidelity); one subdirectory per data set and split
#
# Each cpa-tools model also decodes every seed's control-cell draws (draws.npz), so that
# `python -m cpa_stream.fidelity draws DIR --variant cpa-stream --against cpa-tools --epochs E` can split
# both tools' spread over seeds into the training's part and the draws' part.
#
# cpa-tools is installed on first use into $CPA_STREAM_CACHE/cpa-peer by
# ../shared/peer/cpa-tools/INSTALL.sh (Python 3.10, about 6 GB); when it cannot be, its runs are
# skipped with a message and cpa-stream's still run. Each training run uses one thread, so the
# two tools get the same CPU on a busy machine; runs are interleaved (cpa-tools, then each
# variant, per seed), and every result records the load average.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
if ! scripts/python.sh >"$CPA_STREAM_CACHE/fidelity-python.log" 2>&1; then
  cat "$CPA_STREAM_CACHE/fidelity-python.log" >&2
  exit 1
fi
export CPA_STREAM_BIN="$CARGO_TARGET_DIR/release/cpa-stream"
py="$CPA_STREAM_VENV/bin/python"
epochs="${EPOCHS:-10 50}"
seeds="${SEEDS:-0 1 2}"
split="${SPLIT:-random}"
variants="${VARIANTS:-cpa-stream}"
dir="${DIR:-$CPA_STREAM_CACHE/fidelity}"
peer_dir="$repo/../shared/peer/cpa-tools"
# Where the harness (python -m cpa_stream.fidelity) finds the peer's run_peer.py.
export CPA_FIDELITY_PEER="${CPA_FIDELITY_PEER:-$peer_dir}"
log() { printf 'fidelity: %s\n' "$*" >&2; }

peer=0
if [ "${PEER:-1}" = 1 ]; then
  export CPA_PEER_PYTHON="$CPA_STREAM_CACHE/cpa-peer/bin/python"
  export FIDELITY_DRAW_SEEDS="$seeds"
  if [ ! -x "$CPA_PEER_PYTHON" ] || ! "$CPA_PEER_PYTHON" -c 'import cpa' 2>/dev/null; then
    if [ -f "$peer_dir/INSTALL.sh" ]; then
      log "installing cpa-tools 0.8.8 into $CPA_STREAM_CACHE/cpa-peer (once; about 6 GB)"
      VENV="$CPA_STREAM_CACHE/cpa-peer" EXACT=1 bash "$peer_dir/INSTALL.sh" >"$CPA_STREAM_CACHE/cpa-peer-install.log" 2>&1 ||
        log "cpa-tools could not be installed (see $CPA_STREAM_CACHE/cpa-peer-install.log); its runs are skipped"
    else
      log "no $peer_dir/INSTALL.sh; cpa-tools' runs are skipped"
    fi
  fi
  if [ -x "$CPA_PEER_PYTHON" ] && "$CPA_PEER_PYTHON" -c 'import cpa' 2>/dev/null; then
    peer=1
  fi
fi

data=("$@")
if [ ${#data[@]} -eq 0 ]; then
  synth="$dir/synth.h5ad"
  if [ ! -f "$synth" ]; then
    mkdir -p "$dir"
    "$py" "$peer_dir/make_synth.py" --out "$synth" >/dev/null
  fi
  data=("$repo/../shared/data/perturbench_devel_cpa.h5ad" "$synth")
fi

if [ -n "${NAME:-}" ] && [ ${#data[@]} -ne 1 ]; then
  log "NAME names one data set; ${#data[@]} given"
  exit 2
fi
read -r -a prepare_args <<<"${PREPARE:-}"
for h5ad in "${data[@]}"; do
  name=${NAME:-$(basename "$h5ad" .h5ad)}
  out="$dir/$name-$split"
  if [ ! -f "$out/meta.json" ]; then
    heldout=()
    if [ -n "${HELDOUT:-}" ]; then heldout=(--heldout-value "$HELDOUT"); fi
    "$py" -m cpa_stream.fidelity prepare "$h5ad" "$out" --split "$split" "${heldout[@]}" "${prepare_args[@]}"
  fi
  peer_here=$peer
  if [ $peer = 1 ] && [ "$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("min_test_cells", 2))' "$out/meta.json")" = 1 ]; then
    log "cpa-tools left out on $name: its groups are single samples, and run_peer.py scores groups of 2 or more test cells"
    peer_here=0
  fi
  for e in $epochs; do
    for s in $seeds; do
      # A run is made again when it predates the draws file (`cpa_stream.fidelity draws --against`
      # needs it); on the same machine it reproduces its scores to the digit.
      if [ $peer_here = 1 ] && { [ ! -f "$out/results/cpa-tools-e$e-s$s/score.json" ] ||
        [ ! -f "$out/results/cpa-tools-e$e-s$s/draws.npz" ]; }; then
        "$py" -m cpa_stream.fidelity peer "$out" --epochs "$e" --seed "$s" ||
          log "cpa-tools failed on $name, $e epochs, seed $s (see $out/results/cpa-tools-e$e-s$s/log.txt)"
      fi
      for v in $variants; do
        IFS=: read -r -a parts <<<"$v"
        args=(--variant "${parts[0]}")
        for p in "${parts[@]:1}"; do
          case "$p" in
            preset=*) args+=(--preset "${p#preset=}") ;;
            last) args+=(--also-last) ;;
            defaults) args+=(--defaults) ;;
            *) args+=(--set "$p") ;;
          esac
        done
        if [ ! -f "$out/results/${parts[0]}-e$e-s$s/score.json" ]; then
          "$py" -m cpa_stream.fidelity stream "$out" --epochs "$e" --seed "$s" "${args[@]}"
        fi
      done
    done
  done
  if [ -n "${RESCORE:-}" ]; then
    "$py" -m cpa_stream.fidelity rescore "$out" --variants "$RESCORE"
    "$py" -m cpa_stream.fidelity rescore "$out" --variants "$RESCORE" --controls all
    "$py" -m cpa_stream.fidelity rescore "$out" --variants "$RESCORE" --controls all --anchor
    "$py" -m cpa_stream.fidelity rescore "$out" --variants "$RESCORE" --space mean --anchor
  fi
  "$py" -m cpa_stream.fidelity table "$out"
done
