"""Where the dashboard's long work runs: its own worker process, or a Dask cluster.

Without ``FMMTC_CLUSTER`` every job goes to the server's screening worker
(:func:`fmmtc_app.worker.run`), exactly as before this module existed, and Dask is never
imported. With ``FMMTC_CLUSTER=local:N`` or ``tcp://HOST:PORT`` a screening (from the Screen
page or the demo cohort job, :mod:`.demo_job`) is split as in :mod:`fmmtc_core.cluster`: a
cluster worker reads the scan where it lies and computes the screening
(:func:`fmmtc_core.screening.analyse`), and this server process, the one writer, stores it in
one transaction (:func:`fmmtc_core.screening.store_computed`).

Why a thread per cluster job: the page that started a screening may be refreshed or closed while
the cluster computes it. The job runs in a daemon thread of the server, which owns hard links to
the staged upload (the page's staging folder is deleted when its script run ends), so the
screening is still stored; every page of the server lists the jobs in progress
(:func:`jobs`), so a refreshed page shows how far it is. The demo cohort job keeps its own
record in the data folder and survives a server restart too (see :mod:`.demo_job`).

One Dask client per server process (:func:`client`), closed by :func:`shutdown` (also at exit):
a ``local:N`` cluster is started on the first job and its workers keep the model loaded.

This module imports neither Streamlit nor torch.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmmtc_app import worker
from fmmtc_core._errors import FMMTCError, InvalidInputError

if TYPE_CHECKING:
    from fmmtc_core.cluster import ClusterSpec

__all__ = ["ClusterSettingError", "cluster_spec", "check", "run", "client", "jobs",
           "ClusterJob", "shutdown"]

_log = logging.getLogger(__name__)

#: How many finished jobs :func:`jobs` keeps listing (the latest ones).
KEEP_FINISHED = 10


class ClusterSettingError(InvalidInputError):
    """``FMMTC_CLUSTER`` cannot be used (malformed, SQLite with a remote scheduler, a data
    folder the workers do not see, a scheduler that does not answer)."""


def cluster_spec(value: str | None = None) -> ClusterSpec | None:
    """The cluster named by ``FMMTC_CLUSTER``, or None when none is configured.

    Parameters
    ----------
    value : str or None, default=None
        The setting's value; None reads it (:func:`fmmtc_core.config.cluster_setting`).

    Returns
    -------
    ClusterSpec or None
        None when the setting is unset or empty (the server's own worker screens).

    Raises
    ------
    ClusterSettingError
        The value is neither ``local:N`` (N >= 1) nor ``tcp://HOST:PORT``.
    """
    from fmmtc_core.config import cluster_setting

    value = cluster_setting() if value is None else value
    if not value or not value.strip():
        return None
    from fmmtc_core.cluster import parse_cluster

    try:
        return parse_cluster(value)
    except InvalidInputError:
        raise ClusterSettingError(
            f"Invalid value for the FMMTC_CLUSTER setting: {value!r}. Expected local:N (N "
            "worker processes on this machine) or tcp://HOST:PORT (a running Dask scheduler); "
            "unset it to screen in the dashboard's own worker. Nothing was screened.") from None


def check(url: str, value: str | None = None) -> ClusterSpec | None:
    """:func:`cluster_spec`, and the database it would write to checked against it.

    Cheap (no connection): for the pages, to say what is wrong before anything is uploaded.

    Parameters
    ----------
    url : str
        The cohort database URL.
    value : str or None, default=None
        As in :func:`cluster_spec`.

    Returns
    -------
    ClusterSpec or None

    Raises
    ------
    ClusterSettingError
        A malformed setting, or SQLite with a remote (``tcp://``) scheduler.
    """
    spec = cluster_spec(value)
    if spec is None:
        return None
    from fmmtc_core.cluster import check_database

    try:  # the rule is the CLI's (one place); the words are the dashboard's settings
        check_database(spec, url)
    except InvalidInputError:
        raise ClusterSettingError(
            f"FMMTC_CLUSTER={spec} needs a PostgreSQL database (FMMTC_DATABASE_URL="
            "postgresql+psycopg://...), not SQLite: a remote cluster is shared by hosts and "
            "teams, and one SQLite file on this machine is neither reachable by them nor safe on "
            "a network filesystem. Use FMMTC_CLUSTER=local:N to screen into SQLite on this "
            "machine. Nothing was screened.") from None
    return spec


# --------------------------------------------------------------------------------------------
# The one Dask client of this server process
# --------------------------------------------------------------------------------------------
_client: Any = None
_client_spec: str | None = None
_client_stack: ExitStack | None = None
_client_guard = threading.Lock()
_models: dict[str, Any] = {}
_engines: dict[str, Any] = {}


def client(spec: ClusterSpec) -> Any:
    """The server's Dask client for ``spec``: the running one, or a new one.

    A client for another spec is closed first. For a remote scheduler, every worker must see
    the data folder (where uploads are staged) at the same path: checked once, on connecting.

    Parameters
    ----------
    spec : ClusterSpec

    Returns
    -------
    distributed.Client

    Raises
    ------
    ClusterSettingError
        The scheduler does not answer, or a worker does not see the data folder.
    """
    global _client, _client_spec, _client_stack
    from fmmtc_core.cluster import open_client
    from fmmtc_core.config import data_dir

    with _client_guard:
        if _client is not None and _client_spec == str(spec):
            return _client
        _close_client()
        stack = ExitStack()
        threads = None
        if spec.n_workers is not None:
            threads = max(1, worker.worker_threads() // spec.n_workers)
        try:
            new = stack.enter_context(open_client(spec, threads=threads))
        except InvalidInputError as exc:
            stack.close()
            raise ClusterSettingError(
                f"FMMTC_CLUSTER={spec}: {str(exc).replace('nothing was screened', '')}"
                .rstrip(" ;.") + ". Nothing was screened.") from None
        except BaseException:
            stack.close()
            raise
        if spec.remote:
            folder = str(data_dir().resolve())
            try:
                seen = new.run(os.path.isdir, folder)  # a builtin: any worker can run it
            except Exception:  # noqa: BLE001 - a worker that cannot answer: counted as blind
                seen = {"?": False}
            if not seen:
                stack.close()
                raise ClusterSettingError(
                    f"FMMTC_CLUSTER={spec}: the scheduler has no workers yet; start them "
                    "(`dask worker ...`) and try again. Nothing was screened.")
            blind = [w for w, ok in seen.items() if not ok]
            if blind:
                stack.close()
                raise ClusterSettingError(
                    f"FMMTC_CLUSTER={spec}: the data folder {folder} (FMMTC_DATA_DIR, where "
                    f"uploads are staged) is not visible on {len(blind)} worker(s), e.g. "
                    f"{blind[0]}. It must be on a filesystem shared by the server and every "
                    "worker, at the same path. Nothing was screened.")
        _client, _client_spec, _client_stack = new, str(spec), stack
        return new


def _close_client() -> None:
    global _client, _client_spec, _client_stack
    stack, _client, _client_spec, _client_stack = _client_stack, None, None, None
    if stack is not None:
        stack.close()


def shutdown() -> None:
    """Close the server's Dask client (and its local cluster) and database engines.

    Waits for the cluster jobs in progress first (they hold the client). Also run at exit.
    """
    for job in jobs():
        if job.thread is not None:
            job.thread.join(60)
    with _client_guard:
        _close_client()
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _models.clear()


atexit.register(shutdown)


def _model(model_dir: str):
    with _client_guard:
        if model_dir not in _models:
            from fmmtc_core.models.ensemble import load_model

            _models[model_dir] = load_model(model_dir)
        return _models[model_dir]


def _engine(url: str):
    with _client_guard:
        if url not in _engines:
            from fmmtc_core.store import open_database

            _engines[url] = open_database(url)
        return _engines[url]


# --------------------------------------------------------------------------------------------
# Cluster jobs: one thread each, listed for every page
# --------------------------------------------------------------------------------------------
@dataclass
class ClusterJob:
    """A screening handed to the cluster.

    Attributes
    ----------
    id : int
    participant : str
    status : {"running", "done", "failed"}
    stage : tuple of (str, int, int)
        The last progress report: stage (:data:`fmmtc_core.screening.STAGES`), done, total.
    message : str
        What happened: the stored screening, or why nothing was stored.
    result : ScreeningResult or None
    error : BaseException or None
    started : float
        ``time.monotonic()`` when it was handed over.
    thread : threading.Thread or None
        The thread that runs it.
    ended : threading.Event
        Set when it ended, stored or not.
    """

    id: int
    participant: str
    status: str = "running"
    stage: tuple = ("validate", 0, 1)
    message: str = ""
    result: Any = None
    error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = field(default=None, repr=False)
    ended: threading.Event = field(default_factory=threading.Event, repr=False)

    def summary(self) -> str:
        """One line for a page: who, and how far."""
        if self.status == "running":
            return (f"Screening {self.participant} on the cluster: {self.stage[0]} "
                    f"({time.monotonic() - self.started:.0f} s)")
        return f"{self.participant}: {self.message}"


_jobs: list[ClusterJob] = []
_ids = itertools.count(1)
_jobs_guard = threading.Lock()


def jobs() -> list[ClusterJob]:
    """The cluster jobs of this server: those running, then the latest finished ones.

    Returns
    -------
    list of ClusterJob
    """
    with _jobs_guard:
        return list(_jobs)


def _adopt(paths: dict[str, str | None], staging: Path | None) -> tuple[dict, Path | None]:
    """Hard links (else copies) of the files under ``staging`` in a folder of the job's own,
    so a page whose staging folder is deleted (refreshed, closed) does not take them away."""
    if staging is None:
        return paths, None
    root = Path(staging).resolve()
    inside = {k: v for k, v in paths.items()
              if v is not None and Path(v).resolve().is_relative_to(root)}
    if not inside:
        return paths, None
    # "upload-" so that a server killed mid-job leaves a folder the next start removes.
    folder = Path(tempfile.mkdtemp(prefix="upload-cluster-", dir=root))
    out = dict(paths)
    for i, (key, value) in enumerate(inside.items()):
        target = folder / str(i) / Path(value).name
        target.parent.mkdir()
        try:
            os.link(value, target)
        except OSError:
            shutil.copy2(value, target)
        out[key] = str(target)
    return out, folder


def run(model_dir: str | os.PathLike, kind: str, job: dict, *,
        progress: Callable | None = None, staging: str | os.PathLike | None = None) -> Any:
    """Run a job on the cluster when ``FMMTC_CLUSTER`` names one, else in the server's worker.

    Parameters
    ----------
    model_dir : str or path
        The model folder (the same path on every cluster worker).
    kind : {"screen"}
        As in :func:`fmmtc_app.worker.run`.
    job : dict
        As in :func:`fmmtc_app.worker.run` (``url``, ``source``, ``participant`` and further
        arguments of :func:`fmmtc_core.screening.screen`).
    progress : callable or None, default=None
        As in :func:`fmmtc_app.worker.run`; on a cluster, called in this thread with the
        stages as they are reached (coarser than the worker's: the analysis is one task).
    staging : str or path or None, default=None
        The folder of staged uploads: files of the job under it are linked into a folder the
        cluster job owns (removed when it ends), so they outlive the calling page.

    Returns
    -------
    object
        The job's result (``"screen"``: a :class:`~fmmtc_core.screening.ScreeningResult`,
        its ``analysis`` None on a cluster).

    Raises
    ------
    ClusterSettingError
        ``FMMTC_CLUSTER`` cannot be used; nothing was screened.
    Exception
        The job's own error, as :func:`fmmtc_app.worker.run` raises it.
    """
    spec = check(job["url"]) if kind == "screen" else None
    if spec is None:
        return worker.run(model_dir, kind, job, progress=progress)
    cj = ClusterJob(next(_ids), str(job.get("participant")))
    # Linked here, before this call can be interrupted (a page that reruns): from now on the
    # job's files are its own, whatever happens to the page's staging folder.
    paths, folder = _adopt({k: job.get(k) for k in ("source", "sidecar", "confounds")},
                           None if staging is None else Path(staging))
    thread = threading.Thread(target=_run_job, args=(cj, spec, str(model_dir),
                                                     {**job, **paths}, folder),
                              name=f"fmmtc-cluster-job-{cj.id}", daemon=True)
    cj.thread = thread
    with _jobs_guard:
        _jobs.append(cj)
    thread.start()
    seen = None
    while True:  # the first stage at once, then each change (a rerun's error ends the wait)
        if progress is not None and cj.stage != seen:
            seen = cj.stage
            progress(*seen, {})
        if cj.ended.wait(0.2):
            break
    if cj.error is not None:
        raise cj.error
    return cj.result


def _run_job(cj: ClusterJob, spec: ClusterSpec, model_dir: str, job: dict,
             folder: Path | None) -> None:
    """The job's thread: screen, record how it ended, remove the job's own files."""
    try:
        cj.result = _screen_on_cluster(cj, spec, model_dir, job)
        cj.message = (f"stored as screening {cj.result.screening_id}"
                      + (" (already screened)" if cj.result.reused else ""))
        cj.status = "done"
    except BaseException as exc:  # noqa: BLE001 - handed to the page that waits, if any
        if not isinstance(exc, FMMTCError):  # a bug: its traceback for the server's log only
            _log.exception("A screening on the cluster failed")
        cj.error, cj.status = exc, "failed"
        cj.message = (f"not stored: {exc}" if isinstance(exc, FMMTCError)
                      else f"not stored: an internal error ({type(exc).__name__})")
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        cj.ended.set()
        with _jobs_guard:  # keep the running ones and the latest finished ones
            done = [j for j in _jobs if j.ended.is_set()]
            for old in done[:-KEEP_FINISHED]:
                _jobs.remove(old)


def _analyse_task(job: dict, model_dir: str, weights_sha256: str,
                  threads: int | None) -> Any:
    """On a worker: hash the inputs where they lie, analyse and explain them, and return the
    :class:`~fmmtc_core.screening.ComputedScreening` (the hash taken here, so what is stored
    is what was analysed)."""
    from fmmtc_core.cluster import _worker_model
    from fmmtc_core.screening import analyse, computed_screening, inputs_digest

    model = _worker_model(model_dir, weights_sha256, threads)
    scan_sha, key = inputs_digest(job["source"], job["sidecar"], job["confounds"])
    result = analyse(job["source"], model, sidecar=job["sidecar"], confounds=job["confounds"],
                     thresholds=job["thresholds"], explain_kwargs=job["explain_kwargs"],
                     min_volumes=job["min_volumes"])
    return computed_screening(result, model, scan_sha256=scan_sha, inputs_sha256=key,
                              participant=job["participant"], operator=job["operator"],
                              simulated=job["simulated"])


def _screen_on_cluster(cj: ClusterJob, spec: ClusterSpec, model_dir: str, job: dict):
    """:func:`fmmtc_core.screening.screen` with the analysis on the cluster and the store
    here: the same checks in the same order, the same result."""
    from fmmtc_core.screening import (ScreeningResult, _stored_outcome, default_operator,
                                      inputs_digest, store_computed)
    from fmmtc_core.store import repository as repo
    from fmmtc_core.store.db import session_scope

    pseudonym = repo.validate_pseudonym(job["participant"])
    operator = repo.validate_label("operator", job.get("operator")) or default_operator()
    site, drug, arm = (repo.validate_label(name, job.get(name))
                       for name in ("site", "drug", "arm"))
    source = job["source"]
    if not Path(source).exists():
        raise InvalidInputError(f"No such scan file: {str(source)!r}.")
    model_dir = str(Path(model_dir).resolve())
    model, engine = _model(model_dir), _engine(job["url"])
    force = bool(job.get("force", False))
    scan_sha, key = inputs_digest(source, job.get("sidecar"), job.get("confounds"))
    with session_scope(engine) as s:  # the cheap answers first: refuse or reuse
        stored = _stored_outcome(s, scan_sha, key, model, pseudonym, force)
    if stored is not None:
        cj.stage = ("save", 1, 1)
        return stored
    cj.stage = ("parcellate", 0, 1)
    dask_client = client(spec)
    threads = (max(1, worker.worker_threads() // spec.n_workers)
               if spec.n_workers is not None else None)
    task = {"source": str(source), "participant": pseudonym, "operator": operator,
            "simulated": bool(job.get("simulated", False)),
            **{k: job.get(k) for k in ("sidecar", "confounds", "thresholds", "explain_kwargs",
                                       "min_volumes")}}
    fut = dask_client.submit(_analyse_task, task, model_dir, model.weights_sha256, threads,
                             pure=False)
    from distributed.scheduler import KilledWorker

    try:
        computed = fut.result()
    except KilledWorker:
        raise FMMTCError("The cluster's workers screening this scan died several times (out of "
                         "memory?). Nothing was saved; please try again.") from None
    finally:
        fut.release()
    cj.stage = ("save", 0, 1)
    out = store_computed(engine, computed, model, site=site, drug=drug, arm=arm, force=force,
                         started=time.perf_counter())
    cj.stage = ("save", 1, 1)
    return ScreeningResult(out.summary, None)
