"""The deployed model: a folder of fold models with their card, written and loaded here.

A model folder holds ``fold_K.safetensors`` (one per cross-validation fold),
``baseline.safetensors`` (region centroids and the explanation baselines), ``foundation/`` (the
frozen encoder, when the model uses one: the checkpoint's own ``config.json`` and
``model.safetensors``, with the ``robust_scaling.json`` statistics fitted on the training cohort
and BrainLM's ``A424_Coordinates.dat`` when the encoder needs them) and ``model_card.json``,
which records the SHA-256 of every one of those files. :func:`write_model_folder` writes it, :func:`load_model` checks every
file against its card before parsing it and returns an :class:`FMMTCEnsemble`. Nothing is ever
unpickled. A card whose ``model.type`` names a classic baseline (``fmmtc train --model cpm``)
is loaded by :mod:`fmmtc_core.models.classic` under the same rules; both kinds have the
interface of :class:`~fmmtc_core.models.deployed.ScreeningModel`.

Calibration lives here too: :func:`fit_platt` fits the Platt map on out-of-fold logits at
training time, :func:`platt` applies it, and the ensemble applies it to its fold logits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import save_file

from fmmtc_core._errors import InvalidInputError, ModelFileError
from fmmtc_core.io import file_sha256
from fmmtc_core.models.deployed import model_type
from fmmtc_core.models.device import autocast, select_device
from fmmtc_core.models.encoder_base import (
    COORDINATES_FILE,
    ROBUST_SCALING_FILE,
    FoundationEncoder,
)
from fmmtc_core.models.fmmtc import FMMTC, FMMTCConfig
from fmmtc_core.models.foundation import (
    BrainLMModel,
    _fmt_keys,
    _one_line,
    model_file,
    read_json_object,
    read_safetensors,
)
from fmmtc_core.preprocess import ModelInputs, RegionSignals, prepare

if TYPE_CHECKING:
    from fmmtc_core.models.classic import ClassicModel

__all__ = [
    "FMMTCEnsemble",
    "MODEL_CARD",
    "default_model_dir",
    "fit_platt",
    "load_model",
    "platt",
    "write_model_folder",
]

MODEL_CARD = "model_card.json"

#: Cards written by fmmtc 0.1.0 record the SHA-256 of the top-level safetensors only, not of
#: the encoder in ``foundation/``. The bundled demo model has such a card and its files must not
#: change, so the digests of its encoder files are pinned here: they are checked too. In any
#: other folder, a file the model reads and its card records no digest for is refused.
_LEGACY_ENCODER_SHA256 = {
    "foundation/config.json": "361ba15042e55e51331c0515134a31305cbfe823b0d85c0877d4369bd35bf192",
    "foundation/model.safetensors":
        "dd8ee2857abb4d48331c0d27d38292cff894fa02dd92fb77019113ea8cdc4991",
}

#: Keys of a model card that loading needs, with what each must hold.
_CARD_KEYS = {
    "model": "an object (the model's 'type' and its configuration)",
    "atlas": "an object with the atlas 'name'",
    "calibration": "an object with numbers 'a' and 'b'",
    "files": "an object mapping each weights file to its SHA-256 (64 hex digits)",
}


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
def platt(logits, a: float, b: float) -> np.ndarray:
    """Platt-calibrated probability ``sigmoid(a * logit + b)``.

    Parameters
    ----------
    logits : array-like
        Logits of any shape.
    a, b : float
        Slope and intercept (a model card's ``calibration``).

    Returns
    -------
    ndarray of float64, the shape of ``logits``
    """
    return 1.0 / (1.0 + np.exp(-np.asarray(a * np.asarray(logits) + b, dtype=float)))


def fit_platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling: ``(a, b)`` of :func:`platt`, fitted by (lightly regularised) ML.

    Parameters
    ----------
    logits : ndarray (N,)
        Out-of-fold logits.
    y : ndarray (N,)
        Labels, 1 (responder) or 0.

    Returns
    -------
    a, b : float
    """
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=100.0)
    lr.fit(np.asarray(logits).reshape(-1, 1), np.asarray(y).astype(int))
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


