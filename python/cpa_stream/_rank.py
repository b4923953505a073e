"""One rank of ``cpa-stream train`` launched as several processes (torchrun, srun): the command
line becomes ``python -m cpa_stream._rank REQUEST``, since the process group is made by
torch.distributed (:mod:`cpa_stream.distributed`)."""

from __future__ import annotations

import json

from . import _openmp, _progress
from .distributed import barrier, join


def main(argv: list[str] | None = None) -> int:
    """``python -m cpa_stream._rank REQUEST [--json]``: one rank of ``cpa-stream train``
    launched as several processes (the CLI runs this with its request as JSON). Rank 0 prints the
    run's summary (or its report as JSON with ``--json``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cpa_stream._rank")
    parser.add_argument("request", help="the training request, as JSON")
    parser.add_argument("--json", action="store_true", help="rank 0 prints the report as JSON")
    args = parser.parse_args(argv)
    request = json.loads(args.request)
    compute = request.setdefault("compute", {})
    place = join(compute.get("device") or "cpu")
    compute["device"] = place.device
    request["process_group"] = place.group
    progress = _progress.make(None if place.rank == 0 else False, "train")
    report = json.loads(_openmp.compute("train", json.dumps(request), progress))
    if place.group is not None:
        barrier()
    if place.rank == 0:
        if args.json:
            print(json.dumps(report))
        else:
            epochs = report.get("epochs") or []
            ending = ", stopped early" if report.get("stopped_early") else ""
            if report.get("interrupted"):
                ending += ", interrupted (resume with --resume)"
            print(
                f"{request['out']}: {report.get('train_cells')} training cells, {report.get('valid_cells')} validation "
                f"cells, {len(epochs)} epochs recorded{ending}; {place.world} processes, "
                f"{report.get('cells_per_s', 0.0):,.0f} cells/s"
            )
    return 130 if report.get("interrupted") else 0


if __name__ == "__main__":
    raise SystemExit(main())
