"""Cohort-scale screening on a Dask distributed cluster (``fmmtc screen-batch --cluster``).

The engine is Dask's, not ours: a scheduler hands tasks to workers, re-runs a task whose worker
died, and returns each result to the client. What this module adds is the screening's split
into a part any worker can do and a part only one process does:

- **workers** compute: they hash a scan's files (:func:`~fmmtc_core.screening.inputs_digest`)
  and run :func:`~fmmtc_core.screening.analyse` on it, each loading the model once per worker
  process (:func:`_worker_model`, a cache keyed by the model folder and its weights' SHA-256);
  they get *paths*, never the scan's bytes, and read the scan where it lies (a filesystem path
  that is the same on every worker: a shared filesystem);
- **the client** (the process running ``fmmtc screen-batch``) is the one writer: it checks each
  hash against the database (stored: skipped; image of another participant: refused), submits
  the screening of what is new, and stores each :class:`~fmmtc_core.screening.ComputedScreening`
  that comes back in its own transaction
  (:func:`~fmmtc_core.screening.store_computed`). Workers never open the database, so its URL
  and password stay with the client.

A killed worker loses at most the scans it was computing, which the scheduler gives to another
worker (a scan whose worker dies a fourth time is reported as failed: it is probably what kills
them). A killed client loses nothing that was stored, and a rerun skips it.

The database: a remote scheduler (``tcp://HOST:PORT``) means workers and, usually, several
teams' clients on several hosts, so a cohort database shared between them must be a server:
SQLite is refused there (:func:`check_database`). ``local:N`` starts the workers on this machine
as child processes of the client, which stays the only writer: SQLite is allowed, as for
``--workers N``.

Dask is imported only here, and only when a cluster is asked for.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmmtc_core._errors import InvalidInputError, ModelFileError
from fmmtc_core.config import usable_cores

if TYPE_CHECKING:
    from distributed import Client
    from sqlalchemy import Engine

    from fmmtc_core.models.deployed import ScreeningModel

__all__ = ["ClusterSpec", "parse_cluster", "check_database", "open_client", "screen_jobs"]

#: Times a scan's task may lose its worker and be retried; one more loss reports the scan as
#: failed (Dask's ``distributed.scheduler.allowed-failures`` for this batch's tasks).
ALLOWED_FAILURES = 3

#: Seconds to wait for a remote scheduler to answer.
CONNECT_TIMEOUT_S = 20.0

_LOCAL = re.compile(r"local:(\d+)")
_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


@dataclass(frozen=True)
class ClusterSpec:
    """Where to screen: a LocalCluster started here, or a running scheduler.

    Parameters
    ----------
    address : str or None
        ``tcp://HOST:PORT`` of a running Dask scheduler; None for a local cluster.
    n_workers : int or None
        Worker processes of the local cluster; None for a remote scheduler.
    """

    address: str | None
    n_workers: int | None

    @property
    def remote(self) -> bool:
        """True for a running scheduler (workers possibly on other hosts)."""
        return self.address is not None

    def __str__(self) -> str:
        return self.address if self.address is not None else f"local:{self.n_workers}"


def parse_cluster(text: str) -> ClusterSpec:
    """Read a ``--cluster`` value: ``local:N`` or ``tcp://HOST:PORT``.

    Parameters
    ----------
    text : str
        ``local:N`` (start N worker processes on this machine, N >= 1) or
        ``tcp://HOST:PORT`` (a running ``dask scheduler``).

    Returns
    -------
    ClusterSpec
        The parsed value.

    Raises
    ------
    InvalidInputError
        Anything else, a port outside 1..65535 or N below 1.
    """
    text = str(text).strip()
    if m := _LOCAL.fullmatch(text):
        n = int(m.group(1))
        if n < 1:
            raise InvalidInputError(f"--cluster local:N needs at least 1 worker, got {text!r}.")
        return ClusterSpec(None, n)
    if m := _TCP.fullmatch(text):
        if not 1 <= int(m.group(2)) <= 65535:
            raise InvalidInputError(f"--cluster {text!r}: the port must lie in 1..65535.")
        return ClusterSpec(text, None)
    raise InvalidInputError(
        f"Invalid value for --cluster: {text!r}. Expected local:N (N worker processes on this "
        "machine) or tcp://HOST:PORT (a running Dask scheduler).")


def check_database(spec: ClusterSpec, url: str) -> None:
    """Refuse a database the cluster's results cannot be shared through.

    Parameters
    ----------
    spec : ClusterSpec
        The cluster.
    url : str
        The database URL, as rendered by SQLAlchemy.

    Raises
    ------
    InvalidInputError
        A SQLite database with a remote scheduler.
    """
    if spec.remote and url.split(":", 1)[0].split("+", 1)[0] == "sqlite":
        raise InvalidInputError(
            f"--cluster {spec} needs a PostgreSQL database (--db postgresql+psycopg://...), "
            "not SQLite: a remote cluster is shared by hosts and teams, and one SQLite file on "
            "this machine is neither reachable by them nor safe on a network filesystem. "
            "Use --cluster local:N to screen into SQLite on this machine. Nothing was screened.")


@contextmanager
def open_client(spec: ClusterSpec, *, threads: int | None = None) -> Iterator[Client]:
    """A Dask client on the cluster; a local cluster is started here and closed on exit.

    Parameters
    ----------
    spec : ClusterSpec
        The cluster.
    threads : int or None, default=None
        Torch threads per local worker; None: the usable cores // N. (Remote workers keep their
        own setting: start them with ``--nthreads 1`` and ``OMP_NUM_THREADS``.)

    Yields
    ------
    distributed.Client
        Connected; closed (with the local cluster) when the block exits, on error too.

    Raises
    ------
    InvalidInputError
        The remote scheduler cannot be reached within :data:`CONNECT_TIMEOUT_S`.
    """
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        if spec.remote:
            try:
                client = Client(spec.address, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                raise InvalidInputError(
                    f"Cannot reach the Dask scheduler at {spec.address} ({exc}). Check it runs "
                    "(`dask scheduler`) and the address; nothing was screened.") from None
            try:
                yield client
            finally:
                client.close()
            return
        import logging
        import tempfile

        assert spec.n_workers is not None
        # The scheduler's and workers' scratch folder (Dask's lock files, spilled data) is ours
        # to remove, not a dask-scratch-space left in the system's temporary folder.
        with tempfile.TemporaryDirectory(prefix="fmmtc-dask-") as scratch, \
                dask.config.set({"temporary-directory": scratch}):
            cluster = LocalCluster(n_workers=spec.n_workers, threads_per_worker=1,
                                   processes=True, host="127.0.0.1", dashboard_address=None,
                                   silence_logs=logging.CRITICAL, local_directory=scratch)
            try:
                client = Client(cluster)
                try:
                    yield client
                finally:
                    client.close()
            finally:
                cluster.close()


# --------------------------------------------------------------------------------------------
# Worker side: plain functions (pickled by reference), the model cached per worker process
# --------------------------------------------------------------------------------------------
_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def _worker_model(model_dir: str, weights_sha256: str, threads: int | None) -> ScreeningModel:
    """The model, loaded once per worker process (later tasks reuse it).

    Refuses a folder whose weights differ from the client's (another copy of the model on that
    worker's host): the database would otherwise credit one model with another's results.
    """
    with _MODELS_LOCK:
        model = _MODELS.get(model_dir)
        if model is None:
            import torch

            from fmmtc_core.models.ensemble import load_model

            if threads:
                torch.set_num_threads(threads)
            model = _MODELS[model_dir] = load_model(model_dir)
    if model.weights_sha256 != weights_sha256:
        raise ModelFileError(
            f"The model folder {model_dir} on a worker holds other weights (SHA-256 "
            f"{model.weights_sha256[:12]}...) than on the client ({weights_sha256[:12]}...); "
            "every worker must see the same model folder.")
    return model


def _digest_task(job: dict) -> tuple[str, dict, Any]:
    """Hash one scan's files where they lie: ``("digest", job, (scan_sha, key))`` or
    ``("failed", job, reason)``."""
    from fmmtc_core.screening import inputs_digest

    try:
        return "digest", job, inputs_digest(job["scan"], None, job["confounds"])
    except InvalidInputError as exc:
        return "failed", job, str(exc)


def _screen_task(job: dict, model_dir: str, weights_sha256: str,
                 threads: int | None) -> tuple[str, dict, Any]:
    """Analyse one scan: ``("computed", job, ComputedScreening)`` or ``("failed", job,
    reason)``. The inputs are hashed again here, so what is stored is what was analysed."""
    from fmmtc_core.screening import analyse, computed_screening, inputs_digest

    model = _worker_model(model_dir, weights_sha256, threads)
    try:
        scan_sha, key = inputs_digest(job["scan"], None, job["confounds"])
        result = analyse(job["scan"], model, confounds=job["confounds"],
                         explain_kwargs=job["explain_kwargs"])
        return "computed", job, computed_screening(
            result, model, scan_sha256=scan_sha, inputs_sha256=key,
            participant=job["participant"], operator=job["operator"],
            simulated=job["simulated"])
    except InvalidInputError as exc:
        if isinstance(exc, ModelFileError):
            raise
        return "failed", job, str(exc)


# --------------------------------------------------------------------------------------------
# Client side: the one writer
# --------------------------------------------------------------------------------------------
def screen_jobs(
    jobs: list[dict],
    *,
    spec: ClusterSpec,
    model_dir: str | os.PathLike,
    model: ScreeningModel,
    engine: Engine,
    finished: Callable[[str, str | None, bool], None],
    threads: int | None = None,
) -> None:
    """Screen ``jobs`` on the cluster, storing each result here as it arrives.

    Parameters
    ----------
    jobs : list of dict
        One per scan: ``scan``, ``participant``, ``confounds``, ``site``, ``drug``,
        ``simulated``, ``operator``, ``explain_kwargs`` (paths as strings, as every worker
        sees them).
    spec : ClusterSpec
        The cluster.
    model_dir : path
        The model folder, at the same path on every worker.
    model : ScreeningModel
        The same model, loaded here (its name, card and weights' hash are stored).
    engine : sqlalchemy.Engine
        The cohort database; only this process writes to it.
    finished : callable(participant, reason or None, skipped)
        Called once per scan: stored (None, False), already stored (None, True) or failed
        (the reason, False).
    threads : int or None, default=None
        Torch threads per local worker (see :func:`open_client`).

    Raises
    ------
    InvalidInputError
        The remote scheduler cannot be reached.
    ModelFileError
        A worker holds other weights under ``model_dir``, or the model gave a non-finite
        output; what was stored before stays.
    StorageError
        The database cannot be read or written; what was stored before stays.
    """
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    from fmmtc_core.screening import _stored_outcome, store_computed
    from fmmtc_core.store.db import session_scope

    model_dir = str(Path(model_dir).resolve())
    if spec.n_workers is not None and threads is None:
        threads = max(1, usable_cores() // spec.n_workers)
    with open_client(spec, threads=threads) as client:
        pending = as_completed()
        owner: dict[Any, dict] = {}  # task key -> its job, to name a scan whose workers died

        def submit(fn, job, *args):
            fut = client.submit(fn, job, *args, pure=False)
            owner[fut.key] = job
            pending.add(fut)

        for job in jobs:
            submit(_digest_task, job)
        try:
            for fut in pending:
                try:
                    kind, job, payload = fut.result()
                except KilledWorker:
                    kind, job, payload = "failed", owner[fut.key], (
                        f"the worker screening it died {ALLOWED_FAILURES + 1} times (out of "
                        "memory?); it was not stored")
                del owner[fut.key]
                fut.release()
                pid = job["participant"]
                if kind == "failed":
                    finished(pid, payload, False)
                elif kind == "digest":
                    scan_sha, key = payload
                    try:  # the cheap answer first: stored (skip) or another's image (refuse)
                        with session_scope(engine) as s:
                            stored = _stored_outcome(s, scan_sha, key, model, pid, False)
                    except InvalidInputError as exc:
                        finished(pid, str(exc), False)
                        continue
                    if stored is not None:
                        finished(pid, None, True)
                        continue
                    submit(_screen_task, job, model_dir, model.weights_sha256, threads)
                else:
                    try:
                        out = store_computed(engine, payload, model, site=job["site"],
                                             drug=job["drug"])
                    except InvalidInputError as exc:
                        finished(pid, str(exc), False)
                        continue
                    finished(pid, None, out.reused)
        finally:
            pending.clear()
