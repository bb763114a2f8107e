"""Plotly figures for the dashboard and reports (pure functions of plain data)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from numpy.typing import ArrayLike
from plotly.subplots import make_subplots

from fmmtc_core.config import FD_THRESHOLD_MM

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from nibabel.spatialimages import SpatialImage

__all__ = [
    "carpet_figure",
    "motion_figure",
    "connectivity_figure",
    "region_series_figure",
    "probability_svg",
    "brain3d_figure",
    "connectome_figure",
    "network_figure",
    "glass_brain_figure",
    "probability_histogram",
    "roc_figure",
    "calibration_figure",
    "compare_regions_figure",
    "shared_limit",
    "glass_brain_scale",
    "brain_map_png",
    "short_label",
    "png_bytes",
    "alignment_figure",
    "tsnr_figure",
    "fd_histogram",
    "attribution_slices_html",
    "RESPONDER_COLOR",
    "TS_COLOR",
    "FC_COLOR",
    "NON_RESPONDER_COLOR",
]

#: Attribution colours: towards responder (red) / towards non-responder (blue), as nilearn's
#: cold_hot map; used consistently on every page and in the report.
RESPONDER_COLOR = "#c0392b"
NON_RESPONDER_COLOR = "#2471a3"
#: Modality colours (never red / blue, which mean towards responder / non-responder).
TS_COLOR, FC_COLOR = "#8e7cc3", "#e69138"
_DIVERGING = [[0.0, NON_RESPONDER_COLOR], [0.5, "#f2f2f2"], [1.0, RESPONDER_COLOR]]

_FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=13)

#: Longest tick label (characters) on a bar chart's category axis: a region name beyond it is
#: shortened in the middle (its full name is in the hover). 30 characters of 13 px text take
#: about 200 px, which leaves the bars most of a half-width panel (compare mode at 1280 px).
MAX_LABEL_CHARS = 30
#: Group names (HCP-MMP sections) are wrapped onto lines of at most this many characters.
WRAP_CHARS = 24
#: A legend sits above the plot area, left-aligned, in one row: it never covers the bars, the
#: tick labels or the axis title (a legend below the plot collides with rotated labels).
_LEGEND_ON_TOP = dict(orientation="h", x=0, xanchor="left", y=1.02, yanchor="bottom")
#: The attribution axis's title, on two short lines: plotly widens the margins to fit an axis
#: title, so one long line squeezes the plot of a half-width panel (or is cut).
_SCORE_AXIS = "{what} (logit units)<br>+ towards responder"


def _layout(fig: go.Figure, height: int, title: str | None = None) -> go.Figure:
    legend = fig.layout.showlegend is not False and len(fig.data) > 1
    fig.update_layout(
        height=height,
        margin=dict(l=60, r=20, t=(40 if title else 10) + (30 if legend else 0), b=40),
        font=_FONT,
        title=dict(text=title, x=0, font=dict(size=15)) if title else None,
        plot_bgcolor="white",
        paper_bgcolor="white",
    )
    if title and legend:  # the legend row sits between the title and the plot
        fig.update_layout(title=dict(y=1.0, yanchor="top", yref="container", pad=dict(t=8)))
    # Margins grow to fit the tick labels and axis titles instead of clipping them.
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def short_label(name: str, limit: int = MAX_LABEL_CHARS) -> str:
    """A region name shortened in the middle to at most ``limit`` characters.

    The start (what the region is) and the end (its hemisphere suffix) are kept:
    ``"Area_TemporoParietoOccipital_Junction_1_L"`` -> ``"Area_TemporoPar…Junction_1_L"``.

    Parameters
    ----------
    name : str
        The label.
    limit : int, default=MAX_LABEL_CHARS
        Most characters returned (at least 5).

    Returns
    -------
    str
        ``name`` itself when short enough, else its start, ``"…"`` and its end.
    """
    name = str(name)
    limit = max(int(limit), 5)
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    head = limit - 1 - tail
    return f"{name[:head]}…{name[-tail:]}"


def _wrap(text: str, width: int = WRAP_CHARS) -> str:
    """``text`` broken at spaces into lines of at most ``width`` characters (``<br>``)."""
    lines: list[str] = []
    for word in str(text).split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines)


def shared_limit(*values: ArrayLike) -> float:
    """One symmetric colour / axis limit for several score arrays: the largest ``|value|``.

    Parameters
    ----------
    *values : array-like of float
        Score arrays (e.g. the region scores of two screenings shown side by side); NaN is
        ignored.

    Returns
    -------
    float
        ``max |value|`` over all arrays; 1.0 when there is none or all are 0, so that a scale
        ``-limit .. limit`` is always valid.
    """
    tops = [float(np.nanmax(np.abs(a))) for a in (np.asarray(v, dtype=float) for v in values)
            if a.size and np.isfinite(a).any()]
    top = max(tops, default=0.0)
    return top if top > 0 else 1.0


def glass_brain_scale(*scores: ArrayLike) -> tuple[float, float]:
    """The colour scale and threshold that :func:`glass_brain_figure` would choose, for
    several maps at once (compare mode: both maps on one scale).

    Parameters
    ----------
    *scores : array-like of float
        Region scores of each map (logit units).

    Returns
    -------
    vmax : float
        :func:`shared_limit` of all scores: every map runs from ``-vmax`` to ``vmax``.
    threshold : float
        The 90th percentile of the distinct non-zero ``|score|`` values of all maps together,
        at most ``0.99 * vmax`` (0 when there are none): the same rule as a single map's.
    """
    vmax = shared_limit(*scores)
    flat = (np.concatenate([np.ravel(np.asarray(s, dtype=float)) for s in scores]) if scores
            else np.zeros(1))
    values = np.unique(np.abs(flat[np.isfinite(flat) & (flat != 0)]))
    threshold = float(np.quantile(values, 0.9)) if values.size else 0.0
    return vmax, min(threshold, 0.99 * vmax)


def carpet_figure(carpet: np.ndarray, regions: np.ndarray, groups: Sequence[str],
                  tr: float) -> go.Figure:
    """Carpet plot: z-scored voxel series (rows, ordered by atlas region) over time (s).

    Parameters
    ----------
    carpet : ndarray (n_voxels, T)
        Voxel series, each z-scored over time (:attr:`fmmtc_core.qc.QCReport.carpet`); more
        than 400 rows are thinned to 400 evenly spaced ones. Shown on a fixed -2.5 to 2.5
        grey scale.
    regions : ndarray (n_voxels,) of int
        Region position (index into ``groups``) of each row
        (:attr:`fmmtc_core.qc.QCReport.carpet_regions`).
    groups : sequence of str
        The atlas's group (lobe) per region; shown when hovering over a row.
    tr : float
        Repetition time, seconds (the x axis is in seconds).

    Returns
    -------
    plotly.graph_objects.Figure
        A heatmap, 320 px high.
    """
    if carpet.shape[0] > 400:  # what a screen can show; keeps the figure light to send
        keep = np.linspace(0, carpet.shape[0] - 1, 400).round().astype(int)
        carpet, regions = carpet[keep], np.asarray(regions)[keep]
    t = np.arange(carpet.shape[1]) * tr
    row_group = [groups[r] for r in regions]
    fig = go.Figure(
        go.Heatmap(
            z=carpet,
            x=t,
            zmin=-2.5,
            zmax=2.5,
            colorscale="Greys_r",
            colorbar=dict(title="z", thickness=10),
            customdata=np.array(row_group, dtype=object)[:, None].repeat(carpet.shape[1], 1),
            hovertemplate="t=%{x:.0f} s<br>%{customdata}<br>z=%{z:.2f}<extra></extra>",
        )
    )
    fig.update_yaxes(title="voxels (by region)", showticklabels=False)
    fig.update_xaxes(title="time (s)")
    return _layout(fig, 320)


def motion_figure(tr: float, fd: ArrayLike | None = None, dvars: ArrayLike | None = None,
                  fd_threshold: float = FD_THRESHOLD_MM) -> go.Figure:
    """Framewise displacement (mm) and DVARS (% signal) over time (s).

    One panel per series given (shared time axis); the first volume is left blank in each,
    since no change is defined for it.

    Parameters
    ----------
    tr : float
        Repetition time, seconds.
    fd : array-like of float (T,) or None, default=None
        Framewise displacement per volume, mm (fMRIPrep's ``framewise_displacement``); None
        leaves out its panel.
    dvars : array-like of float (T,) or None, default=None
        DVARS per volume, in percent of the mean signal (:attr:`fmmtc_core.qc.QCReport.dvars`);
        None leaves out its panel.
    fd_threshold : float, default=FD_THRESHOLD_MM
        Drawn as a dotted line on the FD panel: the high-motion limit, mm (default 0.5).

    Returns
    -------
    plotly.graph_objects.Figure
        140 px per panel plus 60 px; a single empty panel when neither series is given.
    """
    rows = [r for r in (("FD (mm)", fd), ("DVARS (%)", dvars)) if r[1] is not None]
    fig = make_subplots(rows=max(len(rows), 1), cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for i, (name, y) in enumerate(rows, 1):
        y = np.asarray(y, dtype=float).copy()
        y[0] = np.nan  # no change is defined for the first volume
        t = np.arange(y.size) * tr
        fig.add_trace(go.Scatter(x=t, y=y, mode="lines", name=name,
                                 line=dict(width=1.5, color="#2a6f97")), row=i, col=1)
        fig.update_yaxes(title=name, row=i, col=1)
        if name.startswith("FD"):
            fig.add_hline(y=fd_threshold, line=dict(color="#c0392b", dash="dot", width=1),
                          row=i, col=1)
    fig.update_xaxes(title="time (s)", row=max(len(rows), 1), col=1)
    fig.update_layout(showlegend=False)
    return _layout(fig, 140 * max(len(rows), 1) + 60)


def connectivity_figure(matrix: np.ndarray, names: Sequence[str], groups: Sequence[str], *,
                        fisher: bool = True) -> go.Figure:
    """Region x region connectivity heatmap, regions ordered by group (lobe).

    The colour scale is symmetric around 0, clipped at the 99th percentile of the absolute
    values.

    Parameters
    ----------
    matrix : ndarray (R, R)
        Connectivity in the atlas's region order (e.g.
        :func:`fmmtc_core.review.scan_connectivity`).
    names, groups : sequence of str
        The atlas's region names and groups (lobes), in the same order (hover labels and row
        order; the order within a group is kept).
    fisher : bool, default=True
        Whether ``matrix`` holds Fisher z (else Pearson r); only the colour bar's title changes.

    Returns
    -------
    plotly.graph_objects.Figure
        A heatmap, 460 px high.
    """
    order = np.argsort(np.asarray(groups, dtype=object), kind="stable")
    m = np.asarray(matrix)[np.ix_(order, order)]
    labels = [f"{names[i]} ({groups[i]})" for i in order]
    lim = float(np.nanpercentile(np.abs(m), 99)) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=labels,
            y=labels,
            zmin=-lim,
            zmax=lim,
            colorscale="RdBu_r",
            colorbar=dict(title="Fisher z" if fisher else "r", thickness=10),
            hovertemplate="%{y}<br>%{x}<br>%{z:.2f}<extra></extra>",
        )
    )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    return _layout(fig, 460)


def region_series_figure(data: np.ndarray, names: Sequence[str], tr: float,
                         columns: Iterable[int]) -> go.Figure:
    """Time series of a few regions over time (s), one line each on a shared axis.

    Parameters
    ----------
    data : ndarray (T, R)
        Region series (e.g. :attr:`fmmtc_core.preprocess.RegionSignals.data`).
    names : sequence of str
        The atlas's region names (the legend, above the plot; names longer than
        :data:`MAX_LABEL_CHARS` are shortened in the middle, the full name is in the hover).
    tr : float
        Repetition time, seconds.
    columns : iterable of int
        The regions to draw (column indices of ``data``), e.g.
        :func:`fmmtc_core.review.complete_regions`.

    Returns
    -------
    plotly.graph_objects.Figure
        Line plot, 300 px high.
    """
    fig = go.Figure()
    t = np.arange(data.shape[0]) * tr
    for c in columns:
        fig.add_trace(go.Scatter(x=t, y=data[:, c], mode="lines", name=short_label(names[c]),
                                 line=dict(width=1.3), hovertext=names[c],
                                 hovertemplate="%{hovertext}<br>t=%{x:.0f} s<br>%{y:.2f}"
                                               "<extra></extra>"))
    fig.update_xaxes(title="time (s)")
    fig.update_yaxes(title="signal")
    fig.update_layout(legend=_LEGEND_ON_TOP)
    return _layout(fig, 300)


# --------------------------------------------------------------------------------------------
# Screening results and explanations
# --------------------------------------------------------------------------------------------
def probability_svg(probability: float, band: Sequence[float], thresholds: dict) -> str:
    """The calibrated probability on a 0-1 scale with its band and the decision zones, as a
    self-contained inline SVG (no JavaScript).

    The result card shows it: unlike a Plotly figure (the page's first one), it needs no
    plotly.js loaded and run in the browser before the decision is painted.

    Parameters
    ----------
    probability : float
        Calibrated responder probability.
    band : sequence of 2 float
        Its uncertainty band (low, high).
    thresholds : dict
        ``{"non_responder": float, "responder": float}``: the zone edges.

    Returns
    -------
    str
        An ``<svg>`` element that scales to the width of its container (viewBox 700 x 130),
        with a ``<title>`` per mark for screen readers and hover.
    """
    from html import escape

    lo_t, hi_t = float(thresholds["non_responder"]), float(thresholds["responder"])
    p = min(max(float(probability), 0.0), 1.0)
    b0, b1 = (min(max(float(v), 0.0), 1.0) for v in band)
    left, width, top, height = 20.0, 660.0, 46.0, 44.0

    def x(v: float) -> float:
        return left + width * v

    parts = []
    zones = [(0.0, lo_t, "#d6e6f2", "likely non-responder"), (lo_t, hi_t, "#eeeeee", "uncertain"),
             (hi_t, 1.0, "#f5d5d0", "likely responder")]
    for z0, z1, color, label in zones:
        if z1 <= z0:
            continue
        parts.append(f'<rect x="{x(z0):.1f}" y="{top}" width="{width * (z1 - z0):.1f}" '
                     f'height="{height}" fill="{color}"/>')
        # A zone under half the scale gets its label on two lines ("likely" above
        # "non-responder"): on one line, labels of neighbouring zones ran into each other.
        lines = label.split(" ", 1) if z1 - z0 < 0.5 and " " in label else [label]
        cx = x((z0 + z1) / 2)
        for k, line in enumerate(lines):
            y = top - 8 - 15 * (len(lines) - 1 - k)
            parts.append(f'<text x="{cx:.1f}" y="{y:.1f}" text-anchor="middle" font-size="12" '
                         f'fill="#555">{escape(line)}</text>')
    axis_y = top + height
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + width}" y2="{axis_y}" '
                 'stroke="#888" stroke-width="1"/>')
    for tick in np.linspace(0, 1, 6):
        tx = x(float(tick))
        parts.append(f'<line x1="{tx:.1f}" y1="{axis_y}" x2="{tx:.1f}" y2="{axis_y + 5}" '
                     'stroke="#888" stroke-width="1"/>')
        parts.append(f'<text x="{tx:.1f}" y="{axis_y + 20}" text-anchor="middle" '
                     f'font-size="12" fill="#444">{tick:.0%}</text>')
    mid = top + height / 2
    parts.append(f'<line x1="{x(b0):.1f}" y1="{mid}" x2="{x(b1):.1f}" y2="{mid}" '
                 f'stroke="#1d2a33" stroke-width="6"><title>band {b0:.0%} - {b1:.0%}</title>'
                 '</line>')
    d = 9.0  # the diamond's half diagonal; drawn whole at 0 % and 100 % (the margin has room)
    px = x(p)
    parts.append(f'<path d="M{px:.1f},{mid - d} L{px + d:.1f},{mid} L{px:.1f},{mid + d} '
                 f'L{px - d:.1f},{mid} Z" fill="#1d2a33"><title>probability {p:.0%}</title>'
                 '</path>')
    label = (f"Responder probability {p:.0%}, band {b0:.0%} to {b1:.0%}; zones: likely "
             f"non-responder below {lo_t:.0%}, likely responder above {hi_t:.0%}")
    return ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 700 130" width="100%" '
            f'role="img" aria-label="{escape(label)}" '
            'style="max-width:100%;height:auto;font-family:Inter, Segoe UI, Helvetica, Arial, '
            f'sans-serif">{"".join(parts)}</svg>')


def _sizes(scores, lo=4.0, hi=22.0):
    a = np.abs(np.asarray(scores, dtype=float))
    top = a.max() if a.size and a.max() > 0 else 1.0
    return lo + (hi - lo) * np.sqrt(a / top)


def brain3d_figure(centroids: ArrayLike, scores: ArrayLike, names: Sequence[str],
                   groups: Sequence[str], *, title: str | None = None) -> go.Figure:
    """Region centroids in MNI space, sized by |score| and coloured by its sign and size.

    Parameters
    ----------
    centroids : array-like (R, 3)
        Region centroids, MNI mm (:attr:`fmmtc_core.atlas.Atlas.centroids_mm`).
    scores : array-like (R,)
        Region scores (logit units), in the same order; red towards responder, blue towards
        non-responder, on a scale symmetric around 0.
    names, groups : sequence of str
        Region names and groups (hover labels).
    title : str or None, default=None

    Returns
    -------
    plotly.graph_objects.Figure
        A 3D scatter plot, 480 px high.
    """
    c = np.asarray(centroids, dtype=float)
    s = np.asarray(scores, dtype=float)
    lim = float(np.abs(s).max()) or 1.0
    fig = go.Figure(go.Scatter3d(
        x=c[:, 0], y=c[:, 1], z=c[:, 2], mode="markers",
        marker=dict(size=_sizes(s), color=s, colorscale=_DIVERGING, cmin=-lim, cmax=lim,
                    colorbar=dict(title="score", thickness=12), opacity=0.9,
                    line=dict(width=0)),
        text=[f"{n} ({g})" for n, g in zip(names, groups)], customdata=s,
        hovertemplate="%{text}<br>score %{customdata:+.3f}<extra></extra>"))
    axis = dict(showbackground=False, showgrid=False, zeroline=False, title="")
    fig.update_layout(scene=dict(xaxis=dict(axis, title="x (L-R)"),
                                 yaxis=dict(axis, title="y (P-A)"),
                                 zaxis=dict(axis, title="z (I-S)"), aspectmode="data"),
                      scene_camera=dict(eye=dict(x=0.0, y=-1.6, z=0.9)))
    return _layout(fig, 480, title)


def connectome_figure(centroids: ArrayLike, connections: list[dict], names: Sequence[str], *,
                      title: str | None = None) -> go.Figure:
    """The top connections as lines between region centroids (red: towards responder).

    Parameters
    ----------
    centroids : array-like (R, 3)
        Region centroids, MNI mm (:attr:`fmmtc_core.atlas.Atlas.centroids_mm`).
    connections : list of dict
        One per connection, with ``i`` and ``j`` (region indices) and ``score`` (logit units);
        the line width grows with ``|score|``. An empty list draws the centroids only.
    names : sequence of str
        Region names (hover labels).
    title : str or None, default=None

    Returns
    -------
    plotly.graph_objects.Figure
        A 3D figure, 440 px high.
    """
    c = np.asarray(centroids, dtype=float)
    fig = go.Figure()
    if connections:
        top = max(abs(k["score"]) for k in connections) or 1.0
        for k in connections:
            i, j, sc = k["i"], k["j"], k["score"]
            fig.add_trace(go.Scatter3d(
                x=c[[i, j], 0], y=c[[i, j], 1], z=c[[i, j], 2], mode="lines",
                line=dict(width=2 + 8 * abs(sc) / top,
                          color=RESPONDER_COLOR if sc > 0 else NON_RESPONDER_COLOR),
                hovertext=f"{names[i]} - {names[j]}: {sc:+.3f}", hoverinfo="text",
                showlegend=False))
        nodes = sorted({k["i"] for k in connections} | {k["j"] for k in connections})
        fig.add_trace(go.Scatter3d(
            x=c[nodes, 0], y=c[nodes, 1], z=c[nodes, 2], mode="markers",
            marker=dict(size=5, color="#1d2a33"), text=[names[n] for n in nodes],
            hoverinfo="text", showlegend=False))
    fig.add_trace(go.Scatter3d(x=c[:, 0], y=c[:, 1], z=c[:, 2], mode="markers",
                               marker=dict(size=1.5, color="#bbbbbb"), hoverinfo="skip",
                               showlegend=False))
    axis = dict(showbackground=False, showgrid=False, zeroline=False, title="",
                showticklabels=False)
    fig.update_layout(scene=dict(xaxis=axis, yaxis=axis, zaxis=axis, aspectmode="data"),
                      scene_camera=dict(eye=dict(x=0.0, y=-1.6, z=0.9)))
    return _layout(fig, 440, title)


def network_figure(networks: dict, *, title: str | None = None, group_title: str = "Lobe",
                   value_range: tuple[float, float] | None = None) -> go.Figure:
    """Per anatomical group (lobe, HCP-MMP section): time-series and connectivity attribution
    side by side.

    Parameters
    ----------
    networks : dict
        Group name -> ``{"ts": float, "fc": float, ...}`` (logit units), drawn in its order
        from the top (:func:`fmmtc_core.review.group_attributions`,
        :attr:`fmmtc_core.summary.ScreeningSummary.networks`).
    title : str or None, default=None
    group_title : str, default="Lobe"
        What the groups are (the group axis's title), e.g.
        :data:`fmmtc_core.anatomy.GROUPINGS` ``["section"]``.
    value_range : tuple of 2 float or None, default=None
        Fixed attribution axis range (compare mode: the same for both panels); None fits the
        data.

    Returns
    -------
    plotly.graph_objects.Figure
        Grouped horizontal bars, the legend above them; group names are wrapped onto lines of
        at most :data:`WRAP_CHARS` characters (full names in the hover); 110 px plus 38 px
        per group (14 px more per extra line) high.
    """
    names = list(networks)
    shown = [_wrap(n) for n in names]
    lines = max((t.count("<br>") + 1 for t in shown), default=1)
    fig = go.Figure([
        go.Bar(y=shown, x=[networks[n]["ts"] for n in names], name="time series",
               orientation="h", marker_color=TS_COLOR, customdata=names,
               hovertemplate="%{customdata}<br>time series %{x:+.3f}<extra></extra>"),
        go.Bar(y=shown, x=[networks[n]["fc"] for n in names], name="connectivity",
               orientation="h", marker_color=FC_COLOR, customdata=names,
               hovertemplate="%{customdata}<br>connectivity %{x:+.3f}<extra></extra>"),
    ])
    fig.update_layout(barmode="group", legend=_LEGEND_ON_TOP)
    fig.update_yaxes(autorange="reversed", title=group_title)
    fig.update_xaxes(title=_SCORE_AXIS.format(what="attribution"), zeroline=True,
                     zerolinecolor="#999")
    if value_range is not None:
        fig.update_xaxes(range=list(value_range), autorange=False)
    return _layout(fig, 110 + (24 + 14 * lines) * len(names), title)


def glass_brain_figure(img: SpatialImage, *, title: str | None = None,
                       vmax: float | None = None, threshold: float | None = None) -> Figure:
    """A nilearn glass brain of a region-score map (matplotlib figure; red +, blue -).

    Switches matplotlib to its non-interactive ``Agg`` backend (a failure to switch is
    ignored).

    Parameters
    ----------
    img : nibabel image
        3D map of region scores (:func:`fmmtc_core.explain.region_map`).
    title : str or None, default=None
    vmax : float or None, default=None
        Colour-scale limit (the scale runs from ``-vmax`` to ``vmax``); None (or 0): the
        largest absolute value of the map (1 for an all-zero map).
    threshold : float or None, default=None
        Absolute values below it are hidden. None shows the strongest ~10 % of the distinct
        non-zero values (their 90th percentile, at most ``0.99 * vmax``), so the map points at
        a few places instead of painting the whole brain.

    Returns
    -------
    matplotlib.figure.Figure
        10 x 3.2 inches, four views (``lyrz``); close it after use
        (``matplotlib.pyplot.close``).
    """
    plt = _matplotlib()
    from nilearn import plotting

    data = np.asanyarray(img.dataobj)
    vmax = vmax or float(np.abs(data).max()) or 1.0
    if threshold is None:
        values = np.unique(np.abs(data[data != 0]))
        threshold = float(np.quantile(values, 0.9)) if values.size else 0.0
        threshold = min(threshold, 0.99 * vmax)
    fig = plt.figure(figsize=(10, 3.2))
    display = plotting.plot_glass_brain(img, figure=fig, display_mode="lyrz", plot_abs=False,
                                        colorbar=True, cmap="cold_hot", vmax=vmax,
                                        vmin=-vmax, threshold=threshold, title=title)
    cbar = getattr(display, "_cbar", None)
    if cbar is not None:
        # nilearn adds +-threshold to the colour bar's ticks: a small threshold printed
        # "0.025" over "-0.025" in the report at 1280 px. Ticks at the limits and halves,
        # and +-threshold only where it has room (the grey band still marks it).
        ticks = [-vmax, -vmax / 2, vmax / 2, vmax]
        ticks += [-threshold, threshold] if threshold >= 0.15 * vmax else [0.0]
        cbar.set_ticks(sorted(ticks))
        cbar.set_ticklabels([f"{t:.2g}" for t in sorted(ticks)])
    return fig


def _matplotlib():
    """matplotlib.pyplot on the non-interactive ``Agg`` backend, its caches under ours."""
    from fmmtc_core.config import use_cache_dir_for_libraries

    use_cache_dir_for_libraries()  # before matplotlib is imported: no font cache in ~/.cache
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Figure, *, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    dpi : int, default=110

    Returns
    -------
    bytes
        The PNG, cropped to what is drawn.
    """
    import io

    plt = _matplotlib()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


#: Axial slices shown by the QC maps (MNI z, mm): from the cerebellum to the vertex.
QC_SLICES_Z = (-30, -12, 6, 24, 42, 60)


def alignment_figure(mean_img: SpatialImage, labels_img: SpatialImage, *,
                     title: str | None = None) -> Figure:
    """The scan's mean image with the atlas's outline: is the scan where the atlas expects it?

    The outline is the outer edge of the atlas's brain (its labelled voxels, closed and with
    the white matter between them filled) projected onto the scan's grid; a scan that is not in
    MNI space, flipped or shifted shows the brain and the outline apart. MRIQC draws the same
    check against its template.

    Parameters
    ----------
    mean_img : nibabel image
        The mean over time (:attr:`fmmtc_core.review.ScanImages.mean`).
    labels_img : nibabel image
        The atlas labels on the same grid (:attr:`fmmtc_core.review.ScanImages.labels`).
    title : str or None, default=None

    Returns
    -------
    matplotlib.figure.Figure
        10 x 2.4 inches, axial slices at :data:`QC_SLICES_Z` (grey scale, outline in red);
        close it after use (or pass it to :func:`png_bytes`).
    """
    import nibabel as nib
    from scipy import ndimage

    plt = _matplotlib()
    from nilearn import plotting

    labels = np.asanyarray(labels_img.dataobj)
    # The labels cover grey matter: close the gaps and fill the white matter, so the outline
    # is the brain's edge rather than every sulcus.
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(labels > 0, iterations=2))
    mask = nib.Nifti1Image(np.asarray(brain, dtype=np.int8), labels_img.affine)
    fig = plt.figure(figsize=(10, 2.4))
    display = plotting.plot_epi(mean_img, figure=fig, display_mode="z", cut_coords=QC_SLICES_Z,
                                cmap="gray", colorbar=False, title=title, black_bg=True,
                                draw_cross=False, annotate=True)
    if labels.any():
        display.add_contours(mask, levels=[0.5], colors=[RESPONDER_COLOR], linewidths=1.2)
    return fig


def tsnr_figure(tsnr_img: SpatialImage, *, title: str | None = None,
                vmax: float | None = None) -> Figure:
    """The voxel-wise temporal SNR map (mean / SD over time) on axial slices.

    Parameters
    ----------
    tsnr_img : nibabel image
        :attr:`fmmtc_core.review.ScanImages.tsnr` (0 outside the scan's brain).
    title : str or None, default=None
    vmax : float or None, default=None
        Top of the colour scale; None: the 99th percentile of the non-zero voxels (a few very
        high voxels do not wash out the map).

    Returns
    -------
    matplotlib.figure.Figure
        10 x 2.4 inches, axial slices at :data:`QC_SLICES_Z`, scale from 0 (dark) to ``vmax``
        (bright), with a colour bar; close it after use (or pass it to :func:`png_bytes`).
    """
    plt = _matplotlib()
    from nilearn import plotting

    data = np.asanyarray(tsnr_img.dataobj)
    values = data[np.isfinite(data) & (data > 0)]
    if vmax is None:
        vmax = float(np.percentile(values, 99)) if values.size else 1.0
    fig = plt.figure(figsize=(10, 2.4))
    plotting.plot_img(tsnr_img, figure=fig, display_mode="z", cut_coords=QC_SLICES_Z,
                      cmap="inferno", vmin=0.0, vmax=max(vmax, 1e-6), colorbar=True,
                      title=title, black_bg=True, draw_cross=False, annotate=True)
    return fig


def fd_histogram(fd: ArrayLike, threshold: float = FD_THRESHOLD_MM) -> go.Figure:
    """How framewise displacement is distributed over the volumes, with the high-motion limit.

    Parameters
    ----------
    fd : array-like of float (T,)
        Framewise displacement per volume, mm (fMRIPrep's ``framewise_displacement``); the first
        volume (no change defined) and non-finite values are left out.
    threshold : float, default=FD_THRESHOLD_MM
        The high-motion limit, mm: a dashed line, with the number of volumes above it.

    Returns
    -------
    plotly.graph_objects.Figure
        Bars of 0.05 mm (volumes above the limit in red), 300 px high.
    """
    values = np.asarray(fd, dtype=float)[1:]
    values = values[np.isfinite(values)]
    above = int((values > threshold).sum())
    size = 0.05
    top = max(float(values.max()) if values.size else 0.0, threshold) + size
    bins = dict(start=0.0, end=top, size=size)
    fig = go.Figure([
        go.Histogram(x=values[values <= threshold], xbins=bins, name="at or under the limit",
                     marker_color="#2a6f97"),
        go.Histogram(x=values[values > threshold], xbins=bins, name="above the limit",
                     marker_color=RESPONDER_COLOR),
    ])
    fig.update_layout(barmode="stack", legend=_LEGEND_ON_TOP)
    fig.add_vline(x=threshold, line_dash="dash", line_color="#1d2a33",
                  annotation_text=f"{threshold:g} mm: {above} of {values.size} volumes above",
                  annotation_position="top right")
    fig.update_xaxes(title="framewise displacement (mm)", range=[0, top])
    fig.update_yaxes(title="volumes")
    return _layout(fig, 300)


def attribution_slices_html(img: SpatialImage, *, threshold: float, vmax: float,
                            title: str | None = None, width: int = 600) -> str:
    """Interactive slices of an attribution map (nilearn's ``view_img``) as a standalone page.

    Click to move through the brain; regions whose ``|score|`` is under ``threshold`` are
    transparent. Everything the page needs (scripts, the MNI152 background) is inside it: it
    loads nothing from the network.

    Parameters
    ----------
    img : nibabel image
        3D map of region scores (:func:`fmmtc_core.explain.region_map`), MNI space.
    threshold : float
        Scores with a smaller absolute value are not shown.
    vmax : float
        Colour-scale limit (``-vmax`` blue to ``+vmax`` red, nilearn's cold_hot); share it
        between maps that are compared (:func:`glass_brain_scale`).
    title : str or None, default=None
    width : int, default=600
        Width of the three slices together, px (they are about half as high).

    Returns
    -------
    str
        An HTML document (a few hundred kB: its scripts and images are inlined).
    """
    import re
    import warnings

    from nilearn.plotting import view_img

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's notes on masked arrays and thresholds
        view = view_img(img, threshold=max(float(threshold), 1e-6), vmax=max(float(vmax), 1e-6),
                        symmetric_cmap=True, cmap="cold_hot", title=title, black_bg=False,
                        colorbar=True, resampling_interpolation="nearest",
                        width_view=int(width))
    # nilearn links a favicon on github.com: drop it, the page must not reach the network.
    return re.sub(r"<link[^>]*rel=\"icon\"[^>]*/?>", "", view.get_standalone())


def brain_map_png(img: SpatialImage, *, vmax: float | None = None,
                  threshold: float | None = None, title: str | None = None,
                  dpi: int = 110) -> bytes:
    """:func:`glass_brain_figure` as PNG bytes (the figure is closed).

    Parameters
    ----------
    img : nibabel image
        3D map of region scores (:func:`fmmtc_core.explain.region_map`).
    vmax : float or None, default=None
        Colour-scale limit; give two maps the same one (:func:`glass_brain_scale`) to compare
        them. None: the map's own.
    threshold : float or None, default=None
        Absolute values below it are hidden; None: the map's own (see
        :func:`glass_brain_figure`).
    title : str or None, default=None
    dpi : int, default=110

    Returns
    -------
    bytes
        A PNG image.
    """
    import warnings

    with warnings.catch_warnings():
        # On a scale shared with a stronger map, a weak map may show nothing: that is the point.
        warnings.filterwarnings("ignore", message="empty mask", category=UserWarning)
        fig = glass_brain_figure(img, title=title, vmax=vmax, threshold=threshold)
    return png_bytes(fig, dpi=dpi)


def probability_histogram(probability: ArrayLike, threshold: float, *,
                          outcome: ArrayLike | None = None) -> go.Figure:
    """Distribution of calibrated probabilities, split by observed outcome when known.

    Parameters
    ----------
    probability : array-like of float
        Calibrated responder probabilities of the screened participants (bins of 0.05).
    threshold : float
        The enrolment threshold, drawn as a dashed line.
    outcome : array-like of {1, 0, NaN} or None, default=None
        Observed outcomes in the same order (:func:`fmmtc_core.cohort.outcome_values`); when
        given the bars are stacked by observed responder, non-responder and no outcome yet.

    Returns
    -------
    plotly.graph_objects.Figure
        320 px high.
    """
    p = np.asarray(probability, dtype=float)
    fig = go.Figure()
    bins = dict(start=0, end=1.0001, size=0.05)
    if outcome is None:
        fig.add_trace(go.Histogram(x=p, xbins=bins, marker_color="#2a6f97", name="screened"))
    else:
        y = np.asarray(outcome, dtype=float)
        for mask, name, color in ((np.isnan(y), "no outcome yet", "#9aa5ad"),
                                  (y == 1, "observed responder", RESPONDER_COLOR),
                                  (y == 0, "observed non-responder", NON_RESPONDER_COLOR)):
            if mask.any():
                fig.add_trace(go.Histogram(x=p[mask], xbins=bins, marker_color=color,
                                           name=name))
        fig.update_layout(barmode="stack")
    fig.add_vline(x=threshold, line_dash="dash", line_color="#1d2a33",
                  annotation_text="enrol at or above", annotation_position="top right")
    fig.update_xaxes(title="calibrated responder probability", range=[0, 1])
    fig.update_yaxes(title="participants")
    fig.update_layout(legend=_LEGEND_ON_TOP)
    return _layout(fig, 320)


def roc_figure(perf: dict) -> go.Figure:
    """ROC curve of the calibrated probabilities against the observed outcomes.

    Parameters
    ----------
    perf : dict
        :func:`fmmtc_core.cohort.observed_performance`'s result: ``fpr``, ``tpr``, ``auc`` and
        ``n`` are read.

    Returns
    -------
    plotly.graph_objects.Figure
        The curve with the chance diagonal, titled with the number of outcomes; 340 px high.
    """
    fig = go.Figure([
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999"),
                   name="chance"),
        go.Scatter(x=perf["fpr"], y=perf["tpr"], mode="lines", line=dict(color="#2a6f97"),
                   name=f"model (AUC {perf['auc']:.2f})"),
    ])
    fig.update_xaxes(title="1 - specificity", range=[0, 1])
    fig.update_yaxes(title="sensitivity", range=[0, 1], scaleanchor="x")
    fig.update_layout(legend=dict(x=0.45, y=0.1))
    return _layout(fig, 340, f"ROC on {perf['n']} observed outcomes")


