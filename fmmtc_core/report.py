"""The screening report, as one self-contained HTML page (no scripts, no network) or a PDF.

Both formats render the same content (:func:`report_content`), built from the one
:class:`~fmmtc_core.summary.ScreeningSummary` that a fresh and a stored screening share, so
a report can be made for any past screening: who, when (date, time and time zone), the
model and what it is valid for, the prediction, the QC numbers behind the verdict (tSNR,
motion, coverage and the uncovered regions by name), the explanation with its figures.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from fmmtc_core import __version__
from fmmtc_core.summary import format_share

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fmmtc_core.atlas import Atlas
    from fmmtc_core.summary import ScreeningSummary
    from fmmtc_core.validity import ModelValidity

__all__ = ["glass_brain_png", "report_content", "ReportContent", "screening_report_html",
           "screening_report_pdf", "NOT_SIGNED_IN"]

#: What a report names as the operator when nobody was recorded.
NOT_SIGNED_IN = "not signed in"

#: The explanation's baselines, in words (keys and values as :func:`fmmtc_core.explain.explain`
#: records them).
_BASELINE_WORDS = {
    ("ts", "flat"): "time series flat (every region at its median)",
    ("fc", "cohort_mean"): "connectivity at the training cohort's mean",
    ("fc", "zero"): "no connectivity",
    ("amplitude", "cohort_mean"): "regional amplitude at the training cohort's mean",
}
_BRANCH_WORDS = {"ts": "time series", "fc": "connectivity", "amplitude": "regional amplitude"}


def glass_brain_png(atlas: Atlas, region_scores: ArrayLike) -> bytes:
    """The glass-brain map of region scores as PNG bytes.

    Parameters
    ----------
    atlas : Atlas
        The atlas of the screening's model (its label image carries the scores).
    region_scores : array-like of float (R,)
        One score per atlas region, in the atlas's order (logit units), e.g. the ``score``
        column of :func:`fmmtc_core.review.region_scores`.

    Returns
    -------
    bytes
        A PNG (110 dpi) of :func:`fmmtc_core.figures.glass_brain_figure`; the figure is closed.
    """
    import matplotlib.pyplot as plt

    from fmmtc_core.explain import region_map
    from fmmtc_core.figures import glass_brain_figure

    fig = glass_brain_figure(region_map(atlas, np.asarray(region_scores)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Content: what both formats say
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportContent:
    """What a report says, ready to lay out (every value is plain text).

    Attributes
    ----------
    title : str
        The report's title, with the participant.
    facts : list of (str, str)
        Screening id, participant, date and time (with time zone), operator, model, software.
    validity : ModelValidity
        What the model is valid for (the banner when it warns).
    simulated : bool
        The participant is simulated (demo data).
    prediction : list of str
        The probability, its band, the decision and the thresholds, in sentences.
    headline : (str, str, str)
        Probability, band and decision, short (for the big line).
    qc_verdict : str
    qc_rows : list of (str, str)
        The QC numbers: volumes, TR, tSNR, mean / max FD (or "unknown"), high-motion
        fraction, regions covered.
    uncovered : str
        The uncovered regions by name ("none" when all are covered).
    qc_reasons : list of str
    explanation : list of str
        Modality shares and what they mean, the baselines in words, the completeness gap.
    tables : list of dict
        ``title``, ``headers``, ``rows`` (strings): top regions, top connections, networks.
    figures : dict of str to bytes
        PNG figures by caption: the probability scale, the glass brain (when given), the
        network attributions (when the screening was explained).
    footer : str
    method : str, default="Integrated Gradients"
        How the attributions were computed: ``"Integrated Gradients"`` (FMM-TC) or
        ``"exact linear attribution"`` (a classic baseline, linear in its features).
    """

    title: str
    facts: list[tuple[str, str]]
    validity: ModelValidity
    simulated: bool
    prediction: list[str]
    headline: tuple[str, str, str]
    qc_verdict: str
    qc_rows: list[tuple[str, str]]
    uncovered: str
    qc_reasons: list[str]
    explanation: list[str]
    tables: list[dict]
    figures: dict[str, bytes] = field(default_factory=dict)
    footer: str = ""
    method: str = "Integrated Gradients"


def _when(t: dt.datetime) -> str:
    """Date, time and time zone: ``2026-11-25 10:00 UTC`` (a naive time is UTC)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    zone = t.tzname() or t.strftime("%z")
    if zone in ("UTC", "UTC+00:00"):
        zone = "UTC"
    return f"{t:%Y-%m-%d %H:%M} {zone}"


