"""Fixtures shared by the hub tests: databases on SQLite and on a real PostgreSQL.

Most tests want ``db``; it runs them on both databases:

- ``db``: a new, empty database migrated to head, per test
  (:class:`MigratedDatabase`: ``.url``, ``.engine``, ``.session()``, ``.backend``).
- ``database_url``: the URL of a new, empty database that is NOT migrated, per
  test (for migration tests).
- ``database_backend``: ``"sqlite"`` or ``"postgresql"``. Both fixtures above
  depend on it, so every test using either runs twice, with ids ``[sqlite]``
  and ``[postgresql]`` (select one with ``-k sqlite``).
- ``postgres_url`` (session): a database on the PostgreSQL server the tests
  use: ``$SKYLIFT_TEST_POSTGRES_URL`` if set (its user needs CREATEDB;
  PostgreSQL 13 or newer), else a throwaway server started for the session.

The throwaway server listens on a unix socket in a private temporary
directory (on /dev/shm when it has room), never on the network; it runs
without fsync (nothing in it needs to survive a crash) and is stopped when
the session ends, whatever happened.
If its binaries are missing the tests fail rather than skip: a PostgreSQL
run that did not happen must not look like a pass.

Cheap per-test databases: each backend is migrated once per session into a
template (a file for SQLite, ``CREATE DATABASE ... TEMPLATE`` for PostgreSQL)
and copied for every test.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from skylift.hub.db import make_engine, session_factory, upgrade

__all__ = ["BACKENDS", "POSTGRES_URL_ENV", "MigratedDatabase"]

POSTGRES_URL_ENV = "SKYLIFT_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")

# Where Debian and Ubuntu put the server binaries (one directory per major version).
_POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_MISSING_POSTGRES = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found in "
    f"{_POSTGRES_BIN_GLOB} or on PATH: `make test` installs the postgresql package "
    f"(or set {POSTGRES_URL_ENV} to a server of your own)"
)
# Bounds on every server command, so a wedged server fails the run instead of hanging it.
_PG_COMMAND_TIMEOUT_S = 60
_PG_START_TIMEOUT_S = 30
# Unix socket paths are limited to 107 bytes; keep well below.
_MAX_SOCKET_DIR_LEN = 80
# Docker's default /dev/shm is 64 MiB: too small to hold the server's data.
_MIN_TMPFS_FREE_BYTES = 1 << 30


@dataclass
class MigratedDatabase:
    """A migrated, empty database of its own for one test."""

    backend: str
    url: str
    engine: Engine
    sessions: sessionmaker[Session] = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = session_factory(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back if it raises."""
        with self.sessions.begin() as session:
            yield session


# -- the PostgreSQL server ------------------------------------------------------------------------


