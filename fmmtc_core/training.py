"""Cross-validated training, calibration and evaluation of FMM-TC models.

- :func:`train`: stratified K-fold cross-validation (grouped by site when the cohort has a
  ``site`` column with enough sites), class-weighted BCE, AdamW, early stopping on an inner
  validation split carved from each training fold (never the test fold), Platt calibration on
  the out-of-fold logits, and a model folder holding every fold model (the deployed ensemble,
  :mod:`fmmtc_core.models.ensemble`).
- :func:`evaluate`: scores a model folder on another cohort (cross-dataset transfer).

Inputs come from the one path every model input takes: a cohort's scans are loaded and cleaned
by :func:`fmmtc_core.pipeline.prepare_cohort` and turned into windows and connectivity by
:func:`fmmtc_core.preprocess.prepare`. The frozen encoder's CLS embeddings are computed once per
subject and cached, so training costs little beyond the FC branch. Everything is seeded; on CPU
the results are reproducible. Pretraining the encoder is :mod:`fmmtc_core.pretraining`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from fmmtc_core import __version__
from fmmtc_core._errors import InvalidInputError, check_option
from fmmtc_core.atlas import load_atlas
from fmmtc_core.bids import read_cohort
from fmmtc_core.models.device import autocast, seed_all, select_device
from fmmtc_core.models.ensemble import fit_platt, load_model, platt, write_model_folder
from fmmtc_core.models.fmmtc import FMMTC, PRESETS, FMMTCConfig
from fmmtc_core.models.foundation import BrainLMConfig, load_foundation
from fmmtc_core.pipeline import prepare_cohort
from fmmtc_core.preprocess import CleaningSettings, RegionSignals, prepare, preprocessing_card

__all__ = ["train", "evaluate", "binary_metrics"]

Progress = Callable[[str, int, int, dict], None] | None


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
    from fmmtc_core.cohort import expected_calibration_error

    ece = expected_calibration_error(prob, y)
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


def _calibrate(oof: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    """Platt ``(a, b)`` fitted on out-of-fold logits, and a note for the card."""
    a, b = fit_platt(oof, y)
    if a > 0:
        return a, b, "fitted"
    # Out-of-fold logits do not rank responders above non-responders: a negative slope would
    # invert the model. Predict the base rate instead, and say so in the card.
    return 0.0, float(np.log(y.mean() / (1 - y.mean()))), (
        "slope <= 0 on out-of-fold logits: the model carries no cross-validated signal; "
        "probabilities are the base rate")


def _stack_inputs(subjects: list[RegionSignals], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred windows (N, R, length) and connectivity (N, R, R) of cleaned signals."""
    inputs = [prepare(s, length) for s in subjects]
    return (np.stack([x.window for x in inputs]).astype(np.float32),
            # prepare() computes the connectivity by default: fc is never None here.
            np.stack([cast(np.ndarray, x.fc) for x in inputs]).astype(np.float32))


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
    assert best_state is not None, "no epoch gave a finite validation loss"
    model.load_state_dict(best_state)
    model.eval()
    return {"val_loss": best}


