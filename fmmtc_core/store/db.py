"""Database location, engines, sessions and migrations.

- URL: ``--db`` / ``FMMTC_DATABASE_URL``; default a SQLite file ``fmmtc.db`` in the data
  directory (``FMMTC_DATA_DIR``, else ``$XDG_DATA_HOME/fmmtc``, else ``~/.local/share/fmmtc``).
- SQLite is opened in WAL mode (readers never block the writer), with foreign keys on, a 60 s
  busy timeout, and write transactions started with ``BEGIN IMMEDIATE`` so that concurrent
  writers queue for the lock instead of failing with "database is locked" on a lock upgrade.
- Any other SQLAlchemy URL works the same way; PostgreSQL is tested
  (``postgresql+psycopg://user@host/db``).
- The schema is created and upgraded by Alembic (:func:`upgrade`), never by ``create_all``.
- A database that cannot be used (damaged file, a schema revision this version does not know,
  tables without a revision, an unreachable server, a read-only file, a full disk) raises
  :class:`~fmmtc_core._errors.StorageError` with one line that says what to do
  (:func:`storage_error`); the CLI exits with status 3.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from sqlalchemy import Engine, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    NotSupportedError,
    ProgrammingError,
)
from sqlalchemy.orm import Session

from fmmtc_core import config
from fmmtc_core._docs import fill_doc
from fmmtc_core._errors import InvalidInputError, StorageError
from fmmtc_core.store.models import TABLES

__all__ = [
    "DatabaseError",
    "storage_error",
    "check_schema",
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

#: Seconds to wait for a database server to answer before giving up (a URL's own
#: ``?connect_timeout=`` wins).
CONNECT_TIMEOUT_S = 5


class DatabaseError(StorageError):
    """The database refused or could not take a change; the transaction was rolled back.

    Raised by :func:`session_scope`.

    Parameters
    ----------
    message : str
        What happened and what to do, in one line.
    conflict : bool, default=False
        True for a constraint violation (e.g. two writers creating the same participant at
        once), which is worth retrying.

    Attributes
    ----------
    conflict : bool
        The ``conflict`` given.
    """

    def __init__(self, message: str, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


def data_dir() -> Path:
    """Folder of the default SQLite database.

    Returns
    -------
    Path
        :func:`fmmtc_core.config.data_dir` (not created here).
    """
    return config.data_dir()


def default_url() -> str:
    """The database URL used when none is given.

    Returns
    -------
    str
        ``$FMMTC_DATABASE_URL``, else ``sqlite:///<data_dir>/fmmtc.db``
        (:func:`fmmtc_core.config.database_url`).
    """
    return config.database_url()


def _redact(url: str | URL) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


# --------------------------------------------------------------------------------------------
# Storage errors: one line that says what happened and what to do
# --------------------------------------------------------------------------------------------
_SERVER_UNREACHABLE = re.compile(
    r"connection refused|could not connect|connection failed|timeout expired|timed out|"
    r"could not translate host name|name or service not known|no route to host|"
    r"network is unreachable|server closed the connection|connection reset|"
    r"no such file or directory.*socket|is the server running", re.I)
_LOGIN_REFUSED = re.compile(
    r"password authentication failed|no password supplied|authentication failed|"
    r"role .* does not exist|pg_hba\.conf", re.I)


def _driver_error(exc: BaseException) -> BaseException | None:
    """The database driver's own exception behind ``exc``, or None if ``exc`` is not one.

    Programming mistakes (bad SQL, a value of the wrong type) are bugs, not storage problems,
    and are left alone; so are constraint violations, which :func:`session_scope` reports.
    """
    if isinstance(exc, (IntegrityError, ProgrammingError, DataError, NotSupportedError)):
        return None
    if isinstance(exc, DBAPIError):
        return exc.orig if exc.orig is not None else exc
    if isinstance(exc, sqlite3.Error) and not isinstance(
            exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
        return exc
    if type(exc).__module__.split(".")[0] in ("psycopg", "psycopg2") and (
            type(exc).__name__ in ("OperationalError", "InterfaceError", "DatabaseError")):
        return exc
    return None


def _one_line(text_: str, url: URL | None) -> str:
    line = " ".join(str(text_).split())
    if url is not None and url.password:
        line = line.replace(str(url.password), "***")
    return line.rstrip(".")


def storage_error(exc: BaseException, url: str | URL | None = None) -> StorageError | None:
    """The :class:`StorageError` for a database driver error ``exc`` (None for anything else).

    The message is one line naming the database (password hidden) and what to do: restore a
    damaged file from a backup, start the server or fix the URL, make a read-only file
    writable, free disk space.

    Parameters
    ----------
    exc : BaseException
        The exception met while using the database. Constraint violations and programming
        errors (bad SQL, a value of the wrong type) are not storage errors.
    url : str, sqlalchemy.engine.URL or None, default=None
        The database's URL, to name it in the message (its password is hidden); None: "the
        database".

    Returns
    -------
    StorageError or None
        The error to raise (the caller raises it ``from exc``); None when ``exc`` is not a
        database driver's error.
    """
    orig = _driver_error(exc)
    if orig is None:
        return None
    try:
        parsed = make_url(url) if url is not None else None
    except ArgumentError:
        parsed = None
    detail = _one_line(str(orig) or type(orig).__name__, parsed)
    where = _redact(parsed) if parsed is not None else "the database"
    code = str(getattr(orig, "sqlite_errorname", "") or "")
    state = str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")
    low = detail.lower()
    sqlite = isinstance(orig, sqlite3.Error) or (
        parsed is not None and parsed.get_backend_name() == "sqlite")
    if sqlite:
        file = f"'{parsed.database}'" if parsed is not None and parsed.database else where
        if code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or (
                "not a database" in low or "malformed" in low):
            return StorageError(
                f"The database file {file} is damaged or not a SQLite database; restore it from "
                f"a backup ({detail}).")
        if code.startswith("SQLITE_READONLY") or "readonly" in low or "read-only" in low:
            return StorageError(
                f"The database file {file} is read-only ({detail}); make the file and its "
                "folder writable for this user, or work on a writable copy.")
        if code == "SQLITE_FULL" or "disk is full" in low:
            return StorageError(
                f"The disk holding the database file {file} is full ({detail}); free some "
                "space and run the command again (the unfinished change was rolled back).")
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in low:
            return StorageError(
                f"The database file {file} stayed locked by another process ({detail}); run "
                "the command again when that process has finished.")
        if code.startswith("SQLITE_CANTOPEN") or "unable to open" in low:
            return StorageError(
                f"Cannot open the database file {file} ({detail}); check that the path names "
                "a file in a folder this user can write to.")
        if code.startswith("SQLITE_IOERR") or "i/o error" in low:
            return StorageError(
                f"Reading or writing the database file {file} failed with a disk error "
                f"({detail}); check the disk, and restore the file from a backup if the error "
                "comes back.")
        return StorageError(f"The database file {file} could not be used ({detail}).")
    if state == "53100" or "disk full" in low or "no space left" in low:
        return StorageError(
            f"The database server at {where} has no disk space left ({detail}); ask its "
            "administrator to free some, then run the command again.")
    if state == "25006" or "read-only transaction" in low:
        return StorageError(
            f"The database at {where} is read-only ({detail}); use a server or user that "
            "may write to it.")
    if state == "3D000" or re.search(r"database .* does not exist", low):
        return StorageError(
            f"The database server at {where} has no such database ({detail}); create it "
            "(e.g. createdb) or fix the database name in the URL.")
    if state.startswith("28") or _LOGIN_REFUSED.search(detail):
        return StorageError(
            f"The database server at {where} refused the login ({detail}); check the user "
            "name and password in the URL.")
    if state.startswith("08") or _SERVER_UNREACHABLE.search(detail):
        return StorageError(
            f"Cannot reach the database server at {where} ({detail}); check that it is "
            "running and the URL.")
    return StorageError(f"The database at {where} could not be used ({detail}).")


@contextmanager
def _storage(url: str | URL) -> Iterator[None]:
    """Re-raise database driver errors met inside the block as :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        err = storage_error(exc, url)
        if err is None:
            raise
        raise err from exc


