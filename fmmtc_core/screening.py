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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmmtc_core._errors import InvalidInputError, ModelFileError
from fmmtc_core.explain import Explanation, explain, model_inputs
from fmmtc_core.io import load_scan
from fmmtc_core.preprocess import RegionSignals, clean, parcellate
from fmmtc_core.qc import QCReport, QCThresholds, qc_report
from fmmtc_core.store.repository import default_operator

__all__ = ["Analysis", "analyse", "decide", "screen", "ScreeningResult", "STAGES",
           "DEFAULT_THRESHOLDS", "QCFailedError", "inputs_digest"]

#: Pipeline stages, in order, as reported to progress callbacks.
STAGES = ("validate", "parcellate", "qc", "clean", "predict", "explain", "save")

#: Decision thresholds on the calibrated probability (the team can change them).
DEFAULT_THRESHOLDS = {"responder": 0.6, "non_responder": 0.4}

Progress = Callable[[str, int, int, dict], None] | None


class QCFailedError(InvalidInputError):
    """The scan failed hard quality control: it is not predicted (the report says why)."""

    def __init__(self, message: str, report: QCReport) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self):  # picklable, so a worker process can hand it back
        return (type(self), (str(self), self.report))


def decide(probability: float, band: tuple[float, float], thresholds: dict | None = None) -> str:
    """``"likely responder"``, ``"likely non-responder"`` or ``"uncertain"``.

    A participant is called a likely responder when the whole uncertainty band lies at or above
    the responder threshold, a likely non-responder when it lies at or below the non-responder
    threshold; anything else is uncertain.
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
    """Everything one screening computes (see :func:`analyse`)."""

    scan: object
    signals: RegionSignals  # cleaned
    qc: QCReport
    probability: float
    band: tuple[float, float]
    fold_probabilities: list[float]
    decision: str
    thresholds: dict
    explanation: Explanation | None
    window: np.ndarray
    fc: np.ndarray
    stage_seconds: dict = field(default_factory=dict)

    @property
    def runtime_s(self) -> float:
        return float(sum(self.stage_seconds.values()))

    def to_dict(self, *, n_regions: int | None = None) -> dict:
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


def analyse(
    source: str | os.PathLike,
    model,
    *,
    sidecar=None,
    confounds=None,
    thresholds: dict | None = None,
    qc_thresholds: QCThresholds | None = None,
    explain_kwargs: dict | None = None,
    with_explanation: bool = True,
    progress: Progress = None,
) -> Analysis:
    """Run the screening computation on one scan file (nothing is stored).

    Parameters
    ----------
    source : path
        4D NIfTI or region time-series table (see :func:`fmmtc_core.io.load_scan`).
    model : FMMTCEnsemble
        From :func:`fmmtc_core.training.load_model`; its atlas parcellates the scan.
    sidecar, confounds : path or None
    thresholds : dict or None
        Decision thresholds (:data:`DEFAULT_THRESHOLDS`).
    qc_thresholds : QCThresholds or None
    explain_kwargs : dict or None
        Passed to :func:`fmmtc_core.explain.explain` (baselines, tolerance, steps).
    progress : callable(stage, done, total, info) or None

    Raises
    ------
    InvalidInputError
        Bad input of any kind; :class:`QCFailedError` when the scan fails hard QC.
    """
    from fmmtc_core.atlas import load_atlas

    times: dict[str, float] = {}
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    decide(0.5, (0.5, 0.5), thresholds)  # validate the thresholds before any work

    def report(stage, done=1, total=1, info=None):
        if progress:
            progress(stage, done, total, info or {})

    atlas = load_atlas(model.atlas)
    t0 = time.perf_counter()
    report("validate", 0, 1)
    scan = load_scan(source, sidecar=sidecar, confounds=confounds, atlas=atlas)
    t_load = time.perf_counter()
    times["load"] = t_load - t0
    report("validate", 1, 1)

    parcellated = []

    def parc_progress(done, total):
        parcellated.append(done)
        report("parcellate", done, total)

    raw = parcellate(scan, None if scan.kind == "table" else atlas, progress=parc_progress)
    if not parcellated:  # a region table: already parcellated
        report("parcellate", 1, 1, {"table": True})
    t_parc = time.perf_counter()
    times["parcellate"] = t_parc - t_load
    qc = qc_report(scan, raw, thresholds=qc_thresholds)
    t1 = time.perf_counter()
    times["qc"] = t1 - t_parc
    report("qc", 1, 1, {"verdict": qc.verdict})
    if raw.atlas.n_regions != atlas.n_regions:
        raise InvalidInputError(
            f"The table has {raw.atlas.n_regions} regions ({raw.atlas.name}); the model expects "
            f"{atlas.n_regions} ({atlas.name}).")
    if not qc.passed:
        raise QCFailedError("The scan failed quality control and was not screened: "
                            + "; ".join(qc.reasons), qc)
    _check_signal_values(raw.data, scan, "as read", allow_nan=True)
    signals = clean(raw)
    _check_signal_values(signals.data, scan, "after cleaning", allow_nan=False)
    t2 = time.perf_counter()
    times["clean"] = t2 - t1
    report("clean")
    window, fc = model_inputs(model, signals)
    for name, arr in (("time-series window", window), ("connectivity", fc)):
        if arr is not None and _nonfinite(arr):
            raise InvalidInputError(
                f"{_name(scan)}: the model input ({name}) holds non-finite values; the scan's "
                "values are out of range. Nothing was stored.")
    pred = model.predict(window[None], fc[None])
    t3 = time.perf_counter()
    times["predict"] = t3 - t2
    report("predict")
    probability = float(pred["probability"][0])
    band = (float(pred["band"][0, 0]), float(pred["band"][0, 1]))
    cal = model.card["calibration"]
    fold_p = 1.0 / (1.0 + np.exp(-(cal["a"] * pred["fold_logits"][:, 0] + cal["b"])))
    explanation = None
    if with_explanation:
        def exp_progress(stage, done, total, info):
            report("explain", done, total, info)

        explanation = explain(model, window, fc, atlas=atlas, progress=exp_progress,
                              **(explain_kwargs or {}))
        times["explain"] = time.perf_counter() - t3
    return Analysis(
        scan=scan, signals=signals, qc=qc, probability=probability, band=band,
        fold_probabilities=[float(p) for p in fold_p],
        decision=decide(probability, band, thresholds), thresholds=thresholds,
        explanation=explanation, window=window, fc=fc, stage_seconds=times,
    )


def _name(scan) -> str:
    path = getattr(scan, "path", None)
    return repr(Path(path).name) if path is not None else "The scan"


#: Largest magnitude a region value may have: float32's range with room for the arithmetic of
#: cleaning (sums of squares over a few thousand volumes). BOLD values are O(1e4).
MAX_ABS_VALUE = 1e15


def _check_signal_values(data: np.ndarray, scan, when: str, *, allow_nan: bool) -> None:
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
            f"{_name(scan)} holds non-finite or out-of-range values {when} ({int(bad.sum())} "
            f"value(s) in {n_regions} region(s); expected finite values below "
            f"{MAX_ABS_VALUE:.0e} in magnitude). Check the file's units and contents; nothing "
            "was stored.")


# --------------------------------------------------------------------------------------------
# Screening into the cohort database
# --------------------------------------------------------------------------------------------
def inputs_digest(source, sidecar=None, confounds=None) -> tuple[str, str]:
    """(scan SHA-256, SHA-256 of everything that decides the result: scan, sidecar, confounds).

    The scan hash is the image's identity (one image, one participant); the second decides
    whether a stored screening can be reused. The sidecar is the one given or the one found
    beside the scan, as :func:`load_scan` would. Side files are checked (regular files within
    their size limits) before they are read, so a pipe or a device never blocks the hashing.
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
    """A stored screening: its id, whether it was reused, and the in-memory analysis (None when
    an earlier screening was returned)."""

    screening_id: int
    participant: str
    probability: float
    band: tuple[float, float]
    decision: str
    reused: bool
    summary: dict
    analysis: Analysis | None = None

    def to_dict(self) -> dict:
        return {"screening_id": self.screening_id, "participant_id": self.participant,
                "reused": self.reused, **self.summary}


