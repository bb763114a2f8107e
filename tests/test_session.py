"""The dashboard's shared page helpers (fmmtc_app.session) that need no running app."""

from __future__ import annotations

import pytest

from fmmtc_app import session
from fmmtc_core._errors import InvalidInputError


@pytest.fixture
def shown(monkeypatch):
    errors: list[str] = []
    monkeypatch.setattr(session.st, "error", errors.append)
    return errors


def test_plain_error_does_not_repeat_the_subject(shown):
    # "This scan cannot be used: This scan was already screened ..." read twice.
    session.plain_error(InvalidInputError("This scan was already screened for participant "
                                          "'PAIN-1'; a scan belongs to one participant."))
    assert shown == ["This scan was already screened for participant 'PAIN-1'; a scan belongs "
                     "to one participant."]


def test_plain_error_prefixes_other_messages(shown):
    session.plain_error(InvalidInputError("x.nii.gz has 12 volumes; at least 50 are needed."))
    session.plain_error(InvalidInputError("bad"), "The upload could not be read")
    assert shown == ["This scan cannot be used: x.nii.gz has 12 volumes; at least 50 are "
                     "needed.", "The upload could not be read: bad"]


def test_plain_error_hides_internal_errors(shown):
    session.plain_error(KeyError("secret detail"))
    assert len(shown) == 1 and "secret detail" not in shown[0]
    assert shown[0].startswith("Something went wrong on our side (KeyError). Nothing was saved.")


class _Ctx:
    """The parts of Streamlit's script-run context that :func:`session.rerun` reads, around
    Streamlit's own request queue."""

    def __init__(self, page: str):
        from streamlit.runtime.scriptrunner_utils.script_requests import ScriptRequests

        self.page_script_hash = page
        self.script_requests = ScriptRequests()


@pytest.fixture
def on_cohort_page(monkeypatch):
    import streamlit.runtime.scriptrunner as runner

    ctx = _Ctx("cohort")
    monkeypatch.setattr(runner, "get_script_run_ctx", lambda *a, **k: ctx)
    asked: list[str] = []

    def st_rerun():  # what st.rerun() does before it halts the script
        from streamlit.runtime.scriptrunner_utils.script_requests import RerunData

        ctx.script_requests.request_rerun(RerunData(page_script_hash=ctx.page_script_hash))
        asked.append(ctx.page_script_hash)

    monkeypatch.setattr(session.st, "rerun", st_rerun)
    return ctx, asked


def _click_link(ctx, page: str) -> None:
    from streamlit.runtime.scriptrunner_utils.script_requests import RerunData

    assert ctx.script_requests.request_rerun(RerunData(page_script_hash=page))


def _next_page(ctx) -> str:
    request = ctx.script_requests.on_scriptrunner_yield()
    assert request is not None, "no run is waiting"
    return request.rerun_data.page_script_hash


def test_streamlit_folds_waiting_runs_into_the_newer_page(on_cohort_page):
    # The behaviour rerun() exists for: if Streamlit ever keeps the user's page, drop it.
    ctx, _ = on_cohort_page
    _click_link(ctx, "scan-quality")
    session.st.rerun()
    assert _next_page(ctx) == "cohort"


def test_rerun_keeps_a_click_on_another_page(on_cohort_page):
    ctx, asked = on_cohort_page
    _click_link(ctx, "scan-quality")
    session.rerun()
    assert asked == []
    assert _next_page(ctx) == "scan-quality"


def test_rerun_reruns_this_page_otherwise(on_cohort_page):
    ctx, asked = on_cohort_page
    session.rerun()  # nothing waits
    assert asked == ["cohort"] and _next_page(ctx) == "cohort"
    _click_link(ctx, "cohort")  # a run of this page waits (a fragment's timer): folded in
    session.rerun()
    assert asked == ["cohort", "cohort"] and _next_page(ctx) == "cohort"
