"""FMM-TC models: the BrainLM-compatible foundation encoder (T), connectivity encoders (C)."""

from fmmtc_core.models.device import autocast, select_device
from fmmtc_core.models.fc_encoder import BrainNetCNN, ResNetGramEncoder, build_fc_encoder
from fmmtc_core.models.foundation import (
    BrainLMConfig,
    BrainLMForPretraining,
    BrainLMModel,
    load_foundation,
)

__all__ = [
    "BrainLMConfig",
    "BrainLMForPretraining",
    "BrainLMModel",
    "BrainNetCNN",
    "ResNetGramEncoder",
    "autocast",
    "build_fc_encoder",
    "load_foundation",
    "select_device",
]
