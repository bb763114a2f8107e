"""Cross-validated training, calibration and evaluation of FMM-TC models.

- :func:`train`: stratified K-fold cross-validation (grouped by site when the cohort has a
  ``site`` column with enough sites), class-weighted BCE, AdamW, early stopping on an inner
  validation split carved from each training fold (never the test fold), Platt calibration on
  the out-of-fold logits, and a model folder holding every fold model (the deployed ensemble,
  :mod:`fmmtc_core.models.ensemble`).
- :func:`evaluate`: scores a model folder on another cohort (cross-dataset transfer).

Inputs come from the one path every model input takes: a cohort's scans are loaded and cleaned
by :func:`fmmtc_core.pipeline.prepare_cohort` and turned into model inputs by
:func:`fmmtc_core.preprocess.prepare` with the frozen foundation encoder
(:func:`fmmtc_core.models.registry.load_encoder`): its own preprocessing, every window of the
scan, and the connectivity of the span the windows cover, as screening and explanation do. The
encoder's whole-scan embeddings (mean over windows) are computed once per scan and cached on
disk (:class:`~fmmtc_core.models.embedding_cache.EmbeddingCache`, keyed by checkpoint +
preprocessing hash + scan), so reruns never recompute them and training costs little beyond the
FC branch. Everything is seeded; on CPU the results are reproducible. Pretraining the encoder is
:mod:`fmmtc_core.pretraining`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fmmtc_core import __version__, distributed
from fmmtc_core._errors import InvalidInputError, check_option
from fmmtc_core.atlas import load_atlas
from fmmtc_core.bids import read_cohort
from fmmtc_core.distributed import DistContext
from fmmtc_core.evaluation import permutation_p_value, score_out_of_fold
from fmmtc_core.models.deployed import card_cleaning
from fmmtc_core.models.device import autocast, deterministic, seed_all
from fmmtc_core.models.embedding_cache import EmbeddingCache
from fmmtc_core.models.encoder_base import FoundationEncoder
from fmmtc_core.models.ensemble import load_model, write_model_folder
from fmmtc_core.models.fc_encoder import NetworkEncoder
from fmmtc_core.models.fmmtc import FMMTC, PRESETS, FMMTCConfig
from fmmtc_core.models.foundation import BrainLMConfig
from fmmtc_core.pipeline import prepare_cohort
from fmmtc_core.preprocess import (
    CleaningSettings,
    RegionSignals,
    prepare,
    preprocessing_card,
    windows_gram,
)

__all__ = ["train", "evaluate", "binary_metrics", "TrainingWarning"]

Progress = Callable[[str, int, int, dict], None] | None


# --------------------------------------------------------------------------------------------
# Metrics and calibration
# --------------------------------------------------------------------------------------------
def binary_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict:
    """AUC, MCC, balanced accuracy, sensitivity, specificity, Brier score and ECE (10 bins).

    Parameters
    ----------
    y : ndarray (N,)
        Labels, 1 (responder) or 0.
    prob : ndarray (N,)
        Predicted probabilities of being a responder.
    threshold : float, default=0.5
        Probability at or above which a participant is called a responder (MCC, balanced
        accuracy, sensitivity, specificity).

    Returns
    -------
    dict
        ``auc``, ``mcc``, ``balanced_accuracy``, ``sensitivity``, ``specificity``, ``brier``,
        ``ece`` and ``n_subjects``.
    """
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


def _stack_inputs(subjects: list[RegionSignals], length: int,
                  amplitude: str = "relative") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred windows (N, R, length), connectivity (N, R, R) and relative amplitude (N, R)
    (or regional dynamics (N, 4 R), see :func:`~fmmtc_core.preprocess.prepare`) of cleaned
    signals."""
    inputs = [prepare(s, length, amplitude=amplitude) for s in subjects]
    return (np.stack([x.window for x in inputs]).astype(np.float32),
            # prepare() computes connectivity and amplitude by default: never None here.
            np.stack([cast(np.ndarray, x.fc) for x in inputs]).astype(np.float32),
            np.stack([cast(np.ndarray, x.amplitude) for x in inputs]).astype(np.float32))


