"""The ``fmmtc`` command.

Contract shared by every sub-command: a failure prints one line beginning ``error: `` on stderr
that names the problem and what to do, and exits with one of these statuses:

====  ======================================================================================
0     success
1     internal error: a bug (the line asks to rerun with ``--debug`` and report it)
2     bad input: a scan, option, model file or identifier that cannot be used as given
3     storage: the cohort database cannot be opened, read or written (damaged file, a schema
      revision this version does not know, tables without a revision, unreachable server,
      read-only file, full disk)
130   interrupted (Ctrl-C)
====  ======================================================================================

A Python traceback is shown only with ``--debug``. Without it, warnings (numpy's included) and
library log messages are silenced: a scan's oddities reach the user through the QC report.

Progress: on a terminal, bars on stderr. Otherwise plain lines (``stage done/total ...``) on
**stdout**, so that stderr carries nothing but the ``error:`` line of a failure; with ``--json``
progress is left out, so stdout stays one JSON document. (``screen-batch`` also names each scan
that failed on stderr, as a ``warning:`` line, before its ``error:`` line; ``train`` without
``--json`` and ``build-demo`` repeat each warning of their out-of-fold metrics, such as "no
reliable signal", on stderr as a ``WARNING:`` line, although they succeed.)

Cheap checks come first: ``screen``, ``screen-batch`` and ``explain`` refuse a bad pseudonym,
label, option, scan file, model folder or database before torch and the model are loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from fmmtc_core import __version__
from fmmtc_core.config import DEFAULT_THRESHOLDS
from fmmtc_core.validity import model_validity
from fmmtc_core._errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_STORAGE,
    FMMTCError,
    FMMTCWarning,
    InvalidInputError,
    ModelFileError,
    StorageError,
)

__all__ = ["main", "build_parser"]

EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line ``error:`` contract for usage mistakes."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_BAD_INPUT)


# Option types: a bad value is refused by the parser (one ``error:`` line, status 2).
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (the completeness tolerance)."""
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a number between 0 and 1 (exclusive), e.g. 0.01; got {text!r}")
    return value


def _probability(text: str) -> float:
    """A number from 0 to 1 (a decision threshold)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability from 0 to 1, got {text!r}")
    return value


def _progress(desc: str):
    """A ``progress(done, total)`` callback drawing a tqdm bar on a terminal, else None (these
    per-volume steps are too fine for log lines)."""
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


def _write_tsv(path: Path, names, data) -> None:
    """XCP-D style region table: header of names, one row per volume, ``n/a`` for NaN."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\t".join(names) + "\n")
        for row in data:
            f.write("\t".join("n/a" if not np.isfinite(v) else f"{v:.9g}" for v in row) + "\n")
    tmp.replace(path)


def cmd_parcellate(args) -> int:
    """``fmmtc parcellate``: write a scan's region mean time series as an XCP-D style TSV.

    The TSV has a header of region names and one row per volume (``n/a`` for NaN); a JSON
    sidecar of the same stem is written beside it (``RepetitionTime``, ``Atlas``,
    ``Sources``, ``Cleaned``, ``Cleaning``, ``NumberOfVolumes``, ``RegionLabels``,
    ``GeneratedBy``, and ``SampleMask`` when scrubbing dropped volumes). One line on stdout
    names the file.

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``scan``, ``atlas``, ``sidecar``, ``confounds``, ``min_volumes``, ``clean``
        (clean the series with :class:`~fmmtc_core.preprocess.CleaningSettings` defaults),
        ``scrub`` (used only with ``clean``) and ``out`` (the ``.tsv`` path).

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    FMMTCError
        ``out`` does not end in ``.tsv``.
    InvalidInputError
        The scan, sidecar, confounds or atlas cannot be used, or cleaning refuses the series
        (from :func:`fmmtc_core.pipeline.load_and_clean`).
    """
    out = Path(args.out)
    if out.suffix.lower() != ".tsv":
        raise FMMTCError(f"--out must name a .tsv file, got {out.name!r}.")
    _check_scan(args, args.atlas)  # before pandas, scipy and nilearn load: a quick refusal

    from fmmtc_core.pipeline import load_and_clean, volume_progress
    from fmmtc_core.preprocess import CleaningSettings
    prep = load_and_clean(args.scan, args.atlas, sidecar=args.sidecar, confounds=args.confounds,
                          min_volumes=args.min_volumes,
                          cleaning=CleaningSettings(scrub=args.scrub) if args.clean else None,
                          progress=volume_progress(_progress("parcellate")))
    signals = prep.signals if args.clean else prep.raw
    assert signals is not None  # cleaned signals exist when cleaning was asked for
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
    """``fmmtc qc``: print a scan's quality-control report.

    Without ``--json``: the verdict, its reasons, the warnings and a few key figures
    (volumes, TR, median tSNR, mean FD, high-motion fraction, uncovered regions). A failing
    verdict is reported, not an error: the command still succeeds.

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``scan``, ``sidecar``, ``confounds``, ``atlas``, ``min_volumes``, ``json``
        (print :meth:`~fmmtc_core.qc.QCReport.to_dict` as JSON) and ``series`` (with
        ``json``: add the FD, DVARS and carpet series).

    Returns
    -------
    int
        0, the exit status, whatever the verdict.

    Raises
    ------
    InvalidInputError
        The scan cannot be read, validated or parcellated
        (:func:`fmmtc_core.qc.assess_scan`).
    """
    _check_scan(args, args.atlas)  # before pandas, scipy and nilearn load: a quick refusal

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
            unknown = d[key] is None and key in ("fd_mean_mm", "frac_high_motion")
            print(f"  {key}: {'unknown (no confounds with FD)' if unknown else d[key]}")
    return 0


def cmd_simulate(args) -> int:
    """``fmmtc simulate``: write a simulated BIDS-style cohort (or unlabelled corpus).

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``out_dir``, ``subjects``, ``seed``, ``format``, ``unlabelled`` (no responder
        labels: a pretraining corpus), ``atlas``, ``preset``
        (:meth:`~fmmtc_core.simulate.SimulationConfig.preset`) and ``dtype``.

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    InvalidInputError
        :func:`fmmtc_core.simulate.write_cohort` refuses the options (e.g. fewer than 2
        subjects, or ``out_dir`` already holds a ``participants.tsv``).
    """
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    root = write_cohort(
        args.out_dir,
        args.subjects,
        seed=args.seed,
        fmt=args.format,
        labelled=not args.unlabelled,
        atlas=args.atlas,
        config=SimulationConfig.preset(args.preset),
        dtype=args.dtype,
        progress=_progress("simulate"),
    )
    kind = "unlabelled corpus" if args.unlabelled else "labelled cohort"
    print(f"wrote a simulated {kind} of {args.subjects} subjects ({args.preset} preset) to "
          f"{root}")
    return 0


