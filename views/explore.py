"""Attribution explorer: any stored screening (or two side by side), per modality (layout only)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from fmmtc_app import session
from fmmtc_app.access import require_access
from fmmtc_app.notices import validity_banner
from fmmtc_app.reports import report_buttons
from fmmtc_core.atlas import load_atlas
from fmmtc_core.explain import region_map
from fmmtc_core.figures import (
    FC_COLOR,
    TS_COLOR,
    attribution_slices_html,
    brain3d_figure,
    brain_map_png,
    compare_regions_figure,
    connectome_figure,
    glass_brain_scale,
    network_figure,
    region_series_figure,
    shared_limit,
)
from fmmtc_core.review import attribution_nifti, group_attributions, top_regions, with_anatomy
from fmmtc_core.store import repository as repo
from fmmtc_core.store import session_scope
from fmmtc_core.store.repository import ScreeningRecord
from fmmtc_core.summary import format_share

require_access()
st.title("Attribution explorer")
engine = session.engine()
DATABASE = engine.url.render_as_string(hide_password=True)
df = repo.screenings_frame(engine, latest_only=False)
if df.empty:
    st.info("No screenings yet. Screen a participant, or load the simulated demo cohort on the "
            "Cohort review page.")
    st.stop()

df = df.sort_values("screening_id", ascending=False)
labels = {int(r.screening_id): f"#{r.screening_id} - {r.participant}"
          f"{' (simulated)' if r.simulated else ''} - p = {r.probability:.2f} - "
          f"{pd.Timestamp(r.created_at):%Y-%m-%d %H:%M}" for r in df.itertuples()}
ids = list(labels)
pick = st.session_state.get("explore_id")
c1, c2 = st.columns([3, 1])
first = c1.selectbox("Screening", ids, index=ids.index(pick) if pick in ids else 0,
                     format_func=labels.get, key="explore_first")
compare = c2.toggle("Compare with another", key="explore_compare")
second = None
if compare:
    others = [i for i in ids if i != first]
    if others:
        second = st.selectbox("Compare with", others, format_func=labels.get,
                              key="explore_second")
    else:
        st.caption("Only one screening is stored.")


@st.cache_data(show_spinner=False, max_entries=64)
def _load(screening_id: int, database: str) -> ScreeningRecord:
    # keyed by the database too: a screening id means nothing without it
    with session_scope(engine) as s:
        return repo.screening_record(s, screening_id)


@st.cache_data(show_spinner=False, ttl=60)
def _cohort_means() -> pd.DataFrame:
    return repo.cohort_region_means(engine)


@st.cache_data(show_spinner=False, max_entries=64)
def _glass(atlas_name: str, scores: tuple, vmax: float, threshold: float) -> bytes:
    return brain_map_png(region_map(load_atlas(atlas_name), list(scores)), vmax=vmax,
                         threshold=threshold)


@st.cache_data(show_spinner=False, max_entries=16)
def _nifti(atlas_name: str, scores: tuple) -> bytes:
    return attribution_nifti(load_atlas(atlas_name), scores)


@st.cache_data(show_spinner="Preparing the slices...", max_entries=16)
def _slices(atlas_name: str, scores: tuple, threshold: float, vmax: float) -> str:
    return attribution_slices_html(region_map(load_atlas(atlas_name), list(scores)),
                                   threshold=threshold, vmax=vmax)


def _range(limit: float) -> tuple[float, float]:
    """A symmetric axis range a little wider than ``limit`` (bars are not cut at the edge)."""
    return (-1.08 * limit, 1.08 * limit)


def _panel(d: ScreeningRecord, key: str, *, full: bool, shown: list[ScreeningRecord]) -> None:
    """One screening; ``shown`` holds every screening on the page (the colour scale and the
    bar axes are shared among them, so two panels compare at a glance)."""
    atlas = load_atlas(d.atlas)
    reg = d.regions
    sm = d.summary
    if sm.simulated:
        st.info("SIMULATED participant (demo data).")
    validity_banner(sm.validity)
    # The decision is a sentence, not a metric: a metric's value is cut to the column's width
    # ("likely non-re...") and a half-width panel has narrow columns.
    st.markdown(f"Decision: **{sm.decision}**")
    if full:
        m = st.columns(3)
    else:
        top_row = st.columns(2)
        m = [top_row[0], top_row[1], st.container()]
    m[0].metric("Probability", f"{sm.probability:.0%}",
                help=f"band {sm.band[0]:.0%} - {sm.band[1]:.0%}")
    exact = sm.exact_attribution
    m[1].metric("Attribution gap" if exact else "IG gap", f"{sm.ig_gap or 0:.2%}",
                help="exact linear attribution (classic baseline)" if exact
                else f"{sm.ig_steps} integration steps")
    m[2].metric("Time series / connectivity",
                f"{format_share(sm.share_ts)} / {format_share(sm.share_fc)}")
    st.caption(sm.share_note)
    vmax, threshold = glass_brain_scale(*(r.regions["total"] for r in shown))
    png = _glass(d.atlas, tuple(reg["total"].round(6)), round(vmax, 6), round(threshold, 6))
    report_buttons(sm, png, key=f"{key}-report")
    st.image(png, width="stretch")
    st.caption(f"Colour scale -{vmax:.3g} to +{vmax:.3g} (logit units; warm colours towards "
               "responder, cold towards non-responder), "
               f"regions under {threshold:.3g} hidden"
               + ("; both maps share this scale." if len(shown) > 1 else "."))
    scores = tuple(reg["total"].round(6))
    st.download_button(
        "Download the attribution map (NIfTI)", _nifti(d.atlas, scores),
        file_name=f"{sm.participant}_screening-{sm.screening_id}_attribution.nii.gz",
        mime="application/gzip", key=f"{key}-nifti",
        help="Each region's total attribution (logit units, + towards responder) in its voxels, "
             f"on the {atlas.name} grid in MNI space: open it in FSLeyes, MRIcroGL or nilearn.")
    views = (["TS vs connectivity", "By anatomy", "Slices", "Connections", "3D",
              "Region series", "Against the cohort"] if full
             else ["TS vs connectivity", "By anatomy"])
    # One view at a time: only the chosen figure is built and drawn (3D views are costly).
    view = st.radio("View", views, horizontal=True, key=f"{key}-view",
                    label_visibility="collapsed")
    top = top_regions(reg, "total")
    if view == views[0]:
        tops = [top_regions(r.regions, "total") for r in shown]
        lim = shared_limit(*(t[c] for t in tops for c in ("ts", "fc")))
        st.plotly_chart(compare_regions_figure(
            top["name"], {"time series": top["ts"], "connectivity": top["fc"]},
            title="Top regions: time-series and connectivity attribution",
            colors=[TS_COLOR, FC_COLOR], value_range=_range(lim)),
            width="stretch", key=f"{key}-tsfc")
        table = with_anatomy(top, atlas)
        st.dataframe(table[[c for c in ("label", "name", "lobe", "section", "ts", "fc", "total")
                            if c in table]], hide_index=True, width="stretch")
    elif view == "By anatomy":
        groupings = atlas.groupings
        by = st.radio("Group regions by", list(groupings), format_func=groupings.get,
                      horizontal=True, key=f"{key}-by")
        sums = [group_attributions(r.regions, load_atlas(r.atlas), by) for r in shown
                if by in load_atlas(r.atlas).groupings]
        lim = shared_limit(*([g[c] for g in x.values() for c in ("ts", "fc")] for x in sums))
        st.plotly_chart(network_figure(group_attributions(reg, atlas, by),
                                       group_title=groupings[by], value_range=_range(lim)),
                        width="stretch", key=f"{key}-net")
        if "section" not in groupings:
            st.caption(f"{atlas.name} has no HCP-MMP sections: regions are grouped by lobe.")
    elif view == "Slices":
        cut = st.slider("Hide regions whose |score| is under", 0.0, float(vmax),
                        float(threshold), step=float(vmax) / 100, format="%.3f",
                        key=f"{key}-cut")
        st.iframe(_slices(d.atlas, scores, round(cut, 6), round(vmax, 6)), height=330)
        st.caption("Click a point to move the three slices there. The scan's own mean image "
                   "and tSNR map are shown when it is checked on the Scan quality page; the "
                   "image is not stored, so they cannot be drawn here.")
    elif view == "Connections":
        st.plotly_chart(connectome_figure(atlas.centroids_mm,
                                          d.connections.to_dict("records"), atlas.names),
                        width="stretch", key=f"{key}-conn")
        st.dataframe(d.connections[["name_i", "name_j", "score"]], hide_index=True,
                     width="stretch", column_config={"name_i": "region", "name_j": "region "})
    elif view == "3D":
        st.plotly_chart(brain3d_figure(atlas.centroids_mm, reg["total"].to_numpy(),
                                       atlas.names, atlas.groups), width="stretch",
                        key=f"{key}-3d")
    elif view == "Region series":
        if d.series is None:
            st.caption("No region series stored for this scan.")
        else:
            idx = top["region_index"].head(4).to_numpy()
            st.plotly_chart(region_series_figure(d.series, atlas.names, d.tr, idx),
                            width="stretch", key=f"{key}-series")
            st.caption("Cleaned region series of the four top regions (what the model saw).")
    else:
        means = _cohort_means()
        series = {sm.participant: top["total"].to_numpy()}
        for flag, name in ((True, "cohort mean, predicted responders"),
                           (False, "cohort mean, predicted non-responders")):
            sub = means[means["responder"] == flag].set_index("region_index")["mean"]
            series[name] = sub.reindex(top["region_index"]).to_numpy()
        st.plotly_chart(compare_regions_figure(top["name"], series,
                                               title="This participant against the cohort"),
                        width="stretch", key=f"{key}-cohort")
        st.caption("Predicted responder = calibrated probability of 0.5 or more; latest "
                   "screening of each participant.")


if second is None:
    one = _load(first, DATABASE)
    _panel(one, "a", full=True, shown=[one])
else:
    pair = [_load(first, DATABASE), _load(second, DATABASE)]
    for column, rec, key, sid in zip(st.columns(2), pair, ("a", "b"), (first, second)):
        with column:
            st.subheader(labels[sid].split(" - ")[1])
            _panel(rec, key, full=False, shown=pair)
