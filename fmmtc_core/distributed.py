"""Running under ``torchrun``: the process group, rank-0-only writing, and byte broadcasts.

``fmmtc pretrain`` and ``fmmtc train`` run unchanged under ``torchrun --nproc_per_node N``.
:func:`session` reads the variables torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and, when the world has more than one
process, opens the process group: NCCL when the processes run on CUDA GPUs (one GPU per local
rank), gloo on CPU. Without those variables (or with a world of one) nothing is initialised and
everything behaves as a plain single process.

Everything that crosses processes is plain tensors and bytes (safetensors files, JSON): nothing
is pickled, as nothing in a checkpoint is ever unpickled.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fmmtc_core._errors import InvalidInputError, check_option

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's refusals come before it
    import torch

__all__ = ["DistContext", "session", "is_main_process", "torchrun_environment"]

#: The variables torchrun sets for every worker (``MASTER_*`` name the rendezvous store).
_TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) run.

    Attributes
    ----------
    rank, world_size : int
        This process's global rank and the number of processes (1 without torchrun).
    local_rank, local_world_size : int
        Rank and number of processes on this machine.
    backend : str or None
        ``"gloo"`` or ``"nccl"`` when a process group is open; None for a single process.
    device : torch.device
        The device this process computes on (``cuda:LOCAL_RANK`` under NCCL).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process (a process group is open)."""
        return self.world_size > 1

    # Collectives (no-ops for a single process) ----------------------------------------------
    def _comm_device(self) -> torch.device:
        import torch

        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        """Wait for every process (nothing for a single process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """``data`` of rank ``src``, on every rank (a single process gets its own back).

        Parameters
        ----------
        data : bytes or None
            The payload on rank ``src``; ignored (may be None) elsewhere.
        src : int, default=0
            The sending rank.

        Returns
        -------
        bytes
            The payload, on every rank.
        """
        if not self.distributed:
            return data or b""
        import torch
        import torch.distributed as dist

        dev = self._comm_device()
        mine = self.rank == src
        size = torch.tensor([len(data or b"") if mine else 0], dtype=torch.int64, device=dev)
        dist.broadcast(size, src)
        n = int(size.item())
        if not n:
            return b""
        buf = (torch.frombuffer(bytearray(data or b""), dtype=torch.uint8).to(dev) if mine
               else torch.empty(n, dtype=torch.uint8, device=dev))
        dist.broadcast(buf, src)
        return bytes(buf.cpu().numpy().tobytes())

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over every rank (float64).

        Parameters
        ----------
        values : sequence of float
            This rank's values (the same length on every rank).

        Returns
        -------
        list of float
            The sums, on every rank.
        """
        if not self.distributed:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]


def torchrun_environment() -> dict[str, int] | None:
    """``world_size``, ``rank``, ``local_rank`` and ``local_world_size`` from torchrun's
    variables, or None when they are not set (a plain process).

    Returns
    -------
    dict or None

    Raises
    ------
    InvalidInputError
        Only some of the variables are set, or one is not a whole number in range (a launch
        that torchrun did not make, e.g. a half-copied environment).
    """
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [v for v in _TORCHRUN_VARS if not os.environ.get(v)]
    if missing:
        raise InvalidInputError(
            f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not: launch multi-process runs with torchrun (it sets them all), or unset "
            "WORLD_SIZE for a single process.")
    try:
        out = {"world_size": int(os.environ["WORLD_SIZE"]), "rank": int(os.environ["RANK"]),
               "local_rank": int(os.environ["LOCAL_RANK"]),
               "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE",
                                                      os.environ["WORLD_SIZE"]))}
    except ValueError:
        raise InvalidInputError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole "
                                "numbers (as torchrun sets them).") from None
    if not (out["world_size"] >= 1 and 0 <= out["rank"] < out["world_size"]
            and 0 <= out["local_rank"] < out["local_world_size"] <= out["world_size"]):
        raise InvalidInputError(f"Inconsistent torchrun variables: {out}.")
    return out


def is_main_process() -> bool:
    """True unless torchrun started this process with a rank other than 0 (cheap: no torch
    collective, usable before :func:`session`).

    Returns
    -------
    bool
    """
    return os.environ.get("RANK", "0").strip() in ("", "0")


