"""Pretraining, cross-validated training, calibration and evaluation of FMM-TC models.

- :func:`pretrain`: masked-reconstruction pretraining of the BrainLM encoder on an unlabelled
  corpus; resumable from its last epoch checkpoint.
- :func:`train`: stratified K-fold cross-validation (grouped by site when the cohort has a
  ``site`` column with enough sites), class-weighted BCE, AdamW, early stopping on an inner
  validation split carved from each training fold (never the test fold), Platt calibration on
  the out-of-fold logits, and a model folder holding every fold model (the deployed ensemble).
- :func:`evaluate`: scores a model folder on another cohort (cross-dataset transfer).

The frozen encoder's CLS embeddings are computed once per subject and cached, so training
costs little beyond the FC branch. Everything is seeded; on CPU the results are reproducible.
Model folders hold only safetensors and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fmmtc_core import __version__
from fmmtc_core._errors import InvalidInputError, ModelFileError, check_option
from fmmtc_core.atlas import Atlas, load_atlas
from fmmtc_core.connectivity import connectivity
from fmmtc_core.io import load_scan
from fmmtc_core.models.device import autocast, select_device
from fmmtc_core.models.fmmtc import FMMTC, PRESETS, FMMTCConfig
from fmmtc_core.models.foundation import (
    BrainLMConfig,
    BrainLMForPretraining,
    _fmt_keys,
    _one_line,
    check_xyz_scale,
    load_foundation,
    model_file,
    read_safetensors,
)
from fmmtc_core.preprocess import clean, make_window, parcellate

__all__ = [
    "Cohort",
    "read_cohort",
    "prepare_cohort",
    "pretrain",
    "train",
    "evaluate",
    "load_model",
    "default_model_dir",
    "FMMTCEnsemble",
    "binary_metrics",
]

Progress = Callable[[str, int, int, dict], None] | None


# --------------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------------
@dataclass
class Cohort:
    """A BIDS-style cohort folder, read (participants and their files)."""

    root: Path
    participants: pd.DataFrame  # participant_id, [responder], [site], [drug], scan, confounds
    labelled: bool


def read_cohort(root: str | os.PathLike, *, require_labels: bool = True) -> Cohort:
    """Read ``participants.tsv`` and locate each participant's scan (see README: data formats)."""
    root = Path(root)
    table = root / "participants.tsv"
    if not table.exists():
        raise InvalidInputError(f"{root} has no participants.tsv; expected a BIDS-style cohort.")
    parts = pd.read_csv(table, sep="\t", dtype={"participant_id": str})
    if "participant_id" not in parts:
        raise InvalidInputError(f"{table} has no participant_id column.")
    labelled = "responder" in parts
    if require_labels and not labelled:
        raise InvalidInputError(f"{table} has no responder column (1/0); training needs labels.")
    if labelled:
        bad = parts.loc[~parts["responder"].isin([0, 1, "0", "1"]), "participant_id"].tolist()
        if bad:
            raise InvalidInputError(
                f"{table}: responder must be 1 or 0; participants {bad[:5]} have other values.")
        parts["responder"] = parts["responder"].astype(int)
    scans, confs = [], []
    for pid in parts["participant_id"]:
        func = root / pid / "func"
        bold = sorted(func.glob("*_bold.nii.gz")) + sorted(func.glob("*_bold.nii"))
        series = [p for p in sorted(func.glob("*_timeseries.tsv")) if "confounds" not in p.name]
        found = bold or series
        if not found:
            raise InvalidInputError(
                f"No scan for {pid}: expected {pid}/func/*_bold.nii.gz or *_timeseries.tsv.")
        scans.append(found[0])
        conf = sorted(func.glob("*_desc-confounds_timeseries.tsv"))
        confs.append(conf[0] if conf else None)
    parts["scan"], parts["confounds"] = scans, confs
    if labelled and parts["responder"].nunique() < 2:
        raise InvalidInputError(f"{table}: all participants have the same responder label.")
    return Cohort(root, parts, labelled)


@dataclass
class SubjectData:
    """Model inputs of one subject."""

    series: np.ndarray  # (T, R) cleaned region series
    fc: np.ndarray  # (R, R) Fisher z
    tr: float


def prepare_subject(scan_path, confounds_path, atlas: Atlas) -> SubjectData:
    """Load, parcellate, clean and compute connectivity for one scan."""
    scan = load_scan(scan_path, confounds=confounds_path)
    signals = parcellate(scan, None if scan.kind == "table" else atlas)
    if signals.atlas.n_regions != atlas.n_regions:
        raise InvalidInputError(
            f"{Path(scan_path).name} is in atlas {signals.atlas.name}, the model uses {atlas.name}.")
    cleaned = clean(signals)
    return SubjectData(cleaned.data, connectivity(cleaned), scan.tr)


