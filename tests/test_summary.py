"""The typed screening summary: what its numbers mean, in words (the modality shares)."""

from __future__ import annotations

import datetime as dt

import pytest

from fmmtc_core.summary import QCNumbers, ScreeningSummary, format_share

HELD = "held at the scan (not attributed)"


def _summary(share_ts, baseline, share_fc=None) -> ScreeningSummary:
    return ScreeningSummary(
        participant="P1", probability=0.5, band=(0.4, 0.6), fold_probabilities=(0.5,),
        decision="uncertain", thresholds={}, qc_verdict="pass", qc_reasons=(), model="m",
        created_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), operator="o",
        share_ts=share_ts, share_fc=None if share_ts is None else
        (1 - share_ts if share_fc is None else share_fc), baseline=baseline)


@pytest.mark.parametrize("share_ts, baseline, expected", [
    (0.0, {"fc": "cohort_mean"}, "has no time-series branch"),
    (0.0, {"ts": HELD, "fc": "cohort_mean"}, "0 % by construction"),
    (0.12, {"ts": HELD, "fc": "cohort_mean", "amplitude": "cohort_mean"},
     "counts only the regional amplitude"),
    (0.002, {"ts": "flat", "fc": "cohort_mean"}, "genuinely small (0.2%)"),
    (0.0, None, "was not recorded"),
])
def test_the_time_series_share_says_why_it_is_zero_or_small(share_ts, baseline, expected):
    note = _summary(share_ts, baseline).share_note
    assert note.startswith("Shares of the total absolute attribution")
    assert expected in note


def test_a_measured_share_needs_no_excuse_and_an_unexplained_screening_says_so():
    note = _summary(0.4, {"ts": "flat", "fc": "cohort_mean"}).share_note
    assert "0 %" not in note and "genuinely small" not in note
    assert _summary(0.999, {"ts": "flat", "fc": "cohort_mean"}, share_fc=0.001).share_note \
        .endswith("The connectivity share is genuinely small (0.1%): this prediction moved "
                  "almost entirely with the time series.")
    assert _summary(None, None).share_note == "This screening was not explained."


@pytest.mark.parametrize("value, text", [(None, "n/a"), (0.0, "0%"), (0.0042, "0.4%"),
                                         (0.00004, "<0.1%"), (0.5, "50%"), (1.0, "100%")])
def test_format_share_never_rounds_a_small_share_to_zero(value, text):
    assert format_share(value) == text


def test_qc_numbers_read_old_and_new_stored_reports():
    old = QCNumbers.from_dict({"reasons": [], "fd_mean_mm": 0.1, "n_regions": 4,
                               "uncovered_regions": ["a"]})
    assert old.motion_known and old.n_covered == 3 and old.uncovered_regions == ("a",)
    assert not QCNumbers.from_dict(None).motion_known
    assert QCNumbers.from_dict({"motion_known": False, "fd_mean_mm": None}).to_dict()[
        "motion_known"] is False
