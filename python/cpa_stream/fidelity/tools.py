"""The two tools' runs on a prepared directory: cpa-tools through the peer harness's `run_peer.py`
(in cpa-tools' own environment), cpa-stream through its command line with the translated
configuration, each run's group means scored and kept as JSON."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

from .data import (
    DRAW_METRICS, SPLIT, binary, cf_draws, covariate_keys, group_keys, log_values, peer_defaults, peer_dir, read_meta,
    set_key,
    toml_text, translate,
)
from .report import best_epoch, print_result
from .scores import score

#: This package's directory: `peer_anchor.py` runs from here in cpa-tools' environment.
HERE = os.path.dirname(os.path.abspath(__file__))


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
        environment = {**os.environ, "CPA_FIDELITY_PEER": peer_dir()}
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=environment)
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
