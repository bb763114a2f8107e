"""Identifiers and labels typed by people: study pseudonyms, site / drug / arm / operator.

Checked before anything is stored, and by the command line before any heavy module loads, so
this module imports nothing but the standard library (the cohort database re-exports these
functions from :mod:`fmmtc_core.store.repository`).
"""

from __future__ import annotations

import re

from fmmtc_core._errors import InvalidInputError

__all__ = ["validate_pseudonym", "validate_label"]

_PSEUDONYM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_DATE = re.compile(r"(19|20)\d{2}[-_./]?(0[1-9]|1[0-2])[-_./]?(0[1-9]|[12]\d|3[01])"
                   r"|(0[1-9]|[12]\d|3[01])[-_./](0[1-9]|1[0-2])[-_./](19|20)?\d{2}")


def validate_pseudonym(value: str) -> str:
    """Check a study pseudonym and return it in its stored form.

    A pseudonym is 1-64 letters, digits, ``_ . -``, starting with a letter or digit, with
    nothing that looks like a date (birth dates must never reach the database).

    Parameters
    ----------
    value : str
        The pseudonym as entered. Surrounding spaces and a BIDS ``sub-`` prefix are removed
        first.

    Returns
    -------
    str
        The pseudonym, stripped and without ``sub-``.

    Raises
    ------
    InvalidInputError
        Empty, too long, other characters, or it contains something like a date
        (``1987-03-02``, ``19870302``, ``02.03.87``).
    """
    value = (value or "").strip()
    if value.startswith("sub-"):
        value = value[4:]
    if not _PSEUDONYM.match(value):
        raise InvalidInputError(
            f"{value!r} is not a valid study pseudonym: use 1-64 letters, digits, '_', '.' or "
            "'-' (e.g. PAIN-0042), never a name.")
    if _DATE.search(value):
        raise InvalidInputError(
            f"{value!r} looks like it contains a date; enter the study pseudonym only, never a "
            "birth date.")
    return value


#: Site, drug, arm and operator: short labels of letters, digits, spaces and ``_ . - ( ) / +``.
_LABEL = re.compile(r"^[\w][\w .()/+\-]{0,63}$")


def validate_label(name: str, value: str | None, *, max_len: int = 64) -> str | None:
    """Check a short free-text label (site, drug, arm, operator) and return it stripped.

    1-64 characters (``max_len``): letters (any script), digits, spaces and ``_ . - ( ) / +``,
    starting with a letter or digit. Anything else (markup, formula prefixes such as ``=``,
    control characters, newlines) is refused, so the value is safe to show and to export.

    Parameters
    ----------
    name : str
        What the label is (``"site"``, ``"operator"`` ...), for the message.
    value : str or None
        The label as entered.
    max_len : int, default=64
        Longest label accepted. The pattern itself never accepts more than 64 characters, so
        only a smaller value changes anything.

    Returns
    -------
    str or None
        The stripped label; None for None or a blank value.

    Raises
    ------
    InvalidInputError
        ``value`` is not text, is too long or holds other characters.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"The {name} must be text, got {type(value).__name__}.")
    value = value.strip()
    if not value:
        return None
    if len(value) > max_len or not _LABEL.fullmatch(value):
        raise InvalidInputError(
            f"Invalid {name} {value[:80]!r}: use 1-{max_len} letters, digits, spaces or "
            "'_ . - ( ) / +', starting with a letter or digit.")
    return value
