"""FMM-TC Screen dashboard: a thin frame over the pages in ``views/`` (layout only)."""

from pathlib import Path

import streamlit as st

from fmmtc_app import demo, memory, session
from fmmtc_app.access import access_granted, gate_off_notice, sign_in_page
from fmmtc_core import __version__
from fmmtc_core.config import use_cache_dir_for_libraries

HERE = Path(__file__).parent
use_cache_dir_for_libraries()  # matplotlib's caches under the data folder, not in ~/.cache


def main() -> None:
    """The dashboard: the sign-in gate, the navigation, the sidebar and the chosen page."""
    st.set_page_config(page_title="FMM-TC Screen", page_icon=":material/neurology:", layout="wide")

    if not access_granted():
        # The gate lives here, once, for every page present and future: until the visitor
        # signs in, the navigation holds the sign-in page only, so no page script (and no
        # upload widget or stored data) runs whatever URL is asked for, and the sidebar names
        # nothing.
        st.navigation([st.Page(sign_in_page, title="Sign in", icon=":material/lock:",
                               url_path="sign-in", default=True)], position="hidden").run()
        st.stop()

    landing = st.Page(str(HERE / "views" / "screen.py"), title="Screen participant",
                      icon=":material/person_search:", default=True)
    pages = [
        landing,
        st.Page(str(HERE / "views" / "explore.py"), title="Attribution explorer",
                icon=":material/neurology:"),
        st.Page(str(HERE / "views" / "cohort.py"), title="Cohort review",
                icon=":material/groups:"),
        st.Page(str(HERE / "views" / "model.py"), title="Model", icon=":material/model_training:"),
        st.Page(str(HERE / "views" / "qc.py"), title="Scan quality", icon=":material/fact_check:"),
    ]
    nav = st.navigation(pages)

    with st.sidebar:
        st.markdown("### FMM-TC Screen")
        st.caption(
            "Research software for neuropathic-pain trial screening from resting-state fMRI. "
            "Not a medical device."
        )
        try:
            model = session.model()
            st.caption(f"Model: {model.name} - {model.device.type.upper()}")
        except Exception as exc:  # noqa: BLE001 - the pages show a plain error too
            st.caption(f"Model not loaded: {exc}")
        st.caption(f"Version {__version__}")
        notice = gate_off_notice()
        if notice:
            st.caption(":material/lock_open: Password gate off")
    # Every page, whichever is opened first: the demo cohort's progress (and its job carried on
    # after a server restart).
    demo.sidebar_status()

    if notice and nav.url_path == landing.url_path:
        st.warning(notice, icon=":material/lock_open:")

    nav.run()
    # What the page just imported and loaded stays for the server's life: out of the
    # collector's full collections, which held the GIL 0.25-0.8 s on every screening
    # (fmmtc_app.memory).
    memory.freeze_once(f"page {nav.url_path or 'screen'}")


# Streamlit runs this file as __main__. The screening worker is a process that multiprocessing
# spawns from inside a page run, and a spawned process imports the parent's __main__ file (as
# __mp_main__): without this guard the worker ran the whole dashboard once at its start (the
# model loaded twice, the Screen page drawn with no browser).
if __name__ == "__main__":
    main()