class _CountingCache(EmbeddingCache):
    """The embedding cache, counting hits and misses (reported in the model card)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        out = super().get(key)
        if out is None:
            self.misses += 1
        else:
            self.hits += 1
        return out


def _encoder_features(encoder: FoundationEncoder, subjects: list[RegionSignals], *,
                      gram: bool, cohort_name: str, progress: Progress,
                      ctx: DistContext | None = None,
                      amplitude: str = "relative") -> tuple[dict, dict, dict]:
    """Whole-scan inputs of a cohort through the frozen encoder (the path screening takes).

    Returns ``(feats, scaling, embeddings)``: ``feats`` holds numpy ``ts`` (N, hidden) scan
    embeddings, ``fc`` (N, R, R) Fisher-z connectivity and ``amplitude`` (N, R) relative
    amplitude (or (N, 4 R) regional dynamics, see :func:`~fmmtc_core.preprocess.prepare`'s
    ``amplitude``) of the whole series and, when ``gram``, the windows' mean Gram
    matrices; ``scaling`` and ``embeddings`` are what the card
    records of the robust-scaling statistics and of the embedding run.
    """
    scaling: dict = {"needed": encoder.needs_scaling}
    if encoder.needs_scaling:
        if encoder.scaling is None:
            # Label-free statistics of the training cohort (no outcome enters them), as the
            # reference fits them on its training set; stored with the model.
            stats = encoder.fit_scaling([s.data for s in subjects],
                                        note=f"fmmtc train on {cohort_name}")
            scaling |= {"fitted_on": "this training cohort: per-region median and IQR of every "
                                     "sample of its cleaned scans (label-free: outcomes unused)"}
        else:
            stats = encoder.scaling
            scaling |= {"fitted_on": "the checkpoint folder's robust_scaling.json"
                                     + (f" ({stats.note})" if stats.note else "")}
        scaling |= {"n_scans": stats.n_scans, "n_samples": stats.n_samples,
                    "digest": stats.digest, "file": "foundation/robust_scaling.json"}
    fcs, amps, grams, n_windows = [], [], [], 0
    for s in subjects:
        inputs = prepare(s, encoder, amplitude=amplitude)
        # the encoder path sets all three
        assert inputs.fc is not None and inputs.plan is not None and inputs.amplitude is not None
        fcs.append(inputs.fc)
        amps.append(inputs.amplitude)
        n_windows += inputs.plan.n_windows
        if gram:
            grams.append(windows_gram(encoder, inputs.window))
    cache = _CountingCache()
    t0 = time.perf_counter()
    ts, computed = _embed_shared(encoder, subjects, cache, progress, ctx)
    embeddings = {"scans": len(subjects), "windows": n_windows, "computed": computed,
                  "cached": len(subjects) - computed,
                  "seconds": round(time.perf_counter() - t0, 2), "precision": encoder.precision}
    feats = {"ts": ts, "fc": np.stack(fcs).astype(np.float32),
             "amplitude": np.stack(amps).astype(np.float32)}
    if gram:
        feats["gram"] = np.stack(grams).astype(np.float32)
    return feats, scaling, embeddings


def _embed_shared(encoder: FoundationEncoder, subjects: list[RegionSignals],
                  cache: _CountingCache, progress: Progress,
                  ctx: DistContext | None) -> tuple[np.ndarray, int]:
    """Scan embeddings (N, hidden) of the cohort and how many were computed (not cached).

    Under torchrun each process embeds every ``world``-th scan (scans are embedded one by
    one, so a scan's embedding does not depend on who computes it) and sends its rows to
    the others as a safetensors blob; each process's cache keeps the scans it computed.
    """
    series, trs = [s.data for s in subjects], [s.tr for s in subjects]
    if ctx is None or not ctx.distributed:
        ts = encoder.embed_cohort(
            series, trs, cache=cache,
            progress=(lambda i, n: progress("embed", i, n, {})) if progress else None)
        return ts, cache.misses
    from safetensors.torch import load, save

    n, world = len(subjects), ctx.world_size
    mine = list(range(ctx.rank, n, world))
    part = encoder.embed_cohort(
        [series[i] for i in mine], [trs[i] for i in mine], cache=cache,
        progress=(lambda i, _: progress("embed", min(n - 1, i * world), n, {})) if progress
        else None)
    rows: list[np.ndarray | None] = [None] * n
    for r in range(world):
        blob = ctx.broadcast_bytes(save({"ts": torch.from_numpy(np.ascontiguousarray(part))})
                                   if r == ctx.rank else None, src=r)
        for i, row in zip(range(r, n, world), load(blob)["ts"].numpy()):
            rows[i] = row
    if progress:
        progress("embed", n, n, {})
    return np.stack(cast(list[np.ndarray], rows)), int(ctx.sum([cache.misses])[0])


def _check_encoder_atlas(foundation, note: str, atlas_obj) -> None:
    """Refuse an encoder whose region count is not the atlas's before anything is loaded."""
    from fmmtc_core.models.registry import inspect_encoder

    entry = inspect_encoder(foundation)["entry"]
    if entry["n_regions"] == atlas_obj.n_regions:
        return  # labels and names are checked by load_encoder
    hint = (" parcellate with the A424 atlas of your BrainLM download (--atlas A424+2mm.nii.gz "
            "--coordinates A424_Coordinates.dat)" if entry["atlas"] == "A424" else
            f" pass --foundation DIR with an encoder pretrained on {atlas_obj.name} (see "
            "`fmmtc pretrain`)")
    raise InvalidInputError(
        f"The foundation encoder ({note}) takes {entry['n_regions']} regions, but the atlas "
        f"{atlas_obj.name} has {atlas_obj.n_regions} (the encoder expects {entry['atlas']}):"
        f"{hint}, or --modalities fc.")


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
            loss = loss_fn(logits.float(), yt[b]) + model.penalty()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = loss_fn(_logits(model, feats, va), yt[va]).item()
        if val < best - 1e-4:
            best, wait = val, 0
            # the frozen encoder never changes: copying it at every improvement would cost
            # its size in memory each time (450 MB for BrainLM-111M)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                          if not (model.frozen_ts and k.startswith("ts_encoder."))}
        else:
            wait += 1
            if wait >= patience:
                break
    assert best_state is not None, "no epoch gave a finite validation loss"
    model.load_state_dict(best_state, strict=not model.frozen_ts)
    model.eval()
    return {"val_loss": best}


def _init_readouts(model: FMMTC, feats: dict, y: np.ndarray, idx) -> None:
    """Set the sparse read-outs (network FC encoder, amplitude) from participants ``idx``
    only: their standardisation and their start from the responder contrast."""
    config = model.config
    rows = torch.as_tensor(np.asarray(idx))
    if isinstance(model.fc_encoder, NetworkEncoder):
        z_train = feats["gram" if config.fc_input == "gram" else "fc"][rows]
        cast(torch.Tensor, model.fc_encoder.center).copy_(z_train.mean(0))
        model.fc_encoder.init_from_contrast(z_train, y[idx], **config.fc_kwargs.get("init", {}))
    if model.amplitude_readout is not None:
        a_train = feats["amplitude"][rows]
        if model.dynamics is not None:  # the read-out takes the relative amplitude block
            model.dynamics.standardise_on(a_train)
            a_train = a_train[:, :config.n_regions]
        model.amplitude_readout.standardise_on(a_train)
        model.amplitude_readout.init_from_contrast(
            a_train, y[idx], **config.amplitude_kwargs.get("init", {}))


def _head_features(model: FMMTC, feats: dict, idx) -> np.ndarray:
    """What ``model``'s head reads for participants ``idx`` (float64, no gradient)."""
    rows = torch.as_tensor(np.asarray(idx))
    config = model.config
    with torch.no_grad():
        out = model.features(
            feats["ts"][rows] if config.use_encoder else None,
            (feats["gram" if config.fc_input == "gram" else "fc"][rows]
             if config.use_fc else None),
            feats["amplitude"][rows] if config.use_amplitude else None)
    return out.double().cpu().numpy()


#: Inverse L2 strengths the stacked head chooses from by inner cross-validation.
STACKED_CS = tuple(float(c) for c in np.logspace(-3, 1, 9))


def _l2_logistic(x: np.ndarray, y: np.ndarray, cv) -> tuple[np.ndarray, float, float, float]:
    """L2 logistic regression on standardised ``x``, balanced classes, its strength chosen
    from :data:`STACKED_CS` by ``cv`` (log loss); returns weights and intercept on the scale
    of ``x`` (the standardisation folded in), the chosen C and its mean inner-CV log loss
    (negated: higher is better)."""
    from sklearn.linear_model import LogisticRegressionCV

    mu = x.mean(0)
    sd = x.std(0)
    sd[sd < 1e-12] = 1.0
    clf = LogisticRegressionCV(Cs=list(STACKED_CS), cv=cv, scoring="neg_log_loss",
                               class_weight="balanced", max_iter=5000)
    with warnings.catch_warnings():  # scikit-learn 1.8 announces new fitted attributes
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit((x - mu) / sd, y)
    w = clf.coef_[0] / sd
    score = float(np.max(next(iter(clf.scores_.values())).mean(0)))
    return w, float(clf.intercept_[0] - (w * mu).sum()), float(clf.C_[0]), score


def _head_with_optional_probe(stacked: np.ndarray, y: np.ndarray, cv,
                              n_probes: int = 1) -> tuple[np.ndarray, float, float,
                                                          tuple[bool, ...]]:
    """The stacked head on ``stacked`` (columns ``0 .. n_probes - 1``: the cross-fitted scores
    of the linear probes (the encoder's embedding, the regional dynamics), the others: the
    read-outs' features), keeping a probe only when it improves the inner-CV log loss: every
    subset of the probes is tried beside the read-outs and the best kept (a dropped probe's
    weight is 0). Returns weights (over every column), intercept, C and, per probe, whether it
    was kept.

    A probe that carries nothing about the outcome costs the head its noise: on the realistic
    simulation an always-kept embedding probe cost ~0.03 AUC.
    """
    import itertools

    n_cols = stacked.shape[1]
    best: tuple | None = None
    for kept in itertools.product((False, True), repeat=n_probes):
        cols = [i for i in range(n_probes) if kept[i]] + list(range(n_probes, n_cols))
        if not cols:
            continue
        w, b, c, score = _l2_logistic(stacked[:, cols], y, cv)
        # ties go to the smaller head (fewer probes), which is tried first
        if best is None or score > best[0]:
            full = np.zeros(n_cols)
            full[cols] = w
            best = (score, full, b, c, tuple(kept))
    assert best is not None, "the stacked head has no column"
    return best[1], best[2], best[3], best[4]


def _fit_stacked(model: FMMTC, feats: dict, y: np.ndarray, train_idx, seed: int,
                 inner_folds: int = 5) -> dict:
    """Fit a ``fit="stacked"`` fold model (see :class:`~fmmtc_core.models.fmmtc.FMMTCConfig`).

    The sparse read-outs were set on the whole training fold (:func:`_init_readouts`). The
    encoder's embedding and (``dynamics`` models) the standardised regional dynamics each get
    a linear probe (:func:`_l2_logistic` on the training fold: one score each). The head
    combines the probes' scores and the read-outs' features with weights from
    :func:`_l2_logistic` fitted on *cross-fitted* values of them: each training participant's
    probe scores and read-out features come from probes and read-outs fitted on the other
    inner folds, so the head does not learn the optimism of the selection; a probe is kept
    only where it improves the inner-CV log loss (:func:`_head_with_optional_probe`). The kept
    probes are then folded into the head's weights on the embedding and the dynamics (the
    model stays one linear head).
    """
    from sklearn.model_selection import StratifiedKFold

    train_idx = np.asarray(train_idx)
    yt = y[train_idx].astype(int)
    counts = np.bincount(yt, minlength=2)
    n_inner = min(inner_folds, int(counts.min()))
    if n_inner < 2:
        raise InvalidInputError(
            f"A training fold has {counts[1]} responders and {counts[0]} non-responders; the "
            "stacked head needs at least 2 of each. Use fewer folds or a larger cohort.")
    cv = StratifiedKFold(n_inner, shuffle=True, random_state=seed % (2**32))
    splits = list(cv.split(np.zeros(len(yt)), yt))
    full = _head_features(model, feats, train_idx)
    n_emb = int(feats["ts"].shape[1]) if model.config.use_encoder else 0
    n_dyn = model.dynamics.out_dim if model.dynamics is not None else 0
    # probe name -> its columns in the head's features (embedding first, dynamics last)
    probes = {name: cols for name, cols in (
        ("embedding", np.arange(n_emb)),
        ("dynamics", np.arange(full.shape[1] - n_dyn, full.shape[1]))) if cols.size}
    readout = np.arange(n_emb, full.shape[1] - n_dyn)
    stacked = np.zeros((len(train_idx), len(probes) + readout.size))
    for inner_train, inner_test in splits:
        probe = FMMTC(model.config, model.ts_encoder if model.frozen_ts else None)
        probe = probe.to(next(model.parameters()).device).eval()
        _init_readouts(probe, feats, y, train_idx[inner_train])
        f_train = _head_features(probe, feats, train_idx[inner_train])
        f_test = _head_features(probe, feats, train_idx[inner_test])
        if probes:
            inner_cv = StratifiedKFold(min(n_inner, int(np.bincount(
                yt[inner_train]).min())), shuffle=True, random_state=seed % (2**32))
        for j, cols in enumerate(probes.values()):
            w, b, _, _ = _l2_logistic(f_train[:, cols], yt[inner_train], inner_cv)
            stacked[inner_test, j] = f_test[:, cols] @ w + b
        stacked[inner_test, len(probes):] = f_test[:, readout]
    info: dict = {}
    if readout.size:
        w_head, b_head, info["C"], kept = _head_with_optional_probe(stacked, yt, cv,
                                                                    len(probes))
    else:  # nothing but probes: they stay
        w_head, b_head, info["C"], _ = _l2_logistic(stacked, yt, cv)
        kept = (True,) * len(probes)
    weights = np.zeros(full.shape[1])
    weights[readout] = w_head[len(probes):]
    for j, (name, cols) in enumerate(probes.items()):
        info[name] = "used" if kept[j] else "dropped"
        if kept[j]:
            w_probe, b_probe, info[f"C_{'probe' if name == 'embedding' else name}"], _ = (
                _l2_logistic(full[:, cols], yt, cv))
            weights[cols] = w_head[j] * w_probe
            b_head += w_head[j] * b_probe
    if not n_emb:
        info["embedding"] = "none"
    linear = cast(nn.Linear, model.head[-1])
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weights, dtype=linear.weight.dtype)[None])
        linear.bias.fill_(b_head)
    model.eval()
    return info


