"""cpa-tools' ``ComPertAPI`` on a :class:`cpa_stream.compat.CPA` model (``cpa.ComPertAPI``).

The calls and the frames they return are cpa-tools 0.8.8's: the learned dose responses in the
latent space (``latent_dose_response``, ``latent_dose_response2D``), the distance of a condition
to those trained on (``compute_comb_emb``, ``compute_uncertainty``), counterfactual predictions
from given cells (``predict``), decoded and measured responses (``get_response``,
``get_response2D``, ``get_response_reference``) and the R2 table (``evaluate_r2``). Where
cpa-tools 0.8.8's own code cannot run (its ``predict`` expects a ``CPA.predict`` that returns
means and variances, which 0.8.8's does not; its categories split at every ``_``), these work
and do what the docstrings there say; docs/python.md lists each difference.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .compat import CPA

#: The padding entry of cpa-tools' perturbation vocabulary.
PAD = "<PAD>"


def _dose_text(condition: str) -> str:
    return "+".join("1.0" for _ in str(condition).split("+"))


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _r2(true: np.ndarray, pred: np.ndarray) -> float:
    """sklearn's ``r2_score`` of two vectors (1 - residual / total sum of squares)."""
    total = ((true - true.mean()) ** 2).sum()
    residual = ((true - pred) ** 2).sum()
    if total == 0:
        return 1.0 if residual == 0 else 0.0
    return float(1 - residual / total)


