"""Screen participant: upload a scan, see QC, the calibrated prediction and why (layout only)."""

from __future__ import annotations

import time

import streamlit as st

from fmmtc_app import session
from fmmtc_app.access import require_access
from fmmtc_app.demo import DEMO_PREFIX
from fmmtc_app.notices import validity_banner
from fmmtc_app.progress import StageProgress
from fmmtc_app.reports import report_buttons
from fmmtc_app.uploads import staged_uploads
from fmmtc_core.atlas import load_atlas
from fmmtc_core.config import DEFAULT_THRESHOLDS
from fmmtc_core.figures import (
    brain3d_figure,
    carpet_figure,
    motion_figure,
    network_figure,
    probability_svg,
)
from fmmtc_core.report import glass_brain_png
from fmmtc_core.review import region_scores, top_regions
from fmmtc_core.screening import QCFailedError
from fmmtc_core.summary import format_share
from fmmtc_core.validity import model_validity

require_access()

st.title("Screen a participant")
st.write(
    "Enter the participant's **study pseudonym** (never a name or birth date), upload their "
    "resting-state fMRI (a 4D NIfTI in MNI space, e.g. fMRIPrep `space-MNI152NLin2009cAsym`, "
    "optionally with its JSON sidecar and fMRIPrep confounds), or a region time-series table. "
    "The result is saved to the cohort automatically; the image itself is not kept."
)

model = session.model()
kind = ("FMM-TC" if model.model_type == "fmmtc"
        else f"classic baseline {model.model_type}, not the deep model")
st.caption(f"Model **{model.name}** ({kind}; {model.atlas} atlas, {len(model.models)} fold "
           f"models) on **{model.device.type.upper()}**.")
if (active := model_validity(model.card, model.name)).warn:
    st.caption(f":warning: {active.headline.capitalize()}: every result says so "
               "(see the Model page).")
if (problem := session.cluster_problem()) is not None:
    st.error(problem)
for line in session.cluster_jobs():
    st.caption(line)


# Progress goes here, above the form (below it, it was out of sight while the form was open).
progress_slot = st.empty()
result_area = st.container()  # the latest result shows above the form
has_result = st.session_state.get("screen_result") is not None
with st.expander("Screen a participant" if not has_result else "Screen another participant",
                 expanded=not has_result):
    with st.form("screen"):
        pseudonym = st.text_input("Study pseudonym", placeholder="PAIN-0042", max_chars=64,
                                  key="pseudonym")
        scan_file = st.file_uploader("Scan (.nii, .nii.gz, or a .tsv/.csv/.npy region table)",
                                     type=["nii", "gz", "tsv", "csv", "npy"])
        c1, c2 = st.columns(2)
        sidecar_file = c1.file_uploader("JSON sidecar (optional)", type=["json"])
        confounds_file = c2.file_uploader("fMRIPrep confounds TSV (optional)", type=["tsv"])
        c1, c2, c3 = st.columns(3)
        site = c1.text_input("Site (optional)")
        drug = c2.text_input("Drug (optional)")
        arm = c3.text_input("Arm (optional)")
        force = st.checkbox("Screen again", key="force",
                            help="Screen this image again even if it was screened before with "
                                 "this model (the earlier screening is kept).")
        submitted = st.form_submit_button("Screen participant", type="primary")
    demo = st.button("Screen a simulated demo participant", key="demo",
                     help="A synthetic scan generated on this machine (SIM-DEMO); nothing is "
                          "downloaded.")


@st.cache_data(show_spinner=False, max_entries=32)
def _glass(atlas_name: str, scores: tuple) -> bytes:
    return glass_brain_png(load_atlas(atlas_name), scores)


def _progress_bar():
    bar = progress_slot.progress(0.0, text="Starting...")
    shown = StageProgress()
    last = {"stage": None, "t": 0.0}

    def cb(stage, done, total, info):
        # At most ~4 updates a second (and every stage's start and end): every update is a
        # message to the browser and a repaint there, which would compete with the
        # screening for the CPU.
        now = time.monotonic()
        frac, text = shown.update(stage, done, total)
        if stage == last["stage"] and now - last["t"] < 0.25 and 0 < done < total:
            return
        last.update(stage=stage, t=now)
        bar.progress(frac, text=text)

    return bar, cb


