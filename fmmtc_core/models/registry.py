"""The registry of foundation-encoder layouts and :func:`load_encoder`, the one way to load one.

Four entries (in the spirit of brainmarks' model registry: each returns the same
:class:`~fmmtc_core.models.encoder_base.FoundationEncoder`, so downstream code never branches on
the model):

==============  =====================================================================================
``legacy-13m``  BrainLM's original Nystromformer MAE (``model_type`` ``brainlm_mae``; vandijklab
                BrainLM ``brainlm_mae/modeling_brainlm.py``, Hugging Face ``old_13M``)
``vitmae-111m`` BrainLM ViT-MAE, 16-pixel patches (``model_type`` ``vit_mae``; ``vitmae_111M``)
``vitmae-650m`` BrainLM ViT-MAE, 14-pixel patches (``vitmae_650M``)
``fmmtc``       the project's own BrainLM-architecture encoders (``fmmtc pretrain``; their
                ``config.json`` names the atlas in ``fmmtc_atlas``)
==============  =====================================================================================

:func:`detect_entry` tells them apart from ``config.json`` alone and refuses anything else with a
message naming the file and what was expected. :func:`load_encoder` resolves the entry
(:class:`~fmmtc_core.models.encoder_base.EncoderEntry`: every preprocessing convention and where
it comes from), checks the weights' names and shapes, and loads them (safetensors only; nothing
is unpickled or downloaded). :func:`inspect_encoder` does the same without loading the weights
(for ``fmmtc foundation inspect``). :func:`register_entry` adds a layout.

The A424 entries need BrainLM's coordinate table (``A424_Coordinates.dat``): its Y column fixes
the ViT-MAE row order and its X, Y, Z (mm) are the legacy model's region coordinates. It comes
from ``coordinates=`` (the file), from ``atlas=`` (an atlas loaded with that file), or from a
copy inside the checkpoint folder; without it loading is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmmtc_core._errors import InvalidInputError, ModelFileError
from fmmtc_core.models.encoder_base import (
    BRAINLM_MAX_VALUE,
    BRAINLM_TR,
    COORDINATES_FILE,
    RESAMPLE_TOLERANCE_S,
    ROBUST_SCALING_FILE,
    EncoderEntry,
    FoundationEncoder,
    RobustScaling,
    stable_y_order,
    window_plan,
)

__all__ = [
    "ENTRIES",
    "RegistryEntry",
    "detect_entry",
    "inspect_encoder",
    "load_encoder",
    "register_entry",
    "DEFAULT_ORDER_SAMPLES",
]

#: Seeded token shuffles averaged by default for ``legacy-13m`` (see the README section
#: "BrainLM checkpoints" for the measured spread).
DEFAULT_ORDER_SAMPLES = 4

_SRC_BRAINMARKS = "MedARC brainmarks models/brainlm.py (BrainLMTransform)"
_SRC_TUTORIAL = "vandijklab/BrainLM brainlm_tutorial.ipynb"
_SRC_PADDING = "vandijklab/BrainLM brainlm_mae/modeling_vit_mae_with_padding.py"
_SRC_LEGACY = "vandijklab/BrainLM brainlm_mae/modeling_brainlm.py"


@dataclass(frozen=True)
class RegistryEntry:
    """One layout the registry knows.

    Attributes
    ----------
    name : str
        The entry's key in :data:`ENTRIES` (e.g. ``"legacy-13m"``).
    family : str
        ``"brainlm_mae"`` or ``"vit_mae"``.
    description : str
        One line for people (what checkpoint this is).
    detect : callable(dict) -> bool
        True when a ``config.json`` is of this layout.
    resolve : callable
        ``resolve(folder, raw, options) -> (EncoderEntry, context)`` without loading weights.
    load : callable
        ``load(folder, raw, entry, context, device, options) -> FoundationEncoder``.
    """

    name: str
    family: str
    description: str
    detect: Callable[[dict], bool]
    resolve: Callable[..., tuple[EncoderEntry, dict]]
    load: Callable[..., FoundationEncoder]


#: Registered layouts, by name (first match wins in :func:`detect_entry`).
ENTRIES: dict[str, RegistryEntry] = {}


def register_entry(entry: RegistryEntry, *, overwrite: bool = False) -> RegistryEntry:
    """Add a layout to :data:`ENTRIES`.

    Parameters
    ----------
    entry : RegistryEntry
        The layout, registered under ``entry.name`` (tried after the entries already
        registered in :func:`detect_entry`, unless it replaces one in place).
    overwrite : bool, default=False
        Replace an entry of the same name instead of refusing.

    Returns
    -------
    RegistryEntry
        ``entry`` itself.

    Raises
    ------
    InvalidInputError
        An entry of that name is already registered and ``overwrite`` is False.
    """
    if entry.name in ENTRIES and not overwrite:
        raise InvalidInputError(f"Encoder entry {entry.name!r} is already registered.")
    ENTRIES[entry.name] = entry
    return entry


# --------------------------------------------------------------------------------------------
# Folder checks
# --------------------------------------------------------------------------------------------
def _read_folder(folder: str | os.PathLike) -> tuple[Path, dict, str]:
    from fmmtc_core.models.foundation import model_file, read_json_object

    path = Path(folder)
    if not path.is_dir():
        raise ModelFileError(f"Foundation model folder {str(path)!r} does not exist; expected a "
                             "folder with config.json and model.safetensors.")
    cfg, weights = path / "config.json", path / "model.safetensors"
    if not weights.exists() and any(path.glob("*.bin")):
        raise ModelFileError(
            f"{str(path)!r} holds only pickled PyTorch weights (*.bin). They are not loaded, "
            "because unpickling can run code: convert them to model.safetensors with a trusted "
            "tool.")
    missing = [p.name for p in (cfg, weights) if not p.exists()]
    if missing:
        raise ModelFileError(f"{str(path)!r} is not a foundation checkpoint: missing "
                             f"{', '.join(missing)} (expected config.json + model.safetensors).")
    where = model_file(cfg)
    raw = read_json_object(cfg, where, "a Hugging Face model config object")
    return path, raw, where


def detect_entry(folder: str | os.PathLike) -> tuple[str, dict]:
    """Which registry entry a checkpoint folder is, from its ``config.json``.

    Parameters
    ----------
    folder : path
        A checkpoint folder with ``config.json`` and ``model.safetensors``.

    Returns
    -------
    name : str
        A key of :data:`ENTRIES`.
    config : dict
        The parsed ``config.json``.

    Raises
    ------
    ModelFileError
        A missing folder or file, pickle-only weights, a ``config.json`` that is not a JSON
        object, or a ``model_type`` / geometry no entry accepts (the message names the file and
        lists what is expected).
    """
    _, raw, where = _read_folder(folder)
    for name, entry in ENTRIES.items():
        if entry.detect(raw):
            return name, raw
    mt = raw.get("model_type")
    if mt == "vit_mae":
        from fmmtc_core.models.vitmae import vitmae_config

        vitmae_config(raw, where)  # raises with the precise reason
    raise ModelFileError(
        f"{where} has model_type {mt!r}; expected 'brainlm_mae' (BrainLM legacy 13M, or an "
        "encoder written by `fmmtc pretrain`, which adds 'fmmtc_atlas') or 'vit_mae' (BrainLM "
        "ViT-MAE 111M with 16-pixel patches or 650M with 14-pixel patches). Known entries: "
        + ", ".join(ENTRIES) + ".")


def _where(folder: Path) -> str:
    """How refusals name a folder's ``config.json`` ("Model file 'config.json' in '...'")."""
    from fmmtc_core.models.foundation import model_file

    return model_file(folder / "config.json")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    from fmmtc_core.models.foundation import read_safetensors

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError):
        read_safetensors(path)  # raises the precise refusal (pickle, truncated, ...)
        raise  # pragma: no cover - read_safetensors raised


