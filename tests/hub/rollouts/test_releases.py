"""Publishing releases through the API: only missing chunks travel, refusals change nothing."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import sqlalchemy as sa
import zstandard

from skylift.hub.db.models import AuditEntry, Release

from .conftest import PRODUCT, STRANGER, Exploded, Hub, make_bundle


def _store(hub: Hub, prefix: str = "releases/") -> list[str]:
    return sorted(hub.ctx.store.iter_keys(prefix))


def test_a_release_is_published_listed_and_audited(hub: Hub, v1: Exploded) -> None:
    assert hub.create_product().status_code == 201
    assert hub.upload(v1) == len(v1.chunks)
    # Uploading a chunk the hub has is a no-op that says so.
    digest, (codec, stored) = next(iter(v1.chunks.items()))
    again = hub.call(
        "PUT", f"/chunks/{digest}", content=stored,
        headers={"Content-Type": "application/octet-stream", "X-Skylift-Codec": str(codec)},
    )  # fmt: skip
    assert again.status_code == 200
    r = hub.post(f"/products/{PRODUCT}/releases", json=hub.release_body(v1), who="operator")
    assert r.status_code == 201, r.text
    release = r.json()
    assert release["version"] == "1.0.0"
    assert release["target"] == "1.0.0.head"
    assert release["length"] == len(v1.head)
    assert release["sha256"] == hashlib.sha256(v1.head).hexdigest()
    assert release["hardware_ids"] == ["hw1"]
    assert release["payload_size"] == 300_000
    assert 0 < release["stored_size"] < 300_000  # compressed
    assert release["created_by"].startswith("operator-")

    assert hub.targets_version() == 2
    target = hub.ctx.images.load(PRODUCT).target_files["1.0.0.head"]
    assert target.custom == v1.custom
    assert "releases/gw/1.0.0/head" in _store(hub)
    listed = hub.get(f"/products/{PRODUCT}/releases", who="viewer").json()["items"]
    no_reports = {"devices": 0, "downloaded_bytes": 0, "image_bytes": 0, "saved_bytes": 0,
                  "saved_percent": None}  # fmt: skip
    assert listed == [release | {"bandwidth": no_reports}]  # no device has installed it yet
    (row,) = hub.releases()
    assert row.hashes == {"sha256": release["sha256"]} and row.custom == v1.custom
    (entry,) = hub.audit("release.create")
    assert entry.target_id == "gw/1.0.0"
    assert entry.details is not None and entry.details["target"] == "1.0.0.head"


def test_a_second_release_uploads_only_new_chunks(hub: Hub, v1: Exploded, v2: Exploded) -> None:
    assert hub.create_product().status_code == 201
    assert hub.push(v1).status_code == 201
    uploaded = hub.upload(v2)
    assert 0 < uploaded <= 4 < len(v2.chunks)
    r = hub.post(f"/products/{PRODUCT}/releases", json=hub.release_body(v2))
    assert r.status_code == 201, r.text
    assert [x["version"] for x in hub.get(f"/products/{PRODUCT}/releases").json()["items"]] == [
        "1.1.0",
        "1.0.0",
    ]
    assert hub.targets_version() == 3


def _without(bundle: Exploded, digest: str) -> Exploded:
    chunks = {d: c for d, c in bundle.chunks.items() if d != digest}
    return Exploded(bundle.version, bundle.head, bundle.indexes, chunks, bundle.custom)


@pytest.fixture(scope="module")
def intruder_bundle() -> Exploded:
    from .conftest import IMAGE

    return make_bundle("6.6.6", IMAGE, signers=[STRANGER])


# (id, how to build the request from (hub, v1, v2, intruder), status, message)
REFUSALS: list[tuple[str, Any, int, str]] = [
    ("targets-signed-by-a-stranger",
     lambda h, v1, v2, x: {**h.release_body(v2), "targets": h.forged_targets(v2, STRANGER)}, 409,
     "release refused"),
    ("bundle-signed-by-a-stranger",
     lambda h, v1, v2, x: h.release_body(x), 400, "bundle head refused"),
    ("targets-for-another-head",
     lambda h, v1, v2, x: h.release_body(v2, content=v1.head), 409, "does not match the bundle head"),
    ("target-path-not-the-version",
     lambda h, v1, v2, x: h.release_body(v2, path="latest.head"), 409, "the bundle's is 1.1.0.head"),
    ("custom-lies-about-the-version",
     lambda h, v1, v2, x: h.release_body(v2, custom={**v2.custom, "version": "9.0.0"}), 409,
     "custom field 'version'"),
    ("version-released-already",
     lambda h, v1, v2, x: h.release_body(v1, path="again.head"), 409,
     "released already"),
    ("index-missing",
     lambda h, v1, v2, x: {**h.release_body(v2), "indexes": {}}, 400, "indexes must map"),
    ("not-base64",
     lambda h, v1, v2, x: {**h.release_body(v2), "head": "***"}, 400, "not valid base64"),
    ("unknown-field",
     lambda h, v1, v2, x: {**h.release_body(v2), "extra": 1}, 400, "unknown field"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "status", "message"),
    [pytest.param(b, s, m, id=i) for i, b, s, m in REFUSALS],
)
def test_refused_releases_change_nothing(
    module_hub: Hub, v1: Exploded, v2: Exploded, intruder_bundle: Exploded, build: Any,
    status: int, message: str,
) -> None:  # fmt: skip
    hub = module_hub
    hub.upload(v2)
    hub.upload(intruder_bundle)
    before = (hub.targets_version(), _store(hub), len(hub.releases()))
    audits = len(hub.audit("release.create"))
    r = hub.post(f"/products/{PRODUCT}/releases", json=build(hub, v1, v2, intruder_bundle))
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert (hub.targets_version(), _store(hub), len(hub.releases())) == before
    assert len(hub.audit("release.create")) == audits


def test_a_missing_chunk_refuses_the_release(hub: Hub, v1: Exploded) -> None:
    assert hub.create_product().status_code == 201
    digest = sorted(v1.chunks)[3]
    hub.upload(_without(v1, digest))
    r = hub.post(f"/products/{PRODUCT}/releases", json=hub.release_body(v1))
    assert r.status_code == 400
    assert "1 chunk(s) are missing" in r.json()["error"]
    assert hub.targets_version() == 1
    assert _store(hub) == []
    assert hub.releases() == []
    # Once the chunk is there, the same request goes through.
    assert hub.upload(v1) == 1
    assert hub.post(f"/products/{PRODUCT}/releases", json=hub.release_body(v1)).status_code == 201


def test_who_may_publish(module_hub: Hub, v2: Exploded) -> None:
    hub = module_hub
    hub.upload(v2)
    body = hub.release_body(v2)
    before = (hub.targets_version(), len(hub.releases()))
    assert hub.post(f"/products/{PRODUCT}/releases", json=body, who="viewer").status_code == 403
    if "other" not in hub.tokens:
        hub.tokens["other"] = hub.add_token("admin", org_id=hub.add_org("other"))
    r = hub.post(f"/products/{PRODUCT}/releases", json=body, who="other")
    assert r.status_code == 404
    assert hub.get(f"/products/{PRODUCT}/releases", who="other").status_code == 404
    digest = sorted(v2.chunks)[0]
    assert hub.post("/chunks/missing", json={"digests": [digest]}, who="viewer").status_code == 403
    assert hub.post("/chunks/missing", json={"digests": [digest]}, who="").status_code == 401
    assert (hub.targets_version(), len(hub.releases())) == before


CHUNK = b"chunk content " * 100
CHUNK_DIGEST = hashlib.sha256(CHUNK).hexdigest()


@pytest.mark.parametrize(
    ("digest", "headers", "content", "status", "message"),
    [
        pytest.param("ABC", {"X-Skylift-Codec": "0"}, CHUNK, 400, "not a chunk digest", id="digest"),
        pytest.param(CHUNK_DIGEST, {}, CHUNK, 400, "X-Skylift-Codec", id="no-codec"),
        pytest.param(CHUNK_DIGEST, {"X-Skylift-Codec": "7"}, CHUNK, 400, "X-Skylift-Codec", id="codec"),
        pytest.param(CHUNK_DIGEST, {"X-Skylift-Codec": "0"}, CHUNK + b"x", 400, "digest mismatch",
                     id="wrong-content"),
        pytest.param(CHUNK_DIGEST, {"X-Skylift-Codec": "1"}, CHUNK, 400, "zstd", id="not-zstd"),
        pytest.param(CHUNK_DIGEST, {"X-Skylift-Codec": "0"}, b"x" * (4 * 1024 * 1024 + 1025),
                     413, "limit", id="too-large"),
        pytest.param(CHUNK_DIGEST, {"X-Skylift-Codec": "0", "Content-Type": "text/plain"}, CHUNK,
                     400, "octet-stream", id="content-type"),
    ],
)  # fmt: skip
def test_bad_chunks_are_refused(
    module_hub: Hub, digest: str, headers: dict[str, str], content: bytes, status: int, message: str
) -> None:
    hub = module_hub
    r = hub.call("PUT", f"/chunks/{digest}", content=content, headers=headers, who="operator")
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert hub.post("/chunks/missing", json={"digests": [CHUNK_DIGEST]}).json() == {
        "missing": [CHUNK_DIGEST]
    }


def test_good_chunks_both_codecs(hub: Hub) -> None:
    compressed = zstandard.ZstdCompressor().compress(CHUNK)
    r = hub.call("PUT", f"/chunks/{CHUNK_DIGEST}", content=compressed,
                 headers={"X-Skylift-Codec": "1"})  # fmt: skip
    assert r.status_code == 201
    assert hub.post("/chunks/missing", json={"digests": [CHUNK_DIGEST]}).json() == {"missing": []}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"digests": ["a" * 63]}, "not a chunk digest"),
        ({"digests": "a" * 64}, "list"),
        ({"digests": ["a" * 64] * 100_001}, "at most 100000"),
        ({}, "needs the field 'digests'"),
        ({"digests": [], "more": 1}, "unknown field"),
    ],
    ids=["short", "not-a-list", "too-many", "missing", "unknown-field"],
)
def test_bad_missing_requests(module_hub: Hub, body: dict[str, Any], message: str) -> None:
    r = module_hub.post("/chunks/missing", json=body)
    assert r.status_code == 400
    assert message in r.json()["error"]


def test_missing_answers_each_digest_once(hub: Hub) -> None:
    digests = [f"{i:064x}" for i in range(1000)]
    r = hub.post("/chunks/missing", json={"digests": digests + digests[:10]})
    assert r.json()["missing"] == sorted(digests)
    with hub.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(AuditEntry)) == 0
        assert s.scalar(sa.select(sa.func.count()).select_from(Release)) == 0


def _record(digest: str, codec: int, stored: bytes) -> bytes:
    """One record of a POST /chunks batch, as `skylift release push` writes it."""
    return digest.encode() + bytes([codec]) + len(stored).to_bytes(4, "big") + stored


OTHER = b"other chunk " * 300
OTHER_DIGEST = hashlib.sha256(OTHER).hexdigest()


def test_chunks_go_up_in_batches(hub: Hub) -> None:
    compressed = zstandard.ZstdCompressor().compress(CHUNK)
    body = _record(CHUNK_DIGEST, 1, compressed) + _record(OTHER_DIGEST, 0, OTHER)
    body += _record(OTHER_DIGEST, 0, OTHER)  # twice in one batch: stored once
    headers = {"Content-Type": "application/octet-stream"}
    r = hub.call("POST", "/chunks", content=body, headers=headers)
    assert (r.status_code, r.json()) == (200, {"stored": 2, "present": 0}), r.text
    digests = {"digests": [CHUNK_DIGEST, OTHER_DIGEST]}
    assert hub.post("/chunks/missing", json=digests).json() == {"missing": []}
    assert hub.ctx.content.read_chunk(CHUNK_DIGEST) == (1, compressed)
    r = hub.call("POST", "/chunks", content=body, headers=headers)
    assert (r.status_code, r.json()) == (200, {"stored": 0, "present": 2})
    # Who may: operators, like every upload.
    assert (
        hub.call("POST", "/chunks", content=body, headers=headers, who="viewer").status_code == 403
    )
    assert hub.call("POST", "/chunks", content=body, headers=headers, who="").status_code == 401


GOOD = _record(OTHER_DIGEST, 0, OTHER)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        pytest.param(b"", 400, "holds no chunk", id="empty"),
        pytest.param(GOOD + b"abc", 400, "chunk record 1: the batch ends inside its header",
                     id="truncated-head"),
        pytest.param(GOOD[:-1], 400, "chunk record 0: 3600 bytes is more than", id="truncated"),
        pytest.param(_record("A" * 64, 0, CHUNK), 400, "not a chunk digest", id="digest"),
        pytest.param(_record(CHUNK_DIGEST, 7, CHUNK), 400, "the codec is 0 (raw) or 1 (zstd)",
                     id="codec"),
        pytest.param(GOOD + _record(CHUNK_DIGEST, 0, CHUNK + b"x"), 400, "digest mismatch",
                     id="one-wrong"),
        pytest.param(GOOD + _record(CHUNK_DIGEST, 1, CHUNK), 400, "zstd", id="not-zstd"),
        pytest.param(_record(CHUNK_DIGEST, 0, b"") * 4097, 400, "at most 4096 chunks",
                     id="too-many"),
        pytest.param(GOOD * 4700, 413, "limit", id="too-large"),
    ],
)  # fmt: skip
def test_bad_batches_are_refused_and_store_nothing(
    module_hub: Hub, body: bytes, status: int, message: str
) -> None:
    hub = module_hub
    r = hub.call("POST", "/chunks", content=body,
                 headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and "\n" not in r.json()["error"]
    # Not even the good chunk before the bad one.
    missing = hub.post("/chunks/missing", json={"digests": [CHUNK_DIGEST, OTHER_DIGEST]})
    assert missing.json() == {"missing": sorted([CHUNK_DIGEST, OTHER_DIGEST])}
    r = hub.call("POST", "/chunks", content=GOOD, headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "octet-stream" in r.json()["error"]
