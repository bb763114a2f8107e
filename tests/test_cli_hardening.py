"""The `fmmtc` command under hostile conditions: a database that cannot be used (exit status 3),
options out of range, labels that must not reach the database, stderr that carries exactly one
line on failure, and refusals that never load torch or the model."""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from conftest import fmriprep_confounds

from fmmtc_core._errors import (
    EXIT_BAD_INPUT,
    EXIT_STORAGE,
    InvalidInputError,
    StorageError,
)
from fmmtc_core.cli import main
from fmmtc_core.store import open_database, session_scope, storage_error
from fmmtc_core.store.db import DatabaseError

HEAVY = ("torch", "transformers", "captum", "plotly", "streamlit")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, status, match):
    """Exit ``status`` and exactly one stderr line, ``error: ...``, containing ``match``."""
    lines = err.splitlines()
    assert code == status, err
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("error: ") and match in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def hcpex_table(tmp_path_factory):
    """A valid 60-volume region table for the demo model's atlas (HCPEx, 426 regions)."""
    path = tmp_path_factory.mktemp("scan") / "sub-01_seg-HCPEx_timeseries.tsv"
    data = np.random.default_rng(0).standard_normal((60, 426))
    np.savetxt(path, data, delimiter="\t", fmt="%.6g")
    path.with_suffix(".json").write_text(json.dumps({"RepetitionTime": 2.0}))
    return path


def _sqlite_file(path):
    """A database at head revision, as one self-contained file (WAL folded in)."""
    open_database(f"sqlite:///{path}").dispose()
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()
    return path


def _commands(db, scan):
    return [
        ["db", "status", "--db", db],
        ["db", "upgrade", "--db", db],
        ["outcome", "P1", "responder", "--db", db],
        ["screen", scan, "--participant", "P1", "--db", db],
    ]


def _assert_every_command_refuses(db, scan, capsys, match):
    for argv in _commands(db, scan):
        code, out, err = run(argv, capsys)
        assert_refused(code, err, EXIT_STORAGE, match)
        assert out == "", argv
    return err.strip()


# --------------------------------------------------------------------------------------------
# Storage errors: exit status 3, one line that says what to do
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["random bytes", "truncated to half"])
def test_damaged_sqlite_file(tmp_path, hcpex_table, capsys, damage):
    path = tmp_path / "x.db"
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(8192))
    else:
        data = _sqlite_file(path).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    before = path.read_bytes()
    line = _assert_every_command_refuses(f"sqlite:///{path}", hcpex_table, capsys,
                                         "is damaged or not a SQLite database")
    assert line.startswith(f"error: The database file '{path}' is damaged or not a SQLite "
                           "database; restore it from a backup (")
    assert path.read_bytes() == before  # never written to


def test_unknown_schema_revision(tmp_path, hcpex_table, capsys):
    path = _sqlite_file(tmp_path / "new.db")
    con = sqlite3.connect(path)
    con.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
    con.commit()
    con.close()
    line = _assert_every_command_refuses(f"sqlite:///{path}", hcpex_table, capsys, "ffff9999")
    assert line == (
        "error: The database is at schema revision 'ffff9999', which this version of fmmtc "
        "does not know; upgrade fmmtc (or use the database with the version that wrote it).")


def test_tables_without_a_schema_revision(tmp_path, hcpex_table, capsys):
    path = _sqlite_file(tmp_path / "bare.db")
    con = sqlite3.connect(path)
    con.execute("DROP TABLE alembic_version")
    con.commit()
    con.close()
    line = _assert_every_command_refuses(f"sqlite:///{path}", hcpex_table, capsys,
                                         "no alembic_version table")
    assert f"The database file '{path}' has fmmtc tables (" in line
    assert "already exists" not in line