def _logits(model: FMMTC, feats: dict, idx) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(idx))
    ts: torch.Tensor | None
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
    cleaning: CleaningSettings = CleaningSettings(),
    device: torch.device | str | None = None,
    progress: Progress = None,
    subjects: list[RegionSignals] | None = None,
) -> dict:
    """Cross-validated training; writes a model folder and returns its metrics.

    Parameters
    ----------
    cohort_dir : path
        Labelled BIDS-style cohort (:func:`fmmtc_core.bids.read_cohort`).
    out_dir : path
        Model folder to write (:func:`fmmtc_core.models.ensemble.write_model_folder`), plus
        ``metrics.json`` and ``oof_predictions.tsv``.
    foundation : path or None
        Pretrained encoder folder (needed when the TS branch is used, unless ``no_foundation``).
    folds, seed : int, default=5, 0
    modalities : {"ts+fc", "ts", "fc"}, default="ts+fc"
    no_foundation : bool, default=False
        Train the TS encoder from scratch (the paper's "without foundation model" ablation):
        the architecture of ``foundation`` when given (its weights are not used), else the
        ``tiny`` preset.
    preset : {"default", "paper"}, default="default"
        FC encoder design (see :data:`fmmtc_core.models.fmmtc.PRESETS`).
    atlas : str, default="hcpex"
    epochs, patience, batch_size : int, default=100, 15, 8
        Per fold: the most epochs, epochs without improvement of the inner validation loss
        before stopping, and the batch size.
    lr : float, default=1e-3
        AdamW learning rate (weight decay 0.01).
    ts_pooling : {"cls", "mean"}, default="cls"
        TS representation (see :class:`~fmmtc_core.models.fmmtc.FMMTCConfig`).
    cleaning : CleaningSettings, default=CleaningSettings()
        How the cohort's signals are cleaned; recorded in the card.
    device : torch.device, str or None
        Default :func:`~fmmtc_core.models.device.select_device`.
    progress : callable(stage, done, total, info) or None
        ``("prepare", i, n, {})`` per subject, then ``("train", k, folds, {})`` per fold.
    subjects : list of RegionSignals or None
        Already cleaned signals of the cohort, in its order (the ablation study reuses them
        across runs): :func:`~fmmtc_core.pipeline.prepare_cohort` with the same ``atlas`` and
        ``cleaning``.

    Returns
    -------
    dict
        Out-of-fold metrics (:func:`binary_metrics`) of the calibrated probabilities.
    """
    t0 = time.perf_counter()
    modalities = check_option("modalities", modalities, ("ts+fc", "ts", "fc"))
    preset = check_option("preset", preset, tuple(PRESETS))
    atlas_obj = load_atlas(atlas)
    cohort = read_cohort(cohort_dir)
    # A str ("cpu") becomes a torch.device: autocast() and the models read device.type.
    device = torch.device(device) if device else select_device()
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
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # an unwritable folder fails before training
    if subjects is None:
        subjects = prepare_cohort(cohort, atlas_obj, progress, cleaning=cleaning)
    y = cohort.participants["responder"].to_numpy()
    groups = cohort.participants["site"].astype(str).to_numpy() if "site" in cohort.participants else None
    window_np, fc_np = _stack_inputs(subjects, length)
    windows = torch.from_numpy(window_np)
    xyz = torch.tensor(atlas_obj.centroids_mm, dtype=torch.float32)
    feats = {
        "window": windows.to(device),
        "fc": torch.from_numpy(fc_np).float().to(device),
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
    fold_states = []
    for k, (train_idx, test_idx) in enumerate(splits):
        seed_all(seed * 1000 + k)
        model = FMMTC(config, encoder if (uses_ts and not no_foundation) else None).to(device)
        _fit_fold(model, feats, y, train_idx, seed * 1000 + k, epochs=epochs,
                  patience=patience, batch_size=batch_size, lr=lr, device=device)
        with torch.no_grad():
            oof[test_idx] = _logits(model, feats, test_idx).cpu().numpy()
        fold_of[test_idx] = k
        fold_states.append({n: v.detach().cpu().contiguous()
                            for n, v in model.state_dict().items()
                            if not (model.frozen_ts and n.startswith("ts_encoder."))})
        if progress:
            progress("train", k + 1, len(splits), {})
    a, b, calibration_note = _calibrate(oof, y)
    prob = platt(oof, a, b)
    metrics = binary_metrics(y, prob)
    description = Path(cohort_dir) / "dataset_description.json"
    card = {
        "name": Path(out_dir).name,
        "fmmtc_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "intended_use": "Research only. Not a medical device.",
        "data": {
            "cohort": str(Path(cohort_dir).resolve()),
            "n_subjects": int(len(y)), "n_responders": int(y.sum()),
            "sites": sorted(set(groups)) if groups is not None else None,
            "simulated": bool(json.loads(description.read_text()).get("Simulated", False))
            if description.exists() else False,
        },
        "atlas": {"name": atlas_obj.name, "n_regions": atlas_obj.n_regions},
        "preprocessing": preprocessing_card(cleaning, length),
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
        "runtime_s": round(time.perf_counter() - t0, 1),
    }
    # Explanation baselines: the cohort's mean connectivity (and mean Gram matrix, the
    # connectivity input of fc_input="gram" models).
    baseline = {"cohort_mean_fc": feats["fc"].mean(0), "cohort_mean_gram": feats["gram"].mean(0),
                "xyz": xyz}
    out = write_model_folder(out_dir, fold_states=fold_states, baseline=baseline,
                             encoder=encoder, card=card)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "oof_predictions.tsv").write_text(pd.DataFrame({
        "participant_id": cohort.participants["participant_id"], "responder": y,
        "fold": fold_of, "logit": oof, "probability": prob}).to_csv(sep="\t", index=False))
    return metrics


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def evaluate(model_dir: str | os.PathLike, cohort_dir: str | os.PathLike,
             progress: Progress = None) -> dict:
    """Metrics of a trained model on another labelled cohort (cross-dataset transfer).

    Parameters
    ----------
    model_dir : path
        Model folder (:func:`fmmtc_core.models.ensemble.load_model`).
    cohort_dir : path
        Labelled BIDS-style cohort in the model's atlas (or NIfTI scans).
    progress : callable(stage, done, total, info) or None
        ``("prepare", i, n, {})`` per subject.

    Returns
    -------
    dict
        :func:`binary_metrics` of the model's calibrated probabilities.
    """
    ens = load_model(model_dir)
    atlas_obj = load_atlas(ens.atlas)
    cohort = read_cohort(cohort_dir)
    windows, fc = _stack_inputs(prepare_cohort(cohort, atlas_obj, progress), ens.window)
    probs = []
    for i in range(0, len(windows), 16):
        probs.append(ens.predict_proba(windows[i : i + 16], fc[i : i + 16])["probability"])
    y = cohort.participants["responder"].to_numpy()
    return binary_metrics(y, np.concatenate(probs))
