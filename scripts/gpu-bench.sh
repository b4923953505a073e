#!/usr/bin/env bash
# The GPU figures: the prediction sink alone on the GPU machine's cores, a 1M x 5,000 training
# epoch in fp32 and bf16 with `--batch-size auto`, prediction on the device with the predictor's and
# the sink's rates side by side (per-cell rows and aggregates), the model on preloaded batches,
# training through the pipeline against preloaded batches, peak device memory, and the loader on
# the GPU machine's cores.
#
#   scripts/gpu-bench.sh build   here: the stripped release binaries (cpa-stream and the
#                                cpa-stream-engine it hands the model to), built against this
#                                checkout's PyPI torch 2.11.0, in .device/bench.tar.xz, and the
#                                Python package's wheel beside it (ignored by git; carry .device:
#                                the two binaries unpacked are over 64 MiB)
#   scripts/gpu-bench.sh run     on a machine with libtorch 2.11.0 (CUDA) and no Rust: runs that
#                                binary with the torch found in TORCH_LIB, or in /opt/torch/.venv
#
# `run` knobs: CELLS (1000000), GENES (5000), DEVICE (cuda), STEPS ("info sink synth model train
# workers predict pipeline loader allreduce", any subset, run in that order; and `ab`, named
# with OLD, before predict: this build against another, see there), OUT (results; default .device/results), STORE_DIR
# (the synthetic store; default .device, kept between calls on a warm machine). Results: info.txt,
# sink-f32.json, sink-f16.json, train-fp32.json, train-bf16.json, train-workers-N.json, ab.jsonl, predict.jsonl, model.jsonl (and
# trace-32768.json, the profile of a step as a Chrome trace), pipeline.jsonl,
# loader.jsonl, allreduce.json and summary.txt (each step adds its lines to the summary as it ends).
set -euo pipefail
cd "$(dirname "$0")/.."
dev=.device

case "${1:-}" in
build)
  eval "$(scripts/bootstrap.sh)"
  cargo build --release --locked --bin cpa-stream --bin cpa-stream-engine >&2
  staging=$(mktemp -d)
  trap 'rm -rf "$staging"' EXIT
  for b in cpa-stream cpa-stream-engine; do
    strip -o "$staging/$b" "$CARGO_TARGET_DIR/release/$b"
  done
  mkdir -p "$dev"
  (cd "$staging" && tar cf - cpa-stream cpa-stream-engine) | xz -T2 -6 > "$dev/bench.tar.xz"
  # The Python package too, for the all-reduce step (torch.distributed makes the process group).
  scripts/python.sh >&2
  rm -f "$dev"/cpa_stream-*.whl
  cp "$CPA_STREAM_CACHE"/wheels/cpa_stream-*.whl "$dev/"
  ls -la "$dev"
  exit 0
  ;;
run) ;;
*)
  echo "usage: scripts/gpu-bench.sh build|run" >&2
  exit 2
  ;;
esac

[ -f "$dev/bench.tar.xz" ] || { echo "$dev/bench.tar.xz: missing; run 'scripts/gpu-bench.sh build' first (and carry it)" >&2; exit 1; }
# Unpacked outside .device, so that carrying .device again sends the archive alone.
bins="${TMPDIR:-/tmp}/cpa-stream-gpu-bench"
rm -rf "$bins" && mkdir -p "$bins"
xz -dc "$dev/bench.tar.xz" | tar -C "$bins" -xf -
bin="$bins/cpa-stream"
if [ -z "${TORCH_LIB:-}" ]; then
  TORCH_LIB=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/torch/lib 2>/dev/null | head -1 || true)
