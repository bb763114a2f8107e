"""Honest evaluation: cross-fitted calibration, intervals, permutation test, alarms."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fmmtc_core import InvalidInputError
from fmmtc_core.evaluation import (
    auc_interval,
    band_from_bootstrap,
    cross_fitted_platt,
    permutation_p_value,
    platt_bootstrap,
    signal_warnings,
)


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    logits = rng.standard_normal(60) + 1.5 * y
    fold_of = np.tile(np.arange(5), 12)
    return y, logits, fold_of


def test_cross_fitted_calibration_never_sees_the_scored_fold(scored):
    y, logits, fold_of = scored
    p = cross_fitted_platt(logits, y, fold_of)
    assert p.shape == y.shape and np.all((p > 0) & (p < 1))
    # Changing the labels of fold 0 changes no probability of fold 0 ...
    y2 = y.copy()
    y2[fold_of == 0] = 1 - y2[fold_of == 0]
    p2 = cross_fitted_platt(logits, y2, fold_of)
    np.testing.assert_array_equal(p[fold_of == 0], p2[fold_of == 0])
    # ... but does change the other folds' (their calibration was fitted on fold 0).
    assert not np.allclose(p[fold_of != 0], p2[fold_of != 0])
    with pytest.raises(InvalidInputError, match="same length"):
        cross_fitted_platt(logits, y[:-1], fold_of)


def test_inverted_scores_fall_back_to_the_base_rate(scored):
    y, logits, fold_of = scored
    p = cross_fitted_platt(-logits, y, fold_of)
    np.testing.assert_allclose(p, y.mean(), atol=0.05)


def test_auc_interval_brackets_the_auc(scored):
    y, logits, _ = scored
    lo, hi = auc_interval(y, logits)
    assert lo < roc_auc_score(y, logits) < hi and 0.5 < lo
    assert auc_interval(y, logits) == (lo, hi)  # seeded
    with pytest.raises(InvalidInputError, match="needs participants of both classes"):
        auc_interval(np.ones(5), np.arange(5.0))


def test_bootstrap_band_is_ordered_and_widens_with_little_data(scored):
    y, logits, _ = scored
    wide = band_from_bootstrap([0.0, 2.0], platt_bootstrap(logits[::6], y[::6], n=100))
    narrow = band_from_bootstrap([0.0, 2.0], platt_bootstrap(logits, y, n=100))
    assert np.all(wide[:, 0] <= wide[:, 1]) and np.all(narrow[:, 0] <= narrow[:, 1])
    assert (narrow[:, 1] - narrow[:, 0]).mean() < (wide[:, 1] - wide[:, 0]).mean()


def test_permutation_p_value_reruns_on_permuted_labels(scored):
    y, logits, _ = scored
    seen = []

    def run(y_perm):
        seen.append(y_perm)
        return roc_auc_score(y_perm, logits)

    res = permutation_p_value(roc_auc_score(y, logits), run, y, n=19, seed=1)
    assert res["n_permutations"] == 19 and len(seen) == 19
    assert res["p_value"] == pytest.approx(1 / 20)  # nothing permuted beats the real labels
    assert all(sorted(s) == sorted(y) for s in seen) and not all(
        np.array_equal(s, y) for s in seen)
    with pytest.raises(InvalidInputError, match="needs n >= 1 permutations, got 0"):
        permutation_p_value(0.5, run, y, n=0)
    noise = permutation_p_value(0.5, run, y, n=19, seed=1)
    assert noise["p_value"] > 0.2


def test_signal_warnings_name_the_collapse(scored):
    y, logits, fold_of = scored
    good = cross_fitted_platt(logits, y, fold_of)
    assert signal_warnings(y, logits, good, auc_interval(y, logits)) == []
    flat = np.full(60, 0.5)
    text = " ".join(signal_warnings(y, np.zeros(60), flat, (0.4, 0.6)))
    assert "COLLAPSED TO THE BASE RATE" in text and "includes chance" in text
    assert "nearly constant logits" in text
