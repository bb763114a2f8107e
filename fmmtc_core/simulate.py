"""Honest simulation of resting-state fMRI cohorts, deterministic by seed.

No public fMRI can be downloaded here, so the demo cohort, the tests and the ground truth of the
explanations come from a documented generative model:

1. **Region dynamics.** A stable multivariate autoregressive process, simulated at a step of
   TR / 4, whose coupling decays with the distance between region centroids (40 mm length
   scale), is stronger within a lobe, and is scaled to spectral radius 0.8; part of each
   region's innovations is shared within its lobe (network structure).
2. **Haemodynamics.** The canonical double-gamma HRF (SPM's) convolves the latent activity,
   which is then sampled at TR; measurement noise is added per region.
3. **Nuisance.** Site effects (signal gain and noise level), a slow drift, and motion spikes:
   volumes with a global signal jump that also show in the fMRIPrep-style confounds (framewise
   displacement computed from the motion parameters as Power et al. 2012, DVARS, CSF/WM/global
   signals, cosine high-pass regressors).
4. **Responders.** Two disjoint planted sets of regions carry the label:
   - *connectivity* (visible in C): extra coupling among the ``fc`` regions
     (``A[S, S] += fc_effect / |S|``), which raises their mutual correlation;
   - *temporal dynamics* (visible in T): higher self-autoregression of the ``ts`` regions
     (``A[i, i] += ts_effect``): slower fluctuations, i.e. higher lag-1 autocorrelation, which
     survives the per-region robust scaling applied before the model (an amplitude change
     would not).
   The planted regions are written to the cohort's ``simulation.json`` as ground truth.
5. **Rendering.** Region signals are written into the atlas voxels on fMRIPrep's 2 mm
   MNI152NLin2009cAsym grid: voxel = baseline x (1 + percent-signal-change x loading x region
   signal) + voxel noise; background 0. Images are streamed volume by volume to disk, so memory
   stays at one volume.

Unlabelled pain-agnostic corpora (for foundation-model pretraining) vary sites, TR and scan
length and carry no planted effect.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.signal import lfilter
from scipy.stats import gamma

from fmmtc_core import __version__
from fmmtc_core._errors import InvalidInputError, check_option
from fmmtc_core.atlas import Atlas, cache_dir, load_atlas

__all__ = [
    "FMRIPREP_MNI_2MM_SHAPE",
    "FMRIPREP_MNI_2MM_AFFINE",
    "SimulationConfig",
    "SimulatedSubject",
    "planted_regions",
    "simulate_subject",
    "fmriprep_confounds",
    "render_nifti",
    "write_nifti",
    "write_cohort",
    "demo_scan",
    "BOLD_SUFFIX",
]

#: fMRIPrep's MNI152NLin2009cAsym res-2 grid (the grid of the cached HCPEx atlas).
FMRIPREP_MNI_2MM_SHAPE = (97, 115, 97)
FMRIPREP_MNI_2MM_AFFINE = np.array(
    [[2.0, 0, 0, -96.0], [0, 2.0, 0, -132.0], [0, 0, 2.0, -78.0], [0, 0, 0, 1.0]]
)
BOLD_SUFFIX = "_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
_TRS_CORPUS = (0.72, 0.8, 1.0, 1.5, 2.0, 2.5)

# Pain-related region names (ascending nociceptive / "pain matrix") for the connectivity effect,
# and valuation / default-mode regions for the temporal effect. Patterns are tried in order;
# atlases without such names fall back to a seeded choice.
_FC_PATTERNS = (
    r"posterior_insular|^insula_|middle_insular",
    r"primary_sensory_cortex|^postcentral",
    r"op1-sii|rolandic_oper",
    r"thal_ventral_posterolateral|thal_vpl|^thalamus_",
    r"^area_24|cingulate_ant|area_33",
    r"cingulate_mid|area_p24",
)
_TS_PATTERNS = (
    r"nucleus_accumbens|^n_acc",
    r"amygdala",
    r"orbital_frontal|ofcmed|frontal_med_orb",
    r"^area_31|^precuneus|cingulate_post",
    r"^hippocampus|parahippocampal_area_1",
    r"^area_10|frontal_sup_medial",
)


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of the generative model (defaults: the demo cohort).

    Attributes
    ----------
    n_volumes : int
        Volumes per scan.
    tr : float
        Repetition time, seconds.
    oversample : int
        Latent steps per TR.
    spectral_radius : float
        Of the baseline coupling matrix (< 1: stable).
    self_coupling : float
        Share of the diagonal in the baseline coupling.
    length_mm : float
        Distance over which coupling decays (exp(-d / length)).
    same_group_boost : float
        Coupling multiplier for region pairs in the same lobe.
    network_share : float
        Share of each region's innovation variance that is common to its lobe (gives the
        block structure of real connectivity matrices).
    n_fc_regions, n_ts_regions : int
        Sizes of the planted sets.
    fc_effect : float
        Extra coupling shared among the ``fc`` regions of a responder.
    ts_effect : float
        Extra self-autoregression of the ``ts`` regions of a responder.
    noise_sd : float
        Measurement noise SD relative to the median region signal SD.
    subject_jitter : float
        Relative SD of each subject's coupling scale.
    n_sites : int
    site_gain_sd, site_noise_sd : float
        Relative spread of signal gain and noise level across sites.
    spike_rate : float
        Probability that a volume holds a motion spike.
    psc : float
        Percent signal change of a region signal of unit SD in the rendered image.
    voxel_noise : float
        Voxel noise SD in percent of the baseline intensity.
    """

    n_volumes: int = 300
    tr: float = 2.0
    oversample: int = 4
    spectral_radius: float = 0.8
    self_coupling: float = 0.6
    length_mm: float = 40.0
    same_group_boost: float = 2.0
    network_share: float = 0.35
    n_fc_regions: int = 8
    n_ts_regions: int = 8
    fc_effect: float = 0.3
    ts_effect: float = 0.3
    noise_sd: float = 0.3
    subject_jitter: float = 0.05
    n_sites: int = 3
    site_gain_sd: float = 0.15
    site_noise_sd: float = 0.3
    spike_rate: float = 0.01
    psc: float = 1.0
    voxel_noise: float = 1.2

    def validate(self) -> SimulationConfig:
        if self.n_volumes < 10:
            raise InvalidInputError(f"n_volumes must be at least 10, got {self.n_volumes}.")
        if not 0.1 <= self.tr <= 10:
            raise InvalidInputError(f"tr must be between 0.1 and 10 s, got {self.tr}.")
        if not 0 < self.spectral_radius < 1:
            raise InvalidInputError("spectral_radius must be in (0, 1) for a stable process.")
        if self.n_sites < 1:
            raise InvalidInputError(f"n_sites must be at least 1, got {self.n_sites}.")
        return self


