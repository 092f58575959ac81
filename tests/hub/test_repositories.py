"""The hub's image repositories and director, on a real object store.

The release flow of ADR 0004, end to end but without HTTP: offline root and
targets, a release signed offline and accepted or refused by the hub, and
the director naming exactly the image repository's target per device.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from skylift.hub.repositories import (
    Director,
    ImageRepositories,
    ReleaseRejectedError,
    UnknownRepositoryError,
)
from skylift.hub.storage import LocalStore
from skylift.trust.keys import generate_private_key, signer_for
from skylift.trust.repository import Repository, offline_metadata, sign_next_targets

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def _signer() -> CryptoSigner:
    return signer_for(generate_private_key())


class World:
    """A hub store with online keys, and a product's offline root and release keys."""

    def __init__(self, tmp: Path) -> None:
        self.store = LocalStore(tmp / "objects")
        self.online = _signer()
        self.root_key, self.release, self.stranger = _signer(), _signer(), _signer()
        self.now = NOW
        self.images = ImageRepositories(self.store, online=[self.online], clock=lambda: self.now)
        keys = {
            "root": [self.root_key.public_key],
            "targets": [self.release.public_key],
            "snapshot": [self.online.public_key],
            "timestamp": [self.online.public_key],
        }
        self.root, targets = offline_metadata(
            keys=keys, thresholds=None, signers=[self.root_key, self.release], now=NOW
        )
        self.images.create("acme-gw", root=self.root, targets=targets)

    def next_targets(self, version: str, head: bytes, signer: CryptoSigner | None = None) -> bytes:
        current = self.images.read("acme-gw", f"metadata/{self.targets_version()}.targets.json")
        return sign_next_targets(
            current,
            path=f"{version}.head",
            content=head,
            custom={"product": "acme-gw", "version": version, "hardware_ids": ["hw1"]},
            signers=[signer or self.release],
            root=self.root,
            now=self.now,
        )

    def targets_version(self) -> int:
        return self.images.load("acme-gw").versions["targets"]

    def keys(self) -> list[str]:
        return sorted(self.store.iter_keys(""))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_release_is_published_for_clients(world: World) -> None:
    head = b"bundle head bytes" * 10
    target = world.images.add_release(
        "acme-gw", targets=world.next_targets("2.0.0", head), head=head
    )
    assert target.path == "2.0.0.head"
    repo = world.images.load("acme-gw")
    assert repo.versions == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    assert repo.target_files["2.0.0.head"].custom["version"] == "2.0.0"
    digest = hashlib.sha256(head).hexdigest()
    assert world.images.read("acme-gw", f"targets/{digest}.2.0.0.head") == head
    # a second release keeps the first
    head2 = b"second head"
    world.images.add_release("acme-gw", targets=world.next_targets("2.1.0", head2), head=head2)
    assert set(world.images.load("acme-gw").target_files) == {"2.0.0.head", "2.1.0.head"}


def _resign(targets: bytes, signer: CryptoSigner) -> bytes:
    """The same targets, signed by someone else (the client-side signer would refuse)."""
    from tuf.api.metadata import Metadata

    md = Metadata.from_bytes(targets)
    md.signatures.clear()
    md.sign(signer)
    return md.to_bytes()


def _tamper(targets: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    doc = json.loads(targets)
    change(doc["signed"])
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda w, h: _resign(w.next_targets("2.0.0", h), w.stranger), "valid signature"),
        (lambda w, h: w.next_targets("2.0.0", h + b"x"), "does not match the bundle head"),
        (
            lambda w, h: _tamper(w.next_targets("2.0.0", h), lambda s: s.update(version=5)),
            "does not follow",
        ),
        (
            lambda w, h: _tamper(w.next_targets("2.0.0", h), lambda s: s.update(targets={})),
            "adds exactly one target, not 0",
        ),
        (
            lambda w, h: _tamper(w.next_targets("2.0.0", h), lambda s: s.update(expires="x")),
            "not valid TUF",
        ),
        (lambda w, h: b"{" * 10, "not valid TUF"),
        (lambda w, h: b" " * (2 << 20), "larger than"),
    ],
    ids=[
        "wrong key",
        "head differs",
        "version skips",
        "no target",
        "bad expiry",
        "garbage",
        "oversized",
    ],
)
def test_bad_releases_change_nothing(world: World, make, message: str) -> None:  # type: ignore[no-untyped-def]
    head = b"a head"
    before = world.keys()
    with pytest.raises(ReleaseRejectedError, match=message):
        world.images.add_release("acme-gw", targets=make(world, head), head=head)
    assert world.keys() == before
    assert world.targets_version() == 1


