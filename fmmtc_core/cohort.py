"""Cohort stratification: what enrolling by the model's probability would do to a trial.

All figures come from the **calibrated** probabilities, so they are expectations under the
model: if the calibration holds, a participant with probability 0.7 is a responder 70 % of the
time. Once observed outcomes are entered, :func:`observed_performance` checks that claim on the
cohort itself (ROC, AUC and a reliability curve).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from fmmtc_core._errors import InvalidInputError

__all__ = ["Stratification", "stratify", "observed_performance", "filter_screenings",
           "outcome_values", "worklist", "WORKLIST_STATUSES"]

#: Worklist statuses: every screened participant, or those still waiting for (or with) an
#: observed outcome.
WORKLIST_STATUSES = ("screened", "awaiting outcome", "outcome recorded")

#: Bins of every reliability curve and ECE the project reports.
RELIABILITY_BINS = 10


@dataclass
class Stratification:
    """Enrolment at a threshold (see :func:`stratify`).

    Probabilities are calibrated ones, so the ``expected_*`` figures are expectations under the
    model; the ``observed_*`` ones count participants with an entered outcome.

    Attributes
    ----------
    threshold : float
        The enrolment threshold on the calibrated probability.
    n_screened, n_enrolled : int
        Participants screened, and those enrolled (probability at or above ``threshold``).
    expected_responders_enrolled : float
        Sum of the enrolled participants' probabilities.
    expected_rate_enrolled : float or None
        Mean probability of the enrolled; None when nobody is enrolled.
    base_rate : float or None
        Mean probability of everyone screened; None when nobody was screened.
    enrichment : float or None
        ``expected_rate_enrolled / base_rate``; None when either is None or the base rate is 0.
    number_needed_to_screen : float or None
        Participants screened per expected responder enrolled
        (``n_screened / expected_responders_enrolled``); None when no responder is expected.
    observed_rate_enrolled : float or None, default=None
        Observed responder rate among the enrolled with an outcome.
    observed_base_rate : float or None, default=None
        Observed responder rate among everyone with an outcome.
    n_observed_enrolled : int, default=0
        Enrolled participants with an observed outcome.
    """

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
        """The fields as a plain dict (JSON-ready).

        Returns
        -------
        dict
            Field name -> value, in the order of the attributes above.
        """
        return dict(self.__dict__)


def stratify(probability: ArrayLike, threshold: float, *, band_low: ArrayLike | None = None,
             require_band: bool = False, outcome: ArrayLike | None = None) -> Stratification:
    """Enrol everyone whose calibrated probability is at least ``threshold``.

    Parameters
    ----------
    probability : array-like of float
        Calibrated responder probabilities of the screened participants, in [0, 1].
    threshold : float
        The enrolment threshold, in [0, 1].
    band_low : array-like of float or None, default=None
        Lower ends of the uncertainty bands, in the same order; used only with
        ``require_band``.
    require_band : bool, default=False
        Enrol only participants whose whole band clears the threshold (``band_low >=
        threshold`` as well): a stricter rule that enrols fewer, more certain participants.
        Ignored when ``band_low`` is None.
    outcome : array-like of {1, 0, NaN} or None, default=None
        Observed outcomes, where known (:func:`outcome_values`); they fill the ``observed_*``
        fields.

    Returns
    -------
    Stratification
        ``number_needed_to_screen`` = participants screened per expected responder enrolled
        (``n_screened / sum(p of the enrolled)``): the recruitment cost of one responder.

    Raises
    ------
    InvalidInputError
        ``threshold`` is outside [0, 1], or a probability is (or is not a number: it would
        make every rate of the cohort NaN).
    """
    p = np.asarray(probability, dtype=float)
    if not 0.0 <= threshold <= 1.0:
        raise InvalidInputError(f"The threshold must be between 0 and 1, got {threshold}.")
    if p.size and not np.isfinite(p).all():
        raise InvalidInputError(f"Probabilities must be numbers between 0 and 1; "
                                f"{int((~np.isfinite(p)).sum())} of {p.size} are missing or "
                                "not finite.")
    if p.size and (p.min() < 0 or p.max() > 1):
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


def outcome_values(outcomes: Iterable[str | None]) -> np.ndarray:
    """Observed outcomes as numbers, as :func:`stratify` and :func:`observed_performance` take
    them.

    Parameters
    ----------
    outcomes : iterable of str or None
        ``"responder"``, ``"non-responder"`` or None (no outcome known), e.g. the ``outcome``
        column of :func:`fmmtc_core.store.repository.screenings_frame`.

    Returns
    -------
    ndarray of float64
        1.0 for ``"responder"``, 0.0 for ``"non-responder"``, NaN for anything else.

    Examples
    --------
    >>> outcome_values(["responder", None, "non-responder"]).tolist()
    [1.0, nan, 0.0]
    """
    return pd.Series(list(outcomes), dtype=object).map(
        {"responder": 1.0, "non-responder": 0.0}).astype(float).to_numpy()


def reliability(probability: ArrayLike, outcome: ArrayLike,
                n_bins: int = RELIABILITY_BINS) -> list[dict]:
    """Reliability (calibration) bins of predicted probabilities against observed outcomes.

    Equal-width bins of the predicted probability (bin ``b`` is ``[b/n, (b+1)/n)``, the last
    one closed); the one binning the project uses (the cohort page's curve and the training
    metrics' ECE).

    Parameters
    ----------
    probability : array-like of float
        Predicted (calibrated) probabilities, in [0, 1] and finite.
    outcome : array-like of {1, 0}
        Observed outcomes, same length (no NaN: drop unknown outcomes first).
    n_bins : int, default=RELIABILITY_BINS
        Number of bins (10).

    Returns
    -------
    list of dict
        One per non-empty bin, in order: ``bin`` (its index), ``predicted`` (mean probability),
        ``observed`` (responder rate) and ``n`` (size).
    """
    p = np.asarray(probability, dtype=float)
    y = np.asarray(outcome, dtype=float)
    idx = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)  # bin b: [b/n, (b+1)/n)
    return [{"bin": b, "predicted": float(p[idx == b].mean()),
             "observed": float(y[idx == b].mean()), "n": int((idx == b).sum())}
            for b in range(n_bins) if (idx == b).any()]


def expected_calibration_error(probability: ArrayLike, outcome: ArrayLike,
                               n_bins: int = RELIABILITY_BINS) -> float:
    """ECE: the size-weighted mean |observed - predicted| over the :func:`reliability` bins.

    Parameters
    ----------
    probability : array-like of float
        Predicted (calibrated) probabilities, in [0, 1] and finite.
    outcome : array-like of {1, 0}
        Observed outcomes, same length (no NaN).
    n_bins : int, default=RELIABILITY_BINS
        Number of bins (10).

    Returns
    -------
    float
        The expected calibration error, in [0, 1].

    Raises
    ------
    ZeroDivisionError
        ``probability`` is empty.
    """
    bins = reliability(probability, outcome, n_bins)
    total = sum(b["n"] for b in bins)
    return float(sum(abs(b["observed"] - b["predicted"]) * b["n"] for b in bins) / total)


def observed_performance(probability: ArrayLike, outcome: ArrayLike, *,
                         n_bins: int = RELIABILITY_BINS) -> dict | None:
    """ROC curve, AUC and a reliability curve on participants with an observed outcome.

    Parameters
    ----------
    probability : array-like of float
        Calibrated responder probabilities of the screened participants.
    outcome : array-like of {1, 0, NaN}
        Observed outcomes in the same order, NaN where none is known
        (:func:`outcome_values`); participants with a NaN outcome or probability are left out.
    n_bins : int, default=RELIABILITY_BINS
        Bins of the reliability curve (10).

    Returns
    -------
    dict or None
        ``fpr``, ``tpr`` (lists: the ROC curve), ``auc``, ``reliability``
        (:func:`reliability`), ``n`` (participants with an outcome), ``n_responders`` and
        ``brier`` (mean squared error of the probabilities). None when fewer than two outcomes
        of each kind are known (no curve is meaningful).
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


def filter_screenings(df: pd.DataFrame, *, sites: Iterable[str] | None = None,
                      drugs: Iterable[str] | None = None,
                      decisions: Iterable[str] | None = None, qc: Iterable[str] | None = None,
                      start: str | dt.date | None = None, end: str | dt.date | None = None,
                      simulated: bool | None = None) -> pd.DataFrame:
    """Rows of :func:`fmmtc_core.store.repository.screenings_frame` matching every filter given.

    Parameters
    ----------
    df : pandas.DataFrame
        A :func:`~fmmtc_core.store.repository.screenings_frame` (its ``site``, ``drug``,
        ``decision``, ``qc_verdict``, ``created_at`` and ``simulated`` columns are read).
    sites, drugs, decisions, qc : iterable of str or None, default=None
        Keep the rows whose ``site``, ``drug``, ``decision`` or ``qc_verdict`` is one of these;
        None: no filter; an empty list matches nothing.
    start, end : str, date or None, default=None
        First and last day of ``created_at``, both included (``end`` keeps everything before
        the day after it); None: open-ended.
    simulated : bool or None, default=None
        Keep only simulated (True) or only real (False) participants; None: both.

    Returns
    -------
    pandas.DataFrame
        The matching rows, in their order, with a fresh index.
    """
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


def worklist(df: pd.DataFrame, *, search: str | None = None,
             status: str | None = None) -> pd.DataFrame:
    """Participants to work on: one row per participant, found by text and status.

    Parameters
    ----------
    df : pandas.DataFrame
        A :func:`~fmmtc_core.store.repository.screenings_frame` (its ``screening_id``,
        ``participant``, ``site``, ``drug``, ``probability``, ``decision``, ``qc_verdict``,
        ``model_validity``, ``created_at`` and ``outcome`` columns are read).
    search : str or None, default=None
        Keep participants whose pseudonym, site or drug contains it (case-insensitive; spaces
        around it ignored); None or blank: everyone.
    status : {"screened", "awaiting outcome", "outcome recorded"} or None, default=None
        ``"screened"`` (or None): every participant; ``"awaiting outcome"``: screened, no
        observed outcome yet; ``"outcome recorded"``: with one.

    Returns
    -------
    pandas.DataFrame
        Latest screening first, one row per participant (their latest screening, by id):
        ``participant``, ``status`` (``"awaiting outcome"`` or ``"outcome recorded"``),
        ``site``, ``drug``, ``last_screened``, ``probability``, ``decision``, ``qc_verdict``,
        ``model_validity``, ``outcome``, ``screenings`` (how many rows of ``df`` they have)
        and ``screening_id`` (of the latest).

    Raises
    ------
    InvalidInputError
        An unknown ``status``.
    """
    from fmmtc_core._errors import check_option

    if status is not None:
        check_option("status", status, WORKLIST_STATUSES)
    ordered = df.sort_values("screening_id")
    latest = ordered.drop_duplicates("participant", keep="last").copy()
    latest["screenings"] = latest["participant"].map(ordered["participant"].value_counts())
    latest["status"] = np.where(latest["outcome"].notna(), "outcome recorded",
                                "awaiting outcome")
    text = (search or "").strip().lower()
    if text:
        hay = latest[["participant", "site", "drug"]].fillna("").astype(str)
        latest = latest[hay.apply(lambda col: col.str.lower().str.contains(text, regex=False))
                        .any(axis=1)]
    if status in ("awaiting outcome", "outcome recorded"):
        latest = latest[latest["status"] == status]
    latest = latest.rename(columns={"created_at": "last_screened"})
    cols = ["participant", "status", "site", "drug", "last_screened", "probability",
            "decision", "qc_verdict", "model_validity", "outcome", "screenings",
            "screening_id"]
    return latest.sort_values("screening_id", ascending=False)[cols].reset_index(drop=True)
