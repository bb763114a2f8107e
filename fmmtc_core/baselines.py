"""Classic baselines for FMM-TC, on the same folds and under the same protocol.

Users must see when the deep model is not better than a classic one. :func:`compare` runs these
models on one cohort, on the cross-validation folds of :func:`fmmtc_core.training.train`
(``training._splits``: stratified, grouped by site when there are enough sites), and scores
every one the same way:

- ``cpm``: connectome-based predictive modelling (Shen et al. 2017, Nat Protoc 12:506) adapted to
  a binary outcome: edges whose Pearson correlation with the label passes a p threshold form a
  positive and a negative network; each subject's summed edge strength in each network feeds a
  logistic regression.
- ``nbs``: NBS-Predict style (Serin et al. 2021, NeuroImage 244:118625): edge-wise two-sample
  t-test at a p threshold, the largest connected component of the supra-threshold edges (the
  component with the most edges), then an L2 logistic regression on those edges.
- ``edges``: L2 logistic regression on every connectivity edge (Dadi et al. 2019, NeuroImage
  192:115, found l2 linear models on edges among the best connectome predictors).
- ``amplitude``: L2 logistic regression on region amplitude features: log SD, log ALFF,
  fALFF (0.01-0.08 Hz, each scan's own TR) and lag-1 autocorrelation.
- ``oracle``: for simulated cohorts only (``simulation.json`` with planted truth): a logistic
  regression on three features that summarise exactly the planted effects (mean connectivity
  among the planted connectivity regions; mean lag-1 autocorrelation and mean relative log SD
  of the planted temporal regions: slower fluctuations raise both). Not a model: it shows
  what is reachable on the cohort.
- ``fmmtc``: :func:`fmmtc_core.training.train`, its out-of-fold logits read back (optional,
  slow).

Protocol, identical for every model: each outer fold's model sees only its training fold; every
selection (edges, component) and hyper-parameter (p threshold, C) is chosen there by an inner
stratified K-fold grid search (``GridSearchCV``, inner AUC), the test fold never touched.
Out-of-fold logits are calibrated by cross-fitted Platt scaling
(:func:`fmmtc_core.evaluation.cross_fitted_platt`): fold k's map is fitted on the out-of-fold
logits and labels of the *other* folds only, so no subject's own logit or label calibrates its
probability (those other folds' logits come from models that were trained with fold k; a fully
nested calibration would need an inner cross-validation per fold). Metrics are
:func:`fmmtc_core.training.binary_metrics` of those probabilities (threshold 0.5); the AUC's 95 %
interval is a stratified bootstrap over subjects of the AUC averaged over repeats of the
cross-validation, and FMM-TC is compared with the best classic baseline by a paired bootstrap of
the AUC difference on the same subjects.

Features come from cleaned :class:`~fmmtc_core.preprocess.RegionSignals`, the signals
:func:`~fmmtc_core.pipeline.prepare_cohort` gives training, and the connectivity is
:func:`fmmtc_core.preprocess.prepare`'s (Pearson, Fisher z) over the whole cleaned series: the
connectivity FMM-TC reads (models trained with 0.1.0's whole-scan path read it over the span
their encoder's windows cover instead). This module does not import torch until FMM-TC or the fold helper of
:mod:`fmmtc_core.training` is needed.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from fmmtc_core._errors import InvalidInputError, check_option
from fmmtc_core.evaluation import cross_fitted_platt, signal_warnings
from fmmtc_core.preprocess import FC_SPAN_SCAN, CleaningSettings, ModelInputs, RegionSignals

__all__ = [
    "BASELINES",
    "MODELS",
    "ALFF_BAND_HZ",
    "P_THRESHOLDS",
    "C_GRID",
    "BaselineFeatures",
    "CVResult",
    "CPMClassifier",
    "NBSPredictClassifier",
    "amplitude_features",
    "scan_features",
    "baseline_features",
    "read_planted",
    "make_baseline",
    "fit_fold",
    "cross_validate",
    "repeated_auc_interval",
    "paired_auc_difference",
    "compare",
    "format_comparison",
    "DEPLOYABLE",
    "train_baseline",
]

Progress = Callable[[str, int, int, dict], None] | None

#: The classic baselines, in the order of the table.
BASELINES = ("cpm", "nbs", "edges", "amplitude", "oracle")
#: Everything :func:`compare` can run.
MODELS = (*BASELINES, "fmmtc")
#: ALFF band (Zou et al. 2008), Hz.
ALFF_BAND_HZ = (0.01, 0.08)
#: Edge-selection p thresholds (two-sided) searched by the inner CV of ``cpm`` and ``nbs``.
P_THRESHOLDS = (0.05, 0.01, 0.005, 0.001)
#: Inverse L2 strengths searched by the inner CV of ``edges`` and ``amplitude``, per unit of
#: feature count: the logistic regression's ``C`` is ``c / n_features`` on standardised features,
#: so one grid fits 1 704 amplitude features and 90 525 edges (HCPEx) alike.
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
_N_BOOTSTRAP = 2000

_NOTES = {
    "cpm": "Shen et al. 2017, binary: pos/neg network strength -> logistic",
    "nbs": "NBS-Predict style: largest supra-threshold component -> L2 logistic",
    "edges": "L2 logistic on all edges (exact PCA rotation first, no truncation)",
    "amplitude": "L2 logistic on log SD, log ALFF, fALFF, lag-1 autocorrelation",
    "oracle": "knows the planted regions (simulation.json): what is reachable, not a model",
    "fmmtc": "training.train() out-of-fold logits, the same cross-fitted Platt",
}


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class BaselineFeatures:
    """Per-subject features of a cohort, in the cohort's order.

    Built by :func:`baseline_features`; each field is also an attribute of the same name.

    Parameters
    ----------
    edges : ndarray (N, E) float32
        Upper triangle (``np.triu_indices(R, 1)``, row-major) of each scan's Fisher-z Pearson
        connectivity, as :func:`fmmtc_core.preprocess.prepare` computes it.
    amplitude : ndarray (N, 4 R) float64
        Per region: log SD, log ALFF, fALFF and lag-1 autocorrelation (NaN for a region
        without signal; imputed inside each training fold). See :func:`amplitude_features`.
    amplitude_names : list of str
        ``"<feature>:<region name>"`` for each column of ``amplitude``.
    n_regions : int
        R, the number of atlas regions (``E = R (R - 1) / 2``).
    oracle : ndarray (N, 3) or None, default=None
        Mean Fisher-z connectivity among the planted connectivity regions; mean lag-1
        autocorrelation and mean log SD relative to the scan's median region of the planted
        temporal regions; None without planted truth.
    """

    edges: np.ndarray
    amplitude: np.ndarray
    amplitude_names: list[str]
    n_regions: int
    oracle: np.ndarray | None = None

    def matrix(self, name: str) -> np.ndarray:
        """The feature matrix a baseline reads: ``edges`` for cpm, nbs and edges.

        Parameters
        ----------
        name : {"cpm", "nbs", "edges", "amplitude", "oracle"}
            The baseline.

        Returns
        -------
        ndarray
            ``edges`` (N, E) for ``cpm``, ``nbs`` and ``edges``; ``amplitude`` (N, 4 R) for
            ``amplitude``; ``oracle`` (N, 3) for ``oracle``. The stored array itself, not a copy.

        Raises
        ------
        InvalidInputError
            ``name`` is not one of :data:`BASELINES`, or ``name`` is ``"oracle"`` and
            ``oracle`` is None (no planted truth).
        """
        name = check_option("model", name, BASELINES)
        if name in ("cpm", "nbs", "edges"):
            return self.edges
        if name == "amplitude":
            return self.amplitude
        if self.oracle is None:
            raise InvalidInputError(
                "The oracle needs planted truth: a simulated cohort's simulation.json.")
        return self.oracle


def amplitude_features(signals: RegionSignals,
                       band: tuple[float, float] = ALFF_BAND_HZ) -> np.ndarray:
    """Region amplitude features of one cleaned scan.

    Parameters
    ----------
    signals : RegionSignals
        Cleaned region signals (their ``tr`` sets the frequencies).
    band : (float, float), default=(0.01, 0.08)
        ALFF band in Hz.

    Returns
    -------
    ndarray (4, R) float64
        Rows: log SD (signal units), log ALFF (mean amplitude of the spectrum in ``band``),
        fALFF (amplitude in ``band`` / amplitude over all frequencies above 0 up to Nyquist)
        and lag-1 autocorrelation (at the scan's own TR). NaN for a region without signal, and
        ALFF/fALFF NaN when the scan is too short to resolve ``band``.

    Notes
    -----
    Computed on the cleaned (detrended, band-passed 0.01-0.1 Hz by default) series, the signals
    FMM-TC sees; fALFF is then the share of the 0.01-0.08 Hz band within the pass band rather
    than within the raw spectrum of Zou et al. (2008), a measure of spectral shape all the same.
    Lag-1 autocorrelation is the simplest intrinsic-timescale feature (e.g. Murray et al. 2014)
    and is included as standard; it depends on the TR, which sites may not share.
    """
    x = np.asarray(signals.data, dtype=np.float64)
    n, r = x.shape
    out = np.full((4, r), np.nan)
    live = np.asarray(np.isfinite(x).all(axis=0))
    live[live] = x[:, live].std(axis=0) > 0
    if n < 3 or not live.any():
        return out
    xl = x[:, live] - x[:, live].mean(axis=0)
    sd = xl.std(axis=0, ddof=1)
    amp = np.abs(np.fft.rfft(xl, axis=0)) * (2.0 / n)
    freqs = np.fft.rfftfreq(n, d=float(signals.tr))
    in_band = (freqs >= band[0]) & (freqs <= band[1])
    positive = freqs > 0
    out[0, live] = np.log(sd)
    if in_band.any():
        alff = amp[in_band].mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[1, live] = np.log(alff)
            out[2, live] = amp[in_band].sum(axis=0) / amp[positive].sum(axis=0)
    out[3, live] = (xl[1:] * xl[:-1]).sum(axis=0) / (xl * xl).sum(axis=0)
    out[~np.isfinite(out)] = np.nan
    return out


_AMPLITUDE_ROWS = ("log_sd", "log_alff", "falff", "ac1")


def read_planted(cohort_dir: str | os.PathLike, atlas) -> dict | None:
    """The planted truth of a simulated cohort, as region positions in ``atlas``.

    Parameters
    ----------
    cohort_dir : path
        A cohort folder; its ``simulation.json`` is read when present.
    atlas : Atlas
        The atlas of the cohort's signals.

    Returns
    -------
    dict or None
        ``{"fc_index": [...], "ts_index": [...]}``: positions in ``atlas``'s region order of
        the planted connectivity (``planted.fc_labels``) and time-series
        (``planted.ts_labels``) regions; None when the cohort has no ``simulation.json``, no
        planted truth (an unlabelled corpus), or was simulated in another atlas (its
        ``atlas`` differs from ``atlas.name``, case-insensitively).

    Raises
    ------
    InvalidInputError
        ``simulation.json`` is not readable JSON, or its planted labels are missing, not
        integers, or not labels of ``atlas``.
    """
    path = Path(cohort_dir) / "simulation.json"
    if not path.is_file():
        return None
    try:
        truth = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(f"{path} is not readable JSON ({exc}).") from None
    planted = truth.get("planted") if isinstance(truth, dict) else None
    if not planted or str(truth.get("atlas", "")).lower() != str(atlas.name).lower():
        return None
    position = {int(label): i for i, label in enumerate(atlas.labels)}
    try:
        return {key: [position[int(label)] for label in planted[f"{key[:2]}_labels"]]
                for key in ("fc_index", "ts_index")}
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError(
            f"{path}: the planted region labels are not labels of the {atlas.name} atlas."
        ) from None


def scan_features(signals: RegionSignals) -> tuple[ModelInputs, np.ndarray]:
    """The inputs of one scan that the baselines read: the one path for training and screening.

    Parameters
    ----------
    signals : RegionSignals
        Cleaned region signals.

    Returns
    -------
    inputs : ModelInputs
        :func:`fmmtc_core.preprocess.prepare` with a window as long as the series: ``fc`` is the
        Fisher-z Pearson connectivity of the whole cleaned series (the connectivity of FMM-TC's
        centred-window path); ``window`` the whole series, robust-scaled (not read by any
        baseline).
    amplitude : ndarray (4 R,) float64
        :func:`amplitude_features` laid end to end: all log SDs, then log ALFFs, fALFFs and
        lag-1 autocorrelations (NaN for a region without signal).
    """
    from fmmtc_core.preprocess import prepare

    return prepare(signals, max(signals.n_volumes, 2)), amplitude_features(signals).reshape(-1)


def baseline_features(subjects: Sequence[RegionSignals], planted: dict | None = None,
                      progress: Progress = None) -> BaselineFeatures:
    """Connectivity edges, amplitude features and (with ``planted``) oracle features.

    Parameters
    ----------
    subjects : sequence of RegionSignals
        Cleaned signals of a cohort, all in one atlas
        (:func:`fmmtc_core.pipeline.prepare_cohort`).
    planted : dict or None, default=None
        :func:`read_planted`'s region positions; None leaves ``oracle`` empty.
    progress : callable(stage, done, total, info) or None, default=None
        ``("features", i, n, {})`` per subject.

    Returns
    -------
    BaselineFeatures
        ``edges`` (N, E) float32, ``amplitude`` (N, 4 R) (the four rows of
        :func:`amplitude_features` laid end to end: all log SDs, then log ALFFs, fALFFs and
        lag-1 autocorrelations), ``amplitude_names`` in the same order (region names from the
        first subject's atlas), and with ``planted`` the ``oracle`` features (NaN set to 0).

    Raises
    ------
    InvalidInputError
        ``subjects`` is empty, or the subjects do not all have the same number of regions.
    """
    if not subjects:
        raise InvalidInputError("No subjects to compute features of.")
    n_regions = subjects[0].n_regions
    if any(s.n_regions != n_regions for s in subjects):
        raise InvalidInputError("All subjects must have the same regions (one atlas).")
    iu = np.triu_indices(n_regions, 1)
    edges = np.empty((len(subjects), iu[0].size), dtype=np.float32)
    amplitude = np.empty((len(subjects), 4 * n_regions))
    for i, s in enumerate(subjects):
        inputs, amplitude[i] = scan_features(s)
        assert inputs.fc is not None  # prepare() computes connectivity by default
        edges[i] = inputs.fc[iu]
        if progress:
            progress("features", i + 1, len(subjects), {})
    names = list(subjects[0].atlas.names)
    amplitude_names = [f"{row}:{nm}" for row in _AMPLITUDE_ROWS for nm in names]
    oracle = None
    if planted is not None:
        fc_set = np.zeros(n_regions, dtype=bool)
        fc_set[planted["fc_index"]] = True
        within = fc_set[iu[0]] & fc_set[iu[1]]
        ac1 = amplitude[:, 3 * n_regions:][:, planted["ts_index"]]
        log_sd = amplitude[:, :n_regions]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a planted region without signal
            # amplitude relative to the scan's median region (a site's gain cancels)
            rel_sd = log_sd[:, planted["ts_index"]] - np.nanmedian(log_sd, axis=1)[:, None]
            oracle = np.column_stack([edges[:, within].mean(axis=1), np.nanmean(ac1, axis=1),
                                      np.nanmean(rel_sd, axis=1)])
        oracle = np.nan_to_num(oracle)
    return BaselineFeatures(edges=edges, amplitude=amplitude, amplitude_names=amplitude_names,
                            n_regions=n_regions, oracle=oracle)


# --------------------------------------------------------------------------------------------
# Estimators (scikit-learn contract: __init__ stores, fit validates, fitted state ends in _)
# --------------------------------------------------------------------------------------------
def _critical_t(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.isf(p / 2.0, max(dof, 1)))


def _check_xy(X, y) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):  # float32 edges stay float32: half the memory
        X = X.astype(np.float64)
    y = np.asarray(y).astype(int)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise InvalidInputError(f"Expected X (n, features) and y (n,), got {X.shape} and "
                                f"{y.shape}.")
    if set(np.unique(y)) != {0, 1}:
        raise InvalidInputError("The training labels must hold both classes, 1 and 0.")
    return X, y


def _logistic(C: float):
    from sklearn.linear_model import LogisticRegression

    # Class-weighted, as FMM-TC's loss is; lbfgs is deterministic.
    return LogisticRegression(C=C, class_weight="balanced", max_iter=5000)


class CPMClassifier(ClassifierMixin, BaseEstimator):
    """Connectome-based predictive modelling for a binary outcome (Shen et al. 2017).

    Parameters
    ----------
    p_threshold : float, default=0.01
        Two-sided p value (t test of the Pearson correlation of an edge with the label) an edge
        must pass to join a network.
    C : float, default=1.0
        Inverse L2 strength of the logistic regression on the two standardised strengths.

    Attributes
    ----------
    positive_, negative_ : ndarray of bool (E,)
        Edges positively / negatively correlated with the label at ``p_threshold``.
    model_ : Pipeline
        StandardScaler + logistic regression on (positive strength, negative strength).
    classes_ : ndarray
    """

    def __init__(self, p_threshold: float = 0.01, C: float = 1.0) -> None:
        self.p_threshold = p_threshold
        self.C = C

    def fit(self, X, y) -> CPMClassifier:
        """Select the positive and negative networks and fit the logistic regression.

        Parameters
        ----------
        X : array-like (n, E)
            Edge features (float32 is kept, other types become float64).
        y : array-like (n,)
            Labels, 1 (responder) or 0; both classes must be present.

        Returns
        -------
        CPMClassifier
            ``self``, fitted (``positive_``, ``negative_``, ``model_``, ``classes_``).

        Raises
        ------
        InvalidInputError
            ``X`` is not 2-D, ``X`` and ``y`` differ in length, or ``y`` does not hold
            exactly the classes 0 and 1.
        """
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X, y = _check_xy(X, y)
        n = len(y)
        xc = X - X.mean(axis=0, dtype=np.float64).astype(X.dtype)
        yc = (y - y.mean()).astype(X.dtype)
        denom = np.sqrt(np.einsum("ij,ij->j", xc, xc) * (yc * yc).sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(denom > 0, (yc @ xc) / denom, 0.0)
        t = _critical_t(self.p_threshold, n - 2)
        r_crit = t / np.sqrt(n - 2 + t * t)
        self.positive_ = r > r_crit
        self.negative_ = r < -r_crit
        self.model_ = make_pipeline(StandardScaler(), _logistic(self.C))
        self.model_.fit(self._strengths(X), y)
        self.classes_ = np.array([0, 1])
        return self

    def _strengths(self, X) -> np.ndarray:
        X = np.asarray(X)
        return np.column_stack([X[:, self.positive_].sum(axis=1, dtype=np.float64),
                                X[:, self.negative_].sum(axis=1, dtype=np.float64)])

    def decision_function(self, X) -> np.ndarray:
        """Logit of the responder class.

        Parameters
        ----------
        X : array-like (n, E)
            Edge features, the columns of the training ``X``.

        Returns
        -------
        ndarray (n,)
            The logistic regression's logit on the (positive, negative) network strengths.

        Raises
        ------
        InvalidInputError
            The classifier is not fitted yet.
        """
        if not hasattr(self, "model_"):
            raise InvalidInputError("This CPMClassifier is not fitted yet; call fit first.")
        return self.model_.decision_function(self._strengths(X))

    def predict_proba(self, X) -> np.ndarray:
        """Uncalibrated class probabilities: the sigmoid of :meth:`decision_function`.

        Parameters
        ----------
        X : array-like (n, E)
            Edge features, the columns of the training ``X``.

        Returns
        -------
        ndarray (n, 2)
            Columns: P(non-responder) and P(responder) (the order of ``classes_``).

        Raises
        ------
        InvalidInputError
            The classifier is not fitted yet.
        """
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.column_stack([1 - p, p])

    def predict(self, X) -> np.ndarray:
        """Predicted class: 1 where the logit is above 0, else 0.

        Parameters
        ----------
        X : array-like (n, E)
            Edge features, the columns of the training ``X``.

        Returns
        -------
        ndarray of int (n,)
            1 (responder) or 0.

        Raises
        ------
        InvalidInputError
            The classifier is not fitted yet.
        """
        return (self.decision_function(X) > 0).astype(int)


class NBSPredictClassifier(ClassifierMixin, BaseEstimator):
    """Network-based-statistic edge selection, then a linear classifier (NBS-Predict style).

    Parameters
    ----------
    p_threshold : float, default=0.01
        Two-sided p value of the edge-wise two-sample t test (pooled variance) an edge must
        pass to be supra-threshold.
    C : float, default=1.0
        Inverse L2 strength per selected edge: the logistic regression's C is
        ``C / n_selected`` on standardised edges (not searched: NBS-Predict tunes the
        threshold).

    Attributes
    ----------
    selected_ : ndarray of int
        Edges (columns of X) of the largest connected component of the supra-threshold edges
        (most edges; empty when no edge passes, and the model then predicts logit 0).
    n_supra_ : int
        Supra-threshold edges before the component was taken.
    model_ : Pipeline or None
    classes_ : ndarray

    Notes
    -----
    X holds the upper triangle of R x R matrices in ``np.triu_indices(R, 1)`` order; R is
    worked out from the number of columns.
    """

    def __init__(self, p_threshold: float = 0.01, C: float = 1.0) -> None:
        self.p_threshold = p_threshold
        self.C = C

    def fit(self, X, y) -> NBSPredictClassifier:
        """Select the largest supra-threshold component and fit the logistic regression.

        Parameters
        ----------
        X : array-like (n, E)
            Upper triangles of R x R connectivity matrices (``np.triu_indices(R, 1)`` order).
        y : array-like (n,)
            Labels, 1 (responder) or 0; both classes must be present.

        Returns
        -------
        NBSPredictClassifier
            ``self``, fitted (``selected_``, ``n_supra_``, ``model_``, ``classes_``).

        Raises
        ------
        InvalidInputError
            ``X`` is not 2-D, ``X`` and ``y`` differ in length, ``y`` does not hold exactly
            the classes 0 and 1, or E is not ``R (R - 1) / 2`` for any R.
        """
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X, y = _check_xy(X, y)
        n_regions = _regions_of(X.shape[1])
        a, b = X[y == 1], X[y == 0]
        na, nb = len(a), len(b)
        pooled = ((na - 1) * a.var(axis=0, ddof=1) + (nb - 1) * b.var(axis=0, ddof=1)) / (
            na + nb - 2)
        se = np.sqrt(pooled * (1.0 / na + 1.0 / nb))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(se > 0, (a.mean(axis=0) - b.mean(axis=0)) / se, 0.0)
        supra = np.flatnonzero(np.abs(t) > _critical_t(self.p_threshold, na + nb - 2))
        self.n_supra_ = int(supra.size)
        self.selected_ = np.zeros(0, dtype=np.int64)
        if supra.size:
            iu = np.triu_indices(n_regions, 1)
            i, j = iu[0][supra], iu[1][supra]
            graph = coo_matrix((np.ones(supra.size), (i, j)), shape=(n_regions, n_regions))
            _, comp = connected_components(graph, directed=False)
            sizes = np.bincount(comp[i], minlength=comp.max() + 1)  # edges per component
            self.selected_ = supra[comp[i] == int(np.argmax(sizes))]
        self.model_ = None
        if self.selected_.size:
            self.model_ = make_pipeline(StandardScaler(),
                                        _logistic(self.C / self.selected_.size))
            self.model_.fit(X[:, self.selected_], y)
        self.classes_ = np.array([0, 1])
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logit of the responder class (0 when no edge was selected).

        Parameters
        ----------
        X : array-like (n, E)
            Edge features, the columns of the training ``X``.

        Returns
        -------
        ndarray (n,)
            The logistic regression's logit on the selected edges; zeros when ``model_`` is
            None.

        Raises
        ------
        InvalidInputError
            The classifier is not fitted yet.
        """
        if not hasattr(self, "selected_"):
            raise InvalidInputError("This NBSPredictClassifier is not fitted yet; call fit "
                                    "first.")
        X = np.asarray(X)
        if self.model_ is None:
            return np.zeros(len(X))
        return self.model_.decision_function(X[:, self.selected_])

    def predict_proba(self, X) -> np.ndarray:
        """Uncalibrated class probabilities: the sigmoid of :meth:`decision_function`.

        Parameters
        ----------
        X : array-like (n, E)
            Edge features, the columns of the training ``X``.

        Returns
        -------
        ndarray (n, 2)
            Columns: P(non-responder) and P(responder) (the order of ``classes_``).

        Raises
        ------
        InvalidInputError
            The classifier is not fitted yet.
        """
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.column_stack([1 - p, p])

    def predict(self, X) -> np.ndarray:
        """Predicted class: 1 where the logit is above 0, else 0.

        Parameters
        ----------
        X : array-like (n, E)
            Edge features, the columns of the training ``X``.

        Returns
        -------
        ndarray of int (n,)
            1 (responder) or 0.

        Raises
        ------
        InvalidInputError
            The classifier is not fitted yet.
        """
        return (self.decision_function(X) > 0).astype(int)


def _regions_of(n_edges: int) -> int:
    r = int(round((1 + np.sqrt(1 + 8 * n_edges)) / 2))
    if r * (r - 1) // 2 != n_edges:
        raise InvalidInputError(f"{n_edges} columns are not the upper triangle of a square "
                                "connectivity matrix.")
    return r


def make_baseline(name: str, n_features: int, cv: Any = 5) -> tuple[Any, dict[str, list]]:
    """A baseline's unfitted estimator and the grid its inner CV searches.

    Parameters
    ----------
    name : {"cpm", "nbs", "edges", "amplitude", "oracle"}
    n_features : int
        Columns of the feature matrix (sets the scale of ``C``, see :data:`C_GRID`).
    cv : int or cross-validation splitter, default=5
        The inner CV of ``edges``, whose search runs inside its pipeline (see Notes).

    Returns
    -------
    estimator : scikit-learn classifier with ``decision_function``
        :class:`CPMClassifier` or :class:`NBSPredictClassifier` (default parameters);
        otherwise a pipeline that standardises the features and ends in a class-weighted L2
        logistic regression: ``edges`` rotates them (PCA) and searches C with its own inner
        ``GridSearchCV``, ``amplitude`` imputes the median first, ``oracle`` keeps C = 1.
    grid : dict
        ``GridSearchCV`` parameter grid for :func:`fit_fold`; empty when nothing is searched
        (the oracle) or the search is part of the estimator (``edges``). The first candidate
        wins ties: thresholds go from lenient to strict, C from strong to weak regularisation.

    Raises
    ------
    InvalidInputError
        ``name`` is not one of :data:`BASELINES`.

    Notes
    -----
    ``edges`` standardises the edges and rotates them with a PCA that keeps every component,
    both fitted on the training fold without its labels, then searches C by inner CV on the
    rotated scores. An L2 logistic regression is invariant to that rotation (same penalty, same
    predictions as on all edges, for the outer and the inner folds alike, since the inner
    training rows lie in the span of the training fold), at the cost of an n x n problem instead
    of n x E. Only the standardisation statistics see the inner validation rows (no labels).
    """
    from sklearn.decomposition import PCA
    from sklearn.impute import SimpleImputer
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    name = check_option("model", name, BASELINES)
    if name == "cpm":
        return CPMClassifier(), {"p_threshold": list(P_THRESHOLDS)}
    if name == "nbs":
        return NBSPredictClassifier(), {"p_threshold": list(P_THRESHOLDS)}
    c_grid = [c / max(n_features, 1) for c in C_GRID]
    if name == "edges":
        search = GridSearchCV(_logistic(1.0), {"C": c_grid}, scoring="roc_auc", cv=cv)
        return Pipeline([("scale", StandardScaler()), ("rotate", PCA()),
                         ("logistic", search)]), {}
    if name == "amplitude":
        return Pipeline([("impute", SimpleImputer(strategy="median")),
                         ("scale", StandardScaler()),
                         ("logistic", _logistic(1.0))]), {"logistic__C": c_grid}
    return Pipeline([("scale", StandardScaler()), ("logistic", _logistic(1.0))]), {}


# --------------------------------------------------------------------------------------------
# Cross-validation
# --------------------------------------------------------------------------------------------
def fit_fold(name: str, X: np.ndarray, y: np.ndarray, train_idx: np.ndarray, *,
             inner_folds: int = 5, seed: int = 0) -> tuple[Any, dict]:
    """Fit one baseline on one training fold, its hyper-parameters chosen by inner CV there.

    Parameters
    ----------
    name : {"cpm", "nbs", "edges", "amplitude", "oracle"}
    X : ndarray (N, F)
        Features of the whole cohort; only the rows ``train_idx`` are read.
    y : ndarray (N,)
        Labels; only ``y[train_idx]`` is read.
    train_idx : ndarray of int
    inner_folds : int, default=5
        Stratified inner folds (fewer when a class of the training fold is smaller).
    seed : int, default=0
        Seeds the inner split.

    Returns
    -------
    model : fitted estimator (``decision_function`` gives logits)
    chosen : dict
        The selected hyper-parameters (``p_threshold``; ``logistic__C``, the absolute C),
        ``inner_auc`` (mean inner-fold AUC of the choice) and for ``cpm`` / ``nbs`` the number
        of selected edges ``n_edges``.

    Raises
    ------
    InvalidInputError
        Unknown ``name``, or the training fold has fewer than 2 responders or fewer than 2
        non-responders (the inner cross-validation needs at least 2 of each).
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    xt, yt = X[train_idx], np.asarray(y)[train_idx].astype(int)
    k = min(inner_folds, int(np.bincount(yt, minlength=2).min()))
    if k < 2:
        raise InvalidInputError(
            f"A training fold has {int(yt.sum())} responders and {int((1 - yt).sum())} "
            "non-responders; the inner cross-validation needs at least 2 of each. Use fewer "
            "folds or a larger cohort.")
    cv = StratifiedKFold(k, shuffle=True, random_state=seed)
    estimator, grid = make_baseline(name, X.shape[1], cv)
    chosen: dict[str, Any] = {}
    # Hundreds of tiny fits: BLAS threads cost more than they bring (8x slower on a busy
    # 2-core machine). threadpoolctl is a requirement of scikit-learn.
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", UserWarning)  # constant features of a small fold
        if grid:
            search = GridSearchCV(estimator, grid, scoring="roc_auc", refit=True, cv=cv)
            search.fit(xt, yt)
            model = search.best_estimator_
            chosen = dict(search.best_params_) | {"inner_auc": float(search.best_score_)}
        else:
            model = estimator.fit(xt, yt)
    if name == "edges":
        inner = model.named_steps["logistic"]
        chosen = {"logistic__C": float(inner.best_params_["C"]),
                  "inner_auc": float(inner.best_score_)}
    elif name == "cpm":
        chosen["n_edges"] = int(model.positive_.sum() + model.negative_.sum())
    elif name == "nbs":
        chosen["n_edges"] = int(model.selected_.size)
    return model, chosen


@dataclass(eq=False)
class CVResult:
    """Out-of-fold predictions of one model for one set of folds.

    Each field is also an attribute of the same name.

    Parameters
    ----------
    model : str
        Name of the model (one of :data:`MODELS`).
    logit : ndarray (N,)
        Out-of-fold logits (each from the fold model that did not see the subject).
    probability : ndarray (N,)
        Cross-fitted Platt probabilities
        (:func:`fmmtc_core.evaluation.cross_fitted_platt`: fold k's map is fitted on the
        other folds' out-of-fold logits only).
    fold : ndarray (N,) int
        Test fold of each subject.
    chosen : list of dict, default=[]
        Per fold, what :func:`fit_fold` selected.
    models : list, default=[]
        Per fold, the fitted estimator (:func:`cross_validate` with ``keep_models=True``;
        empty otherwise).
    """

    model: str
    logit: np.ndarray
    probability: np.ndarray
    fold: np.ndarray
    chosen: list[dict] = field(default_factory=list)
    models: list = field(default_factory=list)


def cross_validate(name: str, features: BaselineFeatures, y: np.ndarray, splits, *,
                   inner_folds: int = 5, seed: int = 0, keep_models: bool = False) -> CVResult:
    """Out-of-fold logits and cross-fitted probabilities of one baseline on given folds.

    Parameters
    ----------
    name : {"cpm", "nbs", "edges", "amplitude", "oracle"}
    features : BaselineFeatures
    y : ndarray (N,)
    splits : list of (train_idx, test_idx)
        The outer folds (``training._splits``).
    inner_folds : int, default=5
    seed : int, default=0
        The inner split of fold k is seeded ``seed * 1000 + k``, as training seeds its folds.
    keep_models : bool, default=False
        Keep each fold's fitted estimator in ``models`` (what
        :func:`train_baseline` deploys).

    Returns
    -------
    CVResult
        Logits from each fold's model on its test fold, the cross-fitted Platt probabilities,
        each subject's fold, per fold what the inner CV chose and, with ``keep_models``, the
        fold models.

    Raises
    ------
    InvalidInputError
        Unknown ``name``, the oracle without planted truth, a training fold too small for the
        inner cross-validation (:func:`fit_fold`), or folds whose test sets do not cover every
        subject.
    """
    X = features.matrix(name)
    y = np.asarray(y).astype(int)
    logit = np.zeros(len(y))
    fold = np.full(len(y), -1)
    chosen, models = [], []
    for k, (train_idx, test_idx) in enumerate(splits):
        model, info = fit_fold(name, X, y, np.asarray(train_idx), inner_folds=inner_folds,
                               seed=seed * 1000 + k)
        logit[test_idx] = model.decision_function(X[test_idx])
        fold[test_idx] = k
        chosen.append(info)
        if keep_models:
            models.append(model)
    if (fold < 0).any():
        raise InvalidInputError("The folds do not cover every subject.")
    return CVResult(name, logit, cross_fitted_platt(logit, y, fold), fold, chosen, models)


# --------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------
def _bootstrap_auc(y: np.ndarray, scores: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """AUC of each stratified bootstrap resample, averaged over the rows of ``scores``
    (repeats), shape (n_boot,)."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(pos, (n_boot, pos.size)),
                          rng.choice(neg, (n_boot, neg.size))], axis=1)
    n_pos, n_neg = pos.size, neg.size
    out = np.zeros(n_boot)
    for s in scores:
        ranks = rankdata(s[idx], axis=1)
        out += (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out / len(scores)


def repeated_auc_interval(y: np.ndarray, scores: np.ndarray, *, n_boot: int = _N_BOOTSTRAP,
                 seed: int = 0) -> tuple[float, float]:
    """95 % stratified-bootstrap interval of the AUC (averaged over repeats).

    Parameters
    ----------
    y : ndarray (N,)
    scores : ndarray (N,) or (repeats, N)
        Out-of-fold scores of each repeat of the cross-validation.
    n_boot : int, default=2000
    seed : int, default=0

    Returns
    -------
    (low, high) : float
        2.5th and 97.5th percentiles over resamples of subjects (responders and
        non-responders resampled separately) of the repeat-averaged AUC.
    """
    boot = _bootstrap_auc(y, scores, n_boot, seed)
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def paired_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, *,
                          n_boot: int = _N_BOOTSTRAP, seed: int = 0) -> dict:
    """AUC of ``a`` minus AUC of ``b`` on the same subjects, with a paired bootstrap interval.

    Parameters
    ----------
    y : ndarray (N,)
    a, b : ndarray (N,) or (repeats, N)
        Scores of two models on the same subjects (and repeats).
    n_boot, seed : int, default=2000, 0
        Bootstrap resamples and their seed; both models are scored on the same resamples.

    Returns
    -------
    dict
        ``difference`` (mean over repeats), ``low`` and ``high`` (95 % interval; the same
        resamples for both models).
    """
    from sklearn.metrics import roc_auc_score

    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    diff = float(np.mean([roc_auc_score(y, s) for s in a2])
                 - np.mean([roc_auc_score(y, s) for s in b2]))
    boot = _bootstrap_auc(y, a2, n_boot, seed) - _bootstrap_auc(y, b2, n_boot, seed)
    return {"difference": diff, "low": float(np.percentile(boot, 2.5)),
            "high": float(np.percentile(boot, 97.5))}


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------
def _check_counts(*checks: tuple[str, Any, int]) -> None:
    """Refuse any ``(name, value, least)`` whose value is not a whole number >= ``least``."""
    for pname, value, least in checks:
        if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                or value < least):
            raise InvalidInputError(f"{pname} must be a whole number of at least {least}, got "
                                    f"{value!r}.")


