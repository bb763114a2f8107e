"""Freezing the dashboard processes' long-lived objects out of the collector
(fmmtc_app.memory)."""

from __future__ import annotations

import gc
import multiprocessing as mp
import signal

import pytest

from fmmtc_app import memory


@pytest.fixture
def fresh(monkeypatch):
    """No point reached yet; whatever a test freezes is unfrozen afterwards."""
    monkeypatch.setattr(memory, "_done", set())
    yield
    gc.unfreeze()


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_freeze_once_freezes_the_first_time_only(fresh):
    alive = _Node()
    assert memory.freeze_once("model loaded") is True
    frozen = gc.get_freeze_count()
    assert frozen > 0 and "model loaded" in memory.frozen_points()
    assert memory.freeze_once("model loaded") is False
    assert gc.get_freeze_count() == frozen  # nothing frozen again
    del alive


def test_frozen_objects_are_skipped_and_later_ones_still_collected(fresh):
    import weakref

    old = _Node()
    memory.freeze_once("start")
    old_ref = weakref.ref(old)
    del old
    gc.collect()
    assert old_ref() is not None  # a frozen cycle is the price, as documented
    new = _Node()
    new_ref = weakref.ref(new)
    del new
    gc.collect()
    assert new_ref() is None  # made after the freeze: collected as before


def test_the_worker_freezes_after_loading_and_after_its_first_job(fresh, tmp_path):
    # _serve run here, fed from a pipe: a job of an unknown kind (an error reply, no model
    # needed), then the stop message.
    import torch

    from fmmtc_app import worker

    here, there = mp.Pipe()
    here.send((1, "no such job", {}))
    here.send(None)
    threads = torch.get_num_threads()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        worker._serve(str(tmp_path / "no-model"), there, threads)
    finally:
        signal.signal(signal.SIGINT, sigint)
        torch.set_num_threads(threads)
    job_id, tag, _ = here.recv()
    assert (job_id, tag) == (1, "error")
    assert memory.frozen_points() == {"worker: model loaded", "worker: first job"}
