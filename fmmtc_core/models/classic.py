"""Classic baselines as deployable model folders (``fmmtc train --model cpm|nbs|edges|amplitude``).

The folder has the layout of an FMM-TC folder (:mod:`fmmtc_core.models.ensemble`), and the same
rules: safetensors and JSON only, nothing unpickled, the SHA-256 of every file in the card,
checked before any file is parsed; the version id is computed the same way.

- ``fold_K.safetensors``: one per cross-validation fold model (of every repeat), as FMM-TC
  deploys its fold ensemble. Each holds the fitted estimator's own parameters (float64, masks
  as bool):

  - ``cpm``: ``positive``, ``negative`` (E,) the two networks' edges; ``scaler_mean``,
    ``scaler_scale`` and ``coef`` (2,) of the logistic regression on the standardised
    (positive, negative) network strengths; ``intercept`` (1,).
  - ``nbs``: ``selected`` (E,) the largest supra-threshold component's edges; ``scaler_mean``,
    ``scaler_scale`` and ``coef`` (one per selected edge, in edge order; empty when no edge
    passed, the fold model then says logit 0); ``intercept`` (1,).
  - ``edges``: ``scaler_mean``, ``scaler_scale`` (E,) and ``coef`` (E,) on the standardised
    edges (the exact PCA rotation of :func:`~fmmtc_core.baselines.make_baseline` folded in);
    ``intercept`` (1,).
  - ``amplitude``: ``impute`` (F,) the training fold's median of each feature, ``kept`` (F,)
    False for a feature without any value in the training fold (dropped, weight 0);
    ``scaler_mean``, ``scaler_scale`` and ``coef`` (F,); ``intercept`` (1,).

  E = R (R - 1) / 2 connectivity edges (``np.triu_indices(R, 1)`` order), F = 4 R amplitude
  features (:func:`~fmmtc_core.baselines.scan_features`).
- ``baseline.safetensors``: ``feature_mean`` (F,) the training cohort's mean feature vector:
  the explanation's baseline.
- ``model_card.json`` (``model.type`` names the baseline), ``metrics.json``,
  ``oof_predictions.tsv``.

Every fold model is linear in its features (after the amplitude model's imputation): its logit
is ``x . w + c``. :func:`load_classic` derives ``(w, c)`` from the stored parameters once;
prediction and explanation both use them, so an explanation's logit is the prediction's and its
attributions ``w * (x - baseline)``, averaged over the fold models, add up to
``F(x) - F(baseline)`` up to floating-point rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmmtc_core._errors import InvalidInputError, ModelFileError
from fmmtc_core.models.deployed import CLASSIC_TYPES
from fmmtc_core.preprocess import ModelInputs, RegionSignals
from fmmtc_core.summary import EXACT_ATTRIBUTION

__all__ = ["ClassicModel", "LinearFold", "fold_arrays", "load_classic", "write_classic_folder",
           "EXACT_METHOD"]

#: ``Explanation.settings["method"]`` of a classic baseline's explanation.
EXACT_METHOD = EXACT_ATTRIBUTION

#: The arrays of each baseline's fold file (besides ``intercept`` (1,)); ``F`` is the
#: feature count, ``S`` the number of selected edges (NBS), ``2`` CPM's two strengths.
_FOLD_ARRAYS: dict[str, dict[str, int | str]] = {
    "cpm": {"positive": "F", "negative": "F", "scaler_mean": 2, "scaler_scale": 2, "coef": 2},
    "nbs": {"selected": "F", "scaler_mean": "S", "scaler_scale": "S", "coef": "S"},
    "edges": {"scaler_mean": "F", "scaler_scale": "F", "coef": "F"},
    "amplitude": {"impute": "F", "kept": "F", "scaler_mean": "F", "scaler_scale": "F",
                  "coef": "F"},
}
_MASKS = ("positive", "negative", "selected", "kept")


# --------------------------------------------------------------------------------------------
# From a fitted estimator to arrays (training side)
# --------------------------------------------------------------------------------------------
def fold_arrays(kind: str, estimator: Any, n_features: int) -> dict[str, np.ndarray]:
    """The parameters of one fitted fold model, as the arrays its ``fold_K.safetensors`` holds.

    Parameters
    ----------
    kind : {"cpm", "nbs", "edges", "amplitude"}
        The baseline.
    estimator : fitted estimator
        :func:`fmmtc_core.baselines.fit_fold`'s model for ``kind``.
    n_features : int
        F, the columns of the feature matrix it was fitted on.

    Returns
    -------
    dict of str to ndarray
        See the module docstring; float64 numbers, bool masks.

    Raises
    ------
    InvalidInputError
        ``kind`` is not a deployable baseline.
    """
    from fmmtc_core._errors import check_option

    kind = check_option("model", kind, CLASSIC_TYPES)

    def f64(x) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(-1))

    if kind == "cpm":
        scaler, lr = estimator.model_[0], estimator.model_[-1]
        return {"positive": np.asarray(estimator.positive_, bool),
                "negative": np.asarray(estimator.negative_, bool),
                "scaler_mean": f64(scaler.mean_), "scaler_scale": f64(scaler.scale_),
                "coef": f64(lr.coef_[0]), "intercept": f64(lr.intercept_)}
    if kind == "nbs":
        selected = np.zeros(n_features, bool)
        selected[estimator.selected_] = True  # ascending: the order of the model's columns
        if estimator.model_ is None:  # no edge passed: logit 0
            empty = np.zeros(0)
            return {"selected": selected, "scaler_mean": empty, "scaler_scale": empty,
                    "coef": empty, "intercept": np.zeros(1)}
        scaler, lr = estimator.model_[0], estimator.model_[-1]
        return {"selected": selected, "scaler_mean": f64(scaler.mean_),
                "scaler_scale": f64(scaler.scale_), "coef": f64(lr.coef_[0]),
                "intercept": f64(lr.intercept_)}
    if kind == "edges":
        scaler, pca = estimator.named_steps["scale"], estimator.named_steps["rotate"]
        lr = estimator.named_steps["logistic"].best_estimator_
        assert not pca.whiten  # a rotation: the logistic regression's weights map back exactly
        # logit = ((z - pca.mean_) @ components_.T) @ w + b, z the standardised edges
        coef = pca.components_.T.astype(np.float64) @ lr.coef_[0].astype(np.float64)
        intercept = float(lr.intercept_[0]) - float(pca.mean_.astype(np.float64) @ coef)
        return {"scaler_mean": f64(scaler.mean_), "scaler_scale": f64(scaler.scale_),
                "coef": f64(coef), "intercept": f64([intercept])}
    imputer, scaler = estimator.named_steps["impute"], estimator.named_steps["scale"]
    lr = estimator.named_steps["logistic"]
    stats = np.asarray(imputer.statistics_, dtype=np.float64)
    kept = np.isfinite(stats)  # SimpleImputer drops a feature with no value in the fold
    out = {"impute": np.where(kept, stats, 0.0), "kept": kept,
           "scaler_mean": np.zeros(stats.size), "scaler_scale": np.ones(stats.size),
           "coef": np.zeros(stats.size), "intercept": f64(lr.intercept_)}
    out["scaler_mean"][kept] = scaler.mean_
    out["scaler_scale"][kept] = scaler.scale_
    out["coef"][kept] = lr.coef_[0]
    return out


# --------------------------------------------------------------------------------------------
# The deployed model
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class LinearFold:
    """One fold model of a classic baseline, as the linear function it is.

    Each field is also an attribute of the same name.

    Parameters
    ----------
    weights : ndarray (F,) float64
        The logit's weight on each raw feature (the standardisation folded in).
    intercept : float
        The logit at features all 0.
    impute : ndarray (F,) float64 or None, default=None
        The value a missing (NaN) feature takes (the amplitude model's training-fold medians);
        None when the features cannot be missing.
    """

    weights: np.ndarray
    intercept: float
    impute: np.ndarray | None = None

    def complete(self, X: np.ndarray) -> np.ndarray:
        """``X`` with each missing feature set to :attr:`impute` (``X`` itself without it).

        Parameters
        ----------
        X : ndarray (B, F)

        Returns
        -------
        ndarray (B, F) float64
        """
        X = np.asarray(X, dtype=np.float64)
        if self.impute is None:
            return X
        return np.where(np.isnan(X), self.impute[None, :], X)

    def logit(self, X: np.ndarray) -> np.ndarray:
        """The fold model's logit.

        Parameters
        ----------
        X : ndarray (B, F)
            Features (:meth:`ClassicModel.features`).

        Returns
        -------
        ndarray (B,) float64
        """
        return self.complete(X) @ self.weights + self.intercept


def _linear(kind: str, arrays: dict[str, np.ndarray]) -> LinearFold:
    """The fold model's weights on raw features, from its stored parameters."""
    coef, mean, scale = arrays["coef"], arrays["scaler_mean"], arrays["scaler_scale"]
    b = float(arrays["intercept"][0])
    if kind == "cpm":
        # logit = sum_n coef_n (S_n - mean_n) / scale_n + b, S_n the summed edges of network n
        w_net = coef / scale
        weights = (arrays["positive"] * w_net[0] + arrays["negative"] * w_net[1])
        return LinearFold(weights.astype(np.float64), b - float(w_net @ mean))
    if kind == "nbs":
        weights = np.zeros(arrays["selected"].size)
        weights[arrays["selected"]] = coef / scale
        return LinearFold(weights, b - float((coef / scale) @ mean))
    w = coef / scale
    fold = LinearFold(w, b - float(w @ mean))
    if kind == "amplitude":
        fold.impute = arrays["impute"]
    return fold


@dataclass(eq=False)
class ClassicModel:
    """A classic baseline's fold models with their calibration; see :func:`load_classic`.

    It has the interface screening, explanation and evaluation use
    (:class:`~fmmtc_core.models.deployed.ScreeningModel`): feed a scan through :meth:`inputs`,
    then :meth:`predict_proba`; :func:`fmmtc_core.explain.explain` calls :meth:`explain`.

    Each field is also an attribute of the same name.

    Parameters
    ----------
    kind : {"cpm", "nbs", "edges", "amplitude"}
        The baseline (the card's ``model.type``).
    models : list of LinearFold
        The fold models, in ``fold_K`` order.
    card : dict
        The model card.
    feature_mean : ndarray (F,) float64
        The training cohort's mean features (``baseline.safetensors``): the explanation's
        ``"cohort_mean"`` baseline.
    n_regions : int
        R, the atlas's region count.
    atlas : str, default=""
        The model's atlas, as :func:`~fmmtc_core.atlas.load_atlas` takes it.
    root : Path or None, default=None
        The model folder (resolved); None for a model built by hand.
    device : torch.device, default=torch.device("cpu")
        Where it runs: numpy on the CPU, whatever device FMM-TC would use.
    _digest : str or None, default=None
        :attr:`weights_sha256`, when already known (:func:`load_classic` sets it).
    """

    kind: str
    models: list[LinearFold]
    card: dict
    feature_mean: np.ndarray
    n_regions: int
    atlas: str = ""
    root: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _digest: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The model's name: the card's ``name``, else the folder's name, else the type."""
        return str(self.card.get("name") or (self.root.name if self.root else self.kind))

    @property
    def model_type(self) -> str:
        """The baseline: ``cpm``, ``nbs``, ``edges`` or ``amplitude``."""
        return self.kind

    @property
    def n_features(self) -> int:
        """F: the connectivity edges ``R (R - 1) / 2``, or the ``4 R`` amplitude features."""
        r = self.n_regions
        return 4 * r if self.kind == "amplitude" else r * (r - 1) // 2

    @property
    def weights_sha256(self) -> str:
        """Identity of the model version: SHA-256 over its card and every weights file (the
        formula of :attr:`FMMTCEnsemble.weights_sha256
        <fmmtc_core.models.ensemble.FMMTCEnsemble.weights_sha256>`)."""
        if self._digest is None:
            from fmmtc_core.models.ensemble import (
                MODEL_CARD,
                _file_hashes,
                _file_sha256,
                _version_digest,
            )

            if self.root is None:
                self._digest = hashlib.sha256(
                    json.dumps(self.card, sort_keys=True).encode()).hexdigest()
            else:
                self._digest = _version_digest(
                    self.root, _file_sha256(self.root / MODEL_CARD),
                    _file_hashes(self.root, self.root.rglob("*.safetensors")))
        return self._digest

    def inputs(self, signals: RegionSignals) -> ModelInputs:
        """The model's inputs for one scan's cleaned signals, as in training.

        :func:`fmmtc_core.baselines.scan_features`, the function that gave training its
        features: the connectivity of the whole cleaned series and, for the amplitude model,
        the amplitude features.

        Parameters
        ----------
        signals : RegionSignals
            Cleaned, in the model's atlas.

        Returns
        -------
        ModelInputs
            ``fc`` (R, R) Fisher z; ``amplitude`` the (4 R,) amplitude features for the
            ``amplitude`` model (NaN for a region without signal), None otherwise; ``window``
            the whole series (read by no baseline).

        Raises
        ------
        InvalidInputError
            ``signals`` do not have the model's number of regions.
        """
        from fmmtc_core.baselines import scan_features

        if signals.n_regions != self.n_regions:
            raise InvalidInputError(
                f"The scan has {signals.n_regions} regions; model {self.name!r} takes "
                f"{self.n_regions} ({self.atlas}).")
        inputs, amplitude = scan_features(signals)
        return replace(inputs, amplitude=amplitude if self.kind == "amplitude" else None)

    def features(self, fc: np.ndarray | None, amplitude: np.ndarray | None = None) -> np.ndarray:
        """The feature matrix the fold models read.

        Parameters
        ----------
        fc : ndarray (B, R, R) or (R, R), or None
            Fisher-z connectivity (:meth:`inputs`); read by ``cpm``, ``nbs`` and ``edges``.
        amplitude : ndarray (B, 4 R) or (4 R,), or None, default=None
            The amplitude features (:meth:`inputs`); read by ``amplitude``.

        Returns
        -------
        ndarray (B, F)
            The upper triangle of each connectivity matrix (float32, as in training), or the
            amplitude features (float64, NaN where missing).

        Raises
        ------
        InvalidInputError
            The input the model reads is None, of the wrong shape, or (connectivity) not
            finite, or (amplitude) infinite.
        """
        r = self.n_regions
        if self.kind == "amplitude":
            if amplitude is None:
                raise InvalidInputError(
                    f"Model {self.name!r} reads the amplitude features: pass "
                    "inputs(signals).amplitude.")
            x = np.asarray(amplitude, dtype=np.float64)
            x = x[None] if x.ndim == 1 else x
            if x.ndim != 2 or x.shape[1] != 4 * r:
                raise InvalidInputError(
                    f"amplitude must have shape (B, {4 * r}) (4 features x {r} regions), got "
                    f"{np.shape(amplitude)}.")
            if np.isinf(x).any():
                raise InvalidInputError("The amplitude features contain infinite values.")
            return x
        if fc is None:
            raise InvalidInputError(f"Model {self.name!r} reads the connectivity: pass "
                                    "inputs(signals).fc.")
        m = np.asarray(fc, dtype=np.float32)
        m = m[None] if m.ndim == 2 else m
        if m.ndim != 3 or m.shape[1:] != (r, r):
            raise InvalidInputError(f"fc must have shape (B, {r}, {r}), got {np.shape(fc)}.")
        if not np.isfinite(m).all():
            raise InvalidInputError("The model inputs contain NaN or infinite values.")
        iu = np.triu_indices(r, 1)
        return m[:, iu[0], iu[1]]

    def fold_logits(self, X: np.ndarray) -> np.ndarray:
        """Each fold model's logit.

        Parameters
        ----------
        X : ndarray (B, F)
            :meth:`features`.

        Returns
        -------
        ndarray (K, B) float64
        """
        return np.stack([m.logit(X) for m in self.models])

    def fold_probabilities(self, fold_logits: np.ndarray) -> np.ndarray:
        """Calibrated probability of each fold model.

        Parameters
        ----------
        fold_logits : ndarray (K,) or (K, B)
            Per-fold logits (``predict_proba(...)["fold_logits"]``).

        Returns
        -------
        ndarray of float64, the shape of ``fold_logits``
        """
        from fmmtc_core.models.ensemble import platt

        cal = self.card["calibration"]
        return platt(fold_logits, cal["a"], cal["b"])

    def predict_proba(self, window: Any, fc: np.ndarray | None,
                      amplitude: np.ndarray | None = None) -> dict:
        """Calibrated responder probability and its band, as
        :meth:`FMMTCEnsemble.predict_proba
        <fmmtc_core.models.ensemble.FMMTCEnsemble.predict_proba>` gives them.

        Parameters
        ----------
        window : object
            Not read (the time-series input of :meth:`inputs`; accepted so that every model
            is called alike).
        fc : ndarray (B, R, R) or None
            Fisher-z connectivity (:meth:`inputs`); read by ``cpm``, ``nbs`` and ``edges``.
        amplitude : ndarray (B, 4 R) or None, default=None
            The amplitude features (:meth:`inputs`); read by ``amplitude``.

        Returns
        -------
        dict
            ``probability`` (B,): the Platt-calibrated mean fold logit; ``band`` (B, 2): the
            80 % interval of that probability over the card's bootstrap refits of the
            calibration; ``fold_logits`` (K, B).

        Raises
        ------
        InvalidInputError
            The input the model reads is missing or unusable (:meth:`features`).
        """
        from fmmtc_core.evaluation import band_from_bootstrap
        from fmmtc_core.models.ensemble import platt

        lg = self.fold_logits(self.features(fc, amplitude))
        cal = self.card["calibration"]
        mean = lg.mean(0)
        if cal.get("bootstrap"):
            band = band_from_bootstrap(mean, np.asarray(cal["bootstrap"], dtype=float))
        else:
            p = self.fold_probabilities(lg)
            band = np.stack([p.min(0), p.max(0)], axis=1)
        return {"probability": platt(mean, cal["a"], cal["b"]), "band": band,
                "fold_logits": lg}

    def explain(self, fc: np.ndarray | None, amplitude: np.ndarray | None = None, *,
                baseline: str | np.ndarray = "cohort_mean", n_top: int = 20, atlas=None,
                progress: Callable[[str, int, int, dict], None] | None = None):
        """Exact attributions of one prediction: the model is linear in its features.

        The explained quantity is the mean fold logit (before calibration, as for FMM-TC).
        Feature ``f`` gets ``mean_k w_k[f] (x_k[f] - b[f])``: fold ``k``'s weight times the
        feature's distance from the baseline (``x_k`` the scan's features with fold ``k``'s
        imputation of a missing amplitude feature). The attributions add up to
        ``F(x) - F(b)`` exactly, up to floating-point rounding (the reported gap).

        Parameters
        ----------
        fc : ndarray (R, R) or None
            The scan's connectivity (:meth:`inputs`); read by ``cpm``, ``nbs`` and ``edges``.
        amplitude : ndarray (4 R,) or None, default=None
            The scan's amplitude features (:meth:`inputs`); read by ``amplitude``.
        baseline : "cohort_mean", "zero" or ndarray (R, R), default="cohort_mean"
            Edge models: the training cohort's mean features (stored in the folder), all
            zeros, or a connectivity matrix (its upper triangle). The amplitude model always
            takes the cohort mean (a connectivity baseline does not apply to it).
        n_top : int, default=20
            Connections listed in ``top_connections``.
        atlas : Atlas or None, default=None
            Region names and networks; None: the model's atlas.
        progress : callable(stage, done, total, info) or None, default=None
            Called once, ``("explain", 1, 1, {"steps": 0, "gap": rel_gap})``.

        Returns
        -------
        Explanation
            Edge models: ``fc`` (R, R) with half of each edge's attribution in each of its two
            entries (so a region gets half of each of its edges; ``top_connections`` the
            whole edge), ``ts`` None, ``modality_share`` all connectivity. The amplitude
            model: ``amplitude`` (R,) each region's four features summed, counted as time
            series (``region_ts``, the ``ts`` share), ``fc`` None; ``settings`` holds the
            attribution of each kind of amplitude feature (``feature_totals``). ``steps`` is
            0, ``ig_gap`` / ``ig_gap_abs`` the measured completeness gap and ``settings``
            names the method (``"exact_linear_attribution"``).

        Raises
        ------
        InvalidInputError
            The input the model reads is missing or unusable, more than one scan is given,
            an unknown baseline name or a baseline array of the wrong shape, or an ``atlas``
            whose region count differs from the model's.
        """
        from fmmtc_core._errors import check_option
        from fmmtc_core.atlas import load_atlas
        from fmmtc_core.explain import (
            Explanation,
            _networks,
            _share,
            _top_connections,
            region_summaries,
        )

        t0 = time.perf_counter()
        X = self.features(fc, amplitude)
        if X.shape[0] != 1:
            raise InvalidInputError(f"Explain one scan at a time; got {X.shape[0]}.")
        r = self.n_regions
        iu = np.triu_indices(r, 1)
        if self.kind == "amplitude" or isinstance(baseline, str) and baseline == "cohort_mean":
            base, base_name = self.feature_mean, "cohort_mean"
        elif isinstance(baseline, str):
            check_option("baseline_fc", baseline, ("cohort_mean", "zero"))
            base, base_name = np.zeros(self.n_features), "zero"
        else:
            b_fc = np.asarray(baseline, dtype=np.float32)
            if b_fc.shape != (r, r):
                raise InvalidInputError(f"baseline_fc has shape {b_fc.shape}; expected "
                                        f"{(r, r)}.")
            base, base_name = b_fc[iu].astype(np.float64), "custom"
        atlas = atlas or load_atlas(self.atlas)
        if atlas.n_regions != r:
            raise InvalidInputError(
                f"Atlas {atlas.name} has {atlas.n_regions} regions, the model {r}.")
        # per fold: w_k * (x_k - b), x_k with fold k's imputation; the mean over folds
        attr = np.mean([m.weights * (m.complete(X)[0] - base) for m in self.models], axis=0)
        f_x = float(self.fold_logits(X).mean())
        f_b = float(self.fold_logits(base[None]).mean())
        d_f = f_x - f_b
        gap_abs = abs(float(attr.sum()) - d_f)
        rel_gap = gap_abs / abs(d_f) if d_f != 0 else 0.0
        a_fc = a_amp = None
        settings: dict = {}
        if self.kind == "amplitude":
            from fmmtc_core.baselines import _AMPLITUDE_ROWS

            rows = attr.reshape(4, r)
            a_amp = rows.sum(axis=0)
            r_ts, r_fc = a_amp.copy(), np.zeros(r)
            total = a_amp.copy()
            share = _share(attr, None)
            baseline_card = {"amplitude": base_name}
            settings["feature_totals"] = {k: float(v) for k, v in
                                          zip(_AMPLITUDE_ROWS, rows.sum(axis=1))}
        else:
            a_fc = np.zeros((r, r))
            a_fc[iu] = attr / 2.0  # half of each edge in each of its two entries
            a_fc = a_fc + a_fc.T
            r_ts, r_fc, total = region_summaries(None, a_fc, r)
            share = _share(None, a_fc)
            baseline_card = {"fc": base_name}
        if progress:
            progress("explain", 1, 1, {"steps": 0, "gap": rel_gap})
        return Explanation(
            ts=None, fc=a_fc, region_ts=r_ts, region_fc=r_fc, region_total=total,
            labels=np.asarray(atlas.labels), names=tuple(atlas.names),
            groups=tuple(atlas.groups),
            top_connections=_top_connections(a_fc, atlas.labels, atlas.names, n_top),
            networks=_networks(atlas.groups, r_ts, r_fc), modality_share=share, logit=f_x,
            baseline_logit=f_b, ig_gap=rel_gap, ig_gap_abs=gap_abs, steps=0,
            baseline=baseline_card, runtime_s=time.perf_counter() - t0, amplitude=a_amp,
            settings={"method": EXACT_METHOD,
                      "description": "exact linear attribution: weight x (feature - baseline "
                                     "feature), averaged over the fold models (the model is "
                                     "linear in its features; no Integrated Gradients)",
                      "target": "mean fold logit", "baseline": baseline_card,
                      "model_type": self.kind, "ts_attribution": False,
                      "amplitude_attribution": self.kind == "amplitude", **settings},
        )


# --------------------------------------------------------------------------------------------
# Writing a folder
# --------------------------------------------------------------------------------------------
def _remove_model_files(out: Path, extras: Sequence[str]) -> None:
    """The files of an earlier model in ``out`` (its card first: no half model stays
    loadable); other files (e.g. ``comparison.tsv``) are kept."""
    from fmmtc_core.models.ensemble import MODEL_CARD

    for path in [out / MODEL_CARD, *sorted(out.glob("fold_*.safetensors")),
                 out / "baseline.safetensors", *(out / name for name in extras)]:
        if path.is_file() or path.is_symlink():
            path.unlink()
    foundation = out / "foundation"  # an FMM-TC model's encoder: no baseline reads it
    if foundation.is_symlink():
        foundation.unlink()
    elif foundation.is_dir():
        shutil.rmtree(foundation)


def write_classic_folder(out: str | os.PathLike, *, folds: Sequence[dict[str, np.ndarray]],
                         feature_mean: np.ndarray, card: dict,
                         extras: dict[str, str] | None = None) -> Path:
    """Write a classic baseline's model folder, all at once.

    Everything is written into a temporary folder beside ``out`` first; only then are the
    files of an earlier model in ``out`` removed and the new ones moved in, the card last. An
    error on the way leaves ``out`` as it was (and no new folder).

    Parameters
    ----------
    out : path
        The model folder; created if needed.
    folds : sequence of dict of str to ndarray
        :func:`fold_arrays` of each fold model, written as ``fold_K.safetensors``.
    feature_mean : ndarray (F,)
        The training cohort's mean features, written as ``baseline.safetensors``.
    card : dict
        The model card; its ``files`` entry (SHA-256 of every safetensors file) is filled in.
    extras : dict of str to str or None, default=None
        Further text files (``metrics.json``, ``oof_predictions.tsv``), by name.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    InvalidInputError
        ``out`` exists and is not a folder, or its parent folder cannot be written to.
    OSError
        Writing or moving a file failed (e.g. a full disk); ``out`` is left as it was.
    """
    from safetensors.numpy import save_file

    from fmmtc_core.models.ensemble import MODEL_CARD, _file_hashes

    out = Path(out)
    extras = dict(extras or {})
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a folder; expected a model folder "
                                "to write.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial",
                                      dir=out.parent))
    except OSError as exc:
        raise InvalidInputError(f"Cannot write the model folder {out}: {exc}.") from None
    created = not out.exists()
    try:
        written = []
        for k, arrays in enumerate(folds):
            path = stage / f"fold_{k}.safetensors"
            save_file({n: np.ascontiguousarray(v) for n, v in arrays.items()}, str(path))
            written.append(path)
        save_file({"feature_mean": np.ascontiguousarray(feature_mean, dtype=np.float64)},
                  str(stage / "baseline.safetensors"))
        written.append(stage / "baseline.safetensors")
        card = {**card, "files": _file_hashes(stage, written)}
        (stage / MODEL_CARD).write_text(json.dumps(card, indent=2))
        for name, text in extras.items():
            (stage / name).write_text(text)
        out.mkdir(exist_ok=True)
        _remove_model_files(out, list(extras))
        for path in sorted(stage.iterdir(), key=lambda p: p.name == MODEL_CARD):
            os.replace(path, out / path.name)
    except BaseException:
        if created and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# Loading a folder