def _progress_line(text: str) -> None:
    """One progress line when stderr is not a terminal: on stdout (see the module docstring)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _stage_progress(args=None):
    """A ``progress(stage, done, total, info)`` callback: tqdm bars on a terminal, else lines on
    stdout; None with ``--json`` off a terminal (stdout is the JSON document)."""
    if not sys.stderr.isatty() and getattr(args, "json", False):
        return None
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
        elif done == total or (stage == "explain" and done > 0):  # not the announcements
            _progress_line(f"{stage} {done}/{total} {extra}".rstrip())

    return cb


def cmd_pretrain(args) -> int:
    """``fmmtc pretrain``: masked-reconstruction pretraining of the time-series encoder.

    Prints the output folder with the last epoch's loss (read back from its
    ``pretrain_log.json``). Under ``torchrun`` every process runs this command and rank 0
    alone prints and writes (:mod:`fmmtc_core.distributed`).

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``corpus_dir``, ``out``, ``config``, ``atlas``, ``epochs``, ``batch_size``,
        ``lr``, ``seed``, ``windows_per_subject``, ``regions_per_step``, ``schedule``,
        ``xyz_scale``, ``order_invariant``, ``threads`` and ``dist_backend``, all passed to
        :func:`fmmtc_core.pretraining.pretrain`.

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    InvalidInputError
        :func:`~fmmtc_core.pretraining.pretrain` refuses an option, the atlas or the corpus.
    """
    from fmmtc_core.bids import read_cohort

    read_cohort(args.corpus_dir, require_labels=False)  # refused in a second, before torch
    from fmmtc_core.pretraining import pretrain

    out = pretrain(args.corpus_dir, args.out, config=args.config, atlas=args.atlas,
                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   windows_per_subject=args.windows_per_subject,
                   regions_per_step=args.regions_per_step, schedule=args.schedule,
                   xyz_scale=args.xyz_scale, order_invariant=args.order_invariant,
                   threads=args.threads, backend=args.dist_backend,
                   progress=_stage_progress(args))
    from fmmtc_core.distributed import is_main_process

    if not is_main_process():
        return 0  # rank 0 reports
    log = json.loads((out / "pretrain_log.json").read_text())
    print(f"wrote the pretrained encoder to {out} (final loss "
          f"{log['loss_per_epoch'][-1]:.4f} after {len(log['loss_per_epoch'])} epochs)")
    return 0


def _print_metrics(metrics: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in plain.items()))
    if "auc_ci95" in metrics:
        lo, hi = metrics["auc_ci95"]
        print(f"AUC 95 % interval (bootstrap over participants): {lo:.3f}-{hi:.3f}")
    if "permutation" in metrics:
        perm = metrics["permutation"]
        print(f"label-permutation p-value: {perm['p_value']:.3f} "
              f"({perm['n_permutations']} permutations; null AUC {perm['null_mean']:.3f} "
              f"+- {perm['null_sd']:.3f})")
    if "foundation_embedding" in metrics:
        print(f"foundation encoder: {metrics['foundation_embedding']['note']}")
    if "dynamics_probe" in metrics:
        d = metrics["dynamics_probe"]
        print(f"regional dynamics: read by {d['kept']} of {d['fold_models']} fold models (each "
              "kept it only where it improved the fold's inner cross-validation)")
    for text in metrics.get("warnings", []):  # loud, on stderr too: a collapsed model
        print(f"WARNING: {text}", file=sys.stderr)


def cmd_train(args) -> int:
    """``fmmtc train``: cross-validated training of a model folder (FMM-TC or a baseline).

    ``--model`` chooses FMM-TC (default) or a classic baseline
    (:func:`fmmtc_core.baselines.train_baseline`: cpm, nbs, edges, amplitude), whose folder
    screens, explains and evaluates like FMM-TC's. The options only FMM-TC reads
    (``--foundation``, ``--no-foundation``, ``--preset``, ``--modalities``, ``--epochs``,
    ``--coordinates``, ``--threads``) are refused with a baseline rather than ignored, before
    any work. Without ``--foundation`` (and without ``--no-foundation``) an FMM-TC model with a
    time-series branch uses the bundled demo encoder; a note on stdout says so (not with
    ``--json``). :class:`~fmmtc_core.training.TrainingWarning` warnings are silenced here: the
    metrics' ``warnings`` are printed instead, once. Under ``torchrun`` (FMM-TC only) every
    process runs this command and rank 0 alone prints and writes.

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``model``, ``cohort_dir``, ``out``, ``folds``, ``seed``, ``atlas``, ``repeats``,
        ``permutations``, the FMM-TC options ``foundation``, ``no_foundation``,
        ``modalities``, ``preset``, ``coordinates``, ``epochs`` and ``threads`` (None or
        False when not given; FMM-TC then takes the ``ts+fc`` modalities, the ``small`` preset
        and 100 epochs), ``dist_backend`` (under torchrun) and ``json`` (print the
        out-of-fold metrics as JSON, without progress lines off a terminal).

    Returns
    -------
    int
        0, the exit status (also when the metrics warn that nothing usable was learned).

    Raises
    ------
    InvalidInputError
        An FMM-TC option given with a baseline; the cohort, an option, the atlas, the
        coordinates or the foundation encoder cannot be used (from
        :func:`~fmmtc_core.training.train` or :func:`~fmmtc_core.baselines.train_baseline`).
    """
    import warnings as _warnings

    from fmmtc_core.distributed import is_main_process, torchrun_environment

    kind = args.model
    env = torchrun_environment()
    if kind != "fmmtc" and env is not None and env["world_size"] > 1:
        raise InvalidInputError(
            f"--model {kind} runs in one process (a classic baseline fits in seconds); run it "
            "without torchrun.")
    main_rank = is_main_process()
    if kind != "fmmtc":
        given = [flag for key, flag in _FMMTC_ONLY.items() if getattr(args, key) not in
                 (None, False)]
        if given:
            raise InvalidInputError(
                f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to "
                f"--model {kind}, a classic baseline (no encoder, no network, no gradient "
                "training); leave them out, or train FMM-TC (--model fmmtc).")
    modalities = args.modalities or "ts+fc"
    if (kind == "fmmtc" and args.foundation is None and not args.no_foundation
            and "ts" in modalities and not args.json and main_rank):
        # stdout: off a terminal stderr holds only an error line
        print("note: no --foundation given: the time-series branch uses the bundled demo "
              "encoder, pretrained on simulated data only (recorded in the model card).")
    from fmmtc_core.bids import read_cohort

    read_cohort(args.cohort_dir)  # refused in a second, before torch and scikit-learn load
    from fmmtc_core.training import TrainingWarning

    with _warnings.catch_warnings():  # printed by _print_metrics, once
        _warnings.simplefilter("ignore", TrainingWarning)
        if kind == "fmmtc":
            from fmmtc_core.training import train

            metrics = train(args.cohort_dir, args.out, foundation=args.foundation,
                            folds=args.folds, seed=args.seed, modalities=modalities,
                            no_foundation=args.no_foundation, preset=args.preset or "small",
                            atlas=args.atlas, coordinates=args.coordinates,
                            epochs=100 if args.epochs is None else args.epochs,
                            repeats=args.repeats, permutations=args.permutations,
                            threads=args.threads, backend=args.dist_backend,
                            progress=_stage_progress(args))
        else:
            from fmmtc_core.baselines import train_baseline

            metrics = train_baseline(args.cohort_dir, args.out, model=kind, folds=args.folds,
                                     seed=args.seed, atlas=args.atlas, repeats=args.repeats,
                                     permutations=args.permutations,
                                     progress=_stage_progress(args))
    if not main_rank:
        return 0  # rank 0 reports
    if not args.json:
        what = ("FMM-TC" if kind == "fmmtc" else
                f"the classic baseline {kind} (not the deep model)")
        print(f"trained model type {kind}: {what}; wrote it to {args.out}; out-of-fold metrics "
              "(cross-fitted calibration):")
    _print_metrics(metrics, args.json)
    return 0


def cmd_evaluate(args) -> int:
    """``fmmtc evaluate``: score a model folder on another labelled cohort.

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``model_dir``, ``cohort_dir`` and ``json`` (print the metrics as JSON, without
        progress lines off a terminal).

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    ModelFileError
        The model folder cannot be loaded.
    InvalidInputError
        The cohort cannot be read or scored (from :func:`fmmtc_core.training.evaluate`).
    """
    from fmmtc_core.training import evaluate

    _print_metrics(evaluate(args.model_dir, args.cohort_dir, progress=_stage_progress(args)),
                   args.json)
    return 0


def _at_least_two(text: str) -> int:
    """A whole number of at least 2 (cross-validation folds)."""
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def _train_model(text: str) -> str:
    """``train --model``: FMM-TC or a deployable classic baseline (never the oracle)."""
    if text == "fmmtc":  # the default: no scikit-learn import while the command line is parsed
        return text
    from fmmtc_core.baselines import DEPLOYABLE  # no torch (models/ would import it)

    types = ("fmmtc", *DEPLOYABLE)
    if text == "oracle":
        raise argparse.ArgumentTypeError(
            "the oracle cannot be trained into a model folder: it reads the planted truth of "
            "a simulated cohort, which no participant to screen has (run it with `fmmtc "
            f"compare`); expected one of {', '.join(types)}")
    if text not in types:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(types)}; got {text!r}")
    return text


def _dist_backend_option(p: argparse.ArgumentParser) -> None:
    """``--dist-backend`` of ``pretrain`` and ``train`` (read under torchrun only)."""
    p.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                   help="under torchrun: the process-group backend (default: nccl when the "
                        "processes run on CUDA GPUs, else gloo)")


#: ``train`` options that only FMM-TC reads: refused with a classic baseline (``--model``).
_FMMTC_ONLY = {"foundation": "--foundation", "no_foundation": "--no-foundation",
               "preset": "--preset", "modalities": "--modalities", "epochs": "--epochs",
               "coordinates": "--coordinates", "threads": "--threads",
               "dist_backend": "--dist-backend"}


#: ``compare --models`` default: every classic baseline.
_COMPARE_DEFAULT = "cpm,nbs,edges,amplitude,oracle"


def _model_names(text: str) -> list[str]:
    """``--models``: comma-separated names from :data:`fmmtc_core.baselines.MODELS`."""
    if text == _COMPARE_DEFAULT:  # no scikit-learn import while the command line is parsed
        return text.split(",")
    from fmmtc_core.baselines import MODELS  # no torch: scikit-learn and numpy only

    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names from {','.join(MODELS)}; got "
            f"{', '.join(map(repr, unknown)) if unknown else repr(text)}")
    return names


def cmd_compare(args) -> int:
    """``fmmtc compare``: classic baselines (and optionally FMM-TC) on identical folds.

    Prints :func:`~fmmtc_core.baselines.format_comparison`'s table, or with ``--json`` one
    document with ``protocol``, ``models`` (the table's rows, NaN as null), ``verdict``,
    ``fmmtc_vs_best`` and ``skipped``. With ``--out`` the table is also written as TSV (the
    folder is created).

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``cohort_dir``, ``out``, ``foundation``, ``models``, ``folds``, ``seed``,
        ``repeats``, ``atlas`` and ``json``.

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    InvalidInputError
        Checked before torch is loaded: ``cohort_dir`` has no ``participants.tsv``, ``out``
        does not end in ``.tsv``, ``foundation`` is given without ``fmmtc`` in ``models`` or
        is a folder without ``config.json``. Later, anything
        :func:`fmmtc_core.baselines.compare` refuses.
    """
    # Cheap checks first: the cohort folder, --out, --foundation (torch is not loaded yet).
    root = Path(args.cohort_dir)
    if not (root / "participants.tsv").is_file():
        raise InvalidInputError(f"{root} has no participants.tsv; expected a BIDS-style cohort.")
    if args.out and Path(args.out).suffix.lower() != ".tsv":
        raise InvalidInputError(f"--out must name a .tsv file, got {Path(args.out).name!r}.")
    if args.foundation is not None:
        if "fmmtc" not in args.models:
            raise InvalidInputError(
                "--foundation is used only by the fmmtc model; add fmmtc to --models "
                "(e.g. --models cpm,nbs,edges,amplitude,oracle,fmmtc).")
        if not (Path(args.foundation) / "config.json").is_file():
            raise InvalidInputError(
                f"{args.foundation} is not a foundation encoder folder (no config.json).")

    from fmmtc_core.baselines import compare, format_comparison

    table = compare(root, folds=args.folds, seed=args.seed, repeats=args.repeats,
                    models=args.models, atlas=args.atlas, foundation=args.foundation,
                    progress=_stage_progress(args))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, sep="\t", index=False, float_format="%.4f")
    if args.json:
        def plain(v):  # NaN is not JSON
            return None if isinstance(v, float) and not math.isfinite(v) else v

        rows = [{k: plain(v) for k, v in r.items()} for r in table.to_dict("records")]
        print(json.dumps({"protocol": table.attrs["protocol"], "models": rows,
                          "verdict": table.attrs["verdict"],
                          "fmmtc_vs_best": table.attrs["fmmtc_vs_best"],
                          "skipped": table.attrs["skipped"]}, indent=2))
    else:
        print(format_comparison(table))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def cmd_foundation(args) -> int:
    """``fmmtc foundation inspect DIR``: which registry entry a checkpoint folder is and what
    it will do to a scan (no weights are loaded).

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``folder``, ``atlas``, ``coordinates``, ``tr``, ``volumes`` and ``regions`` (the
        example scan passed to :func:`fmmtc_core.models.registry.inspect_encoder`) and
        ``json`` (print its result as JSON instead of the aligned summary). ``action`` is
        always ``"inspect"`` and is not read.

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    ModelFileError
        The folder is not a checkpoint of a known registry entry, or its ``config.json``
        cannot be used (:func:`~fmmtc_core.models.registry.inspect_encoder`).
    """
    folder = Path(args.folder)
    if not folder.is_dir():  # in the registry's words, before torch and transformers load
        raise ModelFileError(f"Foundation model folder {str(folder)!r} does not exist; expected "
                             "a folder with config.json and model.safetensors.")

    from fmmtc_core.models.registry import inspect_encoder

    info = inspect_encoder(args.folder, atlas=args.atlas, coordinates=args.coordinates,
                           tr=args.tr, n_volumes=args.volumes, scan_regions=args.regions)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    e = info["entry"]
    shape = (f"{e['channels']} x " if e["channels"] else "") + f"{e['n_regions']} x {e['window']}"
    lines = [
        f"folder       {info['folder']}",
        f"entry        {e['name']}: {e['description']}",
        f"parameters   {e['n_parameters'] / 1e6:.2f} M (encoder), hidden size {e['hidden_size']}",
        f"atlas        {e['atlas']}, {e['n_regions']} regions ({e['region_order']} rows)",
        f"TR           " + ("each scan's own" if e["tr"] is None else f"{e['tr']:g} s"),
        f"window       {shape} samples" + (f", padded to {e['image_size'][0]} x "
                                           f"{e['image_size'][1]} with {e['pad_value']:g}"
                                           if e["image_size"] else ""),
        f"scaling      {e['normalisation']}" + (f", then / {e['max_value']:g}"
                                                 if e["max_value"] != 1 else ""),
        f"tokens       {e['token_order']} order" + (f" (mean over {e['order_samples']} seeded "
                                                    "shuffles)" if e["order_samples"] > 1 else ""),
        f"embedding    {e['token_pooling']} token ({e['readout']}), {e['window_pooling']} over "
        "windows",
    ]
    coords = info["coordinates"]
    if coords["needed"]:
        lines.append("coordinates  " + (coords["source"] if coords["found"]
                                        else f"MISSING: {coords['problem']}"))
    print("\n".join(lines))
    for note in info["notes"]:
        print(f"- {note}")
    for key, text in e["sources"].items():
        print(f"  source of {key}: {text}")
    return 0


def cmd_build_demo(args) -> int:
    """``fmmtc build-demo``: rebuild the bundled demo model from simulated data.

    The ``out`` folder is replaced if it exists. Prints the output folder, the time taken and
    the out-of-fold metrics.

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``out``, ``seed``, ``subjects``, ``corpus``, ``pretrain_epochs``, ``simulation``,
        ``preset`` and ``threads``, passed to
        :func:`fmmtc_core.demo.build_demo_model`.

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    InvalidInputError
        A simulation, pretraining or training step of
        :func:`~fmmtc_core.demo.build_demo_model` refuses an option (e.g. fewer than 2
        subjects).
    """
    from fmmtc_core.demo import build_demo_model

    t0 = time.perf_counter()
    metrics = build_demo_model(args.out, seed=args.seed, n_subjects=args.subjects,
                               n_corpus=args.corpus, pretrain_epochs=args.pretrain_epochs,
                               progress=_stage_progress(args), simulation=args.simulation,
                               preset=args.preset, threads=args.threads)
    print(f"wrote the demo model to {args.out} in {time.perf_counter() - t0:.0f} s; "
          "out-of-fold metrics:")
    _print_metrics(metrics, False)
    return 0


def _explain_kwargs(args) -> dict:
    return {"baseline_fc": args.baseline_fc, "rel_tol": args.tolerance}


# --------------------------------------------------------------------------------------------
# Cheap checks: run before torch and the model are loaded (seconds), so a refusal is quick.
# --------------------------------------------------------------------------------------------
def _model_dir(model: str | None) -> Path:
    """The model folder: ``--model``, else ``$FMMTC_MODEL_DIR``, else the bundled demo model.

    The rule of :func:`fmmtc_core.config.default_model_dir` (cheap: no torch).
    """
    from fmmtc_core.config import default_model_dir

    return Path(model) if model else default_model_dir()


def _model_atlas(root: Path) -> str:
    """The atlas of the model card of ``root`` (a region table must follow it): a bundled
    atlas's name, or the label image the model was trained with (the card's ``source``)."""
    from fmmtc_core.atlas import resolve_atlas_name

    card = root / "model_card.json"
    if not card.is_file():
        raise ModelFileError(f"{root} is not an FMM-TC model folder (no model_card.json).")
    try:
        atlas = json.loads(card.read_text(encoding="utf-8"))["atlas"]
        name = str(atlas["name"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(
            f"{card} is not a readable model card ({type(exc).__name__}: {exc}); re-copy or "
            "rebuild the model folder.") from None
    source = atlas.get("source") if isinstance(atlas, dict) else None
    if resolve_atlas_name(name) is None and isinstance(source, str) and source:
        if not Path(source).exists():
            raise ModelFileError(
                f"The model in {root} was trained with the atlas label image {source!r}, which "
                "does not exist here; copy the image to that path.")
        return source
    return name


def _check_scan(args, atlas: str | None) -> None:
    """Refuse a scan that cannot be read: header, dimensions, volumes, a table's columns."""
    from fmmtc_core.io import load_scan

    # A NIfTI's header is read, not its voxels; a region table is read in full (small).
    load_scan(args.scan, sidecar=args.sidecar, confounds=args.confounds, atlas=atlas,
              min_volumes=args.min_volumes)


