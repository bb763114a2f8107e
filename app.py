"""FMM-TC Screen dashboard: a thin frame over the pages in ``pages/`` (layout only)."""

from pathlib import Path

import streamlit as st

from fmmtc_core import __version__

HERE = Path(__file__).parent

st.set_page_config(page_title="FMM-TC Screen", page_icon=":material/neurology:", layout="wide")

pages = [
    st.Page(str(HERE / "pages" / "qc.py"), title="Scan quality", icon=":material/fact_check:",
            default=True),
]
nav = st.navigation(pages)

with st.sidebar:
    st.markdown("### FMM-TC Screen")
    st.caption(
        "Research software for neuropathic-pain trial screening from resting-state fMRI. "
        "Not a medical device."
    )
    st.caption(f"Version {__version__}")

nav.run()
