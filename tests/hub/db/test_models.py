"""The hub's tables on SQLite and PostgreSQL: constraints, deletions, queries, types, reprs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from skylift.hub.db.models import (
    ApiToken,
    AuditEntry,
    Base,
    Deployment,
    DeploymentDevice,
    DeploymentPhase,
    Device,
    DeviceEvent,
    DeviceSlot,
    DeviceState,
    DeviceTag,
    DirectorTargets,
    EnrollmentMethod,
    Organisation,
    Product,
    ProvisioningKey,
    Release,
    ReleaseKey,
    Role,
    RolloutStatus,
    SignerCA,
    User,
)

from ..conftest import MigratedDatabase

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

# What each database says, so that a test fails for the reason it is about.
UNIQUE = "(?i)unique|duplicate key"
FOREIGN_KEY = "(?i)foreign key"
CHECK = "(?i)check constraint"


# -- builders: the fewest fields each row needs ---------------------------------------------------


def org(session: Session, name: str = "acme") -> Organisation:
    o = Organisation(name=name)
    session.add(o)
    session.flush()
    return o


def product(session: Session, o: Organisation, name: str = "gateway") -> Product:
    p = Product(org_id=o.id, name=name)
    session.add(p)
    session.flush()
    return p


def device(
    session: Session,
    p: Product,
    device_id: str,
    *,
    tags: tuple[str, ...] = (),
    slots: dict[str, str] | None = None,
    hardware_id: str = "board-a",
) -> Device:
    d = Device(
        device_id=device_id,
        product=p,
        hardware_id=hardware_id,
        cert_fingerprint=hashlib.sha256(device_id.encode()).hexdigest(),
        cert_not_after=NOW + timedelta(days=365),
        enrolled_via=EnrollmentMethod.PROVISIONING,
        tags=[DeviceTag(tag=t) for t in tags],
        slots=[DeviceSlot(slot_class=c, version=v) for c, v in (slots or {}).items()],
    )
    session.add(d)
    session.flush()
    return d


def release(session: Session, p: Product, version: str = "1.0.0") -> Release:
    r = Release(
        product_id=p.id,
        version=version,
        target_path=f"{p.name}-{version}.skyb",
        length=1234,
        hashes={"sha256": "ab" * 32},
        custom={"version": version, "hardware": ["board-a"]},
        manifest_digest="cd" * 32,
        payload_size=10_000,
        stored_size=4_000,
        created_by="ci",
    )
    session.add(r)
    session.flush()
    return r


def deployment(session: Session, r: Release, o: Organisation) -> Deployment:
    dep = Deployment(
        org_id=o.id,
        release=r,
        name="roll 1.0.0",
        selector={"tags": ["lab"]},
        failure_gate_percent=5.0,
        min_soak_s=600,
        created_by="alice@example.com",
        phases=[DeploymentPhase(phase=0, percent=10.0), DeploymentPhase(phase=1, tag="all")],
    )
    session.add(dep)
    session.flush()
    return dep


def event(d: Device, report_id: str, **fields: Any) -> DeviceEvent:
    return DeviceEvent(device_id=d.id, report_id=report_id, kind="state", **fields)


def count(session: Session, model: type[Base]) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(model)) or 0


# -- uniqueness -----------------------------------------------------------------------------------


def test_device_ids_are_unique_across_organisations(db: MigratedDatabase) -> None:
    with db.session() as s:
        device(s, product(s, org(s, "acme")), "dev-1")
    with pytest.raises(IntegrityError, match=UNIQUE), db.session() as s:
        device(s, product(s, org(s, "globex")), "dev-1")


def test_release_versions_are_unique_per_product(db: MigratedDatabase) -> None:
    with db.session() as s:
        o = org(s)
        release(s, product(s, o, "gateway"), "1.0.0")
        release(s, product(s, o, "sensor"), "1.0.0")  # another product: fine
    with pytest.raises(IntegrityError, match=UNIQUE), db.session() as s:
        p = s.scalars(sa.select(Product).where(Product.name == "gateway")).one()
        r = release(s, p, "1.0.0")
        r.target_path = "other-name.skyb"


def test_report_ids_are_unique_per_device(db: MigratedDatabase) -> None:
    with db.session() as s:
        p = product(s, org(s))
        a, b = device(s, p, "dev-a"), device(s, p, "dev-b")
        s.add_all([event(a, "r-1"), event(b, "r-1")])  # another device: fine
    with pytest.raises(IntegrityError, match=UNIQUE), db.session() as s:
        a = s.scalars(sa.select(Device).where(Device.device_id == "dev-a")).one()
        s.add(event(a, "r-1", progress=50))


def test_a_repeated_report_is_skipped_inside_a_savepoint(db: MigratedDatabase) -> None:
    """How the gateway makes reports idempotent; SQLite needs real SAVEPOINTs for it."""
    with db.session() as s:
        d = device(s, product(s, org(s)), "dev-1")
        s.add(event(d, "r-1"))
        s.flush()
        with pytest.raises(IntegrityError, match=UNIQUE), s.begin_nested():
            s.add(event(d, "r-1"))
        s.add(event(d, "r-2"))
    with db.session() as s:
        assert sorted(s.scalars(sa.select(DeviceEvent.report_id))) == ["r-1", "r-2"]


def test_emails_are_unique_per_organisation(db: MigratedDatabase) -> None:
    with db.session() as s:
        for name in ("acme", "globex"):
            s.add(User(org_id=org(s, name).id, email="a@x.org", password_hash="h", role=Role.ADMIN))
    with pytest.raises(IntegrityError, match=UNIQUE), db.session() as s:
        o = s.scalars(sa.select(Organisation).where(Organisation.name == "acme")).one()
        s.add(User(org_id=o.id, email="a@x.org", password_hash="h", role=Role.VIEWER))


# -- tenants, checks, deletions -------------------------------------------------------------------


def test_a_device_cannot_belong_to_another_organisations_product(db: MigratedDatabase) -> None:
    with db.session() as s:
        org(s, "acme")
        product(s, org(s, "globex"))
    with pytest.raises(IntegrityError, match=FOREIGN_KEY), db.session() as s:
        acme = s.scalars(sa.select(Organisation).where(Organisation.name == "acme")).one()
        globex_product = s.scalars(sa.select(Product)).one()
        s.add(
            Device(
                device_id="dev-1",
                org_id=acme.id,
                product_id=globex_product.id,
                hardware_id="board-a",
                cert_fingerprint="00" * 32,
                cert_not_after=NOW,
                enrolled_via=EnrollmentMethod.SIGNER_CA,
            )
        )


@pytest.mark.parametrize(
    ("table", "values"),
    [
        ("devices", {"state": "exploded"}),
        ("devices", {"progress": 101}),
        ("deployment_phases", {"percent": 10.0, "tag": "lab"}),
        ("deployment_phases", {"percent": None, "tag": None}),
        ("deployment_phases", {"percent": 0.0, "tag": None}),
        ("deployments", {"failure_gate_percent": 150.0}),
        ("products", {"release_threshold": 0}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_check_constraints_refuse_bad_rows(
    db: MigratedDatabase, table: str, values: dict[str, Any]
) -> None:
    with db.session() as s:
        o = org(s)
        p = product(s, o)
        d = device(s, p, "dev-1")
        dep = deployment(s, release(s, p), o)
        ids = {"devices": d.id, "deployment_phases": dep.phases[0].id, "deployments": dep.id}
        ids["products"] = p.id
    # Untyped columns: the enum types would refuse a bad state before the database could.
    t = sa.table(table, sa.column("id"), *(sa.column(name) for name in values))
    with pytest.raises(IntegrityError, match=CHECK), db.engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.id == ids[table]).values(**values))


def test_deleting_a_device_deletes_what_describes_it(db: MigratedDatabase) -> None:
    with db.session() as s:
        o = org(s)
        p = product(s, o)
        d = device(s, p, "dev-1", tags=("lab",), slots={"rootfs": "1.0.0"})
        keep = device(s, p, "dev-2", tags=("lab",))
        dep = deployment(s, release(s, p), o)
        s.add_all(
            [
                event(d, "r-1"),
                DirectorTargets(device_id=d.id, version=1, signed_targets=b"{}", expires=NOW),
                DeploymentDevice(deployment_id=dep.id, device_id=d.id, phase=0),
                DeploymentDevice(deployment_id=dep.id, device_id=keep.id, phase=0),
            ]
        )
    with db.session() as s:
        # Core DELETE: the database's ON DELETE CASCADE does the work, not the ORM.
        s.execute(sa.delete(Device).where(Device.device_id == "dev-1"))
    with db.session() as s:
        for model, left in [
            (DeviceTag, 1),
            (DeviceSlot, 0),
            (DeviceEvent, 0),
            (DirectorTargets, 0),
            (DeploymentDevice, 1),
        ]:
            assert count(s, model) == left, model.__name__


def test_deleting_a_deployment_deletes_its_phases_and_rollout_rows(db: MigratedDatabase) -> None:
    with db.session() as s:
        o = org(s)
        p = product(s, o)
        dep = deployment(s, release(s, p), o)
        s.add(DeploymentDevice(deployment_id=dep.id, device_id=device(s, p, "dev-1").id, phase=0))
    with db.session() as s:
        s.execute(sa.delete(Deployment))
    with db.session() as s:
        assert (count(s, DeploymentPhase), count(s, DeploymentDevice), count(s, Device)) == (
            0,
            0,
            1,
        )


def test_deleting_a_user_deletes_their_tokens_but_not_the_organisations(
    db: MigratedDatabase,
) -> None:
    with db.session() as s:
        o = org(s)
        u = User(org_id=o.id, email="a@x.org", password_hash="h", role=Role.ADMIN)
        s.add(u)
        s.flush()
        common = {"org_id": o.id, "role": Role.OPERATOR}
        s.add_all(
            [
                ApiToken(**common, user_id=u.id, name="laptop", token_hash="1" * 64, prefix="a"),
                ApiToken(**common, name="ci", token_hash="2" * 64, prefix="b"),
            ]
        )
    with db.session() as s:
        s.execute(sa.delete(User))
    with db.session() as s:
        assert s.scalars(sa.select(ApiToken.name)).all() == ["ci"]


@pytest.mark.parametrize("parent", ["product with devices", "release with deployments"])
def test_records_cannot_be_deleted_from_under_others(db: MigratedDatabase, parent: str) -> None:
    with db.session() as s:
        o = org(s)
        p = product(s, o)
        device(s, p, "dev-1")
        deployment(s, release(s, p), o)
    statement = sa.delete(Product) if parent.startswith("product") else sa.delete(Release)
    with pytest.raises(IntegrityError, match=FOREIGN_KEY), db.session() as s:
        s.execute(statement)


# -- the queries the indexes are for --------------------------------------------------------------


@pytest.fixture
def fleet(db: MigratedDatabase) -> MigratedDatabase:
    """Two organisations; tags and installed versions to filter on."""
    with db.session() as s:
        p = product(s, org(s, "acme"))
        device(s, p, "a1", tags=("lab", "eu"), slots={"rootfs": "1.0.0", "app": "7"})
        device(s, p, "a2", tags=("lab",), slots={"rootfs": "1.1.0", "app": "7"})
        device(s, p, "a3", tags=("eu",), slots={"rootfs": "1.0.0"})
        device(s, p, "a4")
        q = product(s, org(s, "globex"))
        device(s, q, "g1", tags=("lab", "eu"), slots={"rootfs": "1.0.0"})
    return db


def _acme_devices(s: Session, condition: sa.ColumnElement[bool]) -> list[str]:
    acme = sa.select(Organisation.id).where(Organisation.name == "acme").scalar_subquery()
    query = sa.select(Device.device_id).where(Device.org_id == acme, condition)
    return sorted(s.scalars(query))


def _tagged_all(tags: list[str]) -> sa.ColumnElement[bool]:
    ids = (
        sa.select(DeviceTag.device_id)
        .where(DeviceTag.tag.in_(tags))
        .group_by(DeviceTag.device_id)
        .having(sa.func.count() == len(tags))
    )
    return Device.id.in_(ids)


@pytest.mark.parametrize(
    ("tags", "expected"),
    [(["lab"], ["a1", "a2"]), (["eu"], ["a1", "a3"]), (["lab", "eu"], ["a1"]), (["nope"], [])],
)
def test_tag_filter(fleet: MigratedDatabase, tags: list[str], expected: list[str]) -> None:
    with fleet.session() as s:
        assert _acme_devices(s, _tagged_all(tags)) == expected


@pytest.mark.parametrize(
    ("slot_class", "version", "expected"),
    [("rootfs", "1.0.0", ["a1", "a3"]), ("rootfs", "1.1.0", ["a2"]), ("app", "7", ["a1", "a2"])],
)
def test_installed_version_filter(
    fleet: MigratedDatabase, slot_class: str, version: str, expected: list[str]
) -> None:
    running = sa.select(DeviceSlot.device_id).where(
        DeviceSlot.slot_class == slot_class, DeviceSlot.version == version
    )
    with fleet.session() as s:
        assert _acme_devices(s, Device.id.in_(running)) == expected


def test_relationships_load_in_order(fleet: MigratedDatabase) -> None:
    with fleet.session() as s:
        a1 = s.scalars(sa.select(Device).where(Device.device_id == "a1")).one()
        assert [t.tag for t in a1.tags] == ["eu", "lab"]
        assert [(x.slot_class, x.version) for x in a1.slots] == [("app", "7"), ("rootfs", "1.0.0")]
        assert a1.product.name == "gateway"


# -- types: JSON, datetimes, bytes, ids -----------------------------------------------------------


def test_json_columns_round_trip(db: MigratedDatabase) -> None:
    selector = {
        "tags": ["lab", "ünïcode"],
        "hardware": None,
        "devices": [],
        "search": 'state:failed AND "a b"',
        "nested": {"n": 1, "f": 0.5, "ok": True},
    }
    key = {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": "ab" * 32}}
    with db.session() as s:
        o = org(s)
        p = product(s, o)
        dep = deployment(s, release(s, p), o)
        dep.selector = selector
        s.add(ReleaseKey(product_id=p.id, keyid="k" * 64, public_key=key))
        d = device(s, p, "dev-1")
        s.add_all([event(d, "with", details={"bytes": 10**12}), event(d, "without")])
    with db.session() as s:
        assert s.scalars(sa.select(Deployment.selector)).one() == selector
        assert s.scalars(sa.select(ReleaseKey.public_key)).one() == key
        r = s.scalars(sa.select(Release)).one()
        assert (r.hashes, r.custom["hardware"]) == ({"sha256": "ab" * 32}, ["board-a"])
        # None is SQL NULL, not the JSON text 'null', so IS NULL finds it.
        nulls = s.scalars(sa.select(DeviceEvent.report_id).where(DeviceEvent.details.is_(None)))
        assert list(nulls) == ["without"]
        details = s.scalars(sa.select(DeviceEvent.details).where(DeviceEvent.report_id == "with"))
        assert details.one() == {"bytes": 10**12}


def test_datetimes_come_back_utc_aware(db: MigratedDatabase) -> None:
    plus_two = timezone(timedelta(hours=2))
    seen = datetime(2026, 11, 23, 14, 30, 15, 123456, tzinfo=plus_two)
    with db.session() as s:
        d = device(s, product(s, org(s)), "dev-1")
        d.last_seen = seen
    with db.session() as s:
        d = s.scalars(sa.select(Device)).one()
        assert d.last_seen == seen
        assert d.last_seen is not None and d.last_seen.tzinfo is UTC
        assert d.last_seen.hour == 12
        assert d.created.tzinfo is UTC
        # Comparisons run in the database and agree with Python's.
        before = sa.select(Device.device_id).where(Device.last_seen < seen + timedelta(seconds=1))
        after = sa.select(Device.device_id).where(Device.last_seen > seen)
        assert (list(s.scalars(before)), list(s.scalars(after))) == (["dev-1"], [])


def test_naive_datetimes_are_refused(db: MigratedDatabase) -> None:
    with pytest.raises(StatementError, match="naive datetime"), db.session() as s:
        device(s, product(s, org(s)), "dev-1").last_seen = datetime(2026, 1, 1)


def test_bytes_and_big_ids(db: MigratedDatabase) -> None:
    signed = bytes(range(256)) * 10
    with db.session() as s:
        d = device(s, product(s, org(s)), "dev-1")
        s.add(DirectorTargets(device_id=d.id, version=3, signed_targets=signed, expires=NOW))
        s.add_all([event(d, f"r-{i}") for i in range(3)])
        s.add(AuditEntry(org_id=d.org_id, actor="ci", action="device.create", target_type="device"))
    with db.session() as s:
        assert s.scalars(sa.select(DirectorTargets.signed_targets)).one() == signed
        ids = list(s.scalars(sa.select(DeviceEvent.id).order_by(DeviceEvent.id)))
        assert len(set(ids)) == 3 and all(isinstance(i, int) for i in ids)
        assert s.scalars(sa.select(AuditEntry.id)).one() >= 1


def test_enum_columns_store_their_values(db: MigratedDatabase) -> None:
    with db.session() as s:
        o = org(s)
        p = product(s, o)
        d = device(s, p, "dev-1")
        d.state = DeviceState.ROLLED_BACK
        dep = deployment(s, release(s, p), o)
        s.add(DeploymentDevice(deployment_id=dep.id, device_id=d.id, phase=0))
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT state FROM devices")).scalar_one() == "rolled_back"
        assert conn.execute(sa.text("SELECT status FROM deployment_devices")).scalar_one() == (
            RolloutStatus.PENDING.value
        )


# -- reprs and names (no database needed) ---------------------------------------------------------

_SECRET_WORDS = ("hash", "password", "secret", "pem", "signed", "public_key", "key_val")


def test_reprs_show_no_secrets() -> None:
    secrets = {
        "user": User(id=1, org_id=1, email="a@x.org", password_hash="$scrypt$SECRET", role="admin"),
        "token": ApiToken(id=1, org_id=1, name="ci", token_hash="SECRET1", prefix="skl_ab"),
        "provisioning": ProvisioningKey(id=1, name="line-1", key_hash="SECRET2", prefix="pk_ab"),
        "ca": SignerCA(id=1, name="factory", cert_pem="-----BEGIN SECRET3", fingerprint="f" * 64),
        "release key": ReleaseKey(id=1, keyid="k", public_key={"keyval": "SECRET4"}),
        "director": DirectorTargets(device_id=1, version=1, signed_targets=b"SECRET5"),
    }
    for what, row in secrets.items():
        text = repr(row)
        assert "SECRET" not in text, what
        assert text.startswith(f"<{type(row).__name__} "), text
    assert "email='a@x.org'" in repr(secrets["user"])


@pytest.mark.parametrize("mapper", Base.registry.mappers, ids=lambda m: m.class_.__name__)
def test_no_repr_field_names_a_secret(mapper: Any) -> None:
    fields: tuple[str, ...] = mapper.class_._repr_fields
    assert set(fields) <= set(mapper.columns.keys())
    assert not [f for f in fields if any(word in f for word in _SECRET_WORDS)]


def test_constraint_and_index_names_fit_postgresql() -> None:
    """Longer names would be truncated differently on PostgreSQL than on SQLite."""
    names = [
        str(name)
        for table in Base.metadata.tables.values()
        for name in [*(c.name for c in table.constraints), *(i.name for i in table.indexes)]
    ]
    assert names and all(names)
    assert max(len(n) for n in names) <= 63
    assert len(names) == len(set(names))
