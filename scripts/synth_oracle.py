#!/usr/bin/env python
"""The ceiling of a synthetic data set's scores: its generator's own per-cell means, scored
by the harness like a model.

    synth_oracle.py DIR [--seed S]

DIR is a `cpa_stream.fidelity prepare` directory of an atlas written by
../shared/peer/cpa-tools/make_synth.py (its `uns['synth_params']` name the generator's
settings). The generator's draws are replayed from its seed in its order, and the replay is
checked against the file's counts (a different generator version is an error, not a wrong
answer). Each test group is then predicted as a model would be, from the same control cells
`cpa_stream.fidelity` draws for seed S (`cf_draws`), but with the true negative-binomial mean of each
control cell under the group's drug and dose (its own library size and basal state, the drug's
Hill curve and log-fold changes for the cell type), and scored by `cpa_stream.fidelity score`:

  plain     log1p of the true mean, averaged: how both tools' predictions are scored
  expected  E[log1p X] under the true NB (the true theta): the real side's quantity
  anchored  the observed log1p mean of the cell type's control cells moved by the true change,
            log1p of the true mean under the drug minus without it, averaged over the same
            cells: `cpa_stream.fidelity rescore --space mean --anchor` (`predict --anchored`)

beside the harness's baselines. A score the true means do not reach in a space is beyond any
model scored in it.
"""
import argparse
import json
import os
import sys

import numpy as np

from cpa_stream import fidelity


