"""The harness's data: the prepared directory (`meta.json`, the split column), the cells' keys and
values, the translation of cpa-tools' parameters and the control-cell draws both tools decode."""

from __future__ import annotations

import json
import os
import sys

#: The split column `prepare` writes.
SPLIT = "fidelity_split"
#: DEGs scored: the genes whose group mean moves most from the control mean.
N_TOP_DEG = 20
#: The scores `draws` splits into the training's and the draws' spread.
DRAW_METRICS = ("cf_all", "cf_deg", "cf_change")
#: The scores `protocol` judges variants on.
PROTOCOL_METRICS = (("cf_all", "cf all"), ("cf_deg", "cf top-20 DEG"), ("cf_change", "cf change"))
#: The scores `table` pairs by seed against cpa-tools.
PAIRED_METRICS = (("cf_all", "cf all"), ("cf_deg", "top-20"), ("cf_change", "change"), ("recon_all", "recon"))


def peer_dir():
    """The peer harness's directory (cpa-tools' `run_peer.py`): `CPA_FIDELITY_PEER`, else
    `../shared/peer/cpa-tools` from the current directory (the repository's root, where
    scripts/fidelity.sh runs)."""
    return os.environ.get("CPA_FIDELITY_PEER") or os.path.normpath(
        os.path.join(os.getcwd(), "..", "shared", "peer", "cpa-tools"))


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


def peer_defaults():
    """run_peer.py's hyper-parameters (the Kang tutorial's with short warm-ups), read from the
    script itself so that a change there carries over."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_peer", os.path.join(peer_dir(), "run_peer.py"))
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
