"""The metric definitions of ``cpa-stream evaluate``, for scoring outside it (the fidelity
harness, notebooks, another tool's predictions): the same Rust functions evaluate calls, so a
figure computed here and one in an ``evaluate`` table mean the same thing.

- :func:`r2_score`: sklearn's R2 over genes (``r2_mean`` and its top-k, ``r2_delta``).
- :func:`pearson`: Pearson's r over genes (``pearson_delta``, ``change_reproducibility``).
- :func:`transfer`: how much a perturbation's training shift carries over between covariate
  values (``transfer.json`` of ``evaluate``: the correlations and the transfer slope).
- :data:`NOISE_REPRODUCIBILITY`: the change reproducibility under which a condition's change is
  noise at its number of cells.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _native

#: Under this Pearson r between a condition's change in two halves of its cells, the change is
#: noise at that many cells (``evaluate``'s threshold).
NOISE_REPRODUCIBILITY: float = _native.NOISE_REPRODUCIBILITY


def _vector(values: Any, name: str) -> list[float]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a vector (one value per gene), got shape {array.shape}")
    return array.tolist()


def r2_score(truth: Any, pred: Any) -> float:
    """sklearn's R2 of ``pred`` against ``truth`` (one value per gene): ``1 - SS_res / SS_tot``;
    for a constant ``truth``, 1 when matched exactly and 0 otherwise."""
    return _native.r2_score(_vector(truth, "truth"), _vector(pred, "pred"))


def pearson(a: Any, b: Any) -> float:
    """Pearson's r of two vectors; NaN with fewer than two values or a constant vector."""
    return _native.pearson(_vector(a, "a"), _vector(b, "b"))


def transfer(shifts: Iterable[tuple[str, str, Any]]) -> dict[str, Any] | None:
    """How much perturbations' effects carry over between covariate values, from their training
    shifts: ``(perturbation, covariate value, shift)`` per condition, the shift being the mean of
    its training cells minus its covariate value's training controls (log1p means). A
    perturbation is what is told apart: give its doses in the name (``"A+B|1.0"``) to treat doses
    apart, as ``evaluate`` does. Returns ``same_perturbation_r`` (mean r of one perturbation's
    shifts in two values), ``other_perturbations_r`` (the same for different perturbations),
    their pair counts, ``carries_over`` and ``slope`` (each shift regressed through the origin on
    the mean of the same perturbation's shifts in its other values, pooled over conditions and
    genes); ``None`` when no perturbation has shifts in two values."""
    rows = [(str(p), str(c), _vector(s, f"shift of {p} in {c}")) for p, c, s in shifts]
    return _native.transfer(rows)


__all__ = ["NOISE_REPRODUCIBILITY", "pearson", "r2_score", "transfer"]
