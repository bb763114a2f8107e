"""Flag simulated participants (the demo cohort) and index screenings for the cohort page.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("participants") as batch:
        batch.add_column(sa.Column("simulated", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
    op.create_index("ix_screenings_lookup", "screenings", ["inputs_sha256", "model_version_id"])
    op.create_index("ix_screenings_created", "screenings", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_screenings_created", table_name="screenings")
    op.drop_index("ix_screenings_lookup", table_name="screenings")
    with op.batch_alter_table("participants") as batch:
        batch.drop_column("simulated")
