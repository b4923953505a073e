"""The Python path against the CLI on the same work, in one run: training and prediction,
interleaved, medians of REPS; and the peak memory of predict_anndata against the streaming path.

    eval "$(scripts/bootstrap.sh)"; scripts/build.sh; scripts/python.sh
    $CPA_STREAM_VENV/bin/python scripts/bench_python.py [OUT] [--reps 3] [--epochs 20] [--targets 10]

Every run is a fresh process (Python starts, imports cpa_stream and torch, works, exits) so both
paths pay their start-up; threads and workers are fixed (libtorch's results and speed follow
them). Prints a table and writes OUT/bench-python.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "examples" / "data" / "perturbench_devel_cpa.h5ad"
LABELS = ["--perturbation-key", "condition", "--dose-key", "dose", "--covariates", "cell_type"]


def timed(cmd: list[str], work: list[float] | None = None) -> float:
    """Wall seconds of a child process; a Python child's own timing of its call (a line
    `WORK <seconds>`) goes to `work`."""
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - start
    if work is not None:
        work.append(next(float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("WORK")))
    return wall


def peak_rss(code: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a Python child running `code`, from its own rusage."""
    wrapper = code + textwrap.dedent("""
        import resource, sys
        print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
    """)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK"))
    return wall, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default=str(REPO / "out" / "bench-python"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = os.environ.get("CPA_STREAM_BIN") or str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "cpa-stream")
    py = sys.executable
    store = out / "bundled.store"
    subprocess.run([cli, "import", str(BUNDLED), "--out", str(store), "--overwrite", "--quiet"], check=True)
    compute = ["--threads", str(args.threads), "--workers", "1"]
    kw = f"threads={args.threads}, workers=1"

    import pyarrow.parquet as pq

    conditions = [c for c in pq.read_table(store / "obs.parquet").column("condition").unique().to_pylist()
                  if c != "control" and "+" not in c][: args.targets]
    targets_cli = [a for c in conditions for a in ("--target", f"condition={c},dose=1")]
    targets_py = [f"condition={c},dose=1" for c in conditions]

    rows: dict[str, list[float]] = {k: [] for k in ("train_cli", "train_py", "predict_cli", "predict_py", "stream_py")}
    # The Python calls timed inside their process (after `import cpa_stream`: the interpreter's
    # and torch's start-up, about a second, is paid once per session, not per call).
    inside: dict[str, list[float]] = {k: [] for k in ("train_py", "predict_py", "stream_py")}
    for rep in range(args.reps):
        rows["train_cli"].append(timed([cli, "train", "--store", str(store), "--out", str(out / "run-cli"), *LABELS,
                                        "--epochs", str(args.epochs), "--overwrite", "--quiet", *compute]))
        rows["train_py"].append(timed([py, "-c", textwrap.dedent(f"""
            import time, cpa_stream as cs
            t = time.perf_counter()
            cs.train({str(store)!r}, {str(out / 'run-py')!r}, perturbation_key="condition", dosage_key="dose",
                     categorical_covariate_keys=["cell_type"], max_epochs={args.epochs}, overwrite=True,
                     progress=False, {kw})
            print("WORK", time.perf_counter() - t)
        """)], inside["train_py"]))
        rows["predict_cli"].append(timed([cli, "predict", "--model", str(out / "run-cli"), "--store", str(store),
                                          "--source", "all", *targets_cli, "--out", str(out / "p-cli.parquet"),
                                          "--overwrite", "--quiet", *compute]))
        rows["predict_py"].append(timed([py, "-c", textwrap.dedent(f"""
            import time, cpa_stream as cs
            t = time.perf_counter()
            cs.Run({str(out / 'run-py')!r}).predict_to_parquet({str(out / 'p-py.parquet')!r}, {str(store)!r},
                source="all", targets={targets_py!r}, overwrite=True, progress=False, {kw})
            print("WORK", time.perf_counter() - t)
        """)], inside["predict_py"]))
        rows["stream_py"].append(timed([py, "-c", textwrap.dedent(f"""
            import time, cpa_stream as cs
            t = time.perf_counter()
            n = 0
            for batch in cs.Run({str(out / 'run-py')!r}).predict({str(store)!r}, source="all",
                                                                   targets={targets_py!r}, {kw}):
                n += batch.num_rows
            assert n > 0
            print("WORK", time.perf_counter() - t)
        """)], inside["stream_py"]))
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items()), flush=True)
    same = (out / "run-cli" / "model" / "weights.safetensors").read_bytes() == (
        out / "run-py" / "model" / "weights.safetensors").read_bytes()

    # Memory: the same predictions held as an AnnData, and streamed to Parquet; and the import
    # plus open alone as the floor.
    common = f"import cpa_stream as cs\nrun = cs.Run({str(out / 'run-py')!r})\n"
    floor = peak_rss(common + "run.vocabulary\n")
    anndata_peak = peak_rss(common + textwrap.dedent(f"""
        a = run.predict_anndata({str(store)!r}, source="all", targets={targets_py!r}, {kw})
        assert a.n_obs > 0
    """))
    stream_peak = peak_rss(common + textwrap.dedent(f"""
        run.predict_to_parquet({str(out / 'p-mem.parquet')!r}, {str(store)!r}, source="all",
                               targets={targets_py!r}, overwrite=True, progress=False, {kw})
    """))
    n_rows = pq.ParquetFile(out / "p-mem.parquet").metadata.num_rows
    n_genes = pq.read_table(store / "var.parquet").num_rows

    med = {k: statistics.median(v) for k, v in rows.items()}
    med_in = {k: statistics.median(v) for k, v in inside.items()}
    result = {
        "reps": args.reps, "epochs": args.epochs, "targets": len(conditions), "threads": args.threads,
        "load_average": os.getloadavg(), "median_s": med, "all_s": rows,
        "median_in_process_s": med_in, "all_in_process_s": inside,
        "train_call_over_cli": med_in["train_py"] / med["train_cli"],
        "predict_call_over_cli": med_in["predict_py"] / med["predict_cli"],
        "train_py_over_cli": med["train_py"] / med["train_cli"],
        "predict_py_over_cli": med["predict_py"] / med["predict_cli"],
        "stream_py_over_cli": med["stream_py"] / med["predict_cli"],
        "weights_identical": same,
        "rows": n_rows, "genes": n_genes, "means_mib": n_rows * n_genes * 4 / 2**20,
        "peak_rss_mib": {"import_and_open": floor[1], "predict_anndata": anndata_peak[1], "predict_to_parquet": stream_peak[1]},
    }
    (out / "bench-python.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.reps} reps interleaved, {args.epochs} epochs, {len(conditions)} targets x all "
          f"{n_rows // max(len(conditions), 1):,} cells = {n_rows:,} rows x {n_genes} genes; load {os.getloadavg()[0]:.2f}")
    print(f"{'':22}{'CLI process s':>14}{'Python process s':>17}{'ratio':>7}{'Python call s':>14}{'ratio':>7}")
    for name, key, cli_key in (("train", "train_py", "train_cli"), ("predict to Parquet", "predict_py", "predict_cli"),
                               ("predict, Arrow stream", "stream_py", "predict_cli")):
        print(f"{name:22}{med[cli_key]:14.2f}{med[key]:17.2f}{med[key] / med[cli_key]:7.2f}"
              f"{med_in[key]:14.2f}{med_in[key] / med[cli_key]:7.2f}")
    print(f"weights byte-identical: {same}")
    print(f"peak RSS MiB: import+open {floor[1]:.0f}, predict_anndata {anndata_peak[1]:.0f}, "
          f"predict_to_parquet {stream_peak[1]:.0f} (means held: {result['means_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
