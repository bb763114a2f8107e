"""The dashboard's screening worker: one process per server, which loads the model once and runs
the screenings (and the demo cohort) one job at a time.

Why a process: in the server's script thread, torch competes for the GIL with Streamlit's
event-loop thread (measured here: a busy second thread made an explanation 15x slower, 2.0 s ->
29.8 s), and a long screening would also stall every other user's page.

At most one worker is alive per server process (:func:`worker_for`). Asking for another model
shuts the current worker down (its process joined) before the next one starts; another database
only swaps the worker's engine. :func:`shutdown` is registered with :mod:`atexit`, so a normal
server exit joins the worker too. Jobs, progress and results travel over one pipe, with no
Manager process. A worker that dies (killed, out of memory) shows up as the pipe's end of file:
the job raises :class:`WorkerCrashedError`, and the next job starts a fresh worker.

This module imports neither Streamlit nor torch: the worker process imports it.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import multiprocessing.util  # noqa: F401 - registers its exit hook before ours, so ours runs first
import os
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmmtc_core._errors import FMMTCError

__all__ = ["ScreeningWorker", "WorkerCrashedError", "worker_for", "run", "current", "shutdown",
           "worker_threads"]

#: What a page shows when the worker died during a job.
CRASHED = ("The screening worker stopped unexpectedly (out of memory?). Nothing was saved; "
           "please try again.")

#: Seconds a model change waits for the job in progress on the old model to end.
CHANGE_WAIT_S = 600.0


def worker_threads(setting: str | None = None) -> int:
    """How many threads the worker gives torch.

    All the cores this process may use (its CPU affinity, not the machine's count) but one,
    which stays free for the Streamlit server and, on a single machine, the browser. Measured
    on this project's 2-core machine with other processes busy (the demo model's screening,
    alternating 3 times): torch on both cores took 1.5-2.3 s to predict and 1.1-4.3 s to
    explain, one thread 0.22-0.25 s and 0.62-0.86 s - threads that wait at every parallel step
    for a pre-empted sibling lose more than the second core gives (``bench/bench_dashboard.py``
    measures the dashboard both ways).

    Parameters
    ----------
    setting : str or None, default=None
        A whole number >= 1 overriding the rule; None reads ``FMMTC_WORKER_THREADS``
        (:func:`fmmtc_core.config.worker_threads_setting`).

    Returns
    -------
    int
        At least 1.

    Raises
    ------
    FMMTCError
        ``setting`` (or the environment variable) is not a whole number >= 1.
    """
    from fmmtc_core.config import thread_count, worker_threads_setting

    return thread_count("FMMTC_WORKER_THREADS",
                        worker_threads_setting() if setting is None else setting)


class WorkerCrashedError(FMMTCError):
    """The worker process died during a job (killed, out of memory): nothing was saved."""


class _Retired(Exception):
    """The worker was shut down (another model was chosen) before this job could be sent."""


class ScreeningWorker:
    """One worker process for the model in ``model_dir``, started by :meth:`start`.

    Parameters
    ----------
    model_dir : path
        The model folder; the worker loads it once, when it starts.
    threads : int or None, default=None
        Torch threads in the worker; None: :func:`worker_threads`.
    stop_timeout : float, default=10.0
        Seconds :meth:`shutdown` gives the process to end on its own before terminating it.

    Attributes
    ----------
    model_dir : str
        The model folder, as a string.
    threads : int
    stop_timeout : float
    """

    def __init__(self, model_dir: str | os.PathLike, *, threads: int | None = None,
                 stop_timeout: float = 10.0) -> None:
        self.model_dir = str(model_dir)
        self.threads = worker_threads() if threads is None else worker_threads(str(threads))
        self.stop_timeout = stop_timeout
        self._process = None
        self._conn = None
        self._jobs = threading.Lock()  # one job at a time on the pipe
        self._ids = itertools.count(1)
        self._closed = False

    def start(self) -> ScreeningWorker:
        """Start the process (it loads the model in the background) and return self.

        The process is spawned (not forked) and is a daemon.

        Returns
        -------
        ScreeningWorker
            ``self``, so that ``ScreeningWorker(d).start()`` reads inline.

        Raises
        ------
        RuntimeError
            The worker was started already (a worker is started once).
        """
        if self._process is not None:
            raise RuntimeError("This worker was started already; make a new one.")
        ctx = mp.get_context("spawn")  # no forked torch, SQLite or Streamlit state
        here, there = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(self.model_dir, there, self.threads),
                              name="fmmtc-screening-worker", daemon=True)
        process.start()
        there.close()  # the worker holds the only copy now: its death reads here as end of file
        self._process, self._conn = process, here
        return self

    @property
    def pid(self) -> int | None:
        """The worker's process id (None before :meth:`start`)."""
        return None if self._process is None else self._process.pid

    @property
    def alive(self) -> bool:
        """True while the process runs and :meth:`shutdown` has not been called."""
        return (not self._closed and self._process is not None
                and self._process.exitcode is None and self._process.is_alive())

    def run(self, kind: str, job: dict, progress: Callable | None = None) -> Any:
        """Run one job and return its result, or raise its error.

        One job at a time: a second caller waits for the first job to end.

        Parameters
        ----------
        kind : {"screen"}
            :func:`fmmtc_core.screening.screen` with the worker's model (the demo cohort
            is a job of :mod:`fmmtc_app.demo_job` made of such screenings).
        job : dict
            The job's keyword arguments (picklable): ``url`` (the database), ``source``,
            ``participant`` and further arguments of ``screen``.
        progress : callable or None, default=None
            ``progress(stage, done, total, {})`` is called in this thread with the job's
            stages. If it raises (a page that reruns), the job goes on in the worker and what
            it still sends is dropped.

        Returns
        -------
        object
            The job's result, a :class:`~fmmtc_core.screening.ScreeningResult`.

        Raises
        ------
        WorkerCrashedError
            The process died before or during the job, or was never started.
        Exception
            The job's own error, re-raised here (e.g.
            :class:`~fmmtc_core._errors.InvalidInputError` or
            :class:`~fmmtc_core._errors.QCFailedError`); an error that cannot be pickled
            arrives as :class:`~fmmtc_core._errors.FMMTCError` or :class:`RuntimeError` with
            its message.
        """
        with self._jobs:
            if self._closed:
                raise _Retired
            if not self.alive:
                raise self._crashed()
            sent = next(self._ids)
            try:
                self._conn.send((sent, kind, job))
            except OSError:
                raise self._crashed() from None
            while True:
                try:
                    got, tag, payload = self._receive()
                except (EOFError, OSError):
                    raise self._crashed() from None
                if got != sent:
                    continue  # from a job whose page went away: nobody waits for it
                if tag == "progress":
                    if progress is not None:
                        progress(*payload)
                elif tag == "error":
                    break
                else:
                    return payload
        raise payload

    def _crashed(self) -> WorkerCrashedError:
        self._closed = True  # the next job gets a fresh worker (see worker_for)
        return WorkerCrashedError(CRASHED)

    def _receive(self):
        while not self._conn.poll(0.1):
            # End of file normally says it; a process forked meanwhile by another thread may
            # hold a copy of the worker's end, so look at the process as well. A shutdown that
            # gave up waiting for this job has already let go of the process: the job is lost.
            process = self._process
            if process is None or (not process.is_alive() and not self._conn.poll(0)):
                raise EOFError
        return self._conn.recv()

    def shutdown(self, wait: float | None = None) -> None:
        """Stop the worker and join its process (idempotent).

        Parameters
        ----------
        wait : float or None, default=None
            Seconds to wait for a job a page is waiting on (default ``stop_timeout``); after
            that the process is stopped anyway and that page sees :class:`WorkerCrashedError`.
        """
        got = self._jobs.acquire(timeout=self.stop_timeout if wait is None else wait)
        try:
            if self._closed and self._process is None:
                return
            self._closed = True
            process, conn = self._process, self._conn
            self._process = None
        finally:
            if got:
                self._jobs.release()
        if process is None:
            return
        try:
            conn.send(None)
        except OSError:
            pass
        deadline = time.monotonic() + self.stop_timeout
        while process.is_alive() and time.monotonic() < deadline:
            if not got:  # a page still reads the pipe: only wait
                process.join(0.1)
                continue
            try:  # drain what an abandoned job still sends, so the worker never blocks on us
                if conn.poll(0.1):
                    conn.recv()
            except (EOFError, OSError):
                process.join(0.1)
            except Exception:  # noqa: BLE001 - a message that cannot be read: dropped
                pass
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
        process.join()
        conn.close()
        process.close()