# --------------------------------------------------------------------------------------------
# File identity
# --------------------------------------------------------------------------------------------
def _file_sha256(path) -> str:
    return file_sha256(path, "Model file")  # the package's one streaming SHA-256


def _file_hashes(root: Path, paths) -> dict[str, str]:
    """``{path relative to root (POSIX): SHA-256}``: what a model card records of its files."""
    return {p.relative_to(root).as_posix(): _file_sha256(p) for p in sorted(paths)}


def _version_digest(root: Path, card_sha256: str, digests: dict[str, str]) -> str:
    """A model version's identity: SHA-256 over the card and every ``*.safetensors`` file, each
    entered as its path relative to the folder and then its own SHA-256 (raw bytes), in path
    order. Unchanged since fmmtc 0.1.0, so databases keep matching their model versions."""
    entries = {root / rel: d for rel, d in digests.items() if rel.endswith(".safetensors")}
    entries[root / MODEL_CARD] = card_sha256
    h = hashlib.sha256()
    for path in sorted(entries):
        h.update(str(path.relative_to(root)).encode())
        h.update(bytes.fromhex(entries[path]))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------
@dataclass
class FMMTCEnsemble:
    """The fold models of a model folder, with calibration; see :func:`load_model`.

    ``encoder`` is the frozen foundation encoder the fold models share (None without one);
    ``atlas`` what :func:`~fmmtc_core.atlas.load_atlas` takes for the model's atlas (a bundled
    name or the label image's path); ``window`` the model's window length (the encoder's,
    when it has one). Feed a scan through :meth:`inputs`, then :meth:`predict_proba`.

    Each field is also an attribute of the same name.

    Parameters
    ----------
    models : list of FMMTC
        The fold models (:func:`load_model`: in evaluation mode, in ``fold_*.safetensors``
        order).
    card : dict
        The model card (``model_card.json``): config, atlas, calibration, file digests.
    xyz : torch.Tensor (R, 3)
        Region centroids the encoder embeds (``baseline.safetensors``).
    cohort_mean_fc : torch.Tensor (R, R)
        The training cohort's mean connectivity: the explanation's ``"cohort_mean"``
        baseline.
    device : torch.device
        Where the models run.
    atlas : str, default=""
        The model's atlas, as :func:`~fmmtc_core.atlas.load_atlas` takes it.
    window : int, default=200
        The model's window length (the card config's ``window``; for an encoder, its
        window).
    extra : dict, default={}
        Further tensors of ``baseline.safetensors`` (e.g. ``cohort_mean_gram``, the Gram
        baseline of ``fc_input="gram"`` models).
    root : Path or None, default=None
        The model folder (resolved); None for an ensemble built by hand.
    encoder : FoundationEncoder or None, default=None
        The shared frozen foundation encoder; None without one.
    _digest : str or None, default=None
        :attr:`weights_sha256`, when already known (:func:`load_model` sets it); None
        computes it on first use.
    """

    models: list[FMMTC]
    card: dict
    xyz: torch.Tensor
    cohort_mean_fc: torch.Tensor
    device: torch.device
    atlas: str = ""
    window: int = 200
    extra: dict = field(default_factory=dict)
    root: Path | None = None
    encoder: FoundationEncoder | None = None
    _digest: str | None = field(default=None, repr=False)

    @property
    def whole_scan(self) -> bool:
        """Whether the model embeds every window of a scan (cards written since the encoder
        registry) rather than one centred window (older cards, encoders trained from scratch,
        connectivity-only models)."""
        return self.encoder is not None and self.encoder.entry.window_pooling == "mean"

    def inputs(self, signals: RegionSignals) -> ModelInputs:
        """The model's inputs for one scan's cleaned signals, as it was trained on them.

        :func:`fmmtc_core.preprocess.prepare` with the encoder (whole-scan models: every window,
        connectivity of the whole series, or of the span the windows cover for 0.1.0's
        cards: :attr:`fc_span`) or with the window length (older models: the centred window,
        connectivity of the whole series).

        Parameters
        ----------
        signals : RegionSignals
            Cleaned, in the model's atlas.

        Returns
        -------
        ModelInputs
            ``window`` is what :meth:`predict_proba` and :func:`fmmtc_core.explain.explain`
            take for this scan (add a leading batch axis for :meth:`predict_proba`).
        """
        if self.whole_scan and self.encoder is not None:
            return prepare(signals, self.encoder, fc_span=self.fc_span,
                           amplitude=self.models[0].config.amplitude_kind)
        return prepare(signals, self.window, amplitude=self.models[0].config.amplitude_kind)

    @property
    def fc_span(self) -> str:
        """Whole-scan models: ``"scan"`` when the card's connectivity comes from the whole
        cleaned series, ``"windows"`` for 0.1.0's cards (the span the windows cover)."""
        from fmmtc_core.preprocess import FC_SPAN_WINDOWS

        span = self.card.get("preprocessing", {}).get("connectivity", {}).get("span")
        return "windows" if span == FC_SPAN_WINDOWS else "scan"

    @property
    def name(self) -> str:
        """The model's name: the card's ``name``, else the folder's name, else ``"model"``."""
        return str(self.card.get("name") or (self.root.name if self.root else "model"))

    @property
    def model_type(self) -> str:
        """``"fmmtc"``: what a folder without a classic baseline's ``model.type`` holds."""
        return "fmmtc"

    @property
    def weights_sha256(self) -> str:
        """Identity of the model version: SHA-256 over its card and every weights file.

        :func:`load_model` computes it once, from the digests it checked against the card, so
        it names the files that were loaded. An ensemble built by hand hashes its ``root`` (or,
        without one, its card) on first use.
        """
        if self._digest is None:
            if self.root is None:
                self._digest = hashlib.sha256(
                    json.dumps(self.card, sort_keys=True).encode()).hexdigest()
            else:
                self._digest = _version_digest(
                    self.root, _file_sha256(self.root / MODEL_CARD),
                    _file_hashes(self.root, self.root.rglob("*.safetensors")))
        return self._digest

    @property
    def uses_amplitude(self) -> bool:
        """Whether the fold models read the regional amplitude (``ModelInputs.amplitude``)."""
        return bool(self.models[0].config.use_amplitude)

    def logits(self, window: torch.Tensor, fc: torch.Tensor | None,
               amplitude: torch.Tensor | None = None) -> torch.Tensor:
        """Per-fold logits.

        The fold models share one frozen encoder, so its embedding is computed once.

        Parameters
        ----------
        window : Tensor (B, W, ...) or (B, ...)
            The time-series input of each scan: every window of it (whole-scan models), or one
            window (older models: ``(B, R, T)`` robust-scaled centred windows); see
            :mod:`fmmtc_core.models.fmmtc`.
        fc : Tensor (B, R, R) or None
            Fisher-z connectivity.
        amplitude : Tensor (B, R) or None, default=None
            Relative regional amplitude (``ModelInputs.amplitude``); needed when
            :attr:`uses_amplitude`, ignored otherwise.

        Returns
        -------
        Tensor (K, B)
            One row per fold model.
        """
        first = self.models[0]
        scale = self.fold_scale.to(window.device)[:, None]
        if not first.frozen_ts:
            return torch.stack([m(window, fc, self.xyz, amplitude)
                                for m in self.models]) / scale
        ts = first.embed_ts(window, self.xyz)
        return torch.stack([
            m.forward_features(ts, m.fc_matrix(window, fc) if m.config.use_fc else None,
                               amplitude)
            for m in self.models]) / scale

    @property
    def fold_scale(self) -> torch.Tensor:
        """Each fold model's logit divisor (its logits' SD over its training participants).

        Cards written before fmmtc 0.3 have none: every divisor is then 1.

        Returns
        -------
        Tensor (K,) float32
        """
        values = self.card.get("calibration", {}).get("fold_scale") or [1.0] * len(self.models)
        return torch.tensor(values, dtype=torch.float32)

    def fold_probabilities(self, fold_logits: np.ndarray) -> np.ndarray:
        """Calibrated probability of each fold model.

        Parameters
        ----------
        fold_logits : ndarray (K,) or (K, B)
            Per-fold logits (``predict_proba(...)["fold_logits"]``).

        Returns
        -------
        ndarray of float64, the shape of ``fold_logits``
        """
        cal = self.card["calibration"]
        return platt(fold_logits, cal["a"], cal["b"])

    def predict_proba(self, window: np.ndarray | Sequence[np.ndarray],
                      fc: np.ndarray | None, amplitude: np.ndarray | None = None) -> dict:
        """Calibrated responder probability and its band over the fold models.

        Parameters
        ----------
        window : ndarray (B, W, ...) or (B, ...), or a list of B arrays (W_i, ...)
            The time-series input of each scan (``inputs(signals).window`` of :meth:`inputs`,
            stacked): every window of it for whole-scan models (a list when scans have
            different numbers of windows), the centred ``(R, T)`` window for older models.
        fc : ndarray (B, R, R) or None
            Fisher-z connectivity (:meth:`inputs`).
        amplitude : ndarray (B, R) or None, default=None
            Relative regional amplitude (``inputs(signals).amplitude``); needed when
            :attr:`uses_amplitude`, ignored otherwise.

        Returns
        -------
        dict
            ``probability`` (B,): the calibrated mean scaled fold logit; ``band`` (B, 2): the
            80 % interval of that probability over the card's bootstrap refits of the
            calibration (older cards: the calibrated fold probabilities' min and max);
            ``fold_logits`` (K, B), scaled (:attr:`fold_scale`).

        Raises
        ------
        InvalidInputError
            The model reads the regional amplitude and ``amplitude`` is None.
        """
        if isinstance(window, (list, tuple)):  # scans with different numbers of windows
            parts = [self.predict_proba(np.asarray(w)[None],
                                        None if fc is None else np.asarray(fc[i])[None],
                                        None if amplitude is None
                                        else np.asarray(amplitude[i])[None])
                     for i, w in enumerate(window)]
            return {"probability": np.concatenate([q["probability"] for q in parts]),
                    "band": np.concatenate([q["band"] for q in parts]),
                    "fold_logits": np.concatenate([q["fold_logits"] for q in parts], axis=1)}
        w = torch.as_tensor(window, dtype=torch.float32, device=self.device)
        f = None if fc is None else torch.as_tensor(fc, dtype=torch.float32, device=self.device)
        a = (None if amplitude is None or not self.uses_amplitude
             else torch.as_tensor(amplitude, dtype=torch.float32, device=self.device))
        if self.uses_amplitude and a is None:
            raise InvalidInputError(
                f"Model {self.name!r} reads the regional amplitude: pass "
                "inputs(signals).amplitude.")
        with torch.no_grad(), autocast(self.device):
            lg = self.logits(w, f, a).float().cpu().numpy()
        cal = self.card["calibration"]
        mean = lg.mean(0)
        if cal.get("bootstrap"):
            from fmmtc_core.evaluation import band_from_bootstrap

            band = band_from_bootstrap(mean, np.asarray(cal["bootstrap"], dtype=float))
        else:  # cards written before fmmtc 0.3: the fold models' spread
            p = self.fold_probabilities(lg)
            band = np.stack([p.min(0), p.max(0)], axis=1)
        return {"probability": platt(mean, cal["a"], cal["b"]), "band": band, "fold_logits": lg}


