"""The simulated demo cohort, for trying the Cohort review and Attribution explorer pages."""

from __future__ import annotations

from fmmtc_app import worker
from fmmtc_app.session import active_model_dir, database_url, operator, setting
from fmmtc_app.uploads import staging_folder

__all__ = ["DEMO_PREFIX", "demo_cohort_size", "load_demo_cohort"]

#: Pseudonym prefix of the simulated demo participants.
DEMO_PREFIX = "SIM-"


def demo_cohort_size() -> int:
    """Participants of the demo cohort (``FMMTC_DEMO_COHORT_SIZE``, default 24, at least 4)."""
    try:
        return max(4, int(setting("FMMTC_DEMO_COHORT_SIZE") or 24))
    except ValueError:
        return 24


def load_demo_cohort(n: int | None = None, seed: int = 2026, progress=None) -> dict:
    """Simulate a labelled demo cohort (region tables) and screen it into the database in the
    worker process, with its outcomes, every participant flagged as simulated (pseudonyms
    ``SIM-001`` ...). ``progress(done, total, what)``.

    Returns
    -------
    dict
        ``screened`` (count), ``failed`` (participant -> reason), ``outcomes`` (count).
    """
    n = n or demo_cohort_size()
    # Only the derived series are kept (in the database): the simulated files go with the folder.
    with staging_folder("demo-cohort-") as folder:
        job = {"url": database_url(), "folder": str(folder), "n": n, "seed": seed,
               "operator": operator(), "prefix": DEMO_PREFIX}
        return worker.run(active_model_dir(), "demo_cohort", job, progress=progress)
