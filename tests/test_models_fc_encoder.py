"""Connectivity encoders: shapes, parameter budget, learning on a planted edge pattern."""

from __future__ import annotations

import pytest
import torch

from fmmtc_core import InvalidInputError
from fmmtc_core.models.fc_encoder import (
    NetworkEncoder,
    BrainNetCNN,
    ResNetGramEncoder,
    build_fc_encoder,
    gram_matrix,
)


def test_brainnetcnn_shapes_and_budget():
    enc = BrainNetCNN(426)
    n_params = sum(p.numel() for p in enc.parameters())
    assert n_params < 400_000  # small enough for cohorts of tens of subjects
    out = enc(torch.randn(3, 426, 426))
    assert out.shape == (3, 64)
    with pytest.raises(ValueError, match=r"expects \(batch, 426, 426\)"):
        enc(torch.randn(3, 10, 10))


def test_brainnetcnn_is_permutation_sensitive_but_input_differentiable():
    torch.manual_seed(0)
    enc = BrainNetCNN(12, dropout=0.0).eval()
    x = torch.randn(2, 12, 12)
    x = (x + x.transpose(1, 2)) / 2
    x.requires_grad_(True)
    enc(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_brainnetcnn_learns_a_planted_edge_pattern():
    torch.manual_seed(0)
    n, r = 64, 20
    y = torch.arange(n) % 2
    fc = torch.randn(n, r, r) * 0.3
    fc = (fc + fc.transpose(1, 2)) / 2
    fc[y == 1, 2, 5] += 1.0
    fc[y == 1, 5, 2] += 1.0
    enc = BrainNetCNN(r, out_dim=8, dropout=0.0)
    head = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head(enc(fc)).squeeze(1), y.float())
        loss.backward()
        opt.step()
    acc = ((head(enc(fc)).squeeze(1) > 0).long() == y).float().mean()
    assert acc > 0.95


def test_paper_resnet_encoder():
    enc = ResNetGramEncoder(32)
    assert enc.resnet.config.depths == [2, 2, 2, 2]
    assert enc.resnet.config.layer_type == "basic"
    assert enc(torch.randn(2, 32, 32)).shape == (2, 256)


def test_gram_matrix_is_normalised_by_length():
    w = torch.randn(2, 5, 100)
    g = gram_matrix(w)
    assert g.shape == (2, 5, 5)
    torch.testing.assert_close(g, w @ w.transpose(1, 2) / 100)
    # Doubling the window (same content twice) leaves it unchanged.
    torch.testing.assert_close(gram_matrix(torch.cat([w, w], dim=2)), g)


def test_build_by_name():
    assert isinstance(build_fc_encoder("brainnetcnn", 10), BrainNetCNN)
    with pytest.raises(InvalidInputError, match="Invalid value for the 'fc_encoder' parameter"):
        build_fc_encoder("gcn", 10)


def test_network_encoder_reads_a_planted_network_with_few_parameters():
    """A quadratic form u^T (Z - Z0) u of sparse u finds coupling that rises within a set of
    regions, from 80 matrices, with 2 x R parameters, and the L1 term concentrates u there."""
    torch.manual_seed(0)
    r, n = 30, 80
    y = torch.arange(n) % 2
    z = 0.1 * torch.randn(n, r, r)
    z = (z + z.transpose(1, 2)) / 2
    net = torch.arange(4)
    z[:, net[:, None], net[None, :]] += 0.08 * y[:, None, None]
    enc = NetworkEncoder(r, n_components=2, l1=1e-3)
    assert enc(z).shape == (n, 2) and enc.out_dim == 2
    assert sum(p.numel() for p in enc.parameters()) == 2 * r
    assert "center" in enc.state_dict()  # the training cohort's mean travels with the weights
    enc.center.copy_(z.mean(0))
    head = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head(enc(z)).squeeze(1), y.float()) + enc.penalty()
        loss.backward()
        opt.step()
    assert ((head(enc(z)).squeeze(1) > 0).long() == y).float().mean() > 0.9
    weight = enc.u.detach().abs().sum(0)
    assert weight[net].mean() > 3 * weight[4:].mean()
    assert isinstance(build_fc_encoder("network", 10, n_components=3), NetworkEncoder)


def test_network_encoder_edge_readout_is_the_mean_over_the_selected_edges():
    """readout="edges": the contrast marks the supra-threshold edges of each sign's largest
    component (an int8 mask, saved with the weights) and a feature is the signed mean of
    (Z - Z0) over them; nothing else moves it."""
    torch.manual_seed(1)
    r, n = 20, 60
    y = torch.arange(n) % 2
    z = 0.1 * torch.randn(n, r, r)
    z = (z + z.transpose(1, 2)) / 2
    net = torch.arange(4)
    z[:, net[:, None], net[None, :]] += 0.2 * y[:, None, None]
    enc = NetworkEncoder(r, n_components=2, readout="edges")
    assert enc.state_dict()["edges"].dtype == torch.int8
    enc.center.copy_(z.mean(0))
    sizes = enc.init_from_contrast(z, y.numpy(), p_threshold=1e-4)
    mask = enc.edges[0].float()
    assert sizes[0] == 4 and torch.equal(mask, mask.T)
    marked = {tuple(e) for e in torch.nonzero(torch.triu(mask, 1)).tolist()}
    assert marked == {(i, j) for i in range(4) for j in range(i + 1, 4)}
    expected = ((z - enc.center) * mask).sum((1, 2)) / mask.abs().sum()
    assert torch.allclose(enc(z)[:, 0], expected, atol=1e-6)
    outside = z.clone()
    outside[:, 10, 11] += 5.0
    assert torch.allclose(enc(outside)[:, 0], enc(z)[:, 0])
    with pytest.raises(InvalidInputError, match="'readout'"):
        NetworkEncoder(r, readout="nodes")
