"""Learnable encoders for the functional-connectivity modality (the C of FMM-TC).

Default: :class:`BrainNetCNN` (Kawahara et al., NeuroImage 2017). Its edge-to-edge,
edge-to-node and node-to-graph filters are cross-shaped convolutions that respect what a
connectivity matrix is - a graph whose rows and columns are the same regions - instead of
treating it as an image. That is why it suits our setting:

- few subjects: the filters are shared across edges, so with 426 regions the whole encoder has
  ~0.3 M parameters (vs 11 M for the paper's ResNet-18), and dropout + weight decay suffice;
- 400+ regions on a CPU: one forward pass costs O(channels^2 x R^2) multiply-adds, a few
  milliseconds per subject;
- attributions stay region-specific: the edge-to-node and node-to-graph weights are per region,
  so Integrated Gradients can single out regions and connections.

We also considered a small transformer over connectivity rows (each region's row as a token).
It needs a learned R -> d projection per token and attention over 426 tokens, i.e. more
parameters and data for the same inductive bias, so it is not offered.

:class:`ResNetGramEncoder` reproduces the authors' reference design for the ``paper`` preset:
ResNet-18 (transformers' ``ResNetModel``, basic blocks [2, 2, 2, 2], trained from scratch) on the
R x R matrix copied to 3 channels, last layer Linear(512, 256). Unlike the reference notebook, the
Gram matrix it is given is normalised by the window length (see :func:`gram_matrix`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["BrainNetCNN", "ResNetGramEncoder", "gram_matrix", "build_fc_encoder", "FC_ENCODERS"]


def gram_matrix(window: torch.Tensor) -> torch.Tensor:
    """``X X^T / T`` of robust-scaled windows (B, R, T): the paper's FC input, normalised.

    The reference implementation feeds the unnormalised Gram matrix, whose scale grows with the
    window length; dividing by T makes it a covariance-like matrix independent of T.
    """
    return window @ window.transpose(-1, -2) / window.shape[-1]


def _row_filter(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` with kernel (1, R) applied to (B, C, R, R): (B, O, R)."""
    assert conv.bias is not None  # _E2E's convolutions have a bias
    return torch.einsum("bcij,ocj->boi", x, conv.weight[:, :, 0, :]) + conv.bias[:, None]


def _col_filter(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` with kernel (R, 1) applied to (B, C, R, R'): (B, O, R')."""
    assert conv.bias is not None  # _E2E's convolutions have a bias
    return torch.einsum("bcij,oci->boj", x, conv.weight[:, :, :, 0]) + conv.bias[:, None]


class _E2E(nn.Module):
    """Edge-to-edge filter: each edge (i, j) sees row i and column j of every input channel."""

    def __init__(self, in_ch: int, out_ch: int, n_regions: int) -> None:
        super().__init__()
        self.row = nn.Conv2d(in_ch, out_ch, kernel_size=(1, n_regions))
        self.col = nn.Conv2d(in_ch, out_ch, kernel_size=(n_regions, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Row and column filters as contractions: Conv2d with a (1, R) kernel is an order of
        # magnitude slower on CPU for the same arithmetic. (B, O, R, 1) + (B, O, 1, R).
        return _row_filter(self.row, x).unsqueeze(-1) + _col_filter(self.col, x).unsqueeze(-2)


class BrainNetCNN(nn.Module):
    """BrainNetCNN encoder: (B, R, R) connectivity -> (B, out_dim) representation.

    Parameters
    ----------
    n_regions : int
        R, the number of atlas regions.
    e2e_channels : int, default=4
        Channels of the two edge-to-edge layers.
    e2n_channels : int, default=16
        Node features per region after the edge-to-node layer.
    n2g_channels : int, default=32
        Graph features after the node-to-graph layer.
    out_dim : int, default=64
        Size of the representation handed to the fusion head.
    dropout : float, default=0.3
    """

    def __init__(
        self,
        n_regions: int,
        e2e_channels: int = 4,
        e2n_channels: int = 16,
        n2g_channels: int = 32,
        out_dim: int = 64,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.n_regions = n_regions
        self.out_dim = out_dim
        self.e2e1 = _E2E(1, e2e_channels, n_regions)
        self.e2e2 = _E2E(e2e_channels, e2e_channels, n_regions)
        self.e2n = nn.Conv2d(e2e_channels, e2n_channels, kernel_size=(1, n_regions))
        self.n2g = nn.Conv2d(e2n_channels, n2g_channels, kernel_size=(n_regions, 1))
        self.act = nn.LeakyReLU(0.33)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(n2g_channels, out_dim)

    def forward(self, fc: torch.Tensor) -> torch.Tensor:
        if fc.dim() != 3 or fc.shape[-1] != self.n_regions or fc.shape[-2] != self.n_regions:
            raise ValueError(
                f"BrainNetCNN expects (batch, {self.n_regions}, {self.n_regions}) connectivity, "
                f"got {tuple(fc.shape)}."
            )
        x = fc.unsqueeze(1)
        x = self.act(self.e2e1(x))
        x = self.act(self.e2e2(x))
        x = self.act(_row_filter(self.e2n, x))  # (B, C, R): one feature vector per region
        x = self.drop(x).unsqueeze(-1)
        x = self.act(_col_filter(self.n2g, x)).flatten(1)  # (B, C)
        return self.act(self.proj(self.drop(x)))


class ResNetGramEncoder(nn.Module):
    """The ``paper`` preset: ResNet-18 on the R x R matrix copied to 3 channels -> 256-d."""

    def __init__(self, n_regions: int, out_dim: int = 256) -> None:
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        self.n_regions = n_regions
        self.out_dim = out_dim
        config = ResNetConfig(
            num_channels=3,
            embedding_size=64,
            hidden_sizes=[64, 128, 256, 512],
            depths=[2, 2, 2, 2],
            layer_type="basic",
            hidden_act="relu",
        )
        self.resnet = ResNetModel(config)
        self.fc = nn.Linear(512, out_dim)

    def forward(self, fc: torch.Tensor) -> torch.Tensor:
        x = fc.unsqueeze(1).expand(-1, 3, -1, -1)
        pooled = self.resnet(pixel_values=x).pooler_output.flatten(1)
        return self.fc(pooled)


FC_ENCODERS: dict[str, type[BrainNetCNN] | type[ResNetGramEncoder]] = {
    "brainnetcnn": BrainNetCNN, "resnet18": ResNetGramEncoder}


def build_fc_encoder(
    name: str, n_regions: int, **kwargs: Any
) -> BrainNetCNN | ResNetGramEncoder:
    """Instantiate an FC encoder by name.

    Parameters
    ----------
    name : {"brainnetcnn", "resnet18"}
        The encoder (a key of :data:`FC_ENCODERS`).
    n_regions : int
        Regions of the atlas (the side of the connectivity matrix).
    **kwargs
        Passed to the encoder's constructor (e.g. ``out_dim``).

    Returns
    -------
    BrainNetCNN or ResNetGramEncoder
        The new, randomly initialised encoder.
    """
    from fmmtc_core._errors import check_option

    name = check_option("fc_encoder", name, tuple(FC_ENCODERS))
    return FC_ENCODERS[name](n_regions, **kwargs)
