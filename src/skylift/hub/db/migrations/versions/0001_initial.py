"""The initial schema: exactly what ``skylift.hub.db.models`` declares at 0001.

Revision ID: 0001
Revises:
Created: 2026-11-23

Drafted by autogenerate against SQLite, then reviewed and frozen by hand:
types are spelled out here rather than imported from the models (a later
model change must not rewrite history), and each enumeration is a VARCHAR
with an explicit, named CHECK of its values, which is what the models'
non-native ``sa.Enum`` columns create. Timestamps are ``DateTime(timezone=True)``,
the storage of ``UTCDateTime``. Tables are created parents first.
``tests/hub/db/test_migrations.py`` proves models and this file agree on
SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The enumerations' values at this revision, frozen here rather than imported.
_ROLES = ("admin", "operator", "viewer")
_ENROLLMENT_METHODS = ("provisioning", "signer_ca")
_DEVICE_STATES = (
    "idle",
    "checking",
    "downloading",
    "installing",
    "installed",
    "rebooting",
    "trial",
    "committed",
    "rolled_back",
    "failed",
)
_DEPLOYMENT_STATUSES = ("active", "paused", "aborted", "completed")
_ROLLOUT_STATUSES = ("pending", "downloading", "installed", "committed", "failed", "rolled_back")


def _one_of(table: str, column: str, values: tuple[str, ...]) -> sa.CheckConstraint:
    """The CHECK that a non-native ``sa.Enum`` column creates, named as the models name it."""
    listed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(f"ck_{table}_{column}"))


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=128), nullable=True),
        sa.Column("details", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_org_id_created"), "audit_log", ["org_id", "created"])
    op.create_table(
        "organisations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organisations")),
        sa.UniqueConstraint("name", name=op.f("uq_organisations_name")),
    )
    op.create_table(
        "products",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("release_threshold", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("release_threshold >= 1", name=op.f("ck_products_release_threshold")),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organisations.id"], name=op.f("fk_products_org_id_organisations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_products")),
        sa.UniqueConstraint("org_id", "id", name=op.f("uq_products_org_id_id")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_products_org_id_name")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        _one_of("users", "role", _ROLES),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organisations.id"], name=op.f("fk_users_org_id_organisations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("org_id", "email", name=op.f("uq_users_org_id_email")),
        sa.UniqueConstraint("org_id", "id", name=op.f("uq_users_org_id_id")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        _one_of("api_tokens", "role", _ROLES),
        sa.ForeignKeyConstraint(
            ["org_id", "user_id"],
            ["users.org_id", "users.id"],
            name=op.f("fk_api_tokens_org_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organisations.id"], name=op.f("fk_api_tokens_org_id_organisations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index(op.f("ix_api_tokens_org_id_user_id"), "api_tokens", ["org_id", "user_id"])
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("hardware_id", sa.String(length=128), nullable=False),
        sa.Column("cert_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("cert_not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enrolled_via", sa.String(length=32), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("progress", sa.Integer(), nullable=True),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_report_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        _one_of("devices", "enrolled_via", _ENROLLMENT_METHODS),
        _one_of("devices", "state", _DEVICE_STATES),
        sa.CheckConstraint(
            "progress IS NULL OR (progress >= 0 AND progress <= 100)",
            name=op.f("ck_devices_progress"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "product_id"],
            ["products.org_id", "products.id"],
            name=op.f("fk_devices_org_id_products"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organisations.id"], name=op.f("fk_devices_org_id_organisations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("device_id", name=op.f("uq_devices_device_id")),
    )
    op.create_index(op.f("ix_devices_org_id_hardware_id"), "devices", ["org_id", "hardware_id"])
    op.create_index(op.f("ix_devices_org_id_last_seen"), "devices", ["org_id", "last_seen"])
    op.create_index(op.f("ix_devices_org_id_product_id"), "devices", ["org_id", "product_id"])
    op.create_index(op.f("ix_devices_org_id_state"), "devices", ["org_id", "state"])
    op.create_table(
        "provisioning_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "max_uses IS NULL OR max_uses >= 1", name=op.f("ck_provisioning_keys_max_uses")
        ),
        sa.CheckConstraint("uses >= 0", name=op.f("ck_provisioning_keys_uses")),
        sa.ForeignKeyConstraint(
            ["org_id", "product_id"],
            ["products.org_id", "products.id"],
            name=op.f("fk_provisioning_keys_org_id_products"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organisations.id"], name=op.f("fk_provisioning_keys_org_id_organisations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provisioning_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_provisioning_keys_key_hash")),
        sa.UniqueConstraint(
            "product_id", "name", name=op.f("uq_provisioning_keys_product_id_name")
        ),
    )
    op.create_index(
        op.f("ix_provisioning_keys_org_id_product_id"),
        "provisioning_keys",
        ["org_id", "product_id"],
    )
    op.create_table(
        "release_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("keyid", sa.String(length=64), nullable=False),
        sa.Column("public_key", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["product_id"],
            ["products.id"],
            name=op.f("fk_release_keys_product_id_products"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_release_keys")),
        sa.UniqueConstraint("product_id", "keyid", name=op.f("uq_release_keys_product_id_keyid")),
    )
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("target_path", sa.String(length=512), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("hashes", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("custom", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("manifest_digest", sa.String(length=64), nullable=False),
        sa.Column("payload_size", sa.BigInteger(), nullable=False),
        sa.Column("stored_size", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.CheckConstraint("length >= 0", name=op.f("ck_releases_length")),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name=op.f("fk_releases_product_id_products")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_releases")),
        sa.UniqueConstraint("product_id", "id", name=op.f("uq_releases_product_id_id")),
        sa.UniqueConstraint(
            "product_id", "target_path", name=op.f("uq_releases_product_id_target_path")
        ),
        sa.UniqueConstraint("product_id", "version", name=op.f("uq_releases_product_id_version")),
    )
    op.create_table(
        "signer_cas",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "product_id"],
            ["products.org_id", "products.id"],
            name=op.f("fk_signer_cas_org_id_products"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organisations.id"], name=op.f("fk_signer_cas_org_id_organisations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signer_cas")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_signer_cas_fingerprint")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_signer_cas_org_id_name")),
    )
    op.create_index(op.f("ix_signer_cas_org_id_product_id"), "signer_cas", ["org_id", "product_id"])
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("selector", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column("failure_gate_percent", sa.Float(), nullable=False),
        sa.Column("min_soak_s", sa.Integer(), nullable=False),
        sa.Column("allow_downgrade", sa.Boolean(), nullable=False),
        sa.Column("current_phase", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        _one_of("deployments", "status", _DEPLOYMENT_STATUSES),
        sa.CheckConstraint("current_phase >= 0", name=op.f("ck_deployments_current_phase")),
        sa.CheckConstraint(
            "failure_gate_percent >= 0 AND failure_gate_percent <= 100",
            name=op.f("ck_deployments_failure_gate_percent"),
        ),
        sa.CheckConstraint("min_soak_s >= 0", name=op.f("ck_deployments_min_soak_s")),
        sa.ForeignKeyConstraint(
            ["org_id", "product_id"],
            ["products.org_id", "products.id"],
            name=op.f("fk_deployments_org_id_products"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organisations.id"], name=op.f("fk_deployments_org_id_organisations")
        ),
        sa.ForeignKeyConstraint(
            ["product_id", "release_id"],
            ["releases.product_id", "releases.id"],
            name=op.f("fk_deployments_product_id_releases"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
    )
    op.create_index(
        op.f("ix_deployments_org_id_product_id"), "deployments", ["org_id", "product_id"]
    )
    op.create_index(op.f("ix_deployments_org_id_status"), "deployments", ["org_id", "status"])
    op.create_index(
        op.f("ix_deployments_product_id_release_id"), "deployments", ["product_id", "release_id"]
    )
    op.create_table(
        "device_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=True),
        sa.Column("progress", sa.Integer(), nullable=True),
        sa.Column("result", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_time", sa.DateTime(timezone=True), nullable=True),
        _one_of("device_events", "state", _DEVICE_STATES),
        sa.CheckConstraint(
            "progress IS NULL OR (progress >= 0 AND progress <= 100)",
            name=op.f("ck_device_events_progress"),
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_events_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_events")),
        sa.UniqueConstraint(
            "device_id", "report_id", name=op.f("uq_device_events_device_id_report_id")
        ),
    )
    op.create_index(op.f("ix_device_events_created"), "device_events", ["created"])
    op.create_index(
        op.f("ix_device_events_device_id_created"), "device_events", ["device_id", "created"]
    )
    op.create_table(
        "device_slots",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("slot_class", sa.String(length=32), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_slots_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "slot_class", name=op.f("pk_device_slots")),
    )
    op.create_index(
        op.f("ix_device_slots_slot_class_version_device_id"),
        "device_slots",
        ["slot_class", "version", "device_id"],
    )
    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_tags_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "tag", name=op.f("pk_device_tags")),
    )
    op.create_index(op.f("ix_device_tags_tag_device_id"), "device_tags", ["tag", "device_id"])
    op.create_table(
        "director_targets",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("signed_targets", sa.LargeBinary(), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_director_targets_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_director_targets")),
    )
    op.create_index(op.f("ix_director_targets_expires"), "director_targets", ["expires"])
    op.create_table(
        "deployment_devices",
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        _one_of("deployment_devices", "status", _ROLLOUT_STATUSES),
        sa.CheckConstraint("phase >= 0", name=op.f("ck_deployment_devices_phase")),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name=op.f("fk_deployment_devices_deployment_id_deployments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_deployment_devices_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("deployment_id", "device_id", name=op.f("pk_deployment_devices")),
    )
    op.create_index(
        op.f("ix_deployment_devices_deployment_id_phase_status"),
        "deployment_devices",
        ["deployment_id", "phase", "status"],
    )
    op.create_index(op.f("ix_deployment_devices_device_id"), "deployment_devices", ["device_id"])
    op.create_table(
        "deployment_phases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("percent", sa.Float(), nullable=True),
        sa.Column("tag", sa.String(length=128), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(percent IS NULL) <> (tag IS NULL)", name=op.f("ck_deployment_phases_percent_or_tag")
        ),
        sa.CheckConstraint(
            "percent IS NULL OR (percent > 0 AND percent <= 100)",
            name=op.f("ck_deployment_phases_percent"),
        ),
        sa.CheckConstraint("phase >= 0", name=op.f("ck_deployment_phases_phase")),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name=op.f("fk_deployment_phases_deployment_id_deployments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment_phases")),
        sa.UniqueConstraint(
            "deployment_id", "phase", name=op.f("uq_deployment_phases_deployment_id_phase")
        ),
    )


def downgrade() -> None:
    op.drop_table("deployment_phases")
    op.drop_index(op.f("ix_deployment_devices_device_id"), table_name="deployment_devices")
    op.drop_index(
        op.f("ix_deployment_devices_deployment_id_phase_status"), table_name="deployment_devices"
    )
    op.drop_table("deployment_devices")
    op.drop_index(op.f("ix_director_targets_expires"), table_name="director_targets")
    op.drop_table("director_targets")
    op.drop_index(op.f("ix_device_tags_tag_device_id"), table_name="device_tags")
    op.drop_table("device_tags")
    op.drop_index(op.f("ix_device_slots_slot_class_version_device_id"), table_name="device_slots")
    op.drop_table("device_slots")
    op.drop_index(op.f("ix_device_events_device_id_created"), table_name="device_events")
    op.drop_index(op.f("ix_device_events_created"), table_name="device_events")
    op.drop_table("device_events")
    op.drop_index(op.f("ix_deployments_product_id_release_id"), table_name="deployments")
    op.drop_index(op.f("ix_deployments_org_id_status"), table_name="deployments")
    op.drop_index(op.f("ix_deployments_org_id_product_id"), table_name="deployments")
    op.drop_table("deployments")
    op.drop_index(op.f("ix_signer_cas_org_id_product_id"), table_name="signer_cas")
    op.drop_table("signer_cas")
    op.drop_table("releases")
    op.drop_table("release_keys")
    op.drop_index(op.f("ix_provisioning_keys_org_id_product_id"), table_name="provisioning_keys")
    op.drop_table("provisioning_keys")
    op.drop_index(op.f("ix_devices_org_id_state"), table_name="devices")
    op.drop_index(op.f("ix_devices_org_id_product_id"), table_name="devices")
    op.drop_index(op.f("ix_devices_org_id_last_seen"), table_name="devices")
    op.drop_index(op.f("ix_devices_org_id_hardware_id"), table_name="devices")
    op.drop_table("devices")
    op.drop_index(op.f("ix_api_tokens_org_id_user_id"), table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("users")
    op.drop_table("products")
    op.drop_table("organisations")
    op.drop_index(op.f("ix_audit_log_org_id_created"), table_name="audit_log")
    op.drop_table("audit_log")