# --------------------------------------------------------------------------------------------
def _fold_number(path: Path) -> int:
    m = re.fullmatch(r"fold_(\d+)\.safetensors", path.name)
    return int(m.group(1)) if m else -1


def _check_fold(kind: str, arrays: dict[str, np.ndarray], n_features: int, where: str) -> None:
    """Refuse a fold file that does not hold ``kind``'s arrays in the card's shapes."""
    expected = {**_FOLD_ARRAYS[kind], "intercept": 1}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    problems = [f"missing {', '.join(missing)}"] if missing else []
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected)}")
    if problems:
        raise ModelFileError(f"{where} does not hold a {kind} fold model: "
                             f"{'; '.join(problems)}. Expected {', '.join(sorted(expected))}.")
    sizes: dict[str, int] = {"F": n_features}
    for name, size in expected.items():  # NBS's "selected" comes first: it sets "S"
        a = arrays[name]
        mask = name in _MASKS
        want = sizes[size] if isinstance(size, str) else size
        if a.ndim != 1 or a.shape[0] != want or a.dtype != (np.bool_ if mask else np.float64):
            raise ModelFileError(
                f"{where}: {name} has shape {a.shape} and type {a.dtype}; expected ({want},) "
                f"{'bool' if mask else 'float64'} for the card's {n_features} features.")
        if name == "selected":
            sizes["S"] = int(a.sum())
        if not mask and not np.isfinite(a).all():
            raise ModelFileError(f"{where}: {name} holds non-finite values.")
    if (arrays["scaler_scale"] <= 0).any():
        raise ModelFileError(f"{where}: scaler_scale holds values <= 0.")


