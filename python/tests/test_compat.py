"""cpa-tools' API on cpa-stream (issue 50 items 1-2): a cpa-tools tutorial's calls, with only the
import line changed, run on the bundled data and return cpa-tools' shapes, computed by the same
engine as the package's own API; hyper-parameters map one to one; keys that cannot be honoured
are errors naming them; the setup belongs to the model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import cpa_stream as cs
import cpa_stream.compat as cpa
from conftest import BUNDLED

pytest.importorskip("matplotlib")

MODEL = {
    "n_latent": 16, "recon_loss": "nb", "doser_type": "linear", "n_hidden_encoder": 64, "n_layers_encoder": 2,
    "n_hidden_decoder": 64, "n_layers_decoder": 2, "use_batch_norm_encoder": True, "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": False, "use_layer_norm_decoder": True, "dropout_rate_encoder": 0.0,
    "dropout_rate_decoder": 0.1, "variational": False, "seed": 6977,
}
PLAN = {
    "n_epochs_kl_warmup": None, "n_epochs_pretrain_ae": 1, "n_epochs_adv_warmup": 2, "n_epochs_mixup_warmup": 0,
    "mixup_alpha": 0.0, "adv_steps": None, "n_hidden_adv": 32, "n_layers_adv": 2, "use_batch_norm_adv": True,
    "use_layer_norm_adv": False, "dropout_rate_adv": 0.3, "reg_adv": 20.0, "pen_adv": 5.0, "lr": 0.0003,
    "wd": 4e-07, "adv_lr": 0.0003, "adv_wd": 4e-07, "adv_loss": "cce", "doser_lr": 0.0003, "doser_wd": 4e-07,
    "do_clip_grad": True, "gradient_clip_value": 1.0, "step_size_lr": 10,
}
HELD_OUT = "MAP2K3+MAP2K6"


def _tutorial_adata():
    """The bundled data prepared as the Norman tutorial prepares its data: counts in X, a split
    column of train / valid / ood."""
    import anndata as ad

    adata = ad.read_h5ad(BUNDLED)
    adata.X = adata.layers["counts"].copy()
    rng = np.random.default_rng(0)
    adata.obs["split"] = rng.choice(["train", "valid"], size=adata.n_obs, p=[0.85, 0.15])
    adata.obs.loc[adata.obs["condition"] == HELD_OUT, "split"] = "ood"
    return adata


def _setup(adata) -> None:
    cpa.CPA.setup_anndata(adata, perturbation_key="condition", control_group="control", dosage_key="dose",
                          categorical_covariate_keys=["cell_type"], is_count_data=True, deg_uns_cat_key="cov_cond",
                          max_comb_len=2)


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """The tutorial's set-up and training (3 epochs, 1 thread), saved to ``save_path``."""
    adata = _tutorial_adata()
    _setup(adata)
    model = cpa.CPA(adata=adata, split_key="split", train_split="train", valid_split="valid", test_split="ood",
                    **MODEL)
    saved = tmp_path_factory.mktemp("compat") / "Kang"
    with pytest.warns(UserWarning, match="use_gpu: no CUDA device"):
        model.train(max_epochs=3, use_gpu=True, batch_size=512, plan_kwargs=PLAN, early_stopping_patience=5,
                    check_val_every_n_epoch=1, save_path=saved, threads=1)
    return adata, model, saved


def test_setup_writes_cpa_tools_fields_and_keeps_its_state_out_of_the_class():
    adata = _tutorial_adata()
    _setup(adata)
    assert adata.obs["CPA_cat"].iloc[0] == f"{adata.obs['cell_type'].iloc[0]}_{adata.obs['condition'].iloc[0]}"
    assert set(adata.obs["CPA_control"].unique()) == {0, 1}
    assert adata.obsm["perts"].shape == (adata.n_obs, 2) and adata.obsm["perts_doses"].shape == (adata.n_obs, 2)
    model = cpa.CPA(adata, split_key="split", valid_split="valid")
    vocabulary = list(model.pert_encoder)
    assert vocabulary[:2] == ["<PAD>", "control"] and vocabulary[2:] == sorted(vocabulary[2:])
    # A cell's obsm row names its perturbations by that vocabulary, padding with 0.
    first = adata.obs["condition"].iloc[0].split("+")
    assert [vocabulary[i] for i in adata.obsm["perts"][0][: len(first)]] == first
    # A second dataset with other perturbations gets its own vocabulary: no class-level leak.
    other = adata[adata.obs["condition"].isin(["control", "KLF1"])].copy()
    del other.uns[cpa.SETUP_KEY]
    with pytest.raises(ValueError, match="setup_anndata"):
        cpa.CPA(other)
    _setup(other)
    assert list(cpa.CPA(other).pert_encoder) == ["<PAD>", "control", "KLF1"]
    assert list(model.pert_encoder) == vocabulary
    # No dosage key: cpa-tools' CPA_dose_val, "1.0" per part.
    third = adata[:200].copy()
    cpa.CPA.setup_anndata(third, perturbation_key="condition", control_group="control")
    assert all(d == "+".join("1.0" for _ in c.split("+")) for c, d in zip(third.obs["condition"], third.obs["CPA_dose_val"]))


