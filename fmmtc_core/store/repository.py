"""Repository functions: every read and write the dashboard and the CLI make (no SQL in pages).

Writers take an open session (inside :func:`~fmmtc_core.store.db.session_scope`) so the caller
decides the transaction; each write adds its audit-log row in that same transaction.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, selectinload

from fmmtc_core._errors import InvalidInputError
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

_PSEUDONYM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_DATE = re.compile(r"(19|20)\d{2}[-_./]?(0[1-9]|1[0-2])[-_./]?(0[1-9]|[12]\d|3[01])"
                   r"|(0[1-9]|[12]\d|3[01])[-_./](0[1-9]|1[0-2])[-_./](19|20)?\d{2}")

OUTCOMES = {"responder": True, "non-responder": False}


def validate_pseudonym(value: str) -> str:
    """A study pseudonym: 1-64 letters, digits, ``_ . -``, starting with a letter or digit, and
    nothing that looks like a date (birth dates must never reach the database)."""
    value = (value or "").strip()
    if value.startswith("sub-"):
        value = value[4:]
    if not _PSEUDONYM.match(value):
        raise InvalidInputError(
            f"{value!r} is not a valid study pseudonym: use 1-64 letters, digits, '_', '.' or "
            "'-' (e.g. PAIN-0042), never a name.")
    if _DATE.search(value):
        raise InvalidInputError(
            f"{value!r} looks like it contains a date; enter the study pseudonym only, never a "
            "birth date.")
    return value


#: Site, drug, arm and operator: short labels of letters, digits, spaces and ``_ . - ( ) / +``.
_LABEL = re.compile(r"^[\w][\w .()/+\-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
NOTE_MAX = 1000


def validate_label(name: str, value: str | None, *, max_len: int = 64) -> str | None:
    """A short free-text label (site, drug, arm, operator), stripped; ``None`` stays ``None``.

    1-64 characters (``max_len``): letters (any script), digits, spaces and ``_ . - ( ) / +``,
    starting with a letter or digit. Anything else (markup, formula prefixes such as ``=``,
    control characters, newlines) is refused, so the value is safe to show and to export.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"The {name} must be text, got {type(value).__name__}.")
    value = value.strip()
    if not value:
        return None
    if len(value) > max_len or not _LABEL.fullmatch(value):
        raise InvalidInputError(
            f"Invalid {name} {value[:80]!r}: use 1-{max_len} letters, digits, spaces or "
            "'_ . - ( ) / +', starting with a letter or digit.")
    return value


def validate_note(value: str | None, *, max_len: int = NOTE_MAX) -> str | None:
    """A free-text note (outcome notes): at most ``max_len`` characters, no control characters
    other than line breaks and tabs. Notes are escaped wherever they are shown."""
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
    """Who runs a screening when nobody is named: ``FMMTC_OPERATOR`` (validated like every
    label), else the OS user (when it is a valid label), else ``"unknown"``."""
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


def audit(session: Session, actor: str, action: str, entity: str, entity_id: int | None,
          details: dict | None = None) -> None:
    session.add(AuditLog(actor=actor, action=action, entity=entity, entity_id=entity_id,
                         details=details))


def get_or_create_participant(session: Session, pseudonym: str, *, actor: str,
                              site=None, drug=None, arm=None,
                              simulated: bool = False) -> Participant:
    """The participant with this pseudonym; created (and audited) if new. Site, drug and arm are
    filled in when given and not yet known."""
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


def get_or_create_model_version(session: Session, name: str, weights_sha256: str, card: dict,
                                *, actor: str) -> ModelVersion:
    mv = session.scalar(select(ModelVersion).where(ModelVersion.weights_sha256 == weights_sha256))
    if mv is None:
        mv = ModelVersion(name=name, weights_sha256=weights_sha256, card=card)
        session.add(mv)
        session.flush()
        audit(session, actor, "create", "model_version", mv.id,
              {"name": name, "weights_sha256": weights_sha256})
    return mv


def find_screening(session: Session, inputs_sha256: str, weights_sha256: str) -> Screening | None:
    """The latest stored screening of these inputs with this model, if any."""
    return session.scalar(
        select(Screening).join(ModelVersion)
        .where(Screening.inputs_sha256 == inputs_sha256,
               ModelVersion.weights_sha256 == weights_sha256)
        .order_by(Screening.id.desc()).limit(1))


def find_scan(session: Session, sha256: str) -> Scan | None:
    """The stored scan with this image hash (with its participant), if any."""
    return session.scalar(select(Scan).where(Scan.sha256 == sha256)
                          .options(selectinload(Scan.participant)))


