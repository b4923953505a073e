# Sourced by scripts/build.sh and scripts/python.sh (bash, after bootstrap.sh's environment).
#
# The build cache ($CARGO_TARGET_DIR) is shared by every checkout that uses the same
# $CPA_STREAM_CACHE, so that a second clone reuses the compiled dependencies. Cargo names a
# workspace crate's artifacts without the checkout's path and calls them fresh when the sources it
# finds in *this* checkout are older than they are: after another checkout built, an older
# checkout's sources look built although they differ, and cargo would hand back the other
# checkout's binaries. So when the cache was last built from another checkout (or from one this
# guard did not record), this checkout's own crates are cleaned first; the dependencies stay.
# Sets own_crates_cleaned=true when it cleaned them.
own_crates_cleaned=false
own_crates_for_this_checkout() {
  local stamp="$CARGO_TARGET_DIR/.cpa-stream-checkout" here last=""
  here=$(pwd -P)
  [ -f "$stamp" ] && last=$(cat "$stamp")
  if [ "$last" != "$here" ] && { [ -n "$last" ] || [ -d "$CARGO_TARGET_DIR/release" ]; }; then
    echo "build: the build cache was last used by ${last:-another checkout}; recompiling this checkout's own crates" >&2
    local crates=() c
    for c in cpa-stream cpa-stream-schemas cpa-stream-stages cpa-stream-pipeline cpa-stream-engine cpa-stream-python; do
      crates+=(-p "$c")
    done
    cargo clean --quiet --release "${crates[@]}" >&2
    cargo clean --quiet "${crates[@]}" >&2
    own_crates_cleaned=true
  fi
  mkdir -p "$CARGO_TARGET_DIR"
  printf '%s\n' "$here" >"$stamp.tmp.$$" && mv "$stamp.tmp.$$" "$stamp"
}
