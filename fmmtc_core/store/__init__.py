"""The cohort database: schema (:mod:`.models`), engines and migrations (:mod:`.db`), and the
repository functions the dashboard and the CLI use (:mod:`.repository`)."""

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


def open_database(url: str | None = None):
    """An engine for ``url`` (default location when None) with the schema upgraded to head.

    Raises :class:`~fmmtc_core._errors.StorageError` when the database cannot be used (damaged
    file, unknown schema revision, unreachable server, ...), with a message saying what to do.
    """
    engine = make_engine(url)
    upgrade(engine)
    return engine
