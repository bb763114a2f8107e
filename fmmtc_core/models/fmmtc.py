"""The FMM-TC model: frozen foundation encoder (T) + learnable connectivity encoder (C) + head.

``FMMTC(ts_window, fc, xyz) -> logit`` of being a responder. The TS branch is the CLS embedding
of a BrainLM encoder, frozen (no gradient reaches it: that is how knowledge from a large
pain-agnostic corpus reaches a tiny pain cohort without overfitting); the FC branch
(BrainNetCNN by default, or the paper's ResNet-18) learns from scratch; the two
representations are concatenated and an MLP head gives one logit.

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
    ResNetGramEncoder,
    build_fc_encoder,
    gram_matrix,
)
from fmmtc_core.models.foundation import BrainLMConfig, BrainLMModel

__all__ = ["FMMTCConfig", "FMMTC", "PRESETS"]

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
    fc_encoder : {"brainnetcnn", "resnet18"}
    fc_input : {"correlation", "gram"}
        Fisher-z Pearson connectivity of the cleaned scan, or the paper's ``X X^T / T`` of the
        model window.
    fc_kwargs : dict
        Extra arguments of the FC encoder.
    head_hidden : int
    dropout : float
    foundation_config : dict
        :class:`BrainLMConfig` of the TS encoder (its geometry fixes the window length).
    ts_pooling : {"cls", "mean"}
        TS representation: the CLS token (the paper's choice, default) or the mean of the patch
        tokens. An MAE-pretrained encoder's CLS token gets no direct training signal, so with a
        small pretraining corpus the mean of the tokens can carry more of the series.
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
                 "foundation": str, "fc_encoder": str, "fc_input": str, "ts_pooling": str}
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
}


class FMMTC(nn.Module):
    """Multimodal responder classifier (see the module docstring)."""

    def __init__(self, config: FMMTCConfig, foundation: BrainLMModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.ts_encoder: BrainLMModel | None = None
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
            dims += foundation.config.hidden_size
        self.fc_encoder: BrainNetCNN | ResNetGramEncoder | None = None
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

    def embed_ts(self, window: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """TS representation (B, hidden): the foundation model's CLS token (or token mean)."""
        assert self.ts_encoder is not None, "this model has no time-series branch"
        return self.ts_encoder.embed(window, xyz, pooling=self.config.ts_pooling)

    def fc_matrix(self, window: torch.Tensor, fc: torch.Tensor | None) -> torch.Tensor:
        """The FC encoder's input: the given connectivity, or the window's Gram matrix."""
        if self.config.fc_input == "gram":
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
                xyz: torch.Tensor) -> torch.Tensor:
        """Responder logit (B,) from windows (B, R, T), connectivity (B, R, R), centroids (R, 3)."""
        ts = self.embed_ts(window, xyz) if self.config.use_ts else None
        fcm = self.fc_matrix(window, fc) if self.config.use_fc else None
        return self.forward_features(ts, fcm)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]
