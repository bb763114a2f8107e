"""Notices every page that shows a result puts in the same words (layout only): what the model
is valid for (:mod:`fmmtc_core.validity`)."""

from __future__ import annotations

import streamlit as st

from fmmtc_core.validity import ModelValidity

__all__ = ["validity_banner"]


def validity_banner(validity: ModelValidity) -> None:
    """Show a model's validity warning where a result is shown; nothing for a validated model.

    A model trained on simulated data (or on data its card does not name) is an error box, a
    model not validated on this site's data a warning box: both in capitals first, so that no
    one reads the decision without it.

    Parameters
    ----------
    validity : ModelValidity
        The screening's :attr:`~fmmtc_core.summary.ScreeningSummary.validity`.
    """
    if not validity.warn:
        return
    show = st.error if validity.severe else st.warning
    show(f"**{validity.headline}.** {validity.message}", icon=":material/warning:")
