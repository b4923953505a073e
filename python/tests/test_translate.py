"""The one translation of cpa-tools' parameters (issue 74 item 1): compat trains with exactly the
configuration the fidelity harness compares with; every parameter of cpa-tools 0.8.8's model,
training plan and ``train`` is translated or listed; cpa-tools' defaults are its own (checked
against the installed cpa-tools where the peer environment is present); docs' table is the
module's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import cpa_stream._run as _run
import cpa_stream.compat as cpa
from cpa_stream import translate as t
from conftest import BUNDLED, NO_PEER, peer_python

REPO = Path(__file__).resolve().parents[2]

# The Kang tutorial's parameters (cpa-tools' docs/tutorials), decoder dropout and all.
KANG_MODEL = {
    "n_latent": 64, "recon_loss": "nb", "doser_type": "linear", "n_hidden_encoder": 128, "n_layers_encoder": 2,
    "n_hidden_decoder": 512, "n_layers_decoder": 2, "use_batch_norm_encoder": True, "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": False, "use_layer_norm_decoder": True, "dropout_rate_encoder": 0.0,
    "dropout_rate_decoder": 0.1, "variational": False, "seed": 6977,
}
KANG_PLAN = {
    "n_epochs_kl_warmup": None, "n_epochs_pretrain_ae": 30, "n_epochs_adv_warmup": 50, "n_epochs_mixup_warmup": 0,
    "mixup_alpha": 0.0, "adv_steps": None, "n_hidden_adv": 64, "n_layers_adv": 3, "use_batch_norm_adv": True,
    "use_layer_norm_adv": False, "dropout_rate_adv": 0.3, "reg_adv": 20.0, "pen_adv": 5.0, "lr": 0.0003,
    "wd": 4e-07, "adv_lr": 0.0003, "adv_wd": 4e-07, "adv_loss": "cce", "doser_lr": 0.0003, "doser_wd": 4e-07,
    "do_clip_grad": True, "gradient_clip_value": 1.0, "step_size_lr": 10,
}


class _Stop(Exception):
    pass


def _compat_config(monkeypatch, model_params, plan, **train):
    """The configuration compat hands the engine, caught before anything trains."""
    import anndata as ad

    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(_run, "train", capture)
    adata = ad.read_h5ad(BUNDLED)[:400].copy()
    adata.X = adata.layers["counts"].copy()
    cpa.CPA.setup_anndata(adata, perturbation_key="condition", control_group="control", dosage_key="dose",
                          categorical_covariate_keys=["cell_type"], max_comb_len=2)
    model = cpa.CPA(adata, **model_params)
    with pytest.raises(_Stop):
        model.train(plan_kwargs=plan, **train)
    return seen["config"]


def _fidelity():
    from cpa_stream import fidelity

    return fidelity


def test_compat_and_the_fidelity_harness_train_the_same_configuration(monkeypatch):
    # The drift of issue 74: compat passed the decoder's dropout through and trained on the
    # `reference` preset's keys, the harness dropped it and used the defaults' schedule and
    # averaging. Both now hand over one translation.
    compat = _compat_config(monkeypatch, KANG_MODEL, KANG_PLAN, max_epochs=40, batch_size=512,
                            check_val_every_n_epoch=5, early_stopping_patience=5)
    harness, unexpressed = _fidelity().translate(KANG_MODEL, KANG_PLAN, batch_size=512, check_val_every=5,
                                                 max_comb_len=2, epochs=40, seed=6977)
    harness["training"]["early_stopping_patience"] = 5  # run_peer.py turns early stopping off
    assert compat == harness
    assert compat["model"]["dropout_rate_decoder"] == 0.0
    assert compat["training"]["lr_schedule"] == "reference" and compat["training"]["ema_decay"] == 0.0
    assert compat["training"]["validation_score"] == "reference-knn"
    assert any(u.startswith("seed:") for u in unexpressed)


def test_cpa_tools_defaults_are_filled_in_where_a_key_is_left_out():
    config = t.translate(n_cells=5000)
    m, a, tr = config["model"], config["adversary"], config["training"]
    assert (m["n_latent"], m["doser_type"], m["n_hidden_encoder"], m["n_layers_encoder"]) == (128, "logsigm", 256, 3)
    assert (m["norm_encoder"], m["norm_decoder"]) == ("batch", "batch")
    assert (a["adv_steps"], a["reg_adv"], a["pen_adv"], a["dropout_rate"], a["n_hidden"]) == (3, 1.0, 1.0, 0.1, 64)
    assert (tr["lr"], tr["wd"], tr["step_size_lr"], tr["do_clip_grad"], tr["gradient_clip_value"]) == (
        5e-4, 1e-6, 45, False, 3.0)
    assert (tr["batch_size"], tr["check_val_every_n_epoch"], tr["early_stopping_patience"]) == (128, 10, 10)
    # cpa-tools' epoch rule: min(round(20000 / cells * 400), 400).
    assert tr["max_epochs"] == 400 and t.translate(n_cells=100_000)["training"]["max_epochs"] == 80


def test_what_cpa_tools_does_with_a_key_is_what_it_becomes():
    # nb/zinb decoders have no dropout in cpa-tools; the Gaussian one does.
    assert t.translate({"dropout_rate_decoder": 0.2}, n_cells=10)["model"]["dropout_rate_decoder"] == 0.0
    gauss = t.translate({"dropout_rate_decoder": 0.2, "recon_loss": "GAUSS"}, n_cells=10)["model"]
    assert (gauss["dropout_rate_decoder"], gauss["recon_loss"]) == (0.2, "gauss")
    # cpa-tools' mixup ramp stays at 0 when pre-training is also set.
    plan = {"n_epochs_pretrain_ae": 5, "n_epochs_mixup_warmup": 3, "mixup_alpha": 0.1}
    assert t.translate(plan_kwargs=plan, n_cells=10)["training"]["mixup_alpha"] == 0.0
    plan["n_epochs_pretrain_ae"] = None
    assert t.translate(plan_kwargs=plan, n_cells=10)["training"]["mixup_alpha"] == 0.1
    # None means off or "every batch".
    none = t.translate(plan_kwargs={"adv_steps": None, "step_size_lr": None, "n_epochs_adv_warmup": None}, n_cells=10)
    assert none["adversary"]["adv_steps"] == 0 and none["training"]["step_size_lr"] == 0
    assert none["training"]["n_epochs_adv_warmup"] == 0
    with pytest.raises(ValueError, match="adv_steps"):
        t.translate(plan_kwargs={"adv_steps": 0}, n_cells=10)
    with pytest.raises(ValueError, match="n_epochs_pretrain_ae=2.5"):
        t.translate(plan_kwargs={"n_epochs_pretrain_ae": 2.5}, n_cells=10)
    with pytest.raises(ValueError, match="'n_steps_adv_warmup'.*'n_epochs_adv_warmup'"):
        t.translate(plan_kwargs={"n_steps_adv_warmup": 100}, n_cells=10)
    with pytest.raises(TypeError, match="'n_latnet'"):
        t.translate({"n_latnet": 3}, n_cells=10)
    with pytest.raises(ValueError, match="train\\(batch_size=0\\)"):
        t.translate(n_cells=10, batch_size=0)
    with pytest.warns(UserWarning, match="n_epochs_verbose"):
        t.translate(plan_kwargs={"n_epochs_verbose": 5}, n_cells=10)


def test_every_cpa_tools_parameter_is_translated_or_listed():
    named = {n for p in t.PARAMETERS for n in p.name.split(", ")}
    wanted = set(t.MODULE_DEFAULTS) | set(t.PLAN_DEFAULTS) | set(t.TRAIN_DEFAULTS) - {"plan_kwargs"}
    assert wanted - named == set(), "parameters without a row"
    assert named - wanted == set(), "rows for parameters cpa-tools does not have"
    assert all(p.status in ("same", "differs") for p in t.PARAMETERS)


def test_docs_table_is_the_modules():
    docs = (REPO / "docs" / "python.md").read_text()
    assert t.markdown_table() in docs, "docs/python.md's parameter table differs from markdown_table(); paste it"


def test_the_defaults_are_cpa_tools_own():
    peer = peer_python()
    if peer is None:
        pytest.skip(NO_PEER)
    probe = (
        "import inspect, json, cpa\n"
        "from cpa._module import CPAModule\nfrom cpa._task import CPATrainingPlan\n"
        "def d(f, skip):\n"
        "    return {k: v.default for k, v in inspect.signature(f).parameters.items()\n"
        "            if k not in skip and v.default is not inspect.Parameter.empty}\n"
        "print(json.dumps({'module': d(CPAModule.__init__, {'drug_embeddings'}),\n"
        "                  'plan': d(CPATrainingPlan.__init__, {'drug_weights'}),\n"
        "                  'train': d(cpa.CPA.train, set()), 'version': cpa.__version__}))\n"
    )
    out = subprocess.run([peer, "-c", probe], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        pytest.skip(f"cpa-tools would not import in the peer environment: {out.stderr[-300:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["version"].startswith("0.8.8"), found["version"]
    assert found["module"] == t.MODULE_DEFAULTS
    assert found["plan"] == t.PLAN_DEFAULTS
    assert found["train"] == t.TRAIN_DEFAULTS
