"""Honest simulation of resting-state fMRI cohorts, deterministic by seed.

No public fMRI can be downloaded here, so the demo cohort, the tests and the ground truth of the
explanations come from a documented generative model:

1. **Region dynamics.** A stable multivariate autoregressive process, simulated at a step of
   TR / 4, whose coupling decays with the distance between region centroids (40 mm length
   scale), is stronger within a lobe, and is scaled to spectral radius 0.8; part of each
   region's innovations is shared within its lobe (network structure). The lobes here are a
   frozen part of the generator (:func:`fmmtc_core.atlas.voted_lobes`, the AAL3 vote of
   version 0.1), not the anatomy the pages show, so correcting the anatomy changes no
   simulated cohort and the demo model still rebuilds bit for bit.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.signal import lfilter
from scipy.stats import gamma

from fmmtc_core import __version__
from fmmtc_core._errors import InvalidInputError, check_option
from fmmtc_core.atlas import Atlas, cache_dir, load_atlas, voted_lobes

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
        Sites of a labelled cohort (must equal the length of the per-site tuples when given).
    site_gain_sd, site_noise_sd : float
        Relative spread of signal gain and noise level across sites.
    spike_rate : float
        Probability that a volume holds a motion spike.
    psc : float
        Percent signal change of a region signal of unit SD in the rendered image.
    voxel_noise : float
        Voxel noise SD in percent of the baseline intensity.
    latent_dt : float or None
        Step of the latent dynamics in seconds. None (the ``easy`` preset) steps at
        ``TR / oversample``, so the same coupling means slower dynamics in seconds at a longer
        TR; a fixed step makes the dynamics, and the temporal effect, the same in seconds at
        every TR (the scan is then sampled at its TR by linear interpolation).
    site_tr, site_minutes : tuple of float
        Per-site repetition time (s) and scan length (minutes) of a labelled cohort; empty:
        ``tr`` and ``n_volumes`` everywhere.
    site_share : tuple of float
        Relative number of participants per site; empty: uniform.
    site_responder_rate : tuple of float
        Per-site probability that a participant is a responder; empty: exactly balanced.
    regional_snr_sd : float
        SD of the log of a per-(site, region) measurement-noise multiplier: some regions are
        noisier at some sites (coil, susceptibility), fixed per site.
    effect_prevalence : float
        Probability that a responder carries each planted effect (drawn independently for the
        connectivity and the temporal effect): responders are heterogeneous below 1.
    effect_sd : float
        Relative SD of the effect magnitude across the responders who carry it.
    label_noise : float
        Probability that a participant's recorded label is the opposite of the biology that
        was simulated (outcome misclassification); below 0.5.
    fc_effect_kind : {"shared", "split"}
        ``shared``: extra coupling among all ``fc`` regions. ``split``: the ``fc`` set splits
        in two halves whose within-half coupling rises and between-half coupling falls.
    ts_effect_kind : {"ar", "ou"}
        ``ar``: ``ts_effect`` is added to the self-coupling of the ``ts`` regions' latent
        dynamics (the ``easy`` preset). ``ou``: each ``ts`` region of a responder gets its own
        Ornstein-Uhlenbeck fluctuation with time constant ``ts_tau_s`` seconds, of variance
        ``ts_effect`` relative to the region's signal: a change of the BOLD spectrum's shape
        that is defined in seconds (the same at every TR), survives per-region scaling, and
        barely touches connectivity (the fluctuations are independent across regions).
    ts_tau_s : float
        Time constant of the ``ou`` effect: 10 s puts its power below 0.04 Hz (slower
        fluctuations than the simulated BOLD), 1.5 s spreads it over the whole 0.01-0.1 Hz
        band (faster ones).

    See Also
    --------
    PRESETS : the named configurations (``easy``, ``realistic``, ``shifted``, ``heldout``).
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
    latent_dt: float | None = None
    site_tr: tuple[float, ...] = ()
    site_minutes: tuple[float, ...] = ()
    site_share: tuple[float, ...] = ()
    site_responder_rate: tuple[float, ...] = ()
    regional_snr_sd: float = 0.0
    effect_prevalence: float = 1.0
    effect_sd: float = 0.0
    label_noise: float = 0.0
    fc_effect_kind: str = "shared"
    ts_effect_kind: str = "ar"
    ts_tau_s: float = 10.0

    @classmethod
    def preset(cls, name: str, **overrides) -> SimulationConfig:
        """A named configuration (see :data:`PRESETS`), with ``overrides`` applied.

        Parameters
        ----------
        name : {"easy", "realistic", "shifted", "heldout"}
            The preset (a key of :data:`PRESETS`).
        **overrides
            Any field of :class:`SimulationConfig` (another name raises ``TypeError``).

        Returns
        -------
        SimulationConfig
            The preset with the overrides, validated (:meth:`validate`).

        Raises
        ------
        InvalidInputError
            ``name`` is not a preset, or the result does not validate.
        """
        name = check_option("preset", name, tuple(PRESETS))
        return replace(PRESETS[name], **overrides).validate()

    def site_count(self) -> int:
        """Sites of a labelled cohort: ``n_sites``, or the length of the per-site tuples.

        Returns
        -------
        int
            The common length of the non-empty per-site tuples (``site_tr``,
            ``site_minutes``, ``site_share``, ``site_responder_rate``); ``n_sites`` when all
            are empty. With tuples of different lengths (which :meth:`validate` refuses), one
            of them.
        """
        lengths = {len(t) for t in (self.site_tr, self.site_minutes, self.site_share,
                                    self.site_responder_rate) if t}
        return lengths.pop() if lengths else self.n_sites

    def validate(self) -> SimulationConfig:
        """Check the fields against each other and their ranges.

        Returns
        -------
        SimulationConfig
            ``self``, unchanged (so the call reads inline).

        Raises
        ------
        InvalidInputError
            A field is out of range (e.g. ``n_volumes`` below 10, ``tr`` or a ``site_tr``
            outside 0.1-10 s, ``spectral_radius`` outside (0, 1), ``label_noise`` not below
            0.5), the per-site tuples disagree in length or with ``n_sites``, or an effect
            kind is unknown.
        """
        if self.n_volumes < 10:
            raise InvalidInputError(f"n_volumes must be at least 10, got {self.n_volumes}.")
        if not 0.1 <= self.tr <= 10:
            raise InvalidInputError(f"tr must be between 0.1 and 10 s, got {self.tr}.")
        if not 0 < self.spectral_radius < 1:
            raise InvalidInputError("spectral_radius must be in (0, 1) for a stable process.")
        if self.n_sites < 1:
            raise InvalidInputError(f"n_sites must be at least 1, got {self.n_sites}.")
        lengths = {name: len(getattr(self, name)) for name in
                   ("site_tr", "site_minutes", "site_share", "site_responder_rate")
                   if getattr(self, name)}
        if len(set(lengths.values())) > 1:
            raise InvalidInputError(
                "The per-site tuples must have one entry per site; got lengths "
                + ", ".join(f"{k}={v}" for k, v in lengths.items()) + ".")
        if lengths and self.site_count() != self.n_sites:
            raise InvalidInputError(
                f"n_sites is {self.n_sites} but the per-site tuples describe "
                f"{self.site_count()} sites; make them agree.")
        if self.latent_dt is not None and not 0.01 <= self.latent_dt <= 2.0:
            raise InvalidInputError(
                f"latent_dt must be between 0.01 and 2 s (or None), got {self.latent_dt}.")
        if any(not 0.1 <= t <= 10 for t in self.site_tr):
            raise InvalidInputError(f"site_tr values must be between 0.1 and 10 s, got "
                                    f"{self.site_tr}.")
        if any(m <= 0 for m in self.site_minutes):
            raise InvalidInputError(f"site_minutes must be positive, got {self.site_minutes}.")
        if self.site_share and (any(w < 0 for w in self.site_share)
                                or sum(self.site_share) <= 0):
            raise InvalidInputError(
                f"site_share must be non-negative with a positive sum, got {self.site_share}.")
        if any(not 0 < r < 1 for r in self.site_responder_rate):
            raise InvalidInputError("site_responder_rate values must be in (0, 1), got "
                                    f"{self.site_responder_rate}.")
        for name in ("effect_prevalence", "label_noise"):
            value = getattr(self, name)
            if not 0 <= value <= 1 or (name == "label_noise" and value >= 0.5):
                raise InvalidInputError(
                    f"{name} must be in [0, 1]" + (" and below 0.5" if name == "label_noise"
                                                   else "") + f", got {value}.")
        if self.effect_sd < 0 or self.regional_snr_sd < 0:
            raise InvalidInputError("effect_sd and regional_snr_sd must be non-negative.")
        check_option("fc_effect_kind", self.fc_effect_kind, ("shared", "split"))
        check_option("ts_effect_kind", self.ts_effect_kind, ("ar", "ou"))
        if self.ts_effect_kind == "ou" and (self.ts_effect < 0 or not 0.1 <= self.ts_tau_s <= 100):
            raise InvalidInputError(
                "ts_effect_kind='ou' needs ts_effect >= 0 (a variance share) and ts_tau_s in "
                f"[0.1, 100] s; got {self.ts_effect} and {self.ts_tau_s}.")
        return self


#: Named simulation configurations.
#:
#: - ``easy``: the original generator (the demo model until it is rebuilt; strong, dense,
#:   fully penetrant effects at one TR). Every model scores near AUC 1 on it.
#: - ``realistic``: the default of the CLI, the demo, the ablation and the benchmarks. Sparse
#:   effects (6 + 6 planted regions of 426), per-edge connectivity effects that univariate tests
#:   at n ~ 120 barely see, responders who carry each effect with probability 0.75 and with a
#:   30 % spread of its size, 5 % flipped labels, three sites that differ in TR (0.8 / 1.5 /
#:   2.0 s), scan length, regional SNR, size and responder rate, latent dynamics on a fixed
#:   0.5 s grid, and a temporal effect defined in seconds (slower fluctuations: an ``ou``
#:   component with a 10 s time constant) that means the same at every TR.
#: - ``shifted``: a held-out generator for honest evaluation, never used to tune anything:
#:   four other sites (TR 0.72 / 1.0 / 2.5 / 3.0 s, other lengths and rates), a different
#:   connectivity effect shape (``split``: two sub-networks that couple within and decouple
#:   between), *faster* temporal fluctuations in responders (``ou`` with a 1.5 s time
#:   constant instead of 10 s), other planted-set sizes, more label noise, larger site effects.
#:   Cohorts from it should use seeds >= 10000.
#: - ``heldout``: a second held-out generator (added 2026-11-27, after ``shifted`` had been
#:   looked at while developing), for reporting only, never for choosing anything: two sites
#:   of very different protocols (TR 0.5 s / 4 min against 2.2 s / 14 min; 40 % and 55 %
#:   responders), a temporal effect of yet another shape (``ar``: more self-coupling of the
#:   planted regions' latent dynamics on the fixed 0.5 s grid, i.e. slower, smoother activity
#:   rather than an added fluctuation), a connectivity effect spread over 12 regions, stronger
#:   lobe structure, noisier regions and labels. Cohorts from it should use seeds >= 20000.
PRESETS: dict[str, SimulationConfig] = {
    "easy": SimulationConfig(),
    "realistic": SimulationConfig(
        n_fc_regions=6, n_ts_regions=6, fc_effect=0.18, ts_effect=1.0, ts_effect_kind="ou",
        ts_tau_s=10.0, noise_sd=0.4,
        latent_dt=0.5, n_sites=3, site_tr=(0.8, 1.5, 2.0), site_minutes=(6.0, 7.0, 8.0),
        site_share=(0.4, 0.35, 0.25), site_responder_rate=(0.4, 0.5, 0.6),
        regional_snr_sd=0.3, effect_prevalence=0.75, effect_sd=0.3, label_noise=0.05),
    "shifted": SimulationConfig(
        n_fc_regions=10, n_ts_regions=4, fc_effect=0.25, ts_effect=0.6, ts_effect_kind="ou",
        ts_tau_s=1.5, noise_sd=0.45,
        latent_dt=0.5, n_sites=4, site_tr=(0.72, 1.0, 2.5, 3.0),
        site_minutes=(5.0, 9.0, 10.0, 12.0), site_share=(0.3, 0.2, 0.3, 0.2),
        site_responder_rate=(0.35, 0.55, 0.45, 0.5), regional_snr_sd=0.4,
        effect_prevalence=0.7, effect_sd=0.4, label_noise=0.08, fc_effect_kind="split",
        site_gain_sd=0.25, site_noise_sd=0.5),
    "heldout": SimulationConfig(
        n_fc_regions=12, n_ts_regions=10, fc_effect=0.15, ts_effect=0.15, ts_effect_kind="ar",
        noise_sd=0.5, network_share=0.45,
        latent_dt=0.5, n_sites=2, site_tr=(0.5, 2.2), site_minutes=(4.0, 14.0),
        site_share=(0.6, 0.4), site_responder_rate=(0.4, 0.55), regional_snr_sd=0.5,
        effect_prevalence=0.65, effect_sd=0.35, label_noise=0.1, fc_effect_kind="shared",
        site_gain_sd=0.3, site_noise_sd=0.4),
}


@dataclass(eq=False)
class SimulatedSubject:
    """One simulated scan at the region level.

    Attributes
    ----------
    signals : ndarray (T, R) float32
        BOLD signal of every region, atlas order (arbitrary units: scaled to unit median SD
        before the site gain, noise, drift and spikes are added).
    confounds : DataFrame
        fMRIPrep-style confounds, one row per volume (:func:`fmriprep_confounds`).
    tr : float
        Repetition time, seconds.
    responder : bool or None
        Whether the responder effects were planted; None for an unlabelled subject.
    site : int
        Site index.
    spikes : ndarray of int, default=empty
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

    Regions of at least 1 cm^3 are preferred (all regions when too few are that large); they
    are picked round-robin over pain-related (``fc``) and valuation / default-mode (``ts``)
    name patterns, then at random (seeded) when the names do not suffice.

    Parameters
    ----------
    atlas : Atlas or str
        The atlas, or a name / path :func:`~fmmtc_core.atlas.load_atlas` takes.
    config : SimulationConfig or None, default=None
        Gives the set sizes ``n_fc_regions`` and ``n_ts_regions``; None: the defaults.
    seed : int, default=0
        Seed of the random part of the choice.

    Returns
    -------
    dict
        ``fc_index`` / ``ts_index`` (positions in atlas order), ``fc_labels`` / ``ts_labels``
        (atlas integer labels), ``fc_names`` / ``ts_names``.

    Raises
    ------
    InvalidInputError
        The atlas has fewer regions than the two sets need together.
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
    groups = np.asarray(voted_lobes(atlas))  # the generator's modules (frozen), not anatomy
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
    signals: np.ndarray, tr: float, rng: np.random.Generator, spikes: Iterable[int] = (),
    motion_scale: float = 1.0,
) -> pd.DataFrame:
    """fMRIPrep-like confounds for simulated region signals (T, R).

    Motion parameters are a slow random walk (mm, rad) with jumps at ``spikes``; framewise
    displacement follows Power et al. (2012) with a 50 mm head radius; DVARS is computed from the
    signals; CSF / white matter / global signals derive from the global mean plus noise.

    Parameters
    ----------
    signals : ndarray (T, R)
        Region signals, one row per volume.
    tr : float
        Repetition time, seconds (sets the number of cosine regressors).
    rng : numpy Generator
        Source of the motion and the noise of the tissue signals.
    spikes : iterable of int, default=()
        Volumes with a motion jump.
    motion_scale : float, default=1.0
        Multiplier of the motion random walk's steps (not of the spike jumps).

    Returns
    -------
    DataFrame
        One row per volume: ``trans_*`` / ``rot_*`` with their ``_derivative1``, ``_power2``
        and ``_derivative1_power2`` expansions, ``framewise_displacement`` (mm), ``dvars``,
        ``std_dvars``, ``global_signal`` / ``csf`` / ``white_matter`` with the same
        expansions, and ``cosineNN`` (128 s high-pass). First-row differences are NaN.
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
    effects: tuple[str, ...] = ("fc", "ts"),
    effect_scale: float = 1.0,
) -> SimulatedSubject:
    """Simulate one subject's region-level BOLD signals and confounds.

    Parameters
    ----------
    atlas : Atlas or str
        The atlas (or a name / path :func:`~fmmtc_core.atlas.load_atlas` takes); its centroids
        and lobes shape the coupling.
    responder : bool or None
        True plants the responder effects, False does not; None is an unlabelled subject.
    site : int, default=0
        Site index: sets the signal gain and noise level (deterministic per site).
    config : SimulationConfig or None, default=None
        The generative model; None: :class:`SimulationConfig` defaults.
    rng : numpy Generator or None, default=None
        None: a fresh, unseeded generator.
    planted : dict or None, default=None
        Output of :func:`planted_regions` (computed with seed 0 when None).
    effects : tuple of {"fc", "ts"}, default=("fc", "ts")
        The planted effects a responder carries (heterogeneous responders carry a subset).
    effect_scale : float, default=1.0
        Multiplier of ``fc_effect`` and ``ts_effect`` for this responder.

    Returns
    -------
    SimulatedSubject

    Raises
    ------
    InvalidInputError
        ``config`` does not validate (:meth:`SimulationConfig.validate`).
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
        if "fc" in effects:
            e = config.fc_effect * effect_scale / len(fc)
            if config.fc_effect_kind == "split":
                h1, h2 = fc[: len(fc) // 2], fc[len(fc) // 2 :]
                for x, y, sign in ((h1, h1, 1), (h2, h2, 1), (h1, h2, -1), (h2, h1, -1)):
                    a[np.ix_(x, y)] += sign * e
            else:
                a[np.ix_(fc, fc)] += e
        if "ts" in effects and config.ts_effect_kind == "ar":
            a[ts, ts] += config.ts_effect * effect_scale
    # The coupling is symmetric (distance- and lobe-based, symmetric effects): the symmetric
    # eigen-solver is exact and an order of magnitude faster than the general one.
    eig = np.linalg.eigvalsh if np.array_equal(a, a.T) else np.linalg.eigvals
    radius = np.abs(eig(a)).max()
    if radius >= 0.99:  # keep the process stable whatever the effect sizes
        a *= 0.99 / radius
    # Latent activity at TR / oversample (or on the fixed latent_dt grid), with a burn-in so
    # the start is stationary.
    burn = 200
    if config.latent_dt is not None:
        dt = config.latent_dt
        warm = int(np.ceil(32.0 / dt))  # the HRF's length: dropped after convolution
        n_steps = int(np.ceil(n_vol * config.tr / dt)) + warm + 2 + burn
    else:
        n_steps = (n_vol + 16) * k + burn
    innov = rng.standard_normal((n_steps, n_reg))
    if config.network_share > 0:
        _, group_of = np.unique(np.asarray(voted_lobes(atlas)), return_inverse=True)
        common = rng.standard_normal((n_steps, group_of.max() + 1))
        innov = (np.sqrt(1 - config.network_share) * innov
                 + np.sqrt(config.network_share) * common[:, group_of])
    z = np.empty_like(innov)
    z[0] = innov[0]
    at = a.T.copy()
    for t in range(1, n_steps):
        z[t] = z[t - 1] @ at + innov[t]
    z = z[burn:]
    if config.latent_dt is not None:
        latent = lfilter(_hrf(config.latent_dt), [1.0], z, axis=0)[warm:]
        pos = np.arange(n_vol) * config.tr / config.latent_dt
        i0 = np.floor(pos).astype(int)
        frac = (pos - i0)[:, None]
        bold = (1 - frac) * latent[i0] + frac * latent[i0 + 1]
    else:
        bold = lfilter(_hrf(config.tr / k), [1.0], z, axis=0)[16 * k :: k][:n_vol]
    bold /= np.median(bold.std(axis=0))
    if responder and "ts" in effects and config.ts_effect_kind == "ou" and effect_scale > 0:
        assert planted is not None  # set above for a responder
        ts = np.asarray(planted["ts_index"])
        rho = np.exp(-config.tr / config.ts_tau_s)  # exact OU steps at the scan's TR
        ou = np.empty((n_vol, len(ts)))
        ou[0] = rng.standard_normal(len(ts))
        kick = np.sqrt(1 - rho**2) * rng.standard_normal((n_vol, len(ts)))
        for t in range(1, n_vol):
            ou[t] = rho * ou[t - 1] + kick[t]
        bold[:, ts] += np.sqrt(config.ts_effect * effect_scale) * bold[:, ts].std(0) * ou
    site_rng = np.random.default_rng([site, 12345])
    gain = 1.0 + config.site_gain_sd * site_rng.standard_normal()
    noise: float | np.ndarray = config.noise_sd * (
        1.0 + config.site_noise_sd * abs(site_rng.standard_normal()))
    if config.regional_snr_sd > 0:  # some regions are noisier at some sites, fixed per site
        regional = np.random.default_rng([site, 54321]).standard_normal(n_reg)
        noise = noise * np.exp(config.regional_snr_sd * regional)
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
    shape: tuple[int, int, int] = FMRIPREP_MNI_2MM_SHAPE,
    affine: np.ndarray = FMRIPREP_MNI_2MM_AFFINE,
    tr: float = 2.0,
    dtype: str = "float32",
    rng: np.random.Generator | None = None,
    psc: float = 1.0,
    voxel_noise: float = 1.2,
) -> nib.Nifti1Image:
    """Render region signals (T, R) into a 4D image in memory (for small grids).

    The same bytes as :func:`write_nifti` (uncompressed), returned as an image.

    Parameters
    ----------
    signals : ndarray (T, R)
        Region signals in atlas order (unit SD scale).
    atlas : Atlas or str
        The atlas whose voxels receive the signals (or what :func:`load_atlas` takes).
    shape : tuple of int, default=FMRIPREP_MNI_2MM_SHAPE
        Spatial grid shape (fMRIPrep's 2 mm MNI152NLin2009cAsym grid by default).
    affine : ndarray (4, 4), default=FMRIPREP_MNI_2MM_AFFINE
        Voxel-to-mm affine of the grid.
    tr : float, default=2.0
        Repetition time, seconds (written to ``pixdim[4]``).
    dtype : {"float32", "int16"}, default="float32"
        ``int16`` writes scaled integers (``scl_slope`` set).
    rng : numpy Generator or None, default=None
        Source of the voxel model and noise; None: a fresh, unseeded generator.
    psc : float, default=1.0
        Percent signal change of a unit signal.
    voxel_noise : float, default=1.2
        Voxel noise SD, percent of baseline.

    Returns
    -------
    nibabel.Nifti1Image
        The 4D image (X, Y, Z, T); background voxels are 0.

    Raises
    ------
    InvalidInputError
        ``dtype`` is not one of the two, or the atlas cannot be loaded.
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
    shape: tuple[int, int, int] = FMRIPREP_MNI_2MM_SHAPE,
    affine: np.ndarray = FMRIPREP_MNI_2MM_AFFINE,
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
        The atlas whose voxels receive the signals (or what :func:`load_atlas` takes).
    shape : tuple of int, default=FMRIPREP_MNI_2MM_SHAPE
        Spatial grid shape (fMRIPrep's 2 mm MNI152NLin2009cAsym grid by default).
    affine : ndarray (4, 4), default=FMRIPREP_MNI_2MM_AFFINE
        Voxel-to-mm affine of the grid.
    tr : float, default=2.0
        Repetition time, seconds (written to ``pixdim[4]``).
    dtype : {"float32", "int16"}, default="float32"
        ``int16`` writes scaled integers (``scl_slope`` set).
    rng : numpy Generator or None, default=None
        Source of the voxel model and noise; None: a fresh, unseeded generator.
    psc : float, default=1.0
        Percent signal change of a unit signal.
    voxel_noise : float, default=1.2
        Voxel noise SD, percent of baseline.
    compresslevel : int, default=1
        gzip level for ``.nii.gz`` (1 is fast and compresses noise-heavy data nearly as well).

    Returns
    -------
    Path
        ``path``, complete.

    Raises
    ------
    InvalidInputError
        ``dtype`` is not one of the two, or the atlas cannot be loaded.

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
    shape: tuple[int, int, int] = FMRIPREP_MNI_2MM_SHAPE,
    affine: np.ndarray = FMRIPREP_MNI_2MM_AFFINE,
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
    subjects: Sequence[int] | None = None,
) -> Path:
    """Write a simulated BIDS-style cohort (see the module docstring for the model).

    Parameters
    ----------
    out_dir : path
        Created if needed; must not already hold a ``participants.tsv``.
    n_subjects : int
        At least 2 (labelled cohorts get both classes).
    seed : int, default=0
        Everything is deterministic given the seed.
    fmt : {"nifti", "timeseries"}, default="nifti"
        4D images (``*_desc-preproc_bold.nii.gz`` + sidecar + confounds) or region tables
        (``*_seg-<Atlas>_timeseries.tsv`` + sidecar + confounds).
    labelled : bool, default=True
        False writes an unlabelled pain-agnostic corpus (TR and length drawn per subject;
        no ``responder`` column, no planted effect).
    atlas : Atlas or str, default="hcpex"
        As in :func:`simulate_subject`.
    config : SimulationConfig or None, default=None
        The generative model; None: :class:`SimulationConfig` defaults (the ``easy`` preset).
    shape : tuple of int, default=FMRIPREP_MNI_2MM_SHAPE
        Image grid (``fmt="nifti"`` only), as in :func:`write_nifti`.
    affine : ndarray (4, 4), default=FMRIPREP_MNI_2MM_AFFINE
        Voxel-to-mm affine of the grid (``fmt="nifti"`` only).
    dtype : {"float32", "int16"}, default="float32"
        Image data type (``fmt="nifti"`` only), as in :func:`write_nifti`.
    progress : callable(done, total) or None, default=None
        Called after each subject is written.
    subjects : sequence of int or None, default=None
        Write only these subjects (0-based positions in the cohort of ``n_subjects``); None:
        all. The cohort-level draws (sites, labels, planted regions) are made for the whole
        cohort and every subject has its own random stream, so subject ``i`` is the same
        bit for bit whichever subset it is written with; ``participants.tsv`` and
        ``simulation.json`` list the subjects written. The dashboard's demo job writes one
        subject at a time this way, to screen each as soon as it exists.

    Returns
    -------
    Path
        The cohort folder, with ``participants.tsv``, ``dataset_description.json`` and
        ``simulation.json`` (the configuration and, when labelled, the planted regions and
        each subject's recorded label, biology and effects).

    Raises
    ------
    InvalidInputError
        ``fmt`` is unknown, ``n_subjects`` is not an integer of at least 2, ``config`` does
        not validate, or ``out_dir`` already holds a ``participants.tsv``.
    """
    fmt = check_option("fmt", fmt, ("nifti", "timeseries"))
    if not isinstance(n_subjects, (int, np.integer)) or n_subjects < 2:
        raise InvalidInputError(f"A cohort needs at least 2 subjects, got {n_subjects!r}.")
    wanted = None if subjects is None else {int(i) for i in subjects}
    if wanted is not None and (not wanted or min(wanted) < 0 or max(wanted) >= n_subjects):
        raise InvalidInputError(
            f"subjects must be positions 0 to {n_subjects - 1} of the cohort, got "
            f"{sorted(wanted)!r}.")
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
    # The realistic knobs draw from their own streams, so the easy preset's cohorts stay the
    # same bit for bit.
    truth_rng = np.random.default_rng([seed, 424242])
    if config.site_share:
        share = np.asarray(config.site_share, float)
        sites = truth_rng.choice(len(share), n_subjects, p=share / share.sum())
    if labelled and config.site_responder_rate:
        rate = np.asarray(config.site_responder_rate)[sites]
        responders = (truth_rng.random(n_subjects) < rate).astype(int)
        for cls in (0, 1):  # both classes, at least two of each, whatever the draw
            while (responders == cls).sum() < min(2, n_subjects // 2):
                others = np.flatnonzero(responders != cls)
                responders[truth_rng.choice(others)] = cls
    biology = None if responders is None else responders.copy()
    if responders is not None and config.label_noise > 0:
        flip = truth_rng.random(n_subjects) < config.label_noise
        responders = np.where(flip, 1 - responders, responders)
    rows = []
    subjects_truth = []
    for i, sub in enumerate(ids):
        if wanted is not None and i not in wanted:
            continue  # every subject has its own streams: skipping one changes no other
        srng = np.random.default_rng([seed, i])
        cfg = config
        if not labelled:
            tr = float(srng.choice(_TRS_CORPUS))
            minutes = srng.uniform(5.0, 10.0)
            cfg = replace(config, tr=tr, n_volumes=max(60, int(minutes * 60 / tr)))
        elif config.site_tr or config.site_minutes:
            tr = config.site_tr[sites[i]] if config.site_tr else config.tr
            n_vol = (int(round(config.site_minutes[sites[i]] * 60 / tr))
                     if config.site_minutes else config.n_volumes)
            cfg = replace(config, tr=float(tr), n_volumes=n_vol)
        resp = None if responders is None else bool(responders[i])
        carrier = None if biology is None else bool(biology[i])
        effects: tuple[str, ...] = ("fc", "ts")
        scale = 1.0
        if carrier and (config.effect_prevalence < 1 or config.effect_sd > 0):
            erng = np.random.default_rng([seed, i, 777])
            effects = tuple(e for e in ("fc", "ts")
                            if erng.random() < config.effect_prevalence)
            scale = float(np.clip(1.0 + config.effect_sd * erng.standard_normal(), 0.0, 1.6))
        subject = simulate_subject(atlas, responder=carrier, site=int(sites[i]), config=cfg,
                                   rng=srng, planted=planted, effects=effects,
                                   effect_scale=scale)
        if labelled:
            subjects_truth.append({
                "participant_id": sub, "responder_label": int(bool(resp)),
                "responder_biology": int(bool(carrier)),
                "effects": list(effects) if carrier else [],
                "effect_scale": round(scale, 4) if carrier else 0.0,
                "tr": cfg.tr, "n_volumes": cfg.n_volumes})
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
            progress(len(rows), n_subjects if wanted is None else len(wanted))
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
        } | {"fc_effect_kind": config.fc_effect_kind},
        "subjects": subjects_truth or None,
    }
    (root / "simulation.json").write_text(json.dumps(truth, indent=2))
    return root


def demo_scan(seed: int = 7) -> tuple[Path, Path, Path]:
    """A simulated responder's scan for demonstrations, written once to the cache folder.

    The scan is reused when its three files exist in :func:`~fmmtc_core.atlas.cache_dir`
    (``demo/scan-<seed>-<hash of the default SimulationConfig>``).

    Parameters
    ----------
    seed : int, default=7
        Seed of the simulation and of the rendering.

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
