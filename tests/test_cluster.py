"""Screening on a Dask cluster (``screen-batch --cluster``): the option's checks, the SQLite
refusal with a remote scheduler, and, on loopback, a 2-worker LocalCluster screening into a
throw-away PostgreSQL with a worker killed mid-batch, a client killed mid-batch, and the
resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import live_descendants

from fmmtc_core import InvalidInputError
from fmmtc_core._errors import ModelFileError
from fmmtc_core.cli import main
from fmmtc_core.cluster import ClusterSpec, check_database, parse_cluster
from fmmtc_core.screening import screen_batch
from fmmtc_core.simulate import SimulationConfig, write_cohort
from fmmtc_core.store import integrity_check, open_database, row_counts

FAST = {"rel_tol": 0.05}  # explanation tolerance for speed, as in test_screening
N = 4  # scans in the cohort
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four simulated HCPEx participants as region tables (the demo model's atlas)."""
    root = tmp_path_factory.mktemp("cluster")
    return write_cohort(root / "cohort", N, seed=13, fmt="timeseries",
                        config=SimulationConfig(n_volumes=200))


@pytest.fixture
def stub_cohort(tmp_path):
    """A cohort folder that is refused before any scan is read (no simulation needed)."""
    root = tmp_path / "stub"
    root.mkdir()
    (root / "participants.tsv").write_text("participant_id\nsub-001\n")
    return root


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _no_children_left(timeout=30.0):
    """Wait until the processes a cluster started (nannies, workers) have exited; the
    session's PostgreSQL server is not one of them."""
    def left():
        return {pid: cmd for pid, cmd in live_descendants().items() if "postgres" not in cmd}

    deadline = time.monotonic() + timeout
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    return left()


# --------------------------------------------------------------------------------------------
# The option and the database check (no cluster started)
# --------------------------------------------------------------------------------------------
def test_parse_cluster():
    assert parse_cluster("local:2") == ClusterSpec(None, 2)
    assert parse_cluster(" tcp://10.0.0.5:8786 ") == ClusterSpec("tcp://10.0.0.5:8786", None)
    assert parse_cluster("tcp://sched.example.org:8786").remote
    assert str(parse_cluster("local:3")) == "local:3"
    for bad in ("local", "local:x", "8786", "http://h:1", "tcp://h", "local:-1"):
        with pytest.raises(InvalidInputError, match="Invalid value for --cluster"):
            parse_cluster(bad)
    with pytest.raises(InvalidInputError, match="at least 1 worker"):
        parse_cluster("local:0")
    with pytest.raises(InvalidInputError, match="port must lie in 1..65535"):
        parse_cluster("tcp://h:70000")


def test_sqlite_is_refused_with_a_remote_scheduler_and_nothing_is_made(tmp_path,
                                                                       stub_cohort):
    db = tmp_path / "x.db"
    remote = parse_cluster("tcp://10.255.255.1:8786")  # never contacted: refused before
    with pytest.raises(InvalidInputError, match="needs a PostgreSQL database"):
        check_database(remote, f"sqlite:///{db}")
    check_database(remote, "postgresql+psycopg://u@h/db")  # a server is fine
    check_database(parse_cluster("local:2"), f"sqlite:///{db}")  # the client writes alone
    with pytest.raises(InvalidInputError, match="needs a PostgreSQL database.*local:N"):
        screen_batch(stub_cohort, url=f"sqlite:///{db}", cluster="tcp://10.255.255.1:8786")
    assert not db.exists()


