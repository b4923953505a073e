"""`python -m cpa_stream.fidelity`: the harness's commands (see the package's docstring)."""

from __future__ import annotations

import argparse

from .data import prepare
from .report import protocol, table
from .scores import calibrated, slopes
from .tools import draws, ensemble, peer, rescore, stream


def main():
    from . import __doc__ as usage

    ap = argparse.ArgumentParser(prog="python -m cpa_stream.fidelity", description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("h5ad")
    p.add_argument("dir")
    p.add_argument("--split", choices=["random", "combos", "celltype", "doses"], default="random")
    p.add_argument("--subset", default=None, help="KEY=VALUE: only the cells whose obs column KEY is VALUE")
    p.add_argument("--heldout-value", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturbation-key", default="condition")
    p.add_argument("--dose-key", default="dose")
    p.add_argument("--control", default="control")
    p.add_argument("--covariates", default="cell_type")
    p.add_argument("--max-comb-len", type=int, default=2)
    p.add_argument("--not-counts", action="store_true")
    for name in ("peer", "stream"):
        p = sub.add_parser(name)
        p.add_argument("dir")
        p.add_argument("--epochs", type=int, required=True)
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--check-val-every", type=int, default=5)
        if name == "stream":
            p.add_argument("--variant", default="cpa-stream")
            p.add_argument("--preset", default=None)
            p.add_argument("--set", action="append", help="TABLE.KEY=VALUE over the translation")
            p.add_argument("--also-last", action="store_true",
                           help="also score the last epoch's weights, as VARIANT-last")
            p.add_argument("--defaults", action="store_true",
                           help="start from cpa-stream's defaults instead of the translation")
            p.add_argument("--keep-checkpoints", action="store_true",
                           help="keep the run's checkpoint/ and best/ once scored (by default only "
                                "model/, which rescore, draws and slopes read, stays)")
    p = sub.add_parser("rescore")
    p.add_argument("dir")
    p.add_argument("--variants", default="cpa-stream", help="comma-separated variants to score again")
    p.add_argument("--controls", choices=["drawn", "all"], default="drawn",
                   help="all: every control cell of the covariates decoded once (VARIANT-elog-allctrl)")
    p.add_argument("--anchor", action="store_true",
                   help="the model's predicted change added to the observed control mean (VARIANT-elog-...-delta)")
    p.add_argument("--space", choices=["expected", "mean"], default="expected",
                   help="expected: E[log1p] of the predicted counts (VARIANT-elog...); mean: log1p of the "
                        "predicted mean, as cpa-tools is scored (no -elog; with --anchor the like-for-like "
                        "of cpa-tools-delta)")
    p = sub.add_parser("ensemble", help="score disjoint groups of finished seeds, each group's predictions averaged")
    p.add_argument("dir")
    p.add_argument("--variant", required=True,
                   help="the runs' variant (cpa-tools: the peer's saved group means); A+B: each seed's runs of "
                        "variants A and B averaged (recipes mixed, one ensemble per seed)")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seeds", required=True, help="comma-separated seeds, grouped --size at a time in this order")
    p.add_argument("--size", type=int, default=2, help="models per ensemble")
    p.add_argument("--anchor", action="store_true",
                   help="cpa-stream: the anchored prediction (VARIANT-ensK-delta); cpa-tools scores both")
    p = sub.add_parser("draws", help="score each seed's model with every seed's control-cell draws")
    p.add_argument("dir")
    p.add_argument("--variant", default="cpa-stream")
    p.add_argument("--against", default=None, help="a second variant (cpa-tools: runs made with FIDELITY_DRAW_SEEDS)")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--verbose", action="store_true", help="also print every model-draw pair's scores")
    p = sub.add_parser("table")
    p.add_argument("dir")
    p = sub.add_parser("slopes", help="how much of the real change the anchored model and the shift baseline recover")
    p.add_argument("dir")
    p.add_argument("--variant", default="cpa-stream")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--covariate", default=None, help="the covariate value (default: the held-out one)")
    p = sub.add_parser("calibrated", help="the shift baseline scaled by how much shifts carry over in training")
    p.add_argument("dirs", nargs="+", help="celltype split directories")
    p = sub.add_parser("protocol", help="variants against a baseline over deciding and confirming data sets")
    p.add_argument("sets", nargs="+", help="decide=DIR or confirm=DIR (a fidelity.sh data set directory)")
    p.add_argument("--baseline", default="cpa-stream")
    p.add_argument("--variant", action="append",
                   help="judge only this variant (repeatable), rescored ones too: VARIANT-delta is the anchored prediction")
    a = ap.parse_args()
    commands = {"prepare": prepare, "peer": peer, "stream": stream, "rescore": rescore, "ensemble": ensemble, "draws": draws, "table": table,
                "protocol": protocol, "slopes": slopes, "calibrated": calibrated}
    commands[a.command](a)
