"""Repository functions: every read and write the dashboard and the CLI make (no SQL in pages).

Writers take an open session (inside :func:`~fmmtc_core.store.db.session_scope`) so the caller
decides the transaction; each write adds its audit-log row in that same transaction.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, selectinload

from fmmtc_core._docs import fill_doc
from fmmtc_core._errors import InvalidInputError
# Re-exported: the store's validators live in a module that loads no database code, so that
# the command line can refuse a bad identifier before sqlalchemy and pandas load.
from fmmtc_core.identifiers import validate_label, validate_pseudonym
from fmmtc_core.summary import ScreeningSummary
from fmmtc_core.store.models import (
    AuditLog,
    ConnectionAttribution,
    ModelVersion,
    Outcome,
    Participant,
    RegionAttribution,
    Scan,
    Screening,
)

__all__ = [
    "validate_pseudonym",
    "validate_label",
    "validate_note",
    "default_operator",
    "audit",
    "get_or_create_participant",
    "get_or_create_model_version",
    "find_screening",
    "find_scan",
    "latest_screening",
    "add_screening",
    "record_outcome",
    "outcome_history",
    "remove_simulated_participants",
    "get_screening",
    "ScreeningRecord",
    "screening_record",
    "screenings_frame",
    "region_frame",
    "cohort_region_means",
    "outcomes_frame",
    "export_csv",
    "csv_text",
    "encode_series",
    "decode_series",
]

OUTCOMES = {"responder": True, "non-responder": False}

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
NOTE_MAX = 1000


def validate_note(value: str | None, *, max_len: int = NOTE_MAX) -> str | None:
    """Check a free-text note (outcome notes) and return it stripped.

    At most ``max_len`` characters, no control characters other than line breaks and tabs.
    Notes are escaped wherever they are shown.

    Parameters
    ----------
    value : str or None
        The note as entered.
    max_len : int, default=NOTE_MAX
        Longest note accepted, characters (1000).

    Returns
    -------
    str or None
        The stripped note; None for None or a blank value.

    Raises
    ------
    InvalidInputError
        ``value`` is not text, is too long or holds control characters.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"The note must be text, got {type(value).__name__}.")
    value = value.strip()
    if not value:
        return None
    if len(value) > max_len:
        raise InvalidInputError(f"The note is {len(value)} characters long; at most {max_len} "
                                "are allowed.")
    if _CONTROL.search(value):
        raise InvalidInputError("The note contains control characters; use plain text.")
    return value


def default_operator() -> str:
    """Who runs a screening when nobody is named.

    Returns
    -------
    str
        ``$FMMTC_OPERATOR`` (validated like every label), else the OS user (when it is a valid
        label), else ``"unknown"``.

    Raises
    ------
    InvalidInputError
        ``FMMTC_OPERATOR`` is set to an invalid label (see :func:`validate_label`).
    """
    import getpass

    from fmmtc_core.config import operator_setting

    # A blank FMMTC_OPERATOR validates to None: fall through to the OS user as when it is unset.
    env = validate_label("operator (FMMTC_OPERATOR)", operator_setting())
    if env:
        return env
    try:
        return validate_label("operator", getpass.getuser()) or "unknown"
    except Exception:  # noqa: BLE001 - no user database entry, or an odd user name
        return "unknown"


@fill_doc
def audit(session: Session, actor: str, action: str, entity: str, entity_id: int | None,
          details: dict | None = None) -> None:
    """Add an audit-log row to the session (written with the session's transaction).

    Parameters
    ----------
    %(session)s
    actor : str
        Who acted.
    action : str
        What was done (``"create"``, ``"update"``, ``"sign-in"`` ...).
    entity : str
        What kind of row it was done to (``"participant"``, ``"screening"`` ...).
    entity_id : int or None
        Its id, when it has one.
    details : dict or None, default=None
        What changed (JSON-serialisable).
    """
    session.add(AuditLog(actor=actor, action=action, entity=entity, entity_id=entity_id,
                         details=details))


