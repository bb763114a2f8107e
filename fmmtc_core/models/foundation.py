"""A BrainLM-compatible masked autoencoder for region time series (the T encoder of FMM-TC).

Architecture (after the public BrainLM code, ``brainlm_mae/``; re-implemented, not copied):

- tokens are (region, time patch) pairs: each region's window of ``num_timepoints_per_voxel``
  samples is cut into patches of ``timepoint_patching_size``;
- token embedding = ``signal_embedding_projection(patch)`` + ``xyz_embedding_projection(region
  centroid, mm)`` + a sinusoidal encoding of the time-patch index; random masking; a CLS token;
- encoder: transformers' ``NystromformerLayer`` blocks, then a final layer norm;
- decoder (pretraining only): its own xyz projection, Nystromformer blocks and a two-layer head
  that reconstructs the masked patches (MSE on masked tokens).

Because the position of a region enters only through its centroid, any atlas with centroids can
be fed (our default HCPEx has 426 regions, BrainLM's A424 has 424).

**Attention.** The parameters are those of transformers' Nystromformer layers, so public
checkpoints load unchanged, but attention is computed by :class:`LinearNystromSelfAttention`.
The public configs set ``num_landmarks == segment_means_seq_len`` (64), and in that case
transformers' layer computes exact, quadratic softmax attention; a config without
``attention_mode`` is therefore resolved like the reference: ``"exact"`` when the two are equal
(computed with ``scaled_dot_product_attention``, memory-efficient), else ``"nystrom"``:
landmarks are the means of ``num_landmarks`` contiguous segments of the *actual* token
sequence, which makes every layer linear in the number of tokens (424 regions x 10 patches =
4,240 tokens). The project's own encoders say which they use in their ``config.json``.

**Token order.** Tokens are region-major (region 0's patches, then region 1's, ...). The
reference's masking shuffles them (argsort of random noise) even at mask ratio 0, and its
Nystromformer layers add a depthwise convolution over the token *sequence*
(``conv_kernel_size``), so its CLS depends on the order even with exact attention. Passing
``noise`` reproduces one reference draw; :class:`BrainLMFoundationEncoder` averages seeded
draws (``legacy-13m``) or keeps the natural order (the project's own encoders, pretrained with
``token_order="natural"``: the kept tokens of each masked sequence stay in natural order, so
pretraining and inference see the same kind of sequence).

Weights load only from a local Hugging Face-style directory (``config.json`` +
``model.safetensors``); pickled ``pytorch_model.bin`` files are refused, nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.nystromformer.configuration_nystromformer import NystromformerConfig
from transformers.models.nystromformer.modeling_nystromformer import (
    NystromformerLayer,
    NystromformerSelfAttention,
)

from fmmtc_core._errors import InvalidInputError, ModelFileError, check_option
from fmmtc_core.models.encoder_base import EncoderEntry, FoundationEncoder, RobustScaling

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BrainLMConfig",
    "BrainLMModel",
    "BrainLMForPretraining",
    "PretrainingOutput",
    "BrainLMFoundationEncoder",
    "load_foundation",
    "checkpoint_key_map",
    "read_safetensors",
    "PUBLIC_UNUSED_KEYS",
]

#: Parameters present in public BrainLM checkpoints that the architecture never uses (the
#: ViT-MAE image head BrainLM inherits and replaces); they are skipped when loading.
PUBLIC_UNUSED_KEYS = ("decoder.decoder_pred.weight", "decoder.decoder_pred.bias")
_MAX_PATCHES = 5000  # length of the sinusoid table (as in the public checkpoints)


def check_xyz_scale(value: object) -> float:
    """``value`` as a float if it is a usable ``xyz_scale`` (a positive number), else an error.

    Parameters
    ----------
    value : object
        The proposed scale (an int or float; a bool is refused).

    Returns
    -------
    float
        ``value`` as a float.

    Raises
    ------
    InvalidInputError
        ``value`` is not a positive int or float (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidInputError(f"xyz_scale must be a positive number, got {value!r}.")
    return float(value)


class BrainLMConfig(PretrainedConfig):
    """Configuration of the BrainLM masked autoencoder (``model_type = "brainlm_mae"``).

    Field names follow the public BrainLM configuration so its ``config.json`` loads as is.
    ``attention_mode`` ("nystrom" or "exact") is ours; None (a public config has no such field)
    resolves like the reference: "exact" when ``num_landmarks == segment_means_seq_len``, else
    "nystrom" (see the module docstring). ``token_order`` is ours too: "natural" keeps the
    kept tokens of a masked sequence in their natural order (the project's convention, written
    by ``fmmtc pretrain``); None or "shuffle" shuffles them as the reference does.
    ``xyz_scale`` is ours too: region centroids (MNI millimetres) are multiplied by it before
    the coordinate embedding. 1.0 (the default, so existing checkpoints load unchanged) feeds
    millimetres; 0.01 brings them to unit size like the robust-scaled signal, so the signal
    part of a token is not drowned by the coordinate part at initialisation
    (``bench/foundation_probe.py`` measures the ratio).

    Parameters
    ----------
    hidden_size : int, default=256
        Width of an encoder token.
    num_hidden_layers : int, default=4
        Encoder blocks.
    num_attention_heads : int, default=4
        Attention heads per encoder block.
    intermediate_size : int, default=1024
        Width of the encoder blocks' feed-forward layer.
    hidden_act : str, default="gelu"
        Activation of the feed-forward layers (a transformers activation name).
    hidden_dropout_prob : float, default=0.0
        Dropout on hidden states and on the time encoding.
    attention_probs_dropout_prob : float, default=0.1
        Kept from the public configuration; :class:`LinearNystromSelfAttention` applies no
        dropout to attention probabilities.
    initializer_range : float, default=0.02
        SD of the initial CLS and mask tokens (linear layers use Xavier initialisation).
    layer_norm_eps : float, default=1e-12
        Epsilon of every layer norm.
    decoder_num_attention_heads : int, default=4
    decoder_hidden_size : int, default=256
    decoder_num_hidden_layers : int, default=2
    decoder_intermediate_size : int, default=1024
        The same four for the pretraining decoder.
    num_brain_voxels : int, default=424
        Regions R of the atlas the model was (or is to be) trained on; the network itself
        accepts any R (regions enter through their centroids).
    num_timepoints_per_voxel : int, default=200
        Samples per window.
    mask_ratio : float, default=0.75
        Share of the tokens masked in pretraining (the default of :meth:`BrainLMModel.forward`).
    timepoint_patching_size : int, default=20
        Samples per time patch (one token); must divide the window.
    use_tanh_decoder : bool, default=False
        Pass the reconstruction through ``tanh``.
    loss_fn : str, default="mse"
        Reconstruction loss on the masked patches: ``"mse"``; any other value gives the mean
        absolute error.
    segment_means_seq_len : int, default=64
        transformers' Nystromformer setting; equal to ``num_landmarks`` it makes the reference
        compute exact attention.
    num_landmarks : int, default=64
        Landmarks of Nystrom attention.
    conv_kernel_size : int or None, default=65
        Depthwise convolution over the token sequence added to the attention output; None:
        none.
    inv_coeff_init_option : bool, default=False
        transformers' initialisation option of the iterative pseudo-inverse (Nystrom mode).
        Only False can be built (transformers and the reference fail on True): the start is
        scaled by a maximum over the whole batch, so an input's output depends slightly on its
        batch-mates (see :func:`fmmtc_core.explain.couples_batch`).
    attention_mode : {"nystrom", "exact"} or None, default=None
        See above; None resolves like the reference.
    xyz_scale : float, default=1.0
        See above.
    token_order : {"natural", "shuffle"} or None, default=None
        See above.
    **kwargs
        Passed to :class:`transformers.PretrainedConfig` (e.g. ``fmmtc_atlas``, kept as an
        attribute and in ``config.json``).

    Raises
    ------
    InvalidInputError
        ``xyz_scale`` is not a positive number, or ``attention_mode`` / ``token_order`` is not
        one of the values above.
    """

    model_type = "brainlm_mae"

    def __init__(
        self,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 1024,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.1,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        decoder_num_attention_heads: int = 4,
        decoder_hidden_size: int = 256,
        decoder_num_hidden_layers: int = 2,
        decoder_intermediate_size: int = 1024,
        num_brain_voxels: int = 424,
        num_timepoints_per_voxel: int = 200,
        mask_ratio: float = 0.75,
        timepoint_patching_size: int = 20,
        use_tanh_decoder: bool = False,
        loss_fn: str = "mse",
        segment_means_seq_len: int = 64,
        num_landmarks: int = 64,
        conv_kernel_size: int | None = 65,
        inv_coeff_init_option: bool = False,
        attention_mode: str | None = None,
        xyz_scale: float = 1.0,
        token_order: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_intermediate_size = decoder_intermediate_size
        self.num_brain_voxels = num_brain_voxels
        self.num_timepoints_per_voxel = num_timepoints_per_voxel
        self.mask_ratio = mask_ratio
        self.timepoint_patching_size = timepoint_patching_size
        self.use_tanh_decoder = use_tanh_decoder
        self.loss_fn = loss_fn
        self.segment_means_seq_len = segment_means_seq_len
        self.num_landmarks = num_landmarks
        self.conv_kernel_size = conv_kernel_size
        if inv_coeff_init_option:
            # transformers' NystromformerSelfAttention (and the reference BrainLM code copied
            # from it) reads config["inv_init_coeff_option"] then, a TypeError on any config.
            raise InvalidInputError(
                "inv_coeff_init_option=true cannot be built: the reference BrainLM code and "
                "transformers' Nystromformer both fail on it; set it to false (the "
                "pseudo-inverse then starts from a scale shared by the whole batch).")
        self.inv_coeff_init_option = inv_coeff_init_option
        self.xyz_scale = check_xyz_scale(xyz_scale)
        if attention_mode is None:  # as the reference computes it (see the module docstring)
            attention_mode = "exact" if num_landmarks == segment_means_seq_len else "nystrom"
        self.attention_mode = check_option("attention_mode", attention_mode, ("nystrom", "exact"))
        self.token_order = (None if token_order is None else
                            check_option("token_order", token_order, ("natural", "shuffle")))

    # Presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw) -> BrainLMConfig:
        """About 0.1 M parameters (70 k in the encoder): tests and the CPU demo model.

        Hidden 64 x 2 layers, decoder 64 x 1 layer, 32 landmarks.

        Parameters
        ----------
        **kw
            Any :class:`BrainLMConfig` argument (e.g. ``num_brain_voxels``); overrides the
            preset.

        Returns
        -------
        BrainLMConfig
        """
        base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=128, decoder_hidden_size=64, decoder_num_hidden_layers=1,
                    decoder_num_attention_heads=2, decoder_intermediate_size=128,
                    num_landmarks=32, conv_kernel_size=33)
        return cls(**(base | kw))

    @classmethod
    def small(cls, **kw) -> BrainLMConfig:
        """Geometry of the small public checkpoint used by FMM-TC (hidden 256, 4 layers).

        The :class:`BrainLMConfig` defaults (about 3.2 M encoder parameters).

        Parameters
        ----------
        **kw
            Any :class:`BrainLMConfig` argument (e.g. ``num_brain_voxels``).

        Returns
        -------
        BrainLMConfig
        """
        return cls(**kw)

    @classmethod
    def base(cls, **kw) -> BrainLMConfig:
        """BrainLM-111M-sized: ViT-base encoder (768 x 12) with a 512 x 8 decoder.

        Parameters
        ----------
        **kw
            Any :class:`BrainLMConfig` argument (e.g. ``num_brain_voxels``); overrides the
            preset.

        Returns
        -------
        BrainLMConfig
        """
        base = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, decoder_hidden_size=512,
                    decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                    decoder_intermediate_size=2048)
        return cls(**(base | kw))

    @property
    def n_patches(self) -> int:
        """Time patches (tokens) per region in one window."""
        return self.num_timepoints_per_voxel // self.timepoint_patching_size