def _logits(model: FMMTC, feats: dict, idx) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(idx))
    ts: torch.Tensor | None
    if model.config.use_encoder and not model.frozen_ts:  # from scratch: the encoder trains
        ts = model.embed_ts(feats["window"][idx], feats["xyz"])
    else:
        ts = feats["ts"][idx] if model.config.use_encoder else None
    if model.config.use_fc:
        fcm = feats["gram"][idx] if model.config.fc_input == "gram" else feats["fc"][idx]
    else:
        fcm = None
    amplitude = feats["amplitude"][idx] if model.config.use_amplitude else None
    return model.forward_features(ts, fcm, amplitude)


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
    coordinates: str | os.PathLike | None = None,
    epochs: int = 100,
    patience: int = 15,
    batch_size: int = 8,
    lr: float = 1e-3,
    ts_pooling: str = "cls",
    cleaning: CleaningSettings = CleaningSettings(),
    device: torch.device | str | None = None,
    progress: Progress = None,
    subjects: list[RegionSignals] | None = None,
    repeats: int = 1,
    permutations: int = 0,
    threads: int | None = None,
    backend: str | None = None,
) -> dict:
    """Cross-validated training; writes a model folder and returns its metrics.

    Parameters
    ----------
    cohort_dir : path
        Labelled BIDS-style cohort (:func:`fmmtc_core.bids.read_cohort`).
    out_dir : path
        Model folder to write (:func:`fmmtc_core.models.ensemble.write_model_folder`), plus
        ``metrics.json`` and ``oof_predictions.tsv``.
    foundation : path or None, default=None
        Pretrained encoder folder for the TS branch; None uses the bundled demo encoder
        (pretrained on simulated data only), which the console and the card state.
    folds, seed : int, default=5, 0
    modalities : {"ts+fc", "ts", "fc"}, default="ts+fc"
    no_foundation : bool, default=False
        Train the TS encoder from scratch (the paper's "without foundation model" ablation):
        the architecture of ``foundation`` when given (its weights are not used), else the
        ``tiny`` preset. With the ``small`` preset: no encoder at all, the regional
        amplitude alone carries the T modality.
    preset : {"default", "paper", "small"}, default="default"
        Model design (see :data:`fmmtc_core.models.fmmtc.PRESETS`). ``small``, for cohorts
        of ~100: the encoder's embedding, sparse read-outs of regional amplitude and of
        connectivity networks, and a stacked linear head (``fit="stacked"``: no gradient
        training, so ``epochs``, ``patience``, ``batch_size`` and ``lr`` are not used).
    atlas : str or path, default="hcpex"
        A bundled atlas, or the path of a label image (e.g. ``A424+2mm.nii.gz`` of a BrainLM
        download for the A424 encoders).
    coordinates : path or None, default=None
        A region coordinate table for the encoder (BrainLM's ``A424_Coordinates.dat``; needed
        by the A424 encoders unless the checkpoint folder holds a copy); copied into the model
        folder.
    epochs, patience, batch_size : int, default=100, 15, 8
        Per fold: the most epochs, epochs without improvement of the inner validation loss
        before stopping, and the batch size.
    lr : float, default=1e-3
        AdamW learning rate (weight decay 0.01).
    ts_pooling : {"cls", "mean"}, default="cls"
        TS representation (see :class:`~fmmtc_core.models.fmmtc.FMMTCConfig`).
    cleaning : CleaningSettings, default=CleaningSettings()
        How the cohort's signals are cleaned; recorded in the card.
    device : torch.device, str or None, default=None
        Default :func:`~fmmtc_core.models.device.select_device`.
    progress : callable(stage, done, total, info) or None, default=None
        ``("prepare", i, n, {})`` per subject, ``("embed", i, n, {})`` per scan embedded by the
        frozen encoder, then ``("train", k, folds, {})`` per fold.
    subjects : list of RegionSignals or None, default=None
        Already cleaned signals of the cohort, in its order (the ablation study reuses them
        across runs): :func:`~fmmtc_core.pipeline.prepare_cohort` with the same ``atlas`` and
        ``cleaning``.
    repeats : int, default=1
        Repetitions of the K-fold cross-validation with different splits (seeds ``seed``,
        ``seed + 1``, ...). Every fold model of every repeat joins the deployed ensemble, and
        the out-of-fold score of a participant is the mean over repeats.
    permutations : int, default=0
        Label permutations for a permutation p-value of the out-of-fold AUC; each re-runs the
        whole cross-validation (costly: ``permutations x folds`` fits).
    threads : int or None, default=None
        Fix torch's thread count and use deterministic algorithms while training, so the same
        command gives the same bytes on any machine (None: torch's defaults).
    backend : {"gloo", "nccl"} or None, default=None
        The process-group backend under torchrun (None: NCCL on CUDA, gloo on CPU; see
        :func:`fmmtc_core.distributed.session`). Unused in a single process.

    Returns
    -------
    dict
        Out-of-fold metrics (:func:`binary_metrics`) of the cross-fitted calibrated
        probabilities, plus ``auc_ci95`` (bootstrap over participants), ``auc_per_repeat``,
        ``permutation`` (when asked) and ``warnings`` (empty unless the model found no usable
        signal; they are also issued as :class:`TrainingWarning`).

    Raises
    ------
    InvalidInputError
        An option out of range (``repeats``, ``permutations``, ``modalities``, ``preset``),
        an encoder whose atlas is not ``atlas``, a cohort that cannot be read or cleaned, a
        training fold without enough participants of each class, or a multi-process launch
        that cannot work (NCCL without CUDA, ``threads`` that oversubscribe the cores).

    Notes
    -----
    Under ``torchrun --nproc_per_node N`` the work is dealt over the processes where it is
    independent: the scans' embeddings (every N-th scan each) and the fold models (fold
    ``k`` on rank ``k % N``, for every repeat and every permutation), each sent to every
    rank as a safetensors blob. A fold's fit depends only on its seed and data, so the
    model folder and metrics are the one-process ones (bit for bit with the same
    ``threads``). Rank 0 alone reports progress and writes the folder; every process loads
    and cleans the whole cohort.
    """
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise InvalidInputError(f"repeats must be a positive integer, got {repeats!r}.")
    if not isinstance(permutations, int) or isinstance(permutations, bool) or permutations < 0:
        raise InvalidInputError(
            f"permutations must be a non-negative integer, got {permutations!r}.")
    t0 = time.perf_counter()
    modalities = check_option("modalities", modalities, ("ts+fc", "ts", "fc"))
    preset = check_option("preset", preset, tuple(PRESETS))
    atlas_obj = load_atlas(atlas)
    cohort = read_cohort(cohort_dir)
    # One process, or one of torchrun's (a CUDA device becomes this rank's GPU); rank 0
    # alone reports and writes (see the Notes).
    with distributed.session(device, backend, threads) as ctx:
        device = ctx.device
        if not ctx.is_main:
            progress = None
        uses_ts = "ts" in modalities
        encoder: FoundationEncoder | None = None
        foundation_note = None
        if uses_ts and not no_foundation:
            from fmmtc_core.models.foundation import read_json_object
            from fmmtc_core.models.registry import load_encoder

            if foundation is None:
                from fmmtc_core.config import default_model_dir

                foundation = Path(default_model_dir()) / "foundation"
                foundation_note = (f"the bundled demo encoder ({foundation}), pretrained on "
                                   "simulated data only")
            else:
                foundation_note = str(Path(foundation).resolve())
            _check_encoder_atlas(foundation, foundation_note, atlas_obj)
            # The atlas with the coordinate table (A424 row order / coordinates); the scans are
            # parcellated with atlas_obj itself.
            enc_atlas = (atlas_obj if coordinates is None
                         else load_atlas(atlas, coordinates_file=coordinates))
            encoder = load_encoder(foundation, device, atlas=enc_atlas, token_pooling=ts_pooling)
            cfg_file = Path(foundation) / "config.json"
            fcfg = read_json_object(cfg_file, str(cfg_file), "a model config object")
        elif foundation is not None:  # no_foundation: the same architecture, random weights
            cfg_path = Path(foundation) / "config.json"
            if not cfg_path.exists():
                raise InvalidInputError(f"{foundation} has no config.json.")
            fcfg = BrainLMConfig(**{k: v for k, v in json.loads(cfg_path.read_text()).items()
                                    if k != "model_type"}).to_dict()
        else:
            fcfg = BrainLMConfig.tiny(num_brain_voxels=atlas_obj.n_regions).to_dict()
        length = encoder.entry.window if encoder is not None else int(
            fcfg["num_timepoints_per_voxel"])
        if ctx.is_main:  # an unwritable folder fails before training
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        if subjects is None:
            subjects = prepare_cohort(cohort, atlas_obj, progress, cleaning=cleaning)
        y = cohort.participants["responder"].to_numpy()
        groups = (cohort.participants["site"].astype(str).to_numpy()
                  if "site" in cohort.participants else None)
        config = FMMTCConfig(n_regions=atlas_obj.n_regions, modalities=modalities,
                             foundation="scratch" if no_foundation else "pretrained",
                             foundation_config=fcfg, ts_pooling=ts_pooling,
                             encoder_entry=encoder.entry.name if encoder is not None else "",
                             encoder_hash=encoder.preprocessing_hash if encoder is not None else "",
                             # the small preset without a foundation model: regional amplitude
                             # alone carries the T modality (no encoder trained from scratch)
                             ts_embedding=not (no_foundation and PRESETS[preset].get("amplitude")),
                             **PRESETS[preset])
        xyz = torch.tensor(atlas_obj.centroids_mm, dtype=torch.float32)
        feats: dict[str, torch.Tensor] = {"xyz": xyz.to(device)}
        scaling_card = embeddings_card = None
        if encoder is not None:  # whole scans through the frozen encoder: the screening path
            arrays, scaling_card, embeddings_card = _encoder_features(
                encoder, subjects, gram=PRESETS[preset]["fc_input"] == "gram",
                cohort_name=Path(cohort_dir).name, progress=progress, ctx=ctx,
                amplitude=config.amplitude_kind)
            feats |= {k: torch.from_numpy(v).float().to(device) for k, v in arrays.items()}
            # fitting the encoder's robust scaling (above) changes its preprocessing hash
            config = dataclasses.replace(config, encoder_hash=encoder.preprocessing_hash)
        else:  # connectivity only, or an encoder trained from scratch: the centred window
            window_np, fc_np, amp_np = _stack_inputs(subjects, length, config.amplitude_kind)
            windows = torch.from_numpy(window_np)
            feats |= {
                "window": windows.to(device),
                "fc": torch.from_numpy(fc_np).float().to(device),
                "amplitude": torch.from_numpy(amp_np).float().to(device),
                "gram": (windows @ windows.transpose(1, 2) / length).to(device),
            }
        fit_kw = {"epochs": epochs, "patience": patience, "batch_size": batch_size, "lr": lr,
                  "device": device}
        shared = encoder if (uses_ts and not no_foundation) else None
        with deterministic(threads):
            runs = []
            for r in range(repeats):
                splits, split_how = _splits(y, groups, folds, seed + r)
                runs.append(_cross_validate(config, shared, feats, y, splits, seed + r, fit_kw,
                                            progress=progress, stage="train" if repeats == 1
                                            else f"train (repeat {r + 1}/{repeats})",
                                            ctx=ctx))
            fold_of = runs[0]["fold_of"]
            permutation = None
            if permutations:
                def permuted_auc(y_perm: np.ndarray) -> float:
                    perm_splits, _ = _splits(y_perm, groups, folds, seed)
                    run = _cross_validate(config, shared, feats, y_perm, perm_splits, seed,
                                          fit_kw, keep_states=False, ctx=ctx)
                    return float(roc_auc_score(y_perm, run["oof"]))

                perm_cb = (lambda i, n: progress("permute", i, n, {})) if progress else None
                permutation = permutation_p_value(
                    float(roc_auc_score(y, runs[0]["oof"])), permuted_auc, y, permutations,
                    seed=seed, progress=perm_cb)
        # The deployed quantity is the mean of the fold models' scaled logits. Its out-of-fold
        # estimate for a participant is the mean over repeats of the scaled logit of the model
        # that held them out (each from a model that never saw them).
        scored = score_out_of_fold(y, [run["oof"] for run in runs], fold_of, seed=seed,
                                   permutation=permutation)
        oof, prob, metrics, warnings_ = (scored.logit, scored.probability, scored.metrics,
                                         scored.warnings)
        a, b, draws, calibration_note = scored.a, scored.b, scored.bootstrap, scored.note
        if config.fit == "stacked" and config.use_encoder:
            kept = [info.get("embedding") == "used" for run in runs for info in run["fit_info"]]
            metrics["foundation_embedding"] = {"kept": sum(kept), "fold_models": len(kept),
                                               "note": _embedding_kept(runs)}
        if config.fit == "stacked" and config.use_dynamics:
            kept = [info.get("dynamics") == "used" for run in runs for info in run["fit_info"]]
            metrics["dynamics_probe"] = {"kept": sum(kept), "fold_models": len(kept)}
        if config.fit == "stacked" and len(y) < SMALL_COHORT:
            warnings_ = [*warnings_, _small_cohort_warning(len(y))]
            metrics["warnings"] = warnings_
        for text in warnings_:
            warnings.warn(text, TrainingWarning, stacklevel=2)
        fold_states = [st for run in runs for st in run["states"]]
        fold_scale = [sc for run in runs for sc in run["scales"]]
        fit_card: dict[str, object] = (
            {"fit": "stacked: read-outs set from each training fold's contrasts; linear head = L2 "
                    "logistic regression (balanced classes, strength by inner 5-fold CV) on "
                    "cross-fitted read-out features and cross-fitted linear probes of the "
                    "embedding" + (" and of the regional dynamics" if config.use_dynamics
                                   else "") + ", a probe kept only where it improves the "
                    "inner-CV log loss",
             "fold_fits": [info for run in runs for info in run["fit_info"]],
             **({"embedding_kept": _embedding_kept(runs)} if config.use_encoder else {}),
             **({"dynamics_kept": _dynamics_kept(runs)} if config.use_dynamics else {})}
            if config.fit == "stacked" else
            {"epochs": epochs, "patience": patience, "batch_size": batch_size, "lr": lr,
             "loss": "class-weighted BCE", "optimizer": "AdamW",
             "early_stopping": "inner 20% validation split of each training fold"})
        card = {
            **_card_header(out_dir, cohort_dir, y, groups),
            "atlas": _atlas_card(atlas_obj, coordinates),
            "preprocessing": (preprocessing_card(cleaning, encoder, scaling=scaling_card)
                              if encoder is not None else preprocessing_card(cleaning, length)),
            "model": {"type": "fmmtc", **config.to_dict()},
            "training": {"folds": folds, "repeats": repeats, "split": split_how, "seed": seed,
                         **fit_card,
                         "threads": threads, "deterministic": threads is not None,
                         **({"processes": ctx.world_size, "parallel": "fold models and scan "
                             "embeddings dealt over the processes (torchrun)"}
                            if ctx.distributed else {}),
                         "foundation": foundation_note,
                         **({"embeddings": embeddings_card} if embeddings_card else {})},
            "calibration": {"method": "platt", "a": a, "b": b,
                            "fitted_on": "out-of-fold mean of scaled fold logits (all "
                                         "participants)",
                            "note": calibration_note, "fold_scale": fold_scale,
                            "bootstrap": [[round(float(x), 6) for x in row] for row in draws],
                            "band": "80 % interval of the calibrated probability over "
                                    f"{len(draws)} bootstrap refits of the calibration"},
            "ensemble": ("calibrated mean of the fold models' logits, each divided by its SD over "
                         "its training participants"),
            "metrics_out_of_fold": metrics,
            "warnings": warnings_,
            "software": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__},
            "runtime_s": round(time.perf_counter() - t0, 1),
        }
        # Explanation baselines: the cohort's mean connectivity (and mean Gram matrix, the
        # connectivity input of fc_input="gram" models).
        baseline = {"cohort_mean_fc": feats["fc"].mean(0), "xyz": xyz}
        if "gram" in feats:
            baseline["cohort_mean_gram"] = feats["gram"].mean(0)
        if ctx.is_main:
            out = write_model_folder(out_dir, fold_states=fold_states, baseline=baseline,
                                     encoder=encoder, card=card)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            (out / "oof_predictions.tsv").write_text(pd.DataFrame({
                "participant_id": cohort.participants["participant_id"], "responder": y,
                "fold": fold_of, "logit": oof, "probability": prob}).to_csv(sep="\t",
                                                                            index=False))
        ctx.barrier()  # every rank returns once the folder is complete
        return metrics