@fill_doc
def get_or_create_participant(session: Session, pseudonym: str, *, actor: str,
                              site: str | None = None, drug: str | None = None,
                              arm: str | None = None, simulated: bool = False) -> Participant:
    """The participant with this pseudonym; created (and audited) if new.

    Parameters
    ----------
    %(session)s
    pseudonym : str
        Study pseudonym (checked by :func:`validate_pseudonym`).
    actor : str
        Who acts (audit log).
    site, drug, arm : str or None, default=None
        Stored when given and not yet known (a change is audited); a known value is never
        overwritten. Not checked here: pass values :func:`validate_label` accepted.
    simulated : bool, default=False
        Flag a new participant as simulated (an existing one keeps its flag).

    Returns
    -------
    Participant
        Flushed (it has its ``id``).

    Raises
    ------
    InvalidInputError
        The pseudonym is invalid.
    """
    pseudonym = validate_pseudonym(pseudonym)
    p = session.scalar(select(Participant).where(Participant.pseudonym == pseudonym))
    if p is None:
        p = Participant(pseudonym=pseudonym, site=site, drug=drug, arm=arm, simulated=simulated)
        session.add(p)
        session.flush()
        audit(session, actor, "create", "participant", p.id,
              {"pseudonym": pseudonym, "site": site, "drug": drug, "arm": arm,
               "simulated": simulated})
        return p
    changed = {}
    for key, value in (("site", site), ("drug", drug), ("arm", arm)):
        if value is not None and getattr(p, key) is None:
            setattr(p, key, value)
            changed[key] = value
    if changed:
        audit(session, actor, "update", "participant", p.id, changed)
    return p


@fill_doc
def get_or_create_model_version(session: Session, name: str, weights_sha256: str, card: dict,
                                *, actor: str) -> ModelVersion:
    """The model version with these weights; created (and audited) if new.

    Parameters
    ----------
    %(session)s
    name : str
        The model's name; stored only when the version is new.
    weights_sha256 : str
        The model version's identity
        (:attr:`fmmtc_core.models.ensemble.FMMTCEnsemble.weights_sha256`).
    card : dict
        The model card; stored only when the version is new.
    actor : str
        Who acts (audit log).

    Returns
    -------
    ModelVersion
        Flushed (it has its ``id``).
    """
    mv = session.scalar(select(ModelVersion).where(ModelVersion.weights_sha256 == weights_sha256))
    if mv is None:
        mv = ModelVersion(name=name, weights_sha256=weights_sha256, card=card)
        session.add(mv)
        session.flush()
        audit(session, actor, "create", "model_version", mv.id,
              {"name": name, "weights_sha256": weights_sha256})
    return mv


@fill_doc
def find_screening(session: Session, inputs_sha256: str, weights_sha256: str) -> Screening | None:
    """The latest stored screening of these inputs with this model, if any.

    Parameters
    ----------
    %(session)s
    inputs_sha256 : str
        Digest of the scan, sidecar and confounds contents
        (:func:`fmmtc_core.screening.inputs_digest`).
    weights_sha256 : str
        The model version's identity.

    Returns
    -------
    Screening or None
        The one stored last (highest id); None when there is none.
    """
    return session.scalar(
        select(Screening).join(ModelVersion)
        .where(Screening.inputs_sha256 == inputs_sha256,
               ModelVersion.weights_sha256 == weights_sha256)
        .order_by(Screening.id.desc()).limit(1))


@fill_doc
def find_scan(session: Session, sha256: str) -> Scan | None:
    """The stored scan with this image hash (with its participant), if any.

    Parameters
    ----------
    %(session)s
    sha256 : str
        SHA-256 of the image file.

    Returns
    -------
    Scan or None
        The scan row, its ``participant`` loaded; None when the image is not stored.
    """
    return session.scalar(select(Scan).where(Scan.sha256 == sha256)
                          .options(selectinload(Scan.participant)))


@fill_doc
def latest_screening(session: Session, scan_sha256: str,
                     weights_sha256: str) -> Screening | None:
    """The latest revision of the screening of this image with this model, if any.

    Parameters
    ----------
    %(session)s
    scan_sha256 : str
        SHA-256 of the image file (whatever side files came with it).
    weights_sha256 : str
        The model version's identity.

    Returns
    -------
    Screening or None
        The screening with the highest ``revision``; None when there is none.
    """
    return session.scalar(
        select(Screening).join(Scan, Screening.scan_id == Scan.id)
        .join(ModelVersion, Screening.model_version_id == ModelVersion.id)
        .where(Scan.sha256 == scan_sha256, ModelVersion.weights_sha256 == weights_sha256)
        .order_by(Screening.revision.desc()).limit(1))