def test_unreachable_database_server(hcpex_table, capsys):
    pytest.importorskip("psycopg")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = f"postgresql+psycopg://fmmtc:s3cretpw@127.0.0.1:{port}/fmmtc"
    line = _assert_every_command_refuses(db, hcpex_table, capsys, "Cannot reach the database")
    assert line.startswith(f"error: Cannot reach the database server at "
                           f"postgresql+psycopg://fmmtc:***@127.0.0.1:{port}/fmmtc (")
    assert line.endswith("; check that it is running and the URL.")
    assert "s3cretpw" not in line


def test_missing_database_on_a_real_server(postgres_url, capsys):
    url = postgres_url.rsplit("/", 1)[0] + "/no_such_db"
    for argv in (["db", "status", "--db", url], ["outcome", "P1", "responder", "--db", url]):
        code, _, err = run(argv, capsys)
        assert_refused(code, err, EXIT_STORAGE, "has no such database")
        assert "createdb" in err


def test_read_only_database(tmp_path, hcpex_table, capsys):
    path = _sqlite_file(tmp_path / "ro.db")
    line = _assert_every_command_refuses(f"sqlite:///file:{path}?mode=ro&uri=true",
                                         hcpex_table, capsys, "is read-only")
    assert "make the file and its folder writable" in line
    assert not (tmp_path / "file:").exists() and not os.path.exists("file:")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_database_file(tmp_path, hcpex_table, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = _sqlite_file(folder / "ro.db")
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        _assert_every_command_refuses(f"sqlite:///{path}", hcpex_table, capsys, "read-only")
    finally:
        folder.chmod(0o755)


def test_full_disk_is_a_storage_error(tmp_path):
    from sqlalchemy import event

    from fmmtc_core.store.repository import audit

    engine = open_database(f"sqlite:///{tmp_path / 'full.db'}")

    @event.listens_for(engine, "connect")
    def _no_room_to_grow(dbapi_conn, _record):  # as if the disk were full
        pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

    engine.dispose()
    with pytest.raises(DatabaseError, match="is full .*; free some space") as info:
        with session_scope(engine, write=True) as s:
            for i in range(50):
                audit(s, "t", "test", "participant", i, {"pad": "x" * 4000})
                s.flush()
    assert isinstance(info.value, StorageError) and not info.value.conflict
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("message", "match"), [
    ("database or disk is full", "is full"),
    ("attempt to write a readonly database", "is read-only"),
    ("file is not a database", "is damaged or not a SQLite database"),
    ("unable to open database file", "Cannot open the database file"),
    ("database is locked", "stayed locked by another process"),
])
def test_sqlite_errors_are_classified(message, match):
    err = storage_error(sqlite3.OperationalError(message), "sqlite:////data/fmmtc.db")
    assert isinstance(err, StorageError)
    assert match in str(err) and "'/data/fmmtc.db'" in str(err) and message in str(err)


def test_non_storage_errors_are_left_alone():
    assert storage_error(ValueError("x"), "sqlite:///x.db") is None
    assert storage_error(sqlite3.IntegrityError("UNIQUE"), "sqlite:///x.db") is None


