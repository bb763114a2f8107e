"""What every page shares: settings, the cached database engine and model, who is signed in,
plain-sentence errors, and screenings run in the server's worker process (:mod:`.worker`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from fmmtc_app import dispatch as _dispatch
from fmmtc_core._errors import FMMTCError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from fmmtc_core.models.deployed import ScreeningModel
    from fmmtc_core.screening import ScreeningResult

__all__ = [
    "setting",
    "engine",
    "database_url",
    "model",
    "installed_models",
    "active_model_dir",
    "operator",
    "NOT_SIGNED_IN",
    "label_problem",
    "plain_error",
    "run_screening",
    "cluster_problem",
    "cluster_jobs",
    "rerun",
]

#: Who the audit log names for actions before anyone has signed in.
NOT_SIGNED_IN = "not signed in"


def setting(key: str) -> str | None:
    """A setting from the environment, else from ``.streamlit/secrets.toml``, else None.

    Parameters
    ----------
    key : str
        The variable's name, e.g. ``"FMMTC_PASSWORD"`` (the same key in ``secrets.toml``).

    Returns
    -------
    str or None
        The environment's value when set and not empty, else the secrets file's value, else
        None (also when there is no secrets file).
    """
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


def engine() -> Engine:
    """The cohort database engine (created and migrated once per server process and URL).

    Returns
    -------
    sqlalchemy.Engine
        For the ``FMMTC_DATABASE_URL`` setting (environment or secrets), else
        :func:`fmmtc_core.store.default_url`; shared by every session (``st.cache_resource``).

    Raises
    ------
    InvalidInputError
        The URL is malformed or names an unknown driver.
    StorageError
        The database cannot be opened or upgraded.
    """
    from fmmtc_core.store import default_url

    return _engine(setting("FMMTC_DATABASE_URL") or default_url())


def database_url() -> str:
    """The URL of :func:`engine`, password included (handed to the worker process only).

    Returns
    -------
    str
        The URL as a string, never to be shown on a page.
    """
    return engine().url.render_as_string(hide_password=False)


@st.cache_resource(show_spinner="Loading the model...")
def _model(model_dir: str):
    from fmmtc_core.models.ensemble import load_model

    return load_model(model_dir)


def installed_models() -> dict[str, Path]:
    """Model folders to choose from: the default one and every folder in FMMTC_MODELS_DIR.

    Returns
    -------
    dict of str to Path
        Folder name -> folder, the default model
        (:func:`fmmtc_core.models.ensemble.default_model_dir`) first, then every sub-folder of
        ``FMMTC_MODELS_DIR`` holding a ``model_card.json``, by name (a name already taken is
        skipped).
    """
    from fmmtc_core.models.ensemble import default_model_dir

    found = {default_model_dir().name: default_model_dir()}
    extra = setting("FMMTC_MODELS_DIR")
    if extra and Path(extra).is_dir():
        for card in sorted(Path(extra).glob("*/model_card.json")):
            found.setdefault(card.parent.name, card.parent)
    return found


def active_model_dir() -> Path:
    """The folder of the model this browser session uses (chosen on the Model page).

    Returns
    -------
    Path
        One of :func:`installed_models`; the first one when the session has chosen none (or
        one no longer installed), which is then remembered.
    """
    models = installed_models()
    name = st.session_state.get("model_name")
    if name not in models:
        name = next(iter(models))
        st.session_state["model_name"] = name
    return models[name]


def model() -> ScreeningModel:
    """The active model (cached per folder), for what the pages show about it.

    Returns
    -------
    ScreeningModel
        :func:`fmmtc_core.models.ensemble.load_model` of :func:`active_model_dir` (FMM-TC or
        a classic baseline), loaded in
        the server process (screenings run in the worker's own copy).

    Raises
    ------
    ModelFileError
        The model folder cannot be used.
    """
    return _model(str(active_model_dir()))


def operator() -> str:
    """Who is using the dashboard (audit log).

    Returns
    -------
    str
        The signed-in name, else the ``FMMTC_OPERATOR`` setting, else :data:`NOT_SIGNED_IN`
        (never the server's OS user, which says nothing about the person).
    """
    return st.session_state.get("operator") or setting("FMMTC_OPERATOR") or NOT_SIGNED_IN


def label_problem(**labels: str | None) -> str | None:
    """The first invalid label (site, drug, arm ...) as a sentence, or None when all are valid.

    Parameters
    ----------
    **labels : str or None
        Label name -> value as entered, e.g. ``site="Leeds"``; checked in order by
        :func:`fmmtc_core.store.repository.validate_label`.

    Returns
    -------
    str or None
        The error message of the first invalid label; None when all are valid.
    """
    from fmmtc_core.store.repository import validate_label

    for name, value in labels.items():
        try:
            validate_label(name, value)
        except FMMTCError as exc:
            return str(exc)
    return None


def _waiting_page(ctx) -> str | None:
    """The page of the run the user asked for while this one runs (a click on a page link),
    or None when no other run waits. Reads Streamlit's request queue; None when its layout
    is not the one known here (then :func:`rerun` behaves as ``st.rerun``)."""
    requests = getattr(ctx, "script_requests", None)
    state = getattr(requests, "_state", None)
    data = getattr(requests, "_rerun_data", None)
    if state is None or data is None or getattr(state, "name", None) != "RERUN":
        return None
    return getattr(data, "page_script_hash", None) or None


def rerun() -> None:
    """Run the page again because an action changed what it shows, unless the user has
    already asked to go to another page.

    Streamlit folds the runs waiting for a session into one, which opens the page of the
    *newer* request, so ``st.rerun()`` asked for just after a click on a link to another page
    would take the user back. With ``runner.fastReruns`` (the default) such a click stops this
    run instead and the question does not arise; without it (or for a run a fragment's timer
    queued) the click waits in this run's queue. When a run for another page waits, this
    returns and lets it go ahead at the page's next element; a waiting run for this same page
    (a fragment's timer) is folded into the full rerun as before.
    """
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    waiting = _waiting_page(ctx)
    if waiting is not None and waiting != getattr(ctx, "page_script_hash", waiting):
        return
    st.rerun()


def plain_error(exc: BaseException, what: str = "This scan cannot be used") -> None:
    """Show an error as one plain sentence with what to do; never a traceback.

    Parameters
    ----------
    exc : BaseException
        The error. An :class:`~fmmtc_core._errors.FMMTCError` is shown with its message;
        anything else is an internal error, shown by its type only.
    what : str, default="This scan cannot be used"
        The sentence's start for an ``FMMTCError``; left out when the message already starts
        with its subject (``"This scan was already screened for ..."``).
    """
    if isinstance(exc, _dispatch.ClusterSettingError):  # the server's setting, not the scan
        st.error(str(exc))
    elif isinstance(exc, FMMTCError):
        text = str(exc)
        subject = " ".join(what.split()[:2])
        st.error(text if subject and text.startswith(subject) else f"{what}: {text}")
    else:  # an internal bug: say so plainly, keep the details out of the page
        st.error(f"Something went wrong on our side ({type(exc).__name__}). Nothing was saved. "
                 "Please try again; if it happens again, tell the study's data manager.")


def run_screening(source: str | os.PathLike, participant: str, *,
                  progress: Callable[[str, int, int, dict], None] | None = None,
                  **kwargs: Any) -> ScreeningResult:
    """:func:`fmmtc_core.screening.screen` in the server's worker process (or on the cluster
    that ``FMMTC_CLUSTER`` names: :mod:`fmmtc_app.dispatch`), with progress.

    Same arguments and result as ``screen`` (model and database are the active ones); errors
    (bad input, failed QC, a worker that died) are raised here as they would be in-process.

    Parameters
    ----------
    source : str or path
        The scan, on a disk the worker can read (e.g. a staged upload).
    participant : str
        Study pseudonym.
    progress : callable(stage, done, total, info) or None, default=None
        Called in this thread with the screening's stages; ``info`` is always an empty dict
        (the worker does not pass it on).
    **kwargs
        Further keyword arguments of :func:`~fmmtc_core.screening.screen` (``sidecar``,
        ``confounds``, ``site``, ``drug``, ``arm``, ``simulated``, ``force``, ``operator``,
        ...); they must be picklable.

    Returns
    -------
    ScreeningResult
        As :func:`~fmmtc_core.screening.screen` returns it.

    Raises
    ------
    QCFailedError
        The scan failed hard QC; nothing was stored.
    InvalidInputError
        The scan, a side file or a label cannot be used.
    fmmtc_app.worker.WorkerCrashedError
        The worker process died during the job.
    fmmtc_app.dispatch.ClusterSettingError
        ``FMMTC_CLUSTER`` cannot be used; nothing was screened.
    """
    from fmmtc_app.uploads import upload_root

    job = dict(kwargs, source=str(source), participant=participant, url=database_url())
    return _dispatch.run(active_model_dir(), "screen", job, progress=progress,
                         staging=upload_root())


def cluster_problem() -> str | None:
    """Why the ``FMMTC_CLUSTER`` setting cannot be used, or None (unset, or usable).

    Cheap (no connection): the malformed value, or SQLite with a remote scheduler.

    Returns
    -------
    str or None
        The message to show on the page.
    """
    try:
        _dispatch.check(database_url())
    except FMMTCError as exc:
        return str(exc)
    return None


def cluster_jobs() -> list[str]:
    """One line per screening this server has handed to the cluster, running ones first.

    Returns
    -------
    list of str
        Empty without a cluster (or before its first job); the jobs of every user, so a page
        refreshed while its screening runs on the cluster still shows how far it is.
    """
    found = _dispatch.jobs()
    found.sort(key=lambda job: job.status != "running")
    return [job.summary() for job in found]
