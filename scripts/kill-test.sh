#!/usr/bin/env bash
# Crash safety under SIGKILL: import (of one file, and of two shuffled into one store), convert,
# train, predict (one file, and a directory of parts written by two sink threads) and appends (to
# a store, and to a `cp -al` copy that shares its files with the store it was copied from) are killed at random moments (KILLS per command, default 20) and at each of
# their renames (strace injects SIGKILL at the N-th rename/renameat2 call), then checked:
#   - an output is either absent or byte-identical to an uninterrupted run's (never half-written);
#   - the rerun (--overwrite; train: --resume when a checkpoint exists) succeeds;
#   - train: the resumed run's final weights and optimizer are byte-identical to the
#     uninterrupted run's (CPU, one thread).
# Prints one line per command with the kills survived; exits 1 on the first violation.
# Not part of CI's time budget (a few minutes on two cores).
#   KILLS  random kills per command (default 20)
#   SEED   seed of the random delays (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/bootstrap.sh)"
scripts/build.sh --quiet
bin="$CARGO_TARGET_DIR/release/cpa-stream"
kills="${KILLS:-20}"
RANDOM="${SEED:-1}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CPA_STREAM_LOG=error

# Inputs: a synthetic store and its .h5ad export.
"$bin" synth --cells 4000 --genes 100 --perturbations 4 --doses 1 --cell-types 2 --combinations 2 \
  --seed 3 --out "$work/in.store" > /dev/null
"$bin" export "$work/in.store" --out "$work/in.h5ad" > /dev/null
cp "$work/in.h5ad" "$work/in-b.h5ad"

# Each command: its output path and argument list (train and predict also need a model).
declare -A out args
out[import]="$work/o/import.store"
args[import]="import $work/in.h5ad --out ${out[import]} --overwrite"
# Many files into one store, shuffled: its scratch store, id buckets and shuffle buckets.
out[import-many]="$work/o/many.store"
args[import-many]="import $work/in.h5ad $work/in-b.h5ad --make-unique --shuffle 5 --out ${out[import-many]} --overwrite"
out[convert]="$work/o/convert.store"
args[convert]="convert $work/in.store --codec zstd --shuffle 7 --out ${out[convert]} --overwrite"
out[train]="$work/o/run"
train_args="train --store $work/in.store --dose-key dose --covariates cell_type --config examples/cpa-small.toml \
--epochs 4 --threads 1 --out ${out[train]}"
out[predict]="$work/o/predictions.parquet"
args[predict]="predict --model $work/model-run --store $work/in.store --source all --target PERT01+PERT02 \
--threads 1 --out ${out[predict]} --overwrite"
out[predict-parts]="$work/o/parts"
args[predict-parts]="predict --model $work/model-run --store $work/in.store --source all --target PERT01+PERT02 \
--threads 1 --parts --sink-threads 2 --row-group-rows 1000 --out ${out[predict-parts]} --overwrite"
"$bin" train --store "$work/in.store" --dose-key dose --covariates cell_type --config examples/cpa-small.toml \
  --epochs 1 --threads 1 --out "$work/model-run" > /dev/null

# What an output is, to compare: every file's checksum below it (a file: its own).
digest() { (cd "$(dirname "$1")" && find "$(basename "$1")" -type f ! -name '.*' -print0 | sort -z \
  | xargs -0 -r sha256sum) 2>/dev/null; }
# A train run's end state: weights and optimizer moments of its last checkpoint.
train_digest() { sha256sum "$1/checkpoint/weights.safetensors" "$1/checkpoint/optimizer.safetensors" \
  | awk '{print $1}'; }
