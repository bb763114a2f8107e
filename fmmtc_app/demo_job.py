"""The demo cohort as a job that outlives the page, the browser tab and the server.

Why a job: loading 24 simulated participants takes minutes, and a page that does the work in
its own script run loses it when the user navigates away, refreshes, or the server restarts
(it used to stop for good: 8 of 24 screened, no outcome imported, and no button left to go
on). Here the state lives in one small JSON record in the data folder (:func:`job_file`),
and the work runs in a daemon thread of the server process that only *hands* work to the
existing screening worker (:mod:`.worker`), or to the Dask cluster ``FMMTC_CLUSTER`` names
(:mod:`.dispatch`), so it neither holds the GIL nor blocks a page:

1. the cohort's region tables (not NIfTIs: the pipeline takes tables, and rendering a 4D image
   only to parcellate it again would be wasted work) are simulated one participant at a time
   by a child process, ahead of the screening, into the data folder, where they stay until
   the job is finished or reset, so a resumed job never simulates a participant twice;
2. each participant is screened in the worker, its outcome recorded at once, and the record
   updated, so a stop at any moment loses at most the participant in progress, which
   :func:`fmmtc_core.screening.screen` either stored whole or not at all.

A server that restarts finds the record "running" and carries on (:func:`resume`, called by
every page through ``app.py``). The user can stop, resume, finish (keep what is loaded) or
reset (remove the simulated participants) it. No Streamlit here.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fmmtc_app import dispatch, worker
from fmmtc_core._errors import FMMTCError

__all__ = ["DEMO_PREFIX", "DemoJob", "job_file", "read_job", "start", "resume", "stop",
           "finish", "reset", "running", "wait"]

_log = logging.getLogger(__name__)

#: Pseudonym prefix of the simulated demo participants.
DEMO_PREFIX = "SIM-"

#: Volumes of each simulated region table (8 minutes at TR 2 s).
DEMO_VOLUMES = 240

#: What a state means, in the words the sidebar and the Cohort page show.
STATUS_TEXT = {"simulating": "simulating", "running": "screening", "stopped": "stopped",
               "resetting": "removing", "done": "done", "failed": "failed"}


@dataclass
class DemoJob:
    """The demo job's record (``job.json`` in the data folder).

    Attributes
    ----------
    status : {"running", "stopped", "resetting", "done", "failed"}
        ``running`` also while the tables are simulated (:attr:`stage` says which).
    n, seed : int
        Participants and seed of the simulation.
    model_dir : str
        The model folder the job screens with (the one active when it was started).
    database : str
        The database URL without its password: the job belongs to this database.
    operator : str
        Who started it (audit log of screenings and outcomes).
    stage : {"simulating", "screening"}
    done : list of str
        Pseudonyms screened (or found stored) with their outcome recorded, in order.
    failed : dict of str to str
        Pseudonym -> why it could not be screened (bad input, failed QC).
    outcomes : int
        Outcomes recorded by the job.
    seconds : list of float
        Wall time of each participant screened by the job (s).
    message : str
        The last thing worth telling the user (an error, why it stopped).
    started_at, updated_at : str
        ISO 8601 times in UTC.
    """

    status: str
    n: int
    seed: int
    model_dir: str
    database: str
    operator: str
    stage: str = "simulating"
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    outcomes: int = 0
    seconds: list[float] = field(default_factory=list)
    message: str = ""
    started_at: str = ""
    updated_at: str = ""

    @property
    def processed(self) -> int:
        """Participants dealt with (screened or failed)."""
        return len(self.done) + len(self.failed)

    @property
    def fraction(self) -> float:
        """Share of the participants dealt with, 0-1."""
        return min(self.processed / self.n, 1.0) if self.n else 1.0

    @property
    def active(self) -> bool:
        """True while the job wants a thread working on it (running or resetting)."""
        return self.status in ("running", "resetting")

    def summary(self) -> str:
        """One line for the sidebar: what the job does and how far it is."""
        if self.status == "running" and self.stage == "simulating":
            return f"Simulating the demo cohort ({self.n} participants)..."
        failed = f", {len(self.failed)} failed" if self.failed else ""
        if self.status == "running":
            return (f"Loading the demo cohort: {len(self.done)} of {self.n} screened{failed}, "
                    f"{self.outcomes} outcomes")
        if self.status == "resetting":
            return "Removing the demo cohort..."
        if self.status == "done":
            return f"Demo cohort loaded: {len(self.done)} of {self.n}{failed}"
        return (f"Demo cohort {STATUS_TEXT.get(self.status, self.status)}: {len(self.done)} "
                f"of {self.n} screened{failed}")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def job_folder() -> Path:
    """The job's folder in the data folder (its record and, while needed, its tables)."""
    from fmmtc_core.config import data_dir

    return data_dir() / "demo-cohort"