def _check_models(models: Sequence[str] | str) -> list[str]:
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    out: list[str] = []
    for m in models:
        m = check_option("models", m, MODELS)
        if m not in out:
            out.append(m)
    if not out:
        raise InvalidInputError(f"No model to compare; choose from {', '.join(MODELS)}.")
    return out


def _describe(name: str, chosen: list[dict], n_features: int) -> str:
    """What the inner CV chose over all folds, e.g. ``p<0.01 (3/5), p<0.05 (2/5); 41 edges``."""
    if not chosen or not any(chosen):
        return "-"
    total = len(chosen)

    def fmt(c: dict) -> str:
        parts = []
        if "p_threshold" in c:
            parts.append(f"p<{c['p_threshold']:g}")
        for key in ("C", "logistic__C"):
            if key in c:
                scale = n_features if key == "logistic__C" else 1
                parts.append(f"c={c[key] * scale:g}")
        return " ".join(parts)

    counts = Counter(fmt(c) for c in chosen if fmt(c))
    text = ", ".join(f"{k} ({v}/{total})" for k, v in counts.most_common())
    if any("n_edges" in c for c in chosen):
        text += f"; {int(np.median([c.get('n_edges', 0) for c in chosen]))} edges (median)"
    return text or "-"


def _fmmtc_oof(cohort_dir, subjects, y, fold_expected, *, folds, seed, atlas, cleaning,
               foundation, options, progress) -> np.ndarray:
    """Out-of-fold logits of :func:`fmmtc_core.training.train`, checked against our folds."""
    from fmmtc_core.training import TrainingWarning, train

    with tempfile.TemporaryDirectory(prefix="fmmtc-compare-") as tmp, \
            warnings.catch_warnings():
        # The table's warnings column says the same for every model, FMM-TC included.
        warnings.simplefilter("ignore", TrainingWarning)
        train(cohort_dir, Path(tmp) / "model", foundation=foundation, folds=folds, seed=seed,
              atlas=atlas, cleaning=cleaning, subjects=list(subjects), progress=progress,
              **(options or {}))
        oof = pd.read_csv(Path(tmp) / "model" / "oof_predictions.tsv", sep="\t",
                          dtype={"participant_id": str})
    if not np.array_equal(oof["fold"].to_numpy(), fold_expected) or not np.array_equal(
            oof["responder"].to_numpy(), y):
        raise RuntimeError("FMM-TC's cross-validation folds differ from the baselines'; "
                           "training._splits and compare() have drifted apart.")
    return oof["logit"].to_numpy(dtype=float)