fail() { echo "FAILED: $*" >&2; exit 1; }
# Runs `$bin ARGS` and kills it with SIGKILL: after a delay (delay:MS) or at its N-th rename
# (rename:N, injected by strace). Call with stderr dropped: bash reports each killed job.
kill_at() {
  local point=$1 a=$2 pid
  case "$point" in
    delay:*)
      $bin $a > /dev/null 2>&1 &
      pid=$!
      sleep "$(awk -v m="${point#delay:}" 'BEGIN { print m / 1000 }')"
      kill -9 "$pid" 2> /dev/null || true
      wait "$pid" 2> /dev/null || true
      ;;
    rename:*)
      strace -f -qq -o /dev/null -e trace=rename,renameat,renameat2 \
        -e inject=rename,renameat,renameat2:signal=SIGKILL:when="${point#rename:}" $bin $a > /dev/null 2>&1 || true
      ;;
  esac
}

mkdir -p "$work/o"
for cmd in import import-many convert predict predict-parts train; do
  # The uninterrupted run, its time and its output.
  rm -rf "${out[$cmd]}"
  start=$(date +%s%N)
  if [ "$cmd" = train ]; then
    $bin $train_args > /dev/null
    expected=$(train_digest "${out[$cmd]}")
  else
    $bin ${args[$cmd]} > /dev/null
    expected=$(digest "${out[$cmd]}")
  fi
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  renames=$(strace -f -qq -e trace=rename,renameat,renameat2 -o /dev/stdout \
    $bin $( [ "$cmd" = train ] && echo "$train_args --overwrite" || echo "${args[$cmd]}" ) 2>/dev/null \
    | grep -c 'rename' || true)
  survived=0
  # Kill points: KILLS random delays within the run, then each rename.
  points=()
  for ((k = 0; k < kills; k++)); do points+=("delay:$(( RANDOM % (ms + 1) ))"); done
  for ((r = 1; r <= renames; r++)); do points+=("rename:$r"); done
  for point in "${points[@]}"; do
    rm -rf "${out[$cmd]}"
    [ "$cmd" = train ] && a="$train_args" || a="${args[$cmd]}"
    kill_at "$point" "$a" 2> /dev/null
    # Whatever is at the output now must be complete (or absent).
    if [ "$cmd" != train ] && [ -e "${out[$cmd]}" ]; then
      [ "$(digest "${out[$cmd]}")" = "$expected" ] || fail "$cmd killed at $point left an incomplete output"
    fi
    # The rerun succeeds and ends where the uninterrupted run ended.
    if [ "$cmd" = train ]; then
      # A checkpoint (or one a kill left between two names, `.checkpoint.old-PID`, which resume
      # recovers): resume it; otherwise start again.
      if [ -d "${out[$cmd]}/checkpoint" ] || compgen -G "${out[$cmd]}/.checkpoint.old-*" > /dev/null; then
        $bin $train_args --resume > /dev/null 2>"$work/err" || fail "$cmd resume after a kill at $point: $(cat "$work/err")"
      else
        $bin $train_args --overwrite > /dev/null 2>"$work/err" || fail "$cmd rerun after a kill at $point: $(cat "$work/err")"
      fi
      [ "$(train_digest "${out[$cmd]}")" = "$expected" ] || fail "$cmd resumed after a kill at $point differs"
    else
      $bin ${args[$cmd]} > /dev/null 2>"$work/err" || fail "$cmd rerun after a kill at $point: $(cat "$work/err")"
      [ "$(digest "${out[$cmd]}")" = "$expected" ] || fail "$cmd rerun after a kill at $point differs"
    fi
    # No temporaries left beside the output after the rerun.
    name=$(basename "${out[$cmd]}")
    left=$(find "$(dirname "${out[$cmd]}")" -maxdepth 2 \( -name ".$name.tmp-*" -o -name ".$name.import-*" \
      -o -name ".$name.shuffle-*" \) | head -1)
    [ -z "$left" ] || fail "$cmd after a kill at $point: temporary $left left behind"
    survived=$((survived + 1))
  done
  echo "$cmd: ${#points[@]} kills survived ($kills at random moments within ${ms} ms, $renames at each rename)"
done

