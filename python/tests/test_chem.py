"""Drugs from SMILES (issue 50 item 3): on a synthetic drug atlas whose true effects are a function
of the molecules' Morgan fingerprints, a model given the fingerprints (cpa-tools'
``use_rdkit_embeddings=True``) predicts drugs whose cells it never saw better than a zero
embedding, and its projection trains (cpa-tools' does not). Skipped without RDKit."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("rdkit", reason="RDKit is not installed (pip install 'cpa-stream[chem]')")

import cpa_stream as cs  # noqa: E402
import cpa_stream.compat as cpa  # noqa: E402
from cpa_stream import chem  # noqa: E402

GROUPS = ["O", "N", "Cl", "C(=O)O", "c1ccccc1", "C#N", "S", "F"]
HELD_OUT = ["CCCCO", "CCCCCC(=O)O", "CCCCCCc1ccccc1", "CCCN", "CCCCCCCS"]


def _molecules() -> dict[str, str]:
    """40 small molecules: alkyl chains of 1 to 7 carbons ending in one of 8 groups (named by
    their SMILES), fewer where a name repeats."""
    out = {}
    for n in range(1, 8):
        for group in GROUPS:
            smiles = "C" * n + group
            out[smiles] = smiles
    return out


def drug_atlas(seed: int = 0, cells_per_drug: int = 50, controls: int = 800, genes: int = 120):
    """Counts whose per-drug log-fold changes are a fixed linear map of the drug's fingerprint
    (through an 8-dimensional effect space), Poisson around library-size-scaled means."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    molecules = _molecules()
    features = chem.molecule_features(molecules)
    bits = features.to_numpy(np.float64)
    projection = rng.normal(size=(bits.shape[1], 8)) / np.sqrt(bits.sum(axis=1).mean())
    loadings = rng.normal(size=(8, genes)) * 0.35
    effects = pd.DataFrame(bits @ projection @ loadings, index=features.index)
    base = rng.normal(0.0, 1.0, size=genes) + np.log(1.0 / genes)
    names = ["control"] * controls + [d for d in features.index for _ in range(cells_per_drug)]
    library = rng.lognormal(np.log(3000), 0.2, size=len(names))
    log_means = np.vstack([base if n == "control" else base + effects.loc[n].to_numpy() for n in names])
    counts = rng.poisson(library[:, None] * np.exp(log_means)).astype(np.float32)
    obs = pd.DataFrame({
        "drug": names, "SMILES": [molecules.get(n, "") for n in names],
        "split": [("ood" if n in HELD_OUT else ("valid" if rng.random() < 0.1 else "train")) for n in names],
    }, index=[f"cell{i}" for i in range(len(names))])
    import scipy.sparse as sp

    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(genes)]))


MODEL = dict(n_latent=16, n_hidden_encoder=128, n_layers_encoder=2, n_hidden_decoder=128, n_layers_decoder=2,
             doser_type="linear", seed=3)


def _train(adata, epochs: int, features: bool):
    cpa.CPA.setup_anndata(adata, perturbation_key="drug", control_group="control", smiles_key="SMILES")
    model = cpa.CPA(adata, split_key="split", valid_split="valid", use_rdkit_embeddings=features, **MODEL)
    model.train(max_epochs=epochs, batch_size=128, check_val_every_n_epoch=epochs,
                plan_kwargs={"lr": 1e-3, "reg_adv": 10.0, "pen_adv": 5.0}, threads=1)
    return model


def _delta_r2(adata, model, as_control: bool = False) -> dict[str, float]:
    """Per held-out drug, R2 over genes of the predicted against the true change of the mean
    log1p expression from the controls, the drug's cells predicted from control cells (with
    ``as_control``, predicted as controls: what a zero embedding gives)."""
    control = adata[adata.obs["drug"] == "control"]
    reference = np.log1p(control.X.toarray()).mean(0)
    rng = np.random.default_rng(7)
    out = {}
    for drug in HELD_OUT:
        cells = adata[adata.obs["drug"] == drug].copy()
        truth = np.log1p(cells.X.toarray()).mean(0)
        cells.X = control.X[rng.choice(control.n_obs, size=cells.n_obs, replace=True)]
        if as_control:
            cells.obs["drug"] = "control"
        model.predict(cells)
        real, guess = truth - reference, np.log1p(cells.obsm["CPA_pred"]).mean(0) - reference
        out[drug] = float(1 - ((real - guess) ** 2).sum() / ((real - real.mean()) ** 2).sum())
    return out