# --------------------------------------------------------------------------------------------
# The one worker of this server process
# --------------------------------------------------------------------------------------------
_current: ScreeningWorker | None = None
_guard = threading.Lock()


def worker_for(model_dir: str | os.PathLike) -> ScreeningWorker:
    """The server's worker for ``model_dir``: the running one, or a fresh one.

    A previous worker (another model, or dead) is shut down and joined first; it is given
    :data:`CHANGE_WAIT_S` seconds to finish a job in progress.

    Parameters
    ----------
    model_dir : str or path
        The model folder.

    Returns
    -------
    ScreeningWorker
        Started.
    """
    global _current
    with _guard:
        old = _current
        if old is not None and old.model_dir == str(model_dir) and old.alive:
            return old
        _current = None
        if old is not None:
            old.shutdown(wait=CHANGE_WAIT_S)
        _current = ScreeningWorker(model_dir).start()
        return _current


def run(model_dir: str | os.PathLike, kind: str, job: dict, *,
        progress: Callable | None = None) -> Any:
    """:meth:`ScreeningWorker.run` on :func:`worker_for` ``(model_dir)``.

    A job that finds its worker retired (another page switched models meanwhile) is sent to
    the new worker, up to three times.

    Parameters
    ----------
    model_dir : str or path
        The model folder.
    kind : {"screen"}
    job : dict
    progress : callable or None, default=None
        See :meth:`ScreeningWorker.run`.

    Returns
    -------
    object
        The job's result.

    Raises
    ------
    WorkerCrashedError
        The worker process died during the job.
    FMMTCError
        The model was changed by other users three times while the job waited; or the job's
        own error (see :meth:`ScreeningWorker.run`).
    """
    for _ in range(3):
        try:
            return worker_for(model_dir).run(kind, job, progress)
        except _Retired:  # another page switched models meanwhile: take the new worker
            continue
    raise FMMTCError("The model was changed by another user while this job waited; please "
                     "try again.")