def _meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _digest_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float64).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# A424 coordinates
# --------------------------------------------------------------------------------------------
def _a424_coordinates(folder: Path, options: dict) -> tuple[np.ndarray, str]:
    """(424, 3) coordinates in A424 label order 1..424, and where they came from."""
    from fmmtc_core.atlas import Atlas, load_atlas, read_coordinates_file

    coords, atlas = options.get("coordinates"), options.get("atlas")
    if coords is not None:
        labels, xyz = read_coordinates_file(coords)
        source = str(coords)
    elif atlas is not None and (not isinstance(atlas, (str, os.PathLike)) or Path(atlas).exists()):
        atlas_obj = atlas if isinstance(atlas, Atlas) else load_atlas(atlas)
        if atlas_obj.centroids_source == "label image":
            if not (folder / COORDINATES_FILE).exists():
                raise InvalidInputError(
                    f"Atlas {atlas_obj.name!r} carries centres of mass of its label image, not "
                    "BrainLM's coordinate table; the A424 encoders need A424_Coordinates.dat "
                    "from your BrainLM download (pass it as coordinates / --coordinates, or copy "
                    f"it into {str(folder)!r}).")
            labels, xyz = read_coordinates_file(folder / COORDINATES_FILE)
            source = str(folder / COORDINATES_FILE)
        else:
            labels, xyz = np.asarray(atlas_obj.labels), np.asarray(atlas_obj.centroids_mm)
            source = atlas_obj.centroids_source
    elif (folder / COORDINATES_FILE).exists():
        labels, xyz = read_coordinates_file(folder / COORDINATES_FILE)
        source = str(folder / COORDINATES_FILE)
    else:
        raise InvalidInputError(
            f"The checkpoint in {str(folder)!r} expects BrainLM's A424 atlas and needs its "
            "coordinate table A424_Coordinates.dat (toolkit/atlases/ of the BrainLM code): pass "
            f"it as coordinates (--coordinates DAT) or copy it into the folder.")
    order = np.argsort(labels, kind="stable")
    labels, xyz = np.asarray(labels)[order], np.asarray(xyz, dtype=np.float64)[order]
    if not np.array_equal(labels, np.arange(1, 425)):
        raise InvalidInputError(
            f"Coordinate table {source!r} lists {len(labels)} regions with labels "
            f"{int(labels.min())}..{int(labels.max())}; the A424 encoders expect the 424 A424 "
            "regions, labels 1..424 (A424_Coordinates.dat).")
    return xyz, source


