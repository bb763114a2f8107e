"""Quality control of a scan before prediction: metrics, a pass / warn / fail verdict, reasons.

A scan that fails hard QC is not predicted. The thresholds are conventional rs-fMRI ones (Power
et al. 2012 for framewise displacement and scrubbing, mean FD > 0.5 mm a usual exclusion
criterion; whole-brain tSNR in the tens for 2-3 mm MNI-space BOLD) and are all settable through
:class:`QCThresholds`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from fmmtc_core._docs import fill_doc
from fmmtc_core.config import FD_MEAN_FAIL_MM, FD_THRESHOLD_MM, STD_DVARS_THRESHOLD
from fmmtc_core.io import Scan, space_unknown_message
from fmmtc_core.pipeline import load_and_clean, volume_progress
from fmmtc_core.preprocess import RegionSignals, parcellate

if TYPE_CHECKING:
    import pandas as pd

    from fmmtc_core.atlas import Atlas

__all__ = ["QCThresholds", "QCReport", "qc_report", "assess_scan"]


@dataclass(frozen=True)
class QCThresholds:
    """Limits of the QC verdict (fail is checked before warn).

    Attributes
    ----------
    min_region_voxels : int
        A region with fewer voxels on the scan grid counts as not covered.
    uncovered_warn, uncovered_fail : float
        Fraction of atlas regions not covered (too few voxels, or no signal).
    fd_mean_warn, fd_mean_fail : float
        Mean framewise displacement, mm.
    fd_threshold, std_dvars_threshold : float
        A volume is high-motion when FD (mm) or standardised DVARS exceeds these (the scrubbing
        criterion).
    scrubbed_warn, scrubbed_fail : float
        Fraction of high-motion volumes.
    tsnr_warn, tsnr_fail : float
        Median voxel temporal SNR inside the atlas.
    tr_typical : tuple of float
        TR outside this range (s) is a warning.
    """

    min_region_voxels: int = 5
    uncovered_warn: float = 0.05
    uncovered_fail: float = 0.25
    fd_mean_warn: float = 0.25
    fd_mean_fail: float = FD_MEAN_FAIL_MM
    fd_threshold: float = FD_THRESHOLD_MM
    std_dvars_threshold: float = STD_DVARS_THRESHOLD
    scrubbed_warn: float = 0.2
    scrubbed_fail: float = 0.5
    tsnr_warn: float = 30.0
    tsnr_fail: float = 10.0
    tr_typical: tuple[float, float] = (0.4, 3.5)


@dataclass(eq=False)
class QCReport:
    """QC metrics and verdict of one scan (see :func:`qc_report`).

    A metric that could not be measured (no confounds table, a region table without voxels) is
    None.

    Attributes
    ----------
    verdict : {"pass", "warn", "fail"}
        "fail" when any fail limit is crossed; "warn" when a warn limit is crossed, head motion
        is unknown (no confounds, or none with FD or std DVARS) or the input raised a warning;
        else "pass".
    reasons : list of str
        Why: every crossed fail limit, then every crossed warn limit, one sentence each.
    n_volumes : int
    tr : float
        Repetition time, seconds.
    duration_s : float
        ``n_volumes * tr``, seconds.
    atlas : str
        Name of the atlas of the parcellation.
    n_regions : int
        Regions of that atlas.
    uncovered_regions : list of str
        Names of the regions with too few voxels on the scan grid, or no signal.
    tsnr_median : float or None, default=None
        Median voxel temporal SNR inside the atlas (NIfTI only; NaN when no voxel has signal).
    tsnr_regions : ndarray (R,) or None, default=None
        Mean voxel tSNR per region (NIfTI only).
    fd_mean, fd_max : float or None, default=None
        Mean and largest framewise displacement, mm (needs the confounds'
        ``framewise_displacement``).
    fd : ndarray (T,) or None, default=None
        Framewise displacement per volume, mm.
    dvars : ndarray (T,) or None, default=None
        DVARS per volume, percent of the mean signal (NIfTI only; first value 0).
    std_dvars_mean : float or None, default=None
        Mean standardised DVARS (needs the confounds' ``std_dvars``).
    frac_high_motion : float or None, default=None
        Fraction of volumes over the FD or standardised-DVARS limit (would be scrubbed).
    carpet : ndarray (n, T) or None, default=None
        Region-ordered sample of z-scored voxel series (NIfTI only).
    carpet_regions : ndarray (n,) or None, default=None
        Region position of each carpet row.
    warnings : list of str, default=[]
        Recoverable oddities of the input not already among ``reasons``.
    notes : list of str, default=[]
        Informational facts about processing (e.g. the atlas was resampled).
    thresholds : QCThresholds, default=QCThresholds()
        The limits the verdict was decided with.
    """

    verdict: str
    reasons: list[str]
    n_volumes: int
    tr: float
    duration_s: float
    atlas: str
    n_regions: int
    uncovered_regions: list[str]
    tsnr_median: float | None = None
    tsnr_regions: np.ndarray | None = None
    fd_mean: float | None = None
    fd_max: float | None = None
    fd: np.ndarray | None = None
    dvars: np.ndarray | None = None
    std_dvars_mean: float | None = None
    frac_high_motion: float | None = None
    carpet: np.ndarray | None = None
    carpet_regions: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    thresholds: QCThresholds = field(default_factory=QCThresholds)

    @property
    def passed(self) -> bool:
        """True unless the verdict is "fail"."""
        return self.verdict != "fail"

    @property
    def motion_known(self) -> bool:
        """True when head motion was measured (FD or standardised DVARS from the confounds);
        unknown motion is a warning reason, never a pass."""
        return self.fd_mean is not None or self.frac_high_motion is not None

    def to_dict(self, *, series: bool = False) -> dict:
        """JSON-friendly summary of the report (numbers rounded to 6 decimals, NaN -> None).

        Parameters
        ----------
        series : bool, default=False
            Also include the per-volume series: ``fd_mm``, ``dvars_pct`` and ``carpet``
            (rounded to 3 decimals); each None when not measured.

        Returns
        -------
        dict
            ``verdict``, ``reasons``, ``warnings``, ``notes``, ``n_volumes``, ``tr_s``,
            ``duration_s``, ``atlas``, ``n_regions``, ``n_uncovered_regions``,
            ``uncovered_regions``, ``tsnr_median``, ``tsnr_region_median`` (median of the
            regions' tSNR), ``fd_mean_mm``, ``fd_max_mm``, ``std_dvars_mean``,
            ``frac_high_motion``, ``motion_known`` (:attr:`motion_known`) and ``thresholds``
            (a dict of :class:`QCThresholds`).
        """

        def num(v):
            if v is None:
                return None
            v = float(v)
            return None if not math.isfinite(v) else round(v, 6)

        out = {
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "n_volumes": self.n_volumes,
            "tr_s": num(self.tr),
            "duration_s": num(self.duration_s),
            "atlas": self.atlas,
            "n_regions": self.n_regions,
            "n_uncovered_regions": len(self.uncovered_regions),
            "uncovered_regions": list(self.uncovered_regions),
            "tsnr_median": num(self.tsnr_median),
            "tsnr_region_median": num(np.nanmedian(self.tsnr_regions))
            if self.tsnr_regions is not None and np.isfinite(self.tsnr_regions).any()
            else None,
            "fd_mean_mm": num(self.fd_mean),
            "fd_max_mm": num(self.fd_max),
            "std_dvars_mean": num(self.std_dvars_mean),
            "frac_high_motion": num(self.frac_high_motion),
            "motion_known": self.motion_known,
            "thresholds": asdict(self.thresholds),
        }
        if series:
            out["fd_mm"] = None if self.fd is None else [num(v) for v in self.fd]
            out["dvars_pct"] = None if self.dvars is None else [num(v) for v in self.dvars]
            out["carpet"] = None if self.carpet is None else np.round(self.carpet, 3).tolist()
        return out


def qc_report(
    scan: Scan,
    signals: RegionSignals | None = None,
    *,
    atlas: str | Atlas | None = None,
    thresholds: QCThresholds | None = None,
) -> QCReport:
    """Compute the QC report of a scan.

    Parameters
    ----------
    scan : Scan
        The loaded scan (:func:`fmmtc_core.io.load_scan`); its confounds give FD and DVARS.
    signals : RegionSignals or None, default=None
        The scan's uncleaned parcellation, when already computed (it carries the voxel
        statistics); computed here otherwise.
    atlas : str, Atlas or None, default=None
        Atlas for the parcellation when ``signals`` is None (a bundled atlas's name or a label
        image's path; see :func:`fmmtc_core.preprocess.parcellate`). Ignored otherwise.
    thresholds : QCThresholds or None, default=None
        QC limits; None uses the defaults.

    Returns
    -------
    QCReport
    """
    th = thresholds or QCThresholds()
    if signals is None:
        signals = parcellate(scan, atlas)
    fails: list[str] = []
    warns: list[str] = []
    atlas_obj = signals.atlas

    # Coverage: too few voxels on this grid, or no signal in them.
    if signals.voxel_stats is not None:
        uncovered = (signals.n_voxels < th.min_region_voxels) | (signals.coverage <= 0)
    else:
        uncovered = signals.coverage <= 0
    names = [atlas_obj.names[i] for i in np.flatnonzero(uncovered)]
    frac_unc = len(names) / atlas_obj.n_regions
    if frac_unc > th.uncovered_fail:
        fails.append(
            f"{len(names)} of {atlas_obj.n_regions} atlas regions ({frac_unc:.0%}) have no or too "
            f"few voxels with signal (limit {th.uncovered_fail:.0%}): the field of view or brain "
            "mask misses much of the brain."
        )
    elif frac_unc > th.uncovered_warn:
        warns.append(
            f"{len(names)} atlas regions ({frac_unc:.0%}) are not covered; they carry no "
            "information for the model."
        )

    tsnr = tsnr_regions = carpet = carpet_regions = dvars = None
    if signals.voxel_stats is not None:
        vs = signals.voxel_stats
        tsnr, tsnr_regions, dvars = vs.tsnr_voxels_median, vs.tsnr_regions, vs.dvars
        carpet, carpet_regions = vs.carpet, vs.carpet_regions
        if math.isfinite(tsnr):
            if tsnr < th.tsnr_fail:
                fails.append(f"Median tSNR is {tsnr:.1f} (minimum {th.tsnr_fail:g}).")
            elif tsnr < th.tsnr_warn:
                warns.append(f"Median tSNR is low: {tsnr:.1f} (below {th.tsnr_warn:g}).")

    fd = fd_mean = fd_max = std_dvars_mean = frac_hm = None
    conf = scan.confounds
    if conf is not None:
        high = np.zeros(scan.n_volumes, dtype=bool)
        if "framewise_displacement" in conf:
            fd = conf["framewise_displacement"].to_numpy(dtype=np.float64)
            fd_mean, fd_max = float(np.nanmean(fd)), float(np.nanmax(fd))
            high |= np.nan_to_num(fd) > th.fd_threshold
            if fd_mean > th.fd_mean_fail:
                fails.append(
                    f"Mean framewise displacement is {fd_mean:.2f} mm (limit {th.fd_mean_fail:g} mm)."
                )
            elif fd_mean > th.fd_mean_warn:
                warns.append(f"Mean framewise displacement is elevated: {fd_mean:.2f} mm.")
        if "std_dvars" in conf:
            sd = conf["std_dvars"].to_numpy(dtype=np.float64)
            std_dvars_mean = float(np.nanmean(sd))
            high |= np.nan_to_num(sd) > th.std_dvars_threshold
        if fd is None and std_dvars_mean is None:
            warns.append(
                "Head motion is unknown: the confounds file has no framewise_displacement or "
                "std_dvars column, so motion could not be measured. Motion can bias "
                "connectivity; use fMRIPrep's desc-confounds_timeseries.tsv of this run.")
        else:
            frac_hm = float(high.mean())
            if frac_hm > th.scrubbed_fail:
                fails.append(
                    f"{frac_hm:.0%} of volumes are high-motion (FD > {th.fd_threshold:g} mm or "
                    f"std DVARS > {th.std_dvars_threshold:g}); limit {th.scrubbed_fail:.0%}."
                )
            elif frac_hm > th.scrubbed_warn:
                warns.append(f"{frac_hm:.0%} of volumes are high-motion and would be scrubbed.")
    else:
        # Unknown is not clean: without FD a moving participant would 'pass'.
        warns.append(
            "Head motion is unknown: no fMRIPrep confounds file was given, so framewise "
            "displacement (FD) could not be measured. Motion can bias connectivity; upload the "
            "scan's desc-confounds_timeseries.tsv to check it.")
    lo, hi = th.tr_typical
    if not lo <= scan.tr <= hi:
        warns.append(f"TR {scan.tr:g} s is outside the usual {lo:g}-{hi:g} s.")
    if scan.kind == "nifti" and not scan.space_known:
        # A reason, not only an input warning: the stored screening keeps the reasons.
        warns.append(space_unknown_message(scan.path))
    # Input warnings promoted to reasons above are not listed twice.
    input_warnings = [w for w in dict.fromkeys(signals.warnings) if w not in warns]
    verdict = "fail" if fails else ("warn" if warns or input_warnings else "pass")
    return QCReport(
        verdict=verdict,
        reasons=fails + warns,
        n_volumes=scan.n_volumes,
        tr=scan.tr,
        duration_s=scan.n_volumes * scan.tr,
        atlas=atlas_obj.name,
        n_regions=atlas_obj.n_regions,
        uncovered_regions=names,
        tsnr_median=tsnr,
        tsnr_regions=tsnr_regions,
        fd_mean=fd_mean,
        fd_max=fd_max,
        fd=fd,
        dvars=dvars,
        std_dvars_mean=std_dvars_mean,
        frac_high_motion=frac_hm,
        carpet=carpet,
        carpet_regions=carpet_regions,
        warnings=input_warnings,
        notes=list(signals.notes),
        thresholds=th,
    )


@fill_doc
def assess_scan(
    path: str | os.PathLike,
    *,
    sidecar: str | os.PathLike | dict | None = None,
    confounds: str | os.PathLike | pd.DataFrame | None = None,
    atlas: str | Atlas | None = None,
    min_volumes: int | None = None,
    thresholds: QCThresholds | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Scan, RegionSignals, QCReport]:
    """Load, validate, parcellate and quality-control a scan file in one call.

    The first stages of :func:`fmmtc_core.pipeline.load_and_clean`, without cleaning.

    Parameters
    ----------
    path : str or path
        4D NIfTI or region time-series table (see :func:`fmmtc_core.io.load_scan`).
    %(sidecar)s
    %(confounds)s
    atlas : str, Atlas or None, default=None
        Atlas that parcellates a NIfTI (None: ``"hcpex"``) and that a region table must follow
        (None: the one the table names); see :func:`fmmtc_core.pipeline.load_and_clean`.
    min_volumes : int or None, default=None
        Fewest volumes accepted; None: :func:`fmmtc_core.io.load_scan`'s default (50).
    thresholds : QCThresholds or None, default=None
        QC limits; None uses the defaults.
    %(progress_volumes)s

    Returns
    -------
    scan : Scan
        The loaded, validated scan.
    signals : RegionSignals
        Its uncleaned region means (with the voxel statistics of a NIfTI).
    report : QCReport
        Its QC report.

    Raises
    ------
    InvalidInputError
        For every kind of bad input (see :func:`fmmtc_core.io.load_scan`).
    """
    prep = load_and_clean(path, atlas, sidecar=sidecar, confounds=confounds,
                          min_volumes=min_volumes, qc=partial(qc_report, thresholds=thresholds),
                          cleaning=None, progress=volume_progress(progress))
    assert prep.qc is not None  # a QC function was given
    return prep.scan, prep.raw, prep.qc
