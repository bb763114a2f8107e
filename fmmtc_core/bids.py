"""BIDS-style cohort folders: ``participants.tsv`` and each participant's scan.

The layout (README: data formats) is ``participants.tsv`` with a ``participant_id`` column
(optional ``responder`` 1/0, ``site``, ``drug``) and ``sub-*/func/*_bold.nii.gz`` (or
``*_timeseries.tsv`` region tables), each with an optional fMRIPrep
``*_desc-confounds_timeseries.tsv``. ``fmmtc simulate`` writes such folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fmmtc_core._errors import InvalidInputError

if TYPE_CHECKING:  # loaded by read_cohort: a missing cohort is refused before pandas loads
    import pandas as pd

__all__ = ["Cohort", "read_cohort"]


@dataclass
class Cohort:
    """A BIDS-style cohort folder, read (participants and their files).

    Attributes
    ----------
    root : Path
        The cohort folder.
    participants : DataFrame
        ``participant_id``, [``responder``], [``site``], [``drug``], ``scan`` (path) and
        ``confounds`` (path or None).
    labelled : bool
        Whether ``participants.tsv`` has a ``responder`` column.
    """

    root: Path
    participants: pd.DataFrame
    labelled: bool


def read_cohort(root: str | os.PathLike, *, require_labels: bool = True) -> Cohort:
    """Read ``participants.tsv`` and locate each participant's scan.

    Parameters
    ----------
    root : path
        The cohort folder.
    require_labels : bool, default=True
        Refuse a cohort without a ``responder`` column (training needs labels).

    Returns
    -------
    Cohort

    Raises
    ------
    InvalidInputError
        No ``participants.tsv`` or ``participant_id`` column, labels other than 1/0 or all
        alike, a participant without a scan.
    """
    root = Path(root)
    table = root / "participants.tsv"
    if not table.exists():
        raise InvalidInputError(f"{root} has no participants.tsv; expected a BIDS-style cohort.")
    import pandas as pd

    parts = pd.read_csv(table, sep="\t", dtype={"participant_id": str})
    if "participant_id" not in parts:
        raise InvalidInputError(f"{table} has no participant_id column.")
    labelled = "responder" in parts
    if require_labels and not labelled:
        raise InvalidInputError(f"{table} has no responder column (1/0); training needs labels.")
    if labelled:
        bad = parts.loc[~parts["responder"].isin([0, 1, "0", "1"]), "participant_id"].tolist()
        if bad:
            raise InvalidInputError(
                f"{table}: responder must be 1 or 0; participants {bad[:5]} have other values.")
        parts["responder"] = parts["responder"].astype(int)
    scans, confs = [], []
    for pid in parts["participant_id"]:
        func = root / pid / "func"
        bold = sorted(func.glob("*_bold.nii.gz")) + sorted(func.glob("*_bold.nii"))
        series = [p for p in sorted(func.glob("*_timeseries.tsv")) if "confounds" not in p.name]
        found = bold or series
        if not found:
            raise InvalidInputError(
                f"No scan for {pid}: expected {pid}/func/*_bold.nii.gz or *_timeseries.tsv.")
        scans.append(found[0])
        conf = sorted(func.glob("*_desc-confounds_timeseries.tsv"))
        confs.append(conf[0] if conf else None)
    parts["scan"], parts["confounds"] = scans, confs
    if labelled and parts["responder"].nunique() < 2:
        raise InvalidInputError(f"{table}: all participants have the same responder label.")
    return Cohort(root, parts, labelled)
