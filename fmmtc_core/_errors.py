"""Exception types and small validators shared by the whole package.

Every refusal of user input raises :class:`InvalidInputError` with a message that says what was
wrong and what was expected. The CLI prints it as one ``error:`` line, the dashboard as a plain
sentence; neither shows a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class FMMTCError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(FMMTCError, ValueError):
    """User input (a scan, a table, a sidecar, an option) cannot be used as given."""


class FMMTCWarning(UserWarning):
    """A recoverable oddity in the input; it is also carried by the QC report."""


def check_option(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise a uniform error.

    Examples
    --------
    >>> check_option("kind", "a", ("a", "b"))
    'a'
    """
    allowed = tuple(allowed)
    if value in allowed:
        return value
    if len(allowed) == 1:
        options = repr(allowed[0])
    else:
        options = ", ".join(repr(a) for a in allowed[:-1]) + f" and {allowed[-1]!r}"
    raise InvalidInputError(
        f"Invalid value for the {name!r} parameter. Allowed values are {options}, "
        f"but got {value!r} instead."
    )