def _labels(args, names=("site", "drug", "arm", "operator")) -> dict:
    from fmmtc_core.identifiers import validate_label

    return {name: validate_label(name, getattr(args, name, None)) for name in names}


def _ig_steps_text(settings: dict, steps: int) -> str:
    """How much integration an explanation took, in words: the nested rule's last level is a
    number of intervals with one more node, and its gradients are shared across levels."""
    quadrature = settings.get("quadrature")
    evaluations = settings.get("evaluations")
    if quadrature == "clenshaw-curtis" and evaluations:
        return (f"{evaluations} gradient evaluations (nested Clenshaw-Curtis, last level "
                f"{steps} intervals)")
    if evaluations:
        return f"{steps} steps ({quadrature or 'Gauss-Legendre'}; {evaluations} gradient evaluations)"
    return f"{steps} steps"


def cmd_explain(args) -> int:
    """``fmmtc explain``: predict and explain one scan (nothing is stored).

    The scan and the model card are checked before torch and the model are loaded. Prints
    the probability, its band and the decision, the modality share, the Integrated Gradients
    settings and the ``top`` regions; or with ``--json``
    :meth:`~fmmtc_core.screening.Analysis.to_dict`.

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``model`` (None: ``$FMMTC_MODEL_DIR`` or the bundled demo model), ``scan``,
        ``sidecar``, ``confounds``, ``min_volumes`` (the fewest volumes accepted),
        ``baseline_fc`` and ``tolerance`` (the explanation's ``baseline_fc`` and ``rel_tol``),
        ``json`` and ``top``.

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    ModelFileError
        The model folder has no readable card, its atlas label image is missing, or the
        model cannot be loaded.
    InvalidInputError
        The scan, sidecar or confounds cannot be used;
        :class:`~fmmtc_core._errors.QCFailedError` when the scan fails hard QC.
    """
    model_dir = _model_dir(args.model)
    _check_scan(args, _model_atlas(model_dir))

    from fmmtc_core.screening import analyse
    from fmmtc_core.models.ensemble import load_model

    model = load_model(model_dir)
    result = analyse(args.scan, model, sidecar=args.sidecar, confounds=args.confounds,
                     explain_kwargs=_explain_kwargs(args), min_volumes=args.min_volumes,
                     progress=_stage_progress(args))
    out = result.to_dict()
    validity = model_validity(model.card, model.name)
    out["model"] = model.name
    out["model_validity"] = validity.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    e = result.explanation
    assert e is not None  # analyse() explains by default
    _print_validity(validity)
    print(f"responder probability {result.probability:.2f} "
          f"[{result.band[0]:.2f}, {result.band[1]:.2f}]: {result.decision}")
    print(f"modality share: time series {e.modality_share['ts']:.1%}, "
          f"connectivity {e.modality_share['fc']:.1%}")
    if model.model_type == "fmmtc":
        print(f"Integrated Gradients: {_ig_steps_text(e.settings, e.steps)}, completeness "
              f"gap {e.ig_gap:.2%}, baselines {e.baseline}")
    else:  # a classic baseline: linear in its features
        print(f"exact linear attribution (classic baseline {model.model_type}): completeness "
              f"gap {e.ig_gap:.2%}, baselines {e.baseline}")
    print("top regions (logit units; + towards responder):")
    for r in e.ranked_regions(args.top):
        print(f"  {r['score']:+.4f}  {r['label']:>5}  {r['name']}  ({r['network']})")
    return 0


