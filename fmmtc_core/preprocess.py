"""Parcellate a scan into region time series, clean them, and prepare the model's inputs.

The parcellation fast path reads the 4D image once, block by block (see
:meth:`fmmtc_core.io.Scan.iter_blocks`), gathers the voxels of the atlas in region order and sums
them with one ``np.add.reduceat`` per block. It equals nilearn's ``NiftiLabelsMasker`` (mean
strategy, ``resampling_target="data"``) and, in the same pass, collects what QC needs from the
voxels (temporal mean and variance per voxel, DVARS, a carpet-plot sample). Memory stays at one
block of the file plus a few vectors the size of the atlas, whatever the number of volumes.

Cleaning uses nilearn's signal tools (``nilearn.signal.clean``, fMRIPrep confounds through
``load_confounds_strategy``): we do not reimplement filtering or regression.

:func:`prepare` turns cleaned region signals into the model's inputs (window and connectivity);
training, evaluation, screening and explanation all take their inputs from it, and
:func:`preprocessing_card` describes it, with the cleaning settings, in a model card.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from fmmtc_core._errors import FMMTCWarning, InvalidInputError, check_option
from fmmtc_core.atlas import Atlas, load_atlas
from fmmtc_core.config import BAND_PASS_HZ, FD_THRESHOLD_MM, STD_DVARS_THRESHOLD
from fmmtc_core.connectivity import connectivity
from fmmtc_core.io import Scan

if TYPE_CHECKING:  # torch loads only when an encoder is used
    from fmmtc_core.models.encoder_base import FoundationEncoder, WindowPlan

__all__ = [
    "RegionSignals",
    "VoxelStats",
    "CleaningSettings",
    "ModelInputs",
    "parcellate",
    "clean",
    "make_window",
    "robust_scale",
    "prepare",
    "relative_amplitude",
    "regional_dynamics",
    "DYNAMICS_ROWS",
    "preprocessing_card",
    "windows_gram",
    "MIN_ATLAS_OVERLAP",
    "CONFOUND_STRATEGIES",
]

#: Smallest median fraction of the atlas regions' volume the scan's field of view must cover;
#: below it the scan is taken not to be in MNI space.
MIN_ATLAS_OVERLAP = 0.5
#: Denoising presets of nilearn's ``load_confounds_strategy`` we expose.
CONFOUND_STRATEGIES = ("simple", "scrubbing", "compcor")
# Voxels kept for the carpet plot (a stratified sample, in region order).
_CARPET_VOXELS = 1200


@dataclass(eq=False)
class VoxelStats:
    """Voxel-level facts gathered during parcellation (used by QC).

    Built by :func:`parcellate`; each field is also an attribute of the same name.

    Parameters
    ----------
    tsnr_voxels_median : float
        Median temporal SNR (mean / SD over time) over the atlas voxels.
    tsnr_regions : ndarray (R,)
        Mean voxel tSNR per region (NaN for a region without voxels).
    dvars : ndarray (T,)
        Root-mean-square over atlas voxels of the volume-to-volume change, in percent of the
        mean signal (first value 0).
    carpet : ndarray (n, T) float32
        A region-ordered sample of atlas voxels, each z-scored over time.
    carpet_regions : ndarray (n,) int
        Region position of each carpet row.
    n_atlas_voxels : int
        Atlas voxels on the scan grid.
    n_nan_voxels : int
        Atlas voxels with a non-finite value at some volume (left out of the means there).
    n_flat_voxels : int
        Atlas voxels constant over time (e.g. outside the brain mask of the scan).
    """

    tsnr_voxels_median: float
    tsnr_regions: np.ndarray
    dvars: np.ndarray
    carpet: np.ndarray
    carpet_regions: np.ndarray
    n_atlas_voxels: int
    n_nan_voxels: int
    n_flat_voxels: int


@dataclass(eq=False)
class RegionSignals:
    """Region time series of one scan, in the atlas's region order.

    Built by :func:`parcellate` and :func:`clean`; each field is also an attribute of the
    same name.

    Parameters
    ----------
    data : ndarray (T, R) float32
        One row per volume, one column per region (NaN for a region with no voxels).
    tr : float
        Repetition time, seconds.
    atlas : Atlas
        The atlas whose region order the columns follow.
    n_voxels : ndarray (R,) int
        Voxels averaged per region (for a table: -1, unknown).
    coverage : ndarray (R,) float
        Region volume inside the scan's field of view / region volume in the atlas.
    cleaned : bool, default=False
        Whether :func:`clean` has been applied.
    sample_mask : ndarray of int or None, default=None
        Volumes kept after scrubbing (indices into the original series), None if all kept.
    confounds : DataFrame or None, default=None
        The scan's fMRIPrep confounds, carried along for cleaning and QC.
    voxel_stats : VoxelStats or None, default=None
        Voxel-level QC facts (NIfTI input only).
    warnings : list of str, default=[]
        Recoverable oddities of the input (they make the QC verdict "warn").
    notes : list of str, default=[]
        Informational facts about processing (e.g. the atlas was resampled to the scan grid).
    cleaning : dict, default={}
        Cleaning parameters, once :func:`clean` has run.

    Attributes
    ----------
    n_volumes : int
        T, the number of rows of ``data``.
    n_regions : int
        R, the number of columns of ``data``.
    """

    data: np.ndarray
    tr: float
    atlas: Atlas
    n_voxels: np.ndarray
    coverage: np.ndarray
    cleaned: bool = False
    sample_mask: np.ndarray | None = None
    confounds: pd.DataFrame | None = None
    voxel_stats: VoxelStats | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cleaning: dict = field(default_factory=dict)

    @property
    def n_volumes(self) -> int:
        """T, the number of volumes (rows of ``data``; after scrubbing, those kept)."""
        return int(self.data.shape[0])

    @property
    def n_regions(self) -> int:
        """R, the number of regions (columns of ``data``)."""
        return int(self.data.shape[1])


# --------------------------------------------------------------------------------------------
# Parcellation
# --------------------------------------------------------------------------------------------
def parcellate(
    scan: Scan, atlas: str | Atlas | None = None, *, progress=None, threads: int | None = None
) -> RegionSignals:
    """Mean time series of every atlas region.

    Parameters
    ----------
    scan : Scan
        From :func:`fmmtc_core.io.load_scan`.
    atlas : str, path, Atlas or None, default=None
        Atlas for a NIfTI scan (default ``"hcpex"``). A table already names its atlas; passing a
        different one is an error.
    progress : callable or None, default=None
        Called as ``progress(done_volumes, total_volumes)`` while voxels are read (never for
        a region table).
    threads : int or None, default=None
        Threads that decompress a ``.nii.gz`` scan (see :meth:`fmmtc_core.io.Scan.iter_blocks`:
        1 is ISA-L in one thread, more is rapidgzip); None: ``$FMMTC_READ_THREADS``, else the
        usable cores but one, at most 8. The result is the same for every value.

    Returns
    -------
    RegionSignals
        Plain voxel means (no cleaning): equal to nilearn's ``NiftiLabelsMasker`` with the
        mean strategy on the same image and atlas.

    Raises
    ------
    InvalidInputError
        A region table given another ``atlas`` than the one it names; a NIfTI not in MNI
        space (median region coverage below :data:`MIN_ATLAS_OVERLAP`), all-NaN, all-zero or
        constant data inside the atlas, a truncated or corrupt file; ``threads`` not a
        positive integer.
    """
    if scan.kind == "table":
        assert scan.atlas_name is not None and scan.table is not None  # set for every table
        tab_atlas = load_atlas(scan.atlas_name)
        if atlas is not None and load_atlas(atlas) is not tab_atlas:
            raise InvalidInputError(
                f"{scan.path.name} holds {tab_atlas.name} region series; it cannot be "
                f"parcellated again with atlas {load_atlas(atlas).name}."
            )
        n = tab_atlas.n_regions
        covered = np.isfinite(scan.table).any(axis=0)
        return RegionSignals(
            data=scan.table.astype(np.float32),
            tr=scan.tr,
            atlas=tab_atlas,
            n_voxels=np.full(n, -1, dtype=np.int64),
            coverage=covered.astype(np.float64),
            confounds=scan.confounds,
            warnings=list(scan.warnings),
        )

    atlas = load_atlas("hcpex" if atlas is None else atlas)
    assert scan.spatial_shape is not None and scan.affine is not None  # set for every NIfTI
    warn = list(scan.warnings)
    same_grid = scan.spatial_shape == atlas.labels_img.shape[:3] and np.allclose(
        scan.affine, atlas.labels_img.affine, atol=1e-4
    )
    grid = atlas.on_grid(scan.spatial_shape, scan.affine)
    if grid.fraction_covered < MIN_ATLAS_OVERLAP:
        raise InvalidInputError(
            f"{scan.path.name} does not overlap the {atlas.name} atlas (median region coverage "
            f"{grid.fraction_covered:.0%}): the image is not in MNI space. Expected an fMRIPrep "
            "space-MNI152NLin2009cAsym (or FSL MNI152) output."
        )
    notes = []
    if not same_grid:
        # Informational, not a warning: FSL-grid and other MNI grids are routine.
        zooms = np.sqrt((scan.affine[:3, :3] ** 2).sum(axis=0))
        notes.append(
            f"The scan grid ({'x'.join(map(str, scan.spatial_shape))}, "
            f"{'x'.join(f'{z:g}' for z in zooms)} mm) differs from the atlas grid; the atlas "
            "was resampled to the scan (nearest neighbour)."
        )

    # Atlas voxels in region order: the gather below then yields each region contiguously,
    # so one reduceat per block sums every region.
    region_of_voxel = grid.region_index.reshape(-1, order="F")
    vox = np.flatnonzero(region_of_voxel >= 0)
    order = np.argsort(region_of_voxel[vox], kind="stable")
    vox = vox[order]
    reg = region_of_voxel[vox]
    present = np.flatnonzero(grid.n_voxels > 0)
    starts = np.concatenate([[0], np.cumsum(grid.n_voxels[present])[:-1]]).astype(np.intp)
    counts = grid.n_voxels[present].astype(np.float64)
    n_regions, n_vol, n_in = atlas.n_regions, scan.n_volumes, vox.size

    carpet_pos = _carpet_sample(reg, n_regions)
    sums = np.full((n_vol, n_regions), np.nan)
    # Per-voxel sums of (x - ref) and its square, ref = the first volume: centring keeps the
    # float32 block sums exact enough for the variance (tSNR) without float64 copies.
    s1 = np.zeros(n_in)
    s2 = np.zeros(n_in)
    nan_voxel = np.zeros(n_in, dtype=bool)
    dvars = np.zeros(n_vol)
    carpet = np.empty((carpet_pos.size, n_vol), dtype=np.float32)
    ref: np.ndarray | None = None
    state = {"prev": None, "any_nan": False}

    def reduce_block(t0: int, block: np.ndarray):
        g = block[:, vox]  # (k, n_in), region-contiguous columns, stored dtype
        if g.dtype.kind == "f" and g.dtype.itemsize < 4 or g.dtype.kind in "iu":
            g = g.astype(np.float32)
        bad = None
        if g.dtype.kind == "f" and not np.isfinite(g).all():
            bad = ~np.isfinite(g)
            g = np.where(bad, 0.0, g).astype(g.dtype)
            n_ok = np.add.reduceat((~bad).astype(np.float32), starts, axis=1, dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                means = np.add.reduceat(g, starts, axis=1, dtype=np.float64) / n_ok
            bad = bad.any(axis=0)
        else:
            means = np.add.reduceat(g, starts, axis=1, dtype=np.float64) / counts
        c = g - ref
        if bad is not None:
            c[:, bad] = 0.0
        ones = np.ones(c.shape[0], dtype=c.dtype)
        d = np.diff(c, axis=0)
        return (t0, means, ones @ c, np.einsum("ij,ij->j", c, c), c[0], c[-1],
                np.sqrt(np.einsum("ij,ij->i", d, d) / n_in), c[:, carpet_pos].T, bad)

    def combine(result) -> None:
        t0, means, c1, c2, first, last, dv, carp, bad = result
        k = means.shape[0]
        sums[t0 : t0 + k, present] = means[:, : present.size]
        s1[:] += c1
        s2[:] += c2
        prev = state["prev"]
        dvars[t0] = 0.0 if prev is None else np.sqrt(np.mean((first - prev) ** 2))
        dvars[t0 + 1 : t0 + k] = dv
        state["prev"] = last
        carpet[:, t0 : t0 + k] = carp
        if bad is not None:
            state["any_nan"] = True
            nan_voxel[bad] = True
        if progress is not None:
            progress(t0 + k, n_vol)

    # Blocks are reduced on a small thread pool (numpy releases the GIL in these kernels);
    # at most `workers` blocks are in flight, so memory stays bounded for .nii.gz streams.
    workers = max(1, min(2, os.cpu_count() or 1))
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fmmtc-parc") as pool:
        # hold=workers: when the next block is asked for, at most `workers - 1` blocks are
        # still being reduced (the loop below waits for the rest), so the reader may reuse
        # the memory of older ones.
        for t0, block in scan.iter_blocks(threads=threads, hold=workers):
            if ref is None:
                first = block[0, vox].astype(np.float32)
                ref = np.where(np.isfinite(first), first, 0.0).astype(np.float32)
            pending.append(pool.submit(reduce_block, t0, block))
            while len(pending) >= workers:
                combine(pending.popleft().result())
        while pending:
            combine(pending.popleft().result())
    any_nan = state["any_nan"]

    assert ref is not None  # set from the first block; a scan has at least one volume
    slope, inter = scan.scale
    data = sums * slope + inter
    mean_c = s1 / n_vol
    var_raw = np.maximum(s2 / n_vol - mean_c**2, 0.0)
    mean_raw = ref + mean_c
    std = np.sqrt(var_raw) * abs(slope)
    mean = mean_raw * slope + inter
    scale_ok = np.isfinite(data)
    if nan_voxel.all() or not scale_ok.any():
        raise InvalidInputError(
            f"{scan.path.name} holds only NaN values inside the brain atlas; expected BOLD "
            "signal."
        )
    if np.all(mean_raw == 0) and np.all(var_raw == 0):
        raise InvalidInputError(
            f"{scan.path.name} holds only zeros inside the brain atlas; expected BOLD signal."
        )
    flat = std <= 1e-6 * np.maximum(np.abs(mean), 1e-12)
    if flat.all():
        raise InvalidInputError(
            f"{scan.path.name} is constant over time in every brain voxel; expected a BOLD time "
            "series."
        )
    if any_nan:
        msg = (
            f"{int(nan_voxel.sum())} atlas voxel(s) hold NaN or infinite values; they were left "
            "out of the region means at those volumes."
        )
        warn.append(msg)
        warnings.warn(msg, FMMTCWarning, stacklevel=2)

    # tSNR over voxels with signal (flat voxels are outside the scan's own brain mask).
    live = ~flat & ~nan_voxel
    with np.errstate(invalid="ignore", divide="ignore"):
        tsnr_vox = np.where(live, mean / np.where(std > 0, std, np.inf), np.nan)
    tsnr_regions = np.full(n_regions, np.nan)
    if live.any():
        sum_t = np.bincount(reg[live], weights=tsnr_vox[live], minlength=n_regions)
        cnt_t = np.bincount(reg[live], minlength=n_regions)
        with np.errstate(invalid="ignore", divide="ignore"):
            tsnr_regions = np.where(cnt_t > 0, sum_t / np.maximum(cnt_t, 1), np.nan)
    global_mean = float(np.mean(np.abs(mean[live]))) if live.any() else 1.0
    dvars_pct = dvars * abs(slope) / max(global_mean, 1e-12) * 100.0
    cm = carpet.mean(axis=1, keepdims=True)
    cs = carpet.std(axis=1, keepdims=True)
    carpet = ((carpet - cm) / np.where(cs > 0, cs, 1.0)).astype(np.float32)
    stats = VoxelStats(
        tsnr_voxels_median=float(np.nanmedian(tsnr_vox)) if live.any() else float("nan"),
        tsnr_regions=tsnr_regions,
        dvars=dvars_pct,
        carpet=carpet,
        carpet_regions=reg[carpet_pos],
        n_atlas_voxels=int(n_in),
        n_nan_voxels=int(nan_voxel.sum()),
        n_flat_voxels=int(flat.sum()),
    )
    # Regions whose voxels are all flat carry no signal: report them as not covered.
    live_per_region = np.bincount(reg[live], minlength=n_regions)
    coverage = np.where(live_per_region > 0, grid.coverage, 0.0)
    data = data.astype(np.float32)
    return RegionSignals(
        data=data,
        tr=scan.tr,
        atlas=atlas,
        n_voxels=grid.n_voxels.copy(),
        coverage=coverage,
        confounds=scan.confounds,
        voxel_stats=stats,
        warnings=warn,
        notes=notes,
    )


def _carpet_sample(reg: np.ndarray, n_regions: int) -> np.ndarray:
    """Evenly spaced atlas voxel positions (already region-ordered) for the carpet plot."""
    n = reg.size
    if n <= _CARPET_VOXELS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, _CARPET_VOXELS).round().astype(np.intp))


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------
def _fmriprep_confounds(confounds: pd.DataFrame, strategy: str, **kwargs):
    """Select confounds with nilearn's fMRIPrep presets from an in-memory table.

    ``load_confounds_strategy`` finds the confounds file from the BOLD file name, so we stage
    the table under fMRIPrep names in a temporary folder (the image itself is not needed).
    """
    from nilearn.interfaces.fmriprep import load_confounds_strategy

    tmp = Path(tempfile.mkdtemp(prefix="fmmtc-confounds-"))
    try:
        stem = "sub-x_task-rest"
        confounds.to_csv(tmp / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False,
                         na_rep="n/a")
        img = tmp / f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
        try:
            selected, sample_mask = load_confounds_strategy(
                str(img), denoise_strategy=strategy, **kwargs
            )
        except (ValueError, KeyError) as exc:
            raise InvalidInputError(
                f"The confounds table does not support the {strategy!r} denoising strategy "
                f"({exc}). Expected an fMRIPrep desc-confounds_timeseries.tsv."
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return selected, sample_mask


@dataclass(frozen=True)
class CleaningSettings:
    """The arguments of :func:`clean`, as one value: what a pipeline runs and a card records.

    Attributes are :func:`clean`'s keyword arguments, with its defaults.

    Parameters
    ----------
    detrend : bool, default=True
        Remove linear trends.
    low_pass : float or None, default=0.1
        Low-pass cut-off, Hz (:data:`fmmtc_core.config.BAND_PASS_HZ`); None: none.
    high_pass : float or None, default=0.01
        High-pass cut-off, Hz; None: none.
    strategy : {"simple", "scrubbing", "compcor"} or None, default="simple"
        nilearn ``load_confounds_strategy`` preset; None regresses no confounds.
    scrub : bool, default=False
        Remove high-motion volumes (implies the ``"scrubbing"`` preset).
    fd_threshold : float, default=0.5
        Framewise displacement (mm) above which scrubbing removes a volume
        (:data:`fmmtc_core.config.FD_THRESHOLD_MM`).
    std_dvars_threshold : float, default=1.5
        Standardised DVARS above which scrubbing removes a volume
        (:data:`fmmtc_core.config.STD_DVARS_THRESHOLD`).
    """

    detrend: bool = True
    low_pass: float | None = BAND_PASS_HZ[1]
    high_pass: float | None = BAND_PASS_HZ[0]
    strategy: str | None = "simple"
    scrub: bool = False
    fd_threshold: float = FD_THRESHOLD_MM
    std_dvars_threshold: float = STD_DVARS_THRESHOLD


def clean(
    signals: RegionSignals,
    *,
    detrend: bool = True,
    low_pass: float | None = BAND_PASS_HZ[1],
    high_pass: float | None = BAND_PASS_HZ[0],
    strategy: str | None = "simple",
    scrub: bool = False,
    fd_threshold: float = FD_THRESHOLD_MM,
    std_dvars_threshold: float = STD_DVARS_THRESHOLD,
) -> RegionSignals:
    """Detrend, band-pass filter and regress confounds out of region series (nilearn).

    Parameters
    ----------
    signals : RegionSignals
        Region series (:func:`parcellate`); ``signals.confounds`` are used when present.
    detrend : bool, default=True
        Remove linear trends.
    low_pass, high_pass : float or None, default=0.1, 0.01
        Band-pass cut-offs in Hz (Butterworth). A low-pass at or above the Nyquist frequency of
        the scan's TR is dropped with a warning.
    strategy : {"simple", "scrubbing", "compcor"} or None, default="simple"
        nilearn ``load_confounds_strategy`` preset applied when the scan has fMRIPrep
        confounds; None regresses no confounds.
    scrub : bool, default=False
        Remove high-motion volumes (FD > ``fd_threshold`` mm or standardised DVARS >
        ``std_dvars_threshold``); implies the "scrubbing" preset. Without confounds nothing
        is scrubbed and a warning says so.
    fd_threshold : float, default=0.5
        Framewise displacement limit (mm) of the scrubbing preset.
    std_dvars_threshold : float, default=1.5
        Standardised DVARS limit of the scrubbing preset.

    Returns
    -------
    RegionSignals
        A cleaned copy (``cleaned=True``, float32 ``data``); ``sample_mask`` lists the kept
        volumes when scrubbing removed any. Regions without signal stay NaN. ``cleaning``
        records the settings used (a dropped low-pass as None; ``strategy`` None without
        confounds) and ``n_volumes_kept``; new warnings are appended to ``warnings``.

    Raises
    ------
    InvalidInputError
        An unknown ``strategy``; ``high_pass`` not below the (remaining) ``low_pass``; a
        confounds table the preset cannot use; fewer than 10 volumes left (after scrubbing,
        or in the series itself).
    """
    from nilearn import signal as nsignal

    if strategy is not None:
        check_option("strategy", strategy, CONFOUND_STRATEGIES)
    warn = list(signals.warnings)
    nyquist = 0.5 / signals.tr
    if low_pass is not None and low_pass >= nyquist:
        msg = (
            f"Low-pass {low_pass:g} Hz is at or above the Nyquist frequency ({nyquist:g} Hz) of "
            f"TR {signals.tr:g} s; no low-pass filter applied."
        )
        warn.append(msg)
        warnings.warn(msg, FMMTCWarning, stacklevel=2)
        low_pass = None
    if high_pass is not None and low_pass is not None and high_pass >= low_pass:
        raise InvalidInputError(
            f"high_pass ({high_pass:g} Hz) must be below low_pass ({low_pass:g} Hz)."
        )
    confounds_arr = None
    sample_mask = None
    if signals.confounds is not None and (strategy is not None or scrub):
        preset = "scrubbing" if scrub else strategy
        assert preset is not None  # the branch needs a strategy or scrubbing
        kwargs: dict[str, float] = {}
        if preset == "scrubbing":
            kwargs = {"fd_threshold": fd_threshold, "std_dvars_threshold": std_dvars_threshold}
        selected, sample_mask = _fmriprep_confounds(signals.confounds, preset, **kwargs)
        if selected is not None and selected.shape[1] > 0:
            # The cosine (DCT) regressors already high-pass; band-pass as well is harmless.
            confounds_arr = selected.to_numpy(dtype=np.float64)
    elif scrub:
        msg = "Scrubbing needs an fMRIPrep confounds file (framewise_displacement); none given."
        warn.append(msg)
        warnings.warn(msg, FMMTCWarning, stacklevel=2)

    data = signals.data.astype(np.float64)
    ok = np.isfinite(data).all(axis=0)
    kept = data.shape[0] if sample_mask is None else len(sample_mask)
    if kept < 10:
        raise InvalidInputError(
            f"Scrubbing kept {kept} of {data.shape[0]} volumes; too few to analyse. The scan "
            "has too much head motion."
        )
    out = np.full((kept, data.shape[1]), np.nan)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="nilearn")
        out[:, ok] = nsignal.clean(
            data[:, ok],
            detrend=detrend,
            standardize=None,
            confounds=confounds_arr,
            sample_mask=sample_mask,
            filter="butterworth" if (low_pass or high_pass) else False,
            low_pass=low_pass,
            high_pass=high_pass,
            t_r=signals.tr,
        )
    if sample_mask is not None and len(sample_mask) == data.shape[0]:
        sample_mask = None
    return replace(
        signals,
        data=out.astype(np.float32),
        cleaned=True,
        sample_mask=None if sample_mask is None else np.asarray(sample_mask, dtype=np.int64),
        warnings=warn,
        cleaning={
            "detrend": detrend,
            "low_pass": low_pass,
            "high_pass": high_pass,
            "strategy": strategy if signals.confounds is not None else None,
            "scrub": bool(scrub),
            "fd_threshold": fd_threshold,
            "std_dvars_threshold": std_dvars_threshold,
            "n_volumes_kept": int(kept),
        },
    )


# --------------------------------------------------------------------------------------------
# Model input preparation
# --------------------------------------------------------------------------------------------
def robust_scale(data: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per-region robust scaling: subtract the median, divide by the interquartile range.

    Parameters
    ----------
    data : ndarray (T, R)
    axis : int, default=0
        The time axis.

    Returns
    -------
    ndarray, float32, the shape of ``data``
        ``(data - median) / IQR`` along ``axis`` (NaN ignored in both statistics). A region
        with zero IQR is only centred; NaN values become 0 (the "no signal" value after
        scaling), as do infinite results.
    """
    x = np.asarray(data, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN regions
        med = np.nanmedian(x, axis=axis, keepdims=True)
        q75, q25 = np.nanpercentile(x, [75, 25], axis=axis, keepdims=True)
    iqr = q75 - q25
    iqr = np.where(np.isfinite(iqr) & (iqr > 0), iqr, 1.0)
    out = (x - med) / iqr
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def make_window(
    signals: RegionSignals | np.ndarray,
    length: int = 200,
    *,
    tr: float | None = None,
    target_tr: float | None = None,
    start: int | str = "center",
    scale: bool = True,
) -> np.ndarray:
    """A fixed-length model input window, shape (R, length), regions x time.

    Parameters
    ----------
    signals : RegionSignals or ndarray (T, R)
    length : int, default=200
        Samples per window (BrainLM's small checkpoint uses 200).
    tr : float or None, default=None
        TR of an ndarray input (taken from ``signals`` otherwise).
    target_tr : float or None, default=None
        Resample the series to this TR first (linear interpolation), e.g. to match the TR the
        model was trained at. None keeps the scan's sampling.
    start : int or "center", default="center"
        First sample of the crop when the series is longer than ``length``.
    scale : bool, default=True
        Robust-scale each region (median / IQR) over the window; False only replaces NaN
        with 0.

    Returns
    -------
    ndarray (R, length) float32
        C-contiguous, regions x samples.

    Raises
    ------
    InvalidInputError
        The data are not 2-D, ``length`` is below 2, ``target_tr`` is given without a TR, or
        a series longer than ``length`` (T samples after resampling) is given a ``start``
        outside ``0 .. T - length`` (a shorter series is not cropped: ``start`` is unused).

    Notes
    -----
    Shorter series are padded at the end with zeros after scaling, i.e. with the region's
    median: the "no information" value that is also the Integrated Gradients baseline.
    """
    if isinstance(signals, RegionSignals):
        data, tr = signals.data, signals.tr
    else:
        data = np.asarray(signals)
    if data.ndim != 2:
        raise InvalidInputError(f"Expected a (time, regions) array, got shape {data.shape}.")
    if length < 2:
        raise InvalidInputError(f"Window length must be at least 2 samples, got {length}.")
    x = data.astype(np.float64)
    if target_tr is not None:
        if tr is None:
            raise InvalidInputError("Resampling to target_tr needs the TR of the series.")
        if abs(target_tr - tr) > 1e-6:
            t_old = np.arange(x.shape[0]) * tr
            t_new = np.arange(0.0, t_old[-1] + 1e-9, target_tr)
            x = np.stack([np.interp(t_new, t_old, x[:, r]) for r in range(x.shape[1])], axis=1)
    n = x.shape[0]
    if n > length:
        s = (n - length) // 2 if start == "center" else int(start)
        if not 0 <= s <= n - length:
            raise InvalidInputError(
                f"Window start {s} is out of range for {n} samples and length {length}."
            )
        x = x[s : s + length]
    if scale:
        x = robust_scale(x)
    else:
        x = np.nan_to_num(x, nan=0.0).astype(np.float32)
    if x.shape[0] < length:
        x = np.concatenate([x, np.zeros((length - x.shape[0], x.shape[1]), np.float32)], axis=0)
    return np.ascontiguousarray(x.T, dtype=np.float32)


#: The card's ``preprocessing.connectivity.span`` of models whose connectivity and amplitude
#: come from the whole cleaned series (``prepare(..., fc_span="scan")``); 0.1.0's whole-scan
#: cards say :data:`FC_SPAN_WINDOWS`.
FC_SPAN_SCAN = "the whole cleaned series"
FC_SPAN_WINDOWS = "the samples the windows cover"

# The arguments prepare() passes on; preprocessing_card() records the same values.
_WINDOW_ARGS: dict[str, Any] = {"target_tr": None, "scale": True}
_FC_ARGS: dict[str, Any] = {"kind": "correlation", "shrinkage": False, "fisher": True}


@dataclass(eq=False)
class ModelInputs:
    """The inputs of an FMM-TC model for one scan (see :func:`prepare`).

    Each field is also an attribute of the same name.

    Parameters
    ----------
    window : ndarray float32
        The time-series branch's input. Centred-window path (``prepare(signals, length)``):
        ``(R, T)``, the robust-scaled centred window (regions x samples, atlas order).
        Encoder path (``prepare(signals, encoder)``): ``(W, ...)``, every model input window of
        the scan as :meth:`~fmmtc_core.models.encoder_base.FoundationEncoder.windows` returns
        them (``(W, R, L)`` for BrainLM encoders, ``(W, 3, R, L)`` for ViT-MAE; rows in the
        encoder's region order).
    fc : ndarray (R, R) float32 or None
        Fisher-z functional connectivity: of the whole cleaned series (centred-window path) or
        of the samples the windows cover (encoder path); None when not asked for.
    plan : WindowPlan or None, default=None
        Encoder path: resampling, windows, padding and the span of the scan they cover; None
        on the centred-window path.
    amplitude : ndarray (R,) or (4 R,) float32 or None, default=None
        :func:`relative_amplitude` of the same samples as ``fc`` (or, for models that read
        the regional dynamics, :func:`regional_dynamics` laid end to end); None when ``fc``
        is not asked for.
    """

    window: np.ndarray
    fc: np.ndarray | None
    plan: WindowPlan | None = None
    amplitude: np.ndarray | None = None


def relative_amplitude(data: np.ndarray) -> np.ndarray:
    """Each region's log standard deviation relative to the scan's median region.

    The foundation encoders normalise every region of every window to a unit scale, so the
    amplitude of a region's fluctuations, one of the best-replicated resting-state markers
    (ALFF; Zang et al. 2007), never reaches their embeddings. FMM-TC keeps it beside them as
    one number per region. Subtracting the scan's median over regions removes what every region
    of a scan shares (scanner gain, site, global signal level), as the mean-normalised ALFF
    maps of the literature do, so the feature compares regions within a participant.

    Parameters
    ----------
    data : ndarray (T, R)
        Cleaned region series.

    Returns
    -------
    ndarray (R,) float32
        ``log sd_r - median_r' log sd_r'`` over the regions with signal; 0 for a region
        without signal (constant or not finite), and 0 everywhere for fewer than 3 samples.
    """
    x = np.asarray(data, dtype=np.float64)
    out = np.zeros(x.shape[1], dtype=np.float32)
    if x.shape[0] < 3:
        return out
    with np.errstate(invalid="ignore"):
        sd = x.std(axis=0, ddof=1)
    live = np.isfinite(sd) & (sd > 0)
    if live.any():
        log_sd = np.log(sd[live])
        out[live] = (log_sd - np.median(log_sd)).astype(np.float32)
    return out


#: The rows of :func:`regional_dynamics`, in order.
DYNAMICS_ROWS = ("relative_log_sd", "relative_log_alff", "falff", "ac1")
#: Band of the ALFF of :func:`regional_dynamics` in Hz (Zang et al. 2007; the amplitude
#: baseline's band, :data:`fmmtc_core.baselines.ALFF_BAND_HZ`).
DYNAMICS_ALFF_BAND_HZ = (0.01, 0.08)


def regional_dynamics(data: np.ndarray, tr: float) -> np.ndarray:
    """Four numbers per region describing how it fluctuates, all comparable across sites.

    The regional amplitude of :func:`relative_amplitude` says how strongly a region
    fluctuates; these rows add how its power is spread over frequencies, which the encoders'
    per-window normalisation keeps but a read-out of their pooled embedding barely sees. They
    are the features of the classic amplitude baseline
    (:func:`fmmtc_core.baselines.amplitude_features`) made relative where a scan's gain would
    otherwise enter (as :func:`relative_amplitude` is), and finite for every scan:

    0. ``relative_log_sd``: :func:`relative_amplitude`.
    1. ``relative_log_alff``: log of the mean spectral amplitude in 0.01-0.08 Hz, minus its
       median over the scan's regions.
    2. ``falff``: the amplitude in that band over the amplitude at all frequencies above 0
       (on cleaned, band-passed series: the share of the band within the pass band, a measure
       of spectral shape).
    3. ``ac1``: lag-1 autocorrelation at the scan's own TR (the simplest intrinsic-timescale
       feature; it depends on the TR, which sites need not share).

    A region without signal (constant or not finite) takes 0 in rows 0-1 and the scan's
    median over regions with signal in rows 2-3 (a typical region, so it moves no read-out);
    a scan too short to resolve the band (or of fewer than 3 samples) takes those fills in
    every row it cannot compute.

    Parameters
    ----------
    data : ndarray (T, R)
        Cleaned region series.
    tr : float
        Repetition time in seconds (sets the frequencies).

    Returns
    -------
    ndarray (4, R) float32
        Rows as :data:`DYNAMICS_ROWS`; finite.
    """
    x = np.asarray(data, dtype=np.float64)
    n, r = x.shape
    out = np.zeros((4, r), dtype=np.float64)
    out[0] = relative_amplitude(x)
    if n < 3:
        return out.astype(np.float32)
    with np.errstate(invalid="ignore"):
        sd = x.std(axis=0, ddof=1)
    live = np.isfinite(sd) & (sd > 0)
    if not live.any():
        return out.astype(np.float32)
    xl = x[:, live] - x[:, live].mean(axis=0)
    amp = np.abs(np.fft.rfft(xl, axis=0))
    freqs = np.fft.rfftfreq(n, d=float(tr))
    in_band = (freqs >= DYNAMICS_ALFF_BAND_HZ[0]) & (freqs <= DYNAMICS_ALFF_BAND_HZ[1])
    positive = freqs > 0
    if in_band.any():
        alff = amp[in_band].mean(axis=0)
        total = amp[positive].sum(axis=0)
        ok = (alff > 0) & (total > 0)
        if ok.any():
            log_alff = np.zeros(alff.shape)
            log_alff[ok] = np.log(alff[ok])
            log_alff[ok] -= np.median(log_alff[ok])
            falff = np.full(alff.shape, np.nan)
            falff[ok] = amp[in_band][:, ok].sum(axis=0) / total[ok]
            falff[~ok] = np.median(falff[ok])
            out[1, live] = log_alff
            out[2, live] = falff
            out[2, ~live] = np.median(falff)
    ac1 = (xl[1:] * xl[:-1]).sum(axis=0) / (xl * xl).sum(axis=0)
    out[3, live] = ac1
    out[3, ~live] = np.median(ac1)
    return out.astype(np.float32)


def _amplitude_input(data: np.ndarray, tr: float, amplitude: str) -> np.ndarray:
    """The ``amplitude`` field of :class:`ModelInputs`: (R,) or (4 R,) (see :func:`prepare`)."""
    if amplitude == "dynamics":
        return regional_dynamics(data, tr).reshape(-1)
    return relative_amplitude(data)


def prepare(
    signals: RegionSignals,
    length: int | FoundationEncoder,
    *,
    rng: np.random.Generator | None = None,
    with_fc: bool = True,
    fc_span: str = "scan",
    amplitude: str = "relative",
) -> ModelInputs:
    """The model's inputs for cleaned region signals: the one path from signals to a model.

    Training, evaluation, pretraining, screening and explanation all take their inputs from
    here, so a model is never given inputs built otherwise than those it was trained on.

    Parameters
    ----------
    signals : RegionSignals
        Cleaned region signals (:func:`clean`).
    length : int or FoundationEncoder
        An int: the centred-window path (models trained before whole-scan embeddings, the
        encoder trained from scratch, pretraining): one window of ``length`` samples at the
        scan's own sampling. A :class:`~fmmtc_core.models.encoder_base.FoundationEncoder`: the
        whole-scan path: the encoder's own preprocessing (resampling to its TR, its
        normalisation, every non-overlapping window, its region order).
    rng : numpy.random.Generator or None, default=None
        Centred-window path only: crop the window at a random position drawn from ``rng``
        (pretraining's augmentation); None crops it centred. A series no longer than
        ``length`` is never cropped (and draws nothing from ``rng``).
    with_fc : bool, default=True
        Compute the connectivity (pretraining needs only windows).
    fc_span : {"scan", "windows"}, default="scan"
        Encoder path: the samples the connectivity and the amplitude are computed from:
        ``"scan"`` the whole cleaned series (the design's C modality; models trained since
        0.1.1), ``"windows"`` only the span the encoder's windows cover (models trained with
        0.1.0's whole-scan path, whose cards say so). The windows cover a whole number of
        window lengths, so ``"windows"`` drops up to a window's worth of samples (29 % of a
        280-volume scan for a 200-sample window), which makes the connectivity noisier.
    amplitude : {"relative", "dynamics"}, default="relative"
        What ``amplitude`` holds: :func:`relative_amplitude` (R,), or (models with
        ``dynamics``) the rows of :func:`regional_dynamics` laid end to end (4 R,), whose
        first R values are the relative amplitude.

    Returns
    -------
    ModelInputs
        Centred-window path: ``window`` from :func:`make_window` at the scan's own sampling,
        ``fc`` the Pearson correlation of the whole cleaned series, Fisher z
        (:func:`fmmtc_core.connectivity.connectivity`). Encoder path: ``window`` the encoder's
        windows, ``fc`` the same Fisher-z Pearson connectivity over the whole series (or
        over ``signals.data[plan.span[0]:plan.span[1]]``, see ``fc_span``), ``plan`` the
        encoder's
        :class:`~fmmtc_core.models.encoder_base.WindowPlan`. ``amplitude`` is
        :func:`relative_amplitude` (or :func:`regional_dynamics`, see ``amplitude``) of the
        samples ``fc`` is computed from (both None without ``with_fc``).

    Raises
    ------
    InvalidInputError
        Encoder path: the scan's atlas is not the encoder's (another region count or label
        order; :meth:`~fmmtc_core.models.encoder_base.FoundationEncoder.check_atlas`), an
        ``rng``, statistics the encoder needs and does not have, or an unknown ``fc_span``
        or ``amplitude``.
    """
    if amplitude not in ("relative", "dynamics"):
        raise InvalidInputError(
            f"amplitude must be 'relative' or 'dynamics', not {amplitude!r}.")
    if isinstance(length, (int, np.integer)) and not isinstance(length, bool):
        start: int | str = "center"
        n = signals.n_volumes
        if rng is not None and n > length:
            start = int(rng.integers(0, n - length + 1))
        window = make_window(signals, int(length), start=start, **_WINDOW_ARGS)
        fc = connectivity(signals, **_FC_ARGS) if with_fc else None
        amp = _amplitude_input(signals.data, signals.tr, amplitude) if with_fc else None
        return ModelInputs(window=window, fc=fc, amplitude=amp)
    encoder = cast("FoundationEncoder", length)
    if rng is not None:
        raise InvalidInputError(
            "Random crops (rng) belong to the centred-window path (pretraining); an encoder "
            "embeds every window of the scan.")
    if fc_span not in ("scan", "windows"):
        raise InvalidInputError(f"fc_span must be 'scan' or 'windows', not {fc_span!r}.")
    encoder.check_atlas(signals.atlas)
    plan = encoder.plan(signals.n_volumes, signals.tr)
    windows = encoder.windows(signals.data, signals.tr).numpy()
    fc = amp = None
    if with_fc:
        start_, stop = plan.span if fc_span == "windows" else (0, signals.n_volumes)
        fc = connectivity(signals.data[start_:stop], **_FC_ARGS)
        amp = _amplitude_input(signals.data[start_:stop], signals.tr, amplitude)
    return ModelInputs(window=windows, fc=fc, plan=plan, amplitude=amp)


def windows_gram(encoder: FoundationEncoder, windows: np.ndarray) -> np.ndarray:
    """The paper's Gram input for the encoder path: the mean over windows of ``w w^T / L``.

    Parameters
    ----------
    encoder : FoundationEncoder
    windows : ndarray (W, ...)
        As ``prepare(signals, encoder).window``.

    Returns
    -------
    ndarray (R, R) float32
        In the atlas's region order (channels averaged).
    """
    import torch

    w = encoder.to_atlas_order(torch.as_tensor(windows, dtype=torch.float32), "mean")
    return (w @ w.transpose(1, 2) / w.shape[-1]).mean(0).numpy().astype(np.float32)


def preprocessing_card(cleaning: CleaningSettings, length: int | FoundationEncoder, *,
                       scaling: dict | None = None) -> dict:
    """The ``preprocessing`` block of a model card: the settings of the code that ran.

    Parameters
    ----------
    cleaning : CleaningSettings
        What the cohort was cleaned with.
    length : int or FoundationEncoder
        What was given to :func:`prepare`: a window length (centred-window path) or the
        encoder (whole-scan path).
    scaling : dict or None, default=None
        Encoder path: where the encoder's global robust-scaling statistics came from (recorded
        under ``encoder``); ignored on the centred-window path.

    Returns
    -------
    dict
        ``parcellation``, ``cleaning`` (the arguments of :func:`clean`), ``window`` (length,
        crop, scaling and TR, in words) and ``connectivity`` (the arguments of
        :func:`~fmmtc_core.connectivity.connectivity`). The encoder path adds ``encoder``:
        the registry ``entry``, its ``preprocessing`` parameters, their ``sources``, the
        ``preprocessing_hash`` (checkpoint digest + every parameter), the ``precision`` and
        ``scaling``; and the connectivity's ``span``.
    """
    common = {"parcellation": "mean of voxels per region",  # parcellate() has no other
              "cleaning": asdict(cleaning)}
    if isinstance(length, (int, np.integer)) and not isinstance(length, bool):
        target_tr = _WINDOW_ARGS["target_tr"]
        return {
            **common,
            "window": {
                "length": int(length), "crop": "centred", **_WINDOW_ARGS,
                "scaling": "per-region median/IQR" if _WINDOW_ARGS["scale"] else "none",
                "tr": ("native sampling (no resampling)" if target_tr is None
                       else f"resampled to TR {target_tr:g} s"),
            },
            "connectivity": dict(_FC_ARGS),
        }
    encoder = cast("FoundationEncoder", length)
    e = encoder.entry
    whole = e.window_pooling == "mean"
    return {
        **common,
        "window": {
            "length": int(e.window),
            "crop": "every non-overlapping window (whole scan)" if whole else "centred",
            "pooling": ("mean of the per-window embeddings" if whole
                        else "the centred window's embedding"),
            "scaling": ("per-region median/IQR fitted on a cohort" if e.normalisation ==
                        "global-robust" else "per-region median/IQR over each window")
            + (f", then / {e.max_value:g}" if e.max_value != 1 else ""),
            "tr": ("native sampling (no resampling)" if e.tr is None
                   else f"resampled to TR {e.tr:g} s (linear) when the scan's differs"),
        },
        "encoder": {
            "entry": e.name,
            "preprocessing": e.preprocessing(),
            "sources": dict(e.sources),
            "preprocessing_hash": encoder.preprocessing_hash,
            "precision": encoder.precision,
            "scaling": scaling,
        },
        "connectivity": {**_FC_ARGS, "span": FC_SPAN_SCAN},
    }
