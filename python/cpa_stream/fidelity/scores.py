"""Scoring: both tools' predicted group means against the test cells, with `evaluate`'s metric
definitions (`cpa_stream.metrics`: R2, Pearson's r, the transfer between covariate values) and the
baselines built from training cells."""

from __future__ import annotations

import os
import sys

from .. import metrics
from .data import N_TOP_DEG, SPLIT, covariate_keys, group_keys, log_values, read_meta


def r2(t, p):
    """R2 of the prediction `p` against the truth `t` over genes: `evaluate`'s `r2_score`."""
    return metrics.r2_score(t, p)


def train_shift(values, train, ctrl, condition, cov, p, c):
    """Condition p's mean shift from the controls among covariate value c's training cells, or
    None where c has no training cell of p or no training control: the parts of the baselines."""
    treated, controls = train & (condition == p) & (cov == c), train & ctrl & (cov == c)
    if not treated.any() or not controls.any():
        return None
    return values[treated].mean(0) - values[controls].mean(0)


def change_reproducibility(directory, meta, halvings=20):
    """Per test group: the Pearson correlation over genes of its change in one half of its test
    cells from one half of its covariates' control cells (every split) with its change in the
    other halves, the mean over `halvings` random halvings (a fixed generator): `evaluate`'s
    change_reproducibility, which takes one fixed halving. Near 0 the group's change is noise at
    this many cells, and no score of it tells predictions apart."""
    import anndata
    import numpy as np

    adata = anndata.read_h5ad(os.path.join(directory, "data.h5ad"))
    obs = adata.obs
    values = log_values(adata.X, meta["counts"])
    group, cov = group_keys(obs, meta), covariate_keys(obs, meta)
    ctrl = obs[meta["perturbation_key"]].astype(str).values == meta["control"]
    test = obs[SPLIT].astype(str).values == "test"
    rng = np.random.default_rng(0)
    out = {}
    for g in np.unique(group[test & ~ctrl]):
        cells = np.where(test & (group == g))[0]
        controls = np.where(ctrl & (cov == cov[cells[0]]))[0]
        if len(cells) < 4 or len(controls) < 4:
            continue
        rs = []
        for _ in range(halvings):
            c, k = rng.permutation(cells), rng.permutation(controls)
            (c1, c2), (k1, k2) = np.array_split(c, 2), np.array_split(k, 2)
            first = values[c1].mean(0) - values[k1].mean(0)
            second = values[c2].mean(0) - values[k2].mean(0)
            r = metrics.pearson(first, second)
            if np.isfinite(r):
                rs.append(r)
        if rs:
            out[g] = float(np.mean(rs))
    return out