def _run(path, participant, sidecar=None, confounds=None, simulated=False):
    bar, cb = _progress_bar()
    try:
        result = session.run_screening(path, participant, sidecar=sidecar, confounds=confounds,
                                  site=site.strip() or None, drug=drug.strip() or None,
                                  arm=arm.strip() or None, simulated=simulated,
                                  force=force and not simulated, operator=session.operator(),
                                  progress=cb)
    except QCFailedError as exc:
        bar.empty()
        st.error(f"Not screened: {exc} Nothing was saved. Check the scan (or re-run "
                 "preprocessing) and upload it again.")
        st.session_state["screen_qc_failed"] = exc.report
        return
    except Exception as exc:  # noqa: BLE001 - shown as a plain sentence, never a traceback
        bar.empty()
        session.plain_error(exc, "This scan cannot be used")
        return
    took = result.summary.runtime_s
    bar.progress(1.0, text=f"Done: screening {result.screening_id}"
                 + (f" ({took:.0f} s)." if took and not result.reused else "."))
    st.session_state["screen_result"] = result
    st.session_state["screen_simulated"] = simulated
    st.session_state["cohort_version"] = st.session_state.get("cohort_version", 0) + 1
    st.session_state["explore_id"] = result.screening_id


if submitted or demo:
    st.session_state.pop("screen_result", None)
    st.session_state.pop("screen_qc_failed", None)
    if demo:
        from fmmtc_core.simulate import demo_scan

        with st.spinner("Simulating a demo scan (first time only)..."):
            path, side, conf = demo_scan()
        _run(path, DEMO_PREFIX + "DEMO", str(side), str(conf), simulated=True)
    elif not pseudonym.strip():
        st.error("Enter the participant's study pseudonym first (e.g. PAIN-0042).")
    elif scan_file is None:
        st.error("Choose a scan file to upload first.")
    elif (problem := session.label_problem(site=site, drug=drug, arm=arm)) is not None:
        st.error(f"Not screened: {problem} Nothing was saved.")
    else:
        # The upload is on disk only for the duration of the screening (a private folder
        # under the data folder, deleted on leaving the block whatever happens).
        try:
            with staged_uploads(scan_file, sidecar_file, confounds_file) as staged:
                _run(staged[0], pseudonym, staged[1], staged[2])
        except OSError as exc:
            session.plain_error(exc, "The upload could not be read")

failed = st.session_state.get("screen_qc_failed")
if failed is not None:
    for reason in failed.reasons:
        st.markdown(f"- {reason}")

#: Seconds the page waits, after sending a fresh result's decision, before it builds the card's
#: figures: the browser then paints the decision without competing for the CPU with the
#: figures' drawing in the server (0.3-0.8 s of matplotlib and Plotly), which on a machine whose
#: cores the browser shares kept the decision off the screen 0.3-1 s longer
#: (bench/bench_dashboard.py, alternating A/B: README, "Benchmarks / Dashboard").
PAINT_PAUSE_S = 0.2