def test_keys_map_one_to_one_and_unknown_keys_are_errors_naming_them(tutorial):
    adata, model, _ = tutorial
    config = model.run.config
    assert config["model"]["n_latent"] == 16 and config["model"]["doser_type"] == "linear"
    assert config["model"]["norm_encoder"] == "batch" and config["model"]["norm_decoder"] == "layer"
    # cpa-tools builds its nb decoder without the dropout it is given (issue 74's drift).
    assert config["model"]["dropout_rate_decoder"] == 0.0
    assert config["adversary"]["reg_adv"] == 20.0 and config["adversary"]["pen_adv"] == 5.0
    assert config["adversary"]["adv_steps"] == 0 and config["adversary"]["n_hidden"] == 32
    assert config["training"]["n_epochs_kl_warmup"] == 0 and config["training"]["n_epochs_pretrain_ae"] == 1
    assert config["training"]["seed"] == 6977 and config["training"]["batch_size"] == 512
    assert config["training"]["do_clip_grad"] is True and config["training"]["gradient_clip_value"] == 1.0
    # cpa-tools' schedule, no averaging, its score for early stopping and the best weights.
    assert config["training"]["lr_schedule"] == "reference" and config["training"]["ema_decay"] == 0.0
    assert config["training"]["validation_score"] == "reference-knn"
    # The run's whole configuration is the translation's: no key is left to a preset (but the
    # combination length, from setup_anndata, the draws of a variational prediction, and how often
    # the device's running metrics are read, which changes no number).
    from cpa_stream import translate

    wanted = translate.translate(MODEL, PLAN, max_epochs=3, batch_size=512, check_val_every_n_epoch=1,
                                 early_stopping_patience=5)
    for table, keys in config.items():
        left = {k: v for k, v in keys.items() if k not in wanted[table] and k not in ("max_comb_len", "n_samples", "metrics_every_n_steps")}
        assert not left, f"[{table}] keys the translation does not set: {left}"
        assert {k: v for k, v in keys.items() if k in wanted[table]} == wanted[table]
    with pytest.raises(TypeError, match="'n_latnet'"):
        cpa.CPA(adata, n_latnet=8)
    with pytest.raises(ValueError, match="use_batch_norm_encoder=True and use_layer_norm_encoder=True"):
        cpa.CPA(adata, use_batch_norm_encoder=True, use_layer_norm_encoder=True)
    fresh = cpa.CPA(adata, split_key="split", valid_split="valid", n_latent=8)
    with pytest.raises(ValueError, match="'n_steps_pretrain_ae'.*'n_epochs_pretrain_ae'"):
        fresh.train(max_epochs=1, plan_kwargs={"n_steps_pretrain_ae": 10})
    with pytest.raises(ValueError, match="unknown key 'reg_adverse'"):
        fresh.train(max_epochs=1, plan_kwargs={"reg_adverse": 1.0})
    with pytest.raises(ValueError, match=r"use_rdkit_embeddings=True needs setup_anndata\(\.\.\., smiles_key"):
        cpa.CPA(adata, use_rdkit_embeddings=True)


def test_the_split_means_what_it_means_in_cpa_tools(tutorial):
    adata, model, _ = tutorial
    # valid_split="valid" cells validate, "ood" cells are held out of training and validation.
    history = model.run.history
    assert int(history["val_cells"].dropna().iloc[-1]) == int((adata.obs["split"] == "valid").sum())
    trained_on = int(history["cells"].iloc[0])
    assert trained_on == int((adata.obs["split"] == "train").sum())
    assert list(model.test_indices) == list(np.flatnonzero(adata.obs["split"] == "ood"))
    # cpa-tools' default valid_split is "test": such cells validate.
    other = adata[:2000].copy()
    other.obs["split"] = np.where(np.arange(other.n_obs) % 5 == 0, "test", "train")
    default = cpa.CPA(other, split_key="split", **{**MODEL, "n_latent": 4})
    default.train(max_epochs=1, batch_size=256, check_val_every_n_epoch=1, threads=1)
    assert int(default.run.history["val_cells"].dropna().iloc[-1]) == int((other.obs["split"] == "test").sum())


