"""Figures (fmmtc_core.figures): readable at 1280 px and on a laptop, one scale when compared."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fmmtc_core import figures
from fmmtc_core.figures import (
    MAX_LABEL_CHARS,
    WRAP_CHARS,
    brain_map_png,
    compare_regions_figure,
    glass_brain_scale,
    network_figure,
    short_label,
    shared_limit,
)

#: HCPEx's longest region names and HCP-MMP's longest section names.
LONG_NAMES = ["Area_TemporoParietoOccipital_Junction_1_L",
              "Area_TemporoParietoOccipital_Junction_1_R",
              "Thal_Mediodorsolateral_parvocellular_L", "Area_1_L"]
LONG_GROUPS = ["Anterior Cingulate and Medial Prefrontal",
               "MT+ Complex and Neighboring Visual Areas", "Thalamus"]


def test_short_label_keeps_the_start_and_the_hemisphere():
    assert short_label("Area_1_L") == "Area_1_L"
    short = short_label(LONG_NAMES[0])
    assert len(short) == MAX_LABEL_CHARS and short.startswith("Area_Temporo")
    assert short.endswith("_1_L") and "…" in short
    assert short_label(LONG_NAMES[1]).endswith("_1_R")  # the two hemispheres stay apart
    assert len(short_label("abcdefghij", 3)) == 5  # never below 5 characters


def test_shared_limit_and_glass_brain_scale_cover_every_map():
    weak, strong = np.array([0.01, -0.02, 0.0]), np.array([0.5, -3.0, np.nan])
    assert shared_limit(weak, strong) == 3.0
    assert shared_limit() == shared_limit([0.0, 0.0]) == shared_limit([np.nan]) == 1.0
    vmax, threshold = glass_brain_scale(weak, strong)
    assert vmax == 3.0 and 0 < threshold < 0.99 * vmax
    # the same scale whatever the order of the maps
    assert glass_brain_scale(strong, weak) == (vmax, threshold)
    assert glass_brain_scale(np.zeros(3)) == (1.0, 0.0)


def _legend_clear_of_the_plot(fig):
    legend = fig.layout.legend
    return legend.y is not None and legend.y >= 1 and legend.yanchor == "bottom"


def test_compare_regions_figure_reads_level_with_the_legend_above():
    fig = compare_regions_figure(LONG_NAMES, {"time series": [0.1, -0.2, 0.3, 0.0],
                                              "connectivity": [0.2, 0.1, np.nan, -0.1]},
                                 title="Top regions", value_range=(-1.0, 1.0))
    assert all(bar.orientation == "h" for bar in fig.data)
    labels = list(fig.data[0].y)
    assert max(len(lab) for lab in labels) <= MAX_LABEL_CHARS + 4
    assert len(set(labels)) == len(labels)
    assert list(fig.data[0].customdata) == LONG_NAMES  # full names in the hover
    assert _legend_clear_of_the_plot(fig)
    assert fig.layout.yaxis.automargin and fig.layout.xaxis.automargin
    assert tuple(fig.layout.xaxis.range) == (-1.0, 1.0)
    # the title and the legend row do not share the top margin's space
    assert fig.layout.margin.t >= 60
    assert fig.layout.height >= 120 + 24 * len(LONG_NAMES)


def test_short_labels_that_collide_stay_distinct():
    a = "Region_with_a_very_long_common_prefix_and_an_end_L"
    b = "Region_with_a_very_long_other_prefix_and_an_end_L"
    assert short_label(a) == short_label(b)
    fig = compare_regions_figure([a, b], {"x": [1.0, 2.0]})
    assert len(set(fig.data[0].y)) == 2


def test_network_figure_wraps_long_groups_and_titles_its_axis():
    groups = {g: {"ts": 0.1 * i, "fc": -0.1 * i, "total": 0.0} for i, g in
              enumerate(LONG_GROUPS)}
    fig = network_figure(groups, group_title="HCP-MMP section", value_range=(-2.0, 2.0))
    assert fig.layout.yaxis.title.text == "HCP-MMP section"
    lines = [ln for label in fig.data[0].y for ln in label.split("<br>")]
    assert max(len(ln) for ln in lines) <= WRAP_CHARS
    assert list(fig.data[0].customdata) == LONG_GROUPS
    assert _legend_clear_of_the_plot(fig)
    assert tuple(fig.layout.xaxis.range) == (-2.0, 2.0)


@pytest.mark.parametrize("thresholds", [{"non_responder": 0.4, "responder": 0.6},
                                        {"non_responder": 0.1, "responder": 0.9}])
def test_probability_zone_labels_fit_their_zone(thresholds):
    ns = "{http://www.w3.org/2000/svg}"
    root = _svg(0.3, (0.2, 0.4), thresholds)
    zones = {"likely non-responder": thresholds["non_responder"],
             "uncertain": thresholds["responder"] - thresholds["non_responder"],
             "likely responder": 1 - thresholds["responder"]}
    lines: dict[float, list[str]] = {}
    for t in root.findall(f"{ns}text"):
        if not t.text.endswith("%"):  # zone labels, not the axis ticks
            lines.setdefault(float(t.get("x")), []).append(t.text)
    assert sorted(" ".join(v) for v in lines.values()) == sorted(zones)
    for words in lines.values():
        zone = zones[" ".join(words)]
        # 12 px text is ~6.5 px a character on the 660-unit scale (the picture scales as a
        # whole): each line must fit its zone (very narrow zones aside)
        assert max(len(w) for w in words) * 6.5 <= zone * 660 or zone < 0.15, words


def test_every_legend_sits_above_its_plot():
    t = np.arange(10)
    figs = [
        figures.region_series_figure(np.random.default_rng(0).normal(size=(10, 4)), LONG_NAMES,
                                     2.0, range(4)),
        figures.probability_histogram(np.linspace(0, 1, 12), 0.5,
                                      outcome=[1, 0, np.nan] * 4),
        network_figure({"Frontal": {"ts": 1.0, "fc": 0.5, "total": 1.5}}),
        compare_regions_figure(["a", "b"], {"x": t[:2], "y": t[:2]}),
    ]
    for fig in figs:
        assert _legend_clear_of_the_plot(fig), fig.layout.legend
        assert fig.layout.xaxis.automargin and fig.layout.yaxis.automargin


def test_brain_map_png_takes_the_scale_it_is_given(monkeypatch):
    seen = []
    real = figures.glass_brain_figure

    def spy(img, **kwargs):
        seen.append((kwargs["vmax"], kwargs["threshold"]))
        return real(img, **kwargs)

    monkeypatch.setattr(figures, "glass_brain_figure", spy)
    data = np.zeros((20, 24, 20), np.float32)
    data[5:9, 8:12, 8:12] = 0.2
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-80, -110, -70]
    png = brain_map_png(nib.Nifti1Image(data, affine), vmax=3.0, threshold=1.0)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen == [(3.0, 1.0)]  # a weak map on a strong map's scale: drawn, nearly blank


def _blob_image(value=1.0):
    data = np.zeros((20, 24, 20), np.float32)
    data[5:9, 8:12, 8:12] = value
    data[12:15, 8:12, 8:12] = -value / 2
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-80, -110, -70]
    return nib.Nifti1Image(data, affine)


def test_qc_maps_draw_the_mean_with_the_atlas_outline_and_the_tsnr():
    img = _blob_image(800.0)
    labels = nib.Nifti1Image((np.asarray(img.dataobj) != 0).astype(np.int16), img.affine)
    fig = figures.alignment_figure(img, labels, title="mean")
    # nilearn draws one axis per slice; the outline is a contour set on them
    assert len(fig.axes) >= len(figures.QC_SLICES_Z)
    assert any(type(c).__name__ == "QuadContourSet" or "Contour" in type(c).__name__
               for ax in fig.axes for c in ax.collections)
    png = figures.png_bytes(fig)
    assert png[:4] == b"\x89PNG"
    png = figures.png_bytes(figures.tsnr_figure(img))
    assert png[:4] == b"\x89PNG"


def test_fd_histogram_marks_the_limit_and_counts_the_volumes_above():
    fd = np.array([0.0, 0.1, 0.2, 0.7, 0.3, 1.2, np.nan])
    fig = figures.fd_histogram(fd, 0.5)
    below, above = fig.data
    assert sorted(above.x) == [0.7, 1.2] and sorted(below.x) == [0.1, 0.2, 0.3]
    assert fig.layout.shapes[0].x0 == 0.5  # the dashed line at the limit
    assert "2 of 5 volumes above" in fig.layout.annotations[0].text
    assert _legend_clear_of_the_plot(fig)


def test_attribution_slices_are_interactive_and_offline():
    html = figures.attribution_slices_html(_blob_image(), threshold=0.3, vmax=2.0, title="t")
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html[:200]
    assert "brainsprite" in html.lower()  # nilearn's slice viewer
    import re

    assert not re.search(r"(src|href)=[\"']https?://", html)  # nothing from the network


def test_a_certain_probability_shows_a_whole_diamond():
    """At 0 % or 100 % (common for the demo model) the marker sat on the axis's end and was
    cut in half, in the report (e2e screenshot at 1280 px); the card's SVG: see below."""
    from fmmtc_core.report import _probability_figure

    mpl = _probability_figure(1.0, (0.99, 1.0), {"non_responder": 0.4, "responder": 0.6})
    assert all(not line.get_clip_on() for line in mpl.axes[0].get_lines())


