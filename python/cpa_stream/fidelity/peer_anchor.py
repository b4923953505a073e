#!/usr/bin/env python
"""cpa-tools' side of the anchored comparison: runs ../shared/peer/cpa-tools/run_peer.py unchanged
(same arguments, same training, same counterfactual draws), keeps the model it trains, then decodes
the control cells it drew for the counterfactuals under their own (control) condition and writes,
per test group, the mean of log1p of those predictions (`pred_own`, in run_peer.py's group order
and space) to an .npz. With run_peer.py's `pred_cf` of the same cells, `observed control mean +
pred_cf - pred_own` is the anchored prediction that `python -m cpa_stream.fidelity rescore
--anchor` makes for cpa-stream. With FIDELITY_DRAW_SEEDS set ("0 1 2 ..."), the same model also
decodes every one of those seeds' counterfactual draws and writes their group means to draws.npz
beside OWN.npz (`python -m cpa_stream.fidelity draws --variant cpa-tools`: how much of the seeds'
spread is the draw). Run with cpa-tools' venv, which has no cpa_stream (the harness's `peer`
command calls it; CPA_FIDELITY_PEER names the peer harness's directory):

    $CPA_STREAM_CACHE/cpa-peer/bin/python .../cpa_stream/fidelity/peer_anchor.py OWN.npz RUN_PEER_ARGS...
"""
import importlib.util
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _harness_data():
    """The harness's data module (cell keys, the draws), loaded from its file: the package itself
    is not installed in cpa-tools' environment, and data.py needs nothing of it."""
    spec = importlib.util.spec_from_file_location("cpa_stream_fidelity_data", os.path.join(HERE, "data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fidelity = _harness_data()
RUN_PEER = os.path.join(fidelity.peer_dir(), "run_peer.py")


def argument(args, name, default=None):
    return args[args.index(name) + 1] if name in args else default


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    own_path, args = sys.argv[1], sys.argv[2:]
    for needed in ("--split-key", "--save-pred"):
        if needed not in args:
            sys.exit(f"peer_anchor: {needed} is needed (the draws and groups follow the split column)")
    if "--max-cells" in args:
        sys.exit("peer_anchor: --max-cells draws cells first, which changes run_peer.py's draws")

    import cpa

    trained = {}
    train = cpa.CPA.train

    def keep_model(self, *a, **k):
        trained["model"] = self
        return train(self, *a, **k)

    cpa.CPA.train = keep_model
    sys.argv = [RUN_PEER] + args
    runpy.run_path(RUN_PEER, run_name="__main__")

    import numpy as np
    import scipy.sparse as sp

    model = trained["model"]
    adata = model.adata
    pk = argument(args, "--perturbation-key")
    control = argument(args, "--control-group")
    covs = [c for c in argument(args, "--covariate-keys", "").split(",") if c]
    dose_key = argument(args, "--dose-key")
    seed = int(argument(args, "--seed", "0"))
    counts = "--not-counts" not in args and argument(args, "--recon-loss", "nb") in ("nb", "zinb")
    split = adata.obs[argument(args, "--split-key")].astype(str).values
    test_idx = np.where(split == argument(args, "--test-split", "test"))[0]
    # run_peer.py's draws (its generator is used for nothing else when the split is given),
    # computed by the same function that draws them for cpa-stream.
    meta = {"perturbation_key": pk, "control": control, "covariates": covs}
    cov = fidelity.covariate_keys(adata.obs, meta)
    src = fidelity.cf_draws(adata.obs, meta, test_idx, seed)
    own = adata[src].copy()
    model.predict(own, batch_size=1024)
    pred = np.asarray(own.obsm["CPA_pred"])
    pred = pred.toarray() if sp.issparse(pred) else pred
    pred = np.log1p(np.clip(pred, 0, None)) if counts else pred

    dose = adata.obs[dose_key].astype(str).values if dose_key else np.array(["1.0"] * adata.n_obs)
    # run_peer.py's group labels: `cov1|...|condition|dose` (`|condition|dose` without covariates).
    group = np.array([c + "|" + p + "|" + d for c, p, d in zip(cov, adata.obs[pk].astype(str).values, dose)])
    saved = np.load(argument(args, "--save-pred"), allow_pickle=False)
    gt = group[test_idx]
    rows = []
    for g in saved["groups"]:
        m = gt == str(g)
        if not m.any():
            sys.exit(f"peer_anchor: group {g} of run_peer.py's predictions has no test cell here")
        rows.append(pred[m].mean(0))
    np.savez(own_path, groups=saved["groups"], pred_own=np.asarray(rows))
    print(f"control cells decoded under their own condition, group means -> {own_path}")

    # Every listed seed's draws decoded by this model, as run_peer.py decodes its own: the test
    # cells with their expression swapped for the drawn control cells'.
    draw_seeds = [int(s) for s in os.environ.get("FIDELITY_DRAW_SEEDS", "").split()]
    if draw_seeds:
        log = (lambda m: np.log1p(np.clip(m, 0, None))) if counts else (lambda m: m)
        per_seed = []
        for d in draw_seeds:
            cells = adata[test_idx].copy()
            cells.X = adata.X[fidelity.cf_draws(adata.obs, meta, test_idx, d)].copy()
            model.predict(cells, batch_size=1024)
            p = np.asarray(cells.obsm["CPA_pred"])
            p = log(p.toarray() if sp.issparse(p) else p)
            per_seed.append([p[gt == str(g)].mean(0) for g in saved["groups"]])
        path = os.path.join(os.path.dirname(own_path), "draws.npz")
        # Whole or not at all: fidelity.sh takes an existing draws.npz as a finished run.
        with open(path + ".tmp", "wb") as f:
            np.savez(f, groups=saved["groups"], seeds=np.asarray(draw_seeds), pred_cf=np.asarray(per_seed))
        os.replace(path + ".tmp", path)
        print(f"counterfactuals of the draws of seeds {draw_seeds}, group means -> {path}")


if __name__ == "__main__":
    main()
