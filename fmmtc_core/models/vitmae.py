"""The ViT-MAE BrainLMs (111M, 650M) through transformers' stock ``ViTMAEModel``.

The checkpoints people download today (``vitmae_111M``, ``vitmae_650M``) are ViT-MAE image
models: a window of 424 A424 regions (rows, sorted by Y) x 200 samples (columns) is an image,
repeated over 3 channels and padded with -1 to a square the patches tile. The BrainLM code
subclasses transformers' ViT-MAE only to do that padding inside ``forward``
(``brainlm_mae/modeling_vit_mae_with_padding.py``: 432 x 432 for 16-pixel patches, 434 x 434 for
14-pixel ones); its encoder is the stock one. We run the stock :class:`transformers.ViTMAEModel`
and do the padding in :meth:`ViTMAEFoundationEncoder._forward_windows`.

Parameter names: the public checkpoints were written by transformers 4.x
(``vit.encoder.layer.N.attention.attention.query.weight``, ...); transformers 5 names the same
tensors ``vit.layers.N.attention.q_proj.weight``, .... :func:`vitmae_key_map` renames them (both
spellings are accepted) and the decoder, which embedding does not use, is skipped. Weights are
read from ``model.safetensors`` only; nothing is unpickled or downloaded.

Token order: the BrainLM ViT-MAE (``train_mode="auto_encode"``) shuffles the patch tokens with
fresh random noise at every call, even at mask ratio 0. Position embeddings are added before the
shuffle and attention is exact softmax attention with no order-dependent term, so the CLS token
does not depend on the order: we feed the natural order (``tests/test_models_vitmae.py``
measures the difference to random shuffles: float rounding only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from fmmtc_core._errors import ModelFileError
from fmmtc_core.models.encoder_base import EncoderEntry, FoundationEncoder, RobustScaling

__all__ = [
    "ViTMAEFoundationEncoder",
    "vitmae_key_map",
    "vitmae_config",
    "build_vitmae",
    "PADDED_SIZE",
    "PUBLISHED_GEOMETRY",
]

#: Square image side the BrainLM ViT-MAE pads a 424 x 200 window to, by patch size
#: (``ViTMAEForPreTraining.__init__`` of ``modeling_vit_mae_with_padding.py``).
PADDED_SIZE = {16: 432, 14: 434}
#: (hidden size, layers, heads) of the published checkpoints, by patch size.
PUBLISHED_GEOMETRY = {16: (768, 12, 12), 14: (1280, 32, 16)}

_LAYER_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.attention\.attention\.query\."), r"layers.\1.attention.q_proj."),
    (re.compile(r"^layers\.(\d+)\.attention\.attention\.key\."), r"layers.\1.attention.k_proj."),
    (re.compile(r"^layers\.(\d+)\.attention\.attention\.value\."), r"layers.\1.attention.v_proj."),
    (re.compile(r"^layers\.(\d+)\.attention\.output\.dense\."), r"layers.\1.attention.o_proj."),
    (re.compile(r"^layers\.(\d+)\.intermediate\.dense\."), r"layers.\1.mlp.fc1."),
    (re.compile(r"^layers\.(\d+)\.output\.dense\."), r"layers.\1.mlp.fc2."),
)


def vitmae_key_map(keys: Iterable[str]) -> dict[str, str | None]:
    """Map checkpoint parameter names to those of the stock ``ViTMAEModel`` (None: skipped).

    Accepts a ``ViTMAEForPreTraining`` checkpoint (``vit.*`` + ``decoder.*``, the published
    layout) or a bare ``ViTMAEModel``, in the names of transformers 4 or 5.

    Parameters
    ----------
    keys : iterable of str
        Parameter names of the checkpoint (e.g. a state dict or its safetensors header).

    Returns
    -------
    dict
        Checkpoint name -> model name, or None for the decoder (not used to embed).
    """
    out: dict[str, str | None] = {}
    for key in keys:
        if key.startswith("decoder."):
            out[key] = None
            continue
        name = key[4:] if key.startswith("vit.") else key
        name = re.sub(r"^encoder\.layer\.", "layers.", name)
        for pattern, repl in _LAYER_RENAMES:
            name = pattern.sub(repl, name)
        out[key] = name
    return out


def _image_size(raw: dict, where: str) -> tuple[int, int]:
    size = raw.get("image_size", 224)
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        return int(size[0]), int(size[1])
    raise ModelFileError(f"{where} has image_size {size!r}; expected an integer or [height, "
                         "width].")


def vitmae_config(raw: dict, where: str) -> Any:
    """A :class:`transformers.ViTMAEConfig` for embedding, checked against the BrainLM layout.

    Parameters
    ----------
    raw : dict
        ``config.json`` (``model_type`` "vit_mae").
    where : str
        How messages name the file.

    Returns
    -------
    transformers.ViTMAEConfig
        With mask ratio 0 and no dropout.

    Raises
    ------
    ModelFileError
        A patch size other than 16 (111M) or 14 (650M), an image that is not the square
        BrainLM pads to (432 or 434), channels other than 3, or values the config refuses.
    """
    from transformers import ViTMAEConfig

    patch = raw.get("patch_size")
    if patch not in PADDED_SIZE:
        raise ModelFileError(
            f"{where} describes a ViT-MAE with patch_size {patch!r}; the BrainLM ViT-MAE "
            "checkpoints use 16 (vitmae_111M, padded to 432 x 432) or 14 (vitmae_650M, padded "
            "to 434 x 434).")
    side = PADDED_SIZE[patch]
    if _image_size(raw, where) != (side, side):
        raise ModelFileError(
            f"{where} has image_size {raw.get('image_size')!r}; a BrainLM ViT-MAE with "
            f"{patch}-pixel patches pads its 424 x 200 windows to {side} x {side} "
            f"(expected image_size {side}).")
    if raw.get("num_channels", 3) != 3:
        raise ModelFileError(f"{where} has num_channels {raw.get('num_channels')!r}; the BrainLM "
                             "ViT-MAE repeats each window over 3 channels (expected 3).")
    keep = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    keep |= {"mask_ratio": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    try:
        config = ViTMAEConfig(**keep)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{where} does not describe a usable ViT-MAE ({exc}).") from None
    config._attn_implementation = "sdpa"
    return config


def build_vitmae(config: Any, state: dict[str, torch.Tensor], folder_name: str) -> nn.Module:
    """The stock ``ViTMAEModel`` with the checkpoint's encoder weights (built on the meta
    device, so no memory is spent on a random initialisation).

    Parameters
    ----------
    config : transformers.ViTMAEConfig
        From :func:`vitmae_config`.
    state : dict of str to Tensor
        The checkpoint's tensors (any of the names :func:`vitmae_key_map` accepts), or on the
        meta device to check names and shapes only.
    folder_name : str
        How messages name the checkpoint.

    Returns
    -------
    transformers.ViTMAEModel
        In eval mode, with the checkpoint's weights (as float32); for a meta-device ``state``,
        the unloaded meta-device model (names and shapes checked).

    Raises
    ------
    ModelFileError
        Missing, unexpected or wrongly shaped parameters (named).
    """
    from transformers import ViTMAEModel

    from fmmtc_core.models.foundation import _fmt_keys

    with torch.device("meta"):
        model = ViTMAEModel(config)
    mapping = vitmae_key_map(state)
    renamed = {name: state[k] for k, name in mapping.items() if name is not None}
    ours = model.state_dict()
    problems = []
    missing = set(ours) - set(renamed)
    unexpected = set(renamed) - set(ours)
    if missing:
        problems.append(f"is missing {len(missing)} parameters: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"has {len(unexpected)} unexpected parameters: {_fmt_keys(unexpected)}")
    wrong = [f"{k} {tuple(renamed[k].shape)} (expected {tuple(ours[k].shape)})"
             for k in set(ours) & set(renamed) if tuple(renamed[k].shape) != tuple(ours[k].shape)]
    if wrong:
        problems.append(f"has {len(wrong)} parameters of the wrong shape: {_fmt_keys(wrong)}")
    if problems:
        raise ModelFileError(f"Checkpoint {folder_name!r} does not match its config.json (a "
                             "ViT-MAE encoder): " + "; ".join(problems) + ".")
    if any(t.is_meta for t in renamed.values()):
        return model  # a names-and-shapes check
    model.load_state_dict({k: v.float() for k, v in renamed.items()}, strict=True, assign=True)
    return model.eval()


class ViTMAEFoundationEncoder(FoundationEncoder):
    """A BrainLM ViT-MAE checkpoint (``vitmae-111m``, ``vitmae-650m``) with its preprocessing.

    Get one from :func:`fmmtc_core.models.registry.load_encoder`.

    Parameters
    ----------
    entry : EncoderEntry
        A ``vit_mae`` entry (its ``image_size`` and ``pad_value`` are set).
    model : transformers.ViTMAEModel
        From :func:`build_vitmae`.
    folder : path
        The checkpoint folder.
    region_index : ndarray (424,) of int
        Atlas position of each image row (A424 regions sorted by Y).
    scaling : RobustScaling or None, default=None
        Global robust-scaling statistics (needed before :meth:`windows` can run).
    coordinates_digest : str, default=""
        Digest of the A424 coordinates (part of the preprocessing hash).
    order_seed : int, default=0
        Seed of token shuffles (part of the preprocessing hash; the ViT-MAE entries feed
        their tokens in natural order, so it does not change the embeddings).
    """

    def __init__(self, entry: EncoderEntry, model: nn.Module, folder: str | os.PathLike, *,
                 region_index: np.ndarray, scaling: RobustScaling | None = None,
                 coordinates_digest: str = "", order_seed: int = 0) -> None:
        super().__init__(entry, model, folder, region_index=region_index, scaling=scaling,
                         coordinates_digest=coordinates_digest, order_seed=order_seed)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad ``(W, 3, R, L)`` windows to the model's image with the reference's value (-1).

        Symmetric halves, as ``modeling_vit_mae_with_padding.py`` (``F.pad`` with
        ``(w // 2, w // 2, h // 2, h // 2)``; the published sizes make both halves equal; an
        odd difference puts the extra row or column at the bottom or right).

        Parameters
        ----------
        x : Tensor (W, 3, R, L)
            Windows from :meth:`windows`, no larger than the image.

        Returns
        -------
        Tensor (W, 3, height, width)
            ``entry.image_size``, the padding filled with ``entry.pad_value``.
        """
        assert self.entry.image_size is not None and self.entry.pad_value is not None
        h, w = self.entry.image_size
        top, left = (h - x.shape[-2]) // 2, (w - x.shape[-1]) // 2
        return nn.functional.pad(
            x, (left, w - x.shape[-1] - left, top, h - x.shape[-2] - top),
            mode="constant", value=self.entry.pad_value)

    def _n_tokens(self, x: torch.Tensor) -> int:
        assert self.entry.image_size is not None
        p = self.entry.patch[0]
        return (self.entry.image_size[0] // p) * (self.entry.image_size[1] // p)

    def _forward_windows(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is None:  # natural order: argsort of an increasing sequence
            n = self._n_tokens(x)
            noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)
        last_block = self.entry.readout == "last-block"
        out = self.model(pixel_values=self.pad(x), noise=noise,
                         output_hidden_states=last_block)
        return out.hidden_states[-1] if last_block else out.last_hidden_state