def _svg(probability, band, thresholds):
    import xml.etree.ElementTree as ET

    return ET.fromstring(figures.probability_svg(probability, band, thresholds))


def test_probability_svg_places_the_diamond_band_and_zones_on_the_scale():
    ns = "{http://www.w3.org/2000/svg}"
    root = _svg(0.7, (0.6, 0.9), {"non_responder": 0.4, "responder": 0.6})
    rects = root.findall(f"{ns}rect")
    # three zones end to end over the 0-100 % axis (x 20 ... 680 in the viewBox)
    edges = [e for r in rects
             for e in (float(r.get("x")), float(r.get("x")) + float(r.get("width")))]
    assert edges == pytest.approx([20, 284, 284, 416, 416, 680])
    band = root.find(f"{ns}line[@stroke-width='6']")
    assert (float(band.get("x1")), float(band.get("x2"))) == pytest.approx((416, 614))
    diamond = root.find(f"{ns}path")
    xs = [float(pt.split(",")[0])
          for pt in diamond.get("d").strip("MZ ").replace("L", "").split()]
    assert (min(xs) + max(xs)) / 2 == pytest.approx(20 + 660 * 0.7)
    assert diamond.find(f"{ns}title").text == "probability 70%"
    texts = [t.text for t in root.findall(f"{ns}text")]
    assert {"0%", "20%", "100%", "uncertain", "likely", "non-responder"} <= set(texts)
    assert "70%" in root.get("aria-label") and "60% to 90%" in root.get("aria-label")


