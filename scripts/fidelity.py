#!/usr/bin/env python3
"""The fidelity harness's Python side: cpa-stream and cpa-tools trained on the same cells with the
same hyper-parameters, scored by one definition. `scripts/fidelity.sh` drives it; each step can
also be run by hand.

  prepare  H5AD DIR [--split random|combos|celltype] [--heldout-value V]
                                              one split column (`fidelity_split`) written into
           DIR/data.h5ad (imported into DIR/data.store on first use); DIR/meta.json the keys.
           `celltype`: one covariate value's perturbed cells of every condition another value
           also has are test cells, none of them trained on (the unseen cell type task); the
           value is V, else the one with most such cells
  peer     DIR --epochs E --seed S            cpa-tools via ../shared/peer/cpa-tools/run_peer.py
                                              (through peer_anchor.py: also cpa-tools-delta, the
                                              anchored prediction)
  stream   DIR --epochs E --seed S --variant V [--set KEY=VALUE ...]
                                              cpa-stream with the translated configuration
  rescore  DIR [--variants V,...]              finished cpa-stream runs scored again with the
           [--space expected|mean]            expected log1p of the predicted NB (VARIANT-elog),
           [--controls drawn|all] [--anchor]  every control cell (-allctrl), anchored on the
                                              observed controls (-delta)
  draws    DIR --epochs E [--variant V] [--against cpa-tools]
                                              each seed's model scored with every seed's
                                              control-cell draws: the spread over seeds split
                                              into the training's part and the draws' part
  table    DIR                                 means and spreads over seeds, as Markdown
  slopes   DIR --variant V --epochs E --seed S [--covariate C]
                                              per test group of covariate value C (default the
                                              held-out one): how much of the real change on the
                                              top-20 DEGs the anchored prediction and the shift
                                              baseline recover (slope), and their R2
  calibrated DIR [DIR ...]                    per celltype split: the transfer slope (a
                                              condition's training shift in one covariate value
                                              regressed on its mean shift in the others) and the
                                              shift baseline scaled by it, beside the shift
                                              baseline and the control mean

Scoring (`score`, the definitions of run_peer.py, applied to both tools' predicted group means):
the test cells of each perturbed group (covariates | condition | dose, at least 2 test cells);
counterfactual predictions decode, for each test cell, a control cell of the same covariates
drawn with numpy's `default_rng(seed)` in test-cell order (run_peer.py's draws, so both tools
decode the same cells); recon decodes each test cell itself. Means of log1p values (count
models). R2 is sklearn's (1 - SS_res / SS_tot over genes) of the true test-cell mean against the
predicted mean over all genes (`all`), over the 20 genes with the largest |group mean - control
mean| over all the group's cells (`deg`), and of the change vs the control mean of the
covariates (`change`, all genes). The control-mean baseline predicts the control mean itself.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "peer", "cpa-tools"))
SPLIT = "fidelity_split"
N_TOP_DEG = 20
# `evaluate`'s threshold: a change reproducing under this is noise (engine NOISE_REPRODUCIBILITY).
NOISE_REPRODUCIBILITY = 0.1


# ----------------------------------------------------------------------------------------- data


def read_meta(directory):
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


def group_keys(obs, meta):
    """Group label per cell, spelled as run_peer.py spells it: `cov1|...|condition|dose`."""
    import pandas as pd

    covs = meta["covariates"]
    dose = obs[meta["dose_key"]].astype(str) if meta["dose_key"] else pd.Series("1.0", index=obs.index)
    parts = [obs[c].astype(str) for c in covs] + [obs[meta["perturbation_key"]].astype(str), dose]
    out = parts[0]
    for p in parts[1:]:
        out = out + "|" + p
    return out.values


def covariate_keys(obs, meta):
    import numpy as np

    covs = meta["covariates"]
    if not covs:
        return np.array([""] * len(obs))
    return obs[covs].astype(str).agg("|".join, axis=1).values


def log_values(matrix, counts):
    import numpy as np
    import scipy.sparse as sp

    m = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    m = m.astype(np.float64)
    return np.log1p(np.clip(m, 0, None)) if counts else m


def prepare(a):
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    os.makedirs(a.dir, exist_ok=True)
    adata = anndata.read_h5ad(a.h5ad)
    subset = None
    if a.subset:
        key, _, value = a.subset.partition("=")
        if key not in adata.obs:
            sys.exit(f"fidelity: {a.h5ad}: --subset {a.subset}: obs has no column {key!r} "
                     f"(columns: {', '.join(adata.obs.columns)})")
        keep = adata.obs[key].astype(str).values == value
        if not keep.any():
            sys.exit(f"fidelity: {a.h5ad}: --subset {a.subset}: no cell has it (values: "
                     f"{', '.join(sorted(adata.obs[key].astype(str).unique()))})")
        adata = adata[keep].copy()
        for c in adata.obs.columns:
            if hasattr(adata.obs[c], "cat"):
                adata.obs[c] = adata.obs[c].cat.remove_unused_categories()
        subset = a.subset
    covs = [c for c in a.covariates.split(",") if c]
    # Counts unless told or unless the values are not whole numbers (log2 expression, z-scores):
    # those are modelled with a Gaussian likelihood.
    x = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    whole = bool(np.all(np.mod(x[: 1_000_000], 1) == 0)) and bool(np.all(x[: 1_000_000] >= 0))
    meta = {
        "source": os.path.abspath(a.h5ad), "subset": subset, "split": a.split, "split_seed": a.seed,
        "perturbation_key": a.perturbation_key, "dose_key": a.dose_key, "control": a.control,
        "covariates": covs, "max_comb_len": a.max_comb_len, "counts": not a.not_counts and whole,
        "n_obs": int(adata.n_obs), "n_vars": int(adata.n_vars),
        # Groups scored need this many test cells: 2 for cells (run_peer.py's rule); 1 for bulk
        # samples, whose groups (a compound at a dose) are one well each.
        "min_test_cells": 1 if a.split == "doses" else 2,
    }
    for key in [a.perturbation_key, a.dose_key, *covs]:
        if key and key not in adata.obs:
            sys.exit(f"fidelity: {a.h5ad}: obs has no column {key!r} (columns: {', '.join(adata.obs.columns)})")
    group = group_keys(adata.obs, meta)
    condition = adata.obs[a.perturbation_key].astype(str).values
    rng = np.random.default_rng(a.seed)
    split = np.empty(adata.n_obs, dtype=object)
    held = set()
    unseen = None
    if a.split == "celltype":
        if not covs:
            sys.exit(f"fidelity: {a.h5ad}: --split celltype needs a covariate (--covariates)")
        cov = covariate_keys(adata.obs, meta)
        perturbed = condition != a.control
        shared = {}
        for value in np.unique(cov):
            elsewhere = set(condition[perturbed & (cov != value)])
            mine = perturbed & (cov == value) & np.isin(condition, list(elsewhere))
            shared[value] = int(mine.sum())
        unseen = a.heldout_value if a.heldout_value is not None else max(sorted(shared), key=lambda v: shared[v])
        if unseen not in shared or shared[unseen] == 0:
            sys.exit(f"fidelity: {a.h5ad}: --heldout-value {unseen!r}: no perturbed cells of a condition other "
                     f"values have (cells per value: {shared})")
        elsewhere = set(condition[perturbed & (cov != unseen)])
        held_cells = perturbed & (cov == unseen) & np.isin(condition, list(elsewhere))
        held = {f"{unseen}|{c}" for c in np.unique(condition[held_cells])}
        meta["heldout_value"] = unseen
    if a.split == "combos":
        # Combinations held out as a group: every cell of a condition with more than one part is
        # a test cell; the rest is split 80/10/10 per group as in `random`.
        held = {c for c in np.unique(condition) if "+" in c}
        if not held:
            sys.exit(f"fidelity: {a.h5ad}: --split combos needs conditions with '+' (none found)")
    cov_of = covariate_keys(adata.obs, meta)
    dose_role = {}
    if a.split == "doses":
        # Dose interpolation: of each perturbation's doses (in every covariate value), the second
        # and the second-largest are test, the middle one valid, the rest (lowest, largest, and
        # any others) train; a perturbation with fewer than 4 doses trains on all of them.
        if not a.dose_key:
            sys.exit(f"fidelity: {a.h5ad}: --split doses needs a dose column (--dose-key)")
        doses = adata.obs[a.dose_key].astype(str).values
        for p in np.unique(condition[condition != a.control]):
            levels = sorted(set(doses[condition == p]), key=float)
            if len(levels) < 4:
                continue
            dose_role[(p, levels[1])] = dose_role[(p, levels[-2])] = "test"
            dose_role[(p, levels[len(levels) // 2])] = "valid"
        if not dose_role:
            sys.exit(f"fidelity: {a.h5ad}: --split doses needs perturbations with 4 or more doses (none found)")
    for g in np.unique(group):
        idx = np.where(group == g)[0]
        if condition[idx[0]] in held or f"{cov_of[idx[0]]}|{condition[idx[0]]}" in held:
            split[idx] = "test"
            continue
        if a.split == "doses" and condition[idx[0]] != a.control:
            split[idx] = dose_role.get((condition[idx[0]], str(adata.obs[a.dose_key].iloc[idx[0]])), "train")
            continue
        rng.shuffle(idx)
        n = len(idx)
        n_te = max(1, int(round(0.1 * n))) if n >= 3 else 0
        n_va = max(1, int(round(0.1 * n))) if n >= 3 else 0
        split[idx[:n_te]] = "test"
        split[idx[n_te:n_te + n_va]] = "valid"
        split[idx[n_te + n_va:]] = "train"
    adata.obs[SPLIT] = pd.Categorical(split, categories=["train", "valid", "test"])
    meta["held_out_conditions"] = sorted(held)
    meta["cells"] = {s: int((split == s).sum()) for s in ["train", "valid", "test"]}
    path = os.path.join(a.dir, "data.h5ad")
    adata.write_h5ad(path)
    with open(os.path.join(a.dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"fidelity: {path}: {adata.n_obs} cells x {adata.n_vars} genes, split {meta['cells']}"
          + (f", held out: {len(held)} {'groups of ' + str(unseen) if unseen is not None else 'combinations'}" if held else ""))


def binary():
    path = os.environ.get("CPA_STREAM_BIN")
    if not path:
        sys.exit("fidelity: CPA_STREAM_BIN is not set (scripts/fidelity.sh sets it)")
    return path


# ------------------------------------------------------------------------------- translation


def peer_defaults():
    """run_peer.py's hyper-parameters (the Kang tutorial's with short warm-ups), read from the
    script itself so that a change there carries over."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_peer", os.path.join(PEER, "run_peer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, plan = dict(module.KANG_MODEL_PARAMS), dict(module.KANG_PLAN_PARAMS)
    plan["n_epochs_pretrain_ae"], plan["n_epochs_adv_warmup"] = 2, 5  # run_peer.py's CLI defaults
    return model, plan


def translate(model, plan, *, batch_size, check_val_every, max_comb_len, epochs, seed):
    """cpa-tools' model and plan parameters as a cpa-stream configuration: the package's one
    translation (`cpa_stream.translate`, the one `cpa_stream.compat` trains with), with
    run_peer.py's training arguments (no early stopping: both tools keep the weights of their best
    validation over every epoch). Returns it with what the translation cannot express."""
    from cpa_stream import translate as t

    config = t.translate(model, plan, max_epochs=epochs, batch_size=batch_size,
                         check_val_every_n_epoch=check_val_every, early_stopping_patience=1_000_000)
    config["model"]["max_comb_len"] = max_comb_len
    config["training"]["seed"] = seed
    unexpressed = [f"{p.name}: {p.rule}" for p in t.PARAMETERS if p.status == "differs"] + list(t.DIFFERENCES)
    return config, unexpressed


def toml_text(config):
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    lines = []
    for table, keys in config.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in keys.items()]
        lines.append("")
    return "\n".join(lines)