def job_file() -> Path:
    """The job's record: ``<data folder>/demo-cohort/job.json``."""
    return job_folder() / "job.json"


_lock = threading.RLock()  # one writer of the record at a time in this process


def read_job() -> DemoJob | None:
    """The job's record, or None when there is none (or it cannot be read).

    Returns
    -------
    DemoJob or None
        An unreadable record (a crash in the middle of writing cannot leave one, but a
        hand-edited file can) counts as no job: the user can start again.
    """
    try:
        raw = json.loads(job_file().read_text())
        return DemoJob(**raw)
    except (OSError, ValueError, TypeError):
        return None


def _write(job: DemoJob) -> None:
    """Write the record atomically (a temporary file renamed over it)."""
    job.updated_at = _now()
    folder = job_folder()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".job-", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(job), f, indent=1)
    os.replace(tmp, job_file())


def _update(**changes) -> DemoJob | None:
    """Re-read the record, change it, write it back; None when it is gone (reset)."""
    with _lock:
        job = read_job()
        if job is None:
            return None
        for key, value in changes.items():
            setattr(job, key, value)
        _write(job)
        return job


# --------------------------------------------------------------------------------------------
# The thread of this server process
# --------------------------------------------------------------------------------------------
_thread: threading.Thread | None = None
_thread_guard = threading.Lock()
_exiting = False


@atexit.register
def _server_exits() -> None:
    # Registered after worker.shutdown (this module imports worker first), so it runs before
    # it: the job in progress then sees its worker go away as the server's exit, not a crash.
    global _exiting
    _exiting = True


def running() -> bool:
    """True while this process's job thread is alive."""
    return _thread is not None and _thread.is_alive()


def _ensure_thread(url: str) -> None:
    global _thread
    import multiprocessing as mp

    if mp.parent_process() is not None or mp.current_process().name != "MainProcess":
        # A child of the server (a spawned worker re-imports the main script, and under
        # AppTest that is app.py): the job is the server's to run, never a child's.
        return
    with _thread_guard:
        if running():
            return
        _thread = threading.Thread(target=_run, args=(url,), name="fmmtc-demo-cohort",
                                   daemon=True)
        _thread.start()


def wait(timeout: float | None = None) -> bool:
    """Wait for this process's job thread to end (for tests and shutdown).

    Parameters
    ----------
    timeout : float or None, default=None
        Seconds; None waits as long as it takes.

    Returns
    -------
    bool
        True when no thread is running any more.
    """
    thread = _thread
    if thread is not None:
        thread.join(timeout)
    return not running()


