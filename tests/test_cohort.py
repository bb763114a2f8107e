"""Cohort stratification: enrolment, expected and observed rates, number needed to screen."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fmmtc_core import InvalidInputError
from fmmtc_core.cohort import filter_screenings, observed_performance, stratify


def test_stratify_by_hand():
    p = np.array([0.9, 0.8, 0.5, 0.2, 0.1])
    s = stratify(p, 0.6)
    assert (s.n_screened, s.n_enrolled) == (5, 2)
    assert s.expected_responders_enrolled == pytest.approx(1.7)
    assert s.expected_rate_enrolled == pytest.approx(0.85)
    assert s.base_rate == pytest.approx(0.5)
    assert s.enrichment == pytest.approx(1.7)
    assert s.number_needed_to_screen == pytest.approx(5 / 1.7)
    strict = stratify(p, 0.6, band_low=np.array([0.7, 0.5, 0.4, 0.1, 0.0]), require_band=True)
    assert strict.n_enrolled == 1


def test_stratify_edges_and_outcomes():
    p = np.array([0.3, 0.2])
    s = stratify(p, 0.9)
    assert s.n_enrolled == 0 and s.expected_rate_enrolled is None
    assert s.number_needed_to_screen is None and s.enrichment is None
    s = stratify(np.array([0.9, 0.7, 0.2]), 0.5, outcome=[1, np.nan, 0])
    assert s.observed_rate_enrolled == 1.0 and s.n_observed_enrolled == 1
    assert s.observed_base_rate == 0.5
    with pytest.raises(InvalidInputError, match="threshold must be between 0 and 1"):
        stratify(p, 1.5)
    with pytest.raises(InvalidInputError, match="Probabilities must lie between 0 and 1"):
        stratify([1.2], 0.5)


def test_observed_performance():
    assert observed_performance([0.9, 0.1, 0.8], [1, 0, np.nan]) is None  # too few outcomes
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.4])
    y = np.array([1, 1, 0, 0, 0, 1])
    perf = observed_performance(p, y)
    assert perf["auc"] == pytest.approx(8 / 9)  # 8 of the 9 responder/non-responder pairs
    assert perf["n"] == 6 and perf["n_responders"] == 3
    assert sum(r["n"] for r in perf["reliability"]) == 6
    assert perf["brier"] == pytest.approx(np.mean((p - y) ** 2))


def test_filter_screenings():
    df = pd.DataFrame({"site": ["a", "b", "a"], "drug": ["x", "x", "y"],
                       "decision": ["uncertain", "likely responder", "uncertain"],
                       "qc_verdict": ["pass", "warn", "pass"],
                       "created_at": pd.to_datetime(["2026-01-01", "2026-02-01", "2026-03-01"]),
                       "simulated": [True, False, False]})
    assert len(filter_screenings(df)) == 3
    assert filter_screenings(df, sites=["a"])["drug"].tolist() == ["x", "y"]
    assert len(filter_screenings(df, decisions=[])) == 0
    assert len(filter_screenings(df, start="2026-01-15", end="2026-02-01")) == 1
    assert len(filter_screenings(df, simulated=False)) == 2


def test_one_reliability_binning_for_the_page_and_the_metrics():
    from fmmtc_core.cohort import RELIABILITY_BINS, expected_calibration_error, reliability

    p = np.array([0.05, 0.1, 0.3, 0.3, 0.95, 1.0])
    y = np.array([0, 0, 1, 0, 1, 1])
    bins = reliability(p, y)
    assert [b["bin"] for b in bins] == [0, 1, 3, 9]  # [b/10, (b+1)/10); 1.0 joins the last
    assert sum(b["n"] for b in bins) == 6 and RELIABILITY_BINS == 10
    assert expected_calibration_error(p, y) == pytest.approx(
        (0.05 + 0.1 + 2 * 0.2 + 2 * 0.025) / 6)
