"""Masked-reconstruction (MAE) pretraining of the BrainLM encoder on an unlabelled corpus.

:func:`pretrain` draws random windows of every subject's cleaned region series each epoch
(:func:`fmmtc_core.preprocess.prepare` with a random crop), trains
:class:`~fmmtc_core.models.foundation.BrainLMForPretraining` to reconstruct masked patches, and
writes a checkpoint after every epoch, so an interrupted run resumes where it stopped. The
result is a Hugging Face-style folder that :func:`fmmtc_core.training.train` takes as its
frozen encoder. Checkpoints hold only safetensors and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fmmtc_core import __version__
from fmmtc_core._errors import InvalidInputError, check_option
from fmmtc_core.atlas import load_atlas
from fmmtc_core.bids import read_cohort
from fmmtc_core.models.device import autocast, seed_all, select_device
from fmmtc_core.models.foundation import BrainLMConfig, BrainLMForPretraining, check_xyz_scale
from fmmtc_core.pipeline import prepare_cohort
from fmmtc_core.preprocess import RegionSignals, prepare

__all__ = ["pretrain"]

Progress = Callable[[str, int, int, dict], None] | None


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict:
    """Optimizer tensors to safetensors; scalar state returned for the JSON state file."""
    tensors, scalars = {}, {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = float(v)
    save_file(tensors, str(path))
    return scalars


def _load_optimizer(opt: torch.optim.Optimizer, path: Path, scalars: dict) -> None:
    tensors = load_file(str(path))
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in list(tensors.items()) + list(scalars.items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v if torch.is_tensor(v) else torch.tensor(v)
    sd["state"] = state
    opt.load_state_dict(sd)


def _cosine_factor(step: int, total_steps: int) -> float:
    """Learning-rate factor at ``step``: a 5 % linear warm-up, then cosine decay to zero."""
    warm = max(1, int(0.05 * total_steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))


def _random_windows(subjects: list[RegionSignals], length: int, rng: np.random.Generator,
                    n: int) -> torch.Tensor:
    """``n`` random windows per subject, (n * N, R, length): subject order, ``n`` times over."""
    return torch.from_numpy(np.stack([prepare(s, length, rng=rng, with_fc=False).window
                                      for _ in range(n) for s in subjects]))


def _epoch(model: BrainLMForPretraining, opt: torch.optim.Optimizer, windows: torch.Tensor,
           xyz: torch.Tensor, rng: np.random.Generator, *, epoch: int, steps_per_epoch: int,
           total_steps: int, batch_size: int, lr: float, schedule: str,
           regions_per_step: int | None, device) -> float:
    """One pass over ``windows`` in a random order; returns the mean reconstruction loss."""
    order = torch.from_numpy(rng.permutation(len(windows)))
    model.train()
    losses = []
    for j, i in enumerate(range(0, len(order), batch_size)):
        if schedule == "cosine":
            factor = _cosine_factor(epoch * steps_per_epoch + j, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr * factor
        batch = windows[order[i : i + batch_size]].to(device)
        batch_xyz = xyz
        if regions_per_step is not None:
            keep = torch.from_numpy(np.sort(rng.choice(batch.shape[1], regions_per_step,
                                                       replace=False))).to(device)
            batch, batch_xyz = batch[:, keep], xyz[keep]
        noise = torch.from_numpy(rng.random((len(batch), batch.shape[1] * model.config.n_patches))
                                 ).float().to(device)
        with autocast(device):  # bf16 on CUDA, a no-op on CPU
            loss = model(batch, batch_xyz, noise=noise).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def pretrain(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: str | BrainLMConfig = "small",
    atlas: str = "hcpex",
    epochs: int = 20,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    windows_per_subject: int = 1,
    regions_per_step: int | None = None,
    schedule: str = "constant",
    xyz_scale: float | None = None,
    device: torch.device | str | None = None,
    progress: Progress = None,
) -> Path:
    """Masked-reconstruction pretraining of the BrainLM encoder on an unlabelled corpus.

    Each epoch draws ``windows_per_subject`` random windows per subject. A checkpoint
    (weights, optimizer, epoch, losses) is written after every epoch to ``OUT/checkpoint``;
    rerunning the same command resumes from it. The result is a Hugging Face-style folder
    (``config.json`` + ``model.safetensors``) loadable by
    :func:`fmmtc_core.models.load_foundation`.

    The defaults are the settings the bundled demo encoder was built with. With them, that
    encoder never got past predicting the median (``bench/foundation_probe.py``); the
    README ("Foundation encoder probe") gives a recipe that does.

    Token order: the kept tokens of every masked sequence are fed in their natural
    (region-major) order (``config.token_order = "natural"``, unless the given config says
    otherwise), the order in which inference feeds all of them
    (:func:`fmmtc_core.models.registry.load_encoder`, entry ``"fmmtc"``). The bundled demo
    encoder predates this and saw shuffled tokens, as BrainLM's reference does.

    Parameters
    ----------
    corpus_dir : path
        BIDS-style corpus folder (labels not needed; :func:`fmmtc_core.bids.read_cohort`).
    out_dir : path
        Folder to write (``config.json``, ``model.safetensors``, ``pretrain_log.json``,
        ``checkpoint/``).
    config : {"tiny", "small", "base"} or BrainLMConfig, default="small"
        Encoder architecture (a preset sized to the atlas, or a config).
    atlas : str, default="hcpex"
        A bundled atlas name or a label image's path (:func:`~fmmtc_core.atlas.load_atlas`);
        its region count sizes a preset config and its centroids are the encoder's
        coordinates.
    epochs, batch_size : int, default=20, 8
        Epochs in all (a resumed run continues up to ``epochs``) and windows per optimizer
        step.
    lr : float, default=1e-3
        AdamW learning rate (weight decay 0.05; the peak rate with ``schedule="cosine"``).
    seed : int, default=0
        Seeds the initial weights and each epoch's windows, order and masks.
    windows_per_subject : int, default=1
        Random windows drawn per subject and epoch (more optimizer steps from a small corpus).
    regions_per_step : int or None, default=None
        Train each batch on a random subset of this many regions (regions enter the encoder
        only through their centroids, so the model stays whole-brain); None uses all. Cuts the
        cost of a step about R / k-fold.
    schedule : {"constant", "cosine"}, default="constant"
        Learning rate: constant, or a 5 % linear warm-up then cosine decay to zero over all
        steps (a function of the step, so an interrupted run resumed with the same ``epochs``
        matches a straight one; a different ``epochs`` is a different schedule).
    xyz_scale : float or None, default=None
        Overrides the config's ``xyz_scale`` (0.01 feeds centroids in decimetres; see
        :class:`~fmmtc_core.models.BrainLMConfig`).
    device : torch.device, str or None, default=None
        Default :func:`~fmmtc_core.models.device.select_device`.
    progress : callable(stage, done, total, info) or None, default=None
        ``("prepare", i, n, {})`` per subject, then ``("pretrain", epoch, epochs,
        {"loss": ...})`` per epoch.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    InvalidInputError
        ``schedule`` or a preset ``config`` name is unknown, ``windows_per_subject`` is not a
        positive integer, ``regions_per_step`` is outside 2 to the atlas's region count,
        ``xyz_scale`` is not usable (:func:`~fmmtc_core.models.foundation.check_xyz_scale`),
        or the atlas or the corpus cannot be read.

    Notes
    -----
    A :class:`BrainLMConfig` given as ``config`` is modified in place: its ``xyz_scale``
    (when given), ``token_order`` (when None) and ``fmmtc_atlas`` are set.
    """
    out = Path(out_dir)
    atlas_obj = load_atlas(atlas)
    schedule = check_option("schedule", schedule, ("constant", "cosine"))
    if not isinstance(windows_per_subject, int) or windows_per_subject < 1:
        raise InvalidInputError(
            f"windows_per_subject must be a positive integer, got {windows_per_subject!r}.")
    if regions_per_step is not None and not 2 <= regions_per_step <= atlas_obj.n_regions:
        raise InvalidInputError(
            f"regions_per_step must be between 2 and the atlas's {atlas_obj.n_regions} regions, "
            f"got {regions_per_step}.")
    if isinstance(config, str):
        preset = check_option("config", config, ("tiny", "small", "base"))
        cfg = getattr(BrainLMConfig, preset)(num_brain_voxels=atlas_obj.n_regions)
    else:
        cfg = config
    if xyz_scale is not None:
        cfg.xyz_scale = check_xyz_scale(xyz_scale)
    if cfg.token_order is None:
        # The project's convention, shared with inference (registry entry "fmmtc"): the kept
        # tokens of each masked sequence stay in natural (region-major) order, as every token
        # does at inference; recorded in config.json.
        cfg.token_order = "natural"
    cfg.fmmtc_atlas = atlas_obj.name
    corpus = read_cohort(corpus_dir, require_labels=False)
    subjects = prepare_cohort(corpus, atlas_obj, progress)
    # A str ("cpu") becomes a torch.device: autocast() and the models read device.type.
    device = torch.device(device) if device else select_device()
    seed_all(seed)
    # transformers wraps PreTrainedModel.to in a decorator whose stub loses the signature.
    model = BrainLMForPretraining(cfg).to(device)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    ckpt = out / "checkpoint"
    start, history = 0, []
    if (ckpt / "trainer_state.json").exists():
        state = json.loads((ckpt / "trainer_state.json").read_text())
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        _load_optimizer(opt, ckpt / "optimizer.safetensors", state["optimizer_scalars"])
        start, history = state["epoch"], state["history"]
    xyz = torch.tensor(atlas_obj.centroids_mm, dtype=torch.float32, device=device)
    length = cfg.num_timepoints_per_voxel
    steps_per_epoch = -(-len(subjects) * windows_per_subject // batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    for epoch in range(start, epochs):
        rng = np.random.default_rng([seed, epoch])
        windows = _random_windows(subjects, length, rng, windows_per_subject)
        history.append(_epoch(model, opt, windows, xyz, rng, epoch=epoch,
                              steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                              batch_size=batch_size, lr=lr, schedule=schedule,
                              regions_per_step=regions_per_step, device=device))
        ckpt.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(ckpt / "model.safetensors"))
        scalars = _save_optimizer(opt, ckpt / "optimizer.safetensors")
        (ckpt / "trainer_state.json").write_text(json.dumps(
            {"epoch": epoch + 1, "history": history, "optimizer_scalars": scalars}))
        if progress:
            progress("pretrain", epoch + 1, epochs, {"loss": history[-1]})
    model.eval()
    model.save_pretrained(out)
    (out / "pretrain_log.json").write_text(json.dumps({
        "corpus": str(Path(corpus_dir).resolve()), "n_subjects": len(subjects),
        "epochs": epochs, "loss_per_epoch": history, "seed": seed, "atlas": atlas_obj.name,
        "mask_ratio": cfg.mask_ratio, "fmmtc_version": __version__,
        "batch_size": batch_size, "lr": lr, "windows_per_subject": windows_per_subject,
        "regions_per_step": regions_per_step, "schedule": schedule,
        "xyz_scale": cfg.xyz_scale, "steps": epochs * steps_per_epoch,
        "token_order": cfg.token_order,
    }, indent=2))
    return out