fi
[ -d "${TORCH_LIB:-}" ] || { echo "no torch lib/ folder: set TORCH_LIB" >&2; exit 1; }
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
py=python3
[ -x /opt/torch/.venv/bin/python ] && py=/opt/torch/.venv/bin/python
cells="${CELLS:-1000000}"
genes="${GENES:-5000}"
device="${DEVICE:-cuda}"
steps=" ${STEPS:-info sink synth model train workers predict pipeline loader allreduce} "
out="${OUT:-$dev/results}"
store="${STORE_DIR:-$dev}/gpu-${cells}x${genes}.store"
mkdir -p "$out"
export CPA_STREAM_LOG=warn
summary="$out/summary.txt"
say() { echo "$*" | tee -a "$summary"; }
want() { [[ "$steps" == *" $1 "* ]]; }

if want info; then
  "$bin" info > "$out/info.txt" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$out/info.txt" 2>&1 || true
  say "== $(grep -E 'CUDA devices|libtorch  ' "$out/info.txt" | tr -s ' ' | paste -sd ';' -)"
fi

if want sink; then
  # The host side of prediction, no model: per-thread rates and scaling on this machine's cores.
  for values in f32 f16; do
    "$bin" bench sink --genes 5000 --threads 1,2,4,8,16 --profiles small,fast --outputs file,parts --mib 256 \
      --repeats 3 --values "$values" --json > "$out/sink-$values.json"
    "$py" - "$out/sink-$values.json" "$values" <<'PY' | tee -a "$summary"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"== sink alone on {r['cpus']} CPUs, {sys.argv[2]} values (memcpy bound {r['memcpy_mb_per_s']:.0f} MB/s a thread):")
base = {}
for x in r["rounds"]:
    key = (x["genes"], x["profile"], x.get("output", "file"))
    base.setdefault(key, x["mb_per_s"])
    print(f"   {x['genes']} genes, {x['profile']}, {key[2]}, {x['threads']} threads: {x['rows_per_s']:.0f} rows/s, "
          f"{x['mb_per_s']:.0f} MB/s of float32 ({x['mb_per_s_per_thread']:.0f} a thread, {x['mb_per_s'] / base[key]:.2f}x one thread)")
PY
  done
fi

if want synth && [ ! -f "$store/manifest.json" ]; then
  start=$(date +%s)
  "$bin" synth --cells "$cells" --genes "$genes" --perturbations 20 --doses 4 --cell-types 5 \
    --combinations 10 --seed 1 --truth-samples 8 --out "$store" > /dev/null
  say "== synth $cells x $genes: $(( $(date +%s) - start )) s"
fi

if want model; then
  : > "$out/model.jsonl"
  # fp32 and bf16 at batch 1,024, then fp32 at larger batches: where a step stops being bound by
  # its launches. The operators of a step (kernels, host synchronisations) counted once; where
  # the time goes (libtorch's profiler: the device's busy share, its kernels' times) at 1,024 and
  # at 32,768 (the batch `train --batch-size auto` chose on an H200), with the trace of the latter.
  for run in "fp32 1024 --count-ops --profile" "bf16 1024" "fp32 8192" "fp32 32768 --profile --trace $out/trace-32768.json"; do
    read -r precision batch extra <<< "$run"
    model_run() {
      # shellcheck disable=SC2086 # the extra flags are words
      "$bin" bench model --cells 50000 --genes "$genes" --batch-size "$batch" --epochs 2 --device "$device" \
        --precision "$precision" "$@" --json > "$out/model-run.json" 2> "$out/model-run.err"
    }
    # shellcheck disable=SC2086 # the extra flags are words
    if ! model_run ${extra:-}; then
      # A counter or profiler that fails on this machine must not cost the other figures.
      say "== model $precision $batch with '${extra:-}' failed: $(tail -c 400 "$out/model-run.err" | tr '\n' ' '); again without"
      model_run
    fi
    "$py" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' < "$out/model-run.json" >> "$out/model.jsonl"
    rm -f "$out/model-run.json" "$out/model-run.err"
  done
  "$py" - "$out/model.jsonl" <<'PY' | tee -a "$summary"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    m = r.get("device_memory")
    memory = (f"{m['peak_allocated'] / 2**20:.0f} MiB in tensors, {m['peak_reserved'] / 2**20:.0f} MiB reserved"
              if m else "none (not CUDA)")
    print(f"== model on preloaded batches, {r['precision']}, batch {r['batch_size']}: {r['cells_per_s']:.0f} cells/s, "
          f"{r['ms_per_batch']:.2f} ms per batch, peak device memory {memory}")
    if r.get("ops"):
        o = r["ops"]
        print(f"   per step: {o['dispatched']:.0f} operators dispatched, {o['kernels']:.0f} kernels, "
              f"{o['syncs']:.0f} host synchronisations")
    p = r.get("profile")
    if p:
        top = lambda shares: ", ".join(f"{s['name'][:60]} {s['ms']:.3f} ms ({s['calls']:.0f}x)" for s in shares[:10])
        d = p.get("device")
        busy = f"device busy {d['busy_ms']:.2f} ms ({100 * d['busy_ms'] / p['wall_ms']:.0f}%), {d['events']:.0f} kernels/copies" if d else "no device events"
        print(f"   profile: {p['wall_ms']:.2f} ms a step; host in libtorch {p['host_ms']:.2f} ms; {busy}")
        if d:
            print(f"   device time per step: {top(d['top'])}")
        print(f"   host self time per step: {top(p['host_top'])}")