def _as_file(source: str | None) -> Path | None:
    """The coordinate table a source names, when it is a file (what a model folder copies)."""
    return Path(source) if source and Path(source).is_file() else None


def _scaling(folder: Path, options: dict, n_regions: int) -> RobustScaling | None:
    value = options.get("scaling")
    if isinstance(value, RobustScaling):
        if value.n_regions != n_regions:
            raise InvalidInputError(f"Robust-scaling statistics for {value.n_regions} regions do "
                                    f"not fit an encoder of {n_regions} regions.")
        return value
    if value is not None:
        return RobustScaling.load(value, n_regions)
    path = folder / ROBUST_SCALING_FILE
    return RobustScaling.load(path, n_regions) if path.exists() else None


def _apply_options(entry: EncoderEntry, options: dict) -> EncoderEntry:
    changes = {k: options[k] for k in ("token_pooling", "window_pooling", "readout")
               if options.get(k) is not None}
    if options.get("order_samples") is not None and entry.token_order == "shuffle":
        changes["order_samples"] = options["order_samples"]
    return replace(entry, **changes) if changes else entry


# --------------------------------------------------------------------------------------------
# BrainLM-architecture entries (legacy-13m, fmmtc)
# --------------------------------------------------------------------------------------------
def _brainlm_config(raw: dict, where: str):
    from fmmtc_core.models.foundation import BrainLMConfig, _one_line

    try:
        return BrainLMConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    except (InvalidInputError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{where} does not describe a usable BrainLM model "
                             f"({_one_line(exc)}).") from None


def _brainlm_encoder_params(folder: Path, cfg) -> int:
    """Encoder parameters from the header, names and shapes checked against ``cfg``."""
    from fmmtc_core.models.foundation import (
        BrainLMModel,
        _fmt_keys,
        _one_line,
        checkpoint_key_map,
    )

    try:  # BrainLMConfig keeps what it does not check (e.g. a hidden_size that is a string)
        with torch.device("meta"):
            model = BrainLMModel(cfg)
    except (InvalidInputError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{_where(folder)} does not describe a usable BrainLM model "
                             f"({_one_line(exc)}).") from None
    shapes = _header_shapes(folder / "model.safetensors")
    mapping = checkpoint_key_map(shapes)
    enc = {name[4:]: shapes[k] for k, name in mapping.items()
           if name is not None and name.startswith("vit.")}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = set(ours) - set(enc)
    wrong = [f"{k} {enc[k]} (expected {ours[k]})" for k in set(ours) & set(enc)
             if enc[k] != ours[k]]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"is missing {len(missing)} encoder parameters: {_fmt_keys(missing)}")
        if wrong:
            parts.append(f"has {len(wrong)} parameters of the wrong shape: {_fmt_keys(wrong)}")
        raise ModelFileError(f"Checkpoint {str(folder)!r} does not match its config.json: "
                             + "; ".join(parts) + ".")
    buffers = {k for k, _ in model.named_buffers()}
    return int(sum(int(np.prod(s)) for k, s in enc.items() if k in ours and k not in buffers))