def _layer_config(config: BrainLMConfig, decoder: bool) -> NystromformerConfig:
    pre = "decoder_" if decoder else ""
    return NystromformerConfig(
        hidden_size=getattr(config, f"{pre}hidden_size"),
        num_attention_heads=getattr(config, f"{pre}num_attention_heads"),
        intermediate_size=getattr(config, f"{pre}intermediate_size"),
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        layer_norm_eps=config.layer_norm_eps,
        num_landmarks=config.num_landmarks,
        segment_means_seq_len=config.segment_means_seq_len,
        # transformers' config refuses None (a strict int field); the layer drops the
        # convolution itself then (_nystrom_layer).
        conv_kernel_size=config.conv_kernel_size or 1,
        inv_coeff_init_option=config.inv_coeff_init_option,
    )


class LinearNystromSelfAttention(NystromformerSelfAttention):
    """Nystrom attention with landmarks from the actual sequence: linear in its length.

    Same parameters as transformers' ``NystromformerSelfAttention``; only the computation
    differs (landmarks = adaptive segment means, so any sequence length works).

    Parameters
    ----------
    config : transformers.NystromformerConfig
        The layer's configuration (heads, sizes, landmarks, convolution).
    mode : {"nystrom", "exact"}, default="nystrom"
        Nystrom approximation, or exact softmax attention (also used whenever the sequence
        has no more tokens than landmarks). Not validated here (see
        :class:`BrainLMConfig`); any value other than ``"exact"`` means Nystrom.
    """

    def __init__(self, config: NystromformerConfig, mode: str = "nystrom") -> None:
        super().__init__(config)
        self.mode = mode

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor | None, ...]:
        """Attention context (B, N, all_head_size), plus the probabilities when asked and
        computed (exact attention only).

        Parameters
        ----------
        hidden_states : Tensor (B, N, hidden)
            Token states.
        attention_mask : Tensor or None, default=None
            Ignored (every token attends to every token; BrainLM passes no mask).
        output_attentions : bool, default=False
            Also return the attention probabilities (B, heads, N, N); they are None under
            Nystrom attention.

        Returns
        -------
        tuple
            ``(context,)``, or ``(context, probabilities)`` when ``output_attentions``.
        """
        b, n, _ = hidden_states.shape
        shape = (b, n, self.num_attention_heads, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        scale = math.sqrt(math.sqrt(self.attention_head_size))
        q, k = q / scale, k / scale
        m = self.num_landmarks
        probs = None
        if (self.mode == "exact" or n <= m) and not output_attentions:
            # q and k are already scaled: softmax(q k^T) v, without materialising (n, n)
            context = nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
        elif self.mode == "exact" or n <= m:
            probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            context = probs @ v
        else:
            def landmarks(x):
                flat = x.transpose(-1, -2).reshape(b * self.num_attention_heads, -1, n)
                pooled = nn.functional.adaptive_avg_pool1d(flat, m)
                return pooled.reshape(b, self.num_attention_heads, -1, m).transpose(-1, -2)

            q_l, k_l = landmarks(q), landmarks(k)
            kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (b, h, n, m)
            kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (b, h, m, m)
            kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (b, h, m, n)
            context = (kernel_1 @ self.iterative_inv(kernel_2)) @ (kernel_3 @ v)
        if self.conv_kernel_size is not None:
            context = context + self.conv(v)
        context = context.transpose(1, 2).reshape(b, n, self.all_head_size)
        return (context, probs) if output_attentions else (context,)


def _nystrom_layer(config: BrainLMConfig, decoder: bool) -> NystromformerLayer:
    lc = _layer_config(config, decoder)
    layer = NystromformerLayer(lc)
    attention = LinearNystromSelfAttention(lc, config.attention_mode)
    if config.conv_kernel_size is None:  # no convolution over the token sequence
        attention.conv_kernel_size = None
        del attention.conv
    layer.attention.self = attention
    return layer


class _SinusoidalTime(nn.Module):
    """Sinusoidal encoding of the time-patch index (a persistent buffer, as in the checkpoints)."""

    pe: torch.Tensor  # registered buffer

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        position = torch.arange(_MAX_PATCHES).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(_MAX_PATCHES, dim)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, R, P, H)
        return self.dropout(x + self.pe[: x.shape[2]])