def score(directory, predictions, seed):
    """Per-group and mean R2 of `predictions` ({group: {"cf": mean, "recon": mean}}) and of the
    control-mean baseline, with run_peer.py's definitions."""
    import anndata
    import numpy as np

    meta = read_meta(directory)
    adata = anndata.read_h5ad(os.path.join(directory, "data.h5ad"))
    obs = adata.obs
    values = log_values(adata.X, meta["counts"])
    group = group_keys(obs, meta)
    cov = covariate_keys(obs, meta)
    ctrl = obs[meta["perturbation_key"]].astype(str).values == meta["control"]
    test = obs[SPLIT].astype(str).values == "test"
    train = obs[SPLIT].astype(str).values == "train"
    condition = obs[meta["perturbation_key"]].astype(str).values

    def shift(p, c):
        return train_shift(values, train, ctrl, condition, cov, p, c)

    rows = []
    for g in np.unique(group[test & ~ctrl]):
        m = test & (group == g)
        if m.sum() < meta.get("min_test_cells", 2):
            continue
        c = cov[np.argmax(m)]
        cmean = values[ctrl & (cov == c)].mean(0)
        tmean = values[m].mean(0)
        deg = np.argsort(-np.abs(values[group == g].mean(0) - cmean))[:N_TOP_DEG]
        p = condition[np.argmax(m)]
        held_names = meta.get("held_out_conditions", [])
        held = p in held_names or f"{c}|{p}" in held_names
        row = {"group": g, "n_test": int(m.sum()), "held_out": held}
        # The baselines, from training cells only: the condition's mean shift in the other
        # covariate values (the unseen cell type's) pooled or the nearest value's alone, and a
        # combination's parts' shifts summed.
        shifts = {o: s for o, s in ((o, shift(p, o)) for o in np.unique(cov) if o != c) if s is not None}
        others = list(shifts.values())
        parts = [shift(q, c) for q in p.split("+")] if "+" in p else []
        # The nearest covariate value: the one whose training controls' mean lies closest
        # (Euclidean, the scored space) to this value's control mean; its shift alone.
        distance = {o: float(np.linalg.norm(values[train & ctrl & (cov == o)].mean(0) - cmean)) for o in shifts}
        nearest = min(distance, key=distance.get) if distance else None
        baselines = {
            "shift": cmean + np.mean(others, axis=0) if others else None,
            "nearest": cmean + shifts[nearest] if nearest is not None else None,
            "additive": cmean + np.sum(parts, axis=0) if parts and all(q is not None for q in parts) else None,
        }
        row["nearest_value"] = nearest
        for name, pred in baselines.items():
            for kind in ("all", "deg", "change"):
                row[f"{name}_{kind}"] = float("nan")
            if pred is not None:
                row[f"{name}_all"] = r2(tmean, pred)
                row[f"{name}_deg"] = r2(tmean[deg], pred[deg])
                row[f"{name}_change"] = r2(tmean - cmean, pred - cmean)
        for name, pred in (("cf", predictions[g]["cf"]), ("recon", predictions[g]["recon"]), ("ctrl", cmean)):
            row[f"{name}_all"] = r2(tmean, pred)
            row[f"{name}_deg"] = r2(tmean[deg], pred[deg])
            row[f"{name}_change"] = r2(tmean - cmean, pred - cmean)
        rows.append(row)
    if not rows:
        raise SystemExit(f"fidelity: {directory}: no perturbed group has {meta.get('min_test_cells', 2)} test cells")
    keys = [k for k in rows[0] if k not in ("group", "n_test", "held_out", "nearest_value")]

    def mean_of(rs, k):
        xs = [r[k] for r in rs if not np.isnan(r[k])]
        return float(np.mean(xs)) if xs else float("nan")

    means = {k: mean_of(rows, k) for k in keys}
    held = [r for r in rows if r["held_out"]]
    held_means = {k: mean_of(held, k) for k in keys} if held else None
    return {"mean": means, "held_out_mean": held_means, "groups": rows}