def _print_validity(validity) -> None:
    """The model's validity warning as the first line of a result (stdout: it is part of the
    result, and off a terminal stderr holds only an ``error:`` line)."""
    if validity.warn:
        print(f"WARNING: {validity.text}")


def _participant_from_name(scan) -> str:
    m = re.search(r"sub-([A-Za-z0-9]+)", Path(scan).name)
    if not m:
        raise InvalidInputError(
            "Name the participant with --participant (a study pseudonym such as PAIN-0042); "
            f"{Path(scan).name} has no BIDS sub-<label>.")
    return m.group(1)


def cmd_screen(args) -> int:
    """``fmmtc screen``: screen one scan and store it in the cohort database.

    Identifiers, options, the scan's header, the model card and the database are checked, in
    that order, before torch and the model are loaded. Prints the screening's id (noting a
    stored screening returned again), the probability, its band and the decision, the
    modality share and the five strongest regions; or with ``--json``
    :meth:`~fmmtc_core.screening.ScreeningResult.to_dict`.

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``participant`` (None: the BIDS ``sub-<label>`` of the scan's file name),
        ``scan``, ``sidecar``, ``confounds``, ``min_volumes`` (the fewest volumes accepted),
        ``site``, ``drug``, ``arm``, ``operator``, ``responder_threshold``,
        ``non_responder_threshold``, ``model``, ``db``, ``baseline_fc``, ``tolerance``,
        ``force`` and ``json``.

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    InvalidInputError
        An invalid pseudonym or label, no ``participant`` and no ``sub-<label>`` in the file
        name, ``non_responder_threshold`` above ``responder_threshold``, a missing or
        unreadable scan, or a refusal by :func:`fmmtc_core.screening.screen` (including
        :class:`~fmmtc_core._errors.QCFailedError`).
    ModelFileError
        The model folder has no readable card, its atlas label image is missing, the model
        cannot be loaded, or its outputs are not finite.
    StorageError
        The database cannot be opened, read or written.
    """
    from fmmtc_core.identifiers import validate_pseudonym

    # Cheapest first: identifiers, options, the scan's header, the model card, the database.
    participant = validate_pseudonym(args.participant or _participant_from_name(args.scan))
    labels = _labels(args)
    if args.non_responder_threshold > args.responder_threshold:
        raise InvalidInputError(
            f"--non-responder-threshold ({args.non_responder_threshold:g}) must not exceed "
            f"--responder-threshold ({args.responder_threshold:g}).")
    if not Path(args.scan).exists():  # in the words of screen(), which checks it again
        raise InvalidInputError(f"No such scan file: {str(args.scan)!r}.")
    model_dir = _model_dir(args.model)
    _check_scan(args, _model_atlas(model_dir))
    from fmmtc_core.store import open_database

    engine = open_database(args.db)

    from fmmtc_core.screening import screen
    from fmmtc_core.models.ensemble import load_model

    model = load_model(model_dir)
    thresholds = {"responder": args.responder_threshold,
                  "non_responder": args.non_responder_threshold}
    result = screen(args.scan, participant, model, engine, sidecar=args.sidecar,
                    confounds=args.confounds, site=labels["site"], drug=labels["drug"],
                    arm=labels["arm"], thresholds=thresholds,
                    explain_kwargs=_explain_kwargs(args), operator=labels["operator"],
                    force=args.force, min_volumes=args.min_volumes,
                    progress=_stage_progress(args))
    out = result.to_dict()
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    lo, hi = result.band
    note = " (already stored; --force screens again)" if result.reused else ""
    _print_validity(result.summary.validity)
    print(f"screening {result.screening_id}{note}: participant {result.participant}")
    print(f"  responder probability {result.probability:.2f} [{lo:.2f}, {hi:.2f}]: "
          f"{result.decision}")
    share = out["modality_share"]
    how = (f"IG gap {out['ig_gap']:.2%} ({out['steps']} steps)" if model.model_type == "fmmtc"
           else f"exact linear attribution, gap {out['ig_gap']:.2%}")
    print(f"  modality share: time series {share['ts']:.1%}, connectivity {share['fc']:.1%}; "
          f"{how}")
    for r in out["regions"][:5]:
        print(f"  {r['score']:+.4f}  {r['label']:>5}  {r['name']}")
    return 0


