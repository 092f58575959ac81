"""The dashboard: login sessions, daily version counts, audit log filter indexes.

Revision ID: 0003
Revises: 0002
Created: 2026-12-07

- ``web_sessions``: one row per logged-in browser (see ``WebSession``); the
  row holds the SHA-256 of the cookie's secret, never the secret.
- ``version_counts``: devices per version per day, the adoption chart's
  history, written by the dashboard's background loop.
- ``device_slots (version, device_id)``: "devices running 1.2.0" in any
  slot class, which the dashboard's filter asks; the existing index starts
  with the slot class.
- ``audit_log`` indexes: the dashboard filters the log by action, and shows
  a deployment's own history (``target_type``, ``target_id``); without them
  each is a scan of the organisation's whole log.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "user_id"],
            ["users.org_id", "users.id"],
            name=op.f("fk_web_sessions_org_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organisations.id"], name=op.f("fk_web_sessions_org_id_organisations")
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_web_sessions")),
    )
    op.create_index(op.f("ix_web_sessions_org_id_user_id"), "web_sessions", ["org_id", "user_id"])
    op.create_index(op.f("ix_web_sessions_expires"), "web_sessions", ["expires"])
    op.create_table(
        "version_counts",
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("slot_class", sa.String(length=32), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organisations.id"], name=op.f("fk_version_counts_org_id_organisations")
        ),
        sa.PrimaryKeyConstraint(
            "org_id", "day", "slot_class", "version", name=op.f("pk_version_counts")
        ),
    )
    op.create_index(
        op.f("ix_device_slots_version_device_id"), "device_slots", ["version", "device_id"]
    )
    op.create_index(
        op.f("ix_audit_log_org_id_action_created"), "audit_log", ["org_id", "action", "created"]
    )
    op.create_index(
        op.f("ix_audit_log_org_id_target_type_target_id"),
        "audit_log",
        ["org_id", "target_type", "target_id"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_log_org_id_target_type_target_id"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_org_id_action_created"), table_name="audit_log")
    op.drop_index(op.f("ix_device_slots_version_device_id"), table_name="device_slots")
    op.drop_table("version_counts")
    op.drop_index(op.f("ix_web_sessions_expires"), table_name="web_sessions")
    op.drop_index(op.f("ix_web_sessions_org_id_user_id"), table_name="web_sessions")
    op.drop_table("web_sessions")