def test_probability_svg_keeps_marks_inside_the_picture_and_skips_empty_zones():
    """A probability of 100 % draws the whole diamond (the figure's margin has room), a value
    outside 0-1 is clipped to the scale, and a zone of zero width is not drawn."""
    ns = "{http://www.w3.org/2000/svg}"
    root = _svg(1.0, (0.99, 1.2), {"non_responder": 0.5, "responder": 0.5})
    assert len(root.findall(f"{ns}rect")) == 2  # no "uncertain" zone
    xs = [float(pt.split(",")[0]) for pt in
          root.find(f"{ns}path").get("d").strip("MZ ").replace("L", "").split()]
    assert max(xs) <= 700 and min(xs) >= 0
    band = root.find(f"{ns}line[@stroke-width='6']")
    assert float(band.get("x2")) == pytest.approx(680)
    # labels are escaped text, never markup
    assert "uncertain" not in [t.text for t in root.findall(f"{ns}text")]


def test_glass_brain_colour_bar_labels_do_not_overlap():
    """A small threshold put "0.025" over "-0.025" on the colour bar (report at 1280 px):
    the ticks are the limits and halves, +-threshold only when there is room for it."""
    import matplotlib.pyplot as plt

    data = np.zeros((20, 24, 20), np.float32)
    data[5:9, 8:12, 8:12] = 0.62
    data[12:15, 8:12, 8:12] = -0.62
    data[2:4, 8:12, 8:12] = 0.02
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-80, -110, -70]
    for threshold, expected in ((0.025, [-0.62, -0.31, 0.0, 0.31, 0.62]),
                                (0.2, [-0.62, -0.31, -0.2, 0.2, 0.31, 0.62])):
        fig = figures.glass_brain_figure(nib.Nifti1Image(data, affine), vmax=0.62,
                                         threshold=threshold)
        bar = fig.axes[-1]  # nilearn's colour bar comes last
        ticks = sorted(bar.get_yticks())
        assert ticks == pytest.approx(expected), threshold
        assert min(np.diff(ticks)) >= 0.15 * 0.62
        plt.close(fig)
