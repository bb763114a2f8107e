"""Diagnostic: does a foundation encoder's output carry the time series it is given?

Run: ``python bench/foundation_probe.py [--foundation DIR] [--subjects 20] [--seed 0]
[--labelled 200] [--repeats 10]``

FMM-TC's time-series branch is the frozen encoder's representation, so it can only use what the
encoder keeps of the signal. This script measures that on a simulated pain-agnostic corpus
(seeded; HCPEx regions; the encoder's own window length), against simple references measured
in the same run:

1. **Token make-up**: median norm of the region-coordinate part and of the signal part of the
   input token embedding (``linear(xyz)`` vs ``linear(patch)``). A coordinate part many times
   larger means the tokens mostly say *where*, not *what*.
2. **Patch content kept**: a ridge regression from each output token back to its own 20-sample
   patch, fitted on half of the subjects and scored (R^2) on the other half. 1 = the token keeps
   the whole patch; 0 = nothing.
3. **Masked reconstruction** (folders that keep the decoder, i.e. what ``fmmtc pretrain``
   writes; the demo model ships its encoder only): the model's loss at its mask ratio
   vs. predicting every masked patch as the region's median (0 after robust scaling) and vs. a
   ridge predictor from the same region's previous and next patch (fitted on the other half).
   A pretrained model should beat the median clearly and approach the neighbour predictor.
4. **The planted temporal effect**: on a labelled simulated cohort (``--labelled`` subjects,
   its own seed) with the effect in the time series only, the cross-validated AUC of a logistic
   regression on a hand-made feature of the planted regions (lag-1 autocorrelation of the
   cleaned window), on the encoder's mean output token of the same regions (each region's, and
   their average), and on the whole-scan embedding the registry entry gives (what FMM-TC's
   time-series branch reads; it must find the regions itself). Mean +- SD over ``--repeats``
   seeded 5-fold splits: with 40-80 subjects a single split's AUC moved by +-0.2, so the row
   was noise. The effect is there to be found when the first is high; the encoder exposes it
   when the others are too.
5. **Token order**: the CLS of every subject's window in the order the encoder's registry entry
   uses (:func:`fmmtc_core.models.registry.load_encoder`: natural for the project's encoders,
   seeded shuffles for BrainLM's legacy checkpoint) and in random shuffles of the same tokens;
   the distance between the two (the order effect) against the distance between two subjects
   in the entry's own order (cosine and Euclidean, medians over subjects and pairs). An
   encoder whose order effect is comparable to the between-subject distance says more about
   the order than about the subject.

Defaults to the demo model's encoder (``assets/models/demo/foundation``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _ridge_r2(x_tr, y_tr, x_te, y_te, alpha: float = 1.0) -> tuple[float, np.ndarray]:
    from sklearn.linear_model import Ridge

    pred = Ridge(alpha=alpha).fit(x_tr, y_tr).predict(x_te)
    r2 = 1.0 - ((pred - y_te) ** 2).mean(0) / y_te.var(0)
    return float(r2.mean()), pred


def _cv_auc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """5-fold out-of-fold AUC of a standardised, L2-regularised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    prob = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, prob))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--foundation", default=str(ROOT / "assets" / "models" / "demo" /
                                                    "foundation"))
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labelled", type=int, default=200,
                        help="subjects of the labelled cohort of section 4 (default 200)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="seeded 5-fold splits averaged in section 4 (default 10)")
    args = parser.parse_args()

    import torch

    from fmmtc_core.atlas import load_atlas
    from fmmtc_core.models.foundation import BrainLMForPretraining, load_foundation
    from fmmtc_core.simulate import write_cohort
    from fmmtc_core.bids import read_cohort
    from fmmtc_core.pipeline import prepare_cohort
    from fmmtc_core.preprocess import prepare

    torch.manual_seed(args.seed)
    encoder = load_foundation(args.foundation, encoder_only=True)
    full = load_foundation(args.foundation)
    if not isinstance(full, BrainLMForPretraining):
        full = None  # encoder-only checkpoint (as shipped with the demo model): no decoder
    cfg = encoder.config
    atlas = load_atlas("hcpex")
    with tempfile.TemporaryDirectory(prefix="fmmtc-probe-") as tmp:
        corpus = write_cohort(Path(tmp) / "corpus", args.subjects, seed=args.seed,
                              fmt="timeseries", labelled=False, atlas=atlas)
        subjects = prepare_cohort(read_cohort(corpus, require_labels=False), atlas)
    rng = np.random.default_rng(args.seed)
    windows = torch.from_numpy(np.stack([
        prepare(s, cfg.num_timepoints_per_voxel, rng=rng, with_fc=False).window
        for s in subjects]))
    n, r, t = windows.shape
    p, ps = cfg.n_patches, cfg.timepoint_patching_size
    xyz = torch.tensor(np.nan_to_num(atlas.centroids_mm), dtype=torch.float32)
    half = n // 2
    print(f"foundation: {args.foundation}\ncorpus: {n} simulated subjects (seed {args.seed}), "
          f"{r} HCPEx regions, window {t} samples = {p} patches of {ps}\n")

    # 1. token make-up
    emb = encoder.embeddings
    patches = windows.reshape(n, r, p, ps)
    with torch.no_grad():
        coord = emb.xyz_embedding_projection(xyz * cfg.xyz_scale).norm(dim=-1)
        signal = emb.signal_embedding_projection(patches).norm(dim=-1)
    c_med, s_med = float(coord.median()), float(signal.median())
    print("1. input token make-up (median norms)")
    print(f"   coordinate part {c_med:8.2f}\n   signal part     {s_med:8.2f}"
          f"\n   ratio           {c_med / s_med:8.1f}x\n")

    # 2. patch content kept by the output tokens
    with torch.no_grad():
        tokens = torch.cat([encoder(windows[i:i + 4], xyz, mask_ratio=0.0)[0][:, 1:]
                            for i in range(0, n, 4)])
    tok = tokens.reshape(n, r * p, -1).numpy()
    y = patches.reshape(n, r * p, ps).numpy()
    r2, _ = _ridge_r2(tok[:half].reshape(-1, tok.shape[-1]), y[:half].reshape(-1, ps),
                      tok[half:].reshape(-1, tok.shape[-1]), y[half:].reshape(-1, ps))
    print("2. patch content kept by the output tokens (ridge token -> own patch, held-out "
          f"subjects)\n   R^2 {r2:.3f}\n")

    # 3. masked reconstruction vs references
    tgt = patches[half:].numpy()
    if full is None:
        print("3. masked reconstruction: skipped (this folder holds the encoder only; probe the "
              "full output folder of `fmmtc pretrain`, which keeps the decoder)")
    else:
        gen = torch.Generator().manual_seed(args.seed)
        noise = torch.rand(n - half, r * p, generator=gen)
        with torch.no_grad():
            out = full(windows[half:], xyz, noise=noise)
        mask = out.mask.bool().numpy()  # (n - half, r, p)
        model_loss = float(((out.reconstruction.numpy() - tgt) ** 2)[mask].mean())
        median_loss = float((tgt ** 2)[mask].mean())
        # neighbour predictor: previous and next patch of the same region (zeros at the edges)
        pad = np.pad(patches.numpy(), ((0, 0), (0, 0), (1, 1), (0, 0)))
        neigh = np.concatenate([pad[:, :, :-2], pad[:, :, 2:]], axis=-1)  # (n, r, p, 2 ps)
        _, pred = _ridge_r2(neigh[:half].reshape(-1, 2 * ps),
                            patches[:half].numpy().reshape(-1, ps),
                            neigh[half:].reshape(-1, 2 * ps), tgt.reshape(-1, ps))
        neigh_loss = float(((pred.reshape(tgt.shape) - tgt) ** 2)[mask].mean())
        print(f"3. masked reconstruction (mask ratio {cfg.mask_ratio:.2f}; mean squared error on "
              "masked patches of held-out subjects)")
        print(f"   {'this model':<58} {model_loss:.3f}")
        print(f"   {'predict the median (no model)':<58} {median_loss:.3f}")
        print(f"   {'ridge from the neighbouring patches of the same region':<58} {neigh_loss:.3f}")

    # 4. the planted temporal effect: hand-made feature vs what the encoder gives
    planted_effect(args.foundation, encoder, atlas, n_labelled=args.labelled,
                   seed=args.seed + 1, repeats=args.repeats)

    # 5. token order: the entry's convention vs random shuffles, against between-subject
    order_effect(args.foundation, subjects, cfg)