def encode_series(data: np.ndarray) -> bytes:
    """Compress cleaned region series for storage (the inverse of :func:`decode_series`).

    Parameters
    ----------
    data : ndarray (T, R)
        Region series; stored as float32.

    Returns
    -------
    bytes
        zlib-compressed: the shape as two little-endian int32, then the little-endian float32
        values in C order.
    """
    arr = np.ascontiguousarray(data, dtype="<f4")
    header = np.asarray(arr.shape, dtype="<i4").tobytes()
    return zlib.compress(header + arr.tobytes(), level=6)


def decode_series(blob: bytes) -> np.ndarray:
    """Region series stored by :func:`encode_series`.

    Parameters
    ----------
    blob : bytes
        What :func:`encode_series` returned (:attr:`fmmtc_core.store.models.Scan.series`).

    Returns
    -------
    ndarray (T, R) of float32
        A writable copy.
    """
    raw = zlib.decompress(blob)
    t, r = np.frombuffer(raw[:8], dtype="<i4")
    return np.frombuffer(raw[8:], dtype="<f4").reshape(int(t), int(r)).copy()


@fill_doc
def add_screening(session: Session, *, participant: Participant, model_version: ModelVersion,
                  scan_fields: dict, screening_fields: dict, regions: list[dict],
                  connections: list[dict], actor: str, revision: int = 0) -> Screening:
    """Insert a scan (if new; it then belongs to ``participant``), a screening and its
    attributions, and audit them.

    The database refuses (``IntegrityError`` at flush, a conflict in
    :func:`~fmmtc_core.store.db.session_scope`) a scan stored under another participant and a
    second screening with the same ``(scan, model, revision)``; the caller decides what a lost
    race means (see :func:`fmmtc_core.screening.screen`).

    Parameters
    ----------
    %(session)s
    participant : Participant
        Whose screening it is.
    model_version : ModelVersion
        The model that made it.
    scan_fields : dict
        Columns of :class:`~fmmtc_core.store.models.Scan` (``sha256`` included); used only
        when no scan with that ``sha256`` is stored yet.
    screening_fields : dict
        Columns of :class:`~fmmtc_core.store.models.Screening` other than the participant,
        scan, model version, operator and revision.
    regions, connections : list of dict
        Attribution rows (:func:`fmmtc_core.summary.attribution_rows`).
    actor : str
        Who ran the screening: its ``operator`` and the audit log's actor.
    revision : int, default=0
        0 for the first screening of this image with this model, +1 for each forced repeat.

    Returns
    -------
    Screening
        Flushed (it has its ``id``).
    """
    scan = session.scalar(select(Scan).where(Scan.sha256 == scan_fields["sha256"]))
    if scan is None:
        scan = Scan(participant=participant, **scan_fields)
        session.add(scan)
        session.flush()
        audit(session, actor, "create", "scan", scan.id,
              {"sha256": scan.sha256, "kind": scan.kind, "qc_verdict": scan.qc_verdict,
               "participant": participant.pseudonym})
    sc = Screening(participant=participant, scan=scan, model_version=model_version,
                   operator=actor, revision=revision, **screening_fields)
    sc.regions = [RegionAttribution(**r) for r in regions]
    sc.connections = [ConnectionAttribution(**c) for c in connections]
    session.add(sc)
    session.flush()
    audit(session, actor, "create", "screening", sc.id,
          {"participant": participant.pseudonym, "probability": sc.probability,
           "decision": sc.decision, "model": model_version.name, "revision": revision})
    return sc