def test_cli_refuses_a_remote_cluster_with_sqlite_in_one_line(tmp_path, stub_cohort, capsys):
    db = tmp_path / "cli.db"
    for extra, match in ((["--cluster", "tcp://10.255.255.1:8786"], "needs a PostgreSQL"),
                         (["--cluster", "local:2", "--workers", "2"], "exclude each other"),
                         (["--cluster", "udp://h:1"], "Invalid value for --cluster")):
        code, out, err = _cli(["screen-batch", stub_cohort, "--db", f"sqlite:///{db}", *extra],
                              capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert match in lines[0]
        assert not db.exists()  # refused before the database was opened


def test_dask_is_imported_only_by_the_cluster_path():
    code = ("import sys, fmmtc_core.cli, fmmtc_core.screening, fmmtc_core.cluster; "
            "print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_worker_with_other_weights_is_refused():
    from fmmtc_core.cluster import _worker_model
    from fmmtc_core.models.ensemble import default_model_dir

    with pytest.raises(ModelFileError, match="holds other weights"):
        _worker_model(str(default_model_dir()), "0" * 64, None)


# --------------------------------------------------------------------------------------------
# A real LocalCluster on loopback, into a throw-away PostgreSQL
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_screen_into_postgres_with_a_worker_killed_mid_batch(
        pg_engine, postgres_url, cohort):
    killed = []

    def progress(done, total, pid):
        # After the first stored screening, kill (SIGKILL) a worker that is screening a scan:
        # the scheduler must give its scan to a worker again, and nothing stored is lost.
        if not pid or killed:
            return
        from distributed import default_client

        client = default_client()
        busy = [addr for addr, keys in client.processing().items() if keys]
        if not busy:
            return
        pid_of = client.run(os.getpid, workers=busy[:1])
        victim = pid_of[busy[0]]
        os.kill(victim, signal.SIGKILL)
        killed.append((victim, row_counts(pg_engine)["screenings"]))

    rep = screen_batch(cohort, url=postgres_url, cluster="local:2", explain_kwargs=FAST,
                       import_outcomes=True, progress=progress)
    assert killed, "no worker was busy after the first result: nothing was killed"
    assert killed[0][1] >= 1  # a screening was stored before the kill, and is kept
    assert sorted(rep.screened) == [f"{i:03d}" for i in range(1, N + 1)], rep
    assert not rep.failed and not rep.skipped and rep.outcomes == N
    counts = row_counts(pg_engine)
    assert counts["screenings"] == N and counts["scans"] == N and counts["participants"] == N
    assert counts["region_attributions"] == 426 * N  # whole screenings only
    assert integrity_check(pg_engine) == []
    from fmmtc_core.store.repository import screenings_frame

    df = screenings_frame(pg_engine)
    assert df["simulated"].all() and df["outcome"].notna().all()
    assert _no_children_left() == {}  # the cluster was closed

    again = screen_batch(cohort, url=postgres_url, cluster="local:2", explain_kwargs=FAST)
    assert sorted(again.skipped) == sorted(rep.screened) and not again.screened
    assert row_counts(pg_engine)["screenings"] == N
    assert _no_children_left() == {}


@pytest.mark.slow
def test_a_killed_client_loses_nothing_stored_and_a_rerun_resumes(
        pg_engine, postgres_url, cohort, capsys, tmp_path):
    cmd = [sys.executable, "-m", "fmmtc_core.cli", "screen-batch", str(cohort), "--cluster",
           "local:2", "--db", postgres_url, "--tolerance", "0.05"]
    open_database(postgres_url).dispose()  # the tables exist before the client starts
    # a SIGKILLed client cannot remove its cluster's scratch folder: keep it in tmp_path
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**ENV, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.time() + 600
        while (time.time() < deadline and proc.poll() is None
               and row_counts(pg_engine)["screenings"] < 1):
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    stored = row_counts(pg_engine)["screenings"]
    assert 1 <= stored < N, "the client should have been killed mid-batch"
    assert row_counts(pg_engine)["region_attributions"] == 426 * stored
    assert integrity_check(pg_engine) == []
    # its nannies and workers notice their parent is gone and exit
    assert _no_children_left(60.0) == {}

    code, out, err = _cli(["screen-batch", cohort, "--cluster", "local:2", "--db",
                           postgres_url, "--tolerance", "0.05"], capsys)
    assert code == 0, err
    assert err == ""  # off a terminal, no log line of Dask's reaches stderr
    assert f"screened {N - stored}, already stored {stored}, failed 0" in out
    assert row_counts(pg_engine)["screenings"] == N and integrity_check(pg_engine) == []