class BrainLMEmbeddings(nn.Module):
    """Token embeddings: linear(patch) + linear(xyz * xyz_scale) + time sinusoid; shuffle /
    masking; CLS first.

    Parameters
    ----------
    config : BrainLMConfig
        Sizes (hidden, patch), dropout, ``xyz_scale`` and ``token_order``.
    """

    def __init__(self, config: BrainLMConfig) -> None:
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.signal_embedding_projection = nn.Linear(config.timepoint_patching_size,
                                                     config.hidden_size)
        self.xyz_embedding_projection = nn.Linear(3, config.hidden_size)
        self.pos_embedding = _SinusoidalTime(config.hidden_size, config.hidden_dropout_prob)

    def forward(self, signal: torch.Tensor, xyz: torch.Tensor, mask_ratio: float,
                noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (B, 1 + kept, H), mask (B, R*P; 1 = masked) and ids_restore (B, R*P).

        Tokens are shuffled by ``argsort(noise)`` whenever ``noise`` is given or
        ``mask_ratio > 0`` (as the reference); with ``config.token_order == "natural"`` the kept
        ones stay in natural order.

        Parameters
        ----------
        signal : Tensor (B, R, T)
            Windows; T a multiple of the patch size.
        xyz : Tensor (B, R, 3)
            Region centroids (mm; multiplied by ``config.xyz_scale`` here).
        mask_ratio : float
            Share of tokens masked; ``int(R * P * (1 - mask_ratio))`` are kept.
        noise : Tensor (B, R*P) or None, default=None
            Fixes the shuffle; None draws it (only when ``mask_ratio > 0``).

        Returns
        -------
        tokens : Tensor (B, 1 + kept, H)
            CLS first, then the kept tokens.
        mask : Tensor (B, R*P)
            1 for a masked token, in region-major order.
        ids_restore : Tensor (B, R*P)
            Inverse of the shuffle (identity without one).
        """
        b, r, t = signal.shape
        p = t // self.config.timepoint_patching_size
        patches = signal.reshape(b, r, p, self.config.timepoint_patching_size)
        x = self.signal_embedding_projection(patches)
        x = x + self.xyz_embedding_projection(xyz * self.config.xyz_scale).unsqueeze(2)
        x = self.pos_embedding(x).flatten(1, 2)  # (B, R * P, H), region-major
        n = x.shape[1]
        if mask_ratio > 0 or noise is not None:  # the reference shuffles even at ratio 0
            keep = int(n * (1 - mask_ratio))
            if noise is None:
                noise = torch.rand(b, n, device=x.device)
            ids_shuffle = torch.argsort(noise, dim=1)
            if self.config.token_order == "natural":  # kept (and masked) tokens in order
                ids_shuffle = torch.cat([ids_shuffle[:, :keep].sort(dim=1).values,
                                         ids_shuffle[:, keep:].sort(dim=1).values], dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
            ids_keep = ids_shuffle[:, :keep]
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            mask = torch.ones(b, n, device=x.device)
            mask[:, :keep] = 0
            mask = torch.gather(mask, 1, ids_restore)
        else:
            ids_restore = torch.arange(n, device=x.device).expand(b, n)
            mask = torch.zeros(b, n, device=x.device)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        return x, mask, ids_restore


class _BrainLMPreTrained(PreTrainedModel):
    config: BrainLMConfig
    config_class = BrainLMConfig
    base_model_prefix = "vit"
    main_input_name = "signal_vectors"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BrainLMEmbeddings):
            nn.init.normal_(module.cls_token, std=self.config.initializer_range)
        elif isinstance(module, BrainLMDecoder):
            nn.init.normal_(module.mask_token, std=self.config.initializer_range)


def _check_inputs(config: BrainLMConfig, signal: torch.Tensor, xyz: torch.Tensor):
    if signal.dim() != 3:
        raise InvalidInputError(
            f"Expected region time series of shape (batch, regions, time), got {tuple(signal.shape)}."
        )
    if xyz.dim() == 2:
        xyz = xyz.unsqueeze(0).expand(signal.shape[0], -1, -1)
    if xyz.shape[-1] != 3 or xyz.shape[1] != signal.shape[1]:
        raise InvalidInputError(
            f"Every region needs a centroid: got {signal.shape[1]} regions but centroids of shape "
            f"{tuple(xyz.shape)}; expected ({signal.shape[1]}, 3)."
        )
    if signal.shape[2] % config.timepoint_patching_size:
        raise InvalidInputError(
            f"The window has {signal.shape[2]} samples, not a multiple of the patch size "
            f"{config.timepoint_patching_size}."
        )
    return xyz.to(signal.dtype)


class BrainLMModel(_BrainLMPreTrained):
    """The encoder: embeddings, Nystromformer layers, final layer norm.

    Parameters
    ----------
    config : BrainLMConfig
        The architecture.
    """

    def __init__(self, config: BrainLMConfig) -> None:
        super().__init__(config)
        self.embeddings = BrainLMEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            [_nystrom_layer(config, decoder=False) for _ in range(config.num_hidden_layers)]
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, signal_vectors: torch.Tensor, xyz_vectors: torch.Tensor,
                mask_ratio: float | None = None, noise: torch.Tensor | None = None,
                final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode; returns (tokens incl. CLS at 0, mask (B, R*P), ids_restore).

        ``noise`` (B, R*P) fixes the token shuffle (the reference shuffles even at mask ratio
        0); ``final_norm=False`` returns the last block's output, before the final layer norm.

        Parameters
        ----------
        signal_vectors : Tensor (B, R, T)
            Windows (robust-scaled region series); T a multiple of the patch size.
        xyz_vectors : Tensor (R, 3) or (B, R, 3)
            Region centroids in mm.
        mask_ratio : float or None, default=None
            None: ``config.mask_ratio``.
        noise : Tensor (B, R*P) or None, default=None
            See above.
        final_norm : bool, default=True
            See above.

        Returns
        -------
        tokens : Tensor (B, 1 + kept, hidden)
        mask : Tensor (B, R*P)
        ids_restore : Tensor (B, R*P)
            As :meth:`BrainLMEmbeddings.forward`.

        Raises
        ------
        InvalidInputError
            ``signal_vectors`` is not 3D, the centroids are not one (x, y, z) per region, or
            T is not a multiple of the patch size.
        """
        xyz = _check_inputs(self.config, signal_vectors, xyz_vectors)
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        x, mask, ids_restore = self.embeddings(signal_vectors, xyz, ratio, noise)
        for layer in cast(nn.ModuleList, self.encoder.layer):
            x = layer(x)[0]
        return (self.layernorm(x) if final_norm else x), mask, ids_restore

    def embed(self, signal_vectors: torch.Tensor, xyz_vectors: torch.Tensor,
              pooling: str = "cls") -> torch.Tensor:
        """Representation of whole windows, no masking: (B, hidden).

        ``pooling="cls"`` returns the CLS token (the FMM-TC TS feature), ``"mean"`` the mean
        of the patch tokens. Differentiable with respect to ``signal_vectors``. Tokens are in
        natural order (no shuffle), after the final layer norm.

        Parameters
        ----------
        signal_vectors : Tensor (B, R, T)
            Windows; T a multiple of the patch size.
        xyz_vectors : Tensor (R, 3) or (B, R, 3)
            Region centroids in mm.
        pooling : {"cls", "mean"}, default="cls"
            See above.

        Returns
        -------
        Tensor (B, hidden)

        Raises
        ------
        InvalidInputError
            An unknown ``pooling``, or inputs :meth:`forward` refuses.
        """
        pooling = check_option("pooling", pooling, ("cls", "mean"))
        tokens, _, _ = self.forward(signal_vectors, xyz_vectors, mask_ratio=0.0)
        return tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(dim=1)


class BrainLMDecoder(nn.Module):
    """The pretraining decoder (its own xyz projection, Nystromformer blocks, two-layer head).

    Parameters
    ----------
    config : BrainLMConfig
        The architecture (the ``decoder_*`` sizes).
    """

    def __init__(self, config: BrainLMConfig) -> None:
        super().__init__()
        self.config = config
        hd = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, hd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hd))
        self.decoder_xyz_projection = nn.Linear(3, hd)
        self.pos_embedding = _SinusoidalTime(hd, config.hidden_dropout_prob)
        self.decoder_layers = nn.ModuleList(
            [_nystrom_layer(config, decoder=True) for _ in range(config.decoder_num_hidden_layers)]
        )
        self.decoder_norm = nn.LayerNorm(hd, eps=config.layer_norm_eps)
        self.decoder_pred1 = nn.Linear(hd, hd // 2)
        self.decoder_pred_nonlinearity = nn.LeakyReLU(0.1)
        self.decoder_pred2 = nn.Linear(hd // 2, config.timepoint_patching_size)

    def forward(self, latent: torch.Tensor, xyz: torch.Tensor, ids_restore: torch.Tensor,
                n_regions: int) -> torch.Tensor:
        """Reconstructed patches (B, R, P, patch) from the encoder's kept tokens.

        Parameters
        ----------
        latent : Tensor (B, 1 + kept, hidden)
            The encoder's tokens, CLS first.
        xyz : Tensor (B, R, 3)
            Region centroids in mm.
        ids_restore : Tensor (B, R*P)
            From the encoder: puts the kept and the mask tokens back in region-major order.
        n_regions : int
            R.

        Returns
        -------
        Tensor (B, R, P, patch)
            The reconstruction of every patch (``tanh``-squashed with
            ``config.use_tanh_decoder``).
        """
        x = self.decoder_embed(latent)
        b, n_kept, hd = x[:, 1:].shape
        n = ids_restore.shape[1]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n - n_kept, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, hd))
        p = n // n_regions
        tokens = tokens.reshape(b, n_regions, p, hd)
        tokens = tokens + self.decoder_xyz_projection(xyz * self.config.xyz_scale).unsqueeze(2)
        tokens = self.pos_embedding(tokens).flatten(1, 2)
        h = torch.cat([x[:, :1], tokens], dim=1)
        for layer in self.decoder_layers:
            h = layer(h)[0]
        h = self.decoder_pred2(self.decoder_pred_nonlinearity(self.decoder_pred1(
            self.decoder_norm(h))))
        if self.config.use_tanh_decoder:
            h = torch.tanh(h)
        return h[:, 1:].reshape(b, n_regions, p, self.config.timepoint_patching_size)