def _postgres_bin_dir(pattern: str = _POSTGRES_BIN_GLOB) -> Path | None:
    """The newest ``pattern`` directory holding initdb and pg_ctl, else PATH's, else None."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path.parent.name))

    candidates = sorted(Path("/").glob(pattern.lstrip("/")), key=version, reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def _server_user_kwargs(directory: Path) -> dict[str, Any]:
    """subprocess arguments that run the server as an unprivileged user.

    initdb and postgres refuse to run as root; as root we run them as
    ``nobody`` (which owns ``directory``), as anyone else as ourselves.
    """
    if os.geteuid() != 0:
        return {}
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.fail(
            "running as root and there is no user 'nobody' to run PostgreSQL as", pytrace=False
        )
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _private_dir() -> Path:
    """A new 0700 directory for the server's data and socket.

    On a tmpfs with room if there is one: copying a template database there
    takes a tenth of the time it takes on a (virtual) disk. The path must be
    short (the socket lives in it) and plain (pg_ctl passes the server
    options through /bin/sh).
    """
    for parent, min_free in [
        ("/dev/shm", _MIN_TMPFS_FREE_BYTES),
        (tempfile.gettempdir(), 0),
        ("/tmp", 0),
    ]:
        if (
            len(parent) <= _MAX_SOCKET_DIR_LEN - 20
            and re.fullmatch(r"[\w/.-]+", parent)
            and os.path.isdir(parent)
            and os.access(parent, os.W_OK | os.X_OK)
            and shutil.disk_usage(parent).free >= min_free
        ):
            return Path(tempfile.mkdtemp(prefix="skylift-pg-", dir=parent))
    pytest.fail("no writable temporary directory for the PostgreSQL server", pytrace=False)


def _run_server_command(args: list[str], what: str, log: Path | None, **kwargs: Any) -> None:
    # Variables such as PGHOST or PGPORT in the caller's environment must not
    # redirect the throwaway server's tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    try:
        result = subprocess.run(
            args,
            env=env,
            capture_output=True,
            text=True,
            timeout=_PG_COMMAND_TIMEOUT_S,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {_PG_COMMAND_TIMEOUT_S} s", pytrace=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        if log is not None and log.exists():
            output += log.read_text(errors="replace").strip().splitlines()
        pytest.fail(f"{what} failed: {' | '.join(output[-5:])}", pytrace=False)


@contextmanager
def _throwaway_postgres() -> Iterator[str]:
    """Start a private PostgreSQL server on a unix socket; yield a URL; stop it."""
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        pytest.fail(_MISSING_POSTGRES, pytrace=False)
    base = _private_dir()
    data, log = base / "data", base / "server.log"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log)]
    try:
        as_server = _server_user_kwargs(base)
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "skylift", "--auth=trust"]
        initdb += ["-E", "UTF8", "--locale=C", "--no-sync"]
        _run_server_command(initdb, "initdb", None, **as_server)
        # An empty listen_addresses: the unix socket in `base` is the only way in.
        options = (
            f"-k {base} -c listen_addresses='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        start = [*pg_ctl, "-o", options, "-w", "-t", str(_PG_START_TIMEOUT_S), "start"]
        try:
            _run_server_command(start, "starting PostgreSQL", log, **as_server)
            admin = make_url(f"postgresql+psycopg://skylift@/postgres?host={base}")
            engine = _admin_engine(admin)
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("CREATE DATABASE skylift_test")
            finally:
                engine.dispose()
            yield admin.set(database="skylift_test").render_as_string(hide_password=False)
        finally:
            # Also after a start that timed out: the server may be half up.
            if (data / "postmaster.pid").exists():
                stop = [*pg_ctl, "-m", "fast", "-w", "stop"]
                _run_server_command(stop, "stopping PostgreSQL", log, **as_server)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _admin_engine(url: URL) -> Engine:
    # CREATE and DROP DATABASE cannot run inside a transaction.
    return make_engine(url.render_as_string(hide_password=False)).execution_options(
        isolation_level="AUTOCOMMIT"
    )


class _PostgresDatabases:
    """Creates and drops per-test databases on one server.

    Names carry a random token so that runs sharing an external server do
    not collide.
    """

    def __init__(self, server_url: str) -> None:
        self._url = make_url(server_url)
        self._token = secrets.token_hex(4)
        self._numbers = itertools.count()
        self._template: str | None = None
        self._strategy: str | None = None
        self._admin = _admin_engine(self._url)

    def create(self, *, migrated: bool) -> str:
        """A new database, empty or a copy of the migrated template; returns its URL."""
        name = f"skylift_{self._token}_{next(self._numbers)}"
        template = self._migrated_template() if migrated else "template1"
        self._execute(f"CREATE DATABASE {name} TEMPLATE {template}{self._copy_strategy()}")
        return self._url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        """Drop the database at ``url``, closing whatever is still connected to it."""
        name = make_url(url).database
        self._execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        """Drop the template and close the administrative connections."""
        try:
            if self._template is not None:
                self._execute(f"DROP DATABASE IF EXISTS {self._template} WITH (FORCE)")
        finally:
            self._admin.dispose()

    def _migrated_template(self) -> str:
        if self._template is None:
            name = f"skylift_{self._token}_template"
            self._execute(f"CREATE DATABASE {name}")
            # upgrade() opens and disposes its own engine: nothing stays
            # connected, which CREATE DATABASE ... TEMPLATE requires.
            upgrade(self._url.set(database=name).render_as_string(hide_password=False))
            self._template = name
        return self._template

    def _copy_strategy(self) -> str:
        # PostgreSQL 15 copies a template through the WAL by default; copying
        # the files was up to twice as fast on a busy two-core machine, but it
        # forces checkpoints, which are cheap only when fsync is off (as on
        # the throwaway server).
        if self._strategy is None:
            with self._admin.connect() as conn:
                version = int(conn.exec_driver_sql("SHOW server_version_num").scalar_one())
                fsync = conn.exec_driver_sql("SHOW fsync").scalar_one()
            self._strategy = " STRATEGY FILE_COPY" if version >= 150000 and fsync == "off" else ""
        return self._strategy

    def _execute(self, statement: str) -> None:
        with self._admin.connect() as conn:
            conn.exec_driver_sql(statement)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database on the test PostgreSQL server (external or throwaway), for the session."""
    external = os.environ.get(POSTGRES_URL_ENV)
    if external:
        yield external
        return
    with _throwaway_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def _postgres_databases(postgres_url: str) -> Iterator[_PostgresDatabases]:
    databases = _PostgresDatabases(postgres_url)
    try:
        yield databases
    finally:
        databases.close()


# -- SQLite ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "hub.db"
    # upgrade() disposes its engine: the last connection to close checkpoints
    # the WAL into the main file, so copying that one file is a full copy.
    upgrade(f"sqlite:///{path}")
    return path


# -- per-test databases ---------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def database_backend(request: pytest.FixtureRequest) -> str:
    """``"sqlite"`` or ``"postgresql"``: runs the requesting test on each."""
    backend: str = request.param
    return backend


@pytest.fixture
def database_url(
    database_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[str]:
    """The URL of a new, empty database that has not been migrated."""
    if database_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    databases: _PostgresDatabases = request.getfixturevalue("_postgres_databases")
    url = databases.create(migrated=False)
    try:
        yield url
    finally:
        databases.drop(url)


@pytest.fixture
def db(
    database_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[MigratedDatabase]:
    """A new database, migrated to head and empty, on each backend."""
    databases: _PostgresDatabases | None = None
    if database_backend == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp_path / "hub.db"
        shutil.copyfile(template, path)
        url = f"sqlite:///{path}"
    else:
        databases = request.getfixturevalue("_postgres_databases")
        url = databases.create(migrated=True)
    engine = make_engine(url)
    try:
        yield MigratedDatabase(backend=database_backend, url=url, engine=engine)
    finally:
        engine.dispose()
        if databases is not None:
            databases.drop(url)