def _resolve_legacy(folder: Path, raw: dict, options: dict) -> tuple[EncoderEntry, dict]:
    where = _where(folder)
    cfg = _brainlm_config(raw, where)
    if cfg.num_brain_voxels != 424:
        raise ModelFileError(
            f"{where} describes a BrainLM (brainlm_mae) model of {cfg.num_brain_voxels} regions "
            "without 'fmmtc_atlas': a published BrainLM checkpoint has the 424 A424 regions "
            "(num_brain_voxels 424), and an encoder written by `fmmtc pretrain` names its atlas "
            "in 'fmmtc_atlas'.")
    k = options.get("order_samples") or DEFAULT_ORDER_SAMPLES
    entry = EncoderEntry(
        name="legacy-13m", family="brainlm_mae",
        description="BrainLM legacy Nystromformer MAE (brainlm_mae; Hugging Face old_13M)",
        n_parameters=_brainlm_encoder_params(folder, cfg), atlas="A424", n_regions=424,
        tr=BRAINLM_TR, window=cfg.num_timepoints_per_voxel, hidden_size=cfg.hidden_size,
        normalisation="global-robust", max_value=1.0, region_order="atlas", channels=0,
        image_size=None, pad_value=None, token_order="shuffle", order_samples=int(k),
        readout="final-norm", token_pooling="cls", window_pooling="mean",
        patch=(1, cfg.timepoint_patching_size),
        sources={
            "tr": f"{BRAINLM_TR} s, UK Biobank ({_SRC_BRAINMARKS}: DEFAULT_TR; resampled when "
                  f"|TR - {BRAINLM_TR}| >= {RESAMPLE_TOLERANCE_S} s, linear)",
            "normalisation": f"per-region median / (IQR + 1e-6) fitted on the training cohort "
                             f"({_SRC_BRAINMARKS}.fit); no max-value division ("
                             "brainmarks brainlm_13m: max_val_to_scale=1.0)",
            "region_order": "A424 label order with A424_Coordinates.dat X, Y, Z in mm (BrainLM "
                            "train.py preprocess_fmri); the token shuffle makes the row order "
                            "immaterial",
            "attention": f"{cfg.attention_mode} (transformers' Nystromformer computes exact "
                         "softmax attention when num_landmarks == segment_means_seq_len)",
            "token_order": f"{_SRC_LEGACY}: random_masking shuffles even at mask ratio 0 and the "
                           "depthwise conv over the token sequence makes the CLS order-"
                           f"dependent; mean over {k} seeded shuffles",
            "readout": "last_hidden_state CLS (brainmarks _forward_brainlm)",
            "pooling": f"mean CLS over non-overlapping {cfg.num_timepoints_per_voxel}-sample "
                       f"windows ({_SRC_BRAINMARKS})",
            "short_scans": "padded with the region mean (brainmarks pad_mode='mean')",
        })
    return _apply_options(entry, options), {"config": cfg}


