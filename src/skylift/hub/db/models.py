"""The hub's tables, as SQLAlchemy 2 typed declarative mappings.

Everything belongs to an organisation. Where a row names both an
organisation and something inside one (a product, a user), a composite
foreign key ``(org_id, x_id) -> x(org_id, id)`` makes the database itself
refuse a row that mixes two tenants, whatever the code above it does.

Deletion policy (``ON DELETE``):

- rows that only describe one parent go with it (``CASCADE``): a device's
  tags, slots, events, director metadata and rollout rows; a deployment's
  phases and per-device rows; a product's release keys; a user's tokens;
  a release's deltas;
- records are never deleted from under something else (``NO ACTION``): a
  product with devices or releases, a release with deployments, an
  organisation with anything in it. The hub revokes, disables or aborts
  instead, which keeps history readable;
- the audit log has no foreign keys at all, so it outlives what it describes.

Datetimes are UTC-aware in Python on both databases (:class:`UTCDateTime`);
defaults are computed in Python, not by the server, so both databases store
the same values with the same precision.

No ``__repr__`` shows a secret, a hash of one or key material.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Dialect,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "NAMING_CONVENTION",
    "ApiToken",
    "AuditEntry",
    "Base",
    "DeltaStatus",
    "Deployment",
    "DeploymentDevice",
    "DeploymentPhase",
    "DeploymentStatus",
    "Device",
    "DeviceEvent",
    "DeviceSlot",
    "DeviceState",
    "DeviceTag",
    "DirectorTargets",
    "EnrollmentMethod",
    "Organisation",
    "Product",
    "ProvisioningKey",
    "Release",
    "ReleaseDelta",
    "ReleaseKey",
    "Role",
    "RolloutStatus",
    "SignerCA",
    "UTCDateTime",
    "User",
    "VersionCount",
    "WebSession",
    "utcnow",
]

#: Deterministic constraint and index names, identical on SQLite and
#: PostgreSQL, so that later migrations can drop or alter them by name. Every
#: generated name stays under PostgreSQL's 63-byte identifier limit (a test
#: checks), because longer names would be truncated differently per dialect.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Column sizes. PostgreSQL does not care much; they bound what a buggy or
# hostile client can make the hub store, and they are the same on both.
_NAME = 255
_SHORT = 32
_ID = 128
_VERSION = 128
_SHA256_HEX = 64
_PREFIX = 16


def utcnow() -> datetime:
    """The current time, UTC-aware (the default of every timestamp column)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is UTC-aware in Python on every database.

    PostgreSQL stores ``timestamp with time zone`` and returns it in the
    session's time zone; SQLite stores text and forgets any offset. So values
    are converted to UTC on the way in (SQLite gets naive UTC text, which
    also sorts correctly) and come back as aware UTC datetimes. A naive
    datetime is refused: it is a bug, because nobody knows its zone.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive values; store UTC (naive UTC on SQLite)."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given to a UTC timestamp column: pass tzinfo")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base: naming convention, UTC timestamps, safe reprs.

    Subclasses list in ``_repr_fields`` the attributes that ``repr`` may
    show; nothing else is shown, so a new secret column is safe by default.
    """

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}

    _repr_fields: ClassVar[tuple[str, ...]] = ("id",)

    def __repr__(self) -> str:
        # Only attributes already loaded: a repr must never run a query
        # (or fail on a detached object).
        loaded = sa.inspect(self).dict
        parts = [f"{name}={loaded[name]!r}" for name in self._repr_fields if name in loaded]
        return f"<{type(self).__name__} {' '.join(parts)}>"


# -- enumerations ---------------------------------------------------------------------------------


class Role(enum.StrEnum):
    """What a user or API token may do in its organisation."""

    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


class EnrollmentMethod(enum.StrEnum):
    """How a device got its certificate (DESIGN.md, Identity)."""

    PROVISIONING = "provisioning"
    SIGNER_CA = "signer_ca"


class DeviceState(enum.StrEnum):
    """The agent's state machine states, as the device reports them."""

    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    INSTALLED = "installed"
    REBOOTING = "rebooting"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class DeploymentStatus(enum.StrEnum):
    """Lifecycle of a deployment."""

    ACTIVE = "active"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"


