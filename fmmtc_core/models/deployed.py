"""What every deployed model folder gives screening, explanation and evaluation.

A model folder holds either FMM-TC (:class:`~fmmtc_core.models.ensemble.FMMTCEnsemble`) or a
classic baseline (:class:`~fmmtc_core.models.classic.ClassicModel`: CPM, NBS-Predict, edge-wise
or amplitude logistic regression). Its card's ``model.type`` says which; cards written before
baselines were deployable have none and hold FMM-TC. :func:`~fmmtc_core.models.ensemble.load_model`
reads the type and returns an object of :class:`ScreeningModel`'s shape, so the screening
pipeline, :func:`fmmtc_core.explain.explain`, :func:`fmmtc_core.training.evaluate`, the CLI and
the dashboard never branch on the kind of model.

This module imports neither torch nor scikit-learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fmmtc_core._errors import ModelFileError

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from fmmtc_core.preprocess import ModelInputs, RegionSignals

__all__ = ["MODEL_TYPES", "CLASSIC_TYPES", "ScreeningModel", "model_type", "card_cleaning"]

#: Model types a model folder can hold (a card's ``model.type``).
MODEL_TYPES = ("fmmtc", "cpm", "nbs", "edges", "amplitude")
#: The classic baselines among them (:mod:`fmmtc_core.baselines`).
CLASSIC_TYPES = MODEL_TYPES[1:]


@runtime_checkable
class ScreeningModel(Protocol):
    """A loaded model folder, as screening, explanation and evaluation use it.

    Attributes
    ----------
    card : dict
        The model card (``model_card.json``).
    atlas : str
        What :func:`~fmmtc_core.atlas.load_atlas` takes for the model's atlas.
    device : torch.device
        Where the model runs (classic baselines: the CPU).
    root : Path or None
        The model folder, resolved.
    models : list
        The fold models whose mean logit is the prediction.
    """

    card: dict
    atlas: str
    device: Any
    root: Path | None
    models: list

    @property
    def name(self) -> str:
        """The model's name (the card's ``name``, else the folder's)."""

    @property
    def model_type(self) -> str:
        """One of :data:`MODEL_TYPES`."""

    @property
    def weights_sha256(self) -> str:
        """Identity of the model version: SHA-256 over its card and every weights file."""

    def inputs(self, signals: RegionSignals) -> ModelInputs:
        """The model's inputs for one scan's cleaned signals, computed as in training.

        Parameters
        ----------
        signals : RegionSignals
            Cleaned, in the model's atlas.

        Returns
        -------
        ModelInputs
            What :meth:`predict_proba` and :func:`fmmtc_core.explain.explain` take (add a
            leading batch axis for :meth:`predict_proba`).
        """

    def predict_proba(self, window: Any, fc: np.ndarray | None,
                      amplitude: np.ndarray | None = None) -> dict:
        """Calibrated responder probability and its band.

        Parameters
        ----------
        window : ndarray or list of ndarray
            ``inputs(signals).window``, stacked (B scans).
        fc : ndarray (B, R, R) or None
            ``inputs(signals).fc``, stacked.
        amplitude : ndarray (B, ...) or None, default=None
            ``inputs(signals).amplitude``, stacked; needed by the models that read it.

        Returns
        -------
        dict
            ``probability`` (B,), ``band`` (B, 2) and ``fold_logits`` (K, B).
        """

    def fold_probabilities(self, fold_logits: np.ndarray) -> np.ndarray:
        """Calibrated probability of each fold model.

        Parameters
        ----------
        fold_logits : ndarray (K,) or (K, B)
            ``predict_proba(...)["fold_logits"]``.

        Returns
        -------
        ndarray of float64, the shape of ``fold_logits``
        """


def model_type(card: dict, where: str = "The model card") -> str:
    """The type of the model a card describes: its ``model.type``, ``"fmmtc"`` when absent.

    Parameters
    ----------
    card : dict
        A model card whose ``model`` entry is an object.
    where : str, default="The model card"
        How messages name the card (e.g. ``"Model file 'model_card.json' in '/m'"``).

    Returns
    -------
    str
        One of :data:`MODEL_TYPES`.

    Raises
    ------
    ModelFileError
        ``model.type`` is not one of :data:`MODEL_TYPES` (the oracle of
        :func:`fmmtc_core.baselines.compare` included: it cannot be deployed).
    """
    kind = card.get("model", {}).get("type", "fmmtc")
    if kind not in MODEL_TYPES:
        raise ModelFileError(
            f"{where} has the model type {kind!r}; expected one of "
            f"{', '.join(map(repr, MODEL_TYPES))} (a folder written by `fmmtc train "
            "--model`).")
    return str(kind)


def card_cleaning(card: dict, where: str = "The model card"):
    """The cleaning a model was trained with, so a new scan is cleaned the same way.

    Parameters
    ----------
    card : dict
        The model card; its ``preprocessing.cleaning`` block (the arguments of
        :func:`fmmtc_core.preprocess.clean`) as :func:`fmmtc_core.training.train` and
        :func:`fmmtc_core.baselines.train_baseline` record it. A card without one (hand-built
        ensembles) gets the defaults, which is what every training ran with before cards
        recorded it.
    where : str, default="The model card"
        How an error names the card.

    Returns
    -------
    CleaningSettings

    Raises
    ------
    ModelFileError
        The block is not a mapping, or names settings this version does not know.
    """
    from dataclasses import fields

    from fmmtc_core.preprocess import CleaningSettings

    block = (card.get("preprocessing") or {}).get("cleaning")
    if block is None:
        return CleaningSettings()
    if not isinstance(block, dict):
        raise ModelFileError(f"{where}'s preprocessing.cleaning must be a mapping of cleaning "
                             f"settings, got {type(block).__name__}.")
    known = {f.name for f in fields(CleaningSettings)}
    if unknown := sorted(set(block) - known):
        raise ModelFileError(
            f"{where}'s preprocessing.cleaning has settings this version does not know: "
            f"{', '.join(unknown)} (known: {', '.join(sorted(known))}); the model was written "
            "by a newer version.")
    return CleaningSettings(**block)