def compare(
    cohort_dir: str | os.PathLike,
    *,
    folds: int = 5,
    seed: int = 0,
    repeats: int = 1,
    models: Sequence[str] | str = BASELINES,
    subjects: list[RegionSignals] | None = None,
    progress: Progress = None,
    atlas: str = "hcpex",
    cleaning: CleaningSettings = CleaningSettings(),
    foundation: str | os.PathLike | None = None,
    fmmtc_options: dict | None = None,
    inner_folds: int = 5,
    n_bootstrap: int = _N_BOOTSTRAP,
) -> pd.DataFrame:
    """Run baselines (and optionally FMM-TC) on identical folds; one row per model.

    Parameters
    ----------
    cohort_dir : path
        Labelled BIDS-style cohort (:func:`fmmtc_core.bids.read_cohort`).
    folds : int, default=5
        Outer folds, exactly those of :func:`fmmtc_core.training.train` with the same seed.
    seed : int, default=0
        Repeat r uses seed ``seed + r`` for its folds (and FMM-TC's training).
    repeats : int, default=1
        Repetitions of the whole cross-validation with other fold assignments.
    models : sequence of str or comma-separated str, default=BASELINES
        Any of :data:`MODELS`. ``"oracle"`` is left out, with a note in ``attrs["skipped"]``,
        when the cohort has no planted truth; ``"fmmtc"`` trains FMM-TC (slow).
    subjects : list of RegionSignals or None, default=None
        Already cleaned signals of the cohort, in its order
        (:func:`~fmmtc_core.pipeline.prepare_cohort` with the same ``atlas`` and ``cleaning``).
    progress : callable(stage, done, total, info) or None, default=None
        ``("prepare", i, n, {})`` per subject, ``("features", i, n, {})`` per subject, then
        ``(model, r, repeats, {"auc": ...})`` after each repeat of each model (and
        ``("train", k, folds, {})`` per FMM-TC fold).
    atlas : str, default="hcpex"
    cleaning : CleaningSettings, default=CleaningSettings()
    foundation : path or None, default=None
        FMM-TC's pretrained encoder (see :func:`~fmmtc_core.training.train`).
    fmmtc_options : dict or None, default=None
        Further keyword arguments of :func:`~fmmtc_core.training.train` (e.g.
        ``{"preset": "default", "epochs": 50}``); None trains the ``small`` preset, the one
        meant for cohorts of this size.
    inner_folds : int, default=5
        Inner stratified folds of every hyper-parameter search.
    n_bootstrap : int, default=2000
        Bootstrap resamples of the AUC intervals.

    Returns
    -------
    pandas.DataFrame
        One row per model: ``model``, ``auc`` (mean over repeats of the out-of-fold AUC of the
        cross-fitted probabilities), ``auc_low`` / ``auc_high`` (95 % bootstrap interval),
        ``auc_sd`` (SD over repeats; NaN for one repeat), ``auc_logit`` (AUC of the raw pooled
        logits), ``balanced_accuracy``, ``mcc``, ``brier``, ``ece``, ``sensitivity``,
        ``specificity`` (means over repeats, threshold 0.5), ``n_subjects``, ``repeats``,
        ``selected`` (the inner CV's choices), ``note`` and ``warnings``
        (:func:`fmmtc_core.evaluation.signal_warnings`: collapsed to the base rate, an AUC
        interval that includes chance; "" when none). ``attrs`` holds ``protocol``
        (folds, split, seeds), ``verdict`` (FMM-TC against the best classic baseline, in
        words), ``fmmtc_vs_best`` (the paired AUC difference, or None), ``skipped`` (model ->
        reason) and ``predictions`` (one row per subject, model and repeat: fold, logit,
        probability).

    Raises
    ------
    InvalidInputError
        Unknown model, ``folds``, ``repeats``, ``inner_folds`` or ``n_bootstrap`` not a whole
        number of at least 2, 1, 2 and 100, a cohort that cannot be read or split, prepared
        ``subjects`` that do not match the cohort, or nothing left to run.
    """
    from fmmtc_core.atlas import load_atlas
    from fmmtc_core.bids import read_cohort
    from fmmtc_core.pipeline import prepare_cohort

    wanted = _check_models(models)
    _check_counts(("folds", folds, 2), ("repeats", repeats, 1),
                  ("inner_folds", inner_folds, 2), ("n_bootstrap", n_bootstrap, 100))
    atlas_obj = load_atlas(atlas)
    cohort = read_cohort(cohort_dir)
    planted = read_planted(cohort_dir, atlas_obj)
    skipped: dict[str, str] = {}
    if "oracle" in wanted and planted is None:
        wanted.remove("oracle")
        skipped["oracle"] = ("no planted truth: the cohort has no simulation.json with planted "
                             f"regions in {atlas_obj.name}")
    if not wanted:
        raise InvalidInputError("Nothing to compare: " + "; ".join(
            f"{k}: {v}" for k, v in skipped.items()) + ".")

    from sklearn.metrics import roc_auc_score

    from fmmtc_core.training import _splits, binary_metrics

    y = cohort.participants["responder"].to_numpy().astype(int)
    groups = (cohort.participants["site"].astype(str).to_numpy()
              if "site" in cohort.participants else None)
    _splits(y, groups, folds, seed)  # refuse a cohort that cannot be split before any work
    if subjects is None:
        subjects = prepare_cohort(cohort, atlas_obj, progress, cleaning=cleaning)
    if len(subjects) != len(y):
        raise InvalidInputError(f"{len(subjects)} prepared subjects for a cohort of {len(y)}.")
    feats = None
    if any(m != "fmmtc" for m in wanted):
        feats = baseline_features(subjects, planted if "oracle" in wanted else None, progress)

    split_sets = [_splits(y, groups, folds, seed + r) for r in range(repeats)]
    results: dict[str, list[CVResult]] = {}
    for name in wanted:
        results[name] = []
        for r, (splits, _) in enumerate(split_sets):
            if name == "fmmtc":
                fold = np.zeros(len(y), dtype=int)
                for k, (_, test_idx) in enumerate(splits):
                    fold[test_idx] = k
                logit = _fmmtc_oof(cohort_dir, subjects, y, fold, folds=folds, seed=seed + r,
                                   atlas=atlas, cleaning=cleaning, foundation=foundation,
                                   options=({"preset": "small"} if fmmtc_options is None
                                            else fmmtc_options), progress=progress)
                res = CVResult(name, logit, cross_fitted_platt(logit, y, fold), fold,
                               [{} for _ in splits])
            else:
                assert feats is not None  # computed whenever a baseline is asked for
                res = cross_validate(name, feats, y, splits, inner_folds=inner_folds,
                                     seed=seed + r)
            results[name].append(res)
            if progress:
                progress(name, r + 1, repeats,
                         {"auc": binary_metrics(y, res.probability)["auc"]})

    rows, predictions = [], []
    pid = cohort.participants["participant_id"].astype(str).to_numpy()
    for name, runs in results.items():
        per = pd.DataFrame([binary_metrics(y, res.probability) for res in runs])
        probs = np.stack([res.probability for res in runs])
        low, high = repeated_auc_interval(y, probs, n_boot=n_bootstrap, seed=seed)

        n_features = feats.matrix(name).shape[1] if feats is not None and name != "fmmtc" else 0
        rows.append({
            "model": name,
            "auc": float(per["auc"].mean()), "auc_low": low, "auc_high": high,
            "auc_sd": float(per["auc"].std(ddof=1)) if repeats > 1 else float("nan"),
            "auc_logit": float(np.mean([roc_auc_score(y, res.logit) for res in runs])),
            **{k: float(per[k].mean()) for k in ("balanced_accuracy", "mcc", "brier", "ece",
                                                 "sensitivity", "specificity")},
            "n_subjects": int(len(y)), "repeats": int(repeats),
            "selected": _describe(name, [c for res in runs for c in res.chosen], n_features),
            "note": _NOTES[name],
            "warnings": " ".join(dict.fromkeys(
                w for res in runs for w in signal_warnings(y, res.logit, res.probability,
                                                           (low, high)))),
        })
        for r, res in enumerate(runs):
            predictions.append(pd.DataFrame({
                "participant_id": pid, "responder": y, "model": name, "repeat": r,
                "fold": res.fold, "logit": res.logit, "probability": res.probability}))
    table = pd.DataFrame(rows)

    classic = [m for m in results if m not in ("oracle", "fmmtc")]
    versus = None
    if "fmmtc" not in results:
        verdict = "FMM-TC was not run (add fmmtc to the models to compare it)."
    elif not classic:
        verdict = "No classic baseline was run to compare FMM-TC with."
    else:
        best = max(classic, key=lambda m: float(table.loc[table["model"] == m, "auc"].iloc[0]))
        versus = paired_auc_difference(
            y, np.stack([res.probability for res in results["fmmtc"]]),
            np.stack([res.probability for res in results[best]]), n_boot=n_bootstrap,
            seed=seed) | {"best": best}
        auc_f = float(table.loc[table["model"] == "fmmtc", "auc"].iloc[0])
        auc_b = float(table.loc[table["model"] == best, "auc"].iloc[0])
        detail = (f"AUC {auc_f:.3f} vs {auc_b:.3f}, difference {versus['difference']:+.3f} "
                  f"[95% CI {versus['low']:+.3f}, {versus['high']:+.3f}]")
        if versus["low"] > 0:
            verdict = f"FMM-TC is better than the best classic baseline ({best}): {detail}."
        elif versus["high"] < 0:
            verdict = (f"FMM-TC is NOT better than the best classic baseline ({best}); it is "
                       f"worse: {detail}.")
        else:
            verdict = (f"FMM-TC is NOT better than the best classic baseline ({best}): "
                       f"{detail}.")
    split_how = split_sets[0][1]
    table.attrs.update({
        "protocol": {
            "cohort": str(Path(cohort_dir).resolve()), "n_subjects": int(len(y)),
            "n_responders": int(y.sum()), "atlas": atlas_obj.name, "folds": folds,
            "split": split_how, "seeds": [seed + r for r in range(repeats)],
            "inner_folds": inner_folds,
            "calibration": "Platt, cross-fitted: each fold's map fitted on the other folds' "
                           "out-of-fold logits",
            "auc_interval": f"stratified bootstrap over subjects, {n_bootstrap} resamples, "
                            "AUC averaged over repeats",
        },
        "verdict": verdict,
        "fmmtc_vs_best": versus,
        "skipped": skipped,
        "predictions": pd.concat(predictions, ignore_index=True),
    })
    return table


