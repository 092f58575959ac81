"""Engines, sessions and migrations for the hub's database.

Two databases are supported: SQLite (the embedded default, one file) and
PostgreSQL through psycopg 3 (production, shared by many hub processes).
Migrations are Alembic's, shipped inside this package and run from code:
no ``alembic.ini`` is needed at run time.

Every failure that reaches a person is a :class:`DatabaseError` with one line
that names the database (path, or host/socket and database name) and never
the password.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from skylift.errors import SkyliftError

__all__ = [
    "SQLITE_BEGIN_IMMEDIATE",
    "DatabaseError",
    "alembic_config",
    "current_revision",
    "describe_url",
    "head_revision",
    "make_engine",
    "session_factory",
    "upgrade",
]

#: Where Alembic finds env.py and the versions (``package:directory`` form,
#: resolved through importlib, so it works from a wheel as from a checkout).
MIGRATIONS_LOCATION = "skylift.hub.db:migrations"

#: How long a SQLite connection waits for another writer before giving up.
SQLITE_BUSY_TIMEOUT_MS = 5_000
#: How long to wait for a PostgreSQL server to accept a connection.
POSTGRES_CONNECT_TIMEOUT_S = 10
#: Reconnect pooled PostgreSQL connections older than this: proxies and
#: load balancers drop idle connections silently.
POSTGRES_POOL_RECYCLE_S = 1_800

# pg_advisory_xact_lock key held while migrating, so that hub processes
# started together do not race to create the same tables. Any constant
# works; this one is "skylift" in ASCII, which fits a bigint.
_MIGRATION_LOCK_KEY = 0x736B796C696674

#: Execution option: begin SQLite transactions with BEGIN IMMEDIATE, which takes
#: the write lock at once (waiting up to the busy timeout). A deferred BEGIN that
#: reads and then writes fails at once with "database is locked" when another
#: writer came in between: SQLite cannot wait for that upgrade.
SQLITE_BEGIN_IMMEDIATE = "skylift_sqlite_begin_immediate"

# Pause between tries of a WAL switch that another connection's switch refused.
_WAL_SWITCH_RETRY_S = 0.01

_POSTGRES_DRIVERS = {"postgresql", "postgres", "postgresql+psycopg"}
_SQLITE_DRIVERS = {"sqlite", "sqlite+pysqlite"}


class DatabaseError(SkyliftError):
    """The database cannot be reached, used or migrated."""


def _parse(url: str | URL) -> URL:
    try:
        return make_url(url)
    except (sa.exc.ArgumentError, ValueError) as e:
        # The text is not repeated: it may hold a password.
        raise DatabaseError(
            "the database URL is not a URL",
            hint="use sqlite:///PATH or postgresql://USER@HOST/DATABASE",
        ) from e


def describe_url(url: str | URL) -> str:
    """Name the database ``url`` points at for a message: path, or host/socket and database.

    Never includes the password.

    Raises:
        DatabaseError: ``url`` cannot be parsed.
    """
    u = _parse(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        if u.database in (None, "", ":memory:"):
            return "the in-memory SQLite database"
        return f"the SQLite database {u.database}"
    host = u.host or _query_value(u, "host")
    if not host:
        where = "the default socket"
    elif host.startswith("/"):
        where = f"socket directory {host}"
    else:
        where = f"host {host}:{u.port or 5432}"
    user = f" as {u.username}" if u.username else ""
    return f"PostgreSQL database {u.database or '(default)'} on {where}{user}"


def _query_value(u: URL, key: str) -> str | None:
    value = u.query.get(key)
    if isinstance(value, tuple):
        return value[0] if value else None
    return value


def make_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    """Create an engine for ``url`` (``sqlite:///PATH`` or ``postgresql://...``).

    SQLite: the parent directory is created; every connection runs in WAL
    mode (readers do not block the writer) with foreign keys enforced and a
    busy timeout, and transactions are begun explicitly so that DDL is
    transactional and SAVEPOINTs work (pysqlite's own handling breaks both).

    PostgreSQL: ``postgresql://`` and ``postgres://`` are rewritten to the
    psycopg 3 driver; pooled connections are pinged before use and recycled.

    Nothing is connected yet: connection errors surface on first use
    (:func:`upgrade` and :func:`current_revision` translate them).

    Raises:
        DatabaseError: the URL is malformed, of an unsupported kind, or the
            SQLite file's directory cannot be created.
    """
    u = _parse(url)
    if u.drivername in _SQLITE_DRIVERS:
        return _sqlite_engine(u, echo=echo)
    if u.drivername in _POSTGRES_DRIVERS:
        return _postgres_engine(u, pool_size=pool_size, echo=echo)
    raise DatabaseError(
        f"unsupported database URL scheme {u.drivername!r}",
        hint="use sqlite:///PATH or postgresql://USER@HOST/DATABASE",
    )


def _sqlite_engine(u: URL, *, echo: bool) -> Engine:
    path = u.database
    if path and path != ":memory:" and not path.startswith("file:"):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatabaseError(
                f"cannot create the directory of the SQLite database {path}: {e.strerror}"
            ) from e
    engine = sa.create_engine(u, echo=echo)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level: SQLAlchemy's "begin" hook below
        # then issues BEGIN itself, before DDL as before DML.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # The timeout first: switching to WAL needs the database to itself.
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS:d}")
            cursor.execute("PRAGMA foreign_keys=ON")
            _switch_to_wal(cursor)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Deferred by default: reads (the poll path) do not take the write
        # lock. Migrations take it at once, so that a second process waits
        # for the first instead of failing half-way.
        immediate = connection.get_execution_options().get(SQLITE_BEGIN_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _switch_to_wal(cursor: Any) -> None:
    """Put the database in WAL mode, waiting up to the busy timeout for it.

    WAL is stored in the file, so only the first connection to a new file
    switches. Connections opened together on a new file (hub processes
    started at once) can each start the switch: SQLite then answers one of
    them "database is locked" at once, without calling the busy handler,
    because waiting could deadlock. That one tries again, and on its next
    try finds the file in WAL mode.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            # WAL is stored in the file: switch once, not on every connection.
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(_WAL_SWITCH_RETRY_S)


def _postgres_engine(u: URL, *, pool_size: int, echo: bool) -> Engine:
    u = u.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    # Settings given in the URL win over ours.
    if "connect_timeout" not in u.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    if "application_name" not in u.query:
        connect_args["application_name"] = "skylift-hub"
    return sa.create_engine(
        u,
        echo=echo,
        pool_size=pool_size,
        max_overflow=2 * pool_size,
        pool_pre_ping=True,
        pool_recycle=POSTGRES_POOL_RECYCLE_S,
        connect_args=connect_args,
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``.

    Objects stay readable after commit (``expire_on_commit=False``): hub
    handlers commit and then render what they changed, and reloading every
    object would cost a query each, or fail once the session is closed.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str | None = None, *, connection: Connection | None = None) -> Config:
    """An Alembic configuration for this package's migrations, built in code.

    Give ``connection`` to migrate on it (inside its transaction), or ``url``
    for Alembic to open its own; with neither, only offline commands work.
    Developers write a new revision with
    ``command.revision(alembic_config(url), message=..., autogenerate=True, rev_id="0002")``.
    """
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS_LOCATION)
    # Passed as attributes, not options: configparser would interpolate a
    # '%' in a password, and options may end up in logs.
    if connection is not None:
        cfg.attributes["connection"] = connection
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def head_revision() -> str:
    """The newest migration revision this version of Skylift ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships 0001
        raise DatabaseError("no database migrations are installed")
    return head


@contextmanager
def _engine_for(target: str | Engine) -> Iterator[Engine]:
    if isinstance(target, Engine):
        yield target
        return
    engine = make_engine(target, pool_size=1)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _connect(engine: Engine, **options: Any) -> Iterator[Connection]:
    try:
        conn = engine.connect().execution_options(**options)
    except sa.exc.DBAPIError as e:
        raise DatabaseError(
            f"cannot connect to {describe_url(engine.url)}: {_first_line(e, engine.url)}"
        ) from e
    with conn:
        yield conn


def _first_line(e: Exception, url: URL) -> str:
    # The driver's own message, without SQLAlchemy's SQL and parameter dump.
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    # Drivers do not echo passwords today; make sure of it.
    if url.password:
        line = line.replace(str(url.password), "***")
    return line


def upgrade(target: str | Engine) -> None:
    """Migrate the database at ``target`` (URL or engine) to the newest revision.

    Idempotent: a database already at head is left alone. The migration runs
    in one transaction under a lock (an advisory lock on PostgreSQL, the
    write lock on SQLite), so processes started together wait for each
    other instead of racing, and a failure leaves no half-built schema.

    Raises:
        DatabaseError: cannot connect, the database was migrated by a newer
            Skylift (unknown revision), or a migration step failed.
    """
    with _engine_for(target) as engine, _connect(engine, **{SQLITE_BEGIN_IMMEDIATE: True}) as conn:
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:key)"),
                        {"key": _MIGRATION_LOCK_KEY},
                    )
                _check_known_revision(conn, engine.url)
                command.upgrade(alembic_config(connection=conn), "head")
        except (CommandError, sa.exc.SQLAlchemyError) as e:
            raise DatabaseError(
                f"migrating {describe_url(engine.url)} failed: {_first_line(e, engine.url)}"
            ) from e


def _check_known_revision(conn: Connection, url: URL) -> None:
    current = MigrationContext.configure(conn).get_current_revision()
    if current is None:
        return
    try:
        ScriptDirectory.from_config(alembic_config()).get_revision(current)
    except CommandError as e:
        raise DatabaseError(
            f"{describe_url(url)} is at schema revision {current}, "
            "which this version of Skylift does not know",
            hint="it was migrated by a newer Skylift: run that version, or restore a backup",
        ) from e


def current_revision(target: str | Engine) -> str | None:
    """The migration revision of the database at ``target``; None if never migrated.

    Raises:
        DatabaseError: cannot connect.
    """
    with _engine_for(target) as engine, _connect(engine) as conn:
        try:
            return MigrationContext.configure(conn).get_current_revision()
        except sa.exc.DBAPIError as e:
            raise DatabaseError(
                f"cannot read the schema revision of {describe_url(engine.url)}: "
                f"{_first_line(e, engine.url)}"
            ) from e