def default_model_dir() -> Path:
    """The model used when none is named: ``$FMMTC_MODEL_DIR``, else the bundled demo model.

    Returns
    -------
    Path
    """
    from fmmtc_core import config

    return config.default_model_dir()


# --------------------------------------------------------------------------------------------
# Writing a model folder
# --------------------------------------------------------------------------------------------
def write_model_folder(
    out: str | os.PathLike,
    *,
    fold_states: Sequence[dict[str, torch.Tensor]],
    baseline: dict[str, torch.Tensor],
    encoder: FoundationEncoder | BrainLMModel | None,
    card: dict,
) -> Path:
    """Write a model folder that :func:`load_model` reads.

    Parameters
    ----------
    out : path
        The folder; created if needed. Fold files of an earlier, larger run in it are removed
        (they would join the ensemble).
    fold_states : sequence of dict of str to Tensor
        Each fold model's tensors (without the shared frozen encoder), written as
        ``fold_K.safetensors``.
    baseline : dict of str to Tensor
        ``xyz`` (R, 3) and ``cohort_mean_fc`` (R, R) (optionally ``cohort_mean_gram``), written
        as ``baseline.safetensors``.
    encoder : FoundationEncoder, BrainLMModel or None
        The frozen encoder the folds share, written to ``foundation/``: a
        :class:`~fmmtc_core.models.encoder_base.FoundationEncoder`'s checkpoint files are copied
        unchanged (``config.json``, ``model.safetensors``), with its robust-scaling statistics
        (``robust_scaling.json``) and coordinate table (``A424_Coordinates.dat``) when it has
        them; a bare :class:`BrainLMModel` is saved. None when the model has none
        (connectivity only, or an encoder trained inside every fold).
    card : dict
        The model card; its ``files`` entry (SHA-256 of every file written) is filled in here.

    Returns
    -------
    Path
        ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, state in enumerate(fold_states):
        path = out / f"fold_{k}.safetensors"
        save_file({n: v.detach().cpu().contiguous() for n, v in state.items()}, str(path))
        written.append(path)
    for stale in set(out.glob("fold_*.safetensors")) - set(written):
        stale.unlink()
    save_file({n: v.detach().cpu().contiguous() for n, v in baseline.items()},
              str(out / "baseline.safetensors"))
    written.append(out / "baseline.safetensors")
    if isinstance(encoder, FoundationEncoder):
        written += _copy_encoder(encoder, out / "foundation")
    elif encoder is not None:
        encoder.save_pretrained(out / "foundation")
        written += [out / "foundation" / "config.json", out / "foundation" / "model.safetensors"]
    card = {**card, "files": _file_hashes(out, written)}
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
    return out


def _copy_encoder(encoder: FoundationEncoder, dst: Path) -> list[Path]:
    """The checkpoint files of ``encoder`` (unchanged), its scaling statistics and coordinate
    table, in ``dst``; returns the files written. Files of an earlier encoder are removed."""
    dst.mkdir(parents=True, exist_ok=True)
    files = []
    for name in ("config.json", "model.safetensors"):
        src, target = encoder.folder / name, dst / name
        if not (target.exists() and target.samefile(src)):
            tmp = target.with_name(f".{target.name}.part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        files.append(target)
    extras = {ROBUST_SCALING_FILE: encoder.scaling is not None,
              COORDINATES_FILE: encoder.coordinates_file is not None}
    if encoder.scaling is not None:
        files.append(encoder.scaling.save(dst / ROBUST_SCALING_FILE))
    coords = encoder.coordinates_file
    if coords is not None:
        target = dst / COORDINATES_FILE
        if not (target.exists() and target.samefile(coords)):
            shutil.copyfile(coords, target)
        files.append(target)
    for name, kept in extras.items():  # a stale file would be read by the next load
        if not kept and (dst / name).exists():
            (dst / name).unlink()
    return files


# --------------------------------------------------------------------------------------------
# Loading a model folder
# --------------------------------------------------------------------------------------------
def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_sha256(value) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and set(value) <= set("0123456789abcdef"))


def _read_card(root: Path) -> tuple[dict, str]:
    """The model card of ``root``, checked for what loading needs, and the card's SHA-256."""
    if not root.exists():
        raise ModelFileError(f"Model folder {str(root)!r} does not exist; expected a folder "
                             "written by `fmmtc train`.")
    path = root / MODEL_CARD
    if not root.is_dir() or not path.is_file():
        raise ModelFileError(f"{str(root)!r} is not an FMM-TC model folder (no {MODEL_CARD}); "
                             "expected a folder written by `fmmtc train`.")
    where = model_file(path, root)
    raw = path.read_bytes()
    card = read_json_object(path, where, "the model card written by `fmmtc train`", raw)
    missing = [k for k in _CARD_KEYS if k not in card]
    if missing:
        raise ModelFileError(
            f"{where} lacks the required key(s) {', '.join(map(repr, missing))}; expected "
            + "; ".join(f"{k!r}: {_CARD_KEYS[k]}" for k in missing) + ".")
    atlas, cal, files = card["atlas"], card["calibration"], card["files"]
    usable = {
        "model": isinstance(card["model"], dict),
        "atlas": isinstance(atlas, dict) and isinstance(atlas.get("name"), str),
        "calibration": isinstance(cal, dict) and _is_number(cal.get("a"))
        and _is_number(cal.get("b")),
        "files": isinstance(files, dict) and all(_is_sha256(v) for v in files.values()),
    }
    for key, ok in usable.items():
        if not ok:
            raise ModelFileError(f"{where} has an unusable {key!r} entry; expected "
                                 f"{_CARD_KEYS[key]}.")
    for rel in files:
        pure = Path(rel)
        if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel:
            raise ModelFileError(f"{where} lists {rel!r} under 'files'; expected names of files "
                                 "inside the model folder.")
    return card, hashlib.sha256(raw).hexdigest()


