"""Cohort stratification: what enrolling by the model's probability would do to a trial.

All figures come from the **calibrated** probabilities, so they are expectations under the
model: if the calibration holds, a participant with probability 0.7 is a responder 70 % of the
time. Once observed outcomes are entered, :func:`observed_performance` checks that claim on the
cohort itself (ROC, AUC and a reliability curve).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fmmtc_core._errors import InvalidInputError

__all__ = ["Stratification", "stratify", "observed_performance", "filter_screenings",
           "outcome_values"]

#: Bins of every reliability curve and ECE the project reports.
RELIABILITY_BINS = 10


@dataclass
class Stratification:
    """Enrolment at a threshold (see :func:`stratify`)."""

    threshold: float
    n_screened: int
    n_enrolled: int
    expected_responders_enrolled: float
    expected_rate_enrolled: float | None  # mean probability of the enrolled
    base_rate: float | None  # mean probability of everyone screened
    enrichment: float | None  # expected_rate_enrolled / base_rate
    number_needed_to_screen: float | None  # screened per expected responder enrolled
    observed_rate_enrolled: float | None = None  # among enrolled with an observed outcome
    observed_base_rate: float | None = None
    n_observed_enrolled: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def stratify(probability, threshold: float, *, band_low=None, require_band: bool = False,
             outcome=None) -> Stratification:
    """Enrol everyone whose calibrated probability is at least ``threshold``.

    Parameters
    ----------
    probability : array of float
        Calibrated responder probabilities of the screened participants.
    threshold : float in [0, 1]
    band_low : array of float or None
        Lower ends of the uncertainty bands; with ``require_band`` the whole band must clear the
        threshold (a stricter rule that enrols fewer, more certain participants).
    outcome : array of {1, 0, NaN} or None
        Observed outcomes, where known.

    Returns
    -------
    Stratification
        ``number_needed_to_screen`` = participants screened per expected responder enrolled
        (``n_screened / sum(p of the enrolled)``): the recruitment cost of one responder.
    """
    p = np.asarray(probability, dtype=float)
    if not 0.0 <= threshold <= 1.0:
        raise InvalidInputError(f"The threshold must be between 0 and 1, got {threshold}.")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1):
        raise InvalidInputError("Probabilities must lie between 0 and 1.")
    enrolled = p >= threshold
    if require_band and band_low is not None:
        enrolled &= np.asarray(band_low, dtype=float) >= threshold
    n, k = int(p.size), int(enrolled.sum())
    exp_resp = float(p[enrolled].sum())
    base = float(p.mean()) if n else None
    rate = float(p[enrolled].mean()) if k else None
    out = Stratification(
        threshold=float(threshold), n_screened=n, n_enrolled=k,
        expected_responders_enrolled=exp_resp, expected_rate_enrolled=rate, base_rate=base,
        enrichment=(rate / base) if (rate is not None and base) else None,
        number_needed_to_screen=(n / exp_resp) if exp_resp > 0 else None,
    )
    if outcome is not None:
        y = np.asarray(outcome, dtype=float)
        known = np.isfinite(y)
        if known.any():
            out.observed_base_rate = float(y[known].mean())
        ek = known & enrolled
        out.n_observed_enrolled = int(ek.sum())
        if ek.any():
            out.observed_rate_enrolled = float(y[ek].mean())
    return out


def outcome_values(outcomes) -> np.ndarray:
    """Observed outcomes as numbers: 1.0 for ``"responder"``, 0.0 for ``"non-responder"``,
    NaN where none is known (the ``outcome`` column of
    :func:`fmmtc_core.store.repository.screenings_frame`), as :func:`stratify` and
    :func:`observed_performance` take them.

    Examples
    --------
    >>> outcome_values(["responder", None, "non-responder"]).tolist()
    [1.0, nan, 0.0]
    """
    return pd.Series(list(outcomes), dtype=object).map(
        {"responder": 1.0, "non-responder": 0.0}).astype(float).to_numpy()


def reliability(probability, outcome, n_bins: int = RELIABILITY_BINS) -> list[dict]:
    """Reliability (calibration) bins: equal-width bins of the predicted probability, each
    non-empty one with its mean prediction, observed responder rate and size. The one binning
    the project uses (the cohort page's curve and the training metrics' ECE)."""
    p = np.asarray(probability, dtype=float)
    y = np.asarray(outcome, dtype=float)
    idx = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)  # bin b: [b/n, (b+1)/n)
    return [{"bin": b, "predicted": float(p[idx == b].mean()),
             "observed": float(y[idx == b].mean()), "n": int((idx == b).sum())}
            for b in range(n_bins) if (idx == b).any()]


def expected_calibration_error(probability, outcome, n_bins: int = RELIABILITY_BINS) -> float:
    """ECE: the size-weighted mean |observed - predicted| over the :func:`reliability` bins."""
    bins = reliability(probability, outcome, n_bins)
    total = sum(b["n"] for b in bins)
    return float(sum(abs(b["observed"] - b["predicted"]) * b["n"] for b in bins) / total)


def observed_performance(probability, outcome, *, n_bins: int = RELIABILITY_BINS) -> dict | None:
    """ROC curve, AUC and a reliability curve on participants with an observed outcome.

    Returns None when fewer than two outcomes of each kind are known (no curve is meaningful).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    p = np.asarray(probability, dtype=float)
    y = np.asarray(outcome, dtype=float)
    known = np.isfinite(y) & np.isfinite(p)
    p, y = p[known], y[known].astype(int)
    if (y == 1).sum() < 2 or (y == 0).sum() < 2:
        return None
    fpr, tpr, _ = roc_curve(y, p)
    rel = reliability(p, y, n_bins)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(roc_auc_score(y, p)),
            "reliability": rel, "n": int(y.size), "n_responders": int(y.sum()),
            "brier": float(np.mean((p - y) ** 2))}


def filter_screenings(df: pd.DataFrame, *, sites=None, drugs=None, decisions=None,
                      qc=None, start=None, end=None, simulated: bool | None = None
                      ) -> pd.DataFrame:
    """Rows of :func:`fmmtc_core.store.repository.screenings_frame` matching every filter given
    (None = no filter; an empty list matches nothing)."""
    m = np.ones(len(df), dtype=bool)
    for col, values in (("site", sites), ("drug", drugs), ("decision", decisions),
                        ("qc_verdict", qc)):
        if values is not None:
            m &= df[col].isin(list(values)).to_numpy()
    if start is not None:
        m &= (pd.to_datetime(df["created_at"]) >= pd.Timestamp(start)).to_numpy()
    if end is not None:
        m &= (pd.to_datetime(df["created_at"]) < pd.Timestamp(end) + pd.Timedelta(days=1)).to_numpy()
    if simulated is not None:
        m &= (df["simulated"].astype(bool) == simulated).to_numpy()
    return df.loc[m].reset_index(drop=True)
