"""One image belongs to one participant; one screening per image and model (plus forced repeats).

- ``scans.participant_id`` (the participant the image belongs to), with ``(id, participant_id)``
  unique, and a composite foreign key ``screenings (scan_id, participant_id) -> scans``: the
  database itself refuses to store one image under two pseudonyms.
- ``screenings.revision`` (0, then +1 for each forced repeat) with
  ``(scan_id, model_version_id, revision)`` unique: two writers racing to store the same
  screening cannot both succeed.

Existing rows are filled in: each scan's participant is the one of its screenings, revisions
count the screenings of the same image and model in the order they were stored. A scan that an
earlier version stored under two pseudonyms (the race this migration closes) cannot be given an
owner automatically: the upgrade stops and names the screenings to review.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fmmtc_core._errors import StorageError

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _fill_in(conn) -> None:
    rows = conn.execute(sa.text(
        "SELECT s.id, s.scan_id, s.model_version_id, s.participant_id, p.pseudonym "
        "FROM screenings s JOIN participants p ON p.id = s.participant_id ORDER BY s.id")).all()
    owners: dict[int, dict[int, str]] = {}
    for _sid, scan_id, _mv, pid, pseudonym in rows:
        owners.setdefault(scan_id, {})[pid] = pseudonym
    shared = {scan: who for scan, who in owners.items() if len(who) > 1}
    if shared:
        listed = "; ".join(
            f"scan {scan}: " + ", ".join(repr(n) for n in who.values())
            + " (screenings " + ", ".join(str(r[0]) for r in rows if r[1] == scan) + ")"
            for scan, who in sorted(shared.items())[:5])
        raise StorageError(
            f"{len(shared)} scan(s) are stored under more than one pseudonym ({listed}). One "
            "image belongs to one participant: back the database up, delete the screenings "
            "stored under the wrong pseudonym, then run `fmmtc db upgrade` again.")
    orphans = conn.execute(sa.text(
        "SELECT COUNT(*) FROM scans c WHERE NOT EXISTS "
        "(SELECT 1 FROM screenings s WHERE s.scan_id = c.id)")).scalar()
    if orphans:
        raise StorageError(f"{orphans} scan(s) have no screening, so their participant is "
                           "unknown; the database was not written by fmmtc as it stands.")
    for scan_id, who in owners.items():
        conn.execute(sa.text("UPDATE scans SET participant_id = :p WHERE id = :i"),
                     {"p": next(iter(who)), "i": scan_id})
    seen: dict[tuple[int, int], int] = {}
    for sid, scan_id, mv, _pid, _name in rows:
        rev = seen.get((scan_id, mv), -1) + 1
        seen[(scan_id, mv)] = rev
        if rev:
            conn.execute(sa.text("UPDATE screenings SET revision = :r WHERE id = :i"),
                         {"r": rev, "i": sid})


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.add_column(sa.Column("participant_id", sa.Integer, nullable=True))
    with op.batch_alter_table("screenings") as batch:
        batch.add_column(sa.Column("revision", sa.Integer, nullable=False,
                                   server_default="0"))
    _fill_in(op.get_bind())
    with op.batch_alter_table("scans") as batch:
        batch.alter_column("participant_id", existing_type=sa.Integer, nullable=False)
        batch.create_foreign_key("fk_scans_participant", "participants", ["participant_id"],
                                 ["id"], ondelete="RESTRICT")
        batch.create_unique_constraint("uq_scans_id_participant", ["id", "participant_id"])
        batch.create_index("ix_scans_participant_id", ["participant_id"])
    with op.batch_alter_table("screenings") as batch:
        batch.create_unique_constraint("uq_screenings_scan_model_revision",
                                       ["scan_id", "model_version_id", "revision"])
        batch.create_foreign_key("fk_screenings_scan_participant", "scans",
                                 ["scan_id", "participant_id"], ["id", "participant_id"],
                                 ondelete="RESTRICT")


def downgrade() -> None:
    with op.batch_alter_table("screenings") as batch:
        batch.drop_constraint("fk_screenings_scan_participant", type_="foreignkey")
        batch.drop_constraint("uq_screenings_scan_model_revision", type_="unique")
        batch.drop_column("revision")
    with op.batch_alter_table("scans") as batch:
        batch.drop_index("ix_scans_participant_id")
        batch.drop_constraint("uq_scans_id_participant", type_="unique")
        batch.drop_constraint("fk_scans_participant", type_="foreignkey")
        batch.drop_column("participant_id")
