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


def test_stability_selection_weighs_regions_by_how_often_they_pass():
    a, y = _cohort(shift=1.2, seed=0)
    readout = AmplitudeReadout(30)
    readout.standardise_on(a)
    torch.manual_seed(0)
    hard = readout.init_from_contrast(a, y, p_threshold=0.05)
    u_hard = readout.u.detach().clone()
    torch.manual_seed(0)  # subsamples=0 is the single selection, bit for bit
    assert readout.init_from_contrast(a, y, p_threshold=0.05, subsamples=0) == hard
    assert torch.equal(readout.u.detach(), u_hard)

    torch.manual_seed(0)
    sizes = readout.init_from_contrast(a, y, p_threshold=0.05, subsamples=40, seed=2)
    u = readout.u.detach()[0].clone()
    assert sizes[0] >= 5  # every region that passed in any subset has a weight
    # the planted regions pass in (nearly) every subset, with their signs; anything else far
    # less often: the weights are the shares of subsets, normalised to a sum of 1
    assert torch.all(u[:3] > 0) and torch.all(u[3:5] < 0)
    assert u[:5].abs().min() > 2 * u[5:].abs().max()
    assert 0.5 < float(u[:5].abs().sum()) <= 1.0 + 1e-6
    torch.manual_seed(0)  # same seed, same subsets
    readout.init_from_contrast(a, y, p_threshold=0.05, subsamples=40, seed=2)
    assert torch.equal(readout.u.detach()[0], u)
    readout.init_from_contrast(a, y, p_threshold=0.05, subsamples=40, seed=3)
    assert not torch.allclose(readout.u.detach()[0][:5], u[:5])  # other subsets


def test_stability_selection_refuses_bad_settings():
    a, y = _cohort()
    readout = AmplitudeReadout(30)
    with pytest.raises(ValueError, match=r"subsamples must be >= 0 and fraction in \(0, 1\]"):
        readout.init_from_contrast(a, y, subsamples=-1)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\], got 10 and 0"):
        readout.init_from_contrast(a, y, subsamples=10, fraction=0)


def test_dynamics_features_standardise_on_the_training_fold_and_check_shapes():
    from fmmtc_core.models.amplitude import DynamicsFeatures

    d = torch.randn(40, 12) * torch.linspace(0.5, 3.0, 12) + 2.0
    d[:, 5] = 1.0  # constant in the fold: spread 1, not 0
    feats = DynamicsFeatures(12)
    feats.standardise_on(d)
    z = feats(d)
    assert z.shape == (40, 12) and torch.isfinite(z).all()
    assert torch.allclose(z.mean(0), torch.zeros(12), atol=1e-5)
    assert torch.allclose(z[:, [0, 11]].std(0), torch.ones(2), atol=1e-5)
    assert set(dict(feats.named_buffers())) == {"center", "spread"}
    assert not list(feats.parameters())  # the head holds the weights
    with pytest.raises(ValueError, match=r"expects \(batch, 12\) values, got \(40, 11\)"):
        feats(d[:, :11])