def test_driver_errors_escaping_the_store_layer_exit_3(tmp_path, monkeypatch, capsys):
    from sqlalchemy.exc import OperationalError

    import fmmtc_core.cli as cli

    def export(args):
        raise OperationalError("SELECT 1", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(cli, "cmd_db", export)
    db = tmp_path / "io.db"
    code, _, err = run(["db", "export", "--db", f"sqlite:///{db}"], capsys)
    assert_refused(code, err, EXIT_STORAGE,
                   f"Reading or writing the database file '{db}' failed with a disk error")


def test_db_status_and_upgrade_of_a_new_database(tmp_path, capsys):
    from fmmtc_core.store import head_revision

    db = f"sqlite:///{tmp_path / 'new.db'}"
    code, out, err = run(["db", "status", "--db", db], capsys)
    assert (code, err) == (0, "") and out.strip().endswith("revision None (head "
                                                           f"{head_revision()})")
    code, out, _ = run(["db", "upgrade", "--db", db], capsys)
    assert code == 0 and out.startswith(f"database at revision {head_revision()} ")
    code, out, _ = run(["db", "status", "--db", db], capsys)
    assert code == 0 and "  participants: 0" in out.splitlines()


def test_database_error_is_a_storage_error_and_keeps_conflict():
    err = DatabaseError("refused", conflict=True)
    assert isinstance(err, StorageError) and not isinstance(err, InvalidInputError)
    assert err.conflict and not DatabaseError("x").conflict


@pytest.mark.parametrize(("url", "match"), [
    ("not a url", "is not a database URL"),
    ("nonsense://", "No database driver"),
])
def test_a_bad_url_is_still_bad_input(hcpex_table, capsys, url, match):
    code, _, err = run(["screen", hcpex_table, "--participant", "P1", "--db", url], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, match)


# --------------------------------------------------------------------------------------------
# Options and labels refused at once
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "value", "match"), [
    ("--tolerance", "nan", "expected a finite number"),
    ("--tolerance", "inf", "expected a finite number"),
    ("--tolerance", "0", "must be a number between 0 and 1 (exclusive)"),
    ("--tolerance", "1", "must be a number between 0 and 1 (exclusive)"),
    ("--tolerance", "-0.1", "must be a number between 0 and 1 (exclusive)"),
    ("--tolerance", "abc", "expected a number"),
    ("--min-volumes", "0", "must be at least 1"),
    ("--min-volumes", "-5", "must be at least 1"),
    ("--min-volumes", "2.5", "expected a whole number"),
    ("--responder-threshold", "1.5", "must be a probability from 0 to 1"),
])
def test_option_values_are_checked_by_the_parser(hcpex_table, capsys, option, value, match):
    with pytest.raises(SystemExit) as exc:
        main(["screen", str(hcpex_table), "--participant", "P1", option, value])
    err = capsys.readouterr().err
    assert_refused(exc.value.code, err, EXIT_BAD_INPUT, f"argument {option}: {match}")


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_workers_must_be_at_least_one(tmp_path, capsys, workers):
    with pytest.raises(SystemExit) as exc:
        main(["screen-batch", str(tmp_path), "--workers", workers])
    assert_refused(exc.value.code, capsys.readouterr().err, EXIT_BAD_INPUT,
                   "argument --workers: ")


@pytest.mark.parametrize(("option", "value"), [
    ("--site", "=HYPERLINK(\"http://x\")"),
    ("--drug", "pregabalin\nsecond line"),
    ("--arm", "<b>A</b>"),
    ("--operator", "a" * 65),
])
def test_labels_are_validated_before_any_work(tmp_path, hcpex_table, capsys, option, value):
    db = tmp_path / "never.db"
    code, _, err = run(["screen", hcpex_table, "--participant", "P1", option, value,
                        "--db", f"sqlite:///{db}"], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, f"Invalid {option[2:]} ")
    assert not db.exists()


def test_thresholds_in_the_wrong_order(hcpex_table, capsys):
    code, _, err = run(["screen", hcpex_table, "--participant", "P1",
                        "--responder-threshold", "0.3", "--non-responder-threshold", "0.5"],
                       capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, "must not exceed --responder-threshold")


def test_a_second_outcome_needs_replace_and_keeps_the_first(tmp_path, capsys):
    from conftest import fake_screening

    from fmmtc_core.store import row_counts

    url = f"sqlite:///{tmp_path / 'o.db'}"
    with session_scope(open_database(url), write=True) as s:
        fake_screening(s, "P1")
    assert run(["outcome", "P1", "responder", "--db", url], capsys)[0] == 0
    code, _, err = run(["outcome", "P1", "non-responder", "--db", url], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, "P1 already has an observed outcome: responder")
    assert "--replace" in err and row_counts(open_database(url))["outcomes"] == 1
    code, out, _ = run(["outcome", "P1", "non-responder", "--replace", "--db", url], capsys)
    assert code == 0 and out == "recorded: P1 non-responder\n"
    assert row_counts(open_database(url))["outcomes"] == 2


