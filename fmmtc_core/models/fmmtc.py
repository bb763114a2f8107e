"""The FMM-TC model: frozen foundation encoder (T) + learnable connectivity encoder (C) + head.

``FMMTC(ts_windows, fc, xyz) -> logit`` of being a responder. The TS branch is the embedding of
a frozen foundation encoder (a :class:`~fmmtc_core.models.encoder_base.FoundationEncoder` from
the registry: no gradient reaches it, which is how knowledge from a large pain-agnostic corpus
reaches a tiny pain cohort without overfitting); the FC branch (BrainNetCNN by default, the
paper's ResNet-18, or the ``small`` preset's sparse network read-out) learns from scratch; the
two representations are concatenated and a head gives one logit.

The encoders normalise every region of every window to a unit scale, so how strongly a region
fluctuates never reaches the embedding. Models with ``amplitude=True`` (the ``small`` preset)
add it to the T modality: each region's log SD relative to the scan's median region
(:func:`fmmtc_core.preprocess.relative_amplitude`), read out sparsely
(:class:`~fmmtc_core.models.amplitude.AmplitudeReadout`). The ``small`` preset is fitted
without gradient descent (``fit="stacked"``): its read-outs are set from the training fold's
contrasts, and its linear head is a logistic regression on cross-fitted features
(:func:`fmmtc_core.training._fit_stacked`); on the ``realistic`` simulation this is what learns
at n ~ 100, where gradient training of the same read-outs stays near chance
(``docs/learning.md``).

The TS input of a batch of scans is either ``(B, W, ...)``: every window of each scan (the
whole-scan representation: the scan's embedding is the mean of its windows' embeddings), or
``(B, ...)``: one window per scan (the centred window of models trained before whole-scan
embeddings, and of an encoder trained from scratch). ``...`` is the encoder's window shape,
``(R, L)`` for BrainLM encoders and ``(3, R, L)`` for ViT-MAE.

Ablations (as in the paper) are switches of :class:`FMMTCConfig`:

- ``modalities="ts"`` or ``"fc"``: one branch only;
- ``foundation="scratch"``: the TS encoder has the same architecture but random weights and is
  trained with the rest ("no foundation model").

Integrated Gradients later flows through the whole model, frozen encoder included: freezing
stops parameter updates, not input gradients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from fmmtc_core._errors import InvalidInputError, check_option
from fmmtc_core.models.fc_encoder import (
    BrainNetCNN,
    NetworkEncoder,
    ResNetGramEncoder,
    build_fc_encoder,
    gram_matrix,
)
from fmmtc_core.models.amplitude import AmplitudeReadout, DynamicsFeatures
from fmmtc_core.models.encoder_base import FoundationEncoder
from fmmtc_core.models.foundation import BrainLMConfig, BrainLMModel

__all__ = ["FMMTCConfig", "FMMTC", "PRESETS", "embed_scans", "scans_gram", "window_shape"]

MODALITIES = ("ts+fc", "ts", "fc")


@dataclass
class FMMTCConfig:
    """Everything needed to rebuild an FMM-TC network (stored as JSON with its weights).

    Attributes
    ----------
    n_regions : int
        Atlas regions R.
    modalities : {"ts+fc", "ts", "fc"}
    foundation : {"pretrained", "scratch"}
        Frozen pretrained TS encoder, or the same architecture trained from scratch.
    fc_encoder : {"brainnetcnn", "resnet18", "network"}
    fc_input : {"correlation", "gram"}
        Fisher-z Pearson connectivity of the cleaned scan, or the paper's ``X X^T / T`` of the
        model window.
    fc_kwargs : dict
        Extra arguments of the FC encoder.
    head_hidden : int
    dropout : float
    foundation_config : dict
        The TS encoder's ``config.json`` (its geometry fixes the window length).
    ts_pooling : {"cls", "mean"}
        TS representation: the CLS token (the paper's choice, default) or the mean of the patch
        tokens. An MAE-pretrained encoder's CLS token gets no direct training signal, so with a
        small pretraining corpus the mean of the tokens can carry more of the series.
    encoder_entry : str
        Registry entry of the frozen encoder (``"vitmae-111m"``, ``"fmmtc"``, ...); empty for
        models trained before the registry and for encoders trained from scratch.
    encoder_hash : str
        The encoder's preprocessing hash at training time
        (:attr:`~fmmtc_core.models.encoder_base.FoundationEncoder.preprocessing_hash`).
    amplitude : bool
        The T modality also reads each region's relative amplitude
        (:func:`fmmtc_core.preprocess.relative_amplitude`, which the encoders' per-window
        normalisation removes) through an
        :class:`~fmmtc_core.models.amplitude.AmplitudeReadout`.
    amplitude_kwargs : dict
        Arguments of the :class:`~fmmtc_core.models.amplitude.AmplitudeReadout`.
    dynamics : bool
        The amplitude input is the regional dynamics
        (:func:`fmmtc_core.preprocess.regional_dynamics`, 4 R values: relative amplitude,
        relative ALFF, fALFF, lag-1 autocorrelation) instead of the relative amplitude alone:
        the amplitude read-out reads its first R values, and the head also reads all 4 R,
        standardised (:class:`~fmmtc_core.models.amplitude.DynamicsFeatures`). Needs
        ``amplitude``.
    ts_embedding : bool
        The T modality includes the foundation encoder's embedding (False: regional amplitude
        only, the "no foundation model" ablation of the ``small`` preset; needs
        ``amplitude``).
    fit : {"gradient", "stacked"}
        How a fold model is fitted. ``"gradient"``: every trainable parameter by AdamW with
        early stopping. ``"stacked"`` (the ``small`` preset): the sparse read-outs are set from
        the training fold's contrasts (their ``init_from_contrast``) and kept, and the linear head is an L2 logistic regression, its
        strength chosen by inner cross-validation, fitted on *cross-fitted* read-out
        features (each training participant's features come from read-outs set without
        them), so the head does not learn the optimism of the region selection.
    """

    n_regions: int
    modalities: str = "ts+fc"
    foundation: str = "pretrained"
    fc_encoder: str = "brainnetcnn"
    fc_input: str = "correlation"
    fc_kwargs: dict = field(default_factory=dict)
    head_hidden: int = 64
    dropout: float = 0.3
    foundation_config: dict = field(default_factory=dict)
    ts_pooling: str = "cls"
    encoder_entry: str = ""
    encoder_hash: str = ""
    amplitude: bool = False
    amplitude_kwargs: dict = field(default_factory=dict)
    dynamics: bool = False
    ts_embedding: bool = True
    fit: str = "gradient"

    def __post_init__(self) -> None:
        check_option("ts_pooling", self.ts_pooling, ("cls", "mean"))
        check_option("modalities", self.modalities, MODALITIES)
        check_option("foundation", self.foundation, ("pretrained", "scratch"))
        check_option("fc_input", self.fc_input, ("correlation", "gram"))
        check_option("fit", self.fit, ("gradient", "stacked"))
        if self.fit == "stacked" and (self.head_hidden or (
                self.use_fc and self.fc_encoder != "network")
                or (self.use_encoder and self.foundation != "pretrained")):
            raise InvalidInputError(
                "fit='stacked' needs a linear head (head_hidden=0), the 'network' FC encoder "
                "and a frozen pretrained encoder.")
        if self.dynamics and not self.amplitude:
            raise InvalidInputError(
                "dynamics=True extends the regional amplitude input: it needs amplitude=True.")
        if self.use_ts and not (self.ts_embedding or self.amplitude):
            raise InvalidInputError(
                "A time-series branch needs the encoder's embedding (ts_embedding) or the "
                "regional amplitude (amplitude), or both.")

    @property
    def use_ts(self) -> bool:
        """Whether the model has a time-series (T) modality (encoder and/or amplitude)."""
        return "ts" in self.modalities

    @property
    def use_fc(self) -> bool:
        """Whether the model has a connectivity (C) branch."""
        return "fc" in self.modalities

    @property
    def use_encoder(self) -> bool:
        """Whether the model has a TS encoder (its embedding is part of the T modality)."""
        return self.use_ts and self.ts_embedding

    @property
    def use_amplitude(self) -> bool:
        """Whether the T modality reads the regional amplitude."""
        return self.use_ts and self.amplitude

    @property
    def use_dynamics(self) -> bool:
        """Whether the amplitude input is the regional dynamics (4 R values, not R)."""
        return self.use_amplitude and self.dynamics

    @property
    def amplitude_kind(self) -> str:
        """``prepare(..., amplitude=...)`` for this model: ``"dynamics"`` or ``"relative"``."""
        return "dynamics" if self.use_dynamics else "relative"

    @property
    def amplitude_size(self) -> int:
        """Length of the amplitude input: 4 R with :attr:`use_dynamics`, else R."""
        return 4 * self.n_regions if self.use_dynamics else self.n_regions

    @property
    def window(self) -> int:
        """Window length of the TS encoder (its config's ``num_timepoints_per_voxel``; 200
        when the config does not say)."""
        return int(self.foundation_config.get("num_timepoints_per_voxel", 200))

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict (the model card's ``model`` section).

        Returns
        -------
        dict
            Every field, by name (:func:`dataclasses.asdict`).
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> FMMTCConfig:
        """The config stored by :meth:`to_dict` (a model card's ``model`` section), checked.

        Parameters
        ----------
        data : dict
            The stored config; keys missing from it take their defaults (all but
            ``n_regions``), which is how cards written by older versions load.

        Returns
        -------
        FMMTCConfig

        Raises
        ------
        InvalidInputError
            ``data`` is not a dict, has unknown or missing keys, or a value of the wrong type;
            the message names the key and what was expected.
        """
        if not isinstance(data, dict):
            raise InvalidInputError(
                f"The FMM-TC config must be an object, got a {type(data).__name__}.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known), key=str)
        if unknown:
            raise InvalidInputError(
                f"The FMM-TC config has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"expected keys are {', '.join(map(repr, known))}.")
        if "n_regions" not in data:
            raise InvalidInputError("The FMM-TC config lacks the required key 'n_regions'.")
        kinds: dict[str, type | tuple[type, ...]] = {"n_regions": int, "head_hidden": int, "dropout": (int, float),
                 "fc_kwargs": dict, "foundation_config": dict, "modalities": str,
                 "foundation": str, "fc_encoder": str, "fc_input": str, "ts_pooling": str,
                 "encoder_entry": str, "encoder_hash": str, "amplitude_kwargs": dict,
                 "fit": str}
        for key in ("amplitude", "dynamics", "ts_embedding"):
            if key in data and not isinstance(data[key], bool):
                raise InvalidInputError(
                    f"The FMM-TC config's {key!r} must be true or false, got {data[key]!r}.")
        for key, kind in kinds.items():
            if key in data and (isinstance(data[key], bool) or not isinstance(data[key], kind)):
                names: dict[object, str] = {int: "an integer", dict: "an object", str: "a string"}
                expected = names.get(kind, "a number")
                raise InvalidInputError(
                    f"The FMM-TC config's {key!r} must be {expected}, got {data[key]!r}.")
        if data["n_regions"] < 1 or data.get("head_hidden", 0) < 0 or not (
                0 <= data.get("dropout", 0) < 1):
            raise InvalidInputError(
                "The FMM-TC config needs n_regions >= 1, head_hidden >= 0 and 0 <= dropout < 1; "
                f"got {data['n_regions']!r}, {data.get('head_hidden')!r} and "
                f"{data.get('dropout')!r}.")
        return cls(**data)


#: Named designs: ours (BrainNetCNN on Pearson connectivity) and the authors' reference one.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"fc_encoder": "brainnetcnn", "fc_input": "correlation", "head_hidden": 64},
    "paper": {"fc_encoder": "resnet18", "fc_input": "gram", "head_hidden": 0},
    # For small cohorts (~100 participants): sparse read-outs of connectivity (networks) and of
    # regional amplitude beside the encoder's embedding and the regional dynamics (each kept
    # by the fold's inner CV), and a linear head; a few thousand trainable parameters in all.
    "small": {"fc_encoder": "network", "fc_input": "correlation", "head_hidden": 0,
              "fc_kwargs": {"n_components": 2, "l1": 1e-3, "init": {"p_threshold": 1e-3},
                            "readout": "edges"},
              "amplitude": True, "dynamics": True, "fit": "stacked",
              "amplitude_kwargs": {"n_components": 1, "l1": 1e-3,
                                   "init": {"p_threshold": 1e-2}}},
}


def window_shape(encoder: FoundationEncoder) -> tuple[int, ...]:
    """Shape of one model input window of ``encoder``.

    Parameters
    ----------
    encoder : FoundationEncoder

    Returns
    -------
    tuple of int
        ``(R, L)`` for BrainLM encoders, ``(C, R, L)`` for encoders with channels (ViT-MAE).
    """
    e = encoder.entry
    return ((e.channels,) if e.channels else ()) + (e.n_regions, e.window)


def _per_scan(encoder: FoundationEncoder, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(B, W, ...)``: a one-window-per-scan batch ``(B, ...)`` gets ``W = 1``."""
    shape = window_shape(encoder)
    if tuple(x.shape[-len(shape):]) != shape or x.dim() not in (len(shape) + 1, len(shape) + 2):
        raise InvalidInputError(
            f"Encoder {encoder.entry.name!r} takes windows of shape {shape}, as a batch "
            f"(B, {', '.join(map(str, shape))}) or (B, W, {', '.join(map(str, shape))}); got "
            f"{tuple(x.shape)}.")
    return x.unsqueeze(1) if x.dim() == len(shape) + 1 else x


def embed_scans(encoder: FoundationEncoder, x: torch.Tensor) -> torch.Tensor:
    """One embedding per scan: the mean of the embeddings of its windows.

    Parameters
    ----------
    encoder : FoundationEncoder
    x : Tensor ``(B, W, ...)`` or ``(B, ...)``
        Every window of each scan (:func:`fmmtc_core.preprocess.prepare`), or one window per
        scan; ``...`` is :func:`window_shape`.

    Returns
    -------
    Tensor (B, hidden)
        Differentiable with respect to ``x``.
    """
    x = _per_scan(encoder, x)
    b, w = x.shape[:2]
    emb = encoder.embed_windows(x.reshape(b * w, *x.shape[2:]))
    return emb.view(b, w, -1).mean(1)


def scans_gram(encoder: FoundationEncoder, x: torch.Tensor) -> torch.Tensor:
    """The paper's Gram input of each scan: the mean over its windows of ``w w^T / L``.

    Parameters
    ----------
    encoder : FoundationEncoder
    x : Tensor ``(B, W, ...)`` or ``(B, ...)``
        As :func:`embed_scans`.

    Returns
    -------
    Tensor (B, R, R)
        In the atlas's region order (channels averaged).
    """
    x = _per_scan(encoder, x)
    b, w = x.shape[:2]
    rows = encoder.to_atlas_order(x.reshape(b * w, *x.shape[2:]), "mean")
    return gram_matrix(rows).view(b, w, rows.shape[1], rows.shape[1]).mean(1)


class FMMTC(nn.Module):
    """Multimodal responder classifier (see the module docstring).

    Parameters
    ----------
    config : FMMTCConfig
    foundation : FoundationEncoder, BrainLMModel or None, default=None
        The frozen encoder (``config.foundation == "pretrained"``): a
        :class:`~fmmtc_core.models.encoder_base.FoundationEncoder` from
        :func:`~fmmtc_core.models.registry.load_encoder` (or a bare :class:`BrainLMModel`);
        None builds a :class:`BrainLMModel` of ``config.foundation_config`` with random weights
        (trained with the rest when ``config.foundation == "scratch"``).
    """

    def __init__(self, config: FMMTCConfig,
                 foundation: FoundationEncoder | BrainLMModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.ts_encoder: FoundationEncoder | BrainLMModel | None = None
        dims = 0
        if config.use_encoder:
            if foundation is None:
                foundation = BrainLMModel(BrainLMConfig(**config.foundation_config))
            elif config.foundation == "scratch":
                raise InvalidInputError("foundation='scratch' takes no pretrained encoder.")
            self.ts_encoder = foundation
            if config.foundation == "pretrained":
                for p in self.ts_encoder.parameters():
                    p.requires_grad_(False)
                self.ts_encoder.eval()
            dims += (foundation.entry.hidden_size if isinstance(foundation, FoundationEncoder)
                     else foundation.config.hidden_size)
        self.fc_encoder: BrainNetCNN | ResNetGramEncoder | NetworkEncoder | None = None
        if config.use_fc:
            self.fc_encoder = build_fc_encoder(config.fc_encoder, config.n_regions,
                                               **config.fc_kwargs)
            dims += self.fc_encoder.out_dim
        self.amplitude_readout: AmplitudeReadout | None = None
        if config.use_amplitude:
            self.amplitude_readout = AmplitudeReadout(config.n_regions, **config.amplitude_kwargs)
            dims += self.amplitude_readout.out_dim
        self.dynamics: DynamicsFeatures | None = None
        if config.use_dynamics:
            self.dynamics = DynamicsFeatures(config.amplitude_size)
            dims += self.dynamics.out_dim
        if config.head_hidden:
            self.head = nn.Sequential(
                nn.Dropout(config.dropout), nn.Linear(dims, config.head_hidden), nn.GELU(),
                nn.Dropout(config.dropout), nn.Linear(config.head_hidden, 1),
            )
        else:  # the paper's head: one linear layer on the concatenation
            self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(dims, 1))

    @property
    def frozen_ts(self) -> bool:
        """Whether the model has a TS encoder that is pretrained and frozen."""
        return self.ts_encoder is not None and self.config.foundation == "pretrained"

    def train(self, mode: bool = True) -> FMMTC:
        """Set training mode, keeping a frozen encoder in evaluation mode (no dropout).

        Parameters
        ----------
        mode : bool, default=True
            As :meth:`torch.nn.Module.train`.

        Returns
        -------
        FMMTC
            ``self``.
        """
        super().train(mode)
        if self.frozen_ts:
            assert self.ts_encoder is not None  # frozen_ts implies it
            self.ts_encoder.eval()  # no dropout noise from a frozen encoder
        return self

    def embed_ts(self, window: torch.Tensor, xyz: torch.Tensor | None = None) -> torch.Tensor:
        """TS representation (B, hidden).

        With a :class:`~fmmtc_core.models.encoder_base.FoundationEncoder`: ``window`` is
        ``(B, W, ...)`` or ``(B, ...)`` (see the module docstring) and the result the mean over
        each scan's windows of the encoder's embedding (its token pooling: the config's
        ``ts_pooling``); ``xyz`` is not used (the encoder holds its coordinates). With a bare
        :class:`BrainLMModel`: windows ``(B, R, T)`` and centroids ``xyz`` (R, 3).

        Parameters
        ----------
        window : Tensor
            See above.
        xyz : Tensor (R, 3) or None, default=None
            Region centroids (a bare BrainLM encoder only).

        Returns
        -------
        Tensor (B, hidden)
            Differentiable with respect to ``window``.

        Raises
        ------
        InvalidInputError
            A bare BrainLM encoder without ``xyz``.
        """
        enc = self.ts_encoder
        assert enc is not None, "this model has no time-series branch"
        if isinstance(enc, FoundationEncoder):
            return embed_scans(enc, window)
        if xyz is None:
            raise InvalidInputError("A BrainLM encoder needs the region centroids (xyz).")
        return enc.embed(window, xyz, pooling=self.config.ts_pooling)

    def fc_matrix(self, window: torch.Tensor, fc: torch.Tensor | None) -> torch.Tensor:
        """The FC encoder's input: the given connectivity, or the windows' Gram matrix.

        Parameters
        ----------
        window : Tensor
            The TS input (as :meth:`embed_ts`); read only by ``fc_input="gram"`` models.
        fc : Tensor (B, R, R) or None
            Fisher-z connectivity; read only by ``fc_input="correlation"`` models.

        Returns
        -------
        Tensor (B, R, R)

        Raises
        ------
        InvalidInputError
            A ``"correlation"`` model is given ``fc=None``.
        """
        if self.config.fc_input == "gram":
            if isinstance(self.ts_encoder, FoundationEncoder):
                return scans_gram(self.ts_encoder, window)
            return gram_matrix(window)
        if fc is None:
            raise InvalidInputError("This model needs the connectivity matrix (fc).")
        return fc

    def forward_features(self, ts_embedding: torch.Tensor | None,
                         fc_matrix: torch.Tensor | None,
                         amplitude: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a precomputed TS embedding, the FC encoder input and the regional
        amplitude (training path).

        Parameters
        ----------
        ts_embedding : Tensor (B, hidden) or None
            :meth:`embed_ts` (None for a model without a TS encoder).
        fc_matrix : Tensor (B, R, R) or None
            :meth:`fc_matrix` (None for a model without an FC branch).
        amplitude : Tensor (B, R) or (B, 4 R) or None, default=None
            :func:`fmmtc_core.preprocess.relative_amplitude` of each scan, or its
            :func:`~fmmtc_core.preprocess.regional_dynamics` (``config.use_dynamics``); models
            with ``config.use_amplitude`` only.

        Returns
        -------
        Tensor (B,)
            Responder logits.
        """
        return self.head(self.features(ts_embedding, fc_matrix, amplitude)).squeeze(1)

    def features(self, ts_embedding: torch.Tensor | None, fc_matrix: torch.Tensor | None,
                 amplitude: torch.Tensor | None = None) -> torch.Tensor:
        """What the head reads: the TS embedding, the FC encoder's output, the amplitude
        read-out's and the standardised dynamics, concatenated in that order (the parts the
        model has).

        Parameters
        ----------
        ts_embedding, fc_matrix : Tensor or None
            As :meth:`forward_features`.
        amplitude : Tensor or None, default=None
            As :meth:`forward_features`.

        Returns
        -------
        Tensor (B, n_features)

        Raises
        ------
        InvalidInputError
            The model reads the amplitude and ``amplitude`` is None.
        """
        parts: list[torch.Tensor] = []
        if self.config.use_encoder:
            assert ts_embedding is not None, "a model with a TS encoder needs its embedding"
            parts.append(ts_embedding)
        if self.config.use_fc:
            assert self.fc_encoder is not None  # built when config.use_fc
            parts.append(self.fc_encoder(fc_matrix))
        if self.amplitude_readout is not None:
            if amplitude is None:
                raise InvalidInputError(
                    "This model reads the regional amplitude: pass ModelInputs.amplitude.")
            if self.dynamics is not None:
                r = self.config.n_regions
                if amplitude.dim() != 2 or amplitude.shape[1] != 4 * r:
                    raise InvalidInputError(
                        f"This model reads the regional dynamics: amplitude must have shape "
                        f"(batch, {4 * r}), got {tuple(amplitude.shape)}.")
                parts.append(self.amplitude_readout(amplitude[:, :r]))
                parts.append(self.dynamics(amplitude))
            else:
                parts.append(self.amplitude_readout(amplitude))
        return torch.cat(parts, dim=1)

    def forward(self, window: torch.Tensor, fc: torch.Tensor | None,
                xyz: torch.Tensor | None = None,
                amplitude: torch.Tensor | None = None) -> torch.Tensor:
        """Responder logits of a batch of scans.

        Parameters
        ----------
        window : Tensor
            The TS input (:meth:`embed_ts`); the Gram input of ``fc_input="gram"`` models.
        fc : Tensor (B, R, R) or None
            Fisher-z connectivity (``fc_input="correlation"`` models).
        xyz : Tensor (R, 3) or None, default=None
            Region centroids (a bare BrainLM encoder only).
        amplitude : Tensor (B, R) or (B, 4 R) or None, default=None
            Relative regional amplitude, or the regional dynamics (models with
            ``config.use_amplitude``; see :meth:`forward_features`).

        Returns
        -------
        Tensor (B,)
        """
        ts = self.embed_ts(window, xyz) if self.config.use_encoder else None
        fcm = self.fc_matrix(window, fc) if self.config.use_fc else None
        return self.forward_features(ts, fcm, amplitude)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters gradient training updates (a frozen encoder's are not among them).

        Returns
        -------
        list of torch.nn.Parameter
        """
        return [p for p in self.parameters() if p.requires_grad]

    def penalty(self) -> torch.Tensor:
        """Regularisation the encoders add to the training loss (0 for most).

        Returns
        -------
        Tensor
            A scalar: the L1 terms of the sparse read-outs (network FC encoder, amplitude).
        """
        total = torch.zeros((), device=next(self.parameters()).device)
        if isinstance(self.fc_encoder, NetworkEncoder):
            total = total + self.fc_encoder.penalty()
        if self.amplitude_readout is not None:
            total = total + self.amplitude_readout.penalty()
        return total
