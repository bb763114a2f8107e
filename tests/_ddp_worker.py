"""Multi-process test helpers: :func:`torchrun` launches N processes on loopback, and this
file, run by torchrun, makes one call of a training function in each.

``python -m torch.distributed.run ... tests/_ddp_worker.py pretrain|train KWARGS_JSON``; the
keyword ``config`` of ``pretrain`` is a dict of :class:`BrainLMConfig` arguments (a tiny
encoder without dropout, so that 1 and 2 processes can agree to rounding).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).resolve()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the rendezvous store's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nprocs: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nprocs ARGS`` on loopback (static rendezvous at
    127.0.0.1 and a free port), gloo on CPU, one torch thread per process; waits for it.

    ``args`` start with a script path or ``-m module``. Raises AssertionError with the
    output when it fails.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", FMMTC_DEVICE="cpu",
               PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]),
                                           os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}",
           "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert run.returncode == 0, (f"torchrun failed ({run.returncode}):\n{run.stdout}\n"
                                 f"{run.stderr[-4000:]}")
    return run


def run_worker(nprocs: int, what: str, **kwargs) -> subprocess.CompletedProcess:
    """``what`` (``pretrain`` or ``train``) with ``kwargs`` in ``nprocs`` processes."""
    return torchrun(nprocs, str(WORKER), what, json.dumps(kwargs, default=str))


def main() -> None:
    torch.set_num_threads(1)
    what, kwargs = sys.argv[1], json.loads(sys.argv[2])
    if what == "pretrain":
        from fmmtc_core.models.foundation import BrainLMConfig
        from fmmtc_core.pretraining import pretrain

        kwargs["config"] = BrainLMConfig.tiny(**kwargs["config"])
        pretrain(**kwargs)
    else:
        from fmmtc_core.training import train

        train(**kwargs)


if __name__ == "__main__":
    main()