def _repeated_auc(x: np.ndarray, y: np.ndarray, repeats: int) -> tuple[float, float]:
    """Mean and SD of :func:`_cv_auc` over ``repeats`` seeded 5-fold splits."""
    aucs = [_cv_auc(x, y, seed=k) for k in range(repeats)]
    return float(np.mean(aucs)), float(np.std(aucs))


def planted_effect(folder: str, encoder, atlas, *, n_labelled: int, seed: int,
                   repeats: int) -> dict:
    """Section 4: the planted temporal effect through the encoder (see the module docstring)."""
    import torch

    from fmmtc_core.bids import read_cohort
    from fmmtc_core.models.registry import load_encoder
    from fmmtc_core.pipeline import prepare_cohort
    from fmmtc_core.preprocess import prepare
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    cfg = encoder.config
    t = cfg.num_timepoints_per_voxel
    with tempfile.TemporaryDirectory(prefix="fmmtc-probe-") as tmp:
        cohort = write_cohort(Path(tmp) / "cohort", n_labelled, seed=seed,
                              fmt="timeseries", atlas=atlas,
                              config=SimulationConfig(fc_effect=0.0))
        labelled = read_cohort(cohort)
        truth = json.loads((cohort / "simulation.json").read_text())["planted"]
        subs = prepare_cohort(labelled, atlas)
    y = labelled.participants["responder"].to_numpy().astype(bool)
    index = {int(lab): i for i, lab in enumerate(atlas.labels)}
    ts_idx = np.array([index[int(lab)] for lab in truth["ts_labels"]])
    win = torch.from_numpy(np.stack([prepare(s, t, with_fc=False).window
                                     for s in subs]))  # (N, R, T), the centred window
    x = win[:, ts_idx].numpy()  # the planted regions
    ac = ((x[:, :, 1:] * x[:, :, :-1]).sum(-1)
          / np.sqrt((x[:, :, 1:] ** 2).sum(-1) * (x[:, :, :-1] ** 2).sum(-1)))
    xyz = torch.tensor(np.nan_to_num(atlas.centroids_mm), dtype=torch.float32)
    r, p = win.shape[1], cfg.n_patches
    with torch.no_grad():
        toks = torch.cat([encoder(win[i:i + 4], xyz, mask_ratio=0.0)[0][:, 1:]
                          for i in range(0, len(win), 4)])
    toks = toks.reshape(len(win), r, p, -1)[:, ts_idx].mean(2)  # (N, planted, hidden)
    enc = load_encoder(folder, "cpu")
    with torch.no_grad():
        scan = np.stack([np.asarray(enc.embed_scan(s.data, s.tr)) for s in subs])
    rows = [("lag-1 autocorrelation of those regions (hand-made)", ac),
            ("encoder: mean output token of each of those regions", toks.flatten(1).numpy()),
            ("encoder: mean output token, averaged over those regions", toks.mean(1).numpy()),
            ("encoder: whole-scan embedding (what FMM-TC reads)", scan)]
    print(f"\n4. planted temporal effect ({len(y)} labelled subjects, {int(y.sum())} responders, "
          f"effect in the time series of {len(ts_idx)} regions only; AUC of a logistic "
          f"regression, mean +- SD over {repeats} seeded 5-fold splits)")
    out = {}
    for name, feats in rows:
        mean, sd = _repeated_auc(feats, y, repeats)
        out[name] = mean
        print(f"   {name:<58} {mean:.3f} +- {sd:.3f}  ({feats.shape[1]} features)")
    print("   (0.5 = chance; the first three use the true planted regions, so they bound what a "
          "model that must find them can do)")
    return out


