"""The cohort database schema (SQLAlchemy 2.x ORM). Migrations live in ``migrations/``.

What is stored, and what is not
-------------------------------
- Participants are known only by their **study pseudonym** (validated: no dates, no spaces), with
  optional site, drug and arm. Never a name, a birth date or a hospital number.
- **One image belongs to one participant**, whatever side files come with it: a scan row (keyed
  by the SHA-256 of the image file) carries its participant, and a screening's
  ``(scan_id, participant_id)`` must match it (a composite foreign key, so the database itself
  refuses a second pseudonym for the same image, even under concurrent writers).
- **One screening per image and model**, unless it is deliberately repeated (``--force``): each
  repeat gets the next ``revision``, and ``(scan_id, model_version_id, revision)`` is unique, so
  two writers racing to store the same screening cannot both succeed.
- **Raw images are never stored.** A scan row keeps the SHA-256 of the uploaded bytes, its
  shape, TR, atlas, the QC report, and the cleaned region time series (float32, zlib-compressed,
  ~0.3-0.5 MB for 426 regions x 300 volumes): exactly what is needed to re-run the model and
  re-explain a screening without the image, and nothing from which the image could be rebuilt.
- Every screening records the calibrated probability, its band, the decision and the thresholds
  in force, the model version, the explanation settings and completeness gap, runtimes, the
  software version, who ran it and when; its region and top-connection attributions are child
  rows. Observed outcomes are entered later. Every write adds an audit-log row in the same
  transaction.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "Participant",
    "Scan",
    "ModelVersion",
    "Screening",
    "RegionAttribution",
    "ConnectionAttribution",
    "Outcome",
    "AuditLog",
    "TABLES",
]


def utcnow() -> dt.datetime:
    """The current time in UTC, without a time zone (as the database keeps it).

    Returns
    -------
    datetime.datetime
        Naive, in UTC (the default of every ``created_at``-like column).
    """
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of every table (its ``metadata`` is the schema Alembic migrates)."""


class Participant(Base):
    """A study participant, known only by pseudonym (table ``participants``).

    Attributes
    ----------
    id : int
        Primary key.
    pseudonym : str
        Study pseudonym, unique (:func:`fmmtc_core.store.repository.validate_pseudonym`).
    site, drug, arm : str or None
        Optional labels (:func:`fmmtc_core.store.repository.validate_label`).
    simulated : bool
        True for a simulated (demo) participant; default False.
    created_at : datetime.datetime
        When the row was created (UTC, naive).
    screenings : list of Screening
    outcomes : list of Outcome
        Observed outcomes, in the order entered.
    """

    __tablename__ = "participants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    site: Mapped[str | None] = mapped_column(String(64))
    drug: Mapped[str | None] = mapped_column(String(64))
    arm: Mapped[str | None] = mapped_column(String(64))
    simulated: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)

    screenings: Mapped[list[Screening]] = relationship(back_populates="participant")
    outcomes: Mapped[list[Outcome]] = relationship(back_populates="participant")


