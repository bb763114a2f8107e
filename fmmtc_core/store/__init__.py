"""The cohort database: schema (:mod:`.models`), engines and migrations (:mod:`.db`), and the
repository functions the dashboard and the CLI use (:mod:`.repository`)."""

from fmmtc_core.store.db import (
    current_revision,
    data_dir,
    default_url,
    downgrade,
    head_revision,
    integrity_check,
    make_engine,
    row_counts,
    session_scope,
    upgrade,
)

__all__ = [
    "current_revision",
    "data_dir",
    "default_url",
    "downgrade",
    "head_revision",
    "integrity_check",
    "make_engine",
    "row_counts",
    "session_scope",
    "upgrade",
    "open_database",
]


def open_database(url: str | None = None):
    """An engine for ``url`` (default location when None) with the schema upgraded to head."""
    engine = make_engine(url)
    upgrade(engine)
    return engine