def _resolve_fmmtc(folder: Path, raw: dict, options: dict) -> tuple[EncoderEntry, dict]:
    where = _where(folder)
    cfg = _brainlm_config(raw, where)
    order = raw.get("token_order") or "natural"
    k = options.get("order_samples") or DEFAULT_ORDER_SAMPLES
    tr = raw.get("fmmtc_tr")
    entry = EncoderEntry(
        name="fmmtc", family="brainlm_mae",
        description="the project's own BrainLM-architecture encoder (fmmtc pretrain)",
        n_parameters=_brainlm_encoder_params(folder, cfg), atlas=str(raw["fmmtc_atlas"]),
        n_regions=cfg.num_brain_voxels, tr=None if tr is None else float(tr),
        window=cfg.num_timepoints_per_voxel, hidden_size=cfg.hidden_size,
        normalisation="window-robust", max_value=1.0, region_order="atlas", channels=0,
        image_size=None, pad_value=None, token_order=order,
        order_samples=int(k) if order == "shuffle" else 1, readout="final-norm",
        token_pooling="cls", window_pooling="mean", patch=(1, cfg.timepoint_patching_size),
        sources={
            "tr": "each scan's own sampling (pretrained on windows at native TRs)"
                  if tr is None else f"resampled to {tr} s ('fmmtc_tr' in config.json)",
            "normalisation": "per-region median / IQR over each window "
                             "(fmmtc_core.preprocess.robust_scale, as in pretraining)",
            "region_order": "atlas label order; centroids of the atlas regions (mm, times the "
                            "config's xyz_scale)",
            "attention": f"{cfg.attention_mode} (config.json)",
            "token_order": ("natural: pretraining keeps the kept tokens in natural order "
                            "(config token_order)" if raw.get("token_order") else
                            "natural: the inference convention this encoder's models were "
                            "trained with (config.json predates token_order)")
            if order == "natural" else f"mean over {k} seeded shuffles (config token_order)",
            "readout": "CLS after the final layer norm",
            "pooling": "mean CLS over non-overlapping windows",
            "short_scans": "padded with 0 (the region median) after scaling, as "
                           "preprocess.make_window",
        })
    return _apply_options(entry, options), {"config": cfg}


def _load_brainlm(folder: Path, raw: dict, entry: EncoderEntry, ctx: dict, device,
                  options: dict) -> FoundationEncoder:
    from fmmtc_core.atlas import Atlas, load_atlas
    from fmmtc_core.models.foundation import BrainLMFoundationEncoder, load_foundation

    source = None
    if entry.atlas == "A424":
        xyz, source = _a424_coordinates(folder, options)
        region_index = np.arange(424)
    else:
        atlas = options.get("atlas")
        if atlas is None:
            from fmmtc_core.atlas import resolve_atlas_name

            if resolve_atlas_name(entry.atlas) is None:
                raise InvalidInputError(
                    f"The encoder in {str(folder)!r} was pretrained on atlas {entry.atlas!r}, "
                    "which is not bundled: pass the same atlas (its label image).")
            atlas = entry.atlas
        atlas_obj = atlas if isinstance(atlas, Atlas) else load_atlas(atlas)
        if atlas_obj.n_regions != entry.n_regions:
            raise InvalidInputError(
                f"Atlas {atlas_obj.name!r} has {atlas_obj.n_regions} regions; the encoder in "
                f"{str(folder)!r} expects {entry.n_regions} ({entry.atlas}).")
        xyz = np.asarray(atlas_obj.centroids_mm, dtype=np.float64)
        region_index = np.arange(entry.n_regions)
    model = load_foundation(folder, encoder_only=True)
    enc = BrainLMFoundationEncoder(
        entry, model, folder, xyz=xyz[region_index], region_index=region_index,
        scaling=_scaling(folder, options, entry.n_regions) if entry.normalisation ==
        "global-robust" else None,
        coordinates_digest=_digest_array(xyz), order_seed=int(options.get("order_seed") or 0))
    enc.coordinates_file = _as_file(source)
    return enc.to(device)