def cmd_screen_batch(args) -> int:
    """``fmmtc screen-batch``: screen every scan of a BIDS-style cohort folder.

    The operator label, the cohort folder, the model card and the database are checked
    before any scan is read. Prints the numbers screened, already stored and failed (and the
    outcomes imported, with ``--import-outcomes``), then one ``warning:`` line on stderr per
    failed scan.

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``operator``, ``cohort_dir``, ``model``, ``db``, ``workers``, ``cluster``,
        ``import_outcomes``, ``baseline_fc`` and ``tolerance``.

    Returns
    -------
    int
        0, the exit status, when every scan was screened or already stored.

    Raises
    ------
    InvalidInputError
        An invalid operator label, or ``cohort_dir`` has no ``participants.tsv``, an invalid
        ``--cluster`` or a remote one with a SQLite database (or a refusal by
        :func:`fmmtc_core.screening.screen_batch` before screening starts).
    ModelFileError
        The model folder has no readable card or cannot be loaded.
    StorageError
        The database cannot be opened, read or written.
    FMMTCError
        At least one scan could not be screened (the others are stored): exit status 2.
    """
    operator = _labels(args, ("operator",))["operator"]
    root = Path(args.cohort_dir)
    if not (root / "participants.tsv").is_file():
        raise InvalidInputError(f"{root} has no participants.tsv; expected a BIDS-style cohort.")
    if args.cluster is not None:  # before the database is opened (and a SQLite file made)
        from fmmtc_core.cluster import check_database, parse_cluster
        from fmmtc_core.store import default_url

        if args.workers != 1:
            raise InvalidInputError("--workers and --cluster exclude each other: a cluster's "
                                    "workers are its own (local:N for N processes here).")
        check_database(parse_cluster(args.cluster), args.db or default_url())
    model_dir = _model_dir(args.model)
    _model_atlas(model_dir)
    from fmmtc_core.store import open_database

    open_database(args.db).dispose()  # refuse a database that cannot be used before the model

    from fmmtc_core.screening import screen_batch

    bar = None
    tty = sys.stderr.isatty()

    def progress(done, total, pid):
        nonlocal bar
        if tty:
            from tqdm import tqdm

            if bar is None:
                bar = tqdm(total=total, desc="screen", unit="scan")
            bar.update(done - bar.n)
            if pid:
                bar.set_postfix_str(pid)
        elif pid:
            _progress_line(f"screen {done}/{total} {pid}")

    report = screen_batch(root, model_dir=model_dir, url=args.db, workers=args.workers,
                          operator=operator, import_outcomes=args.import_outcomes,
                          explain_kwargs=_explain_kwargs(args), progress=progress,
                          cluster=args.cluster)
    if bar is not None:
        bar.close()
    _print_validity(model_validity(json.loads((model_dir / "model_card.json").read_text()),
                                   None))
    print(f"screened {len(report.screened)}, already stored {len(report.skipped)}, "
          f"failed {len(report.failed)}"
          + (f", outcomes imported {report.outcomes}" if args.import_outcomes else ""))
    for pid, reason in report.failed.items():
        sys.stderr.write(f"warning: {pid}: {_one_line(reason)}\n")
    if report.failed:
        raise FMMTCError(f"{len(report.failed)} of {len(report.failed) + len(report.screened)} "
                         "scans could not be screened (reasons above); the others are stored.")
    return 0


