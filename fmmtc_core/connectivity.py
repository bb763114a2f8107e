"""Functional connectivity (the C modality of FMM-TC) from region time series.

Pearson correlation through nilearn's ``ConnectivityMeasure`` (scikit-learn covariance
estimators: the empirical one, or Ledoit-Wolf shrinkage, which stays well conditioned when
regions (426) outnumber volumes); partial correlation from the same estimators. Stored as Fisher
z (``arctanh r``), whose sampling distribution is close to normal, so averages and differences of
matrices are meaningful; the model may take r.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from fmmtc_core._errors import InvalidInputError, check_option

if TYPE_CHECKING:  # fmmtc_core.preprocess imports this module
    from fmmtc_core.preprocess import RegionSignals

__all__ = ["connectivity", "fisher_z", "inverse_fisher_z", "KINDS"]

KINDS = ("correlation", "partial correlation")
# |r| is clipped below 1 before arctanh so the diagonal and duplicated regions stay finite.
_R_CLIP = 1.0 - 1e-7


def fisher_z(r: np.ndarray) -> np.ndarray:
    """Fisher z-transform ``arctanh(r)`` with r clipped to +-(1 - 1e-7); diagonal set to 0.

    Parameters
    ----------
    r : array-like
        Correlation coefficients; a square (or stack of square) matrix has its diagonal zeroed.

    Returns
    -------
    ndarray of float64
        Fisher z values, same shape as ``r``.
    """
    z = np.arctanh(np.clip(np.asarray(r, dtype=np.float64), -_R_CLIP, _R_CLIP))
    if z.ndim >= 2 and z.shape[-1] == z.shape[-2]:
        idx = np.arange(z.shape[-1])
        z[..., idx, idx] = 0.0
    return z


def inverse_fisher_z(z: np.ndarray) -> np.ndarray:
    """``tanh(z)``, the correlation coefficient of a Fisher z value; diagonal set to 1.

    Parameters
    ----------
    z : array-like
        Fisher z values; a square (or stack of square) matrix has its diagonal set to 1.

    Returns
    -------
    ndarray of float64
        Correlation coefficients, same shape as ``z``.
    """
    r = np.tanh(np.asarray(z, dtype=np.float64))
    if r.ndim >= 2 and r.shape[-1] == r.shape[-2]:
        idx = np.arange(r.shape[-1])
        r[..., idx, idx] = 1.0
    return r


def connectivity(
    signals: RegionSignals | np.ndarray,
    *,
    kind: str = "correlation",
    shrinkage: bool = False,
    fisher: bool = True,
) -> np.ndarray:
    """Region-by-region connectivity matrix of one scan.

    Parameters
    ----------
    signals : RegionSignals or ndarray (T, R)
        Region time series (cleaned ones, normally). Each series is z-scored before the
        covariance is estimated.
    kind : {"correlation", "partial correlation"}, default="correlation"
        Pearson or partial correlation (:data:`KINDS`).
    shrinkage : bool, default=False
        Ledoit-Wolf covariance shrinkage instead of the empirical covariance.
    fisher : bool, default=True
        Return Fisher z (diagonal 0) instead of r (diagonal 1).

    Returns
    -------
    ndarray (R, R) float32
        Symmetric. Regions without signal (NaN or constant series) have 0 connectivity (in z;
        r = 0) with every other region.

    Raises
    ------
    InvalidInputError
        ``kind`` is not one of :data:`KINDS`; the series are not a 2D (time, regions) array;
        they have fewer than 3 time points; or fewer than 2 regions have signal.
    """
    from nilearn.connectome import ConnectivityMeasure
    from sklearn.covariance import EmpiricalCovariance, LedoitWolf

    kind = check_option("kind", kind, KINDS)
    data = getattr(signals, "data", signals)
    x = np.asarray(data, dtype=np.float64)
    if x.ndim != 2:
        raise InvalidInputError(f"Expected a (time, regions) array, got shape {x.shape}.")
    if x.shape[0] < 3:
        raise InvalidInputError(f"Connectivity needs at least 3 time points, got {x.shape[0]}.")
    live = np.asarray(np.isfinite(x).all(axis=0))
    live[live] = x[:, live].std(axis=0) > 0
    if live.sum() < 2:
        raise InvalidInputError("Connectivity needs at least 2 regions with signal.")
    estimator = LedoitWolf(store_precision=False) if shrinkage else EmpiricalCovariance(
        store_precision=False
    )
    measure = ConnectivityMeasure(
        cov_estimator=estimator, kind=kind, standardize="zscore_sample", vectorize=False
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="nilearn")
        warnings.filterwarnings("ignore", category=FutureWarning)
        sub = measure.fit_transform([x[:, live]])[0]
    r = np.zeros((x.shape[1], x.shape[1]))
    r[np.ix_(live, live)] = sub
    np.fill_diagonal(r, 1.0)
    r = (r + r.T) / 2.0  # exact symmetry despite floating-point round-off
    out = fisher_z(r) if fisher else r
    return out.astype(np.float32)
