"""The dashboard's screening worker (fmmtc_app.worker): one process per server, errors and
crashes reported, replaced on a model change or a crash, joined at exit. The jobs here fail or
are killed early on purpose; real screenings through the worker are in test_app.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import live_descendants

from fmmtc_app import worker
from fmmtc_app.worker import WorkerCrashedError
from fmmtc_core._errors import ModelFileError


@pytest.fixture(autouse=True)
def _no_worker_left():
    worker.shutdown()
    yield
    worker.shutdown()
    assert worker.current() is None


def _worker_pids() -> list[int]:
    return sorted(pid for pid, cmd in live_descendants().items() if "spawn_main" in cmd)


@pytest.mark.slow  # two workers start
def test_another_model_replaces_the_worker_after_joining_it(tmp_path):
    first = worker.worker_for(tmp_path / "model-a")
    assert worker.worker_for(tmp_path / "model-a") is first
    second = worker.worker_for(tmp_path / "model-b")
    assert second is not first and not first.alive and second.alive
    assert _worker_pids() == [second.pid]  # the old process was joined, not left behind
    # A job's error comes back raised, as it would in-process (here: no such model folder).
    with pytest.raises(ModelFileError, match="model-b"):
        worker.run(tmp_path / "model-b", "screen", {"url": "sqlite://", "source": "x.tsv",
                                                     "participant": "PAIN-1"})
    assert worker.current() is second and second.alive


def test_a_worker_killed_during_a_job_is_reported_and_replaced(tmp_path):
    from fmmtc_core.config import DEMO_MODEL_DIR
    from fmmtc_core.simulate import write_cohort

    cohort = write_cohort(tmp_path / "cohort", 2, seed=0, fmt="timeseries")
    table = next(p for p in sorted(cohort.rglob("*_timeseries.tsv")) if "confounds" not in p.name)
    killed = worker.worker_for(DEMO_MODEL_DIR)
    seen = []

    def progress(stage, done, total, info):
        if not seen:
            os.kill(killed.pid, signal.SIGKILL)  # as the out-of-memory killer would
        seen.append(stage)

    from fmmtc_core.store import open_database

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    open_database(url).dispose()  # the tables (the dashboard creates them at start)
    job = {"url": url, "source": str(table), "participant": "PAIN-1"}
    with pytest.raises(WorkerCrashedError, match="^The screening worker stopped unexpectedly"):
        worker.run(DEMO_MODEL_DIR, "screen", job, progress=progress)
    assert seen and not killed.alive
    fresh = worker.worker_for(DEMO_MODEL_DIR)
    assert fresh is not killed and fresh.alive
    assert _worker_pids() == [fresh.pid]


@pytest.mark.slow  # a Python process and its worker start
def test_a_normal_exit_joins_the_worker(tmp_path):
    # The hook registered first runs last: it sees what the worker module's hook left.
    code = (
        "import atexit\n"
        "atexit.register(lambda: print('left:', worker.current(), flush=True))\n"
        "from fmmtc_app import worker\n"
        f"w = worker.worker_for({str(tmp_path / 'model')!r})\n"
        "print('pid:', w.pid, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert lines["left"] == "None"
    assert not Path(f"/proc/{lines['pid']}").exists()  # joined, not handed over to init


def test_worker_threads_leave_one_core_to_the_server(monkeypatch):
    monkeypatch.delenv("FMMTC_WORKER_THREADS", raising=False)
    monkeypatch.setattr(worker.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert worker.worker_threads() == 3
    monkeypatch.setattr(worker.os, "sched_getaffinity", lambda pid: {5})
    assert worker.worker_threads() == 1  # never zero


def test_worker_threads_setting(monkeypatch):
    monkeypatch.setenv("FMMTC_WORKER_THREADS", "2")
    assert worker.worker_threads() == 2
    assert worker.ScreeningWorker("unused", threads=4).threads == 4
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("FMMTC_WORKER_THREADS", bad)
        with pytest.raises(worker.FMMTCError,
                           match=r"^FMMTC_WORKER_THREADS must be a whole number of at least 1, "
                                 rf"got '{re.escape(bad)}'\.$"):
            worker.worker_for("unused")
    assert worker.current() is None  # nothing started