def current() -> ScreeningWorker | None:
    """The running worker, if any (for tests and diagnostics).

    Returns
    -------
    ScreeningWorker or None
        The worker :func:`worker_for` last started, until :func:`shutdown`; it may have died
        since (see :attr:`ScreeningWorker.alive`).
    """
    return _current


def shutdown() -> None:
    """Shut the server's worker down and join it (also run at exit)."""
    global _current
    got = _guard.acquire(timeout=30)
    try:
        worker, _current = _current, None
    finally:
        if got:
            _guard.release()
    if worker is not None:
        worker.shutdown()


atexit.register(shutdown)


# --------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------
class _State:
    """The worker's model (loaded once) and database engine (one at a time)."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self._model = None
        self._url: str | None = None
        self._engine = None

    def model(self):
        if self._model is None:
            from fmmtc_core.models.ensemble import load_model

            self._model = load_model(self.model_dir)
        return self._model

    def engine(self, url: str):
        if url != self._url:
            from fmmtc_core.store import make_engine

            self.close()
            self._engine, self._url = make_engine(url), url
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        self._engine = self._url = None


def _screen(state: _State, progress, *, url: str, source: str, participant: str, **kwargs):
    from fmmtc_core.screening import screen

    return screen(source, participant, state.model(), state.engine(url),
                  progress=lambda stage, done, total, info=None: progress(stage, done, total, {}),
                  **kwargs)


_JOBS = {"screen": _screen}


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling both ways, else a plain stand-in with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        if isinstance(exc, FMMTCError):
            return FMMTCError(str(exc))
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(model_dir: str, conn, threads: int = 1) -> None:
    """The worker process: load the model, then run jobs until told to stop (None) or until
    the server is gone (end of file)."""
    import signal

    # Ctrl-C in the server's terminal reaches the whole process group; the server stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)
    state = _State(model_dir)
    try:
        state.model()
    except Exception:  # noqa: BLE001 - raised again, to the page, by the first job
        pass
    # The libraries and the model stay for the process's life: no full collection walks them
    # again (they cost 0.3 s inside a screening's pipeline); the first job imports the rest.
    from fmmtc_app.memory import freeze_once

    freeze_once("worker: model loaded")
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if message is None:
                break
            job_id, kind, job = message

            def progress(*args, _id=job_id):
                conn.send((_id, "progress", args))

            try:
                reply = (job_id, "ok", _JOBS[kind](state, progress, **job))
            except Exception as exc:  # noqa: BLE001 - the page shows it
                reply = (job_id, "error", _portable(exc))
            try:
                conn.send(reply)
            except (EOFError, OSError):
                break
            except Exception as exc:  # noqa: BLE001 - a result that cannot be pickled
                conn.send((job_id, "error", _portable(exc)))
            del reply
            freeze_once("worker: first job")  # after the reply: the page is not kept waiting
    finally:
        state.close()
        conn.close()