def test_a_release_may_not_drop_earlier_targets(world: World) -> None:
    world.images.add_release("acme-gw", targets=world.next_targets("1.0.0", b"h1"), head=b"h1")
    current = world.images.read("acme-gw", "metadata/2.targets.json")
    doc = json.loads(current)
    doc["signed"]["targets"] = {}
    stripped = sign_next_targets(
        json.dumps(doc).encode(), path="1.1.0.head", content=b"h2", custom=None,
        signers=[world.release], root=world.root, now=NOW,
    )  # fmt: skip
    with pytest.raises(ReleaseRejectedError, match=r"change or remove 1\.0\.0\.head"):
        world.images.add_release("acme-gw", targets=stripped, head=b"h2")


def test_create_twice_and_unknown_products(world: World) -> None:
    with pytest.raises(ReleaseRejectedError, match="already"):
        world.images.create("acme-gw", root=world.root, targets=b"{}")
    with pytest.raises(UnknownRepositoryError):
        world.images.load("other")
    with pytest.raises(UnknownRepositoryError):
        world.images.read("acme-gw", "metadata/../../x.json")
    with pytest.raises(UnknownRepositoryError, match="not a valid name"):
        world.images.load("../etc")


def test_timestamps_are_refreshed_before_they_expire(world: World) -> None:
    assert world.images.refresh("acme-gw") is False
    world.now = NOW + timedelta(hours=20)  # timestamps last a day
    assert world.images.refresh("acme-gw") is True
    assert world.images.load("acme-gw").versions["timestamp"] == 2


@pytest.fixture
def director(world: World) -> Director:
    droot = _signer()
    keys = {
        "root": [droot.public_key],
        "targets": [world.online.public_key],
        "snapshot": [world.online.public_key],
        "timestamp": [world.online.public_key],
    }
    root, _ = offline_metadata(keys=keys, thresholds=None, signers=[droot, world.online], now=NOW)
    d = Director(world.store, online=[world.online], clock=lambda: world.now)
    d.publish_root([root])
    return d


def test_director_names_the_image_target(world: World, director: Director) -> None:
    head = b"head of 3.0.0"
    target = world.images.add_release(
        "acme-gw", targets=world.next_targets("3.0.0", head), head=head
    )
    director.ensure("dev-1")
    assert director.assigned("dev-1") is None
    assert director.assign("dev-1", target) is True
    assert director.assign("dev-1", target) is False  # nothing changed, nothing signed
    got = director.assigned("dev-1")
    assert got is not None
    assert (got.path, got.length, got.hashes) == (target.path, target.length, target.hashes)
    assert (
        got.custom
        == target.custom
        == {
            "product": "acme-gw",
            "version": "3.0.0",
            "hardware_ids": ["hw1"],
        }
    )
    # the device's files: shared root, own targets; another device is untouched
    assert director.read("dev-1", "metadata/1.root.json") == director.roots()[0]
    files = {
        k: director.read("dev-1", k) for k in ("metadata/root.json", "metadata/timestamp.json")
    }
    repo = Repository.load(
        {**files, "metadata/1.root.json": director.roots()[0],
         **{f"metadata/{v}.{r}.json": director.read("dev-1", f"metadata/{v}.{r}.json")
            for r, v in (("targets", 2), ("snapshot", 2))}}
    )  # fmt: skip
    assert list(repo.target_files) == ["3.0.0.head"]
    director.ensure("dev-2")
    assert director.assigned("dev-2") is None
    assert director.assign("dev-1", None) is True
    assert director.assigned("dev-1") is None


def test_director_refuses_bad_device_ids(director: Director) -> None:
    for bad in ("../x", "a/b", "", "x" * 200):
        with pytest.raises(UnknownRepositoryError):
            director.ensure(bad)