PY
fi

if want train; then
  for precision in fp32 bf16; do
    config="$out/cpa-$precision.toml"
    sed "s/^precision = .*/precision = \"$precision\"/" examples/cpa.toml > "$config"
    run="$dev/run-$precision"
    rm -rf "$run"
    "$bin" train --store "$store" --dose-key dose --covariates cell_type --epochs 1 --batch-size auto \
      --validation-fraction 0 --test-fraction 0 --device "$device" --config "$config" --out "$run" --json \
      > "$out/train-$precision.json"
    rm -f "$config"
    "$py" - "$out/train-$precision.json" "$run/config.toml" "$precision" <<'PY' | tee -a "$summary"
import json, re, sys
r = json.load(open(sys.argv[1]))
batch = re.search(r"^batch_size = (\d+)", open(sys.argv[2]).read(), re.M).group(1)
secs = lambda d: d["secs"] + d["nanos"] * 1e-9
stages = ", ".join(f"{s['name']} busy {secs(s['busy']):.1f} s, in {secs(s['blocked_in']):.1f} s, "
                   f"out {secs(s['blocked_out']):.1f} s" for s in r["report"]["stages"])
m = r.get("device_memory")
memory = (f"{m['peak_allocated'] / 2**20:.0f} MiB in tensors, {m['peak_reserved'] / 2**20:.0f} MiB reserved"
          if m else "none (not CUDA)")
print(f"== train {r['train_cells']} cells, {sys.argv[3]}, batch {batch} (auto): epoch {r['epochs'][0]['seconds']:.1f} s, "
      f"{r['cells_per_s']:.0f} cells/s; peak RssAnon {r['report']['memory']['rss_anon'] / 2**20:.0f} MiB; "
      f"peak device memory {memory}\n   {stages}")
PY
  done
fi

if want workers; then
  # One fp32 epoch at the batch the train step probed, with 2, 4 and 8 gather workers (a GPU run
  # plans half the CPUs, at most 8): whether the batcher keeps the trainer fed.
  batch=$(sed -n 's/^batch_size = \([0-9]*\)$/\1/p' "$dev/run-fp32/config.toml" 2>/dev/null || true)
  for w in 2 4 8; do
    run="$dev/run-workers"
    rm -rf "$run"
    "$bin" train --store "$store" --dose-key dose --covariates cell_type --epochs 1 --batch-size "${batch:-32768}" \
      --validation-fraction 0 --test-fraction 0 --device "$device" --config examples/cpa.toml --workers "$w" \
      --out "$run" --json > "$out/train-workers-$w.json"
    "$py" - "$out/train-workers-$w.json" "$w" <<'PY' | tee -a "$summary"