#: Participants below which the stacked (``small``) design is not expected to beat a classic
#: baseline: on the ``realistic`` grid (docs/learning_grid.md) it was 0.05-0.23 AUC below a
#: logistic regression on regional amplitude at n = 60 and above it from n = 120.
SMALL_COHORT = 100


def _small_cohort_warning(n: int) -> str:
    return (f"SMALL COHORT: {n} participants. On simulated cohorts of 60 this design scored "
            "0.05-0.23 AUC below a logistic regression on regional amplitude (above it from "
            "120; docs/learning_grid.md). Run `fmmtc compare` on this cohort and prefer the "
            "classic baseline if it does as well.")


class TrainingWarning(UserWarning):
    """Cross-validation found no usable signal (the text says which check failed)."""


def _embedding_kept(runs: list[dict]) -> str:
    """The card's sentence on how many stacked fold models kept the encoder's embedding."""
    used = [info.get("embedding") == "used" for run in runs for info in run["fit_info"]]
    text = f"{sum(used)} of {len(used)} fold models"
    dynamics = any("dynamics" in info for run in runs for info in run["fit_info"])
    if not any(used):
        return (text + ": the foundation encoder's embedding did not improve any fold's inner "
                "cross-validation, so no fold model reads it (the T modality is the regional "
                + ("amplitude read-out alone, and the regional dynamics where kept)" if dynamics
                   else "amplitude alone)"))
    return text + " read the foundation encoder's embedding (the others did not need it)"