def format_comparison(table: pd.DataFrame) -> str:
    """:func:`compare`'s table as aligned plain text, its notes and its verdict last.

    Parameters
    ----------
    table : pandas.DataFrame
        As returned by :func:`compare` (its ``attrs`` give the header and the verdict).

    Returns
    -------
    str
        A header line (cohort, folds, split, seeds), one row per model (AUC with its 95 %
        interval, and +- SD over repeats when there are several; balanced accuracy, MCC and
        Brier score at threshold 0.5; what the inner CV chose), each model's method and
        warnings, the models left out, and the verdict on FMM-TC.
    """
    proto = table.attrs.get("protocol", {})
    lines = []
    if proto:
        seeds = proto.get("seeds", [])
        lines.append(
            f"{proto.get('n_subjects')} participants ({proto.get('n_responders')} responders), "
            f"atlas {proto.get('atlas')}; {proto.get('folds')}-fold CV, {proto.get('split')}; "
            f"{len(seeds)} repeat(s), seeds {', '.join(map(str, seeds))}; out of fold, "
            "calibration cross-fitted")
    cells = [("model", "AUC", "95% CI", "bal.acc", "MCC", "Brier", "selected by inner CV")]
    for row in table.itertuples():
        auc = f"{row.auc:.3f}" + (f"+-{row.auc_sd:.3f}" if np.isfinite(row.auc_sd) else "")
        cells.append((str(row.model), auc, f"[{row.auc_low:.3f}, {row.auc_high:.3f}]",
                      f"{row.balanced_accuracy:.3f}", f"{row.mcc:+.3f}", f"{row.brier:.3f}",
                      str(row.selected)))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]) - 1)]
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[-1])
    for row in table.itertuples():
        lines.append(f"  {row.model}: {row.note}")
    for row in table.itertuples():
        if row.warnings:
            lines.append(f"WARNING {row.model}: {row.warnings}")
    for name, why in table.attrs.get("skipped", {}).items():
        lines.append(f"not run: {name} ({why})")
    if table.attrs.get("verdict"):
        lines.append(table.attrs["verdict"])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Deployable baselines: `fmmtc train --model cpm|nbs|edges|amplitude`
