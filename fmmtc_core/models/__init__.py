"""FMM-TC models: foundation encoders (T; one interface, a registry of layouts), connectivity
encoders (C)."""

from fmmtc_core.models.device import autocast, select_device
from fmmtc_core.models.fc_encoder import BrainNetCNN, ResNetGramEncoder, build_fc_encoder
from fmmtc_core.models.encoder_base import EncoderEntry, FoundationEncoder, RobustScaling
from fmmtc_core.models.foundation import (
    BrainLMConfig,
    BrainLMForPretraining,
    BrainLMModel,
    load_foundation,
)
from fmmtc_core.models.registry import ENTRIES, detect_entry, inspect_encoder, load_encoder

__all__ = [
    "BrainLMConfig",
    "BrainLMForPretraining",
    "BrainLMModel",
    "BrainNetCNN",
    "ENTRIES",
    "EncoderEntry",
    "FoundationEncoder",
    "RobustScaling",
    "ResNetGramEncoder",
    "autocast",
    "build_fc_encoder",
    "detect_entry",
    "inspect_encoder",
    "load_encoder",
    "load_foundation",
    "select_device",
]