def set_key(config, assignment):
    key, _, raw = assignment.partition("=")
    table, _, name = key.partition(".")
    # The configuration's tables; one the starting configuration leaves out (`--defaults` sets
    # only model and training keys) is added.
    tables = ("model", "adversary", "training")
    if not name or table not in tables:
        sys.exit(f"fidelity: --set {assignment!r}: expected TABLE.KEY=VALUE with TABLE one of {list(tables)}")
    try:
        v = json.loads(raw)
    except json.JSONDecodeError:
        v = raw
    config.setdefault(table, {})[name] = v


# ---------------------------------------------------------------------------------- scoring


def cf_draws(obs, meta, test_idx, seed):
    """The control cell each test cell is decoded from: run_peer.py's draws (same rng, order)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ctrl = obs[meta["perturbation_key"]].astype(str).values == meta["control"]
    cov = covariate_keys(obs, meta)
    src = np.empty(len(test_idx), dtype=int)
    for i, ci in enumerate(test_idx):
        pool = np.where(ctrl & (cov == cov[ci]))[0]
        if len(pool) == 0:
            pool = np.where(ctrl)[0]
        src[i] = rng.choice(pool)
    return src


def r2(t, p):
    import numpy as np

    ss_res = float(((t - p) ** 2).sum())
    ss_tot = float(((t - t.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


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
            if first.std() > 0 and second.std() > 0:
                rs.append(np.corrcoef(first, second)[0, 1])
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


# --------------------------------------------------------------------------------- the tools


def peer(a):
    """cpa-tools through run_peer.py, its group means re-scored here."""
    import numpy as np

    meta = read_meta(a.dir)
    python = os.environ.get("CPA_PEER_PYTHON")
    if not python or not os.path.exists(python):
        sys.exit("fidelity: CPA_PEER_PYTHON is not set or missing (cpa-tools' venv)")
    out = os.path.join(a.dir, "results", f"cpa-tools-e{a.epochs}-s{a.seed}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump({"seed": a.seed}, f)
    command = [
        python, os.path.join(HERE, "peer_anchor.py"), os.path.join(out, "own.npz"), os.path.join(a.dir, "data.h5ad"),
        "--perturbation-key", meta["perturbation_key"], "--control-group", meta["control"],
        "--covariate-keys", ",".join(meta["covariates"]), "--max-comb-len", str(meta["max_comb_len"]),
        "--split-key", SPLIT, "--epochs", str(a.epochs), "--seed", str(a.seed),
        "--check-val-every", str(min(a.check_val_every, a.epochs)), "--threads", "1",
        "--model-json", os.path.join(out, "model.json"),
        "--json", os.path.join(out, "report.json"), "--save-pred", os.path.join(out, "groups.npz"),
    ]
    if meta["dose_key"]:
        command += ["--dose-key", meta["dose_key"]]
    if not meta["counts"]:
        command += ["--not-counts"]
    with open(os.path.join(out, "log.txt"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    report = json.load(open(os.path.join(out, "report.json")))
    saved = np.load(os.path.join(out, "groups.npz"), allow_pickle=False)
    predictions = {str(g): {"cf": cf, "recon": rc} for g, cf, rc in
                   zip(saved["groups"], saved["pred_cf"], saved["pred_recon"])}
    # Anchored (`cpa-tools-delta`, as `rescore --space mean --anchor` for cpa-stream): the observed
    # control mean of the covariates plus the predicted change of the drawn control cells (their
    # counterfactual minus the same cells decoded under their own condition, peer_anchor.py).
    own = np.load(os.path.join(out, "own.npz"), allow_pickle=False)
    observed = control_means(a.dir, meta)
    anchored = {g: {"cf": observed[group_covariates(g, meta)] + p["cf"] - o, "recon": p["recon"]}
                for (g, p), o in zip(predictions.items(), own["pred_own"])}
    for variant, preds in (("cpa-tools", predictions), ("cpa-tools-delta", anchored)):
        result = score(a.dir, preds, a.seed)
        result.update({
            "tool": "cpa-tools", "variant": variant, "epochs": a.epochs, "seed": a.seed,
            "train_cpu_s": report["train_cpu_s"], "train_wall_s": report["time_train_total_s"],
            "peak_rss_mib": report["peak_rss_mib"], "loadavg": [report["loadavg_start"][0], report["loadavg_end"][0]],
            "peer_r2": report["r2_perturbed_mean"],
        })
        target = out if variant == "cpa-tools" else os.path.join(a.dir, "results", f"{variant}-e{a.epochs}-s{a.seed}")
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "score.json"), "w") as f:
            json.dump(result, f, indent=1)
        print_result(result)


def control_means(directory, meta):
    """Mean log1p (or plain) expression of every control cell, per covariates label."""
    import anndata
    import numpy as np

    adata = anndata.read_h5ad(os.path.join(directory, "data.h5ad"))
    values = log_values(adata.X, meta["counts"])
    cov = covariate_keys(adata.obs, meta)
    ctrl = adata.obs[meta["perturbation_key"]].astype(str).values == meta["control"]
    return {c: values[ctrl & (cov == c)].mean(0) for c in np.unique(cov[ctrl])}


def group_covariates(group, meta):
    """The covariates label of a group label (`cov1|...|condition|dose`)."""
    return "|".join(group.split("|")[: len(meta["covariates"])])


def stream(a):
    """cpa-stream: the translated configuration (plus --set), trained through the CLI, predicted
    through the Python package."""
    import cpa_stream

    meta = read_meta(a.dir)
    model, plan = peer_defaults()
    # Both tools validate within the run: cpa-tools ignores the validation of epoch 0 and, without
    # a later one, restores its untrained weights (run_peer.py's note).
    config, _ = translate(model, plan, batch_size=128, check_val_every=min(a.check_val_every, a.epochs),
                          max_comb_len=meta["max_comb_len"], epochs=a.epochs, seed=a.seed)
    if a.defaults:
        # cpa-stream's own defaults: only what the harness fixes for every run.
        config = {
            "model": {"max_comb_len": meta["max_comb_len"]},
            "training": {k: config["training"][k] for k in
                         ("max_epochs", "check_val_every_n_epoch", "early_stopping_patience", "seed")},
        }
    if not meta["counts"]:
        config["model"]["recon_loss"] = "gauss"
    for assignment in a.set or []:
        set_key(config, assignment)
    out = os.path.join(a.dir, "results", f"{a.variant}-e{a.epochs}-s{a.seed}")
    os.makedirs(out, exist_ok=True)
    toml = os.path.join(out, "cpa.toml")
    with open(toml, "w") as f:
        f.write(toml_text(config))
    store = os.path.join(a.dir, "data.store")
    if not os.path.isdir(store):
        subprocess.run([binary(), "import", os.path.join(a.dir, "data.h5ad"), "--out", store, "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
    run = os.path.join(out, "run")
    command = [
        binary(), "train", "--store", os.path.join(a.dir, "data.store"),
        "--perturbation-key", meta["perturbation_key"], "--control", meta["control"],
        "--split-key", SPLIT, "--config", toml, "--out", run, "--overwrite",
        "--threads", "1", "--workers", "1",
    ]
    if meta["dose_key"]:
        command += ["--dose-key", meta["dose_key"]]
    if meta["covariates"]:
        command += ["--covariates", ",".join(meta["covariates"])]
    if a.preset:
        command += ["--preset", a.preset]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(os.path.join(out, "log.txt"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "CPA_STREAM_LOG": "warn"})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    history = cpa_stream.Run(run).history
    weights = [(a.variant, run)]
    if a.also_last:
        # The same training's last-epoch weights (checkpoint/) beside the best-scoring ones.
        weights.append((f"{a.variant}-last", os.path.join(run, "checkpoint")))
    for variant, path in weights:
        predictions = predict_groups(a.dir, meta, path, a.seed)
        result = score(a.dir, predictions, a.seed)
        result.update({
            "tool": "cpa-stream", "variant": variant, "epochs": a.epochs, "seed": a.seed,
            "set": (["cpa-stream's defaults, not the translation"] if a.defaults else []) + (a.set or []),
            "preset": a.preset, "train_cpu_s": cpu, "train_wall_s": wall,
            "peak_rss_mib": after.ru_maxrss / 1024.0, "loadavg": [load0, os.getloadavg()[0]],
            "best_epoch": best_epoch(history),
        })
        target = os.path.join(a.dir, "results", f"{variant}-e{a.epochs}-s{a.seed}")
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "score.json"), "w") as f:
            json.dump(result, f, indent=1, default=float)
        print_result(result)
    if not a.keep_checkpoints:
        # A protocol makes hundreds of runs: their optimizer states and second copies of the
        # weights filled a shared disk once (35 GB). model/ is what the later commands read.
        for name in ("checkpoint", "best"):
            shutil.rmtree(os.path.join(run, name), ignore_errors=True)


def read_log_theta(model):
    """The NB inverse dispersion's log per gene, from a model directory's safetensors."""
    import struct

    import numpy as np

    path = os.path.join(model, "weights.safetensors")
    if not os.path.exists(path):
        path = os.path.join(model, "model", "weights.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        entry = header["ae.log_theta"]
        begin, end = entry["data_offsets"]
        f.seek(8 + n + begin)
        return np.frombuffer(f.read(end - begin), dtype=np.float32).astype(np.float64)


def expected_log1p_nb(mu, theta, nodes=48):
    """E[log(1 + X)] for X ~ NB(mean mu, inverse dispersion theta), elementwise. From
    log(1 + x) = int_0^inf (1 - e^(-t x)) e^(-t) / t dt and the NB's Laplace transform,
    E[log(1 + X)] = int_0^1 (1 - (1 + mu u / theta)^(-theta)) / (-log(1 - u)) du, integrated by
    Gauss-Legendre in log u over [1e-10, 1] (the rest contributes below mu * 1e-10). Matches a
    400,000-draw Monte Carlo to within its noise (<= 0.006) for theta 0.1-200, mu 0.01-1000."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(nodes)
    low = np.log(1e-10)
    u = np.exp((x + 1) / 2 * -low + low)
    weights = w * -low / 2 * u / -np.log1p(-np.minimum(u, 1 - 1e-16))
    mu = np.asarray(mu, dtype=np.float64)
    total = np.zeros(np.broadcast(mu, theta).shape)
    for uk, wk in zip(u, weights):
        total += wk * (1.0 - np.power(1.0 + mu * uk / theta, -theta))
    return total


