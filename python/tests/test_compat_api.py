"""The calls a cpa-tools notebook makes beyond training (issue 74 item 4): ``ComPertAPI``'s
dose responses, uncertainty, predictions, responses and R2 table, ``CompertVisuals`` and ``cpa.pl``'s
plots, the model's ``module`` / ``adata_manager``, ``setup_anndata``'s DEG masks and
``run_autotune``. Each is checked against what it is made of (the engine's own outputs, the data),
not only for its shape."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cpa_stream.compat as cpa
from test_compat import HELD_OUT, MODEL, PLAN, _setup, _tutorial_adata

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adata = _tutorial_adata()
    _setup(adata)
    model = cpa.CPA(adata=adata, split_key="split", train_split="train", valid_split="valid", test_split="ood",
                    **MODEL)
    model.train(max_epochs=3, batch_size=512, plan_kwargs=PLAN, check_val_every_n_epoch=1, threads=1)
    api = cpa.ComPertAPI(adata, model, de_genes_uns_key="none", pert_category_key="cov_cond",
                         control_group="control", experiment="gene")
    return adata, model, api


def _r2(true, pred):
    return 1 - ((true - pred) ** 2).sum() / ((true - true.mean()) ** 2).sum()


def test_latent_dose_responses_are_the_learned_doser(trained):
    _, model, api = trained
    curve = api.latent_dose_response(perturbations=["KLF1", "MAP2K6"], dose=[0.0, 0.5, 2.0])
    assert list(curve.columns) == ["condition", "dose", "response"] and len(curve) == 6
    # The model's linear doser scales by the dose itself (s(d) = d).
    np.testing.assert_allclose(curve["response"], curve["dose"], rtol=1e-6, atol=1e-7)
    engine = model.run.dose_response(perturbations=["KLF1"], doses=[0.5], plots=False, progress=False)["latent"]
    assert curve.query("condition == 'KLF1' and dose == 0.5")["response"].item() == pytest.approx(
        engine["response"].iloc[0])
    default = api.latent_dose_response(n_points=3)
    assert set(default["condition"]) == set(model.pert_encoder) - {"<PAD>", "control"}
    grid = api.latent_dose_response2D(["KLF1", "MAP2K6"], dose=[0.0, 1.0])
    assert list(grid.columns) == ["KLF1", "MAP2K6", "response"] and len(grid) == 4
    np.testing.assert_allclose(grid["response"], grid["KLF1"] + grid["MAP2K6"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="'NOPE': not one of the model's"):
        api.latent_dose_response(perturbations=["NOPE"])
    with pytest.raises(ValueError, match="2 perturbations"):
        api.latent_dose_response2D(["KLF1"])


def test_uncertainty_is_zero_on_a_trained_condition_and_names_the_closest(trained):
    _, _, api = trained
    api.compute_comb_emb(thrh=30)
    assert api.comb_emb.n_obs == sum(n > 30 for n in api.num_measured_points["train"].values())
    cos, eucl, closest_cos, closest_eucl = api.compute_uncertainty(["k562"], "KLF1", "1.0")
    assert cos == pytest.approx(0, abs=1e-6) and eucl == pytest.approx(0, abs=1e-5)
    assert closest_cos == closest_eucl == "k562_KLF1"
    # A combination never trained on is some distance away from everything trained.
    far = api.compute_uncertainty(["k562"], HELD_OUT, "1.0+1.0")
    assert far[1] > 0 and far[2] != f"k562_{HELD_OUT}"


def test_predict_is_the_counterfactual_idiom_in_one_call(trained):
    adata, model, api = trained
    controls = adata[(adata.obs["condition"] == "control") & (adata.obs["cell_type"] == "k562")][:40]
    df = pd.DataFrame({"condition": [HELD_OUT, "KLF1"], "dose": ["1+1", "1"], "cell_type": ["k562", "k562"]})
    out = api.predict(controls.X, df)
    assert out.shape == (80, adata.n_vars) and list(out.var_names) == list(adata.var_names)
    assert list(out.obs["condition"]) == [HELD_OUT] * 40 + ["KLF1"] * 40
    assert {"uncertainty_cosine", "closest_cond_euclidean"} <= set(out.obs.columns)
    # The same as relabelling the control cells and predicting them (cpa-tools' tutorial idiom).
    relabelled = controls.copy()
    relabelled.obs["condition"] = HELD_OUT
    relabelled.obs["dose"] = "1+1"
    model.predict(relabelled)
    np.testing.assert_allclose(out.X[:40], relabelled.obsm["CPA_pred"], rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="sample=True"):
        api.predict(controls.X, df, sample=True)
    with pytest.raises(ValueError, match="lacks the column"):
        api.predict(controls.X, df.drop(columns="cell_type"))


def test_responses_decoded_and_measured(trained):
    adata, _, api = trained
    decoded = api.get_response(doses=[0.0, 1.0], perturbations=["KLF1"], ncells_max=30, control_name="valid_control")
    assert list(decoded.columns[:4]) == ["cell_type", "condition", "dose", "response"]
    assert len(decoded) == 2 * adata.obs["cell_type"].nunique()
    genes = decoded[list(adata.var_names)].to_numpy()
    np.testing.assert_allclose(decoded["response"], np.linalg.norm(genes, axis=1), rtol=1e-5)
    reference = api.get_response_reference(perturbations=["KLF1", HELD_OUT])
    assert set(reference["split"]) == {"training_treated", "ood"}
    row = reference[(reference["condition"] == "KLF1")].iloc[0]
    train = adata.obs["split"] == "train"
    x = adata.X
    cells = np.flatnonzero(train & (adata.obs["cov_cond"] == "k562_KLF1"))
    controls = np.flatnonzero(train & (adata.obs["condition"] == "control") & (adata.obs["cell_type"] == "k562"))
    expected = np.asarray(x[cells].mean(0)).ravel() - np.asarray(x[controls].mean(0)).ravel()
    np.testing.assert_allclose(row[list(adata.var_names)].to_numpy(float), expected, rtol=1e-5, atol=1e-6)
    assert row["num_cells"] == len(cells) and row["response"] == pytest.approx(np.linalg.norm(expected), rel=1e-5)
    grid = api.get_response2D(["KLF1", "MAP2K6"], "k562", doses=[0.0, 1.0], ncells_max=20)
    assert list(grid.columns[:3]) == ["KLF1", "MAP2K6", "response"] and len(grid) == 4


def test_evaluate_r2_scores_relabelled_controls_against_the_measured_cells(trained):
    adata, model, api = trained
    scores = api.evaluate_r2(perturbations=[HELD_OUT], control_adata_key="valid")
    assert list(scores.columns) == ["cell_type", "condition", "dose", "R2_mean", "R2_mean_DE", "R2_var",
                                    "R2_var_DE", "num_cells"]
    assert len(scores) == 1 and scores["num_cells"].item() == int((adata.obs["condition"] == HELD_OUT).sum())
    controls = adata[(adata.obs["split"] == "valid") & (adata.obs["condition"] == "control")
                     & (adata.obs["cell_type"] == "k562")].copy()
    controls.obs["condition"] = HELD_OUT
    controls.obs["dose"] = "1+1"
    model.predict(controls)
    true = adata[adata.obs["condition"] == HELD_OUT].X.toarray()
    assert scores["R2_mean"].item() == pytest.approx(_r2(true.mean(0), controls.obsm["CPA_pred"].mean(0)), abs=1e-5)
    assert scores["R2_mean_DE"].item() == pytest.approx(scores["R2_mean"].item()), "no DEG lists: every gene"


def test_every_plot_draws_and_returns_what_cpa_tools_returns(trained, tmp_path):
    import matplotlib.pyplot as plt

    adata, model, api = trained
    curve = api.latent_dose_response(perturbations=["KLF1", "MAP2K6"], n_points=5)
    fig = cpa.pl.plot_dose_response(curve, "dose", "condition", fname=str(tmp_path / "dose"))
    assert isinstance(fig, matplotlib.figure.Figure) and (tmp_path / "dose.png").stat().st_size > 0
    table = cpa.pl.plot_uncertainty_dose(api, "k562", "KLF1", N=4, filename=tmp_path / "u.png")
    assert len(table) == 4 and (tmp_path / "u.png").stat().st_size > 0
    combined = cpa.pl.plot_uncertainty_comb_dose(api, "k562", "KLF1+MAP2K6", N=3, filename=tmp_path / "u2.png")
    assert len(combined) == 9 and {"uncertainty_cosine", "closest_cond_eucl"} <= set(combined.columns)
    emb = model.get_pert_embeddings().X[2:]
    names = list(model.pert_encoder)[2:]
    assert cpa.pl.plot_embedding(emb[:, :2], labels=names, show_text=True, file_name=tmp_path / "e.png") is plt
    assert cpa.pl.plot_similarity(emb, labels=names, file_name=tmp_path / "s.png") is None
    assert (tmp_path / "e.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0
    model.predict(adata)
    shown = []
    plt.show, real_show = (lambda *a, **k: shown.append(plt.gcf())), plt.show
    try:
        small = adata[adata.obs["cov_cond"].isin(["k562_KLF1", "k562_control", f"k562_{HELD_OUT}"])].copy()
        assert cpa.pl.plot_r2_matrix(small, "CPA_pred", "cov_cond") is None
    finally:
        plt.show = real_show
    assert len(shown) == 2, "the means' and the variances' heat maps"
    visuals = cpa.pl.CompertVisuals(api, fileprefix=str(tmp_path / "v"))
    visuals.plot_contvar_response(curve)
    visuals.plot_contvar_response2D(api.latent_dose_response2D(["KLF1", "MAP2K6"], n_points=4))
    scores = pd.DataFrame({"R2_mean": [0.5, 0.9], "R2_mean_DE": [0.4, 0.8], "condition": ["a", "b"]})
    visuals.plot_scatter(scores, "R2_mean", "R2_mean_DE", hue="condition")
    for name in ("v_contvar_response.png", "v_contvar_response2D.png", "v_scatter.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    plt.close("all")


def test_module_adata_manager_and_deg_masks(trained):
    adata, model, _ = trained
    assert model.module.n_latent == MODEL["n_latent"] and model.module.recon_loss == "nb"
    assert model.module.n_perts == len(model.pert_encoder) and model.module.n_genes == adata.n_vars
    weights = model.module.state_dict()
    assert weights and all(isinstance(v, np.ndarray) and np.isfinite(v).all() for v in weights.values())
    manager = model.adata_manager
    assert manager.registry["setup_args"]["perturbation_key"] == "condition"
    assert (manager.get_from_registry("condition") == adata.obs["condition"].to_numpy()).all()
    with pytest.raises(KeyError, match="not in the registry"):
        manager.get_from_registry("nope")

    fresh = _tutorial_adata()
    categories = fresh.obs["cov_cond"].astype(str)
    degs = {c: list(fresh.var_names[i: i + 15]) for i, c in enumerate(sorted(categories.unique())[:5])}
    fresh.uns["degs"] = degs
    cpa.CPA.setup_anndata(fresh, perturbation_key="condition", control_group="control", dosage_key="dose",
                          categorical_covariate_keys=["cell_type"], deg_uns_key="degs", deg_uns_cat_key="cov_cond")
    full, top = fresh.obsm["deg_mask"], fresh.obsm["deg_mask_r2"]
    assert sp.issparse(full) and full.shape == (fresh.n_obs, fresh.n_vars)
    listed = categories.isin(list(degs)).to_numpy()
    rows = np.asarray(full.sum(1)).ravel()
    assert (rows[listed] == 15).all() and (rows[~listed] == fresh.n_vars).all(), "no list: every gene, as cpa-tools"
    assert (np.asarray(top.sum(1)).ravel()[listed] == 10).all()
    first = np.flatnonzero(categories == sorted(degs)[0])[0]
    assert list(fresh.var_names[full[first].indices]) == sorted(degs[sorted(degs)[0]], key=list(fresh.var_names).index)


def test_run_autotune_searches_through_the_translation(trained, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'cpa-stream[tune]')")
    from ray import tune

    adata, _, _ = trained
    space = {
        "model_args": {**MODEL, "n_latent": tune.choice([8, 16]), "split_key": "split", "train_split": "train",
                       "valid_split": "valid", "test_split": "ood"},
        "train_args": {"max_epochs": 2, "batch_size": 512, "check_val_every_n_epoch": 1,
                       "lr": tune.loguniform(1e-4, 1e-3), "reg_adv": 20.0},
    }
    with pytest.raises(ValueError, match="primary metric"):
        cpa.run_autotune(cpa.CPA, adata, "r2_mean", "max", space, 2)
    result = cpa.run_autotune(cpa.CPA, adata, "cpa_metric", "max", space, num_samples=2, searcher="random", seed=3,
                              logging_dir=str(tmp_path), experiment_name="search", plan_kwargs_keys=["lr", "reg_adv"],
                              resources={"cpu": 1})
    assert len(result.table) == 2 and set(result.table["model_args.n_latent"]) <= {8, 16}
    best = result.best_run.config
    assert best["model"]["n_latent"] in (8, 16) and best["adversary"]["reg_adv"] == 20.0
    assert 1e-4 <= best["training"]["lr"] <= 1e-3 and best["training"]["validation_score"] == "reference-knn"
