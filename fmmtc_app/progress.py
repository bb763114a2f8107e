"""The screening's progress as the Screen page shows it: a fraction and a label per event.

The screening announces each stage before its work (``(stage, 0, total, info)``) and reports it
done (``done == total``); see :func:`fmmtc_core.screening.screen`. The label always names the
stage being worked on: the announced one, or, once a stage is done, the next one, so no label
stays up while a later stage runs (it used to say "Predicting..." during the whole
explanation). No Streamlit here: the page draws what this computes.
"""

from __future__ import annotations

from fmmtc_core.screening import STAGES

__all__ = ["STAGE_SPAN", "STAGE_TEXT", "StageProgress"]

#: Where each stage's progress starts and ends on the bar (explaining is most of the time).
STAGE_SPAN = {"validate": (0.0, 0.05), "parcellate": (0.05, 0.45), "qc": (0.45, 0.5),
              "clean": (0.5, 0.55), "predict": (0.55, 0.6), "explain": (0.6, 0.97),
              "save": (0.97, 1.0)}

#: What the bar says while each stage runs.
STAGE_TEXT = {"validate": "Validating the file...", "parcellate": "Parcellating the scan...",
              "qc": "Checking quality...", "clean": "Cleaning the region signals...",
              "predict": "Predicting...", "explain": "Explaining the prediction...",
              "save": "Saving to the cohort database..."}
assert set(STAGE_SPAN) == set(STAGE_TEXT) == set(STAGES)

#: The label once the last stage is done.
DONE_TEXT = "Done."


class StageProgress:
    """Turns progress events into the bar's fraction and label.

    Attributes
    ----------
    fraction : float
        Position of the bar, 0-1; it never moves back.
    text : str
        The label: the stage being worked on.
    """

    def __init__(self) -> None:
        self.fraction = 0.0
        self.text = "Starting..."

    def update(self, stage: str, done: int, total: int) -> tuple[float, str]:
        """Take one progress event.

        Parameters
        ----------
        stage : str
            One of :data:`fmmtc_core.screening.STAGES` (an unknown stage keeps the bar and
            shows its name).
        done, total : int
            Progress within the stage; ``done == 0`` announces the stage, ``done >= total``
            ends it.

        Returns
        -------
        fraction : float
        text : str
            :attr:`fraction` and :attr:`text` after the event.
        """
        if stage not in STAGE_SPAN:
            self.text = stage
            return self.fraction, self.text
        lo, hi = STAGE_SPAN[stage]
        frac = lo + (hi - lo) * (min(done / total, 1.0) if total else 1.0)
        self.fraction = max(self.fraction, min(max(frac, 0.0), 1.0))
        if total and done >= total:  # this stage is over: the next one runs now
            following = STAGES[STAGES.index(stage) + 1:]
            self.text = STAGE_TEXT[following[0]] if following else DONE_TEXT
        else:
            self.text = STAGE_TEXT[stage]
        return self.fraction, self.text