def test_molecule_features_and_their_table(tmp_path):
    features = chem.molecule_features({"ethanol": "CCO", "benzene": "c1ccccc1"})
    assert features.shape == (2, 2048) and features.index.name == "perturbation"
    assert set(np.unique(features.to_numpy())) <= {0.0, 1.0} and features.loc["ethanol"].sum() > 0
    descriptors = chem.molecule_features({"a": "CCO", "b": "c1ccccc1", "c": "CC(=O)O"}, "descriptors")
    assert descriptors.shape[0] == 3 and descriptors.shape[1] > 50
    np.testing.assert_allclose(descriptors.mean().to_numpy(), 0, atol=1e-5)
    with pytest.raises(ValueError, match="perturbation 'bad'.*'C1CC'"):
        chem.molecule_features({"bad": "C1CC"})
    # cpa-tools' combination SMILES, joined by "..".
    obs = pd.DataFrame({"drug": ["control", "A", "A+B"], "smi": ["", "CCO", "CCO..CCN"]})
    assert chem.smiles_of(obs, "drug", "smi", "control") == {"A": "CCO", "B": "CCN"}
    obs.loc[1, "smi"] = "CCC"
    with pytest.raises(ValueError, match="'A' has two SMILES"):
        chem.smiles_of(obs, "drug", "smi", "control")
    # The command line: a SMILES table to the features table train --perturbation-features reads.
    table = tmp_path / "smiles.csv"
    pd.DataFrame({"drug": ["ethanol", "benzene"], "SMILES": ["CCO", "c1ccccc1"]}).to_csv(table, index=False)
    out = tmp_path / "features.parquet"
    assert chem.main([str(table), "-o", str(out)]) == 0
    written = pd.read_parquet(out)
    assert list(written["perturbation"]) == ["ethanol", "benzene"] and written.shape == (2, 2049)
    assert chem.main([str(table), "-o", str(out)]) == 2, "an existing output needs --overwrite"


def test_unseen_drugs_are_predicted_from_their_molecules_and_the_projection_trains():
    adata = drug_atlas()
    with_features = _train(adata.copy(), 100, True)
    scores = _delta_r2(adata, with_features)
    # The zero embedding: the same model, the held-out drugs' cells predicted as controls (whose
    # features are zeros).
    zero_scores = _delta_r2(adata, with_features, as_control=True)
    print("held-out drugs, R2 of the change:", {k: round(v, 3) for k, v in scores.items()},
          "zero embedding:", {k: round(v, 3) for k, v in zero_scores.items()})
    assert np.mean(list(scores.values())) > np.mean(list(zero_scores.values())) + 0.2
    assert sum(scores[d] > zero_scores[d] for d in HELD_OUT) >= 4

    # The projection trains: an unseen drug's embedding (its projected fingerprint) moves
    # between epoch 1 and the end; in cpa-tools it would stay where it was initialised.
    early = _train(adata.copy(), 1, True)
    drug = HELD_OUT[0]
    a = early.get_pert_embeddings(pert=drug).X[0]
    b = with_features.get_pert_embeddings(pert=drug).X[0]
    assert np.abs(a).sum() > 0 and not np.allclose(a, b, atol=1e-3)


def test_a_features_dataframe_trains_through_the_package(tmp_path):
    adata = drug_atlas(cells_per_drug=10, controls=100, genes=40)
    features = chem.molecule_features(chem.smiles_of(adata.obs, "drug", "SMILES", "control"))
    run = cs.train(adata, tmp_path / "run", perturbation_key="drug", control_group="control", split_key="split",
                   perturbation_features=features, max_epochs=1, threads=1, progress=False)
    embeddings = run.perturbation_embeddings()
    assert set(HELD_OUT) <= set(embeddings.index)


def test_the_command_line_takes_a_smiles_table_and_predicts_a_drug_without_cells(tmp_path, cli):
    import subprocess
    import sys

    adata = drug_atlas(cells_per_drug=10, controls=100, genes=40)
    adata.write_h5ad(tmp_path / "drugs.h5ad")
    smiles = chem.smiles_of(adata.obs, "drug", "SMILES", "control")
    pd.DataFrame({"drug": list(smiles), "SMILES": list(smiles.values())}).to_csv(tmp_path / "smiles.csv", index=False)
    env = {**os.environ, "CPA_STREAM_PYTHON": sys.executable}
    store, run = tmp_path / "drugs.store", tmp_path / "run"
    subprocess.run([str(cli), "import", str(tmp_path / "drugs.h5ad"), "--out", str(store)], check=True, env=env)
    trained = subprocess.run(
        [str(cli), "train", "--store", str(store), "--perturbation-key", "drug", "--control", "control",
         "--split-key", "split", "--perturbation-smiles", str(tmp_path / "smiles.csv"), "--epochs", "1",
         "--threads", "1", "--out", str(run)],
        env=env, capture_output=True, text=True,
    )
    assert trained.returncode == 0, trained.stderr
    assert not list(tmp_path.glob(".run.smiles-*")), "the features file is left behind"
    drug = HELD_OUT[0]
    out = tmp_path / "unseen.parquet"
    subprocess.run([str(cli), "predict", "--model", str(run), "--store", str(store), "--source",
                    "drug == 'control'", "--target", f"drug={drug}", "--threads", "1", "--out", str(out)],
                   check=True, env=env, capture_output=True)
    assert set(pd.read_parquet(out, columns=["drug"])["drug"].astype(str)) == {drug}
    # Without the Python package (or RDKit) the error says how to get the features.
    failed = subprocess.run(
        [str(cli), "train", "--store", str(store), "--perturbation-key", "drug", "--control", "control",
         "--perturbation-smiles", str(tmp_path / "smiles.csv"), "--epochs", "1", "--out", str(tmp_path / "x")],
        env={**env, "CPA_STREAM_PYTHON": "/nonexistent/python"}, capture_output=True, text=True,
    )
    assert failed.returncode != 0 and "pip install 'cpa-stream[chem]'" in failed.stderr, failed.stderr
    assert not (tmp_path / "x").exists()
