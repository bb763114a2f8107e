"""Device selection (CUDA whenever one is present, else CPU; ``FMMTC_DEVICE`` overrides),
mixed precision and seeding."""

from __future__ import annotations


import numpy as np
import torch

from fmmtc_core._errors import InvalidInputError

__all__ = ["select_device", "autocast", "seed_all"]


def select_device(prefer: str | None = None) -> torch.device:
    """The device to run models on.

    Parameters
    ----------
    prefer : str or None
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default ``$FMMTC_DEVICE``, else CUDA when
        available, else CPU. Asking for CUDA on a machine without it is an error.
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


def autocast(device: torch.device):
    """bf16 autocast on CUDA (halves memory, tensor cores); a no-op context on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


def seed_all(seed: int) -> None:
    """Seed numpy's global generator and torch's (CPU and CUDA): runs are reproducible on CPU."""
    np.random.seed(seed)
    torch.manual_seed(seed)