class Scan(Base):
    """One image, by content: what a screening read from it, never the image (table ``scans``).

    Attributes
    ----------
    id : int
        Primary key.
    sha256 : str
        SHA-256 of the image file, unique: one image, one row, one participant.
    participant_id : int
        The participant the image belongs to.
    kind : {"nifti", "table"}
    shape : list of int
        The image's shape: (X, Y, Z, T) for a NIfTI, (T, R) for a table.
    tr : float
        Repetition time, seconds.
    atlas : str
        Atlas of the region series.
    qc_verdict : {"pass", "warn", "fail"}
    qc : dict
        The QC report (:meth:`fmmtc_core.qc.QCReport.to_dict`).
    n_volumes, n_regions : int
    series : bytes or None
        The cleaned region series (T x R float32), zlib-compressed
        (:func:`fmmtc_core.store.repository.encode_series`).
    created_at : datetime.datetime
        When the row was created (UTC, naive).
    participant : Participant
    """

    __tablename__ = "scans"
    __table_args__ = (UniqueConstraint("id", "participant_id", name="uq_scans_id_participant"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    participant_id: Mapped[int] = mapped_column(
        ForeignKey("participants.id", ondelete="RESTRICT", name="fk_scans_participant"),
        nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # nifti | table
    shape: Mapped[list] = mapped_column(JSON, nullable=False)
    tr: Mapped[float] = mapped_column(Float, nullable=False)
    atlas: Mapped[str] = mapped_column(String(64), nullable=False)
    qc_verdict: Mapped[str] = mapped_column(String(8), nullable=False)
    qc: Mapped[dict] = mapped_column(JSON, nullable=False)
    n_volumes: Mapped[int] = mapped_column(Integer, nullable=False)
    n_regions: Mapped[int] = mapped_column(Integer, nullable=False)
    series: Mapped[bytes | None] = mapped_column(LargeBinary)  # zlib(float32 T x R), cleaned
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)

    participant: Mapped[Participant] = relationship(foreign_keys=[participant_id])


class ModelVersion(Base):
    """A model, identified by its weights (table ``model_versions``).

    Attributes
    ----------
    id : int
        Primary key.
    name : str
        The model's name (from its card).
    weights_sha256 : str
        Identity of the model version, unique: SHA-256 over its card and every weights file
        (:attr:`fmmtc_core.models.ensemble.FMMTCEnsemble.weights_sha256`).
    card : dict
        The model card.
    created_at : datetime.datetime
        When the row was created (UTC, naive).
    """

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    weights_sha256: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    card: Mapped[dict] = mapped_column(JSON, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class Screening(Base):
    """One screening of a scan with a model (table ``screenings``).

    ``(scan_id, model_version_id, revision)`` is unique, and ``(scan_id, participant_id)`` must
    match the scan's own participant (a composite foreign key).

    Attributes
    ----------
    id : int
        Primary key.
    participant_id, scan_id, model_version_id : int
    revision : int
        0 for the first screening of this image with this model, +1 for each forced repeat.
    inputs_sha256 : str
        Digest of the scan, sidecar and confounds contents: with the model version, what
        decides the result.
    probability : float
        Calibrated responder probability.
    band_low, band_high : float
        Its uncertainty band.
    fold_probabilities : list of float
    decision : str
        ``"likely responder"``, ``"likely non-responder"`` or ``"uncertain"``.
    thresholds : dict
        The decision thresholds in force.
    share_ts, share_fc : float or None
        Each modality's share of the total absolute attribution.
    ig_gap : float or None
        Integrated Gradients completeness gap (relative).
    ig_steps : int or None
        Integration steps.
    explanation : dict or None
        Explanation settings, baselines, networks, ``logit`` and ``baseline_logit``,
        ``ig_gap_abs``.
    runtime_s : float
        Total seconds.
    stage_seconds : dict
        Seconds per stage.
    software_version : str
        The fmmtc version that made the screening.
    operator : str
        Who ran it.
    created_at : datetime.datetime
        When (UTC, naive).
    participant : Participant
    scan : Scan
    model_version : ModelVersion
    regions : list of RegionAttribution
        In region order.
    connections : list of ConnectionAttribution
        By rank.
    """

    __tablename__ = "screenings"
    __table_args__ = (
        Index("ix_screenings_lookup", "inputs_sha256", "model_version_id"),
        Index("ix_screenings_created", "created_at"),
        UniqueConstraint("scan_id", "model_version_id", "revision",
                         name="uq_screenings_scan_model_revision"),
        ForeignKeyConstraint(["scan_id", "participant_id"], ["scans.id", "scans.participant_id"],
                             name="fk_screenings_scan_participant", ondelete="RESTRICT"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    participant_id: Mapped[int] = mapped_column(
        ForeignKey("participants.id", ondelete="RESTRICT"), nullable=False, index=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="RESTRICT"),
                                         nullable=False)
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT"), nullable=False)
    # 0 for the first screening of this image with this model, +1 for each forced repeat
    revision: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # scan + sidecar + confounds content: what decides the result, with the model version
    inputs_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    probability: Mapped[float] = mapped_column(Float, nullable=False)
    band_low: Mapped[float] = mapped_column(Float, nullable=False)
    band_high: Mapped[float] = mapped_column(Float, nullable=False)
    fold_probabilities: Mapped[list] = mapped_column(JSON, nullable=False)
    decision: Mapped[str] = mapped_column(String(32), nullable=False)
    thresholds: Mapped[dict] = mapped_column(JSON, nullable=False)
    share_ts: Mapped[float | None] = mapped_column(Float)
    share_fc: Mapped[float | None] = mapped_column(Float)
    ig_gap: Mapped[float | None] = mapped_column(Float)
    ig_steps: Mapped[int | None] = mapped_column(Integer)
    explanation: Mapped[dict | None] = mapped_column(JSON)  # settings, baselines, networks, F
    runtime_s: Mapped[float] = mapped_column(Float, nullable=False)
    stage_seconds: Mapped[dict] = mapped_column(JSON, nullable=False)
    software_version: Mapped[str] = mapped_column(String(32), nullable=False)
    operator: Mapped[str] = mapped_column(String(128), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)

    participant: Mapped[Participant] = relationship(back_populates="screenings",
                                                    foreign_keys=[participant_id])
    scan: Mapped[Scan] = relationship(foreign_keys=[scan_id])
    model_version: Mapped[ModelVersion] = relationship()
    regions: Mapped[list[RegionAttribution]] = relationship(
        back_populates="screening", cascade="all, delete-orphan",
        order_by="RegionAttribution.region_index")
    connections: Mapped[list[ConnectionAttribution]] = relationship(
        back_populates="screening", cascade="all, delete-orphan",
        order_by="ConnectionAttribution.rank")


class RegionAttribution(Base):
    """One region's attribution in a screening (table ``region_attributions``).

    Attributes
    ----------
    id : int
        Primary key.
    screening_id : int
        Deleted with its screening.
    region_index : int
        Position in the atlas's order (unique per screening).
    label : int
        The atlas's label of the region.
    name, network : str
        Region name and group (network / lobe).
    ts, fc, total : float
        Time-series, connectivity and total attribution (logit units).
    screening : Screening
    """

    __tablename__ = "region_attributions"
    __table_args__ = (UniqueConstraint("screening_id", "region_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    screening_id: Mapped[int] = mapped_column(
        ForeignKey("screenings.id", ondelete="CASCADE"), nullable=False)
    region_index: Mapped[int] = mapped_column(Integer, nullable=False)
    label: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    network: Mapped[str] = mapped_column(String(64), nullable=False)
    ts: Mapped[float] = mapped_column(Float, nullable=False)
    fc: Mapped[float] = mapped_column(Float, nullable=False)
    total: Mapped[float] = mapped_column(Float, nullable=False)

    screening: Mapped[Screening] = relationship(back_populates="regions")


class ConnectionAttribution(Base):
    """One of a screening's top connections (table ``connection_attributions``).

    Attributes
    ----------
    id : int
        Primary key.
    screening_id : int
        Deleted with its screening.
    rank : int
        0 for the strongest (unique per screening).
    region_i, region_j : int
        Positions of the two regions in the atlas's order.
    label_i, label_j : int
        Their atlas labels.
    score : float
        Attribution (logit units).
    screening : Screening
    """

    __tablename__ = "connection_attributions"
    __table_args__ = (UniqueConstraint("screening_id", "rank"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    screening_id: Mapped[int] = mapped_column(
        ForeignKey("screenings.id", ondelete="CASCADE"), nullable=False)
    rank: Mapped[int] = mapped_column(Integer, nullable=False)
    region_i: Mapped[int] = mapped_column(Integer, nullable=False)
    region_j: Mapped[int] = mapped_column(Integer, nullable=False)
    label_i: Mapped[int] = mapped_column(Integer, nullable=False)
    label_j: Mapped[int] = mapped_column(Integer, nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)

    screening: Mapped[Screening] = relationship(back_populates="connections")


class Outcome(Base):
    """An observed treatment outcome of a participant (table ``outcomes``; the latest counts).

    Attributes
    ----------
    id : int
        Primary key.
    participant_id : int
    responder : bool
        True for a responder, False for a non-responder.
    entered_by : str
        Who entered it.
    entered_at : datetime.datetime
        When (UTC, naive).
    note : str or None
        Free-text note (:func:`fmmtc_core.store.repository.validate_note`).
    participant : Participant
    """

    __tablename__ = "outcomes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    participant_id: Mapped[int] = mapped_column(
        ForeignKey("participants.id", ondelete="RESTRICT"), nullable=False, index=True)
    responder: Mapped[bool] = mapped_column(Boolean, nullable=False)
    entered_by: Mapped[str] = mapped_column(String(128), nullable=False)
    entered_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    note: Mapped[str | None] = mapped_column(Text)

    participant: Mapped[Participant] = relationship(back_populates="outcomes")


class AuditLog(Base):
    """One audited action (table ``audit_log``): written in the same transaction as the change.

    Attributes
    ----------
    id : int
        Primary key.
    at : datetime.datetime
        When (UTC, naive).
    actor : str
        Who.
    action : str
        E.g. ``"create"``, ``"update"``, ``"sign-in"``.
    entity : str
        What kind of row (``"participant"``, ``"scan"``, ``"screening"`` ...).
    entity_id : int or None
        Its id, when it has one.
    details : dict or None
        What changed.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    actor: Mapped[str] = mapped_column(String(128), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    entity: Mapped[str] = mapped_column(String(64), nullable=False)
    entity_id: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict | None] = mapped_column(JSON)


#: Every table, for row counts and integrity checks.
TABLES = (Participant, Scan, ModelVersion, Screening, RegionAttribution, ConnectionAttribution,
          Outcome, AuditLog)
