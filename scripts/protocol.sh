#!/usr/bin/env bash
# The validation protocol of docs/fidelity.md: a default or a recipe is decided on some data sets
# and confirmed on others that played no part in choosing it. Each data set below is run through
# scripts/fidelity.sh (same split rules, seeds, one thread, cpa-tools beside where it is installed
# and the data allow), then `cpa_stream.fidelity protocol` pairs every variant with the baseline variant
# by seed on each data set and prints the verdict: better on the deciding sets, and no worse
# (within two standard errors) on every confirming set, on each of the three counterfactual
# metrics (all genes, top-20 DEGs, change).
#
#   scripts/protocol.sh
#
#   DECIDE    data sets that decide (default "norman19 synth-a")
#   CONFIRM   data sets that confirm (default "mcfaline23 synth-b l1000"); `synth-atlas` (50,000
#             cells; 10 epochs, 2 seeds) adds the atlas-size check
#   VARIANTS  as fidelity.sh (default "cpa-stream defaults:defaults": the cpa-tools tutorial's
#             settings as translated, against this project's defaults)
#   BASELINE  the variant the others are compared with (default: the first of VARIANTS)
#   JUDGE     the variants judged against it, space-separated (default: every variant run), rescored
#             ones too: with RESCORE (fidelity.sh), VARIANT-delta is VARIANT's anchored prediction.
#             The anchored default of `predict` and `evaluate` was confirmed with
#             VARIANTS="defaults:defaults" RESCORE=defaults BASELINE=defaults JUDGE=defaults-delta
#             PEER=0 CONFIRM="mcfaline23 synth-b kang-celltype" (docs/fidelity.md)
#   EPOCHS, SEEDS, PEER   as fidelity.sh (defaults "10 50", "0 1 2", 1)
#   L1000_GCT  cmap/cmapPy's functional test file test_l1000.gct (public; 59 compounds x 6
#             doses in A375, 978 genes, log2 expression); without it, l1000 is skipped with a message
#   KANG_H5AD  Kang et al. 2018's PBMCs as scripts/ifnb_rda_to_h5ad.py writes them (public,
#             not bundled); without it, the kang-celltype data sets are skipped with a message
#   DIR       results (default $CPA_STREAM_CACHE/protocol), one subdirectory per data set
#
# The data sets: norman19 and mcfaline23 are the bundled file's two source studies (K562 CRISPRa
# with combinations; CRISPRi in three glioma lines), each a random split; synth-a and synth-b are
# ../shared/peer/cpa-tools/make_synth.py atlases of two seeds and shapes (5,000 x 2,000, 2 cell
# types, 4 drugs; 3,000 x 1,000, 3 cell types, 6 drugs), random splits; l1000 is bulk drug x dose
# data, split by doses (dose interpolation, Gaussian likelihood), trained 100 and 400 epochs (its
# 194 training samples make two batches an epoch). Other splits of the same data, for the harness's
# tables rather than for deciding: norman19-combos (combinations held out), mcfaline23-celltype,
# synth-a-celltype and synth-b-celltype (one cell type's perturbed cells held out); kang-celltype,
# kang-celltype-cd4, -cd4m, -b, -cd16m and -cd8t (real PBMCs, IFN-beta: the stimulated cells of
# CD14 monocytes, CD4 naive T, CD4 memory T, B, CD16 monocytes or CD8 T cells held out).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
eval "$(scripts/bootstrap.sh)"
py="$CPA_STREAM_VENV/bin/python"
# Where the harness (python -m cpa_stream.fidelity) finds the peer's run_peer.py.
export CPA_FIDELITY_PEER="${CPA_FIDELITY_PEER:-$(pwd)/../shared/peer/cpa-tools}"
dir="${DIR:-$CPA_STREAM_CACHE/protocol}"
decide="${DECIDE-norman19 synth-a}"
confirm="${CONFIRM-mcfaline23 synth-b l1000}"
variants="${VARIANTS:-cpa-stream defaults:defaults}"
baseline="${BASELINE:-${variants%% *}}"
baseline="${baseline%%:*}"
bundled="$repo/../shared/data/perturbench_devel_cpa.h5ad"
make_synth="$repo/../shared/peer/cpa-tools/make_synth.py"
log() { printf 'protocol: %s\n' "$*" >&2; }
# The held-out cell type of each Kang data set (kang-celltype: cpa_stream.fidelity's default, the cell
# type with the most stimulated cells, CD14 Mono).
kang_heldout() {
  case "$1" in
    kang-celltype-cd4) echo "CD4 Naive T" ;;
    kang-celltype-cd4m) echo "CD4 Memory T" ;;
    kang-celltype-b) echo "B" ;;
    kang-celltype-cd16m) echo "CD16 Mono" ;;
    kang-celltype-cd8t) echo "CD8 T" ;;
    *) echo "" ;;
  esac
}
mkdir -p "$dir/data"

