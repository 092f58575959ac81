"""The hub's database: SQLAlchemy 2 models, engines and Alembic migrations.

SQLite (one file, the embedded default) and PostgreSQL (production) run the
same schema; the test suite checks that the models and the migrations agree
on both. Typical start-up::

    engine = make_engine(settings.database_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        ...

A schema change is a model change plus a new revision in
``migrations/versions`` (``alembic_config`` and Alembic's ``command.revision``
with ``autogenerate=True`` draft it; review it by hand).
"""

from __future__ import annotations

from skylift.hub.db.engine import (
    DatabaseError,
    alembic_config,
    current_revision,
    describe_url,
    head_revision,
    make_engine,
    session_factory,
    upgrade,
)

__all__ = [
    "DatabaseError",
    "alembic_config",
    "current_revision",
    "describe_url",
    "head_revision",
    "make_engine",
    "session_factory",
    "upgrade",
]
