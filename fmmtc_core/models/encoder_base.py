"""The foundation-encoder interface: one preprocessing path and one result type for every layout.

A :class:`FoundationEncoder` pairs a frozen fMRI foundation model with the preprocessing its
checkpoint was trained with (in the spirit of MedARC brainmarks' model wrappers, whose
``BrainLMTransform`` travels with the model), so that no caller can feed one checkpoint another
one's inputs. Every encoder answers the same questions:

- :attr:`FoundationEncoder.entry`: what it is (:class:`EncoderEntry`: registry name, size,
  atlas, regions, TR, window, hidden size, normalisation, ordering, padding, token order,
  pooling);
- :meth:`FoundationEncoder.windows`: cleaned region series ``(T, R)`` in the atlas's region
  order -> the model's input windows (resampled to the checkpoint's TR, normalised, every
  non-overlapping full window, regions ordered, channels repeated);
- :meth:`FoundationEncoder.embed_windows`: windows -> one embedding per window (differentiable
  with respect to the windows, so Integrated Gradients runs through it);
- :meth:`FoundationEncoder.embed_scan`: one embedding per scan (pooled over its windows; mean of
  the per-window CLS by default), cached on disk when asked;
- :attr:`FoundationEncoder.preprocessing_hash`: checkpoint digest + every preprocessing
  parameter, the key of the embedding cache.

The step functions (:func:`resample_to_tr`, :func:`stable_y_order`, :func:`cut_windows`,
:class:`RobustScaling`) are public so that tests can check each step against a hand-computed
example. Where each convention comes from is recorded in :attr:`EncoderEntry.sources`.

Short scans: a scan with fewer samples than one window (after resampling) is **padded** at the
end, as the reference evaluation code does (brainmarks ``BrainLMTransform``, ``pad_mode="mean"``):
with each region's mean of the scaled series (global robust scaling) or with 0, the region's
median, after per-window scaling (the project's own encoders, as
:func:`fmmtc_core.preprocess.make_window` does). :meth:`FoundationEncoder.plan` reports how
many samples were padded. An empty series is refused.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fmmtc_core._errors import InvalidInputError, ModelFileError, check_option

if TYPE_CHECKING:
    from fmmtc_core.atlas import Atlas

__all__ = [
    "EncoderEntry",
    "FoundationEncoder",
    "RobustScaling",
    "WindowPlan",
    "ROBUST_SCALING_FILE",
    "COORDINATES_FILE",
    "BRAINLM_TR",
    "BRAINLM_MAX_VALUE",
    "RESAMPLE_TOLERANCE_S",
    "resample_to_tr",
    "stable_y_order",
    "cut_windows",
    "series_digest",
    "window_plan",
]

#: File in a foundation folder holding the robust-scaling statistics fitted on a cohort.
ROBUST_SCALING_FILE = "robust_scaling.json"
#: The A424 coordinate table of a BrainLM download, looked for in a foundation folder.
COORDINATES_FILE = "A424_Coordinates.dat"
#: TR (s) of UK Biobank resting-state fMRI, on which every published BrainLM was pretrained
#: (brainmarks ``DEFAULT_TR = 0.735``).
BRAINLM_TR = 0.735
#: Divisor applied after robust scaling for the ViT-MAE BrainLMs (``max_val_to_scale`` in the
#: BrainLM tutorial notebook and in brainmarks; a property of their training data).
BRAINLM_MAX_VALUE = 5.6430855
#: Scans whose TR is within this many seconds of the checkpoint's are not resampled
#: (brainmarks: ``if abs(tr - target_tr) >= 0.1: resample``).
RESAMPLE_TOLERANCE_S = 0.1
#: Version of the preprocessing code, part of every preprocessing hash: bump it when a change
#: alters the embeddings of an unchanged checkpoint, so cached embeddings are not reused.
PREPROCESSING_VERSION = 1

_NORMALISATIONS = ("global-robust", "window-robust")
_TOKEN_ORDERS = ("natural", "shuffle")
_READOUTS = ("final-norm", "last-block")
_TOKEN_POOLINGS = ("cls", "mean")
_WINDOW_POOLINGS = ("mean", "centre")


# --------------------------------------------------------------------------------------------
# The description of an encoder
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderEntry:
    """What a foundation encoder is and what it expects (resolved from its folder).

    Attributes
    ----------
    name : str
        Registry entry: ``"legacy-13m"``, ``"vitmae-111m"``, ``"vitmae-650m"`` or ``"fmmtc"``.
    family : {"brainlm_mae", "vit_mae"}
        Architecture: BrainLM's Nystromformer MAE (region x time-patch tokens, coordinates
        embedded) or transformers' stock ViT-MAE on a regions x time image.
    description : str
        One line for people.
    n_parameters : int
        Parameters of the encoder (the part that embeds; a decoder is not counted).
    atlas : str
        Atlas the checkpoint was trained on (``"A424"``, ``"HCPEx"``, ...).
    n_regions : int
        Regions it expects, in that atlas's label order.
    tr : float or None
        TR (s) windows are resampled to; None keeps each scan's own sampling.
    window : int
        Samples per window.
    hidden_size : int
        Size of one embedding.
    normalisation : {"global-robust", "window-robust"}
        Per-region median / IQR fitted on a training cohort (stored in the folder as
        ``robust_scaling.json``), or over each window.
    max_value : float
        Divisor applied after robust scaling (1.0: none).
    region_order : {"y-sorted", "atlas"}
        Row order of a window: regions sorted by their Y coordinate (stable sort), or the
        atlas's label order.
    channels : int
        Copies of the window stacked as image channels (3 for ViT-MAE; 0: no channel axis).
    image_size : tuple of int or None
        ``(height, width)`` the window is padded to (ViT-MAE), symmetric halves.
    pad_value : float or None
        Value of the image padding.
    token_order : {"natural", "shuffle"}
        Order of the tokens inside the model: natural, or ``order_samples`` seeded random
        shuffles whose CLS embeddings are averaged (the reference shuffles at every call).
    order_samples : int
        Shuffles averaged when ``token_order == "shuffle"`` (1 otherwise).
    readout : {"final-norm", "last-block"}
        Token states read: after the encoder's final layer norm (``last_hidden_state``), or
        the last block's output before it (brainmarks' ``hidden_states[-1]``).
    token_pooling : {"cls", "mean"}
        One window's embedding: the CLS token, or the mean of the patch tokens.
    window_pooling : {"mean", "centre"}
        One scan's embedding: mean over all non-overlapping windows, or the single centred
        window (the convention of models trained before whole-scan embeddings).
    patch : tuple of int
        Patch size: ``(1, samples)`` for BrainLM tokens, ``(pixels, pixels)`` for ViT-MAE.
    sources : dict of str to str
        Where each convention comes from (reference file or decision), for ``inspect``.
    """

    name: str
    family: str
    description: str
    n_parameters: int
    atlas: str
    n_regions: int
    tr: float | None
    window: int
    hidden_size: int
    normalisation: str
    max_value: float
    region_order: str
    channels: int
    image_size: tuple[int, int] | None
    pad_value: float | None
    token_order: str
    order_samples: int
    readout: str
    token_pooling: str
    window_pooling: str
    patch: tuple[int, int]
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_option("normalisation", self.normalisation, _NORMALISATIONS)
        check_option("token_order", self.token_order, _TOKEN_ORDERS)
        check_option("readout", self.readout, _READOUTS)
        check_option("token_pooling", self.token_pooling, _TOKEN_POOLINGS)
        check_option("window_pooling", self.window_pooling, _WINDOW_POOLINGS)
        check_option("region_order", self.region_order, ("y-sorted", "atlas"))
        if not isinstance(self.order_samples, int) or self.order_samples < 1:
            raise InvalidInputError(
                f"order_samples must be a positive integer, got {self.order_samples!r}.")

    @property
    def size(self) -> str:
        """Parameter count in words (``"111.3 M"``)."""
        return f"{self.n_parameters / 1e6:.1f} M"

    def preprocessing(self) -> dict[str, Any]:
        """The parameters that decide what the encoder computes (part of the hash).

        Returns
        -------
        dict
            JSON-serialisable; ``sources`` and the description are left out.
        """
        data = asdict(self)
        for key in ("description", "sources", "n_parameters"):
            data.pop(key)
        return data


@dataclass(frozen=True)
class WindowPlan:
    """What :meth:`FoundationEncoder.windows` does to a scan of a given length and TR.

    Attributes
    ----------
    n_input : int
        Samples of the scan.
    tr : float
        Its TR (s).
    target_tr : float
        TR of the windows (the scan's own when not resampled).
    resampled : bool
        Whether the scan is resampled (linear interpolation).
    n_resampled : int
        Samples after resampling.
    n_windows : int
        Windows embedded (at least 1).
    n_padded : int
        Samples appended to reach one window (0 unless the scan is shorter than a window).
    span : tuple of int
        ``(start, stop)``: the samples of the *input* series the windows cover (FC over the
        same span uses ``signals[start:stop]``).
    seconds : float
        Duration the windows cover.
    """

    n_input: int
    tr: float
    target_tr: float
    resampled: bool
    n_resampled: int
    n_windows: int
    n_padded: int
    span: tuple[int, int]
    seconds: float


# --------------------------------------------------------------------------------------------
# Preprocessing steps
# --------------------------------------------------------------------------------------------
def _check_tr(tr: Any, what: str = "tr") -> float:
    if isinstance(tr, bool) or not isinstance(tr, (int, float, np.floating, np.integer)) or \
            not math.isfinite(float(tr)) or float(tr) <= 0:
        raise InvalidInputError(f"{what} must be a positive number of seconds, got {tr!r}.")
    return float(tr)


def resampled_length(n: int, tr: float, target_tr: float) -> int:
    """Samples after resampling ``n`` samples from ``tr`` to ``target_tr``.

    ``round(tr * n / target_tr)``, as brainmarks' ``resample_to_target_tr`` (at least 1).

    Parameters
    ----------
    n : int
        Samples of the series.
    tr, target_tr : float
        Seconds.

    Returns
    -------
    int
        The resampled length (at least 1).
    """
    return max(1, int(round(float(tr) * n / float(target_tr))))


def resample_to_tr(x: np.ndarray, tr: float, target_tr: float | None, *,
                   tolerance: float = RESAMPLE_TOLERANCE_S) -> np.ndarray:
    """Linear resampling of region series to another TR, as the reference evaluation does.

    brainmarks (``resample_to_target_tr``) resamples with
    ``torch.nn.functional.interpolate(mode="linear", align_corners=False)`` to
    ``round(tr * T / target_tr)`` samples, and only when the TRs differ by at least
    ``tolerance`` (0.1 s). This is the same map in float64: output sample ``j`` reads the input
    at ``(j + 0.5) * T / T_new - 0.5`` (clamped to ``[0, T - 1]``) and interpolates linearly.

    Parameters
    ----------
    x : ndarray (T, R)
        Series, one column per region.
    tr : float
        Its TR (s).
    target_tr : float or None
        TR to resample to; None keeps ``x``.
    tolerance : float, default=0.1
        No resampling when ``|tr - target_tr| < tolerance``.

    Returns
    -------
    ndarray (T_new, R) float64
    """
    x = np.asarray(x, dtype=np.float64)
    if target_tr is None or abs(float(tr) - float(target_tr)) < tolerance:
        return x
    n = x.shape[0]
    n_new = resampled_length(n, tr, target_tr)
    scale = n / n_new
    src = np.maximum((np.arange(n_new) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (src - i0)[:, None]
    return x[i0] * (1.0 - w) + x[i1] * w


def stable_y_order(xyz: np.ndarray) -> np.ndarray:
    """Region order of the ViT-MAE BrainLMs: by Y coordinate, ties kept in label order.

    The BrainLM tutorial (``brainlm_tutorial.ipynb``, the training preprocessing
    ``preprocess_images``) and fmri-fm-eval sort with Python's ``sorted(range(R), key=Y)``,
    which is stable. (Newer brainmarks uses ``np.argsort(Y)``, quicksort, whose order among
    the 73 tied Y values of ``A424_Coordinates.dat`` depends on numpy's build; we follow the
    training code.)

    Parameters
    ----------
    xyz : ndarray (R, 3)
        Coordinates in atlas label order.

    Returns
    -------
    ndarray (R,) of int64
        ``order[i]`` = atlas position of window row ``i``.
    """
    return np.argsort(np.asarray(xyz)[:, 1], kind="stable").astype(np.int64)


def cut_windows(x: np.ndarray, window: int, *, pad: np.ndarray | float = 0.0,
                span: str = "all") -> tuple[np.ndarray, int]:
    """Every non-overlapping full window of a series (at least one).

    Parameters
    ----------
    x : ndarray (T, R)
        Series, one column per region.
    window : int
        Samples per window.
    pad : float or ndarray (R,), default=0.0
        Value appended (per region) when ``T < window``.
    span : {"all", "centre"}, default="all"
        ``"all"``: windows ``[0, L), [L, 2L), ...`` (the tail shorter than a window is left
        out, as in brainmarks); ``"centre"``: the one centred window ``[(T - L) // 2, ...)``.

    Returns
    -------
    windows : ndarray (W, window, R)
        The windows, in time order.
    n_padded : int
        Samples appended (0 unless ``T < window``).

    Raises
    ------
    InvalidInputError
        ``span`` is not ``"all"`` or ``"centre"``.
    """
    check_option("span", span, ("all", "centre"))
    n = x.shape[0]
    n_padded = max(0, window - n)
    if n_padded:
        fill = np.broadcast_to(np.asarray(pad, dtype=x.dtype), (n_padded, x.shape[1]))
        x = np.concatenate([x, fill], axis=0)
        n = window
    if span == "centre":
        start = (n - window) // 2
        return x[None, start : start + window], n_padded
    w = n // window
    return x[: w * window].reshape(w, window, x.shape[1]), n_padded


def series_digest(signals: np.ndarray, tr: float) -> str:
    """SHA-256 of a series (float32 bytes, shape) and its TR: the input half of a cache key.

    Parameters
    ----------
    signals : ndarray (T, R)
        The series (hashed as float32).
    tr : float
        Its TR (s), rounded to 1e-9 s in the hash.

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    arr = np.ascontiguousarray(np.asarray(signals, dtype=np.float32))
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(arr.shape), "tr": round(float(tr), 9)}).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def window_plan(entry: EncoderEntry, n_samples: int, tr: float) -> WindowPlan:
    """What an encoder's preprocessing does to a scan of ``n_samples`` at ``tr``.

    Parameters
    ----------
    entry : EncoderEntry
        The encoder's description (its TR, window and window pooling are read).
    n_samples : int
        Samples (volumes) of the scan.
    tr : float
        Its TR (s).

    Returns
    -------
    WindowPlan
        Resampling, windows, padding and the span of the input the windows cover.

    Raises
    ------
    InvalidInputError
        ``tr`` is not a positive, finite number.
    """
    tr = _check_tr(tr)
    target = entry.tr
    resampled = target is not None and abs(tr - target) >= RESAMPLE_TOLERANCE_S
    n_new = resampled_length(n_samples, tr, target) if resampled and target else n_samples
    out_tr = float(target) if resampled and target else tr
    length = entry.window
    if entry.window_pooling == "centre":
        w, start_new = 1, max(0, (n_new - length) // 2)
    else:
        w, start_new = max(1, n_new // length), 0
    covered = min(w * length, n_new)
    # The input samples the covered span maps to (through the resampling's time axis).
    start = int(math.floor(start_new * out_tr / tr))
    stop = min(n_samples, int(math.ceil((start_new + covered) * out_tr / tr)))
    return WindowPlan(n_input=int(n_samples), tr=tr, target_tr=out_tr, resampled=resampled,
                      n_resampled=int(n_new), n_windows=int(w),
                      n_padded=max(0, length - n_new), span=(start, stop),
                      seconds=float(covered * out_tr))


# --------------------------------------------------------------------------------------------
# Robust scaling fitted on a cohort
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RobustScaling:
    """Per-region robust-scaling statistics fitted on a training cohort (global robust scaling).

    ``x_scaled = (x - median) / (iqr + epsilon)``, as brainmarks' ``BrainLMTransform`` (its
    ``fit`` pools every sample of every training scan per region; ``epsilon = 1e-6``). Stored in
    a foundation folder as ``robust_scaling.json``; fitted on the *same kind* of series that
    :meth:`FoundationEncoder.windows` receives (the project's cleaned region series).

    Attributes
    ----------
    median, iqr : ndarray (R,) float64
        Per region, in atlas label order.
    epsilon : float, default=1e-6
        Added to the IQR before dividing.
    n_scans, n_samples : int, default=0
        What the statistics were fitted on.
    atlas : str, default=""
        The atlas of the series (the encoder entry's).
    note : str, default=""
        Free text (e.g. the cohort).
    """

    median: np.ndarray
    iqr: np.ndarray
    epsilon: float = 1e-6
    n_scans: int = 0
    n_samples: int = 0
    atlas: str = ""
    note: str = ""

    FORMAT = "fmmtc-robust-scaling"

    @property
    def n_regions(self) -> int:
        """Regions the statistics are for."""
        return int(self.median.size)

    @classmethod
    def fit(cls, series: Sequence[np.ndarray], *, atlas: str = "",
            note: str = "") -> RobustScaling:
        """Fit on a cohort: quartiles of every sample of every scan, per region.

        Parameters
        ----------
        series : sequence of ndarray (T_i, R)
            Cleaned region series of the training scans (same regions, atlas order). NaN
            samples (regions without signal) are left out; a region with no finite sample gets
            median 0 and IQR 1, and so does the IQR of a region that was constant in training
            (IQR 0): dividing by ``epsilon`` alone would turn any later variation of that
            region into values around 1e6 (brainmarks divides by ``0 + 1e-6``; the scaled
            training series are the same either way, since ``x - median`` is 0 there).
        atlas : str, default=""
            Recorded with the statistics.
        note : str, default=""
            Recorded with the statistics (e.g. the cohort).

        Returns
        -------
        RobustScaling

        Raises
        ------
        InvalidInputError
            No scan, or arrays that are not 2D or differ in their number of regions.
        """
        if not len(series):
            raise InvalidInputError("Robust scaling needs at least one scan to fit on.")
        widths = {np.asarray(s).shape[1] if np.asarray(s).ndim == 2 else -1 for s in series}
        if len(widths) != 1 or -1 in widths:
            raise InvalidInputError(
                "Robust scaling needs (time, regions) arrays with the same number of regions; "
                f"got region counts {sorted(widths)}.")
        data = np.concatenate([np.asarray(s, dtype=np.float64) for s in series], axis=0)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN regions
                q1, med, q3 = np.nanquantile(data, [0.25, 0.5, 0.75], axis=0)
        empty = ~np.isfinite(med)
        med = np.where(empty, 0.0, med)
        iqr = np.where(empty | ~(q3 - q1 > 0), 1.0, q3 - q1)
        return cls(median=med, iqr=iqr, n_scans=len(series), n_samples=int(data.shape[0]),
                   atlas=atlas, note=note)

    def apply(self, x: np.ndarray, max_value: float = 1.0) -> np.ndarray:
        """``(x - median) / (iqr + epsilon) / max_value``; NaN (no signal) becomes 0.

        Parameters
        ----------
        x : ndarray (T, R)
            Region series in atlas label order.
        max_value : float, default=1.0
            Divisor applied after scaling (:attr:`EncoderEntry.max_value`).

        Returns
        -------
        ndarray (T, R) float64
            Infinite values also become 0.
        """
        out = (np.asarray(x, dtype=np.float64) - self.median) / (self.iqr + self.epsilon)
        out = out / max_value
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)

    def to_dict(self) -> dict:
        """The JSON object :meth:`save` writes (``format``, ``version``, counts, lists).

        Returns
        -------
        dict
            ``format``, ``version``, ``atlas``, ``n_regions``, ``epsilon``, ``n_scans``,
            ``n_samples``, ``note``, and ``median`` / ``iqr`` as lists.
        """
        return {"format": self.FORMAT, "version": 1, "atlas": self.atlas,
                "n_regions": self.n_regions, "epsilon": self.epsilon,
                "n_scans": self.n_scans, "n_samples": self.n_samples, "note": self.note,
                "median": self.median.tolist(), "iqr": self.iqr.tolist()}

    @property
    def digest(self) -> str:
        """SHA-256 of the statistics (what they compute, not the file's bytes)."""
        return hashlib.sha256(json.dumps(
            {"median": self.median.tolist(), "iqr": self.iqr.tolist(),
             "epsilon": self.epsilon}).encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics as JSON (atomically: a temporary file, then a rename).

        Parameters
        ----------
        path : path
            A file, or a folder (then ``robust_scaling.json`` inside it).

        Returns
        -------
        Path
            The file written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / ROBUST_SCALING_FILE
        tmp = path.with_name(f".{os.getpid()}.{path.name}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, n_regions: int | None = None) -> RobustScaling:
        """Read statistics written by :meth:`save`.

        Parameters
        ----------
        path : path
            The JSON file.
        n_regions : int or None, default=None
            Regions the encoder expects; a file for another count is refused.

        Returns
        -------
        RobustScaling

        Raises
        ------
        ModelFileError
            A missing file, not JSON, another format, arrays of the wrong length, non-finite
            values, a negative IQR or epsilon, or another region count than ``n_regions``;
            the message names the file.
        """
        from fmmtc_core.models.foundation import model_file, read_json_object

        path = Path(path)
        where = model_file(path)
        expected = (f"the robust-scaling statistics ('format': {cls.FORMAT!r}, 'median' and "
                    "'iqr' lists of one number per region)")
        if not path.is_file():
            raise ModelFileError(f"{where} is missing; expected {expected}.")
        raw = read_json_object(path, where, expected)
        if raw.get("format") != cls.FORMAT:
            raise ModelFileError(f"{where} has format {raw.get('format')!r}; expected {expected}.")
        try:
            med = np.asarray(raw["median"], dtype=np.float64)
            iqr = np.asarray(raw["iqr"], dtype=np.float64)
            eps = float(raw.get("epsilon", 1e-6))
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{where} lacks numeric 'median' and 'iqr' lists; expected "
                                 f"{expected}.") from None
        ok = (med.ndim == 1 and med.shape == iqr.shape and np.isfinite(med).all()
              and np.isfinite(iqr).all() and (iqr >= 0).all() and eps >= 0)
        if not ok:
            raise ModelFileError(f"{where} holds unusable statistics (lists of different "
                                 f"lengths, non-finite values or a negative IQR); expected "
                                 f"{expected}.")
        if n_regions is not None and med.size != n_regions:
            raise ModelFileError(f"{where} holds statistics for {med.size} regions; the encoder "
                                 f"expects {n_regions}. Refit them on the training cohort.")
        return cls(median=med, iqr=iqr, epsilon=eps, n_scans=int(raw.get("n_scans", 0)),
                   n_samples=int(raw.get("n_samples", 0)), atlas=str(raw.get("atlas", "")),
                   note=str(raw.get("note", "")))


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------
class FoundationEncoder(nn.Module, abc.ABC):
    """A frozen foundation model with the preprocessing of its checkpoint (see the module).

    Subclasses implement :meth:`_forward_windows` (model input windows -> token states
    readout) and, when they need them, :meth:`_coordinates`. Use
    :func:`fmmtc_core.models.registry.load_encoder` to get one.

    Parameters
    ----------
    entry : EncoderEntry
        What the checkpoint is and expects.
    model : torch.nn.Module
        The network (frozen: no gradient reaches its parameters, input gradients flow).
    folder : path
        The checkpoint folder (``config.json`` + ``model.safetensors``).
    region_index : ndarray (R,) of int
        Atlas position of each window row.
    scaling : RobustScaling or None, default=None
        Global robust-scaling statistics (needed when ``entry.normalisation ==
        "global-robust"``).
    coordinates_digest : str, default=""
        Digest of the coordinates the preprocessing uses ("" when none).
    order_seed : int, default=0
        Seed of the token shuffles (``entry.token_order == "shuffle"``).
    """

    #: The coordinate table file the preprocessing used (A424 entries; set by the registry),
    #: copied into a model folder by :func:`fmmtc_core.models.ensemble.write_model_folder`.
    coordinates_file: Path | None = None

    def __init__(self, entry: EncoderEntry, model: nn.Module, folder: str | os.PathLike, *,
                 region_index: np.ndarray, scaling: RobustScaling | None = None,
                 coordinates_digest: str = "", order_seed: int = 0) -> None:
        super().__init__()
        self.entry = entry
        self.model = model
        self.folder = Path(folder)
        self.region_index = np.asarray(region_index, dtype=np.int64)
        self.coordinates_digest = coordinates_digest
        self.order_seed = int(order_seed)
        self._scaling = scaling
        self._weights_digest: str | None = None
        self._hashes: dict[str, str] = {}  # preprocessing hash per precision
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    # -- state ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def precision(self) -> str:
        """``"bf16"`` on CUDA (autocast), ``"fp32"`` on CPU."""
        return "bf16" if self.device.type == "cuda" else "fp32"

    def train(self, mode: bool = True) -> FoundationEncoder:
        """Frozen: the model stays in eval mode (no dropout noise) whatever ``mode`` is.

        Parameters
        ----------
        mode : bool, default=True
            Sets this module's ``training`` flag (as :meth:`torch.nn.Module.train`); the
            wrapped model is put back in eval mode either way.

        Returns
        -------
        FoundationEncoder
            ``self``.
        """
        super().train(mode)
        self.model.eval()
        return self

    @property
    def scaling(self) -> RobustScaling | None:
        """Global robust-scaling statistics (None until fitted or loaded)."""
        return self._scaling

    @scaling.setter
    def scaling(self, value: RobustScaling | None) -> None:
        """Use other statistics (or none); the preprocessing hash changes with them.

        Raises
        ------
        InvalidInputError
            Statistics for another number of regions than the entry's.
        """
        if value is not None and value.n_regions != self.entry.n_regions:
            raise InvalidInputError(
                f"Robust-scaling statistics for {value.n_regions} regions do not fit encoder "
                f"{self.entry.name!r}, which expects {self.entry.n_regions}.")
        self._scaling = value
        self._hashes.clear()

    @property
    def needs_scaling(self) -> bool:
        """Whether :meth:`windows` needs statistics fitted on a cohort."""
        return self.entry.normalisation == "global-robust"

    def fit_scaling(self, series: Sequence[np.ndarray], *, note: str = "") -> RobustScaling:
        """Fit the global robust-scaling statistics on a training cohort and use them.

        Parameters
        ----------
        series : sequence of ndarray (T_i, R)
            Cleaned region series of the training scans, atlas order.
        note : str, default=""
            Recorded with the statistics (e.g. the cohort).

        Returns
        -------
        RobustScaling
            Also set as :attr:`scaling`; :meth:`RobustScaling.save` writes it.

        Raises
        ------
        InvalidInputError
            No scan, a first scan that is not (T, R) with the entry's R and at least one
            sample, or scans that differ in their number of regions.
        """
        self._check_regions(series[0] if len(series) else np.zeros((0, 0)))
        stats = RobustScaling.fit(series, atlas=self.entry.atlas, note=note)
        self.scaling = stats
        return stats

    @property
    def n_parameters(self) -> int:
        """Parameters of the loaded encoder."""
        return sum(p.numel() for p in self.model.parameters())

    def weights_digest(self) -> str:
        """SHA-256 of ``config.json`` and ``model.safetensors`` (computed once).

        Returns
        -------
        str
            64 hexadecimal digits, over each file's name and SHA-256.
        """
        if self._weights_digest is None:
            from fmmtc_core.io import file_sha256

            h = hashlib.sha256()
            for name in ("config.json", "model.safetensors"):
                h.update(name.encode())
                h.update(file_sha256(self.folder / name, "Model file").encode())
            self._weights_digest = h.hexdigest()
        return self._weights_digest

    @property
    def preprocessing_hash(self) -> str:
        """SHA-256 of the checkpoint digest and every preprocessing parameter.

        Includes the entry's preprocessing (:meth:`EncoderEntry.preprocessing`), the scaling
        statistics, the coordinates, the shuffle seed, the precision (bf16 on CUDA gives other
        numbers than fp32) and :data:`PREPROCESSING_VERSION`. Two encoders with the same hash
        give the same embeddings for the same series.
        """
        if self.precision not in self._hashes:
            payload = {
                "version": PREPROCESSING_VERSION,
                "weights": self.weights_digest(),
                "entry": self.entry.preprocessing(),
                "scaling": None if self._scaling is None else self._scaling.digest,
                "coordinates": self.coordinates_digest,
                "order_seed": self.order_seed,
                "precision": self.precision,
            }
            self._hashes[self.precision] = hashlib.sha256(
                json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return self._hashes[self.precision]

    # -- preprocessing --------------------------------------------------------------------
    def _check_regions(self, signals: np.ndarray) -> np.ndarray:
        x = np.asarray(signals)
        if x.ndim != 2:
            raise InvalidInputError(
                f"Expected region series of shape (time, regions), got shape {x.shape}.")
        if x.shape[1] != self.entry.n_regions:
            raise InvalidInputError(
                f"Encoder {self.entry.name!r} expects {self.entry.n_regions} {self.entry.atlas} "
                f"regions in {self.entry.atlas} label order, got {x.shape[1]} columns. "
                f"Parcellate the scan with the {self.entry.atlas} atlas.")
        if x.shape[0] < 1:
            raise InvalidInputError("The region series is empty (0 samples); expected a scan.")
        return x

    def plan(self, n_samples: int, tr: float) -> WindowPlan:
        """What :meth:`windows` does to a scan of ``n_samples`` at ``tr`` (no data needed).

        See :func:`window_plan`.

        Parameters
        ----------
        n_samples : int
            Samples (volumes) of the scan.
        tr : float
            Its TR (s).

        Returns
        -------
        WindowPlan
            Resampling, windows, padding and the span of the input the windows cover (for
            the entry's window pooling).

        Raises
        ------
        InvalidInputError
            ``tr`` is not a positive, finite number.
        """
        return window_plan(self.entry, n_samples, tr)

    def windows(self, signals: np.ndarray, tr: float, *, span: str | None = None
                ) -> torch.Tensor:
        """The model input windows of one scan.

        Steps, in the reference's order (brainmarks ``BrainLMTransform``): normalise
        (global robust scaling and the division by ``max_value``; per-window scaling is done
        after the cut), resample to the entry's TR (:func:`resample_to_tr`), pad a short scan,
        cut every non-overlapping full window (:func:`cut_windows`), order the regions, repeat
        the channels.

        Parameters
        ----------
        signals : ndarray (T, R)
            Cleaned region series in the entry's atlas label order (NaN = no signal).
        tr : float
            Seconds.
        span : {"all", "centre"} or None, default=None
            Which windows: every full one, or the centred one; None: from the entry's
            ``window_pooling``.

        Returns
        -------
        Tensor float32
            ``(W, R, window)`` for BrainLM encoders, ``(W, channels, R, window)`` for ViT-MAE;
            rows in the entry's region order.

        Raises
        ------
        InvalidInputError
            Not (T, R) with the entry's R, an empty series, a bad TR, an unknown ``span``,
            or global robust scaling without fitted statistics.
        """
        x = self._check_regions(signals).astype(np.float64)
        tr = _check_tr(tr)
        e = self.entry
        if span is None:
            span = "centre" if e.window_pooling == "centre" else "all"
        if e.normalisation == "global-robust":
            if self._scaling is None:
                raise InvalidInputError(
                    f"Encoder {e.name!r} scales every region with a median and IQR fitted on the "
                    f"training cohort, and {self.folder / ROBUST_SCALING_FILE} does not exist "
                    "yet. Fit them on your training cohort (FoundationEncoder.fit_scaling, then "
                    "RobustScaling.save into the folder).")
            x = self._scaling.apply(x, e.max_value)
            x = resample_to_tr(x, tr, e.tr)
            pad = x.mean(axis=0)  # brainmarks pad_mode="mean"
            wins, _ = cut_windows(x, e.window, pad=pad, span=span)
        else:
            from fmmtc_core.preprocess import robust_scale

            x = resample_to_tr(x, tr, e.tr)
            n = x.shape[0]
            raw, _ = cut_windows(x, e.window, pad=np.nan, span=span)
            wins = np.stack([robust_scale(w[: min(n, e.window)]) for w in raw])
            if n < e.window:  # padded after scaling with 0, the region's median
                wins = np.concatenate(
                    [wins, np.zeros((1, e.window - n, wins.shape[2]), np.float32)], axis=1)
            wins = np.nan_to_num(wins, nan=0.0) / e.max_value
        out = np.ascontiguousarray(wins.transpose(0, 2, 1)[:, self.region_index], np.float32)
        t = torch.from_numpy(out)
        if e.channels:
            t = t.unsqueeze(1).repeat(1, e.channels, 1, 1)
        return t

    def to_atlas_order(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Map window-shaped values (inputs or attributions) back to the atlas's region order.

        Parameters
        ----------
        x : Tensor
            ``(W, R, L)`` or ``(W, C, R, L)`` as returned by :meth:`windows`.
        reduce : {"sum", "mean"}, default="sum"
            How channels are combined (sum for attributions, mean for inputs).

        Returns
        -------
        Tensor (W, R, L)
            Region ``r`` of the atlas in row ``r``.

        Raises
        ------
        InvalidInputError
            ``reduce`` is not ``"sum"`` or ``"mean"``.
        """
        check_option("reduce", reduce, ("sum", "mean"))
        if x.dim() == 4:
            x = x.sum(1) if reduce == "sum" else x.mean(1)
        inverse = torch.as_tensor(np.argsort(self.region_index), device=x.device)
        return x[:, inverse]

    # -- embedding ------------------------------------------------------------------------
    @abc.abstractmethod
    def _forward_windows(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Token states ``(W, 1 + N, hidden)`` (CLS first) of windows already on the device."""

    def _n_tokens(self, x: torch.Tensor) -> int:
        """Tokens (without CLS) of one window (for the shuffle noise)."""
        raise NotImplementedError

    def _pool_tokens(self, states: torch.Tensor) -> torch.Tensor:
        if self.entry.token_pooling == "cls":
            return states[:, 0]
        return states[:, 1:].mean(dim=1)

    def embed_windows(self, x: torch.Tensor) -> torch.Tensor:
        """One embedding per window, differentiable with respect to ``x``.

        Parameters
        ----------
        x : Tensor
            Windows from :meth:`windows` (any device; moved to the encoder's).

        Returns
        -------
        Tensor (W, hidden) float32, on the encoder's device
            The entry's token pooling (CLS by default); with ``token_order == "shuffle"`` the
            mean over ``order_samples`` seeded shuffles (seed ``order_seed + k``, the same
            for every window, so the result does not depend on batching).
        """
        from fmmtc_core.models.device import autocast

        device = self.device
        x = x.to(device=device, dtype=torch.float32)
        with autocast(device):
            if self.entry.token_order == "natural":
                out = self._pool_tokens(self._forward_windows(x, None)).float()
            else:
                n = self._n_tokens(x)
                total = None
                for k in range(self.entry.order_samples):
                    gen = torch.Generator().manual_seed(self.order_seed + k)
                    noise = torch.rand(1, n, generator=gen).expand(x.shape[0], n).to(device)
                    emb = self._pool_tokens(self._forward_windows(x, noise)).float()
                    total = emb if total is None else total + emb
                assert total is not None  # order_samples >= 1
                out = total / self.entry.order_samples
        return out.float()

    def window_embeddings(self, signals: np.ndarray, tr: float, *, span: str | None = None,
                          cache: Any = None, batch_size: int | None = None) -> np.ndarray:
        """Embeddings of every window of one scan (no gradient), optionally cached on disk.

        Parameters
        ----------
        signals : ndarray (T, R)
            Cleaned region series in the entry's atlas label order.
        tr : float
            Seconds.
        span : {"all", "centre"} or None, default=None
            See :meth:`windows`.
        cache : EmbeddingCache, True or None, default=None
            True uses :class:`~fmmtc_core.models.embedding_cache.EmbeddingCache` at its default
            place (under the cache folder); None computes without caching. The key is the
            :attr:`preprocessing_hash`, the span and :func:`series_digest`.
        batch_size : int or None, default=None
            Windows per forward pass (None: 8 for hidden sizes up to 256, 2 above 1024,
            else 4).

        Returns
        -------
        ndarray (W, hidden) float32

        Raises
        ------
        InvalidInputError
            As :meth:`windows` (checked only when the embeddings are not cached).
        """
        from fmmtc_core.models.embedding_cache import EmbeddingCache

        e = self.entry
        span = span or ("centre" if e.window_pooling == "centre" else "all")
        store = EmbeddingCache() if cache is True else cache
        key = None
        if store is not None:
            key = hashlib.sha256(f"{self.preprocessing_hash}|{span}|{series_digest(signals, tr)}"
                                 .encode()).hexdigest()
            hit = store.get(key)
            if hit is not None:
                return hit
        x = self.windows(signals, tr, span=span)
        bs = batch_size or (8 if e.hidden_size <= 256 else 2 if e.hidden_size > 1024 else 4)
        with torch.no_grad():
            emb = torch.cat([self.embed_windows(x[i : i + bs]) for i in range(0, len(x), bs)])
        out = emb.cpu().numpy().astype(np.float32)
        if store is not None and key is not None:
            store.put(key, out, {"encoder": e.name, "preprocessing_hash": self.preprocessing_hash,
                                 "span": span, "tr": float(tr)})
        return out

    def embed_scan(self, signals: np.ndarray, tr: float, *, window_pooling: str | None = None,
                   cache: Any = None, batch_size: int | None = None) -> np.ndarray:
        """One embedding per scan: the windows' embeddings pooled.

        Parameters
        ----------
        signals : ndarray (T, R)
            Cleaned region series, atlas order.
        tr : float
            Seconds.
        window_pooling : {"mean", "centre"} or None, default=None
            None: the entry's (mean over every non-overlapping window by default).
        cache : EmbeddingCache, True or None, default=None
            See :meth:`window_embeddings`.
        batch_size : int or None, default=None
            See :meth:`window_embeddings`.

        Returns
        -------
        ndarray (hidden,) float32

        Raises
        ------
        InvalidInputError
            An unknown ``window_pooling``, or input :meth:`windows` refuses.
        """
        pooling = check_option("window_pooling", window_pooling or self.entry.window_pooling,
                               _WINDOW_POOLINGS)
        span = "centre" if pooling == "centre" else "all"
        per_window = self.window_embeddings(signals, tr, span=span, cache=cache,
                                            batch_size=batch_size)
        return per_window.mean(axis=0)

    def embed_cohort(self, series: Sequence[np.ndarray], trs: Sequence[float] | float, *,
                     cache: Any = True, window_pooling: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Scan embeddings of a cohort, cached on disk by default (reruns never recompute).

        Parameters
        ----------
        series : sequence of ndarray (T_i, R)
            Cleaned region series of each scan, atlas order.
        trs : sequence of float or float
            TR (s) of each scan, or one TR for all.
        cache : EmbeddingCache, True or None, default=True
            See :meth:`window_embeddings` (True: the default cache folder; None: no cache).
        window_pooling : {"mean", "centre"} or None, default=None
            See :meth:`embed_scan`.
        progress : callable(done, total) or None, default=None
            Called after each scan.

        Returns
        -------
        ndarray (N, hidden) float32
            One row per scan, in order; (0, hidden) for no scan.

        Raises
        ------
        InvalidInputError
            ``trs`` is a sequence of another length than ``series``, or a scan
            :meth:`embed_scan` refuses.
        """
        trs = [trs] * len(series) if isinstance(trs, (int, float)) else list(trs)
        if len(trs) != len(series):
            raise InvalidInputError(f"Got {len(series)} scans but {len(trs)} TRs.")
        store: Any = cache
        if cache is True:
            from fmmtc_core.models.embedding_cache import EmbeddingCache

            store = EmbeddingCache()
        out = []
        for i, (s, tr) in enumerate(zip(series, trs)):
            out.append(self.embed_scan(s, tr, window_pooling=window_pooling, cache=store))
            if progress:
                progress(i + 1, len(series))
        return np.stack(out) if out else np.zeros((0, self.entry.hidden_size), np.float32)

    # -- atlas ----------------------------------------------------------------------------
    def check_atlas(self, atlas: Atlas) -> None:
        """Refuse an atlas whose regions are not the entry's (count, then labels or name).

        Coordinates are not compared here.

        Parameters
        ----------
        atlas : Atlas
            The atlas scans are parcellated with.

        Raises
        ------
        InvalidInputError
            Another region count; for A424 entries, labels other than 1..424 in order; for
            other entries, an atlas whose name differs from the entry's atlas
            (case-insensitive).
        """
        e = self.entry
        if atlas.n_regions != e.n_regions:
            raise InvalidInputError(
                f"Atlas {atlas.name!r} has {atlas.n_regions} regions, but encoder {e.name!r} "
                f"({self.folder}) expects {e.n_regions} {e.atlas} regions. Parcellate with the "
                f"{e.atlas} atlas" + (" (--atlas A424+2mm.nii.gz from your BrainLM download, "
                                     "with A424_Coordinates.dat)" if e.atlas == "A424" else "")
                + ".")
        if e.atlas == "A424":
            if not np.array_equal(np.asarray(atlas.labels), np.arange(1, 425)):
                raise InvalidInputError(
                    f"Atlas {atlas.name!r} has 424 regions but not labels 1..424 in order; "
                    f"encoder {e.name!r} expects the A424 label order.")
        elif atlas.name.lower() != e.atlas.lower():
            raise InvalidInputError(
                f"Encoder {e.name!r} ({self.folder}) was pretrained on atlas {e.atlas!r}; got "
                f"atlas {atlas.name!r}. Use the same atlas.")

    def describe(self) -> dict[str, Any]:
        """The entry and the encoder's state, for ``fmmtc foundation inspect``.

        Returns
        -------
        dict
            ``entry`` (its name), ``folder``, ``n_parameters``, ``device``, ``precision``,
            ``scaling`` (``n_scans`` / ``n_samples``, or None), then the fields of
            :meth:`EncoderEntry.preprocessing` (whose ``name`` repeats the entry's).
        """
        return {"entry": self.entry.name, "folder": str(self.folder),
                "n_parameters": self.entry.n_parameters, "device": str(self.device),
                "precision": self.precision,
                "scaling": None if self._scaling is None else {
                    "n_scans": self._scaling.n_scans, "n_samples": self._scaling.n_samples},
                **self.entry.preprocessing()}
