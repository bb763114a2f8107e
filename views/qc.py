"""Scan quality page: upload a scan (or take a simulated one) and review its QC report."""

from __future__ import annotations

import streamlit as st

from fmmtc_app.access import require_access
from fmmtc_app.uploads import staged_uploads
from fmmtc_core import FMMTCError
from fmmtc_core.atlas import BUNDLED_ATLASES
from fmmtc_core.figures import (
    alignment_figure,
    carpet_figure,
    connectivity_figure,
    fd_histogram,
    motion_figure,
    png_bytes,
    region_series_figure,
    tsnr_figure,
)
from fmmtc_core.qc import assess_scan
from fmmtc_core.review import complete_regions, region_quality, scan_connectivity, scan_images

VERDICT_STYLE = {
    "pass": (st.success, "Passed quality control"),
    "warn": (st.warning, "Usable, with warnings"),
    "fail": (st.error, "Failed quality control: this scan would not be screened"),
}

require_access()  # app.py gates every page; this is a second line

st.title("Scan quality")
st.write(
    "Upload a participant's resting-state fMRI (a 4D NIfTI in MNI space, such as an fMRIPrep "
    "`space-MNI152NLin2009cAsym` output) or a region time-series table. The scan is checked, "
    "parcellated and quality-controlled; nothing is stored."
)

atlas_key = st.selectbox(
    "Atlas",
    list(BUNDLED_ATLASES),
    format_func=lambda k: f"{k.upper()} - {BUNDLED_ATLASES[k][1]}",
)
with st.form("upload"):
    scan_file = st.file_uploader(
        "Scan (.nii, .nii.gz, or a .tsv/.csv/.npy region table)",
        type=["nii", "gz", "tsv", "csv", "npy"],
    )
    col1, col2 = st.columns(2)
    sidecar_file = col1.file_uploader("JSON sidecar (optional)", type=["json"])
    confounds_file = col2.file_uploader("fMRIPrep confounds TSV (optional)", type=["tsv"])
    submitted = st.form_submit_button("Check scan", type="primary")
demo = st.button("Use a simulated demo scan", key="demo",
                 help="A synthetic scan generated on this machine; nothing is downloaded.")


def run_check(path, sidecar=None, confounds=None):
    """Assess a scan with the page's atlas, showing a progress bar while it is parcellated.

    Parameters
    ----------
    path : path
        The scan file (4D NIfTI or region table).
    sidecar : path, dict or None, default=None
        Its BIDS JSON sidecar; None: the one beside the scan, if any.
    confounds : path, DataFrame or None, default=None
        Its fMRIPrep confounds table.

    Returns
    -------
    tuple of (Scan, RegionSignals, QCReport, dict) or None
        :func:`fmmtc_core.qc.assess_scan`'s scan, uncleaned region signals and QC report, and
        the image views drawn while the file is still on disk (``"alignment"`` and ``"tsnr"``
        PNG bytes; empty for a region table); None when the scan cannot be used (an
        :class:`~fmmtc_core.FMMTCError`, shown on the page as an error message).
    """
    bar = st.progress(0.0, text="Reading and parcellating the scan...")
    try:
        result = assess_scan(
            path,
            sidecar=sidecar,
            confounds=confounds,
            atlas=atlas_key,
            progress=lambda done, total: bar.progress(done / total, text="Parcellating..."),
        )
    except FMMTCError as exc:
        bar.empty()
        st.error(f"This scan cannot be used: {exc}")
        return None
    scan, signals, report = result
    views = {}
    if scan.kind == "nifti":
        # Drawn now: the upload is deleted once checked and the image is never stored.
        bar.progress(1.0, text="Drawing the mean image and the tSNR map...")
        try:
            images = scan_images(scan, signals.atlas)
            views = {"alignment": png_bytes(alignment_figure(images.mean, images.labels)),
                     "tsnr": png_bytes(tsnr_figure(images.tsnr))}
        except FMMTCError as exc:
            st.warning(f"The image views could not be drawn: {exc}")
    bar.empty()
    return scan, signals, report, views


if submitted or demo:
    st.session_state.pop("qc_result", None)
    if demo:
        from fmmtc_core.simulate import demo_scan

        with st.spinner("Simulating a demo scan..."):
            path, sidecar, confounds = demo_scan()
        st.session_state["qc_result"] = run_check(path, sidecar, confounds)
        st.session_state["qc_simulated"] = True
    elif scan_file is None:
        st.error("Choose a scan file to upload first.")
    else:
        # The upload is on disk only while it is checked (a private folder, deleted after).
        with staged_uploads(scan_file, sidecar_file, confounds_file) as (path, side, conf):
            st.session_state["qc_result"] = run_check(path, side, conf)
        st.session_state["qc_simulated"] = False

