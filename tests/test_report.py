"""The one-page HTML screening report."""

from __future__ import annotations

import numpy as np

from fmmtc_core.atlas import load_atlas
from fmmtc_core.report import glass_brain_png, screening_report_html

SUMMARY = {
    "probability": 0.72, "band": [0.61, 0.8], "decision": "likely responder",
    "thresholds": {"responder": 0.6, "non_responder": 0.4},
    "qc": {"verdict": "warn", "reasons": ["mean FD <b>0.3</b> mm"]},
    "modality_share": {"ts": 0.2, "fc": 0.8},
    "regions": [{"label": 1, "name": "Precentral_L", "score": 0.5},
                {"label": 2, "name": "Precentral_R", "score": -0.25}],
    "top_connections": [{"i": 0, "j": 1, "label_i": 1, "label_j": 2, "score": 0.1}],
    "networks": {"Frontal": {"ts": 0.1, "fc": 0.15, "total": 0.25}},
    "ig_gap": 0.004, "steps": 16, "baseline": {"ts": "flat", "fc": "cohort_mean"},
    "model": "demo", "created_at": "2026-11-25T10:00:00",
}


def test_report_is_self_contained_and_escaped():
    html = screening_report_html(SUMMARY, participant="PAIN-<1>", screening_id=7,
                                 simulated=True, png=b"\x89PNG fake", operator="alice")
    assert html.startswith("<!DOCTYPE html>")
    assert "PAIN-&lt;1&gt;" in html and "PAIN-<1>" not in html
    assert "mean FD &lt;b&gt;0.3&lt;/b&gt; mm" in html  # user-derived text is escaped
    assert "SIMULATED DATA" in html and "72%" in html and "likely responder" in html
    assert "data:image/png;base64," in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "Precentral_L" in html and "+0.5000" in html and "run by alice" in html


def test_glass_brain_png():
    atlas = load_atlas("aal3")
    png = glass_brain_png(atlas, np.linspace(-1, 1, atlas.n_regions))
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_every_text_field_is_escaped():
    """Each value that can come from a user or the database is escaped: the test fails if any
    one field reaches the page as markup."""
    bad = "<script>alert(1)</script>"
    summary = {**SUMMARY, "model": bad, "decision": bad, "created_at": bad, "baseline": bad,
               "qc": {"verdict": bad, "reasons": [bad]},
               "regions": [{"label": 1, "name": bad, "score": 0.5}],
               "networks": {bad: {"ts": 0.1, "fc": 0.15, "total": 0.25}}}
    html = screening_report_html(summary, participant=bad, screening_id=1, operator=bad)
    assert "<script" not in html
    assert html.count("&lt;script&gt;") >= 9