def replay(p):
    """The generator's per-cell log means without a drug, and its drug parameters, in the order
    make_synth.py draws them; its counts too, to check the replay against the file."""
    rng = np.random.default_rng(p["seed"])
    n, g = p["n_cells"], p["n_genes"]
    n_drugs, n_types, doses = len(p["drugs"]), len(p["cell_types"]), np.array(p["doses"])
    cell_type = rng.choice(n_types, size=n)
    is_ctrl = rng.random(n) < p["control_frac"]
    drug = rng.integers(0, n_drugs, size=n)
    dose_idx = rng.integers(0, len(doses), size=n)
    drug[is_ctrl] = -1
    base = rng.gamma(0.3, 1.0, size=g) + 1e-3
    base /= base.sum()
    logp = np.tile(np.log(base), (n_types, 1))
    for t in range(1, n_types):
        reweighted = rng.random(g) < 0.2
        logp[t, reweighted] += rng.normal(0, 0.8, size=reweighted.sum())
    theta = np.exp(rng.normal(np.log(4.0), 0.5, size=g))
    w_state = rng.normal(0, 0.15, size=g)
    ec50 = np.exp(rng.uniform(np.log(0.2), np.log(5.0), size=n_drugs))
    hill_h = rng.uniform(0.8, 2.0, size=n_drugs)
    delta = np.zeros((n_drugs, n_types, g))
    for d in range(n_drugs):
        genes = rng.choice(g, size=p["n_de_genes"], replace=False)
        effect = rng.normal(0, 1.0, size=p["n_de_genes"])
        for t in range(n_types):
            delta[d, t, genes] = effect
            specific = rng.random(p["n_de_genes"]) < 0.3
            delta[d, t, genes[specific]] += rng.normal(0, 0.4, size=specific.sum())
    library = np.exp(rng.normal(np.log(3000.0), 0.35, size=n))
    state = rng.normal(0, 1, size=n)
    dose = np.where(is_ctrl, 1.0, doses[dose_idx])
    treated = ~is_ctrl
    hill = np.zeros(n)
    dd = drug[treated]
    hill[treated] = dose[treated] ** hill_h[dd] / (ec50[dd] ** hill_h[dd] + dose[treated] ** hill_h[dd])
    log_mu0 = np.log(library)[:, None] + logp[cell_type] + state[:, None] * w_state[None, :]
    effect = np.zeros((n, g))
    effect[treated] = hill[treated, None] * delta[dd, cell_type[treated]]
    mu = np.exp(log_mu0 + effect)
    counts = rng.poisson(rng.gamma(theta[None, :], mu / theta[None, :])).astype(np.float32)
    return {"log_mu0": log_mu0, "cell_type": cell_type, "theta": theta, "delta": delta, "ec50": ec50,
            "hill_h": hill_h, "counts": counts}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=0, help="the control-cell draws' seed (cpa_stream.fidelity's run seed)")
    a = ap.parse_args()

    import anndata

    meta = fidelity.read_meta(a.dir)
    adata = anndata.read_h5ad(os.path.join(a.dir, "data.h5ad"))
    if "synth_params" not in adata.uns:
        sys.exit(f"synth_oracle: {a.dir}/data.h5ad has no uns['synth_params']: not a make_synth.py atlas")
    params = json.loads(adata.uns["synth_params"])
    truth = replay(params)
    row = np.array([int(name.removeprefix("cell")) for name in adata.obs.index])
    counts = adata.X.toarray()
    if not np.array_equal(counts, truth["counts"][row]):
        sys.exit("synth_oracle: the replayed counts differ from the file's: another make_synth.py version")

    obs = adata.obs
    group = fidelity.group_keys(obs, meta)
    test_idx = np.where(obs[fidelity.SPLIT].astype(str).values == "test")[0]
    source = fidelity.cf_draws(obs, meta, test_idx, a.seed)
    ctrl = obs[meta["perturbation_key"]].astype(str).values == meta["control"]
    cov = fidelity.covariate_keys(obs, meta)
    predictions = {"plain": {}, "expected": {}, "anchored": {}}
    for g in np.unique(group[test_idx]):
        members = np.where(group[test_idx] == g)[0]
        first = test_idx[members[0]]
        if ctrl[first]:
            continue
        d = params["drugs"].index(str(obs.iloc[first][meta["perturbation_key"]]))
        dose = float(obs.iloc[first][meta["dose_key"]])
        t = truth["cell_type"][row[first]]
        h, ec50 = truth["hill_h"][d], truth["ec50"][d]
        hill = dose ** h / (ec50 ** h + dose ** h)
        cells, weights = np.unique(source[members], return_counts=True)
        mu0 = np.exp(truth["log_mu0"][row[cells]])
        mu = mu0 * np.exp(hill * truth["delta"][d, t])
        w = weights[:, None] / weights.sum()
        plain = (np.log1p(mu) * w).sum(0)
        expected = (fidelity.expected_log1p_nb(mu, truth["theta"][None, :]) * w).sum(0)
        observed = np.log1p(counts[ctrl & (cov == cov[first])]).mean(0)
        anchored = observed + plain - (np.log1p(mu0) * w).sum(0)
        predictions["plain"][g] = {"cf": plain, "recon": plain}
        predictions["expected"][g] = {"cf": expected, "recon": expected}
        predictions["anchored"][g] = {"cf": anchored, "recon": anchored}
    print(f"{a.dir}: the generator's true means, control cells drawn with seed {a.seed}; "
          "cf all / top-20 DEG / change R2")
    for space, groups in predictions.items():
        result = fidelity.score(a.dir, groups, a.seed)
        for name, means in (("held-out groups", result["held_out_mean"]), ("all test groups", result["mean"])):
            if means is None:
                continue
            line = " / ".join(f"{means['cf_' + k]:.3f}" for k in ("all", "deg", "change"))
            print(f"  true means, {space:8s} {name:15s} {line}")
    result = fidelity.score(a.dir, predictions["plain"], a.seed)
    for name, means in (("held-out groups", result["held_out_mean"]), ("all test groups", result["mean"])):
        if means is None:
            continue
        for baseline in ("shift", "nearest", "ctrl"):
            if not np.isnan(means[f"{baseline}_all"]):
                line = " / ".join(f"{means[f'{baseline}_{k}']:.3f}" for k in ("all", "deg", "change"))
                print(f"  baseline {baseline:8s} {name:15s} {line}")


if __name__ == "__main__":
    main()
