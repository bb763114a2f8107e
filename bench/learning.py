"""Does FMM-TC learn from small, hard cohorts? Every model on identical folds, several seeds.

Run: ``python bench/learning.py [--subjects 120] [--seeds 101 102 103 104 105]
[--shifted-seeds 10001 10002] [--heldout-seeds 20001 ...] [--out docs/learning.md]
[--models cpm fmmtc ...] [--no-recall] [--foundation DIR]``

For every seed, simulates a labelled cohort with the ``realistic`` preset (the generator the
effect sizes were set on) and, separately, with the ``shifted`` preset (held out: other sites,
TRs and effect shapes; looked at while developing since 2026-11-26) and the ``heldout`` preset
(a second held-out generator, for reporting only: never tune on it), then runs on the same
cleaned signals and the same 5 stratified folds (seeded by the cohort seed):

- the classic baselines of :mod:`fmmtc_core.baselines` (CPM, NBS-Predict, logistic on all
  edges, logistic on amplitude/ALFF features) and the oracle that knows the planted regions;
- FMM-TC in its ``small`` preset (bundled demo encoder's embedding + sparse read-outs of
  regional amplitude and of connectivity networks, stacked head): both modalities, without
  the foundation model (amplitude + connectivity), time series only, connectivity only; with
  ``--deep`` (or ``--models fmmtc-default``) also the ``default`` preset (BrainNetCNN,
  gradient-trained; slow), with ``--models fmmtc-paper`` the paper's design (ResNet-18 on the
  FC Gram image; slow).
  ``--foundation DIR`` puts another encoder folder in place of the demo's (e.g. one written
  by ``fmmtc pretrain --order-invariant``).

Reported: the out-of-fold AUC of cross-fitted calibrated probabilities, mean +- SD over seeds,
per preset, in a Markdown file with the command and the software versions. Everything is
seeded; rerun to reproduce. About 5 minutes per cohort on 2 CPU cores (without
``--deep``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

FMMTC_VARIANTS = (
    ("FMM-TC small (encoder + amplitude + FC)", {"preset": "small", "modalities": "ts+fc"}),
    ("FMM-TC small, no foundation model (amplitude + FC)",
     {"preset": "small", "modalities": "ts+fc", "no_foundation": True}),
    ("FMM-TC small, TS only (encoder + amplitude)", {"preset": "small", "modalities": "ts"}),
    ("FMM-TC small, FC only", {"preset": "small", "modalities": "fc"}),
)
#: The deep default design (BrainNetCNN + encoder embedding, gradient-trained); slow, so only
#: with --deep. It stayed at chance on `realistic` in the first run (docs/learning.md history).
DEEP_VARIANT = ("FMM-TC default (BrainNetCNN, TS + FC)", {"preset": "default",
                                                          "modalities": "ts+fc"})
#: The paper's design (ResNet-18 on the FC Gram image + the encoder's embedding, MLP-free
#: linear head, gradient-trained); slow, only when named (``--models fmmtc-paper``).
PAPER_VARIANT = ("FMM-TC paper (ResNet-18 on FC, TS + FC)", {"preset": "paper",
                                                             "modalities": "ts+fc"})


def planted_recall(model_dir: Path, subjects, planted: dict, n_top: int = 20) -> float:
    """Share of the planted regions among the top ``n_top`` regions by absolute Integrated
    Gradients attribution (both modalities), averaged over held-out responders: each
    responder is explained by the fold model that did not see them (the ``fold`` column of
    ``oof_predictions.tsv``; repeat 0)."""
    import dataclasses

    from fmmtc_core.explain import explain
    from fmmtc_core.models.ensemble import load_model

    ens = load_model(model_dir)
    oof = pd.read_csv(model_dir / "oof_predictions.tsv", sep="\t")
    truth = set(planted["fc_index"]) | set(planted["ts_index"])
    scales = ens.card["calibration"]["fold_scale"]
    shares = []
    for i, row in oof.iterrows():
        if not row["responder"]:
            continue
        k = int(row["fold"])
        card = {**ens.card, "calibration": {**ens.card["calibration"],
                                            "fold_scale": [scales[k]]}}
        fold = dataclasses.replace(ens, models=[ens.models[k]], card=card)
        inputs = ens.inputs(subjects[i])
        e = explain(fold, inputs.window, inputs.fc, amplitude=inputs.amplitude,
                    rel_tol=0.05, steps=(16,))
        top = np.argsort(-np.abs(e.region_total))[:n_top]
        shares.append(len(truth & set(top.tolist())) / len(truth))
    return float(np.mean(shares))


def run_seed(preset: str, seed: int, n_subjects: int, work: Path, epochs: int,
             deep: bool = False, *, effect_scale: float = 1.0,
             baselines: tuple[str, ...] | None = None,
             variants: tuple = FMMTC_VARIANTS, recall: bool = True,
             foundation: str | None = None) -> list[dict]:
    """Every model on one simulated cohort; one row per model. ``effect_scale`` multiplies
    the preset's connectivity and temporal effect sizes (the grid)."""
    from fmmtc_core.atlas import load_atlas
    from fmmtc_core.baselines import BASELINES, compare, read_planted
    from fmmtc_core.bids import read_cohort
    from fmmtc_core.pipeline import prepare_cohort
    from fmmtc_core.simulate import SimulationConfig, write_cohort
    from fmmtc_core.training import train

    config = SimulationConfig.preset(preset)
    if effect_scale != 1.0:
        config = SimulationConfig.preset(preset, fc_effect=config.fc_effect * effect_scale,
                                         ts_effect=config.ts_effect * effect_scale)
    cohort = write_cohort(work / f"{preset}-{seed}-{n_subjects}-{effect_scale:g}", n_subjects,
                          seed=seed, fmt="timeseries", config=config)
    atlas = load_atlas("hcpex")
    subjects = prepare_cohort(read_cohort(cohort), atlas, None)
    planted = read_planted(cohort, atlas)
    rows = []
    table = (compare(cohort, seed=seed, models=BASELINES if baselines is None else baselines,
                     subjects=subjects) if baselines != () else pd.DataFrame())
    for _, r in table.iterrows():
        rows.append({"preset": preset, "seed": seed, "model": r["model"], "auc": r["auc"],
                     "auc_logit": r["auc_logit"], "mcc": r["mcc"]})
    deep_row = (DEEP_VARIANT,) if deep and DEEP_VARIANT not in variants else ()
    for name, options in tuple(variants) + deep_row:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = ({"foundation": foundation}
                     if foundation and not options.get("no_foundation") else {})
            m = train(cohort, work / "model", seed=seed, epochs=epochs, subjects=subjects,
                      threads=1, **options, **extra)
        oof = pd.read_csv(work / "model" / "oof_predictions.tsv", sep="\t")
        from sklearn.metrics import roc_auc_score

        rows.append({"preset": preset, "seed": seed, "model": name, "auc": m["auc"],
                     "auc_logit": float(roc_auc_score(oof["responder"], oof["logit"])),
                     "mcc": m["mcc"]})
        if "foundation_embedding" in m:  # how many fold models kept the encoder's embedding
            kept = m["foundation_embedding"]
            rows[-1]["embedding_kept"] = f"{kept['kept']}/{kept['fold_models']}"
        if "dynamics_probe" in m:  # how many fold models kept the regional dynamics
            kept = m["dynamics_probe"]
            rows[-1]["dynamics_kept"] = f"{kept['kept']}/{kept['fold_models']}"
        if recall and name == FMMTC_VARIANTS[0][0] and planted is not None:
            rows[-1]["planted_in_top20"] = planted_recall(work / "model", subjects, planted)
    for r in rows:
        r |= {"subjects": n_subjects, "effect_scale": effect_scale}
        print(f"{preset} seed {seed} n {n_subjects} x{effect_scale:g}: {r['model']:<40} "
              f"AUC {r['auc']:.3f}", flush=True)
    return rows


