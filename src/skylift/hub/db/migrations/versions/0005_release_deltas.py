"""Per-pair deltas of releases: the hub's work queue and what it offers devices.

Revision ID: 0005
Revises: 0004
Created: 2026-12-14

- ``release_deltas``: one row per (release, older release, payload) whose
  delta the hub makes in the background (``skylift.hub.deltas``), with its
  status (pending, ready, larger, too_large, failed), the delta's length and
  SHA-256, the chunk plan's size for comparison, and why it failed.
- ``releases.delta_depth``: how many previous releases' deltas were planned
  for the release, so that planning is done once (and again only when the
  hub's ``[deltas] previous_releases`` grows).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = ("pending", "ready", "larger", "too_large", "failed")


def upgrade() -> None:
    with op.batch_alter_table("releases") as batch:
        batch.add_column(sa.Column("delta_depth", sa.Integer(), nullable=True))
    listed = ", ".join(f"'{v}'" for v in _STATUSES)
    op.create_table(
        "release_deltas",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("from_release_id", sa.Integer(), nullable=False),
        sa.Column("payload", sa.String(length=64), nullable=False),
        sa.Column("from_sha256", sa.String(length=64), nullable=False),
        sa.Column("from_size", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("plan_bytes", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(f"status IN ({listed})", name=op.f("ck_release_deltas_status")),
        sa.CheckConstraint("from_release_id < release_id", name=op.f("ck_release_deltas_older")),
        sa.CheckConstraint("length IS NULL OR length > 0", name=op.f("ck_release_deltas_length")),
        sa.ForeignKeyConstraint(
            ["release_id"],
            ["releases.id"],
            name=op.f("fk_release_deltas_release_id_releases"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["from_release_id"],
            ["releases.id"],
            name=op.f("fk_release_deltas_from_release_id_releases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_release_deltas")),
        sa.UniqueConstraint(
            "release_id",
            "from_release_id",
            "payload",
            name=op.f("uq_release_deltas_release_id_from_release_id_payload"),
        ),
    )
    op.create_index(
        op.f("ix_release_deltas_status_release_id"), "release_deltas", ["status", "release_id"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_release_deltas_status_release_id"), table_name="release_deltas")
    op.drop_table("release_deltas")
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("delta_depth")