@dataclass(eq=False)
class SimulatedSubject:
    """One simulated scan at the region level.

    Attributes
    ----------
    signals : ndarray (T, R) float32
        BOLD signal of every region (arbitrary units, unit median SD), atlas order.
    confounds : DataFrame
        fMRIPrep-style confounds, one row per volume.
    tr : float
    responder : bool or None
    site : int
    spikes : ndarray of int
        Volumes with a motion spike.
    """

    signals: np.ndarray
    confounds: pd.DataFrame
    tr: float
    responder: bool | None
    site: int
    spikes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------
def _pick(atlas: Atlas, patterns, n: int, exclude: set[int], eligible: np.ndarray, rng) -> list[int]:
    chosen: list[int] = []
    names = [nm.lower() for nm in atlas.names]
    pools = []
    for pat in patterns:
        rx = re.compile(pat)
        pools.append([i for i, nm in enumerate(names) if rx.search(nm) and eligible[i]])
    # Round-robin over the patterns so each anatomical system is represented.
    depth = 0
    while len(chosen) < n and any(depth < len(p) for p in pools):
        for pool in pools:
            if depth < len(pool) and len(chosen) < n:
                i = pool[depth]
                if i not in exclude and i not in chosen:
                    chosen.append(i)
        depth += 1
    if len(chosen) < n:
        rest = [i for i in np.flatnonzero(eligible) if i not in exclude and i not in chosen]
        extra = rng.choice(rest, size=min(n - len(chosen), len(rest)), replace=False)
        chosen.extend(int(i) for i in extra)
    return chosen