@dataclass
class PretrainingOutput:
    """Masked-reconstruction result: loss (scalar), reconstruction (B, R, P, patch), mask (B, R, P).

    Attributes
    ----------
    loss : Tensor
        Scalar: the reconstruction error averaged over the masked patches' samples.
    reconstruction : Tensor (B, R, P, patch)
        The decoder's output for every patch.
    mask : Tensor (B, R, P)
        1 where the patch was masked.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    mask: torch.Tensor


class BrainLMForPretraining(_BrainLMPreTrained):
    """Encoder + decoder trained by masked reconstruction (module names of the public code).

    Parameters
    ----------
    config : BrainLMConfig
        The architecture.
    """

    def __init__(self, config: BrainLMConfig) -> None:
        super().__init__(config)
        self.vit = BrainLMModel(config)
        self.decoder = BrainLMDecoder(config)
        self.post_init()

    def forward(self, signal_vectors: torch.Tensor, xyz_vectors: torch.Tensor,
                noise: torch.Tensor | None = None,
                mask_ratio: float | None = None) -> PretrainingOutput:
        """Masked reconstruction: loss on the masked patches, reconstruction and mask.

        Parameters
        ----------
        signal_vectors : Tensor (B, R, T)
            Windows; T a multiple of the patch size.
        xyz_vectors : Tensor (R, 3) or (B, R, 3)
            Region centroids in mm.
        noise : Tensor (B, R*P) or None, default=None
            Fixes the shuffle that picks the masked tokens; None draws it.
        mask_ratio : float or None, default=None
            None: ``config.mask_ratio``.

        Returns
        -------
        PretrainingOutput

        Raises
        ------
        InvalidInputError
            Inputs :meth:`BrainLMModel.forward` refuses.
        """
        xyz = _check_inputs(self.config, signal_vectors, xyz_vectors)
        latent, mask, ids_restore = self.vit(signal_vectors, xyz, mask_ratio, noise)
        b, r, t = signal_vectors.shape
        recon = self.decoder(latent, xyz, ids_restore, r)
        target = signal_vectors.reshape(recon.shape)
        mask = mask.reshape(recon.shape[:-1])
        err = (recon - target) ** 2 if self.config.loss_fn == "mse" else (recon - target).abs()
        weight = mask.unsqueeze(-1).expand_as(err)
        loss = (err * weight).sum() / weight.sum().clamp_min(1.0)
        return PretrainingOutput(loss=loss, reconstruction=recon, mask=mask)

    def embed(self, signal_vectors: torch.Tensor, xyz_vectors: torch.Tensor,
              pooling: str = "cls") -> torch.Tensor:
        """See :meth:`BrainLMModel.embed`.

        Parameters
        ----------
        signal_vectors : Tensor (B, R, T)
            Windows; T a multiple of the patch size.
        xyz_vectors : Tensor (R, 3) or (B, R, 3)
            Region centroids in mm.
        pooling : {"cls", "mean"}, default="cls"
            CLS token or mean of the patch tokens.

        Returns
        -------
        Tensor (B, hidden)
        """
        return self.vit.embed(signal_vectors, xyz_vectors, pooling)


# --------------------------------------------------------------------------------------------
# Loading local checkpoints
# --------------------------------------------------------------------------------------------
def checkpoint_key_map(keys: Iterable[str]) -> dict[str, str | None]:
    """Map checkpoint parameter names to ours (None = known-unused, skipped).

    Handles the public layout (``vit.*`` + ``decoder.*``, with the unused ViT-MAE
    ``decoder.decoder_pred``) and encoder-only checkpoints saved from ``BrainLMModel``
    (names without the ``vit.`` prefix).

    Parameters
    ----------
    keys : iterable of str
        Parameter names of the checkpoint (a state dict or a safetensors header).

    Returns
    -------
    dict
        Checkpoint name -> name in :class:`BrainLMForPretraining` (``vit.`` added to bare
        encoder names), or None for :data:`PUBLIC_UNUSED_KEYS`; other names unchanged.
    """
    out: dict[str, str | None] = {}
    for k in keys:
        if k in PUBLIC_UNUSED_KEYS:
            out[k] = None
        elif k.startswith(("embeddings.", "encoder.", "layernorm.")):
            out[k] = "vit." + k
        else:
            out[k] = k
    return out


def _fmt_keys(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def model_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``"Model file 'fold_0.safetensors' in '/models/x'"``: how refusals name a file.

    Quoted with ``repr`` so that a name holding a newline still gives a one-line message.
    ``root`` (default: the file's folder) is the folder the name is given relative to.

    Parameters
    ----------
    path : path
        The file.
    root : path or None, default=None
        The folder the name is given relative to; None: the file's folder. A file outside it
        is named by its full path.

    Returns
    -------
    str
        ``"Model file '<relative name>' in '<root>'"``.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = str(path)
    return f"Model file {rel!r} in {str(root)!r}"


def _one_line(text) -> str:
    return " ".join(str(text).split())


def read_json_object(path: Path, where: str, expected: str, raw: bytes | None = None) -> dict:
    """A JSON object from a model folder (``raw``: the file's bytes, when already read), or a
    :class:`ModelFileError` that names the file (``where``) and what was ``expected``.

    Parameters
    ----------
    path : Path
        The JSON file (read unless ``raw`` is given).
    where : str
        How the message names the file (:func:`model_file`).
    expected : str
        What the file should hold, for the message.
    raw : bytes or None, default=None
        The file's bytes, when already read.

    Returns
    -------
    dict
        The parsed object.

    Raises
    ------
    ModelFileError
        Not valid UTF-8 JSON, or JSON that is not an object.
    """
    try:
        value = json.loads(path.read_bytes() if raw is None else raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{where} is not valid JSON ({_one_line(exc)}); expected "
                             f"{expected}.") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{where} holds a JSON {type(value).__name__}, not an object; "
                             f"expected {expected}.")
    return value


def read_safetensors(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                     device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a :class:`ModelFileError` that names it.

    Nothing is ever unpickled: a pickle or ``torch.save`` archive renamed ``.safetensors`` is
    recognised (after the safetensors parser refused it, so a valid file is never mistaken for
    one) and refused as such; a truncated or damaged file is refused too.

    Parameters
    ----------
    path : path
        The ``.safetensors`` file.
    root : path or None, default=None
        Folder that messages give the file's name relative to (default: its own folder).
    device : torch.device, str or None, default=None
        Where the tensors are placed (default: CPU).

    Returns
    -------
    dict of str to Tensor
        Every tensor of the file, by name.

    Raises
    ------
    ModelFileError
        The file is missing, is a pickle or ``torch.save`` archive, or is not a readable
        safetensors file (truncated or damaged); the message names it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    where = model_file(path, root)
    if not path.is_file():
        raise ModelFileError(f"{where} is missing; expected a safetensors file.")
    try:
        return load_file(str(path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        reason = _one_line(exc)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK\x03\x04") or (magic[:1] == b"\x80" and magic[1:2] in
                                             (b"\x02", b"\x03", b"\x04", b"\x05")):
        kind = "a zip archive (torch.save)" if magic.startswith(b"PK") else "a pickle"
        raise ModelFileError(
            f"{where} is {kind}, not a safetensors file. It was not loaded, because unpickling "
            "can run code; expected tensors in safetensors format. Restore the model folder or "
            "convert the weights with a trusted tool.")
    raise ModelFileError(
        f"{where} is not a readable safetensors file ({reason}); it may be truncated or "
        "damaged. Restore it or retrain.")


def load_foundation(path: str | os.PathLike, *, device=None, encoder_only: bool = False):
    """Load a BrainLM checkpoint from a local Hugging Face-style directory.

    Parameters
    ----------
    path : path
        Directory with ``config.json`` (``model_type`` "brainlm_mae") and ``model.safetensors``.
    device : torch.device, str or None, default=None
        Where the model is moved; None leaves it on the CPU.
    encoder_only : bool, default=False
        Return the encoder (:class:`BrainLMModel`) without the decoder. A checkpoint without
        decoder weights always gives the encoder.

    Returns
    -------
    BrainLMForPretraining or BrainLMModel
        In eval mode.

    Raises
    ------
    ModelFileError
        Missing files, a pickle-only checkpoint or a pickle under the safetensors name, a
        truncated file, a ``config.json`` that is not a JSON object or describes no usable
        model, another model type, missing / unexpected parameters or wrong shapes (all named).

    Notes
    -----
    Regions enter through their centroids, so a checkpoint trained on BrainLM's 424-region
    A424 atlas accepts any atlas; every forward pass checks that each region has a centroid.
    Unknown keys in ``config.json`` are kept (public BrainLM configs carry Hugging Face's).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelFileError(f"Foundation model folder {str(path)!r} does not exist.")
    cfg_path, weights = path / "config.json", path / "model.safetensors"
    if not weights.exists() and any(path.glob("*.bin")):
        raise ModelFileError(
            f"{str(path)!r} holds only pickled PyTorch weights (*.bin). They are not loaded, "
            "because unpickling can run code: convert them to model.safetensors with a trusted "
            "tool."
        )
    missing_files = [p.name for p in (cfg_path, weights) if not p.exists()]
    if missing_files:
        raise ModelFileError(
            f"{str(path)!r} is not a BrainLM checkpoint: missing {', '.join(missing_files)} "
            "(expected config.json + model.safetensors)."
        )
    where = model_file(cfg_path)
    raw = read_json_object(cfg_path, where, "a BrainLM config object")
    if raw.get("model_type") != "brainlm_mae":
        raise ModelFileError(
            f"{where} has model_type {raw.get('model_type')!r}; expected 'brainlm_mae'."
        )
    try:
        config = BrainLMConfig(**{k: v for k, v in raw.items() if k != "model_type"})
        model = BrainLMForPretraining(config)
    except (InvalidInputError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{where} does not describe a usable BrainLM model "
                             f"({_one_line(exc)}).") from None
    state = read_safetensors(weights)
    mapping = checkpoint_key_map(state)
    ours = model.state_dict()
    renamed = {name: v for k, v in state.items() if (name := mapping[k]) is not None}
    unexpected = set(renamed) - set(ours)
    needed = set(ours)
    if encoder_only or not any(k.startswith("decoder.") for k in renamed):
        needed = {k for k in ours if k.startswith("vit.")}
        encoder_only = True
    missing = needed - set(renamed)
    problems = []
    if missing:
        problems.append(f"is missing {len(missing)} parameters: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"has {len(unexpected)} unexpected parameters: {_fmt_keys(unexpected)}")
    wrong = [f"{k} {tuple(renamed[k].shape)} (expected {tuple(ours[k].shape)})"
             for k in needed & set(renamed) if renamed[k].shape != ours[k].shape]
    if wrong:
        problems.append(f"has {len(wrong)} parameters of the wrong shape: {_fmt_keys(wrong)}")
    if problems:
        raise ModelFileError(f"Checkpoint {str(path)!r} does not match its config.json: "
                             + "; ".join(problems) + ".")
    target = model.vit if encoder_only else model
    sub = ({k[4:]: v for k, v in renamed.items() if k.startswith("vit.")} if encoder_only
           else renamed)
    target.load_state_dict(sub, strict=True)
    target.eval()
    if device is not None:
        target.to(device)
    return target


# --------------------------------------------------------------------------------------------
# The foundation-encoder interface for BrainLM-architecture checkpoints
# --------------------------------------------------------------------------------------------
class BrainLMFoundationEncoder(FoundationEncoder):
    """A BrainLM-architecture encoder (``legacy-13m`` or the project's ``fmmtc``) with its
    preprocessing; see :class:`~fmmtc_core.models.encoder_base.FoundationEncoder`.

    Get one from :func:`fmmtc_core.models.registry.load_encoder`.

    Parameters
    ----------
    entry : EncoderEntry
        A ``brainlm_mae`` entry.
    model : BrainLMModel
        The encoder, its weights loaded.
    folder : path
        The checkpoint folder.
    xyz : ndarray (R, 3)
        Region coordinates (mm) in the entry's *row* order (the model multiplies them by its
        ``xyz_scale``).
    region_index : ndarray (R,) of int
        Atlas position of each window row.
    scaling : RobustScaling or None, default=None
        Global robust-scaling statistics (``legacy-13m``; the project's encoders scale each
        window).
    coordinates_digest : str, default=""
        Digest of the coordinates (part of the preprocessing hash).
    order_seed : int, default=0
        Seed of the token shuffles (``token_order == "shuffle"``).
    """

    xyz: torch.Tensor  # registered buffer: moves with the module

    def __init__(self, entry: EncoderEntry, model: BrainLMModel, folder: str | os.PathLike, *,
                 xyz: np.ndarray, region_index: np.ndarray,
                 scaling: RobustScaling | None = None, coordinates_digest: str = "",
                 order_seed: int = 0) -> None:
        super().__init__(entry, model, folder, region_index=region_index, scaling=scaling,
                         coordinates_digest=coordinates_digest, order_seed=order_seed)
        self.register_buffer("xyz", torch.as_tensor(xyz, dtype=torch.float32), persistent=False)

    def _n_tokens(self, x: torch.Tensor) -> int:
        return int(x.shape[1] * (x.shape[2] // self.entry.patch[1]))

    def _forward_windows(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        model = cast(BrainLMModel, self.model)
        tokens, _, _ = model(x, self.xyz.to(x.device), mask_ratio=0.0, noise=noise,
                             final_norm=self.entry.readout == "final-norm")
        return tokens
