"""The FMM-TC model: frozen foundation encoder (T) + learnable connectivity encoder (C) + head.

``FMMTC(ts_windows, fc, xyz) -> logit`` of being a responder. The TS branch is the embedding of
a frozen foundation encoder (a :class:`~fmmtc_core.models.encoder_base.FoundationEncoder` from
the registry: no gradient reaches it, which is how knowledge from a large pain-agnostic corpus
reaches a tiny pain cohort without overfitting); the FC branch (BrainNetCNN by default, the
paper's ResNet-18, or the ``small`` preset's sparse network read-out) learns from scratch; the
two representations are concatenated and a head gives one logit.

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

    def __post_init__(self) -> None:
        check_option("ts_pooling", self.ts_pooling, ("cls", "mean"))
        check_option("modalities", self.modalities, MODALITIES)
        check_option("foundation", self.foundation, ("pretrained", "scratch"))
        check_option("fc_input", self.fc_input, ("correlation", "gram"))

    @property
    def use_ts(self) -> bool:
        return "ts" in self.modalities

    @property
    def use_fc(self) -> bool:
        return "fc" in self.modalities

    @property
    def window(self) -> int:
        return int(self.foundation_config.get("num_timepoints_per_voxel", 200))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> FMMTCConfig:
        """The config stored by :meth:`to_dict` (a model card's ``model`` section), checked.

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
                 "encoder_entry": str, "encoder_hash": str}
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
    # For small cohorts (~100 participants): a sparse network read-out of connectivity and a
    # linear head, a few thousand parameters in all.
    "small": {"fc_encoder": "network", "fc_input": "correlation", "head_hidden": 0,
              "fc_kwargs": {"n_components": 4, "l1": 1e-3, "init": {"p_threshold": 3e-4}}},
}


def window_shape(encoder: FoundationEncoder) -> tuple[int, ...]:
    """Shape of one model input window of ``encoder``: ``(R, L)`` or ``(C, R, L)``."""
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
    foundation : FoundationEncoder, BrainLMModel or None
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
        if config.use_ts:
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
        if config.head_hidden:
            self.head = nn.Sequential(
                nn.Dropout(config.dropout), nn.Linear(dims, config.head_hidden), nn.GELU(),
                nn.Dropout(config.dropout), nn.Linear(config.head_hidden, 1),
            )
        else:  # the paper's head: one linear layer on the concatenation
            self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(dims, 1))

    @property
    def frozen_ts(self) -> bool:
        return self.ts_encoder is not None and self.config.foundation == "pretrained"

    def train(self, mode: bool = True) -> FMMTC:
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
        """
        enc = self.ts_encoder
        assert enc is not None, "this model has no time-series branch"
        if isinstance(enc, FoundationEncoder):
            return embed_scans(enc, window)
        if xyz is None:
            raise InvalidInputError("A BrainLM encoder needs the region centroids (xyz).")
        return enc.embed(window, xyz, pooling=self.config.ts_pooling)

    def fc_matrix(self, window: torch.Tensor, fc: torch.Tensor | None) -> torch.Tensor:
        """The FC encoder's input: the given connectivity, or the windows' Gram matrix."""
        if self.config.fc_input == "gram":
            if isinstance(self.ts_encoder, FoundationEncoder):
                return scans_gram(self.ts_encoder, window)
            return gram_matrix(window)
        if fc is None:
            raise InvalidInputError("This model needs the connectivity matrix (fc).")
        return fc

    def forward_features(self, ts_embedding: torch.Tensor | None,
                         fc_matrix: torch.Tensor | None) -> torch.Tensor:
        """Logits from a precomputed TS embedding and the FC encoder input (training path)."""
        parts: list[torch.Tensor] = []
        if self.config.use_ts:
            assert ts_embedding is not None, "a model with a TS branch needs its embedding"
            parts.append(ts_embedding)
        if self.config.use_fc:
            assert self.fc_encoder is not None  # built when config.use_fc
            parts.append(self.fc_encoder(fc_matrix))
        return self.head(torch.cat(parts, dim=1)).squeeze(1)

    def forward(self, window: torch.Tensor, fc: torch.Tensor | None,
                xyz: torch.Tensor | None = None) -> torch.Tensor:
        """Responder logit (B,) from the TS input (:meth:`embed_ts`), connectivity (B, R, R)
        and centroids (R, 3; a bare BrainLM encoder only)."""
        ts = self.embed_ts(window, xyz) if self.config.use_ts else None
        fcm = self.fc_matrix(window, fc) if self.config.use_fc else None
        return self.forward_features(ts, fcm)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def penalty(self) -> torch.Tensor:
        """Regularisation the encoders add to the training loss (0 for most)."""
        fc = self.fc_encoder
        if isinstance(fc, NetworkEncoder):
            return fc.penalty()
        return torch.zeros((), device=next(self.parameters()).device)
