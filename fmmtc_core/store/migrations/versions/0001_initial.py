"""Initial schema: participants, scans, model versions, screenings, attributions, outcomes,
audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "participants",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("pseudonym", sa.String(64), nullable=False, unique=True),
        sa.Column("site", sa.String(64)),
        sa.Column("drug", sa.String(64)),
        sa.Column("arm", sa.String(64)),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "scans",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("shape", sa.JSON, nullable=False),
        sa.Column("tr", sa.Float, nullable=False),
        sa.Column("atlas", sa.String(64), nullable=False),
        sa.Column("qc_verdict", sa.String(8), nullable=False),
        sa.Column("qc", sa.JSON, nullable=False),
        sa.Column("n_volumes", sa.Integer, nullable=False),
        sa.Column("n_regions", sa.Integer, nullable=False),
        sa.Column("series", sa.LargeBinary),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("card", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "screenings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("participant_id", sa.Integer,
                  sa.ForeignKey("participants.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("scan_id", sa.Integer, sa.ForeignKey("scans.id", ondelete="RESTRICT"),
                  nullable=False),
        sa.Column("model_version_id", sa.Integer,
                  sa.ForeignKey("model_versions.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("inputs_sha256", sa.String(64), nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("band_low", sa.Float, nullable=False),
        sa.Column("band_high", sa.Float, nullable=False),
        sa.Column("fold_probabilities", sa.JSON, nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("thresholds", sa.JSON, nullable=False),
        sa.Column("share_ts", sa.Float),
        sa.Column("share_fc", sa.Float),
        sa.Column("ig_gap", sa.Float),
        sa.Column("ig_steps", sa.Integer),
        sa.Column("explanation", sa.JSON),
        sa.Column("runtime_s", sa.Float, nullable=False),
        sa.Column("stage_seconds", sa.JSON, nullable=False),
        sa.Column("software_version", sa.String(32), nullable=False),
        sa.Column("operator", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_screenings_participant_id", "screenings", ["participant_id"])
    op.create_table(
        "region_attributions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("screening_id", sa.Integer,
                  sa.ForeignKey("screenings.id", ondelete="CASCADE"), nullable=False),
        sa.Column("region_index", sa.Integer, nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("network", sa.String(64), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("fc", sa.Float, nullable=False),
        sa.Column("total", sa.Float, nullable=False),
        sa.UniqueConstraint("screening_id", "region_index"),
    )
    op.create_table(
        "connection_attributions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("screening_id", sa.Integer,
                  sa.ForeignKey("screenings.id", ondelete="CASCADE"), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("region_i", sa.Integer, nullable=False),
        sa.Column("region_j", sa.Integer, nullable=False),
        sa.Column("label_i", sa.Integer, nullable=False),
        sa.Column("label_j", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.UniqueConstraint("screening_id", "rank"),
    )
    op.create_table(
        "outcomes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("participant_id", sa.Integer,
                  sa.ForeignKey("participants.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("responder", sa.Boolean, nullable=False),
        sa.Column("entered_by", sa.String(128), nullable=False),
        sa.Column("entered_at", sa.DateTime, nullable=False),
        sa.Column("note", sa.Text),
    )
    op.create_index("ix_outcomes_participant_id", "outcomes", ["participant_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("entity", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.Integer),
        sa.Column("details", sa.JSON),
    )


def downgrade() -> None:
    for table in ("audit_log", "outcomes", "connection_attributions", "region_attributions",
                  "screenings", "model_versions", "scans", "participants"):
        op.drop_table(table)