# Prepares data set NAME: prints "H5AD SPLIT EPOCHS SEEDS PREPARE-ARGS" or nothing to skip it.
dataset() {
  case "$1" in
    norman19 | mcfaline23)
      echo "$bundled random - - --subset dataset=$1" ;;
    mcfaline23-celltype)
      echo "$bundled celltype - - --subset dataset=mcfaline23" ;;
    norman19-combos)
      echo "$bundled combos - - --subset dataset=norman19" ;;
    synth-a-celltype)
      [ -f "$dir/data/synth-a.h5ad" ] || "$py" "$make_synth" --out "$dir/data/synth-a.h5ad" --seed 0 >/dev/null
      echo "$dir/data/synth-a.h5ad celltype - -" ;;
    synth-a)
      [ -f "$dir/data/synth-a.h5ad" ] || "$py" "$make_synth" --out "$dir/data/synth-a.h5ad" --seed 0 >/dev/null
      echo "$dir/data/synth-a.h5ad random - -" ;;
    synth-b)
      [ -f "$dir/data/synth-b.h5ad" ] || "$py" "$make_synth" --out "$dir/data/synth-b.h5ad" --seed 1 \
        --n-cells 3000 --n-genes 1000 --n-cell-types 3 --n-drugs 6 --n-de-genes 80 >/dev/null
      echo "$dir/data/synth-b.h5ad random - -" ;;
    synth-b-celltype)
      [ -f "$dir/data/synth-b.h5ad" ] || "$py" "$make_synth" --out "$dir/data/synth-b.h5ad" --seed 1 \
        --n-cells 3000 --n-genes 1000 --n-cell-types 3 --n-drugs 6 --n-de-genes 80 >/dev/null
      echo "$dir/data/synth-b.h5ad celltype - -" ;;
    synth-atlas)
      [ -f "$dir/data/synth-atlas.h5ad" ] || "$py" "$make_synth" --out "$dir/data/synth-atlas.h5ad" --seed 2 \
        --n-cells 50000 --n-genes 2000 --n-cell-types 4 --n-drugs 8 >/dev/null
      echo "$dir/data/synth-atlas.h5ad random 10 0_1" ;;
    kang-celltype | kang-celltype-cd4 | kang-celltype-cd4m | kang-celltype-b | kang-celltype-cd16m | kang-celltype-cd8t)
      if [ -z "${KANG_H5AD:-}" ] || [ ! -f "$KANG_H5AD" ]; then
        log "$1 skipped: set KANG_H5AD to the .h5ad scripts/ifnb_rda_to_h5ad.py makes of seuratTools' data/ifnb1k.rda"
        return
      fi
      # The held-out values have spaces: they go to fidelity.sh as HELDOUT (kang_heldout).
      echo "$KANG_H5AD celltype - -" ;;
    l1000)
      if [ -z "${L1000_GCT:-}" ] || [ ! -f "$L1000_GCT" ]; then
        log "l1000 skipped: set L1000_GCT to cmap/cmapPy's cmapPy/pandasGEXpress/tests/functional_tests/test_l1000.gct"
        return
      fi
      [ -f "$dir/data/l1000.h5ad" ] || "$py" scripts/l1000_to_h5ad.py "$L1000_GCT" "$dir/data/l1000.h5ad" >/dev/null
      # 194 training samples are two batches an epoch: the reference's own rule
      # (min(round(20000 / cells * 400), 400)) gives 400 epochs at this size.
      echo "$dir/data/l1000.h5ad doses 100_400 -" ;;
    *)
      log "unknown data set $1 (norman19, mcfaline23, mcfaline23-celltype, norman19-combos, synth-a," \
        "synth-a-celltype, synth-b, synth-b-celltype, synth-atlas, l1000, kang-celltype, kang-celltype-cd4," \
        "kang-celltype-cd4m, kang-celltype-b, kang-celltype-cd16m, kang-celltype-cd8t)"
      exit 2 ;;
  esac
}

roles=()
for role in decide confirm; do
  names=$decide
  [ $role = confirm ] && names=$confirm
  for name in $names; do
    spec=$(dataset "$name")
    [ -n "$spec" ] || continue
    read -r h5ad split e s prepare <<<"$spec"
    if [ "$e" = - ]; then e="${EPOCHS:-10 50}"; else e="${e//_/ }"; fi
    if [ "$s" = - ]; then s="${SEEDS:-0 1 2}"; else s="${s//_/ }"; fi
    log "$name ($role): $split split, epochs $e, seeds $s"
    # fidelity.sh names its directory NAME-SPLIT: a data set named for its split (norman19-combos)
    # goes to the same directory as its base name would (norman19-combos, not norman19-combos-combos).
    base="${name%-"$split"}"
    held=$(kang_heldout "$name")
    NAME="$base" SPLIT="$split" EPOCHS="$e" SEEDS="$s" VARIANTS="$variants" PREPARE="$prepare" \
      HELDOUT="$held" DIR="$dir" scripts/fidelity.sh "$h5ad" >/dev/null
    roles+=("$role=$dir/$base-$split")
  done
done
if [ ${#roles[@]} -eq 0 ]; then
  log "no data set left to run (all skipped above)"
  exit 2
fi
judged=()
for v in ${JUDGE:-}; do judged+=(--variant "$v"); done
"$py" -m cpa_stream.fidelity protocol --baseline "$baseline" "${judged[@]}" "${roles[@]}" | tee "$dir/protocol.txt"
