"""Bytes each device downloaded for a deployment, and its image size: fleet bandwidth accounting.

Revision ID: 0004
Revises: 0003
Created: 2026-11-30

An agent's ``installed`` and ``committed`` reports carry ``downloaded_bytes``
(pack bytes fetched, range gaps included) and ``image_bytes`` (the payloads'
size); the hub keeps them on the device's row of the deployment, so a
deployment's or a release's totals are one aggregate over an indexed table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployment_devices") as batch:
        batch.add_column(sa.Column("downloaded_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("image_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployment_devices") as batch:
        batch.drop_column("image_bytes")
        batch.drop_column("downloaded_bytes")