def test_outcome_note_and_pseudonym_checked_before_the_database(tmp_path, capsys):
    db = tmp_path / "never.db"
    code, _, err = run(["outcome", "Jane Doe", "responder", "--db", f"sqlite:///{db}"], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, "not a valid study pseudonym")
    code, _, err = run(["outcome", "P1", "responder", "--note", "x\x07y",
                        "--db", f"sqlite:///{db}"], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, "control characters")
    assert not db.exists()


# --------------------------------------------------------------------------------------------
# Refusals never import torch (nor the dashboard's libraries)
# --------------------------------------------------------------------------------------------
_REFUSALS = r"""
import json, sys
from fmmtc_core.cli import main

heavy, cases = json.loads(sys.argv[1])
for argv, status in cases:
    code = main(argv)
    assert code == status, (argv, code)
    loaded = [m for m in heavy if m in sys.modules]
    assert not loaded, (argv, loaded)
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code == 0
assert not [m for m in heavy if m in sys.modules]
print("refused without", " ".join(heavy))
"""


def test_refusals_do_not_import_torch(tmp_path, hcpex_table):
    empty = tmp_path / "sub-01_bold.nii.gz"
    empty.write_bytes(b"")
    garbage = tmp_path / "sub-02_bold.nii.gz"
    garbage.write_bytes(np.random.default_rng(2).bytes(2000))
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not a database" * 100)
    db = f"sqlite:///{broken}"
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "participants.tsv").write_text("participant_id\nsub-01\n")
    table = str(hcpex_table)
    cases = [
        (["screen", str(empty), "--participant", "bad name!"], 2),
        (["screen", str(empty), "--participant", "P1"], 2),
        (["screen", str(garbage), "--participant", "P1"], 2),
        (["screen", table, "--participant", "P1", "--site", "=1+1"], 2),
        (["screen", table, "--participant", "P1", "--model", str(tmp_path)], 2),
        (["screen", table, "--participant", "P1", "--db", db], 3),
        (["explain", str(garbage)], 2),
        (["screen-batch", str(cohort), "--operator", "<script>"], 2),
        (["screen-batch", str(cohort), "--db", db], 3),
        (["outcome", "P1", "responder", "--db", db], 3),
    ]
    proc = subprocess.run([sys.executable, "-c", _REFUSALS, json.dumps([HEAVY, cases])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("refused without " + " ".join(HEAVY))
    errors = proc.stderr.splitlines()
    assert len(errors) == len(cases) and all(ln.startswith("error: ") for ln in errors)


_HELP = r"""
import json, sys
import fmmtc_core.cli

try:
    fmmtc_core.cli.build_parser().parse_args(["--help"])
except SystemExit as exc:
    assert exc.code == 0
print(json.dumps(sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules)))
"""


def test_help_imports_no_heavy_module():
    proc = subprocess.run([sys.executable, "-c", _HELP, json.dumps(HEAVY)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_more_refusals_come_before_heavy_modules(tmp_path):
    """Every command refuses a missing or foreign input before torch, transformers,
    scikit-learn (nilearn imports it) or the database library load (cold start: issue 15)."""
    garbage = tmp_path / "sub-03_bold.nii.gz"
    garbage.write_bytes(np.random.default_rng(3).bytes(2000))
    missing = str(tmp_path / "missing.nii.gz")
    nowhere = str(tmp_path / "nowhere")
    out = str(tmp_path / "out")
    cases = [
        (["qc", missing], 2),
        (["qc", str(garbage)], 2),
        (["parcellate", str(garbage), "--out", str(tmp_path / "x.tsv")], 2),
        (["screen", str(garbage), "--participant", "P1"], 2),
        (["screen-batch", nowhere], 2),
        (["foundation", "inspect", nowhere], 2),
        (["compare", nowhere], 2),
        (["train", nowhere, "--out", out], 2),
        (["pretrain", nowhere, "--out", out], 2),
    ]
    heavy = [*HEAVY, "sklearn", "nilearn", "sqlalchemy"]
    proc = subprocess.run([sys.executable, "-c", _REFUSALS, json.dumps([heavy, cases])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == len(cases) and all(ln.startswith("error: ") for ln in errors)


# --------------------------------------------------------------------------------------------
# stderr carries one line on failure: progress goes to stdout, warnings are silenced
# --------------------------------------------------------------------------------------------
def test_failing_screen_prints_one_stderr_line(tmp_path, capsys):
    """A table that passes the cheap checks, then fails hard QC after the model is loaded."""
    scan = tmp_path / "sub-07_seg-HCPEx_timeseries.tsv"
    data = np.random.default_rng(3).standard_normal((60, 426))
    data[:, 5] = np.nan  # an uncovered region: a warning, then NaN arithmetic in QC
    np.savetxt(scan, data, delimiter="\t", fmt="%.6g")
    scan.with_suffix(".json").write_text(json.dumps({"RepetitionTime": 2.0}))
    conf = tmp_path / "conf.tsv"
    fmriprep_confounds(60, fd_scale=3.0).to_csv(conf, sep="\t", index=False, na_rep="n/a")
    db = f"sqlite:///{tmp_path / 's.db'}"
    argv = ["screen", scan, "--confounds", conf, "--db", db, "--tolerance", "0.05"]
    code, out, err = run(argv, capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, "failed quality control")
    assert "qc 1/1 verdict=fail" in out.splitlines()  # progress, on stdout off a terminal
    code, out, err = run([*argv, "--json"], capsys)
    assert_refused(code, err, EXIT_BAD_INPUT, "failed quality control")
    assert out == ""  # with --json, stdout is the JSON document or nothing


def test_warnings_and_log_messages_stay_off_stderr(monkeypatch, capsys):
    import warnings

    import fmmtc_core.cli as cli

    def noisy(args):
        np.log(np.zeros(1))  # RuntimeWarning: divide by zero
        warnings.warn("a library oddity", UserWarning)
        logging.getLogger("some.library").warning("a library warning")
        raise InvalidInputError("bad scan")

    monkeypatch.setattr(cli, "cmd_qc", noisy)
    disabled = logging.root.manager.disable
    pywarnings = os.environ.get("PYTHONWARNINGS")
    code, out, err = run(["qc", "x.nii.gz"], capsys)
    assert (code, out, err) == (EXIT_BAD_INPUT, "", "error: bad scan\n")
    assert logging.root.manager.disable == disabled  # restored for the caller
    assert os.environ.get("PYTHONWARNINGS") == pywarnings


def test_multi_line_messages_are_printed_on_one_line(monkeypatch, capsys):
    import fmmtc_core.cli as cli

    def two_lines(args):
        raise StorageError("first line\n\tsecond line")

    monkeypatch.setattr(cli, "cmd_qc", two_lines)
    code, _, err = run(["qc", "x.nii.gz"], capsys)
    assert (code, err) == (EXIT_STORAGE, "error: first line second line\n")


def test_batch_progress_goes_to_stdout_off_a_terminal(tmp_path, monkeypatch, capsys):
    import fmmtc_core.screening as screening

    def fake_batch(cohort_dir, *, progress, **kwargs):
        for done, pid in ((0, ""), (1, "A"), (2, "B")):
            progress(done, 2, pid)
        return screening.BatchReport(screened=["A", "B"])

    monkeypatch.setattr(screening, "screen_batch", fake_batch)
    (tmp_path / "participants.tsv").write_text("participant_id\nsub-A\nsub-B\n")
    code, out, err = run(["screen-batch", tmp_path, "--db", f"sqlite:///{tmp_path / 'b.db'}"],
                         capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:2] == ["screen 1/2 A", "screen 2/2 B"]
    # the (demo) model's validity before the counts: what the stored results are worth
    assert lines[2].startswith("WARNING: DEMONSTRATION MODEL - TRAINED ON SIMULATED DATA ONLY")
    assert lines[3:] == ["screened 2, already stored 0, failed 0"]
