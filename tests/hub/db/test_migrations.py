"""Migrations and engines: the migrations build exactly the models' schema, on both databases."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from skylift.hub.db import (
    DatabaseError,
    alembic_config,
    current_revision,
    describe_url,
    head_revision,
    make_engine,
    session_factory,
    upgrade,
)
from skylift.hub.db.models import Base, Organisation

# -- migrations -----------------------------------------------------------------------------------


def test_upgrade_builds_the_schema_at_head(database_url: str) -> None:
    assert current_revision(database_url) is None
    upgrade(database_url)
    assert current_revision(database_url) == head_revision() == "0006"
    engine = make_engine(database_url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_models_and_migrations_agree(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            # No dialect noise needs ignoring: UTCDateTime is compared through
            # its impl, the SQLite-only INTEGER variant of the 64-bit ids is
            # resolved per dialect, non-native enums reflect as the VARCHAR(32)
            # they are, and no column has a server default.
            assert compare_metadata(context, Base.metadata) == []
            # Alembic does not compare CHECK constraints: compare their names.
            inspector = sa.inspect(conn)
            for table in Base.metadata.sorted_tables:
                declared = {
                    str(c.name) for c in table.constraints if isinstance(c, sa.CheckConstraint)
                }
                reflected = {c["name"] for c in inspector.get_check_constraints(table.name)}
                assert reflected == declared, table.name
    finally:
        engine.dispose()


def test_the_comparison_sees_a_difference(database_url: str) -> None:
    """Guards the test above against comparing nothing."""
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX ix_devices_org_id_state")
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert [(d[0], d[1].name) for d in diff] == [("add_index", "ix_devices_org_id_state")]


def test_processes_migrating_at_once_wait_for_each_other(database_url: str) -> None:
    """Hub processes started together all call upgrade(); threads stand in for them.

    Without the migration lock this fails on both databases ("database is
    locked", "relation already exists").
    """
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(database_url)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert current_revision(database_url) == head_revision()


def test_upgrade_is_idempotent_and_keeps_data(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(Organisation).values(name="acme", created=datetime.now(UTC)))
        upgrade(engine)
        upgrade(database_url)
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            assert conn.execute(sa.select(Organisation.name)).scalars().all() == ["acme"]
    finally:
        engine.dispose()


def test_downgrade_to_base_removes_everything(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), "base")
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_a_database_from_a_newer_skylift_is_refused(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(DatabaseError, match="revision 9999") as raised:
            upgrade(engine)
        assert "newer Skylift" in raised.value.diagnostics()
        assert current_revision(engine) == "9999"
    finally:
        engine.dispose()


# -- engines (no server needed) -------------------------------------------------------------------


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "hub.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            }
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 5000}
        assert path.exists()
    finally:
        engine.dispose()


def test_connections_opened_together_on_a_new_sqlite_file_all_succeed(tmp_path: Path) -> None:
    """Each first connection switches the file to WAL; SQLite refuses one of two switches at once.

    The refusal comes without the busy timeout's wait (waiting could
    deadlock), so without a retry about one round in thirty fails here.
    """
    rounds, width = 150, 6
    failures: list[str] = []

    def connect(url: str, barrier: threading.Barrier) -> None:
        engine = make_engine(url)
        try:
            barrier.wait(timeout=10)
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        except BaseException as e:  # reported below, in the test's thread
            failures.append(f"{type(e).__name__}: {e}".splitlines()[0])
        finally:
            engine.dispose()

    for n in range(rounds):
        url = f"sqlite:///{tmp_path / f'{n}.db'}"
        barrier = threading.Barrier(width)
        threads = [threading.Thread(target=connect, args=(url, barrier)) for _ in range(width)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_an_sqlite_file_that_is_not_a_database_fails_at_once(tmp_path: Path) -> None:
    """Only "locked" is tried again; any other error surfaces on the first try."""
    path = tmp_path / "hub.db"
    path.write_bytes(b"not a database, " * 512)
    started = time.monotonic()
    with pytest.raises(DatabaseError, match="file is not a database") as raised:
        current_revision(f"sqlite:///{path}")
    assert time.monotonic() - started < 2
    assert "\n" not in raised.value.diagnostics()


def test_sqlite_ddl_is_transactional(tmp_path: Path) -> None:
    """What lets a failed migration leave nothing behind on SQLite too (pysqlite alone does not)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        with pytest.raises(RuntimeError), engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE half_done (x INTEGER)")
            raise RuntimeError("a later migration step fails")
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "url", ["postgresql://u@h/d", "postgres://u@h/d", "postgresql+psycopg://u@h/d"]
)
def test_postgresql_urls_use_psycopg(url: str) -> None:
    engine = make_engine(url)
    assert engine.url.drivername == "postgresql+psycopg"
    assert engine.pool._pre_ping


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root:pw@db/skylift", "unsupported database URL scheme 'mysql'"),
        ("postgresql+asyncpg://u@h/d", "unsupported database URL scheme 'postgresql+asyncpg'"),
        ("not a url: s3cret", "the database URL is not a URL"),
    ],
)
def test_unusable_urls_are_one_line_errors(url: str, message: str) -> None:
    with pytest.raises(DatabaseError) as raised:
        make_engine(url)
    text = raised.value.diagnostics()
    assert text.startswith(message)
    assert "\n" not in text and "s3cret" not in text and ":pw" not in text


def test_an_unreachable_postgresql_is_named_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql://skylift:s3cret@/hub?host={tmp_path}/no-server-here"
    with pytest.raises(DatabaseError) as raised:
        upgrade(url)
    text = raised.value.diagnostics()
    assert text.startswith(
        f"cannot connect to PostgreSQL database hub on socket directory {tmp_path}/no-server-here"
    )
    assert "s3cret" not in text and "\n" not in text


def test_an_sqlite_file_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DatabaseError, match="cannot create the directory") as raised:
        make_engine(f"sqlite:///{blocker}/sub/hub.db")
    assert "\n" not in raised.value.diagnostics()


@pytest.mark.parametrize(
    ("url", "described"),
    [
        ("sqlite:////var/lib/skylift/hub.db", "the SQLite database /var/lib/skylift/hub.db"),
        ("sqlite://", "the in-memory SQLite database"),
        (
            "postgresql://hub:pw@db.example:6432/skylift",
            "PostgreSQL database skylift on host db.example:6432 as hub",
        ),
        ("postgresql:///skylift", "PostgreSQL database skylift on the default socket"),
    ],
)
def test_describe_url(url: str, described: str) -> None:
    assert describe_url(url) == described


def test_session_factory_keeps_objects_readable_after_commit(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        upgrade(engine)
        with session_factory(engine).begin() as session:
            org = Organisation(name="acme")
            session.add(org)
        assert org.name == "acme" and org.id is not None
    finally:
        engine.dispose()
