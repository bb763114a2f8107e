"""Functional connectivity: Pearson / partial correlation, Fisher z, shrinkage, missing regions."""

from __future__ import annotations

import numpy as np
import pytest

from fmmtc_core import InvalidInputError
from fmmtc_core.connectivity import connectivity, fisher_z, inverse_fisher_z


@pytest.fixture
def series():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 1))
    x = rng.standard_normal((200, 6))
    x[:, :3] += base  # regions 0-2 share a signal
    return x


def test_pearson_equals_numpy(series):
    r = connectivity(series, fisher=False)
    np.testing.assert_allclose(r, np.corrcoef(series.T), atol=1e-6)
    assert r.dtype == np.float32
    z = connectivity(series)
    np.testing.assert_allclose(z, fisher_z(np.corrcoef(series.T)), atol=1e-5)
    assert np.all(np.diag(z) == 0) and np.allclose(z, z.T)


def test_fisher_round_trip():
    r = np.array([[1.0, 0.5], [0.5, 1.0]])
    z = fisher_z(r)
    assert z[0, 1] == pytest.approx(np.arctanh(0.5)) and z[0, 0] == 0
    np.testing.assert_allclose(inverse_fisher_z(z), r)
    assert np.isfinite(fisher_z(np.array([[1.0, 1.0], [1.0, 1.0]]))).all()


def test_partial_correlation_removes_indirect_links():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(5000)
    b = a + 0.5 * rng.standard_normal(5000)
    c = b + 0.5 * rng.standard_normal(5000)  # chain a -> b -> c
    x = np.stack([a, b, c], axis=1)
    full = connectivity(x, fisher=False)
    partial = connectivity(x, kind="partial correlation", fisher=False)
    assert full[0, 2] > 0.7
    assert abs(partial[0, 2]) < 0.05 and partial[0, 1] > 0.5


def test_shrinkage_pulls_towards_zero_when_regions_outnumber_volumes():
    x = np.random.default_rng(2).standard_normal((30, 60))
    plain = connectivity(x, fisher=False)
    shrunk = connectivity(x, shrinkage=True, fisher=False)
    off = ~np.eye(60, dtype=bool)
    assert np.abs(shrunk[off]).mean() < np.abs(plain[off]).mean()


def test_regions_without_signal_have_zero_connectivity(series):
    x = series.copy()
    x[:, 4] = np.nan
    x[:, 5] = 3.0
    z = connectivity(x)
    assert np.all(z[4] == 0) and np.all(z[:, 5] == 0)
    np.testing.assert_allclose(z[:4, :4], connectivity(series[:, :4]), atol=1e-6)


def test_accepts_region_signals(series):
    class Holder:  # anything with a .data (T, R) array, like RegionSignals
        data = series

    np.testing.assert_array_equal(connectivity(Holder()), connectivity(series))


def test_refusals(series):
    with pytest.raises(InvalidInputError, match="Invalid value for the 'kind' parameter"):
        connectivity(series, kind="tangent")
    with pytest.raises(InvalidInputError, match="at least 3 time points"):
        connectivity(series[:2])
    with pytest.raises(InvalidInputError, match="at least 2 regions with signal"):
        connectivity(np.ones((50, 4)))
    with pytest.raises(InvalidInputError, match="Expected a \\(time, regions\\) array"):
        connectivity(series[:, 0])