def order_effect(folder: str, subjects, cfg, shuffles: int = 3) -> dict:
    """Section 5: order effect vs between-subject distance (see the module docstring)."""
    import torch

    from fmmtc_core.models.registry import load_encoder

    enc = load_encoder(folder, "cpu")
    wins = torch.cat([enc.windows(s.data, s.tr, span="centre") for s in subjects])
    n = wins.shape[1] * (wins.shape[2] // cfg.timepoint_patching_size)
    with torch.no_grad():
        own = torch.cat([enc.embed_windows(wins[i:i + 4]) for i in range(0, len(wins), 4)])
        model = enc.model
        saved_order = model.config.token_order
        model.config.token_order = "shuffle"  # "natural" would sort the shuffled tokens back
        shuffled = []
        for k in range(shuffles):
            noise = torch.rand(len(wins), n, generator=torch.Generator().manual_seed(1000 + k))
            shuffled.append(torch.cat([
                model(wins[i:i + 4], enc.xyz, mask_ratio=0.0, noise=noise[i:i + 4])[0][:, 0]
                for i in range(0, len(wins), 4)]))
        model.config.token_order = saved_order
    cos = torch.nn.functional.cosine_similarity
    order_cos = torch.stack([cos(own, s, dim=1) for s in shuffled]).flatten()
    order_dist = torch.stack([(own - s).norm(dim=1) for s in shuffled]).flatten()
    iu = torch.triu_indices(len(own), len(own), 1)
    pair_cos = cos(own[iu[0]], own[iu[1]], dim=1)
    pair_dist = (own[iu[0]] - own[iu[1]]).norm(dim=1)
    e = enc.entry
    print(f"\n5. token order (entry {e.name!r}: {e.token_order} order"
          + (f", mean of {e.order_samples} seeded shuffles" if e.token_order == "shuffle" else "")
          + f"; {len(own)} subjects, centred window)")
    print(f"   {'entry order vs random shuffle, same subject: cosine':<58} "
          f"{order_cos.median():.4f}  distance {order_dist.median():.3f}")
    print(f"   {'two subjects, entry order: cosine':<58} {pair_cos.median():.4f}  "
          f"distance {pair_dist.median():.3f}")
    ratio = float(order_dist.median() / pair_dist.median())
    print(f"   {'order effect / between-subject distance':<58} {ratio:.2f}x")
    if e.token_order == "shuffle":  # the convention's own spread: another set of seeds
        other = load_encoder(folder, "cpu", order_seed=10_000)
        with torch.no_grad():
            alt = torch.cat([other.embed_windows(wins[i:i + 4]) for i in range(0, len(wins), 4)])
        seed_dist = (own - alt).norm(dim=1)
        print(f"   {'entry seeds vs another seed set, same subject: cosine':<58} "
              f"{cos(own, alt, dim=1).median():.4f}  distance {seed_dist.median():.3f} "
              f"({float(seed_dist.median() / pair_dist.median()):.2f}x between-subject)")
    print("   (the entry's own order is deterministic: the same scan always gives the same "
          "embedding; the row says how far another order would move it)")
    return {"order_cos": float(order_cos.median()), "pair_cos": float(pair_cos.median()),
            "ratio": ratio}


if __name__ == "__main__":
    sys.exit(main())