def _hidden(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def start(url: str, model_dir: str | os.PathLike, operator: str, n: int,
          seed: int = 2026) -> DemoJob:
    """Start the demo job (or resume the one recorded) and return its record.

    Parameters
    ----------
    url : str
        The cohort database (password included: it stays in this process).
    model_dir : path
        The model folder to screen with.
    operator : str
        Who starts it (audit log).
    n : int
        Participants (at least 2).
    seed : int, default=2026
        Seed of the simulation: the same seed gives the same tables, so participants stored
        by an earlier (even interrupted) load are found and skipped.

    Returns
    -------
    DemoJob
        The record, ``running``.

    Raises
    ------
    InvalidInputError
        ``n`` below 2.
    fmmtc_app.dispatch.ClusterSettingError
        ``FMMTC_CLUSTER`` cannot be used (nothing is written or started).
    """
    from fmmtc_core._errors import InvalidInputError

    if n < 2:
        raise InvalidInputError(f"The demo cohort needs at least 2 participants, got {n}.")
    dispatch.check(url)  # a bad FMMTC_CLUSTER is refused before anything is written
    with _lock:
        job = read_job()
        if job is None or job.status in ("done", "failed") and not job.done:
            job = DemoJob(status="running", n=n, seed=seed, model_dir=str(model_dir),
                          database=_hidden(url), operator=operator, started_at=_now())
        else:  # a stopped or failed job goes on where it was
            job.status, job.message = "running", ""
        _write(job)
    _ensure_thread(url)
    return job


def resume(url: str) -> DemoJob | None:
    """Carry on a job the record says is running (after a server restart); else nothing.

    Called on every page run: cheap when there is nothing to do (one small file read).

    Parameters
    ----------
    url : str
        The database of this server; a job recorded for another database is left alone.

    Returns
    -------
    DemoJob or None
        The record, if any.
    """
    job = read_job()
    if job is not None and job.active and not running() and job.database == _hidden(url):
        _ensure_thread(url)
    return job


def stop() -> DemoJob | None:
    """Ask the job to stop after the participant in progress (it can be resumed)."""
    with _lock:
        job = read_job()
        if job is not None and job.status == "running":
            job.status, job.message = "stopped", "Stopped by the user."
            _write(job)
        return job


def finish() -> DemoJob | None:
    """End the job with the participants loaded so far, and delete its simulated tables.

    Returns
    -------
    DemoJob or None
        The record, ``done``; None when there is no job.
    """
    with _lock:
        job = read_job()
        if job is None:
            return None
        if job.status != "done":
            job.status = "done"
            job.message = (f"Finished with {len(job.done)} of {job.n} participants.")
        _write(job)
    if not running():
        _drop_tables()
    return job


def reset(url: str, actor: str) -> DemoJob | None:
    """Remove the demo cohort: the job, its tables and the simulated participants.

    With a job thread at work, the removal is its next step (after the participant in
    progress, so nothing half-done is left behind); otherwise it happens here.

    Parameters
    ----------
    url : str
        The cohort database.
    actor : str
        Who resets it (audit log).

    Returns
    -------
    DemoJob or None
        The record while the thread still has to remove it (``resetting``); None once done.

    Raises
    ------
    StorageError
        The database cannot be written (nothing was removed).
    """
    with _lock:
        job = read_job()
        if job is not None and running():
            job.status, job.operator = "resetting", actor
            _write(job)
            return job
    _remove(url, actor)
    return None


def _remove(url: str, actor: str) -> None:
    from fmmtc_core.store import open_database, session_scope
    from fmmtc_core.store.repository import remove_simulated_participants

    engine = open_database(url)
    try:
        with session_scope(engine, write=True) as s:
            remove_simulated_participants(s, DEMO_PREFIX, actor=actor)
    finally:
        engine.dispose()
    with _lock:
        shutil.rmtree(job_folder(), ignore_errors=True)


def _drop_tables() -> None:
    shutil.rmtree(job_folder() / "cohort", ignore_errors=True)


def _part(i: int) -> Path:
    """Participant ``i``'s folder: a one-participant cohort (table, sidecar, confounds,
    participants.tsv), complete once its ``simulation.json`` (written last) exists."""
    return job_folder() / "cohort" / f"part-{i + 1:03d}"


def _simulate_tables(n: int, seed: int, root: str) -> None:
    """Child process: write each participant's folder that is not complete yet, in order."""
    os.environ["FMMTC_DATA_DIR"] = root  # where _part looks (spawned: a fresh interpreter)
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    config = SimulationConfig(n_volumes=DEMO_VOLUMES)
    for i in range(n):
        folder = _part(i)
        if (folder / "simulation.json").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)  # a part the last run left half-written
        # Subject i alone is bit for bit subject i of the whole cohort (write_cohort's
        # ``subjects``): a resumed job finds the participants an earlier one stored.
        write_cohort(folder, n, seed=seed, fmt="timeseries", config=config, subjects=[i])


