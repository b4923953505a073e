"""Models saved by cpa-tools 0.8.8 (``model.save(dir)``: ``model.pt`` and ``CPA_info.json``) as
cpa-stream models.

``model.pt`` is a pickle; it is read with an unpickler that builds tensors, NumPy arrays and plain
containers only: any other object the file names (pandas frames of the training history, or
anything a crafted file asks for) becomes an inert placeholder, so reading it runs no code from
it. The state dict's tensors are renamed to cpa-stream's variables, the model's settings become
its configuration through :mod:`cpa_stream.translate`, and the engine builds the model from them
(shapes checked one by one). A network cpa-stream cannot express (the ``mlp`` doser, RDKit
embeddings, both norms on one network) is refused naming the part.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from . import translate

__all__ = ["MAX_MODEL_BYTES", "convert", "main", "publish", "read_saved"]

#: Largest ``model.pt`` read (a cpa-tools model of 30,000 genes and 1,000-wide layers is ~300 MB).
MAX_MODEL_BYTES = 4 << 30
#: What ``publish`` writes into the model directories it makes (and what ``--overwrite`` replaces).
IMPORTED = "imported.json"
#: Largest ``CPA_info.json`` read.
MAX_INFO_BYTES = 64 << 20

# The globals a cpa-tools model.pt needs to give back its tensors and settings.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "bytes"), ("builtins", "slice"), ("_codecs", "encode"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
}


class _Inert:
    """What an object the reader does not build becomes: it takes any arguments and state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins"}.get(module, module)
        if (module, name) in _ALLOWED:
            if module.startswith("numpy.core"):
                try:
                    return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
                except ImportError:
                    pass
            return getattr(importlib.import_module(module), name)
        return _Inert


class _SafePickle:
    """The ``pickle_module`` torch.load is given: its Unpickler builds only what :data:`_ALLOWED`
    names."""

    Unpickler = _Unpickler
    load = staticmethod(lambda f, **kw: _Unpickler(f, **kw).load())
    __name__ = "cpa_stream.cpa_tools_model._SafePickle"


