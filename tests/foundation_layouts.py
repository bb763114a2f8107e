"""Tiny random checkpoints in the *published* BrainLM layouts, and reference computations.

Written from the reference code's algorithms (vandijklab/BrainLM ``brainlm_mae/``, the BrainLM
tutorial notebook, MedARC brainmarks ``models/brainlm.py``), with transformers' stock classes
where the reference itself uses them, and without importing anything from ``fmmtc_core``: the
golden tests compare the project against this independent code.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

BRAINLM_TR = 0.735
MAX_VAL = 5.6430855


# --------------------------------------------------------------------------------------------
# A424 coordinate table
# --------------------------------------------------------------------------------------------
def write_a424_coordinates(path: Path, seed: int = 0) -> np.ndarray:
    """A fake ``A424_Coordinates.dat`` (Index X Y Z, integer mm, many tied Y values)."""
    rng = np.random.default_rng(seed)
    xyz = rng.integers(-35, 36, size=(424, 3)) * 2
    with open(path, "w") as f:
        for i, (x, y, z) in enumerate(xyz, 1):
            f.write(f"{i}\t{x}\t{y}\t{z}\n")
    return xyz.astype(np.float64)


def y_order(xyz: np.ndarray) -> list[int]:
    """The training code's row order: ``sorted(range(R), key=lambda k: Y[k])`` (stable)."""
    y = list(xyz[:, 1])
    return sorted(range(len(y)), key=lambda k: y[k])


# --------------------------------------------------------------------------------------------
# Reference preprocessing (brainmarks BrainLMTransform, written out)
# --------------------------------------------------------------------------------------------
def reference_stats(series: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Global per-region median and IQR over every sample of every scan (``fit``)."""
    allb = torch.cat([torch.tensor(s, dtype=torch.float64) for s in series])
    q1, med, q3 = torch.quantile(allb, torch.tensor([0.25, 0.5, 0.75], dtype=allb.dtype), dim=0)
    return med, q3 - q1


def reference_windows(bold: np.ndarray, tr: float, med: torch.Tensor, iqr: torch.Tensor, *,
                      max_val: float, order: list[int] | None, channels: int,
                      window: int = 200, target_tr: float = BRAINLM_TR) -> torch.Tensor:
    """Scale, resample, pad (mean), cut, transpose, reorder, repeat channels."""
    b = torch.tensor(bold, dtype=torch.float64)
    b = (b - med) / (iqr + 1e-6)
    b = b / max_val
    if abs(tr - target_tr) >= 0.1:
        b = F.interpolate(b.T.unsqueeze(0), size=round(float(tr) * len(b) / float(target_tr)),
                          mode="linear").squeeze(0).T
    t, d = b.shape
    if t < window:
        b = torch.cat([b, b.mean(dim=0).repeat(window - t, 1)])
        t = window
    w = t // window
    b = b[: w * window].reshape(w, window, d).transpose(1, 2)
    if order is not None:
        b = b[:, order]
    if channels:
        b = b.unsqueeze(1).repeat(1, channels, 1, 1)
    return b.float()


# --------------------------------------------------------------------------------------------
# ViT-MAE (111M / 650M layout)
# --------------------------------------------------------------------------------------------
def _to_v4_name(key: str) -> str:
    """transformers 5 parameter names -> the names the published (transformers 4) files use."""
    key = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", key)
    for new, old in (("attention.q_proj", "attention.attention.query"),
                     ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"),
                     ("attention.o_proj", "attention.output.dense"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
        key = key.replace(new, old)
    return key


def write_vitmae_checkpoint(folder: Path, *, patch: int = 16, hidden: int = 32, layers: int = 2,
                            heads: int = 2, seed: int = 0) -> dict:
    """A random stock ``ViTMAEForPreTraining`` saved in the published layout (v4 names)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    side = {16: 432, 14: 434}[patch]
    torch.manual_seed(seed)
    config = ViTMAEConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=2 * hidden, image_size=side, patch_size=patch,
                          num_channels=3, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=32,
                          mask_ratio=0.75, norm_pix_loss=False)
    model = ViTMAEForPreTraining(config)
    g = torch.Generator().manual_seed(seed + 1)
    state = {}
    for k, v in model.state_dict().items():
        if "position_embeddings" in k or "pos_embed" in k:  # fixed sin-cos
            state[_to_v4_name(k)] = v.clone().contiguous()
        else:  # perturb, so that the outputs depend clearly on the input
            state[_to_v4_name(k)] = (v + 0.2 * torch.randn(v.shape, generator=g)).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    raw = config.to_dict()
    raw |= {"architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
            "transformers_version": "4.35.0.dev0", "train_mode": "auto_encode",
            "num_timepoints_per_voxel": 200, "timepoint_patching_size": 20}
    (folder / "config.json").write_text(json.dumps(raw))
    return raw


