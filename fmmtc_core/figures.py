"""Plotly figures for the dashboard and reports (pure functions of plain data)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["carpet_figure", "motion_figure", "connectivity_figure", "region_series_figure"]

_FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=13)


def _layout(fig: go.Figure, height: int, title: str | None = None) -> go.Figure:
    fig.update_layout(
        height=height,
        margin=dict(l=60, r=20, t=40 if title else 10, b=40),
        font=_FONT,
        title=dict(text=title, x=0, font=dict(size=15)) if title else None,
        plot_bgcolor="white",
        paper_bgcolor="white",
    )
    return fig


def carpet_figure(carpet: np.ndarray, regions: np.ndarray, groups, tr: float) -> go.Figure:
    """Carpet plot: z-scored voxel series (rows, ordered by atlas region) over time (s).

    Parameters
    ----------
    carpet : ndarray (n_voxels, T)
    regions : ndarray (n_voxels,) of region positions
    groups : sequence of str, the atlas's group per region (labels the rows' sections)
    tr : float, seconds
    """
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


def motion_figure(tr: float, fd=None, dvars=None, fd_threshold: float = 0.5) -> go.Figure:
    """Framewise displacement (mm) and DVARS (% signal) over time (s)."""
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


def connectivity_figure(matrix: np.ndarray, names, groups, *, fisher: bool = True) -> go.Figure:
    """Region x region connectivity heatmap, regions ordered by group (lobe)."""
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


def region_series_figure(data: np.ndarray, names, tr: float, columns) -> go.Figure:
    """Time series (s) of a few regions, stacked."""
    fig = go.Figure()
    t = np.arange(data.shape[0]) * tr
    for c in columns:
        fig.add_trace(go.Scatter(x=t, y=data[:, c], mode="lines", name=names[c],
                                 line=dict(width=1.3)))
    fig.update_xaxes(title="time (s)")
    fig.update_yaxes(title="signal")
    fig.update_layout(legend=dict(orientation="h", y=-0.3))
    return _layout(fig, 300)