def _verify_files(root: Path, card: dict) -> dict[str, str]:
    """Check every file the model may read against the SHA-256 its card records, before any of
    them is parsed; return ``{path relative to root: SHA-256}`` of the checked files.

    The files are every ``*.safetensors`` in the folder (any of them enters the model version's
    identity, and a stray ``fold_K`` would join the ensemble), the encoder's ``config.json``,
    ``robust_scaling.json`` and ``A424_Coordinates.dat`` in ``foundation/`` and whatever else
    the card lists.
    """
    recorded = card["files"]
    legacy = not any(rel.startswith("foundation/") for rel in recorded)
    used = {p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")}
    for name in ("config.json", ROBUST_SCALING_FILE, COORDINATES_FILE):  # read by the encoder
        if (root / "foundation" / name).exists():
            used.add(f"foundation/{name}")
    digests = {}
    for rel in sorted(used | set(recorded)):
        path = root / rel
        if not path.is_file():
            raise ModelFileError(f"{model_file(path, root)} is missing; its card records it. "
                                 "Restore the model folder or retrain.")
        got = _file_sha256(path)
        if rel in recorded:
            if got != recorded[rel]:
                raise ModelFileError(
                    f"{model_file(path, root)} does not match its card (SHA-256 {got[:16]}..., "
                    f"the card records {recorded[rel][:16]}...); the model folder was changed "
                    "after it was written. Restore it or retrain.")
        elif not (legacy and _LEGACY_ENCODER_SHA256.get(rel) == got):
            hint = ("Its card was written before the encoder in foundation/ was hashed, and "
                    "only the bundled demo's encoder is accepted without a record: restore "
                    "the folder or retrain." if legacy and rel in _LEGACY_ENCODER_SHA256
                    else "Remove the file, restore the folder or retrain.")
            raise ModelFileError(
                f"{model_file(path, root)} is not recorded in its card ({MODEL_CARD} has no "
                f"SHA-256 for it), so it cannot be checked. {hint}")
        digests[rel] = got
    return digests


def _check_state(model: FMMTC, state: dict, path: Path, root: Path) -> None:
    """Refuse fold tensors that do not fit the card's architecture (names and shapes)."""
    ours = {k: v for k, v in model.state_dict().items()
            if not (model.frozen_ts and k.startswith("ts_encoder."))}  # stored once, elsewhere
    missing, unexpected = set(ours) - set(state), set(state) - set(ours)
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(ours[k].shape)})"
             for k in set(ours) & set(state) if state[k].shape != ours[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_fmt_keys(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_fmt_keys(wrong)}")
    if problems:
        raise ModelFileError(f"{model_file(path, root)} does not fit the architecture in "
                             f"{MODEL_CARD}: " + "; ".join(problems) + ".")


def _check_bootstrap(where: str, cal: dict) -> None:
    """Refuse a card's calibration ``bootstrap`` that is not a list of ``[a, b]`` numbers."""
    boot = cal.get("bootstrap")
    if boot is not None and (not isinstance(boot, list) or not boot or not all(
            isinstance(r, list) and len(r) == 2 and all(_is_number(v) for v in r)
            for r in boot)):
        raise ModelFileError(
            f"{where} has a calibration 'bootstrap' that is not a list of [a, b] number pairs.")


def _atlas_ref(atlas: dict) -> str:
    """What :func:`~fmmtc_core.atlas.load_atlas` takes for a card's atlas: the bundled name, or
    the label image the model was trained with (``source``)."""
    from fmmtc_core.atlas import resolve_atlas_name

    name = atlas["name"]
    source = atlas.get("source")
    if resolve_atlas_name(name) is None and isinstance(source, str) and source:
        return source
    return name


def _is_legacy(card: dict) -> bool:
    """A card written before whole-scan embeddings: the TS branch saw one centred window."""
    prep = card.get("preprocessing")
    return not (isinstance(prep, dict) and isinstance(prep.get("encoder"), dict))


def _load_card_encoder(root: Path, card: dict, config: FMMTCConfig, atlas_ref: str,
                       device: torch.device) -> FoundationEncoder:
    """The frozen encoder in ``root/foundation`` with the preprocessing the card records."""
    import warnings

    from fmmtc_core._errors import FMMTCWarning
    from fmmtc_core.atlas import resolve_atlas_name
    from fmmtc_core.models.registry import load_encoder

    folder = root / "foundation"
    where = model_file(root / MODEL_CARD, root)
    legacy = _is_legacy(card)
    atlas = None
    if resolve_atlas_name(card["atlas"]["name"]) is None:  # a user label image
        if not Path(atlas_ref).exists():
            raise ModelFileError(
                f"{where} names atlas {card['atlas']['name']!r} from "
                f"{card['atlas'].get('source')!r}, which does not exist here; the model needs "
                "the label image it was trained with (copy it to that path).")
        atlas = atlas_ref
    try:
        encoder = load_encoder(folder, device, atlas=atlas, token_pooling=config.ts_pooling,
                               window_pooling="centre" if legacy else None)
    except ModelFileError:
        raise
    except InvalidInputError as exc:
        raise ModelFileError(f"The encoder in {str(folder)!r} cannot be used: {exc}") from None
    if encoder.entry.window != config.window:
        raise ModelFileError(
            f"{model_file(folder / 'config.json', root)} has windows of {encoder.entry.window} "
            f"samples, but {MODEL_CARD} gives the model a window of {config.window}; expected "
            "the encoder the model was trained with.")
    recorded = card["preprocessing"]["encoder"] if not legacy else {}
    if (recorded.get("precision") == encoder.precision
            and recorded.get("preprocessing_hash") not in (None, encoder.preprocessing_hash)):
        warnings.warn(
            f"The encoder of model {card.get('name')!r} now preprocesses scans differently from "
            "when it was trained (its preprocessing hash changed: another version of the "
            "preprocessing code); its predictions may differ from its validation. Retrain it.",
            FMMTCWarning, stacklevel=3)
    return encoder


def load_model(model_dir: str | os.PathLike | None = None,
               device: torch.device | str | None = None) -> FMMTCEnsemble | ClassicModel:
    """Load a model folder written by :func:`write_model_folder` (safetensors + JSON only).

    The card's ``model.type`` says what the folder holds: FMM-TC (``"fmmtc"``, or no type: every
    card written before baselines were deployable) or a classic baseline (``cpm``, ``nbs``,
    ``edges``, ``amplitude``: :func:`fmmtc_core.models.classic.load_classic`, written by
    ``fmmtc train --model``). Either has the interface screening, explanation and evaluation
    use (:class:`~fmmtc_core.models.deployed.ScreeningModel`).

    Every weights file (folds, baseline, the encoder in ``foundation/`` with its config,
    scaling statistics and coordinate table) is checked against the SHA-256 its card records
    before it is parsed, and nothing is ever unpickled. The encoder is loaded through the
    registry (:func:`~fmmtc_core.models.registry.load_encoder`) with the preprocessing its card
    records: every window of a scan for cards with a ``preprocessing.encoder`` block, the one
    centred window for older cards (the bundled demo model, whose predictions are unchanged).

    Parameters
    ----------
    model_dir : path or None, default=None
        The model folder; None loads :func:`default_model_dir` (the bundled demo model unless
        ``$FMMTC_MODEL_DIR`` names another).
    device : torch.device, str or None, default=None
        Where the models run; default :func:`~fmmtc_core.models.device.select_device`.

    Returns
    -------
    FMMTCEnsemble or ClassicModel
        ``device`` does not apply to a classic baseline (it runs on the CPU, in numpy).

    Raises
    ------
    ModelFileError
        The folder or its card is missing; the card is not a JSON object, lacks a required key,
        names an unknown model type or holds an unknown config key; a file differs from its card's SHA-256 or has none
        recorded; a file is a pickle, truncated, or holds tensors of the wrong names or shapes
        for the card's architecture. The message names the file and what was expected.
    """
    root = Path(model_dir) if model_dir is not None else default_model_dir()
    card, card_sha256 = _read_card(root)
    where = model_file(root / MODEL_CARD, root)
    if model_type(card, where) != "fmmtc":  # a classic baseline (fmmtc train --model cpm ...)
        from fmmtc_core.models.classic import load_classic

        return load_classic(root, card, card_sha256)
    try:
        # cards written before baselines were deployable have no type: FMM-TC
        config = FMMTCConfig.from_dict({k: v for k, v in card["model"].items() if k != "type"})
    except InvalidInputError as exc:
        raise ModelFileError(f"{where} does not describe a usable model: {exc}") from None
    digests = _verify_files(root, card)  # before any weights are parsed
    # A str ("cpu") becomes a torch.device: autocast() and the models read device.type.
    device = torch.device(device) if device else select_device()
    encoder = None
    atlas_ref = _atlas_ref(card["atlas"])
    if config.use_encoder and config.foundation == "pretrained":
        encoder = _load_card_encoder(root, card, config, atlas_ref, device)

    def build() -> FMMTC:
        try:
            return FMMTC(config, encoder).to(device)
        except (InvalidInputError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{where} does not describe a usable model "
                                 f"({_one_line(exc)}).") from None

    models = []
    for path in sorted(root.glob("fold_*.safetensors")):
        model = build()
        state = read_safetensors(path, root=root, device=device)
        _check_state(model, state, path, root)
        model.load_state_dict(state, strict=False)
        models.append(model.eval())
    if not models:
        raise ModelFileError(f"{str(root)!r} holds no fold_*.safetensors model; expected the "
                             "fold files its card was written with.")
    cal = card["calibration"]
    scale = cal.get("fold_scale")
    if scale is not None and (not isinstance(scale, list) or len(scale) != len(models)
                              or not all(_is_number(v) and v > 0 for v in scale)):
        raise ModelFileError(
            f"{where} has a calibration 'fold_scale' that is not one positive number per fold "
            f"model ({len(models)}); got {_one_line(scale)[:80]}.")
    _check_bootstrap(where, cal)
    base_path = root / "baseline.safetensors"
    base = read_safetensors(base_path, root=root, device=device)
    r = config.n_regions
    shapes = {"xyz": (r, 3), "cohort_mean_fc": (r, r), "cohort_mean_gram": (r, r)}
    bad = [f"{k} {tuple(base[k].shape) if k in base else 'missing'}" for k in shapes
           if (k in base or k != "cohort_mean_gram")
           and (k not in base or tuple(base[k].shape) != shapes[k])]
    if bad:
        raise ModelFileError(
            f"{model_file(base_path, root)} does not fit the card's {r} regions: "
            f"{', '.join(bad)}; expected xyz ({r}, 3) and cohort_mean_fc ({r}, {r}).")
    extra = {k: v for k, v in base.items() if k not in ("xyz", "cohort_mean_fc")}
    return FMMTCEnsemble(models, card, base["xyz"], base["cohort_mean_fc"], device,
                         atlas=atlas_ref, window=config.window, extra=extra,
                         root=root.resolve(), encoder=encoder,
                         _digest=_version_digest(root.resolve(), card_sha256, digests))