# --------------------------------------------------------------------------------------------
#: The baselines that can be trained into a model folder (the oracle reads planted truth).
DEPLOYABLE = ("cpm", "nbs", "edges", "amplitude")

_REFERENCES = {
    "cpm": "Shen et al. 2017, Nat Protoc 12:506 (binary outcome)",
    "nbs": "Serin et al. 2021, NeuroImage 244:118625 (NBS-Predict)",
    "edges": "Dadi et al. 2019, NeuroImage 192:115",
    "amplitude": "Zou et al. 2008 (fALFF); Murray et al. 2014 (intrinsic timescale)",
}


def _check_deployable(model: str) -> str:
    """The baseline to train, or a refusal that says why (the oracle) and what is allowed."""
    if model == "oracle":
        raise InvalidInputError(
            "The oracle cannot be trained into a model folder: it reads the planted truth of a "
            "simulated cohort (simulation.json), which no participant to screen has. It belongs "
            "in `fmmtc compare`, as the reachable AUC. Deployable models: fmmtc, "
            + ", ".join(DEPLOYABLE) + ".")
    return check_option("model", model, DEPLOYABLE)


def _features_card(name: str, n_regions: int) -> dict:
    """The card's ``model.features``: what the baseline reads, and how it is computed."""
    from fmmtc_core.preprocess import _FC_ARGS

    if name == "amplitude":
        return {"kind": "region amplitude",
                "definition": "per region of the cleaned series: log SD, log ALFF (mean "
                              "spectral amplitude in the band), fALFF (band / all frequencies "
                              "above 0 up to Nyquist), lag-1 autocorrelation at the scan's own "
                              "TR (baselines.amplitude_features); laid end to end: all log "
                              "SDs, then log ALFFs, fALFFs, autocorrelations",
                "rows": list(_AMPLITUDE_ROWS), "alff_band_hz": list(ALFF_BAND_HZ),
                "span": "the whole cleaned series (every volume)",
                "missing": "NaN for a region without signal; each fold model imputes its "
                           "training fold's median",
                "n_features": 4 * n_regions}
    return {"kind": "connectivity edges",
            "definition": "upper triangle (np.triu_indices(R, 1), row-major) of the Pearson "
                          "connectivity, Fisher z (preprocess.prepare)",
            "connectivity": dict(_FC_ARGS), "span": "the whole cleaned series (every volume)",
            "n_features": n_regions * (n_regions - 1) // 2}


def _chosen_card(name: str, model, chosen: dict, n_features: int) -> dict:
    """One fold model's hyper-parameters for the card, JSON-ready."""
    out: dict[str, Any] = {}
    if "p_threshold" in chosen:
        out["p_threshold"] = float(chosen["p_threshold"])
    if name == "cpm":
        out["C"] = float(model.C)
    elif name == "nbs":
        out |= {"C": float(model.C), "n_supra": int(model.n_supra_)}
    else:
        c = float(chosen["logistic__C"])
        out |= {"C": c, "c_per_feature": c * n_features}
    if "n_edges" in chosen:
        out["n_edges"] = int(chosen["n_edges"])
    if "inner_auc" in chosen:
        out["inner_auc"] = float(chosen["inner_auc"])
    return out


def _check_writable(out: Path) -> None:
    """Refuse, before any work, a model folder that cannot be written."""
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a folder; expected a model folder "
                                "to write.")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidInputError(f"Cannot write the model folder {out}: {probe} is not "
                                "writable.")