def _dynamics_kept(runs: list[dict]) -> str:
    """The card's sentence on how many stacked fold models kept the regional dynamics."""
    used = [info.get("dynamics") == "used" for run in runs for info in run["fit_info"]]
    return (f"{sum(used)} of {len(used)} fold models read the regional dynamics (relative "
            "amplitude and ALFF, fALFF, lag-1 autocorrelation of every region) beside the "
            "sparse read-outs; the others did not improve their inner cross-validation with it")


def _card_header(out_dir, cohort_dir, y: np.ndarray, groups) -> dict:
    """The first keys of every model card (FMM-TC's and a classic baseline's): ``name``,
    ``fmmtc_version``, ``created``, ``intended_use`` and ``data`` (the training cohort: path,
    size, responders, sites, whether it was simulated)."""
    description = Path(cohort_dir) / "dataset_description.json"
    return {
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
    }


def _atlas_card(atlas_obj, coordinates) -> dict:
    """The card's ``atlas``: name and size, and for a label image its path (``source``, which
    screening loads), with the coordinate table when one was given."""
    from fmmtc_core.atlas import resolve_atlas_name

    out: dict = {"name": atlas_obj.name, "n_regions": atlas_obj.n_regions}
    if resolve_atlas_name(atlas_obj.name) is None and atlas_obj.source:
        out["source"] = str(Path(atlas_obj.source).resolve())
    if coordinates is not None:
        out["coordinates"] = str(Path(coordinates).resolve())
    return out