def make_engine(url: str | None = None, *, echo: bool = False) -> Engine:
    """An engine for ``url`` (default :func:`default_url`), configured as described above.

    Nothing is connected yet. A server's connection attempt gives up after
    :data:`CONNECT_TIMEOUT_S` seconds (unless the URL sets ``connect_timeout``).

    Parameters
    ----------
    url : str or None, default=None
        Any SQLAlchemy URL; None (or empty): :func:`default_url`. The folder of a SQLite file
        is created.
    echo : bool, default=False
        Log every SQL statement (SQLAlchemy's ``echo``).

    Returns
    -------
    sqlalchemy.Engine
        SQLite: WAL mode, foreign keys on, a 60 s busy timeout, ``BEGIN IMMEDIATE`` for
        writers (see :func:`session_scope`). Other databases: connections pinged before use.

    Raises
    ------
    InvalidInputError
        For a malformed URL or an unknown driver.
    StorageError
        For a SQLite file whose folder cannot be made.
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
        # A SQLite URI filename (file:...?mode=ro&uri=true) names an existing file: no folder.
        if parsed.database and parsed.database != ":memory:" and (
                not parsed.database.startswith("file:")):
            folder = Path(parsed.database).expanduser().resolve().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"Cannot create the database folder {folder}: {exc.strerror}; choose a "
                    "writable location (--db, FMMTC_DATABASE_URL or FMMTC_DATA_DIR).") from None
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
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
@fill_doc
def session_scope(engine: Engine, *, write: bool = False) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any exception.

    The session is closed on leaving the block; its objects stay readable
    (``expire_on_commit=False``).

    Parameters
    ----------
    %(engine)s
    write : bool, default=False
        Take SQLite's write lock at the start (``BEGIN IMMEDIATE``): a writer then waits for
        its turn (busy timeout) instead of failing when it later upgrades a read lock. No
        effect on other databases.

    Yields
    ------
    sqlalchemy.orm.Session
        The session, inside its transaction.

    Raises
    ------
    DatabaseError
        The database refused the change (a constraint violation: ``conflict=True``) or could
        not take it (a storage error); the transaction was rolled back. Other exceptions
        raised in the block propagate unchanged, after the rollback.
    """
    bind = engine.execution_options(sqlite_immediate=True) if write else engine
    session = Session(bind, expire_on_commit=False)
    try:
        with session.begin():
            yield session
    except IntegrityError as exc:
        detail = _one_line(str(exc.orig), engine.url)
        raise DatabaseError(f"The database refused the change: {detail}.",
                            conflict=True) from exc
    except DatabaseError:
        raise
    except Exception as exc:
        err = storage_error(exc, engine.url)
        if err is None:
            raise
        raise DatabaseError(str(err)) from exc
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


