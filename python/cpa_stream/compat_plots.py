"""``cpa.pl``: the plots cpa-tools 0.8.8's tutorials and notebooks draw, on matplotlib alone
(cpa-tools draws them with seaborn). Each takes cpa-tools' arguments and returns what cpa-tools
returns (``plot_history`` and ``plot_similarity`` nothing, so a notebook shows a figure once;
``plot_dose_response`` the figure; ``plot_embedding`` ``matplotlib.pyplot``; the uncertainty
plots their table). ``CompertVisuals`` draws a :class:`~cpa_stream.compat.ComPertAPI`'s frames.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .compat_api import _r2

if TYPE_CHECKING:
    from .compat import CPA
    from .compat_api import ComPertAPI


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("cpa.pl needs matplotlib: pip install 'cpa-stream[compat]'") from error
    return plt


class _Plots:
    """``cpa.pl``: the plots cpa-tools' tutorials draw (matplotlib)."""

    @staticmethod
    def plot_history(model: CPA, path_to_save: str | os.PathLike | None = None) -> None:
        """One panel per metric of ``model.epoch_history``, training and validation lines over
        the epochs, drawn on a new current figure (``plt.gcf()``; saved to ``path_to_save`` when
        given). Returns ``None``, as cpa-tools does: a notebook cell ending in this call shows the
        figure once, not once more as the cell's value."""
        plt = _pyplot()

        df = model.epoch_history
        if df is None or df.empty:
            raise RuntimeError("plot_history: the model has no history; train it first")
        metrics = [c for c in df.columns if c not in ("epoch", "mode") and df[c].notna().any()]
        columns = min(4, len(metrics))
        rows = -(-len(metrics) // columns)
        fig, axes = plt.subplots(rows, columns, sharex=True, figsize=(3.4 * columns, 2.4 * rows), squeeze=False)
        lines = {}
        for ax, column in zip(axes.flat, metrics):
            for mode, style, color in (("train", "-", "C0"), ("valid", "o-", "C1")):
                part = df[(df["mode"] == mode) & df[column].notna()]
                if len(part):
                    (lines[mode],) = ax.plot(part["epoch"], part[column], style, color=color, label=mode, markersize=3)
            ax.set_title(column, fontweight="bold")
        for ax in axes[-1]:
            ax.set_xlabel("epoch")
        for ax in list(axes.flat)[len(metrics):]:
            ax.set_visible(False)
        fig.legend(list(lines.values()), list(lines), loc="upper right")
        fig.tight_layout(rect=(0, 0, 0.92, 1))
        if path_to_save is not None:
            fig.savefig(path_to_save, bbox_inches="tight", dpi=100)

    @staticmethod
    def mean_plot(adata: Any, pred_obsm_key: str, path_to_save: str | os.PathLike | None = "./reg_mean.pdf",
                  gene_list: Sequence[str] | None = None, deg_list: Sequence[str] | None = None, show: bool = False,
                  title: str | None = None, verbose: bool = False, x_coeff: float = 0.30, y_coeff: float = 0.8,
                  fontsize: int = 11, R2_type: str = "R2", figsize: tuple[float, float] = (3.5, 3.5),
                  **kwargs: Any) -> float | tuple[float, float]:
        """cpa-tools' ``mean_plot``: the mean over ``adata``'s cells of each gene, true (``X``)
        against predicted (``obsm[pred_obsm_key]``), with R2 over all genes and over
        ``deg_list``; saved to ``path_to_save`` (``None``: not saved); returns ``r2`` or
        ``(r2, r2_degs)``.
        ``adata.X`` is read, not changed."""
        plt = _pyplot()
        import scipy.sparse as sp
        from scipy import stats

        if R2_type not in ("R2", "Pearson R2"):
            raise ValueError("R2 calculation should be one of ['R2', 'Pearson R2']")
        x = adata.X
        true = np.asarray(x.mean(axis=0)).ravel() if sp.issparse(x) else np.asarray(x).mean(axis=0)
        pred = np.asarray(adata.obsm[pred_obsm_key]).mean(axis=0)

        def r2(a: np.ndarray, b: np.ndarray) -> float:
            if R2_type == "R2":
                return float(1 - ((a - b) ** 2).sum() / ((a - a.mean()) ** 2).sum())
            return float(stats.pearsonr(a, b)[0] ** 2)

        r2_all = r2(true, pred)
        r2_degs = None
        if deg_list is not None:
            positions = adata.var_names.get_indexer(list(deg_list))
            if (positions < 0).any():
                missing = [g for g, p in zip(deg_list, positions) if p < 0]
                raise ValueError(f"deg_list: {len(missing)} gene(s) not in var_names: {', '.join(missing[:5])}")
            r2_degs = r2(true[positions], pred[positions])
            if verbose:
                print(f"Top {len(deg_list)} DEGs var: ", r2_degs)
        if verbose:
            print("All genes mean R2: ", r2_all)
        fig, ax = plt.subplots(figsize=figsize)
        ax.scatter(pred, true, s=8, alpha=0.6)
        slope, intercept = np.polyfit(pred, true, 1) if len(pred) > 1 else (1.0, 0.0)
        line = np.linspace(pred.min(), pred.max(), 2)
        ax.plot(line, slope * line + intercept, color="C1")
        if gene_list is not None:
            for gene in gene_list:
                j = adata.var_names.get_loc(gene)
                ax.plot(pred[j], true[j], "o", color="red", markersize=5)
                ax.text(pred[j], true[j], gene, fontsize=fontsize)
        if "range" in kwargs:
            start, stop, step = kwargs["range"]
            ax.set_xticks(np.arange(start, stop, step))
            ax.set_yticks(np.arange(start, stop, step))
        ax.set_xlabel("pred", fontsize=fontsize)
        ax.set_ylabel("true", fontsize=fontsize)
        ax.set_title(title or "", fontsize=fontsize, fontweight="bold")
        ax.text(pred.max() * (1 - x_coeff), true.max() * (1 - y_coeff), f"$R^2$ all genes = {r2_all:.2f}",
                fontsize=fontsize)
        if r2_degs is not None:
            ax.text(pred.max() * (1 - x_coeff), true.max() * (1 - y_coeff - 0.15), f"$R^2$ DEGs = {r2_degs:.2f}",
                    fontsize=fontsize)
        if path_to_save is not None:
            fig.savefig(path_to_save, bbox_inches="tight", dpi=100)
        if show:
            plt.show()
        plt.close(fig)
        return (r2_all, r2_degs) if r2_degs is not None else r2_all

    @staticmethod
    def plot_dose_response(df: pd.DataFrame, contvar_key: str, perturbation_key: str,
                           df_ref: pd.DataFrame | None = None, response_name: str = "response",
                           use_ref_response: bool = False, palette: Any = None, col_dict: Mapping[str, Any] | None = None,
                           fontsize: int = 8, measured_points: Any = None, interpolate: bool = True, f1: float = 7,
                           f2: float = 3.0, bbox: tuple[float, float] = (1.35, 1.0), legend: bool = True,
                           ref_name: str = "origin", title_name: str | None = "None", plot_vertical: bool = True,
                           fname: str | None = None, logscale: Sequence[float] | None = None,
                           xlabelname: str | None = None, format: str = "png") -> Any:
        """A line per perturbation of ``df[response_name]`` over ``df[contvar_key]``
        (``ComPertAPI.latent_dose_response`` or ``get_response``); with ``df_ref``
        (``get_response_reference``) the measured responses as points sized by ``num_cells``
        (training black, ``ood`` red) and dotted verticals at the measured doses. Saved to
        ``fname.format`` when given; returns the figure (as cpa-tools)."""
        plt = _pyplot()
        names = list(pd.unique(df[perturbation_key].astype(str)))
        colors = dict(col_dict) if col_dict is not None else _colors(names)
        fig, ax = plt.subplots(figsize=(f1, f2))
        for name in names:
            part = df[df[perturbation_key].astype(str) == name].sort_values(contvar_key)
            ax.plot(part[contvar_key].astype(float), part[response_name].astype(float), color=colors.get(name),
                    label=name)
        if df_ref is not None and len(df_ref):
            ref = df_ref[df_ref[perturbation_key].astype(str).isin(names)]
            if use_ref_response and interpolate:
                for name in names:
                    part = ref[ref[perturbation_key].astype(str) == name].sort_values(contvar_key)
                    ax.plot(part[contvar_key].astype(float), part[response_name].astype(float), "--",
                            color=colors.get(name), linewidth=1)
            if use_ref_response:
                split = ref["split"].astype(str).replace({"training_treated": "train"}) if "split" in ref else None
                sizes = ref["num_cells"].astype(float) if "num_cells" in ref else pd.Series(30.0, index=ref.index)
                span = max(float(sizes.max() - sizes.min()), 1.0)
                ax.scatter(ref[contvar_key].astype(float), ref[response_name].astype(float),
                           s=10 + 90 * (sizes - sizes.min()) / span,
                           c=["#e41a1c" if v == "ood" else "#000000" for v in (split if split is not None else [])]
                           or "#000000", zorder=3)
            if plot_vertical:
                for name in names:
                    mine = df[df[perturbation_key].astype(str) == name][response_name].astype(float)
                    for x in ref[ref[perturbation_key].astype(str) == name][contvar_key].astype(float):
                        ax.plot([x, x], [mine.min(), mine.max()], ":", color="black", linewidth=0.5, alpha=0.5)
        if legend and not use_ref_response:
            ax.legend(loc="upper right", bbox_to_anchor=bbox, fontsize=fontsize)
        # cpa-tools' default title is the string "None", which it draws; no title here.
        if title_name not in (None, "None"):
            ax.set_title(title_name, fontsize=fontsize, fontweight="bold")
        ax.set_xlabel(xlabelname or contvar_key, fontsize=fontsize)
        ax.set_ylabel(response_name, fontsize=fontsize)
        ax.tick_params(labelsize=fontsize)
        if logscale is not None:
            ax.set_xticks(np.log10(np.asarray(logscale, float)))
            ax.set_xticklabels(logscale, rotation=90)
        fig.tight_layout()
        if fname:
            fig.savefig(f"{fname}.{format}", format=format)
        return fig

    @staticmethod
    def plot_uncertainty_dose(compet_api: ComPertAPI, cov: str, pert: str, N: int = 11, metric: str = "cosine",
                              measured_points: Any = None, cond_key: str = "condition", log: bool = False,
                              min_dose: float | None = None, filename: str | os.PathLike | None = None) -> pd.DataFrame:
        """The uncertainty (distance to the closest trained condition,
        ``ComPertAPI.compute_uncertainty``) of ``pert`` in ``cov`` over ``N`` doses (to 1,
        linear or log), drawn; returns the table (``cell_type``, ``condition``, ``dose_val``,
        ``uncertainty_cosine``, ``uncertainty_eucl``, ``closest_cond_cos``, ``closest_cond_eucl``)."""
        plt = _pyplot()
        _check_metric(metric)
        if log:
            doses = np.round(np.logspace(np.log10(min_dose or 1e-3), 0, N), decimals=10)
        else:
            doses = np.round(np.linspace(min_dose or 0.0, 1.0, N), decimals=3)
        compet_api._scales(list(doses))
        table = _uncertainties(compet_api, [{"cell_type": cov, "condition": pert, "dose_val": d} for d in doses])
        fig, ax = plt.subplots()
        ax.plot(table["dose_val"].astype(float), table[f"uncertainty_{_metric_column(metric)}"].astype(float))
        ax.set_xlabel(pert)
        ax.set_ylabel("Uncertainty")
        ax.set_title(cov)
        if log:
            ax.set_xscale("log")
        if measured_points:
            ticks = measured_points[cov][pert]
            ax.set_xticks(ticks)
            ax.set_xticklabels(ticks, rotation=90)
        fig.tight_layout()
        if filename:
            fig.savefig(filename)
        return table

    @staticmethod
    def plot_uncertainty_comb_dose(compert_api: ComPertAPI, cov: str, pert: str, N: int = 11, metric: str = "cosine",
                                   measured_points: Any = None, cond_key: str = "condition", vmin: float | None = None,
                                   vmax: float | None = None, sizes: tuple[float, float] = (40, 160),
                                   df_ref: pd.DataFrame | None = None, xlims: tuple[float, float] = (0, 1.03),
                                   ylims: tuple[float, float] = (0, 1.03), fixed_drugs: str = "", fixed_doses: str = "",
                                   title: bool = True, filename: str | os.PathLike | None = None) -> pd.DataFrame:
        """The uncertainty of the combination ``pert`` (``"A+B"``) in ``cov`` over an ``N`` x
        ``N`` grid of its two doses (0 to 1), as filled contours; with ``df_ref`` the measured
        dose pairs as points. Returns the table of ``plot_uncertainty_dose``'s columns."""
        plt = _pyplot()
        _check_metric(metric)
        parts = pert.split("+")
        if len(parts) != 2:
            raise ValueError(f"plot_uncertainty_comb_dose: pert {pert!r}: expected two perturbations 'A+B'")
        grid = np.round(np.linspace(0, 1, N), decimals=2)
        compert_api._scales(list(grid))
        rows = [{"cell_type": cov, "condition": pert + fixed_drugs, "dose_val": f"{i}+{j}{fixed_doses}"}
                for i in grid for j in grid]
        table = _uncertainties(compert_api, rows)
        x, y = np.meshgrid(grid, grid, indexing="ij")
        z = table[f"uncertainty_{_metric_column(metric)}"].to_numpy(float).reshape(N, N)
        fig, ax = plt.subplots()
        filled = ax.contourf(x, y, z, cmap="coolwarm", levels=20, vmin=vmin, vmax=vmax)
        ax.set_xlabel(parts[0], fontweight="bold")
        ax.set_ylabel(parts[1], fontweight="bold")
        if title:
            ax.set_title(cov)
        if df_ref is not None and len(df_ref):
            counts = df_ref["num_cells"].astype(float) if "num_cells" in df_ref else pd.Series(1.0, index=df_ref.index)
            span = max(float(counts.max() - counts.min()), 1.0)
            ax.scatter(df_ref[parts[0]].astype(float), df_ref[parts[1]].astype(float),
                       s=sizes[0] + (sizes[1] - sizes[0]) * (counts - counts.min()) / span,
                       c=["#e41a1c" if str(v) == "ood" else "#000000" for v in df_ref.get("split", ["train"] * len(df_ref))])
        if measured_points:
            ticks = measured_points[cov][pert]
            ax.set_xticks([float(str(t).split("+")[0]) for t in ticks])
            ax.set_yticks([float(str(t).split("+")[1]) for t in ticks])
        fig.colorbar(filled)
        ax.set_aspect("equal")
        ax.set_xlim(xlims)
        ax.set_ylim(ylims)
        fig.tight_layout()
        if filename:
            fig.savefig(filename)
        return table

    @staticmethod
    def plot_embedding(emb: np.ndarray, labels: Sequence[str] | None = None, col_dict: Mapping[str, Any] | None = None,
                       title: str | None = None, show_lines: bool = False, show_text: bool = False,
                       show_legend: bool = True, axis_equal: bool = True, circle_size: float = 40,
                       circe_transparency: float = 1.0, line_transparency: float = 0.8, line_width: float = 1.0,
                       fontsize: int = 9, fig_width: float = 4, fig_height: float = 4,
                       file_name: str | os.PathLike | None = None, file_format: str | None = None,
                       labels_name: str | None = None, width_ratios: Sequence[float] = (7, 1),
                       bbox: tuple[float, float] = (1.3, 0.7)) -> Any:
        """Points of a two-dimensional embedding (``emb``: n x 2), coloured by ``labels``, with
        lines from the origin (``show_lines``) and a label at each label's centre
        (``show_text``). Saved to ``file_name`` when given; returns ``matplotlib.pyplot``, as
        cpa-tools."""
        plt = _pyplot()
        emb = np.asarray(emb, float)
        if emb.ndim != 2 or emb.shape[1] < 2:
            raise ValueError(f"plot_embedding: emb has shape {emb.shape}; expected (n, 2)")
        fig, ax = plt.subplots(figsize=(fig_width, fig_height))
        names = [str(x) for x in labels] if labels is not None else None
        colors = dict(col_dict) if col_dict is not None else (_colors(list(dict.fromkeys(names))) if names else {})
        ax.scatter(emb[:, 0], emb[:, 1], s=circle_size, alpha=circe_transparency, edgecolors="none",
                   c=[colors.get(n, "C0") for n in names] if names else "C0")
        if show_lines:
            for i, (x, y) in enumerate(emb[:, :2]):
                ax.plot([0, x], [0, y], alpha=line_transparency, linewidth=line_width,
                        color=colors.get(names[i]) if names else None)
        if show_text and names:
            for name in dict.fromkeys(names):
                at = emb[[n == name for n in names], :2].mean(axis=0)
                ax.text(at[0], at[1], name, fontsize=fontsize)
        if axis_equal:
            ax.set_aspect("equal", adjustable="datalim")
        if title:
            ax.set_title(title, fontsize=fontsize, fontweight="bold")
        ax.set_xlabel("dim1", fontsize=fontsize)
        ax.set_ylabel("dim2", fontsize=fontsize)
        ax.tick_params(labelsize=fontsize)
        fig.tight_layout()
        if file_name:
            _save(fig, file_name, file_format)
        return plt

    @staticmethod
    def plot_similarity(emb: np.ndarray, labels: Sequence[str] | None = None, col_dict: Mapping[str, Any] | None = None,
                        fig_width: float = 4, fig_height: float = 4, cmap: str = "coolwarm", fmt: str = "png",
                        fontsize: int = 7, file_format: str | None = None,
                        file_name: str | os.PathLike | None = None) -> None:
        """The cosine similarities of the rows of ``emb`` as a heat map, rows and columns
        ordered by hierarchical clustering (average linkage of their euclidean distances, as
        seaborn's ``clustermap`` that cpa-tools calls), with a colour strip per label. Saved to
        ``file_name`` when given; returns nothing."""
        plt = _pyplot()
        from scipy.cluster.hierarchy import leaves_list, linkage

        emb = np.asarray(emb, float)
        names = [str(x) for x in labels] if labels is not None else [str(i) for i in range(len(emb))]
        if len(names) != len(emb):
            raise ValueError(f"plot_similarity: {len(emb)} rows and {len(names)} labels")
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        similarity = np.clip(unit @ unit.T, -1, 1)
        order = leaves_list(linkage(similarity, method="average", metric="euclidean")) if len(emb) > 1 else [0]
        colors = dict(col_dict) if col_dict is not None else _colors(names)
        fig, (strip, ax, bar) = plt.subplots(1, 3, figsize=(fig_width, fig_height), sharey=False,
                                             gridspec_kw={"width_ratios": [1, 20, 1], "wspace": 0.05})
        import matplotlib.colors as mcolors

        ordered = [names[i] for i in order]
        strip.imshow([[mcolors.to_rgb(colors.get(n, "C0"))] for n in ordered], aspect="auto")
        strip.set_xticks([])
        strip.set_yticks(range(len(order)), ordered, fontsize=fontsize)
        image = ax.imshow(similarity[np.ix_(order, order)], cmap=cmap, vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(order)), ordered, rotation=90, fontsize=fontsize)
        ax.set_yticks([])
        fig.colorbar(image, cax=bar).ax.tick_params(labelsize=fontsize)
        if file_name:
            _save(fig, file_name, file_format)

    @staticmethod
    def plot_r2_matrix(adata: Any, pred_obsm_key: str, deg_group_key: str, deg_uns_key: str | None = None,
                       **kwargs: Any) -> None:
        """Two heat maps (R2 of gene means, then of gene variances) of every group of
        ``obs[deg_group_key]``'s predictions (``obsm[pred_obsm_key]``, rows) against every
        group's measured cells (columns), on the group's DEGs (``uns[deg_uns_key]``) or all
        genes; drawn with ``plt.show()`` and not returned, as cpa-tools. cpa-tools indexes the
        prediction matrix by genes it never selected (its DEG option fails); here the DEGs
        select the same genes of both sides."""
        plt = _pyplot()
        import scipy.sparse as sp

        groups = sorted(pd.unique(adata.obs[deg_group_key].astype(str)))
        labels = adata.obs[deg_group_key].astype(str).to_numpy()
        x = adata.X
        predicted = np.asarray(adata.obsm[pred_obsm_key], float)
        means, variances = np.zeros((len(groups), len(groups))), np.zeros((len(groups), len(groups)))
        for i, g1 in enumerate(groups):
            genes = np.arange(adata.n_vars)
            if deg_uns_key is not None:
                genes = adata.var_names.get_indexer(list(adata.uns[deg_uns_key][g1]))
                genes = genes[genes >= 0]
            pred = predicted[labels == g1][:, genes]
            for j, g2 in enumerate(groups):
                true = x[labels == g2][:, genes]
                true = true.toarray() if sp.issparse(true) else np.asarray(true, float)
                means[j, i] = _r2(true.mean(0), pred.mean(0))
                variances[j, i] = _r2(true.var(0), pred.var(0))
        for matrix in (means, variances):
            fig, ax = plt.subplots(figsize=(5, 5))
            ax.imshow(matrix, cmap=kwargs.get("cmap", "Blues"), vmin=max(matrix.min(), -100))
            for (r, c), value in np.ndenumerate(matrix):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=5)
            ax.set_xticks(range(len(groups)), groups, fontsize=6, rotation=90)
            ax.set_yticks(range(len(groups)), groups, fontsize=6)
            ax.set_xlabel("y_true")
            ax.set_ylabel("y_pred")
            plt.show()

    class CompertVisuals:
        """cpa-tools' ``CompertVisuals``: ``plot_latent_embeddings`` of a :class:`ComPertAPI`'s
        perturbation or covariate embeddings in two dimensions."""

        def __init__(self, cpa_api: ComPertAPI, fileprefix: str | None = None,
                     perts_palette: Mapping[str, Any] | None = None, covars_palette: Mapping[str, Any] | None = None,
                     plot_params: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
            self.api = cpa_api
            self.fileprefix = fileprefix
            self.perturbation_key = cpa_api.perturbation_key
            self.dose_key = cpa_api.dose_key
            self.covars_key = cpa_api.covars_key
            self.measured_points = cpa_api.measured_points
            self.unique_perts = cpa_api.unique_perts
            self.unique_covars = cpa_api.unique_covars
            self.perts_palette = dict(perts_palette) if perts_palette is not None else _colors(self.unique_perts)
            self.covars_palette = dict(covars_palette) if covars_palette is not None else {
                k: _colors(v) for k, v in self.unique_covars.items()
            }
            self.fontsize = (plot_params or {}).get("fontsize") or 13

        def _target(self, filename: str | os.PathLike | None, postfix: str, kind: str) -> str | os.PathLike | None:
            if filename is not None:
                return filename
            return f"{self.fileprefix}_{kind}{postfix}.png" if self.fileprefix else None

        def plot_contvar_response(self, df_response: pd.DataFrame, response_name: str = "response",
                                  var_name: str | None = None, df_ref: pd.DataFrame | None = None,
                                  palette: Mapping[str, Any] | None = None, title_name: str | None = None,
                                  postfix: str = "", ref_name: str = "origin", xlabelname: str | None = None,
                                  filename: str | os.PathLike | None = None, logdose: bool = False,
                                  fontsize: int | None = None, legend: bool = True, measured_points: Any = None,
                                  bbox: tuple[float, float] = (1.35, 1.0), figsize: tuple[float, float] = (7.0, 4.0)) -> Any:
            """``pl.plot_dose_response`` of a response frame (``get_response`` or
            ``latent_dose_response``; ``df_ref`` from ``get_response_reference``) with this
            object's palette, saved under ``fileprefix``; returns the figure."""
            key = var_name or self.perturbation_key
            frame = df_response.copy()
            dose = self.dose_key or "dose"
            if logdose:
                frame[dose] = np.log10(frame[dose].astype(float).clip(lower=1e-6))
            fig = _Plots.plot_dose_response(
                frame, dose, key, df_ref=df_ref, response_name=response_name, use_ref_response=df_ref is not None,
                col_dict=palette or self.perts_palette, fontsize=fontsize or self.fontsize, f1=figsize[0],
                f2=figsize[1], bbox=bbox, legend=legend, ref_name=ref_name, title_name=title_name,
                xlabelname=xlabelname,
            )
            target = self._target(filename, postfix, "contvar_response")
            if target is not None:
                fig.savefig(target, bbox_inches="tight")
            return fig

        def plot_contvar_response2D(self, df_response2D: pd.DataFrame, df_ref: pd.DataFrame | None = None,
                                    levels: int = 15, figsize: tuple[float, float] = (4, 4),
                                    xlims: tuple[float, float] = (0, 1.03), ylims: tuple[float, float] = (0, 1.03),
                                    palette: str = "coolwarm", response_name: str = "response",
                                    title_name: str | None = None, fontsize: int | None = None, postfix: str = "",
                                    filename: str | os.PathLike | None = None, alpha: float = 0.4,
                                    sizes: tuple[float, float] = (40, 160), logdose: bool = False,
                                    file_format: str = "png") -> Any:
            """Filled contours of ``response_name`` over the two dose columns of
            ``df_response2D`` (``latent_dose_response2D`` or ``get_response2D``), with the
            measured dose pairs of ``df_ref`` as points; returns the figure."""
            plt = _pyplot()
            first, second = [c for c in df_response2D.columns if c != response_name][:2]
            xs = np.sort(df_response2D[first].astype(float).unique())
            ys = np.sort(df_response2D[second].astype(float).unique())
            table = df_response2D.pivot_table(index=second, columns=first, values=response_name)
            gx, gy = np.meshgrid(xs, ys)
            if logdose:
                gx, gy = np.log10(np.maximum(gx, 1e-6)), np.log10(np.maximum(gy, 1e-6))
            fig, ax = plt.subplots(figsize=figsize)
            filled = ax.contourf(gx, gy, table.loc[ys, xs].to_numpy(), levels=levels, cmap=palette, alpha=alpha)
            fig.colorbar(filled)
            if df_ref is not None and len(df_ref):
                counts = df_ref["num_cells"].astype(float) if "num_cells" in df_ref else pd.Series(1.0, index=df_ref.index)
                span = max(float(counts.max() - counts.min()), 1.0)
                ax.scatter(df_ref[first].astype(float), df_ref[second].astype(float),
                           s=sizes[0] + (sizes[1] - sizes[0]) * (counts - counts.min()) / span, c="black")
            size = fontsize or self.fontsize
            ax.set_xlabel(first, fontsize=size, fontweight="bold")
            ax.set_ylabel(second, fontsize=size, fontweight="bold")
            if title_name:
                ax.set_title(title_name, fontsize=size)
            if not logdose:
                ax.set_xlim(xlims)
                ax.set_ylim(ylims)
            fig.tight_layout()
            target = self._target(filename, postfix, "contvar_response2D")
            if target is not None:
                fig.savefig(target, format=file_format if filename is None else None, bbox_inches="tight")
            return fig

        def plot_scatter(self, df: pd.DataFrame, x_axis: str, y_axis: str, hue: str | None = None,
                         size: str | None = None, style: str | None = None, figsize: tuple[float, float] = (4.5, 4.5),
                         title: str | None = None, palette: Mapping[str, Any] | None = None,
                         filename: str | os.PathLike | None = None, alpha: float = 0.75,
                         sizes: tuple[float, float] = (30, 90), text_dict: Mapping[str, tuple[float, float]] | None = None,
                         postfix: str = "", fontsize: int = 14) -> Any:
            """``df[y_axis]`` against ``df[x_axis]`` (e.g. ``evaluate_r2``'s R2 columns),
            coloured by ``hue``, sized by ``size``, labelled from ``text_dict`` (name to
            position), with the diagonal; returns the figure."""
            plt = _pyplot()
            fig, ax = plt.subplots(figsize=figsize)
            names = [str(v) for v in df[hue]] if hue is not None else None
            colors = dict(palette) if palette is not None else (_colors(list(dict.fromkeys(names))) if names else {})
            if size is not None:
                values = df[size].astype(float)
                span = max(float(values.max() - values.min()), 1e-12)
                marker = sizes[0] + (sizes[1] - sizes[0]) * (values - values.min()) / span
            else:
                marker = sizes[0]
            ax.scatter(df[x_axis].astype(float), df[y_axis].astype(float), s=marker, alpha=alpha,
                       c=[colors.get(n, "C0") for n in names] if names else "C0")
            low = float(min(df[x_axis].min(), df[y_axis].min()))
            high = float(max(df[x_axis].max(), df[y_axis].max()))
            ax.plot([low, high], [low, high], ":", color="grey", linewidth=1)
            for text, (x, y) in (text_dict or {}).items():
                ax.text(x, y, text, fontsize=fontsize - 4)
            ax.set_xlabel(x_axis, fontsize=fontsize)
            ax.set_ylabel(y_axis, fontsize=fontsize)
            if title:
                ax.set_title(title, fontsize=fontsize)
            fig.tight_layout()
            target = self._target(filename, postfix, "scatter")
            if target is not None:
                fig.savefig(target, bbox_inches="tight")
            return fig

        def plot_latent_embeddings(self, emb: np.ndarray, titlename: str = "Example", kind: str = "perturbations",
                                   palette: Any = None, labels: Sequence[str] | None = None,
                                   dimred: str = "KernelPCA", filename: str | os.PathLike | None = None,
                                   show_text: bool = True) -> Any:
            """The rows of ``emb`` (one per perturbation, or per value of a covariate) in two
            dimensions (kernel PCA with a cosine kernel as cpa-tools, or ``dimred="PCA"``),
            labelled; saved to ``filename`` (or under ``fileprefix``) and returned."""
            plt = _pyplot()
            emb = np.asarray(emb, dtype=np.float64)
            if labels is None:
                labels = self.api.unique_perts if kind == "perturbations" else self.api.unique_covars.get(kind, [])
            labels = [str(x) for x in labels]
            if len(labels) != emb.shape[0]:
                raise ValueError(f"plot_latent_embeddings: {emb.shape[0]} rows and {len(labels)} labels")
            keep = np.abs(emb).sum(axis=1) > 0  # the padding entry is a zero row
            emb, labels = emb[keep], [x for x, k in zip(labels, keep) if k]
            xy = _two_dimensions(emb, dimred)
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            ax.scatter(xy[:, 0], xy[:, 1], s=40, c=[f"C{i % 10}" for i in range(len(labels))])
            if show_text:
                for (x, y), text in zip(xy, labels):
                    ax.annotate(text, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
            ax.set_title(titlename, fontweight="bold")
            ax.set_xticks([])
            ax.set_yticks([])
            target = filename or (f"{self.fileprefix}_emb_{kind}.png" if self.fileprefix else None)
            if target is not None:
                fig.savefig(target, bbox_inches="tight", dpi=100)
            return fig


def _two_dimensions(emb: np.ndarray, dimred: str) -> np.ndarray:
    """Rows in two dimensions: kernel PCA with a cosine kernel (``KernelPCA``, cpa-tools' choice)
    or PCA."""
    if len(emb) < 2:
        return np.zeros((len(emb), 2))
    if dimred == "KernelPCA":
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        kernel = unit @ unit.T
        n = len(kernel)
        centre = np.eye(n) - np.full((n, n), 1.0 / n)
        values, vectors = np.linalg.eigh(centre @ kernel @ centre)
        order = np.argsort(values)[::-1][:2]
        return vectors[:, order] * np.sqrt(np.maximum(values[order], 0))
    if dimred != "PCA":
        raise ValueError(f"dimred {dimred!r}: expected 'KernelPCA' or 'PCA'")
    centred = emb - emb.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return u[:, :2] * s[:2]




def _colors(names: Sequence[str]) -> dict[str, Any]:
    """A colour per name (tab10 up to ten names, tab20 up to twenty, then a continuous map)."""
    import matplotlib

    n = len(names)
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return {name: cmap(i if n <= 20 else i / max(n - 1, 1)) for i, name in enumerate(names)}


def _save(fig: Any, file_name: str | os.PathLike, file_format: str | None) -> None:
    """cpa-tools' ``save_to_file``: the name as given, or with ``file_format`` as extension."""
    name = os.fspath(file_name)
    if file_format is not None and not name.endswith(f".{file_format}"):
        name = f"{name}.{file_format}"
    fig.savefig(name, format=file_format, bbox_inches="tight")


def _check_metric(metric: str) -> None:
    if metric not in ("cosine", "eucl", "euclidean"):
        raise ValueError(f"metric {metric!r}: expected 'cosine' or 'eucl'")


def _metric_column(metric: str) -> str:
    return "cosine" if metric == "cosine" else "eucl"


def _uncertainties(api: ComPertAPI, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """cpa-tools' uncertainty table: ``rows`` (cell_type, condition, dose_val) with the
    distances to and names of the closest trained conditions."""
    table = pd.DataFrame(rows)
    found = [api.compute_uncertainty(covs=[r["cell_type"]], pert=r["condition"], dose=str(r["dose_val"]))
             for r in rows]
    for i, name in enumerate(["uncertainty_cosine", "uncertainty_eucl", "closest_cond_cos", "closest_cond_eucl"]):
        table[name] = [f[i] for f in found]
    return table


#: ``cpa.pl``.
pl = _Plots()
