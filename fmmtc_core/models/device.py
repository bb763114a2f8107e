"""Device selection (CUDA whenever one is present, else CPU; ``FMMTC_DEVICE`` overrides),
mixed precision and seeding."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch

from fmmtc_core._errors import InvalidInputError

__all__ = ["select_device", "autocast", "seed_all", "deterministic"]


def select_device(prefer: str | None = None) -> torch.device:
    """The device to run models on.

    Parameters
    ----------
    prefer : str or None, default=None
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default ``$FMMTC_DEVICE``, else CUDA when
        available, else CPU. Asking for CUDA on a machine without it is an error.

    Returns
    -------
    torch.device
        A CPU or CUDA device.

    Raises
    ------
    InvalidInputError
        The choice is not a device name torch knows, names CUDA on a machine without a CUDA
        GPU, or names a device type other than CPU and CUDA.
    """
    from fmmtc_core.config import device_setting

    choice = prefer or device_setting() or (
        "cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise InvalidInputError(
            f"Unknown device {choice!r}; expected 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"Device {choice!r} was requested but no CUDA GPU is available.")
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"Unsupported device {choice!r}; expected 'cpu' or 'cuda'.")
    return device


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (halves memory, tensor cores); a no-op context on CPU.

    Parameters
    ----------
    device : torch.device
        The device the models run on (only its ``type`` is read).

    Returns
    -------
    torch.autocast
        A context manager: bfloat16 autocast on CUDA, disabled elsewhere.
    """
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


def seed_all(seed: int) -> None:
    """Seed numpy's global generator and torch's (CPU and CUDA): runs are reproducible on CPU.

    Parameters
    ----------
    seed : int
        The seed for :func:`numpy.random.seed` and :func:`torch.manual_seed`.
    """
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(threads: int | None) -> Iterator[None]:
    """Fixed thread count and deterministic algorithms for the duration (None: no change).

    Floating-point reductions split across a different number of threads add up in a
    different order, so the same training on two machines differs in the last bits unless
    the thread count is the same; deterministic algorithms rule out the remaining
    nondeterministic kernels (on CUDA, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG``, set here).

    Parameters
    ----------
    threads : int or None
        Threads for torch's intra-op pool; None leaves everything as it is.

    Yields
    ------
    None
        The previous thread count, deterministic-algorithms flag and
        ``CUBLAS_WORKSPACE_CONFIG`` are restored on exit.

    Raises
    ------
    InvalidInputError
        ``threads`` is not a positive integer (a bool is refused).
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidInputError(f"threads must be a positive integer, got {threads!r}.")
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        if old_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