def train_baseline(
    cohort_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str,
    folds: int = 5,
    seed: int = 0,
    repeats: int = 1,
    permutations: int = 0,
    atlas: str = "hcpex",
    cleaning: CleaningSettings = CleaningSettings(),
    inner_folds: int = 5,
    subjects: list[RegionSignals] | None = None,
    progress: Progress = None,
) -> dict:
    """Train a classic baseline into a model folder that screens like FMM-TC's.

    The protocol is :func:`compare`'s (its folds, nested inner CV and cross-fitted calibration:
    with the same ``folds``, ``seed`` and ``inner_folds`` the out-of-fold logits are those of
    its row for ``model``), and the model card holds what
    :func:`fmmtc_core.training.train` records (out-of-fold metrics with the bootstrap interval
    of the AUC, the deployed Platt calibration and its bootstrap band, the no-signal warnings;
    both score through :func:`fmmtc_core.evaluation.score_out_of_fold`). The deployed model
    is the ensemble of the fold models, as for FMM-TC: its calibration was fitted on exactly
    those models' out-of-fold logits, which a model refitted on every participant would not
    share (it would select other edges, on another scale).

    Parameters
    ----------
    cohort_dir : path
        Labelled BIDS-style cohort (:func:`fmmtc_core.bids.read_cohort`).
    out_dir : path
        The model folder (:func:`fmmtc_core.models.classic.write_classic_folder`), with
        ``metrics.json`` and ``oof_predictions.tsv``; written only once everything succeeded.
    model : {"cpm", "nbs", "edges", "amplitude"}
        The baseline (:data:`DEPLOYABLE`).
    folds : int, default=5
        Outer folds (:func:`fmmtc_core.training._splits`, as FMM-TC's).
    seed : int, default=0
        Repeat r uses seed ``seed + r`` for its folds and its inner splits.
    repeats : int, default=1
        Repetitions of the cross-validation with other splits; every fold model of every
        repeat joins the deployed ensemble, and a participant's out-of-fold logit is the mean
        over repeats.
    permutations : int, default=0
        Label permutations for a p-value of the out-of-fold AUC (each re-runs the whole
        cross-validation).
    atlas : str, default="hcpex"
        A bundled atlas, or the path of a label image.
    cleaning : CleaningSettings, default=CleaningSettings()
        How the cohort's signals are cleaned; recorded in the card.
    inner_folds : int, default=5
        Inner stratified folds of every hyper-parameter search.
    subjects : list of RegionSignals or None, default=None
        Already cleaned signals of the cohort, in its order
        (:func:`~fmmtc_core.pipeline.prepare_cohort` with the same ``atlas`` and ``cleaning``).
    progress : callable(stage, done, total, info) or None, default=None
        ``("prepare", i, n, {})`` and ``("features", i, n, {})`` per subject, ``("train", r,
        repeats, {"auc": ...})`` per repeat, ``("permute", i, n, {})`` per permutation.

    Returns
    -------
    dict
        The out-of-fold metrics, as :func:`fmmtc_core.training.train` returns them
        (``warnings`` are also issued as :class:`~fmmtc_core.training.TrainingWarning`).

    Raises
    ------
    InvalidInputError
        Before any work: ``model`` is the oracle or not a deployable baseline; ``folds``,
        ``repeats``, ``permutations`` or ``inner_folds`` out of range; ``out_dir`` is not a
        writable folder; the cohort cannot be read or split. Later: a scan that cannot be
        cleaned, or a training fold too small for the inner cross-validation. Nothing is
        written then.
    """
    import platform
    import time

    from sklearn.metrics import roc_auc_score

    from fmmtc_core.atlas import load_atlas
    from fmmtc_core.bids import read_cohort
    from fmmtc_core.evaluation import permutation_p_value, score_out_of_fold
    from fmmtc_core.pipeline import prepare_cohort
    from fmmtc_core.preprocess import preprocessing_card
    from fmmtc_core.training import TrainingWarning, _atlas_card, _card_header, _splits

    t0 = time.perf_counter()
    name = _check_deployable(model)
    _check_counts(("folds", folds, 2), ("repeats", repeats, 1),
                  ("permutations", permutations, 0), ("inner_folds", inner_folds, 2))
    out = Path(out_dir)
    _check_writable(out)
    atlas_obj = load_atlas(atlas)
    cohort = read_cohort(cohort_dir)
    y = cohort.participants["responder"].to_numpy().astype(int)
    groups = (cohort.participants["site"].astype(str).to_numpy()
              if "site" in cohort.participants else None)
    _splits(y, groups, folds, seed)  # refuse a cohort that cannot be split before any work
    if subjects is None:
        subjects = prepare_cohort(cohort, atlas_obj, progress, cleaning=cleaning)
    if len(subjects) != len(y):
        raise InvalidInputError(f"{len(subjects)} prepared subjects for a cohort of {len(y)}.")
    feats = baseline_features(subjects, progress=progress)
    X = feats.matrix(name)
    n_features = X.shape[1]

    runs, split_how = [], ""
    for r in range(repeats):
        splits, split_how = _splits(y, groups, folds, seed + r)
        runs.append(cross_validate(name, feats, y, splits, inner_folds=inner_folds,
                                   seed=seed + r, keep_models=True))
        if progress:
            progress("train", r + 1, repeats, {"auc": float(roc_auc_score(y, runs[-1].logit))})
    permutation = None
    if permutations:
        def permuted_auc(y_perm: np.ndarray) -> float:
            perm_splits, _ = _splits(y_perm, groups, folds, seed)
            res = cross_validate(name, feats, y_perm, perm_splits, inner_folds=inner_folds,
                                 seed=seed)
            return float(roc_auc_score(y_perm, res.logit))

        permutation = permutation_p_value(
            float(roc_auc_score(y, runs[0].logit)), permuted_auc, y, int(permutations),
            seed=seed,
            progress=(lambda i, n: progress("permute", i, n, {})) if progress else None)
    scored = score_out_of_fold(y, [res.logit for res in runs], runs[0].fold, seed=seed,
                               permutation=permutation)
    for text in scored.warnings:
        warnings.warn(text, TrainingWarning, stacklevel=2)

    from fmmtc_core.models.classic import fold_arrays, write_classic_folder

    fold_files = [fold_arrays(name, m, n_features) for res in runs for m in res.models]
    per_fold = [{"repeat": r, "fold": k, **_chosen_card(name, m, c, n_features)}
                for r, res in enumerate(runs) for k, (m, c) in enumerate(zip(res.models,
                                                                            res.chosen))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature missing everywhere
        feature_mean = np.nan_to_num(np.nanmean(X.astype(np.float64), axis=0))
    preprocessing = {k: v for k, v in preprocessing_card(cleaning, 2).items()
                     if k != "window"}  # the baselines read no window
    preprocessing["connectivity"] = {**preprocessing["connectivity"],
                                     "span": FC_SPAN_SCAN}
    import sklearn

    card = {
        **_card_header(out, cohort_dir, y, groups),
        "atlas": _atlas_card(atlas_obj, None),
        "preprocessing": preprocessing,
        "model": {"type": name, "classic_baseline": True, "description": _NOTES[name],
                  "reference": _REFERENCES[name], "n_regions": int(feats.n_regions),
                  "n_features": int(n_features), "features": _features_card(
                      name, feats.n_regions)},
        "training": {
            "folds": folds, "repeats": repeats, "split": split_how, "seed": seed,
            "inner_folds": inner_folds,
            "protocol": "fmmtc compare's: the outer folds of fmmtc train (same seed), every "
                        "selection and hyper-parameter chosen by an inner stratified CV "
                        "(AUC) on the training fold only",
            "search": ({"p_threshold": list(P_THRESHOLDS)} if name in ("cpm", "nbs") else
                       {"c_per_feature": list(C_GRID)}),
            "per_fold": per_fold,
        },
        "calibration": {"method": "platt", "a": scored.a, "b": scored.b,
                        "fitted_on": "out-of-fold mean of the fold models' logits (all "
                                     "participants)",
                        "note": scored.note,
                        "bootstrap": [[round(float(x), 6) for x in row]
                                      for row in scored.bootstrap],
                        "band": "80 % interval of the calibrated probability over "
                                f"{len(scored.bootstrap)} bootstrap refits of the calibration"},
        "ensemble": "calibrated mean of the fold models' logits (every fold of every repeat)",
        "explanation": "exact linear attribution: weight x (feature - the training cohort's "
                       "mean feature, baseline.safetensors), averaged over the fold models",
        "metrics_out_of_fold": scored.metrics,
        "warnings": scored.warnings,
        "software": {"python": platform.python_version(), "numpy": np.__version__,
                     "scikit-learn": sklearn.__version__},
        "runtime_s": round(time.perf_counter() - t0, 1),
    }
    oof = pd.DataFrame({"participant_id": cohort.participants["participant_id"],
                        "responder": y, "fold": runs[0].fold, "logit": scored.logit,
                        "probability": scored.probability})
    write_classic_folder(out, folds=fold_files, feature_mean=feature_mean, card=card,
                         extras={"metrics.json": json.dumps(scored.metrics, indent=2),
                                 "oof_predictions.tsv": oof.to_csv(sep="\t", index=False)})
    return scored.metrics
