"""The databases hub tests run on: a real, private PostgreSQL, and fresh ones per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from skylift.hub.db import current_revision, head_revision, make_engine
from skylift.hub.db.models import Organisation

from .. import conftest
from ..conftest import POSTGRES_URL_ENV, MigratedDatabase


@pytest.fixture
def server(postgres_url: str) -> Iterator[sa.Connection]:
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def test_server_is_a_real_postgresql(server: sa.Connection) -> None:
    assert "PostgreSQL" in server.execute(sa.text("SELECT version()")).scalar_one()


@pytest.mark.skipif(
    bool(os.environ.get(POSTGRES_URL_ENV)),
    reason=f"checks the throwaway server, and {POSTGRES_URL_ENV} names another one",
)
def test_throwaway_server_listens_on_no_network_port(server: sa.Connection) -> None:
    assert server.execute(sa.text("SHOW listen_addresses")).scalar_one() == ""
    # NULL on a unix-socket connection: the tests' own connection is not TCP either.
    assert server.execute(sa.text("SELECT inet_server_addr()")).scalar_one() is None


# The two tests below insert the same unique row: each passes only if its
# database is its own and starts empty, whichever runs first.


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_gets_an_empty_migrated_database(db: MigratedDatabase, run: str) -> None:
    assert current_revision(db.engine) == head_revision()
    with db.session() as session:
        assert session.scalars(sa.select(Organisation)).all() == []
        session.add(Organisation(name="acme"))
    with db.session() as session:
        assert session.scalars(sa.select(Organisation.name)).all() == ["acme"]


def test_database_url_is_empty_and_not_migrated(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) is None
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


# -- finding the server ---------------------------------------------------------------------------


def test_missing_server_binaries_fail_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fail, not a skip: a PostgreSQL run that did not happen must not pass."""
    monkeypatch.setattr(conftest, "_postgres_bin_dir", lambda: None)
    with (
        pytest.raises(pytest.fail.Exception, match="`make test` installs the postgresql package"),
        conftest._throwaway_postgres(),
    ):
        pass


def test_the_newest_complete_server_is_chosen(tmp_path: Path) -> None:
    for version, tools in [("9.6", ["initdb", "pg_ctl"]), ("15", ["initdb", "pg_ctl"])]:
        (tmp_path / version / "bin").mkdir(parents=True)
        for tool in tools:
            (tmp_path / version / "bin" / tool).touch()
    (tmp_path / "16" / "bin").mkdir(parents=True)  # a partial install: no pg_ctl
    (tmp_path / "16" / "bin" / "initdb").touch()
    assert conftest._postgres_bin_dir(f"{tmp_path}/*/bin") == tmp_path / "15" / "bin"