# --------------------------------------------------------------------------------------------
# ViT-MAE entries
# --------------------------------------------------------------------------------------------
def _resolve_vitmae(folder: Path, raw: dict, options: dict) -> tuple[EncoderEntry, dict]:
    from fmmtc_core.models.vitmae import PUBLISHED_GEOMETRY, build_vitmae, vitmae_config

    where = _where(folder)
    config = vitmae_config(raw, where)
    patch = int(config.patch_size)
    side = int(config.image_size if isinstance(config.image_size, int) else config.image_size[0])
    window = int(raw.get("num_timepoints_per_voxel", 200))
    if not 1 <= window <= side:
        raise ModelFileError(f"{where} has num_timepoints_per_voxel {window}; expected a window "
                             f"of at most the image width {side} (BrainLM uses 200).")
    shapes = _header_shapes(folder / "model.safetensors")
    build_vitmae(config, _meta_state(shapes), str(folder))  # names and shapes
    from fmmtc_core.models.vitmae import vitmae_key_map

    mapping = vitmae_key_map(shapes)
    n_params = int(sum(int(np.prod(shapes[k])) for k, n in mapping.items()
                       if n is not None and n != "embeddings.position_embeddings"))
    geometry = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    name = "vitmae-111m" if patch == 16 else "vitmae-650m"
    published = geometry == PUBLISHED_GEOMETRY[patch]
    entry = EncoderEntry(
        name=name, family="vit_mae",
        description=(f"BrainLM ViT-MAE {'111M' if patch == 16 else '650M'} layout (stock "
                     f"transformers ViTMAEModel, {patch}-pixel patches)")
        + ("" if published else f"; non-published geometry hidden {geometry[0]} x "
                                f"{geometry[1]} layers"),
        n_parameters=n_params, atlas="A424", n_regions=424, tr=BRAINLM_TR, window=window,
        hidden_size=int(config.hidden_size), normalisation="global-robust",
        max_value=BRAINLM_MAX_VALUE, region_order="y-sorted", channels=3,
        image_size=(side, side), pad_value=-1.0, token_order="natural", order_samples=1,
        readout="final-norm", token_pooling="cls", window_pooling="mean", patch=(patch, patch),
        sources={
            "tr": f"{BRAINLM_TR} s, UK Biobank ({_SRC_BRAINMARKS}: DEFAULT_TR; resampled when "
                  f"|TR - {BRAINLM_TR}| >= {RESAMPLE_TOLERANCE_S} s, linear)",
            "normalisation": f"per-region median / (IQR + 1e-6) fitted on the training cohort "
                             f"({_SRC_BRAINMARKS}.fit), then / {BRAINLM_MAX_VALUE} "
                             f"(max_val_to_scale, {_SRC_TUTORIAL})",
            "region_order": "rows sorted by Y of A424_Coordinates.dat, stable (Python sorted() "
                            f"in {_SRC_TUTORIAL} and fmri-fm-eval)",
            "padding": f"constant -1 to {side} x {side}, symmetric halves ({_SRC_PADDING}, "
                       "resize_target_size)",
            "channels": f"the window repeated over 3 channels ({_SRC_TUTORIAL})",
            "token_order": "natural; the reference shuffles, but the CLS is invariant (exact "
                           "attention, positions added before the shuffle)",
            "readout": f"last_hidden_state CLS ({_SRC_TUTORIAL}); brainmarks reads "
                       "hidden_states[-1], before the final LayerNorm (readout='last-block')",
            "pooling": f"mean CLS over non-overlapping {window}-sample windows "
                       f"({_SRC_BRAINMARKS})",
            "short_scans": "padded with the region mean (brainmarks pad_mode='mean')",
        })
    return _apply_options(entry, options), {"config": config}