def test_history_and_plots_have_cpa_tools_shapes(tutorial, tmp_path):
    _, model, _ = tutorial
    history = model.epoch_history
    # cpa-tools' columns, in its order: its metrics, each covariate's adversary, epoch and mode.
    heads = ["adv_cell_type", "penalty_cell_type", "acc_cell_type"]
    assert list(history.columns) == cpa.HISTORY_COLUMNS[:-2] + heads + ["epoch", "mode"]
    assert (history["mode"] == "train").sum() == 3 and (history["mode"] == "valid").sum() == 3
    assert history.loc[history["mode"] == "valid", "r2_mean"].notna().all()
    # The training rows: the training R2, and each adversary's own figures summing to the totals.
    train = history[history["mode"] == "train"]
    assert train["r2_mean"].notna().all() and (train["r2_mean"] <= 1).all(), train["r2_mean"]
    assert train["r2_var"].notna().all()
    np.testing.assert_allclose(train["adv_loss"], train["adv_perts"] + train["adv_cell_type"], rtol=1e-5)
    np.testing.assert_allclose(train["penalty_adv"], train["penalty_perts"] + train["penalty_cell_type"], rtol=1e-5)
    assert train["acc_cell_type"].between(0, 1).all()
    assert history.loc[history["mode"] == "valid", heads].isna().all().all()  # as cpa-tools' validation rows
    import matplotlib.pyplot as plt

    # cpa-tools returns nothing (a notebook would otherwise show the figure twice); the figure is
    # the current one. The disentanglement panels are drawn: compat measures them now.
    assert cpa.pl.plot_history(model, path_to_save=tmp_path / "history.png") is None
    figure = plt.gcf()
    assert (tmp_path / "history.png").stat().st_size > 0 and len(figure.axes) >= 7
    titles = {ax.get_title() for ax in figure.axes if ax.get_visible()}
    assert {"disnt_basal", "disnt_after", "r2_mean"} <= titles, titles
    assert history.loc[history["mode"] == "valid", ["disnt_basal", "disnt_after"]].notna().all().all()
    plt.close(figure)


def test_latents_and_predictions_are_the_engines_in_cpa_tools_shapes(tutorial):
    adata, model, _ = tutorial
    latents = model.get_latent_representation(adata, batch_size=2048)
    assert set(latents) == {"latent_basal", "latent_after", "latent_corrected"}
    for value in latents.values():
        assert value.shape == (adata.n_obs, 16)
        assert list(value.obs_names) == list(adata.obs_names)
        assert list(value.obs.columns) == list(adata.obs.columns)
    # The same numbers as the package's own API on the same cells.
    own = model.run.latents(adata, ["z_basal"], threads=1)
    order = pd.Index(own["cell_id"]).get_indexer(adata.obs_names)
    np.testing.assert_array_equal(latents["latent_basal"].X, own["z_basal"][order])

    model.predict(adata, batch_size=2048)
    predicted = adata.obsm["CPA_pred"]
    assert predicted.shape == adata.shape and predicted.dtype == np.float32 and np.isfinite(predicted).all()
    engine = model.run.predict_anndata(adata, source="all", threads=1)
    np.testing.assert_array_equal(predicted, engine[adata.obs_names].X)

    # The Norman tutorial's counterfactual: X replaced by sampled control cells, then predict.
    adata.layers["X_true"] = adata.X.copy()
    control = adata[adata.obs["condition"] == "control"]
    rng = np.random.default_rng(1)
    adata.X = control.X[rng.choice(control.n_obs, size=adata.n_obs, replace=True), :]
    model.predict(adata, batch_size=2048)
    counterfactual = adata.obsm["CPA_pred"]
    assert not np.array_equal(counterfactual, predicted), "a changed X must be read again"
    adata.X = adata.layers["X_true"]

    # custom_predict: the latent kinds and the predicted means, aligned with the cells.
    custom = model.custom_predict(adata=adata, add_batch=False, batch_size=2048)
    assert set(custom) == {"latent_x_pred", "latent_z", "latent_z_corrected", "latent_z_no_pert",
                           "latent_z_no_pert_corrected", "latent_z_basal"}
    assert custom["latent_x_pred"].shape == adata.shape and custom["latent_z"].shape == (adata.n_obs, 16)
    np.testing.assert_array_equal(custom["latent_x_pred"].X, predicted)
    np.testing.assert_array_equal(custom["latent_z_basal"].X, latents["latent_basal"].X)
    with pytest.raises(NotImplementedError, match="add_pert=False"):
        model.custom_predict(adata=adata, add_pert=False)

    # Some cells only: their rows, NaN elsewhere.
    model.predict(adata, indices=np.arange(10))
    assert np.isnan(adata.obsm["CPA_pred"][10:]).all()
    # (float32 sums of other batch shapes: equal to rounding)
    np.testing.assert_allclose(adata.obsm["CPA_pred"][:10], predicted[:10], rtol=1e-5, atol=1e-6)