import json, sys
r = json.load(open(sys.argv[1]))
secs = lambda d: d["secs"] + d["nanos"] * 1e-9
stages = ", ".join(f"{s['name']} busy {secs(s['busy']):.1f} s, in {secs(s['blocked_in']):.1f} s"
                   for s in r["report"]["stages"] if s["name"] in ("batcher", "uploader", "trainer"))
print(f"== train fp32 with {sys.argv[2]} workers: epoch {r['epochs'][0]['seconds']:.2f} s, {r['cells_per_s']:.0f} cells/s; "
      f"peak RssAnon {r['report']['memory']['rss_anon'] / 2**20:.0f} MiB; {stages}")
PY
  done
fi

if want ab; then
  # This build against another (OLD: an archive `gpu-bench.sh build` made of that build, e.g.
  # OLD=.device/old.tar.xz), interleaved on this machine: one fp32 epoch each with
  # `--batch-size auto`, REPS rounds (default 3), each build's default workers.
  [ -f "${OLD:-}" ] || { echo "ab: OLD (an archive of the other build's binaries) is not a file" >&2; exit 1; }
  old_bins="${TMPDIR:-/tmp}/cpa-stream-gpu-bench-old"
  rm -rf "$old_bins" && mkdir -p "$old_bins"
  xz -dc "$OLD" | tar -C "$old_bins" -xf -
  : > "$out/ab.jsonl"
  for rep in $(seq "${REPS:-3}"); do
    for build in old new; do
      b="$bin"
      [ "$build" = old ] && b="$old_bins/cpa-stream"
      run="$dev/run-ab"
      rm -rf "$run"
      "$b" train --store "$store" --dose-key dose --covariates cell_type --epochs 1 --batch-size auto \
        --validation-fraction 0 --test-fraction 0 --device "$device" --config examples/cpa.toml --out "$run" \
        --json | "$py" -c 'import json,sys; r=json.load(sys.stdin); r["build"]=sys.argv[1]; print(json.dumps(r))' \
        "$build" >> "$out/ab.jsonl"
    done
  done
  "$py" - "$out/ab.jsonl" "$("$old_bins/cpa-stream" --version | head -1)" "$("$bin" --version | head -1)" <<'PY' | tee -a "$summary"
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rate = {b: [r["cells_per_s"] for r in rows if r["build"] == b] for b in ("old", "new")}
med = {b: statistics.median(v) for b, v in rate.items()}
print(f"== ab, one fp32 epoch, interleaved: old ({sys.argv[2]}) " + " ".join(f"{x:.0f}" for x in rate["old"])
    + f", new ({sys.argv[3]}) " + " ".join(f"{x:.0f}" for x in rate["new"])
    + f" cells/s; medians {med['old']:.0f} / {med['new']:.0f}, new/old {med['new'] / med['old']:.2f}x")
PY
fi

if want predict; then
  # Prediction on the device from the model trained above: the control cells (about a tenth) to one
  # target in every output mode, with the sink's default threads and with one; then every cell into
  # aggregates (no per-cell rows), in fp32 and bf16.
  : > "$out/predict.jsonl"
  for sink in default 1 f16; do
    extra=()
    modes=small,fast,parts,aggregate
    [ "$sink" = 1 ] && extra=(--sink-threads 1)
    [ "$sink" = f16 ] && extra=(--values f16) && modes=small,fast,parts
    "$bin" bench predict --model "$dev/run-fp32" --store "$store" --target PERT01 --modes "$modes" \
      --repeats 3 --device "$device" "${extra[@]}" --json \
      | "$py" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> "$out/predict.jsonl"
  done
  for precision in fp32 bf16; do
    "$bin" bench predict --model "$dev/run-$precision" --store "$store" --source all --target PERT01 \
      --modes aggregate --repeats 3 --device "$device" --json \
      | "$py" -c 'import json,sys; r=json.load(sys.stdin); r["model"]=sys.argv[1]; print(json.dumps(r))' "$precision" \
      >> "$out/predict.jsonl"
  done
  "$py" - "$out/predict.jsonl" <<'PY' | tee -a "$summary"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    for x in r["rounds"]:
        print(f"== predict {x['predictions']} cells x {r['genes']} genes, {x['mode']}, {r.get('values', 'f32')} values, "
              f"model {r.get('model', 'fp32')}, "
              f"{r['sink_threads']} sink threads: {x['per_s']:.0f} cells/s; predictor {x['predictor_per_s']:.0f}/s, "
              f"sink {x['sink_per_s']:.0f}/s, sink share {x['sink_share']:.3f}, bound by the {x['bottleneck']}")
