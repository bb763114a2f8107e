"""What a model is valid for, read off its card: the warning every result must carry.

A result is only as good as the data its model learnt from. :func:`model_validity` reads a
model card (``model_card.json``) and says, in words meant for a clinician, whether the model
was trained on **simulated** data (the bundled demo: a result says nothing about a real
person), on real data but **not validated on this site's data** (its accuracy is a
cross-validation estimate on its own training cohort), or has been **validated** on the site's
data (the card's ``site_validation`` entry, written by whoever validated it).

Every reader of a screening (the result card, the report, the CSV export, the CLI's JSON and
text output, the Model page) shows :class:`ModelValidity` from here, so they all say the same
thing. No heavy imports: the store and the report use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

__all__ = ["ModelValidity", "model_validity", "VALIDITY_STATUSES"]

#: The statuses, from the most to the least severe.
VALIDITY_STATUSES = ("simulated", "unknown", "not validated", "validated")


@dataclass(frozen=True)
class ModelValidity:
    """What a model may be used for, and the warning its results carry.

    Attributes
    ----------
    status : {"simulated", "unknown", "not validated", "validated"}
        ``"simulated"``: trained on simulated data only; ``"unknown"``: the card does not say
        what data it was trained on; ``"not validated"``: trained on real data, never validated
        on this site's data; ``"validated"``: the card records a validation on the site's data.
    headline : str
        One short line in capitals for the top of a result (empty when ``"validated"``).
    message : str
        What the status means for this result, in plain words.
    valid_for : str
        What the model may be used for (the Model page's statement).
    trained_on : str
        The training data, as the card describes it.
    """

    status: str
    headline: str
    message: str
    valid_for: str
    trained_on: str

    @property
    def warn(self) -> bool:
        """True unless the model was validated on the site's data: results carry a warning."""
        return self.status != "validated"

    @property
    def severe(self) -> bool:
        """True for a model trained on simulated data (or on data its card does not name):
        its results say nothing about a real person."""
        return self.status in ("simulated", "unknown")

    @property
    def text(self) -> str:
        """The headline and the message as one sentence (for CSV cells and plain text)."""
        return f"{self.headline}: {self.message}" if self.headline else self.message

    def to_dict(self) -> dict:
        """The validity as a JSON-ready dict.

        Returns
        -------
        dict
            ``status``, ``headline``, ``message``, ``valid_for``, ``trained_on`` and
            ``warning`` (bool: results carry a warning).
        """
        return asdict(self) | {"warning": self.warn}


def _describe_data(data: Mapping) -> str:
    n, pos = data.get("n_subjects"), data.get("n_responders")
    cohort = data.get("cohort") or "an unnamed cohort"
    size = f"{n} participants" + (f", {pos} responders" if pos is not None else "") \
        if n is not None else "an unknown number of participants"
    sites = data.get("sites")
    where = f" from site(s) {', '.join(map(str, sites))}" if sites else ""
    return f"{cohort} ({size}{where})"


def model_validity(card: Mapping | None, name: str | None = None) -> ModelValidity:
    """What the model with this card is valid for.

    Parameters
    ----------
    card : mapping or None
        The model card (``model_card.json``; :attr:`FMMTCEnsemble.card
        <fmmtc_core.models.ensemble.FMMTCEnsemble.card>` or a stored model version's
        ``card``). Read: ``data`` (``simulated``, ``cohort``, ``n_subjects``,
        ``n_responders``, ``sites``) and ``site_validation``, an object describing a
        validation on the site's own data (``site``, ``n_subjects``, ``auc``, ``date``,
        ``by``: any of them); a card without ``site_validation`` counts as not validated.
        None (or a card without ``data``) gives status ``"unknown"``.
    name : str or None, default=None
        The model's name for the sentences; None: the card's ``name``, else "this model".

    Returns
    -------
    ModelValidity
    """
    card = card if isinstance(card, Mapping) else {}
    label = name or card.get("name") or "this model"
    data = card.get("data")
    if not isinstance(data, Mapping) or not data:
        return ModelValidity(
            status="unknown",
            headline="MODEL TRAINING DATA UNKNOWN - NOT VALIDATED",
            message=(f"The card of model {label!r} does not say what data it was trained on, "
                     "and it has not been validated on this site's data. Do not use this "
                     "result for any decision about a participant."),
            valid_for="Nothing can be said about what this model is valid for: its card does "
                      "not describe its training data.",
            trained_on="not recorded")
    trained_on = _describe_data(data)
    if data.get("simulated"):
        return ModelValidity(
            status="simulated",
            headline="DEMONSTRATION MODEL - TRAINED ON SIMULATED DATA ONLY",
            message=(f"Model {label!r} learnt from computer-simulated participants, never from "
                     "real patients. This result says nothing about a real person and must "
                     "not be used for any decision about a participant."),
            valid_for="Trying out the software and training staff on simulated participants. "
                      "Not valid for any decision about a real person.",
            trained_on=f"simulated data: {trained_on}")
    check = card.get("site_validation")
    if isinstance(check, Mapping) and check:
        parts = [f"{k.replace('_', ' ')} {v}" for k, v in check.items()
                 if k in ("site", "n_subjects", "auc", "date", "by") and v is not None]
        return ModelValidity(
            status="validated", headline="",
            message=(f"Model {label!r} was validated on this site's data"
                     + (f" ({'; '.join(parts)})" if parts else "") + "."),
            valid_for=("Research screening of participants like those it was validated on "
                       "(same scanner protocol, preprocessing and population). Research "
                       "software; not a medical device."),
            trained_on=trained_on)
    return ModelValidity(
        status="not validated",
        headline="NOT VALIDATED ON THIS SITE'S DATA",
        message=(f"Model {label!r} was trained on {trained_on}; its accuracy is a "
                 "cross-validation estimate on that cohort only and has not been checked on "
                 "this site's participants. Treat this result as a research estimate, not a "
                 "finding."),
        valid_for=("Research use on data like its training cohort. Before relying on it here, "
                   "check it against observed outcomes of this site's participants (Cohort "
                   "review: ROC and calibration) and record that validation in the model card "
                   "(site_validation)."),
        trained_on=trained_on)