def planted_regions(atlas: Atlas | str, config: SimulationConfig | None = None,
                    seed: int = 0) -> dict:
    """The responder ground truth: disjoint connectivity and time-series region sets.

    Returns
    -------
    dict
        ``fc_index`` / ``ts_index`` (positions in atlas order), ``fc_labels`` / ``ts_labels``
        (atlas integer labels), ``fc_names`` / ``ts_names``.
    """
    atlas = load_atlas(atlas)
    config = config or SimulationConfig()
    if config.n_fc_regions + config.n_ts_regions > atlas.n_regions:
        raise InvalidInputError(
            f"Cannot plant {config.n_fc_regions} + {config.n_ts_regions} regions in an atlas of "
            f"{atlas.n_regions} regions."
        )
    rng = np.random.default_rng([seed, 7])
    # Prefer regions large enough to survive coarse grids (>= 1 cm^3).
    eligible = atlas.volumes_mm3 >= 1000.0
    if eligible.sum() < config.n_fc_regions + config.n_ts_regions:
        eligible = np.ones(atlas.n_regions, dtype=bool)
    fc = _pick(atlas, _FC_PATTERNS, config.n_fc_regions, set(), eligible, rng)
    ts = _pick(atlas, _TS_PATTERNS, config.n_ts_regions, set(fc), eligible, rng)
    return {
        "fc_index": fc,
        "ts_index": ts,
        "fc_labels": [int(atlas.labels[i]) for i in fc],
        "ts_labels": [int(atlas.labels[i]) for i in ts],
        "fc_names": [atlas.names[i] for i in fc],
        "ts_names": [atlas.names[i] for i in ts],
    }


# --------------------------------------------------------------------------------------------
# Region-level dynamics
# --------------------------------------------------------------------------------------------
_COUPLING_CACHE: dict = {}


def _baseline_coupling(atlas: Atlas, config: SimulationConfig) -> np.ndarray:
    key = (atlas.name, atlas.n_regions, config.length_mm, config.same_group_boost,
           config.self_coupling, config.spectral_radius)
    if key in _COUPLING_CACHE:
        return _COUPLING_CACHE[key]
    c = np.nan_to_num(atlas.centroids_mm)
    d = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    w = np.exp(-d / config.length_mm)
    groups = np.asarray(atlas.groups)
    w *= np.where(groups[:, None] == groups[None, :], config.same_group_boost, 1.0)
    np.fill_diagonal(w, 0.0)
    w /= np.abs(np.linalg.eigvals(w)).max()
    a = config.self_coupling * np.eye(atlas.n_regions) + (1 - config.self_coupling) * w
    a *= config.spectral_radius / np.abs(np.linalg.eigvals(a)).max()
    _COUPLING_CACHE[key] = a
    return a


def _hrf(dt: float, length_s: float = 32.0) -> np.ndarray:
    """SPM's canonical double-gamma HRF sampled every ``dt`` seconds, unit sum."""
    t = np.arange(0.0, length_s, dt)
    h = gamma.pdf(t, 6) - gamma.pdf(t, 16) / 6.0
    return h / h.sum()


def _dct_basis(n: int, tr: float, cutoff_s: float = 128.0) -> np.ndarray:
    """fMRIPrep's cosine drift regressors (high-pass at ``cutoff_s`` seconds)."""
    k = int(np.floor(2 * n * tr / cutoff_s))
    t = np.arange(n)
    if k < 1:
        return np.zeros((n, 0))
    return np.stack([np.sqrt(2.0 / n) * np.cos(np.pi * (t + 0.5) * j / n)
                     for j in range(1, k + 1)], axis=1)


