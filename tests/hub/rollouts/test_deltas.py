"""Per-pair deltas on the hub: made from real ext4 releases, checked, offered by the director, served.

Releases are real bundles of real ext4 images (``mkfs.ext4 -d`` over a tree
of files, a few of them changed between versions), pushed through the
management API the way ``skylift release push`` pushes them, on SQLite and
PostgreSQL with the local object store. Deltas are made by calling
:func:`skylift.hub.deltas.run_pending` as the background loop does, and the
deltas the hub stores are applied here with the pure functions of
:mod:`skylift.chunks.delta` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from rich.console import Console

from skylift.chunks import ChunkingParams, iter_chunks, zstreams
from skylift.chunks.delta import read_delta, replay
from skylift.cli import remote
from skylift.hub import ca, deltas, rollouts
from skylift.hub.app import make_gateway_app
from skylift.hub.auth import issue_secret
from skylift.hub.db.models import (
    DeltaStatus,
    Deployment,
    Device,
    DirectorTargets,
    Product,
    ProvisioningKey,
    Release,
    ReleaseDelta,
    RolloutStatus,
)
from skylift.hub.server import gateway_ssl_context
from skylift.hub.tls import ServerThread, client_context, make_server

from .conftest import PRODUCT, Exploded, Hub, make_bundle

VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
IMAGE_BYTES = 4 << 20
_UUID = "6f1b0c9e-2f4d-4a43-9d6b-0a7e5c3d2b10"
_HASH_SEED = "3c5d7e9f-1a2b-4c3d-8e4f-5a6b7c8d9e0f"


# -- real ext4 images -----------------------------------------------------------------------------


def _mkfs() -> str:
    found = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
    if found is None:
        pytest.fail("mkfs.ext4 is missing: `make test` installs e2fsprogs; run it through make")
    return found


def _image(tree: Path, path: Path) -> bytes:
    """A 4 MiB ext4 image of ``tree``, reproducible (fixed UUID, hash seed and clock)."""
    subprocess.run(
        [_mkfs(), "-q", "-F", "-t", "ext4", "-b", "4096", "-U", _UUID,
         "-E", f"hash_seed={_HASH_SEED},root_owner=0:0", "-d", str(tree), str(path),
         f"{IMAGE_BYTES >> 10}k"],
        check=True, capture_output=True,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1750377600"},
    )  # fmt: skip
    return path.read_bytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Three ext4 images: 1.0.0; 1.1.0 with two files patched and one added; 1.2.0 one more."""
    work = tmp_path_factory.mktemp("ext4")
    tree = work / "tree"
    src = Path(os.__file__).parent
    budget = 1 << 20
    for path in sorted(src.glob("*.py")):
        if budget <= 0:
            break
        dest = tree / "usr/lib/python3" / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        budget -= path.stat().st_size
    (tree / "etc").mkdir()
    (tree / "etc/os-release").write_text('NAME="test OS"\nVERSION_ID="1.0.0"\n')
    out = {"1.0.0": _image(tree, work / "1.0.0.ext4")}
    files = sorted((tree / "usr/lib/python3").glob("*.py"))
    assert len(files) > 10

    def patch(path: Path, version: str) -> None:
        path.write_text(path.read_text() + f"\n# patched in {version}\n")

    (tree / "etc/os-release").write_text('NAME="test OS"\nVERSION_ID="1.1.0"\n')
    (tree / "etc/motd").write_text("Welcome to 1.1.0\n" * 50)
    patch(files[3], "1.1.0")
    patch(files[len(files) // 2], "1.1.0")
    out["1.1.0"] = _image(tree, work / "1.1.0.ext4")
    patch(files[len(files) // 3], "1.2.0")
    out["1.2.0"] = _image(tree, work / "1.2.0.ext4")
    assert len(set(out.values())) == 3
    return out


@pytest.fixture(scope="module")
def bundles(images: dict[str, bytes]) -> dict[str, Exploded]:
    """The releases, chunked as ``skylift bundle create`` chunks ext4 (fixed 4 KiB blocks)."""
    return {v: make_bundle(v, images[v], chunking=None) for v in VERSIONS}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _apply(delta: bytes, old: bytes) -> bytes:
    """A device's work, with the pure functions only: the new payload from the old one."""
    stream = io.BytesIO(delta)
    header, ops = read_delta(stream.read)
    assert header.from_sha256 == hashlib.sha256(old).digest()
    out = b"".join(data for _, data in replay(ops, stream.read, lambda o, n: old[o : o + n]))
    assert stream.read(1) == b"", "bytes after the last literal"
    assert hashlib.sha256(out).digest() == header.to_sha256
    return out


def _expected_plan_bytes(hub: Hub, old: bytes, new: Exploded, version: str) -> int:
    """The chunk plan's download, computed here from the bundle and the old image."""
    params = ChunkingParams.fixed(4096)
    have = {hashlib.sha256(c).digest() for c in iter_chunks(io.BytesIO(old), params)}
    index = hub.ctx.store.size(f"releases/{PRODUCT}/{version}/rootfs.index.zst")
    return index + sum(
        1 + len(stored) for d, (_, stored) in new.chunks.items() if bytes.fromhex(d) not in have
    )


# -- helpers --------------------------------------------------------------------------------------


def _publish(hub: Hub, bundles: dict[str, Exploded], *versions: str) -> None:
    assert hub.create_product().status_code in (201, 409)  # 409: made by an earlier call
    for v in versions:
        bundle = bundles[v]
        # Chunks straight into the hub's content store (what PUT chunks/{digest}
        # does, minus a request per chunk); the release itself through the API.
        for digest in hub.ctx.content.missing(bundle.chunks):
            hub.ctx.content.put_chunk(digest, *bundle.chunks[digest])
        r = hub.post(f"/products/{PRODUCT}/releases", json=hub.release_body(bundle))
        assert r.status_code == 201, r.text


def _rows(hub: Hub) -> list[tuple[str, str, str, DeltaStatus, ReleaseDelta]]:
    """(version, from version, payload, status, row), in id order."""
    with hub.session() as s:
        new, old = sa.orm.aliased(Release), sa.orm.aliased(Release)
        rows = s.execute(
            sa.select(new.version, old.version, ReleaseDelta)
            .join(new, new.id == ReleaseDelta.release_id)
            .join(old, old.id == ReleaseDelta.from_release_id)
            .order_by(ReleaseDelta.id)
        ).all()
        s.expunge_all()
        return [(v, f, d.payload, d.status, d) for v, f, d in rows]


def _delta_key(version: str, from_sha256: str) -> str:
    return f"releases/{PRODUCT}/{version}/rootfs.{from_sha256}.delta"


def _director_version(hub: Hub, device_id: str) -> int:
    with hub.session() as s:
        return int(
            s.scalars(
                sa.select(DirectorTargets.version)
                .join(Device, Device.id == DirectorTargets.device_id)
                .where(Device.device_id == device_id)
            ).one()
        )


def _custom(hub: Hub, device_id: str) -> dict[str, Any]:
    target = hub.ctx.director.assigned(device_id)
    assert target is not None
    image = hub.ctx.images.load(PRODUCT).target_files[target.path]
    # Uptane: what devices cross-check is the image repository's, exactly.
    assert (target.length, target.hashes) == (image.length, image.hashes)
    custom = dict(target.custom)
    assert {k: v for k, v in custom.items() if k != "deltas"} == image.custom
    return custom


# -- making, checking, offering -------------------------------------------------------------------


def test_a_delta_is_made_checked_stored_listed_and_offered(
    hub: Hub,
    bundles: dict[str, Exploded],
    images: dict[str, bytes],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _publish(hub, bundles, "1.0.0", "1.1.0")
    lines = deltas.run_pending(hub.ctx, limit=5)
    assert len(lines) == 1 and "ready" in lines[0] and "1.0.0 -> 1.1.0 rootfs" in lines[0]
    ((version, from_version, payload, status, row),) = _rows(hub)
    assert (version, from_version, payload, status) == ("1.1.0", "1.0.0", "rootfs", "ready")
    old, new = images["1.0.0"], images["1.1.0"]
    assert (row.from_sha256, row.from_size) == (_sha(old), len(old))
    assert row.error is None and row.finished is not None and row.lease_until is None
    stored = hub.ctx.store.get(_delta_key("1.1.0", _sha(old)), max_bytes=IMAGE_BYTES)
    assert (len(stored), _sha(stored)) == (row.length, row.sha256)
    assert _apply(stored, old) == new
    assert row.plan_bytes == _expected_plan_bytes(hub, old, bundles["1.1.0"], "1.1.0")
    assert row.length is not None and row.length < row.plan_bytes
    # The old release has nothing to come from.
    assert [r[0] for r in _rows(hub)] == ["1.1.0"]

    # The management API and the CLI show it.
    shown = hub.get(f"/products/{PRODUCT}/releases/1.1.0", who="viewer")
    assert shown.status_code == 200, shown.text
    (delta,) = shown.json()["deltas"]
    assert {k: delta[k] for k in ("from_version", "payload", "status", "length", "sha256")} == {
        "from_version": "1.0.0", "payload": "rootfs", "status": "ready",
        "length": row.length, "sha256": row.sha256,
    }  # fmt: skip
    assert delta["chunk_plan_bytes"] == row.plan_bytes and delta["error"] is None
    listed = hub.get(f"/products/{PRODUCT}/releases").json()["items"]
    assert [(r["version"], r["deltas"]) for r in listed] == [("1.1.0", [delta]), ("1.0.0", [])]
    assert hub.get(f"/products/{PRODUCT}/releases/9.9.9").status_code == 404
    assert hub.get(f"/products/{PRODUCT}/releases/1.1.0", who="").status_code == 401
    out = io.StringIO()
    monkeypatch.setattr(remote, "out", Console(file=out, width=160))
    monkeypatch.setattr(remote, "_client", lambda: _FakeClient(shown.json()))
    remote.release_show(PRODUCT, "1.1.0", as_json=False)
    text = out.getvalue()
    assert "per-pair deltas" in text and "1.0.0" in text and "ready" in text
    assert remote.human_size(row.length) in text and remote.human_size(row.plan_bytes) in text
    monkeypatch.setattr(remote, "_client", lambda: _FakeClient({"items": listed}))
    remote.release_list(PRODUCT, as_json=False)
    assert "1 ready" in out.getvalue()

    # The director names it for a device of a deployment of 1.1.0, and only the custom field differs.
    hub.add_devices(["d1"], slots={"d1": {"rootfs": "1.0.0"}})
    r = hub.deploy(version="1.1.0", phases=[{"percent": 100}], min_soak_s=0)
    assert r.status_code == 201, r.text
    assert _custom(hub, "d1")["deltas"] == {
        "rootfs": [{"from_version": "1.0.0", "from_sha256": _sha(old), "from_size": len(old),
                    "sha256": row.sha256, "length": row.length}],
    }  # fmt: skip
    # Nothing is re-signed for it: ticks and a fresh target change nothing.
    signed = _director_version(hub, "d1")
    for _ in range(3):
        hub.clock.advance(60)
        rollouts.tick(hub.ctx)
    with hub.session() as s:
        deployment = s.get(Deployment, r.json()["id"])
        assert deployment is not None
        assert not hub.ctx.director.assign("d1", rollouts.release_target(hub.ctx, s, deployment))
    assert _director_version(hub, "d1") == signed


class _FakeClient:
    """The CLI's hub client, answering with what the real API answered."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def json(self, method: str, path: str, **kw: object) -> dict[str, Any]:
        return self.answer


def test_a_delta_made_during_a_rollout_reaches_devices_that_have_not_begun(
    hub: Hub, bundles: dict[str, Exploded]
) -> None:
    _publish(hub, bundles, "1.0.0", "1.1.0")
    ids = [f"d{i}" for i in range(6)]
    hub.add_devices(ids, slots={d: {"rootfs": "1.0.0"} for d in ids})
    r = hub.deploy(version="1.1.0", phases=[{"percent": 50}, {"percent": 100}], min_soak_s=0)
    assert r.status_code == 201, r.text
    deployment = r.json()["id"]
    phases = hub.phase_of(deployment)
    first = sorted(d for d, p in phases.items() if p == 0)
    second = sorted(d for d, p in phases.items() if p == 1)
    assert len(first) >= 2 and second
    for d in first:
        assert "deltas" not in _custom(hub, d)  # none made yet
    assert all(hub.assigned(d) is None for d in second)
    # One device of the first phase has begun downloading the chunks.
    busy, waiting = first[0], first[1:]
    hub.report(deployment, [busy], RolloutStatus.DOWNLOADING)
    signed = {d: _director_version(hub, d) for d in first}
    assert rollouts.tick(hub.ctx) == []  # no delta yet: nothing to offer

    assert len(deltas.run_pending(hub.ctx)) == 1
    # The next tick offers it to the devices that have not begun, and only to them.
    changes = rollouts.tick(hub.ctx)
    assert changes == [
        f"deployment {deployment}: new per-pair deltas offered to {len(waiting)} device(s) "
        "that had not begun"
    ]
    for d in waiting:
        assert _director_version(hub, d) == signed[d] + 1
        assert [o["from_version"] for o in _custom(hub, d)["deltas"]["rootfs"]] == ["1.0.0"]
    assert _director_version(hub, busy) == signed[busy]
    assert "deltas" not in _custom(hub, busy)
    (entry,) = hub.audit("deployment.deltas_offered")
    assert (entry.actor, entry.details) == (rollouts.ACTOR, {"phase": 0, "devices": len(waiting)})
    # Offered once: later ticks re-sign nothing.
    again = {d: _director_version(hub, d) for d in first}
    for _ in range(2):
        assert rollouts.tick(hub.ctx) == []
    assert {d: _director_version(hub, d) for d in first} == again

    hub.report(deployment, first, RolloutStatus.COMMITTED)
    assert any("phase 1 started" in c for c in rollouts.tick(hub.ctx))
    for d in second:
        assert [o["from_version"] for o in _custom(hub, d)["deltas"]["rootfs"]] == ["1.0.0"]
    settled = {d: _director_version(hub, d) for d in ids}
    for _ in range(3):
        rollouts.tick(hub.ctx)
    assert {d: _director_version(hub, d) for d in ids} == settled


def test_deltas_come_from_the_previous_releases_once_each(
    hub: Hub, bundles: dict[str, Exploded], images: dict[str, bytes]
) -> None:
    _publish(hub, bundles, "1.0.0", "1.1.0")
    assert len(deltas.run_pending(hub.ctx, limit=10)) == 1
    before = {d.id: (d.status, d.sha256, d.finished) for *_, d in _rows(hub)}
    assert deltas.run_pending(hub.ctx, limit=10) == []  # not made twice
    assert {d.id: (d.status, d.sha256, d.finished) for *_, d in _rows(hub)} == before

    _publish(hub, bundles, "1.2.0")
    lines = deltas.run_pending(hub.ctx, limit=10)
    # Newest first: from 1.1.0, then from 1.0.0; the 1.1.0 delta is not made again.
    assert [ln.split(":")[0] for ln in lines] == [
        f"delta {PRODUCT} 1.1.0 -> 1.2.0 rootfs", f"delta {PRODUCT} 1.0.0 -> 1.2.0 rootfs",
    ]  # fmt: skip
    assert [(v, f, s) for v, f, _, s, _ in _rows(hub)] == [
        ("1.1.0", "1.0.0", "ready"), ("1.2.0", "1.1.0", "ready"), ("1.2.0", "1.0.0", "ready"),
    ]  # fmt: skip
    for from_version in ("1.0.0", "1.1.0"):
        old = images[from_version]
        stored = hub.ctx.store.get(_delta_key("1.2.0", _sha(old)), max_bytes=IMAGE_BYTES)
        assert _apply(stored, old) == images["1.2.0"]
    with hub.session() as s:
        release = s.scalars(sa.select(Release).where(Release.version == "1.2.0")).one()
        offers = deltas.offered(s, release.id)["rootfs"]
    assert [o["from_version"] for o in offers] == ["1.1.0", "1.0.0"]

    # With one previous release, a new release gets one delta.
    hub.ctx.config = replace(hub.ctx.config, delta_previous_releases=1)
    newer = make_bundle("1.3.0", images["1.0.0"], chunking=None)
    _publish(hub, {"1.3.0": newer}, "1.3.0")
    assert [ln.split(":")[0] for ln in deltas.run_pending(hub.ctx, limit=10)] == [
        f"delta {PRODUCT} 1.2.0 -> 1.3.0 rootfs"
    ]


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # logic, not SQL
def test_no_previous_releases_means_no_deltas(hub: Hub, bundles: dict[str, Exploded]) -> None:
    hub.ctx.config = replace(hub.ctx.config, delta_previous_releases=0)
    _publish(hub, bundles, "1.0.0", "1.1.0")
    assert deltas.run_pending(hub.ctx, limit=10) == []
    assert _rows(hub) == []
    assert not any(k.endswith(".delta") for k in hub.ctx.store.iter_keys("releases/"))
    with hub.session() as s:
        assert s.scalars(sa.select(Release.delta_depth)).all() == [None, None]
    hub.ctx.config = replace(hub.ctx.config, delta_previous_releases=2)
    assert len(deltas.run_pending(hub.ctx, limit=10)) == 1


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # logic, not SQL
@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated"])
def test_a_delta_that_cannot_be_made_fails_alone_and_is_tried_again_later(
    hub: Hub,
    bundles: dict[str, Exploded],
    images: dict[str, bytes],
    damage: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _publish(hub, bundles, *VERSIONS)
    key = f"releases/{PRODUCT}/1.1.0/rootfs.pack"
    pack = hub.ctx.store.get(key, max_bytes=IMAGE_BYTES * 2)
    if damage == "missing":
        hub.ctx.store.delete(key)
    elif damage == "corrupt":
        flipped = bytearray(pack)
        flipped[len(pack) // 2] ^= 0x10
        hub.ctx.store.put(key, bytes(flipped))
    else:
        hub.ctx.store.put(key, pack[:-1])
    lines = deltas.run_pending(hub.ctx, limit=10)
    # 1.1.0 -> 1.2.0 needs the damaged pack (old), 1.0.0 -> 1.2.0 does not, 1.0.0 -> 1.1.0 does (new).
    assert [ln.split(":")[1].split(",")[0].strip() for ln in lines] == [
        "failed", "ready", "failed",
    ]  # fmt: skip
    rows = {(v, f): d for v, f, _, _, d in _rows(hub)}
    for pair in (("1.2.0", "1.1.0"), ("1.1.0", "1.0.0")):
        failed = rows[pair]
        assert failed.status == DeltaStatus.FAILED and failed.length is None
        assert failed.error and "\n" not in failed.error and len(failed.error) <= 300
        assert "rootfs.pack" in failed.error
    made = rows[("1.2.0", "1.0.0")]
    assert made.status == DeltaStatus.READY
    old = images["1.0.0"]
    stored = hub.ctx.store.get(_delta_key("1.2.0", _sha(old)), max_bytes=IMAGE_BYTES)
    assert _apply(stored, old) == images["1.2.0"]
    assert sorted(k for k in hub.ctx.store.iter_keys("releases/") if k.endswith(".delta")) == [
        _delta_key("1.2.0", _sha(old))
    ]
    assert deltas.run_pending(hub.ctx, limit=10) == []  # not retried in a loop
    shown = hub.get(f"/products/{PRODUCT}/releases/1.2.0").json()["deltas"]
    assert [(d["from_version"], d["status"], d["attempts"]) for d in shown] == [
        ("1.1.0", "failed", 1), ("1.0.0", "ready", 1),
    ]  # fmt: skip

    # Failed deltas are tried again later: after RETRY_AFTER_S, then four times that.
    hub.clock.advance(deltas.RETRY_AFTER_S + 1)
    lines = deltas.run_pending(hub.ctx, limit=10)
    assert len(lines) == 2 and all("(attempt 2 of 3; again in 40 min)" in ln for ln in lines)
    hub.clock.advance(deltas.RETRY_AFTER_S + 1)
    assert deltas.run_pending(hub.ctx, limit=10) == []
    hub.clock.advance(3 * deltas.RETRY_AFTER_S)
    if damage == "missing":  # the operator restored the pack: the third attempt makes them
        hub.ctx.store.put(key, pack)
        lines = deltas.run_pending(hub.ctx, limit=10)
        assert [ln.split(":")[1].split(",")[0].strip() for ln in lines] == ["ready", "ready"]
        final = {(v, f): (d.status, d.attempts, d.error) for v, f, _, _, d in _rows(hub)}
        assert final[("1.1.0", "1.0.0")] == (DeltaStatus.READY, 3, None)
        assert (
            _apply(hub.ctx.store.get(_delta_key("1.1.0", _sha(old)), max_bytes=IMAGE_BYTES), old)
            == images["1.1.0"]
        )
        return
    lines = deltas.run_pending(hub.ctx, limit=10)
    assert len(lines) == 2 and all("(attempt 3 of 3; not tried again)" in ln for ln in lines)
    hub.clock.advance(86400 * 30)
    assert deltas.run_pending(hub.ctx, limit=10) == []  # three attempts in all
    shown = hub.get(f"/products/{PRODUCT}/releases/1.2.0").json()["deltas"]
    assert [(d["status"], d["attempts"]) for d in shown] == [("failed", 3), ("ready", 1)]
    out = io.StringIO()
    monkeypatch.setattr(remote, "out", Console(file=out, width=200))
    monkeypatch.setattr(
        remote, "_client", lambda: _FakeClient({"version": "1.2.0", "deltas": shown})
    )
    remote.release_show(PRODUCT, "1.2.0", as_json=False)
    assert "failed (3 attempts)" in out.getvalue()


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # logic, not SQL
def test_payloads_over_the_limit_are_skipped(hub: Hub, bundles: dict[str, Exploded]) -> None:
    hub.ctx.config = replace(hub.ctx.config, delta_max_payload_bytes=IMAGE_BYTES - 1)
    _publish(hub, bundles, "1.0.0", "1.1.0")
    (line,) = deltas.run_pending(hub.ctx)
    ((*_, status, row),) = _rows(hub)
    assert status == DeltaStatus.TOO_LARGE and row.length is None
    assert row.error == (
        f"a payload of {IMAGE_BYTES} bytes is over the [deltas] max_payload_bytes limit of "
        f"{IMAGE_BYTES - 1}"
    )
    assert "too_large" in line
    assert not any(k.endswith(".delta") for k in hub.ctx.store.iter_keys("releases/"))


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # logic, not SQL
def test_a_delta_not_smaller_than_the_chunk_plan_is_not_offered(
    hub: Hub, bundles: dict[str, Exploded], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deltas, "chunk_plan_bytes", lambda *a: 100)
    _publish(hub, bundles, "1.0.0", "1.1.0")
    assert len(deltas.run_pending(hub.ctx)) == 1
    ((*_, status, row),) = _rows(hub)
    assert status == DeltaStatus.LARGER and row.plan_bytes == 100
    assert row.length is not None and row.length >= 100 and row.sha256
    assert not any(k.endswith(".delta") for k in hub.ctx.store.iter_keys("releases/"))
    hub.add_devices(["d1"], slots={"d1": {"rootfs": "1.0.0"}})
    assert hub.deploy(version="1.1.0", phases=[{"percent": 100}]).status_code == 201
    assert "deltas" not in _custom(hub, "d1")


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # logic, not SQL
@pytest.mark.parametrize(("compressor", "zlib"), [("gzip", True), ("gzip", False), ("xz", True)])
def test_a_squashfs_release_gets_a_zlib_delta(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture, compressor: str, zlib: bool
) -> None:
    """mksquashfs's gzip (or xz) blocks: the hub makes the delta through their inflated forms.

    Unless ``[deltas] zlib = false``: then a plain delta, several times larger.
    """
    hub.ctx.config = replace(hub.ctx.config, delta_zlib=zlib)
    mksquashfs = shutil.which("mksquashfs") or shutil.which("mksquashfs", path="/usr/sbin")
    if mksquashfs is None:
        pytest.fail(
            "mksquashfs is missing: `make test` installs squashfs-tools; run it through make"
        )
    tree = tmp_path / "tree"
    files = sorted(Path(os.__file__).parent.glob("*.py"))[:60]
    for path in files:
        dest = tree / "usr/lib/python3" / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    images: dict[str, bytes] = {}
    for version in ("1.0.0", "1.1.0"):
        if version == "1.1.0":
            patched = tree / "usr/lib/python3" / files[7].name
            patched.write_text(patched.read_text() + "\n# patched in 1.1.0\n")
        image = tmp_path / f"{version}.sqfs"
        subprocess.run(
            [mksquashfs, str(tree), str(image), "-noappend", "-no-progress", "-quiet",
             "-mkfs-time", "0", "-all-time", "0", "-all-root", "-comp", compressor],
            check=True, capture_output=True,
        )  # fmt: skip
        images[version] = image.read_bytes()
    _publish(hub, {v: make_bundle(v, images[v]) for v in images}, "1.0.0", "1.1.0")
    with caplog.at_level("INFO", logger="skylift.hub.deltas"):
        (line,) = deltas.run_pending(hub.ctx)
    assert "ready" in line
    assert ("compressed streams" in caplog.text) is zlib
    ((*_, status, row),) = _rows(hub)
    assert status == DeltaStatus.READY
    old, new = images["1.0.0"], images["1.1.0"]
    stored = hub.ctx.store.get(_delta_key("1.1.0", _sha(old)), max_bytes=IMAGE_BYTES)
    assert stored[:4] == (b"SKZ1" if zlib else b"SKD2")
    assert (len(stored), _sha(stored)) == (row.length, row.sha256)
    made = b"".join(
        data
        for _, data in zstreams.rebuild(
            io.BytesIO(stored).read,
            lambda o, n: old[o : o + n],
            from_sha256=_sha(old),
            from_size=len(old),
            to_sha256=_sha(new),
            to_size=len(new),
        )
    )
    assert made == new
    # One patched file: a few KB through the inflated blocks; its compressed blocks whole
    # (and the directory tables mksquashfs rewrote) otherwise.
    assert row.length is not None and row.plan_bytes is not None
    assert (row.length * 5 < row.plan_bytes) is zlib


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # logic, not SQL
def test_the_background_loop_outlives_a_failure(
    hub: Hub, bundles: dict[str, Exploded], monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish(hub, bundles, "1.0.0", "1.1.0")
    real = deltas.run_pending
    calls = []

    def flaky(ctx: Any, **kw: Any) -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the database went away")
        return real(ctx, **kw)

    monkeypatch.setattr(deltas, "run_pending", flaky)
    hub.ctx.extra[deltas.INTERVAL_KEY] = 0.05
    (loop,) = deltas.background(hub.ctx)

    async def run() -> None:
        task = asyncio.create_task(loop())
        try:
            for _ in range(400):
                await asyncio.sleep(0.05)
                if _rows(hub) and _rows(hub)[0][3] == DeltaStatus.READY:
                    return
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(run())
    assert len(calls) >= 2
    assert [r[3] for r in _rows(hub)] == [DeltaStatus.READY]


# -- serving --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _gateway(hub: Hub) -> Iterator[str]:
    server = make_server(
        make_gateway_app(hub.ctx),
        host="127.0.0.1",
        port=0,
        ssl_context=gateway_ssl_context(hub.ctx),
    )
    with ServerThread(server, startup_timeout_s=10, shutdown_timeout_s=5) as thread:
        yield f"https://127.0.0.1:{thread.port}/device/v1"


def _enroll(hub: Hub, url: str, product: str, tmp: Path) -> httpx.Client:
    """A device of ``product``, enrolled through the gateway; a client with its certificate."""
    secret = issue_secret("pk")
    with hub.session() as s:
        product_row = s.scalars(sa.select(Product).where(Product.name == product)).one()
        s.add(
            ProvisioningKey(
                org_id=product_row.org_id, product_id=product_row.id, name=f"k-{secret.prefix}",
                key_hash=secret.digest, prefix=secret.prefix,
            )
        )  # fmt: skip
    device_id = f"dev-{secrets.token_hex(4)}"
    key = ca.generate_device_key()
    body = {"device_id": device_id, "product": product, "hardware_id": "hw1",
            "csr": ca.make_csr(key, device_id).decode(), "provisioning_key": secret.value}  # fmt: skip
    with httpx.Client(base_url=url, verify=client_context(hub.ctx.device_ca_pem)) as c:
        answer = c.post("/enroll", json=body)
    assert answer.status_code == 201, answer.text
    (tmp / f"{device_id}.pem").write_text(answer.json()["certificate"])
    (tmp / f"{device_id}.key").write_bytes(ca.private_key_pem(key))
    context = client_context(
        hub.ctx.device_ca_pem, tmp / f"{device_id}.pem", tmp / f"{device_id}.key"
    )
    return httpx.Client(base_url=url, verify=context, timeout=10)


def test_the_gateway_serves_deltas_to_devices_of_the_product(
    hub: Hub, bundles: dict[str, Exploded], images: dict[str, bytes], tmp_path: Path
) -> None:
    _publish(hub, bundles, "1.0.0", "1.1.0")
    assert hub.create_product("other").status_code == 201
    assert len(deltas.run_pending(hub.ctx)) == 1
    old_sha = _sha(images["1.0.0"])
    stored = hub.ctx.store.get(_delta_key("1.1.0", old_sha), max_bytes=IMAGE_BYTES)
    path = f"/releases/1.1.0/rootfs.{old_sha}.delta"
    with _gateway(hub) as url:
        mine, stranger = _enroll(hub, url, PRODUCT, tmp_path), _enroll(hub, url, "other", tmp_path)
        with mine, stranger:
            whole = mine.get(path)
            assert whole.status_code == 200
            assert whole.content == stored
            assert whole.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert whole.headers["accept-ranges"] == "bytes"
            assert (
                mine.get(path, headers={"If-None-Match": whole.headers["etag"]}).status_code == 304
            )
            # A device resumes an interrupted download with a range.
            resumed = mine.get(path, headers={"Range": "bytes=100-"})
            assert resumed.status_code == 206
            assert resumed.content == stored[100:]
            assert resumed.headers["content-range"] == f"bytes 100-{len(stored) - 1}/{len(stored)}"
            assert resumed.headers["etag"] == whole.headers["etag"]
            # Another product's device: no such release for it.
            assert stranger.get(path).status_code == 404
            for bad in (
                f"/releases/1.1.0/rootfs.{old_sha.upper()}.delta",
                f"/releases/1.1.0/rootfs.{old_sha[:63]}.delta",
                f"/releases/1.1.0/rootfs.{old_sha}.delta.x",
                f"/releases/1.1.0/.{old_sha}.delta",
                f"/releases/1.1.0/rootfs.{'0' * 64}.delta",  # well formed, none made
                f"/releases/1.0.0/rootfs.{old_sha}.delta",
            ):
                answer = mine.get(bad)
                assert answer.status_code == 404, bad
                assert list(answer.json()) == ["error"]
    # A device that runs 1.0.0 rebuilds 1.1.0 from what it was served.
    assert _apply(whole.content, images["1.0.0"]) == images["1.1.0"]


def test_director_targets_keep_the_image_targets_fields() -> None:
    """The pure part: deltas in, the rest of the target untouched; none: no key."""
    from tuf.api.metadata import TargetFile

    image = TargetFile(
        10, {"sha256": "ab" * 32}, "1.1.0.head",
        {"custom": {"product": "p", "version": "1.1.0", "deltas": {"forged": []}}, "x-other": 1},
    )  # fmt: skip
    offer = {"rootfs": [{"from_version": "1.0.0", "from_sha256": "cd" * 32, "from_size": 5,
                         "sha256": "ef" * 32, "length": 3}]}  # fmt: skip
    named = deltas.director_target(image, offer)
    assert (named.length, named.hashes, named.path) == (10, {"sha256": "ab" * 32}, "1.1.0.head")
    assert named.custom == {"product": "p", "version": "1.1.0", "deltas": offer}
    assert named.unrecognized_fields["x-other"] == 1
    bare = deltas.director_target(image, {})
    assert bare.custom == {"product": "p", "version": "1.1.0"}
    assert json.loads(json.dumps(named.to_dict()))["custom"]["deltas"] == offer
