"""Shared numpydoc text for parameters documented in several places.

Write ``%(name)s`` on its own line in a ``Parameters`` section and decorate the function with
:func:`fill_doc`; the placeholder becomes ``docdict["name"]``, indented like the placeholder
(in the spirit of MNE's and nilearn's ``fill_doc``). ``help()`` and Sphinx then show the filled
text. Only ``%(name)s`` placeholders are touched: other ``%`` characters stay as written, and an
unknown name fails at import time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

__all__ = ["docdict", "fill_doc"]

F = TypeVar("F", bound=Callable)

#: Parameter descriptions, numpydoc style: the ``name : type`` line, then the description
#: indented by four spaces (relative to the name).
docdict: dict[str, str] = {
    "sidecar": """\
sidecar : path, dict or None, default=None
    BIDS JSON sidecar of the scan. Looked up beside the scan when None. Its
    ``RepetitionTime`` wins over the header's (a disagreement is a warning); its ``Atlas``
    names a region table's atlas (see :func:`fmmtc_core.io.load_scan`).""",
    "confounds": """\
confounds : path, DataFrame or None, default=None
    fMRIPrep ``desc-confounds_timeseries.tsv`` of the same run
    (see :func:`fmmtc_core.io.load_confounds_table`); it enables confound regression and
    scrubbing.""",
    "progress_volumes": """\
progress : callable(done_volumes, total_volumes) or None, default=None
    Called while the voxels of a NIfTI are read (never for a region table).""",
    "progress_stages": """\
progress : callable(stage, done, total, info) or None, default=None
    Called as each stage advances (stages :data:`fmmtc_core.screening.STAGES`).""",
    "model": """\
model : ScreeningModel
    A loaded model folder (:func:`fmmtc_core.models.ensemble.load_model`): FMM-TC's
    ensemble or a classic baseline's; its atlas parcellates the scan and its ``inputs``
    prepare it as the model was trained.""",
    "engine": """\
engine : sqlalchemy.Engine
    The database (:func:`fmmtc_core.store.open_database` or
    :func:`fmmtc_core.store.db.make_engine`).""",
    "session": """\
session : sqlalchemy.orm.Session
    An open session (:func:`fmmtc_core.store.db.session_scope` commits or rolls back).""",
}

_PLACEHOLDER = re.compile(r"^([ \t]*)%\((\w+)\)s[ \t]*$", re.MULTILINE)


def fill_doc(func: F) -> F:
    """Replace the ``%(name)s`` placeholder lines of ``func``'s docstring from :data:`docdict`.

    Parameters
    ----------
    func : callable
        A function (or class) whose docstring holds placeholder lines.

    Returns
    -------
    callable
        ``func`` itself, its ``__doc__`` filled in.

    Raises
    ------
    KeyError
        A placeholder names no entry of :data:`docdict`.
    """
    doc = func.__doc__
    if doc:
        def fill(m: re.Match[str]) -> str:
            indent, key = m.group(1), m.group(2)
            if key not in docdict:
                raise KeyError(f"fill_doc: no docdict entry {key!r} (in {func.__qualname__})")
            return "\n".join(indent + line if line else line
                             for line in docdict[key].splitlines())

        func.__doc__ = _PLACEHOLDER.sub(fill, doc)
    return func
