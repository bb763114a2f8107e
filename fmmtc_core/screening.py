"""The screening pipeline shared by the dashboard, the CLI and batch jobs.

:func:`analyse` runs load + validate -> parcellate -> QC -> clean -> predict -> explain on one
scan and returns everything in memory (nothing is stored); :func:`screen` (store issue) wraps it
in one database transaction. Each stage reports progress through one callback,
``progress(stage, done, total, info)``, with stages named in :data:`STAGES`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
import datetime as dt
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmmtc_core import config
from fmmtc_core._docs import fill_doc
from fmmtc_core._errors import InvalidInputError, ModelFileError, QCFailedError
from fmmtc_core.atlas import load_atlas
from fmmtc_core.bids import read_cohort
from fmmtc_core.explain import Explanation, explain
from fmmtc_core.io import Scan
from fmmtc_core.models.deployed import card_cleaning
from fmmtc_core.pipeline import load_and_clean, scan_name
from fmmtc_core.preprocess import RegionSignals
from fmmtc_core.qc import QCReport, QCThresholds, qc_report
from fmmtc_core.store.repository import default_operator
from fmmtc_core.summary import ScreeningSummary

if TYPE_CHECKING:  # torch and sqlalchemy load only when a screening runs
    from sqlalchemy import Engine

    from fmmtc_core.models.deployed import ScreeningModel

__all__ = ["Analysis", "analyse", "decide", "screen", "ScreeningResult", "STAGES",
           "DEFAULT_THRESHOLDS", "QCFailedError", "inputs_digest", "ComputedScreening",
           "computed_screening", "store_computed"]

#: Pipeline stages, in order, as reported to progress callbacks.
STAGES = ("validate", "parcellate", "qc", "clean", "predict", "explain", "save")

#: Decision thresholds on the calibrated probability (the team can change them).
DEFAULT_THRESHOLDS = config.DEFAULT_THRESHOLDS

Progress = Callable[[str, int, int, dict], None] | None


def decide(probability: float, band: tuple[float, float], thresholds: dict | None = None) -> str:
    """``"likely responder"``, ``"likely non-responder"`` or ``"uncertain"``.

    A participant is called a likely responder when the whole uncertainty band lies at or above
    the responder threshold, a likely non-responder when it lies at or below the non-responder
    threshold; anything else is uncertain. The probability itself must lie on the same side
    (``min(band[0], probability) >= responder``, ``max(band[1], probability) <=
    non_responder``).

    Parameters
    ----------
    probability : float
        Calibrated responder probability.
    band : (float, float)
        Its uncertainty band, (low, high).
    thresholds : dict or None, default=None
        ``responder`` and / or ``non_responder`` probabilities, over
        :data:`DEFAULT_THRESHOLDS` (0.6 and 0.4).

    Returns
    -------
    str
        ``"likely responder"``, ``"likely non-responder"`` or ``"uncertain"``.

    Raises
    ------
    InvalidInputError
        The thresholds in force do not satisfy ``0 <= non_responder <= responder <= 1``.
    """
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    lo, hi = float(band[0]), float(band[1])
    if not 0.0 <= t["non_responder"] <= t["responder"] <= 1.0:
        raise InvalidInputError(
            "Thresholds must satisfy 0 <= non_responder <= responder <= 1, got "
            f"non_responder={t['non_responder']}, responder={t['responder']}.")
    if min(lo, probability) >= t["responder"]:
        return "likely responder"
    if max(hi, probability) <= t["non_responder"]:
        return "likely non-responder"
    return "uncertain"


@dataclass
class Analysis:
    """Everything one screening computes (see :func:`analyse`).

    Each field is also an attribute of the same name.

    Parameters
    ----------
    scan : Scan
        The loaded, validated scan.
    signals : RegionSignals
        Its cleaned region series.
    qc : QCReport
        Its QC report (not a failure: a failing scan raises instead).
    probability : float
        Calibrated responder probability (the calibrated mean scaled fold logit).
    band : (float, float)
        Its uncertainty band, (low, high)
        (:meth:`~fmmtc_core.models.ensemble.FMMTCEnsemble.predict_proba`, or a classic
        baseline's).
    fold_probabilities : list of float
        Calibrated probability of each fold model.
    decision : str
        :func:`decide` of ``probability`` and ``band``.
    thresholds : dict
        The decision thresholds in force (:data:`DEFAULT_THRESHOLDS` updated with those
        given).
    explanation : Explanation or None
        Integrated Gradients attributions; None when not asked for.
    window : ndarray
        The time-series input the model took (:attr:`~fmmtc_core.preprocess.ModelInputs.window`).
    fc : ndarray (R, R)
        The connectivity input (:attr:`~fmmtc_core.preprocess.ModelInputs.fc`, Fisher z).
    stage_seconds : dict, default={}
        Seconds per stage: ``load`` (the ``validate`` stage), ``parcellate``, ``qc``,
        ``clean``, ``predict`` and, when explained, ``explain``; :func:`screen` adds
        ``save``.
    amplitude : ndarray (R,) or (4 R,) or None, default=None
        The regional amplitude input (:attr:`~fmmtc_core.preprocess.ModelInputs.amplitude`;
        4 R values for models that read the regional dynamics).
    """

    scan: Scan
    signals: RegionSignals  # cleaned
    qc: QCReport
    probability: float
    band: tuple[float, float]
    fold_probabilities: list[float]
    decision: str
    thresholds: dict
    explanation: Explanation | None
    window: np.ndarray  # the TS input the model took (ModelInputs.window)
    fc: np.ndarray
    stage_seconds: dict = field(default_factory=dict)
    amplitude: np.ndarray | None = None  # ModelInputs.amplitude

    @property
    def runtime_s(self) -> float:
        """Total seconds: the sum of :attr:`stage_seconds`."""
        return float(sum(self.stage_seconds.values()))

    def to_dict(self, *, n_regions: int | None = None) -> dict:
        """JSON-ready summary (the ``fmmtc explain --json`` output).

        Parameters
        ----------
        n_regions : int or None, default=None
            Keep only the first (strongest) regions of the explanation; None keeps all.

        Returns
        -------
        dict
            ``probability``, ``band``, ``decision``, ``thresholds``, ``qc`` (``verdict`` and
            ``reasons``), ``stage_seconds`` and ``runtime_s`` (rounded to 4 decimals); with an
            explanation also the keys of :meth:`~fmmtc_core.explain.Explanation.to_dict`
            (``runtime_s`` stays this analysis's total).
        """
        out = {
            "probability": float(self.probability),
            "band": [float(self.band[0]), float(self.band[1])],
            "decision": self.decision,
            "thresholds": self.thresholds,
            "qc": {"verdict": self.qc.verdict, "reasons": list(self.qc.reasons)},
            "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
            "runtime_s": round(self.runtime_s, 4),
        }
        if self.explanation is not None:
            out.update(self.explanation.to_dict(n_regions=n_regions))
            out["runtime_s"] = round(self.runtime_s, 4)
        return out


@fill_doc
def analyse(
    source: str | os.PathLike,
    model: ScreeningModel,
    *,
    sidecar=None,
    confounds=None,
    thresholds: dict | None = None,
    qc_thresholds: QCThresholds | None = None,
    explain_kwargs: dict | None = None,
    with_explanation: bool = True,
    min_volumes: int | None = None,
    progress: Progress = None,
) -> Analysis:
    """Run the screening computation on one scan file (nothing is stored).

    Parameters
    ----------
    source : path
        4D NIfTI or region time-series table (see :func:`fmmtc_core.io.load_scan`).
    %(model)s
    %(sidecar)s
    %(confounds)s
    thresholds : dict or None, default=None
        Decision thresholds, over :data:`DEFAULT_THRESHOLDS`; checked before any work.
    qc_thresholds : QCThresholds or None, default=None
        QC limits; None uses the defaults.
    explain_kwargs : dict or None, default=None
        Passed to :func:`fmmtc_core.explain.explain` (baselines, tolerance, steps).
    with_explanation : bool, default=True
        Explain the prediction (Integrated Gradients); False leaves ``explanation`` None.
    min_volumes : int or None, default=None
        Fewest volumes accepted (``--min-volumes``); None: :func:`~fmmtc_core.io.load_scan`'s
        default.
    progress : callable(stage, done, total, info) or None, default=None
        Called as each stage advances: ``validate``, ``parcellate``, ``qc`` and ``clean``
        (:func:`fmmtc_core.pipeline.load_and_clean`), then ``("predict", 0, 1, {})`` and
        ``("predict", 1, 1, {})`` and, with the explanation, ``("explain", 0, 1, {})`` and
        ``("explain", k, n, {"steps": .., "gap": ..})`` per attempt. Each stage is announced
        (``done`` 0) before its work starts.

    Returns
    -------
    Analysis
        Everything computed; ``stage_seconds`` holds each stage's time.

    Raises
    ------
    InvalidInputError
        Bad input of any kind (thresholds that do not satisfy ``0 <= non_responder <=
        responder <= 1``, a scan that cannot be read, cleaned or explained, a model input with
        non-finite values); :class:`QCFailedError` when the scan fails hard QC.
    """
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    decide(0.5, (0.5, 0.5), thresholds)  # validate the thresholds before any work
    atlas = load_atlas(model.atlas)
    prep = load_and_clean(source, atlas, sidecar=sidecar, confounds=confounds,
                          qc=partial(qc_report, thresholds=qc_thresholds), progress=progress,
                          min_volumes=min_volumes,
                          cleaning=card_cleaning(model.card))  # as the model was trained
    # Both were asked for: the model's cleaning and a QC function.
    assert prep.signals is not None and prep.qc is not None
    times = dict(prep.stage_seconds)
    t0 = time.perf_counter()
    if progress:  # every stage is announced before its work, so a label is never one late
        progress("predict", 0, 1, {})
    inputs = model.inputs(prep.signals)  # the one path: as the model was trained
    assert inputs.fc is not None  # prepare computes the connectivity by default
    for name, arr in (("time-series window", inputs.window), ("connectivity", inputs.fc)):
        if arr is not None and _nonfinite(arr):
            raise InvalidInputError(
                f"{scan_name(prep.scan)}: the model input ({name}) holds non-finite values; the "
                "scan's values are out of range. Nothing was stored.")
    amplitude = None if inputs.amplitude is None else inputs.amplitude[None]
    pred = model.predict_proba(inputs.window[None], inputs.fc[None], amplitude)
    t1 = time.perf_counter()
    times["predict"] = t1 - t0
    if progress:
        progress("predict", 1, 1, {})
    probability = float(pred["probability"][0])
    band = (float(pred["band"][0, 0]), float(pred["band"][0, 1]))
    fold_p = model.fold_probabilities(pred["fold_logits"][:, 0])
    explanation = None
    if with_explanation:
        if progress:
            progress("explain", 0, 1, {})

        def exp_progress(stage, done, total, info):
            if progress:
                progress("explain", done, total, info or {})

        explanation = explain(model, inputs.window, inputs.fc, atlas=atlas,
                              amplitude=inputs.amplitude,
                              progress=exp_progress, **(explain_kwargs or {}))
        times["explain"] = time.perf_counter() - t1
    return Analysis(
        scan=prep.scan, signals=prep.signals, qc=prep.qc, probability=probability, band=band,
        fold_probabilities=[float(p) for p in fold_p],
        decision=decide(probability, band, thresholds), thresholds=thresholds,
        explanation=explanation, window=inputs.window, fc=inputs.fc, stage_seconds=times,
        amplitude=inputs.amplitude,
    )


# --------------------------------------------------------------------------------------------
# Screening into the cohort database
# --------------------------------------------------------------------------------------------
def inputs_digest(source, sidecar=None, confounds=None) -> tuple[str, str]:
    """(scan SHA-256, SHA-256 of everything that decides the result: scan, sidecar, confounds).

    The scan hash is the image's identity (one image, one participant); the second decides
    whether a stored screening can be reused. The sidecar is the one given or the one found
    beside the scan, as :func:`load_scan` would. Side files are checked (regular files within
    their size limits) before they are read, so a pipe or a device never blocks the hashing.

    Parameters
    ----------
    source : path
        The scan file (NIfTI or region table).
    sidecar : path or None, default=None
        Its JSON sidecar; None: the one beside the scan (:func:`fmmtc_core.io.find_sidecar`),
        if any. Only a file can be hashed: a dict is not accepted.
    confounds : path or None, default=None
        Its fMRIPrep confounds file; a DataFrame is not accepted.

    Returns
    -------
    scan_sha256 : str
        SHA-256 (hex) of the scan file's bytes.
    inputs_sha256 : str
        SHA-256 (hex) of the scan's digest and, each after a ``|``, the digests of the
        sidecar and of the confounds (nothing for one that is absent).

    Raises
    ------
    InvalidInputError
        The scan, the sidecar or the confounds file is missing, not a regular file or
        unreadable, or a side file is over its size limit
        (:data:`~fmmtc_core.io.MAX_SIDECAR_BYTES`, :data:`~fmmtc_core.io.MAX_TABLE_BYTES`).
    """
    from fmmtc_core.io import (
        MAX_SIDECAR_BYTES,
        MAX_TABLE_BYTES,
        _check_regular_file,
        file_sha256,
        find_sidecar,
    )

    scan_sha = file_sha256(source, "Scan file")
    h = hashlib.sha256(scan_sha.encode())
    side = sidecar if sidecar is not None else find_sidecar(source)
    for extra, what, limit in ((side, "Sidecar", MAX_SIDECAR_BYTES),
                               (confounds, "Confounds file", MAX_TABLE_BYTES)):
        h.update(b"|")
        if extra is not None:
            _check_regular_file(Path(extra), what, "a regular file", limit)
            h.update(file_sha256(extra, what).encode())
    return scan_sha, h.hexdigest()


@dataclass
class ScreeningResult:
    """A stored screening: its summary, and the in-memory analysis (None when an earlier
    screening was returned).

    Parameters
    ----------
    summary : ScreeningSummary
        The screening as stored (``screening_id`` set).
    analysis : Analysis or None, default=None
        What :func:`analyse` computed; None when a stored screening was returned.
    """

    summary: ScreeningSummary
    analysis: Analysis | None = None

    @property
    def screening_id(self) -> int:
        """Database id of the screening (the summary's; it must be set)."""
        assert self.summary.screening_id is not None
        return self.summary.screening_id

    @property
    def participant(self) -> str:
        """Study pseudonym of the participant."""
        return self.summary.participant

    @property
    def probability(self) -> float:
        """Calibrated responder probability."""
        return self.summary.probability

    @property
    def band(self) -> tuple[float, float]:
        """Uncertainty band of the probability, (low, high)."""
        return self.summary.band

    @property
    def decision(self) -> str:
        """``"likely responder"``, ``"likely non-responder"`` or ``"uncertain"``."""
        return self.summary.decision

    @property
    def reused(self) -> bool:
        """Whether an earlier stored screening of the same inputs was returned."""
        return self.summary.reused

    def to_dict(self) -> dict:
        """The summary as a JSON-ready dict (the ``fmmtc screen --json`` output).

        Returns
        -------
        dict
            :meth:`ScreeningSummary.to_dict <fmmtc_core.summary.ScreeningSummary.to_dict>`,
            every region included.
        """
        return self.summary.to_dict()


def _stored_outcome(s, scan_sha: str, key: str, model, pseudonym: str,
                    force: bool) -> ScreeningResult | None:
    """What the database already holds for this image, as the answer to give (or a refusal).

    - the image belongs to another participant: refused (one image, one participant, whatever
      side files come with it);
    - the same inputs (image + sidecar + confounds) were screened with this model: that
      screening is returned, unless ``force``;
    - the same image with other side files: refused unless ``force`` (a new revision then).
    """
    from fmmtc_core.store import repository as repo

    scan = repo.find_scan(s, scan_sha)
    if scan is None:
        return None
    owner = scan.participant.pseudonym
    if owner != pseudonym:
        raise InvalidInputError(
            f"This scan was already screened for participant {owner!r}; a scan belongs to one "
            "participant (whatever sidecar or confounds come with it). Check the pseudonym.")
    latest = repo.latest_screening(s, scan_sha, model.weights_sha256)
    if latest is None or force:
        return None
    if latest.inputs_sha256 != key:
        raise InvalidInputError(
            f"This scan was already screened for {owner!r} with this model (screening "
            f"{latest.id}) with other side files (JSON sidecar or confounds). To screen it "
            "again with these files, use --force (or 'Screen again' in the dashboard); the "
            "earlier screening is kept.")
    return ScreeningResult(ScreeningSummary.from_row(repo.get_screening(s, latest.id),
                                                     reused=True))


def _nonfinite(value) -> bool:
    arr = np.asarray(value, dtype=float)
    return arr.size > 0 and not np.isfinite(arr).all()


def _check_storable(summary: ScreeningSummary, model) -> None:
    """Refuse, before the write transaction, anything non-finite: nothing NaN or infinite is
    ever stored. A non-finite model output names the model (a broken calibration, say)."""
    outputs = {"probability": summary.probability, "band": summary.band,
               "fold probabilities": summary.fold_probabilities}
    for name, value in outputs.items():
        if _nonfinite(value):
            raise ModelFileError(
                f"The model {model.name!r} gave a non-finite {name} ({value!r}); its "
                "calibration or weights are broken. Nothing was stored; retrain the model or "
                "choose another.")
    for name in ("share_ts", "share_fc", "ig_gap"):
        value = getattr(summary, name)
        if value is not None and _nonfinite(value):
            raise ModelFileError(
                f"The explanation by model {model.name!r} is not finite ({name} = {value!r}); "
                "nothing was stored.")
    if _nonfinite([v for r in summary.regions for v in (r.ts, r.fc, r.score)]) or _nonfinite(
            [c.score for c in summary.connections]):
        raise ModelFileError(f"The explanation by model {model.name!r} holds non-finite "
                             "attributions; nothing was stored.")


@fill_doc
def screen(
    source: str | os.PathLike,
    participant: str,
    model: ScreeningModel,
    engine: Engine,
    *,
    sidecar=None,
    confounds=None,
    site: str | None = None,
    drug: str | None = None,
    arm: str | None = None,
    simulated: bool = False,
    thresholds: dict | None = None,
    explain_kwargs: dict | None = None,
    operator: str | None = None,
    force: bool = False,
    min_volumes: int | None = None,
    progress: Progress = None,
) -> ScreeningResult:
    """Screen one scan and store it: load + validate -> QC -> preprocess -> predict -> explain
    -> store, with the store in **one transaction**: either the participant, scan, screening,
    attributions and audit rows are all written, or nothing is.

    The same scan content (with the same sidecar and confounds) screened with the same model
    returns the stored screening, unless ``force``. A scan failing hard QC raises
    :class:`QCFailedError` and stores nothing. Raw images are never stored: only the cleaned
    region series (see :mod:`fmmtc_core.store.models`).

    Parameters
    ----------
    source : path
        4D NIfTI or region time-series table (see :func:`fmmtc_core.io.load_scan`).
    participant : str
        Study pseudonym (validated; a leading ``sub-`` is dropped).
    %(model)s
    %(engine)s
    sidecar : path or None, default=None
        BIDS JSON sidecar of the scan; None: the one beside the scan, if any. A file only:
        it is hashed (:func:`inputs_digest`) before the scan is read, so a dict is not
        accepted here.
    confounds : path or None, default=None
        fMRIPrep ``desc-confounds_timeseries.tsv`` of the same run (a file, hashed like the
        sidecar; not a DataFrame); it enables confound regression.
    site, drug, arm : str or None, default=None
        The participant's labels (validated); stored when not yet known, a known value is
        never overwritten.
    simulated : bool, default=False
        Mark a new participant as simulated (demo data; an existing one keeps its flag).
    thresholds : dict or None, default=None
        Decision thresholds, over :data:`DEFAULT_THRESHOLDS`; not applied to a stored
        screening that is returned.
    explain_kwargs : dict or None, default=None
        Passed to :func:`fmmtc_core.explain.explain`.
    operator : str or None, default=None
        Who runs it (audit log); None: :func:`default_operator`.
    force : bool, default=False
        Screen again (a new revision) even when these inputs were screened with this model,
        or when the same image was screened with other side files.
    min_volumes : int or None, default=None
        Fewest volumes accepted; None: :func:`~fmmtc_core.io.load_scan`'s default.
    progress : callable(stage, done, total, info) or None, default=None
        Stages :data:`STAGES`, each announced (``done`` 0) before its work and reported done
        (see :func:`analyse`; ``("save", 0, 1, {})`` before the write); only
        ``("save", 1, 1, {"reused": True})`` when a stored screening is returned.

    Returns
    -------
    ScreeningResult
        The stored screening (``screening_id`` set) with its :class:`Analysis`; or, when
        the same inputs were already screened with this model (here or by a concurrent
        writer), that screening with ``reused`` True and ``analysis`` None.

    Raises
    ------
    InvalidInputError
        An invalid pseudonym or label; a missing or unreadable scan or side file; an image
        already screened for another participant (even with ``force``); the same image
        already screened with this model and other side files (without ``force``); anything
        :func:`analyse` refuses, including :class:`QCFailedError`. Nothing is stored.
    ModelFileError
        The model gave a non-finite probability, band, fold probability or attribution;
        nothing is stored.
    StorageError
        The database cannot be read or written. A
        :class:`~fmmtc_core.store.db.DatabaseError` conflict (another writer stored the same
        rows first) is retried; it propagates after the third attempt.
    """
    from fmmtc_core import __version__
    from fmmtc_core.store import repository as repo
    from fmmtc_core.store.db import DatabaseError, session_scope

    # Fail fast, before any work: identifiers and labels, then the files.
    pseudonym = repo.validate_pseudonym(participant)
    operator = repo.validate_label("operator", operator) or default_operator()
    site, drug, arm = (repo.validate_label(name, value)
                       for name, value in (("site", site), ("drug", drug), ("arm", arm)))
    if not Path(source).exists():
        raise InvalidInputError(f"No such scan file: {str(source)!r}.")
    scan_sha, key = inputs_digest(source, sidecar, confounds)
    with session_scope(engine) as s:  # the cheap answers first: refuse or reuse
        stored = _stored_outcome(s, scan_sha, key, model, pseudonym, force)
    if stored is not None:
        if progress:
            progress("save", 1, 1, {"reused": True})
        return stored
    result = analyse(source, model, sidecar=sidecar, confounds=confounds,
                     thresholds=thresholds, explain_kwargs=explain_kwargs,
                     min_volumes=min_volumes, progress=progress)
    t0 = time.perf_counter()
    computed = computed_screening(result, model, scan_sha256=scan_sha, inputs_sha256=key,
                                  participant=pseudonym, operator=operator,
                                  simulated=simulated)
    if progress:
        progress("save", 0, 1, {})
    out = store_computed(engine, computed, model, site=site, drug=drug, arm=arm,
                         force=force, started=t0)
    if progress:
        progress("save", 1, 1, {"reused": True} if out.reused else {})
    if out.reused:
        return out
    result.stage_seconds["save"] = out.summary.stage_seconds["save"]
    return ScreeningResult(out.summary, result)


@dataclass
class ComputedScreening:
    """A screening computed but not yet stored: the rows :func:`store_computed` writes.

    Small and picklable (no image, no torch object): what a cluster worker sends back to the
    one process that writes the database (:mod:`fmmtc_core.cluster`).

    Parameters
    ----------
    scan_sha256 : str
        SHA-256 of the scan file (:func:`inputs_digest`).
    inputs_sha256 : str
        SHA-256 of scan, sidecar and confounds (:func:`inputs_digest`).
    scan_fields : dict
        The ``scans`` row: hash, kind, shape, TR (s), atlas, QC, the cleaned region series.
    summary : ScreeningSummary
        The screening (``screening_id`` None, ``stage_seconds`` without ``save``).
    settings : dict
        The explanation's settings (:attr:`fmmtc_core.explain.Explanation.settings`).
    """

    scan_sha256: str
    inputs_sha256: str
    scan_fields: dict
    summary: ScreeningSummary
    settings: dict


@fill_doc
def computed_screening(result: Analysis, model: ScreeningModel, *, scan_sha256: str,
                       inputs_sha256: str, participant: str, operator: str,
                       simulated: bool = False) -> ComputedScreening:
    """The rows to store for an :func:`analyse` result, checked to be storable.

    Parameters
    ----------
    result : Analysis
        An explained analysis.
    %(model)s
    scan_sha256, inputs_sha256 : str
        :func:`inputs_digest` of the inputs that were analysed.
    participant : str
        Validated study pseudonym.
    operator : str
        Validated operator label.
    simulated : bool, default=False
        Mark a new participant as simulated.

    Returns
    -------
    ComputedScreening
        The scan row, the summary and the explanation's settings.

    Raises
    ------
    ModelFileError
        The model gave a non-finite probability, band, fold probability or attribution.
    """
    scan = result.scan
    scan_fields = {
        "sha256": scan_sha256, "kind": scan.kind, "shape": [int(v) for v in scan.shape],
        "tr": float(result.signals.tr), "atlas": result.signals.atlas.name,
        "qc_verdict": result.qc.verdict, "qc": result.qc.to_dict(),
        "n_volumes": int(result.signals.n_volumes), "n_regions": int(result.signals.n_regions),
        "series": _encode_series(result.signals.data),
    }
    summary = ScreeningSummary.from_analysis(result, participant=participant, model=model.name,
                                             operator=operator, simulated=simulated,
                                             card=model.card)
    _check_storable(summary, model)
    assert result.explanation is not None
    return ComputedScreening(scan_sha256, inputs_sha256, scan_fields, summary,
                             dict(result.explanation.settings))


def _encode_series(data):
    from fmmtc_core.store import repository as repo

    return repo.encode_series(data)


@fill_doc
def store_computed(engine: Engine, computed: ComputedScreening, model: ScreeningModel, *,
                   site: str | None = None, drug: str | None = None, arm: str | None = None,
                   force: bool = False, started: float | None = None) -> ScreeningResult:
    """Write a :class:`ComputedScreening` in **one transaction** (all its rows, or none).

    What the database holds is checked again inside the write transaction (another writer may
    have stored this image meanwhile): the same inputs with this model return that screening
    (``reused``), unless ``force``; the image stored for another participant is refused.

    Parameters
    ----------
    %(engine)s
    computed : ComputedScreening
        What :func:`computed_screening` built.
    %(model)s
    site, drug, arm : str or None, default=None
        Validated participant labels; stored when not yet known.
    force : bool, default=False
        Store a new revision even when these inputs were stored with this model.
    started : float or None, default=None
        ``time.perf_counter()`` when the store stage began (its time is recorded as ``save``);
        None: now.

    Returns
    -------
    ScreeningResult
        The stored screening (``screening_id`` set, ``analysis`` None), or the one found.

    Raises
    ------
    InvalidInputError
        The image was stored for another participant, or with other side files (without
        ``force``).
    StorageError
        The database cannot be read or written. A conflict (another writer stored the same
        rows first) is retried; it propagates after the third attempt.
    """
    from fmmtc_core import __version__
    from fmmtc_core.store import repository as repo
    from fmmtc_core.store.db import DatabaseError, session_scope

    t0 = time.perf_counter() if started is None else started
    summary = computed.summary
    pseudonym, operator, simulated = summary.participant, summary.operator, summary.simulated
    scan_sha, key = computed.scan_sha256, computed.inputs_sha256
    regions, connections = summary.attribution_rows()
    stored = None
    for attempt in range(3):
        try:
            with session_scope(engine, write=True) as s:
                # Checked again inside the write transaction: another process may have stored
                # this image (under this or another pseudonym) while we computed.
                stored = _stored_outcome(s, scan_sha, key, model, pseudonym, force)
                if stored is not None:
                    break
                latest = repo.latest_screening(s, scan_sha, model.weights_sha256)
                p = repo.get_or_create_participant(s, pseudonym, actor=operator, site=site,
                                                   drug=drug, arm=arm, simulated=simulated)
                mv = repo.get_or_create_model_version(s, model.name, model.weights_sha256,
                                                      model.card, actor=operator)
                seconds = {k: float(v) for k, v in summary.stage_seconds.items()}
                seconds["save"] = time.perf_counter() - t0
                summary = replace(summary, stage_seconds=seconds)
                fields = {
                    "inputs_sha256": key, "probability": summary.probability,
                    "band_low": summary.band[0], "band_high": summary.band[1],
                    "fold_probabilities": list(summary.fold_probabilities),
                    "decision": summary.decision, "thresholds": summary.thresholds,
                    "share_ts": summary.share_ts, "share_fc": summary.share_fc,
                    "ig_gap": summary.ig_gap, "ig_steps": summary.ig_steps,
                    "explanation": {"settings": computed.settings,
                                    "baseline": summary.baseline,
                                    "networks": summary.networks, "logit": summary.logit,
                                    "baseline_logit": summary.baseline_logit,
                                    "ig_gap_abs": summary.ig_gap_abs},
                    "runtime_s": summary.runtime_s, "stage_seconds": summary.stage_seconds,
                    "software_version": __version__,
                    # the summary's time, so the fresh and the stored screening agree
                    "created_at": summary.created_at.astimezone(dt.timezone.utc)
                    .replace(tzinfo=None),
                }
                sc = repo.add_screening(s, participant=p, model_version=mv,
                                        scan_fields=computed.scan_fields,
                                        screening_fields=fields, regions=regions,
                                        connections=connections, actor=operator,
                                        revision=0 if latest is None else latest.revision + 1)
                sid = sc.id
            break
        except DatabaseError as exc:
            # The database refused the rows (a unique key or the scan's owner): another writer
            # stored the same participant, scan, model or screening first. The transaction was
            # rolled back; the retry looks again and finds what that writer stored.
            if not exc.conflict or attempt == 2:
                raise
    if stored is not None:  # lost the race to an identical screening: return that one
        return stored
    return ScreeningResult(replace(summary, screening_id=sid))


# --------------------------------------------------------------------------------------------
# Batch screening of a BIDS-style cohort folder
# --------------------------------------------------------------------------------------------
@dataclass
class BatchReport:
    """What :func:`screen_batch` did.

    Parameters
    ----------
    screened : list of str, default=[]
        Pseudonyms screened and stored by this run.
    skipped : list of str, default=[]
        Pseudonyms whose inputs were already stored with this model.
    failed : dict of str to str, default={}
        Pseudonym -> why its scan could not be screened (the
        :class:`~fmmtc_core._errors.InvalidInputError` message).
    outcomes : int, default=0
        Observed outcomes recorded from ``participants.tsv`` (``import_outcomes``).
    """

    screened: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already stored
    failed: dict[str, str] = field(default_factory=dict)  # participant -> reason
    outcomes: int = 0


_WORKER: dict = {}


def _worker_init(model_dir, url, threads) -> None:
    import torch

    from fmmtc_core.models.ensemble import load_model
    from fmmtc_core.store import make_engine

    torch.set_num_threads(threads)
    # Each worker's share of the cores for .nii.gz decompression too (unless set explicitly):
    # `workers` processes each inflating on every core would only contend.
    os.environ.setdefault("FMMTC_READ_THREADS", str(threads))
    _WORKER["model"] = load_model(model_dir)
    _WORKER["engine"] = make_engine(url)


def _worker_screen(job: dict) -> tuple[str, str | None]:
    try:
        screen(job["scan"], job["participant"], _WORKER["model"], _WORKER["engine"],
               confounds=job["confounds"], site=job["site"], drug=job["drug"],
               simulated=job["simulated"], operator=job["operator"],
               explain_kwargs=job["explain_kwargs"])
        return job["participant"], None
    except InvalidInputError as exc:
        return job["participant"], str(exc)


def screen_batch(
    cohort_dir: str | os.PathLike,
    *,
    model_dir=None,
    url: str | None = None,
    workers: int = 1,
    operator: str | None = None,
    import_outcomes: bool = False,
    explain_kwargs: dict | None = None,
    pseudonym_prefix: str = "",
    progress: Callable[[int, int, str], None] | None = None,
    cluster: str | None = None,
) -> BatchReport:
    """Screen every scan of a BIDS-style cohort folder into the database.

    Scans already stored (same scan, sidecar and confounds, same model) are skipped, so an
    interrupted batch (Ctrl-C, a killed process) is resumed by running it again: every
    screening is its own transaction, so the database only ever holds complete screenings. A
    scan that fails (bad input, hard QC) is reported and the others go on.

    Parameters
    ----------
    cohort_dir : path
        ``participants.tsv`` (``participant_id``; optional ``site``, ``drug``, ``responder``) and
        ``sub-*/func/`` scans, as written by ``fmmtc simulate``.
    model_dir : path or None, default=None
        Model folder (default: :func:`fmmtc_core.models.ensemble.default_model_dir`).
    url : str or None, default=None
        Database URL (default location when None).
    workers : int, default=1
        Processes screening in parallel (each loads the model once and gets
        usable cores // ``workers`` torch threads); with 1, or at most one scan to screen, the
        scans are screened in this process.
    operator : str or None, default=None
        Who runs the batch (audit log); None: :func:`default_operator`.
    import_outcomes : bool, default=False
        Also record the ``responder`` column as observed outcomes: for every participant
        whose scan did not fail and whose value differs from the latest recorded outcome.
    explain_kwargs : dict or None, default=None
        Passed to :func:`fmmtc_core.explain.explain` for every scan.
    pseudonym_prefix : str, default=""
        Prepended to each ``participant_id`` (without its ``sub-``), e.g. ``"SIM-"``.
    progress : callable(done, total, participant) or None, default=None
        Called once with ``(n_skipped, total, "")`` before screening, then after each scan
        with its pseudonym (``done`` counts skipped scans too). With a ``cluster`` the
        stored scans are found by the workers' hashes: the first call is ``(0, total, "")``
        and each skipped scan is reported like a screened one.
    cluster : str or None, default=None
        Screen on a Dask cluster (:mod:`fmmtc_core.cluster`) instead of ``workers``
        processes: ``"local:N"`` starts N worker processes here, ``"tcp://HOST:PORT"`` uses a
        running scheduler (its workers must see the cohort and the model folder at the same
        paths; the database must be PostgreSQL). Workers hash and analyse the scans, this
        process stores each result in its own transaction.

    Returns
    -------
    BatchReport
        The pseudonyms screened, skipped and failed (with the reasons), and the number of
        outcomes imported.

    Raises
    ------
    InvalidInputError
        Before any scan is screened: ``workers`` below 1, a cohort folder that cannot be read
        (:func:`fmmtc_core.bids.read_cohort`), an invalid operator label or pseudonym, or a
        scan or confounds file that cannot be hashed (without a ``cluster``: with one, such a
        scan is reported as failed); an invalid ``cluster``, a remote one with a SQLite
        database, or a scheduler that cannot be reached.
    ModelFileError
        The model folder cannot be loaded.
    StorageError
        The database cannot be opened, read or written.
    """
    import json
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from fmmtc_core.models.ensemble import default_model_dir, load_model
    from fmmtc_core.store import open_database
    from fmmtc_core.store import repository as repo
    from fmmtc_core.store.db import session_scope

    if workers < 1:
        raise InvalidInputError(f"--workers must be at least 1, got {workers}.")
    spec = None
    if cluster is not None:
        from fmmtc_core.cluster import check_database, parse_cluster
        from fmmtc_core.store import default_url

        spec = parse_cluster(cluster)
        check_database(spec, url or default_url())
    cohort = read_cohort(cohort_dir, require_labels=False)
    root = Path(cohort_dir)
    desc = root / "dataset_description.json"
    simulated = False
    if desc.exists():
        try:
            simulated = bool(json.loads(desc.read_text()).get("Simulated", False))
        except (ValueError, AttributeError):
            simulated = False
    operator = repo.validate_label("operator", operator) or default_operator()
    engine = open_database(url)
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    model = load_model(model_dir)
    parts = cohort.participants
    jobs, report = [], BatchReport()
    with session_scope(engine) as s:
        for row in parts.to_dict("records"):
            pid = repo.validate_pseudonym(
                pseudonym_prefix + str(row["participant_id"]).removeprefix("sub-"))
            if spec is None:  # on a cluster, the workers hash the scans where they lie
                _, key = inputs_digest(row["scan"], None, row["confounds"])
                if repo.find_screening(s, key, model.weights_sha256) is not None:
                    report.skipped.append(pid)
                    continue
            jobs.append({
                "scan": str(row["scan"]), "participant": pid,
                "confounds": None if row["confounds"] is None else str(row["confounds"]),
                "site": None if _isna(row.get("site")) else str(row.get("site")),
                "drug": None if _isna(row.get("drug")) else str(row.get("drug")),
                "simulated": simulated, "operator": operator,
                "explain_kwargs": explain_kwargs or {},
            })
    total, done = len(parts), len(report.skipped)
    if progress:
        progress(done, total, "")

    def finished(pid, err, skipped=False):
        nonlocal done
        done += 1
        if err is not None:
            report.failed[pid] = err
        elif skipped:
            report.skipped.append(pid)
        else:
            report.screened.append(pid)
        if progress:
            progress(done, total, pid)

    if spec is not None:
        from fmmtc_core.cluster import screen_jobs

        if jobs:
            screen_jobs(jobs, spec=spec, model_dir=model_dir, model=model, engine=engine,
                        finished=finished)
    elif workers == 1 or len(jobs) <= 1:
        _WORKER.update(model=model, engine=engine)
        for job in jobs:
            finished(*_worker_screen(job))
    else:
        import multiprocessing as mp

        threads = max(1, config.usable_cores() // workers)
        ctx = mp.get_context("spawn")  # no forked torch / SQLite state
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(str(model_dir), str(engine.url.render_as_string(
                                     hide_password=False)), threads)) as pool:
            futures = [pool.submit(_worker_screen, job) for job in jobs]
            try:
                for fut in as_completed(futures):
                    finished(*fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    if import_outcomes and "responder" in parts:
        known = {r.participant: bool(r.responder)
                 for r in repo.outcomes_frame(engine).itertuples()}  # latest per participant
        with session_scope(engine, write=True) as s:
            for row in parts.to_dict("records"):
                pid = repo.validate_pseudonym(
                    pseudonym_prefix + str(row["participant_id"]).removeprefix("sub-"))
                if pid in report.failed or _isna(row["responder"]):
                    continue
                value = bool(int(row["responder"]))
                if known.get(pid) == value:
                    continue
                # the cohort file is the source asked for: it replaces a differing outcome,
                # which stays in the history
                repo.record_outcome(s, pid, "responder" if value else "non-responder",
                                    actor=operator, replace=pid in known,
                                    note=f"imported from {root.name}/participants.tsv")
                report.outcomes += 1
    return report


def _isna(value) -> bool:
    import pandas as pd

    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))
