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
    with pytest.raises(InvalidInputError, match=r"^Probabilities must be numbers between 0 and "
                                                r"1; 1 of 3 are missing or not finite\.$"):
        stratify([0.2, np.nan, 0.9], 0.5)  # every rate would be NaN


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


def _frame() -> pd.DataFrame:
    """Three participants; PAIN-0001 screened twice (two models), PAIN-0002 with an outcome."""
    return pd.DataFrame({
        "screening_id": [1, 2, 3, 4], "participant": ["PAIN-0001", "PAIN-0002", "SIM-003",
                                                      "PAIN-0001"],
        "site": ["leeds", "york", None, "leeds"], "drug": ["pregabalin", None, "x", "pregabalin"],
        "probability": [0.2, 0.7, 0.5, 0.3],
        "decision": ["likely non-responder", "likely responder", "uncertain", "uncertain"],
        "qc_verdict": ["pass", "warn", "pass", "pass"],
        "model_validity": ["simulated"] * 4,
        "created_at": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]),
        "outcome": [None, "responder", None, None]})


def test_worklist_one_row_per_participant_latest_first():
    from fmmtc_core.cohort import worklist

    w = worklist(_frame())
    assert w["participant"].tolist() == ["PAIN-0001", "SIM-003", "PAIN-0002"]
    first = w.iloc[0]
    assert (first["screening_id"], first["screenings"], first["decision"]) == (4, 2, "uncertain")
    assert w["status"].tolist() == ["awaiting outcome", "awaiting outcome", "outcome recorded"]
    assert worklist(_frame(), status="screened").equals(w)


def test_worklist_search_and_status():
    from fmmtc_core.cohort import worklist

    assert worklist(_frame(), search=" pain-000 ")["participant"].tolist() == [
        "PAIN-0001", "PAIN-0002"]
    assert worklist(_frame(), search="YORK")["participant"].tolist() == ["PAIN-0002"]
    assert worklist(_frame(), search="pregab")["participant"].tolist() == ["PAIN-0001"]
    assert worklist(_frame(), search="nobody").empty
    assert worklist(_frame(), status="awaiting outcome")["participant"].tolist() == [
        "PAIN-0001", "SIM-003"]
    assert worklist(_frame(), search="pain", status="outcome recorded")[
        "participant"].tolist() == ["PAIN-0002"]
    with pytest.raises(InvalidInputError, match="Invalid value for the 'status' parameter"):
        worklist(_frame(), status="done")