def _cross_validate(config: FMMTCConfig, encoder, feats: dict, y: np.ndarray, splits,
                    seed: int, fit_kw: dict, *, progress: Progress = None,
                    stage: str = "train", keep_states: bool = True,
                    ctx: DistContext | None = None) -> dict:
    """One K-fold cross-validation: out-of-fold scaled logits, fold states and scales.

    Each fold model's logits are divided by their SD over its own training participants (at
    least 0.1), so no fold model dominates the ensemble's mean by the scale of its logits.

    Under torchrun (``ctx`` with more than one process) fold ``k`` is fitted by rank
    ``k % world`` and its result (out-of-fold logits, scale, weights, fit notes) sent to
    every rank. A fold's fit depends only on its seed and data, never on the other folds, so
    the result is the one-process result (bit for bit with the same ``threads``).
    """
    oof = np.zeros(len(y))
    fold_of = np.zeros(len(y), dtype=int)
    states, scales, fit_info = [], [], []
    world = ctx.world_size if ctx is not None else 1
    rank = ctx.rank if ctx is not None else 0
    for k, (train_idx, test_idx) in enumerate(splits):
        result = None
        if k % world == rank:
            result = _fit_one_fold(config, encoder, feats, y, train_idx, test_idx,
                                   seed * 1000 + k, fit_kw, keep_states=keep_states)
        if world > 1:
            assert ctx is not None
            blob = _fold_blob(result) if result is not None else None
            result = _fold_from_blob(ctx.broadcast_bytes(blob, src=k % world))
        assert result is not None
        oof[test_idx] = result["oof"]
        fold_of[test_idx] = k
        scales.append(result["scale"])
        if keep_states:
            states.append(result["state"])
        if "fit_info" in result:
            fit_info.append(result["fit_info"])
        if progress:
            progress(stage, k + 1, len(splits), {})
    return {"oof": oof, "fold_of": fold_of, "states": states, "scales": scales,
            "fit_info": fit_info}


