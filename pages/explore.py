"""Attribution explorer: any stored screening (or two side by side), per modality (layout only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from fmmtc_core import dashboard as ui
from fmmtc_core.atlas import load_atlas
from fmmtc_core.figures import (
    FC_COLOR,
    TS_COLOR,
    brain3d_figure,
    compare_regions_figure,
    connectome_figure,
    network_figure,
    region_series_figure,
)
from fmmtc_core.store import repository as repo
from fmmtc_core.store import session_scope

ui.require_access()
st.title("Attribution explorer")
engine = ui.engine()
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
def _load(screening_id: int) -> dict:
    with session_scope(engine) as s:
        sc = repo.get_screening(s, screening_id)
        regions = repo.region_frame(s, screening_id)
        return {
            "participant": sc.participant.pseudonym, "simulated": sc.participant.simulated,
            "probability": sc.probability, "band": (sc.band_low, sc.band_high),
            "decision": sc.decision, "share_ts": sc.share_ts, "share_fc": sc.share_fc,
            "ig_gap": sc.ig_gap, "steps": sc.ig_steps, "model": sc.model_version.name,
            "atlas": sc.scan.atlas, "tr": sc.scan.tr,
            "networks": (sc.explanation or {}).get("networks", {}),
            "connections": [{"i": c.region_i, "j": c.region_j, "score": c.score}
                            for c in sc.connections],
            "series": repo.decode_series(sc.scan.series) if sc.scan.series else None,
            "regions": regions,
        }


@st.cache_data(show_spinner=False, ttl=60)
def _cohort_means() -> pd.DataFrame:
    return repo.cohort_region_means(engine)


@st.cache_data(show_spinner=False, max_entries=64)
def _glass(atlas_name: str, scores: tuple) -> bytes:
    from fmmtc_core.report import glass_brain_png

    return glass_brain_png(load_atlas(atlas_name), np.asarray(scores))


def _panel(d: dict, key: str, *, full: bool) -> None:
    atlas = load_atlas(d["atlas"])
    reg = d["regions"]
    if d["simulated"]:
        st.info("SIMULATED participant (demo data).")
    m = st.columns(4)
    m[0].metric("Probability", f"{d['probability']:.0%}",
                help=f"band {d['band'][0]:.0%} - {d['band'][1]:.0%}")
    m[1].metric("Decision", d["decision"])
    m[2].metric("Time series / connectivity",
                f"{d['share_ts']:.0%} / {d['share_fc']:.0%}")
    m[3].metric("IG gap", f"{d['ig_gap']:.2%}", help=f"{d['steps']} integration steps")
    st.image(_glass(d["atlas"], tuple(reg["total"].round(6))), width="stretch")
    views = (["TS vs connectivity", "Networks", "Connections", "3D", "Region series",
              "Against the cohort"] if full else ["TS vs connectivity", "Networks"])
    # One view at a time: only the chosen figure is built and drawn (3D views are costly).
    view = st.radio("View", views, horizontal=True, key=f"{key}-view",
                    label_visibility="collapsed")
    top = reg.reindex(reg["total"].abs().sort_values(ascending=False).index).head(15)
    if view == views[0]:
        st.plotly_chart(compare_regions_figure(
            top["name"], {"time series": top["ts"], "connectivity": top["fc"]},
            title="Top regions: time-series and connectivity attribution",
            colors=[TS_COLOR, FC_COLOR]),
            width="stretch", key=f"{key}-tsfc")
        st.dataframe(top[["label", "name", "network", "ts", "fc", "total"]], hide_index=True,
                     width="stretch")
    elif view == "Networks":
        st.plotly_chart(network_figure(d["networks"]), width="stretch", key=f"{key}-net")
    elif view == "Connections":
        st.plotly_chart(connectome_figure(atlas.centroids_mm, d["connections"], atlas.names),
                        width="stretch", key=f"{key}-conn")
        st.dataframe(pd.DataFrame([{"region": atlas.names[c["i"]],
                                    "region ": atlas.names[c["j"]], "score": c["score"]}
                                   for c in d["connections"]]), hide_index=True,
                     width="stretch")
    elif view == "3D":
        st.plotly_chart(brain3d_figure(atlas.centroids_mm, reg["total"].to_numpy(),
                                       atlas.names, atlas.groups), width="stretch",
                        key=f"{key}-3d")
    elif view == "Region series":
        if d["series"] is None:
            st.caption("No region series stored for this scan.")
        else:
            idx = top["region_index"].head(4).to_numpy()
            st.plotly_chart(region_series_figure(d["series"], atlas.names, d["tr"], idx),
                            width="stretch", key=f"{key}-series")
            st.caption("Cleaned region series of the four top regions (what the model saw).")
    else:
        means = _cohort_means()
        series = {f"{d['participant']}": top["total"].to_numpy()}
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
    _panel(_load(first), "a", full=True)
else:
    left, right = st.columns(2)
    with left:
        st.subheader(labels[first].split(" - ")[1])
        _panel(_load(first), "a", full=False)
    with right:
        st.subheader(labels[second].split(" - ")[1])
        _panel(_load(second), "b", full=False)
