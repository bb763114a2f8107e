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
from typing import cast

import numpy as np
import torch
from safetensors.torch import load, save, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from fmmtc_core import __version__, distributed
from fmmtc_core._errors import InvalidInputError, check_option
from fmmtc_core.atlas import load_atlas
from fmmtc_core.bids import read_cohort
from fmmtc_core.distributed import DistContext
from fmmtc_core.models.device import autocast, deterministic, seed_all
from fmmtc_core.models.foundation import BrainLMConfig, BrainLMForPretraining, check_xyz_scale
from fmmtc_core.pipeline import prepare_cohort
from fmmtc_core.preprocess import RegionSignals, prepare

__all__ = ["pretrain"]

Progress = Callable[[str, int, int, dict], None] | None


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state as tensors (for safetensors) and scalars (for the JSON state file)."""
    tensors, scalars = {}, {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = float(v)
    return tensors, scalars


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, scalars: dict) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in list(tensors.items()) + list(scalars.items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v if torch.is_tensor(v) else torch.tensor(v)
    sd["state"] = state
    opt.load_state_dict(sd)


#: What must match for a checkpoint to continue a run: the architecture and everything that
#: decides the global stream of windows, masks and learning rates (not the world size: every
#: rank draws the global stream, so any number of processes resumes any checkpoint).
_RESUME_KEYS = ("config", "atlas", "n_subjects", "batch_size", "lr", "seed",
                "windows_per_subject", "regions_per_step", "schedule")


def _settings(cfg: BrainLMConfig, atlas: str, n_subjects: int, **options) -> dict:
    """The run's identity recorded with its checkpoint (see :data:`_RESUME_KEYS`)."""
    arch = {k: v for k, v in cfg.to_dict().items()
            if k not in ("transformers_version", "_name_or_path", "architectures", "dtype",
                         "torch_dtype")}
    return json.loads(json.dumps({"config": arch, "atlas": atlas, "n_subjects": n_subjects,
                                  **options}))