def test_embeddings_mean_plot_and_the_api(tutorial, tmp_path):
    adata, model, _ = tutorial
    perts = model.get_pert_embeddings()
    assert perts.shape == (len(model.pert_encoder), 16)
    assert list(perts.obs["pert_name"]) == list(model.pert_encoder)
    assert not perts.X[0].any(), "<PAD> is a zero row"
    # A linear doser: the shift at dose 1 is the embedding itself, at dose 2 twice it.
    raw = model.run.perturbation_embeddings().drop(columns="is_control")
    np.testing.assert_allclose(perts.X[2], raw.loc[perts.obs["pert_name"].iloc[2]].to_numpy(), rtol=1e-6)
    double = model.get_pert_embeddings(dosage=2.0, pert=perts.obs["pert_name"].iloc[2])
    np.testing.assert_allclose(double.X[0], 2 * perts.X[2], rtol=1e-5)
    covariates = model.get_covar_embeddings("cell_type")
    assert covariates.shape == (adata.obs["cell_type"].nunique(), 16)
    with pytest.raises(ValueError, match="covariate dose not found"):
        model.get_covar_embeddings("dose")

    api = cpa.ComPertAPI(adata, model, de_genes_uns_key="none", pert_category_key="cov_cond",
                         control_group="control", experiment="gene")
    assert sum(api.num_measured_points["ood"].values()) == int((adata.obs["split"] == "ood").sum())
    assert api.get_pert_embeddings().shape == perts.shape

    model.predict(adata)
    held_out = adata[adata.obs["condition"] == HELD_OUT].copy()
    x = held_out.X.copy()
    r2, r2_degs = cpa.pl.mean_plot(held_out, pred_obsm_key="CPA_pred", path_to_save=tmp_path / "mean.png",
                                   deg_list=list(adata.var_names[:20]))
    assert (tmp_path / "mean.png").stat().st_size > 0 and -10 < r2 <= 1 and -10 < r2_degs <= 1
    assert type(held_out.X) is type(x), "mean_plot leaves X as it is"