class RolloutStatus(enum.StrEnum):
    """Where one device is in one deployment."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    INSTALLED = "installed"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class DeltaStatus(enum.StrEnum):
    """Where one per-pair delta is (``skylift.hub.deltas``)."""

    PENDING = "pending"
    #: Made, checked, stored, smaller than the chunk plan: offered to devices.
    READY = "ready"
    #: Made and checked, but not smaller than the chunk plan: not stored, not offered.
    LARGER = "larger"
    #: A payload is over the hub's ``[deltas] max_payload_bytes``: not attempted.
    TOO_LARGE = "too_large"
    FAILED = "failed"


def _enum(cls: type[enum.StrEnum], name: str) -> sa.Enum:
    # VARCHAR plus a named CHECK rather than a native PostgreSQL ENUM: adding
    # a value later is the same small migration on both databases, and the
    # values (not the Python names) are what is stored.
    return sa.Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=_SHORT,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


def _json() -> JSON:
    # Python None is SQL NULL, not the JSON text 'null'.
    return JSON(none_as_null=True)


# Tables that will grow without bound get 64-bit ids on PostgreSQL. SQLite
# only auto-increments a column declared exactly INTEGER PRIMARY KEY (its
# integers are 64-bit anyway), hence the variant.
_BigId = BigInteger().with_variant(Integer(), "sqlite")


# -- tenants and people ---------------------------------------------------------------------------


class Organisation(Base):
    """A tenant: every other row belongs to exactly one, directly or not."""

    __tablename__ = "organisations"
    _repr_fields = ("id", "name")

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME), unique=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    """A person who logs into the dashboard.

    ``password_hash`` carries its own parameters, ``scrypt$N$r$p$<salt hex>$<hash hex>``
    from :func:`skylift.hub.auth.hash_password`, so the cost can be raised without
    a migration.
    ``email`` is stored as the application normalised it (lower case).
    """

    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("org_id", "email"),
        # Target of api_tokens' composite foreign key.
        UniqueConstraint("org_id", "id"),
    )
    _repr_fields = ("id", "org_id", "email", "role", "disabled")

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    email: Mapped[str] = mapped_column(String(_NAME))
    password_hash: Mapped[str] = mapped_column(String(_NAME))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class WebSession(Base):
    """A person logged into the dashboard: one row per browser session.

    A database row rather than a signed cookie, because a session must end
    *now* everywhere when its user logs out, is disabled or is deleted (the
    foreign key cascades), and hub processes share no memory. The cookie
    holds a random secret; the row holds only its SHA-256, as for API tokens,
    so a copy of the database logs nobody in. ``csrf_token`` is the
    synchronizer token every dashboard form of this session must carry.
    ``last_seen`` is written at most once a minute; ``expires`` is the idle
    deadline, pushed forward on use up to ``created`` plus the absolute limit.
    """

    __tablename__ = "web_sessions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "user_id"], ["users.org_id", "users.id"], ondelete="CASCADE"
        ),
        Index(None, "org_id", "user_id"),
        # The sweep of expired sessions.
        Index(None, "expires"),
    )
    _repr_fields = ("org_id", "user_id", "created", "expires")

    token_hash: Mapped[str] = mapped_column(String(_SHA256_HEX), primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    user_id: Mapped[int] = mapped_column()
    csrf_token: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    expires: Mapped[datetime] = mapped_column()


class ApiToken(Base):
    """A bearer token for the management API.

    Only ``sha256(secret)`` is stored (unique: it is how a request finds its
    token); ``prefix`` is the first characters of the token, shown in lists so
    people can tell tokens apart. A token without a user belongs to the
    organisation (a CI pipeline, say); a user's tokens go when the user does.
    """

    __tablename__ = "api_tokens"
    __table_args__ = (
        ForeignKeyConstraint(
            ["org_id", "user_id"], ["users.org_id", "users.id"], ondelete="CASCADE"
        ),
        Index(None, "org_id", "user_id"),
    )
    _repr_fields = ("id", "org_id", "user_id", "name", "role", "prefix", "revoked")

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    user_id: Mapped[int | None] = mapped_column()
    name: Mapped[str] = mapped_column(String(_NAME))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    token_hash: Mapped[str] = mapped_column(String(_SHA256_HEX), unique=True)
    prefix: Mapped[str] = mapped_column(String(_PREFIX))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    last_used: Mapped[datetime | None] = mapped_column()
    expires: Mapped[datetime | None] = mapped_column()
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


# -- products and their keys ----------------------------------------------------------------------


class Product(Base):
    """A kind of device and its software line; releases and devices belong to one.

    ``release_threshold`` is how many of the product's release keys must sign
    its image-repository ``targets``.
    """

    __tablename__ = "products"
    __table_args__ = (
        UniqueConstraint("org_id", "name"),
        # Target of the composite foreign keys that keep tenants apart.
        UniqueConstraint("org_id", "id"),
        CheckConstraint("release_threshold >= 1", name="release_threshold"),
    )
    _repr_fields = ("id", "org_id", "name", "release_threshold")

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    name: Mapped[str] = mapped_column(String(_NAME))
    release_threshold: Mapped[int] = mapped_column(Integer, default=1)
    created: Mapped[datetime] = mapped_column(default=utcnow)

    release_keys: Mapped[list[ReleaseKey]] = relationship(
        back_populates="product",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="ReleaseKey.keyid",
    )


class ReleaseKey(Base):
    """A public release key of a product: a TUF key dict (``Key.to_dict()``) and its keyid."""

    __tablename__ = "release_keys"
    __table_args__ = (UniqueConstraint("product_id", "keyid"),)
    _repr_fields = ("id", "product_id", "keyid")

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    keyid: Mapped[str] = mapped_column(String(_SHA256_HEX))
    public_key: Mapped[dict[str, Any]] = mapped_column(_json())
    created: Mapped[datetime] = mapped_column(default=utcnow)

    product: Mapped[Product] = relationship(back_populates="release_keys")


class ProvisioningKey(Base):
    """A shared secret baked into a product's image; devices enroll with it.

    As for API tokens, only ``sha256(secret)`` is stored. ``uses`` counts
    enrollments; ``max_uses`` and ``expires`` (None: unlimited) bound them.
    """

    __tablename__ = "provisioning_keys"
    __table_args__ = (
        ForeignKeyConstraint(["org_id", "product_id"], ["products.org_id", "products.id"]),
        UniqueConstraint("product_id", "name"),
        Index(None, "org_id", "product_id"),
        CheckConstraint("uses >= 0", name="uses"),
        CheckConstraint("max_uses IS NULL OR max_uses >= 1", name="max_uses"),
    )
    _repr_fields = ("id", "org_id", "product_id", "name", "prefix", "uses", "revoked")

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    product_id: Mapped[int] = mapped_column()
    name: Mapped[str] = mapped_column(String(_NAME))
    key_hash: Mapped[str] = mapped_column(String(_SHA256_HEX), unique=True)
    prefix: Mapped[str] = mapped_column(String(_PREFIX))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    max_uses: Mapped[int | None] = mapped_column(Integer)
    expires: Mapped[datetime | None] = mapped_column()


class SignerCA(Base):
    """An operator's own CA whose device certificates the gateway accepts.

    ``product_id`` None: valid for every product of the organisation.
    ``fingerprint`` is the SHA-256 of the certificate's DER, hex; unique hub-wide
    so that one CA certificate cannot vouch for devices of two tenants.
    """

    __tablename__ = "signer_cas"
    __table_args__ = (
        ForeignKeyConstraint(["org_id", "product_id"], ["products.org_id", "products.id"]),
        UniqueConstraint("org_id", "name"),
        Index(None, "org_id", "product_id"),
    )
    _repr_fields = ("id", "org_id", "product_id", "name", "fingerprint", "revoked")

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    product_id: Mapped[int | None] = mapped_column()
    name: Mapped[str] = mapped_column(String(_NAME))
    cert_pem: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(_SHA256_HEX), unique=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


# -- devices --------------------------------------------------------------------------------------


class Device(Base):
    """An enrolled device.

    ``id`` is a surrogate integer that every child table references (4-8
    bytes in the million-row event and rollout indexes instead of a string);
    ``device_id`` is the name in the certificate subject, unique hub-wide,
    and how the gateway finds the row. A revoked device keeps its row, so its
    id can never enroll again.
    """

    __tablename__ = "devices"
    __table_args__ = (
        ForeignKeyConstraint(["org_id", "product_id"], ["products.org_id", "products.id"]),
        # The dashboard's lists and filters are always within one organisation.
        Index(None, "org_id", "product_id"),
        Index(None, "org_id", "hardware_id"),
        Index(None, "org_id", "state"),
        Index(None, "org_id", "last_seen"),
        # Every hub process re-reads recent revocations each second.
        Index(None, "revoked_at"),
        CheckConstraint("progress IS NULL OR (progress >= 0 AND progress <= 100)", name="progress"),
    )
    _repr_fields = ("id", "device_id", "org_id", "product_id", "hardware_id", "state", "revoked")

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(_ID), unique=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    product_id: Mapped[int] = mapped_column()
    hardware_id: Mapped[str] = mapped_column(String(_ID))
    cert_fingerprint: Mapped[str] = mapped_column(String(_SHA256_HEX))
    cert_not_after: Mapped[datetime] = mapped_column()
    enrolled_via: Mapped[EnrollmentMethod] = mapped_column(_enum(EnrollmentMethod, "enrolled_via"))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[datetime | None] = mapped_column()
    revoke_reason: Mapped[str | None] = mapped_column(Text)
    state: Mapped[DeviceState] = mapped_column(
        _enum(DeviceState, "state"), default=DeviceState.IDLE
    )
    state_reason: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[int | None] = mapped_column(Integer)
    # Written in batches, never once per poll (DESIGN.md: the poll path).
    last_seen: Mapped[datetime | None] = mapped_column()
    last_report_at: Mapped[datetime | None] = mapped_column()
    created: Mapped[datetime] = mapped_column(default=utcnow)

    product: Mapped[Product] = relationship()
    tags: Mapped[list[DeviceTag]] = relationship(
        back_populates="device",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="DeviceTag.tag",
    )
    slots: Mapped[list[DeviceSlot]] = relationship(
        back_populates="device",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="DeviceSlot.slot_class",
    )


class DeviceTag(Base):
    """One tag of one device.

    A table rather than a JSON list: "devices tagged X" is then an index
    range scan on ``(tag, device_id)`` on both databases, at 100k devices as
    at 10; JSON arrays are not indexable portably (SQLite would scan every
    row through ``json_each``, PostgreSQL needs ``jsonb`` and GIN). Select
    with ``Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == t))``.
    """

    __tablename__ = "device_tags"
    __table_args__ = (
        # Covering: the filter never touches the table itself.
        Index(None, "tag", "device_id"),
    )
    _repr_fields = ("device_id", "tag")

    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(_ID), primary_key=True)

    device: Mapped[Device] = relationship(back_populates="tags")


class DeviceSlot(Base):
    """The version installed in one slot class (``rootfs``, ``app``, ...) of a device.

    A table rather than JSON for the same reason as tags: deployments select
    "devices whose rootfs runs 1.2.3", an index scan on
    ``(slot_class, version, device_id)``.
    """

    __tablename__ = "device_slots"
    __table_args__ = (
        Index(None, "slot_class", "version", "device_id"),
        # "Devices running 1.2.0" in any slot class (the dashboard's filter).
        Index(None, "version", "device_id"),
    )
    _repr_fields = ("device_id", "slot_class", "version")

    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    slot_class: Mapped[str] = mapped_column(String(_SHORT), primary_key=True)
    version: Mapped[str] = mapped_column(String(_VERSION))
    updated: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    device: Mapped[Device] = relationship(back_populates="slots")


class DeviceEvent(Base):
    """One report from a device: a step of an update, its progress or its outcome.

    ``report_id`` is generated by the agent and sent again on every retry of
    the same report, so ``(device_id, report_id)`` unique makes reporting
    idempotent. ``created`` is the hub's clock (trusted, used for ordering);
    ``device_time`` is what the device believed. This table grows to millions
    of rows: the indexes serve a device's timeline (``device_id, created``)
    and time ranges across the fleet (``created``).
    """

    __tablename__ = "device_events"
    __table_args__ = (
        UniqueConstraint("device_id", "report_id"),
        Index(None, "device_id", "created"),
        Index(None, "created"),
        CheckConstraint("progress IS NULL OR (progress >= 0 AND progress <= 100)", name="progress"),
    )
    _repr_fields = ("id", "device_id", "kind", "state", "progress", "result", "created")

    id: Mapped[int] = mapped_column(_BigId, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    report_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(_SHORT))
    state: Mapped[DeviceState | None] = mapped_column(_enum(DeviceState, "state"))
    progress: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[str | None] = mapped_column(String(_SHORT))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None] = mapped_column(_json())
    created: Mapped[datetime] = mapped_column(default=utcnow)
    device_time: Mapped[datetime | None] = mapped_column()


# -- releases and deployments ---------------------------------------------------------------------


class Release(Base):
    """A published bundle: what the image repository's ``targets`` lists.

    ``target_path`` is the TUF target name; ``length`` and ``hashes``
    (``{"sha256": hex}``) are those of the target file; ``custom`` is the
    target's custom field (product, version, hardware ids). ``payload_size``
    is the uncompressed total of all payloads; ``stored_size`` what the
    release added to the object store (chunks it did not already hold).
    """

    __tablename__ = "releases"
    __table_args__ = (
        UniqueConstraint("product_id", "version"),
        UniqueConstraint("product_id", "target_path"),
        # Target of deployments' composite foreign key.
        UniqueConstraint("product_id", "id"),
        CheckConstraint("length >= 0", name="length"),
    )
    _repr_fields = ("id", "product_id", "version", "target_path", "length")

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    version: Mapped[str] = mapped_column(String(_VERSION))
    target_path: Mapped[str] = mapped_column(String(512))
    length: Mapped[int] = mapped_column(BigInteger)
    hashes: Mapped[dict[str, str]] = mapped_column(_json())
    custom: Mapped[dict[str, Any]] = mapped_column(_json())
    manifest_digest: Mapped[str] = mapped_column(String(_SHA256_HEX))
    payload_size: Mapped[int] = mapped_column(BigInteger)
    stored_size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(_NAME))
    #: How many previous releases' deltas were planned (rows made); None: not yet.
    delta_depth: Mapped[int | None] = mapped_column(Integer)

    product: Mapped[Product] = relationship()


class ReleaseDelta(Base):
    """A per-pair delta: the bytes that turn one payload of ``from_release`` into ``release``'s.

    ``from_sha256`` and ``from_size`` are the old payload's (from its
    manifest); ``length`` and ``sha256`` the delta's, once made;
    ``plan_bytes`` what the chunk plan would download instead for a device
    running exactly the old release (compressed index plus the missing
    chunks). ``lease_until`` keeps other hub processes off a delta being
    made; ``error`` says, in one line, why it failed or was skipped.
    ``offered`` is when the rollout engine offered a ready delta to the
    devices assigned its release before it was made (``skylift.hub.rollouts``).
    ``attempts`` counts the times a hub process began making it: a failed
    delta is tried again later, up to ``skylift.hub.deltas.MAX_ATTEMPTS``.
    """

    __tablename__ = "release_deltas"
    __table_args__ = (
        UniqueConstraint("release_id", "from_release_id", "payload"),
        # The work queue (pending, newest release first) and what a release offers.
        Index(None, "status", "release_id"),
        CheckConstraint("from_release_id < release_id", name="older"),
        CheckConstraint("length IS NULL OR length > 0", name="length"),
    )
    _repr_fields = (
        "id",
        "release_id",
        "from_release_id",
        "payload",
        "status",
        "length",
        "attempts",
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"))
    from_release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"))
    payload: Mapped[str] = mapped_column(String(64))
    from_sha256: Mapped[str] = mapped_column(String(_SHA256_HEX))
    from_size: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[DeltaStatus] = mapped_column(
        _enum(DeltaStatus, "status"), default=DeltaStatus.PENDING
    )
    length: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(_SHA256_HEX))
    plan_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column()
    finished: Mapped[datetime | None] = mapped_column()
    offered: Mapped[datetime | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    from_release: Mapped[Release] = relationship(foreign_keys=[from_release_id])


class Deployment(Base):
    """A release rolled out to a device selection in phases.

    ``selector`` is the selection as the operator gave it (tags, hardware,
    current version, explicit device ids, search expression); the devices it
    matched are frozen into :class:`DeploymentDevice` rows. ``product_id`` is
    redundant with the release's, and there so that composite foreign keys
    tie organisation, product and release together.
    """

    __tablename__ = "deployments"
    __table_args__ = (
        ForeignKeyConstraint(["org_id", "product_id"], ["products.org_id", "products.id"]),
        ForeignKeyConstraint(["product_id", "release_id"], ["releases.product_id", "releases.id"]),
        Index(None, "org_id", "status"),
        Index(None, "org_id", "product_id"),
        Index(None, "product_id", "release_id"),
        CheckConstraint(
            "failure_gate_percent >= 0 AND failure_gate_percent <= 100",
            name="failure_gate_percent",
        ),
        CheckConstraint("min_soak_s >= 0", name="min_soak_s"),
        CheckConstraint("current_phase >= 0", name="current_phase"),
    )
    _repr_fields = ("id", "org_id", "release_id", "name", "status", "current_phase")

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    product_id: Mapped[int] = mapped_column()
    release_id: Mapped[int] = mapped_column()
    name: Mapped[str] = mapped_column(String(_NAME))
    selector: Mapped[dict[str, Any]] = mapped_column(_json())
    status: Mapped[DeploymentStatus] = mapped_column(
        _enum(DeploymentStatus, "status"), default=DeploymentStatus.ACTIVE
    )
    paused_reason: Mapped[str | None] = mapped_column(Text)
    failure_gate_percent: Mapped[float] = mapped_column(Float)
    min_soak_s: Mapped[int] = mapped_column(Integer)
    allow_downgrade: Mapped[bool] = mapped_column(Boolean, default=False)
    current_phase: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(_NAME))
    updated: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    release: Mapped[Release] = relationship()
    phases: Mapped[list[DeploymentPhase]] = relationship(
        back_populates="deployment",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="DeploymentPhase.phase",
    )


class DeploymentPhase(Base):
    """One phase of a deployment: a percentage of the selection, or the devices with a tag.

    ``phase`` counts from 0; exactly one of ``percent`` and ``tag`` is set.
    """

    __tablename__ = "deployment_phases"
    __table_args__ = (
        UniqueConstraint("deployment_id", "phase"),
        CheckConstraint("(percent IS NULL) <> (tag IS NULL)", name="percent_or_tag"),
        CheckConstraint("percent IS NULL OR (percent > 0 AND percent <= 100)", name="percent"),
        CheckConstraint("phase >= 0", name="phase"),
    )
    _repr_fields = ("id", "deployment_id", "phase", "percent", "tag")

    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    phase: Mapped[int] = mapped_column(Integer)
    percent: Mapped[float | None] = mapped_column(Float)
    tag: Mapped[str | None] = mapped_column(String(_ID))
    started_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()

    deployment: Mapped[Deployment] = relationship(back_populates="phases")


class DeploymentDevice(Base):
    """Where one device is in one deployment: the per-device rollout state.

    The primary key makes ``(deployment_id, device_id)`` unique; the
    ``(deployment_id, phase, status)`` index answers the failure gate's
    counts; ``device_id`` finds a device's deployments on the director path.
    """

    __tablename__ = "deployment_devices"
    __table_args__ = (
        Index(None, "deployment_id", "phase", "status"),
        Index(None, "device_id"),
        CheckConstraint("phase >= 0", name="phase"),
    )
    _repr_fields = ("deployment_id", "device_id", "phase", "status", "downloaded_bytes")

    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    phase: Mapped[int] = mapped_column(Integer)
    status: Mapped[RolloutStatus] = mapped_column(
        _enum(RolloutStatus, "status"), default=RolloutStatus.PENDING
    )
    reason: Mapped[str | None] = mapped_column(Text)
    updated: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # From the device's installed/committed report: pack bytes it fetched (range
    # gaps included) and the size of what it installed (fleet bandwidth accounting).
    downloaded_bytes: Mapped[int | None] = mapped_column(BigInteger)
    image_bytes: Mapped[int | None] = mapped_column(BigInteger)


class DirectorTargets(Base):
    """The director's signed ``targets`` metadata for one device, byte-exact as served.

    Kept in the database so that hub processes stay stateless: any of them
    serves any device the same bytes (and the same ETag). ``version`` is the
    TUF metadata version, which must only grow; ``expires`` is indexed so
    that a sweep can re-sign what is about to expire.
    """

    __tablename__ = "director_targets"
    # expires: re-signing before expiry; updated: every hub process re-reads
    # recent changes each second to drop cached poll answers.
    __table_args__ = (Index(None, "expires"), Index(None, "updated"))
    _repr_fields = ("device_id", "version", "expires")

    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer)
    signed_targets: Mapped[bytes] = mapped_column(LargeBinary)
    expires: Mapped[datetime] = mapped_column()
    updated: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# -- audit ----------------------------------------------------------------------------------------


class AuditEntry(Base):
    """One change made through the API or the dashboard.

    No foreign keys, on purpose: the record of a deletion must outlive what
    was deleted. ``actor`` is the user's email or the token's name at the
    time; ``target_id`` is text because targets have integer or string ids.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        Index(None, "org_id", "created"),
        # The dashboard's filters (newest first within an action) and a
        # target's history (a deployment page, the rollout engine's resumes).
        Index(None, "org_id", "action", "created"),
        Index(None, "org_id", "target_type", "target_id"),
    )
    _repr_fields = ("id", "org_id", "actor", "action", "target_type", "target_id", "created")

    id: Mapped[int] = mapped_column(_BigId, primary_key=True)
    org_id: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(_NAME))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(_SHORT))
    target_id: Mapped[str | None] = mapped_column(String(_ID))
    details: Mapped[dict[str, Any] | None] = mapped_column(_json())
    created: Mapped[datetime] = mapped_column(default=utcnow)


class VersionCount(Base):
    """How many devices ran each version on one day: the history behind the adoption chart.

    Today's row is rewritten by the dashboard's background loop (a grouped
    count over ``device_slots``, a few times an hour); earlier days are kept
    as they were last written. Reading the chart is then a range scan of a
    few hundred rows instead of a scan of a million device events.
    """

    __tablename__ = "version_counts"
    _repr_fields = ("org_id", "day", "slot_class", "version", "devices")

    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"), primary_key=True)
    day: Mapped[date] = mapped_column(sa.Date, primary_key=True)
    slot_class: Mapped[str] = mapped_column(String(_SHORT), primary_key=True)
    version: Mapped[str] = mapped_column(String(_VERSION), primary_key=True)
    devices: Mapped[int] = mapped_column(Integer)