def _baseline_words(baseline: dict | None) -> str:
    if not baseline:
        return "not recorded"
    words = []
    for key, value in baseline.items():
        value = str(value)
        words.append(_BASELINE_WORDS.get((key, value))
                     or f"{_BRANCH_WORDS.get(key, key)} {value}")
    return "; ".join(words)


def _num(value, fmt: str, unknown: str = "not measured") -> str:
    return unknown if value is None or not np.isfinite(value) else format(value, fmt)


def report_content(summary: ScreeningSummary, *, png: bytes | None = None,
                   n_regions: int = 15, figures: bool = True) -> ReportContent:
    """What the report of a screening says (both :func:`screening_report_html` and
    :func:`screening_report_pdf` lay this out).

    Parameters
    ----------
    summary : ScreeningSummary
        The screening, fresh or stored; thresholds it lacks are taken from
        :data:`fmmtc_core.config.DEFAULT_THRESHOLDS`.
    png : bytes or None, default=None
        The glass brain (:func:`glass_brain_png`); None: the report has no brain map.
    n_regions : int, default=15
        Rows of the "Top regions" table (the connection table shows at most 10 rows, the
        network table all).
    figures : bool, default=True
        Draw the probability scale and the network chart (matplotlib); False leaves them out.

    Returns
    -------
    ReportContent
    """
    from fmmtc_core.config import DEFAULT_THRESHOLDS

    s = summary
    t = {**DEFAULT_THRESHOLDS, **s.thresholds}
    q = s.qc
    facts = [("Screening", "not stored" if s.screening_id is None else str(s.screening_id)),
             ("Participant", s.participant),
             ("Date and time", _when(s.created_at)),
             ("Operator", s.operator or NOT_SIGNED_IN),
             ("Model", s.model),
             ("Software", f"FMM-TC Screen {__version__}")]
    headline = (f"{s.probability:.0%}", f"{s.band[0]:.0%} - {s.band[1]:.0%}", s.decision)
    prediction = [
        f"Calibrated responder probability {s.probability:.0%} (band {headline[1]}: the "
        "spread of the cross-validation fold models).",
        f"Decision: {s.decision}. Likely responder if the whole band is at or above "
        f"{t['responder']:.0%}; likely non-responder if at or below {t['non_responder']:.0%}; "
        "otherwise uncertain.",
        f"Model {s.model}: {s.validity.valid_for}",
        f"Trained on: {s.validity.trained_on}.",
    ]
    fd = ("unknown (no confounds file with framewise displacement)" if q.fd_mean_mm is None
          else f"{q.fd_mean_mm:.2f} mm")
    qc_rows = [
        ("Volumes", "unknown" if q.n_volumes is None else str(q.n_volumes)),
        ("TR", _num(q.tr_s, "g", "unknown") + (" s" if q.tr_s is not None else "")),
        ("Median tSNR", _num(q.tsnr_median, ".1f", "not measured (region table: no voxels)")),
        ("Mean framewise displacement", fd),
        ("Largest framewise displacement",
         "unknown" if q.fd_max_mm is None else f"{q.fd_max_mm:.2f} mm"),
        ("High-motion volumes",
         "unknown" if q.frac_high_motion is None else f"{q.frac_high_motion:.0%}"),
        ("Atlas regions covered",
         "unknown" if q.n_covered is None else f"{q.n_covered} of {q.n_regions}"),
    ]
    uncovered = ", ".join(q.uncovered_regions) if q.uncovered_regions else (
        "none" if q.n_regions is not None else "not recorded")
    method = "exact linear attribution" if s.exact_attribution else "Integrated Gradients"
    if s.share_ts is None:
        explanation = ["This screening was not explained."]
    else:
        explanation = [
            f"Time series {format_share(s.share_ts)} and connectivity "
            f"{format_share(s.share_fc)} of the total absolute attribution ({method}): how much of the change from the baseline participant came through "
            "each modality. " + s.share_reason,
            "Scores are in logit units: red / positive pushed the prediction towards "
            "responder, blue / negative towards non-responder, relative to the baseline "
            f"participant ({_baseline_words(s.baseline)}).",
            f"Completeness gap {(s.ig_gap or 0):.2%} of |F(x) - F(baseline)|"
            + (" (exact: the classic baseline is linear in its features)." if s.exact_attribution
               else f" with {s.ig_steps} integration steps."),
        ]
    names = {r.label: r.name for r in s.regions}
    tables = [
        {"title": "Top regions", "headers": ["label", "region", "lobe", "score"],
         "rows": [(str(r.label), r.name, r.network, f"{r.score:+.4f}")
                  for r in s.regions[:n_regions]]},
        {"title": "Top connections", "headers": ["region", "region", "score"],
         "rows": [(str(names.get(c.label_i, c.label_i)), str(names.get(c.label_j, c.label_j)),
                   f"{c.score:+.4f}") for c in s.connections[:10]]},
        {"title": "Lobes", "headers": ["lobe", "time series", "connectivity", "total"],
         "rows": [(k, f"{v['ts']:+.3f}", f"{v['fc']:+.3f}", f"{v['total']:+.3f}")
                  for k, v in s.networks.items()]},
    ]
    figs: dict[str, bytes] = {}
    if figures:
        figs["Calibrated probability, its band and the decision zones"] = _png(
            _probability_figure(s.probability, s.band, t))
    if png:
        figs["Region scores on a glass brain (the strongest 10 % of the regions)"] = png
    if figures and s.networks:
        figs["Attribution per network / lobe: time series and connectivity"] = _png(
            _network_figure(s.networks))
    return ReportContent(
        title=f"FMM-TC screening report - {s.participant}", facts=facts, validity=s.validity,
        simulated=s.simulated, prediction=prediction, headline=headline,
        qc_verdict=s.qc_verdict, qc_rows=qc_rows, uncovered=uncovered,
        qc_reasons=list(s.qc_reasons), explanation=explanation, method=method,
        tables=[tb for tb in tables if tb["rows"]], figures=figs,
        footer=(f"FMM-TC Screen {__version__}. Research software; not a medical device. Raw "
                "images are not stored; the participant is identified by study pseudonym "
                "only."))


