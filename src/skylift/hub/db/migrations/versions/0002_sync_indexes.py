"""Indexes for the gateway's once-a-second sync of revocations and director changes.

Revision ID: 0002
Revises: 0001
Created: 2026-11-30

Without them, every hub process scans ``devices`` and ``director_targets`` in
full each second; at 100k devices that is most of a core.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_devices_revoked_at"), "devices", ["revoked_at"])
    op.create_index(op.f("ix_director_targets_updated"), "director_targets", ["updated"])


def downgrade() -> None:
    op.drop_index(op.f("ix_director_targets_updated"), table_name="director_targets")
    op.drop_index(op.f("ix_devices_revoked_at"), table_name="devices")