@fill_doc
def record_outcome(session: Session, pseudonym: str, outcome: str, *, actor: str,
                   note: str | None = None, replace: bool = False) -> Outcome:
    """Enter an observed outcome for a participant (audited); the latest one entered counts.

    An outcome never silently replaces another: when the participant already has one,
    ``replace=True`` must confirm it. Every outcome entered stays in the table (the history,
    :func:`outcome_history`); the audit log records a replacement with the outcome it
    replaced.

    Parameters
    ----------
    %(session)s
    pseudonym : str
        The participant's study pseudonym (checked by :func:`validate_pseudonym`).
    outcome : {"responder", "non-responder"}
    actor : str
        Who enters it (checked by :func:`validate_label`).
    note : str or None, default=None
        Free-text note (checked by :func:`validate_note`).
    replace : bool, default=False
        Confirm that this outcome replaces the one recorded before (which is kept).

    Returns
    -------
    Outcome
        Flushed (it has its ``id``).

    Raises
    ------
    InvalidInputError
        An unknown outcome, an invalid pseudonym, actor or note, no actor, no participant
        with this pseudonym in the database, or an outcome already recorded for the
        participant without ``replace``.
    """
    if outcome not in OUTCOMES:
        raise InvalidInputError(
            f"Outcome must be 'responder' or 'non-responder', got {outcome!r}.")
    pseudonym = validate_pseudonym(pseudonym)
    label = validate_label("operator", actor)
    note = validate_note(note)
    if label is None:
        raise InvalidInputError("Name who enters the outcome (the audit log records it).")
    actor = label
    p = session.scalar(select(Participant).where(Participant.pseudonym == pseudonym))
    if p is None:
        raise InvalidInputError(
            f"No participant {pseudonym!r} in the database; screen them first.")
    previous = session.scalar(select(Outcome).where(Outcome.participant_id == p.id)
                              .order_by(Outcome.id.desc()).limit(1))
    if previous is not None and not replace:
        raise InvalidInputError(
            f"{pseudonym} already has an observed outcome: {_outcome_word(previous.responder)}, "
            f"entered by {previous.entered_by} on {previous.entered_at:%Y-%m-%d %H:%M} UTC. "
            "To record another, confirm that it replaces it (dashboard: 'Replace'; fmmtc "
            "outcome: --replace); the earlier one is kept in the history.")
    o = Outcome(participant=p, responder=OUTCOMES[outcome], entered_by=actor, note=note)
    session.add(o)
    session.flush()
    details: dict[str, object] = {"participant": pseudonym, "outcome": outcome}
    if previous is not None:
        details |= {"previous": _outcome_word(previous.responder),
                    "previous_id": previous.id}
    audit(session, actor, "replace" if previous is not None else "create", "outcome", o.id,
          details)
    return o


def _outcome_word(responder: bool) -> str:
    return "responder" if responder else "non-responder"


@fill_doc
def outcome_history(engine: Engine, pseudonym: str) -> pd.DataFrame:
    """Every observed outcome entered for a participant, latest first.

    Parameters
    ----------
    %(engine)s
    pseudonym : str
        The participant's study pseudonym (stored form; an unknown one gives an empty table).

    Returns
    -------
    pandas.DataFrame
        ``entered_at`` (UTC, naive), ``outcome`` (``"responder"`` or ``"non-responder"``),
        ``entered_by``, ``note`` and ``current`` (True for the latest: the one that counts).
    """
    with Session(engine) as s:
        rows = s.execute(select(Outcome.entered_at, Outcome.responder, Outcome.entered_by,
                                Outcome.note)
                         .join(Participant).where(Participant.pseudonym == pseudonym)
                         .order_by(Outcome.id.desc())).all()
    df = pd.DataFrame(rows, columns=["entered_at", "outcome", "entered_by", "note"])
    df["outcome"] = [_outcome_word(bool(v)) for v in df["outcome"]]
    df["current"] = [i == 0 for i in range(len(df))]
    return df