def predict_groups(directory, meta, model, seed, space="mean", controls="drawn", anchor=False, ensemble=()):
    """Predicted group means of the test groups through the Python package: counterfactual
    (`cf`, run_peer.py's control draws) and reconstruction (`recon`). `space`: `mean` scores
    log1p of the predicted NB mean (both tools' tutorials); `expected` the expectation of log1p
    of the predicted NB counts (what the real side's mean of log1p counts estimates), by
    `expected_log1p_nb`. `controls`: `drawn` (run_peer.py's draws, one control
    cell per test cell) or `all` (every control cell of the covariates once: the expectation of
    the draw, and the cells the control-mean baseline averages). `anchor`: the model predicts
    the change only: each decoded control cell's prediction minus the same cell decoded under
    the control condition, averaged with the same weights and added to the observed control mean
    of the covariates (the baseline's prediction; its change is the model's alone). `ensemble`:
    further runs whose predictions cpa-stream averages with `model`'s (`predict --ensemble`);
    anchored, each cell's change is then read from the `anchored` column the ensemble writes
    (the mean of each model's log1p change, in the space it moves in) minus the cell's own
    observed values."""
    import anndata
    import numpy as np
    import cpa_stream

    adata = anndata.read_h5ad(os.path.join(directory, "data.h5ad"), backed=None if anchor else "r")
    obs = adata.obs
    group = group_keys(obs, meta)
    cov = covariate_keys(obs, meta)
    test_idx = np.where(obs[SPLIT].astype(str).values == "test")[0]
    src = cf_draws(obs, meta, test_idx, seed)
    cell_ids = np.asarray(obs.index)
    result_run = cpa_stream.Run(model)
    store = os.path.join(directory, "data.store")
    counts = meta["counts"]

    theta = np.exp(read_log_theta(model)) if space == "expected" else None
    if ensemble and space != "mean":
        sys.exit("fidelity: an ensemble is scored in the mean space (--space mean)")
    ensemble = [os.fspath(r) for r in ensemble]
    from_column = anchor and bool(ensemble)
    position = {cid: i for i, cid in enumerate(cell_ids)}

    def transform(rows):
        if not counts:
            return rows
        if theta is None:
            return np.log1p(np.clip(rows, 0, None))
        return expected_log1p_nb(np.clip(rows, 0, None), theta[None, :])

    # Counterfactual: per covariate value, every control cell of it decoded into each test group
    # of it; a group's mean weighs each control cell by how often run_peer.py's draws chose it.
    ctrl = obs[meta["perturbation_key"]].astype(str).values == meta["control"]
    predictions = {}
    for c in np.unique(cov[test_idx]):
        in_c = test_idx[cov[test_idx] == c]
        groups = [g for g in np.unique(group[in_c]) if not ctrl[in_c[np.argmax(group[in_c] == g)]]]
        if not groups:
            continue
        first = {g: in_c[np.argmax(group[in_c] == g)] for g in groups}
        targets = []
        for g in groups:
            row = obs.iloc[first[g]]
            t = {meta["perturbation_key"]: str(row[meta["perturbation_key"]])}
            if meta["dose_key"]:
                t[meta["dose_key"]] = str(row[meta["dose_key"]])
            for k in meta["covariates"]:
                t[k] = str(row[k])
            targets.append(t)
        values = [str(obs.iloc[in_c[0]][k]) for k in meta["covariates"]]
        source = " and ".join([f'{meta["perturbation_key"]} == "{meta["control"]}"']
                              + [f'{k} == "{v}"' for k, v in zip(meta["covariates"], values)])
        if not ctrl[cov == c].any():
            source = f'{meta["perturbation_key"]} == "{meta["control"]}"'
        reader = result_run.predict(store, source=source, targets=targets, ensemble=ensemble, anchored=from_column,
                                    threads=1, workers=1)
        if from_column:
            # The ensemble's change per cell: its anchored column minus the cell's observed values.
            members = np.where(ctrl & (cov == c))[0] if ctrl[cov == c].any() else np.where(ctrl)[0]
            observed = log_values(adata[members].X, counts).mean(0)
        elif anchor:
            # The same control cells under their own (control) condition, and their observed mean.
            own = {}
            for batch in result_run.predict(store, source=source, threads=1, workers=1):
                ids = batch.column("cell_id").to_pylist()
                means = np.asarray(batch.column("mean").flatten().to_numpy(zero_copy_only=False))
                means = transform(means.reshape(len(ids), -1).astype(np.float64))
                own.update(zip(ids, means))
            members = np.where(np.isin(cell_ids, list(own)))[0]
            observed = log_values(adata[members].X, counts).mean(0)
        sums = {g: None for g in groups}
        weight = {g: {} for g in groups}
        pool = cell_ids[ctrl & (cov == c)] if ctrl[cov == c].any() else cell_ids[ctrl]
        for g in groups:
            if controls == "all":
                weight[g] = {cid: 1 for cid in pool}
                continue
            members = np.where(group[test_idx] == g)[0]
            for s in src[members]:
                weight[g][cell_ids[s]] = weight[g].get(cell_ids[s], 0) + 1
        spell = {tuple(t.values()): g for t, g in zip(targets, groups)}
        label_columns = list(targets[0].keys())
        for batch in reader:
            ids = batch.column("cell_id").to_pylist()
            labels = [batch.column(k).to_pylist() for k in label_columns]
            if from_column:
                anchored = np.asarray(batch.column("anchored").flatten().to_numpy(zero_copy_only=False))
                rows = [position[cid] for cid in ids]
                means = anchored.reshape(len(ids), -1).astype(np.float64) - log_values(adata.X[rows], counts)
            else:
                means = np.asarray(batch.column("mean").flatten().to_numpy(zero_copy_only=False)).reshape(len(ids), -1)
                means = transform(means.astype(np.float64))
            for i, cid in enumerate(ids):
                key = tuple(str(v[i]) for v in labels)
                g = spell.get(key)
                if g is None:
                    raise SystemExit(f"fidelity: prediction labels {key} match no target of {list(spell)}")
                w = weight[g].get(cid, 0)
                if w:
                    sums[g] = means[i] * w if sums[g] is None else sums[g] + means[i] * w
        for g in groups:
            n = sum(weight[g].values())
            predictions[g] = {"cf": sums[g] / n}
            if from_column:
                predictions[g]["cf"] = observed + predictions[g]["cf"]
            elif anchor:
                decoded_control = sum(own[cid] * w for cid, w in weight[g].items()) / n
                predictions[g]["cf"] = observed + predictions[g]["cf"] - decoded_control

    # Reconstruction: the test cells under their own condition.
    reader = result_run.predict(store, source=f"{SPLIT} == test", ensemble=ensemble, threads=1, workers=1)
    recon_sum, recon_n = {}, {}
    for batch in reader:
        ids = batch.column("cell_id").to_pylist()
        means = transform(np.asarray(batch.column("mean").flatten().to_numpy(zero_copy_only=False))
                          .reshape(len(ids), -1).astype(np.float64))
        for i, cid in enumerate(ids):
            g = group[position[cid]]
            recon_sum[g] = means[i] if g not in recon_sum else recon_sum[g] + means[i]
            recon_n[g] = recon_n.get(g, 0) + 1
    for g in predictions:
        predictions[g]["recon"] = recon_sum[g] / recon_n[g]

    return predictions


