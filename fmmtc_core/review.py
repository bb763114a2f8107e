"""What a reviewer reads off a checked scan or a screening, as plain tables and arrays: the
dashboard's pages (and anyone else) lay these out; none of them computes.

- a checked scan (:func:`fmmtc_core.qc.assess_scan`): :func:`scan_connectivity`,
  :func:`region_quality`, :func:`complete_regions`, :func:`scan_images` (the voxel maps of the
  image, read while it is on disk: the image itself is never stored);
- a screening summary (:class:`fmmtc_core.summary.ScreeningSummary`): :func:`region_scores`;
- any region table: :func:`top_regions`, :func:`with_anatomy`, :func:`group_attributions`,
  :func:`attribution_nifti`.

Regions are grouped by what the atlas says today (:attr:`fmmtc_core.atlas.Atlas.groups`,
:attr:`~fmmtc_core.atlas.Atlas.sections`), not by the group stored with an older screening,
so a correction of the anatomy reaches every stored screening.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import nibabel as nib

    from fmmtc_core.atlas import Atlas
    from fmmtc_core.io import Scan
    from fmmtc_core.preprocess import RegionSignals
    from fmmtc_core.qc import QCReport
    from fmmtc_core.summary import RegionScore

__all__ = ["scan_connectivity", "region_quality", "complete_regions", "region_scores",
           "top_regions", "with_anatomy", "group_attributions", "ScanImages", "scan_images",
           "attribution_nifti"]


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
        One row per atlas region, in the atlas's order: ``label``, ``region``, ``lobe``,
        ``section`` (only for an atlas with sections, such as HCPEx: the HCP-MMP section or
        subcortical structure), ``hemisphere``, ``voxels`` (NaN for a region table, where it is
        unknown), ``coverage`` (percent of the region's atlas volume on the scan's grid with
        signal), ``tSNR`` (NaN when not measured) and ``covered`` (False for the report's
        uncovered regions).
    """
    atlas = signals.atlas
    n_voxels = np.asarray(signals.n_voxels, dtype=float)
    columns: dict = {"label": atlas.labels, "region": atlas.names, "lobe": atlas.groups}
    if atlas.sections:
        columns["section"] = atlas.sections
    return pd.DataFrame(columns | {
        "hemisphere": atlas.hemispheres,
        "voxels": np.where(n_voxels >= 0, n_voxels, np.nan),
        "coverage": np.round(100.0 * np.clip(np.asarray(signals.coverage, float), 0, 1), 1),
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
        ``region_index``, ``label``, ``name``, ``lobe``, ``network`` (the same lobe, under
        the name older readers know), ``section`` (only for an atlas with sections) and
        ``score`` (logit units; 0 for a region the summary does not list).
    """
    pairs = ((r["label"], r["score"]) if isinstance(r, dict) else (r.label, r.score)
             for r in regions)
    by_label = {int(label): float(score) for label, score in pairs}
    labels = [int(lab) for lab in atlas.labels]
    columns: dict = {
        "region_index": np.arange(len(labels)),
        "label": labels,
        "name": list(atlas.names),
        "lobe": list(atlas.groups),
        "network": list(atlas.groups),
    }
    if atlas.sections:
        columns["section"] = list(atlas.sections)
    return pd.DataFrame(columns | {"score": [by_label.get(lab, 0.0) for lab in labels]})


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


def with_anatomy(table: pd.DataFrame, atlas: Atlas) -> pd.DataFrame:
    """A region table with the atlas's current anatomy in place of a stored ``network`` column.

    Parameters
    ----------
    table : pandas.DataFrame
        Region rows with a ``region_index`` column (the position in ``atlas``), e.g. a stored
        screening's regions (:attr:`fmmtc_core.store.repository.ScreeningRecord.regions`).
    atlas : Atlas
        The atlas of the screening.

    Returns
    -------
    pandas.DataFrame
        A copy without ``network`` and with ``lobe`` (and, for an atlas with sections,
        ``section``) right after ``name`` (or at the end when there is no ``name``).

    Raises
    ------
    InvalidInputError
        ``table`` has no ``region_index`` column or a value outside the atlas.
    """
    from fmmtc_core._errors import InvalidInputError

    if "region_index" not in table:
        raise InvalidInputError("Expected a region table with a 'region_index' column, got "
                                f"columns {list(table.columns)}.")
    idx = table["region_index"].to_numpy()
    if idx.size and (idx.min() < 0 or idx.max() >= atlas.n_regions):
        raise InvalidInputError(
            f"Region index {int(idx.max() if idx.max() >= atlas.n_regions else idx.min())} is "
            f"outside atlas {atlas.name!r} ({atlas.n_regions} regions).")
    out = table.drop(columns=[c for c in ("network", "lobe", "section") if c in table])
    at = list(out.columns).index("name") + 1 if "name" in out else len(out.columns)
    out.insert(at, "lobe", np.asarray(atlas.groups, dtype=object)[idx])
    if atlas.sections:
        out.insert(at + 1, "section", np.asarray(atlas.sections, dtype=object)[idx])
    return out


def group_attributions(table: pd.DataFrame, atlas: Atlas, by: str = "lobe",
                       ) -> dict[str, dict[str, float]]:
    """Region attributions summed per anatomical group (lobe or HCP-MMP section).

    Parameters
    ----------
    table : pandas.DataFrame
        Region rows with ``region_index`` and ``ts``, ``fc`` and ``total`` (logit units; a
        missing column counts as 0), e.g. a stored screening's regions.
    atlas : Atlas
        The atlas of the screening.
    by : {"lobe", "section"}, default="lobe"
        The grouping (:meth:`fmmtc_core.atlas.Atlas.grouping`).

    Returns
    -------
    dict
        Group -> ``{"ts": float, "fc": float, "total": float}``, largest ``|total|`` first
        (the shape of :attr:`fmmtc_core.summary.ScreeningSummary.networks`).

    Raises
    ------
    InvalidInputError
        ``by`` is not a grouping of the atlas, or as :func:`with_anatomy`.
    """
    groups = atlas.grouping(by)
    rows = with_anatomy(table, atlas)
    rows = rows.assign(group=np.asarray(groups, dtype=object)[rows["region_index"].to_numpy()])
    sums = {c: (rows[c].astype(float) if c in rows else pd.Series(0.0, index=rows.index))
            for c in ("ts", "fc", "total")}
    frame = pd.DataFrame(sums).groupby(rows["group"], sort=False).sum()
    frame = frame.iloc[np.argsort(-frame["total"].abs().to_numpy(), kind="stable")]
    return {str(g): {c: float(v) for c, v in r.items()} for g, r in frame.iterrows()}


@dataclass(frozen=True)
class ScanImages:
    """Voxel maps of a 4D scan for a visual check, on the scan's own grid.

    Attributes
    ----------
    mean : nibabel.Nifti1Image
        float32 mean over time of every voxel (data units, scaling applied).
    tsnr : nibabel.Nifti1Image
        float32 temporal SNR (mean / SD over time) of every voxel; 0 where the SD is 0 (outside
        the scan's brain) or a value is not finite.
    labels : nibabel.Nifti1Image
        int16 atlas labels projected onto the same grid (0 = background): the atlas outline.
    """

    mean: nib.Nifti1Image
    tsnr: nib.Nifti1Image
    labels: nib.Nifti1Image


def scan_images(scan: Scan, atlas: Atlas, *, block_bytes: int = 16 * 1024**2) -> ScanImages:
    """The mean image, the tSNR map and the atlas on the grid of a 4D NIfTI scan.

    Reads the voxel data once more (block by block, so memory stays at a few blocks), which
    must therefore still be on disk: call it while an upload is checked. The dashboard never
    stores the image itself, so these maps cannot be drawn later for a stored screening.

    Parameters
    ----------
    scan : Scan
        A loaded NIfTI scan (:func:`fmmtc_core.qc.assess_scan`'s first result).
    atlas : Atlas
        The atlas it was parcellated with (its labels are projected onto the scan's grid).
    block_bytes : int, default=16 MiB
        Size of the blocks read at a time.

    Returns
    -------
    ScanImages

    Raises
    ------
    InvalidInputError
        ``scan`` is a region table (there are no voxels to show).
    """
    import nibabel as nib

    from fmmtc_core._errors import InvalidInputError

    if scan.kind != "nifti" or scan.spatial_shape is None or scan.affine is None:
        raise InvalidInputError(
            f"{scan.path.name} is a region table: there is no image to draw a mean or tSNR map "
            "from; expected a 4D NIfTI scan.")
    n = scan.n_voxels
    s1 = np.zeros(n)
    s2 = np.zeros(n)
    count = np.zeros(n)
    ref: np.ndarray | None = None
    for _, block in scan.iter_blocks(block_bytes):
        values = np.asarray(block, dtype=np.float32)
        if ref is None:  # sums of differences to the first volume: no cancellation in s2
            ref = np.where(np.isfinite(values[0]), values[0], 0.0).astype(np.float32)
        d = values - ref
        ok = np.isfinite(d)
        d = np.where(ok, d, 0.0)
        s1 += d.sum(axis=0, dtype=np.float64)
        s2 += np.square(d).sum(axis=0, dtype=np.float64)
        count += ok.sum(axis=0)
    assert ref is not None  # a scan has at least one volume
    slope, inter = scan.scale
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_d = s1 / np.maximum(count, 1)
        sd = np.sqrt(np.maximum(s2 / np.maximum(count, 1) - mean_d**2, 0.0)) * abs(slope)
        mean = (ref + mean_d) * slope + inter
        tsnr = np.where((sd > 1e-6 * np.maximum(np.abs(mean), 1e-12)) & (count == scan.n_volumes),
                        mean / np.where(sd > 0, sd, 1.0), 0.0)
    shape = scan.spatial_shape
    affine = np.asarray(scan.affine, dtype=np.float64)

    def image(flat: np.ndarray, dtype) -> nib.Nifti1Image:
        img = nib.Nifti1Image(np.nan_to_num(flat).reshape(shape, order="F").astype(dtype),
                              affine)
        img.header.set_xyzt_units("mm")
        return img

    grid = atlas.on_grid(shape, affine)
    labels = nib.Nifti1Image(np.asarray(grid.labels_data, dtype=np.int16), affine)
    return ScanImages(mean=image(mean, np.float32), tsnr=image(tsnr, np.float32), labels=labels)


def attribution_nifti(atlas: Atlas, scores: Iterable[float], *,
                      description: str = "FMM-TC region attribution (logit units)") -> bytes:
    """A map of region attributions as a gzipped NIfTI file, for FSLeyes, MRIcroGL or nilearn.

    Every voxel of a region carries the region's score, on the atlas's grid (2 mm MNI for the
    bundled atlases); background is 0.

    Parameters
    ----------
    atlas : Atlas
        The atlas of the screening.
    scores : iterable of float
        One score per region in the atlas's order (e.g. a stored screening's ``total``
        column; logit units, + towards responder).
    description : str, default="FMM-TC region attribution (logit units)"
        Written to the header's ``descrip`` field (at most 79 characters are kept).

    Returns
    -------
    bytes
        A ``.nii.gz`` file: float32, the atlas's affine, intent "estimate", spatial units mm.

    Raises
    ------
    InvalidInputError
        The number of scores is not the atlas's number of regions.
    """
    import gzip

    from fmmtc_core.explain import region_map

    img = region_map(atlas, np.asarray(list(scores), dtype=np.float32))
    img.header.set_intent("estimate")
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
