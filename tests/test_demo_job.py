"""The demo cohort job (fmmtc_app.demo_job) without a model: a fake worker stores made-up
screenings, so these tests check the job's bookkeeping in a second or two each: one outcome
per participant as it is screened, stop and resume where it stopped, a server restart, finish,
and reset (only simulated participants go)."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
from conftest import fake_screening
from sqlalchemy import select

from fmmtc_app import demo_job
from fmmtc_core._errors import InvalidInputError
from fmmtc_core.store import open_database, row_counts, session_scope
from fmmtc_core.store import repository as repo
from fmmtc_core.store.models import AuditLog

N = 4


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A data folder, a database, a tiny cohort folder in place of the simulated tables, and
    a fake worker whose screenings can be held back one at a time (``gate``)."""
    monkeypatch.setenv("FMMTC_DATA_DIR", str(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    engine = open_database(url)
    cohort = tmp_path / "cohort"
    rows = []
    for i in range(N):
        sub = f"sub-{i + 1:03d}"
        func = cohort / sub / "func"
        func.mkdir(parents=True)
        (func / f"{sub}_task-rest_seg-HCPEx_timeseries.tsv").write_text("a\n1\n")
        rows.append({"participant_id": sub, "responder": i % 2, "site": "site1",
                     "drug": "drug_a"})
    pd.DataFrame(rows).to_csv(cohort / "participants.tsv", sep="\t", index=False)
    from fmmtc_core.bids import read_cohort

    class FakeTables:  # the tiny cohort in place of the simulation process
        def __init__(self, job):
            self.rows = read_cohort(cohort, require_labels=False).participants.to_dict(
                "records")

        def row(self, i):
            return self.rows[i]

        def close(self):
            pass

    monkeypatch.setattr(demo_job, "_Tables", FakeTables)

    calls: list[tuple[str, int]] = []
    started: list[str] = []
    gate = threading.Semaphore(100)

    def fake_run(model_dir, kind, job, progress=None):
        assert kind == "screen" and job["simulated"] is True
        started.append(job["participant"])
        gate.acquire()
        # what the database holds when this participant's screening starts
        calls.append((job["participant"], row_counts(engine)["outcomes"]))
        with session_scope(engine, write=True) as s:
            fake_screening(s, job["participant"], sha=f"{len(calls):064x}")
            s.flush()
            p = repo.get_or_create_participant(s, job["participant"], actor="t")
            p.simulated = True

    monkeypatch.setattr(demo_job.worker, "run", fake_run)
    yield url, engine, calls, gate, started
    demo_job.stop()
    gate.release(100)
    assert demo_job.wait(30)
    engine.dispose()


def test_each_outcome_is_recorded_as_its_participant_is_screened(setup):
    url, engine, calls, gate, started = setup
    job = demo_job.start(url, "model-dir", "tester", N)
    assert job.status == "running" and demo_job.job_file().exists()
    assert demo_job.wait(30)
    job = demo_job.read_job()
    assert job.status == "done" and job.done == [f"SIM-{i:03d}" for i in range(1, N + 1)]
    # the k-th screening started with k - 1 outcomes already recorded (the old load imported
    # every outcome at the very end: 0 outcomes after a load stopped half-way)
    assert [n for _, n in calls] == list(range(N))
    assert row_counts(engine)["outcomes"] == N and job.outcomes == N
    assert len(job.seconds) == N


def test_a_stopped_job_resumes_where_it_stopped(setup):
    url, engine, calls, gate, started = setup
    for _ in range(100 - 2):
        gate.acquire()  # two screenings may run, then the fake worker waits in the third
    demo_job.start(url, "model-dir", "tester", N)
    while len(started) < 3:
        threading.Event().wait(0.05)
    job = demo_job.stop()
    assert job.status == "stopped"
    gate.release(1)  # the participant in progress ends; nothing more starts
    assert demo_job.wait(30)
    job = demo_job.read_job()
    assert job.status == "stopped" and len(job.done) == 3
    assert row_counts(engine)["outcomes"] == 3  # an outcome for every one screened
    gate.release(100)
    demo_job.start(url, "model-dir", "tester", N)
    assert demo_job.wait(30)
    job = demo_job.read_job()
    assert job.status == "done" and len(job.done) == N
    assert [p for p, _ in calls] == [f"SIM-{i:03d}" for i in range(1, N + 1)]  # none twice


def test_a_restarted_server_carries_on_a_running_job(setup):
    """A server killed mid-job leaves the record "running": the next page run resumes it."""
    url, engine, calls, gate, started = setup
    demo_job._write(demo_job.DemoJob(status="running", n=N, seed=2026, model_dir="model-dir",
                                     database=demo_job._hidden(url), operator="tester",
                                     stage="screening"))
    assert not demo_job.running()
    demo_job.resume(url)
    assert demo_job.wait(30)
    assert demo_job.read_job().status == "done"
    assert row_counts(engine)["screenings"] == N
    # a job of another database is left alone
    demo_job._write(demo_job.DemoJob(status="running", n=N, seed=2026, model_dir="model-dir",
                                     database="sqlite:///elsewhere.db", operator="tester"))
    demo_job.resume(url)
    assert not demo_job.running()


def test_finish_keeps_what_is_loaded_and_reset_removes_only_simulated_people(setup):
    url, engine, calls, gate, started = setup
    with session_scope(engine, write=True) as s:  # a real participant, even named like one
        fake_screening(s, "SIM-REAL", sha="e" * 64)
    demo_job.start(url, "model-dir", "tester", N)
    assert demo_job.wait(30)
    assert demo_job.finish().status == "done"
    assert not (demo_job.job_folder() / "cohort").exists()
    assert demo_job.reset(url, "tester") is None
    counts = row_counts(engine)
    assert counts["participants"] == 1 and counts["screenings"] == 1
    assert counts["outcomes"] == 0 and counts["scans"] == 1
    assert demo_job.read_job() is None and not demo_job.job_folder().exists()
    with session_scope(engine) as s:
        audit = s.scalars(select(AuditLog).where(AuditLog.action == "delete")).all()
    assert len(audit) == 1 and audit[0].details["removed"][0] == "SIM-001"


def test_bad_requests_are_refused_and_change_nothing(setup):
    url, engine, calls, gate, started = setup
    with pytest.raises(InvalidInputError, match="at least 2 participants, got 1"):
        demo_job.start(url, "model-dir", "tester", 1)
    assert demo_job.read_job() is None and not demo_job.running()
    with session_scope(engine, write=True) as s:
        with pytest.raises(InvalidInputError, match="A prefix is needed"):
            repo.remove_simulated_participants(s, "", actor="t")
        with pytest.raises(InvalidInputError, match="who removes"):
            repo.remove_simulated_participants(s, "SIM-", actor="")
    # an unreadable record counts as no job (the user can start again)
    demo_job.job_folder().mkdir(parents=True)
    demo_job.job_file().write_text("{not json")
    assert demo_job.read_job() is None