PY
fi

if want pipeline; then
  : > "$out/pipeline.jsonl"
  for precision in fp32 bf16; do
    # The batch size `train --batch-size auto` probed in the train step, else 4,096.
    batch=$(sed -n 's/^batch_size = \([0-9]*\)$/\1/p' "$dev/run-$precision/config.toml" 2>/dev/null || true)
    "$bin" bench train "$store" --dose-key dose --covariates cell_type --epochs 2 --batch-size "${batch:-4096}" \
      --precision "$precision" --device "$device" --json \
      | "$py" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> "$out/pipeline.jsonl"
  done
  "$py" - "$out/pipeline.jsonl" <<'PY' | tee -a "$summary"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"== train through the pipeline vs preloaded, {r['precision']}, batch {r['batch_size']}: "
          f"{r['pipeline_cells_per_s']:.0f} vs {r['preloaded_cells_per_s']:.0f} cells/s, ratio {r['ratio']:.2f} "
          f"(per epoch " + " ".join(f"{x['ratio']:.2f}" for x in r["rounds"]) + "); trainer waited "
          + " ".join(f"{x['trainer_blocked_s']:.2f}" for x in r["rounds"]) + " s")
PY
fi

if want loader; then
  : > "$out/loader.jsonl"
  for workers in 2 8; do
    for batch in 128 1024; do
      "$bin" bench loader "$store" --dose-key dose --covariates cell_type --batch-size "$batch" \
        --workers "$workers" --json | "$py" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' \
        >> "$out/loader.jsonl"
    done
  done
  "$py" - "$out/loader.jsonl" <<'PY' | tee -a "$summary"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"== loader {r['workers']} workers, batch {r['batch_size']}, runs of {r['run_cells']}: "
          f"{r['cells_per_s']:.0f} cells/s, {r['vs_memcpy']:.2f} of the memcpy bound "
          f"({r['memcpy_cells_per_s']:.0f}; per epoch " + " ".join(f"{x['vs_memcpy']:.2f}" for x in r["rounds"])
          + f"), {r['vs_gather_bound'] or 0:.2f} of the gather bound")
PY
fi

if want allreduce; then
  # Training as the one rank of an NCCL group (every step's all-reduce runs) against training
  # alone, and one all-reduce of the gradients' 14.1 MB: the package from the wheel built here.
  wheel=$(ls "$dev"/cpa_stream-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    say "== allreduce: no wheel in $dev (scripts/gpu-bench.sh build makes one): skipped"
  else
    site="${TMPDIR:-/tmp}/cpa-stream-gpu-bench-py"
    rm -rf "$site" && "$py" -m pip install --quiet --no-deps --no-index --target "$site" "$wheel"
    batch=$(sed -n 's/^batch_size = \([0-9]*\)$/\1/p' "$dev/run-fp32/config.toml" 2>/dev/null || true)
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" scripts/bench_allreduce.py "$store" \
      "$dev/allreduce" --device "$device" --reps 2 --epochs 2 --batch "${batch:-32768}" 2>&1 | tee "$out/allreduce.txt" \
      | tail -2 | sed 's/^/== allreduce: /' >> "$summary"
    cp "$dev/allreduce/allreduce.json" "$out/" 2>/dev/null || true
  fi
fi