# --------------------------------------------------------------------------------------------
# Figures (matplotlib, without pyplot: safe off the main thread)
# --------------------------------------------------------------------------------------------
def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _probability_figure(probability: float, band, thresholds: dict) -> Figure:
    from matplotlib.figure import Figure

    lo_t, hi_t = thresholds["non_responder"], thresholds["responder"]
    fig = Figure(figsize=(7.0, 1.1))
    ax = fig.add_axes((0.03, 0.35, 0.94, 0.45))
    for x0, x1, color, label in ((0, lo_t, "#d6e6f2", "likely non-responder"),
                                 (lo_t, hi_t, "#eeeeee", "uncertain"),
                                 (hi_t, 1, "#f5d5d0", "likely responder")):
        ax.axvspan(x0, x1, color=color, lw=0)
        if x1 > x0:
            ax.text((x0 + x1) / 2, 1.12, label, ha="center", va="bottom", fontsize=8,
                    color="#555555", transform=ax.get_xaxis_transform(), parse_math=False)
    ax.plot([band[0], band[1]], [0.5, 0.5], color="#1d2a33", lw=5, solid_capstyle="butt",
            clip_on=False)
    # not clipped at the axes: a probability of 0 % or 100 % showed half a diamond
    ax.plot([probability], [0.5], marker="D", ms=11, color="#1d2a33", clip_on=False)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xticks(np.linspace(0, 1, 11), [f"{v:.0%}" for v in np.linspace(0, 1, 11)],
                  fontsize=7)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return fig