def _summary_from_row(sc) -> dict:
    regions = sorted(sc.regions, key=lambda r: -abs(r.total))
    exp = sc.explanation or {}
    return {
        "probability": sc.probability, "band": [sc.band_low, sc.band_high],
        "decision": sc.decision, "thresholds": sc.thresholds,
        "qc": {"verdict": sc.scan.qc_verdict, "reasons": sc.scan.qc.get("reasons", [])},
        "modality_share": {"ts": sc.share_ts, "fc": sc.share_fc},
        "regions": [{"label": r.label, "name": r.name, "score": r.total} for r in regions],
        "top_connections": [{"i": c.region_i, "j": c.region_j, "label_i": c.label_i,
                             "label_j": c.label_j, "score": c.score} for c in sc.connections],
        "networks": exp.get("networks", {}),
        "ig_gap": sc.ig_gap, "steps": sc.ig_steps, "baseline": exp.get("baseline"),
        "stage_seconds": sc.stage_seconds, "runtime_s": sc.runtime_s,
        "model": sc.model_version.name, "created_at": sc.created_at.isoformat(),
    }


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
    old = repo.get_screening(s, latest.id)
    return ScreeningResult(old.id, pseudonym, old.probability, (old.band_low, old.band_high),
                           old.decision, True, _summary_from_row(old))