def slopes(a):
    """How much of the real change each prediction recovers on a covariate value's test groups:
    per group (condition, dose) the slope of the predicted change from the control mean regressed
    on the real change over the group's top-20 DEGs (`score`'s DEGs; 1 recovers it, 0 predicts
    none), and the top-20 DEG R2, for the model's anchored prediction (`predict --anchored
    --aggregate mean` of the value's control cells, through the Python package) and for the
    shift baseline (`score`'s: the condition's mean shift in the other covariate values)."""
    import anndata
    import numpy as np
    import cpa_stream

    meta = read_meta(a.dir)
    adata = anndata.read_h5ad(os.path.join(a.dir, "data.h5ad"))
    obs = adata.obs
    values = log_values(adata.X, meta["counts"])
    cov = covariate_keys(obs, meta)
    group = group_keys(obs, meta)
    ctrl = obs[meta["perturbation_key"]].astype(str).values == meta["control"]
    split = obs[SPLIT].astype(str).values
    condition = obs[meta["perturbation_key"]].astype(str).values
    dose = obs[meta["dose_key"]].astype(str).values if meta["dose_key"] else np.array(["1.0"] * len(obs))
    c = a.covariate or meta.get("heldout_value")
    if c is None or not (cov == c).any():
        sys.exit(f"fidelity: slopes: covariate value {c!r} not among {sorted(set(cov))} (--covariate)")
    groups = [g for g in np.unique(group[(split == "test") & ~ctrl & (cov == c)])
              if ((split == "test") & (group == g)).sum() >= meta.get("min_test_cells", 2)]
    first = {g: np.argmax(group == g) for g in groups}
    targets = []
    for g in groups:
        t = {meta["perturbation_key"]: condition[first[g]]}
        if meta["dose_key"]:
            t[meta["dose_key"]] = dose[first[g]]
        t.update({k: v for k, v in zip(meta["covariates"], c.split("|"))})
        targets.append(t)
    source = " and ".join([f'{meta["perturbation_key"]} == "{meta["control"]}"']
                          + [f'{k} == "{v}"' for k, v in zip(meta["covariates"], c.split("|"))])
    run = os.path.join(a.dir, "results", f"{a.variant}-e{a.epochs}-s{a.seed}", "run")
    reader = cpa_stream.Run(run).predict(os.path.join(a.dir, "data.store"), source=source, targets=targets,
                                         anchored=True, aggregate="mean", threads=1, workers=1)
    table = reader.read_all()
    labels = [table.column(k).to_pylist() for k in targets[0]]
    anchored = {tuple(str(v[i]) for v in labels): np.asarray(table.column("anchored")[i].as_py())
                for i in range(table.num_rows)}
    cmean = values[ctrl & (cov == c)].mean(0)

    def slope(pred, real):
        return float((pred @ real) / (real @ real))

    print(f"{a.dir}: {a.variant}, {a.epochs} epochs, seed {a.seed}; covariate value {c}; top-{N_TOP_DEG} DEGs")
    print(f"{'condition':>14} {'dose':>6} {'cells':>5}  slope model / shift   R2 model / shift")
    rows = []
    for g, t in zip(groups, targets):
        p = condition[first[g]]
        m = (split == "test") & (group == g)
        tmean = values[m].mean(0)
        deg = np.argsort(-np.abs(values[group == g].mean(0) - cmean))[:N_TOP_DEG]
        others = [x for x in (train_shift(values, split == "train", ctrl, condition, cov, p, o)
                              for o in np.unique(cov) if o != c) if x is not None]
        model = anchored[tuple(str(v) for v in t.values())]
        real = (tmean - cmean)[deg]
        row = [slope((model - cmean)[deg], real), r2(tmean[deg], model[deg])]
        row += [slope(np.mean(others, 0)[deg], real), r2(tmean[deg], (cmean + np.mean(others, 0))[deg])] \
            if others else [float("nan")] * 2
        rows.append(row)
        print(f"{p:>14} {dose[first[g]]:>6} {int(m.sum()):>5}  {row[0]:11.2f} / {row[2]:5.2f}   {row[1]:8.3f} / {row[3]:5.3f}")
    mean = np.nanmean(np.array(rows), axis=0)
    print(f"{'mean':>14} {'':>6} {'':>5}  {mean[0]:11.2f} / {mean[2]:5.2f}   {mean[1]:8.3f} / {mean[3]:5.3f}")
    keys = ("model_slope", "model_deg", "shift_slope", "shift_deg")
    return {g: dict(zip(keys, row)) for g, row in zip(groups, rows)}