def _write_checkpoint(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                      state: dict) -> None:
    """Weights, optimizer and ``trainer_state.json``, each written to a temporary name and
    renamed, state last: a run killed mid-write leaves the previous epoch's checkpoint whole
    (its state file names the epoch the weights belong to)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors, scalars = _optimizer_tensors(opt)
    files = {"model.safetensors": save({k: v.detach().cpu().contiguous()
                                        for k, v in model.state_dict().items()}),
             "optimizer.safetensors": save(tensors),
             "trainer_state.json": json.dumps(state | {"optimizer_scalars": scalars}).encode()}
    for name, data in files.items():
        tmp = ckpt / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, ckpt / name)


def _read_checkpoint(ckpt: Path, ctx: DistContext) -> tuple[dict, bytes, bytes] | None:
    """``(state, model bytes, optimizer bytes)`` of ``ckpt``, read by rank 0 and broadcast
    (the other ranks need no access to its disk), or None when there is none."""
    blobs = [b"", b"", b""]
    if ctx.is_main and (ckpt / "trainer_state.json").exists():
        blobs = [(ckpt / name).read_bytes() for name in
                 ("trainer_state.json", "model.safetensors", "optimizer.safetensors")]
    blobs = [ctx.broadcast_bytes(b) for b in blobs]
    if not blobs[0]:
        return None
    try:
        state = json.loads(blobs[0])
    except ValueError:
        raise InvalidInputError(
            f"{ckpt / 'trainer_state.json'} is not JSON (a damaged checkpoint): delete "
            f"{ckpt} to start over.") from None
    return state, blobs[1], blobs[2]


def _check_settings(state: dict, settings: dict, ckpt: Path) -> None:
    """Refuse a checkpoint whose recorded settings are not this run's (see
    :data:`_RESUME_KEYS`)."""
    before = state.get("settings")
    if before is not None:  # checkpoints written before this check carry none
        changed = [k for k in _RESUME_KEYS if before.get(k) != settings.get(k)]
        if changed:
            was = ", ".join(f"{k}={before.get(k)!r}" for k in changed if k != "config")
            now = ", ".join(f"{k}={settings.get(k)!r}" for k in changed if k != "config")
            arch = (" the encoder configuration differs;" if "config" in changed else "")
            raise InvalidInputError(
                f"{ckpt} belongs to another pretraining run:{arch}"
                + (f" it was {was}, now {now};" if was else "")
                + f" rerun with the same options to resume it, or use another --out (or delete "
                  f"{ckpt}) to start a new run.")


def _resume(model: BrainLMForPretraining, opt: torch.optim.Optimizer,
            saved: tuple[dict, bytes, bytes], ckpt: Path) -> dict:
    """Load a checkpoint into ``model`` and ``opt`` and return its state; refuse one whose
    tensors do not fit (a checkpoint written before the settings were recorded)."""
    state, model_bytes, opt_bytes = saved
    try:
        model.load_state_dict(load(model_bytes))
        _load_optimizer(opt, load(opt_bytes), state["optimizer_scalars"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InvalidInputError(
            f"{ckpt} does not fit this encoder configuration ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}): use another --out, or delete {ckpt} to start over."
        ) from None
    return state


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


def _rank_positions(n: int, ctx: DistContext) -> tuple[list[int], list[bool]]:
    """This rank's positions in an epoch's global order of ``n`` windows, and which are real.

    :class:`~torch.utils.data.DistributedSampler` without shuffling deals position ``p`` to
    rank ``p % world``; with a per-rank batch of ``batch_size / world``, the union of the
    ranks' ``j``-th batches is exactly the ``j``-th global batch of one process. It pads the
    tail (repeating the first positions) so that every rank takes the same number of steps;
    the padding is marked False and left out of the loss.
    """
    # the sampler reads only the dataset's length
    sampler: DistributedSampler[int] = DistributedSampler(
        cast(Dataset, range(n)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False,
        drop_last=False)
    positions = list(sampler)
    real = [ctx.rank + k * ctx.world_size < n for k in range(len(positions))]
    return positions, real


def _epoch(model: BrainLMForPretraining, opt: torch.optim.Optimizer, windows: torch.Tensor,
           xyz: torch.Tensor, rng: np.random.Generator, *, epoch: int, steps_per_epoch: int,
           total_steps: int, batch_size: int, lr: float, schedule: str,
           regions_per_step: int | None, device, ctx: DistContext,
           step_model: torch.nn.Module | None = None,
           step_losses: list[float] | None = None) -> float:
    """One pass over ``windows`` in a random order; returns the mean reconstruction loss.

    Every rank draws the same global order, region subsets and masks from ``rng`` (the same
    seed), then computes only its share of each global batch (:func:`_rank_positions`). Its
    loss is weighted by its share of the batch's real windows, so the gradients DDP averages
    over ranks are those of the global batch's mean loss, as one process computes it.
    ``step_model`` is the model to call (the DDP wrapper of ``model``; default ``model``);
    ``step_losses``, when given, receives each step's global loss.
    """
    step_model = model if step_model is None else step_model
    order = torch.from_numpy(rng.permutation(len(windows)))
    positions, real = _rank_positions(len(order), ctx)
    per_rank = batch_size // ctx.world_size
    model.train()
    losses = []
    for j, i in enumerate(range(0, len(order), batch_size)):
        if schedule == "cosine":
            factor = _cosine_factor(epoch * steps_per_epoch + j, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr * factor
        n_global = min(batch_size, len(order) - i)
        # rows of the global batch this rank computes (padding left out; see _rank_positions)
        mine = [p - i for p, ok in zip(positions[j * per_rank:(j + 1) * per_rank],
                                       real[j * per_rank:(j + 1) * per_rank]) if ok]
        rows = torch.tensor(mine or [0], dtype=torch.long)
        batch = windows[order[i : i + batch_size][rows]].to(device)
        batch_xyz = xyz
        if regions_per_step is not None:
            keep = torch.from_numpy(np.sort(rng.choice(windows.shape[1], regions_per_step,
                                                       replace=False))).to(device)
            batch, batch_xyz = batch[:, keep], xyz[keep]
        noise = torch.from_numpy(rng.random((n_global, batch.shape[1] * model.config.n_patches))
                                 ).float()[rows].to(device)
        with autocast(device):  # bf16 on CUDA, a no-op on CPU
            loss = step_model(batch, batch_xyz, noise=noise).loss
        opt.zero_grad()
        if ctx.distributed:
            # this rank's share of the global mean (0 for a rank whose share is padding only:
            # it still takes part in the gradient reduction, with nothing to add)
            share = len(mine) / n_global
            (loss * (share * ctx.world_size)).backward()  # DDP divides the sum by the world
            step_loss = ctx.sum([loss.item() * share])[0]
        else:
            loss.backward()
            step_loss = loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(step_loss)
    if step_losses is not None:
        step_losses.extend(losses)
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
    order_invariant: bool = False,
    device: torch.device | str | None = None,
    progress: Progress = None,
    threads: int | None = None,
    backend: str | None = None,
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
    order_invariant : bool, default=False
        Exact attention and no depthwise convolution over the token sequence
        (``attention_mode="exact"``, ``conv_kernel_size=None``): every token carries its
        region's centroid and its patch's time, so the embedding is then the same whatever the
        order of the tokens (``bench/foundation_probe.py``: order effect 0.00x against 0.90x
        for the same recipe without it). Inference costs about 3x (a 426-region window on 2
        CPU threads: 93 ms against 35 ms forward, timed once by hand; README, "Foundation
        encoder probe"). Pretraining costs about the same with ``regions_per_step`` (short
        sequences).
    device : torch.device, str or None, default=None
        Default :func:`~fmmtc_core.models.device.select_device`.
    progress : callable(stage, done, total, info) or None, default=None
        ``("prepare", i, n, {})`` per subject, then ``("pretrain", epoch, epochs,
        {"loss": ...})`` per epoch.
    threads : int or None, default=None
        Fix torch's thread count (per process) and use deterministic algorithms (None:
        torch's defaults; torchrun sets one thread per process).
    backend : {"gloo", "nccl"} or None, default=None
        The process-group backend under torchrun (None: NCCL on CUDA, gloo on CPU; see
        :func:`fmmtc_core.distributed.session`). Unused in a single process.

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
        the atlas or the corpus cannot be read, ``out_dir/checkpoint`` belongs to another run
        (another encoder configuration, atlas, corpus size, batch size, learning rate, seed
        or sampling option), or a multi-process launch cannot work (a batch size that is not
        a multiple of the number of processes, NCCL without CUDA, ``threads`` that
        oversubscribe the cores).

    Notes
    -----
    Under ``torchrun --nproc_per_node N`` (several processes, possibly on several machines)
    the model is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`.
    ``batch_size`` stays the *global* batch: every process draws the same global windows,
    order and masks, and computes its share of each batch (dealt by
    :class:`~torch.utils.data.DistributedSampler`), so the run follows the one-process run's
    loss curve up to floating-point summation order (tested with 2 processes; dropout, when
    the config has any, draws its own masks in each process). Rank 0 alone reads and writes
    the checkpoint, the folder and the progress; any number of processes resumes any
    checkpoint, since it holds the global state only. Every process loads the whole corpus.


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
    if order_invariant:
        cfg.attention_mode, cfg.conv_kernel_size = "exact", None
    if cfg.token_order is None:
        # The project's convention, shared with inference (registry entry "fmmtc"): the kept
        # tokens of each masked sequence stay in natural (region-major) order, as every token
        # does at inference; recorded in config.json.
        cfg.token_order = "natural"
    cfg.fmmtc_atlas = atlas_obj.name
    env = distributed.torchrun_environment()
    world = env["world_size"] if env else 1
    if batch_size % world:
        raise InvalidInputError(
            f"The batch size ({batch_size}) is the global batch, split evenly over the {world} "
            f"processes: make it a multiple of {world}.")
    corpus = read_cohort(corpus_dir, require_labels=False)
    with distributed.session(device, backend, threads) as ctx, deterministic(threads):
        if not ctx.is_main:
            progress = None  # rank 0 alone reports (and writes)
        settings = _settings(cfg, atlas_obj.name, len(corpus.participants),
                             batch_size=batch_size, lr=lr, seed=seed,
                             windows_per_subject=windows_per_subject,
                             regions_per_step=regions_per_step, schedule=schedule)
        ckpt = out / "checkpoint"
        saved = _read_checkpoint(ckpt, ctx)
        if saved is not None:  # another run's checkpoint is refused before the corpus loads
            _check_settings(saved[0], settings, ckpt)
        subjects = prepare_cohort(corpus, atlas_obj, progress)
        seed_all(seed)
        # transformers wraps PreTrainedModel.to in a decorator whose stub loses the signature.
        model = BrainLMForPretraining(cfg).to(ctx.device)  # type: ignore[arg-type]
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        start, history, step_history, world_sizes = 0, [], [], []
        if saved is not None:
            state = _resume(model, opt, saved, ckpt)
            start, history = state["epoch"], state["history"]
            step_history = state.get("loss_per_step", [])
            world_sizes = state.get("world_size_per_epoch", [1] * start)
        # Only after the checkpoint is in: DDP's constructor broadcasts rank 0's weights.
        step_model = (DistributedDataParallel(model, device_ids=[ctx.device.index]
                                              if ctx.device.type == "cuda" else None)
                      if ctx.distributed else model)
        xyz = torch.tensor(atlas_obj.centroids_mm, dtype=torch.float32, device=ctx.device)
        length = cfg.num_timepoints_per_voxel
        steps_per_epoch = -(-len(subjects) * windows_per_subject // batch_size)
        total_steps = max(1, epochs * steps_per_epoch)
        for epoch in range(start, epochs):
            rng = np.random.default_rng([seed, epoch])
            windows = _random_windows(subjects, length, rng, windows_per_subject)
            history.append(_epoch(model, opt, windows, xyz, rng, epoch=epoch,
                                  steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                  batch_size=batch_size, lr=lr, schedule=schedule,
                                  regions_per_step=regions_per_step, device=ctx.device,
                                  ctx=ctx, step_model=step_model, step_losses=step_history))
            world_sizes.append(ctx.world_size)
            if ctx.is_main:  # the global state: weights and optimizer are the same on every rank
                _write_checkpoint(ckpt, model, opt, {
                    "epoch": epoch + 1, "history": history, "loss_per_step": step_history,
                    "settings": settings, "world_size_per_epoch": world_sizes})
            ctx.barrier()  # no rank runs ahead of a checkpoint that may not exist yet
            if progress:
                progress("pretrain", epoch + 1, epochs, {"loss": history[-1]})
        model.eval()
        if ctx.is_main:
            model.save_pretrained(out)
            (out / "pretrain_log.json").write_text(json.dumps({
                "corpus": str(Path(corpus_dir).resolve()), "n_subjects": len(subjects),
                "epochs": epochs, "loss_per_epoch": history, "seed": seed,
                "atlas": atlas_obj.name, "mask_ratio": cfg.mask_ratio,
                "fmmtc_version": __version__, "batch_size": batch_size, "lr": lr,
                "windows_per_subject": windows_per_subject, "regions_per_step": regions_per_step,
                "schedule": schedule, "xyz_scale": cfg.xyz_scale,
                "steps": epochs * steps_per_epoch, "token_order": cfg.token_order,
                "loss_per_step": step_history, "world_size_per_epoch": world_sizes,
            }, indent=2))
        ctx.barrier()  # every rank returns once the folder is complete
    return out