def check_threads(threads: int | None, local_world_size: int,
                  cpus: int | None = None) -> None:
    """Refuse ``threads`` per process that, times the processes on this machine, exceed its
    CPU cores (oversubscribed ranks slow every collective to the slowest thread).

    Parameters
    ----------
    threads : int or None
        Torch threads per process (None: not fixed, nothing to check).
    local_world_size : int
        Processes on this machine.
    cpus : int or None, default=None
        Usable cores; default those this process may run on.

    Raises
    ------
    InvalidInputError
        ``threads * local_world_size`` is more than ``cpus``.
    """
    if threads is None or local_world_size <= 1:
        return
    if cpus is None:
        from fmmtc_core.config import usable_cores

        cpus = usable_cores()
    if threads * local_world_size > cpus:
        raise InvalidInputError(
            f"--threads {threads} with {local_world_size} processes on this machine asks for "
            f"{threads * local_world_size} threads on {cpus} CPU cores; use --threads "
            f"{max(1, cpus // local_world_size)} or fewer (or fewer processes: torchrun "
            "--nproc_per_node).")


def _choose(backend: str | None, device: torch.device | str | None,
            local_rank: int) -> tuple[str, torch.device]:
    """The backend and this rank's device (see :func:`session`)."""
    import torch

    from fmmtc_core.models.device import select_device

    if backend is not None:
        backend = check_option("backend", backend, ("gloo", "nccl"))
    if backend == "nccl" and not torch.cuda.is_available():
        raise InvalidInputError(
            "The NCCL backend was requested but no CUDA GPU is available (NCCL only connects "
            "GPUs); use --dist-backend gloo, which runs on CPU.")
    dev = torch.device(device) if device is not None else select_device()
    if backend == "nccl" and dev.type != "cuda":
        raise InvalidInputError(
            f"The NCCL backend needs the processes on CUDA GPUs, but the device is {dev}; use "
            "--dist-backend gloo for CPU processes (or unset FMMTC_DEVICE=cpu).")
    if dev.type == "cuda":
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise InvalidInputError(
                f"Local rank {local_rank} has no GPU: this machine has {n_gpus}; start at most "
                f"{n_gpus} processes per node (torchrun --nproc_per_node {n_gpus}).")
        dev = torch.device("cuda", local_rank)
    return backend or ("nccl" if dev.type == "cuda" else "gloo"), dev


@contextlib.contextmanager
def session(device: torch.device | str | None = None, backend: str | None = None,
            threads: int | None = None) -> Iterator[DistContext]:
    """This process's place in the run; opens (and closes) the process group under torchrun.

    Parameters
    ----------
    device : torch.device, str or None, default=None
        The device asked for (default :func:`~fmmtc_core.models.device.select_device`); under
        torchrun a CUDA device becomes ``cuda:LOCAL_RANK``.
    backend : {"gloo", "nccl"} or None, default=None
        None: NCCL on CUDA, gloo on CPU. Only read under torchrun (a world of more than one).
    threads : int or None, default=None
        Torch threads per process, checked against the cores (:func:`check_threads`).

    Yields
    ------
    DistContext
        Rank, world size, backend and device. A process group that was already open (a
        caller's) is used and left open.

    Raises
    ------
    InvalidInputError
        Inconsistent torchrun variables, NCCL without CUDA, more local processes than GPUs,
        or ``threads`` that oversubscribe the cores.
    """
    import torch
    import torch.distributed as dist

    env = torchrun_environment()
    if env is None or env["world_size"] == 1:
        from fmmtc_core.models.device import select_device

        if backend is not None:  # checked even alone, so a mistake shows before a big launch
            _choose(backend, device, 0)
        dev = torch.device(device) if device is not None else select_device()
        yield DistContext(0, 1, 0, 1, None, dev)
        return
    check_threads(threads, env["local_world_size"])
    chosen, dev = _choose(backend, device, env["local_rank"])
    created = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(chosen, init_method="env://")
        created = True
    try:
        yield DistContext(env["rank"], env["world_size"], env["local_rank"],
                          env["local_world_size"], chosen, dev)
    finally:
        if created:
            dist.destroy_process_group()