def _nonfinite(value) -> bool:
    arr = np.asarray(value, dtype=float)
    return arr.size > 0 and not np.isfinite(arr).all()


def _check_storable(scan_fields: dict, fields: dict, regions: list[dict],
                    connections: list[dict], model) -> None:
    """Refuse, before the write transaction, anything non-finite: nothing NaN or infinite is
    ever stored. A non-finite model output names the model (a broken calibration, say)."""
    for name in ("probability", "band_low", "band_high", "fold_probabilities"):
        if _nonfinite(fields[name]):
            raise ModelFileError(
                f"The model {model.name!r} gave a non-finite {name.replace('_', ' ')} "
                f"({fields[name]!r}); its calibration or weights are broken. Nothing was "
                "stored; retrain the model or choose another.")
    for name in ("share_ts", "share_fc", "ig_gap"):
        if fields[name] is not None and _nonfinite(fields[name]):
            raise ModelFileError(
                f"The explanation by model {model.name!r} is not finite ({name} = "
                f"{fields[name]!r}); nothing was stored.")
    if _nonfinite([r[k] for r in regions for k in ("ts", "fc", "total")]) or _nonfinite(
            [c["score"] for c in connections]):
        raise ModelFileError(f"The explanation by model {model.name!r} holds non-finite "
                             "attributions; nothing was stored.")


def attribution_rows(e: Explanation) -> tuple[list[dict], list[dict]]:
    """The region and top-connection rows of an explanation, as the database stores them."""
    regions = [{"region_index": i, "label": int(e.labels[i]), "name": e.names[i],
                "network": e.groups[i], "ts": float(e.region_ts[i]), "fc": float(e.region_fc[i]),
                "total": float(e.region_total[i])} for i in range(len(e.labels))]
    connections = [{"rank": k, "region_i": c["i"], "region_j": c["j"], "label_i": c["label_i"],
                    "label_j": c["label_j"], "score": c["score"]}
                   for k, c in enumerate(e.top_connections)]
    return regions, connections


