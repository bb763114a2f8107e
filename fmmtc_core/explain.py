"""Integrated Gradients explanations of FMM-TC predictions, over both modalities.

(A classic baseline's model folder is linear in its features: :func:`explain` hands it to
:meth:`ClassicModel.explain <fmmtc_core.models.classic.ClassicModel.explain>`, whose
attributions are exact and come in the same :class:`Explanation`.)

What is explained
-----------------
The ensemble's mean responder **logit** (before Platt calibration, which is a monotone map), as
a function of the model's two inputs: the time-series input ``X_T`` and the connectivity input
``X_C`` (R x R, Fisher z; for ``fc_input="gram"`` models the windows' Gram matrix, held as its
own input so the two branches are attributed separately). ``X_T`` is what the model was
trained on (:meth:`~fmmtc_core.models.ensemble.FMMTCEnsemble.inputs`): every model input window
of the scan (whole-scan models: the encoder's windows, after its resampling and scaling; the
forward pass is the mean over windows of the encoder's embedding), or the robust-scaled centred
window (R x T) of older models. Gradients flow through the whole fused model, the frozen
foundation encoder included: freezing stops parameter updates, not input gradients. Window
attributions are mapped back to the atlas's region order (channels summed) and laid end to end
in time, so ``Explanation.ts`` is ``(R, W x L)``.

Large encoders: Integrated Gradients runs the encoder forward and backward once per
integration point and window, which for BrainLM-111M/650M on a CPU takes many minutes per
scan. :func:`explain` therefore attributes the time-series input only when the encoder is small
enough for the device (:data:`TS_IG_MAX_PARAMETERS`; ``ts_attribution=True`` forces it, with
the steps capped at :data:`LARGE_ENCODER_STEPS`); otherwise the time series is held at the
scan's value, only the connectivity is attributed, and the result says so
(``baseline["ts"]`` is ``"held at the scan (not attributed)"``).

Integrated Gradients (Sundararajan et al., 2017) integrates the gradient along the straight
path from a baseline ``b`` to the input ``x``::

    IG_i(x) = (x_i - b_i) * integral_0^1 dF(b + a (x - b)) / dx_i da

Its *completeness* axiom says the attributions add up to ``F(x) - F(b)``; the numerical
integral does so only approximately. The difference (captum's convergence delta) is the
**completeness gap**. :func:`explain` measures it for every explanation and refines the rule
until the gap is below ``rel_tol`` (1 %) of ``|F(x) - F(b)|``, or the schedule is exhausted;
the steps used and the final gap are returned with the attributions (and stored with every
screening). The default rule is **nested**: Clenshaw-Curtis with 2 -> 4 -> ... -> 64
intervals, whose nodes at each level include those of the level before, so a refinement
computes only the new gradients (65 at most, against 8 + 16 + 32 + 64 = 120 for captum's
Gauss-Legendre rule, which does not nest and is kept as ``quadrature="gausslegendre"``). A
model that is linear in an input (the ``small`` preset's read-outs) is integrated exactly by
the first level: 3 gradients.

Baselines ("what would the model say about a participant with no information?")
- time series: ``"flat"``: all zeros, i.e. every region at its median after robust scaling;
- connectivity: ``"cohort_mean"``: the mean connectivity of the training cohort, stored with the
  model (``"zero"``: no connectivity at all, is the alternative);
- or any array of the input's shape. The choice is recorded with the result.

Ensembles
---------
The explanation of the fold ensemble is the **mean of the fold models' attributions**. Because
Integrated Gradients is linear in the function for a fixed path and quadrature, this equals the
attribution of the ensemble's mean logit, which is how it is computed: the shared frozen encoder
runs once per integration point, not once per fold.

Units and colours
-----------------
Attributions are in logit units: a positive score pushed this participant towards "responder"
relative to the baseline, a negative one towards "non-responder" (red / blue in the dashboard).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch

from fmmtc_core._errors import InvalidInputError, check_option
from fmmtc_core.atlas import Atlas, load_atlas

__all__ = [
    "Explanation",
    "explain",
    "region_summaries",
    "region_map",
    "auto_batch_size",
    "couples_batch",
    "DEFAULT_STEPS",
    "NESTED_STEPS",
    "QUADRATURES",
    "LARGE_ENCODER_STEPS",
    "TS_IG_MAX_PARAMETERS",
]

#: Gauss-Legendre node counts tried in turn (``quadrature="gausslegendre"``, captum's rule)
#: until the completeness gap is small enough.
DEFAULT_STEPS = (8, 16, 32, 64)
#: Clenshaw-Curtis interval counts tried in turn (``quadrature="clenshaw-curtis"``, the
#: default): each level's nodes include the previous level's, so a refinement computes only
#: the new half (2 + 1, then 2, 4, ... new gradients: 65 in all at 64 intervals).
NESTED_STEPS = (2, 4, 8, 16, 32, 64)
QUADRATURES = ("clenshaw-curtis", "gausslegendre")
#: Largest encoder (parameters) whose time-series input is attributed by default, per device
#: type: IG costs one encoder forward and backward per integration point and window.
TS_IG_MAX_PARAMETERS = {"cpu": 20_000_000, "cuda": 1_000_000_000, "mps": 200_000_000}
#: The step schedule for an encoder above that size when ``ts_attribution=True`` forces it.
LARGE_ENCODER_STEPS = (8,)

Progress = Callable[[str, int, int, dict], None] | None


@dataclass
class Explanation:
    """Integrated Gradients attributions of one prediction, and their summaries.

    Built by :func:`explain`; each field is also an attribute of the same name.

    Parameters
    ----------
    ts : ndarray (R, T) or None
        Attribution of every time-series input sample, atlas region order: the centred window
        (older models), or the scan's windows laid end to end (``T = W x L`` samples at the
        encoder's TR). None when the model has no TS branch or its input was not attributed.
    fc : ndarray (R, R) or None
        Attribution of every connectivity entry (both triangles).
    region_ts, region_fc, region_total : ndarray (R,)
        Per region: time-series attribution summed over time; connectivity attribution with each
        symmetric edge's attribution (``A[i, j] + A[j, i]``) shared equally between its two
        regions; their sum. ``region_total.sum()`` equals the total attribution.
    labels : ndarray of int (R,)
        The atlas's integer label of each region.
    names, groups : tuple of str
        Region names and their network / lobe.
    top_connections : list of dict
        The strongest edges by absolute attribution: ``i``, ``j`` (region indices), ``label_i``,
        ``label_j``, ``name_i``, ``name_j``, ``score``.
    networks : dict
        Per network / lobe: ``{"ts": .., "fc": .., "total": ..}`` attribution sums.
    modality_share : dict
        ``{"ts": .., "fc": ..}``: each modality's share of the total absolute attribution.
    logit, baseline_logit : float
        ``F(x)`` and ``F(baseline)`` of the ensemble's mean logit.
    ig_gap : float
        Completeness gap relative to ``|F(x) - F(baseline)|``.
    ig_gap_abs : float
        The same gap in logit units.
    steps : int
        The last level used: Clenshaw-Curtis intervals or Gauss-Legendre nodes
        (``settings["quadrature"]``; ``settings["evaluations"]`` counts the gradients).
    baseline : dict
        The baselines used (``{"ts": "flat", "fc": "cohort_mean"}``, or ``"custom"``;
        ``"held at the scan (not attributed)"`` for a time series not attributed), one key
        per branch of the model.
    runtime_s : float, default=0.0
        Wall-clock seconds :func:`explain` took.
    amplitude : ndarray (R,) or None, default=None
        Attribution of each region's relative amplitude (models that read it; part of the
        time-series modality: included in ``region_ts`` and in the ``ts`` share); for models
        that read the regional dynamics, the sum over the region's 4 values.
    settings : dict, default={}
        How the attributions were computed: ``method``, ``quadrature``, ``rel_tol``,
        ``abs_tol``, ``schedule`` (the node counts allowed), ``internal_batch_size``,
        ``target``, ``baseline``, ``ts_attribution`` and, when the time series was not
        attributed or its steps were capped, ``ts_note`` saying why.
    """

    ts: np.ndarray | None
    fc: np.ndarray | None
    region_ts: np.ndarray
    region_fc: np.ndarray
    region_total: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    groups: tuple[str, ...]
    top_connections: list[dict]
    networks: dict
    modality_share: dict
    logit: float
    baseline_logit: float
    ig_gap: float
    ig_gap_abs: float
    steps: int
    baseline: dict
    runtime_s: float = 0.0
    amplitude: np.ndarray | None = None
    settings: dict = field(default_factory=dict)

    def ranked_regions(self, n: int | None = None) -> list[dict]:
        """Regions sorted by absolute total score, descending (``label``, ``name``, ``score``,
        ``ts``, ``fc``, ``network``).

        Parameters
        ----------
        n : int or None, default=None
            Keep the first ``n`` regions; None keeps all.

        Returns
        -------
        list of dict
            One dict per region: ``label`` (atlas label), ``name``, ``score``
            (``region_total``), ``ts`` (``region_ts``), ``fc`` (``region_fc``) and
            ``network`` (its group). Ties keep the atlas order.
        """
        order = np.argsort(-np.abs(self.region_total), kind="stable")
        if n is not None:
            order = order[:n]
        return [{"label": int(self.labels[i]), "name": self.names[i],
                 "score": float(self.region_total[i]), "ts": float(self.region_ts[i]),
                 "fc": float(self.region_fc[i]), "network": self.groups[i]} for i in order]

    def to_dict(self, *, n_regions: int | None = None) -> dict:
        """JSON-ready summary: the explanation part of the ``fmmtc explain --json`` output.

        :meth:`fmmtc_core.screening.Analysis.to_dict` adds the prediction to it.

        Parameters
        ----------
        n_regions : int or None, default=None
            Keep the first (strongest) regions of :meth:`ranked_regions`; None keeps all.

        Returns
        -------
        dict
            ``regions`` (``label``, ``name`` and ``score`` of each ranked region),
            ``modality_share``, ``top_connections``, ``networks``, ``ig_gap``,
            ``ig_gap_abs``, ``steps``, ``evaluations`` (gradients computed; ``steps``
            when not recorded), ``quadrature`` (None for exact attributions), ``method``
            (``settings["method"]``:
            ``"integrated_gradients"`` unless recorded otherwise), ``baseline``, ``logit``,
            ``baseline_logit`` and ``runtime_s``. Neither the attribution arrays nor the
            rest of ``settings`` are included.
        """
        return {
            "regions": [{k: r[k] for k in ("label", "name", "score")}
                        for r in self.ranked_regions(n_regions)],
            "modality_share": {k: float(v) for k, v in self.modality_share.items()},
            "top_connections": self.top_connections,
            "networks": self.networks,
            "ig_gap": float(self.ig_gap),
            "ig_gap_abs": float(self.ig_gap_abs),
            "steps": int(self.steps),
            "evaluations": int(self.settings.get("evaluations", self.steps)),
            "quadrature": self.settings.get("quadrature"),
            "method": str(self.settings.get("method", "integrated_gradients")),
            "baseline": self.baseline,
            "logit": float(self.logit),
            "baseline_logit": float(self.baseline_logit),
            "runtime_s": float(self.runtime_s),
        }


# --------------------------------------------------------------------------------------------
# Summaries (pure numpy; also used to rebuild summaries from stored attributions)
# --------------------------------------------------------------------------------------------
def region_summaries(ts: np.ndarray | None, fc: np.ndarray | None, n_regions: int):
    """Per-region TS, FC and total attribution (see :class:`Explanation`).

    Parameters
    ----------
    ts : ndarray (R, T) or None
        Time-series attributions; None counts as zero.
    fc : ndarray (R, R) or None
        Connectivity attributions; None counts as zero.
    n_regions : int
        R (the size of the zeros used for a missing modality).

    Returns
    -------
    region_ts : ndarray of float64 (R,)
        ``ts`` summed over time.
    region_fc : ndarray of float64 (R,)
        ``(fc.sum(axis=0) + fc.sum(axis=1)) / 2``: each edge's two entries shared equally
        between its two regions (a diagonal entry goes to its region whole).
    region_total : ndarray of float64 (R,)
        ``region_ts + region_fc``.
    """
    r_ts = np.zeros(n_regions) if ts is None else ts.astype(np.float64).sum(axis=1)
    if fc is None:
        r_fc = np.zeros(n_regions)
    else:
        a = fc.astype(np.float64)
        r_fc = (a.sum(axis=0) + a.sum(axis=1)) / 2.0
    return r_ts, r_fc, r_ts + r_fc


def _top_connections(fc: np.ndarray | None, atlas_labels, names, n_top: int) -> list[dict]:
    if fc is None or n_top <= 0:
        return []
    edge = fc.astype(np.float64) + fc.T.astype(np.float64)
    iu, ju = np.triu_indices(edge.shape[0], k=1)
    vals = edge[iu, ju]
    order = np.argsort(-np.abs(vals), kind="stable")[:n_top]
    return [{"i": int(iu[k]), "j": int(ju[k]), "label_i": int(atlas_labels[iu[k]]),
             "label_j": int(atlas_labels[ju[k]]), "name_i": names[iu[k]],
             "name_j": names[ju[k]], "score": float(vals[k])} for k in order]


def _networks(groups, r_ts, r_fc) -> dict:
    out: dict[str, dict] = {}
    for g, a, b in zip(groups, r_ts, r_fc):
        d = out.setdefault(g, {"ts": 0.0, "fc": 0.0, "total": 0.0})
        d["ts"] += float(a)
        d["fc"] += float(b)
        d["total"] += float(a + b)
    return dict(sorted(out.items(), key=lambda kv: -abs(kv[1]["total"])))


def _share(ts, fc) -> dict:
    m_ts = 0.0 if ts is None else float(np.abs(ts).sum())
    m_fc = 0.0 if fc is None else float(np.abs(fc).sum())
    total = m_ts + m_fc
    if total == 0.0:
        return {"ts": 0.0, "fc": 0.0}
    return {"ts": m_ts / total, "fc": m_fc / total}


# --------------------------------------------------------------------------------------------
# Integrated Gradients
# --------------------------------------------------------------------------------------------
def _ensemble_logit_fn(ens, use_ts: bool, use_fc: bool, fixed_ts: torch.Tensor | None = None,
                       use_amplitude: bool = False):
    """F(inputs) -> mean scaled fold logit (B,), with the frozen encoder run once per call.

    Inputs, in order: the TS windows (when ``use_ts`` and not ``fixed_ts``), the connectivity
    (``use_fc``), the regional amplitude (``use_amplitude``). ``use_ts`` means the model has a
    TS encoder; ``fixed_ts`` (1, hidden): its embedding held fixed (the TS input is not an
    input of F).
    """
    models = ens.models
    first = models[0]
    xyz = ens.xyz
    # each fold model's logit divisor (FMMTCEnsemble.fold_scale; 1 for a hand-built ensemble)
    scale = [float(v) for v in getattr(ens, "fold_scale", [1.0] * len(models))]
    attributed_ts = use_ts and fixed_ts is None

    def forward(*inputs):
        it = iter(inputs)
        window = next(it) if attributed_ts else None
        c = next(it) if use_fc else None
        amp = next(it) if use_amplitude else None
        batch = next((t.shape[0] for t in (c, amp) if t is not None), 1)
        shared: torch.Tensor | None
        if fixed_ts is not None:
            shared = fixed_ts.expand(batch, -1)
        else:
            shared = first.embed_ts(window, xyz) if (use_ts and first.frozen_ts) else None
        out = 0.0
        for m, s in zip(models, scale):
            ts = shared if shared is not None else (m.embed_ts(window, xyz) if use_ts else None)
            out = out + (m.forward_features(ts, c) if amp is None
                         else m.forward_features(ts, c, amp)) / s
        return out / len(models)

    return forward


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.6 * free)
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return min(int(line.split()[1]) * 1024 // 4, 8 << 30)
    except OSError:
        pass
    return 2 << 30


def auto_batch_size(ens, n_windows: int = 1) -> int:
    """Integration points per pass that fit the memory budget: 60 % of the free memory of a
    CUDA device, otherwise (CPU, MPS) a quarter of the available RAM (at most 8 GiB; 2 GiB
    when ``/proc/meminfo`` cannot be read); at most 32 on CUDA, 8 otherwise.

    The cost of one point is estimated from the encoder's geometry (activations kept for the
    backward pass: ~6 x hidden + 4 x FFN + 4 x heads x landmarks floats per token and layer,
    calibrated on the demo and BrainLM-111M-sized encoders; see bench/bench_explain.py; for a
    ViT-MAE, its image patches are the tokens), times the ``n_windows`` windows a point
    carries, plus 150 MB for the connectivity branch, the head and captum's copies of the
    inputs.

    Parameters
    ----------
    ens : FMMTCEnsemble
        The model; its first fold model's ``ts_encoder`` (if any) and its ``device`` are read.
    n_windows : int, default=1
        Encoder windows one integration point carries (values below 1 count as 1).

    Returns
    -------
    int
        Between 1 and the cap (32 on CUDA, 8 otherwise).
    """
    first = ens.models[0]
    per_point = 150 << 20
    encoder = getattr(first, "ts_encoder", None)
    if encoder is not None:
        per_point += _encoder_bytes(encoder) * max(1, int(n_windows))
    cap = 32 if ens.device.type == "cuda" else 8
    return int(max(1, min(cap, _available_bytes(ens.device) // per_point)))


def couples_batch(encoder) -> bool:
    """Whether the encoder's output for one input depends on the other inputs of its batch.

    A BrainLM encoder with Nystrom attention and the reference's default pseudo-inverse
    start (``inv_coeff_init_option=False``) scales that start by a maximum over the whole
    batch, so integration points evaluated together change each other's output: measured on
    the demo encoder at 4.6e-6 of F(x) - F(baseline), a floor under the completeness gap of
    any rule that batches its points (``python bench/explain_floor.py``). Such an encoder is
    integrated one point per pass, which is what a screening evaluates.

    Parameters
    ----------
    encoder : FoundationEncoder or nn.Module or None
        A fold model's ``ts_encoder``.

    Returns
    -------
    bool
    """
    from fmmtc_core.models.encoder_base import FoundationEncoder

    if encoder is None:
        return False
    model = encoder.model if isinstance(encoder, FoundationEncoder) else encoder
    c = getattr(model, "config", None)
    return (getattr(c, "attention_mode", None) == "nystrom"
            and not getattr(c, "inv_coeff_init_option", True))


def _encoder_bytes(encoder) -> int:
    """Activation bytes one window keeps for the backward pass (see :func:`auto_batch_size`)."""
    from fmmtc_core.models.encoder_base import FoundationEncoder

    c: Any = encoder.model.config if isinstance(encoder, FoundationEncoder) else encoder.config
    if hasattr(c, "num_brain_voxels"):  # BrainLM: region x time-patch tokens
        tokens = c.num_brain_voxels * c.n_patches + 1
        attention = 4 * c.num_attention_heads * c.num_landmarks
    else:  # ViT-MAE: image patches
        side = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
        tokens = (side // c.patch_size) ** 2 + 1
        attention = 4 * c.num_attention_heads * 64  # memory-efficient SDPA blocks
    floats = 6 * c.hidden_size + 4 * c.intermediate_size + attention
    return int(tokens * c.num_hidden_layers * floats * 4)


def _baseline_arrays(ens, window, baseline_ts, baseline_fc):
    r = ens.models[0].config.n_regions
    if isinstance(baseline_ts, str):
        check_option("baseline_ts", baseline_ts, ("flat",))
        b_ts, name_ts = np.zeros(window.shape, np.float32), baseline_ts
    else:
        b_ts = np.asarray(baseline_ts, dtype=np.float32)
        if b_ts.shape != window.shape:
            raise InvalidInputError(
                f"baseline_ts has shape {b_ts.shape}; the window is {window.shape}.")
        name_ts = "custom"
    if isinstance(baseline_fc, str):
        check_option("baseline_fc", baseline_fc, ("cohort_mean", "zero"))
        if baseline_fc == "zero":
            b_fc = np.zeros((r, r), np.float32)
        elif ens.models[0].config.fc_input == "gram":
            key = "cohort_mean_gram"
            mean = ens.extra.get(key)
            b_fc = (np.zeros((r, r), np.float32) if mean is None
                    else mean.detach().float().cpu().numpy())
        else:
            b_fc = ens.cohort_mean_fc.detach().float().cpu().numpy()
        name_fc = baseline_fc
    else:
        b_fc = np.asarray(baseline_fc, dtype=np.float32)
        if b_fc.shape != (r, r):
            raise InvalidInputError(f"baseline_fc has shape {b_fc.shape}; expected {(r, r)}.")
        name_fc = "custom"
    return b_ts, b_fc, {"ts": name_ts, "fc": name_fc}


def _ts_attribution(ens, asked: bool | None, steps: tuple[int, ...],
                    use_fc: bool) -> tuple[bool, tuple[int, ...], str | None]:
    """Whether to attribute the TS input, the step schedule, and a note on the choice."""
    from fmmtc_core.models.encoder_base import FoundationEncoder

    if asked is False and not use_fc:
        raise InvalidInputError("This model has only a time-series branch: ts_attribution=False "
                                "would leave nothing to attribute.")
    first = ens.models[0]
    encoder = getattr(first, "ts_encoder", None)
    if not isinstance(encoder, FoundationEncoder) or not first.frozen_ts:
        return True if asked is None else bool(asked), steps, None
    n = encoder.entry.n_parameters
    limit = TS_IG_MAX_PARAMETERS.get(ens.device.type, TS_IG_MAX_PARAMETERS["cpu"])
    large = n > limit
    if asked is False or (asked is None and large and use_fc):
        why = (f"time series not attributed: encoder {encoder.entry.name!r} has "
               f"{encoder.entry.size} parameters, above {limit / 1e6:g} M on "
               f"{ens.device.type}" if large else "time series not attributed (asked)")
        return False, steps, why
    if large:
        capped = tuple(s for s in steps if s <= LARGE_ENCODER_STEPS[-1]) or LARGE_ENCODER_STEPS
        return True, capped, (f"steps capped at {capped[-1]}: encoder {encoder.entry.name!r} "
                              f"has {encoder.entry.size} parameters")
    return True, steps, None


def clenshaw_curtis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Clenshaw-Curtis nodes and weights on [0, 1] with ``n`` intervals (``n + 1`` nodes).

    Nodes ``(1 - cos(k pi / n)) / 2``, k = 0..n; the nodes of ``n`` are the even nodes of
    ``2 n`` (nested). Weights by Waldvogel's explicit formula (exact for polynomials of degree
    ``n``; they sum to 1).

    Parameters
    ----------
    n : int
        Intervals, >= 1.

    Returns
    -------
    nodes, weights : ndarray (n + 1,)
    """
    k = np.arange(n + 1)
    nodes = (1.0 - np.cos(np.pi * k / n)) / 2.0
    if n == 1:
        return nodes, np.array([0.5, 0.5])
    theta = np.pi * k / n
    v = np.ones(n + 1)
    for j in range(1, n // 2 + 1):
        b = 1.0 if 2 * j == n else 2.0
        v -= b * np.cos(2 * j * theta) / (4 * j * j - 1)
    c = np.full(n + 1, 2.0)
    c[0] = c[-1] = 1.0
    return nodes, c * v / n / 2.0


def _nested_integrated_gradients(forward, xs: list[torch.Tensor], bs: list[torch.Tensor],
                                 levels: tuple[int, ...], batch: int, tol: float, d_f: float,
                                 progress: Progress) -> tuple[list[torch.Tensor], float, int, int]:
    """Integrated Gradients with nested Clenshaw-Curtis rules: the gradient at each path point
    is computed once and reused by every finer level. Returns the attributions (one per
    input, with the batch axis), the absolute completeness gap, the last level's interval
    count and the number of gradient evaluations."""
    finest = max(levels)
    grads: dict[int, list[torch.Tensor]] = {}  # node index on the finest grid -> gradients
    diffs = [x - b for x, b in zip(xs, bs)]
    attrs: list[torch.Tensor] = []
    gap_abs, n = float("inf"), levels[0]
    for k, n in enumerate(levels):
        nodes, weights = clenshaw_curtis(n)
        keys = [i * (finest // n) for i in range(n + 1)]
        todo = [(key, a) for key, a in zip(keys, nodes) if key not in grads]
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            alphas = torch.tensor([a for _, a in chunk], dtype=xs[0].dtype,
                                  device=xs[0].device)
            points = []
            for b, d in zip(bs, diffs):
                shape = (-1,) + (1,) * (d.dim() - 1)
                points.append((b + alphas.view(shape) * d).requires_grad_(True))
            out = forward(*points)
            g = torch.autograd.grad(out.sum(), points)
            for j, (key, _) in enumerate(chunk):
                grads[key] = [t[j].detach() for t in g]
        w = torch.as_tensor(weights, dtype=xs[0].dtype, device=xs[0].device)
        attrs = []
        for i, d in enumerate(diffs):
            acc = torch.zeros_like(d[0])
            for key, wk in zip(keys, w):
                acc = acc + wk * grads[key][i]
            attrs.append((d[0] * acc)[None])
        total = float(sum(float(a.double().sum()) for a in attrs))
        gap_abs = abs(total - d_f)
        if progress:
            rel = gap_abs / abs(d_f) if d_f != 0 else float("inf") if gap_abs else 0.0
            progress("explain", k + 1, len(levels), {"steps": int(n), "gap": rel})
        if gap_abs <= tol:
            break
    return attrs, gap_abs, int(n), len(grads)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _check_tolerances(rel_tol, abs_tol) -> None:
    """Refuse completeness tolerances that cannot be met or mean nothing (before any work)."""
    if not _is_real(rel_tol) or not math.isfinite(rel_tol) or not 0 < rel_tol < 1:
        raise InvalidInputError(
            "Invalid value for the 'rel_tol' parameter (--tolerance): expected a finite number "
            "greater than 0 and less than 1 (the completeness gap relative to "
            f"|F(x) - F(baseline)|, e.g. 0.01), but got {rel_tol!r} instead."
        )
    if not _is_real(abs_tol) or not math.isfinite(abs_tol) or abs_tol < 0:
        raise InvalidInputError(
            "Invalid value for the 'abs_tol' parameter: expected a finite number >= 0 (a gap "
            f"in logits, e.g. 1e-4), but got {abs_tol!r} instead."
        )


def explain(
    ens,
    window: np.ndarray,
    fc: np.ndarray | None,
    *,
    baseline_ts: str | np.ndarray = "flat",
    baseline_fc: str | np.ndarray = "cohort_mean",
    rel_tol: float = 0.01,
    abs_tol: float = 1e-4,
    steps: tuple[int, ...] | None = None,
    internal_batch_size: int | None = None,
    n_top: int = 20,
    atlas: Atlas | None = None,
    progress: Progress = None,
    ts_attribution: bool | None = None,
    amplitude: np.ndarray | None = None,
    quadrature: str = "clenshaw-curtis",
) -> Explanation:
    """Integrated Gradients attributions of the ensemble's prediction for one participant.

    Parameters
    ----------
    ens : FMMTCEnsemble or ClassicModel
        A loaded model folder (:func:`fmmtc_core.models.ensemble.load_model`). The explanation
        of the fold ensemble is the mean of the fold models' attributions (computed as the
        attribution of the mean logit, which is the same thing; see the module docstring).
        A classic baseline is linear in its features: its exact attributions come from
        :meth:`ClassicModel.explain <fmmtc_core.models.classic.ClassicModel.explain>` (with
        ``fc``, ``amplitude``, ``baseline_fc``, ``n_top``, ``atlas`` and ``progress``; the
        integration settings do not apply, the tolerances are checked all the same).
    window : ndarray
        The scan's time-series input, ``ens.inputs(signals).window``
        (:meth:`~fmmtc_core.models.ensemble.FMMTCEnsemble.inputs`): every encoder window
        ``(W, ...)`` for whole-scan models, the robust-scaled ``(R, T)`` centred window of the
        model's length for older ones.
    fc : ndarray (R, R) or None
        Fisher-z connectivity of the cleaned scan (the same
        :meth:`~fmmtc_core.models.ensemble.FMMTCEnsemble.inputs`; ignored by
        ``fc_input="gram"`` models, whose connectivity input is the windows' Gram matrix).
    baseline_ts : "flat" or ndarray, the shape of ``window``, default="flat"
        ``"flat"``: zeros, every region at its median after the encoder's scaling.
    baseline_fc : "cohort_mean", "zero" or ndarray (R, R), default="cohort_mean"
        ``"cohort_mean"``: the training cohort's mean connectivity stored with the model
        (for ``fc_input="gram"`` models its mean Gram matrix, zeros when the model has none);
        ``"zero"``: all zeros.
    rel_tol : float, default=0.01
        Stop raising the number of steps once ``|gap| <= rel_tol * |F(x) - F(b)|``; a finite
        number with ``0 < rel_tol < 1`` (the CLI's ``--tolerance``).
    abs_tol : float, default=1e-4
        ... or once ``|gap| <= abs_tol`` logit (when ``F(x)`` and ``F(b)`` nearly coincide a
        relative gap means nothing); finite and >= 0.
    steps : tuple of int or None, default=None
        The quadrature's levels tried in turn; the last is the cap. ``"clenshaw-curtis"``:
        interval counts, each a multiple of the one before (nested: a level reuses every
        gradient of the previous ones), None: :data:`NESTED_STEPS` ``(2, 4, ..., 64)``.
        ``"gausslegendre"``: node counts (each attempt starts afresh), None:
        :data:`DEFAULT_STEPS` ``(8, 16, 32, 64)``.
    internal_batch_size : int or None, default=None
        Integration points evaluated per forward/backward pass (bounds memory); None:
        :func:`auto_batch_size`, or 1 for an encoder whose output depends on its batch-mates
        (:func:`couples_batch`).
    n_top : int, default=20
        Connections listed in ``top_connections``.
    atlas : Atlas or None, default=None
        Region names and networks; None: the model's atlas.
    progress : callable(stage, done, total, info) or None, default=None
        Called after attempt ``k`` (1, 2, ...) as ``progress("explain", k, len(steps),
        {"steps": n, "gap": rel_gap})``.
    quadrature : {"clenshaw-curtis", "gausslegendre"}, default="clenshaw-curtis"
        The integration rule. Clenshaw-Curtis rules with doubling interval counts are nested,
        so tightening the tolerance costs only the new points; ``"gausslegendre"`` is
        captum's rule (``IntegratedGradients.attribute(method="gausslegendre")``), whose
        nodes do not nest (8 + 16 + 32 + 64 gradients when every attempt is needed).
    ts_attribution : bool or None, default=None
        Attribute the time-series input. None: when the encoder has at most
        :data:`TS_IG_MAX_PARAMETERS` parameters for the device (else the time series is held
        at the scan's value and only the connectivity is attributed; ``settings`` says why).
        True forces it; above that size the steps are then capped at
        :data:`LARGE_ENCODER_STEPS`.
    amplitude : ndarray (R,) or None, default=None
        The scan's relative regional amplitude (``ens.inputs(signals).amplitude``); needed by
        models that read it (attributed against the training cohort's mean), ignored
        otherwise.

    Returns
    -------
    Explanation
        The attributions (``ts`` None when the model has no time-series branch or its input
        was held at the scan), their summaries, ``steps`` the last level tried (intervals
        or nodes, see ``steps``; ``settings["evaluations"]`` counts the gradients) and
        ``ig_gap`` / ``ig_gap_abs`` the completeness gap of that attempt (``ig_gap`` is
        ``inf`` when ``F(x) == F(b)`` and the gap is not 0).

    Raises
    ------
    InvalidInputError
        Before any gradient is computed: ``rel_tol``, ``abs_tol``, ``n_top``,
        ``internal_batch_size`` or ``steps`` out of range (or not nested for
        Clenshaw-Curtis), an unknown ``quadrature``; a ``window`` of the wrong shape for
        the model; no ``fc`` for a model that needs one, or an ``fc`` not (R, R); non-finite
        inputs; an unknown baseline name or a baseline array of the wrong shape;
        ``ts_attribution=False`` for a model with only a time-series branch. After the
        attribution: an ``atlas`` whose region count differs from the model's.
    """
    from captum.attr import IntegratedGradients

    t0 = time.perf_counter()
    _check_tolerances(rel_tol, abs_tol)
    if isinstance(n_top, bool) or not isinstance(n_top, (int, np.integer)) or n_top < 0:
        raise InvalidInputError(
            f"Invalid value for the 'n_top' parameter: expected an integer >= 0, but got "
            f"{n_top!r} instead."
        )
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool)
        or not isinstance(internal_batch_size, (int, np.integer))
        or internal_batch_size < 1
    ):
        raise InvalidInputError(
            "Invalid value for the 'internal_batch_size' parameter: expected a positive integer "
            f"or None, but got {internal_batch_size!r} instead."
        )
    if quadrature not in QUADRATURES:
        raise InvalidInputError(
            f"Invalid value for the 'quadrature' parameter: expected one of "
            f"{', '.join(QUADRATURES)}, but got {quadrature!r} instead.")
    nested = quadrature == "clenshaw-curtis"
    if steps is None:
        steps = NESTED_STEPS if nested else DEFAULT_STEPS
    steps = tuple(int(x) for x in steps)
    if not steps or any(x < (1 if nested else 2) for x in steps):
        raise InvalidInputError(f"steps must be a non-empty list of integers >= "
                                f"{1 if nested else 2}, got {steps}.")
    if nested and any(b % a for a, b in zip(steps, steps[1:])):
        raise InvalidInputError(
            f"Clenshaw-Curtis steps must each be a multiple of the one before (nested "
            f"levels, e.g. 2, 4, 8), got {steps}.")
    from fmmtc_core.models.classic import ClassicModel

    if isinstance(ens, ClassicModel):  # linear in its features: exact, no integral
        return ens.explain(fc, amplitude, baseline=baseline_fc, n_top=n_top, atlas=atlas,
                           progress=progress)
    first = ens.models[0]
    use_ts, use_fc = first.config.use_encoder, first.config.use_fc
    use_amp = bool(first.config.use_amplitude)
    window = np.asarray(window, dtype=np.float32)
    r = first.config.n_regions
    encoder = getattr(ens, "encoder", None) if getattr(ens, "whole_scan", False) else None
    if encoder is not None:
        from fmmtc_core.models.fmmtc import scans_gram, window_shape

        shape = window_shape(encoder)
        if window.ndim != len(shape) + 1 or window.shape[1:] != shape:
            raise InvalidInputError(
                f"This model takes every window of a scan, shape (W, "
                f"{', '.join(map(str, shape))}) (FMMTCEnsemble.inputs); got {window.shape}.")
    else:
        if window.ndim != 2 or window.shape[0] != r:
            raise InvalidInputError(
                f"The window must have shape ({r}, T) for this model, got {window.shape}.")
        if window.shape[1] != ens.window:
            raise InvalidInputError(
                f"The window has {window.shape[1]} samples; this model takes {ens.window}.")
    if use_fc:
        if first.config.fc_input == "gram":
            if encoder is not None:
                fc = scans_gram(encoder, torch.from_numpy(window)[None])[0].numpy()
            else:
                fc = window @ window.T / window.shape[1]
        elif fc is None:
            raise InvalidInputError("This model needs the connectivity matrix (fc).")
        fc = np.asarray(fc, dtype=np.float32)
        if fc.shape != (r, r):
            raise InvalidInputError(f"fc must have shape ({r}, {r}), got {fc.shape}.")
    if use_amp:
        if amplitude is None:
            raise InvalidInputError(
                "This model reads the regional amplitude: pass amplitude= "
                "(ens.inputs(signals).amplitude).")
        amplitude = np.asarray(amplitude, dtype=np.float32)
        n_amp = first.config.amplitude_size
        if amplitude.shape != (n_amp,):
            raise InvalidInputError(
                f"amplitude must have shape ({n_amp},)"
                + (" (the regional dynamics: 4 values per region)" if n_amp != r else "")
                + f", got {amplitude.shape}.")
        if not np.isfinite(amplitude).all():
            raise InvalidInputError("The model inputs contain NaN or infinite values.")
    if not (np.isfinite(window).all() and (fc is None or np.isfinite(fc).all())):
        raise InvalidInputError("The model inputs contain NaN or infinite values.")
    b_ts, b_fc, baseline = _baseline_arrays(ens, window, baseline_ts, baseline_fc)
    if not use_ts:
        baseline.pop("ts")
    if use_amp:
        # each fold model's read-out is centred on its training participants' mean amplitude
        baseline["amplitude"] = "cohort_mean"
    if not use_fc:
        baseline.pop("fc")
    ts_note = None
    if use_ts:
        ts_attribution, steps, ts_note = _ts_attribution(ens, ts_attribution, steps,
                                                         use_fc or use_amp)
        if not ts_attribution:
            baseline["ts"] = "held at the scan (not attributed)"

    dev = ens.device
    xs, bs = [], []
    x_ts = torch.from_numpy(window)[None].to(dev)
    fixed_ts = None
    if use_ts and ts_attribution:
        xs.append(x_ts)
        bs.append(torch.from_numpy(b_ts)[None].to(dev))
    elif use_ts:
        with torch.no_grad():
            fixed_ts = first.embed_ts(x_ts, ens.xyz).detach()
    if use_fc:
        xs.append(torch.from_numpy(fc)[None].to(dev))
        bs.append(torch.from_numpy(b_fc)[None].to(dev))
    if use_amp:
        assert amplitude is not None  # checked above
        # the dynamics path standardises all 4 R values (its first R as the read-out does)
        centers = [m.dynamics.center if m.dynamics is not None else m.amplitude_readout.center
                   for m in ens.models]
        xs.append(torch.from_numpy(amplitude)[None].to(dev))
        bs.append(torch.stack(centers).mean(0)[None].to(dev))
    forward = _ensemble_logit_fn(ens, use_ts, use_fc, fixed_ts, use_amp)
    if internal_batch_size is None:
        on_path = use_ts and fixed_ts is None  # the encoder is differentiated
        internal_batch_size = (
            1 if on_path and couples_batch(getattr(first, "ts_encoder", None))
            else auto_batch_size(ens, window.shape[0] if encoder is not None and on_path else 1))
    with torch.no_grad():
        f_x = float(forward(*xs)[0])
        f_b = float(forward(*bs)[0])
    d_f = f_x - f_b
    tol = max(rel_tol * abs(d_f), abs_tol)
    # Full float32 precision: bf16 autocast would put its rounding error into the gap.
    if nested:
        attrs, gap_abs, n, evaluations = _nested_integrated_gradients(
            forward, xs, bs, steps, int(internal_batch_size), tol, d_f, progress)
    else:
        ig = IntegratedGradients(forward)
        evaluations = 0
        for k, n in enumerate(steps):
            attrs, delta = ig.attribute(tuple(xs), baselines=tuple(bs), n_steps=int(n),
                                        method="gausslegendre",
                                        internal_batch_size=internal_batch_size,
                                        return_convergence_delta=True)
            evaluations += int(n)
            gap_abs = abs(float(delta[0]))
            rel_gap = gap_abs / abs(d_f) if d_f != 0 else float("inf") if gap_abs else 0.0
            if progress:
                progress("explain", k + 1, len(steps), {"steps": int(n), "gap": rel_gap})
            if gap_abs <= tol:
                break
    rel_gap = gap_abs / abs(d_f) if d_f != 0 else float("inf") if gap_abs else 0.0
    attrs_t = [a[0].detach().float() for a in attrs]
    a_ts = None
    if use_ts and ts_attribution:
        t_ts = attrs_t.pop(0)
        if encoder is not None:  # (W, ...) -> (R, W * L), atlas order, channels summed
            t_ts = encoder.to_atlas_order(t_ts, "sum").permute(1, 0, 2)
            t_ts = t_ts.reshape(t_ts.shape[0], -1)
        a_ts = t_ts.cpu().numpy()
    a_fc = attrs_t.pop(0).cpu().numpy() if use_fc else None
    a_amp_all = attrs_t.pop(0).cpu().numpy().astype(np.float64) if use_amp else None
    a_amp = a_amp_all
    if a_amp_all is not None and a_amp_all.size != r:  # regional dynamics: 4 values a region
        a_amp = a_amp_all.reshape(-1, r).sum(axis=0)

    atlas = atlas or load_atlas(ens.atlas)
    if atlas.n_regions != r:
        raise InvalidInputError(f"Atlas {atlas.name} has {atlas.n_regions} regions, the model {r}.")
    r_ts, r_fc, total = region_summaries(a_ts, a_fc, r)
    share = _share(a_ts, a_fc)
    if a_amp is not None and a_amp_all is not None:  # amplitude: part of the T modality
        r_ts, total = r_ts + a_amp, total + a_amp
        share = _share(a_amp_all if a_ts is None else np.append(a_ts.ravel(), a_amp_all),
                       a_fc)
    return Explanation(
        ts=a_ts, fc=a_fc, region_ts=r_ts, region_fc=r_fc, region_total=total,
        labels=np.asarray(atlas.labels), names=tuple(atlas.names), groups=tuple(atlas.groups),
        top_connections=_top_connections(a_fc, atlas.labels, atlas.names, n_top),
        networks=_networks(atlas.groups, r_ts, r_fc),
        modality_share=share, logit=f_x, amplitude=a_amp, baseline_logit=f_b,
        ig_gap=rel_gap, ig_gap_abs=gap_abs, steps=int(n), baseline=baseline,
        runtime_s=time.perf_counter() - t0,
        settings={"method": "integrated_gradients", "quadrature": quadrature,
                  "rel_tol": rel_tol, "abs_tol": abs_tol, "schedule": [int(s) for s in steps],
                  "evaluations": int(evaluations),
                  "internal_batch_size": int(internal_batch_size), "target": "mean fold logit",
                  "baseline": baseline, "ts_attribution": bool(use_ts and ts_attribution),
                  "amplitude_attribution": bool(use_amp),
                  **({"ts_note": ts_note} if ts_note else {})},
    )


# --------------------------------------------------------------------------------------------
# Brain maps
# --------------------------------------------------------------------------------------------
def region_map(atlas: Atlas, scores: np.ndarray) -> nib.Nifti1Image:
    """A float32 statistical map on the atlas grid: each region's voxels carry its score.

    Background and unlisted labels are 0, so the image feeds nilearn's ``plot_glass_brain`` /
    ``plot_stat_map`` directly.

    Parameters
    ----------
    atlas : Atlas
        The atlas; the map is on the grid of its ``labels_img``.
    scores : array-like (R,)
        One score per region, in the atlas's region order.

    Returns
    -------
    nibabel.Nifti1Image
        3-D float32 image with the affine of ``atlas.labels_img``. A region absent from the
        label image has no voxels to carry its score.

    Raises
    ------
    InvalidInputError
        ``scores`` does not have shape ``(atlas.n_regions,)``.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (atlas.n_regions,):
        raise InvalidInputError(
            f"Expected {atlas.n_regions} region scores for {atlas.name}, got shape {scores.shape}.")
    # One value per label of the image, through a lookup table indexed by the label (the same
    # image as nilearn's ``signals_to_img_labels``, ~30x faster: the dashboard draws a map for
    # every screening). A region that vanished from the (resampled) image has no voxels to
    # carry its score, and a label of the image that is no region of the atlas gets 0.
    labels = np.asarray(atlas.labels, dtype=np.int64)
    image = np.asanyarray(atlas.labels_img.dataobj)
    image = np.rint(image).astype(np.int64) if image.dtype.kind == "f" else image.astype(np.int64)
    top = int(max(image.max(initial=0), labels.max(initial=0)))
    if image.min(initial=0) < 0 or labels.min(initial=0) < 0 or top > 10_000_000:
        raise InvalidInputError(f"The {atlas.name} label image has labels a score map cannot "
                                "index (negative, or above 10,000,000).")
    lut = np.zeros(top + 1, dtype=np.float32)
    lut[labels] = scores
    lut[0] = 0.0  # background
    data = lut[image]
    out = nib.Nifti1Image(data, atlas.labels_img.affine)
    out.header.set_data_dtype(np.float32)
    return out