def fmriprep_confounds(
    signals: np.ndarray, tr: float, rng: np.random.Generator, spikes=(), motion_scale: float = 1.0
) -> pd.DataFrame:
    """fMRIPrep-like confounds for simulated region signals (T, R).

    Motion parameters are a slow random walk (mm, rad) with jumps at ``spikes``; framewise
    displacement follows Power et al. (2012) with a 50 mm head radius; DVARS is computed from the
    signals; CSF / white matter / global signals derive from the global mean plus noise.
    """
    n = signals.shape[0]
    steps = rng.standard_normal((n, 6)) * np.array([0.02, 0.02, 0.03, 3e-4, 3e-4, 3e-4])
    steps *= motion_scale
    for s in spikes:
        steps[s] += rng.choice([-1, 1], size=6) * np.array([0.6, 0.6, 0.8, 6e-3, 6e-3, 6e-3])
    motion = np.cumsum(steps, axis=0)
    cols: dict[str, np.ndarray] = {}
    for i, name in enumerate(["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]):
        m = motion[:, i]
        d = np.concatenate([[np.nan], np.diff(m)])
        cols[name], cols[f"{name}_derivative1"] = m, d
        cols[f"{name}_power2"], cols[f"{name}_derivative1_power2"] = m**2, d**2
    dm = np.abs(np.diff(motion, axis=0))
    fd = dm[:, :3].sum(axis=1) + 50.0 * dm[:, 3:].sum(axis=1)
    cols["framewise_displacement"] = np.concatenate([[np.nan], fd])
    dv = np.sqrt(np.mean(np.diff(signals, axis=0) ** 2, axis=1))
    cols["dvars"] = np.concatenate([[np.nan], dv])
    cols["std_dvars"] = np.concatenate([[np.nan], dv / np.median(dv)])
    gs = signals.mean(axis=1)
    for name, mix in (("global_signal", 1.0), ("csf", 0.3), ("white_matter", 0.5)):
        v = mix * gs + rng.standard_normal(n) * (1.0 - mix + 0.2) * gs.std()
        d = np.concatenate([[np.nan], np.diff(v)])
        cols[name], cols[f"{name}_derivative1"] = v, d
        cols[f"{name}_power2"], cols[f"{name}_derivative1_power2"] = v**2, d**2
    dct = _dct_basis(n, tr)
    for j in range(dct.shape[1]):
        cols[f"cosine{j:02d}"] = dct[:, j]
    return pd.DataFrame(cols)


def simulate_subject(
    atlas: Atlas | str,
    *,
    responder: bool | None,
    site: int = 0,
    config: SimulationConfig | None = None,
    rng: np.random.Generator | None = None,
    planted: dict | None = None,
) -> SimulatedSubject:
    """Simulate one subject's region-level BOLD signals and confounds.

    Parameters
    ----------
    atlas : Atlas or str
    responder : bool or None
        True plants the responder effects, False does not; None is an unlabelled subject.
    site : int, default=0
        Site index: sets the signal gain and noise level (deterministic per site).
    config : SimulationConfig or None
    rng : numpy Generator or None
    planted : dict or None
        Output of :func:`planted_regions` (computed when None).
    """
    atlas = load_atlas(atlas)
    config = (config or SimulationConfig()).validate()
    rng = rng or np.random.default_rng()
    n_reg, n_vol, k = atlas.n_regions, config.n_volumes, config.oversample
    a = _baseline_coupling(atlas, config).copy()
    a *= 1.0 + config.subject_jitter * rng.standard_normal()
    if responder:
        planted = planted or planted_regions(atlas, config)
        fc, ts = np.asarray(planted["fc_index"]), np.asarray(planted["ts_index"])
        a[np.ix_(fc, fc)] += config.fc_effect / len(fc)
        a[ts, ts] += config.ts_effect
    radius = np.abs(np.linalg.eigvals(a)).max()
    if radius >= 0.99:  # keep the process stable whatever the effect sizes
        a *= 0.99 / radius
    # Latent activity at TR / oversample, with a burn-in so the start is stationary.
    burn = 200
    n_steps = (n_vol + 16) * k + burn
    innov = rng.standard_normal((n_steps, n_reg))
    if config.network_share > 0:
        _, group_of = np.unique(np.asarray(atlas.groups), return_inverse=True)
        common = rng.standard_normal((n_steps, group_of.max() + 1))
        innov = (np.sqrt(1 - config.network_share) * innov
                 + np.sqrt(config.network_share) * common[:, group_of])
    z = np.empty_like(innov)
    z[0] = innov[0]
    at = a.T.copy()
    for t in range(1, n_steps):
        z[t] = z[t - 1] @ at + innov[t]
    z = z[burn:]
    bold = lfilter(_hrf(config.tr / k), [1.0], z, axis=0)[16 * k :: k][:n_vol]
    bold /= np.median(bold.std(axis=0))
    site_rng = np.random.default_rng([site, 12345])
    gain = 1.0 + config.site_gain_sd * site_rng.standard_normal()
    noise = config.noise_sd * (1.0 + config.site_noise_sd * abs(site_rng.standard_normal()))
    bold = gain * bold + noise * rng.standard_normal(bold.shape)
    bold += np.linspace(-0.3, 0.3, n_vol)[:, None] * rng.standard_normal(n_reg)  # drift
    spikes = np.flatnonzero(rng.random(n_vol) < config.spike_rate)
    spikes = spikes[spikes > 0]
    for s in spikes:
        bold[s] += rng.choice([-1.0, 1.0]) * 2.5 * (1 + 0.2 * rng.standard_normal(n_reg))
    signals = bold.astype(np.float32)
    confounds = fmriprep_confounds(signals, config.tr, rng, spikes)
    return SimulatedSubject(signals, confounds, config.tr, responder, site, spikes)


# --------------------------------------------------------------------------------------------
# Rendering to NIfTI
# --------------------------------------------------------------------------------------------
def _voxel_model(atlas: Atlas, shape, affine, rng):
    """Atlas voxels (F order), their region, baseline intensity and signal loading."""
    grid = atlas.on_grid(shape, affine)
    flat = grid.region_index.reshape(-1, order="F")
    vox = np.flatnonzero(flat >= 0)
    reg = flat[vox]
    base_region = rng.uniform(600.0, 1000.0, atlas.n_regions)  # tissue-dependent intensity
    baseline = (base_region[reg] * rng.uniform(0.9, 1.1, vox.size)).astype(np.float32)
    loading = rng.uniform(0.6, 1.4, vox.size).astype(np.float32)
    return vox, reg, baseline, loading


def _volumes(signals, atlas, shape, affine, psc, voxel_noise, rng):
    """Yield each rendered volume as a float32 vector in NIfTI (F) order."""
    vox, reg, baseline, loading = _voxel_model(atlas, shape, affine, rng)
    nvox = int(np.prod(shape))
    scale = baseline * loading * (psc / 100.0)
    sd = baseline * (voxel_noise / 100.0)
    sig = np.nan_to_num(np.asarray(signals, dtype=np.float32))
    for t in range(sig.shape[0]):
        vol = np.zeros(nvox, dtype=np.float32)
        vol[vox] = baseline + scale * sig[t, reg] + sd * rng.standard_normal(vox.size,
                                                                              dtype=np.float32)
        yield vol


def _header(shape, affine, n_vol, tr, dtype, slope=None, inter=0.0) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((*shape, n_vol))
    hdr.set_data_dtype(np.dtype(dtype))
    hdr.set_qform(affine, code=4)  # 4 = MNI152
    hdr.set_sform(affine, code=4)
    hdr.set_xyzt_units("mm", "sec")
    zooms = list(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))) + [tr]
    hdr.set_zooms(zooms)
    if slope is not None:
        hdr.set_slope_inter(slope, inter)
    hdr["descrip"] = b"fmmtc simulate: SIMULATED data"
    return hdr


