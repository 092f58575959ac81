"""What devices download: both TUF repositories (through python-tuf's own client) and packs by range."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
from pathlib import Path

import pytest
from tuf.ngclient import Updater

from skylift.chunks import compress_index
from skylift.hub import ca
from skylift.hub.gateway import invalidate

from .conftest import OTHER_PRODUCT, PACK_BYTES, PRODUCT, VERSION, Enrolled, Hub, MTLSFetcher


def test_image_and_director_metadata_are_served(hub: Hub, device: Enrolled) -> None:
    client = hub.client(device)
    root = client.get("/image/metadata/1.root.json")
    assert root.status_code == 200
    assert root.headers["content-type"] == "application/json"
    assert root.content == hub.image_root
    assert "immutable" in root.headers["cache-control"]
    timestamp = client.get("/image/metadata/timestamp.json")
    assert timestamp.status_code == 200
    assert timestamp.headers["cache-control"] == "no-cache"
    head = client.get(f"/image/targets/{hashlib.sha256(hub.head).hexdigest()}.{VERSION}.head")
    assert head.status_code == 200
    assert head.headers["content-type"] == "application/octet-stream"
    assert head.content == hub.head
    own = client.get(f"/director/{device.device_id}/metadata/timestamp.json")
    assert own.status_code == 200
    assert own.headers["content-type"] == "application/json"
    assert own.headers["cache-control"] == "no-cache"
    director_root = client.get(f"/director/{device.device_id}/metadata/1.root.json")
    assert json.loads(director_root.content) == device.answer["director_root"]


@pytest.mark.parametrize(
    "path",
    [
        "/image/metadata/2.root.json",  # the next root: clients need 404 to stop looking
        "/image/metadata/99.targets.json",
        "/image/targets/" + "0" * 64 + ".9.9.9.head",
        "/image/secrets.txt",
        "/image/metadata/..%2F..%2Fdirector%2Froot%2Fmetadata%2Froot.json",
        "/director/{me}/metadata/2.root.json",
        "/director/{me}/metadata/7.targets.json",
        "/releases/9.9.9/rootfs.pack",  # another product's release
        "/releases/7.7.7/rootfs.pack",
        "/releases/1.0.0/rootfs.tar",
        "/releases/1.0.0/kernel.pack",  # no such payload
        "/releases/1.0.0/..%2Fhead",
        "/releases/1.0.0/rootfs.pack/extra",
    ],
)
def test_anything_else_is_404(hub: Hub, device: Enrolled, path: str) -> None:
    answer = hub.client(device).get(path.format(me=device.device_id))
    assert answer.status_code == 404, answer.text
    assert list(answer.json()) == ["error"]


def test_ngclient_refreshes_both_repositories_over_mutual_tls(hub: Hub, tmp_path: Path) -> None:
    """The agent's trust path, with python-tuf's Updater and a client-certificate fetcher."""
    device = hub.enroll()
    target = hub.ctx.images.load(PRODUCT).target_files[f"{VERSION}.head"]
    hub.ctx.director.assign(device.device_id, target)
    invalidate(device.device_id)
    fetcher = MTLSFetcher(hub.tls(device))
    try:
        (tmp_path / "director").mkdir()
        director = Updater(
            metadata_dir=str(tmp_path / "director"),
            metadata_base_url=f"{hub.url}/director/{device.device_id}/metadata/",
            fetcher=fetcher,
            bootstrap=json.dumps(device.answer["director_root"]).encode(),
        )
        director.refresh()
        wanted = director.get_targetinfo(f"{VERSION}.head")
        assert wanted is not None
        (tmp_path / "image").mkdir()
        image = Updater(
            metadata_dir=str(tmp_path / "image"),
            metadata_base_url=f"{hub.url}/image/metadata/",
            target_dir=str(tmp_path / "targets"),
            target_base_url=f"{hub.url}/image/targets/",
            fetcher=fetcher,
            bootstrap=json.dumps(device.answer["image_root"]).encode(),
        )
        image.refresh()
        released = image.get_targetinfo(f"{VERSION}.head")
        assert released is not None
        # Uptane: both repositories name the same bytes
        assert (wanted.length, wanted.hashes) == (released.length, released.hashes)
        path = image.download_target(released)
        assert Path(path).read_bytes() == hub.head
    finally:
        fetcher.close()
    fetched = [u.removeprefix(hub.url) for u in fetcher.urls]
    assert f"/director/{device.device_id}/metadata/2.root.json" in fetched  # probed: 404, done
    assert "/image/metadata/2.root.json" in fetched
    assert any(u.startswith("/image/targets/") for u in fetched)


def test_pack_is_served_whole_and_by_ranges(hub: Hub, device: Enrolled) -> None:
    client = hub.client(device)
    url = f"/releases/{VERSION}/rootfs.pack"
    whole = client.get(url)
    assert whole.status_code == 200
    assert whole.content == hub.pack
    assert whole.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert whole.headers["accept-ranges"] == "bytes"
    etag = whole.headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304

    single = client.get(url, headers={"Range": "bytes=1000-1999"})
    assert single.status_code == 206
    assert single.content == hub.pack[1000:2000]
    assert single.headers["content-range"] == f"bytes 1000-1999/{PACK_BYTES}"
    assert single.headers["etag"] == etag
    suffix = client.get(url, headers={"Range": "bytes=-10"})
    assert suffix.status_code == 206 and suffix.content == hub.pack[-10:]

    multi = client.get(url, headers={"Range": "bytes=0-9, 5000-5099, 299990-"})
    assert multi.status_code == 206
    assert multi.headers["content-type"].startswith("multipart/byteranges; boundary=")
    parts = _multipart(multi.headers["content-type"], multi.content)
    assert parts == [
        (f"bytes 0-9/{PACK_BYTES}", hub.pack[0:10]),
        (f"bytes 5000-5099/{PACK_BYTES}", hub.pack[5000:5100]),
        (f"bytes 299990-299999/{PACK_BYTES}", hub.pack[299990:]),
    ]


@pytest.mark.parametrize(
    "header",
    [
        f"bytes={PACK_BYTES}-",
        "bytes=5-1",
        "items=0-1",
        "bytes=abc",
        "bytes=" + ",".join(["0-0"] * 600),
    ],
    ids=["past the end", "backwards", "not bytes", "malformed", "too many ranges"],
)
def test_unsatisfiable_ranges_are_416(hub: Hub, device: Enrolled, header: str) -> None:
    answer = hub.client(device).get(f"/releases/{VERSION}/rootfs.pack", headers={"Range": header})
    assert answer.status_code == 416
    assert answer.headers["content-range"] == f"bytes */{PACK_BYTES}"
    assert list(answer.json()) == ["error"]


def test_index_and_offsets_are_served(hub: Hub, device: Enrolled) -> None:
    client = hub.client(device)
    index = client.get(f"/releases/{VERSION}/rootfs.index")
    assert index.status_code == 200 and index.content == f"index pages of {VERSION}".encode()
    offsets = client.get(f"/releases/{VERSION}/rootfs.offsets")
    assert offsets.status_code == 200
    assert int.from_bytes(offsets.content[8:], "big") == PACK_BYTES
    assert "immutable" in offsets.headers["cache-control"]
    # Released before the hub compressed indexes: no .index.zst, a plain 404.
    assert client.get(f"/releases/{VERSION}/rootfs.index.zst").status_code == 404
    assert client.get(f"/releases/{VERSION}/rootfs.index.gz").status_code == 404
    packed = compress_index(b"pages " * 1000)
    hub.ctx.store.put(f"releases/{PRODUCT}/{VERSION}/rootfs.index.zst", packed)
    served = client.get(f"/releases/{VERSION}/rootfs.index.zst")
    assert served.status_code == 200 and served.content == packed
    assert "immutable" in served.headers["cache-control"]


def test_a_device_of_the_other_product_sees_its_own_releases_only(hub: Hub) -> None:
    key = ca.generate_device_key()
    body = hub.enroll_body(
        "other-product-1", key, hub.provisioning_key(product_id=hub.other_product_id)
    )
    body["product"] = OTHER_PRODUCT
    answer = hub.client().post("/enroll", json=body)
    assert answer.status_code == 201, answer.text
    other = hub.write_identity("other-product-1", answer.json()["certificate"].encode(), key)
    client = hub.client(other)
    assert client.get("/releases/9.9.9/rootfs.pack").content == b"other pack"
    assert client.get(f"/releases/{VERSION}/rootfs.pack").status_code == 404
    assert client.get("/image/metadata/1.root.json").content != hub.image_root


def _multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    return [
        (part["Content-Range"], part.get_payload(decode=True))
        for part in message.iter_parts()  # type: ignore[attr-defined]
    ]
