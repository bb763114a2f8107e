"""torchrun's environment, the thread check, and how a global batch is dealt over ranks (no
process group needed: the multi-process runs are in test_pretraining.py and test_training.py)."""

from __future__ import annotations

import pytest
import torch

from fmmtc_core import InvalidInputError
from fmmtc_core.distributed import (
    DistContext,
    check_threads,
    is_main_process,
    session,
    torchrun_environment,
)
from fmmtc_core.pretraining import _rank_positions

TORCHRUN = dict(WORLD_SIZE="4", RANK="3", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")


def _set(monkeypatch, **env):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_torchrun_environment(monkeypatch):
    _set(monkeypatch)
    assert torchrun_environment() is None and is_main_process()
    _set(monkeypatch, **TORCHRUN)
    assert torchrun_environment() == {"world_size": 4, "rank": 3, "local_rank": 1,
                                      "local_world_size": 2}
    assert not is_main_process()
    _set(monkeypatch, **TORCHRUN | {"RANK": "0"})
    assert is_main_process()
    _set(monkeypatch, WORLD_SIZE="2", RANK="0")
    with pytest.raises(InvalidInputError, match="WORLD_SIZE is set but LOCAL_RANK, MASTER_ADDR, "
                                                "MASTER_PORT are not: launch .* with torchrun"):
        torchrun_environment()
    _set(monkeypatch, **TORCHRUN | {"RANK": "x"})
    with pytest.raises(InvalidInputError, match="must be whole numbers"):
        torchrun_environment()
    _set(monkeypatch, **TORCHRUN | {"RANK": "4"})
    with pytest.raises(InvalidInputError, match="Inconsistent torchrun variables"):
        torchrun_environment()


def test_threads_that_oversubscribe_are_refused():
    check_threads(None, 8, cpus=2)
    check_threads(4, 1, cpus=2)  # one process: its own business
    check_threads(1, 2, cpus=2)
    with pytest.raises(InvalidInputError, match=r"--threads 2 with 2 processes on this machine "
                                                r"asks for 4 threads on 2 CPU cores; use "
                                                r"--threads 1 or fewer"):
        check_threads(2, 2, cpus=2)


def test_a_single_process_session_is_plain(monkeypatch):
    _set(monkeypatch)
    with session("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.distributed) == (
            0, 1, None, True, False)
        assert ctx.device == torch.device("cpu")
        assert ctx.broadcast_bytes(b"abc") == b"abc" and ctx.sum([1, 2.5]) == [1.0, 2.5]
        ctx.barrier()
    assert not torch.distributed.is_initialized()
    # a world of one (torchrun --nproc_per_node 1) is a plain process too
    _set(monkeypatch, **TORCHRUN | {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
                                    "LOCAL_WORLD_SIZE": "1"})
    with session("cpu") as ctx:
        assert ctx.world_size == 1 and ctx.backend is None


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [1, 5, 6, 7, 13])
def test_the_ranks_shares_make_up_each_global_batch(world, n):
    """Batch j of every rank together is global batch j of one process; padding (so that
    every rank takes the same number of steps) is flagged and never a real window twice."""
    batch = 2 * world
    per_rank = batch // world
    shares = [_rank_positions(n, DistContext(r, world, r, world, "gloo", torch.device("cpu")))
              for r in range(world)]
    steps = {len(pos) for pos, _ in shares}
    assert len(steps) == 1  # the same number of positions on every rank
    for j, start in enumerate(range(0, n, batch)):
        got = sorted(p for pos, real in shares
                     for p, ok in zip(pos[j * per_rank:(j + 1) * per_rank],
                                      real[j * per_rank:(j + 1) * per_rank]) if ok)
        assert got == list(range(start, min(start + batch, n)))
    assert sum(sum(real) for _, real in shares) == n