# Appending to a store: the store is its own input and output, so each kill starts from a copy
# of the base store, and what is left must be the base store (the kill came before the new
# version was published: its manifest and every byte it lists as they were; the matrix files may
# hold bytes after those, which the next append removes) or the complete new version, readable
# either way. Three bases: a store of one file (the first append adds the source column, so its
# obs table is written again), the same after one append (its obs table gains the new rows in
# place) and a zstd store (a new run of blocks after a last block that is not full); and a fourth,
# `linked`: the store appended to is a `cp -al` copy of the first base, sharing its files' inodes,
# and the base must stay byte for byte as it was whatever the kill (an append writes through no
# link).
# The base's version as it was: its manifest, and each listed file's bytes up to its recorded size.
same_as_base() { # BASE STORE
  cmp -s "$1/manifest.json" "$2/manifest.json" || return 1
  local f n
  while read -r f n; do
    cmp -s -n "$n" "$1/$f" "$2/$f" || return 1
  done < <(python3 -c "import json,sys; [print(k, v['bytes']) for k, v in json.load(open(sys.argv[1]))['files'].items()]" "$1/manifest.json")
}
"$bin" import "$work/in.h5ad" --out "$work/o/base-one.store" > /dev/null
cp -r "$work/o/base-one.store" "$work/o/base-grown.store"
"$bin" import --append "$work/o/base-grown.store" "$work/in-b.h5ad" --make-unique > /dev/null
cp "$work/in.h5ad" "$work/in-c.h5ad"
"$bin" import "$work/in.h5ad" --codec zstd --block-rows 300 --out "$work/o/base-zstd.store" > /dev/null
for case in one:in-b grown:in-c zstd:in-b linked:in-b; do
  base="$work/o/base-${case%%:*}.store" app="$work/o/app.store" copy="cp -r"
  if [ "${case%%:*}" = linked ]; then base="$work/o/base-one.store" copy="cp -al"; fi
  base_digest=$(digest "$base")
  append_args="import --append $app $work/${case##*:}.h5ad --make-unique"
  rm -rf "$app" && $copy "$base" "$app"
  start=$(date +%s%N)
  $bin $append_args > /dev/null
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  expected=$(digest "$app")
  rm -rf "$app" && $copy "$base" "$app"
  renames=$(strace -f -qq -e trace=rename,renameat,renameat2 -o /dev/stdout $bin $append_args 2>/dev/null \
    | grep -c 'rename' || true)
  points=()
  for ((k = 0; k < kills; k++)); do points+=("delay:$(( RANDOM % (ms + 1) ))"); done
  for ((r = 1; r <= renames; r++)); do points+=("rename:$r"); done
  for point in "${points[@]}"; do
    rm -rf "$app" && $copy "$base" "$app"
    kill_at "$point" "$append_args" 2> /dev/null
    [ "$(digest "$base")" = "$base_digest" ] || fail "append ($case) killed at $point changed the store it was copied from"
    [ -d "$app" ] || fail "append ($case) killed at $point: the store is gone"
    "$bin" verify "$app" > /dev/null 2>"$work/err" || fail "append ($case) killed at $point: $(cat "$work/err")"
    if [ "$(digest "$app")" != "$expected" ]; then
      # Not the new version: then the old one, as it was.
      same_as_base "$base" "$app" \
        || fail "append ($case) killed at $point left a store that is neither the old nor the new version"
      $bin $append_args > /dev/null 2>"$work/err" \
        || fail "append ($case) rerun after a kill at $point: $(cat "$work/err")"
      [ "$(digest "$app")" = "$expected" ] || fail "append ($case) rerun after a kill at $point differs"
    fi
    left=$(find "$work/o" -maxdepth 1 \( -name ".app.store.tmp-*" -o -name ".app.store.import-*" \) | head -1)
    [ -z "$left" ] || fail "append ($case) after a kill at $point: temporary $left left behind"
  done
  echo "append ($case): ${#points[@]} kills survived ($kills at random moments within ${ms} ms, $renames at each rename)"
done