class ComPertAPI:
    """cpa-tools' ``ComPertAPI``: ``ComPertAPI(adata, model, de_genes_uns_key=...,
    pert_category_key="cov_drug_dose_name", control_group="ctrl", experiment="drug")``.

    ``pert_category_key`` names an obs column of ``cov_pert_dose`` categories (``experiment="drug"``)
    or ``cov_pert`` (``"gene"``, doses 1). The covariate part may itself hold ``_`` when it
    is one value of a covariate (cpa-tools splits at every ``_`` and fails there). Unlike
    cpa-tools, ``adata.obs`` is not given a ``control`` column."""

    def __init__(self, adata: Any, model: CPA, de_genes_uns_key: str = "rank_genes_groups_cov",
                 pert_category_key: str = "cov_drug_dose_name", control_group: str = "ctrl",
                 experiment: str = "drug") -> None:
        if pert_category_key not in adata.obs.columns:
            raise ValueError(f"pert_category_key {pert_category_key!r} is not an obs column")
        self.model, self.adata = model, adata
        self.var_names = adata.var_names
        self.control_group = control_group
        self.control_key = "control"
        self.experiment = experiment.lower()
        if self.experiment not in ("drug", "gene"):
            raise ValueError(f"experiment {experiment!r}: expected 'drug' or 'gene'")
        self.de_genes = adata.uns.get(de_genes_uns_key)
        self.split_key = model.split_key
        self.perturbation_key = model._setup["perturbation_key"]
        self.dose_key = model._setup.get("dosage_key")
        self.covars_key = list(model._setup.get("categorical_covariate_keys", []))
        self.unique_perts = list(model.pert_encoder)
        self.unique_covars = {k: list(v) for k, v in model.covars_encoder.items()}
        self.num_drugs = len(model.pert_encoder)
        self.perts_dict = dict(model.pert_encoder)
        self.covars_dict = {k: dict(v) for k, v in model.covars_encoder.items()}
        self.pert_categories_key = pert_category_key
        self.emb_covars = self.emb_perts = self.comb_emb = self.control_cat = None
        self._control = (adata.obs[self.perturbation_key].astype(str) == control_group).to_numpy()
        categories = adata.obs[pert_category_key].astype(str)
        splits = adata.obs[self.split_key].astype(str) if self.split_key is not None else None
        kinds = (sorted(splits.unique()) if splits is not None else []) + ["all"]
        self.adatas: dict[str, Any] = {}
        self.seen_covars_perts: dict[str, np.ndarray] = {}
        self.num_measured_points: dict[str, dict[str, int]] = {}
        self.measured_points: dict[str, dict[str, dict[str, list[Any]]]] = {}
        for kind in kinds:
            mask = np.ones(adata.n_obs, bool) if kind == "all" else (splits == kind).to_numpy()
            self.adatas[kind] = adata if kind == "all" else adata[mask]
            counts = categories[mask].value_counts(sort=False)
            self.seen_covars_perts[kind] = np.array(sorted(counts.index))
            self.num_measured_points[kind] = {str(k): int(v) for k, v in sorted(counts.items())}
            points: dict[str, dict[str, list[Any]]] = {}
            for category in sorted(counts.index):
                covs, pert, dose = self._parse(category)
                value: Any = float(dose) if "+" not in dose else dose
                points.setdefault("_".join(covs), {}).setdefault(pert, []).append(value)
            self.measured_points[kind] = points
        self._scale_cache: dict[float, dict[str, float]] = {}
        self._perts_table: pd.DataFrame | None = None
        self._covars_table: pd.DataFrame | None = None

    # -- the model's latent pieces --------------------------------------------------------------

    def _parse(self, category: str) -> tuple[list[str], str, str]:
        """(covariate values, perturbation, dose text) of a ``pert_category_key`` value."""
        parts = str(category).split("_")
        if self.experiment == "drug" and len(parts) >= 3:
            covs, pert, dose = parts[:-2], parts[-2], parts[-1]
        else:
            covs, pert = parts[:-1], parts[-1]
            dose = _dose_text(pert)
        if len(covs) > len(self.covars_key) and self.covars_key:
            # A covariate value that holds "_" (cpa-tools fails there): the longest known value.
            joined = "_".join(covs)
            known = [v for values in self.unique_covars.values() for v in values]
            covs = [joined] if joined in known else covs
        return covs, pert, dose

    def _scales(self, doses: Sequence[float]) -> dict[float, dict[str, float]]:
        """The learned dose response s_p(d) of every perturbation at ``doses`` (one engine call
        for the doses not asked before)."""
        missing = sorted({float(d) for d in doses} - set(self._scale_cache))
        if missing:
            frame = self.model._trained().dose_response(
                doses=missing, plots=False, progress=False, threads=self.model.threads
            )["latent"]
            for dose, part in frame.groupby("dose"):
                self._scale_cache[float(dose)] = dict(zip(part["perturbation"].astype(str), part["response"]))
            for dose in missing:
                self._scale_cache.setdefault(dose, {})
        return {float(d): self._scale_cache[float(d)] for d in doses}

    def _perturbation_vectors(self) -> pd.DataFrame:
        if self._perts_table is None:
            self._perts_table = self.model._trained().perturbation_embeddings().drop(columns="is_control")
        return self._perts_table

    def _covariate_vectors(self) -> pd.DataFrame:
        if self._covars_table is None:
            self._covars_table = self.model._trained().covariate_embeddings()
        return self._covars_table

    def _covariates(self, covs: Sequence[str]) -> list[str | None]:
        """A category's covariate values, one per covariate key (None where it names fewer)."""
        return ([*covs] + [None] * len(self.covars_key))[: len(self.covars_key)]

    def _check_perturbations(self, perturbations: Sequence[str]) -> list[str]:
        known = self._perturbation_vectors().index
        names = [str(p) for p in perturbations]
        unknown = [p for p in names if p not in known]
        if unknown:
            raise ValueError(f"perturbation {unknown[0]!r}: not one of the model's ({', '.join(map(str, known))})")
        return names

    def _default_perturbations(self) -> list[str]:
        return [p for p in self.unique_perts if p not in (PAD, self.control_group)]

    def _condition_vector(self, covs: Sequence[str], pert: str, dose: str | float) -> np.ndarray:
        """The latent shift of a condition: each part's embedding times its learned response
        at its dose, plus the embedding of each covariate value (cpa-tools' ``comb_emb`` rows)."""
        parts = str(pert).split("+")
        doses = [float(d) for d in str(dose).split("+")] if isinstance(dose, str) else [float(dose)] * len(parts)
        if len(doses) != len(parts):
            raise ValueError(f"condition {pert!r} with doses {dose!r}: one dose per '+'-part expected")
        table = self._perturbation_vectors()
        scales = self._scales(doses)
        vector = np.zeros(table.shape[1])
        for name, d in zip(parts, doses):
            if name == self.control_group:
                continue
            self._check_perturbations([name])
            vector += table.loc[name].to_numpy(np.float64) * scales[d].get(name, d)
        covariates = self._covariate_vectors()
        for value in covs:
            for covariate, values in self.unique_covars.items():
                if value in values:
                    vector += covariates.loc[(covariate, value)].to_numpy(np.float64)
                    break
        return vector

    # -- latent dose responses ------------------------------------------------------------------

    def get_pert_embeddings(self, dose: float = 1.0) -> Any:
        """The perturbations' latent shifts at ``dose`` (AnnData, ``obs['pert_name']``)."""
        return self.model.get_pert_embeddings(dosage=float(dose))

    def get_covars_embeddings(self, covariate: str) -> Any:
        """A covariate's embeddings (AnnData, ``obs[covariate]``)."""
        return self.model.get_covar_embeddings(covariate)

    def latent_dose_response(self, perturbations: Sequence[str] | None = None, dose: Sequence[float] | None = None,
                             contvar_min: float = 0, contvar_max: float = 1, n_points: int = 100) -> pd.DataFrame:
        """Each perturbation's learned dose response s(d) over ``dose`` (default ``n_points``
        from ``contvar_min`` to ``contvar_max``): columns perturbation key, dose key,
        ``response``. Default perturbations: the model's, less the control and ``<PAD>``."""
        names = self._check_perturbations(perturbations if perturbations is not None else self._default_perturbations())
        doses = np.linspace(contvar_min, contvar_max, n_points) if dose is None else np.asarray(dose, float)
        scales = self._scales(doses)
        rows = [(p, float(d), float(scales[float(d)].get(p, np.nan))) for p in names for d in doses]
        return pd.DataFrame(rows, columns=[self.perturbation_key, self.dose_key or "dose", "response"])

    def latent_dose_response2D(self, perturbations: Sequence[str], dose: Sequence[float] | None = None,
                               contvar_min: float = 0, contvar_max: float = 1, n_points: int = 100) -> pd.DataFrame:
        """The summed responses of two perturbations over a grid of their doses: columns the two
        names (their doses) and ``response`` = s_1(d_1) + s_2(d_2), ``len(dose)**2`` rows."""
        if perturbations is None or len(perturbations) != 2:
            raise ValueError("latent_dose_response2D: give a list of 2 perturbations")
        names = self._check_perturbations(perturbations)
        doses = np.linspace(contvar_min, contvar_max, n_points) if dose is None else np.asarray(dose, float)
        scales = self._scales(doses)
        rows = [
            (float(a), float(b), scales[float(a)].get(names[0], np.nan) + scales[float(b)].get(names[1], np.nan))
            for a in doses for b in doses
        ]
        return pd.DataFrame(rows, columns=[*names, "response"])

    # -- uncertainty ----------------------------------------------------------------------------

    def compute_comb_emb(self, thrh: int = 30) -> None:
        """``self.comb_emb``: an AnnData of the latent vector (perturbation shift at its dose
        plus covariate embeddings) of every ``pert_category_key`` value of the training split
        with more than ``thrh`` cells (``obs['cov_pert']``)."""
        import anndata as ad

        kind = "train" if "train" in self.num_measured_points else "all"
        chosen = [c for c, n in self.num_measured_points[kind].items() if n > thrh]
        if not chosen:
            raise ValueError(f"compute_comb_emb: no {kind} condition has more than {thrh} cells (thrh)")
        rows = []
        for category in chosen:
            covs, pert, dose = self._parse(category)
            rows.append(self._condition_vector(covs, pert, dose))
        self.comb_emb = ad.AnnData(X=np.vstack(rows).astype(np.float32))
        self.comb_emb.obs["cov_pert"] = chosen
        self.comb_emb.obs_names = [str(i) for i in range(len(chosen))]

    def compute_uncertainty(self, covs: Sequence[str], pert: str, dose: str | float,
                            thrh: int = 30) -> tuple[float, float, str, str]:
        """The distance of a condition's latent vector to the closest trained condition (the
        proxy of uncertainty of cpa-tools): ``(min cosine distance, min euclidean distance,
        closest by cosine, closest by euclidean)``."""
        if self.comb_emb is None:
            self.compute_comb_emb(thrh=thrh)
        vector = self._condition_vector(list(covs), pert, dose)
        trained = np.asarray(self.comb_emb.X, np.float64)
        norms = np.linalg.norm(trained, axis=1) * max(np.linalg.norm(vector), 1e-12)
        cosine = 1 - trained @ vector / np.maximum(norms, 1e-12)
        euclidean = np.linalg.norm(trained - vector, axis=1)
        names = self.comb_emb.obs["cov_pert"].to_numpy()
        return (float(cosine.min()), float(euclidean.min()), str(names[cosine.argmin()]),
                str(names[euclidean.argmin()]))

    # -- predictions ----------------------------------------------------------------------------

    def predict(self, genes: Any, df: pd.DataFrame, uncertainty: bool = True, sample: bool = False,
                n_samples: int = 10) -> Any:
        """The cells ``genes`` (cells x genes, the model's genes) under each row of ``df``
        (columns: the perturbation key, the dose key, the covariate keys): an AnnData of the
        predicted means, one block of ``len(genes)`` rows per row of ``df``, its ``obs`` the
        row (with ``uncertainty_cosine``, ``uncertainty_euclidean``, ``closest_cond_cosine``,
        ``closest_cond_euclidean`` when ``uncertainty``). One engine run for all rows.
        ``sample=True`` is refused (the means are the prediction; cpa-tools samples a normal
        around them, which is not the model's likelihood)."""
        import anndata as ad
        import scipy.sparse as sp

        if sample:
            raise NotImplementedError("predict(sample=True): cpa-stream returns the predicted means")
        df = df.reset_index(drop=True)
        needed = [self.perturbation_key, *([self.dose_key] if self.dose_key else []), *self.covars_key]
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise ValueError(f"predict: df lacks the column(s) {', '.join(missing)}; it has {', '.join(df.columns)}")
        if genes.shape[1] != len(self.var_names):
            raise ValueError(f"predict: genes has {genes.shape[1]} columns; the model has {len(self.var_names)} genes")
        n = genes.shape[0]
        if n == 0 or len(df) == 0:
            raise ValueError("predict: no cells (genes) or no conditions (df) to predict")
        block = sp.csr_matrix(genes) if sp.issparse(genes) else np.asarray(genes)
        x = sp.vstack([block] * len(df)).tocsr() if sp.issparse(block) else np.vstack([block] * len(df))
        obs = pd.DataFrame({c: np.repeat(df[c].astype(str).to_numpy(), n) for c in needed})
        setup = self.model._setup
        if setup.get("deg_uns_cat_key") and setup["deg_uns_cat_key"] not in obs:
            obs[setup["deg_uns_cat_key"]] = "none"
        obs.index = [str(i) for i in range(len(obs))]
        feed = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=self.var_names))
        if setup.get("layer"):
            feed.layers[setup["layer"]] = x
        self.model.predict(feed, batch_size=1024)
        means = feed.obsm[f"{type(self.model).__name__}_pred"]
        described = pd.DataFrame(np.repeat(df.to_numpy(), n, axis=0), columns=df.columns,
                                 index=[str(i) for i in range(n * len(df))])
        if uncertainty:
            found = [self.compute_uncertainty([str(row[c]) for c in self.covars_key], str(row[self.perturbation_key]),
                                              str(row[self.dose_key]) if self.dose_key else
                                              _dose_text(row[self.perturbation_key]))
                     for _, row in df.iterrows()]
            for i, name in enumerate(["uncertainty_cosine", "uncertainty_euclidean", "closest_cond_cosine",
                                      "closest_cond_euclidean"]):
                described[name] = np.repeat([f[i] for f in found], n)
        out = ad.AnnData(X=np.asarray(means, np.float32), obs=described, var=pd.DataFrame(index=self.var_names))
        return out

    def _controls(self, split: str, covariate_value: str | None, ncells_max: int,
                  rng: np.random.Generator) -> np.ndarray:
        """Up to ``ncells_max`` control cells of ``split`` (``all`` for every cell) with the
        first covariate at ``covariate_value`` (all control cells of the split when it has
        none, as cpa-tools warns and does)."""
        if split not in self.adatas:
            raise ValueError(f"no split {split!r}; the data have {', '.join(self.adatas)}")
        mask = self._control.copy()
        if split != "all":
            mask &= (self.adata.obs[self.split_key].astype(str) == split).to_numpy()
        if covariate_value is not None and self.covars_key:
            of_value = mask & (self.adata.obs[self.covars_key[0]].astype(str) == covariate_value).to_numpy()
            if of_value.any():
                mask = of_value
            else:
                print(f"Warning! No control cells of {covariate_value} in {split}: taking control cells of all")
        index = np.flatnonzero(mask)
        if len(index) == 0:
            raise ValueError(f"no control cells ({self.control_group}) in split {split!r}")
        if len(index) > ncells_max:
            index = np.sort(rng.choice(index, ncells_max, replace=False))
        return index

    def _x(self, index: np.ndarray) -> Any:
        layer = self.model._setup.get("layer")
        matrix = self.adata.layers[layer] if layer else self.adata.X
        return matrix[index]

    def get_response(self, doses: Sequence[float] | None = None, contvar_min: float | None = None,
                     contvar_max: float | None = None, n_points: int = 50, ncells_max: int = 100,
                     perturbations: Sequence[str] | None = None, control_name: str = "test_control",
                     seed: int = 0) -> pd.DataFrame:
        """The decoded response: for each value of the first covariate, each perturbation and
        dose, the mean prediction from up to ``ncells_max`` control cells of the split named by
        ``control_name`` (``"<split>_control"``) minus their observed mean; columns the
        covariate keys, perturbation key, dose key, ``response`` (the change's length) and one
        per gene. ``seed`` picks the cells (cpa-tools uses numpy's global state)."""
        split = control_name.split("_")[0]
        doses = np.linspace(contvar_min or 0.0, 1.0 if contvar_max is None else contvar_max, n_points) \
            if doses is None else np.asarray(doses, float)
        names = self._check_perturbations(perturbations if perturbations is not None else self._default_perturbations())
        rng = np.random.default_rng(seed)
        values = self.unique_covars[self.covars_key[0]] if self.covars_key else [None]
        frames = []
        for value in values:
            cells = self._controls(split, value, ncells_max, rng)
            x = self._x(cells)
            control = _dense(x).mean(axis=0)
            rows = pd.DataFrame([(p, f"{d}") for p in names for d in doses], columns=[self.perturbation_key, "_dose"])
            table = self._table(rows, value, cells)
            predicted = self.predict(x, table, uncertainty=False).X.reshape(len(rows), len(cells), -1).mean(axis=1)
            delta = predicted - control
            frame = pd.DataFrame(delta, columns=list(self.var_names))
            frame.insert(0, "response", np.linalg.norm(delta, axis=1))
            frame.insert(0, self.dose_key or "dose", [float(d) for _ in names for d in doses])
            frame.insert(0, self.perturbation_key, [p for p in names for _ in doses])
            for i, key in enumerate(self.covars_key):
                frame.insert(i, key, table[key].to_numpy())
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def _table(self, rows: pd.DataFrame, value: str | None, cells: np.ndarray) -> pd.DataFrame:
        """Conditions in ``predict``'s form: perturbation, dose (``"_dose"`` of ``rows``, one
        per part), the first covariate at ``value`` and the others at their most common value
        among ``cells``."""
        table = pd.DataFrame({self.perturbation_key: rows[self.perturbation_key].to_numpy()})
        if self.dose_key:
            table[self.dose_key] = [
                "+".join([d] * len(str(p).split("+"))) if "+" not in d else d
                for p, d in zip(rows[self.perturbation_key], rows["_dose"])
            ]
        for i, key in enumerate(self.covars_key):
            table[key] = value if i == 0 else str(self.adata.obs[key].iloc[cells].astype(str).mode().iloc[0])
        return table

    def get_response2D(self, perturbations: Sequence[str], covar: str, doses: Sequence[float] | None = None,
                       contvar_min: float | None = None, contvar_max: float | None = None, n_points: int = 10,
                       ncells_max: int = 100, fixed_drugs: str = "", fixed_doses: str = "",
                       seed: int = 0) -> pd.DataFrame:
        """The decoded response of the combination of two perturbations over a grid of their
        doses, from up to ``ncells_max`` control cells of the test split with the first
        covariate at ``covar``: columns the two names (doses), ``response`` and one per gene."""
        if perturbations is None or len(perturbations) != 2:
            raise ValueError("get_response2D: give a list of 2 perturbations")
        names = self._check_perturbations(perturbations)
        doses = np.linspace(contvar_min or 0.0, 1.0 if contvar_max is None else contvar_max, n_points) \
            if doses is None else np.asarray(doses, float)
        split = "test" if "test" in self.adatas else "all"
        cells = self._controls(split, covar, ncells_max, np.random.default_rng(seed))
        x = self._x(cells)
        control = _dense(x).mean(axis=0)
        grid = list(itertools.product(doses, doses))
        pert = "+".join(names) + (f"+{fixed_drugs.lstrip('+')}" if fixed_drugs else "")
        rows = pd.DataFrame({
            self.perturbation_key: [pert] * len(grid),
            "_dose": [f"{a}+{b}" + (f"+{fixed_doses.lstrip('+')}" if fixed_doses else "") for a, b in grid],
        })
        predicted = self.predict(x, self._table(rows, covar, cells), uncertainty=False).X
        delta = predicted.reshape(len(grid), len(cells), -1).mean(axis=1) - control
        frame = pd.DataFrame(delta, columns=list(self.var_names))
        frame.insert(0, "response", np.linalg.norm(delta, axis=1))
        frame.insert(0, names[1], [b for _, b in grid])
        frame.insert(0, names[0], [a for a, _ in grid])
        return frame

    def get_response_reference(self, perturbations: Sequence[str] | None = None) -> pd.DataFrame:
        """The measured response: for each ``pert_category_key`` value of the treated training
        cells and of ``ood``, its cells' mean minus the mean of the training control cells of
        the same first covariate; columns the covariate keys, perturbation key, dose key,
        ``split`` (``training_treated``, ``ood``), ``num_cells``, ``response`` and one per gene."""
        names = set(perturbations if perturbations is not None else self.unique_perts)
        splits = self.adata.obs[self.split_key].astype(str).to_numpy() if self.split_key else None
        categories = self.adata.obs[self.pert_categories_key].astype(str).to_numpy()
        train = splits == "train" if splits is not None else np.ones(self.adata.n_obs, bool)
        rows, deltas = [], []
        for split, mask in (("training_treated", train & ~self._control),
                            ("ood", splits == "ood" if splits is not None else np.zeros_like(train))):
            for category in sorted(set(categories[mask])):
                covs, pert, dose = self._parse(category)
                if pert not in names:
                    continue
                controls = train & self._control
                if covs and self.covars_key:
                    of_value = controls & (self.adata.obs[self.covars_key[0]].astype(str) == covs[0]).to_numpy()
                    controls = of_value if of_value.any() else controls
                cells = np.flatnonzero(mask & (categories == category))
                delta = _dense(self._x(cells)).mean(axis=0) - _dense(self._x(np.flatnonzero(controls))).mean(axis=0)
                rows.append([*self._covariates(covs), pert, float(dose) if "+" not in dose else dose, split,
                             len(cells), float(np.linalg.norm(delta))])
                deltas.append(delta)
        columns = [*self.covars_key, self.perturbation_key, self.dose_key or "dose", "split", "num_cells", "response"]
        frame = pd.DataFrame(rows, columns=columns)
        genes = pd.DataFrame(np.vstack(deltas) if deltas else np.zeros((0, len(self.var_names))),
                             columns=list(self.var_names))
        return pd.concat([frame, genes], axis=1)

    def evaluate_r2(self, perturbations: Sequence[str] | None = None, control_adata_key: str = "test",
                    ncells_max: int | None = None, seed: int = 0) -> pd.DataFrame:
        """For each ``pert_category_key`` value with cells, the control cells of split
        ``control_adata_key`` with the same first covariate predicted under its perturbation
        and dose: R2 of the gene means (all genes, ``R2_mean``; its DEGs from
        ``de_genes_uns_key``, ``R2_mean_DE``) and of the gene variances across cells
        (``R2_var``, ``R2_var_DE``: the predicted means' variance, where cpa-tools 0.8.8 would
        read a variance its ``predict`` no longer returns), and ``num_cells``. One engine run
        per covariate value."""
        names = set(perturbations if perturbations is not None else self.unique_perts)
        categories = self.adata.obs[self.pert_categories_key].astype(str).to_numpy()
        by_value: dict[str | None, list[tuple[str, list[str], str, str]]] = {}
        for category in sorted(set(categories)):
            covs, pert, dose = self._parse(category)
            if pert in names and pert != self.control_group:
                by_value.setdefault(covs[0] if covs else None, []).append((category, covs, pert, dose))
        rng = np.random.default_rng(seed)
        results = []
        for value, chosen in by_value.items():
            cells = self._controls(control_adata_key, value, ncells_max or self.adata.n_obs, rng)
            x = self._x(cells)
            rows = pd.DataFrame({self.perturbation_key: [c[2] for c in chosen], "_dose": [c[3] for c in chosen]})
            predicted = self.predict(x, self._table(rows, value, cells), uncertainty=False).X
            predicted = predicted.reshape(len(chosen), len(cells), -1)
            for (category, covs, pert, dose), pred in zip(chosen, predicted):
                true = _dense(self._x(np.flatnonzero(categories == category)))
                degs = self.de_genes.get(category) if isinstance(self.de_genes, dict) else None
                de = np.flatnonzero(self.var_names.isin(list(degs))) if degs is not None else np.arange(true.shape[1])
                tm, tv, pm, pv = true.mean(0), true.var(0), pred.mean(0), pred.var(0)
                results.append([*self._covariates(covs), pert, dose, _r2(tm, pm), _r2(tm[de], pm[de]),
                                _r2(tv, pv), _r2(tv[de], pv[de]), len(true)])
        columns = [*self.covars_key, self.perturbation_key, self.dose_key or "dose", "R2_mean", "R2_mean_DE",
                   "R2_var", "R2_var_DE", "num_cells"]
        return pd.DataFrame(results, columns=columns)