@contextmanager
def _migrating(engine: Engine) -> Iterator:
    """A connection with one open transaction for Alembic.

    On SQLite, foreign keys are switched off for the migration (SQLite's documented procedure
    for schema changes): a batch migration copies a table and drops the old one, and with
    foreign keys on, that drop would cascade into the child rows (region attributions of every
    screening). Violations are checked before the commit instead.
    """
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None  # an open connection has its DBAPI connection
        raw.execute("PRAGMA foreign_keys = OFF")  # outside a transaction, or it is ignored
        try:
            with conn.begin():
                yield conn
                bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if bad:
                    raise StorageError(
                        f"The migration would leave {len(bad)} row(s) pointing at missing rows "
                        f"(first: {tuple(bad[0])}); nothing was changed.")
        finally:
            raw.execute("PRAGMA foreign_keys = ON")


@fill_doc
def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Apply the migrations up to ``revision`` (creating the schema in a new database).

    Parameters
    ----------
    %(engine)s
    revision : str, default="head"
        The Alembic revision to reach.

    Returns
    -------
    str or None
        The revision the database is at afterwards.

    Raises
    ------
    StorageError
        The database cannot be used (see :func:`check_schema` and :func:`storage_error`).
    """
    from alembic import command

    with _storage(engine.url):
        check_schema(engine)
        with _migrating(engine) as conn:
            command.upgrade(_alembic_config(conn), revision)
    return current_revision(engine)


@fill_doc
def downgrade(engine: Engine, revision: str = "-1") -> str | None:
    """Undo migrations down to ``revision``.

    Parameters
    ----------
    %(engine)s
    revision : str, default="-1"
        The Alembic revision to reach: ``"-1"`` is one step back, ``"base"`` undoes every
        migration.

    Returns
    -------
    str or None
        The revision the database is at afterwards (None at ``base``).

    Raises
    ------
    StorageError
        The database cannot be used (see :func:`check_schema` and :func:`storage_error`).
    """
    from alembic import command

    with _storage(engine.url):
        check_schema(engine)
        with _migrating(engine) as conn:
            command.downgrade(_alembic_config(conn), revision)
    return current_revision(engine)


@fill_doc
def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at.

    Parameters
    ----------
    %(engine)s

    Returns
    -------
    str or None
        The Alembic revision; None for a new, empty database.

    Raises
    ------
    StorageError
        The database cannot be read (see :func:`storage_error`).
    """
    from alembic.runtime.migration import MigrationContext

    with _storage(engine.url), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _scripts():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg)


