"""Keeping Python's cyclic garbage collector off the dashboard processes' long-lived objects.

After its first page the server holds ~580,000 objects that live as long as the process (the
libraries the pages import, the model, the atlas), and every full collection walks them all:
0.25-0.8 s during which the collecting thread holds the GIL and no other thread of the server
runs. Streamlit runs one after every script run (``runner.postScriptGC``), and the
allocation counts start others: on every screening one fell while the page drew the glass
brain right after the result card's headline, so the headline reached the browser that much
later; the worker's own full collections (0.3 s) fell inside the pipeline. Measured with
``bench/bench_dashboard.py`` and a timeline of the page (README, "Benchmarks / Dashboard").

:func:`freeze_once` collects once and then moves every object alive into the collector's
permanent generation (:func:`gc.freeze`), which later collections skip; objects made later are
collected as before. The price: a reference cycle among the frozen objects that becomes
garbage later is never freed (objects freed by reference counting, the usual case, are). It is
therefore called at a few fixed points of a process's life, each once.

No Streamlit and no torch here: both processes import it.
"""

from __future__ import annotations

import gc
import threading

__all__ = ["freeze_once", "frozen_points"]

_done: set[str] = set()
_lock = threading.Lock()


def freeze_once(point: str) -> bool:
    """Collect, then freeze every object alive, the first time ``point`` is reached.

    Parameters
    ----------
    point : str
        A name for the moment in the process's life (e.g. ``"model loaded"``); later calls
        with the same name do nothing.

    Returns
    -------
    bool
        True when this call froze, False when ``point`` had been reached before.
    """
    with _lock:
        if point in _done:
            return False
        _done.add(point)
        gc.collect()
        gc.freeze()
        return True


def frozen_points() -> frozenset[str]:
    """The points at which :func:`freeze_once` has frozen in this process.

    Returns
    -------
    frozenset of str
    """
    with _lock:
        return frozenset(_done)