def _fit_one_fold(config: FMMTCConfig, encoder, feats: dict, y: np.ndarray, train_idx,
                  test_idx, seed: int, fit_kw: dict, *, keep_states: bool) -> dict:
    """One fold model: ``oof`` (its scaled logits of ``test_idx``), ``scale``, ``state``
    (CPU tensors, without the frozen encoder; empty unless ``keep_states``) and, for a
    stacked fit, ``fit_info``."""
    device = fit_kw["device"]
    seed_all(seed)
    model = FMMTC(config, encoder).to(device)
    _init_readouts(model, feats, y, train_idx)
    out: dict = {}
    if config.fit == "stacked":
        out["fit_info"] = _fit_stacked(model, feats, y, train_idx, seed)
    else:
        _fit_fold(model, feats, y, train_idx, seed, **fit_kw)
    with torch.no_grad():
        scale = max(float(_logits(model, feats, train_idx).float().std()), 0.1)
        out["oof"] = _logits(model, feats, test_idx).float().cpu().numpy() / scale
    out["scale"] = scale
    out["state"] = ({n: v.detach().cpu().contiguous() for n, v in model.state_dict().items()
                     if not (model.frozen_ts and n.startswith("ts_encoder."))}
                    if keep_states else {})
    return out


def _fold_blob(result: dict) -> bytes:
    """A fold's result as one safetensors blob (weights as tensors, the rest as JSON
    metadata): what a rank sends the others."""
    from safetensors.torch import save

    tensors = {f"state.{k}": v for k, v in result["state"].items()}
    tensors["oof"] = torch.from_numpy(np.ascontiguousarray(result["oof"], dtype=np.float64))
    meta = {"scale": repr(float(result["scale"]))}
    if "fit_info" in result:
        meta["fit_info"] = json.dumps(result["fit_info"])
    return save(tensors, metadata=meta)


