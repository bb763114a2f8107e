"""What a reviewer reads off a checked scan or a screening, as plain tables and arrays: the
dashboard's pages (and anyone else) lay these out; none of them computes.

- a checked scan (:func:`fmmtc_core.qc.assess_scan`): :func:`scan_connectivity`,
  :func:`region_quality`, :func:`complete_regions`;
- a screening summary (:class:`fmmtc_core.summary.ScreeningSummary`): :func:`region_scores`;
- any region table: :func:`top_regions`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from fmmtc_core.atlas import Atlas
    from fmmtc_core.preprocess import RegionSignals
    from fmmtc_core.qc import QCReport
    from fmmtc_core.summary import RegionScore

__all__ = ["scan_connectivity", "region_quality", "complete_regions", "region_scores",
           "top_regions"]


def scan_connectivity(signals: RegionSignals) -> np.ndarray:
    """Connectivity of a scan as the model would see it: Pearson correlation of the cleaned
    region series (:func:`fmmtc_core.preprocess.clean` with its defaults), as Fisher z.

    Parameters
    ----------
    signals : RegionSignals
        Uncleaned region means, as :func:`fmmtc_core.qc.assess_scan` returns them.

    Returns
    -------
    ndarray (R, R) float32
        Fisher z, diagonal 0, in the atlas's region order.

    Raises
    ------
    InvalidInputError
        Cleaning or the connectivity estimate refuses the series (see
        :func:`fmmtc_core.preprocess.clean` and :func:`fmmtc_core.connectivity.connectivity`).
    """
    from fmmtc_core.connectivity import connectivity
    from fmmtc_core.preprocess import clean

    return connectivity(clean(signals))


def region_quality(signals: RegionSignals, report: QCReport) -> pd.DataFrame:
    """The quality of every atlas region of a checked scan, as a table.

    Parameters
    ----------
    signals : RegionSignals
        The scan's region signals (their atlas and voxel counts are read).
    report : QCReport
        Of the same scan (:func:`fmmtc_core.qc.qc_report`).

    Returns
    -------
    pandas.DataFrame
        One row per atlas region, in the atlas's order: ``label``, ``region``, ``group``,
        ``hemisphere``, ``voxels`` (NaN for a region table, where it is unknown), ``tSNR`` (NaN
        when not measured) and ``covered`` (False for the report's uncovered regions).
    """
    atlas = signals.atlas
    n_voxels = np.asarray(signals.n_voxels, dtype=float)
    return pd.DataFrame({
        "label": atlas.labels,
        "region": atlas.names,
        "group": atlas.groups,
        "hemisphere": atlas.hemispheres,
        "voxels": np.where(n_voxels >= 0, n_voxels, np.nan),
        "tSNR": report.tsnr_regions if report.tsnr_regions is not None else np.nan,
        "covered": ~np.isin(atlas.names, report.uncovered_regions),
    })


def complete_regions(signals: RegionSignals, n: int | None = None) -> np.ndarray:
    """Indices of the regions whose series has a value at every volume: the ones worth plotting.

    Parameters
    ----------
    signals : RegionSignals
        Region signals of a scan.
    n : int or None, default=None
        Most indices returned (the first ones); None returns all.

    Returns
    -------
    ndarray of int
        Region indices (columns of ``signals.data``), in the atlas's order.
    """
    ok = np.flatnonzero(np.isfinite(signals.data).all(axis=0))
    return ok if n is None else ok[:n]


def region_scores(regions: Iterable[RegionScore | dict], atlas: Atlas) -> pd.DataFrame:
    """A screening's region attributions, one row per atlas region in the atlas's order.

    Parameters
    ----------
    regions : iterable of RegionScore or dict
        ``ScreeningSummary.regions`` of a screening (or dicts with ``label`` and ``score``, as
        in its JSON form), any order.
    atlas : Atlas
        The atlas the screening's model uses.

    Returns
    -------
    pandas.DataFrame
        ``region_index``, ``label``, ``name``, ``network`` (the atlas's region group) and
        ``score`` (logit units; 0 for a region the summary does not list).
    """
    pairs = ((r["label"], r["score"]) if isinstance(r, dict) else (r.label, r.score)
             for r in regions)
    by_label = {int(label): float(score) for label, score in pairs}
    labels = [int(lab) for lab in atlas.labels]
    return pd.DataFrame({
        "region_index": np.arange(len(labels)),
        "label": labels,
        "name": list(atlas.names),
        "network": list(atlas.groups),
        "score": [by_label.get(lab, 0.0) for lab in labels],
    })


def top_regions(table: pd.DataFrame, column: str = "score", n: int = 15) -> pd.DataFrame:
    """The ``n`` rows of ``table`` with the largest absolute ``column``, largest first.

    Parameters
    ----------
    table : pandas.DataFrame
        Any region table (e.g. :func:`region_scores` or
        :func:`fmmtc_core.store.repository.region_frame`).
    column : str, default="score"
        The numeric column to rank by absolute value.
    n : int, default=15
        Rows kept.

    Returns
    -------
    pandas.DataFrame
        At most ``n`` rows of ``table`` with their index, largest ``|column|`` first (ties keep
        the table's order).
    """
    order = table[column].abs().sort_values(ascending=False, kind="stable").index
    return table.loc[order].head(n)
