"""Alembic environment for the hub's database, run from code.

:func:`skylift.hub.db.engine.upgrade` passes an open connection (inside its
transaction) as ``config.attributes["connection"]``; a developer writing a
revision passes a URL as ``config.attributes["url"]``
(:func:`skylift.hub.db.engine.alembic_config`). With neither, Alembic runs
offline and prints SQL.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from skylift.hub.db.engine import make_engine
from skylift.hub.db.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER constraints: later revisions rebuild tables
        # ("batch" mode) there, and this makes autogenerate write them so.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    url = config.attributes.get("url")
    if context.is_offline_mode():
        context.configure(
            url=url or "postgresql+psycopg://",
            target_metadata=Base.metadata,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    elif connection is not None:
        _run(connection)
    elif url is not None:
        engine = make_engine(url, pool_size=1)
        try:
            with engine.connect() as conn:
                _run(conn)
                conn.commit()
        finally:
            engine.dispose()
    else:
        raise RuntimeError("alembic_config() was given neither a connection nor a URL")


_main()
