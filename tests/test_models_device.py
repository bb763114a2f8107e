"""Device selection (tests run on CPU; CUDA paths are checked where a GPU exists)."""

import pytest
import torch

from fmmtc_core import InvalidInputError
from fmmtc_core.models.device import autocast, select_device


def test_default_follows_availability(monkeypatch):
    monkeypatch.delenv("FMMTC_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected


def test_override_and_errors(monkeypatch):
    monkeypatch.setenv("FMMTC_DEVICE", "cpu")
    assert select_device().type == "cpu"
    with pytest.raises(InvalidInputError, match="Unknown device 'gpu0'"):
        select_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA GPU is available"):
            select_device("cuda")


def test_autocast_is_a_noop_on_cpu():
    with autocast(torch.device("cpu")):
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert x.dtype == torch.float32
