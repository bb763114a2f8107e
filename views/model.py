"""Model: the active model's card, metrics, ablation, expected inputs; choose a model (layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from fmmtc_app import session
from fmmtc_app.access import require_access
from fmmtc_app.notices import validity_banner
from fmmtc_core import FMMTCError
from fmmtc_core.ablation import AblationStudy, read_ablation
from fmmtc_core.validity import model_validity

ABLATION = Path(__file__).resolve().parents[1] / "docs" / "ablation.md"

require_access()
st.title("Model")

models = session.installed_models()
names = list(models)
current = session.active_model_dir().name
choice = st.selectbox("Active model", names, index=names.index(current),
                      help="Installed model folders: the default one and those in "
                           "FMMTC_MODELS_DIR. New screenings use the active model.")
if choice != current:
    st.session_state["model_name"] = choice
    session.rerun()

model = session.model()
card = model.card
classic = model.model_type != "fmmtc"
st.caption(f"Folder `{session.active_model_dir()}`; model type **{model.model_type}**; "
           f"running on **{model.device.type.upper()}**; version id "
           f"`{model.weights_sha256[:12]}`.")
validity = model_validity(card, model.name)
validity_banner(validity)
st.markdown(f"**Valid for:** {validity.valid_for}  \n**Trained on:** {validity.trained_on}")
st.caption(f"The card's intended use: {card.get('intended_use', 'not stated')}")
if classic:
    spec = card.get("model", {})
    st.info(f"**Classic baseline `{model.model_type}`, not the deep FMM-TC model**: "
            f"{spec.get('description', '')} ({spec.get('reference', '')}). Trained on the "
            "folds and under the protocol of `fmmtc compare`, so its numbers below compare "
            "directly with FMM-TC's; its explanations are exact (the model is linear in its "
            "features).")


for text in card.get("warnings", []):  # training found no usable signal: say it first
    st.error(f"**{text}**")

st.subheader("Cross-validation metrics (out of fold)")
metrics = card.get("metrics_out_of_fold", {})
m = st.columns(4)
for i, (key, label) in enumerate([("auc", "AUC"), ("mcc", "MCC"),
                                  ("balanced_accuracy", "Balanced accuracy"),
                                  ("brier", "Brier score")]):
    if key in metrics:
        m[i].metric(label, f"{metrics[key]:.3f}")
st.dataframe(pd.DataFrame([{k: v for k, v in metrics.items()
                            if isinstance(v, (int, float, str))}]),
             hide_index=True, width="stretch")
facts = []
if "auc_ci95" in metrics:
    facts.append("AUC 95 % interval (bootstrap over participants) "
                 f"{metrics['auc_ci95'][0]:.3f}-{metrics['auc_ci95'][1]:.3f}")
if "permutation" in metrics:
    perm = metrics["permutation"]
    facts.append(f"label-permutation p = {perm['p_value']:.3f} "
                 f"({perm['n_permutations']} permutations)")
facts.append(metrics.get("calibration", "calibration fitted on the out-of-fold logits "
                                         "(not cross-fitted: a model written before 0.3)"))
st.caption("; ".join(facts) + ".")
data = card.get("data", {})
st.caption(f"{data.get('n_subjects', '?')} subjects ({data.get('n_responders', '?')} "
           f"responders) from {data.get('cohort', 'an unnamed cohort')}; "
           f"{card.get('training', {}).get('folds', '?')}-fold cross-validation, "
           f"{card.get('training', {}).get('split', '')}.")

st.subheader("What it expects")
atlas = card.get("atlas", {})
pre = card.get("preprocessing", {})
c1, c2 = st.columns(2)
if classic:
    features = card.get("model", {}).get("features", {})
    c1.markdown(f"**Atlas**: {atlas.get('name')} ({atlas.get('n_regions')} regions)  \n"
                f"**Features**: {features.get('n_features', '?')} {features.get('kind', '')}, "
                f"{features.get('span', '')}  \n"
                f"**Definition**: {features.get('definition', '')}")
else:
    c1.markdown(f"**Atlas**: {atlas.get('name')} ({atlas.get('n_regions')} regions)  \n"
                f"**Window**: {getattr(model, 'window', '?')} samples, "
                f"{pre.get('window', {}).get('crop', 'centred')} crop, "
                f"{pre.get('window', {}).get('scaling', '')}  \n"
                f"**Sampling**: {pre.get('window', {}).get('tr', '')}")
c2.markdown(f"**Parcellation**: {pre.get('parcellation', '')}  \n"
            f"**Cleaning**: {json.dumps(pre.get('cleaning', {}))}  \n"
            f"**Connectivity**: {pre.get('connectivity', '')}")
cfg = card.get("model", {})
if classic:
    st.markdown(f"**Model**: {cfg.get('description', '')}; hyper-parameters chosen by inner "
                f"cross-validation in each training fold (table); calibration "
                f"{card.get('calibration', {}).get('method', '')}; ensemble: "
                f"{card.get('ensemble', '')}.")
    chosen = pd.DataFrame(card.get("training", {}).get("per_fold", []))
    if len(chosen):
        st.dataframe(chosen, hide_index=True, width="stretch")
else:
    ts_parts = []
    if "ts" in str(cfg.get("modalities", "")):
        if cfg.get("ts_embedding", True):
            ts_parts.append(f"encoder {cfg.get('foundation')} (frozen BrainLM-style)")
        if cfg.get("amplitude"):
            ts_parts.append("regional amplitude (sparse read-out)")
    st.markdown(f"**Architecture**: modalities {cfg.get('modalities')}, time series: "
                f"{' + '.join(ts_parts) or 'none'}, connectivity encoder "
                f"{cfg.get('fc_encoder')} on {cfg.get('fc_input')}; fitted "
                f"{'by stacking (no gradient training)' if cfg.get('fit') == 'stacked' else 'by gradient descent'}; "
                f"calibration {card.get('calibration', {}).get('method', '')}; ensemble: "
                f"{card.get('ensemble', '')}.")
if "foundation" in card:
    st.caption(f"Foundation model: {card['foundation'].get('pretrained_on', '')}")


st.subheader("Compared with classic baselines")
comparison = session.active_model_dir() / "comparison.tsv"
if comparison.is_file():
    try:
        table = pd.read_csv(comparison, sep="\t")
        st.dataframe(table, hide_index=True, width="stretch")
        if {"model", "auc"} <= set(table.columns) and "fmmtc" in set(table["model"]):
            ours = float(table.loc[table["model"] == "fmmtc", "auc"].iloc[0])
            others = table[~table["model"].isin(["fmmtc", "oracle"])]
            if len(others) and ours <= float(others["auc"].max()):
                best = others.loc[others["auc"].idxmax()]
                st.warning(f"FMM-TC (AUC {ours:.3f}) is not better than the classic baseline "
                           f"{best['model']} (AUC {float(best['auc']):.3f}) on this cohort.")
    except (OSError, ValueError) as exc:
        st.caption(f"comparison.tsv cannot be read: {exc}")
else:
    st.caption("No comparison for this model: run `fmmtc compare COHORT --models "
               "cpm,nbs,edges,amplitude,fmmtc --out MODEL_DIR/comparison.tsv` on its training "
               "cohort to see it here.")


@st.cache_data(show_spinner=False)
def _ablation(path: str) -> AblationStudy:
    return read_ablation(path)


st.subheader("Ablation study")
try:
    abl = _ablation(str(ABLATION))
except FileNotFoundError:
    st.caption("No ablation study found (run bench/learning.py; see README, Ablation study).")
except FMMTCError as exc:
    st.caption(f"The ablation study cannot be shown: {exc}")
else:
    st.dataframe(abl.table, hide_index=True, width="stretch")
    how = abl.generated_by.rstrip(".")
    st.caption(f"Simulated data (docs/ablation.md), generated by {how}. It "
               "compares the design choices on the simulated setting; it is not a measurement "
               "of this model on real patients.")

with st.expander("Full model card (JSON)"):
    st.json(card, expanded=False)
