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
checkpoints load unchanged, but attention is computed by :class:`LinearNystromSelfAttention`:
landmarks are the means of ``num_landmarks`` contiguous segments of the *actual* token
sequence, which makes every layer linear in the number of tokens (424 regions x 10 patches =
4,240 tokens). Note what we found in the public code: its configs set ``num_landmarks ==
segment_means_seq_len`` (64), and in that case transformers' layer silently computes exact,
quadratic softmax attention. A public checkpoint is therefore reproduced exactly with
``attention_mode="exact"``, and approximated (Nystrom) by the default ``"nystrom"``.

Weights load only from a local Hugging Face-style directory (``config.json`` +
``model.safetensors``); pickled ``pytorch_model.bin`` files are refused, nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.nystromformer.configuration_nystromformer import NystromformerConfig
from transformers.models.nystromformer.modeling_nystromformer import (
    NystromformerLayer,
    NystromformerSelfAttention,
)

from fmmtc_core._errors import InvalidInputError, ModelFileError, check_option

__all__ = [
    "BrainLMConfig",
    "BrainLMModel",
    "BrainLMForPretraining",
    "PretrainingOutput",
    "load_foundation",
    "checkpoint_key_map",
    "read_safetensors",
    "PUBLIC_UNUSED_KEYS",
]

#: Parameters present in public BrainLM checkpoints that the architecture never uses (the
#: ViT-MAE image head BrainLM inherits and replaces); they are skipped when loading.
PUBLIC_UNUSED_KEYS = ("decoder.decoder_pred.weight", "decoder.decoder_pred.bias")
_MAX_PATCHES = 5000  # length of the sinusoid table (as in the public checkpoints)


def check_xyz_scale(value) -> float:
    """``value`` as a float if it is a usable ``xyz_scale`` (a positive number), else an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidInputError(f"xyz_scale must be a positive number, got {value!r}.")
    return float(value)


class BrainLMConfig(PretrainedConfig):
    """Configuration of the BrainLM masked autoencoder (``model_type = "brainlm_mae"``).

    Field names follow the public BrainLM configuration so its ``config.json`` loads as is.
    ``attention_mode`` ("nystrom" or "exact") is ours; see the module docstring.
    ``xyz_scale`` is ours too: region centroids (MNI millimetres) are multiplied by it before
    the coordinate embedding. 1.0 (the default, so existing checkpoints load unchanged) feeds
    millimetres; 0.01 brings them to unit size like the robust-scaled signal, so the signal
    part of a token is not drowned by the coordinate part at initialisation
    (``bench/foundation_probe.py`` measures the ratio).
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
        attention_mode: str = "nystrom",
        xyz_scale: float = 1.0,
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
        self.inv_coeff_init_option = inv_coeff_init_option
        self.xyz_scale = check_xyz_scale(xyz_scale)
        self.attention_mode = attention_mode

    # Presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw) -> BrainLMConfig:
        """A few hundred thousand parameters: tests and the CPU demo model."""
        base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=128, decoder_hidden_size=64, decoder_num_hidden_layers=1,
                    decoder_num_attention_heads=2, decoder_intermediate_size=128,
                    num_landmarks=32, conv_kernel_size=33)
        return cls(**(base | kw))

    @classmethod
    def small(cls, **kw) -> BrainLMConfig:
        """Geometry of the small public checkpoint used by FMM-TC (hidden 256, 4 layers)."""
        return cls(**kw)

    @classmethod
    def base(cls, **kw) -> BrainLMConfig:
        """BrainLM-111M-sized: ViT-base encoder (768 x 12) with a 512 x 8 decoder."""
        base = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, decoder_hidden_size=512,
                    decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                    decoder_intermediate_size=2048)
        return cls(**(base | kw))

    @property
    def n_patches(self) -> int:
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
        # transformers types it int, but its attention takes None as "no convolution".
        conv_kernel_size=config.conv_kernel_size,  # type: ignore[arg-type]
        inv_coeff_init_option=config.inv_coeff_init_option,
    )