def _int16_scale(signals, psc) -> tuple[float, float]:
    top = 1000.0 * 1.1 * (1.0 + 1.4 * psc / 100.0 * float(np.nanmax(np.abs(signals))) + 0.1)
    return top / 32000.0, 0.0


def _write_stream(f, signals, atlas, shape, affine, tr, dtype, rng, psc, voxel_noise) -> None:
    """Write header + volumes of a single-file NIfTI-1 to the binary file object ``f``."""
    n_vol = signals.shape[0]
    slope, inter = _int16_scale(signals, psc) if dtype == "int16" else (None, 0.0)
    hdr = _header(shape, affine, n_vol, tr, np.int16 if dtype == "int16" else np.float32,
                  slope, inter)
    hdr.set_data_offset(352)
    out_dtype = hdr.get_data_dtype()
    hdr.write_to(f)  # 348 header bytes + the 4-byte (empty) extension flag
    for vol in _volumes(signals, atlas, shape, affine, psc, voxel_noise, rng):
        if slope is not None:
            vol = np.clip(np.rint((vol - inter) / slope), -32768, 32767)
        f.write(vol.astype(out_dtype).tobytes())


def render_nifti(
    signals: np.ndarray,
    atlas: Atlas | str,
    *,
    shape=FMRIPREP_MNI_2MM_SHAPE,
    affine=FMRIPREP_MNI_2MM_AFFINE,
    tr: float = 2.0,
    dtype: str = "float32",
    rng: np.random.Generator | None = None,
    psc: float = 1.0,
    voxel_noise: float = 1.2,
) -> nib.Nifti1Image:
    """Render region signals (T, R) into a 4D image in memory (for small grids).

    The same bytes as :func:`write_nifti` (see it for the parameters), returned as an image.
    """
    import io

    atlas = load_atlas(atlas)
    dtype = check_option("dtype", dtype, ("float32", "int16"))
    buf = io.BytesIO()
    _write_stream(buf, signals, atlas, tuple(shape), np.asarray(affine), tr, dtype,
                  rng or np.random.default_rng(), psc, voxel_noise)
    return nib.Nifti1Image.from_bytes(buf.getvalue())


