"""Streamlit glue shared by the dashboard pages: cached model and database, the access gate,
plain-sentence errors, installed models, the demo cohort. Pages hold layout only.

Configuration (environment variables, or the same keys in ``.streamlit/secrets.toml``):

- ``FMMTC_DATABASE_URL`` / ``FMMTC_DATA_DIR``: where the cohort database lives (see README);
- ``FMMTC_MODEL_DIR``: the model used by default; ``FMMTC_MODELS_DIR``: a folder whose
  sub-folders are further installed models to choose from on the Model page;
- ``FMMTC_PASSWORD``: when set, every page asks for it (and for the user's name, which goes to
  the audit log with every screening and outcome).
"""

from __future__ import annotations

import hmac
import os
import tempfile
from pathlib import Path

import streamlit as st

from fmmtc_core._errors import FMMTCError

__all__ = [
    "engine",
    "model",
    "installed_models",
    "active_model_dir",
    "require_access",
    "operator",
    "plain_error",
    "load_demo_cohort",
    "run_screening",
    "demo_cohort_size",
    "DEMO_PREFIX",
]

#: Pseudonym prefix of the simulated demo participants.
DEMO_PREFIX = "SIM-"

# Screenings run in a worker process (see run_screening), not in the server: in the server's
# script thread, torch competes for the GIL with Streamlit's event-loop thread (measured here: a
# busy second thread made an explanation 15x slower, 2.0 s -> 29.8 s), and a long screening
# would also stall every other user's page.


def _setting(key: str) -> str | None:
    value = os.environ.get(key)
    if value:
        return value
    try:
        return st.secrets.get(key)  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - no secrets file is the normal case
        return None


@st.cache_resource(show_spinner="Opening the cohort database...")
def _engine(url: str | None):
    from fmmtc_core.store import open_database

    return open_database(url)


def engine():
    """The cohort database engine (created and migrated once per server process)."""
    from fmmtc_core.store import default_url

    return _engine(_setting("FMMTC_DATABASE_URL") or default_url())


@st.cache_resource(show_spinner="Loading the model...")
def _model(model_dir: str):
    from fmmtc_core.training import load_model

    return load_model(model_dir)


def installed_models() -> dict[str, Path]:
    """Model folders to choose from: the default one and every folder in FMMTC_MODELS_DIR."""
    from fmmtc_core.training import default_model_dir

    found = {default_model_dir().name: default_model_dir()}
    extra = _setting("FMMTC_MODELS_DIR")
    if extra and Path(extra).is_dir():
        for card in sorted(Path(extra).glob("*/model_card.json")):
            found.setdefault(card.parent.name, card.parent)
    return found


def active_model_dir() -> Path:
    models = installed_models()
    name = st.session_state.get("model_name")
    if name not in models:
        name = next(iter(models))
        st.session_state["model_name"] = name
    return models[name]


def model():
    """The active model (cached per folder)."""
    return _model(str(active_model_dir()))


def require_access() -> None:
    """Stop the page until the user has given the configured password (if one is set)."""
    password = _setting("FMMTC_PASSWORD")
    if not password or st.session_state.get("authenticated"):
        return
    st.title("FMM-TC Screen")
    st.write("This dashboard is protected. Enter your name (for the audit log) and the team "
             "password.")
    with st.form("login"):
        name = st.text_input("Your name or initials")
        given = st.text_input("Password", type="password")
        ok = st.form_submit_button("Sign in", type="primary")
    if ok:
        if not name.strip():
            st.error("Enter your name or initials: every screening records who ran it.")
        elif hmac.compare_digest(given.encode(), password.encode()):
            st.session_state["authenticated"] = True
            st.session_state["operator"] = name.strip()
            st.rerun()
        else:
            st.error("That password is not correct. Ask your study coordinator for it.")
    st.stop()


def operator() -> str:
    """Who is using the dashboard (audit log): the signed-in name, else the server's user."""
    from fmmtc_core.screening import default_operator

    return st.session_state.get("operator") or default_operator()


