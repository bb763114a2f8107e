"""The typed summary of a screening: the one shape the CLI's JSON, the HTML report, the pages
and the database writer read (built by :meth:`ScreeningSummary.from_analysis` for a fresh
screening and :meth:`ScreeningSummary.from_row` for a stored one).

Plain dataclasses with no heavy imports, so the store and the report can use them without
loading the model code.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fmmtc_core.validity import ModelValidity, model_validity

if TYPE_CHECKING:
    from fmmtc_core.explain import Explanation
    from fmmtc_core.screening import Analysis
    from fmmtc_core.store.models import Screening

__all__ = ["RegionScore", "ConnectionScore", "QCNumbers", "ScreeningSummary",
           "explanation_scores", "attribution_rows", "format_share", "EXACT_ATTRIBUTION"]

#: ``Explanation.settings["method"]`` of a classic baseline's exact linear attribution (FMM-TC's
#: is ``"integrated_gradients"``).
EXACT_ATTRIBUTION = "exact_linear_attribution"

#: What the explanation records for a time series it did not attribute
#: (:func:`fmmtc_core.explain.explain`).
_TS_HELD = "held at the scan"


def format_share(value: float | None) -> str:
    """A modality share as a percentage that never rounds a small share down to "0%".

    Parameters
    ----------
    value : float or None
        A share in [0, 1].

    Returns
    -------
    str
        ``"n/a"`` for None; ``"0%"`` only for exactly 0; one decimal below 1 % (``"0.4%"``;
        ``"<0.1%"`` below 0.05 %); whole percents otherwise.
    """
    if value is None:
        return "n/a"
    if value == 0:
        return "0%"
    if value < 0.0005:
        return "<0.1%"
    if value < 0.01 or value > 0.99 and value < 1:
        return f"{value:.1%}"
    return f"{value:.0%}"


@dataclass(frozen=True)
class RegionScore:
    """One region's attribution (logit units): time series, connectivity and their sum.

    Attributes
    ----------
    region_index : int
        Position of the region in the atlas's order.
    label : int
        The atlas's integer label of the region.
    name : str
        Region name.
    network : str
        The atlas's group (network / lobe) of the region.
    ts, fc : float
        Time-series and connectivity attribution (logit units; + towards responder).
    score : float
        ``ts + fc``.
    """

    region_index: int
    label: int
    name: str
    network: str
    ts: float
    fc: float
    score: float  # ts + fc


@dataclass(frozen=True)
class ConnectionScore:
    """One of the strongest connections (regions ``i`` and ``j`` by index and label).

    Attributes
    ----------
    i, j : int
        Positions of the two regions in the atlas's order.
    label_i, label_j : int
        Their atlas labels.
    score : float
        Attribution of the connection (logit units; + towards responder).
    """

    i: int
    j: int
    label_i: int
    label_j: int
    score: float


@dataclass(frozen=True)
class QCNumbers:
    """The QC numbers a screening shows beside its verdict (from
    :meth:`fmmtc_core.qc.QCReport.to_dict`, fresh or as stored with the scan).

    A number that was not measured is None (no confounds: no FD; a region table: no tSNR).

    Attributes
    ----------
    n_volumes : int or None, default=None
    tr_s : float or None, default=None
        Repetition time, seconds.
    tsnr_median : float or None, default=None
        Median voxel temporal SNR inside the atlas (NIfTI only).
    fd_mean_mm, fd_max_mm : float or None, default=None
        Mean and largest framewise displacement, mm (needs the confounds file).
    frac_high_motion : float or None, default=None
        Fraction of volumes over the FD or standardised-DVARS limit.
    n_regions : int or None, default=None
        Regions of the atlas.
    uncovered_regions : tuple of str, default=()
        Names of the atlas regions without (enough) signal.
    motion_known : bool, default=False
        Whether head motion was measured (FD or standardised DVARS from a confounds file).
    """

    n_volumes: int | None = None
    tr_s: float | None = None
    tsnr_median: float | None = None
    fd_mean_mm: float | None = None
    fd_max_mm: float | None = None
    frac_high_motion: float | None = None
    n_regions: int | None = None
    uncovered_regions: tuple[str, ...] = ()
    motion_known: bool = False

    @property
    def n_covered(self) -> int | None:
        """Atlas regions with signal (None when the number of regions is unknown)."""
        return None if self.n_regions is None else self.n_regions - len(self.uncovered_regions)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> QCNumbers:
        """The numbers of a QC report dict.

        Parameters
        ----------
        d : mapping or None
            :meth:`fmmtc_core.qc.QCReport.to_dict` (or the ``qc`` column of a stored scan,
            which may come from an older version and lack keys); None gives all unknown.

        Returns
        -------
        QCNumbers
            ``motion_known`` is the dict's own when it has one, else whether FD or the
            high-motion fraction was measured.
        """
        d = d or {}

        def num(key):
            v = d.get(key)
            return None if v is None else float(v)

        motion = d.get("motion_known")
        if motion is None:
            motion = d.get("fd_mean_mm") is not None or d.get("frac_high_motion") is not None
        return cls(
            n_volumes=None if d.get("n_volumes") is None else int(d["n_volumes"]),
            tr_s=num("tr_s"), tsnr_median=num("tsnr_median"), fd_mean_mm=num("fd_mean_mm"),
            fd_max_mm=num("fd_max_mm"), frac_high_motion=num("frac_high_motion"),
            n_regions=None if d.get("n_regions") is None else int(d["n_regions"]),
            uncovered_regions=tuple(str(n) for n in d.get("uncovered_regions") or ()),
            motion_known=bool(motion))

    def to_dict(self) -> dict:
        """The numbers as a JSON-ready dict (the field names, ``n_covered`` added).

        Returns
        -------
        dict
        """
        return {"n_volumes": self.n_volumes, "tr_s": self.tr_s,
                "tsnr_median": self.tsnr_median, "fd_mean_mm": self.fd_mean_mm,
                "fd_max_mm": self.fd_max_mm, "frac_high_motion": self.frac_high_motion,
                "n_regions": self.n_regions, "n_covered": self.n_covered,
                "uncovered_regions": list(self.uncovered_regions),
                "motion_known": self.motion_known}


@dataclass(frozen=True)
class ScreeningSummary:
    """Everything a screening says, in one typed record: the one shape that the CLI's JSON, the
    HTML report, the dashboard pages and the database writer read.

    Built in one place: :meth:`from_analysis` (a fresh screening) or :meth:`from_row` (a stored
    one), so a fresh and a stored screening of the same scan look the same. The explanation
    fields are None (or empty) when the screening was not explained.

    Attributes
    ----------
    participant : str
        Study pseudonym.
    probability : float
        Calibrated responder probability (mean over the fold models).
    band : tuple of 2 float
        Its uncertainty band (low, high): the spread of the fold models.
    fold_probabilities : tuple of float
        Calibrated probability of each fold model.
    decision : str
        ``"likely responder"``, ``"likely non-responder"`` or ``"uncertain"``
        (:func:`fmmtc_core.screening.decide`).
    thresholds : dict of str to float
        The decision thresholds in force (``responder``, ``non_responder``).
    qc_verdict : {"pass", "warn", "fail"}
    qc_reasons : tuple of str
        The QC report's reasons.
    model : str
        Name of the model version.
    created_at : datetime.datetime
        When the screening was made; timezone-aware (UTC).
    operator : str
        Who ran it.
    share_ts, share_fc : float or None, default=None
        Each modality's share of the total absolute attribution.
    regions : tuple of RegionScore, default=()
        Region attributions, sorted by ``|score|``, largest first (ties by region index).
    connections : tuple of ConnectionScore, default=()
        The top connections, strongest first.
    networks : dict, default={}
        Per network / lobe: ``{"ts": .., "fc": .., "total": ..}`` attribution sums.
    ig_gap : float or None, default=None
        Integrated Gradients completeness gap, relative to ``|F(x) - F(baseline)|``.
    ig_gap_abs : float or None, default=None
        The same gap in logit units.
    ig_steps : int or None, default=None
        Integration steps used.
    baseline : dict or None, default=None
        The baselines of the explanation (e.g. ``{"ts": "flat", "fc": "cohort_mean"}``).
    logit, baseline_logit : float or None, default=None
        ``F(x)`` and ``F(baseline)``: the ensemble's mean logit.
    stage_seconds : dict of str to float, default={}
        Seconds per stage of the screening.
    screening_id : int or None, default=None
        Database id; None until stored.
    reused : bool, default=False
        True when an earlier stored screening of the same inputs was returned.
    simulated : bool, default=False
        True for a simulated (demo) participant.
    attribution_method : str or None, default=None
        How the attributions were computed (the explanation's ``settings["method"]``):
        ``"integrated_gradients"`` (FMM-TC) or ``"exact_linear_attribution"`` (a classic
        baseline, linear in its features); None when not explained or not recorded.
    validity : ModelValidity, default=model_validity(None)
        What the model that made the screening is valid for, from its card
        (:func:`fmmtc_core.validity.model_validity`): every reader shows its warning. The
        default (no card known) is status ``"unknown"``, which warns.
    qc : QCNumbers, default=QCNumbers()
        The QC numbers beside the verdict (tSNR, FD, coverage, uncovered regions).
    """

    participant: str
    probability: float
    band: tuple[float, float]
    fold_probabilities: tuple[float, ...]
    decision: str
    thresholds: dict[str, float]
    qc_verdict: str
    qc_reasons: tuple[str, ...]
    model: str
    created_at: dt.datetime  # timezone-aware (UTC)
    operator: str
    share_ts: float | None = None
    share_fc: float | None = None
    regions: tuple[RegionScore, ...] = ()  # sorted by |score|, largest first
    connections: tuple[ConnectionScore, ...] = ()  # strongest first
    networks: dict[str, dict[str, float]] = field(default_factory=dict)
    ig_gap: float | None = None
    ig_gap_abs: float | None = None
    ig_steps: int | None = None
    baseline: dict | None = None
    logit: float | None = None
    baseline_logit: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    screening_id: int | None = None  # None until stored
    reused: bool = False
    simulated: bool = False
    attribution_method: str | None = None

    @property
    def exact_attribution(self) -> bool:
        """Whether the attributions are exact (a classic baseline, linear in its features)
        rather than Integrated Gradients."""
        return self.attribution_method == EXACT_ATTRIBUTION
    validity: ModelValidity = field(default_factory=lambda: model_validity(None))
    qc: QCNumbers = field(default_factory=QCNumbers)

    @property
    def runtime_s(self) -> float:
        """Total seconds of the screening: the sum of :attr:`stage_seconds`."""
        return float(sum(self.stage_seconds.values()))

    @property
    def share_note(self) -> str:
        """What the modality shares mean for this screening, and why a share is 0 or small:
        the meaning, then :attr:`share_reason` when there is one.

        ``"This screening was not explained."`` when it has no shares.
        """
        if self.share_ts is None:
            return "This screening was not explained."
        text = ("Shares of the total absolute attribution: how much of the change from the "
                "baseline participant came through each modality.")
        return f"{text} {self.share_reason}" if self.share_reason else text

    @property
    def share_reason(self) -> str:
        """Why the time-series (or connectivity) share is 0 or small; empty when it needs no
        explanation.

        A time-series share of 0 % has three different causes, which must not be confused
        with "the time series does not matter": the model has no time-series branch; the
        explanation held the time series fixed at the scan (a foundation encoder too large to
        attribute on this device, see :func:`fmmtc_core.explain.explain`), so its share is not
        measured; or it was measured and is genuinely small. The sentence names which, from
        the explanation's recorded :attr:`baseline`.
        """
        b, ts, fc = self.baseline, self.share_ts, self.share_fc or 0.0
        if ts is None:
            return ""
        if not b:
            return ("How the time series was treated was not recorded for this screening, so "
                    "a 0 % time-series share cannot be read as a finding." if ts == 0 else "")
        if "ts" not in b and "amplitude" not in b:
            return ("This model has no time-series branch (it reads connectivity only), so "
                    "the time-series share is 0 % by design, not a finding.")
        if str(b.get("ts", "")).startswith(_TS_HELD):
            held = ("Integrated Gradients held the time-series encoder's input fixed at this "
                    "scan (attributing it is too costly for this encoder on this device)")
            if "amplitude" in b:
                return held + (", so the time-series share counts only the regional "
                               "amplitude; the encoder's contribution is not measured.")
            return held + (", so the time-series share is 0 % by construction: the "
                           "encoder's contribution is not measured, which does not mean the "
                           "time series does not matter.")
        if 0 < ts < 0.005 or (ts == 0 and fc > 0):
            return (f"The time-series share is genuinely small ({format_share(ts)}): this "
                    "prediction moved almost entirely with the connectivity.")
        if "fc" in b and (0 < fc < 0.005 or (fc == 0 and ts > 0)):
            return (f"The connectivity share is genuinely small ({format_share(fc)}): this "
                    "prediction moved almost entirely with the time series.")
        return ""

    @classmethod
    def from_analysis(cls, a: Analysis, *, participant: str, model: str, operator: str,
                      created_at: dt.datetime | None = None, simulated: bool = False,
                      card: Mapping | None = None) -> ScreeningSummary:
        """The summary of a fresh analysis.

        Parameters
        ----------
        a : Analysis
            What :func:`fmmtc_core.screening.analyse` computed.
        participant : str
            Study pseudonym.
        model : str
            Name of the model version.
        operator : str
            Who ran the screening.
        created_at : datetime.datetime or None, default=None
            When; None: now, UTC.
        simulated : bool, default=False
            Whether the participant is simulated.
        card : mapping or None, default=None
            The model's card, for :attr:`validity`; None: unknown (the result warns).

        Returns
        -------
        ScreeningSummary
            Not yet stored (``screening_id`` None).
        """
        e = a.explanation
        extra: dict = {}
        if e is not None:
            regions, connections = explanation_scores(e)
            extra = dict(
                share_ts=float(e.modality_share["ts"]), share_fc=float(e.modality_share["fc"]),
                regions=regions, connections=connections, networks=dict(e.networks), ig_gap=float(e.ig_gap),
                ig_gap_abs=float(e.ig_gap_abs), ig_steps=int(e.steps), baseline=e.baseline,
                logit=float(e.logit), baseline_logit=float(e.baseline_logit),
                attribution_method=e.settings.get("method"))
        return cls(
            participant=participant, probability=float(a.probability),
            band=(float(a.band[0]), float(a.band[1])),
            fold_probabilities=tuple(float(p) for p in a.fold_probabilities),
            decision=a.decision, thresholds=dict(a.thresholds), qc_verdict=a.qc.verdict,
            qc_reasons=tuple(a.qc.reasons), model=model, operator=operator,
            created_at=created_at or dt.datetime.now(dt.timezone.utc), simulated=simulated,
            stage_seconds={k: float(v) for k, v in a.stage_seconds.items()},
            validity=model_validity(card, model), qc=QCNumbers.from_dict(a.qc.to_dict()),
            **extra)

    @classmethod
    def from_row(cls, sc: Screening, *, reused: bool = False) -> ScreeningSummary:
        """The summary of a stored screening.

        Parameters
        ----------
        sc : fmmtc_core.store.models.Screening
            The ORM row with its relations loaded (participant, scan, model version, regions,
            connections; :func:`fmmtc_core.store.repository.get_screening`). A ``created_at``
            without a time zone is read as UTC.
        reused : bool, default=False
            Mark the summary as an earlier screening returned again.

        Returns
        -------
        ScreeningSummary
        """
        exp = sc.explanation or {}
        regions = sorted(sc.regions, key=lambda r: (-abs(r.total), r.region_index))
        created = sc.created_at
        if created.tzinfo is None:  # the database keeps UTC without a zone
            created = created.replace(tzinfo=dt.timezone.utc)
        return cls(
            participant=sc.participant.pseudonym, probability=float(sc.probability),
            band=(float(sc.band_low), float(sc.band_high)),
            fold_probabilities=tuple(float(p) for p in sc.fold_probabilities),
            decision=sc.decision, thresholds=dict(sc.thresholds),
            qc_verdict=sc.scan.qc_verdict, qc_reasons=tuple((sc.scan.qc or {}).get("reasons", [])),
            model=sc.model_version.name, created_at=created, operator=sc.operator,
            share_ts=sc.share_ts, share_fc=sc.share_fc,
            regions=tuple(RegionScore(r.region_index, r.label, r.name, r.network, r.ts, r.fc,
                                      r.total) for r in regions),
            connections=tuple(ConnectionScore(c.region_i, c.region_j, c.label_i, c.label_j,
                                              c.score) for c in sc.connections),
            networks=exp.get("networks", {}), ig_gap=sc.ig_gap,
            ig_gap_abs=exp.get("ig_gap_abs"), ig_steps=sc.ig_steps,
            baseline=exp.get("baseline"), logit=exp.get("logit"),
            baseline_logit=exp.get("baseline_logit"), stage_seconds=dict(sc.stage_seconds),
            screening_id=sc.id, reused=reused, simulated=bool(sc.participant.simulated),
            attribution_method=(exp.get("settings") or {}).get("method"),
            validity=model_validity(sc.model_version.card, sc.model_version.name),
            qc=QCNumbers.from_dict(sc.scan.qc))

    def to_dict(self, *, n_regions: int | None = None) -> dict:
        """The summary as a JSON-ready dict (the ``fmmtc screen --json`` output).

        Parameters
        ----------
        n_regions : int or None, default=None
            Keep only the first (strongest) regions; None keeps all.

        Returns
        -------
        dict
            ``screening_id``, ``participant_id`` (the pseudonym), ``reused``, ``simulated``,
            ``probability``, ``band``, ``fold_probabilities``, ``decision``, ``thresholds``,
            ``qc`` (``verdict``, ``reasons``), ``modality_share`` (``ts``, ``fc``), ``regions``
            (``label``, ``name``, ``score``, ``ts``, ``fc``, ``network``),
            ``top_connections`` (the :class:`ConnectionScore` fields), ``networks``,
            ``ig_gap``, ``ig_gap_abs``, ``steps``, ``method`` (:attr:`attribution_method`),
            ``baseline``, ``logit``, ``baseline_logit``, ``stage_seconds``, ``runtime_s``
            (both rounded to 0.1 ms), ``model``, ``model_validity`` (:meth:`ModelValidity.to_dict
            <fmmtc_core.validity.ModelValidity.to_dict>`: whether the result carries a
            warning, and why), ``operator`` and ``created_at`` (ISO 8601). ``qc`` also holds
            the numbers of :meth:`QCNumbers.to_dict`.
        """
        regions = self.regions if n_regions is None else self.regions[:n_regions]
        return {
            "screening_id": self.screening_id, "participant_id": self.participant,
            "reused": self.reused, "simulated": self.simulated,
            "probability": self.probability, "band": list(self.band),
            "fold_probabilities": list(self.fold_probabilities), "decision": self.decision,
            "thresholds": self.thresholds,
            "qc": {"verdict": self.qc_verdict, "reasons": list(self.qc_reasons),
                   **self.qc.to_dict()},
            "modality_share": {"ts": self.share_ts, "fc": self.share_fc},
            "regions": [{"label": r.label, "name": r.name, "score": r.score, "ts": r.ts,
                         "fc": r.fc, "network": r.network} for r in regions],
            "top_connections": [vars(c) for c in self.connections],
            "networks": self.networks, "ig_gap": self.ig_gap, "ig_gap_abs": self.ig_gap_abs,
            "steps": self.ig_steps, "method": self.attribution_method,
            "baseline": self.baseline, "logit": self.logit,
            "baseline_logit": self.baseline_logit,
            "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
            "runtime_s": round(self.runtime_s, 4), "model": self.model,
            "model_validity": self.validity.to_dict(), "operator": self.operator,
            "created_at": self.created_at.isoformat(),
        }

    def attribution_rows(self) -> tuple[list[dict], list[dict]]:
        """The region and top-connection rows as the database stores them.

        Returns
        -------
        region_rows, connection_rows : list of dict
            See :func:`attribution_rows`.
        """
        return attribution_rows(self.regions, self.connections)


def explanation_scores(e: Explanation) -> tuple[tuple[RegionScore, ...],
                                                 tuple[ConnectionScore, ...]]:
    """An explanation's region scores (sorted by |score|, largest first) and top connections.

    Parameters
    ----------
    e : Explanation
        Integrated Gradients attributions (:class:`fmmtc_core.explain.Explanation`).

    Returns
    -------
    regions : tuple of RegionScore
        Every region, largest ``|score|`` first (ties by region index).
    connections : tuple of ConnectionScore
        The explanation's top connections, in its order (strongest first).
    """
    order = np.argsort(-np.abs(e.region_total), kind="stable")
    regions = tuple(RegionScore(int(i), int(e.labels[i]), str(e.names[i]), str(e.groups[i]),
                                float(e.region_ts[i]), float(e.region_fc[i]),
                                float(e.region_total[i])) for i in order)
    connections = tuple(ConnectionScore(int(c["i"]), int(c["j"]), int(c["label_i"]),
                                        int(c["label_j"]), float(c["score"]))
                        for c in e.top_connections)
    return regions, connections


def attribution_rows(regions, connections) -> tuple[list[dict], list[dict]]:
    """Region and connection scores as the database's attribution rows.

    Parameters
    ----------
    regions : iterable of RegionScore
        Any order.
    connections : iterable of ConnectionScore
        Strongest first: their order becomes the rank.

    Returns
    -------
    region_rows : list of dict
        In atlas order: ``region_index``, ``label``, ``name``, ``network``, ``ts``, ``fc``,
        ``total`` (the columns of :class:`fmmtc_core.store.models.RegionAttribution`).
    connection_rows : list of dict
        By rank (0 first): ``rank``, ``region_i``, ``region_j``, ``label_i``, ``label_j``,
        ``score`` (the columns of :class:`fmmtc_core.store.models.ConnectionAttribution`).
    """
    region_rows = sorted(({"region_index": r.region_index, "label": r.label, "name": r.name,
                           "network": r.network, "ts": r.ts, "fc": r.fc, "total": r.score}
                          for r in regions), key=lambda d: d["region_index"])
    connection_rows = [{"rank": k, "region_i": c.i, "region_j": c.j, "label_i": c.label_i,
                        "label_j": c.label_j, "score": c.score}
                       for k, c in enumerate(connections)]
    return region_rows, connection_rows