result = st.session_state.get("qc_result")
if result is not None:
    scan, signals, report, views = result
    if st.session_state.get("qc_simulated"):
        st.info("Simulated data: this demo scan was generated on this machine, not acquired.")
    show, headline = VERDICT_STYLE[report.verdict]
    show(headline)
    for reason in report.reasons:
        st.markdown(f"- {reason}")
    for w in report.warnings:
        st.markdown(f"- {w}")
    for n in report.notes:
        st.caption(n)

    d = report.to_dict()
    c = st.columns(5)
    c[0].metric("Volumes", d["n_volumes"])
    c[1].metric("TR (s)", f"{d['tr_s']:g}")
    c[2].metric("Median tSNR", "n/a" if d["tsnr_median"] is None else f"{d['tsnr_median']:.1f}")
    c[3].metric("Mean FD (mm)", "unknown" if d["fd_mean_mm"] is None else f"{d['fd_mean_mm']:.2f}",
                help=None if d["fd_mean_mm"] is not None else
                "Framewise displacement needs the scan's fMRIPrep confounds file; without it "
                "head motion is unknown, which is a QC warning.")
    c[4].metric("Uncovered regions", f"{d['n_uncovered_regions']} / {d['n_regions']}")

    atlas = signals.atlas
    table = region_quality(signals, report)
    uncovered = table[~table["covered"]]
    if len(uncovered):
        names = ", ".join(uncovered["region"].head(12))
        more = f" and {len(uncovered) - 12} more" if len(uncovered) > 12 else ""
        st.markdown(f"**Uncovered regions** ({len(uncovered)}): {names}{more}. See the Regions "
                    "tab.")
    tab0, tab1, tab2, tab3 = st.tabs(["Alignment and tSNR", "Carpet and motion", "Connectivity",
                                      "Regions"])
    with tab0:
        if views:
            st.image(views["alignment"], width="stretch",
                     caption="Mean image over time, with the outline of the atlas's brain in "
                             "red: the two should match. A scan that is not in MNI space, "
                             "flipped or shifted shows them apart.")
            st.image(views["tsnr"], width="stretch",
                     caption="Temporal SNR of every voxel (mean / SD over time): dark patches "
                             "inside the brain are signal dropout or heavy noise.")
        else:
            st.caption("A region table has no image: there is no mean image or tSNR map to "
                       "show.")
        st.caption("These views are drawn from the image while it is checked. The image itself "
                   "is never stored (only the region series are), so they are available here, "
                   "at upload, and not later from a stored screening.")
    with tab1:
        if report.carpet is not None:
            st.plotly_chart(carpet_figure(report.carpet, report.carpet_regions, atlas.groups,
                                          report.tr), width="stretch")
        else:
            st.caption("A region table has no voxels: no carpet plot.")
        if report.fd is not None or report.dvars is not None:
            st.plotly_chart(motion_figure(report.tr, report.fd, report.dvars,
                                          report.thresholds.fd_threshold), width="stretch")
        if report.fd is not None:
            st.plotly_chart(fd_histogram(report.fd, report.thresholds.fd_threshold),
                            width="stretch")
        else:
            st.caption("No fMRIPrep confounds file: no framewise displacement.")
    with tab2:
        st.plotly_chart(connectivity_figure(scan_connectivity(signals), atlas.names,
                                            atlas.groups), width="stretch")
        st.caption("Pearson correlation of the cleaned region series, as Fisher z, regions "
                   "grouped by lobe.")
    with tab3:
        if len(uncovered):
            st.markdown(f"**{len(uncovered)} uncovered regions** (under "
                        f"{report.thresholds.min_region_voxels} voxels, or none with signal, on "
                        "this scan's grid):")
            st.dataframe(uncovered, hide_index=True, width="stretch")
        else:
            st.caption("Every atlas region is covered.")
        st.markdown("**All regions**")
        st.dataframe(table, hide_index=True, width="stretch")
        st.plotly_chart(region_series_figure(signals.data, atlas.names, report.tr,
                                             complete_regions(signals, 4)), width="stretch")
