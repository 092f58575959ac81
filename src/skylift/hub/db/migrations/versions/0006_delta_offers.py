"""Per-pair deltas: offered to devices assigned before them; failed ones retried.

Revision ID: 0006
Revises: 0005
Created: 2026-11-30

- ``release_deltas.offered``: set by the rollout engine's tick once the
  devices of active deployments of the delta's release that had not begun
  (``pending``) were re-assigned a target that names it. NULL for a delta
  not yet offered so: the first tick after this migration offers the ready
  deltas to the pending devices that were assigned before they were made.
- ``release_deltas.attempts``: how many times the hub began making the
  delta; a failed one is tried again, later, until it has had
  ``skylift.hub.deltas.MAX_ATTEMPTS``. Existing rows count one attempt.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("release_deltas") as batch:
        batch.add_column(sa.Column("offered", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
    # Only for the rows already there: the models give no server default.
    with op.batch_alter_table("release_deltas") as batch:
        batch.alter_column("attempts", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("release_deltas") as batch:
        batch.drop_column("attempts")
        batch.drop_column("offered")
