"""Sparse read-out of regional amplitude, the part of the T modality the encoders cannot see.

A foundation encoder normalises every region of every window to a unit scale before it embeds
it (robust scaling), so how strongly a region fluctuates never reaches the embedding. FMM-TC
keeps it beside the embedding: one number per region, the region's log standard deviation
relative to the scan's median region (:func:`fmmtc_core.preprocess.relative_amplitude`), read
out by :class:`AmplitudeReadout` with the same small-cohort design as the connectivity
read-out (:class:`~fmmtc_core.models.fc_encoder.NetworkEncoder`): a few sparse region
weightings, started from the regions the training fold points to and refined by gradient
descent under an L1 penalty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fmmtc_core.models.fc_encoder import contrast_t

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["AmplitudeReadout", "DynamicsFeatures"]


@torch.no_grad()
def _standardise_on(module: nn.Module, x: torch.Tensor) -> None:
    """Set ``module``'s ``center`` / ``spread`` buffers to the mean / SD of ``x`` (N, F) over
    participants (SD 1 where it is ~0, or for a single participant)."""
    center: torch.Tensor = module.center  # type: ignore[assignment]  # a buffer
    spread: torch.Tensor = module.spread  # type: ignore[assignment]  # a buffer
    center.copy_(x.mean(0))
    sd = x.std(0) if x.shape[0] > 1 else torch.ones_like(spread)
    spread.copy_(torch.where(sd > 1e-6, sd, torch.ones_like(sd)))


class AmplitudeReadout(nn.Module):
    """``K`` sparse region weightings of standardised regional amplitude: (B, R) -> (B, K).

    ``f_k = u_k^T (a - center) / spread``, where ``a`` is the relative amplitude of each region
    and ``center`` / ``spread`` its mean and SD over the training participants (buffers that
    training sets, so a fold model carries its own standardisation).

    Parameters
    ----------
    n_regions : int
        Regions R.
    n_components : int, default=1
        Outputs K (at most 3): :meth:`init_from_contrast` starts the first on every region
        whose amplitude differs between responders and the others, the second (if any) on
        those where it is higher in responders, the third on those where it is lower.
    l1 : float, default=1e-3
        Strength of the L1 penalty on the region weights (:meth:`penalty`).
    init : dict or None, default=None
        Options of :meth:`init_from_contrast` (e.g. ``{"p_threshold": 0.001}``), which
        training calls on each training fold; recorded with the model's configuration.
    """

    def __init__(self, n_regions: int, n_components: int = 1, l1: float = 1e-3,
                 init: dict | None = None) -> None:
        super().__init__()
        if not 1 <= int(n_components) <= 3:
            raise ValueError(f"n_components must be 1, 2 or 3, got {n_components!r}.")
        self.init = dict(init or {})
        self.u = nn.Parameter(0.01 * torch.randn(n_components, n_regions))
        self.register_buffer("center", torch.zeros(n_regions))
        self.register_buffer("spread", torch.ones(n_regions))
        self.l1 = float(l1)
        self.out_dim = int(n_components)

    @torch.no_grad()
    def standardise_on(self, a: torch.Tensor) -> None:
        """Set ``center`` and ``spread`` from the training participants' amplitudes.

        Parameters
        ----------
        a : Tensor (N, R)
            Relative amplitudes of the training fold (never the test fold's).
        """
        _standardise_on(self, a)

    @torch.no_grad()
    def init_from_contrast(self, a: torch.Tensor, y: ArrayLike, p_threshold: float = 0.001,
                           subsamples: int = 0, fraction: float = 0.8,
                           seed: int = 0) -> list[int]:
        """Start the components on the regions the training participants point to.

        Region-wise two-sample t tests (responders vs the others, pooled variance) of the
        standardised amplitude. The regions with two-sided p below ``p_threshold`` seed
        component 0 with ``sign(t) / n`` on its ``n`` regions (the mean of their amplitudes,
        signed so that it rises with the contrast); component 1 (if any) takes those with a
        positive difference, component 2 those with a negative one. A component without such
        regions takes the single most significant region of its kind. Gradient training may
        then refine the weights (``fit="gradient"``).

        With ``subsamples`` > 0 the selection is *stability selection* (Meinshausen and
        Buehlmann 2010): the tests are repeated on ``subsamples`` random subsets of the
        participants (``fraction`` of each class, without replacement) and a region's weight
        is ``sign(t)`` times the share of subsets in which it passed, normalised to a sum of
        absolute weights of 1. A region far below the threshold in every subset gets no
        weight, one that passes in every subset the largest; one that passes by chance in the
        whole fold, and so in only some of its subsets, gets a small one. At ~100 participants
        and effects per region that the tests barely see, one hard threshold picks a
        different set with every few participants added or removed; the average over subsets
        does not.

        Parameters
        ----------
        a : Tensor (N, R)
            Training participants' relative amplitudes (never the test fold's).
        y : array-like (N,)
            Their labels.
        p_threshold : float, default=0.001
            Two-sided p-value below which a region seeds a component (in each subset).
        subsamples : int, default=0
            Subsets of stability selection; 0: one selection on all participants.
        fraction : float, default=0.8
            Share of each class in a subset (``0 < fraction <= 1``).
        seed : int, default=0
            Seed of the subsets (the same participants give the same weights).

        Returns
        -------
        list of int
            Regions with a weight in each component (empty when either class has fewer than 2
            participants).

        Raises
        ------
        ValueError
            ``subsamples`` below 0 or ``fraction`` outside (0, 1].
        """
        import numpy as np
        from scipy.stats import t as t_dist

        if int(subsamples) < 0 or not 0 < float(fraction) <= 1:
            raise ValueError(f"subsamples must be >= 0 and fraction in (0, 1], got "
                             f"{subsamples!r} and {fraction!r}.")
        center: torch.Tensor = self.center  # type: ignore[assignment]  # a buffer
        spread: torch.Tensor = self.spread  # type: ignore[assignment]  # a buffer
        z = ((a - center) / spread).detach().cpu().double().numpy()
        labels = np.asarray(y).astype(int)
        contrast = contrast_t(z, labels)
        if contrast is None:
            return []
        t_all, _ = contrast
        rules = ("any", "up", "down")[: self.u.shape[0]]

        def passed(t: np.ndarray, dof: int) -> list[np.ndarray]:
            """Per rule: sign(t) on the regions that pass, 0 elsewhere."""
            crit = float(t_dist.ppf(1 - p_threshold / 2, dof))
            out = []
            for rule in rules:
                keep = (np.abs(t) > crit if rule == "any"
                        else (1.0 if rule == "up" else -1.0) * t > crit)
                out.append(np.sign(t) * keep)
            return out

        if int(subsamples) == 0:
            weights = passed(*contrast)
        else:
            rng = np.random.default_rng(int(seed))
            members = [np.flatnonzero(labels == c) for c in (0, 1)]
            take = [max(2, int(round(float(fraction) * m.size))) for m in members]
            weights = [np.zeros(z.shape[1]) for _ in rules]
            for _ in range(int(subsamples)):
                idx = np.concatenate([rng.choice(m, k, replace=False)
                                      for m, k in zip(members, take)])
                sub = contrast_t(z[idx], labels[idx])
                if sub is None:
                    continue
                for k, w in enumerate(passed(*sub)):
                    weights[k] += w
        sizes = []
        for k, (rule, w) in enumerate(zip(rules, weights)):
            if not np.any(w):  # nothing passed: the single most significant region of its kind
                score = np.abs(t_all) if rule == "any" else (1.0 if rule == "up" else -1.0) * t_all
                top = int(np.argmax(score))
                w = np.zeros(z.shape[1])
                w[top] = np.sign(t_all[top]) or 1.0
            chosen = np.flatnonzero(w)
            u = 0.01 * torch.randn(z.shape[1], dtype=self.u.dtype)
            u[torch.as_tensor(chosen)] = torch.as_tensor(
                w[chosen] / np.abs(w).sum(), dtype=self.u.dtype)
            self.u[k] = u.to(self.u.device)
            sizes.append(int(chosen.size))
        return sizes

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """Features (B, K) of relative amplitudes (B, R).

        Parameters
        ----------
        a : Tensor (B, R)
            :func:`fmmtc_core.preprocess.relative_amplitude` of each scan.

        Returns
        -------
        Tensor (B, K)
            ``u_k^T (a - center) / spread`` for each component k.

        Raises
        ------
        ValueError
            ``a`` is not (batch, R).
        """
        if a.dim() != 2 or a.shape[1] != self.u.shape[1]:
            raise ValueError(f"AmplitudeReadout expects (batch, {self.u.shape[1]}) amplitudes, "
                             f"got {tuple(a.shape)}.")
        center: torch.Tensor = self.center  # type: ignore[assignment]  # a buffer
        spread: torch.Tensor = self.spread  # type: ignore[assignment]  # a buffer
        return ((a - center) / spread) @ self.u.T

    def penalty(self) -> torch.Tensor:
        """``l1 x sum |u|``: the term training adds to the loss.

        Returns
        -------
        Tensor
            A scalar, differentiable in the region weights ``u``.
        """
        return self.l1 * self.u.abs().sum()


class DynamicsFeatures(nn.Module):
    """The standardised regional dynamics, read by the head directly: (B, F) -> (B, F).

    ``(d - center) / spread`` for the ``F = 4 R`` values of
    :func:`fmmtc_core.preprocess.regional_dynamics` (laid end to end), with ``center`` and
    ``spread`` the training participants' mean and SD (buffers set by :meth:`standardise_on`,
    so a fold model carries its own standardisation). It has no weights of its own: the linear
    head weighs every feature, as an L2 logistic regression on them would (the stacked fit
    sets those weights from one; see :func:`fmmtc_core.training._fit_stacked`). Where the
    sparse read-outs pick a few regions by their contrast, this dense path keeps effects
    spread thinly over many regions or carried by the spectral shape.

    Parameters
    ----------
    n_features : int
        F: ``4 R``.
    """

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(int(n_features)))
        self.register_buffer("spread", torch.ones(int(n_features)))
        self.out_dim = int(n_features)

    @torch.no_grad()
    def standardise_on(self, d: torch.Tensor) -> None:
        """Set ``center`` and ``spread`` from the training participants' dynamics.

        Parameters
        ----------
        d : Tensor (N, F)
            The training fold's regional dynamics (never the test fold's).
        """
        _standardise_on(self, d)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        """Standardised dynamics (B, F).

        Parameters
        ----------
        d : Tensor (B, F)

        Returns
        -------
        Tensor (B, F)

        Raises
        ------
        ValueError
            ``d`` is not (batch, F).
        """
        center: torch.Tensor = self.center  # type: ignore[assignment]  # a buffer
        spread: torch.Tensor = self.spread  # type: ignore[assignment]  # a buffer
        if d.dim() != 2 or d.shape[1] != center.shape[0]:
            raise ValueError(f"DynamicsFeatures expects (batch, {center.shape[0]}) values, "
                             f"got {tuple(d.shape)}.")
        return (d - center) / spread