def _load_vitmae(folder: Path, raw: dict, entry: EncoderEntry, ctx: dict, device,
                 options: dict) -> FoundationEncoder:
    from fmmtc_core.models.foundation import read_safetensors
    from fmmtc_core.models.vitmae import ViTMAEFoundationEncoder, build_vitmae

    xyz, source = _a424_coordinates(folder, options)
    state = read_safetensors(folder / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    model = build_vitmae(ctx["config"], state, str(folder))
    del state
    enc = ViTMAEFoundationEncoder(
        entry, model, folder, region_index=stable_y_order(xyz),
        scaling=_scaling(folder, options, 424), coordinates_digest=_digest_array(xyz),
        order_seed=int(options.get("order_seed") or 0))
    enc.coordinates_file = _as_file(source)
    return enc.to(device)


register_entry(RegistryEntry(
    "fmmtc", "brainlm_mae", "the project's own encoders (fmmtc pretrain; HCPEx by default)",
    detect=lambda raw: raw.get("model_type") == "brainlm_mae" and "fmmtc_atlas" in raw,
    resolve=_resolve_fmmtc, load=_load_brainlm))
register_entry(RegistryEntry(
    "legacy-13m", "brainlm_mae", "BrainLM legacy 13M (brainlm_mae)",
    detect=lambda raw: raw.get("model_type") == "brainlm_mae" and "fmmtc_atlas" not in raw,
    resolve=_resolve_legacy, load=_load_brainlm))
register_entry(RegistryEntry(
    "vitmae-111m", "vit_mae", "BrainLM ViT-MAE 111M (16-pixel patches)",
    detect=lambda raw: raw.get("model_type") == "vit_mae" and raw.get("patch_size") == 16,
    resolve=_resolve_vitmae, load=_load_vitmae))
register_entry(RegistryEntry(
    "vitmae-650m", "vit_mae", "BrainLM ViT-MAE 650M (14-pixel patches)",
    detect=lambda raw: raw.get("model_type") == "vit_mae" and raw.get("patch_size") == 14,
    resolve=_resolve_vitmae, load=_load_vitmae))


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def _options(atlas, coordinates, scaling, order_samples, order_seed, token_pooling,
             window_pooling, readout) -> dict:
    if order_samples is not None and (isinstance(order_samples, bool) or
                                      not isinstance(order_samples, int) or order_samples < 1):
        raise InvalidInputError(
            f"order_samples must be a positive integer, got {order_samples!r}.")
    return {"atlas": atlas, "coordinates": coordinates, "scaling": scaling,
            "order_samples": order_samples, "order_seed": order_seed,
            "token_pooling": token_pooling, "window_pooling": window_pooling,
            "readout": readout}


def load_encoder(
    folder: str | os.PathLike,
    device: torch.device | str | None = None,
    *,
    atlas: Any = None,
    coordinates: str | os.PathLike | None = None,
    scaling: RobustScaling | str | os.PathLike | None = None,
    order_samples: int | None = None,
    order_seed: int = 0,
    token_pooling: str | None = None,
    window_pooling: str | None = None,
    readout: str | None = None,
) -> FoundationEncoder:
    """Load any registered foundation checkpoint with its preprocessing.

    Parameters
    ----------
    folder : path
        ``config.json`` + ``model.safetensors`` (optionally ``robust_scaling.json`` and
        ``A424_Coordinates.dat``).
    device : torch.device, str or None, default=None
        Default :func:`~fmmtc_core.models.device.select_device` (CUDA when present; embeddings
        then run in bf16 autocast, fp32 on CPU).
    atlas : Atlas, path, str or None, default=None
        The atlas scans are parcellated with: checked against the entry
        (:meth:`~fmmtc_core.models.encoder_base.FoundationEncoder.check_atlas`); an atlas
        loaded with a coordinate file supplies the A424 coordinates; the project's encoders on a
        user atlas need it for their centroids.
    coordinates : path or None, default=None
        BrainLM's ``A424_Coordinates.dat`` (A424 entries).
    scaling : RobustScaling, path or None, default=None
        Global robust-scaling statistics; default ``folder/robust_scaling.json`` when present
        (fit them with :meth:`~fmmtc_core.models.encoder_base.FoundationEncoder.fit_scaling`).
    order_samples : int or None, default=None
        Seeded shuffles averaged by entries with ``token_order="shuffle"`` (None:
        :data:`DEFAULT_ORDER_SAMPLES`).
    order_seed : int, default=0
        Seed of the first of those shuffles (shuffle ``k`` uses ``order_seed + k``).
    token_pooling : {"cls", "mean"} or None, default=None
    window_pooling : {"mean", "centre"} or None, default=None
    readout : {"final-norm", "last-block"} or None, default=None
        Overrides of the entry's defaults (None keeps the entry's; see
        :class:`~fmmtc_core.models.encoder_base.EncoderEntry`).

    Returns
    -------
    FoundationEncoder
        Frozen, in eval mode, on ``device``.

    Raises
    ------
    ModelFileError
        Unknown or mismatched folders (named file, what was expected), pickles, damaged
        files, missing / unexpected / wrongly shaped parameters.
    InvalidInputError
        A missing A424 coordinate table, a mismatched atlas, bad options.
    """
    from fmmtc_core.atlas import Atlas, load_atlas
    from fmmtc_core.models.device import select_device

    options = _options(atlas, coordinates, scaling, order_samples, order_seed, token_pooling,
                       window_pooling, readout)
    path = Path(folder)
    name, raw = detect_entry(path)
    reg = ENTRIES[name]
    entry, ctx = reg.resolve(path, raw, options)
    device = torch.device(device) if device else select_device()
    encoder = reg.load(path, raw, entry, ctx, device, options)
    if atlas is not None:
        atlas_obj = atlas if isinstance(atlas, Atlas) else load_atlas(atlas)
        encoder.check_atlas(atlas_obj)
    return encoder


def inspect_encoder(folder: str | os.PathLike, *, atlas: Any = None,
                    coordinates: str | os.PathLike | None = None, tr: float = 2.0,
                    n_volumes: int = 300, scan_regions: int | None = None) -> dict[str, Any]:
    """What a folder is and what it will do to a scan, without loading its weights.

    Parameters
    ----------
    folder : path
        A checkpoint folder (``config.json`` and the names and shapes in the weights' header
        are read; no tensor is).
    atlas : Atlas, path, str or None, default=None
        As :func:`load_encoder`; used to say whether the A424 coordinates are found.
    coordinates : path or None, default=None
        As :func:`load_encoder`; used to say whether the A424 coordinates are found.
    tr : float, default=2.0
        TR (s) of the example scan.
    n_volumes : int, default=300
        Volumes of the example scan.
    scan_regions : int or None, default=None
        Regions of the example scan's atlas (None: the entry's).

    Returns
    -------
    dict
        ``folder``, ``entry`` (:class:`EncoderEntry` as a dict, with its ``sources``),
        ``scaling`` (needed, and whether found), ``coordinates`` (needed, and found with its
        source or why not), ``example`` (the window plan of the example scan) and ``notes``
        (sentences on TR, atlas and scaling).

    Raises
    ------
    ModelFileError
        As :func:`detect_entry`, or a ``config.json`` its entry cannot use.
    """
    from dataclasses import asdict

    options = _options(atlas, coordinates, None, None, 0, None, None, None)
    path = Path(folder)
    name, raw = detect_entry(path)
    entry, _ = ENTRIES[name].resolve(path, raw, options)
    plan = window_plan(entry, int(n_volumes), float(tr))
    notes = []
    if entry.tr is None:
        notes.append(f"TR: a scan keeps its own sampling; windows of {entry.window} samples "
                     f"({entry.window * tr:g} s at TR {tr:g} s).")
    else:
        notes.append(
            f"TR: scans are resampled (linear) to {entry.tr:g} s when their TR differs by "
            f"{RESAMPLE_TOLERANCE_S:g} s or more. A {tr:g} s scan of {n_volumes} volumes "
            + (f"becomes {plan.n_resampled} samples" if plan.resampled else "is kept as is")
            + f": {plan.n_windows} window(s) of {entry.window}"
            + (f", {plan.n_padded} samples padded" if plan.n_padded else "")
            + f", covering volumes {plan.span[0]}..{plan.span[1] - 1} ({plan.seconds:.0f} s).")
    regions = scan_regions or entry.n_regions
    if regions != entry.n_regions:
        notes.append(f"Atlas: a scan with {regions} regions is refused; this encoder expects "
                     f"{entry.n_regions} {entry.atlas} regions in label order.")
    else:
        notes.append(
            f"Atlas: expects {entry.n_regions} {entry.atlas} regions in label order"
            + (" (A424+2mm.nii.gz with A424_Coordinates.dat from the BrainLM download); a "
               "scan parcellated with another atlas (e.g. HCPEx, 426 regions) is refused."
               if entry.atlas == "A424" else
               "; a scan parcellated with another atlas is refused."))
    coords_state: dict[str, Any] = {"needed": entry.atlas == "A424"}
    if entry.atlas == "A424":
        try:
            _, source = _a424_coordinates(path, options)
            coords_state |= {"found": True, "source": source}
        except InvalidInputError as exc:
            coords_state |= {"found": False, "problem": str(exc)}
    scaling_state: dict[str, Any] = {"needed": entry.normalisation == "global-robust"}
    if entry.normalisation == "global-robust":
        file = path / ROBUST_SCALING_FILE
        scaling_state["found"] = file.exists()
        notes.append("Scaling: per-region median / IQR fitted on a training cohort "
                     + ("(robust_scaling.json present)." if file.exists() else
                        "- robust_scaling.json is missing: training fits it on its cohort "
                        "and stores it; screening refuses scans until then."))
    return {"folder": str(path), "entry": asdict(entry), "example": asdict(plan),
            "coordinates": coords_state, "scaling": scaling_state, "notes": notes}