def ensemble(a):
    """Scores ensembles of finished runs: the seeds `--seeds` taken `--size` at a time (disjoint
    groups, in the order given), each group's predictions averaged. cpa-stream's through
    `predict --ensemble` (the first seed's control-cell draws), as VARIANT-ensK[-delta];
    cpa-tools' (`--tool cpa-tools`) from each seed's saved group means (`groups.npz`, `own.npz`),
    averaged here, as cpa-tools-ensK and cpa-tools-ensK-delta. `--variant A+B` averages each seed's
    runs of the variants A and B (one ensemble per seed), as A+B-ens2[-delta]."""
    import numpy as np

    meta = read_meta(a.dir)
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = a.variant.split("+")
    if len(variants) > 1:
        # One seed's run of each variant: recipes averaged, seed by seed.
        if "cpa-tools" in variants:
            sys.exit("fidelity: ensemble: cpa-tools' saved means cannot be mixed with other variants")
        a.size = len(variants)
        groups = [[s] * len(variants) for s in seeds]
    else:
        groups = [seeds[i:i + a.size] for i in range(0, len(seeds) - a.size + 1, a.size)]
    if not groups or a.size < 2:
        sys.exit(f"fidelity: ensemble: --size {a.size} of {len(seeds)} seeds makes no ensemble of two or more")
    for group in groups:
        member_variants = variants if len(variants) > 1 else [a.variant] * len(group)
        dirs = [os.path.join(a.dir, "results", f"{v}-e{a.epochs}-s{s}") for v, s in zip(member_variants, group)]
        for d in dirs:
            if not os.path.exists(os.path.join(d, "score.json")):
                sys.exit(f"fidelity: ensemble: {d} has no finished run")
        members = [json.load(open(os.path.join(d, "score.json"))) for d in dirs]
        if a.variant == "cpa-tools":
            saved = [np.load(os.path.join(d, "groups.npz"), allow_pickle=False) for d in dirs]
            own = [np.load(os.path.join(d, "own.npz"), allow_pickle=False)["pred_own"] for d in dirs]
            names = [str(g) for g in saved[0]["groups"]]
            if any([str(g) for g in x["groups"]] != names for x in saved):
                sys.exit("fidelity: ensemble: the seeds' saved groups differ")
            observed = control_means(a.dir, meta)
            plain, anchored = {}, {}
            for i, g in enumerate(names):
                cf = np.mean([x["pred_cf"][i] for x in saved], axis=0)
                recon = np.mean([x["pred_recon"][i] for x in saved], axis=0)
                change = np.mean([x["pred_cf"][i] - o[i] for x, o in zip(saved, own)], axis=0)
                plain[g] = {"cf": cf, "recon": recon}
                anchored[g] = {"cf": observed[group_covariates(g, meta)] + change, "recon": recon}
            scored = [("", plain), ("-delta", anchored)]
        else:
            runs = [os.path.join(d, "run") for d in dirs]
            scored = [("-delta" if a.anchor else "",
                       predict_groups(a.dir, meta, runs[0], group[0], "mean", "drawn", a.anchor, ensemble=runs[1:]))]
        for suffix, predictions in scored:
            result = score(a.dir, predictions, group[0])
            result.update({
                "tool": members[0]["tool"], "variant": f"{a.variant}-ens{a.size}{suffix}", "epochs": a.epochs,
                "seed": group[0], "seeds": group, "train_cpu_s": sum(m["train_cpu_s"] for m in members),
            })
            target = os.path.join(a.dir, "results", f"{result['variant']}-e{a.epochs}-s{group[0]}")
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, "score.json"), "w") as f:
                json.dump(result, f, indent=1, default=float)
            print_result(result)