def write_nifti(
    path: str | os.PathLike,
    signals: np.ndarray,
    atlas: Atlas | str,
    *,
    shape=FMRIPREP_MNI_2MM_SHAPE,
    affine=FMRIPREP_MNI_2MM_AFFINE,
    tr: float = 2.0,
    dtype: str = "float32",
    rng: np.random.Generator | None = None,
    psc: float = 1.0,
    voxel_noise: float = 1.2,
    compresslevel: int = 1,
) -> Path:
    """Render region signals (T, R) into the atlas voxels and stream them to a NIfTI file.

    Parameters
    ----------
    path : path
        ``.nii`` or ``.nii.gz``.
    signals : ndarray (T, R)
        Region signals in atlas order (unit SD scale).
    atlas : Atlas or str
    shape, affine : grid, default fMRIPrep's 2 mm MNI152NLin2009cAsym grid
    tr : float, seconds (written to ``pixdim[4]``)
    dtype : {"float32", "int16"}
        ``int16`` writes scaled integers (``scl_slope`` set).
    rng : numpy Generator
    psc : float
        Percent signal change of a unit signal.
    voxel_noise : float
        Voxel noise SD, percent of baseline.
    compresslevel : int, default=1
        gzip level for ``.nii.gz`` (1 is fast and compresses noise-heavy data nearly as well).

    Notes
    -----
    Memory stays at one volume: the header is written by nibabel, then each volume is encoded
    and appended; the file appears under its name only when complete.
    """
    atlas = load_atlas(atlas)
    dtype = check_option("dtype", dtype, ("float32", "int16"))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        f: io.BufferedIOBase
        if path.name.endswith(".gz"):
            f = gzip.open(tmp, "wb", compresslevel=compresslevel)
        else:
            f = open(tmp, "wb")
        with f:
            _write_stream(f, signals, atlas, tuple(shape), np.asarray(affine), tr, dtype,
                          rng or np.random.default_rng(), psc, voxel_noise)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------------