def _paired(d: pd.Series) -> tuple[float, float]:
    """Mean and standard error of paired differences over cohorts."""
    return float(d.mean()), float(d.std(ddof=1)) / np.sqrt(len(d))


def write_report(rows: list[dict], out: Path, args, elapsed: float) -> None:
    df = pd.DataFrame(rows).drop(columns=["subjects", "effect_scale"], errors="ignore")
    seeds = {p: " ".join(str(x) for x in dict.fromkeys(df[df.preset == p]["seed"]))
             for p in ("realistic", "shifted", "heldout")}
    command = (f"python bench/learning.py --subjects {args.subjects} --seeds "
               f"{seeds['realistic']} --shifted-seeds {seeds['shifted']}"
               + (f" --heldout-seeds {seeds['heldout']}" if seeds["heldout"] else "")
               + (f" --models {' '.join(args.models)}" if args.models else "")
               + (" --no-recall" if args.no_recall else "")
               + (f" --foundation {args.foundation}" if args.foundation else "")
               + (f" --amplitude-subsamples {args.amplitude_subsamples}"
                  if args.amplitude_subsamples else "")
               + (f" --dynamics {args.dynamics}" if args.dynamics is not None else ""))
    how = (f"Generated by `{command}` in {elapsed / 60:.0f} min" if not args.merge else
           f"Rows of `{command}`, run as {len(args.merge)} processes in parallel (each with "
           "a part of the seeds and `--rows FILE`) and merged by `python bench/learning.py "
           "--merge FILE ...`")
    lines = [
        "# Learning from small, hard cohorts: every model on identical folds",
        "",
        f"{how} (Python {platform.python_version()}, {platform.machine()}).",
        "",
        "Out-of-fold AUC of cross-fitted calibrated probabilities (5 stratified folds seeded "
        "by the cohort seed; the same folds and the same cleaned signals for every model), "
        "mean +- SD over cohorts. `realistic` is the generator the simulation's effect sizes "
        "were set on; `shifted` is held out (other sites, TRs and effect shapes) and was never "
        "used to tune anything.",
        "",
    ]
    presets = list(dict.fromkeys(df["preset"]))
    header = "| model | " + " | ".join(f"{p} (n = {df[df.preset == p].seed.nunique()})"
                                        for p in presets) + " |"
    lines += [header, "|---|" + "---|" * len(presets)]
    for model in dict.fromkeys(df["model"]):
        cells = []
        for p in presets:
            v = df[(df.preset == p) & (df.model == model)]["auc"]
            cells.append("-" if not len(v) else f"{v.mean():.3f}" if len(v) == 1
                         else f"{v.mean():.3f} +- {v.std(ddof=1):.3f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "Verdict (mean AUC over cohorts; classic baselines: cpm, nbs, edges, "
              "amplitude; the oracle is not a model):", ""]
    classic = ("cpm", "nbs", "edges", "amplitude")
    wide = {p: df[df.preset == p].pivot_table(index="seed", columns="model", values="auc")
            for p in presets}  # cohort x model: the pairs below are over the same cohorts
    for p in presets:
        mean = df[df.preset == p].groupby("model")["auc"].mean()
        present = [m for m in classic if m in mean]
        if not present:  # --models without a classic baseline: nothing to compare against
            lines.append(f"- `{p}`: no classic baseline was run (`--models`).")
            continue
        best = max(present, key=lambda m: mean[m])
        for name, _ in FMMTC_VARIANTS + tuple(SLOW_VARIANTS.values()):
            if name in mean:
                diff = mean[name] - mean[best]
                text = (f"- `{p}`: {name} {mean[name]:.3f}, {abs(diff):.3f} "
                        f"{'above' if diff >= 0 else 'below'} the best classic baseline "
                        f"({best}, {mean[best]:.3f})")
                pair = wide[p][[name, best]].dropna()
                if len(pair) > 1:  # paired over the same cohorts, and cohort by cohort
                    d = pair[name] - pair[best]
                    m, se = _paired(d)
                    each = wide[p].loc[pair.index, present].max(axis=1)
                    at_least = int((pair[name] >= each - 1e-12).sum())
                    text += (f"; paired over the {len(d)} cohorts {m:+.3f} (SE {se:.3f}); "
                             f"at or above the best classic baseline of its own cohort on "
                             f"{at_least} of {len(d)}")
                lines.append(text + ".")
    full, without = FMMTC_VARIANTS[0][0], FMMTC_VARIANTS[1][0]
    for p in presets:  # does the foundation model help? (same cohorts, same folds)
        if full in wide[p] and without in wide[p]:
            d = (wide[p][full] - wide[p][without]).dropna()
            if len(d) > 1:
                m, se = _paired(d)
                verdict = ("it helps" if m > 2 * se else "it hurts" if m < -2 * se
                           else "no measurable difference")
                lines.append(
                    f"- `{p}`: with the foundation model minus without it, same cohorts: "
                    f"{m:+.3f} (SE {se:.3f}; per cohort "
                    f"{', '.join(f'{x:+.3f}' for x in d)}): **{verdict}** (two standard errors).")
    for column, what in (("embedding_kept", "the foundation encoder's embedding"),
                         ("dynamics_kept", "the regional dynamics")):
        if column not in df:
            continue
        for name, _ in FMMTC_VARIANTS:
            kept = df[df.model == name][column].dropna()
            if len(kept):
                a = sum(int(k.split("/")[0]) for k in kept)
                b = sum(int(k.split("/")[1]) for k in kept)
                lines.append(f"- {name}: {a} of {b} fold models kept {what} (kept only where it "
                             "improved the fold's inner-CV log loss).")
    if "planted_in_top20" in df:
        for p in presets:
            v = df[(df.preset == p)]["planted_in_top20"].dropna()
            if len(v):
                lines.append(
                    f"- `{p}`: planted regions among the top 20 Integrated-Gradients regions of "
                    f"held-out responders ({FMMTC_VARIANTS[0][0]}, each explained by the fold "
                    f"model that did not see them): {v.mean():.2f} of the planted set "
                    f"(per cohort {', '.join(f'{x:.2f}' for x in v)}; chance 20 / 426 = 0.05).")
    lines += ["", "Per cohort:", "", "| " + " | ".join(df.columns) + " |",
              "|" + "---|" * len(df.columns)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(("-" if np.isnan(v) else f"{v:.3f}")
                                       if isinstance(v, float) else
                                       ("-" if v is None else str(v)) for v in r) + " |")
    lines.append("")
    out.write_text("\n".join(lines))


GRID_BASELINES = ("cpm", "amplitude", "oracle")
GRID_VARIANTS = FMMTC_VARIANTS[:2]


def write_grid_report(rows: list[dict], out: Path, args, elapsed: float) -> None:
    """The grid's Markdown: one AUC table per model (effect scale x cohort size)."""
    df = pd.DataFrame(rows)
    scales = sorted(df["effect_scale"].unique())
    sizes = sorted(df["subjects"].unique())
    command = ("python bench/learning.py --grid --grid-scales "
               + " ".join(f"{s:g}" for s in scales) + " --grid-subjects "
               + " ".join(str(n) for n in sizes) + " --grid-seed "
               + " ".join(str(s) for s in dict.fromkeys(df["seed"]))
               + (f" --foundation {args.foundation}" if args.foundation else ""))
    how = (f"Generated by `{command}` in {elapsed / 60:.0f} min" if not args.merge else
           f"Rows of `{command}`, run as {len(args.merge)} processes in parallel (each with "
           "a part of the cohort sizes and `--rows FILE`) and merged by `python "
           "bench/learning.py --grid --merge FILE ...`")
    lines = [
        "# Where each model starts to work: effect size x cohort size",
        "",
        f"{how} (Python {platform.python_version()}, {platform.machine()}).",
        "",
        "`realistic` preset with its connectivity and temporal effect sizes multiplied by the "
        "effect scale (1 = the preset), one cohort per cell (seed shown below; not a tuning "
        "seed), 5 stratified folds. Out-of-fold AUC of cross-fitted calibrated probabilities; "
        "one cohort per cell, so read trends, not single cells (the SD over 5 cohorts at "
        "n = 120, scale 1 is 0.04-0.09, docs/learning.md).",
        "",
    ]
    for model in dict.fromkeys(df["model"]):
        lines += [f"**{model}**", "", "| effect scale | " + " | ".join(
            f"n = {n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for sc in scales:
            cells = []
            for n in sizes:
                v = df[(df.model == model) & (df.effect_scale == sc) & (df.subjects == n)]["auc"]
                cells.append(f"{v.mean():.3f}" if len(v) else "-")
            lines.append(f"| x{sc:g} | " + " | ".join(cells) + " |")
        lines.append("")
    models = [m for m in dict.fromkeys(df["model"]) if m != "oracle"]
    fmmtc = next((m for m in models if m.startswith("FMM-TC")), None)
    classic = [m for m in models if not m.startswith("FMM-TC")]
    lines += ["**Best model per cell** (the oracle left out: it is not a model)"
              + (f"; in brackets {fmmtc} minus the best classic baseline" if fmmtc else "")
              + ":", "", "| effect scale | " + " | ".join(f"n = {n}" for n in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for sc in scales:
        cells = []
        for n in sizes:
            cell = df[(df.effect_scale == sc) & (df.subjects == n) & (df.model != "oracle")]
            best = cell.loc[cell["auc"].idxmax()]
            text = f"{best['model']}"
            if fmmtc is not None and classic:
                f = cell[cell.model == fmmtc]["auc"]
                c = cell[cell.model.isin(classic)]["auc"]
                if len(f) and len(c):
                    text += f" ({float(f.iloc[0]) - float(c.max()):+.3f})"
            cells.append(text)
        lines.append(f"| x{sc:g} | " + " | ".join(cells) + " |")
    lines += ["", "Seeds: " + ", ".join(sorted({str(s) for s in df["seed"]})) + ".", ""]
    out.write_text("\n".join(lines))


#: ``--models`` names of the FMM-TC variants, in the order of :data:`FMMTC_VARIANTS`.
VARIANT_NAMES = ("fmmtc", "fmmtc-nf", "fmmtc-ts", "fmmtc-fc")
#: Gradient-trained designs, run only when named in ``--models`` (slow).
SLOW_VARIANTS = {"fmmtc-default": DEEP_VARIANT, "fmmtc-paper": PAPER_VARIANT}


def _chosen(models: list[str] | None) -> tuple[tuple[str, ...] | None, tuple]:
    """``--models`` as (baselines or None for all, FMM-TC variants)."""
    from fmmtc_core.baselines import BASELINES

    if not models:
        return None, FMMTC_VARIANTS
    names = (*BASELINES, *VARIANT_NAMES, *SLOW_VARIANTS)
    unknown = sorted(set(models) - set(names))
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(names)}")
    baselines = tuple(m for m in BASELINES if m in models)
    variants = tuple(v for v, name in zip(FMMTC_VARIANTS, VARIANT_NAMES) if name in models)
    variants += tuple(v for name, v in SLOW_VARIANTS.items() if name in models)
    return baselines, variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="*", default=[101, 102, 103, 104, 105])
    parser.add_argument("--shifted-seeds", type=int, nargs="*", default=[10001, 10002])
    parser.add_argument("--heldout-seeds", type=int, nargs="*", default=[],
                        help="cohorts of the second held-out generator (preset heldout, seeds "
                             ">= 20000; report only, never tune on it)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", default=None,
                        help="the report (default docs/learning.md, docs/learning_grid.md "
                             "with --grid)")
    parser.add_argument("--rows", default=None, help="also write the rows as JSON here")
    parser.add_argument("--merge", nargs="+", default=None, metavar="ROWS_JSON",
                        help="write the report from the --rows files of several runs (e.g. "
                             "seeds run in parallel) instead of running anything")
    parser.add_argument("--deep", action="store_true",
                        help="also run the deep default design (slow: ~10 min per cohort)")
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="only these baselines (cpm nbs edges amplitude oracle) and FMM-TC "
                             "variants (fmmtc, fmmtc-nf, fmmtc-ts, fmmtc-fc: the four rows in "
                             "order; fmmtc-default, fmmtc-paper: the gradient-trained designs, "
                             "slow, only when named); default: all but the slow ones")
    parser.add_argument("--foundation", default=None, metavar="DIR",
                        help="the FMM-TC variants' encoder folder (default: the demo model's)")
    parser.add_argument("--amplitude-subsamples", type=int, default=0, metavar="B",
                        help="the small preset's amplitude regions by stability selection over "
                             "B subsets of 80 %% of each class (AmplitudeReadout."
                             "init_from_contrast; default 0: one selection, the preset's own)")
    parser.add_argument("--dynamics", choices=("on", "off"), default=None,
                        help="the small preset with (on) or without (off) the regional "
                             "dynamics probe (FMMTCConfig.dynamics; default: the preset's own)")
    parser.add_argument("--no-recall", action="store_true",
                        help="skip the planted-region recall of the explanations (the slow "
                             "part)")
    parser.add_argument("--grid", action="store_true",
                        help="effect size x cohort size grid (realistic preset; models: "
                             f"{', '.join(GRID_BASELINES)} and the first two FMM-TC variants)")
    parser.add_argument("--grid-scales", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    parser.add_argument("--grid-subjects", type=int, nargs="+", default=[60, 120, 240])
    parser.add_argument("--grid-seed", type=int, default=201)
    args = parser.parse_args()
    out = Path(args.out or ROOT / "docs" / ("learning_grid.md" if args.grid else "learning.md"))
    if args.amplitude_subsamples < 0:
        raise SystemExit("--amplitude-subsamples must be >= 0")
    if args.amplitude_subsamples:  # train() reads the preset in this process
        from fmmtc_core.models.fmmtc import PRESETS

        PRESETS["small"]["amplitude_kwargs"]["init"].update(
            subsamples=args.amplitude_subsamples, fraction=0.8)
    if args.dynamics is not None:  # train() reads the preset in this process
        from fmmtc_core.models.fmmtc import PRESETS

        PRESETS["small"]["dynamics"] = args.dynamics == "on"
    t0 = time.perf_counter()
    rows: list[dict] = []
    if args.merge:
        for f in args.merge:
            rows += json.loads(Path(f).read_text())
        (write_grid_report if args.grid else write_report)(
            rows, out, args, float(os.environ.get("FMMTC_BENCH_ELAPSED_S", "nan")))
        print(f"wrote {out}", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory(prefix="fmmtc-learning-") as tmp:
        if args.grid:
            for n in args.grid_subjects:
                for sc in args.grid_scales:
                    rows += run_seed("realistic", args.grid_seed, n, Path(tmp), args.epochs,
                                     effect_scale=sc, baselines=GRID_BASELINES,
                                     variants=GRID_VARIANTS, recall=False,
                                     foundation=args.foundation)
                    if args.rows:
                        Path(args.rows).write_text(json.dumps(rows, indent=1))
            write_grid_report(rows, out, args, time.perf_counter() - t0)
            print(f"wrote {out}", file=sys.stderr)
            return
        baselines, variants = _chosen(args.models)
        for preset, seeds in (("realistic", args.seeds), ("shifted", args.shifted_seeds),
                              ("heldout", args.heldout_seeds)):
            for seed in seeds:
                rows += run_seed(preset, seed, args.subjects, Path(tmp), args.epochs,
                                 deep=args.deep, baselines=baselines, variants=variants,
                                 recall=not args.no_recall, foundation=args.foundation)
                if args.rows:
                    Path(args.rows).write_text(json.dumps(rows, indent=1))
    write_report(rows, out, args, time.perf_counter() - t0)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