def prepare_cohort(cohort: Cohort, atlas: Atlas, progress: Progress = None) -> list[SubjectData]:
    """:func:`prepare_subject` for every participant, with progress."""
    out = []
    n = len(cohort.participants)
    for i, row in enumerate(cohort.participants.itertuples()):
        out.append(prepare_subject(row.scan, row.confounds, atlas))
        if progress:
            progress("prepare", i + 1, n, {})
    return out


def _windows(subjects, length: int, rng=None) -> np.ndarray:
    """(N, R, length) robust-scaled windows: centred crops, or random crops when rng is given."""
    out = []
    for s in subjects:
        start = "center"
        if rng is not None and s.series.shape[0] > length:
            start = int(rng.integers(0, s.series.shape[0] - length + 1))
        out.append(make_window(s.series, length, start=start))
    return np.stack(out).astype(np.float32)


def _seed_all(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------
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
    state = {}
    for key, v in list(tensors.items()) + list(scalars.items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v if torch.is_tensor(v) else torch.tensor(v)
    sd["state"] = state
    opt.load_state_dict(sd)


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
    device=None,
    progress: Progress = None,
) -> Path:
    """Masked-reconstruction pretraining of the BrainLM encoder on an unlabelled corpus.

    Each epoch draws ``windows_per_subject`` random windows per subject. A checkpoint
    (weights, optimizer, epoch, losses) is written after every epoch to ``OUT/checkpoint``;
    rerunning the same command resumes from it. The result is a Hugging Face-style folder
    (``config.json`` + ``model.safetensors``) loadable by
    :func:`fmmtc_core.models.load_foundation`.

    Parameters
    ----------
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
    xyz_scale : float or None
        Overrides the config's ``xyz_scale`` (0.01 feeds centroids in decimetres; see
        :class:`~fmmtc_core.models.BrainLMConfig`).

    The defaults are the settings the bundled demo encoder was built with. With them, that
    encoder never got past predicting the median (``bench/foundation_probe.py``); the
    README ("Foundation encoder probe") gives a recipe that does.
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
    cfg.fmmtc_atlas = atlas_obj.name
    corpus = read_cohort(corpus_dir, require_labels=False)
    subjects = prepare_cohort(corpus, atlas_obj, progress)
    device = device or select_device()
    _seed_all(seed)
    model = BrainLMForPretraining(cfg).to(device)
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
        windows = torch.from_numpy(np.concatenate(
            [_windows(subjects, length, rng) for _ in range(windows_per_subject)]))
        order = torch.from_numpy(rng.permutation(len(windows)))
        model.train()
        losses = []
        for j, i in enumerate(range(0, len(order), batch_size)):
            if schedule == "cosine":
                step = epoch * steps_per_epoch + j
                warm = max(1, int(0.05 * total_steps))
                factor = (step + 1) / warm if step < warm else 0.5 * (
                    1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))
                for group in opt.param_groups:
                    group["lr"] = lr * factor
            batch = windows[order[i : i + batch_size]].to(device)
            batch_xyz = xyz
            if regions_per_step is not None:
                keep = torch.from_numpy(np.sort(rng.choice(batch.shape[1], regions_per_step,
                                                           replace=False))).to(device)
                batch, batch_xyz = batch[:, keep], xyz[keep]
            noise = torch.from_numpy(rng.random((len(batch), batch.shape[1] * cfg.n_patches))
                                     ).float().to(device)
            with autocast(device):  # bf16 on CUDA, a no-op on CPU
                loss = model(batch, batch_xyz, noise=noise).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
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
    }, indent=2))
    return out


# --------------------------------------------------------------------------------------------
# Metrics and calibration
# --------------------------------------------------------------------------------------------
def binary_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict:
    """AUC, MCC, balanced accuracy, sensitivity, specificity, Brier score and ECE (10 bins)."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        brier_score_loss,
        matthews_corrcoef,
        roc_auc_score,
    )

    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=float)
    pred = (prob >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    bins = np.clip((prob * 10).astype(int), 0, 9)
    ece = sum(abs(prob[bins == b].mean() - y[bins == b].mean()) * (bins == b).mean()
              for b in range(10) if (bins == b).any())
    return {
        "auc": float(roc_auc_score(y, prob)) if len(set(y)) > 1 else float("nan"),
        "mcc": float(matthews_corrcoef(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "sensitivity": tp / max(int((y == 1).sum()), 1),
        "specificity": tn / max(int((y == 0).sum()), 1),
        "brier": float(brier_score_loss(y, prob)),
        "ece": float(ece),
        "n_subjects": int(len(y)),
    }


def fit_platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling: p = sigmoid(a * logit + b), fitted by (lightly regularised) ML."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=100.0)
    lr.fit(np.asarray(logits).reshape(-1, 1), np.asarray(y).astype(int))
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


# --------------------------------------------------------------------------------------------
# Cross-validated training
# --------------------------------------------------------------------------------------------
def _splits(y, groups, folds: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = np.bincount(y)
    if counts.min() < folds:
        raise InvalidInputError(
            f"{folds}-fold cross-validation needs at least {folds} participants of each class; "
            f"the cohort has {counts[1]} responders and {counts[0]} non-responders.")
    if groups is not None and len(set(groups)) >= folds:
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(cv.split(np.zeros(len(y)), y, groups)), "stratified, grouped by site"
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    how = "stratified" if groups is None else (
        f"stratified (only {len(set(groups))} sites for {folds} folds: not grouped by site)")
    return list(cv.split(np.zeros(len(y)), y)), how


def _fit_fold(model: FMMTC, feats: dict, y: np.ndarray, train_idx, seed: int, *,
              epochs: int, patience: int, batch_size: int, lr: float, device) -> dict:
    """Train one fold with early stopping on an inner stratified validation split."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y[train_idx], minlength=2)
    if counts.min() < 3:
        raise InvalidInputError(
            f"A training fold has {counts[1]} responders and {counts[0]} non-responders; at "
            "least 3 of each are needed to keep an early-stopping split apart. Use fewer folds "
            "or a larger cohort.")
    tr, va = train_test_split(train_idx, test_size=max(0.2, 2 / len(train_idx)),
                              stratify=y[train_idx], random_state=seed)
    n_pos, n_neg = y[tr].sum(), len(tr) - y[tr].sum()
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_neg / max(n_pos, 1),
                                                           dtype=torch.float32, device=device))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=1e-2)
    yt = torch.tensor(y, dtype=torch.float32, device=device)
    best, best_state, wait = math.inf, None, 0
    gen = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        order = gen.permutation(tr)
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            opt.zero_grad()
            with autocast(device):
                logits = _logits(model, feats, b)
            loss = loss_fn(logits.float(), yt[b])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = loss_fn(_logits(model, feats, va), yt[va]).item()
        if val < best - 1e-4:
            best, wait = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            wait += 1
            if wait >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return {"val_loss": best}


def _logits(model: FMMTC, feats: dict, idx) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(idx))
    if model.config.use_ts and not model.frozen_ts:  # from scratch: the encoder trains too
        ts = model.embed_ts(feats["window"][idx], feats["xyz"])
    else:
        ts = feats["ts"][idx] if model.config.use_ts else None
    if model.config.use_fc:
        fcm = feats["gram"][idx] if model.config.fc_input == "gram" else feats["fc"][idx]
    else:
        fcm = None
    return model.forward_features(ts, fcm)


def train(
    cohort_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    foundation: str | os.PathLike | None = None,
    folds: int = 5,
    seed: int = 0,
    modalities: str = "ts+fc",
    no_foundation: bool = False,
    preset: str = "default",
    atlas: str = "hcpex",
    epochs: int = 100,
    patience: int = 15,
    batch_size: int = 8,
    lr: float = 1e-3,
    ts_pooling: str = "cls",
    device=None,
    progress: Progress = None,
    subjects: list[SubjectData] | None = None,
) -> dict:
    """Cross-validated training; writes a model folder and returns its metrics.

    Parameters
    ----------
    cohort_dir : path
        Labelled BIDS-style cohort.
    out_dir : path
        Model folder to write (``fold_K.safetensors``, ``foundation/``, ``baseline.safetensors``,
        ``model_card.json``, ``metrics.json``).
    foundation : path or None
        Pretrained encoder folder (needed when the TS branch is used, unless ``no_foundation``).
    folds, seed : int
    modalities : {"ts+fc", "ts", "fc"}
    no_foundation : bool
        Train the TS encoder from scratch (the paper's "without foundation model" ablation):
        the architecture of ``foundation`` when given (its weights are not used), else the
        ``tiny`` preset.
    preset : {"default", "paper"}
        FC encoder design (see :data:`fmmtc_core.models.fmmtc.PRESETS`).
    ts_pooling : {"cls", "mean"}
        TS representation (see :class:`~fmmtc_core.models.fmmtc.FMMTCConfig`).
    subjects : list of SubjectData or None
        Already prepared inputs (the ablation study reuses them across runs).
    """
    t0 = time.perf_counter()
    modalities = check_option("modalities", modalities, ("ts+fc", "ts", "fc"))
    preset = check_option("preset", preset, tuple(PRESETS))
    atlas_obj = load_atlas(atlas)
    cohort = read_cohort(cohort_dir)
    device = device or select_device()
    uses_ts = "ts" in modalities
    encoder = None
    if uses_ts and not no_foundation:
        if foundation is None:
            raise InvalidInputError(
                "The TS branch needs a pretrained foundation model: pass --foundation DIR "
                "(see `fmmtc pretrain`), or --no-foundation, or --modalities fc.")
        encoder = load_foundation(foundation, encoder_only=True, device=device)
        fcfg = encoder.config.to_dict()
    elif foundation is not None:  # no_foundation: the same architecture, random weights
        cfg_path = Path(foundation) / "config.json"
        if not cfg_path.exists():
            raise InvalidInputError(f"{foundation} has no config.json.")
        fcfg = BrainLMConfig(**{k: v for k, v in json.loads(cfg_path.read_text()).items()
                                if k != "model_type"}).to_dict()
    else:
        fcfg = BrainLMConfig.tiny(num_brain_voxels=atlas_obj.n_regions).to_dict()
    length = int(fcfg["num_timepoints_per_voxel"])
    if subjects is None:
        subjects = prepare_cohort(cohort, atlas_obj, progress)
    y = cohort.participants["responder"].to_numpy()
    groups = cohort.participants["site"].astype(str).to_numpy() if "site" in cohort.participants else None
    windows = torch.from_numpy(_windows(subjects, length))
    xyz = torch.tensor(atlas_obj.centroids_mm, dtype=torch.float32)
    feats = {
        "window": windows.to(device),
        "fc": torch.from_numpy(np.stack([s.fc for s in subjects])).float().to(device),
        "gram": (windows @ windows.transpose(1, 2) / length).to(device),
        "xyz": xyz.to(device),
    }
    if encoder is not None:
        with torch.no_grad(), autocast(device):  # frozen embeddings, once per subject
            feats["ts"] = torch.cat([encoder.embed(windows[i : i + 16].to(device), feats["xyz"],
                                                   pooling=ts_pooling)
                                     for i in range(0, len(windows), 16)]).float()
    config = FMMTCConfig(n_regions=atlas_obj.n_regions, modalities=modalities,
                         foundation="scratch" if no_foundation else "pretrained",
                         foundation_config=fcfg, ts_pooling=ts_pooling, **PRESETS[preset])
    splits, split_how = _splits(y, groups, folds, seed)
    oof = np.zeros(len(y))
    fold_of = np.zeros(len(y), dtype=int)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fold_files = []
    for k, (train_idx, test_idx) in enumerate(splits):
        _seed_all(seed * 1000 + k)
        model = FMMTC(config, encoder if (uses_ts and not no_foundation) else None).to(device)
        _fit_fold(model, feats, y, train_idx, seed * 1000 + k, epochs=epochs,
                  patience=patience, batch_size=batch_size, lr=lr, device=device)
        with torch.no_grad():
            oof[test_idx] = _logits(model, feats, test_idx).cpu().numpy()
        fold_of[test_idx] = k
        state = {n: v.detach().cpu().contiguous() for n, v in model.state_dict().items()
                 if not (model.frozen_ts and n.startswith("ts_encoder."))}
        path = out / f"fold_{k}.safetensors"
        save_file(state, str(path))
        fold_files.append(path)
        if progress:
            progress("train", k + 1, len(splits), {})
    # Fold files of an earlier, larger run in the same folder would join the ensemble.
    for stale in set(out.glob("fold_*.safetensors")) - set(fold_files):
        stale.unlink()
    a, b = fit_platt(oof, y)
    calibration_note = "fitted"
    if a <= 0:
        # Out-of-fold logits do not rank responders above non-responders: a negative slope
        # would invert the model. Predict the base rate instead, and say so in the card.
        a, b = 0.0, float(np.log(y.mean() / (1 - y.mean())))
        calibration_note = ("slope <= 0 on out-of-fold logits: the model carries no "
                            "cross-validated signal; probabilities are the base rate")
    prob = _sigmoid(a * oof + b)
    metrics = binary_metrics(y, prob)
    if encoder is not None:
        encoder.save_pretrained(out / "foundation")
    # Explanation baselines: the cohort's mean connectivity (and mean Gram matrix, the
    # connectivity input of fc_input="gram" models).
    save_file({"cohort_mean_fc": feats["fc"].mean(0).cpu().contiguous(),
               "cohort_mean_gram": feats["gram"].mean(0).cpu().contiguous(),
               "xyz": xyz.contiguous()}, str(out / "baseline.safetensors"))
    card = {
        "name": out.name,
        "fmmtc_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "intended_use": "Research only. Not a medical device.",
        "data": {
            "cohort": str(Path(cohort_dir).resolve()),
            "n_subjects": int(len(y)), "n_responders": int(y.sum()),
            "sites": sorted(set(groups)) if groups is not None else None,
            "simulated": bool(json.loads((Path(cohort_dir) / "dataset_description.json")
                                         .read_text()).get("Simulated", False))
            if (Path(cohort_dir) / "dataset_description.json").exists() else False,
        },
        "atlas": {"name": atlas_obj.name, "n_regions": atlas_obj.n_regions},
        "preprocessing": {
            "parcellation": "mean of voxels per region",
            "cleaning": {"detrend": True, "band_pass_hz": [0.01, 0.1],
                         "confounds": "fMRIPrep 'simple' preset when available"},
            "window": {"length": length, "crop": "centred", "scaling": "per-region median/IQR",
                       "tr": "native sampling (no resampling)"},
            "connectivity": "Pearson correlation of the cleaned series, Fisher z",
        },
        "model": config.to_dict(),
        "training": {"folds": len(splits), "split": split_how, "seed": seed, "epochs": epochs,
                     "patience": patience, "batch_size": batch_size, "lr": lr,
                     "loss": "class-weighted BCE", "optimizer": "AdamW",
                     "early_stopping": "inner 20% validation split of each training fold"},
        "calibration": {"method": "platt", "a": a, "b": b,
                        "fitted_on": "out-of-fold logits", "note": calibration_note},
        "ensemble": "calibrated mean logit of the fold models; band = calibrated min..max",
        "metrics_out_of_fold": metrics,
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
        "files": _file_hashes(out, [*fold_files, out / "baseline.safetensors",
                                    *([out / "foundation" / "config.json",
                                       out / "foundation" / "model.safetensors"]
                                      if encoder is not None else [])]),
        "runtime_s": round(time.perf_counter() - t0, 1),
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "oof_predictions.tsv").write_text(pd.DataFrame({
        "participant_id": cohort.participants["participant_id"], "responder": y,
        "fold": fold_of, "logit": oof, "probability": prob}).to_csv(sep="\t", index=False))
    return metrics


# --------------------------------------------------------------------------------------------
# Deployed ensembles
# --------------------------------------------------------------------------------------------
MODEL_CARD = "model_card.json"

#: Cards written by fmmtc 0.1.0 record the SHA-256 of the top-level safetensors only, not of
#: the encoder in ``foundation/``. The bundled demo model has such a card and its files must not
#: change, so the digests of its encoder files are pinned here: they are checked too. In any
#: other folder, a file the model reads and its card records no digest for is refused.
_LEGACY_ENCODER_SHA256 = {
    "foundation/config.json": "361ba15042e55e51331c0515134a31305cbfe823b0d85c0877d4369bd35bf192",
    "foundation/model.safetensors":
        "dd8ee2857abb4d48331c0d27d38292cff894fa02dd92fb77019113ea8cdc4991",
}

#: Keys of a model card that loading needs, with what each must hold.
_CARD_KEYS = {
    "model": "an object (the network's FMMTCConfig)",
    "atlas": "an object with the atlas 'name'",
    "calibration": "an object with numbers 'a' and 'b'",
    "files": "an object mapping each weights file to its SHA-256 (64 hex digits)",
}


def _file_sha256(path) -> str:
    from fmmtc_core.io import file_sha256  # the package's one streaming SHA-256

    return file_sha256(path, "Model file")


def _file_hashes(root: Path, paths) -> dict[str, str]:
    """``{path relative to root (POSIX): SHA-256}``: what a model card records of its files."""
    return {p.relative_to(root).as_posix(): _file_sha256(p) for p in sorted(paths)}


def _version_digest(root: Path, card_sha256: str, digests: dict[str, str]) -> str:
    """A model version's identity: SHA-256 over the card and every ``*.safetensors`` file, each
    entered as its path relative to the folder and then its own SHA-256 (raw bytes), in path
    order. Unchanged since fmmtc 0.1.0, so databases keep matching their model versions."""
    entries = {root / rel: d for rel, d in digests.items() if rel.endswith(".safetensors")}
    entries[root / MODEL_CARD] = card_sha256
    h = hashlib.sha256()
    for path in sorted(entries):
        h.update(str(path.relative_to(root)).encode())
        h.update(bytes.fromhex(entries[path]))
    return h.hexdigest()


@dataclass
class FMMTCEnsemble:
    """The fold models of a model folder, with calibration; see :func:`load_model`."""

    models: list[FMMTC]
    card: dict
    xyz: torch.Tensor
    cohort_mean_fc: torch.Tensor
    device: torch.device
    atlas: str = ""
    window: int = 200
    extra: dict = field(default_factory=dict)
    root: Path | None = None
    _digest: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.card.get("name") or (self.root.name if self.root else "model"))

    @property
    def weights_sha256(self) -> str:
        """Identity of the model version: SHA-256 over its card and every weights file.

        :func:`load_model` computes it once, from the digests it checked against the card, so
        it names the files that were loaded. An ensemble built by hand hashes its ``root`` (or,
        without one, its card) on first use.
        """
        if self._digest is None:
            if self.root is None:
                self._digest = hashlib.sha256(
                    json.dumps(self.card, sort_keys=True).encode()).hexdigest()
            else:
                self._digest = _version_digest(
                    self.root, _file_sha256(self.root / MODEL_CARD),
                    _file_hashes(self.root, self.root.rglob("*.safetensors")))
        return self._digest

    def logits(self, window: torch.Tensor, fc: torch.Tensor | None) -> torch.Tensor:
        """Per-fold logits, (K, B).

        The fold models share one frozen encoder, so its embedding is computed once.
        """
        first = self.models[0]
        if not first.frozen_ts:
            return torch.stack([m(window, fc, self.xyz) for m in self.models])
        ts = first.embed_ts(window, self.xyz)
        return torch.stack([
            m.forward_features(ts, m.fc_matrix(window, fc) if m.config.use_fc else None)
            for m in self.models])

    def predict(self, window: np.ndarray, fc: np.ndarray | None) -> dict:
        """Calibrated probability and band for windows (B, R, T) and connectivity (B, R, R)."""
        w = torch.as_tensor(window, dtype=torch.float32, device=self.device)
        f = None if fc is None else torch.as_tensor(fc, dtype=torch.float32, device=self.device)
        with torch.no_grad(), autocast(self.device):
            lg = self.logits(w, f).float().cpu().numpy()
        cal = self.card["calibration"]
        p = _sigmoid(cal["a"] * lg + cal["b"])
        return {
            "probability": _sigmoid(cal["a"] * lg.mean(0) + cal["b"]),
            "band": np.stack([p.min(0), p.max(0)], axis=1),
            "fold_logits": lg,
        }


def default_model_dir() -> Path:
    """The model used when none is named: ``$FMMTC_MODEL_DIR``, else the bundled demo model."""
    env = os.environ.get("FMMTC_MODEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "assets" / "models" / "demo"


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_sha256(value) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and set(value) <= set("0123456789abcdef"))


def _read_card(root: Path) -> tuple[dict, str]:
    """The model card of ``root``, checked for what loading needs, and the card's SHA-256."""
    if not root.exists():
        raise ModelFileError(f"Model folder {str(root)!r} does not exist; expected a folder "
                             "written by `fmmtc train`.")
    path = root / MODEL_CARD
    if not root.is_dir() or not path.is_file():
        raise ModelFileError(f"{str(root)!r} is not an FMM-TC model folder (no {MODEL_CARD}); "
                             "expected a folder written by `fmmtc train`.")
    where = model_file(path, root)
    raw = path.read_bytes()
    try:
        card = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{where} is not valid JSON ({_one_line(exc)}); expected the model "
                             "card written by `fmmtc train`.") from None
    if not isinstance(card, dict):
        raise ModelFileError(f"{where} holds a JSON {type(card).__name__}, not an object; "
                             "expected the model card written by `fmmtc train`.")
    missing = [k for k in _CARD_KEYS if k not in card]
    if missing:
        raise ModelFileError(
            f"{where} lacks the required key(s) {', '.join(map(repr, missing))}; expected "
            + "; ".join(f"{k!r}: {_CARD_KEYS[k]}" for k in missing) + ".")
    atlas, cal, files = card["atlas"], card["calibration"], card["files"]
    usable = {
        "model": isinstance(card["model"], dict),
        "atlas": isinstance(atlas, dict) and isinstance(atlas.get("name"), str),
        "calibration": isinstance(cal, dict) and _is_number(cal.get("a"))
        and _is_number(cal.get("b")),
        "files": isinstance(files, dict) and all(_is_sha256(v) for v in files.values()),
    }
    for key, ok in usable.items():
        if not ok:
            raise ModelFileError(f"{where} has an unusable {key!r} entry; expected "
                                 f"{_CARD_KEYS[key]}.")
    for rel in files:
        pure = Path(rel)
        if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel:
            raise ModelFileError(f"{where} lists {rel!r} under 'files'; expected names of files "
                                 "inside the model folder.")
    return card, hashlib.sha256(raw).hexdigest()


def _verify_files(root: Path, card: dict) -> dict[str, str]:
    """Check every file the model may read against the SHA-256 its card records, before any of
    them is parsed; return ``{path relative to root: SHA-256}`` of the checked files.

    The files are every ``*.safetensors`` in the folder (any of them enters the model version's
    identity, and a stray ``fold_K`` would join the ensemble), ``foundation/config.json`` and
    whatever else the card lists.
    """
    recorded = card["files"]
    legacy = not any(rel.startswith("foundation/") for rel in recorded)
    used = {p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")}
    if (root / "foundation" / "config.json").exists():
        used.add("foundation/config.json")
    digests = {}
    for rel in sorted(used | set(recorded)):
        path = root / rel
        if not path.is_file():
            raise ModelFileError(f"{model_file(path, root)} is missing; its card records it. "
                                 "Restore the model folder or retrain.")
        got = _file_sha256(path)
        if rel in recorded:
            if got != recorded[rel]:
                raise ModelFileError(
                    f"{model_file(path, root)} does not match its card (SHA-256 {got[:16]}..., "
                    f"the card records {recorded[rel][:16]}...); the model folder was changed "
                    "after it was written. Restore it or retrain.")
        elif not (legacy and _LEGACY_ENCODER_SHA256.get(rel) == got):
            hint = ("Its card was written before the encoder in foundation/ was hashed, and "
                    "only the bundled demo's encoder is accepted without a record: restore "
                    "the folder or retrain." if legacy and rel in _LEGACY_ENCODER_SHA256
                    else "Remove the file, restore the folder or retrain.")
            raise ModelFileError(
                f"{model_file(path, root)} is not recorded in its card ({MODEL_CARD} has no "
                f"SHA-256 for it), so it cannot be checked. {hint}")
        digests[rel] = got
    return digests


def _check_state(model: FMMTC, state: dict, path: Path, root: Path) -> None:
    """Refuse fold tensors that do not fit the card's architecture (names and shapes)."""
    ours = {k: v for k, v in model.state_dict().items()
            if not (model.frozen_ts and k.startswith("ts_encoder."))}  # stored once, elsewhere
    missing, unexpected = set(ours) - set(state), set(state) - set(ours)
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(ours[k].shape)})"
             for k in set(ours) & set(state) if state[k].shape != ours[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_fmt_keys(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_fmt_keys(wrong)}")
    if problems:
        raise ModelFileError(f"{model_file(path, root)} does not fit the architecture in "
                             f"{MODEL_CARD}: " + "; ".join(problems) + ".")


def load_model(model_dir: str | os.PathLike | None = None, device=None) -> FMMTCEnsemble:
    """Load a model folder written by :func:`train` (safetensors + JSON only).

    ``model_dir=None`` loads :func:`default_model_dir` (the bundled demo model by default).
    Every weights file (folds, baseline, the encoder in ``foundation/`` and its config) is
    checked against the SHA-256 its card records before it is parsed, and nothing is ever
    unpickled.

    Raises
    ------
    ModelFileError
        The folder or its card is missing; the card is not a JSON object, lacks a required key
        or holds an unknown config key; a file differs from its card's SHA-256 or has none
        recorded; a file is a pickle, truncated, or holds tensors of the wrong names or shapes
        for the card's architecture. The message names the file and what was expected.
    """
    root = Path(model_dir) if model_dir is not None else default_model_dir()
    card, card_sha256 = _read_card(root)
    where = model_file(root / MODEL_CARD, root)
    try:
        config = FMMTCConfig.from_dict(card["model"])
    except InvalidInputError as exc:
        raise ModelFileError(f"{where} does not describe a usable model: {exc}") from None
    digests = _verify_files(root, card)  # before any weights are parsed
    device = device or select_device()
    encoder = None
    if config.use_ts and config.foundation == "pretrained":
        encoder = load_foundation(root / "foundation", encoder_only=True, device=device)
        if encoder.config.num_timepoints_per_voxel != config.window:
            raise ModelFileError(
                f"{model_file(root / 'foundation' / 'config.json', root)} has "
                f"num_timepoints_per_voxel {encoder.config.num_timepoints_per_voxel}, but "
                f"{MODEL_CARD} gives the model a window of {config.window}; expected the encoder "
                "the model was trained with.")

    def build() -> FMMTC:
        try:
            return FMMTC(config, encoder).to(device)
        except (InvalidInputError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{where} does not describe a usable model "
                                 f"({_one_line(exc)}).") from None

    models = []
    for path in sorted(root.glob("fold_*.safetensors")):
        model = build()
        state = read_safetensors(path, root=root, device=device)
        _check_state(model, state, path, root)
        model.load_state_dict(state, strict=False)
        models.append(model.eval())
    if not models:
        raise ModelFileError(f"{str(root)!r} holds no fold_*.safetensors model; expected the "
                             "fold files its card was written with.")
    base_path = root / "baseline.safetensors"
    base = read_safetensors(base_path, root=root, device=device)
    r = config.n_regions
    shapes = {"xyz": (r, 3), "cohort_mean_fc": (r, r), "cohort_mean_gram": (r, r)}
    bad = [f"{k} {tuple(base[k].shape) if k in base else 'missing'}" for k in shapes
           if (k in base or k != "cohort_mean_gram")
           and (k not in base or tuple(base[k].shape) != shapes[k])]
    if bad:
        raise ModelFileError(
            f"{model_file(base_path, root)} does not fit the card's {r} regions: "
            f"{', '.join(bad)}; expected xyz ({r}, 3) and cohort_mean_fc ({r}, {r}).")
    extra = {k: v for k, v in base.items() if k not in ("xyz", "cohort_mean_fc")}
    return FMMTCEnsemble(models, card, base["xyz"], base["cohort_mean_fc"], device,
                         atlas=card["atlas"]["name"], window=config.window, extra=extra,
                         root=root.resolve(),
                         _digest=_version_digest(root.resolve(), card_sha256, digests))


def evaluate(model_dir: str | os.PathLike, cohort_dir: str | os.PathLike,
             progress: Progress = None) -> dict:
    """Metrics of a trained model on another labelled cohort (cross-dataset transfer)."""
    ens = load_model(model_dir)
    atlas_obj = load_atlas(ens.atlas)
    cohort = read_cohort(cohort_dir)
    subjects = prepare_cohort(cohort, atlas_obj, progress)
    windows = _windows(subjects, ens.window)
    fc = np.stack([s.fc for s in subjects]).astype(np.float32)
    probs = []
    for i in range(0, len(windows), 16):
        probs.append(ens.predict(windows[i : i + 16], fc[i : i + 16])["probability"])
    y = cohort.participants["responder"].to_numpy()
    return binary_metrics(y, np.concatenate(probs))


# --------------------------------------------------------------------------------------------
# The bundled demo model
# --------------------------------------------------------------------------------------------
DEMO_NOTE = (
    "DEMONSTRATION MODEL trained only on SIMULATED data (fmmtc simulate). It is not for "
    "clinical use and says nothing about real patients. To train on real data: pretrain on "
    "your pain-agnostic corpus (fmmtc pretrain) or use a BrainLM checkpoint folder, then run "
    "fmmtc train on a labelled BIDS-style cohort (see README)."
)


def build_demo_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_corpus: int = 60,
    n_subjects: int = 120,
    pretrain_epochs: int = 10,
    epochs: int = 100,
    work_dir: str | os.PathLike | None = None,
    progress: Progress = None,
) -> dict:
    """Build the demo model end to end, deterministically from ``seed``.

    Simulates a pain-agnostic corpus and pretrains a ``tiny`` BrainLM encoder on it, simulates
    a labelled cohort, and trains FMM-TC (5-fold CV) with that encoder. Returns the metrics.
    """
    import shutil
    import tempfile

    from fmmtc_core.simulate import SimulationConfig, write_cohort

    out = Path(out_dir)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fmmtc-demo-"))
    try:
        sim = SimulationConfig()
        corpus = write_cohort(work / "corpus", n_corpus, seed=seed + 1, fmt="timeseries",
                              labelled=False, config=sim)
        foundation = pretrain(corpus, work / "foundation", config="tiny",
                              epochs=pretrain_epochs, seed=seed, progress=progress)
        cohort = write_cohort(work / "cohort", n_subjects, seed=seed + 2, fmt="timeseries",
                              config=sim)
        if out.exists():
            shutil.rmtree(out)
        metrics = train(cohort, out, foundation=foundation, seed=seed, epochs=epochs,
                        progress=progress)
        card = json.loads((out / "model_card.json").read_text())
        card["name"] = "fmmtc-demo"
        card["intended_use"] = DEMO_NOTE
        card["data"]["cohort"] = (f"simulated: fmmtc simulate, {n_subjects} subjects, "
                                  f"seed {seed + 2}")
        card["foundation"] = {
            "pretrained_on": f"simulated pain-agnostic corpus of {n_corpus} subjects "
                             f"(seed {seed + 1}), {pretrain_epochs} epochs, preset tiny",
            "log": json.loads((foundation / "pretrain_log.json").read_text())
            | {"corpus": "simulated (temporary folder)"},
        }
        card["ground_truth"] = json.loads((cohort / "simulation.json").read_text())["planted"]
        card["build_command"] = (f"fmmtc build-demo --seed {seed} --subjects {n_subjects} "
                                 f"--corpus {n_corpus} --pretrain-epochs {pretrain_epochs}")
        (out / "model_card.json").write_text(json.dumps(card, indent=2))
        return metrics
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
