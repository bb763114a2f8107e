"""Database location, engines, sessions and migrations.

- URL: ``--db`` / ``FMMTC_DATABASE_URL``; default a SQLite file ``fmmtc.db`` in the data
  directory (``FMMTC_DATA_DIR``, else ``$XDG_DATA_HOME/fmmtc``, else ``~/.local/share/fmmtc``).
- SQLite is opened in WAL mode (readers never block the writer), with foreign keys on, a 60 s
  busy timeout, and write transactions started with ``BEGIN IMMEDIATE`` so that concurrent
  writers queue for the lock instead of failing with "database is locked" on a lock upgrade.
- Any other SQLAlchemy URL works the same way; PostgreSQL is tested
  (``postgresql+psycopg://user@host/db``).
- The schema is created and upgraded by Alembic (:func:`upgrade`), never by ``create_all``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.orm import Session

from fmmtc_core._errors import InvalidInputError
from fmmtc_core.store.models import TABLES

__all__ = [
    "DatabaseError",
    "data_dir",
    "default_url",
    "make_engine",
    "session_scope",
    "upgrade",
    "downgrade",
    "current_revision",
    "head_revision",
    "row_counts",
    "integrity_check",
]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class DatabaseError(InvalidInputError):
    """The database refused or could not take a change; the transaction was rolled back.

    ``conflict`` is True for a constraint violation (e.g. two writers creating the same
    participant at once), which is worth retrying.
    """

    def __init__(self, message: str, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


def data_dir() -> Path:
    """Folder of the default SQLite database."""
    env = os.environ.get("FMMTC_DATA_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "fmmtc"


def default_url() -> str:
    """``FMMTC_DATABASE_URL``, else ``sqlite:///<data_dir>/fmmtc.db``."""
    env = os.environ.get("FMMTC_DATABASE_URL")
    if env:
        return env
    return f"sqlite:///{data_dir() / 'fmmtc.db'}"


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def make_engine(url: str | None = None, *, echo: bool = False) -> Engine:
    """An engine for ``url`` (default :func:`default_url`), configured as described above.

    Raises
    ------
    InvalidInputError
        For a malformed URL, an unknown driver, or a SQLite file whose folder cannot be made.
    """
    url = url or default_url()
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidInputError(
            f"{url!r} is not a database URL; expected e.g. sqlite:///path/fmmtc.db or "
            "postgresql+psycopg://user@host/dbname.") from None
    kwargs: dict = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InvalidInputError(
                    f"Cannot create the database folder {folder}: {exc.strerror}.") from None
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise InvalidInputError(
            f"No database driver for {_redact(url)} ({exc}); use sqlite:/// or "
            "postgresql+psycopg://.") from None
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's "begin" event (below) issue BEGIN, instead of pysqlite's implicit one.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def session_scope(engine: Engine, *, write: bool = False) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any exception.

    ``write=True`` takes SQLite's write lock at the start (``BEGIN IMMEDIATE``): a writer then
    waits for its turn (busy timeout) instead of failing when it later upgrades a read lock.
    """
    bind = engine.execution_options(sqlite_immediate=True) if write else engine
    session = Session(bind, expire_on_commit=False)
    try:
        with session.begin():
            yield session
    except IntegrityError as exc:
        raise DatabaseError(f"The database refused the change: {exc.orig}.",
                            conflict=True) from exc
    except OperationalError as exc:
        raise DatabaseError(f"The database could not be written: {exc.orig}.") from exc
    finally:
        session.close()


def _alembic_config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url",
                        connection.engine.url.render_as_string(hide_password=False))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Apply the migrations up to ``revision``; returns the revision the database is at."""
    from alembic import command

    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), revision)
    except OperationalError as exc:
        raise InvalidInputError(
            f"Cannot open the database {_redact(str(engine.url))}: {exc.orig}.") from None
    return current_revision(engine)


def downgrade(engine: Engine, revision: str = "-1") -> str:
    """Undo migrations down to ``revision`` (default: one step)."""
    from alembic import command

    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), revision)
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def row_counts(engine: Engine) -> dict[str, int]:
    """Rows in every table (the "database unchanged" check of the tests and the CLI)."""
    with Session(engine) as s:
        return {m.__tablename__: int(s.scalar(select(func.count()).select_from(m)))
                for m in TABLES}


def integrity_check(engine: Engine) -> list[str]:
    """Problems found (empty when sound): SQLite's integrity and foreign-key checks; on other
    databases, orphaned child rows."""
    problems: list[str] = []
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            res = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check")]
            if res != ["ok"]:
                problems += res
            problems += [f"foreign key: {tuple(r)}"
                         for r in conn.exec_driver_sql("PRAGMA foreign_key_check")]
        orphan = text(
            "SELECT COUNT(*) FROM screenings s WHERE NOT EXISTS "
            "(SELECT 1 FROM region_attributions r WHERE r.screening_id = s.id)")
        n = conn.execute(orphan).scalar()
        if n:
            problems.append(f"{n} screenings without region attributions")
    return problems