def calibration_figure(perf: dict) -> go.Figure:
    """Reliability curve: observed responder rate against predicted probability, per bin.

    Parameters
    ----------
    perf : dict
        :func:`fmmtc_core.cohort.observed_performance`'s result: ``reliability`` (bins with
        ``predicted``, ``observed`` and ``n``; marker size grows with ``n``) and ``brier`` are
        read.

    Returns
    -------
    plotly.graph_objects.Figure
        The curve with the perfect-calibration diagonal, titled with the Brier score; 340 px
        high.
    """
    rel = perf["reliability"]
    fig = go.Figure([
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999"),
                   name="perfect calibration"),
        go.Scatter(x=[r["predicted"] for r in rel], y=[r["observed"] for r in rel],
                   mode="lines+markers", marker=dict(size=[6 + 2 * np.sqrt(r["n"]) for r in rel]),
                   text=[f"n = {r['n']}" for r in rel], line=dict(color="#2a6f97"),
                   name="model", hovertemplate="predicted %{x:.2f}<br>observed %{y:.2f}"
                   "<br>%{text}<extra></extra>"),
    ])
    fig.update_xaxes(title="predicted probability", range=[0, 1])
    fig.update_yaxes(title="observed responder rate", range=[0, 1])
    fig.update_layout(legend=dict(x=0.02, y=0.98))
    return _layout(fig, 340, f"Calibration (Brier {perf['brier']:.3f})")


