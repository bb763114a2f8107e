"""The report download buttons every page with a screening offers (layout only)."""

from __future__ import annotations

import re

import streamlit as st

from fmmtc_core.report import screening_report_html, screening_report_pdf
from fmmtc_core.summary import ScreeningSummary

__all__ = ["report_buttons", "report_file_name"]


def report_file_name(summary: ScreeningSummary, suffix: str) -> str:
    """The report's file name: screening id, pseudonym and date.

    Parameters
    ----------
    summary : ScreeningSummary
        The screening.
    suffix : str
        ``"html"`` or ``"pdf"``.

    Returns
    -------
    str
        E.g. ``fmmtc-screening-12-PAIN-0042-20261125.pdf`` (only letters, digits, ``_ . -``).
    """
    sid = "new" if summary.screening_id is None else summary.screening_id
    name = f"fmmtc-screening-{sid}-{summary.participant}-{summary.created_at:%Y%m%d}"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name) + f".{suffix}"


def report_buttons(summary: ScreeningSummary, png: bytes | None, *, key: str) -> None:
    """Two download buttons, the report as HTML and as PDF, built only when clicked.

    Parameters
    ----------
    summary : ScreeningSummary
        The screening (fresh or stored).
    png : bytes or None
        Its glass brain (:func:`fmmtc_core.report.glass_brain_png`), drawn by the page.
    key : str
        Prefix of the buttons' widget keys (``{key}-html``, ``{key}-pdf``).
    """
    c1, c2 = st.columns(2)
    # Deferred: the report is rendered in the click's own thread, not on every rerun.
    c1.download_button("Download the report (HTML)",
                       lambda: screening_report_html(summary, png=png),
                       file_name=report_file_name(summary, "html"), mime="text/html",
                       key=f"{key}-html", on_click="ignore", icon=":material/download:")
    c2.download_button("Download the report (PDF)",
                       lambda: screening_report_pdf(summary, png=png),
                       file_name=report_file_name(summary, "pdf"), mime="application/pdf",
                       key=f"{key}-pdf", on_click="ignore", icon=":material/picture_as_pdf:")
