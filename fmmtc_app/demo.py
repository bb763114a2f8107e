"""The simulated demo cohort on the pages (layout only): start it, follow it on every page,
stop, resume, finish or reset it. The work itself is :mod:`.demo_job`'s, which outlives the
page, the browser tab and the server."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import streamlit as st

from fmmtc_app import demo_job
from fmmtc_app.demo_job import DEMO_PREFIX
from fmmtc_app.session import (active_model_dir, database_url, operator, plain_error, rerun,
                                setting)

__all__ = ["DEMO_PREFIX", "demo_cohort_size", "sidebar_status", "job_panel", "start_button",
           "reset_button"]

#: Seconds between two looks at the job while it runs (the sidebar and the Cohort page).
POLL_S = 2.0

#: How long the sidebar still says a finished job is done (s).
DONE_SHOWN_S = 600.0


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


def _job() -> demo_job.DemoJob | None:
    """The job's record, its thread restarted if the record says it runs (server restart)."""
    try:
        return demo_job.resume(database_url())
    except Exception:  # noqa: BLE001 - the pages show the database's own error
        return None


def _recent(job: demo_job.DemoJob) -> bool:
    try:
        when = dt.datetime.fromisoformat(job.updated_at)
    except ValueError:
        return False
    return (dt.datetime.now(dt.timezone.utc) - when).total_seconds() < DONE_SHOWN_S


def _bar(job: demo_job.DemoJob) -> None:
    st.progress(job.fraction, text=job.summary())
    if job.message:
        st.caption(job.message)


def sidebar_status() -> None:
    """The demo job's progress in the sidebar of every page (nothing when there is no job).

    While the job runs, the sidebar looks again every :data:`POLL_S` seconds and reruns the
    page once the job has moved on a participant or ended, so what the page shows (the
    cohort table, the outcomes) follows the job.
    """
    job = _job()
    if job is None or (job.status == "done" and not _recent(job)):
        return
    seen = (job.status, job.processed, job.stage)
    timer_run = []  # empty while the page itself draws the fragment (it has the fresh record)

    def draw() -> None:
        current = demo_job.read_job()
        moved = current is None or (current.status, current.processed, current.stage) != seen
        if moved and timer_run:
            rerun()  # the whole page: its data changed
        timer_run.append(True)
        if current is None:
            return
        _bar(current)
        if current.status in ("stopped", "failed"):
            st.page_link("views/cohort.py", label="Resume, finish or reset on Cohort review",
                         icon=":material/groups:")

    with st.sidebar:
        st.fragment(draw, run_every=POLL_S if job.active else None)()


def _action(key: str, what: str, act: Callable[[], object]) -> Callable[[], None]:
    """A button's ``on_click``: the action runs when Streamlit takes the click, before the
    page runs again, and its error is kept for the page to show beside the button.

    In the button's body (``if st.button(...): act()``) the action would be lost when the user
    clicks a page link right after the button: with ``runner.fastReruns`` (Streamlit's
    default) the link stops the run that carries the click before the page reaches the
    button (seen in the browser test on a loaded machine: the demo cohort never started).
    """
    def callback() -> None:
        try:
            act()
        except Exception as exc:  # noqa: BLE001 - shown as a plain sentence by _show_error
            st.session_state[f"{key}_error"] = (exc, what)

    return callback


def _show_error(key: str) -> None:
    pending = st.session_state.pop(f"{key}_error", None)
    if pending is not None:
        plain_error(*pending)


def start_button(label: str, primary: bool) -> None:
    """A button that starts (or resumes) loading the demo cohort in the background.

    Parameters
    ----------
    label : str
        The button's text.
    primary : bool
        A primary (filled) button, else a secondary one.
    """
    def start() -> None:
        demo_job.start(database_url(), active_model_dir(), operator(), demo_cohort_size())

    st.button(label, key="load_demo", type="primary" if primary else "secondary",
              on_click=_action("load_demo", "The demo cohort could not be started", start))
    _show_error("load_demo")


def reset_button(label: str = "Remove the simulated demo cohort") -> None:
    """A button that removes the demo job and every simulated ``SIM-`` participant.

    Parameters
    ----------
    label : str, default="Remove the simulated demo cohort"
        The button's text.
    """
    def reset() -> None:
        demo_job.reset(database_url(), operator())
        st.session_state["cohort_version"] = st.session_state.get("cohort_version", 0) + 1

    st.button(label, key="demo_reset", icon=":material/delete:",
              on_click=_action("demo_reset", "The demo cohort was not removed", reset))
    _show_error("demo_reset")


def job_panel() -> demo_job.DemoJob | None:
    """The demo job on the Cohort page: its progress and what the user can do with it.

    Running: stop it (after the participant in progress). Stopped or failed: resume it,
    finish it with the participants loaded so far, or reset it (remove the simulated
    participants). Done: a success line for a while (the page offers to remove the cohort).

    Returns
    -------
    DemoJob or None
        The job's record, if any.
    """
    job = _job()
    if job is None:
        return job
    if job.status == "done":
        if _recent(job):
            st.success(f"Loaded {len(job.done)} simulated participants with their outcomes"
                       + (f" ({len(job.failed)} could not be screened)." if job.failed
                          else "."), icon=":material/check:")
        return job
    _bar(job)
    if job.status == "running":
        st.caption("It runs on the server: leave this page or close the tab whenever you like; "
                   "each participant appears here, with the outcome, as it is screened.")
        st.button("Stop after this participant", key="demo_stop", icon=":material/pause:",
                  on_click=_action("demo_stop", "The demo cohort could not be stopped",
                                   demo_job.stop))
    elif job.status in ("stopped", "failed"):
        c = st.columns(3)
        c[0].button(f"Resume ({job.n - job.processed} to go)", key="demo_resume",
                    type="primary", icon=":material/play_arrow:",
                    on_click=_action("demo_resume", "The demo cohort could not be resumed",
                                     lambda: demo_job.start(database_url(), job.model_dir,
                                                            job.operator, job.n, job.seed)))
        c[1].button(f"Finish with the {len(job.done)} loaded", key="demo_finish",
                    icon=":material/check:",
                    on_click=_action("demo_finish", "The demo cohort could not be finished",
                                     demo_job.finish))
        with c[2]:
            reset_button("Reset: remove the demo cohort")
    for key in ("demo_stop", "demo_resume", "demo_finish"):
        _show_error(key)
    return job