def read_saved(dir_path: str | os.PathLike) -> dict[str, Any]:
    """The parts of a cpa-tools save: ``state`` (name -> NumPy array), ``var_names``,
    ``hyper_params`` (the model's keyword arguments), ``setup`` (``setup_anndata``'s arguments),
    ``pert_encoder``, ``covars_encoder`` and ``conditions`` (the perturbation categories, in
    cpa-tools' order, when recorded)."""
    import torch

    path = Path(dir_path)
    model_file, info_file = path / "model.pt", path / "CPA_info.json"
    for f, what in ((model_file, "cpa-tools' weights"), (info_file, "cpa-tools' encoders")):
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing; a directory saved by cpa-tools' save() has model.pt and CPA_info.json")
        if not f.is_file():
            raise ValueError(f"{f}: {what} must be a regular file")
    size = model_file.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ValueError(f"{model_file}: {size:,} bytes, more than a CPA model's {MAX_MODEL_BYTES:,}")
    if info_file.stat().st_size > MAX_INFO_BYTES:
        raise ValueError(f"{info_file}: larger than {MAX_INFO_BYTES:,} bytes")
    try:
        info = json.loads(info_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{info_file}: not cpa-tools' JSON ({e})") from None
    if not zipfile.is_zipfile(model_file):
        raise ValueError(f"{model_file}: not a torch.save file (a zip archive)")
    try:
        saved = torch.load(model_file, map_location="cpu", pickle_module=_SafePickle, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged file fails anywhere in torch's reader
        raise ValueError(f"{model_file}: could not be read as cpa-tools' model ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model_state_dict"), dict):
        raise ValueError(f"{model_file}: no model_state_dict; not a model saved by cpa-tools' save()")
    state = {}
    for key, value in saved["model_state_dict"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{model_file}: model_state_dict entry {key!r} is not a tensor")
        state[key] = value.detach().to(torch.float32).numpy() if value.is_floating_point() else value.numpy()
    attrs = saved.get("attr_dict") if isinstance(saved.get("attr_dict"), dict) else {}
    init = attrs.get("init_params_") if isinstance(attrs.get("init_params_"), dict) else {}
    kwargs = init.get("kwargs") if isinstance(init.get("kwargs"), dict) else {}
    hyper = kwargs.get("hyper_params") if isinstance(kwargs.get("hyper_params"), dict) else None
    if hyper is None:
        raise ValueError(f"{model_file}: attr_dict lacks init_params_['kwargs']['hyper_params'] (the model's settings)")
    non_kwargs = init.get("non_kwargs") if isinstance(init.get("non_kwargs"), dict) else {}
    registry = attrs.get("registry_") if isinstance(attrs.get("registry_"), dict) else {}
    setup = registry.get("setup_args") if isinstance(registry.get("setup_args"), dict) else {}
    var_names = saved.get("var_names")
    if var_names is None:
        raise ValueError(f"{model_file}: no var_names")
    return {
        "state": state, "var_names": [str(v) for v in np.asarray(var_names).tolist()],
        "hyper_params": dict(hyper), "non_kwargs": dict(non_kwargs), "setup": dict(setup),
        "pert_encoder": info.get("pert_encoder"), "covars_encoder": info.get("covars_encoder") or {},
        "smiles": info.get("pert_smiles_map"), "conditions": _conditions(registry),
    }


def _conditions(registry: dict[str, Any]) -> list[str] | None:
    fields = registry.get("field_registries")
    if not isinstance(fields, dict):
        return None
    for key, field in fields.items():
        if isinstance(field, dict) and "perturbation" in str(key).lower():
            mapping = (field.get("state_registry") or {}).get("categorical_mapping")
            if mapping is not None:
                return [str(v) for v in np.asarray(mapping).tolist()]
    return None


def _norm_layers(state: dict[str, np.ndarray], prefix: str, target: str, n_layers: int, norm: str,
                 out: dict[str, np.ndarray]) -> None:
    for i in range(n_layers):
        layer = f"{prefix}.fc_layers.Layer {i}"
        out[f"{target}.layer{i}.linear.weight"] = state.pop(f"{layer}.0.weight")
        out[f"{target}.layer{i}.linear.bias"] = state.pop(f"{layer}.0.bias")
        if norm == "batch":
            for part in ("weight", "bias", "running_mean", "running_var"):
                out[f"{target}.layer{i}.norm.{part}"] = state.pop(f"{layer}.1.{part}")
            state.pop(f"{layer}.1.num_batches_tracked", None)


def convert(dir_path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Converts the cpa-tools model saved in ``dir_path`` into a cpa-stream model directory
    ``out`` (complete or not at all); returns ``{"setup", "hyper_params", "split", "summary"}``:
    what :class:`cpa_stream.compat.CPA` needs to stand for it."""
    from . import _native

    saved = read_saved(dir_path)
    origin = Path(dir_path) / "model.pt"
    hyper, setup = saved["hyper_params"], saved["setup"]
    for key in ("drug_embeddings",):
        hyper.pop(key, None)
    if saved["non_kwargs"].get("use_rdkit_embeddings") or "pert_network.pert_transformation.weight" in saved["state"]:
        raise ValueError(f"{origin}: a model with RDKit drug embeddings (use_rdkit_embeddings=True); cpa-stream's "
                         "molecule projection is another network and cannot take its weights")
    try:
        tables = translate.module_tables(hyper)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{origin}: {e}") from None
    model = tables["model"]
    if model["doser_type"] == "mlp":
        raise ValueError(f"{origin}: doser_type 'mlp': cpa-tools' per-perturbation MLP dosers (FCLayers of width 1) "
                         "are another network than cpa-stream's mlp doser; not converted")
    if model["variational"]:
        raise ValueError(f"{origin}: a variational model (variational=True): its encoder's variance head is not "
                         "converted; train it again with cpa-stream")
    control = setup.get("control_group") or _control_of(saved["pert_encoder"])
    config = translate.translate(hyper, n_cells=1)
    config["model"]["max_comb_len"] = int(setup.get("max_comb_len", 2))
    state = dict(saved["state"])
    vocabulary, pert_rows = _vocabulary(saved, control, origin)
    weights = _weights(state, config["model"], saved, pert_rows, origin)
    if state:
        left = ", ".join(sorted(state)[:5])
        raise ValueError(f"{origin}: parts of the state dict cpa-stream has no place for: {left}")
    with tempfile.TemporaryDirectory(prefix="cpa-tools-import-") as tmp:
        file = Path(tmp) / "weights.safetensors"
        _write_safetensors(file, weights)
        summary = json.loads(_native.import_model(json.dumps(config), json.dumps(vocabulary), str(file), os.fspath(out)))
    split = {k: saved["non_kwargs"].get(k) for k in ("split_key", "train_split", "valid_split", "test_split")}
    return {"setup": {**setup, "control_group": control}, "hyper_params": hyper, "split": split, "summary": summary}


def _control_of(pert_encoder: dict[str, int] | None) -> str:
    if not pert_encoder:
        raise ValueError("CPA_info.json: no pert_encoder")
    by_id = {v: k for k, v in pert_encoder.items()}
    if 1 not in by_id:
        raise ValueError("CPA_info.json: pert_encoder has no entry 1 (cpa-tools' control)")
    return by_id[1]


def _vocabulary(saved: dict[str, Any], control: str, origin: Path) -> tuple[dict[str, Any], list[int]]:
    encoder = saved["pert_encoder"]
    if not isinstance(encoder, dict) or not encoder:
        raise ValueError(f"{origin.parent / 'CPA_info.json'}: no pert_encoder")
    names = [n for n in encoder if encoder[n] != 0 and n != control]
    perturbations = ["<pad>", control, *sorted(names)]
    rows = [0, encoder[control], *[encoder[n] for n in sorted(names)]]
    covariates = []
    for key, values in saved["covars_encoder"].items():
        order = sorted(values, key=values.get)
        if [values[v] for v in order] != list(range(len(order))):
            raise ValueError(f"{origin.parent / 'CPA_info.json'}: covars_encoder[{key!r}] codes are not 0..n-1")
        covariates.append({"name": key, "categories": order, "is_batch": key == saved["setup"].get("batch_key")})
    conditions = saved["conditions"] or [control, *sorted(names)]
    canonical = []
    for c in conditions:
        parts = sorted(p for p in str(c).split("+") if p)
        canonical.append("+".join(parts) if parts else str(c))
    canonical = list(dict.fromkeys(canonical))
    setup = saved["setup"]
    split_key = saved["non_kwargs"].get("split_key")
    data = {
        "perturbation_key": setup.get("perturbation_key", "condition"),
        "dose_key": setup.get("dosage_key"),
        "split": {"column": split_key} if split_key else {"fraction": {"validation": 0.1, "test": 0.0, "seed": 0,
                                                                        "holdout": []}},
    }
    vocabulary = {
        "genes": saved["var_names"], "perturbations": perturbations, "covariates": covariates,
        "conditions": canonical, "condition_counts": [1] * len(canonical), "data": data,
    }
    return vocabulary, rows


def _weights(state: dict[str, np.ndarray], model: dict[str, Any], saved: dict[str, Any], pert_rows: list[int],
             origin: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"{origin}: the state dict has no {key!r}, which a model of these settings has")
        return state.pop(key)

    try:
        _norm_layers(state, "encoder.network", "ae.encoder.body", model["n_layers_encoder"], model["norm_encoder"], out)
        _norm_layers(state, "decoder.px_decoder", "ae.decoder.body", model["n_layers_decoder"], model["norm_decoder"],
                     out)
    except KeyError as e:
        raise ValueError(f"{origin}: the state dict has no {e.args[0]!r}, which a model of these settings has") from None
    out["ae.encoder.mean.weight"] = take("encoder.z.weight")
    out["ae.encoder.mean.bias"] = take("encoder.z.bias")
    recon = model["recon_loss"]
    if recon in ("nb", "zinb"):
        out["ae.decoder.scale.weight"] = take("decoder.px_scale_decoder.0.weight")
        out["ae.decoder.scale.bias"] = take("decoder.px_scale_decoder.0.bias")
        out["ae.log_theta"] = take("px_r")
        # scvi's DecoderSCVI always builds these heads; a gene-wise dispersion never uses the
        # first, and only zinb the second.
        state.pop("decoder.px_r_decoder.weight", None)
        state.pop("decoder.px_r_decoder.bias", None)
        zi_w, zi_b = take("decoder.px_dropout_decoder.weight"), take("decoder.px_dropout_decoder.bias")
        if recon == "zinb":
            out["ae.decoder.zero_inflation.weight"], out["ae.decoder.zero_inflation.bias"] = zi_w, zi_b
    else:
        raise ValueError(f"{origin}: recon_loss {recon!r}: cpa-tools' Gaussian decoder (scvi's Encoder with a "
                         "variance head) is not converted; nb and zinb models are")
    embedding = take("pert_network.pert_embedding.weight")
    out["ae.perturbation_embedding"] = embedding[pert_rows]
    if model["doser_type"] in ("logsigm", "sigm"):
        out["doser.beta"] = take("pert_network.dosers.beta").reshape(-1)[pert_rows]
        out["doser.bias"] = take("pert_network.dosers.bias").reshape(-1)[pert_rows]
    for i, key in enumerate(saved["covars_encoder"]):
        out[f"ae.covariate_embedding{i}"] = take(f"covars_embeddings.{key}.weight")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, Any] = {}
    offset = 0
    for name in sorted(tensors):
        size = tensors[name].nbytes
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    buffer = io.BytesIO()
    buffer.write(struct.pack("<Q", len(text)))
    buffer.write(text)
    for name in sorted(tensors):
        buffer.write(np.asarray(tensors[name], dtype="<f4").tobytes())
    path.write_bytes(buffer.getvalue())


def publish(dir_path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """:func:`convert` into ``out`` as a whole: built beside it under a temporary name and
    renamed into place once complete, with ``imported.json`` (where it came from). An existing
    ``out`` is replaced only with ``overwrite`` and only when this conversion wrote it (its
    ``imported.json``): a trained run's model, a file, a link or another directory is refused."""
    import shutil

    target = Path(out)
    if target.is_symlink() or target.exists():
        if not overwrite:
            raise FileExistsError(f"{target}: exists; pass --overwrite to replace a model converted before")
        if target.is_symlink() or not target.is_dir() or not (target / IMPORTED).is_file():
            raise FileExistsError(f"{target}: not a model directory import-model wrote (no {IMPORTED}); not replaced")
    target.parent.mkdir(parents=True, exist_ok=True)
    building = target.parent / f".{target.name}.import-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    try:
        converted = convert(dir_path, building)
        (building / IMPORTED).write_text(json.dumps({"from": os.path.abspath(dir_path), **converted["summary"]}))
        if target.exists():
            os.replace(target, old)
        os.replace(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return converted


def main(argv: list[str] | None = None) -> int:
    """``python -m cpa_stream.cpa_tools_model DIR --out MODEL`` (what ``cpa-stream import-model``
    runs): converts a model saved by cpa-tools 0.8.8 into a cpa-stream model directory that
    ``cpa-stream predict --model MODEL`` and ``cs.Run`` read."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="cpa-stream import-model", description=main.__doc__)
    parser.add_argument("dir", help="the directory cpa-tools' model.save() wrote (model.pt)")
    parser.add_argument("--out", required=True, help="the cpa-stream model directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a model directory converted before")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        converted = publish(args.dir, args.out, overwrite=args.overwrite)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = converted["summary"]
    report = {"model": os.path.abspath(args.out), "from": os.path.abspath(args.dir), **summary,
              "setup": converted["setup"], "hyper_params": converted["hyper_params"], "split": converted["split"]}
    if args.json:
        print(json.dumps(report, default=str))
    else:
        setup = converted["setup"]
        print(f"{args.dir} (cpa-tools) -> {args.out}: {summary.get('copied')} tensors copied, "
              f"{summary.get('n_parameters', 0):,} parameters")
        left = summary.get("initialised") or []
        if left:
            print(f"left as initialised (cpa-tools saves no state for them): {len(left)} adversary tensors")
        print(f"labels: perturbation {setup.get('perturbation_key')!r} (control {setup.get('control_group')!r}), "
              f"dose {setup.get('dosage_key')!r}, covariates {setup.get('categorical_covariate_keys')}; "
              f"predict with: cpa-stream predict --model {args.out} --store STORE ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
