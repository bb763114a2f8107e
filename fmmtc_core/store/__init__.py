"""The cohort database: schema (:mod:`.models`), engines and migrations (:mod:`.db`), and the
repository functions the dashboard and the CLI use (:mod:`.repository`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fmmtc_core.store.db import (
    DatabaseError,
    check_schema,
    current_revision,
    data_dir,
    default_url,
    downgrade,
    head_revision,
    integrity_check,
    make_engine,
    row_counts,
    session_scope,
    storage_error,
    upgrade,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "DatabaseError",
    "check_schema",
    "current_revision",
    "data_dir",
    "default_url",
    "downgrade",
    "head_revision",
    "integrity_check",
    "make_engine",
    "row_counts",
    "session_scope",
    "storage_error",
    "upgrade",
    "open_database",
]


def open_database(url: str | None = None) -> Engine:
    """An engine for ``url`` with the schema upgraded to head (created when new).

    Parameters
    ----------
    url : str or None, default=None
        Any SQLAlchemy URL; None: :func:`~fmmtc_core.store.db.default_url`
        (``$FMMTC_DATABASE_URL``, else the SQLite file in the data folder).

    Returns
    -------
    sqlalchemy.Engine
        See :func:`~fmmtc_core.store.db.make_engine`.

    Raises
    ------
    InvalidInputError
        ``url`` is malformed or names an unknown driver.
    StorageError
        The database cannot be used (damaged file, unknown schema revision, unreachable
        server, ...), with a message saying what to do.
    """
    engine = make_engine(url)
    upgrade(engine)
    return engine
