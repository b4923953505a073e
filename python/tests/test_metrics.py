"""``cpa_stream.metrics``: evaluate's metric definitions from Python, against computations by hand,
and the fidelity harness scoring through them (one definition of each metric, issue 75)."""

from __future__ import annotations

import numpy as np
import pytest

from cpa_stream import metrics


def test_r2_is_sklearns_with_its_constant_truth_convention():
    rng = np.random.default_rng(3)
    truth, pred = rng.normal(size=50), rng.normal(size=50)
    by_hand = 1.0 - ((truth - pred) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()
    assert metrics.r2_score(truth, pred) == pytest.approx(by_hand, rel=1e-12)
    assert metrics.r2_score(truth, truth) == 1.0
    constant = np.full(5, 2.0)
    assert metrics.r2_score(constant, constant) == 1.0
    assert metrics.r2_score(constant, constant + 1e-3) == 0.0
    with pytest.raises(ValueError, match="r2_score: vectors of 3 and 2 values"):
        metrics.r2_score([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="expected a vector"):
        metrics.r2_score(np.ones((2, 2)), np.ones((2, 2)))


def test_pearson_is_numpys_and_nan_for_a_constant_vector():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert metrics.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-12)
    assert np.isnan(metrics.pearson(a, np.ones(30)))
    assert np.isnan(metrics.pearson([1.0], [2.0]))


def test_transfer_regresses_each_shift_on_its_perturbations_mean_elsewhere():
    rng = np.random.default_rng(5)
    effect = {p: rng.normal(size=20) for p in ("A|1.0", "A|2.0", "B|1.0")}
    scale = {"t1": 1.0, "t2": 0.5, "t3": 0.8}
    shifts = {(p, c): scale[c] * e + 0.1 * rng.normal(size=20) for p, e in effect.items() for c in scale}
    del shifts[("B|1.0", "t3")]
    xy = xx = 0.0
    for (p, c), y in shifts.items():
        x = np.mean([s for (q, o), s in shifts.items() if q == p and o != c], axis=0)
        xy, xx = xy + x @ y, xx + x @ x
    same, other = [], []
    keys = sorted(shifts)
    for i, (p1, c1) in enumerate(keys):
        for p2, c2 in keys[i + 1:]:
            if c1 != c2:
                (same if p1 == p2 else other).append(np.corrcoef(shifts[(p1, c1)], shifts[(p2, c2)])[0, 1])
    got = metrics.transfer([(p, c, s) for (p, c), s in shifts.items()])
    assert got["slope"] == pytest.approx(xy / xx, rel=1e-9)
    assert (got["same_pairs"], got["other_pairs"]) == (len(same), len(other)) == (3 + 3 + 1, 21 - 7)
    assert got["same_perturbation_r"] == pytest.approx(np.mean(same), rel=1e-9)
    assert got["other_perturbations_r"] == pytest.approx(np.mean(other), rel=1e-9)
    assert got["carries_over"] is True
    # One covariate value: nothing carries over to measure.
    assert metrics.transfer([("A", "t1", np.ones(3)), ("B", "t1", np.zeros(3))]) is None
    with pytest.raises(ValueError, match="given twice"):
        metrics.transfer([("A", "t1", np.ones(3)), ("A", "t1", np.ones(3))])
    with pytest.raises(ValueError, match="has 2 values, the first one 3"):
        metrics.transfer([("A", "t1", np.ones(3)), ("A", "t2", np.ones(2))])


def test_the_fidelity_harness_scores_with_these_definitions(monkeypatch):
    from cpa_stream import fidelity

    assert fidelity.r2(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0])) == metrics.r2_score([1, 2, 3], [1, 2, 2])
    # The transfer slope tells doses apart as evaluate does: each dose's shift is the same in both
    # cell types (slope 1), but the cell types hold the doses in other proportions, so the shifts
    # pooled over doses differ (1.5 and 2.5 times `up`: slope 2 * 1.5 * 2.5 / (1.5^2 + 2.5^2)).
    genes = 6
    up = np.random.default_rng(6).normal(size=genes)
    cells = [(ct, "control", "0", 0.0) for ct in ("t1", "t2") for _ in range(4)]
    for ct, n1, n3 in (("t1", 3, 1), ("t2", 1, 3)):
        cells += [(ct, "A", "1", 1.0)] * n1 + [(ct, "A", "3", 3.0)] * n3
    cov = np.array([c[0] for c in cells])
    condition = np.array([c[1] for c in cells], dtype=object)
    dose = np.array([c[2] for c in cells], dtype=object)
    values = np.stack([c[3] * up for c in cells])
    train, ctrl = np.ones(len(cells), bool), condition == "control"
    assert fidelity.transfer_slope(values, train, ctrl, condition, cov, None, dose) == pytest.approx(1.0)
    pooled = 2 * 1.5 * 2.5 / (1.5**2 + 2.5**2)
    assert fidelity.transfer_slope(values, train, ctrl, condition, cov, None) == pytest.approx(pooled)
    calls = []
    monkeypatch.setattr(metrics, "transfer", lambda shifts: calls.append(shifts) or {"slope": 0.25})
    assert fidelity.transfer_slope(values, train, ctrl, condition, cov, None, dose) == 0.25
    assert sorted((p, c) for p, c, _ in calls[0]) == [("A|1", "t1"), ("A|1", "t2"), ("A|3", "t1"), ("A|3", "t2")]
    assert metrics.NOISE_REPRODUCIBILITY == 0.1
