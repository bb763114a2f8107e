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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from fmmtc_core._errors import FMMTCError

__all__ = [
    "engine",
    "model",
    "installed_models",
    "active_model_dir",
    "require_access",
    "access_granted",
    "sign_in_page",
    "staged_uploads",
    "label_problem",
    "upload_root",
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


#: Sign-in throttling: after FREE_ATTEMPTS wrong passwords (per browser session and per client
#: address, within WINDOW_S), each further attempt waits 2, 4, 8 ... (at most MAX_DELAY_S)
#: seconds after the last one; LOCK_AFTER wrong passwords lock that client out for LOCK_S.
FREE_ATTEMPTS, MAX_DELAY_S, LOCK_AFTER, LOCK_S, WINDOW_S = 3, 60.0, 10, 900.0, 900.0


class _Throttle:
    """Failed sign-ins per key (client address, browser session), shared by all sessions of the
    server process (``st.cache_resource``), thread-safe."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < WINDOW_S]
        self._failures[key] = times
        return times

    def wait_s(self, keys, now: float) -> float:
        """Seconds before the next attempt is allowed (0 when allowed now)."""
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                n = len(times)
                if n >= LOCK_AFTER:
                    wait = max(wait, times[-1] + LOCK_S - now)
                elif n >= FREE_ATTEMPTS:
                    delay = min(2.0 ** (n - FREE_ATTEMPTS + 1), MAX_DELAY_S)
                    wait = max(wait, times[-1] + delay - now)
        return max(0.0, wait)

    def fail(self, keys, now: float) -> None:
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)

    def clear(self, keys) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


@st.cache_resource(show_spinner=False)
def _throttle() -> _Throttle:
    return _Throttle()


def client_address() -> str:
    """The browser's address as the server sees it (``"unknown"`` when Streamlit cannot tell,
    e.g. in tests or behind some proxies)."""
    try:
        address = st.context.ip_address
    except Exception:  # noqa: BLE001 - older Streamlit or no request context
        return "unknown"
    return address if isinstance(address, str) and address else "unknown"


def _audit_sign_in(action: str, name: str, client: str) -> None:
    """Record a sign-in (or a failed one) in the audit log; the log must never stop a sign-in."""
    from fmmtc_core.store import session_scope
    from fmmtc_core.store.repository import audit

    try:
        with session_scope(engine(), write=True) as s:
            audit(s, name if action == "sign-in" else NOT_SIGNED_IN, action, "session", None,
                  {"name": name[:64], "client": client})
    except Exception as exc:  # noqa: BLE001 - a database problem shows on the pages themselves
        import logging

        logging.getLogger(__name__).warning("could not audit a %s: %s", action, exc)


#: Who the audit log names for actions before anyone has signed in.
NOT_SIGNED_IN = "not signed in"


def access_granted() -> bool:
    """True when no password is configured or this browser session has signed in."""
    return not _setting("FMMTC_PASSWORD") or bool(st.session_state.get("authenticated"))


def sign_in_page() -> None:
    """The only page a visitor sees until signed in (see ``app.py``): name + password, with
    throttling of wrong passwords and every attempt in the audit log."""
    import time

    from fmmtc_core.store.repository import validate_label

    password = _setting("FMMTC_PASSWORD") or ""
    st.title("FMM-TC Screen")
    st.write("This dashboard is protected. Enter your name (for the audit log) and the team "
             "password.")
    with st.form("login"):
        name = st.text_input("Your name or initials")
        given = st.text_input("Password", type="password")
        ok = st.form_submit_button("Sign in", type="primary")
    if not ok:
        return
    client = client_address()
    if "session_key" not in st.session_state:
        import secrets

        st.session_state["session_key"] = secrets.token_hex(8)
    keys = (f"client:{client}", f"session:{st.session_state['session_key']}")
    throttle = _throttle()
    now = time.monotonic()
    wait = throttle.wait_s(keys, now)
    if wait > 0:
        st.error(f"Too many wrong passwords. Try again in {int(wait) + 1} seconds.")
        return
    try:
        name = validate_label("name", name) or ""
    except FMMTCError as exc:
        st.error(str(exc))
        return
    if not name:
        st.error("Enter your name or initials: every screening records who ran it.")
    elif hmac.compare_digest(given.encode(), password.encode()):
        throttle.clear(keys)
        _audit_sign_in("sign-in", name, client)
        st.session_state["authenticated"] = True
        st.session_state["operator"] = name
        st.rerun()
    else:
        throttle.fail(keys, now)
        _audit_sign_in("sign-in failed", name, client)
        st.error("That password is not correct. Ask your study coordinator for it.")


def require_access() -> None:
    """Stop the page unless :func:`access_granted` (pages keep this as a second line: the
    frame in ``app.py`` already shows only the sign-in page until then)."""
    if not access_granted():
        st.stop()


def operator() -> str:
    """Who is using the dashboard (audit log): the signed-in name, else ``FMMTC_OPERATOR``,
    else "not signed in" (never the server's OS user, which says nothing about the person)."""
    return st.session_state.get("operator") or _setting("FMMTC_OPERATOR") or NOT_SIGNED_IN


#: Staging folders older than this are left over from a killed server and are removed.
STALE_UPLOAD_S = 3600


def upload_root() -> Path:
    """Where uploads are staged while they are checked: ``<data folder>/uploads``, readable by
    the server's user only. Leftovers of a killed server are removed here."""
    import shutil
    import time

    from fmmtc_core.store import data_dir

    root = Path(_setting("FMMTC_DATA_DIR") or data_dir()) / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    now = time.time()
    for old in root.glob("upload-*"):
        try:
            if now - old.stat().st_mtime > STALE_UPLOAD_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return root


@contextmanager
def staged_uploads(*files) -> Iterator[list[Path | None]]:
    """Write uploaded files (Streamlit ``UploadedFile`` or None) into a private folder (mode
    0700, see :func:`upload_root`) and delete it on leaving the block, whatever happens: the raw
    scan is on disk only while it is being checked or screened."""
    import shutil

    from fmmtc_core.io import write_upload

    folder = Path(tempfile.mkdtemp(prefix="upload-", dir=upload_root()))
    try:
        yield [None if f is None else write_upload(f, f.name, folder) for f in files]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
    upload_root()  # the data folder exists
    folder = Path(tempfile.mkdtemp(prefix="demo-cohort-", dir=upload_root()))
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