def latest_screening(session: Session, scan_sha256: str,
                     weights_sha256: str) -> Screening | None:
    """The latest revision of the screening of this image with this model, if any."""
    return session.scalar(
        select(Screening).join(Scan, Screening.scan_id == Scan.id)
        .join(ModelVersion, Screening.model_version_id == ModelVersion.id)
        .where(Scan.sha256 == scan_sha256, ModelVersion.weights_sha256 == weights_sha256)
        .order_by(Screening.revision.desc()).limit(1))


def encode_series(data: np.ndarray) -> bytes:
    """Cleaned region series (T, R) -> compressed bytes (little-endian float32, shape header)."""
    arr = np.ascontiguousarray(data, dtype="<f4")
    header = np.asarray(arr.shape, dtype="<i4").tobytes()
    return zlib.compress(header + arr.tobytes(), level=6)


def decode_series(blob: bytes) -> np.ndarray:
    raw = zlib.decompress(blob)
    t, r = np.frombuffer(raw[:8], dtype="<i4")
    return np.frombuffer(raw[8:], dtype="<f4").reshape(int(t), int(r)).copy()


def add_screening(session: Session, *, participant: Participant, model_version: ModelVersion,
                  scan_fields: dict, screening_fields: dict, regions: list[dict],
                  connections: list[dict], actor: str, revision: int = 0) -> Screening:
    """Insert a scan (if new; it then belongs to ``participant``), a screening and its
    attributions, and audit them.

    The database refuses (``IntegrityError`` at flush, a conflict in
    :func:`~fmmtc_core.store.db.session_scope`) a scan stored under another participant and a
    second screening with the same ``(scan, model, revision)``; the caller decides what a lost
    race means (see :func:`fmmtc_core.screening.screen`).
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


def record_outcome(session: Session, pseudonym: str, outcome: str, *, actor: str,
                   note: str | None = None) -> Outcome:
    """Enter an observed outcome (``"responder"`` or ``"non-responder"``) for a participant."""
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
    o = Outcome(participant=p, responder=OUTCOMES[outcome], entered_by=actor, note=note)
    session.add(o)
    session.flush()
    audit(session, actor, "create", "outcome", o.id, {"participant": pseudonym,
                                                      "outcome": outcome})
    return o


def get_screening(session: Session, screening_id: int) -> Screening:
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


def screening_record(session: Session, screening_id: int) -> ScreeningRecord:
    """The stored screening ``screening_id`` as a :class:`ScreeningRecord`.

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
                     "share_ts", "share_fc", "ig_gap", "ig_steps", "runtime_s", "operator",
                     "created_at", "outcome"]


def screenings_frame(engine: Engine, *, latest_only: bool = True) -> pd.DataFrame:
    """All screenings as a table (one row each; with ``latest_only`` the latest per participant
    and model), with the participant's latest observed outcome."""
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
    cols = SCREENING_COLUMNS[:-1] + ["participant_id", "model_version_id"]
    df = pd.DataFrame(rows, columns=cols)
    if latest_only and len(df):
        df = df.drop_duplicates(["participant_id", "model_version_id"], keep="last")
    df["outcome"] = [
        None if pid not in outcomes else ("responder" if outcomes[pid] else "non-responder")
        for pid in df["participant_id"]]
    return df.drop(columns=["participant_id", "model_version_id"]).reset_index(drop=True)


def region_frame(session: Session, screening_id: int) -> pd.DataFrame:
    rows = session.execute(
        select(RegionAttribution.region_index, RegionAttribution.label, RegionAttribution.name,
               RegionAttribution.network, RegionAttribution.ts, RegionAttribution.fc,
               RegionAttribution.total)
        .where(RegionAttribution.screening_id == int(screening_id))
        .order_by(RegionAttribution.region_index)).all()
    return pd.DataFrame(rows, columns=["region_index", "label", "name", "network", "ts", "fc",
                                       "total"])


def cohort_region_means(engine: Engine, *, threshold: float = 0.5) -> pd.DataFrame:
    """Mean region score (total) of predicted responders (probability >= threshold) and
    predicted non-responders, per region index (latest screening per participant)."""
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


def outcomes_frame(engine: Engine) -> pd.DataFrame:
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


def export_csv(engine: Engine, path, *, latest_only: bool = False) -> int:
    """Write every screening (one row each) to a CSV file (see :func:`csv_text`); returns the
    number of rows."""
    df = screenings_frame(engine, latest_only=latest_only)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(csv_text(df))
    return len(df)

