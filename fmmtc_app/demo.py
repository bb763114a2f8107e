"""The simulated demo cohort, for trying the Cohort review and Attribution explorer pages."""

from __future__ import annotations

from collections.abc import Callable

from fmmtc_app import worker
from fmmtc_app.session import active_model_dir, database_url, operator, setting
from fmmtc_app.uploads import staging_folder

__all__ = ["DEMO_PREFIX", "demo_cohort_size", "load_demo_cohort"]

#: Pseudonym prefix of the simulated demo participants.
DEMO_PREFIX = "SIM-"


def demo_cohort_size() -> int:
    """Participants of the demo cohort.

    Returns
    -------
    int
        ``FMMTC_DEMO_COHORT_SIZE`` (at least 4); 24 when unset or not an integer.
    """
    try:
        return max(4, int(setting("FMMTC_DEMO_COHORT_SIZE") or 24))
    except ValueError:
        return 24


def load_demo_cohort(n: int | None = None, seed: int = 2026,
                     progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Simulate a labelled demo cohort and screen it into the database, outcomes included.

    Runs in the worker process with the active model and database: region tables of 240
    volumes are simulated in a staging folder (removed afterwards), screened, and their
    outcomes entered; every participant is flagged as simulated (pseudonyms
    :data:`DEMO_PREFIX` + the cohort's number, e.g. ``SIM-001``). Scans already stored with
    this model (same content) are skipped.

    Parameters
    ----------
    n : int or None, default=None
        Participants; None (or 0): :func:`demo_cohort_size`.
    seed : int, default=2026
        Seed of the simulation.
    progress : callable(done, total, what) or None, default=None
        Called in this thread as the job advances (simulation, then screening), ``what`` a
        short sentence to show.

    Returns
    -------
    dict
        ``screened`` (count), ``failed`` (participant -> reason), ``outcomes`` (count).

    Raises
    ------
    fmmtc_app.worker.WorkerCrashedError
        The worker process died during the job.
    FMMTCError
        The job failed (e.g. the model or the database cannot be used); an internal error
        comes back as another exception.
    """
    n = n or demo_cohort_size()
    # Only the derived series are kept (in the database): the simulated files go with the folder.
    with staging_folder("demo-cohort-") as folder:
        job = {"url": database_url(), "folder": str(folder), "n": n, "seed": seed,
               "operator": operator(), "prefix": DEMO_PREFIX}
        return worker.run(active_model_dir(), "demo_cohort", job, progress=progress)
