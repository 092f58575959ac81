"""Release content on the hub: chunks verified on upload, releases ingested whole or not at all."""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import pytest
import zstandard

from skylift.bundle import ChunkData, IndexPageData, TrustedKeys, read_body, read_head
from skylift.chunks import CODEC_NONE, CODEC_ZSTD, ChunkingParams, decompress_index
from skylift.hub.content import ContentError, ReleaseContent, chunk_key
from skylift.hub.storage import LocalStore
from skylift.trust.keys import generate_private_key, signer_for

sys.path.insert(0, str(Path(__file__).parents[1]))
from bundle.conftest import build, realistic_payload  # real bundles, shared

RELEASE = signer_for(generate_private_key())
TRUSTED = TrustedKeys((RELEASE.public_key,))


def _explode(bundle: bytes) -> tuple[bytes, dict[str, bytes], dict[str, tuple[int, bytes]]]:
    """What release push sends: the head, index pages per payload, chunks by digest."""
    stream = io.BytesIO(bundle)
    head = read_head(stream)
    head.verify(TRUSTED)
    indexes: dict[str, bytearray] = {}
    chunks: dict[str, tuple[int, bytes]] = {}
    for ev in read_body(stream, head):
        if isinstance(ev, IndexPageData):
            indexes.setdefault(ev.payload.name, bytearray()).extend(ev.page)
        elif isinstance(ev, ChunkData):
            chunks[ev.entry.hexdigest] = (ev.entry.codec, ev.stored)
    return bundle[: head.length], {k: bytes(v) for k, v in indexes.items()}, chunks


@pytest.fixture
def content(tmp_path: Path) -> ReleaseContent:
    return ReleaseContent(LocalStore(tmp_path / "objects"))


@pytest.fixture(scope="module")
def bundle() -> bytes:
    data = realistic_payload(400_000, seed=11)
    return build(
        [RELEASE],
        {"rootfs": data, "kernel": data[:50_000]},
        chunking=ChunkingParams.cdc(16384),
        compatible=("hw1",),
    )


def _upload(content: ReleaseContent, chunks: dict[str, tuple[int, bytes]]) -> None:
    for digest in content.missing(chunks):
        content.put_chunk(digest, *chunks[digest])


def test_ingest_stores_packs_that_serve_every_chunk(content: ReleaseContent, bundle: bytes) -> None:
    head, indexes, chunks = _explode(bundle)
    assert content.missing(chunks) == sorted(chunks)
    _upload(content, chunks)
    assert content.missing(chunks) == []
    got = content.ingest("acme-gw", head=head, indexes=indexes, trusted=TRUSTED)
    assert got.manifest.version == "1.2.3"
    store = content._store
    pack = store.get("releases/acme-gw/1.2.3/rootfs.pack", max_bytes=1 << 24)
    raw = store.get("releases/acme-gw/1.2.3/rootfs.offsets", max_bytes=1 << 20)
    offsets = [o for (o,) in struct.iter_unpack(">Q", raw)]
    assert offsets[-1] == len(pack)
    # The compressed index decodes to the pages, and its frame declares their size.
    packed = store.get("releases/acme-gw/1.2.3/rootfs.index.zst", max_bytes=1 << 24)
    pages = indexes["rootfs"]
    assert zstandard.frame_content_size(packed) == len(pages)
    assert decompress_index(packed, len(pages)) == pages
    # each chunk in the pack decodes to its content, in index order
    stream = io.BytesIO(bundle)
    h = read_head(stream)
    h.verify(TRUSTED)
    rootfs = [
        e for e in read_body(stream, h) if isinstance(e, ChunkData) and e.payload.name == "rootfs"
    ]
    d = zstandard.ZstdDecompressor()
    for i, ev in enumerate(rootfs):
        obj = pack[offsets[i] : offsets[i + 1]]
        data = obj[1:] if obj[0] == CODEC_NONE else d.decompress(obj[1:])
        assert data == ev.data
    assert store.get("releases/acme-gw/1.2.3/head", max_bytes=1 << 20) == head