def _fold_from_blob(blob: bytes) -> dict:
    """The inverse of :func:`_fold_blob`."""
    from safetensors.torch import load

    tensors = load(blob)
    # the metadata is in the header: the 8-byte length, then JSON
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    meta = header.get("__metadata__", {})
    out = {"oof": tensors["oof"].numpy(), "scale": float(meta["scale"]),
           "state": {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}}
    if "fit_info" in meta:
        out["fit_info"] = json.loads(meta["fit_info"])
    return out


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
    progress : callable(stage, done, total, info) or None, default=None
        ``("prepare", i, n, {})`` per subject.

    Returns
    -------
    dict
        :func:`binary_metrics` of the model's calibrated probabilities.
    """
    ens = load_model(model_dir)
    atlas_obj = load_atlas(ens.atlas)
    cohort = read_cohort(cohort_dir)
    probs = []
    for signals in prepare_cohort(cohort, atlas_obj, progress, cleaning=card_cleaning(ens.card)):
        inputs = ens.inputs(signals)  # as screening gives them
        assert inputs.fc is not None  # prepare() computes the connectivity by default
        amp = None if inputs.amplitude is None else inputs.amplitude[None]
        probs.append(ens.predict_proba(inputs.window[None], inputs.fc[None],
                                       amp)["probability"])
    y = cohort.participants["responder"].to_numpy()
    return binary_metrics(y, np.concatenate(probs))