def rescore(a):
    """Scores finished cpa-stream runs again in the expected-log1p space (`expected`, see
    `predict_groups`), as VARIANT-elog: the same weights, the real side's space."""
    import glob

    meta = read_meta(a.dir)
    for path in sorted(glob.glob(os.path.join(a.dir, "results", "*", "score.json"))):
        r = json.load(open(path))
        run = os.path.join(os.path.dirname(path), "run")
        if r["tool"] != "cpa-stream" or not os.path.isdir(run) or r["variant"] not in a.variants.split(","):
            continue
        suffix = (("-elog" if a.space == "expected" else "") + ("-allctrl" if a.controls == "all" else "")
                  + ("-delta" if a.anchor else ""))
        if not suffix:
            sys.exit("fidelity: rescore --space mean --controls drawn without --anchor is the run's own score")
        target = os.path.join(a.dir, "results", f"{r['variant']}{suffix}-e{r['epochs']}-s{r['seed']}")
        if os.path.exists(os.path.join(target, "score.json")):
            continue
        predictions = predict_groups(a.dir, meta, run, r["seed"], a.space, a.controls, a.anchor)
        result = score(a.dir, predictions, r["seed"])
        result.update({k: r[k] for k in ("tool", "epochs", "seed", "set", "preset", "train_cpu_s", "train_wall_s",
                                         "peak_rss_mib", "loadavg", "best_epoch")})
        result["variant"] = f"{r['variant']}{suffix}"
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "score.json"), "w") as f:
            json.dump(result, f, indent=1, default=float)
        print_result(result)


DRAW_METRICS = ("cf_all", "cf_deg", "cf_change")


def draw_grid(directory, meta, variant, epochs, verbose=False):
    """Each seed's model of VARIANT at EPOCHS scored with every seed's control-cell draws: the
    seeds and a grid [model, draw, metric] of DRAW_METRICS. cpa-stream's kept runs are decoded
    again here; cpa-tools keeps no model, so its grid comes from the draws.npz that peer_anchor.py
    writes when the run was made with FIDELITY_DRAW_SEEDS."""
    import glob

    import numpy as np

    prefix = os.path.join(directory, "results", f"{variant}-e{epochs}-s")
    found = "draws.npz" if variant == "cpa-tools" else "run"
    runs = {int(path[len(prefix):].split(os.sep)[0]): os.path.dirname(path) if variant == "cpa-tools" else path
            for path in glob.glob(f"{prefix}*{os.sep}{found}")}
    if variant == "cpa-tools":
        saved = {s: np.load(os.path.join(d, "draws.npz"), allow_pickle=False) for s, d in runs.items()}
        shared = set(runs)
        for z in saved.values():
            shared &= {int(x) for x in z["seeds"]}
        runs = {s: d for s, d in runs.items() if s in shared}
    if len(runs) < 2:
        raise SystemExit(f"fidelity: {directory}: fewer than 2 runs of {variant} at {epochs} epochs with "
                         f"their {'draws (peer runs made with FIDELITY_DRAW_SEEDS)' if variant == 'cpa-tools' else 'model kept'}")
    seeds = sorted(runs)
    grid = np.empty((len(seeds), len(seeds), len(DRAW_METRICS)))
    for i, model in enumerate(seeds):
        if variant == "cpa-tools":
            z = saved[model]
            recon = np.load(os.path.join(runs[model], "groups.npz"), allow_pickle=False)["pred_recon"]
            column = {int(x): k for k, x in enumerate(z["seeds"])}
        for j, draw in enumerate(seeds):
            if variant == "cpa-tools":
                cf = z["pred_cf"][column[draw]]
                predictions = {str(g): {"cf": cf[k], "recon": recon[k]} for k, g in enumerate(z["groups"])}
                m = score(directory, predictions, draw)["mean"]
                grid[i, j] = [m[k] for k in DRAW_METRICS]
            else:
                # Decoding is the slow part; a kept run's scores under each draw are kept beside it.
                cache = os.path.join(os.path.dirname(runs[model]), "draws.json")
                known = json.load(open(cache)) if os.path.exists(cache) else {}
                if str(draw) not in known:
                    print(f"fidelity: {variant} model s{model}: decoding draws s{draw}", file=sys.stderr, flush=True)
                    m = score(directory, predict_groups(directory, meta, runs[model], draw), draw)["mean"]
                    known[str(draw)] = [m[k] for k in DRAW_METRICS]
                    with open(cache + ".tmp", "w") as f:
                        json.dump(known, f)
                    os.replace(cache + ".tmp", cache)
                grid[i, j] = known[str(draw)]
            if verbose:
                print(f"fidelity: {variant} model s{model} draws s{draw}: "
                      + " ".join(f"{k} {v:.3f}" for k, v in zip(DRAW_METRICS, grid[i, j])), flush=True)
        # The harness's own run (model seed = draw seed) must come out as it was scored then.
        kept = os.path.join(f"{prefix}{model}", "score.json")
        if os.path.exists(kept):
            then = json.load(open(kept))["mean"]
            off = max(abs(then[k] - grid[i, i, n]) for n, k in enumerate(DRAW_METRICS))
            if off > 1e-6:
                raise SystemExit(f"fidelity: {variant} s{model}: its own draws score {off:.2g} away from {kept}")
    return seeds, grid