def screen(
    source: str | os.PathLike,
    participant: str,
    model,
    engine,
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
    participant : str
        Study pseudonym (validated; a leading ``sub-`` is dropped).
    model : FMMTCEnsemble
    engine : sqlalchemy.Engine
        From :func:`fmmtc_core.store.open_database`.
    operator : str or None
        Who runs it (audit log); default :func:`default_operator`.
    progress : callable(stage, done, total, info) or None
        Stages :data:`STAGES`.
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
                     thresholds=thresholds, explain_kwargs=explain_kwargs, progress=progress)
    t0 = time.perf_counter()
    e = result.explanation
    scan = result.scan
    qc = result.qc.to_dict()
    scan_fields = {
        "sha256": scan_sha, "kind": scan.kind, "shape": [int(v) for v in scan.shape],
        "tr": float(result.signals.tr), "atlas": result.signals.atlas.name,
        "qc_verdict": result.qc.verdict, "qc": qc, "n_volumes": int(result.signals.n_volumes),
        "n_regions": int(result.signals.n_regions),
        "series": repo.encode_series(result.signals.data),
    }
    regions, connections = attribution_rows(e)
    fields = {
        "inputs_sha256": key, "probability": result.probability,
        "band_low": result.band[0], "band_high": result.band[1],
        "fold_probabilities": result.fold_probabilities, "decision": result.decision,
        "thresholds": result.thresholds, "share_ts": e.modality_share["ts"],
        "share_fc": e.modality_share["fc"], "ig_gap": e.ig_gap, "ig_steps": e.steps,
        "explanation": {"settings": e.settings, "baseline": e.baseline,
                        "networks": e.networks, "logit": e.logit,
                        "baseline_logit": e.baseline_logit, "ig_gap_abs": e.ig_gap_abs},
        "runtime_s": 0.0, "stage_seconds": {}, "software_version": __version__,
    }
    _check_storable(scan_fields, fields, regions, connections, model)
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
                result.stage_seconds["save"] = time.perf_counter() - t0
                fields["stage_seconds"] = {k: float(v) for k, v in result.stage_seconds.items()}
                fields["runtime_s"] = result.runtime_s
                sc = repo.add_screening(s, participant=p, model_version=mv,
                                        scan_fields=scan_fields, screening_fields=fields,
                                        regions=regions, connections=connections,
                                        actor=operator,
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
        if progress:
            progress("save", 1, 1, {"reused": True})
        return stored
    result.stage_seconds["save"] = time.perf_counter() - t0
    if progress:
        progress("save", 1, 1, {})
    summary = result.to_dict()
    summary["model"] = model.name
    return ScreeningResult(sid, pseudonym, result.probability, result.band, result.decision,
                           False, summary, result)


# --------------------------------------------------------------------------------------------
# Batch screening of a BIDS-style cohort folder
# --------------------------------------------------------------------------------------------
@dataclass
class BatchReport:
    """What :func:`screen_batch` did."""

    screened: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already stored
    failed: dict[str, str] = field(default_factory=dict)  # participant -> reason
    outcomes: int = 0


_WORKER: dict = {}


def _worker_init(model_dir, url, threads) -> None:
    import torch

    from fmmtc_core.store import make_engine
    from fmmtc_core.training import load_model

    torch.set_num_threads(threads)
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
) -> BatchReport:
    """Screen every scan of a BIDS-style cohort folder into the database.

    Scans already stored (same content, same model) are skipped, so an interrupted batch
    (Ctrl-C, a killed process) is resumed by running it again: every screening is its own
    transaction, so the database only ever holds complete screenings. A scan that fails (bad
    input, hard QC) is reported and the others go on.

    Parameters
    ----------
    cohort_dir : path
        ``participants.tsv`` (``participant_id``; optional ``site``, ``drug``, ``responder``) and
        ``sub-*/func/`` scans, as written by ``fmmtc simulate``.
    model_dir : path or None
        Model folder (default: :func:`fmmtc_core.training.default_model_dir`).
    url : str or None
        Database URL (default location when None).
    workers : int
        Processes screening in parallel (each loads the model once).
    import_outcomes : bool
        Also record the ``responder`` column as observed outcomes.
    pseudonym_prefix : str
        Prepended to each ``participant_id`` (without its ``sub-``), e.g. ``"SIM-"``.
    progress : callable(done, total, participant) or None
    """
    import json
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from fmmtc_core.store import open_database
    from fmmtc_core.store import repository as repo
    from fmmtc_core.store.db import session_scope
    from fmmtc_core.training import default_model_dir, load_model, read_cohort

    if workers < 1:
        raise InvalidInputError(f"--workers must be at least 1, got {workers}.")
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

    def finished(pid, err):
        nonlocal done
        done += 1
        if err is None:
            report.screened.append(pid)
        else:
            report.failed[pid] = err
        if progress:
            progress(done, total, pid)

    if workers == 1 or len(jobs) <= 1:
        _WORKER.update(model=model, engine=engine)
        for job in jobs:
            finished(*_worker_screen(job))
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // workers)
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
                repo.record_outcome(s, pid, "responder" if value else "non-responder",
                                    actor=operator, note=f"imported from {root.name}/participants.tsv")
                report.outcomes += 1
    return report


def _isna(value) -> bool:
    import pandas as pd

    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))
