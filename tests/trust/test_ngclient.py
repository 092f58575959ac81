"""python-tuf's own client reads what Skylift publishes, and refuses what it must.

The repository directory is written by :func:`skylift.repodir.save_repository`
and served over HTTP on 127.0.0.1; :class:`tuf.ngclient.Updater` is an
independent client, so these tests check Skylift against the TUF
specification as python-tuf implements it, not against itself.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, MetaFile, Timestamp
from tuf.ngclient import Updater, UpdaterConfig

from skylift.repodir import save_repository
from skylift.trust.repository import Repository

TARGET = "camera/cam-1.2.0.bundle"
CONTENT = b"a bundle, signed and chunked" * 10
CUSTOM = {"product": "camera", "version": "1.2.0", "hardware_ids": ["cam-r1"]}


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@dataclass
class Served:
    """A repository directory served over HTTP, and clients of it."""

    directory: Path
    url: str
    clients: Path

    def updater(self, bootstrap: bytes, name: str = "device") -> Updater:
        metadata_dir = self.clients / name / "metadata"
        metadata_dir.mkdir(parents=True, exist_ok=True)
        return Updater(
            str(metadata_dir),
            f"{self.url}/metadata/",
            str(self.clients / name / "targets"),
            f"{self.url}/targets/",
            # Bounds the walk over N.root.json requests.
            config=UpdaterConfig(max_root_rotations=8),
            bootstrap=bootstrap,
        )

    def write(self, relative: str, data: bytes) -> None:
        (self.directory / relative).write_bytes(data)


@pytest.fixture
def served(tmp_path, monkeypatch) -> Iterator[Served]:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    directory = tmp_path / "repo"
    directory.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield Served(directory, f"http://{host}:{port}", tmp_path / "clients")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _now() -> datetime:
    # ngclient checks expiry against the real clock, so the repository must too.
    return datetime.now(UTC)


def _release(role_signers, now: datetime) -> Repository:
    repo = Repository.create(
        keys=role_signers.keys(), thresholds={"root": 2}, signers=role_signers.all, now=now
    )
    repo.add_target_bytes(TARGET, CONTENT, custom=CUSTOM)
    repo.sign_targets(role_signers.targets, now=now)
    repo.refresh_online(role_signers.online, now=now)
    return repo


def test_ngclient_refreshes_and_downloads_a_target_with_custom_fields(served, role_signers):
    repo = _release(role_signers, _now())
    save_repository(served.directory, repo)
    updater = served.updater(repo.publish()["metadata/1.root.json"])
    updater.refresh()
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    assert info.custom == CUSTOM
    assert info.length == len(CONTENT)
    path = updater.download_target(info)
    assert Path(path).read_bytes() == CONTENT
    assert updater.get_targetinfo("camera/other.bundle") is None


def _root_signed_by(repo: Repository, signers, new_root_keys) -> bytes:
    """Root v(n+1) with new root keys, built by hand so no Repository check applies."""
    md = copy.deepcopy(repo.root)
    root = md.signed
    root.version += 1
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    for key in new_root_keys:
        root.add_key(key, "root")
    root.roles["root"].threshold = 2
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes()


# Each attack below arranges the served repository and returns the client action that must fail.


def _tampered_target(served, s, new_signers):
    repo = _release(s, _now())
    save_repository(served.directory, repo)
    sha = hashlib.sha256(CONTENT).hexdigest()
    tampered = bytearray(CONTENT)
    tampered[0] ^= 1
    served.write(f"targets/camera/{sha}.cam-1.2.0.bundle", bytes(tampered))
    updater = served.updater(repo.publish()["metadata/1.root.json"])

    def act():
        updater.refresh()
        info = updater.get_targetinfo(TARGET)
        assert info is not None
        updater.download_target(info)

    return act


def _expired_timestamp(served, s, new_signers):
    repo = _release(s, _now() - timedelta(days=2))
    save_repository(served.directory, repo)
    return served.updater(repo.publish()["metadata/1.root.json"]).refresh


def _snapshot_rollback(served, s, new_signers):
    now = _now()
    repo = Repository.create(keys=s.keys(), thresholds={"root": 2}, signers=s.all, now=now)
    first = repo.publish()
    repo.refresh_online(s.online, now=now)
    save_repository(served.directory, repo)
    bootstrap = first["metadata/1.root.json"]
    served.updater(bootstrap).refresh()  # the device now trusts snapshot v2

    # A newer timestamp that points back at snapshot v1, which is still served.
    old_snapshot = first["metadata/1.snapshot.json"]
    md = Metadata(
        Timestamp(
            version=repo.timestamp.signed.version + 1,
            expires=now + timedelta(days=1),
            snapshot_meta=MetaFile(
                version=1,
                length=len(old_snapshot),
                hashes={"sha256": hashlib.sha256(old_snapshot).hexdigest()},
            ),
        )
    )
    md.sign(s.timestamp[0])
    served.write("metadata/timestamp.json", md.to_bytes())
    return served.updater(bootstrap).refresh


def _root_rotation_with_too_few_old_keys(served, s, new_signers):
    repo = _release(s, _now())
    save_repository(served.directory, repo)
    new = new_signers(2)
    # One old key of the two needed, both new keys.
    served.write(
        "metadata/2.root.json",
        _root_signed_by(repo, [s.root[0], *new], [n.public_key for n in new]),
    )
    return served.updater(repo.publish()["metadata/1.root.json"]).refresh


def _root_rotation_signed_by_old_keys_only(served, s, new_signers):
    repo = _release(s, _now())
    save_repository(served.directory, repo)
    new = new_signers(2)
    served.write(
        "metadata/2.root.json",
        _root_signed_by(repo, s.root, [n.public_key for n in new]),
    )
    return served.updater(repo.publish()["metadata/1.root.json"]).refresh


def _root_signed_by_retired_keys(served, s, new_signers):
    repo = _release(s, _now())
    new = new_signers(3)
    repo.rotate_keys("root", [n.public_key for n in new], 2, signers=[*s.root, *new], now=_now())
    save_repository(served.directory, repo)
    bootstrap = repo.publish()["metadata/1.root.json"]
    served.updater(bootstrap).refresh()  # the device follows the rotation to root v2
    # Root v3 signed by the retired v1 keys: the device must trust only the v2 keys now.
    retired = [signer.public_key for signer in s.root]
    served.write("metadata/3.root.json", _root_signed_by(repo, s.root, retired))
    return served.updater(bootstrap).refresh


@pytest.mark.parametrize(
    ("attack", "error", "match"),
    [
        (_tampered_target, tuf_errors.LengthOrHashMismatchError, "hash"),
        (_expired_timestamp, tuf_errors.ExpiredMetadataError, "timestamp"),
        (_snapshot_rollback, tuf_errors.BadVersionNumberError, "snapshot version"),
        (_root_rotation_with_too_few_old_keys, tuf_errors.UnsignedMetadataError, "1/2"),
        (_root_rotation_signed_by_old_keys_only, tuf_errors.UnsignedMetadataError, "0/2"),
        (_root_signed_by_retired_keys, tuf_errors.UnsignedMetadataError, "0/2"),
    ],
    ids=[
        "tampered-target",
        "expired-timestamp",
        "snapshot-rollback",
        "root-rotation-too-few-old-keys",
        "root-rotation-no-new-keys",
        "root-signed-by-retired-keys",
    ],
)
def test_ngclient_refuses(served, role_signers, new_signers, attack, error, match):
    act = attack(served, role_signers, new_signers)
    with pytest.raises(error, match=match):
        act()


def test_ngclient_follows_a_root_rotation_and_trusts_the_new_keys(
    served, role_signers, new_signers
):
    now = _now()
    repo = _release(role_signers, now)
    bootstrap = repo.publish()["metadata/1.root.json"]
    save_repository(served.directory, repo)
    served.updater(bootstrap).refresh()

    new = new_signers(3)
    repo.rotate_keys(
        "root",
        [n.public_key for n in new],
        2,
        signers=[*role_signers.root[:2], *new[1:]],
        now=now,
    )
    # Then the release key rotates too, signed by the new root keys only.
    release = new_signers(1)
    repo.rotate_keys(
        "targets",
        [release[0].public_key],
        1,
        signers=[*new[:2], *release, *role_signers.online],
        now=now,
    )
    save_repository(served.directory, repo)

    updater = served.updater(bootstrap)
    updater.refresh()
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    assert info.custom == CUSTOM
    assert Path(updater.download_target(info)).read_bytes() == CONTENT
    trusted = Metadata.from_bytes(
        (served.clients / "device" / "metadata" / "root.json").read_bytes()
    ).signed
    assert trusted.version == 3
    assert set(trusted.roles["root"].keyids) == {n.public_key.keyid for n in new}
    assert trusted.roles["targets"].keyids == [release[0].public_key.keyid]
