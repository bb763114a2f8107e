"""From a scan file to cleaned region signals: load + validate -> parcellate -> QC -> clean.

:func:`load_and_clean` is the one way a scan becomes region signals: screening
(:func:`fmmtc_core.screening.analyse`), the scan-quality check
(:func:`fmmtc_core.qc.assess_scan`) and training (:func:`prepare_cohort`) all go through it, each
stopping where it needs to. It reports progress through one callback,
``progress(stage, done, total, info)`` (stages ``validate``, ``parcellate``, ``qc``, ``clean``),
and returns the seconds each stage took.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmmtc_core._errors import InvalidInputError, QCFailedError
from fmmtc_core.atlas import Atlas, load_atlas
from fmmtc_core.bids import Cohort
from fmmtc_core.io import Scan, load_scan
from fmmtc_core.preprocess import CleaningSettings, RegionSignals, clean, parcellate

if TYPE_CHECKING:  # fmmtc_core.qc imports this module
    import pandas as pd

    from fmmtc_core.qc import QCReport

__all__ = ["Prepared", "load_and_clean", "prepare_cohort", "volume_progress", "MAX_ABS_VALUE"]

Progress = Callable[[str, int, int, dict], None] | None

#: Largest magnitude a region value may have: float32's range with room for the arithmetic of
#: cleaning (sums of squares over a few thousand volumes). BOLD values are O(1e4).
MAX_ABS_VALUE = 1e15


@dataclass(eq=False)
class Prepared:
    """What :func:`load_and_clean` computed for one scan.

    Attributes
    ----------
    scan : Scan
        The loaded, validated scan.
    raw : RegionSignals
        Its uncleaned parcellation (with the voxel statistics QC reads).
    qc : QCReport or None
        What the ``qc`` function returned; None when none was given.
    signals : RegionSignals or None
        The cleaned region signals; None when cleaning was not asked for.
    stage_seconds : dict
        Seconds per stage run: ``load``, ``parcellate``, ``qc``, ``clean``.
    """

    scan: Scan
    raw: RegionSignals
    qc: QCReport | None = None
    signals: RegionSignals | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


def load_and_clean(
    source: str | os.PathLike,
    atlas: str | Atlas | None,
    *,
    sidecar: str | os.PathLike | dict | None = None,
    confounds: str | os.PathLike | pd.DataFrame | None = None,
    min_volumes: int | None = None,
    qc: Callable[[Scan, RegionSignals], QCReport] | None = None,
    cleaning: CleaningSettings | None = CleaningSettings(),
    progress: Progress = None,
) -> Prepared:
    """Load and validate a scan, parcellate it, quality-control it and clean it.

    Parameters
    ----------
    source : path
        4D NIfTI or region time-series table (see :func:`fmmtc_core.io.load_scan`).
    atlas : str, Atlas or None
        Atlas that parcellates a NIfTI (None: ``"hcpex"``) and that a region table must follow
        (None: the one the table names).
    sidecar : path, dict or None, default=None
        BIDS JSON sidecar (see :func:`fmmtc_core.io.load_scan`); None: looked up beside the
        scan.
    confounds : path, DataFrame or None, default=None
        fMRIPrep confounds of the same run (see :func:`fmmtc_core.io.load_scan`).
    min_volumes : int or None, default=None
        Fewest volumes accepted; None: :func:`~fmmtc_core.io.load_scan`'s default.
    qc : callable(scan, raw signals) -> QCReport, or None, default=None
        The quality check to run on the uncleaned parcellation
        (e.g. ``functools.partial(fmmtc_core.qc.qc_report, thresholds=...)``); None runs none.
    cleaning : CleaningSettings or None, default=CleaningSettings()
        How to clean (the arguments of :func:`~fmmtc_core.preprocess.clean`); None stops after
        QC. Before cleaning, a scan whose QC failed is refused and region values that are
        infinite or out of range are refused (as read, and again once cleaned).
    progress : callable(stage, done, total, info) or None, default=None
        Each stage is announced before its work (``done`` 0) and reported done:
        ``validate`` 0/1 and 1/1; ``parcellate`` 0/1, then per block of volumes read (once,
        1/1 with ``{"table": True}``, for a region table); ``qc`` 0/1 and 1/1 with
        ``{"verdict": ...}``; ``clean`` 0/1 and 1/1.

    Returns
    -------
    Prepared

    Raises
    ------
    InvalidInputError
        Bad input of any kind (see :func:`fmmtc_core.io.load_scan` and
        :func:`fmmtc_core.preprocess.parcellate`); :class:`~fmmtc_core._errors.QCFailedError`
        when the scan failed QC and cleaning was asked for.
    """
    def report(stage, done=1, total=1, info=None):
        if progress:
            progress(stage, done, total, info or {})

    atlas = None if atlas is None else load_atlas(atlas)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    report("validate", 0, 1)
    kwargs = {} if min_volumes is None else {"min_volumes": min_volumes}
    scan = load_scan(source, sidecar=sidecar, confounds=confounds, atlas=atlas, **kwargs)
    t1 = time.perf_counter()
    times["load"] = t1 - t0
    report("validate", 1, 1)

    parcellated = []

    def parc_progress(done, total):
        parcellated.append(done)
        report("parcellate", done, total)

    # A table is already parcellated, in the atlas load_scan checked it against.
    report("parcellate", 0, 1)  # announced: the first block of a large file takes a while
    raw = parcellate(scan, None if scan.kind == "table" else atlas, progress=parc_progress)
    if not parcellated:
        report("parcellate", 1, 1, {"table": True})
    t2 = time.perf_counter()
    times["parcellate"] = t2 - t1
    out = Prepared(scan=scan, raw=raw, stage_seconds=times)
    if qc is not None:
        report("qc", 0, 1)
        out.qc = qc(scan, raw)
        times["qc"] = time.perf_counter() - t2
        report("qc", 1, 1, {"verdict": out.qc.verdict})
    if cleaning is None:
        return out
    t3 = time.perf_counter()
    if out.qc is not None and not out.qc.passed:
        raise QCFailedError("The scan failed quality control and was not screened: "
                            + "; ".join(out.qc.reasons), out.qc)
    _check_signal_values(raw.data, scan, "as read", allow_nan=True)
    report("clean", 0, 1)
    out.signals = clean(raw, **asdict(cleaning))
    _check_signal_values(out.signals.data, scan, "after cleaning", allow_nan=False)
    times["clean"] = time.perf_counter() - t3
    report("clean")
    return out


def prepare_cohort(
    cohort: Cohort,
    atlas: str | Atlas,
    progress: Progress = None,
    *,
    cleaning: CleaningSettings = CleaningSettings(),
) -> list[RegionSignals]:
    """:func:`load_and_clean` for every participant of a cohort (no QC), in order.

    Parameters
    ----------
    cohort : Cohort
        From :func:`fmmtc_core.bids.read_cohort`.
    atlas : str or Atlas
        Atlas of the model to train or evaluate.
    progress : callable(stage, done, total, info) or None, default=None
        ``("prepare", i, n, {})`` after each participant.
    cleaning : CleaningSettings, default=CleaningSettings()
        How to clean (the arguments of :func:`~fmmtc_core.preprocess.clean`).

    Returns
    -------
    list of RegionSignals
        Cleaned region signals, one per participant, without the voxel statistics and
        confounds table (a cohort's worth of carpet plots would not fit in memory).

    Raises
    ------
    InvalidInputError
        A participant's scan or confounds cannot be used (see :func:`load_and_clean`).
    """
    out: list[RegionSignals] = []
    n = len(cohort.participants)
    for i, row in enumerate(cohort.participants.itertuples()):
        prep = load_and_clean(row.scan, atlas, confounds=row.confounds, cleaning=cleaning)
        assert prep.signals is not None  # cleaning was asked for
        out.append(replace(prep.signals, voxel_stats=None, confounds=None))
        if progress:
            progress("prepare", i + 1, n, {})
    return out


def volume_progress(callback: Callable[[int, int], None] | None) -> Progress:
    """Adapt a volume counter to :func:`load_and_clean`'s progress callback.

    Parameters
    ----------
    callback : callable(done_volumes, total_volumes) or None
        Called with the volumes read so far while a NIfTI is parcellated (never for a region
        table, nor for the other stages).

    Returns
    -------
    callable(stage, done, total, info) or None
        The stage callback to pass as ``progress``; None when ``callback`` is None.
    """
    if callback is None:
        return None

    def stages(stage: str, done: int, total: int, info: dict) -> None:
        if stage == "parcellate" and not info.get("table"):
            callback(done, total)

    return stages


def scan_name(scan: Scan) -> str:
    """The scan's file name, quoted, for messages.

    Parameters
    ----------
    scan : Scan
        A loaded scan (any object with a ``path`` attribute, or without one).

    Returns
    -------
    str
        ``repr`` of the file name (e.g. ``"'sub-01_bold.nii.gz'"``); ``"The scan"`` when the
        scan has no path.
    """
    path = getattr(scan, "path", None)
    return repr(Path(path).name) if path is not None else "The scan"


def _check_signal_values(data: np.ndarray, scan: Scan, when: str, *, allow_nan: bool) -> None:
    """Refuse region values that are infinite or so large that a later stage (cleaning, float32
    storage) would overflow, and (``allow_nan=False``) NaN in part of a region's series. A region
    that is NaN throughout (no voxels, no values in a table) is allowed: QC reports it as
    uncovered. Cleaning drops a region with missing values in part of its series."""
    data = np.asarray(data)
    whole_nan = np.isnan(data).all(axis=0)
    live = data[:, ~whole_nan]
    if live.size == 0:
        return
    with np.errstate(invalid="ignore"):
        bad = np.isinf(live) | (np.abs(live) > MAX_ABS_VALUE)
        if not allow_nan:
            bad |= np.isnan(live)
    if bad.any():
        n_regions = int(bad.any(axis=0).sum())
        raise InvalidInputError(
            f"{scan_name(scan)} holds non-finite or out-of-range values {when} "
            f"({int(bad.sum())} value(s) in {n_regions} region(s); expected finite values below "
            f"{MAX_ABS_VALUE:.0e} in magnitude). Check the file's units and contents; nothing "
            "was stored.")