def draws(a):
    """How much of the seeds' spread is the counterfactual draw: each seed's model of VARIANT at
    EPOCHS scored with every seed's draws of control cells. Prints the spread over models with the
    draws fixed, over draws with the model fixed, and of each model's score averaged over all the
    draws (the training's own spread, the draw lottery taken out); with --against, the same for
    that variant on the seeds both have, and the ratios of the spreads with 90% intervals."""
    import numpy as np

    meta = read_meta(a.dir)
    fmt = lambda v: " / ".join(f"{x:.3f}" for x in v)  # noqa: E731
    grids = {}
    for variant in [a.variant] + ([a.against] if a.against else []):
        grids[variant] = draw_grid(a.dir, meta, variant, a.epochs, a.verbose)
    if a.against:
        shared = sorted(set(grids[a.variant][0]) & set(grids[a.against][0]))
        for v, (seeds, grid) in grids.items():
            pick = [seeds.index(s) for s in shared]
            grids[v] = (shared, grid[np.ix_(pick, pick)])
    summary = {}
    for variant, (seeds, grid) in grids.items():
        same = grid[range(len(seeds)), range(len(seeds))]
        averaged = grid.mean(1)
        summary[variant] = {"harness": same.std(0, ddof=1), "averaged": averaged}
        print(f"fidelity: {variant} e{a.epochs}, {len(seeds)} seeds; {' / '.join(DRAW_METRICS)}")
        print(f"  model seed = draw seed (the harness): mean {fmt(same.mean(0))}, sd {fmt(summary[variant]['harness'])}")
        print(f"  sd over models, draws fixed:          {fmt(grid.std(0, ddof=1).mean(0))}")
        print(f"  sd over draws, model fixed:           {fmt(grid.std(1, ddof=1).mean(0))}")
        print(f"  each model over all draws:            mean {fmt(averaged.mean(0))}, sd {fmt(averaged.std(0, ddof=1))}")
        print(f"  mean of each draw seed over models:   " + ", ".join(f"s{d} {fmt(grid[:, j].mean(0))}" for j, d in enumerate(seeds)))
    if a.against:
        x, y = summary[a.variant], summary[a.against]
        d = x["averaged"] - y["averaged"]
        n = len(d)
        print(f"fidelity: {a.variant} against {a.against}, e{a.epochs}, {n} seeds; {' / '.join(DRAW_METRICS)}")
        print(f"  over all draws, mean difference:      " + " / ".join(
            f"{m:+.3f} ± {e:.3f} ({k}/{n})" for m, e, k in zip(d.mean(0), d.std(0, ddof=1) / np.sqrt(n), (d >= 0).sum(0))))
        print(f"  spread ratio, the harness (sd):       " + " / ".join(
            f"{p / q:.2f}" if q > 0 else "-" for p, q in zip(x["harness"], y["harness"])))
        # Spreads of both grids, with 90% intervals from resampling the model seeds and the draw
        # seeds (each tool's model of a seed, and each draw, kept together across the tools):
        # `training`: each model's score averaged over every draw, its sd over the models (what
        # training varies, the draw lottery taken out); `draws`: the sd over draws with the model
        # fixed, averaged over the models; `any pair`: the sd over every model with every draw
        # (the spread a run of the harness would show, model and draw seeds being independent).
        measures = {
            "training": lambda g: g.mean(1).std(0, ddof=1),
            "draws": lambda g: g.std(1, ddof=1).mean(0),
            "any pair": lambda g: g.reshape(-1, g.shape[2]).std(0, ddof=1),
        }
        gx, gy = grids[a.variant][1], grids[a.against][1]
        rng = np.random.default_rng(0)
        picks = [(rng.integers(0, n, size=n), rng.integers(0, n, size=n)) for _ in range(2000)]
        for name, measure in measures.items():
            sx, sy = measure(gx), measure(gy)
            rx = np.array([measure(gx[np.ix_(m, w)]) for m, w in picks])
            ry = np.array([measure(gy[np.ix_(m, w)]) for m, w in picks])
            cells = []
            for k in range(len(DRAW_METRICS)):
                keep = ry[:, k] > 0  # a resample of one repeated seed has no spread to compare
                if sy[k] == 0 or not keep.any():
                    cells.append("no spread to compare")
                    continue
                lo, hi = np.quantile(rx[keep, k] / ry[keep, k], [0.05, 0.95])
                cells.append(f"{sx[k] / sy[k]:.2f} [{lo:.2f}, {hi:.2f}]")
            print(f"  spread ratio, {name + ':':<24s}" + " / ".join(cells))


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


def transfer_slope(values, train, ctrl, condition, cov, held):
    """The slope through the origin of a condition's training shift in one covariate value
    regressed on its mean training shift in the other values (leaving out `held`), pooled over
    conditions, values and genes: how much of the other values' shift carries over, measured
    on training cells only. None where no condition has training shifts in two values."""
    import numpy as np

    values_seen = [o for o in np.unique(cov) if o != held]
    sxy = sxx = 0.0
    for p in np.unique(condition[train & ~ctrl]):
        shifts = {o: s for o in values_seen
                  if (s := train_shift(values, train, ctrl, condition, cov, p, o)) is not None}
        for o, y in shifts.items():
            others = [s for k, s in shifts.items() if k != o]
            if others:
                x = np.mean(others, axis=0)
                sxy, sxx = sxy + float(x @ y), sxx + float(x @ x)
    return sxy / sxx if sxx > 0 else None


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
        beta = transfer_slope(values, train, ctrl, condition, cov, held)
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


def best_epoch(history):
    """The epoch whose weights the run kept: the best validation score (cpa-stream's history calls
    it ``val_score``; ``score`` in histories written before it), the first of equals."""
    column = next((c for c in ("val_score", "score") if c in history.columns), None)
    if column is None:
        return None
    valid = history.dropna(subset=[column])
    if valid.empty:
        return None
    return int(valid.loc[valid[column].idxmax(), "epoch"])


def print_result(r):
    m = r["mean"]
    print(f"fidelity: {r['variant']:>22s} e{r['epochs']} s{r['seed']}: cf all {m['cf_all']:.3f} "
          f"deg {m['cf_deg']:.3f} change {m['cf_change']:.3f} | recon all {m['recon_all']:.3f} "
          f"| control mean all {m['ctrl_all']:.3f} deg {m['ctrl_deg']:.3f} | {r['train_cpu_s']:.0f} CPU-s")