@fill_doc
def remove_simulated_participants(session: Session, prefix: str, *, actor: str) -> int:
    """Delete every *simulated* participant whose pseudonym starts with ``prefix`` (audited).

    Their scans, screenings (with their attributions) and outcomes go with them, in the
    session's transaction: all of them or, on an error, none. Real participants are never
    touched, whatever their pseudonym: only rows flagged ``simulated`` are deleted. The audit
    log keeps one row naming the pseudonyms removed.

    Parameters
    ----------
    %(session)s
    prefix : str
        Pseudonym prefix of the simulated cohort, e.g. ``"SIM-"`` (at least one character).
    actor : str
        Who removes them (checked by :func:`validate_label`).

    Returns
    -------
    int
        Participants deleted (0 when there is none).

    Raises
    ------
    InvalidInputError
        An empty prefix, or an invalid or missing actor.
    """
    if not prefix:
        raise InvalidInputError("A prefix is needed to remove simulated participants.")
    label = validate_label("operator", actor)
    if label is None:
        raise InvalidInputError("Say who removes the simulated participants (operator).")
    people = session.scalars(select(Participant).where(
        Participant.simulated.is_(True), Participant.pseudonym.startswith(prefix, autoescape=True))
    ).all()
    if not people:
        return 0
    ids = [p.id for p in people]
    screenings = session.scalars(select(Screening).where(Screening.participant_id.in_(ids))).all()
    for screening in screenings:  # the ORM cascade takes the attributions along
        session.delete(screening)
    session.flush()
    for scan in session.scalars(select(Scan).where(Scan.participant_id.in_(ids))).all():
        session.delete(scan)
    for outcome in session.scalars(
            select(Outcome).where(Outcome.participant_id.in_(ids))).all():
        session.delete(outcome)
    session.flush()
    for person in people:
        session.delete(person)
    audit(session, label, "delete", "participant", None,
          {"simulated": True, "prefix": prefix, "removed": sorted(p.pseudonym for p in people),
           "screenings": len(screenings)})
    session.flush()
    return len(people)


@fill_doc
def get_screening(session: Session, screening_id: int) -> Screening:
    """The stored screening ``screening_id``, with everything a summary reads.

    Parameters
    ----------
    %(session)s
    screening_id : int
        The screening's id.

    Returns
    -------
    Screening
        Its regions, connections, participant, scan and model version loaded
        (:meth:`fmmtc_core.summary.ScreeningSummary.from_row` reads them).

    Raises
    ------
    InvalidInputError
        When there is no such screening.
    """
    sc = session.scalar(
        select(Screening).where(Screening.id == int(screening_id))
        .options(selectinload(Screening.regions), selectinload(Screening.connections),
                 selectinload(Screening.participant), selectinload(Screening.scan),
                 selectinload(Screening.model_version)))
    if sc is None:
        raise InvalidInputError(f"No screening with id {screening_id}.")
    return sc


@dataclass
class ScreeningRecord:
    """A stored screening as the explorer shows it: its :class:`ScreeningSummary` (the one
    shape every reader of a screening uses) plus what only the explorer needs.

    Attributes
    ----------
    summary : ScreeningSummary
        The screening (:meth:`~fmmtc_core.summary.ScreeningSummary.from_row`).
    atlas : str
        Atlas of the scan's region series.
    tr : float
        Repetition time, seconds.
    regions : pandas.DataFrame
        One row per region in the atlas's order: ``region_index``, ``label``, ``name``,
        ``network``, ``ts``, ``fc``, ``total`` (logit units), see :func:`region_frame`.
    connections : pandas.DataFrame
        The top connections, strongest first: ``i``, ``j`` (region indices), ``label_i``,
        ``label_j``, ``name_i``, ``name_j``, ``score`` (logit units).
    series : numpy.ndarray or None
        The cleaned region series (volumes x regions) the model saw, when stored.
    """

    summary: ScreeningSummary
    atlas: str
    tr: float
    regions: pd.DataFrame
    connections: pd.DataFrame
    series: np.ndarray | None = None


@fill_doc
def screening_record(session: Session, screening_id: int) -> ScreeningRecord:
    """The stored screening ``screening_id`` as a :class:`ScreeningRecord`.

    Parameters
    ----------
    %(session)s
    screening_id : int
        The screening's id.

    Returns
    -------
    ScreeningRecord

    Raises
    ------
    InvalidInputError
        When there is no such screening.
    """
    sc = get_screening(session, screening_id)
    regions = region_frame(session, screening_id)
    names = dict(zip(regions["region_index"], regions["name"], strict=True))
    connections = pd.DataFrame(
        [{"i": c.region_i, "j": c.region_j, "label_i": c.label_i, "label_j": c.label_j,
          "name_i": names.get(c.region_i, str(c.label_i)),
          "name_j": names.get(c.region_j, str(c.label_j)), "score": c.score}
         for c in sc.connections],  # by rank
        columns=["i", "j", "label_i", "label_j", "name_i", "name_j", "score"])
    return ScreeningRecord(
        summary=ScreeningSummary.from_row(sc), atlas=sc.scan.atlas, tr=sc.scan.tr,
        regions=regions, connections=connections,
        series=decode_series(sc.scan.series) if sc.scan.series else None)