def load_classic(root: str | os.PathLike, card: dict, card_sha256: str) -> ClassicModel:
    """Load a classic baseline's model folder (:func:`write_classic_folder`).

    Called by :func:`fmmtc_core.models.ensemble.load_model` for a card whose ``model.type`` is
    a baseline. Every file is checked against the SHA-256 its card records before it is
    parsed, as for FMM-TC, and nothing is unpickled.

    Parameters
    ----------
    root : path
        The model folder.
    card : dict
        Its card, read and checked by ``load_model`` (``model``, ``atlas``, ``calibration``
        and ``files`` usable).
    card_sha256 : str
        SHA-256 of the card's bytes (enters the version id).

    Returns
    -------
    ClassicModel

    Raises
    ------
    ModelFileError
        The card's ``model`` does not describe the baseline (region and feature counts); a
        file differs from its card's SHA-256, is missing or has none recorded; a file is a
        pickle, truncated, or holds arrays of the wrong names, shapes or types; no fold
        model; an unusable calibration bootstrap. The message names the file and what was
        expected.
    """
    from fmmtc_core.models.ensemble import (
        MODEL_CARD,
        _atlas_ref,
        _check_bootstrap,
        _verify_files,
        _version_digest,
    )
    from fmmtc_core.models.foundation import model_file, read_safetensors

    root = Path(root)
    where = model_file(root / MODEL_CARD, root)
    spec = card["model"]
    kind = spec["type"]
    r = spec.get("n_regions")
    n_features = spec.get("n_features")
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 2):
        raise ModelFileError(f"{where} has no usable model 'n_regions' (an integer >= 2); "
                             f"got {r!r}.")
    expected = 4 * r if kind == "amplitude" else r * (r - 1) // 2
    if n_features != expected:
        raise ModelFileError(
            f"{where}: a {kind} model on {r} regions reads {expected} features, but the card "
            f"gives n_features {n_features!r}.")
    digests = _verify_files(root, card)  # before any file is parsed

    def arrays_of(path: Path) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in read_safetensors(path, root=root).items()}

    models = []
    paths = sorted(root.glob("fold_*.safetensors"), key=_fold_number)
    for path in paths:
        arrays = arrays_of(path)
        _check_fold(kind, arrays, expected, model_file(path, root))
        models.append(_linear(kind, arrays))
    if not models:
        raise ModelFileError(f"{str(root)!r} holds no fold_*.safetensors model; expected the "
                             "fold files its card was written with.")
    _check_bootstrap(where, card["calibration"])
    base_path = root / "baseline.safetensors"
    base = arrays_of(base_path)
    mean = base.get("feature_mean")
    if set(base) != {"feature_mean"} or mean is None or mean.shape != (expected,) or not \
            np.isfinite(mean).all():
        raise ModelFileError(
            f"{model_file(base_path, root)} does not hold the training cohort's mean features; "
            f"expected feature_mean ({expected},), finite.")
    return ClassicModel(kind=kind, models=models, card=card,
                        feature_mean=mean.astype(np.float64), n_regions=r,
                        atlas=_atlas_ref(card["atlas"]), root=root.resolve(),
                        _digest=_version_digest(root.resolve(), card_sha256, digests))
