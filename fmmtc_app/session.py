"""What every page shares: settings, the cached database engine and model, who is signed in,
plain-sentence errors, and screenings run in the server's worker process (:mod:`.worker`)."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from fmmtc_app import worker as _worker
from fmmtc_core._errors import FMMTCError

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
]

#: Who the audit log names for actions before anyone has signed in.
NOT_SIGNED_IN = "not signed in"


def setting(key: str) -> str | None:
    """A setting from the environment, else from ``.streamlit/secrets.toml``, else None."""
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

    return _engine(setting("FMMTC_DATABASE_URL") or default_url())


def database_url() -> str:
    """The URL of :func:`engine`, password included (handed to the worker process only)."""
    return engine().url.render_as_string(hide_password=False)


@st.cache_resource(show_spinner="Loading the model...")
def _model(model_dir: str):
    from fmmtc_core.models.ensemble import load_model

    return load_model(model_dir)


def installed_models() -> dict[str, Path]:
    """Model folders to choose from: the default one and every folder in FMMTC_MODELS_DIR."""
    from fmmtc_core.models.ensemble import default_model_dir

    found = {default_model_dir().name: default_model_dir()}
    extra = setting("FMMTC_MODELS_DIR")
    if extra and Path(extra).is_dir():
        for card in sorted(Path(extra).glob("*/model_card.json")):
            found.setdefault(card.parent.name, card.parent)
    return found


def active_model_dir() -> Path:
    """The folder of the model this browser session uses (chosen on the Model page)."""
    models = installed_models()
    name = st.session_state.get("model_name")
    if name not in models:
        name = next(iter(models))
        st.session_state["model_name"] = name
    return models[name]


def model():
    """The active model (cached per folder), for what the pages show about it."""
    return _model(str(active_model_dir()))


def operator() -> str:
    """Who is using the dashboard (audit log): the signed-in name, else ``FMMTC_OPERATOR``,
    else "not signed in" (never the server's OS user, which says nothing about the person)."""
    return st.session_state.get("operator") or setting("FMMTC_OPERATOR") or NOT_SIGNED_IN


def label_problem(**labels: str | None) -> str | None:
    """The first invalid label (site, drug, arm ...) as a sentence, or None when all are valid
    (see :func:`fmmtc_core.store.repository.validate_label`)."""
    from fmmtc_core.store.repository import validate_label

    for name, value in labels.items():
        try:
            validate_label(name, value)
        except FMMTCError as exc:
            return str(exc)
    return None


def plain_error(exc: BaseException, what: str = "This scan cannot be used") -> None:
    """Show an error as one plain sentence with what to do; never a traceback."""
    if isinstance(exc, FMMTCError):
        st.error(f"{what}: {exc}")
    else:  # an internal bug: say so plainly, keep the details out of the page
        st.error(f"Something went wrong on our side ({type(exc).__name__}). Nothing was saved. "
                 "Please try again; if it happens again, tell the study's data manager.")


def run_screening(source, participant: str, *, progress=None, **kwargs):
    """:func:`fmmtc_core.screening.screen` in the server's worker process, with progress.

    Same arguments and result as ``screen`` (model and database are the active ones); errors
    (bad input, failed QC, a worker that died) are raised here as they would be in-process.
    """
    job = dict(kwargs, source=str(source), participant=participant, url=database_url())
    return _worker.run(active_model_dir(), "screen", job, progress=progress)
