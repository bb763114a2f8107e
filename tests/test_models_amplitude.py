"""The sparse read-out of regional amplitude (the T modality's part the encoders cannot see)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmmtc_core.models.amplitude import AmplitudeReadout


def _cohort(n=60, r=30, shift=1.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    a = torch.randn(n, r, generator=gen)
    a[:, :3] += shift * y[:, None]  # higher amplitude in responders
    a[:, 3:5] -= shift * y[:, None]  # lower
    return a, y.numpy()


def test_contrast_selects_the_planted_regions_with_their_signs():
    a, y = _cohort()
    readout = AmplitudeReadout(30, n_components=3)
    readout.standardise_on(a)
    assert torch.allclose(readout.center, a.mean(0)) and torch.allclose(readout.spread, a.std(0))
    sizes = readout.init_from_contrast(a, y, p_threshold=1e-3)
    assert sizes == [5, 3, 2]
    u = readout.u.detach()
    assert torch.all(u[0, :3] > 0.15) and torch.all(u[0, 3:5] < -0.15)
    assert u[0, 5:].abs().max() < 0.05  # small noise elsewhere
    assert torch.all(u[1, :3] > 0) and torch.all(u[2, 3:5] < 0)
    f = readout(a).detach()
    assert f.shape == (60, 3)
    for k in range(3):  # every component rises with the contrast
        assert f[y == 1, k].mean() > f[y == 0, k].mean() + 1.0


def test_a_contrast_without_significant_regions_takes_the_strongest_one():
    a, y = _cohort(shift=0.0, seed=3)
    readout = AmplitudeReadout(30)
    readout.standardise_on(a)
    assert readout.init_from_contrast(a, y, p_threshold=1e-9) == [1]
    assert readout.init_from_contrast(a, np.zeros(60)) == []  # one class: nothing to contrast


def test_standardisation_is_part_of_the_saved_state_and_shapes_are_checked():
    readout = AmplitudeReadout(7, n_components=2, l1=0.5)
    assert set(readout.state_dict()) == {"u", "center", "spread"} and readout.out_dim == 2
    readout.standardise_on(torch.ones(4, 7))  # constant regions keep a unit spread
    assert torch.equal(readout.spread, torch.ones(7))
    assert float(readout.penalty().detach()) == pytest.approx(0.5 * float(readout.u.detach().abs().sum()))
    with pytest.raises(ValueError, match=r"expects \(batch, 7\) amplitudes, got \(2, 6\)"):
        readout(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="n_components must be 1, 2 or 3"):
        AmplitudeReadout(7, n_components=4)