def _show(result, *, fresh: bool = False) -> None:
    """The result card; ``fresh``: the screening was made by this run (pause after the
    decision, see :data:`PAINT_PAUSE_S`)."""
    summary = result.summary
    simulated = summary.simulated
    if simulated:
        st.info("SIMULATED participant: this demo scan was generated on this machine; it is "
                "not a real person.")
    if result.reused:
        st.info(f"This scan was already screened with this model (screening "
                f"{result.screening_id}); showing the stored result.")
    else:
        st.success(f"Saved to the cohort as screening {result.screening_id}.")

    st.subheader(f"Participant {result.participant}")
    validity_banner(summary.validity)  # above the decision: it cannot be read without it
    # Three columns, the decision the widest: in four equal ones at 1280 px "likely
    # non-responder" was cut to "likely non-re..." (the model is named in the caption below).
    c = st.columns([1, 1.2, 1.9])
    c[0].metric("Responder probability", f"{result.probability:.0%}")
    c[1].metric("Uncertainty band", f"{result.band[0]:.0%} - {result.band[1]:.0%}")
    c[2].metric("Decision", result.decision)
    st.caption(f"Model: {summary.model}")
    if fresh:
        time.sleep(PAINT_PAUSE_S)
    # Inline SVG, not Plotly: the card's headline figure then needs no plotly.js in the browser
    # (an A/B with bench/bench_dashboard.py was within the day's spread: README, Dashboard).
    st.markdown(probability_svg(result.probability, result.band,
                                {**DEFAULT_THRESHOLDS, **summary.thresholds}),
                unsafe_allow_html=True)
    st.caption("The diamond is the calibrated probability; the bar is the band spanned by the "
               "cross-validation fold models. The decision is 'likely responder' only when the "
               "whole band clears the responder threshold.")

    analysis = result.analysis
    q = summary.qc
    motion = "" if q.motion_known else " (head motion unknown)"
    with st.expander(f"Scan quality: {summary.qc_verdict}{motion}",
                     expanded=summary.qc_verdict != "pass" or not q.motion_known):
        for reason in summary.qc_reasons:
            st.markdown(f"- {reason}")
        m = st.columns(4)
        m[0].metric("Volumes", "n/a" if q.n_volumes is None else q.n_volumes)
        m[1].metric("Median tSNR", "n/a" if q.tsnr_median is None else f"{q.tsnr_median:.1f}",
                    help="Not measured for a region table (no voxels)."
                    if q.tsnr_median is None else None)
        m[2].metric("Mean FD (mm)", "unknown" if q.fd_mean_mm is None else f"{q.fd_mean_mm:.2f}",
                    help="Needs the scan's fMRIPrep confounds file: without it head motion is "
                         "unknown (a QC warning)." if q.fd_mean_mm is None else None)
        m[3].metric("Regions covered", "n/a" if q.n_covered is None
                    else f"{q.n_covered} / {q.n_regions}")
        if q.uncovered_regions:
            st.caption("Not covered (no information for the model): "
                       + ", ".join(q.uncovered_regions))
        if analysis is not None:
            rep = analysis.qc
            if rep.carpet is not None:
                st.plotly_chart(carpet_figure(rep.carpet, rep.carpet_regions,
                                              analysis.signals.atlas.groups, rep.tr),
                                width="stretch")
            if rep.fd is not None or rep.dvars is not None:
                st.plotly_chart(motion_figure(rep.tr, rep.fd, rep.dvars,
                                              rep.thresholds.fd_threshold), width="stretch")
        else:
            st.caption("Stored result: the carpet and motion plots need the file; open the "
                       "Scan quality page to re-check it.")

    st.subheader("Why: where the model looked")
    m = st.columns(3)
    m[0].metric("Time-series share", format_share(summary.share_ts))
    m[1].metric("Connectivity share", format_share(summary.share_fc))
    exact = summary.exact_attribution
    m[2].metric("Completeness gap", f"{summary.ig_gap or 0:.2%}",
                help=("Exact linear attribution (a classic baseline is linear in its "
                      "features): the gap is floating-point rounding only." if exact else
                      f"Integrated Gradients with {summary.ig_steps} steps: how far the "
                      "attributions are from adding up exactly to the change in the model's "
                      "output (kept below 1 %)."))
    st.caption(summary.share_note)
    st.caption(("Exact linear attribution (weight x distance from the training cohort's mean "
                "feature)" if exact else "Integrated Gradients scores")
               + " in logit units. **Red**: pushed towards responder; **blue**: towards "
               "non-responder; relative to "
               + ("the training cohort's average participant." if exact else
                  "a participant with flat time series and the training cohort's average "
                  "connectivity."))

    atlas = load_atlas(model.atlas)
    regions = region_scores(summary.regions, atlas)
    scores = regions["score"].to_numpy()
    # One view at a time: only the chosen figure is built and sent to the browser.
    view = st.radio("View", ["Brain map", "3D view", "Networks"], horizontal=True,
                    key="screen_view", label_visibility="collapsed")
    png = _glass(model.atlas, tuple(regions["score"].round(6)))
    if view == "Brain map":
        st.image(png, width="stretch")
        st.caption("The strongest 10 % of the regions; all regions are in the 3D view.")
    elif view == "3D view":
        st.plotly_chart(brain3d_figure(atlas.centroids_mm, scores, atlas.names, atlas.groups),
                        width="stretch")
    else:
        st.plotly_chart(network_figure(summary.networks), width="stretch")
    top = top_regions(regions)[["label", "name", "network", "score"]]
    # The group is the region's lobe (not a functional network): say so in the header.
    st.dataframe(top.rename(columns={"score": "score (logit)", "network": "lobe"}),
                 hide_index=True, width="stretch")

    report_buttons(summary, png, key="report")


result = st.session_state.get("screen_result")
if result is not None:
    with result_area:
        _show(result, fresh=bool(submitted or demo))