def transfer_slope(values, train, ctrl, condition, cov, held, dose=None):
    """`evaluate`'s transfer slope (`cpa_stream.metrics.transfer`) of the training cells outside
    the covariate value `held`: each (condition, dose)'s training shift in one covariate value
    regressed through the origin on the mean of its shifts in the other values, pooled over
    conditions, values and genes: how much of the other values' shift carries over. Doses are
    told apart as `evaluate` tells them (`dose`: one label per cell; None: one dose). None where
    no condition has training shifts in two values."""
    import numpy as np

    label = condition if dose is None else np.char.add(np.char.add(condition.astype(str), "|"), dose.astype(str))
    values_seen = [o for o in np.unique(cov) if o != held]
    shifts = [(p, o, s) for p in np.unique(label[train & ~ctrl]) for o in values_seen
              if (s := train_shift(values, train, ctrl, label, cov, p, o)) is not None]
    measured = metrics.transfer(shifts)
    if measured is None or not np.isfinite(measured["slope"]):
        return None
    return measured["slope"]


def calibrated(a):
    """The shift baseline scaled by the transfer slope (`transfer_slope`) on each split's
    held-out covariate value: its test groups' mean R2 (all genes / top-20 DEGs) beside the shift
    baseline's and the control mean's, with `score`'s definitions. Beside them, the generic
    shift: the held-out value's control mean plus the mean of every condition's training shift in
    the other values, whatever the perturbation (a response common to all perturbations, the
    most a value could inherit where no perturbation's own effect carries over)."""
    import anndata
    import numpy as np

    out = {}
    for directory in a.dirs:
        meta = read_meta(directory)
        held = meta.get("heldout_value")
        if held is None:
            sys.exit(f"fidelity: calibrated: {directory} is not a celltype split (its meta.json has no heldout_value)")
        adata = anndata.read_h5ad(os.path.join(directory, "data.h5ad"))
        obs = adata.obs
        values = log_values(adata.X, meta["counts"])
        cov, group = covariate_keys(obs, meta), group_keys(obs, meta)
        condition = obs[meta["perturbation_key"]].astype(str).values
        ctrl = condition == meta["control"]
        split = obs[SPLIT].astype(str).values
        train, test = split == "train", split == "test"
        dose = obs[meta["dose_key"]].astype(str).values if meta["dose_key"] else None
        beta = transfer_slope(values, train, ctrl, condition, cov, held, dose)
        if beta is None:
            out[directory] = {"beta": None}
            print(f"{directory}: held out {held}: no condition has training shifts in two other covariate "
                  "values, no transfer slope")
            continue
        generic = [s for o in np.unique(cov) if o != held for p in np.unique(condition[train & ~ctrl & (cov == o)])
                   if (s := train_shift(values, train, ctrl, condition, cov, p, o)) is not None]
        generic = np.mean(generic, axis=0)
        scores = {"shift": [], "calibrated": [], "generic": [], "control": []}
        for g in np.unique(group[test & ~ctrl & (cov == held)]):
            m = test & (group == g)
            if m.sum() < meta.get("min_test_cells", 2):
                continue
            p = condition[np.argmax(m)]
            others = [s for o in np.unique(cov) if o != held
                      if (s := train_shift(values, train, ctrl, condition, cov, p, o)) is not None]
            if not others:
                continue
            cmean, tmean = values[ctrl & (cov == held)].mean(0), values[m].mean(0)
            deg = np.argsort(-np.abs(values[group == g].mean(0) - cmean))[:N_TOP_DEG]
            shift = np.mean(others, axis=0)
            for name, pred in (("shift", cmean + shift), ("calibrated", cmean + beta * shift),
                               ("generic", cmean + generic), ("control", cmean)):
                scores[name].append((r2(tmean, pred), r2(tmean[deg], pred[deg])))
        if not scores["shift"]:
            sys.exit(f"fidelity: calibrated: {directory}: no test group of {held} has a training shift "
                     "in two other covariate values")
        means = {k: tuple(float(x) for x in np.mean(v, axis=0)) for k, v in scores.items()}
        out[directory] = {"beta": beta, "groups": len(scores["shift"]), **means}
        print(f"{directory}: held out {held}, transfer slope {beta:.3f}, {len(scores['shift'])} groups; "
              + ", ".join(f"{k} {v[0]:.3f} / {v[1]:.3f}" for k, v in means.items()))
    return out