# ------------------------------------------------------------------------------------ table


def table(a):
    import glob

    results = []
    for path in sorted(glob.glob(os.path.join(a.dir, "results", "*", "score.json"))):
        results.append(json.load(open(path)))
    if not results:
        sys.exit(f"fidelity: no results under {a.dir}/results")
    meta = read_meta(a.dir)
    metrics = [("cf_all", "cf all"), ("cf_deg", "cf top-20 DEG"), ("cf_change", "cf change"),
               ("recon_all", "recon all"), ("recon_deg", "recon top-20 DEG")]
    by = {}
    for r in results:
        by.setdefault((r["epochs"], r["variant"]), []).append(r)
    lines = [f"Fidelity on {os.path.basename(meta['source'])} (split {meta['split']}, "
             f"{meta['cells']['test']} test cells); R2 of log1p group means, mean ± sd over seeds", "",
             "| epochs | tool / variant | seeds | " + " | ".join(n for _, n in metrics) + " | CPU-s / epoch | peak RSS MiB |",
             "|---:|---|---:|" + "---:|" * len(metrics) + "---:|---:|"]

    def cell(values):
        if len(values) > 1:
            return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        return f"{values[0]:.3f}"

    for epochs in sorted({k[0] for k in by}):
        variants = sorted({k[1] for k in by if k[0] == epochs}, key=lambda v: (v != "cpa-tools", v))
        for v in variants:
            rs = by[(epochs, v)]
            cols = [cell([r["mean"][k] for r in rs]) for k, _ in metrics]
            cpu = statistics.median(r["train_cpu_s"] / r["epochs"] for r in rs)
            rss = statistics.median(r["peak_rss_mib"] for r in rs)
            lines.append(f"| {epochs} | {v} | {len(rs)} | " + " | ".join(cols) + f" | {cpu:.2f} | {rss:.0f} |")
        base = by[(epochs, variants[0])]
        lines.append(f"| {epochs} | control mean | | {cell([r['mean']['ctrl_all'] for r in base])} | "
                     f"{cell([r['mean']['ctrl_deg'] for r in base])} | {cell([r['mean']['ctrl_change'] for r in base])} | | | | |")
        if base[0].get("held_out_mean"):
            for v in variants:
                rs = by[(epochs, v)]
                cols = [cell([r["held_out_mean"][k] for r in rs]) for k, _ in metrics]
                lines.append(f"| {epochs} | {v}, held-out conditions only | {len(rs)} | " + " | ".join(cols) + " | | |")
            lines.append(f"| {epochs} | control mean, held-out conditions only | | "
                         + " | ".join(cell([r["held_out_mean"][k] for r in base]) for k in ("ctrl_all", "ctrl_deg", "ctrl_change"))
                         + " | | | | |")
            # The baselines from other covariate values' training cells (results scored before
            # the nearest value's shift existed lack it).
            for name, label in (("shift", "shift baseline (mean shift in the other values)"),
                                ("nearest", "nearest value's shift (the closest control mean's)")):
                if all(f"{name}_all" in r["held_out_mean"] for r in base):
                    lines.append(f"| {epochs} | {label}, held-out conditions only | | "
                                 + " | ".join(cell([r["held_out_mean"][f"{name}_{k}"] for r in base])
                                              for k in ("all", "deg", "change"))
                                 + " | | | | |")
    lines += reproducibility_lines(a.dir, meta, results[0]["groups"])
    lines += paired_lines(by)
    loads = [x for r in results for x in r["loadavg"]]
    lines += ["", f"Load average during the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs."]
    model, plan = peer_defaults()
    _, unexpressed = translate(model, plan, batch_size=128, check_val_every=5, max_comb_len=meta["max_comb_len"],
                               epochs=1, seed=0)
    lines += ["", "Not expressed by the translation:"] + [f"- {u}" for u in unexpressed]
    variants = sorted({(r["variant"], tuple(r.get("set") or []), r.get("preset")) for r in results if r["tool"] == "cpa-stream"})
    def describe(v, sets, p):
        if v.endswith("-last"):
            return f"the last epoch's weights of {v[:-5]}'s training"
        ways = {"-elog": "the expected log1p of the predicted counts", "-allctrl": "every control cell decoded once",
                "-delta": "the predicted change added to the observed control mean"}
        base, found = v, []
        while any(base.endswith(k) for k in ways):
            k = next(k for k in ways if base.endswith(k))
            found.insert(0, ways[k])
            base = base[: -len(k)]
        if found:
            return f"the weights of {base}, scored with " + "; ".join(found)
        return ", ".join(([f"preset {p}"] if p else []) + list(sets)) or "as translated"

    lines += ["", "cpa-stream variants (over the translation):"] + [f"- {v}: {describe(v, sets, p)}"
                                                                   for v, sets, p in variants]
    text = "\n".join(lines)
    with open(os.path.join(a.dir, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def reproducibility_lines(directory, meta, groups):
    """The table's line on whether the scored groups' changes are measured at all
    ([`change_reproducibility`]), for all of them and for the held-out ones."""
    import numpy as np

    rs = change_reproducibility(directory, meta)

    def describe(names):
        r = [rs[n] for n in names if n in rs]
        if not r:
            return "none with 2 cells in each half"
        return f"median r {np.median(r):.2f}, {sum(x < NOISE_REPRODUCIBILITY for x in r)} of {len(r)} under {NOISE_REPRODUCIBILITY}"

    scored = [g["group"] for g in groups]
    held = [g["group"] for g in groups if g["held_out"]]
    line = (f"Do the scored groups' changes reproduce between disjoint halves of their cells and controls "
            f"(`evaluate`'s change_reproducibility, mean of 20 halvings; near 0: noise, and no score of the "
            f"change tells predictions apart)? All: {describe(scored)}")
    if held:
        line += f"; held-out: {describe(held)}"
    return ["", line + "."]


PROTOCOL_METRICS = (("cf_all", "cf all"), ("cf_deg", "cf top-20 DEG"), ("cf_change", "cf change"))


def protocol(a):
    """The protocol's verdict: every variant paired with the baseline by seed on each data set
    (ROLE=DIR, ROLE `decide` or `confirm`) and epoch count. The deciding sets decide: the one of
    the two ahead on average on every deciding set, metric and epoch count is chosen (else the
    question is undecided). The confirming sets confirm: the choice stands confirmed where it is
    nowhere behind by more than two standard errors; each exception is named. A data set and epoch
    count where the two give the same numbers on every seed (a variant that changes nothing there,
    such as a rule that keeps the baseline's setting) neither decides nor confirms; it is counted
    as identical."""
    import glob

    import numpy as np

    sets = []
    for entry in a.sets:
        role, _, directory = entry.partition("=")
        if role not in ("decide", "confirm") or not directory:
            sys.exit(f"fidelity: protocol: {entry!r}: expected decide=DIR or confirm=DIR")
        results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(directory, "results", "*", "score.json")))]
        if not results:
            sys.exit(f"fidelity: protocol: no results under {directory}/results")
        sets.append((role, os.path.basename(directory.rstrip("/")), results))
    variants = sorted({r["variant"] for _, _, rs in sets for r in rs if r["variant"] != a.baseline
                       and not any(r["variant"].endswith(k) for k in ("-delta", "-elog", "-last", "-allctrl"))})
    if a.variant:
        # Named variants, rescored ones (VARIANT-delta: the anchored prediction) among them.
        variants = list(a.variant)
    lines = [f"Protocol: each variant minus {a.baseline}, paired by seed (mean ± standard error; seeds ahead)", ""]
    header = "| variant | data set | role | epochs | " + " | ".join(
        f"{n} ({a.baseline})" for _, n in PROTOCOL_METRICS) + " | " + " | ".join(f"{n}, difference" for _, n in PROTOCOL_METRICS) + " |"
    lines += [header, "|---|---|---|---:|" + "---:|" * (2 * len(PROTOCOL_METRICS))]
    verdicts = []
    for v in variants:
        cells = []  # (role, data set, epochs, metric, mean difference, standard error)
        identical = []  # (role, data set, epochs) where every seed's numbers are the same
        for role, name, results in sets:
            for epochs in sorted({r["epochs"] for r in results}):
                base = {r["seed"]: r for r in results if r["variant"] == a.baseline and r["epochs"] == epochs}
                other = {r["seed"]: r for r in results if r["variant"] == v and r["epochs"] == epochs}
                seeds = sorted(set(base) & set(other))
                if not seeds:
                    continue
                absolute, shown, here = [], [], []
                for key, label in PROTOCOL_METRICS:
                    d = np.array([other[s]["mean"][key] - base[s]["mean"][key] for s in seeds])
                    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
                    absolute.append(f"{np.mean([base[s]['mean'][key] for s in seeds]):.3f}")
                    shown.append(f"{d.mean():+.3f} ± {se:.3f} ({int((d > 0).sum())}/{len(d)})")
                    here.append((role, name, epochs, label, float(d.mean()), float(se), bool(np.all(d == 0))))
                if all(c[6] for c in here):
                    identical.append((role, name, epochs))
                else:
                    cells += [c[:6] for c in here]
                lines.append(f"| {v} | {name} | {role} | {epochs} | " + " | ".join(absolute) + " | " + " | ".join(shown) + " |")
        same = (f" (identical on {len(identical)}: "
                + ", ".join(f"{n} {e} epochs" for _, n, e in identical) + ")") if identical else ""
        deciding = [c for c in cells if c[0] == "decide"]
        if not deciding:
            verdicts.append(f"- {v} against {a.baseline}: no deciding set measured both with different results{same}")
            continue
        if all(c[4] > 0 for c in deciding):
            chosen, sign = v, 1
        elif all(c[4] < 0 for c in deciding):
            chosen, sign = a.baseline, -1
        else:
            verdicts.append(f"- {v} against {a.baseline}: undecided (each is ahead somewhere on the deciding sets){same}")
            continue
        against = [c for c in cells if c[0] == "confirm" and sign * c[4] < -2 * c[5]]
        # Every cell where the choice is behind on average, whatever the margin.
        behind = [c for c in cells if sign * c[4] < 0]
        confirmed = [c for c in cells if c[0] == "confirm"]
        if not confirmed:
            verdicts.append(f"- {v} against {a.baseline}: {chosen} decided; no confirming set measured both{same}")
        elif not against:
            verdicts.append(f"- {v} against {a.baseline}: {chosen} decided, and confirmed on every confirming set, "
                            f"metric and epoch count ({len(confirmed)}){same}")
        else:
            named = "; ".join(f"{n} {e} epochs {m} ({sign * d:+.3f} ± {se:.3f})" for _, n, e, m, d, se in against)
            verdicts.append(f"- {v} against {a.baseline}: {chosen} decided; confirmed on {len(confirmed) - len(against)} "
                            f"of {len(confirmed)} confirming cells, behind by more than two standard errors on: {named}{same}")
        if behind:
            verdicts.append(f"  {chosen} is behind on average, by any margin, on {len(behind)} of {len(cells)} cells: "
                            + "; ".join(f"{n} ({r}) {e} epochs {m} ({sign * d:+.3f} ± {se:.3f})"
                                        for r, n, e, m, d, se in behind))
    lines += [""] + verdicts
    lines += ["", "Decided: ahead on average on every deciding set, metric and epoch count. Confirmed: on no",
              "confirming set, metric and epoch count behind by more than two standard errors. Identical:",
              "the same numbers on every seed (left out of both)."]
    print("\n".join(lines))