def _network_figure(networks: dict, n: int = 12) -> Figure:
    from matplotlib.figure import Figure

    from fmmtc_core.figures import FC_COLOR, TS_COLOR

    items = list(networks.items())[:n][::-1]  # strongest at the top
    fig = Figure(figsize=(7.0, 0.3 * len(items) + 0.8))
    ax = fig.add_subplot()
    y = np.arange(len(items))
    ax.barh(y - 0.2, [v["ts"] for _, v in items], 0.4, color=TS_COLOR, label="time series")
    ax.barh(y + 0.2, [v["fc"] for _, v in items], 0.4, color=FC_COLOR, label="connectivity")
    ax.set_yticks(y, [k for k, _ in items], fontsize=7)
    ax.axvline(0, color="#888888", lw=0.8)
    ax.set_xlabel("attribution (logit units; + towards responder)", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
#: The report page. Rendered by jinja2 with autoescaping on: every value from the database or
#: the user (pseudonym, operator, site, region names, QC reasons) is escaped; the images are
#: base64 PNGs produced here.
_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ c.title }}</title>
<style>
body{font-family:Helvetica,Arial,sans-serif;color:#1d2a33;max-width:960px;margin:24px auto;
font-size:13px} h1{font-size:20px;margin-bottom:2px} h2{font-size:15px;margin:18px 0 6px;
border-bottom:1px solid #ccd;} table{border-collapse:collapse;margin:4px 0}
td,th{border:1px solid #dde;padding:3px 8px;text-align:left} th{background:#f3f6f8}
.big{font-size:26px;font-weight:bold} .sim{background:#fff3cd;padding:6px;border:1px solid
#e0c060} .muted{color:#667} img{max-width:100%} .validity{background:#f8d7da;color:#58151c;
padding:8px;border:2px solid #b02a37;font-size:15px} .amber{background:#fff3cd;color:#664d03;
border-color:#e0a800} figure{margin:8px 0} figcaption{color:#667;font-size:12px}
</style></head><body>
<h1>FMM-TC Screen - screening report</h1>
<table class="facts">{% for k, v in c.facts %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>
{% endfor %}</table>
{% if c.validity.warn %}<p class='validity{{ "" if c.validity.severe else " amber" }}'>
<b>{{ c.validity.headline }}.</b> {{ c.validity.message }}</p>{% endif %}
{% if c.simulated %}<p class='sim'>SIMULATED DATA: this participant and scan were generated by
the software for demonstration; they are not a real person.</p>{% endif %}
<h2>Prediction</h2>
<p><span class="big">{{ c.headline[0] }}</span> calibrated responder probability, band
{{ c.headline[1] }}: <b>{{ c.headline[2] }}</b></p>
{% for line in c.prediction %}<p>{{ line }}</p>{% endfor %}
<h2>Scan quality: {{ c.qc_verdict }}</h2>
{% if c.qc_reasons %}<ul>{% for r in c.qc_reasons %}<li>{{ r }}</li>{% endfor %}</ul>{% endif %}
<table>{% for k, v in c.qc_rows %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
<tr><th>Uncovered regions</th><td>{{ c.uncovered }}</td></tr></table>
<h2>Why: {{ c.method }}</h2>
{% for line in c.explanation %}<p>{{ line }}</p>{% endfor %}
{% for caption, img in images %}<figure><img alt='{{ caption }}'
src='data:image/png;base64,{{ img }}'/><figcaption>{{ caption }}</figcaption></figure>
{% endfor %}
{% for table in c.tables %}<h2>{{ table.title }}</h2>
<table><thead><tr>{% for h in table.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in table.rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% endfor %}
<p class="muted">{{ c.footer }}</p>
</body></html>"""


def _environment():
    import jinja2

    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def screening_report_html(summary: ScreeningSummary, *, png: bytes | None = None,
                          n_regions: int = 15, figures: bool = True) -> str:
    """Render a screening (fresh or stored: the same :class:`ScreeningSummary`) as HTML.

    The page is self-contained (inline CSS and images, no scripts, no network) and every text
    value is escaped by the template engine (jinja2, autoescape on). It says what
    :func:`report_content` says: date, time and time zone, the operator (``"not signed in"``
    when none was recorded), the model and its validity warning, the prediction, the QC
    numbers with the uncovered regions by name, the explanation and its figures.

    Parameters
    ----------
    summary : ScreeningSummary
        The screening (:class:`fmmtc_core.summary.ScreeningSummary`).
    png : bytes or None, default=None
        The glass brain to embed, normally :func:`glass_brain_png`; None embeds none.
    n_regions : int, default=15
        Rows of the "Top regions" table.
    figures : bool, default=True
        Embed the probability scale and the network chart.

    Returns
    -------
    str
        The HTML page.
    """
    c = report_content(summary, png=png, n_regions=n_regions, figures=figures)
    images = [(caption, base64.b64encode(data).decode()) for caption, data in c.figures.items()]
    return _environment().from_string(_TEMPLATE).render(c=c, images=images)


# --------------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------------
class _PdfPages:
    """A4 pages filled top to bottom with text, boxes, tables and images (matplotlib's PDF
    backend, no pyplot)."""

    W, H, M = 8.27, 11.69, 0.6  # inches: A4 and its margin

    def __init__(self, pdf) -> None:
        self.pdf = pdf
        self.fig: Figure | None = None
        self.y = 0.0
        self.pages = 0

    @property
    def width(self) -> float:
        return self.W - 2 * self.M

    def _page(self) -> Figure:
        from matplotlib.figure import Figure

        self.close()
        self.fig = Figure(figsize=(self.W, self.H))
        self.y = self.H - self.M
        self.pages += 1
        return self.fig

    def close(self) -> None:
        if self.fig is not None:
            self.fig.text(0.5, self.M / 2 / self.H, f"page {self.pages}", ha="center",
                          fontsize=7, color="#666666")
            self.pdf.savefig(self.fig)
            self.fig = None

    def need(self, height: float) -> Figure:
        if self.fig is None or self.y - height < self.M:
            return self._page()
        return self.fig

    def _put(self, x: float, text: str, size: float, **kw) -> None:
        fig = self.need(size * 1.4 / 72)
        fig.text(x / self.W, (self.y - size / 72) / self.H, text, fontsize=size,
                 parse_math=False, va="baseline", **kw)

    def text(self, text: str, size: float = 9, *, weight: str = "normal",
             color: str = "#1d2a33", indent: float = 0.0, gap: float = 0.06,
             box: tuple[str, str] | None = None) -> None:
        # average glyph width of the default sans font: ~0.52 em, ~0.6 em in bold
        chars = int((self.width - indent) * 72 / ((0.6 if weight == "bold" else 0.52) * size))
        lines = textwrap.wrap(text, chars) or [""]
        step = size * 1.4 / 72
        if box is not None:  # a coloured box behind the lines, kept on one page
            from matplotlib.patches import Rectangle

            height = step * len(lines) + 0.12
            fig = self.need(height)
            fig.patches.append(Rectangle(
                ((self.M - 0.06) / self.W, (self.y - height) / self.H),
                (self.width + 0.12) / self.W, height / self.H, transform=fig.transFigure,
                facecolor=box[0], edgecolor=box[1], linewidth=1.5, zorder=0))
            self.y -= 0.06
        for line in lines:
            self.need(step)
            self._put(self.M + indent, line, size, weight=weight, color=color)
            self.y -= step
        self.y -= gap + (0.06 if box is not None else 0.0)

    def heading(self, text: str) -> None:
        self.need(0.9)  # a heading is never the last line of a page
        self.y -= 0.08
        self.text(text, 12, weight="bold", gap=0.04)

    def rows(self, rows, widths, *, header=None, size: float = 8) -> None:
        """A table: each cell cut to its column's width (fractions of the page width)."""
        xs = np.cumsum([0.0, *widths[:-1]]) * self.width + self.M
        step = size * 1.5 / 72
        for k, row in enumerate(([header] if header else []) + list(rows)):
            self.need(step)
            for x, w, cell in zip(xs, widths, row):
                room = max(4, int(w * self.width * 72 / (0.52 * size)) - 1)
                cell = str(cell)
                cell = cell if len(cell) <= room else cell[:room - 1] + "~"
                self._put(x, cell, size, weight="bold" if header and k == 0 else "normal",
                          color="#1d2a33")
            self.y -= step
        self.y -= 0.08

    def image(self, png: bytes, caption: str, max_height: float = 4.0) -> None:
        from matplotlib.image import imread

        img = imread(io.BytesIO(png), format="png")
        width = self.width
        height = width * img.shape[0] / img.shape[1]
        if height > max_height:
            width, height = width * max_height / height, max_height
        fig = self.need(height + 0.3)
        ax = fig.add_axes(((self.M) / self.W, (self.y - height) / self.H, width / self.W,
                           height / self.H))
        ax.imshow(img)
        ax.set_axis_off()
        self.y -= height + 0.05
        self.text(caption, 7.5, color="#666666", gap=0.12)


def screening_report_pdf(summary: ScreeningSummary, *, png: bytes | None = None,
                         n_regions: int = 15) -> bytes:
    """Render a screening (fresh or stored) as a PDF: what :func:`screening_report_html`
    shows, on A4 pages.

    Text is drawn with mathtext off, so no value is read as markup.

    Parameters
    ----------
    summary : ScreeningSummary
        The screening (:class:`fmmtc_core.summary.ScreeningSummary`).
    png : bytes or None, default=None
        The glass brain (:func:`glass_brain_png`); None: no brain map.
    n_regions : int, default=15
        Rows of the "Top regions" table.

    Returns
    -------
    bytes
        The PDF document (title and author metadata set; numbered pages).
    """
    from matplotlib.backends.backend_pdf import PdfPages

    c = report_content(summary, png=png, n_regions=n_regions)
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": c.title, "Creator": f"FMM-TC Screen {__version__}",
                                 "Subject": "Screening report"}) as pdf:
        p = _PdfPages(pdf)
        p.text("FMM-TC Screen - screening report", 16, weight="bold", gap=0.1)
        p.rows(c.facts, [0.25, 0.75], size=9)
        if c.validity.warn:
            colors = ("#f8d7da", "#b02a37") if c.validity.severe else ("#fff3cd", "#e0a800")
            p.text(f"{c.validity.headline}. {c.validity.message}", 10.5, weight="bold",
                   color="#58151c" if c.validity.severe else "#664d03", box=colors, gap=0.12)
        if c.simulated:
            p.text("SIMULATED DATA: this participant and scan were generated by the software "
                   "for demonstration; they are not a real person.", 9.5,
                   box=("#fff3cd", "#e0c060"), gap=0.12)
        p.heading("Prediction")
        p.text(f"{c.headline[0]} calibrated responder probability, band {c.headline[1]}: "
               f"{c.headline[2]}", 14, weight="bold")
        for line in c.prediction:
            p.text(line)
        captions = list(c.figures)
        if captions and captions[0].startswith("Calibrated probability"):
            p.image(c.figures[captions.pop(0)], "Calibrated probability, its band and the "
                    "decision zones", max_height=1.3)
        p.heading(f"Scan quality: {c.qc_verdict}")
        for reason in c.qc_reasons:
            p.text(f"- {reason}", indent=0.1)
        p.rows(c.qc_rows, [0.35, 0.65], size=8.5)
        p.text(f"Uncovered regions: {c.uncovered}", 8.5)
        p.heading(f"Why: {c.method}")
        for line in c.explanation:
            p.text(line)
        for caption in captions:
            p.image(c.figures[caption], caption, max_height=3.6)
        for table in c.tables:
            p.heading(table["title"])
            n = len(table["headers"])
            widths = {4: [0.1, 0.45, 0.3, 0.15], 3: [0.42, 0.42, 0.16]}.get(n, [1 / n] * n)
            if table["title"].startswith("Networks"):
                widths = [0.4, 0.2, 0.2, 0.2]
            p.rows(table["rows"], widths, header=table["headers"])
        p.text(c.footer, 7.5, color="#666666")
        p.close()
    return buf.getvalue()