def _latest_outcomes(session: Session) -> dict[int, bool]:
    latest = (select(Outcome.participant_id, func.max(Outcome.id).label("oid"))
              .group_by(Outcome.participant_id).subquery())
    rows = session.execute(select(Outcome.participant_id, Outcome.responder)
                           .join(latest, Outcome.id == latest.c.oid))
    return {pid: bool(r) for pid, r in rows}


SCREENING_COLUMNS = ["screening_id", "participant", "site", "drug", "arm", "simulated",
                     "probability", "band_low", "band_high", "decision", "qc_verdict", "model",
                     "model_validity", "model_warning", "share_ts", "share_fc", "ig_gap",
                     "ig_steps", "runtime_s", "operator", "created_at", "outcome"]


@fill_doc
def screenings_frame(engine: Engine, *, latest_only: bool = True) -> pd.DataFrame:
    """All screenings as a table, with the participant's latest observed outcome.

    Parameters
    ----------
    %(engine)s
    latest_only : bool, default=True
        Keep only the latest screening (highest id) per participant and model; False keeps
        one row per screening.

    Returns
    -------
    pandas.DataFrame
        In screening order, the columns of :data:`SCREENING_COLUMNS`: ``screening_id``,
        ``participant`` (pseudonym), ``site``, ``drug``, ``arm``, ``simulated``,
        ``probability``, ``band_low``, ``band_high``, ``decision``, ``qc_verdict``, ``model``
        (name), ``model_validity`` (the model's
        :attr:`~fmmtc_core.validity.ModelValidity.status`: ``"simulated"``, ``"unknown"``,
        ``"not validated"`` or ``"validated"``), ``model_warning`` (its warning as one
        sentence; empty for a validated model), ``share_ts``, ``share_fc``, ``ig_gap``,
        ``ig_steps``, ``runtime_s``, ``operator``, ``created_at`` (UTC, naive) and ``outcome``
        (``"responder"``, ``"non-responder"`` or None).
    """
    from fmmtc_core.validity import model_validity

    with Session(engine) as s:
        q = (select(Screening.id, Participant.pseudonym, Participant.site, Participant.drug,
                    Participant.arm, Participant.simulated, Screening.probability,
                    Screening.band_low, Screening.band_high, Screening.decision,
                    Scan.qc_verdict, ModelVersion.name, Screening.share_ts, Screening.share_fc,
                    Screening.ig_gap, Screening.ig_steps, Screening.runtime_s,
                    Screening.operator, Screening.created_at, Screening.participant_id,
                    Screening.model_version_id)
             .join(Participant, Screening.participant_id == Participant.id)
             .join(Scan, Screening.scan_id == Scan.id)
             .join(ModelVersion, Screening.model_version_id == ModelVersion.id)
             .order_by(Screening.id))
        rows = s.execute(q).all()
        outcomes = _latest_outcomes(s)
        validity = {mv.id: model_validity(mv.card, mv.name)
                    for mv in s.scalars(select(ModelVersion))}
    extra = ["model_validity", "model_warning", "outcome"]
    cols = [c for c in SCREENING_COLUMNS if c not in extra] + ["participant_id",
                                                               "model_version_id"]
    df = pd.DataFrame(rows, columns=cols)
    if latest_only and len(df):
        df = df.drop_duplicates(["participant_id", "model_version_id"], keep="last")
    df.insert(cols.index("model") + 1, "model_validity",
              [validity[m].status for m in df["model_version_id"]])
    df.insert(cols.index("model") + 2, "model_warning",
              [validity[m].text if validity[m].warn else "" for m in df["model_version_id"]])
    df["outcome"] = [
        None if pid not in outcomes else ("responder" if outcomes[pid] else "non-responder")
        for pid in df["participant_id"]]
    return df.drop(columns=["participant_id", "model_version_id"]).reset_index(drop=True)