PAIRED_METRICS = (("cf_all", "cf all"), ("cf_deg", "top-20"), ("cf_change", "change"), ("recon_all", "recon"))


def paired(stream, peer, resamples=2000):
    """cpa-stream against cpa-tools on the seeds both ran (a seed fixes both tools' control-cell
    draws, so the seeds pair them), per metric: the mean difference and its standard error, and the
    ratio of the spreads (sd over seeds) with a 90% interval from resampling the seeds (pairs kept
    together, a fixed generator). None when fewer than 3 seeds are shared."""
    import numpy as np

    a = {r["seed"]: r for r in stream}
    b = {r["seed"]: r for r in peer}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 3:
        return None
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
    out = {"seeds": len(seeds)}
    for key, _ in PAIRED_METRICS:
        x = np.array([a[s]["mean"][key] for s in seeds])
        y = np.array([b[s]["mean"][key] for s in seeds])
        d = x - y
        ratio = x.std(ddof=1) / y.std(ddof=1) if y.std(ddof=1) > 0 else float("inf")
        sx, sy = x[picks].std(axis=1, ddof=1), y[picks].std(axis=1, ddof=1)
        keep = sy > 0  # a resample of one repeated seed has no spread to compare
        lo, hi = np.quantile(sx[keep] / sy[keep], [0.05, 0.95]) if keep.any() else (float("nan"),) * 2
        out[key] = {"diff": float(d.mean()), "diff_se": float(d.std(ddof=1) / np.sqrt(len(d))),
                    "ahead": int((d >= 0).sum()), "sd_ratio": float(ratio), "sd_ratio_90": (float(lo), float(hi))}
    return out


def paired_lines(by):
    """The table's paired section: each cpa-stream variant against cpa-tools at equal epochs."""
    rows = []
    for epochs, variant in sorted(by):
        # Like for like only: plain against plain, anchored (-delta, the draws, log1p of the mean)
        # against cpa-tools anchored; scorings cpa-tools has no counterpart of are left out.
        if variant.startswith("cpa-tools") or "-elog" in variant or "-allctrl" in variant:
            continue
        peer = "cpa-tools-delta" if variant.endswith("-delta") else "cpa-tools"
        if (epochs, peer) not in by:
            continue
        p = paired(by[(epochs, variant)], by[(epochs, peer)])
        if p is None:
            continue
        cells = []
        for key, _ in PAIRED_METRICS:
            m = p[key]
            lo, hi = m["sd_ratio_90"]
            cells.append(f"{m['diff']:+.3f} ± {m['diff_se']:.3f} ({m['ahead']}/{p['seeds']}); "
                         f"{m['sd_ratio']:.2f} [{lo:.2f}, {hi:.2f}]")
        rows.append(f"| {epochs} | {variant} vs {peer} | {p['seeds']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Paired by seed against cpa-tools (a seed fixes both tools' control-cell draws): mean "
            "difference ± its standard error (seeds ahead or level / seeds); ratio of the spreads "
            "(sd over seeds, cpa-stream / cpa-tools) [90% interval, seeds resampled in pairs]. That spread "
            "mixes training with the draws; `fidelity.py draws DIR --against cpa-tools --epochs E` splits it.", "",
            "| epochs | variant | seeds | " + " | ".join(n for _, n in PAIRED_METRICS) + " |",
            "|---:|---|---:|" + "---|" * len(PAIRED_METRICS)] + rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    main()