def plain_error(exc: BaseException, what: str = "This scan cannot be used") -> None:
    """Show an error as one plain sentence with what to do; never a traceback."""
    if isinstance(exc, FMMTCError):
        st.error(f"{what}: {exc}")
    else:  # an internal bug: say so plainly, keep the details out of the page
        st.error(f"Something went wrong on our side ({type(exc).__name__}). Nothing was saved. "
                 "Please try again; if it happens again, tell the study's data manager.")


def demo_cohort_size() -> int:
    """Participants of the demo cohort (``FMMTC_DEMO_COHORT_SIZE``, default 24)."""
    try:
        return max(4, int(_setting("FMMTC_DEMO_COHORT_SIZE") or 24))
    except ValueError:
        return 24


def load_demo_cohort(n: int | None = None, seed: int = 2026, progress=None) -> dict:
    """Simulate a labelled demo cohort (region tables) and screen it into the database, with
    its outcomes, every participant flagged as simulated (pseudonyms ``SIM-001`` ...)."""
    from fmmtc_core.screening import screen_batch
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    import shutil

    n = n or demo_cohort_size()
    folder = Path(tempfile.mkdtemp(prefix="fmmtc-demo-cohort-"))
    try:
        root = write_cohort(folder / "cohort", n, seed=seed, fmt="timeseries",
                            config=SimulationConfig(n_volumes=240),
                            progress=(lambda d, t: progress(d, 2 * t, "Simulating..."))
                            if progress else None)
        url = engine().url.render_as_string(hide_password=False)

        def prog(done, total, pid):
            if progress:
                progress(total + done, 2 * total, f"Screening {pid}..." if pid else "Screening...")

        rep = screen_batch(root, model_dir=active_model_dir(), url=url, operator=operator(),
                           import_outcomes=True, pseudonym_prefix=DEMO_PREFIX, progress=prog)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # only the derived series are kept, in the DB
    return {"screened": len(rep.screened), "failed": rep.failed, "outcomes": rep.outcomes}


# --------------------------------------------------------------------------------------------
# Screening in a worker process
# --------------------------------------------------------------------------------------------
_W: dict = {}


def _worker_init(model_dir: str, url: str) -> None:
    import torch

    from fmmtc_core.store import make_engine
    from fmmtc_core.training import load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    _W["model"] = load_model(model_dir)
    _W["engine"] = make_engine(url)


def _worker_screen(kwargs: dict, queue):
    from fmmtc_core.screening import screen

    def progress(stage, done, total, info):
        queue.put((stage, done, total))

    return screen(kwargs.pop("source"), kwargs.pop("participant"), _W["model"], _W["engine"],
                  progress=progress, **kwargs)


@st.cache_resource(show_spinner=False)
def _pool(model_dir: str, url: str):
    """One worker process per (model, database), started once; it loads the model once."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init,
                               initargs=(model_dir, url))
    return pool, ctx.Manager()


def run_screening(source, participant: str, *, progress=None, **kwargs):
    """:func:`fmmtc_core.screening.screen` in the dashboard's worker process, with progress.

    Same arguments and result as ``screen`` (model and database are the active ones); errors
    (bad input, failed QC) are raised here as they would be in-process.
    """
    from concurrent.futures.process import BrokenProcessPool
    from queue import Empty

    url = engine().url.render_as_string(hide_password=False)
    key = (str(active_model_dir()), url)
    pool, manager = _pool(*key)
    queue = manager.Queue()
    job = dict(kwargs, source=str(source), participant=participant)
    try:
        future = pool.submit(_worker_screen, job, queue)
        while True:
            try:
                item = queue.get(timeout=0.1)
            except Empty:
                if future.done():
                    break
                continue
            if progress:
                progress(*item, {})
        return future.result()
    except BrokenProcessPool:
        _pool.clear()  # start a fresh worker next time
        raise FMMTCError("The screening worker stopped unexpectedly (out of memory?). Nothing "
                         "was saved; please try again.") from None