def write_cohort(
    out_dir: str | os.PathLike,
    n_subjects: int,
    *,
    seed: int = 0,
    fmt: str = "nifti",
    labelled: bool = True,
    atlas: Atlas | str = "hcpex",
    config: SimulationConfig | None = None,
    shape=FMRIPREP_MNI_2MM_SHAPE,
    affine=FMRIPREP_MNI_2MM_AFFINE,
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a simulated BIDS-style cohort (see the module docstring for the model).

    Parameters
    ----------
    out_dir : path
        Created if needed; must not already hold a ``participants.tsv``.
    n_subjects : int
        At least 2 (labelled cohorts get both classes).
    seed : int
        Everything is deterministic given the seed.
    fmt : {"nifti", "timeseries"}
        4D images (``*_desc-preproc_bold.nii.gz`` + sidecar + confounds) or region tables
        (``*_seg-<Atlas>_timeseries.tsv`` + sidecar + confounds).
    labelled : bool
        False writes an unlabelled pain-agnostic corpus (varied TR / length / sites).
    atlas, config, shape, affine, dtype
        As in :func:`simulate_subject` and :func:`write_nifti`.
    progress : callable(done, total) or None

    Returns
    -------
    Path of the cohort folder.
    """
    fmt = check_option("fmt", fmt, ("nifti", "timeseries"))
    if not isinstance(n_subjects, (int, np.integer)) or n_subjects < 2:
        raise InvalidInputError(f"A cohort needs at least 2 subjects, got {n_subjects!r}.")
    atlas = load_atlas(atlas)
    config = (config or SimulationConfig()).validate()
    root = Path(out_dir)
    if (root / "participants.tsv").exists():
        raise InvalidInputError(
            f"{root} already holds a cohort (participants.tsv); choose an empty folder."
        )
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    planted = planted_regions(atlas, config, seed) if labelled else None
    ids = [f"sub-{i + 1:03d}" for i in range(n_subjects)]
    sites = rng.integers(0, config.n_sites, n_subjects)
    responders = rng.permutation(np.arange(n_subjects) % 2) if labelled else None
    drugs = rng.choice(["drug_a", "drug_b"], n_subjects)
    rows = []
    for i, sub in enumerate(ids):
        srng = np.random.default_rng([seed, i])
        cfg = config
        if not labelled:
            tr = float(srng.choice(_TRS_CORPUS))
            minutes = srng.uniform(5.0, 10.0)
            cfg = replace(config, tr=tr, n_volumes=max(60, int(minutes * 60 / tr)))
        resp = None if responders is None else bool(responders[i])
        subject = simulate_subject(atlas, responder=resp, site=int(sites[i]), config=cfg,
                                   rng=srng, planted=planted)
        func = root / sub / "func"
        func.mkdir(parents=True, exist_ok=True)
        side = {"RepetitionTime": cfg.tr, "TaskName": "rest", "SkullStripped": False,
                "Simulated": True}
        subject.confounds.to_csv(func / f"{sub}_task-rest_desc-confounds_timeseries.tsv",
                                 sep="\t", index=False, na_rep="n/a", float_format="%.6g")
        if fmt == "nifti":
            bold = func / f"{sub}{BOLD_SUFFIX}"
            write_nifti(bold, subject.signals, atlas, shape=shape, affine=affine, tr=cfg.tr,
                        dtype=dtype, rng=srng, psc=cfg.psc, voxel_noise=cfg.voxel_noise)
            (func / bold.name.replace(".nii.gz", ".json")).write_text(json.dumps(side, indent=2))
        else:
            stem = f"{sub}_task-rest_space-MNI152NLin2009cAsym_seg-{atlas.name}_timeseries"
            pd.DataFrame(subject.signals, columns=list(atlas.names)).to_csv(
                func / f"{stem}.tsv", sep="\t", index=False, float_format="%.6g")
            (func / f"{stem}.json").write_text(json.dumps(side | {"Atlas": atlas.name}, indent=2))
        row: dict[str, object] = {"participant_id": sub}
        if labelled:
            assert resp is not None  # labelled cohorts draw a responder for every subject
            row["responder"] = int(resp)
        row |= {"site": f"site{int(sites[i]) + 1}", "drug": str(drugs[i])}
        rows.append(row)
        if progress is not None:
            progress(i + 1, n_subjects)
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "FMM-TC simulated " + ("cohort" if labelled else "pain-agnostic corpus"),
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fmmtc simulate", "Version": __version__}],
        "Simulated": True,
        "Description": "SIMULATED data from fmmtc_core.simulate; not acquired from any person.",
    }, indent=2))
    truth = {
        "simulated": True,
        "labelled": labelled,
        "seed": seed,
        "n_subjects": n_subjects,
        "atlas": atlas.name,
        "format": fmt,
        "config": asdict(config),
        "planted": None if planted is None else {
            k: v for k, v in planted.items() if not k.endswith("_index")
        },
    }
    (root / "simulation.json").write_text(json.dumps(truth, indent=2))
    return root


def demo_scan(seed: int = 7) -> tuple[Path, Path, Path]:
    """A simulated responder's scan for demonstrations, written once to the cache folder.

    Returns
    -------
    bold, sidecar, confounds : Path
        A 97x115x97x300 ``.nii.gz`` on fMRIPrep's 2 mm grid with its JSON and confounds.
    """
    config = SimulationConfig()
    # The folder name changes with the simulation's parameters, so a stale scan is never reused.
    tag = hashlib.sha1(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir() / "demo" / f"scan-{seed}-{tag}"
    bold = folder / f"sub-demo{BOLD_SUFFIX}"
    side = folder / "sub-demo_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.json"
    conf = folder / "sub-demo_task-rest_desc-confounds_timeseries.tsv"
    if bold.exists() and side.exists() and conf.exists():
        return bold, side, conf
    atlas = load_atlas("hcpex")
    rng = np.random.default_rng(seed)
    subject = simulate_subject(atlas, responder=True, config=config, rng=rng)
    folder.mkdir(parents=True, exist_ok=True)
    subject.confounds.to_csv(conf, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    side.write_text(json.dumps({"RepetitionTime": config.tr, "TaskName": "rest",
                                "Simulated": True}, indent=2))
    write_nifti(bold, subject.signals, atlas, tr=config.tr, rng=rng)
    return bold, side, conf
