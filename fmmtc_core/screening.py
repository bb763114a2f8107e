"""The screening pipeline shared by the dashboard, the CLI and batch jobs.

:func:`analyse` runs load + validate -> parcellate -> QC -> clean -> predict -> explain on one
scan and returns everything in memory (nothing is stored); :func:`screen` (store issue) wraps it
in one database transaction. Each stage reports progress through one callback,
``progress(stage, done, total, info)``, with stages named in :data:`STAGES`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fmmtc_core._errors import InvalidInputError
from fmmtc_core.explain import Explanation, explain, model_inputs
from fmmtc_core.preprocess import RegionSignals, clean
from fmmtc_core.qc import QCReport, QCThresholds, assess_scan

__all__ = ["Analysis", "analyse", "decide", "STAGES", "DEFAULT_THRESHOLDS", "QCFailedError"]

#: Pipeline stages, in order, as reported to progress callbacks.
STAGES = ("validate", "parcellate", "qc", "clean", "predict", "explain", "save")

#: Decision thresholds on the calibrated probability (the team can change them).
DEFAULT_THRESHOLDS = {"responder": 0.6, "non_responder": 0.4}

Progress = Callable[[str, int, int, dict], None] | None


class QCFailedError(InvalidInputError):
    """The scan failed hard quality control: it is not predicted (the report says why)."""

    def __init__(self, message: str, report: QCReport) -> None:
        super().__init__(message)
        self.report = report


def decide(probability: float, band: tuple[float, float], thresholds: dict | None = None) -> str:
    """``"likely responder"``, ``"likely non-responder"`` or ``"uncertain"``.

    A participant is called a likely responder when the whole uncertainty band lies at or above
    the responder threshold, a likely non-responder when it lies at or below the non-responder
    threshold; anything else is uncertain.
    """
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    lo, hi = float(band[0]), float(band[1])
    if not 0.0 <= t["non_responder"] <= t["responder"] <= 1.0:
        raise InvalidInputError(
            "Thresholds must satisfy 0 <= non_responder <= responder <= 1, got "
            f"non_responder={t['non_responder']}, responder={t['responder']}.")
    if min(lo, probability) >= t["responder"]:
        return "likely responder"
    if max(hi, probability) <= t["non_responder"]:
        return "likely non-responder"
    return "uncertain"


@dataclass
class Analysis:
    """Everything one screening computes (see :func:`analyse`)."""

    scan: object
    signals: RegionSignals  # cleaned
    qc: QCReport
    probability: float
    band: tuple[float, float]
    fold_probabilities: list[float]
    decision: str
    thresholds: dict
    explanation: Explanation | None
    window: np.ndarray
    fc: np.ndarray
    stage_seconds: dict = field(default_factory=dict)

    @property
    def runtime_s(self) -> float:
        return float(sum(self.stage_seconds.values()))

    def to_dict(self, *, n_regions: int | None = None) -> dict:
        out = {
            "probability": float(self.probability),
            "band": [float(self.band[0]), float(self.band[1])],
            "decision": self.decision,
            "thresholds": self.thresholds,
            "qc": {"verdict": self.qc.verdict, "reasons": list(self.qc.reasons)},
            "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
            "runtime_s": round(self.runtime_s, 4),
        }
        if self.explanation is not None:
            out.update(self.explanation.to_dict(n_regions=n_regions))
            out["runtime_s"] = round(self.runtime_s, 4)
        return out


def analyse(
    source: str | os.PathLike,
    model,
    *,
    sidecar=None,
    confounds=None,
    thresholds: dict | None = None,
    qc_thresholds: QCThresholds | None = None,
    explain_kwargs: dict | None = None,
    with_explanation: bool = True,
    progress: Progress = None,
) -> Analysis:
    """Run the screening computation on one scan file (nothing is stored).

    Parameters
    ----------
    source : path
        4D NIfTI or region time-series table (see :func:`fmmtc_core.io.load_scan`).
    model : FMMTCEnsemble
        From :func:`fmmtc_core.training.load_model`; its atlas parcellates the scan.
    sidecar, confounds : path or None
    thresholds : dict or None
        Decision thresholds (:data:`DEFAULT_THRESHOLDS`).
    qc_thresholds : QCThresholds or None
    explain_kwargs : dict or None
        Passed to :func:`fmmtc_core.explain.explain` (baselines, tolerance, steps).
    progress : callable(stage, done, total, info) or None

    Raises
    ------
    InvalidInputError
        Bad input of any kind; :class:`QCFailedError` when the scan fails hard QC.
    """
    from fmmtc_core.atlas import load_atlas

    times: dict[str, float] = {}
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    decide(0.5, (0.5, 0.5), thresholds)  # validate the thresholds before any work

    def report(stage, done=1, total=1, info=None):
        if progress:
            progress(stage, done, total, info or {})

    atlas = load_atlas(model.atlas)
    t0 = time.perf_counter()
    report("validate", 0, 1)

    def parc_progress(done, total):
        report("parcellate", done, total)

    scan, raw, qc = assess_scan(source, sidecar=sidecar, confounds=confounds, atlas=atlas,
                                thresholds=qc_thresholds, progress=parc_progress)
    t1 = time.perf_counter()
    times["parcellate"] = t1 - t0  # load + validate + parcellate + QC metrics
    report("qc", 1, 1, {"verdict": qc.verdict})
    if raw.atlas.n_regions != atlas.n_regions:
        raise InvalidInputError(
            f"The table has {raw.atlas.n_regions} regions ({raw.atlas.name}); the model expects "
            f"{atlas.n_regions} ({atlas.name}).")
    if not qc.passed:
        raise QCFailedError("The scan failed quality control and was not screened: "
                            + "; ".join(qc.reasons), qc)
    signals = clean(raw)
    t2 = time.perf_counter()
    times["clean"] = t2 - t1
    report("clean")
    window, fc = model_inputs(model, signals)
    pred = model.predict(window[None], fc[None])
    t3 = time.perf_counter()
    times["predict"] = t3 - t2
    report("predict")
    probability = float(pred["probability"][0])
    band = (float(pred["band"][0, 0]), float(pred["band"][0, 1]))
    cal = model.card["calibration"]
    fold_p = 1.0 / (1.0 + np.exp(-(cal["a"] * pred["fold_logits"][:, 0] + cal["b"])))
    explanation = None
    if with_explanation:
        def exp_progress(stage, done, total, info):
            report("explain", done, total, info)

        explanation = explain(model, window, fc, atlas=atlas, progress=exp_progress,
                              **(explain_kwargs or {}))
        times["explain"] = time.perf_counter() - t3
    return Analysis(
        scan=scan, signals=signals, qc=qc, probability=probability, band=band,
        fold_probabilities=[float(p) for p in fold_p],
        decision=decide(probability, band, thresholds), thresholds=thresholds,
        explanation=explanation, window=window, fc=fc, stage_seconds=times,
    )
