"""Honest evaluation of cross-validated classifiers: cross-fitted calibration, intervals,
permutation tests and the "no signal" alarm.

Every function here works on out-of-fold scores (each participant scored by a model that did
not see them) and keeps one more rule: **a participant's reported probability never comes from
a calibration fitted on that participant**. Platt scaling is cross-fitted (fitted on the other
folds' out-of-fold logits), the AUC gets a bootstrap interval over participants, and the
label-permutation p-value re-runs the whole cross-validation on permuted labels (Ojala and
Garriga, 2010), because a permutation of the out-of-fold scores alone would not account for
what the training saw.

The deployed ensemble's calibration, on the other hand, is fitted on all out-of-fold scores
(there is nothing left to hold out), on the quantity the ensemble outputs: the mean of the
fold models' scaled logits. :func:`platt_bootstrap` gives the parameter draws whose spread
becomes the uncertainty band of a screening.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from fmmtc_core._errors import InvalidInputError

__all__ = [
    "cross_fitted_platt",
    "platt_bootstrap",
    "band_from_bootstrap",
    "auc_interval",
    "permutation_p_value",
    "signal_warnings",
    "OutOfFold",
    "score_out_of_fold",
]


def _fit_platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from fmmtc_core.models.ensemble import fit_platt

    if len(set(np.asarray(y).tolist())) < 2:  # one class only: the base rate is all there is
        p = float(np.clip(np.mean(y), 1e-3, 1 - 1e-3))
        return 0.0, math.log(p / (1 - p))
    a, b = fit_platt(logits, y)
    if a <= 0:  # an inverted or flat ranking carries no usable signal: the base rate
        p = float(np.clip(np.mean(y), 1e-3, 1 - 1e-3))
        return 0.0, math.log(p / (1 - p))
    return a, b


def cross_fitted_platt(logits: np.ndarray, y: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """Platt-calibrated probabilities, each fitted without the participant's fold.

    Parameters
    ----------
    logits : ndarray (N,)
        Out-of-fold logits.
    y : ndarray (N,)
        Labels, 1 (responder) or 0.
    fold_of : ndarray (N,) of int
        The fold in which each participant was held out.

    Returns
    -------
    ndarray (N,) of float64
        ``sigmoid(a_k * logit + b_k)`` with ``(a_k, b_k)`` fitted on the other folds only (a
        slope <= 0 there, or other folds holding one class only, gives that fold the other
        folds' base rate, clipped to [0.001, 0.999]).

    Raises
    ------
    InvalidInputError
        ``logits``, ``y`` and ``fold_of`` differ in length.
    """
    logits, y, fold_of = np.asarray(logits, float), np.asarray(y).astype(int), np.asarray(fold_of)
    if not len(logits) == len(y) == len(fold_of):
        raise InvalidInputError("logits, y and fold_of must have the same length.")
    out = np.empty(len(y))
    for k in np.unique(fold_of):
        held = fold_of == k
        a, b = _fit_platt(logits[~held], y[~held])
        out[held] = 1.0 / (1.0 + np.exp(-(a * logits[held] + b)))
    return out


def platt_bootstrap(logits: np.ndarray, y: np.ndarray, n: int = 200,
                    seed: int = 0) -> np.ndarray:
    """Platt parameters refitted on bootstrap resamples of the participants.

    Parameters
    ----------
    logits : ndarray (N,)
        Out-of-fold logits of the deployed quantity.
    y : ndarray (N,)
        Labels.
    n : int, default=200
        Resamples.
    seed : int, default=0
        Seed of the resampling (deterministic given the seed).

    Returns
    -------
    ndarray (n, 2)
        ``(a, b)`` per resample (a slope <= 0, or a resample of one class only, becomes
        ``(0, logit of the resample's base rate)``).
    """
    rng = np.random.default_rng([seed, 31337])
    logits, y = np.asarray(logits, float), np.asarray(y).astype(int)
    draws = np.empty((n, 2))
    for j in range(n):
        idx = rng.integers(0, len(y), len(y))
        draws[j] = _fit_platt(logits[idx], y[idx])
    return draws


def band_from_bootstrap(mean_logit: ArrayLike, draws: np.ndarray,
                        level: float = 0.8) -> np.ndarray:
    """Central ``level`` interval of the calibrated probability over the Platt draws.

    Parameters
    ----------
    mean_logit : float or array-like (B,)
        The ensemble's output (mean scaled fold logit); a scalar counts as B = 1.
    draws : ndarray (n, 2)
        :func:`platt_bootstrap` output (stored in the model card).
    level : float, default=0.8
        Probability mass between the bounds (quantiles ``(1 - level) / 2`` and
        ``(1 + level) / 2``).

    Returns
    -------
    ndarray (B, 2)
        Lower and upper bound per participant.
    """
    m = np.atleast_1d(np.asarray(mean_logit, float))
    d = np.asarray(draws, float)
    p = 1.0 / (1.0 + np.exp(-(d[:, :1] * m[None, :] + d[:, 1:])))  # (n, B)
    q = (1 - level) / 2
    return np.stack([np.quantile(p, q, axis=0), np.quantile(p, 1 - q, axis=0)], axis=1)


def auc_interval(y: np.ndarray, score: np.ndarray, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC over participants.

    Parameters
    ----------
    y : ndarray (N,)
        Labels.
    score : ndarray (N,)
        Out-of-fold scores (any monotone scale).
    n : int, default=1000
        Resamples (those with one class only are skipped).
    seed : int, default=0
        Seed of the resampling (deterministic given the seed).
    level : float, default=0.95
        Coverage of the interval.

    Returns
    -------
    low, high : float
        The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled AUCs.

    Raises
    ------
    InvalidInputError
        No resample holds both classes (e.g. ``y`` has one class only, or ``n`` is 0).
    """
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng([seed, 4242])
    y, score = np.asarray(y).astype(int), np.asarray(score, float)
    aucs = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            aucs.append(roc_auc_score(y[idx], score[idx]))
    if not aucs:
        raise InvalidInputError(
            "An AUC interval needs participants of both classes; got labels "
            f"{sorted(set(y.tolist()))}.")
    q = (1 - level) / 2
    return float(np.quantile(aucs, q)), float(np.quantile(aucs, 1 - q))


def permutation_p_value(observed: float, run: Callable[[np.ndarray], float], y: np.ndarray,
                        n: int, seed: int = 0,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """Label-permutation test of a cross-validated AUC (Ojala and Garriga, 2010).

    Parameters
    ----------
    observed : float
        The AUC obtained with the true labels.
    run : callable(y_permuted) -> float
        Re-runs the *whole* cross-validation (folds, training, scoring) on permuted labels and
        returns its out-of-fold AUC.
    y : ndarray (N,)
        True labels.
    n : int
        Permutations (the smallest reachable p-value is ``1 / (n + 1)``).
    seed : int, default=0
        Seed of the permutations (deterministic given the seed).
    progress : callable(done, total) or None, default=None
        Called after each permutation.

    Returns
    -------
    dict
        ``p_value`` (``(1 + #{null >= observed}) / (n + 1)``), ``n_permutations`` and the
        permuted AUCs' ``null_mean`` / ``null_sd`` (population SD, ``ddof=0``).

    Raises
    ------
    InvalidInputError
        ``n`` is not an ``int`` of at least 1 (a ``bool`` is refused), before any run.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInputError(f"The permutation test needs n >= 1 permutations, got {n!r}.")
    rng = np.random.default_rng([seed, 2718])
    null = []
    for i in range(n):
        null.append(float(run(rng.permutation(y))))
        if progress is not None:
            progress(i + 1, n)
    null_arr = np.asarray(null)
    return {"p_value": float((1 + (null_arr >= observed).sum()) / (n + 1)),
            "n_permutations": int(n), "null_mean": float(null_arr.mean()),
            "null_sd": float(null_arr.std())}


def signal_warnings(y: np.ndarray, oof_logits: np.ndarray, prob: np.ndarray,
                    auc_ci: tuple[float, float]) -> list[str]:
    """Plain-language warnings when cross-validation found no usable signal.

    Parameters
    ----------
    y : ndarray (N,)
        Labels.
    oof_logits : ndarray (N,)
        Out-of-fold logits.
    prob : ndarray (N,)
        Cross-fitted calibrated probabilities.
    auc_ci : (float, float)
        :func:`auc_interval` of the out-of-fold scores (the warning's text calls it the 95 %
        interval, the default level).

    Returns
    -------
    list of str
        Empty when the model separates the classes out of fold.
    """
    out = []
    base = float(np.mean(y))
    if np.std(prob) < 0.02:
        out.append(
            f"COLLAPSED TO THE BASE RATE: every participant gets about the same probability "
            f"({np.mean(prob):.2f}; responder rate {base:.2f}). The model has learned nothing "
            "usable from this cohort; do not use it to screen anyone.")
    if auc_ci[0] <= 0.5:
        out.append(
            f"NO RELIABLE SIGNAL: the interval of the out-of-fold AUC "
            f"({auc_ci[0]:.2f}-{auc_ci[1]:.2f}) includes chance (0.5).")
    spread = np.std(oof_logits)
    if spread < 1e-3:
        out.append("The fold models give nearly constant logits (SD "
                   f"{spread:.1e}): training stopped before it learned anything.")
    return out


@dataclass(eq=False)
class OutOfFold:
    """A cross-validation's out-of-fold scores, scored and calibrated (:func:`score_out_of_fold`).

    Each field is also an attribute of the same name.

    Parameters
    ----------
    logit : ndarray (N,)
        The deployed quantity's out-of-fold estimate: the mean over repeats of each
        participant's logit from the fold model that held them out.
    probability : ndarray (N,)
        :func:`cross_fitted_platt` of ``logit``: what the metrics score.
    metrics : dict
        ``fmmtc_core.training.binary_metrics`` of ``probability``, then ``auc_ci95``,
        ``auc_per_repeat``, ``repeats``, ``calibration`` (in words), ``permutation`` (when
        given) and ``warnings``: the ``metrics_out_of_fold`` of a model card.
    a, b : float
        The deployed Platt calibration, fitted on all of ``logit`` (``a = 0`` and ``b`` the
        base rate's logit when the slope is not positive).
    bootstrap : ndarray (n, 2)
        :func:`platt_bootstrap` draws of ``(a, b)``: the screening's uncertainty band.
    note : str
        ``"fitted"``, or why the calibration fell back to the base rate.
    warnings : list of str
        :func:`signal_warnings`, and a permutation p-value above 0.05 in words.
    """

    logit: np.ndarray
    probability: np.ndarray
    metrics: dict
    a: float
    b: float
    bootstrap: np.ndarray
    note: str
    warnings: list[str]


def score_out_of_fold(y: np.ndarray, oof_per_repeat: Sequence[np.ndarray],
                      fold_of: np.ndarray, *, seed: int = 0,
                      permutation: dict | None = None) -> OutOfFold:
    """Metrics, calibration and warnings of a cross-validation: one protocol for every model.

    :func:`fmmtc_core.training.train` (FMM-TC) and
    :func:`fmmtc_core.baselines.train_baseline` (the classic baselines) both score their
    out-of-fold logits here, so their model cards say the same things in the same way.

    Parameters
    ----------
    y : ndarray (N,)
        Labels, 1 (responder) or 0.
    oof_per_repeat : sequence of ndarray (N,)
        Each repeat's out-of-fold logits (of the deployed quantity's scale).
    fold_of : ndarray (N,) of int
        The fold that held each participant out in the first repeat (the cross-fitting of the
        calibration follows it).
    seed : int, default=0
        Seed of the AUC interval's and of the calibration bootstrap's resampling.
    permutation : dict or None, default=None
        :func:`permutation_p_value`'s result, when a permutation test was run.

    Returns
    -------
    OutOfFold

    Raises
    ------
    InvalidInputError
        ``y`` holds one class only (no AUC interval), or the arrays differ in length.
    """
    from sklearn.metrics import roc_auc_score

    from fmmtc_core.training import binary_metrics

    y = np.asarray(y)
    oof = np.mean(list(oof_per_repeat), axis=0)
    prob = cross_fitted_platt(oof, y, fold_of)  # what is reported: never self-calibrated
    metrics = binary_metrics(y, prob)
    auc_ci = auc_interval(y, oof, seed=seed)
    per_repeat = [float(roc_auc_score(y, run)) for run in oof_per_repeat]
    metrics |= {"auc_ci95": list(auc_ci), "auc_per_repeat": per_repeat,
                "repeats": len(per_repeat), "calibration": "cross-fitted (Platt fitted on the "
                "other folds' out-of-fold logits)"}
    if permutation is not None:
        metrics["permutation"] = permutation
    a, b = _fit_platt(oof, y)  # the deployed calibration: all out-of-fold scores
    draws = platt_bootstrap(oof, y, seed=seed)
    warnings_ = signal_warnings(y, oof, prob, auc_ci)
    if permutation is not None and permutation["p_value"] > 0.05:
        warnings_.append(
            f"NOT SIGNIFICANT: the out-of-fold AUC is not above what permuted labels give "
            f"(p = {permutation['p_value']:.3f}, "
            f"{permutation['n_permutations']} permutations).")
    metrics["warnings"] = warnings_
    note = "fitted" if a > 0 else (
        "slope <= 0 on out-of-fold logits: the model carries no cross-validated signal; "
        "probabilities are the base rate")
    return OutOfFold(logit=oof, probability=prob, metrics=metrics, a=a, b=b, bootstrap=draws,
                     note=note, warnings=warnings_)