def compare_regions_figure(names: Iterable[str], series: dict[str, np.ndarray], *,
                           title: str | None = None,
                           colors: Sequence[str] | None = None,
                           value_range: tuple[float, float] | None = None) -> go.Figure:
    """Region scores of several sources (participant, cohort means) as grouped bars.

    Regions run down the page (horizontal bars, first region on top), so their names are
    read level, never rotated or clipped: names longer than :data:`MAX_LABEL_CHARS` are
    shortened in the middle (:func:`short_label`), with the full name in the hover.

    Parameters
    ----------
    names : iterable of str
        Region names (the category axis).
    series : dict of str to array-like of float
        Legend name -> one score per region of ``names`` (logit units; NaN leaves a gap).
    title : str or None, default=None
    colors : sequence of str or None, default=None
        Bar colours, one per series, reused in turn when there are more series; None: dark
        grey, red, blue, purple.
    value_range : tuple of 2 float or None, default=None
        Fixed score axis range (compare mode: the same for both panels); None fits the data.

    Returns
    -------
    plotly.graph_objects.Figure
        The legend above the bars; 120 px plus 12 px per bar (at least 18 px per region)
        high.
    """
    names = [str(n) for n in names]
    labels = [short_label(n) for n in names]
    if len(set(labels)) < len(labels):  # two names shortened alike: tell them apart
        labels = [f"{lab} ({i + 1})" if labels.count(lab) > 1 else lab
                  for i, lab in enumerate(labels)]
    colors = colors or ["#1d2a33", RESPONDER_COLOR, NON_RESPONDER_COLOR, "#8e7cc3"]
    fig = go.Figure([go.Bar(y=labels, x=np.asarray(v, dtype=float), name=k, orientation="h",
                            marker_color=colors[i % len(colors)], customdata=names,
                            hovertemplate="%{customdata}<br>" + k + " %{x:+.3f}<extra></extra>")
                     for i, (k, v) in enumerate(series.items())])
    fig.update_layout(barmode="group", legend=_LEGEND_ON_TOP)
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title=_SCORE_AXIS.format(what="score"), zeroline=True,
                     zerolinecolor="#999")
    if value_range is not None:
        fig.update_xaxes(range=list(value_range), autorange=False)
    per_region = max(18, 12 * max(len(series), 1))
    return _layout(fig, 120 + per_region * len(names), title)