@fill_doc
def region_frame(session: Session, screening_id: int) -> pd.DataFrame:
    """The region attributions of a stored screening as a table.

    Parameters
    ----------
    %(session)s
    screening_id : int
        The screening's id.

    Returns
    -------
    pandas.DataFrame
        One row per region, in the atlas's order: ``region_index``, ``label``, ``name``,
        ``network``, ``ts``, ``fc``, ``total`` (logit units). Empty (with these columns) when
        there is no such screening.
    """
    rows = session.execute(
        select(RegionAttribution.region_index, RegionAttribution.label, RegionAttribution.name,
               RegionAttribution.network, RegionAttribution.ts, RegionAttribution.fc,
               RegionAttribution.total)
        .where(RegionAttribution.screening_id == int(screening_id))
        .order_by(RegionAttribution.region_index)).all()
    return pd.DataFrame(rows, columns=["region_index", "label", "name", "network", "ts", "fc",
                                       "total"])


@fill_doc
def cohort_region_means(engine: Engine, *, threshold: float = 0.5) -> pd.DataFrame:
    """Mean region score (total) of predicted responders and predicted non-responders.

    Only the latest screening (highest id) per participant and model counts; a participant
    screened with two models counts once for each.

    Parameters
    ----------
    %(engine)s
    threshold : float, default=0.5
        A screening with a calibrated probability at or above it is a predicted responder.

    Returns
    -------
    pandas.DataFrame
        One row per region index and group: ``region_index``, ``responder`` (bool: the
        group), ``mean`` (mean ``total``, logit units) and ``n`` (screenings averaged). A
        group without screenings has no rows.
    """
    with Session(engine) as s:
        latest = (select(func.max(Screening.id).label("sid"))
                  .group_by(Screening.participant_id, Screening.model_version_id).subquery())
        rows = s.execute(
            select(RegionAttribution.region_index,
                   (Screening.probability >= threshold).label("resp"),
                   func.avg(RegionAttribution.total), func.count())
            .join(Screening, RegionAttribution.screening_id == Screening.id)
            .join(latest, latest.c.sid == Screening.id)
            .group_by(RegionAttribution.region_index, "resp")).all()
    df = pd.DataFrame(rows, columns=["region_index", "responder", "mean", "n"])
    return df


@fill_doc
def outcomes_frame(engine: Engine) -> pd.DataFrame:
    """Every observed outcome entered, in the order entered.

    Parameters
    ----------
    %(engine)s

    Returns
    -------
    pandas.DataFrame
        ``participant`` (pseudonym), ``responder`` (bool), ``entered_by`` and ``entered_at``
        (UTC, naive); a participant with several outcomes has several rows.
    """
    with Session(engine) as s:
        rows = s.execute(select(Participant.pseudonym, Outcome.responder, Outcome.entered_by,
                                Outcome.entered_at)
                         .join(Participant).order_by(Outcome.id)).all()
    return pd.DataFrame(rows, columns=["participant", "responder", "entered_by", "entered_at"])


#: A cell starting with one of these is read as a formula by spreadsheet programs.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "|")


def csv_text(df: pd.DataFrame) -> str:
    """``df`` as CSV text that is safe to open in a spreadsheet (CSV/formula injection).

    Every text cell that starts with ``= + - @``, a tab, a line break or ``|`` is prefixed with
    a single quote (the OWASP recommendation), so it is shown as text and never run; numbers
    stay numbers. Every CSV the project writes goes through here (``fmmtc db export`` and the
    dashboard's download).

    Parameters
    ----------
    df : pandas.DataFrame
        Any table; it is not changed.

    Returns
    -------
    str
        CSV text with a header row and no index column.
    """
    def neutral(value):
        if isinstance(value, str) and value.startswith(_FORMULA_START):
            return "'" + value
        return value

    safe = df.copy()
    for col in safe.columns:
        if pd.api.types.is_object_dtype(safe[col]) or pd.api.types.is_string_dtype(safe[col]):
            safe[col] = safe[col].map(neutral)
    return safe.to_csv(index=False)


@fill_doc
def export_csv(engine: Engine, path: str | os.PathLike, *, latest_only: bool = False) -> int:
    """Write the screenings to a CSV file (see :func:`screenings_frame` and :func:`csv_text`).

    Parameters
    ----------
    %(engine)s
    path : str or path
        The CSV file to write (UTF-8; replaced if it exists).
    latest_only : bool, default=False
        Only the latest screening per participant and model; False writes every screening.

    Returns
    -------
    int
        Rows written (not counting the header).
    """
    df = screenings_frame(engine, latest_only=latest_only)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(csv_text(df))
    return len(df)