def head_revision() -> str:
    """The newest schema revision this version of fmmtc knows.

    Returns
    -------
    str
        The head revision of the migrations in :data:`MIGRATIONS`.
    """
    return _scripts().get_current_head()


@fill_doc
def check_schema(engine: Engine) -> str | None:
    """The database's schema revision, once it is clear that this version can use it.

    Parameters
    ----------
    %(engine)s

    Returns
    -------
    str or None
        The Alembic revision; None for a database without fmmtc tables (new, or holding only
        other tables).

    Raises
    ------
    StorageError
        The database cannot be read; it is at a revision this version does not know (written
        by a newer fmmtc); or it holds fmmtc tables without a revision (not made by Alembic),
        which no migration could safely change.
    """
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    with _storage(engine.url), engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
        if rev is None:
            ours = {m.__tablename__ for m in TABLES}
            found = sorted(ours & set(inspect(conn).get_table_names()))
    if rev is None:
        if found:
            raise StorageError(
                f"The database {_where(engine)} has fmmtc tables ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}) but no alembic_version table, so its "
                "schema revision is unknown and fmmtc will not change it; restore it from a "
                "backup, or use a new database.")
        return None
    try:
        known = _scripts().get_revision(rev) is not None
    except CommandError:
        known = False
    if not known:
        raise StorageError(
            f"The database is at schema revision {rev!r}, which this version of fmmtc does "
            "not know; upgrade fmmtc (or use the database with the version that wrote it).")
    return rev


def _where(engine: Engine) -> str:
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database:
        return f"file '{url.database}'"
    return _redact(url)


@fill_doc
def row_counts(engine: Engine) -> dict[str, int]:
    """Rows in every table (the "database unchanged" check of the tests and the CLI).

    Parameters
    ----------
    %(engine)s

    Returns
    -------
    dict of str to int
        Table name -> number of rows, for every table of
        :data:`fmmtc_core.store.models.TABLES`.

    Raises
    ------
    StorageError
        The database cannot be read.
    """
    with _storage(engine.url), Session(engine) as s:
        # COUNT(*) always returns one row, so scalar() is never None here.
        return {m.__tablename__: int(cast(int, s.scalar(select(func.count()).select_from(m))))
                for m in TABLES}


@fill_doc
def integrity_check(engine: Engine) -> list[str]:
    """Problems found in the database's contents (empty when sound).

    On SQLite: ``PRAGMA integrity_check`` and ``PRAGMA foreign_key_check``. On every
    database: screenings without region attributions (every stored screening has them).

    Parameters
    ----------
    %(engine)s

    Returns
    -------
    list of str
        One line per problem; empty when none was found.

    Raises
    ------
    StorageError
        The database cannot be read.
    """
    problems: list[str] = []
    with _storage(engine.url), engine.connect() as conn:
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