@functools.lru_cache(maxsize=4)
def _stock_vitmae(folder: str):
    """The encoder of the checkpoint, loaded by transformers' own ``from_pretrained``."""
    from transformers import ViTMAEForPreTraining

    model = ViTMAEForPreTraining.from_pretrained(folder, local_files_only=True,
                                                 attn_implementation="eager").vit.eval()
    model.config.mask_ratio = 0.0
    return model


def reference_vitmae_cls(folder: Path, x: torch.Tensor, *, last_block: bool = False,
                         shuffle_seed: int | None = 0) -> torch.Tensor:
    """CLS of windows ``(W, 3, 424, 200)`` by the stock model loaded by transformers itself.

    Pads with -1 in symmetric halves (``modeling_vit_mae_with_padding.py``) and lets the model
    shuffle the tokens with random noise, as the reference does at every call.
    """
    model = _stock_vitmae(str(folder))
    side = model.config.image_size
    h = side - x.shape[2]
    w = side - x.shape[3]
    pixels = F.pad(x, (w // 2, w // 2, h // 2, h // 2), "constant", -1)
    n = (side // model.config.patch_size) ** 2
    noise = None if shuffle_seed is None else torch.rand(
        x.shape[0], n, generator=torch.Generator().manual_seed(shuffle_seed))
    with torch.no_grad():
        out = model(pixels, noise=noise, output_hidden_states=last_block)
    states = out.hidden_states[-1] if last_block else out.last_hidden_state
    return states[:, 0]


# --------------------------------------------------------------------------------------------
# Legacy BrainLM (brainlm_mae)
# --------------------------------------------------------------------------------------------
def _sinusoid(max_len: int, d: int) -> torch.Tensor:
    """PositionalEncoding.pe of modeling_brainlm.py (the PyTorch tutorial formula)."""
    div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
    pos = torch.arange(max_len).unsqueeze(1)
    pe = torch.zeros(max_len, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


def _nystrom_config(hidden, heads, inter, landmarks, conv):
    from transformers import NystromformerConfig

    return NystromformerConfig(hidden_size=hidden, num_attention_heads=heads,
                               intermediate_size=inter, hidden_act="gelu",
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               layer_norm_eps=1e-12, num_landmarks=landmarks,
                               segment_means_seq_len=landmarks, conv_kernel_size=conv,
                               inv_coeff_init_option=False)


def write_legacy_checkpoint(folder: Path, *, hidden: int = 16, layers: int = 2, heads: int = 2,
                            window: int = 40, patch: int = 20, conv: int = 5,
                            landmarks: int = 8, seed: int = 0) -> dict:
    """A random checkpoint in the published brainlm_mae layout (names of modeling_brainlm.py,
    config.json as the public one: no ``attention_mode``, landmarks == segment means)."""
    from transformers.models.nystromformer.modeling_nystromformer import NystromformerLayer

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3, base=0.0):
        return (base + scale * torch.randn(shape, generator=g)).contiguous()

    state = {
        "vit.embeddings.cls_token": rnd(1, 1, hidden),
        "vit.embeddings.signal_embedding_projection.weight": rnd(hidden, patch),
        "vit.embeddings.signal_embedding_projection.bias": rnd(hidden),
        "vit.embeddings.xyz_embedding_projection.weight": rnd(hidden, 3, scale=0.02),
        "vit.embeddings.xyz_embedding_projection.bias": rnd(hidden),
        "vit.embeddings.pos_embedding.pe": _sinusoid(5000, hidden),
        "vit.layernorm.weight": rnd(hidden, scale=0.1, base=1.0),
        "vit.layernorm.bias": rnd(hidden, scale=0.1),
        "decoder.decoder_embed.weight": rnd(hidden, hidden),
        "decoder.decoder_embed.bias": rnd(hidden),
        "decoder.mask_token": rnd(1, 1, hidden),
        "decoder.decoder_xyz_projection.weight": rnd(hidden, 3),
        "decoder.decoder_xyz_projection.bias": rnd(hidden),
        "decoder.pos_embedding.pe": _sinusoid(5000, hidden),
        "decoder.decoder_norm.weight": rnd(hidden, base=1.0),
        "decoder.decoder_norm.bias": rnd(hidden),
        "decoder.decoder_pred1.weight": rnd(hidden // 2, hidden),
        "decoder.decoder_pred1.bias": rnd(hidden // 2),
        "decoder.decoder_pred2.weight": rnd(patch, hidden // 2),
        "decoder.decoder_pred2.bias": rnd(patch),
        "decoder.decoder_pred.weight": rnd(768, hidden),  # ViT-MAE's unused image head
        "decoder.decoder_pred.bias": rnd(768),
    }
    layer_keys = NystromformerLayer(_nystrom_config(hidden, heads, 2 * hidden, landmarks, conv)
                                    ).state_dict()
    for prefix, n in (("vit.encoder.layer", layers), ("decoder.decoder_layers", 1)):
        for i in range(n):
            for k, v in layer_keys.items():
                base = 1.0 if "LayerNorm.weight" in k else 0.0
                state[f"{prefix}.{i}.{k}"] = rnd(*v.shape, scale=0.3, base=base)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    raw = {"architectures": ["BrainLMForPretraining"], "attention_probs_dropout_prob": 0.1,
           "conv_kernel_size": conv, "decoder_hidden_size": hidden,
           "decoder_intermediate_size": 2 * hidden, "decoder_num_attention_heads": heads,
           "decoder_num_hidden_layers": 1, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
           "hidden_size": hidden, "image_size": 224, "initializer_range": 0.02,
           "intermediate_size": 2 * hidden, "inv_coeff_init_option": False,
           "layer_norm_eps": 1e-12, "loss_fn": "mse", "mask_ratio": 0.2,
           "model_type": "brainlm_mae", "norm_pix_loss": False, "num_attention_heads": heads,
           "num_brain_voxels": 424, "num_channels": 3, "num_hidden_layers": layers,
           "num_landmarks": landmarks, "num_timepoints_per_voxel": window, "patch_size": 16,
           "qkv_bias": True, "segment_means_seq_len": landmarks,
           "timepoint_patching_size": patch, "torch_dtype": "float32",
           "transformers_version": "4.28.0.dev0", "use_tanh_decoder": False}
    (folder / "config.json").write_text(json.dumps(raw))
    return raw


def reference_legacy_tokens(folder: Path, signal: torch.Tensor, xyz: torch.Tensor,
                            noise: torch.Tensor) -> torch.Tensor:
    """``BrainLMModel.forward`` of modeling_brainlm.py at mask ratio 0, written out.

    signal (B, R, T), xyz (B, R, 3) mm, noise (B, R * T / patch): the tokens are shuffled by
    ``argsort(noise)`` as ``random_masking`` does; transformers' stock ``NystromformerLayer``
    (exact softmax attention when ``num_landmarks == segment_means_seq_len``, plus its
    depthwise convolution over the sequence); the final layer norm.
    """
    from safetensors.torch import load_file
    from transformers.models.nystromformer.modeling_nystromformer import NystromformerLayer

    raw = json.loads((folder / "config.json").read_text())
    s = load_file(str(folder / "model.safetensors"))
    p, h = raw["timepoint_patching_size"], raw["hidden_size"]
    b, r, t = signal.shape
    x = F.linear(signal.reshape(b, r, -1, p), s["vit.embeddings.signal_embedding_projection.weight"],
                 s["vit.embeddings.signal_embedding_projection.bias"])
    xyz_p = F.linear(xyz, s["vit.embeddings.xyz_embedding_projection.weight"],
                     s["vit.embeddings.xyz_embedding_projection.bias"])
    x = x + xyz_p.unsqueeze(2).repeat(1, 1, x.shape[2], 1)
    x = x + s["vit.embeddings.pos_embedding.pe"][: x.shape[2]].unsqueeze(0).unsqueeze(0)
    x = torch.flatten(x, start_dim=1, end_dim=2)
    n = x.shape[1]
    len_keep = int(n * (1 - 0.0))
    ids_shuffle = torch.argsort(noise, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, h))
    x = torch.cat([s["vit.embeddings.cls_token"].expand(b, -1, -1), x], dim=1)
    cfg = _nystrom_config(h, raw["num_attention_heads"], raw["intermediate_size"],
                          raw["num_landmarks"], raw["conv_kernel_size"])
    cfg.segment_means_seq_len = raw["segment_means_seq_len"]
    for i in range(raw["num_hidden_layers"]):
        layer = NystromformerLayer(cfg).eval()
        prefix = f"vit.encoder.layer.{i}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)})
        with torch.no_grad():
            x = layer(x)[0]
    return F.layer_norm(x, (h,), s["vit.layernorm.weight"], s["vit.layernorm.bias"],
                        raw["layer_norm_eps"])
