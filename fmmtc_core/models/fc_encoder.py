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

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike

__all__ = ["BrainNetCNN", "ResNetGramEncoder", "NetworkEncoder", "gram_matrix",
           "build_fc_encoder", "FC_ENCODERS", "contrast_t"]


def gram_matrix(window: torch.Tensor) -> torch.Tensor:
    """``X X^T / T`` of robust-scaled windows (B, R, T): the paper's FC input, normalised.

    The reference implementation feeds the unnormalised Gram matrix, whose scale grows with the
    window length; dividing by T makes it a covariance-like matrix independent of T.

    Parameters
    ----------
    window : Tensor (..., R, T)
        Region signals, regions by time points (any leading batch dimensions).

    Returns
    -------
    Tensor (..., R, R)
        The Gram matrix divided by the window length T.
    """
    return window @ window.transpose(-1, -2) / window.shape[-1]


def contrast_t(x: np.ndarray, y: ArrayLike) -> tuple[np.ndarray, int] | None:
    """Column-wise two-sample t statistics, responders (1) minus the others (0).

    Pooled variance; a column constant in both groups gets t = 0. The sparse read-outs'
    starting point (:meth:`NetworkEncoder.init_from_contrast`,
    :meth:`~fmmtc_core.models.amplitude.AmplitudeReadout.init_from_contrast`).

    Parameters
    ----------
    x : ndarray (N, F)
        One row per participant.
    y : array-like (N,)
        Labels, 1 or 0.

    Returns
    -------
    (ndarray (F,), int) or None
        The t statistics and their degrees of freedom; None when either group has fewer than
        2 participants.
    """
    import numpy as np

    yn = np.asarray(y).astype(int)
    a, b = x[yn == 1], x[yn == 0]
    if len(a) < 2 or len(b) < 2:
        return None
    dof = len(a) + len(b) - 2
    pooled = ((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / dof
    se = np.sqrt(pooled * (1 / len(a) + 1 / len(b)))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, (a.mean(0) - b.mean(0)) / se, 0.0)
    return t, int(dof)


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
        Dropout probability after the edge-to-node and node-to-graph layers.
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
        """Encode a batch of connectivity matrices.

        Parameters
        ----------
        fc : Tensor (B, R, R)
            Connectivity matrices, R = ``n_regions``.

        Returns
        -------
        Tensor (B, out_dim)
            The representation (after a leaky ReLU).

        Raises
        ------
        ValueError
            ``fc`` is not (batch, R, R).
        """
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
    """The ``paper`` preset: ResNet-18 on the R x R matrix copied to 3 channels -> 256-d.

    Parameters
    ----------
    n_regions : int
        R, the number of atlas regions (recorded; the ResNet takes any R).
    out_dim : int, default=256
        Size of the representation (the last Linear(512, out_dim)).
    """

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
        """Encode a batch of connectivity (or Gram) matrices.

        Parameters
        ----------
        fc : Tensor (B, R, R)
            The matrices; each is copied to the 3 input channels.

        Returns
        -------
        Tensor (B, out_dim)
            The pooled ResNet features after the last linear layer.
        """
        x = fc.unsqueeze(1).expand(-1, 3, -1, -1)
        pooled = self.resnet(pixel_values=x).pooler_output.flatten(1)
        return self.fc(pooled)


FC_ENCODERS: dict[str, type[BrainNetCNN] | type[ResNetGramEncoder] | type[NetworkEncoder]] = {
    "brainnetcnn": BrainNetCNN, "resnet18": ResNetGramEncoder}


class NetworkEncoder(nn.Module):
    """Sparse network read-out of a connectivity matrix, for small cohorts.

    ``K`` learned region weightings ``u_k`` (R,) give the features
    ``f_k = u_k^T (Z - Z_0) u_k``: the weighted mean connectivity within (and, with weights of
    both signs, between) a few networks, relative to the training cohort's mean
    connectivity ``Z_0`` (a buffer that training sets). An L1 penalty on the weights
    (:meth:`penalty`, added to the training loss) selects a few regions per component. With
    ``K x R`` parameters (1,704 for 4 components on 426 regions) it can be fitted from ~100
    participants, where an edge-to-edge CNN cannot; a network-level effect (coupling that rises
    among a set of regions) is exactly such a quadratic form. Attributions stay per region and
    per connection.

    Parameters
    ----------
    n_regions : int
        Regions R.
    n_components : int, default=4
        Networks K (the output width).
    l1 : float, default=1e-3
        Strength of the L1 penalty on the region weights.
    init : dict or None, default=None
        Options of :meth:`init_from_contrast` (e.g. ``{"p_threshold": 0.005}``), which
        training calls on each training fold; recorded with the model's configuration.
    readout : {"quadratic", "edges"}, default="quadratic"
        ``"quadratic"``: the features above. ``"edges"``: the network-based statistic's own
        read-out, ``f_k`` the mean of ``(Z - Z_0)`` over the supra-threshold edges of
        component ``k`` found by :meth:`init_from_contrast` (an ``int8`` sign mask, a
        buffer), so only the edges the training fold singled out count; the region weights
        are then not used.
    """

    def __init__(self, n_regions: int, n_components: int = 4, l1: float = 1e-3,
                 init: dict | None = None, readout: str = "quadratic") -> None:
        super().__init__()
        from fmmtc_core._errors import check_option

        self.readout = check_option("readout", readout, ("quadratic", "edges"))
        self.init = dict(init or {})
        self.u = nn.Parameter(0.05 * torch.randn(n_components, n_regions))  # see seed_all
        self.register_buffer("center", torch.zeros(n_regions, n_regions))
        if self.readout == "edges":
            self.register_buffer("edges", torch.zeros(n_components, n_regions, n_regions,
                                                      dtype=torch.int8))
        self.l1 = float(l1)
        self.out_dim = int(n_components)

    @torch.no_grad()
    def init_from_contrast(self, z: torch.Tensor, y: ArrayLike,
                           p_threshold: float = 0.005) -> list[int]:
        """Start each component on a network the training participants point to.

        Edge-wise two-sample t tests (responders vs the others, pooled variance) on the
        training participants' matrices; the edges with two-sided p below ``p_threshold`` form
        a graph (positive and negative differences separately), and its largest connected
        components (most edges, at least 2; the network-based statistic's idea) seed ``u_k``:
        ``1 / sqrt(n)`` on the component's ``n`` regions, small noise elsewhere. Components
        that are not found leave their ``u_k`` random. Gradient training then refines them.

        Parameters
        ----------
        z : Tensor (N, R, R)
            Training participants' connectivity (never the test fold's).
        y : array-like (N,)
            Their labels.
        p_threshold : float, default=0.005
            Two-sided p-value below which an edge joins the graph.

        Returns
        -------
        list of int
            Regions per seeded component, largest component first (empty when either class
            has fewer than 2 participants).
        """
        import numpy as np
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from scipy.stats import t as t_dist

        zn = z.detach().cpu().double().numpy()
        r = zn.shape[1]
        iu = np.triu_indices(r, 1)
        contrast = contrast_t(zn[:, iu[0], iu[1]], y)
        if contrast is None:
            return []
        t, dof = contrast
        crit = float(t_dist.ppf(1 - p_threshold / 2, dof))
        found: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        # networks of one sign each (a mixed component of |t| tested worse on `realistic`)
        for sign in (1, -1):
            supra = np.flatnonzero(sign * t > crit)
            if supra.size < 2:
                continue
            i, j = iu[0][supra], iu[1][supra]
            graph = coo_matrix((np.ones(supra.size), (i, j)), shape=(r, r))
            _, comp = connected_components(graph, directed=False)
            edges = np.bincount(comp[i], minlength=comp.max() + 1)
            for c in np.flatnonzero(edges >= 2):
                ci, cj = i[comp[i] == c], j[comp[i] == c]
                signs = np.sign(t[supra[comp[i] == c]]).astype(np.int8)
                found.append((int(edges[c]), np.unique(np.r_[ci, cj]), ci, cj, signs))
        found.sort(key=lambda item: -item[0])  # stable: ties keep the order found
        sizes = []
        mask_buffer: torch.Tensor | None = getattr(self, "edges", None)
        if mask_buffer is not None:
            mask_buffer.zero_()
        for k, (_, nodes, ei, ej, signs) in enumerate(found[: self.u.shape[0]]):
            u = 0.01 * torch.randn(r, dtype=self.u.dtype)
            u[torch.as_tensor(nodes)] = 1.0 / float(np.sqrt(len(nodes)))
            self.u[k] = u.to(self.u.device)
            if mask_buffer is not None:
                mask = torch.zeros(r, r, dtype=torch.int8)
                mask[torch.as_tensor(ei), torch.as_tensor(ej)] = torch.as_tensor(signs)
                mask[torch.as_tensor(ej), torch.as_tensor(ei)] = torch.as_tensor(signs)
                mask_buffer[k] = mask.to(mask_buffer.device)
            sizes.append(len(nodes))
        return sizes

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Features (B, K) of connectivity matrices (B, R, R).

        Parameters
        ----------
        z : Tensor (B, R, R)
            Connectivity matrices (on the scale of the training cohort's ``center``).

        Returns
        -------
        Tensor (B, K)
            ``u_k^T (z - center) u_k`` for each component k.
        """
        center: torch.Tensor = self.center  # type: ignore[assignment]  # a buffer
        if self.readout == "edges":
            mask = cast(torch.Tensor, self.edges).to(z.dtype)
            count = mask.abs().sum(dim=(1, 2)).clamp(min=1.0)
            return torch.einsum("krs,brs->bk", mask, z - center) / count
        return torch.einsum("kr,brs,ks->bk", self.u, z - center, self.u)

    def penalty(self) -> torch.Tensor:
        """``l1 x sum |u|``: the term training adds to the loss.

        Returns
        -------
        Tensor
            A scalar, differentiable in the region weights ``u``.
        """
        return self.l1 * self.u.abs().sum()


FC_ENCODERS["network"] = NetworkEncoder


def build_fc_encoder(
    name: str, n_regions: int, **kwargs: Any
) -> BrainNetCNN | ResNetGramEncoder | NetworkEncoder:
    """Instantiate an FC encoder by name.

    Parameters
    ----------
    name : {"brainnetcnn", "resnet18", "network"}
        The encoder (a key of :data:`FC_ENCODERS`).
    n_regions : int
        Regions of the atlas (the side of the connectivity matrix).
    **kwargs
        Passed to the encoder's constructor (e.g. ``out_dim``).

    Returns
    -------
    BrainNetCNN, ResNetGramEncoder or NetworkEncoder
        The new, randomly initialised encoder.

    Raises
    ------
    InvalidInputError
        ``name`` is not a key of :data:`FC_ENCODERS`.
    """
    from fmmtc_core._errors import check_option

    name = check_option("fc_encoder", name, tuple(FC_ENCODERS))
    return FC_ENCODERS[name](n_regions, **kwargs)