class LinearNystromSelfAttention(NystromformerSelfAttention):
    """Nystrom attention with landmarks from the actual sequence: linear in its length.

    Same parameters as transformers' ``NystromformerSelfAttention``; only the computation
    differs (landmarks = adaptive segment means, so any sequence length works).
    """

    def __init__(self, config, mode: str = "nystrom") -> None:
        super().__init__(config)
        self.mode = mode

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        b, n, _ = hidden_states.shape
        shape = (b, n, self.num_attention_heads, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        scale = math.sqrt(math.sqrt(self.attention_head_size))
        q, k = q / scale, k / scale
        m = self.num_landmarks
        if self.mode == "exact" or n <= m:
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
            probs = None
        if self.conv_kernel_size is not None:
            context = context + self.conv(v)
        context = context.transpose(1, 2).reshape(b, n, self.all_head_size)
        return (context, probs) if output_attentions else (context,)


def _nystrom_layer(config: BrainLMConfig, decoder: bool) -> NystromformerLayer:
    lc = _layer_config(config, decoder)
    layer = NystromformerLayer(lc)
    layer.attention.self = LinearNystromSelfAttention(lc, config.attention_mode)
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
    def __init__(self, config: BrainLMConfig) -> None:
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.signal_embedding_projection = nn.Linear(config.timepoint_patching_size,
                                                     config.hidden_size)
        self.xyz_embedding_projection = nn.Linear(3, config.hidden_size)
        self.pos_embedding = _SinusoidalTime(config.hidden_size, config.hidden_dropout_prob)

    def forward(self, signal: torch.Tensor, xyz: torch.Tensor, mask_ratio: float, noise=None):
        b, r, t = signal.shape
        p = t // self.config.timepoint_patching_size
        patches = signal.reshape(b, r, p, self.config.timepoint_patching_size)
        x = self.signal_embedding_projection(patches)
        x = x + self.xyz_embedding_projection(xyz * self.config.xyz_scale).unsqueeze(2)
        x = self.pos_embedding(x).flatten(1, 2)  # (B, R * P, H), region-major
        n = x.shape[1]
        if mask_ratio > 0:
            keep = int(n * (1 - mask_ratio))
            if noise is None:
                noise = torch.rand(b, n, device=x.device)
            ids_shuffle = torch.argsort(noise, dim=1)
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
    """The encoder: embeddings, Nystromformer layers, final layer norm."""

    def __init__(self, config: BrainLMConfig) -> None:
        super().__init__(config)
        self.embeddings = BrainLMEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            [_nystrom_layer(config, decoder=False) for _ in range(config.num_hidden_layers)]
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, signal_vectors, xyz_vectors, mask_ratio: float | None = None, noise=None):
        """Encode; returns (tokens incl. CLS at 0, mask (B, R*P), ids_restore)."""
        xyz = _check_inputs(self.config, signal_vectors, xyz_vectors)
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        x, mask, ids_restore = self.embeddings(signal_vectors, xyz, ratio, noise)
        for layer in cast(nn.ModuleList, self.encoder.layer):
            x = layer(x)[0]
        return self.layernorm(x), mask, ids_restore

    def embed(self, signal_vectors, xyz_vectors, pooling: str = "cls") -> torch.Tensor:
        """Representation of whole windows, no masking: (B, hidden).

        ``pooling="cls"`` returns the CLS token (the FMM-TC TS feature), ``"mean"`` the mean
        of the patch tokens. Differentiable with respect to ``signal_vectors``.
        """
        pooling = check_option("pooling", pooling, ("cls", "mean"))
        tokens, _, _ = self.forward(signal_vectors, xyz_vectors, mask_ratio=0.0)
        return tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(dim=1)


class BrainLMDecoder(nn.Module):
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

    def forward(self, latent, xyz, ids_restore, n_regions: int):
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
    """Masked-reconstruction result: loss (scalar), reconstruction (B, R, P, patch), mask (B, R, P)."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    mask: torch.Tensor


class BrainLMForPretraining(_BrainLMPreTrained):
    """Encoder + decoder trained by masked reconstruction (module names of the public code)."""

    def __init__(self, config: BrainLMConfig) -> None:
        super().__init__(config)
        self.vit = BrainLMModel(config)
        self.decoder = BrainLMDecoder(config)
        self.post_init()

    def forward(self, signal_vectors, xyz_vectors, noise=None,
                mask_ratio: float | None = None) -> PretrainingOutput:
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

    def embed(self, signal_vectors, xyz_vectors, pooling: str = "cls") -> torch.Tensor:
        """See :meth:`BrainLMModel.embed`."""
        return self.vit.embed(signal_vectors, xyz_vectors, pooling)


# --------------------------------------------------------------------------------------------
# Loading local checkpoints
# --------------------------------------------------------------------------------------------
def checkpoint_key_map(keys) -> dict[str, str | None]:
    """Map checkpoint parameter names to ours (None = known-unused, skipped).

    Handles the public layout (``vit.*`` + ``decoder.*``, with the unused ViT-MAE
    ``decoder.decoder_pred``) and encoder-only checkpoints saved from ``BrainLMModel``
    (names without the ``vit.`` prefix).
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
    :class:`ModelFileError` that names the file (``where``) and what was ``expected``."""
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
                     device=None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a :class:`ModelFileError` that names it.

    Nothing is ever unpickled: a pickle or ``torch.save`` archive renamed ``.safetensors`` is
    recognised (after the safetensors parser refused it, so a valid file is never mistaken for
    one) and refused as such; a truncated or damaged file is refused too.

    Parameters
    ----------
    path : path
    root : path or None
        Folder that messages give the file's name relative to (default: its own folder).
    device : torch.device, str or None
        Where the tensors are placed (default: CPU).
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
    device : torch.device or None
    encoder_only : bool, default=False
        Return the encoder (:class:`BrainLMModel`) without the decoder.

    Returns
    -------
    BrainLMForPretraining or BrainLMModel, in eval mode.

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
