"""The ``fmmtc`` command.

Contract shared by every sub-command: bad input exits with status 2 and one line beginning
``error: `` on stderr that names the problem and what was expected; a Python traceback is shown
only with ``--debug``. Progress bars go to stderr, and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from fmmtc_core import __version__
from fmmtc_core._errors import FMMTCError, FMMTCWarning

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line ``error:`` contract for usage mistakes."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _progress(desc: str):
    """A ``progress(done, total)`` callback drawing a tqdm bar on a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    state: dict = {}

    def cb(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=desc, unit="vol", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return cb


def _load(args):
    from fmmtc_core.io import load_scan

    return load_scan(
        args.scan,
        sidecar=args.sidecar,
        confounds=args.confounds,
        atlas=getattr(args, "atlas", None),
        min_volumes=args.min_volumes,
    )


def _write_tsv(path: Path, names, data: np.ndarray) -> None:
    """XCP-D style region table: header of names, one row per volume, ``n/a`` for NaN."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\t".join(names) + "\n")
        for row in data:
            f.write("\t".join("n/a" if not np.isfinite(v) else f"{v:.9g}" for v in row) + "\n")
    tmp.replace(path)


def cmd_parcellate(args) -> int:
    from fmmtc_core.preprocess import clean, parcellate

    out = Path(args.out)
    if out.suffix.lower() != ".tsv":
        raise FMMTCError(f"--out must name a .tsv file, got {out.name!r}.")
    scan = _load(args)
    signals = parcellate(scan, args.atlas, progress=_progress("parcellate"))
    if args.clean:
        signals = clean(signals, scrub=args.scrub)
    _write_tsv(out, signals.atlas.names, signals.data)
    side = {
        "RepetitionTime": signals.tr,
        "Atlas": signals.atlas.name,
        "Sources": [str(Path(args.scan).resolve())],
        "Cleaned": signals.cleaned,
        "Cleaning": signals.cleaning or None,
        "NumberOfVolumes": signals.n_volumes,
        "RegionLabels": signals.atlas.labels.tolist(),
        "GeneratedBy": [{"Name": "fmmtc parcellate", "Version": __version__}],
    }
    if signals.sample_mask is not None:
        side["SampleMask"] = signals.sample_mask.tolist()
    out.with_suffix(".json").write_text(json.dumps(side, indent=2))
    print(f"wrote {out} ({signals.n_volumes} volumes x {signals.n_regions} regions, "
          f"atlas {signals.atlas.name})")
    return 0


def cmd_qc(args) -> int:
    from fmmtc_core.qc import assess_scan

    _, _, report = assess_scan(
        args.scan, sidecar=args.sidecar, confounds=args.confounds, atlas=args.atlas,
        min_volumes=args.min_volumes, progress=_progress("qc"),
    )
    if args.json:
        print(json.dumps(report.to_dict(series=args.series), indent=2))
    else:
        print(f"QC verdict: {report.verdict.upper()}")
        for reason in report.reasons:
            print(f"  - {reason}")
        for w in report.warnings:
            print(f"  ! {w}")
        d = report.to_dict()
        for key in ("n_volumes", "tr_s", "tsnr_median", "fd_mean_mm", "frac_high_motion",
                    "n_uncovered_regions"):
            print(f"  {key}: {d[key]}")
    return 0


def cmd_simulate(args) -> int:
    from fmmtc_core.simulate import write_cohort

    root = write_cohort(
        args.out_dir,
        args.subjects,
        seed=args.seed,
        fmt=args.format,
        labelled=not args.unlabelled,
        atlas=args.atlas,
        dtype=args.dtype,
        progress=_progress("simulate"),
    )
    kind = "unlabelled corpus" if args.unlabelled else "labelled cohort"
    print(f"wrote a simulated {kind} of {args.subjects} subjects to {root}")
    return 0


def _stage_progress():
    """A ``progress(stage, done, total, info)`` callback: tqdm bars on a terminal, else lines."""
    bars: dict = {}

    def cb(stage: str, done: int, total: int, info: dict) -> None:
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in info.items())
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = bars.get(stage)
            if bar is None:
                bar = bars[stage] = tqdm(total=total, desc=stage, leave=False)
            bar.update(done - bar.n)
            if extra:
                bar.set_postfix_str(extra)
            if done >= total:
                bar.close()
        elif done == total or stage == "explain":
            sys.stderr.write(f"{stage} {done}/{total} {extra}\n")

    return cb


def cmd_pretrain(args) -> int:
    from fmmtc_core.training import pretrain

    out = pretrain(args.corpus_dir, args.out, config=args.config, atlas=args.atlas,
                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   windows_per_subject=args.windows_per_subject,
                   regions_per_step=args.regions_per_step, schedule=args.schedule,
                   xyz_scale=args.xyz_scale, progress=_stage_progress())
    log = json.loads((out / "pretrain_log.json").read_text())
    print(f"wrote the pretrained encoder to {out} (final loss "
          f"{log['loss_per_epoch'][-1]:.4f} after {len(log['loss_per_epoch'])} epochs)")
    return 0


def _print_metrics(metrics: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in metrics.items()))


def cmd_train(args) -> int:
    from fmmtc_core.training import train

    metrics = train(args.cohort_dir, args.out, foundation=args.foundation, folds=args.folds,
                    seed=args.seed, modalities=args.modalities, no_foundation=args.no_foundation,
                    preset=args.preset, atlas=args.atlas, epochs=args.epochs,
                    progress=_stage_progress())
    if not args.json:
        print(f"wrote the model to {args.out}; out-of-fold metrics:")
    _print_metrics(metrics, args.json)
    return 0


def cmd_evaluate(args) -> int:
    from fmmtc_core.training import evaluate

    _print_metrics(evaluate(args.model_dir, args.cohort_dir, progress=_stage_progress()),
                   args.json)
    return 0


def cmd_build_demo(args) -> int:
    from fmmtc_core.training import build_demo_model

    t0 = time.perf_counter()
    metrics = build_demo_model(args.out, seed=args.seed, n_subjects=args.subjects,
                               n_corpus=args.corpus, pretrain_epochs=args.pretrain_epochs,
                               progress=_stage_progress())
    print(f"wrote the demo model to {args.out} in {time.perf_counter() - t0:.0f} s; "
          "out-of-fold metrics:")
    _print_metrics(metrics, False)
    return 0


def _explain_kwargs(args) -> dict:
    return {"baseline_fc": args.baseline_fc, "rel_tol": args.tolerance}


def cmd_explain(args) -> int:
    from fmmtc_core.screening import analyse
    from fmmtc_core.training import load_model

    model = load_model(args.model)
    result = analyse(args.scan, model, sidecar=args.sidecar, confounds=args.confounds,
                     explain_kwargs=_explain_kwargs(args), progress=_stage_progress())
    out = result.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    e = result.explanation
    print(f"responder probability {result.probability:.2f} "
          f"[{result.band[0]:.2f}, {result.band[1]:.2f}]: {result.decision}")
    print(f"modality share: time series {e.modality_share['ts']:.1%}, "
          f"connectivity {e.modality_share['fc']:.1%}")
    print(f"Integrated Gradients: {e.steps} steps, completeness gap {e.ig_gap:.2%}, "
          f"baselines {e.baseline}")
    print("top regions (logit units; + towards responder):")
    for r in e.ranked_regions(args.top):
        print(f"  {r['score']:+.4f}  {r['label']:>5}  {r['name']}  ({r['network']})")
    return 0


def _participant_from_name(scan) -> str:
    import re

    m = re.search(r"sub-([A-Za-z0-9]+)", Path(scan).name)
    if not m:
        raise FMMTCError(
            "Name the participant with --participant (a study pseudonym such as PAIN-0042); "
            f"{Path(scan).name} has no BIDS sub-<label>.")
    return m.group(1)


def cmd_screen(args) -> int:
    from fmmtc_core.screening import screen
    from fmmtc_core.store import open_database
    from fmmtc_core.training import load_model

    participant = args.participant or _participant_from_name(args.scan)
    engine = open_database(args.db)
    model = load_model(args.model)
    thresholds = {"responder": args.responder_threshold,
                  "non_responder": args.non_responder_threshold}
    result = screen(args.scan, participant, model, engine, sidecar=args.sidecar,
                    confounds=args.confounds, site=args.site, drug=args.drug, arm=args.arm,
                    thresholds=thresholds, explain_kwargs=_explain_kwargs(args),
                    operator=args.operator, force=args.force, progress=_stage_progress())
    out = result.to_dict()
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    lo, hi = result.band
    note = " (already stored; --force screens again)" if result.reused else ""
    print(f"screening {result.screening_id}{note}: participant {result.participant}")
    print(f"  responder probability {result.probability:.2f} [{lo:.2f}, {hi:.2f}]: "
          f"{result.decision}")
    share = out["modality_share"]
    print(f"  modality share: time series {share['ts']:.1%}, connectivity {share['fc']:.1%}; "
          f"IG gap {out['ig_gap']:.2%} ({out['steps']} steps)")
    for r in out["regions"][:5]:
        print(f"  {r['score']:+.4f}  {r['label']:>5}  {r['name']}")
    return 0


def cmd_screen_batch(args) -> int:
    from fmmtc_core.screening import screen_batch

    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

    def progress(done, total, pid):
        nonlocal bar
        if sys.stderr.isatty():
            if bar is None:
                bar = tqdm(total=total, desc="screen", unit="scan")
            bar.update(done - bar.n)
            if pid:
                bar.set_postfix_str(pid)
        elif pid:
            sys.stderr.write(f"screen {done}/{total} {pid}\n")

    report = screen_batch(args.cohort_dir, model_dir=args.model, url=args.db,
                          workers=args.workers, operator=args.operator,
                          import_outcomes=args.import_outcomes,
                          explain_kwargs=_explain_kwargs(args), progress=progress)
    if bar is not None:
        bar.close()
    print(f"screened {len(report.screened)}, already stored {len(report.skipped)}, "
          f"failed {len(report.failed)}"
          + (f", outcomes imported {report.outcomes}" if args.import_outcomes else ""))
    for pid, reason in report.failed.items():
        sys.stderr.write(f"warning: {pid}: {reason}\n")
    if report.failed:
        raise FMMTCError(f"{len(report.failed)} of {len(report.failed) + len(report.screened)} "
                         "scans could not be screened (reasons above); the others are stored.")
    return 0


def cmd_outcome(args) -> int:
    from fmmtc_core.screening import default_operator
    from fmmtc_core.store import open_database, session_scope
    from fmmtc_core.store.repository import record_outcome

    engine = open_database(args.db)
    with session_scope(engine, write=True) as s:
        record_outcome(s, args.participant, args.outcome,
                       actor=args.operator or default_operator(), note=args.note)
    print(f"recorded: {args.participant} {args.outcome}")
    return 0


def cmd_db(args) -> int:
    from fmmtc_core.store import (
        current_revision,
        downgrade,
        head_revision,
        integrity_check,
        make_engine,
        row_counts,
        upgrade,
    )
    from fmmtc_core.store.db import _redact
    from fmmtc_core.store.repository import export_csv

    engine = make_engine(args.db)
    if args.action == "upgrade":
        print(f"database at revision {upgrade(engine)} (head {head_revision()}): "
              f"{_redact(str(engine.url))}")
    elif args.action == "downgrade":
        print(f"database at revision {downgrade(engine, '-1')}")
    elif args.action == "status":
        rev = current_revision(engine)
        print(f"{_redact(str(engine.url))}: revision {rev} (head {head_revision()})")
        if rev:
            for table, n in row_counts(engine).items():
                print(f"  {table}: {n}")
    elif args.action == "check":
        upgrade(engine)
        problems = integrity_check(engine)
        if problems:
            raise FMMTCError("database check failed: " + "; ".join(problems[:5]))
        print("database check: ok")
    elif args.action == "export":
        if not args.out:
            raise FMMTCError("db export needs --out FILE.csv.")
        out = Path(args.out)
        if out.suffix.lower() != ".csv":
            raise FMMTCError(f"--out must name a .csv file, got {out.name!r}.")
        upgrade(engine)
        out.parent.mkdir(parents=True, exist_ok=True)
        n = export_csv(engine, out)
        print(f"wrote {out} ({n} screenings)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fmmtc",
        description="FMM-TC Screen: rs-fMRI drug-response screening (research software).",
    )
    parser.add_argument("--version", action="version", version=f"fmmtc {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def scan_args(p, atlas=True):
        p.add_argument("scan", metavar="SCAN", help="4D NIfTI (.nii/.nii.gz) or region table")
        p.add_argument("--sidecar", metavar="JSON", help="BIDS JSON sidecar (default: beside SCAN)")
        p.add_argument("--confounds", metavar="TSV", help="fMRIPrep desc-confounds_timeseries.tsv")
        p.add_argument("--min-volumes", type=int, default=50, help="fewest volumes (default 50)")
        if atlas:
            p.add_argument("--atlas", default=None,
                           help="hcpex (default), aal3, or a NIfTI label image")

    p = sub.add_parser("parcellate", help="region mean time series of a scan as TSV")
    scan_args(p)
    p.add_argument("--clean", action="store_true",
                   help="detrend, band-pass 0.01-0.1 Hz, regress fMRIPrep 'simple' confounds")
    p.add_argument("--scrub", action="store_true", help="with --clean: drop high-motion volumes")
    p.add_argument("--out", required=True, metavar="OUT.tsv")
    p.set_defaults(func=cmd_parcellate)

    p = sub.add_parser("qc", help="quality-control report of a scan")
    scan_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--series", action="store_true", help="with --json: add FD, DVARS, carpet")
    p.set_defaults(func=cmd_qc)

    p = sub.add_parser("explain", help="predict and explain one scan (Integrated Gradients)")
    scan_args(p, atlas=False)
    p.add_argument("--model", metavar="DIR",
                   help="model folder (default: $FMMTC_MODEL_DIR or the bundled demo model)")
    p.add_argument("--baseline-fc", choices=("cohort_mean", "zero"), default="cohort_mean",
                   help="connectivity baseline (default: the training cohort's mean)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="completeness gap to reach, relative to |F(x) - F(baseline)| (0.01)")
    p.add_argument("--top", type=int, default=15, help="regions listed without --json")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_explain)

    def db_arg(p):
        p.add_argument("--db", metavar="URL",
                       help="database URL (default: $FMMTC_DATABASE_URL or the SQLite file in "
                            "the data folder, see README)")
        p.add_argument("--operator", help="who runs this (audit log; default: your user name)")

    def explain_args(p):
        p.add_argument("--baseline-fc", choices=("cohort_mean", "zero"), default="cohort_mean",
                       help="connectivity baseline (default: the training cohort's mean)")
        p.add_argument("--tolerance", type=float, default=0.01,
                       help="completeness gap to reach, relative to |F(x) - F(baseline)|")

    p = sub.add_parser("screen", help="screen one scan and store it in the cohort database")
    scan_args(p, atlas=False)
    p.add_argument("--participant", metavar="ID",
                   help="study pseudonym (default: the BIDS sub-<label> of the file name)")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the demo model)")
    db_arg(p)
    explain_args(p)
    p.add_argument("--site")
    p.add_argument("--drug")
    p.add_argument("--arm")
    p.add_argument("--responder-threshold", type=float, default=0.6)
    p.add_argument("--non-responder-threshold", type=float, default=0.4)
    p.add_argument("--force", action="store_true", help="screen again even if already stored")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("screen-batch", help="screen every scan of a BIDS-style cohort folder")
    p.add_argument("cohort_dir", metavar="COHORT_DIR")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the demo model)")
    db_arg(p)
    explain_args(p)
    p.add_argument("--import-outcomes", action="store_true",
                   help="record participants.tsv's responder column as observed outcomes")
    p.set_defaults(func=cmd_screen_batch)

    p = sub.add_parser("outcome", help="record a participant's observed outcome")
    p.add_argument("participant", metavar="PARTICIPANT")
    p.add_argument("outcome", choices=("responder", "non-responder"))
    p.add_argument("--note")
    db_arg(p)
    p.set_defaults(func=cmd_outcome)

    p = sub.add_parser("db", help="database: upgrade, downgrade, status, check, export")
    p.add_argument("action", choices=("upgrade", "downgrade", "status", "check", "export"))
    p.add_argument("--out", metavar="FILE.csv", help="export: the CSV file to write")
    p.add_argument("--db", metavar="URL", help="database URL (default: see README)")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("simulate", help="write a simulated BIDS-style cohort")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--subjects", type=int, required=True, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("nifti", "timeseries"), default="nifti")
    p.add_argument("--unlabelled", action="store_true",
                   help="a pain-agnostic corpus without responder labels (for pretraining)")
    p.add_argument("--atlas", default="hcpex")
    p.add_argument("--dtype", choices=("float32", "int16"), default="float32",
                   help="NIfTI storage type (int16 = scaled integers)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("pretrain", help="masked-reconstruction pretraining of the encoder")
    p.add_argument("corpus_dir", metavar="CORPUS_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--config", choices=("tiny", "small", "base"), default="small")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--windows-per-subject", type=int, default=1, metavar="N",
                   help="random windows per subject and epoch (default 1)")
    p.add_argument("--regions-per-step", type=int, default=None, metavar="K",
                   help="train each batch on K random regions (default: all)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning-rate schedule (cosine: 5%% warm-up, then cosine decay)")
    p.add_argument("--xyz-scale", type=float, default=None, metavar="S",
                   help="multiply region centroids (mm) by S before embedding them; 0.01 is "
                        "recommended for new encoders (default: the preset's 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atlas", default="hcpex")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", help="cross-validated training of an FMM-TC model")
    p.add_argument("cohort_dir", metavar="COHORT_DIR")
    p.add_argument("--out", required=True, metavar="MODEL_DIR")
    p.add_argument("--foundation", metavar="DIR", help="pretrained encoder folder")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modalities", choices=("ts+fc", "ts", "fc"), default="ts+fc")
    p.add_argument("--no-foundation", action="store_true",
                   help="train the time-series encoder from scratch (ablation)")
    p.add_argument("--preset", choices=("default", "paper"), default="default")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--atlas", default="hcpex")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("build-demo", help="rebuild the bundled demo model (simulated data)")
    p.add_argument("--out", default="assets/models/demo", metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects", type=int, default=120)
    p.add_argument("--corpus", type=int, default=60)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.set_defaults(func=cmd_build_demo)

    p = sub.add_parser("evaluate", help="score a model folder on another labelled cohort")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("cohort_dir", metavar="COHORT_DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fmmtc`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            # Input oddities reach the user through the QC report; keep stderr readable.
            warnings.simplefilter("ignore", FMMTCWarning)
            return int(args.func(args) or 0)
    except FMMTCError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError) as exc:
        if args.debug:
            raise
        sys.stderr.write(f"error: {exc.strerror or exc}: {exc.filename}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except Exception as exc:  # an internal bug: still one line, with a hint
        if args.debug:
            raise
        sys.stderr.write(
            f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug and "
            "report it\n"
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