def cmd_outcome(args) -> int:
    """``fmmtc outcome``: record a participant's observed outcome in the database.

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``participant``, ``outcome`` (``"responder"`` or ``"non-responder"``),
        ``operator`` (None: :func:`~fmmtc_core.store.repository.default_operator`), ``note``,
        ``replace`` (confirm replacing an outcome recorded before) and ``db``.

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    InvalidInputError
        An invalid pseudonym, operator label or note, no participant with this pseudonym in
        the database, or an outcome already recorded without ``replace``.
    StorageError
        The database cannot be opened, read or written.
    """
    from fmmtc_core.store import open_database, session_scope
    from fmmtc_core.store.repository import (
        default_operator,
        record_outcome,
        validate_note,
        validate_pseudonym,
    )

    participant = validate_pseudonym(args.participant)
    operator = _labels(args, ("operator",))["operator"] or default_operator()
    note = validate_note(args.note)
    engine = open_database(args.db)
    with session_scope(engine, write=True) as s:
        record_outcome(s, participant, args.outcome, actor=operator, note=note,
                       replace=args.replace)
    print(f"recorded: {participant} {args.outcome}")
    return 0


def cmd_db(args) -> int:
    """``fmmtc db``: maintain the cohort database.

    Actions: ``upgrade`` (to the head schema revision), ``downgrade`` (one revision back),
    ``status`` (the revision, and row counts when there is one), ``check`` (upgrade, then an
    integrity check) and ``export`` (upgrade, then write every screening to a CSV file; its
    folder is created).

    Parameters
    ----------
    args : argparse.Namespace
        Reads ``action``, ``db`` (None: ``$FMMTC_DATABASE_URL`` or the default SQLite file)
        and ``out`` (``export`` only: the ``.csv`` path).

    Returns
    -------
    int
        0, the exit status.

    Raises
    ------
    InvalidInputError
        ``export`` without ``out`` or with an ``out`` that does not end in ``.csv``; a
        malformed database URL or an unknown driver.
    StorageError
        The database cannot be opened, read or written, or ``check`` found problems (the
        first five are named).
    """
    from fmmtc_core.store import (
        check_schema,
        downgrade,
        head_revision,
        integrity_check,
        make_engine,
        row_counts,
        upgrade,
    )
    from fmmtc_core.store.db import _redact

    if args.action == "export":  # the cheap check first
        if not args.out:
            raise InvalidInputError("db export needs --out FILE.csv.")
        if Path(args.out).suffix.lower() != ".csv":
            raise InvalidInputError(f"--out must name a .csv file, got {Path(args.out).name!r}.")
    engine = make_engine(args.db)
    if args.action == "upgrade":
        print(f"database at revision {upgrade(engine)} (head {head_revision()}): "
              f"{_redact(str(engine.url))}")
    elif args.action == "downgrade":
        print(f"database at revision {downgrade(engine, '-1')}")
    elif args.action == "status":
        rev = check_schema(engine)
        print(f"{_redact(str(engine.url))}: revision {rev} (head {head_revision()})")
        if rev:
            for table, n in row_counts(engine).items():
                print(f"  {table}: {n}")
    elif args.action == "check":
        upgrade(engine)
        problems = integrity_check(engine)
        if problems:
            raise StorageError("database check failed: " + "; ".join(problems[:5]))
        print("database check: ok")
    elif args.action == "export":
        from fmmtc_core.store.repository import export_csv

        out = Path(args.out)
        upgrade(engine)
        out.parent.mkdir(parents=True, exist_ok=True)
        n = export_csv(engine, out)
        print(f"wrote {out} ({n} screenings)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fmmtc`` argument parser, one sub-command per ``cmd_*`` function.

    Each sub-parser sets ``func`` to its command function. A usage mistake (an unknown
    option, a missing argument, an invalid value) prints one ``error:`` line on stderr and
    exits with status 2.

    Returns
    -------
    argparse.ArgumentParser
        The top-level parser (``--version``, ``--debug`` and a required sub-command).
    """
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
        p.add_argument("--min-volumes", type=_positive_int, default=50, metavar="N",
                       help="fewest volumes (default 50)")
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
    p.add_argument("--tolerance", type=_open_fraction, default=0.01,
                   help="completeness gap to reach, relative to |F(x) - F(baseline)|; "
                        "between 0 and 1 (default 0.01)")
    p.add_argument("--top", type=_positive_int, default=15,
                   help="regions listed without --json")
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
        p.add_argument("--tolerance", type=_open_fraction, default=0.01,
                       help="completeness gap to reach, relative to |F(x) - F(baseline)|; "
                            "between 0 and 1 (default 0.01)")

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
    p.add_argument("--responder-threshold", type=_probability,
                   default=DEFAULT_THRESHOLDS["responder"],
                   help="probability at or above which a whole band is a likely responder")
    p.add_argument("--non-responder-threshold", type=_probability,
                   default=DEFAULT_THRESHOLDS["non_responder"],
                   help="probability at or below which a whole band is a likely non-responder")
    p.add_argument("--force", action="store_true", help="screen again even if already stored")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("screen-batch", help="screen every scan of a BIDS-style cohort folder")
    p.add_argument("cohort_dir", metavar="COHORT_DIR")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="parallel processes, at least 1 (default 1)")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="screen on Dask: local:N (N worker processes here) or tcp://HOST:PORT "
                        "(a running scheduler; its workers see the cohort and model at the "
                        "same paths; needs a PostgreSQL --db)")
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
    p.add_argument("--replace", action="store_true",
                   help="confirm that this outcome replaces the one recorded before (which "
                        "is kept in the history)")
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
    p.add_argument("--preset", choices=("realistic", "easy", "shifted", "heldout"),
                   default="realistic",
                   help="generator: realistic (sparse, weak, heterogeneous effects; 3 sites "
                        "with their own TR), easy (the original, strong effects), shifted "
                        "and heldout (held out for evaluation: other sites and effect shapes)")
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
    p.add_argument("--order-invariant", action="store_true",
                   help="exact attention and no convolution over the token sequence: the "
                        "embedding does not depend on the order of the tokens (about 3x the "
                        "encoder's inference time; README, 'Foundation encoder probe')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atlas", default="hcpex")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="fix torch's thread count per process and use deterministic "
                        "algorithms (default: torch's; torchrun sets 1 per process)")
    _dist_backend_option(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", help="cross-validated training of a model folder: FMM-TC or "
                                     "a classic baseline (--model)")
    p.add_argument("cohort_dir", metavar="COHORT_DIR")
    p.add_argument("--out", required=True, metavar="MODEL_DIR")
    p.add_argument("--model", type=_train_model, default="fmmtc", metavar="TYPE",
                   help="fmmtc (default), or a classic baseline on the folds and protocol of "
                        "`fmmtc compare`: cpm (connectome-based predictive modelling), nbs "
                        "(NBS-Predict edge selection), edges (L2 logistic on every "
                        "connectivity edge), amplitude (L2 logistic on region log SD, ALFF, "
                        "fALFF, autocorrelation). The folder screens, explains and evaluates "
                        "like FMM-TC's. Options marked (fmmtc) are refused with a baseline")
    p.add_argument("--foundation", metavar="DIR",
                   help="(fmmtc) frozen foundation encoder folder (config.json + "
                        "model.safetensors): a BrainLM download (legacy 13M, ViT-MAE 111M / "
                        "650M) or `fmmtc pretrain` output; see `fmmtc foundation inspect DIR`")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modalities", choices=("ts+fc", "ts", "fc"), default=None,
                   help="(fmmtc) default ts+fc")
    p.add_argument("--no-foundation", action="store_true",
                   help="(fmmtc) ablation without the foundation model: the time-series encoder "
                        "trained from scratch (with --preset small: no encoder, regional "
                        "amplitude alone)")
    p.add_argument("--preset", choices=("small", "default", "paper"), default=None,
                   help="(fmmtc) model design: small (default; the encoder's embedding + sparse "
                        "read-outs of regional amplitude and connectivity networks, stacked "
                        "linear head: for cohorts of ~100), default (BrainNetCNN, "
                        "gradient-trained: for large cohorts), paper (ResNet-18 on the Gram "
                        "matrix)")
    p.add_argument("--epochs", type=int, default=None, help="(fmmtc) default 100")
    p.add_argument("--atlas", default="hcpex",
                   help="hcpex (default), aal3, or a NIfTI label image (the A424 encoders: "
                        "A424+2mm.nii.gz from the BrainLM download)")
    p.add_argument("--coordinates", default=None, metavar="DAT",
                   help="(fmmtc) region coordinate table for the encoder (BrainLM's "
                        "A424_Coordinates.dat; copied into the model folder)")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="repeat the K-fold cross-validation N times with other splits "
                        "(every fold model joins the ensemble)")
    p.add_argument("--permutations", type=int, default=0, metavar="N",
                   help="label permutations for a p-value of the AUC (each re-runs the "
                        "whole cross-validation)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="(fmmtc) fix torch's thread count and use deterministic algorithms "
                        "(bit-identical reruns)")
    _dist_backend_option(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("build-demo", help="rebuild the bundled demo model (simulated data)")
    p.add_argument("--out", default="assets/models/demo", metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects", type=int, default=120)
    p.add_argument("--corpus", type=int, default=60)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--simulation", choices=("realistic", "easy", "shifted"), default="realistic",
                   help="simulation preset of the corpus and the cohort")
    p.add_argument("--preset", choices=("small", "default", "paper"), default="small",
                   help="FMM-TC design (as fmmtc train)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads (fixed, with deterministic algorithms: the same bytes "
                        "on a rerun)")
    p.set_defaults(func=cmd_build_demo)

    p = sub.add_parser("evaluate", help="score a model folder on another labelled cohort")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("cohort_dir", metavar="COHORT_DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="classic baselines (and FMM-TC) on identical folds: "
                                       "one out-of-fold table")
    p.add_argument("cohort_dir", metavar="COHORT_DIR")
    p.add_argument("--folds", type=_at_least_two, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=_positive_int, default=1, metavar="N",
                   help="repeat the cross-validation N times with other splits (seeds seed, "
                        "seed+1, ...)")
    p.add_argument("--models", type=_model_names, default=_COMPARE_DEFAULT,
                   metavar="LIST",
                   help="comma-separated, from cpm,nbs,edges,amplitude,oracle,fmmtc (default: "
                        "every classic baseline; the oracle only runs on simulated cohorts; "
                        "fmmtc trains FMM-TC, slow)")
    p.add_argument("--foundation", metavar="DIR",
                   help="with fmmtc: pretrained encoder folder (default: the bundled one)")
    p.add_argument("--atlas", default="hcpex")
    p.add_argument("--out", metavar="TABLE.tsv", help="also write the table as TSV")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("foundation", help="foundation encoders: inspect a checkpoint folder")
    p.add_argument("action", choices=("inspect",))
    p.add_argument("folder", metavar="DIR", help="config.json + model.safetensors")
    p.add_argument("--atlas", default=None, help="the atlas scans will be parcellated with")
    p.add_argument("--coordinates", default=None, metavar="DAT",
                   help="BrainLM's A424_Coordinates.dat (A424 encoders)")
    p.add_argument("--tr", type=_number, default=2.0, help="TR of the example scan (s)")
    p.add_argument("--volumes", type=_positive_int, default=300, metavar="N",
                   help="volumes of the example scan")
    p.add_argument("--regions", type=_positive_int, default=None, metavar="R",
                   help="regions of the example scan's atlas (default: the encoder's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_foundation)
    return parser


def _one_line(text) -> str:
    """``text`` on one line (a driver's message may span several)."""
    return " ".join(str(text).split())


@contextmanager
def _quiet(debug: bool):
    """Silence warnings and library log messages around a command, unless ``debug``.

    Input oddities reach the user through the QC report; numpy's RuntimeWarnings and the like
    would only add lines to stderr, where a failure prints exactly one. Worker processes
    (``screen-batch --workers``) inherit the setting through ``PYTHONWARNINGS``.
    """
    import logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FMMTCWarning)
        if debug:
            yield
            return
        warnings.simplefilter("ignore")
        old_disable = logging.root.manager.disable
        old_env = os.environ.get("PYTHONWARNINGS")
        logging.disable(logging.WARNING)
        os.environ["PYTHONWARNINGS"] = "ignore"
        try:
            yield
        finally:
            logging.disable(old_disable)
            if old_env is None:
                os.environ.pop("PYTHONWARNINGS", None)
            else:
                os.environ["PYTHONWARNINGS"] = old_env


def _as_storage_error(exc: BaseException, args) -> StorageError | None:
    """A database driver error that escaped the store layer, as a :class:`StorageError`."""
    if "sqlalchemy" not in sys.modules and "sqlite3" not in sys.modules:
        return None  # no database was touched
    from fmmtc_core.store.db import default_url, storage_error

    return storage_error(exc, getattr(args, "db", None) or default_url())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fmmtc`` command; returns the exit status (see the module
    docstring).

    Parameters
    ----------
    argv : list of str or None, default=None
        The arguments after the program name; None reads ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success; 2 for an :class:`~fmmtc_core.FMMTCError` (or a missing, unreadable or
        wrong-kind file); 3 for a :class:`~fmmtc_core._errors.StorageError` (or a database
        driver error that escaped the store layer); 130 when interrupted; 1 for any other
        exception (an internal error). A failure first writes one ``error:`` line to stderr.

    Raises
    ------
    SystemExit
        From the parser: ``--help`` and ``--version`` (status 0) and usage mistakes (status
        2).
    Exception
        With ``--debug``, the command's exception propagates instead of becoming a status
        (except ``KeyboardInterrupt``, which still returns 130).
    """
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message, status: int) -> int:
        sys.stderr.write(f"error: {_one_line(message)}\n")
        return status

    try:
        with _quiet(args.debug):
            return int(args.func(args) or 0)
    except StorageError as exc:
        if args.debug:
            raise
        return fail(exc, EXIT_STORAGE)
    except FMMTCError as exc:
        if args.debug:
            raise
        return fail(exc, EXIT_BAD_INPUT)
    except (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError) as exc:
        if args.debug:
            raise
        return fail(f"{exc.strerror or exc}: {exc.filename}", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        if args.debug:
            raise
        storage = _as_storage_error(exc, args)
        if storage is not None:
            return fail(storage, EXIT_STORAGE)
        # An internal bug: still one line, with a hint.
        return fail(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug and "
                    "report it", EXIT_INTERNAL)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