def test_save_and_load_give_the_same_model_and_refuse_other_directories(tutorial, tmp_path):
    adata, model, saved = tutorial
    assert (saved / cpa.SAVED).is_file() and (saved / "history.csv").is_file() and (saved / "run").is_dir()
    state = json.loads((saved / cpa.SAVED).read_text())
    assert state["setup"]["perturbation_key"] == "condition"
    loaded = cpa.CPA.load(saved, adata=adata)
    assert loaded.is_trained_ and list(loaded.pert_encoder) == list(model.pert_encoder)
    loaded.threads = 1
    a = model.get_latent_representation(adata)["latent_basal"].X
    b = loaded.get_latent_representation(adata)["latent_basal"].X
    np.testing.assert_array_equal(a, b)
    # The saved run is a cpa-stream run: the package (and the command line) read it.
    assert cs.Run(saved / "run").perturbations
    # Another folder with files of its own is never replaced.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="other files"):
        model.save(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(saved)
    # Saving elsewhere points the model at the copy; the shared fixture goes back to its own
    # run afterwards, since this test's folder is removed once it passes (later tests use it).
    own = model.run
    try:
        model.save(tmp_path / "copy", save_anndata=True)
        again = cpa.CPA.load(tmp_path / "copy")
        assert again.adata.n_obs == adata.n_obs
    finally:
        model.run = own


def test_a_backed_anndata_trains_and_predicts_from_its_file(tmp_path):
    import anndata as ad

    small = _tutorial_adata()[:1500].copy()
    path = tmp_path / "small.h5ad"
    small.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    _setup(backed)
    model = cpa.CPA(backed, split_key="split", valid_split="valid", **{**MODEL, "n_latent": 4})
    model.train(max_epochs=1, batch_size=256, threads=1)
    model.predict(backed)
    assert backed.obsm["CPA_pred"].shape == backed.shape
    in_memory = ad.read_h5ad(path)
    _setup(in_memory)
    model.predict(in_memory)
    np.testing.assert_array_equal(in_memory.obsm["CPA_pred"], backed.obsm["CPA_pred"])


def test_training_again_continues_and_engine_errors_speak_of_the_anndata(adata):
    small = adata[:1500].copy()
    small.X = small.layers["counts"]
    _setup(small)
    model = cpa.CPA(small, n_latent=4, n_hidden_encoder=32, n_hidden_decoder=32)
    model.train(max_epochs=1, batch_size=256, threads=1)
    first = model.run.history
    with pytest.warns(UserWarning, match=r"training\.lr=0\.01"):
        model.train(max_epochs=2, batch_size=256, plan_kwargs={"lr": 0.01}, threads=1)
    history = model.run.history
    assert len(history) == 3 and history["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(history.iloc[:1].drop(columns="seconds"), first.drop(columns="seconds"),
                                  check_dtype=False)
    assert (model.epoch_history["mode"] == "train").sum() == 3
    # A condition the model never saw: a ValueError naming the AnnData's obs, the cell and the value.
    other = small[:20].copy()
    other.obs["condition"] = other.obs["condition"].astype(str)
    other.obs["dose"] = other.obs["dose"].astype(str)
    other.obs.iloc[0, other.obs.columns.get_loc("condition")] = "NEWDRUG"
    other.obs.iloc[0, other.obs.columns.get_loc("dose")] = "1"
    with pytest.raises(ValueError) as caught:
        model.predict(other)
    message = str(caught.value)
    assert "NEWDRUG" in message and "cpa-stream-compat-" not in message, message


def test_relabelled_control_cells_set_up_without_controls_predict_their_new_labels(tutorial):
    # cpa-tools' counterfactual idiom (issue 74 item 5): copy the control cells, give them the
    # perturbation to predict, set the copy up again (it has no control cell left) and predict.
    adata, model, _ = tutorial
    target = "KLF1"
    controls = adata[adata.obs["condition"] == "control"][:300].copy()
    model.predict(controls)
    as_control = np.asarray(controls.obsm["CPA_pred"]).copy()
    relabelled = controls.copy()
    relabelled.obs["condition"] = pd.Categorical([target] * relabelled.n_obs)
    relabelled.obs["dose"] = "1.0"
    _setup(relabelled)
    model.predict(relabelled)
    predicted = np.asarray(relabelled.obsm["CPA_pred"])
    # The same cells with the same new label, set up beside a control cell (so nothing about the
    # missing controls can matter), predict the same numbers.
    beside = anndata_concat(relabelled, adata[adata.obs["condition"] == "control"][300:301].copy())
    _setup(beside)
    model.predict(beside)
    np.testing.assert_allclose(predicted, np.asarray(beside.obsm["CPA_pred"])[:300], rtol=1e-5, atol=1e-6)
    assert np.abs(predicted - as_control).mean() > 1e-4, "the new label changed nothing: the old one was predicted"
    # Training needs control cells, and says so.
    fresh = cpa.CPA(relabelled, n_latent=8)
    with pytest.raises(ValueError, match="no cell of the AnnData has condition == 'control'.*predict"):
        fresh.train(max_epochs=1)


def anndata_concat(first, second):
    import anndata as ad

    joined = ad.concat([first, second], join="inner", merge="same")
    joined.obs["condition"] = joined.obs["condition"].astype(str)
    return joined


def test_the_model_attributes_notebooks_read(tutorial, capsys):
    # scvi-tools' attributes of a trained model (issue 74 item 4).
    adata, model, _ = tutorial
    assert model.is_trained is True
    assert list(model.validation_indices) == list(np.flatnonzero(adata.obs["split"] == "valid"))
    assert str(model.device) == "cpu"
    history = model.history
    for key in ("recon", "adv_loss", "val_recon", "val_r2_mean", "disnt_basal", "disnt_after", "cpa_metric"):
        assert key in history and list(history[key].columns) == [key] and history[key].index.name == "epoch"
    # cpa-tools' score: r2_mean + 0.5 r2_var + exp(disnt_after - disnt_basal).
    v = model.run.history.dropna(subset=["val_score"]).iloc[-1]
    expected = v["val_r2_mean"] + 0.5 * v["val_r2_var"] + np.exp(v["val_disnt_after"] - v["val_disnt_basal"])
    assert abs(history["cpa_metric"]["cpa_metric"].iloc[-1] - expected) < 1e-9
    model.view_anndata_setup()
    shown = capsys.readouterr().out
    assert "perturbation_key: condition" in shown and "cell_type (" in shown
