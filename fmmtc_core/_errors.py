"""Exception types and small validators shared by the whole package.

Every refusal of user input raises :class:`InvalidInputError` with a message that says what was
wrong and what was expected. The CLI prints it as one ``error:`` line, the dashboard as a plain
sentence; neither shows a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # fmmtc_core.qc imports this module
    from fmmtc_core.qc import QCReport


class FMMTCError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(FMMTCError, ValueError):
    """User input (a scan, a table, a sidecar, an option) cannot be used as given."""


class ModelFileError(InvalidInputError):
    """A model folder or one of its files cannot be used: missing, not what it claims to be
    (e.g. a pickle renamed ``.safetensors``), truncated, of the wrong shape, or changed since its
    card was written (SHA-256 mismatch). The message names the file and what was expected."""


class QCFailedError(InvalidInputError):
    """The scan failed hard quality control: it is neither cleaned nor predicted.

    Parameters
    ----------
    message : str
        The error message (the QC reasons, in one sentence).
    report : QCReport
        The scan's QC report (:class:`fmmtc_core.qc.QCReport`); it says why.

    Attributes
    ----------
    report : QCReport
        The ``report`` given.
    """

    def __init__(self, message: str, report: QCReport) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple:  # picklable, so a worker process can hand it back
        return (type(self), (str(self), self.report))


class StorageError(FMMTCError):
    """The cohort database cannot be opened, read or written (corrupt file, unknown schema
    revision, unreachable server, full disk). Not the user's input: the CLI exits with
    :data:`EXIT_STORAGE` and the message says what to do."""


#: Exit statuses of the ``fmmtc`` command (documented in the README).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: please report it
EXIT_BAD_INPUT = 2  # the input (scan, option, model file, identifier) cannot be used
EXIT_STORAGE = 3  # the database cannot be opened, read or written


class FMMTCWarning(UserWarning):
    """A recoverable oddity in the input; it is also carried by the QC report."""


def check_option(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise a uniform error.

    Validators return the value, so they read inline (as in MNE's ``_check_option``).

    Parameters
    ----------
    name : str
        The parameter's name, for the message.
    value : object
        The value given.
    allowed : iterable
        The accepted values (compared with ``in``, i.e. by equality).

    Returns
    -------
    object
        ``value`` itself.

    Raises
    ------
    InvalidInputError
        ``value`` is not one of ``allowed``: "Invalid value for the 'name' parameter. Allowed
        values are 'a' and 'b', but got 'c' instead."

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