def test_a_second_release_uploads_only_new_chunks(content: ReleaseContent, bundle: bytes) -> None:
    _, _, chunks = _explode(bundle)
    _upload(content, chunks)
    data = realistic_payload(400_000, seed=11)
    changed = data[:200_000] + b"a small change" + data[200_000:]
    newer = build([RELEASE], {"rootfs": changed, "kernel": data[:50_000]},
                  chunking=ChunkingParams.cdc(16384), compatible=("hw1",))  # fmt: skip
    _, _, chunks2 = _explode(newer)
    missing = content.missing(chunks2)
    assert 0 < len(missing) <= 4  # only the chunks around the change


@pytest.mark.parametrize(
    ("codec", "mutate", "message"),
    [
        (CODEC_ZSTD, lambda s: s[:-2], "corrupt|not a zstd|one zstd frame"),
        (CODEC_NONE, lambda s: s + b"x", "digest mismatch"),
        (7, lambda s: s, "unknown codec"),
        (CODEC_NONE, lambda s: b"x" * (5 << 20), "larger than a chunk"),
    ],
)
def test_bad_chunks_are_refused(content: ReleaseContent, codec: int, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    data = b"chunk content " * 100
    digest = hashlib.sha256(data).hexdigest()
    stored = zstandard.ZstdCompressor().compress(data) if codec == CODEC_ZSTD else data
    with pytest.raises(ContentError, match=message):
        content.put_chunk(digest, codec, mutate(stored))
    assert content.missing([digest]) == [digest]


@pytest.mark.parametrize("bad", ["", "ABC", "g" * 64, "a" * 63, "../" + "a" * 61])
def test_bad_digests(bad: str) -> None:
    with pytest.raises(ContentError, match="not a chunk digest"):
        chunk_key(bad)


def _keys(content: ReleaseContent) -> list[str]:
    return sorted(content._store.iter_keys("releases/"))


def test_ingest_refusals_write_nothing(content: ReleaseContent, bundle: bytes) -> None:
    head, indexes, chunks = _explode(bundle)
    stranger = TrustedKeys((signer_for(generate_private_key()).public_key,))
    cases = [
        (dict(head=head, indexes=indexes, trusted=stranger), "valid signature"),
        (dict(head=head + b"x", indexes=indexes, trusted=TRUSTED), "not exactly a bundle head"),
        (
            dict(head=head, indexes={"rootfs": indexes["rootfs"]}, trusted=TRUSTED),
            "one chunk index",
        ),
        (
            dict(head=head, indexes={**indexes, "rootfs": indexes["rootfs"][:-1]}, trusted=TRUSTED),
            "does not verify",
        ),
        (
            dict(
                head=head, indexes={**indexes, "rootfs": indexes["rootfs"] + b"x"}, trusted=TRUSTED
            ),
            "after its last page",
        ),
        (dict(head=head, indexes=indexes, trusted=TRUSTED), "missing"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ContentError, match=message):
            content.ingest("acme-gw", **kwargs)  # type: ignore[arg-type]
    _upload(content, chunks)
    with pytest.raises(ContentError, match="not other|for product acme-gw"):
        content.ingest("other", head=head, indexes=indexes, trusted=TRUSTED)
    assert _keys(content) == []


@pytest.mark.parametrize(
    ("version", "segment"),
    [
        ("1.2.3", "1.2.3"),
        ("1.0+build.7", "1.0_pbuild.7"),
        ("2.0~rc1", "2.0_trc1"),
        ("a_b+c", "a__b_pc"),
    ],
)
def test_version_segments_are_keys_and_distinct(version: str, segment: str) -> None:
    from skylift.hub.content import version_segment
    from skylift.hub.storage.base import validate_key

    assert version_segment(version) == segment
    validate_key(f"releases/p/{segment}/head")
    assert version_segment("1.0+1") != version_segment("1.0_1")
