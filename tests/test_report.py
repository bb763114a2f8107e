"""The one-page HTML screening report."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import numpy as np

from fmmtc_core.atlas import load_atlas
from fmmtc_core.report import glass_brain_png, screening_report_html, screening_report_pdf
from fmmtc_core.summary import ConnectionScore, RegionScore, ScreeningSummary

def _summary(**changes) -> ScreeningSummary:
    base = ScreeningSummary(
        participant="PAIN-<1>", probability=0.72, band=(0.61, 0.8),
        fold_probabilities=(0.6, 0.8), decision="likely responder",
        thresholds={"responder": 0.6, "non_responder": 0.4}, qc_verdict="warn",
        qc_reasons=("mean FD <b>0.3</b> mm",), model="demo",
        created_at=dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.timezone.utc), operator="alice",
        share_ts=0.2, share_fc=0.8,
        regions=(RegionScore(0, 1, "Precentral_L", "Frontal", 0.1, 0.4, 0.5),
                 RegionScore(1, 2, "Precentral_R", "Frontal", 0.0, -0.25, -0.25)),
        connections=(ConnectionScore(0, 1, 1, 2, 0.1),),
        networks={"Frontal": {"ts": 0.1, "fc": 0.15, "total": 0.25}}, ig_gap=0.004,
        ig_steps=16, baseline={"ts": "flat", "fc": "cohort_mean"}, screening_id=7,
        simulated=True)
    return replace(base, **changes)


def test_report_is_self_contained_and_escaped():
    html = screening_report_html(_summary(), png=b"\x89PNG fake")
    assert html.startswith("<!DOCTYPE html>")
    assert "PAIN-&lt;1&gt;" in html and "PAIN-<1>" not in html
    assert "mean FD &lt;b&gt;0.3&lt;/b&gt; mm" in html  # user-derived text is escaped
    assert "SIMULATED DATA" in html and "72%" in html and "likely responder" in html
    assert "data:image/png;base64," in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "Precentral_L" in html and "+0.5000" in html
    assert "<th>Operator</th><td>alice</td>" in html
    # the regions' group is their lobe, and the header says so (it said "network")
    assert "<th>lobe</th>" in html and "<th>network</th>" not in html
    assert "<th>Date and time</th><td>2026-11-25 10:00 UTC</td>" in html  # date, time, zone
    # the baseline in words, never a Python dict
    assert ("time series flat (every region at its median); connectivity at the training "
            "cohort&#39;s mean") in html and "{" not in html.split("</style>")[1]


def test_report_names_the_attribution_method():
    ig = screening_report_html(_summary())
    assert "Why: Integrated Gradients" in ig and "with 16 integration" in ig
    exact = screening_report_html(_summary(attribution_method="exact_linear_attribution",
                                           ig_steps=0, baseline={"fc": "cohort_mean"}))
    assert "Why: exact linear attribution" in exact and "Integrated Gradients" not in exact
    assert "(exact: the classic baseline is linear in its features)" in exact


def test_every_text_field_is_escaped():
    """Each value that can come from a user or the database is escaped: the test fails if any
    one field reaches the page as markup."""
    bad = "<script>alert(1)</script>"
    summary = _summary(participant=bad, operator=bad, model=bad, decision=bad, qc_verdict=bad,
                       qc_reasons=(bad,), baseline={"ts": bad},
                       regions=(RegionScore(0, 1, bad, bad, 0.1, 0.4, 0.5),),
                       networks={bad: {"ts": 0.1, "fc": 0.15, "total": 0.25}})
    html = screening_report_html(summary)
    assert "<script" not in html
    assert html.count("&lt;script&gt;") >= 9


def test_glass_brain_png():
    atlas = load_atlas("aal3")
    png = glass_brain_png(atlas, np.linspace(-1, 1, atlas.n_regions))
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_report_carries_the_model_validity_warning_first():
    from fmmtc_core.validity import model_validity

    demo = model_validity({"name": "demo", "data": {"simulated": True}})
    html = screening_report_html(_summary(validity=demo, simulated=False))
    banner = html.index("DEMONSTRATION MODEL - TRAINED ON SIMULATED DATA ONLY")
    assert banner < html.index("likely responder") and "says nothing about a real person" in html
    real = model_validity({"name": "m", "data": {"cohort": "c", "n_subjects": 9}})
    assert "NOT VALIDATED ON THIS SITE&#39;S DATA" in screening_report_html(
        _summary(validity=real))
    ok = model_validity({"name": "m", "data": {"n_subjects": 9},
                         "site_validation": {"site": "here"}})
    assert "VALIDATED ON" not in screening_report_html(_summary(validity=ok))


def _fresh_unsigned() -> ScreeningSummary:
    """A fresh screening by nobody signed in, without confounds, with uncovered regions."""
    from fmmtc_core.summary import QCNumbers

    qc = QCNumbers(n_volumes=200, tr_s=2.0, tsnr_median=48.25, n_regions=426,
                   uncovered_regions=("Thal_AV_L", "Cerebellum_10_R"), motion_known=False)
    return _summary(participant="PAIN-0001", operator="not signed in", screening_id=None,
                    qc=qc, simulated=False)


def test_report_of_a_fresh_screening_names_when_who_model_and_qc_numbers():
    html = screening_report_html(_fresh_unsigned(), png=b"\x89PNG fake")
    for fact in ("<th>Participant</th><td>PAIN-0001</td>",
                 "<th>Date and time</th><td>2026-11-25 10:00 UTC</td>",
                 "<th>Operator</th><td>not signed in</td>", "<th>Model</th><td>demo</td>",
                 "<th>Median tSNR</th><td>48.2</td>",
                 "<th>Mean framewise displacement</th><td>unknown (no confounds file",
                 "<th>Atlas regions covered</th><td>424 of 426</td>",
                 "<th>Uncovered regions</th><td>Thal_AV_L, Cerebellum_10_R</td>",
                 "MODEL TRAINING DATA UNKNOWN"):  # the summary names no card
        assert fact in html, fact
    assert ", ," not in html and "run by" not in html
    # the figures: probability scale, the glass brain given, the network chart
    assert html.count("data:image/png;base64,") == 3


def test_pdf_report_draws_what_the_html_says(monkeypatch):
    from fmmtc_core import report

    drawn = []
    put = report._PdfPages._put
    monkeypatch.setattr(report._PdfPages, "_put",
                        lambda self, x, text, size, **kw: (drawn.append(text),
                                                           put(self, x, text, size, **kw)))
    pdf = report.screening_report_pdf(_fresh_unsigned(), png=glass_brain_png(
        load_atlas("aal3"), np.linspace(-1, 1, 166)))
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ") >= 2
    assert b"FMM-TC screening report - PAIN-0001" in pdf  # the document's title
    text = " ".join(drawn)
    for fact in ("2026-11-25 10:00 UTC", "not signed in", "MODEL TRAINING DATA UNKNOWN",
                 "72% calibrated responder probability", "48.2", "424 of 426",
                 "Thal_AV_L, Cerebellum_10_R", "unknown (no confounds file", "Precentral_L",
                 "time series flat (every region at its median)"):
        assert fact in text, fact


def test_pdf_text_is_never_read_as_markup():
    bad = "$\\frac{1}{0}$ <b>x</b>"
    pdf = screening_report_pdf(_summary(participant="P1", operator=bad, qc_reasons=(bad,),
                                        regions=(RegionScore(0, 1, bad, bad, 0.1, 0.4, 0.5),)))
    assert pdf.startswith(b"%PDF-")
