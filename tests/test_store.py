"""The cohort database: locations, SQLite settings, migrations, repository functions, and
the same behaviour on a real PostgreSQL server."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import fake_screening
from sqlalchemy import inspect, text

from fmmtc_core import InvalidInputError
from fmmtc_core._errors import StorageError
from fmmtc_core.store.db import DatabaseError
from fmmtc_core.store import (
    current_revision,
    default_url,
    downgrade,
    head_revision,
    integrity_check,
    make_engine,
    open_database,
    row_counts,
    session_scope,
    upgrade,
)
from fmmtc_core.store import repository as repo


def _assert_crash_rolls_back(engine):
    """A write transaction interrupted by an exception leaves every table as it was."""
    before = row_counts(engine)
    with pytest.raises(RuntimeError):
        with session_scope(engine, write=True) as s:
            fake_screening(s, "PAIN-0002", sha="b" * 64)
            raise RuntimeError("crash before commit")
    assert row_counts(engine) == before


# --------------------------------------------------------------------------------------------
# Location and SQLite settings
# --------------------------------------------------------------------------------------------
def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("FMMTC_DATABASE_URL", raising=False)
    monkeypatch.setenv("FMMTC_DATA_DIR", str(tmp_path / "d"))
    assert default_url() == f"sqlite:///{tmp_path / 'd' / 'fmmtc.db'}"
    monkeypatch.setenv("FMMTC_DATABASE_URL", "sqlite:///elsewhere.db")
    assert default_url() == "sqlite:///elsewhere.db"
    monkeypatch.delenv("FMMTC_DATABASE_URL")
    engine = open_database()
    assert (tmp_path / "d" / "fmmtc.db").exists()
    assert current_revision(engine) == head_revision()


def test_sqlite_wal_and_foreign_keys(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with pytest.raises(DatabaseError, match="refused the change: FOREIGN KEY"):
        with session_scope(engine, write=True) as s:
            s.execute(text("INSERT INTO outcomes (participant_id, responder, entered_by, "
                           "entered_at) VALUES (999, 1, 'x', '2026-01-01')"))
    assert row_counts(engine)["outcomes"] == 0


@pytest.mark.parametrize("url, match", [
    ("not a url", "is not a database URL"),
    ("nosuchdb://x/y", "No database driver"),
])
def test_bad_urls(url, match):
    with pytest.raises(InvalidInputError, match=match):
        make_engine(url)


def test_unwritable_sqlite_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="Cannot create the database folder"):
        make_engine(f"sqlite:///{blocker / 'sub' / 'x.db'}")


# --------------------------------------------------------------------------------------------
# Migrations
# --------------------------------------------------------------------------------------------
def _legacy_screening(conn, pseudonym: str, scan_sha: str, model_id: int = 1) -> int:
    """A screening (with one region attribution) written with plain SQL, as revision 0002 of the
    schema stored it; returns its id."""
    pid = conn.execute(text("SELECT id FROM participants WHERE pseudonym = :p"),
                       {"p": pseudonym}).scalar()
    if pid is None:
        conn.execute(text("INSERT INTO participants (pseudonym, simulated, created_at) "
                          "VALUES (:p, false, '2026-01-01 00:00:00')"), {"p": pseudonym})
        pid = conn.execute(text("SELECT id FROM participants WHERE pseudonym = :p"),
                           {"p": pseudonym}).scalar()
    if conn.execute(text("SELECT COUNT(*) FROM model_versions")).scalar() == 0:
        conn.execute(text("INSERT INTO model_versions (name, weights_sha256, card, created_at) "
                          "VALUES ('m', :w, '{}', '2026-01-01 00:00:00')"), {"w": "f" * 64})
    scan = conn.execute(text("SELECT id FROM scans WHERE sha256 = :s"), {"s": scan_sha}).scalar()
    if scan is None:
        conn.execute(text(
            "INSERT INTO scans (sha256, kind, shape, tr, atlas, qc_verdict, qc, n_volumes, "
            "n_regions, created_at) VALUES (:s, 'table', '[100, 3]', 2.0, 'X', 'pass', '{}', "
            "100, 3, '2026-01-01 00:00:00')"), {"s": scan_sha})
        scan = conn.execute(text("SELECT id FROM scans WHERE sha256 = :s"),
                            {"s": scan_sha}).scalar()
    conn.execute(text(
        "INSERT INTO screenings (participant_id, scan_id, model_version_id, inputs_sha256, "
        "probability, band_low, band_high, fold_probabilities, decision, thresholds, "
        "runtime_s, stage_seconds, software_version, operator, created_at) VALUES (:p, :s, "
        ":m, :s2, 0.5, 0.4, 0.6, '[0.5]', 'uncertain', '{}', 1.0, '{}', '0', 't', "
        "'2026-01-01 00:00:00')"), {"p": pid, "s": scan, "m": model_id, "s2": scan_sha})
    sid = conn.execute(text("SELECT MAX(id) FROM screenings")).scalar()
    conn.execute(text("INSERT INTO region_attributions (screening_id, region_index, label, name, "
                      "network, ts, fc, total) VALUES (:i, 0, 1, 'r', 'N', 0, 1, 1)"), {"i": sid})
    return sid


def _migrations_roundtrip(engine):
    assert current_revision(engine) is None
    assert upgrade(engine, "0001") == "0001"
    cols = {c["name"] for c in inspect(engine).get_columns("participants")}
    assert "simulated" not in cols
    with engine.begin() as conn:  # data written at the previous revision
        conn.execute(text("INSERT INTO participants (pseudonym, created_at) "
                          "VALUES ('OLD-1', '2026-01-01 00:00:00')"))
    assert upgrade(engine, "0002") == "0002"
    cols = {c["name"] for c in inspect(engine).get_columns("participants")}
    assert "simulated" in cols
    with engine.connect() as conn:
        row = conn.execute(text("SELECT pseudonym, simulated FROM participants")).one()
    assert row[0] == "OLD-1" and not row[1]
    indexes = {i["name"] for i in inspect(engine).get_indexes("screenings")}
    assert {"ix_screenings_lookup", "ix_screenings_created"} <= indexes
    assert downgrade(engine) == "0001"
    assert "simulated" not in {c["name"] for c in inspect(engine).get_columns("participants")}
    assert upgrade(engine, "0002") == "0002"
    assert row_counts(engine)["participants"] == 1
    # 0003: screenings written at 0002 (one image screened twice) get their owner and revisions,
    # and keep their attributions (SQLite copies the table: no cascade may delete them).
    with engine.begin() as conn:
        first = _legacy_screening(conn, "OLD-1", "a" * 64)
        again = _legacy_screening(conn, "OLD-1", "a" * 64)
        _legacy_screening(conn, "OLD-2", "b" * 64)
    assert upgrade(engine) == head_revision() == "0003"
    with engine.connect() as conn:
        revs = dict(conn.execute(text("SELECT id, revision FROM screenings")).all())
        owner = conn.execute(text(
            "SELECT p.pseudonym FROM scans c JOIN participants p ON p.id = c.participant_id "
            "WHERE c.sha256 = :s"), {"s": "a" * 64}).scalar()
    assert revs[first] == 0 and revs[again] == 1 and owner == "OLD-1"
    counts = row_counts(engine)
    assert counts["screenings"] == 3 and counts["region_attributions"] == 3
    assert integrity_check(engine) == []
    assert downgrade(engine) == "0002"
    assert row_counts(engine) == counts
    assert upgrade(engine) == "0003"
    assert row_counts(engine) == counts


def _shared_scan_blocks_the_upgrade(engine):
    """A scan that an earlier version stored under two pseudonyms stops the 0003 upgrade with a
    message naming them, and the database stays at 0002, unchanged."""
    upgrade(engine, "0002")
    with engine.begin() as conn:
        _legacy_screening(conn, "TWIN-0", "c" * 64)
        _legacy_screening(conn, "TWIN-1", "c" * 64)
    before = row_counts(engine)
    with pytest.raises(StorageError, match=r"under more than one pseudonym .*'TWIN-0', 'TWIN-1'"):
        upgrade(engine)
    assert current_revision(engine) == "0002"
    assert row_counts(engine) == before


def test_migration_refuses_a_scan_stored_under_two_pseudonyms(tmp_path):
    _shared_scan_blocks_the_upgrade(make_engine(f"sqlite:///{tmp_path / 't.db'}"))


def test_migrations_sqlite(tmp_path):
    _migrations_roundtrip(make_engine(f"sqlite:///{tmp_path / 'm.db'}"))


def test_schema_at_head_matches_the_models(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from fmmtc_core.store.models import Base

    engine = open_database(f"sqlite:///{tmp_path / 'h.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


# --------------------------------------------------------------------------------------------
# Repository
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [("PAIN-0042", "PAIN-0042"), ("sub-07", "07"),
                                             (" P.1_a ", "P.1_a")])
def test_pseudonyms_accepted(value, expected):
    assert repo.validate_pseudonym(value) == expected


@pytest.mark.parametrize("value, match", [
    ("John Smith", "not a valid study pseudonym"),
    ("", "not a valid study pseudonym"),
    ("-x", "not a valid study pseudonym"),
    ("x" * 65, "not a valid study pseudonym"),
    ("P-19870304", "looks like it contains a date"),
    ("04.03.1987", "looks like it contains a date"),
    ("smith_1987-03-04", "looks like it contains a date"),
])
def test_pseudonyms_refused(value, match):
    with pytest.raises(InvalidInputError, match=match):
        repo.validate_pseudonym(value)


def test_series_roundtrip():
    x = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float32)
    np.testing.assert_array_equal(repo.decode_series(repo.encode_series(x)), x)


def test_repository_writes_are_audited_and_atomic(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    with session_scope(engine, write=True) as s:
        sc = fake_screening(s)
        sid = sc.id
    counts = row_counts(engine)
    assert counts["screenings"] == 1 and counts["region_attributions"] == 3
    assert counts["audit_log"] == 4  # participant, model version, scan, screening
    _assert_crash_rolls_back(engine)
    with session_scope(engine, write=True) as s:
        repo.record_outcome(s, "PAIN-0001", "non-responder", actor="bob")
        repo.record_outcome(s, "PAIN-0001", "responder", actor="bob", note="corrected",
                            replace=True)
        with pytest.raises(InvalidInputError, match="'responder' or 'non-responder'"):
            repo.record_outcome(s, "PAIN-0001", "maybe", actor="bob")
    df = repo.screenings_frame(engine)
    assert df.loc[0, "outcome"] == "responder"  # the latest entry wins
    with session_scope(engine) as s:
        got = repo.get_screening(s, sid)
        assert [r.total for r in got.regions] == [0.0, 1.0, 2.0]
        assert repo.region_frame(s, sid)["total"].tolist() == [0.0, 1.0, 2.0]
        with pytest.raises(InvalidInputError, match="No screening with id 999"):
            repo.get_screening(s, 999)
    means = repo.cohort_region_means(engine)
    assert len(means) == 3 and means["responder"].all()
    out = tmp_path / "e.csv"
    assert repo.export_csv(engine, out) == 1
    assert "PAIN-0001" in out.read_text()
    assert integrity_check(engine) == []


def test_a_second_outcome_must_be_confirmed_and_the_first_is_kept(tmp_path):
    """Recording an outcome never silently replaces the one recorded before: without
    replace=True it is refused (naming what is on record); with it, both stay in the history
    and the latest counts."""
    from sqlalchemy import text

    engine = open_database(f"sqlite:///{tmp_path / 'o.db'}")
    with session_scope(engine, write=True) as s:
        fake_screening(s)
        repo.record_outcome(s, "PAIN-0001", "responder", actor="alice", note="week 12")
    with pytest.raises(InvalidInputError,
                       match=r"^PAIN-0001 already has an observed outcome: responder, entered "
                             r"by alice on \d{4}-\d\d-\d\d \d\d:\d\d UTC\. To record "
                             r"another, confirm that it replaces it"):
        with session_scope(engine, write=True) as s:
            repo.record_outcome(s, "PAIN-0001", "non-responder", actor="bob")
    assert row_counts(engine)["outcomes"] == 1
    with session_scope(engine, write=True) as s:
        repo.record_outcome(s, "PAIN-0001", "non-responder", actor="bob", note="re-read",
                            replace=True)
    history = repo.outcome_history(engine, "PAIN-0001")
    assert list(history["outcome"]) == ["non-responder", "responder"]  # latest first
    assert list(history["entered_by"]) == ["bob", "alice"]
    assert list(history["note"]) == ["re-read", "week 12"] and list(history["current"]) == [
        True, False]
    assert repo.screenings_frame(engine).loc[0, "outcome"] == "non-responder"
    assert repo.outcome_history(engine, "PAIN-0404").empty
    with engine.connect() as conn:
        audit = conn.execute(text("SELECT action, details FROM audit_log "
                                  "WHERE entity = 'outcome' ORDER BY id")).all()
    assert [a for a, _ in audit] == ["create", "replace"]
    assert '"previous": "responder"' in audit[1][1]


def test_screenings_frame_keeps_the_latest_screening_per_participant(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'l.db'}")
    with session_scope(engine, write=True) as s:
        fake_screening(s, prob=0.2)
        fake_screening(s, prob=0.9, revision=1)
    df = repo.screenings_frame(engine)
    assert len(df) == 1 and df.loc[0, "probability"] == 0.9
    assert len(repo.screenings_frame(engine, latest_only=False)) == 2


def _database_enforces_scan_identity(engine):
    """The schema itself refuses one image under a second pseudonym and a second screening of
    the same image, model and revision (whatever the code above it checks), and rolls back."""
    upgrade(engine)
    with session_scope(engine, write=True) as s:
        fake_screening(s, "OWNER-1", sha="d" * 64)
    before = row_counts(engine)
    with pytest.raises(DatabaseError, match="refused") as info:
        with session_scope(engine, write=True) as s:
            fake_screening(s, "OTHER-2", sha="d" * 64)
    assert info.value.conflict
    with pytest.raises(DatabaseError, match="refused"):
        with session_scope(engine, write=True) as s:
            fake_screening(s, "OWNER-1", sha="d" * 64)  # same revision 0 again
    assert row_counts(engine) == before
    with session_scope(engine, write=True) as s:  # a deliberate repeat is the next revision
        fake_screening(s, "OWNER-1", sha="d" * 64, revision=1)
    assert row_counts(engine)["screenings"] == before["screenings"] + 1


def test_database_enforces_scan_identity(tmp_path):
    _database_enforces_scan_identity(make_engine(f"sqlite:///{tmp_path / 'i.db'}"))


# --------------------------------------------------------------------------------------------
# PostgreSQL: a real server on loopback
# --------------------------------------------------------------------------------------------
def test_postgres_migrations(pg_engine):
    _migrations_roundtrip(pg_engine)


def test_postgres_enforces_scan_identity(pg_engine):
    _database_enforces_scan_identity(pg_engine)


def test_postgres_migration_refuses_a_scan_stored_under_two_pseudonyms(pg_engine):
    _shared_scan_blocks_the_upgrade(pg_engine)


def test_postgres_repository_and_rollback(pg_engine):
    upgrade(pg_engine)
    with session_scope(pg_engine, write=True) as s:
        fake_screening(s)
    _assert_crash_rolls_back(pg_engine)
    assert integrity_check(pg_engine) == []
    assert len(repo.screenings_frame(pg_engine)) == 1


def test_postgres_screening_end_to_end(pg_engine, postgres_url, tmp_path, capsys):
    """The real pipeline and CLI into PostgreSQL: screen, reuse, bad input unchanged, export."""
    from fmmtc_core.cli import main
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    cohort = write_cohort(tmp_path / "c", 2, seed=3, fmt="timeseries",
                          config=SimulationConfig(n_volumes=200))
    assert main(["screen-batch", str(cohort), "--db", postgres_url, "--tolerance", "0.05",
                 "--import-outcomes"]) == 0
    counts = row_counts(pg_engine)
    assert counts["screenings"] == 2 and counts["outcomes"] == 2
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x00" * 10)
    capsys.readouterr()
    assert main(["screen", str(bad), "--participant", "P1", "--db", postgres_url]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert row_counts(pg_engine) == counts
    out = tmp_path / "x.csv"
    assert main(["db", "export", "--out", str(out), "--db", postgres_url]) == 0
    assert len(out.read_text().strip().splitlines()) == 3