class _Tables:
    """The cohort's region tables, simulated ahead of the screening by a child process.

    Why: simulating the whole cohort first kept the first participant off the page for a
    minute or two; one participant at a time, the first is screened within seconds and the
    simulation of the next runs while the worker screens this one. A child process, like the
    worker: simulating in the server process would compete with the pages for the GIL.
    Tables stay on disk until the job ends, so a resumed job simulates only what is missing.
    """

    def __init__(self, job: DemoJob) -> None:
        import multiprocessing as mp

        self.n = job.n
        self._proc = None
        if all((_part(i) / "simulation.json").exists() for i in range(job.n)):
            return
        from fmmtc_core.config import data_dir

        self._proc = mp.get_context("spawn").Process(
            target=_simulate_tables, args=(job.n, job.seed, str(data_dir())),
            name="fmmtc-demo-simulate", daemon=True)
        self._proc.start()

    def row(self, i: int) -> dict | None:
        """Participant ``i``'s row (``participants.tsv`` plus ``scan`` and ``confounds``),
        once simulated; None when the job stops (or is reset) while it waits.

        Raises
        ------
        FMMTCError
            The simulation process ended without writing it.
        """
        folder = _part(i)
        while not (folder / "simulation.json").exists():
            current = read_job()
            if current is None or current.status != "running" or _exiting:
                return None
            if self._proc is None or not self._proc.is_alive():
                if (folder / "simulation.json").exists():
                    break
                code = None if self._proc is None else self._proc.exitcode
                raise FMMTCError("The demo cohort could not be simulated (the simulation "
                                 f"process ended with status {code}).")
            time.sleep(0.2)
        # Read here rather than by fmmtc_core.bids.read_cohort, which refuses a cohort whose
        # labels are all alike (as one participant's are).
        import pandas as pd

        row = pd.read_csv(folder / "participants.tsv", sep="\t",
                          dtype={"participant_id": str}).iloc[0].to_dict()
        func = folder / str(row["participant_id"]) / "func"
        row["scan"] = next(p for p in sorted(func.glob("*_timeseries.tsv"))
                           if "confounds" not in p.name)
        row["confounds"] = next(iter(sorted(func.glob("*_desc-confounds_timeseries.tsv"))),
                                None)
        return row

    def close(self) -> None:
        """Stop the simulation process, if it still runs."""
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.terminate()
            self._proc.join()


def _run(url: str) -> None:
    """The job thread: each participant's table (simulated ahead), screened, its outcome
    recorded, the record updated."""
    from fmmtc_core.store import open_database, session_scope
    from fmmtc_core.store import repository as repo

    job = read_job()
    if job is None:
        return
    engine = tables = None
    try:
        if job.status == "resetting":
            _remove(url, job.operator)
            return
        tables = _Tables(job)
        engine = open_database(url)
        for i in range(job.n):
            job = read_job()
            if job is None or job.status != "running":
                break
            if f"{DEMO_PREFIX}{i + 1:03d}" in job.done + list(job.failed):
                continue
            row = tables.row(i)
            if row is None:
                break
            if job.stage != "screening":
                _update(stage="screening")
            pid = DEMO_PREFIX + str(row["participant_id"]).removeprefix("sub-")
            if pid in job.done or pid in job.failed:
                continue
            t0 = time.perf_counter()
            try:
                dispatch.run(job.model_dir, "screen", {
                    "url": url, "source": str(row["scan"]), "participant": pid,
                    "confounds": None if row["confounds"] is None else str(row["confounds"]),
                    "site": str(row["site"]), "drug": str(row["drug"]), "simulated": True,
                    "operator": job.operator})
            except (worker.WorkerCrashedError, dispatch.ClusterSettingError):
                raise  # not this participant's problem: the job stops, and says why
            except FMMTCError as exc:  # this participant's own problem: the others go on
                failed = dict(job.failed, **{pid: str(exc)})
                _update(failed=failed)
                continue
            seconds = time.perf_counter() - t0
            recorded = _record_outcome(engine, session_scope, repo, pid,
                                       bool(int(row["responder"])), job.operator)
            with _lock:
                job = read_job()
                if job is None:
                    break
                job.done.append(pid)
                job.outcomes += recorded
                job.seconds.append(round(seconds, 2))
                _write(job)
        job = read_job()
        if job is not None and job.status == "resetting":
            _remove(url, job.operator)
        elif job is not None and job.status == "running" and job.processed >= job.n:
            _update(status="done", message="")
            _drop_tables()
    except Exception as exc:  # noqa: BLE001 - recorded for the page, never raised to it
        if _exiting:  # the server stops: the record stays "running", the next start resumes
            return
        if not isinstance(exc, FMMTCError):  # a bug: its traceback for the server's log only
            _log.exception("The demo cohort job failed")
        reason = (str(exc) if isinstance(exc, FMMTCError)
                  else f"an internal error ({type(exc).__name__})")
        _update(status="failed",
                message=f"Stopped: {reason.rstrip('.')}. Resume to try again.")
    finally:
        if tables is not None:
            tables.close()
        if engine is not None:
            engine.dispose()


def _record_outcome(engine, session_scope, repo, pid: str, responder: bool,
                    actor: str) -> int:
    """Record the simulated outcome unless the same one is on record; 1 when recorded."""
    history = repo.outcome_history(engine, pid)
    word = "responder" if responder else "non-responder"
    if not history.empty and history.iloc[0]["outcome"] == word:
        return 0
    with session_scope(engine, write=True) as s:
        repo.record_outcome(s, pid, word, actor=actor, replace=not history.empty,
                            note="simulated demo cohort")
    return 1
