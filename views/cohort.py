"""Cohort review: every screening, filters, enrolment thresholds, outcomes, export (layout only)."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import streamlit as st

from fmmtc_app import session
from fmmtc_app.access import require_access
from fmmtc_app import demo
from fmmtc_app.demo import DEMO_PREFIX, demo_cohort_size
from fmmtc_app.reports import report_buttons
from fmmtc_core.atlas import load_atlas
from fmmtc_core.config import DEFAULT_THRESHOLDS
from fmmtc_core.cohort import (
    WORKLIST_STATUSES,
    filter_screenings,
    observed_performance,
    outcome_values,
    stratify,
    worklist,
)
from fmmtc_core.figures import calibration_figure, probability_histogram, roc_figure
from fmmtc_core.report import glass_brain_png
from fmmtc_core.store import repository as repo
from fmmtc_core.store import session_scope

require_access()
st.title("Cohort review")
engine = session.engine()


@st.cache_data(show_spinner=False, ttl=5)
def _screenings(version: int, database: str, demo_step: tuple) -> pd.DataFrame:
    return repo.screenings_frame(engine)


job = demo.job_panel()  # the demo cohort loading in the background, if it is
version = st.session_state.setdefault("cohort_version", 0)
DATABASE = engine.url.render_as_string(hide_password=True)  # a cache key: rows belong to it
# the demo job's progress is part of the key: each participant it loads shows at once
df = _screenings(version, DATABASE,
                 () if job is None else (job.status, job.processed, job.outcomes))
if df.empty:
    st.info("The cohort database is empty. Screen a participant on the Screen page, or load a "
            "**simulated** demo cohort to see how this page works.")
    if job is None or job.status == "done":
        demo.start_button(f"Load the simulated demo cohort ({demo_cohort_size()} participants)",
                          primary=True)
    st.stop()

if df["simulated"].any():
    st.warning(f"{int(df['simulated'].sum())} of {len(df)} participants are SIMULATED demo "
               "data (pseudonyms starting SIM-), not real people.")
severe = df["model_validity"].isin(["simulated", "unknown"])
if severe.any():
    st.error(f"**{int(severe.sum())} of {len(df)} screenings were made by a model trained on "
             "SIMULATED data** (or on data its card does not name): their probabilities and "
             "decisions say nothing about real people. The 'model validity' column says which.")
unvalidated = df["model_validity"] == "not validated"
if unvalidated.any():
    st.warning(f"{int(unvalidated.sum())} of {len(df)} screenings were made by a model NOT "
               "VALIDATED ON THIS SITE'S DATA: treat them as research estimates.")

#: What a table cell shows for a label that was not given (site, drug).
EMPTY = "—"

st.subheader("Worklist")
c1, c2 = st.columns([2, 3])
search = c1.text_input("Search participants", key="w_search",
                       placeholder="pseudonym, site or drug")
status = c2.radio("Status", WORKLIST_STATUSES, horizontal=True, key="w_status",
                  help="screened: everyone; awaiting outcome: screened, no observed outcome "
                       "entered yet")
work = worklist(df, search=search, status=status)
# The observed outcome stands in the status column, and the count of screenings is left to
# the explorer: with both as columns of their own, the table ran past 1280 px (the outcome
# was cut off at the right edge).
shown_work = work.assign(status=work["outcome"].where(work["outcome"].notna(), work["status"]))
shown_work = shown_work.drop(columns=["screening_id", "outcome", "screenings"]).fillna(
    {"site": EMPTY, "drug": EMPTY})  # Streamlit writes a missing value as "None"
st.dataframe(shown_work, hide_index=True, width="stretch",
             column_config={
                 "status": st.column_config.TextColumn(
                     "status / outcome", help="the observed outcome, once recorded"),
                 "last_screened": st.column_config.DatetimeColumn("last screened (UTC)",
                                                                  format="YYYY-MM-DD HH:mm"),
                 "probability": st.column_config.NumberColumn(format="%.2f"),
                 "qc_verdict": "QC", "model_validity": "model validity"})
c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
opened = c1.selectbox(f"Open a participant ({len(work)} listed)", work["participant"].tolist(),
                      index=None, key="w_open", placeholder="Choose a participant")
if c2.button("Open in the explorer", key="w_go", disabled=opened is None):
    latest = int(work.loc[work["participant"] == opened, "screening_id"].iloc[0])
    st.session_state["explore_id"] = latest
    st.session_state.pop("explore_first", None)  # the explorer starts at this screening
    st.switch_page("views/explore.py")

with st.expander("Filters", expanded=False):
    c = st.columns(4)
    options = {col: sorted(df[col].dropna().unique().tolist())
               for col in ("site", "drug", "decision", "qc_verdict")}
    # An empty selection means "all" (so new sites or drugs are never silently hidden).
    sel = {col: c[i].multiselect(col.replace("_", " ").replace("qc verdict", "QC"),
                                 options[col], key=f"f_{col}", placeholder="all")
           for i, col in enumerate(options)}
    dates = pd.to_datetime(df["created_at"])
    c1, c2 = st.columns(2)
    span = None
    if c1.checkbox("Only screenings between two dates", key="f_limit"):
        span = c1.date_input("Screened between", (dates.min().date(), dates.max().date()),
                             key="f_dates")
    sim = c2.radio("Participants", ["all", "real only", "simulated only"], horizontal=True,
                   key="f_sim")
start, end = (span if isinstance(span, tuple) and len(span) == 2 else (None, None))
view = filter_screenings(
    df, sites=sel["site"] or None, drugs=sel["drug"] or None,
    decisions=sel["decision"] or None, qc=sel["qc_verdict"] or None, start=start, end=end,
    simulated={"all": None, "real only": False, "simulated only": True}[sim])
st.caption(f"{len(view)} of {len(df)} participants (latest screening of each with each model).")

show = view[["screening_id", "participant", "site", "drug", "probability", "band_low",
             "band_high", "decision", "qc_verdict", "outcome", "simulated", "model",
             "model_validity", "operator", "created_at"]].sort_values("created_at",
                                                                     ascending=False)
show = show.fillna({"site": EMPTY, "drug": EMPTY, "outcome": "not recorded"})
st.dataframe(show, hide_index=True, width="stretch", column_config={
    "screening_id": st.column_config.NumberColumn("id"),
    "probability": st.column_config.ProgressColumn("probability", min_value=0.0,
                                                   max_value=1.0, format="%.2f"),
    "band_low": st.column_config.NumberColumn("band from", format="%.2f"),
    "band_high": st.column_config.NumberColumn("band to", format="%.2f"),
    "qc_verdict": st.column_config.TextColumn("QC"),
    "model_validity": st.column_config.TextColumn(
        "model validity", help="simulated: trained on simulated data only; not validated: "
                               "never checked on this site's data; validated: checked here"),
    "created_at": st.column_config.DatetimeColumn("screened", format="YYYY-MM-DD HH:mm"),
})
st.download_button("Export these rows (CSV)", repo.csv_text(view),
                   file_name=f"fmmtc-cohort-{dt.date.today():%Y%m%d}.csv", mime="text/csv",
                   key="export")

@st.cache_data(show_spinner=False, max_entries=32)
def _record(screening_id: int, database: str) -> repo.ScreeningRecord:
    # keyed by the database too: a screening id means nothing without it
    with session_scope(engine) as sess:
        return repo.screening_record(sess, screening_id)


@st.cache_data(show_spinner="Drawing the brain map...", max_entries=32)
def _glass(atlas_name: str, scores: tuple) -> bytes:
    return glass_brain_png(load_atlas(atlas_name), scores)


report_labels = {int(r.screening_id): f"#{r.screening_id} - {r.participant} - "
                 f"{pd.Timestamp(r.created_at):%Y-%m-%d %H:%M} UTC" for r in show.itertuples()}
picked = st.selectbox("Report of a screening (HTML or PDF)", list(report_labels),
                      index=None, format_func=report_labels.get, key="report_pick",
                      placeholder="Choose one of the rows above")
if picked is not None:
    record = _record(picked, DATABASE)
    report_buttons(record.summary, _glass(record.atlas, tuple(record.regions["total"].round(6))),
                   key="cohort-report")

st.subheader("Enrolment at a threshold")
c1, c2 = st.columns([3, 1])
threshold = c1.slider("Enrol participants with a responder probability of at least", 0.0, 1.0,
                      DEFAULT_THRESHOLDS["responder"], 0.05, key="threshold")
strict = c2.checkbox("whole band above", key="strict",
                     help="Enrol only when the whole uncertainty band clears the threshold.")
y = outcome_values(view["outcome"])
s = stratify(view["probability"].to_numpy(), threshold,
             band_low=view["band_low"].to_numpy(), require_band=strict, outcome=y)
m = st.columns(4)
m[0].metric("Enrolled", f"{s.n_enrolled} of {s.n_screened}")
m[1].metric("Expected rate, enrolled",
            "n/a" if s.expected_rate_enrolled is None else f"{s.expected_rate_enrolled:.0%}",
            delta=None if s.expected_rate_enrolled is None or s.base_rate is None
            else f"{(s.expected_rate_enrolled - s.base_rate) * 100:+.0f} points vs all",
            help="Expected responder rate among the enrolled: the mean of their calibrated "
                 "probabilities.")
m[2].metric("Base rate (all screened)", "n/a" if s.base_rate is None else f"{s.base_rate:.0%}")
m[3].metric("Number needed to screen", "n/a" if s.number_needed_to_screen is None
            else f"{s.number_needed_to_screen:.1f}",
            help="Participants screened per expected responder enrolled.")
if s.observed_rate_enrolled is not None:
    st.caption(f"Observed so far: {s.observed_rate_enrolled:.0%} responders among the "
               f"{s.n_observed_enrolled} enrolled with an outcome "
               f"(all with an outcome: {s.observed_base_rate:.0%}).")
st.caption("Expected rates are means of calibrated probabilities: they hold if the model's "
           "calibration holds on this cohort (check it below once outcomes are entered).")
st.plotly_chart(probability_histogram(view["probability"], threshold, outcome=y),
                width="stretch")

st.subheader("Observed outcomes")
who = st.selectbox("Participant", sorted(df["participant"]), index=None, key="o_who",
                   placeholder="Choose a participant")
history = repo.outcome_history(engine, who) if who else None
if history is not None:
    if history.empty:
        st.caption(f"No outcome recorded for {who} yet.")
    else:
        st.caption(f"Outcomes recorded for {who}, latest first (the latest counts; every "
                   "entry is kept):")
        st.dataframe(history, hide_index=True, width="stretch", column_config={
            "entered_at": st.column_config.DatetimeColumn("entered (UTC)",
                                                          format="YYYY-MM-DD HH:mm"),
            "entered_by": "entered by", "current": "counts"})
with st.form("outcome"):
    c1, c2 = st.columns([2, 3])
    what = c1.radio("Outcome", ["responder", "non-responder"], index=None, key="o_what",
                    help="Nothing is preselected: choose what was observed.")
    note = c2.text_input("Note (optional)", key="o_note")
    replace = False
    if history is not None and not history.empty:
        last = history.iloc[0]
        replace = st.checkbox(
            f"Replace the outcome on record ({last['outcome']}, entered by "
            f"{last['entered_by']} on {last['entered_at']:%Y-%m-%d}); it stays in the history",
            key="o_replace")
    submitted = st.form_submit_button("Record outcome")
if submitted:
    if who is None:
        st.error("Choose the participant first.")
    elif what is None:
        st.error("Choose the observed outcome (responder or non-responder) first.")
    else:
        try:
            with session_scope(engine, write=True) as sess:
                repo.record_outcome(sess, who, what, actor=session.operator(),
                                    note=note or None, replace=replace)
        except Exception as exc:  # noqa: BLE001
            session.plain_error(exc, "The outcome was not recorded")
        else:
            st.session_state["cohort_version"] = version + 1
            for key in ("o_what", "o_note", "o_replace"):  # the next entry starts empty
                st.session_state.pop(key, None)
            st.session_state["outcome_saved"] = (
                f"Recorded: {who} is a {what}"
                + (" (the earlier outcome is kept in the history)." if replace else "."))
            session.rerun()
if msg := st.session_state.pop("outcome_saved", None):
    st.success(msg)

perf = observed_performance(view["probability"], y)
if perf is None:
    st.caption("ROC and calibration appear once at least two responders and two "
               "non-responders have an observed outcome.")
else:
    c1, c2 = st.columns(2)
    c1.plotly_chart(roc_figure(perf), width="stretch")
    c2.plotly_chart(calibration_figure(perf), width="stretch")
    if view.loc[view["outcome"].notna(), "simulated"].any():
        st.caption("Includes simulated participants: these curves describe the demo, not the "
                   "model's real-world performance.")

has_demo = df["participant"].str.startswith(DEMO_PREFIX + "0").any()
if job is None and not has_demo:
    st.divider()
    st.caption("Want to try the page on more data? Add a simulated demo cohort (flagged as "
               "simulated everywhere).")
    demo.start_button(f"Add the simulated demo cohort ({demo_cohort_size()} participants)",
                      primary=False)
elif job is None or job.status == "done":
    st.divider()
    if job is None:  # loaded by an earlier version, or its record was lost: it can go on
        st.caption("A simulated demo cohort is in the database. Load the participants it "
                   "may still miss (those stored are skipped), or remove it.")
        demo.start_button("Finish loading the simulated demo cohort", primary=False)
    demo.reset_button()
