"""Bundles written by the writer read back, verified, from files and pipes."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import tracemalloc
from datetime import UTC, datetime

import pytest
from securesystemslib.signer import CryptoSigner

from skylift.bundle import (
    BundleError,
    ChunkData,
    HardwareMismatchError,
    HookData,
    PayloadEnd,
    PayloadSource,
    PayloadStart,
    SignatureError,
    TrustedKeys,
    UnsafePayloadNameError,
    detect_payload_type,
    read_body,
    read_head,
    write_bundle,
)
from skylift.chunks import ChunkingParams

from .conftest import CREATED, build


def _read_all(data: bytes, signer: CryptoSigner) -> tuple[dict[str, bytes], dict[str, bytes]]:
    stream = io.BytesIO(data)
    head = read_head(stream)
    head.verify(TrustedKeys((signer.public_key,)))
    payloads: dict[str, bytearray] = {}
    hooks = {}
    for ev in read_body(stream, head):
        if isinstance(ev, HookData):
            hooks[ev.hook.phase] = ev.data
        elif isinstance(ev, PayloadStart):
            payloads[ev.payload.name] = bytearray()
        elif isinstance(ev, ChunkData):
            assert ev.entry.offset == len(payloads[ev.payload.name])
            payloads[ev.payload.name] += ev.data
    return {k: bytes(v) for k, v in payloads.items()}, hooks


def test_round_trip(bundle: bytes, release: CryptoSigner, payload: bytes) -> None:
    payloads, hooks = _read_all(bundle, release)
    assert payloads == {"rootfs": payload, "app": payload[:100_000]}
    assert hooks == {"post-install": b"#!/bin/sh\nexit 0\n"}
    m = read_head(io.BytesIO(bundle)).unverified_manifest()
    assert (m.product, m.version, m.compatible, m.created) == (
        "acme-gw",
        "1.2.3",
        ("board-a", "board-b"),
        CREATED,
    )
    rootfs = m.payload("rootfs")
    assert rootfs.sha256 == hashlib.sha256(payload).hexdigest()
    assert rootfs.size == len(payload)
    assert rootfs.stored_size < len(payload)  # text and zero runs compress


def test_events_come_in_order(bundle: bytes, release: CryptoSigner) -> None:
    stream = io.BytesIO(bundle)
    head = read_head(stream)
    head.verify(TrustedKeys((release.public_key,)))
    kinds = [type(e).__name__ for e in read_body(stream, head)]
    compact = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert compact == [
        "HookData",
        "PayloadStart",
        "IndexPageData",
        "ChunkData",
        "PayloadEnd",
        "PayloadStart",
        "IndexPageData",
        "ChunkData",
        "PayloadEnd",
    ]


def test_pages_and_stored_chunks_are_the_bundles_bytes(
    bundle: bytes, release: CryptoSigner
) -> None:
    """What release push uploads: the index pages and chunks exactly as stored."""
    from skylift.bundle import IndexPageData

    stream = io.BytesIO(bundle)
    head = read_head(stream)
    head.verify(TrustedKeys((release.public_key,)))
    rebuilt = bytearray(bundle[: head.length])
    for ev in read_body(stream, head):
        if isinstance(ev, IndexPageData):
            rebuilt += ev.page
        elif isinstance(ev, ChunkData):
            rebuilt += ev.stored
    assert bytes(rebuilt) == bundle


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threads_write_the_same_bundle(release: CryptoSigner, payload: bytes, workers: int) -> None:
    one = build([release], {"rootfs": payload})
    assert build([release], {"rootfs": payload}, workers=workers)[200:] == one[200:]
    # ed25519 is deterministic, so even the signature agrees
    assert build([release], {"rootfs": payload}, workers=workers) == one


def test_same_input_same_chunks(release: CryptoSigner, payload: bytes) -> None:
    """Publishing an image twice yields the same chunk digests (content addressing)."""
    a = read_head(io.BytesIO(build([release], {"rootfs": payload}))).unverified_manifest()
    b = read_head(
        io.BytesIO(build([release], {"rootfs": payload}, workers=2))
    ).unverified_manifest()
    assert a.payloads[0].index == b.payloads[0].index


def test_reads_from_a_pipe(bundle: bytes, release: CryptoSigner, payload: bytes) -> None:
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(bundle)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    got = bytearray()
    with os.fdopen(r, "rb", buffering=0) as f:
        head = read_head(f)
        head.verify(TrustedKeys((release.public_key,)))
        for ev in read_body(f, head):
            if isinstance(ev, ChunkData) and ev.payload.name == "rootfs":
                got += ev.data
    t.join(10)
    assert bytes(got) == payload


def test_empty_payload(release: CryptoSigner) -> None:
    payloads, _ = _read_all(build([release], {"empty": b""}), release)
    assert payloads == {"empty": b""}


def test_threshold_of_two_keys(release: CryptoSigner, stranger: CryptoSigner) -> None:
    data = build([release, stranger], {"rootfs": b"x" * 1000})
    head = read_head(io.BytesIO(data))
    assert sorted(head.verify(TrustedKeys((release.public_key, stranger.public_key), 2))) == sorted(
        [release.public_key.keyid, stranger.public_key.keyid]
    )
    one = read_head(io.BytesIO(build([release], {"rootfs": b"x" * 1000})))
    with pytest.raises(SignatureError, match=r"1 valid signature.*2 needed"):
        one.verify(TrustedKeys((release.public_key, stranger.public_key), 2))


def test_body_is_refused_before_verification(bundle: bytes) -> None:
    stream = io.BytesIO(bundle)
    head = read_head(stream)
    with pytest.raises(BundleError, match="not verified"):
        next(read_body(stream, head))
    with pytest.raises(BundleError, match="not verified"):
        _ = head.manifest


def test_hardware_check(bundle: bytes) -> None:
    m = read_head(io.BytesIO(bundle)).unverified_manifest()
    m.require_hardware("board-b")
    with pytest.raises(HardwareMismatchError, match="board-a, board-b, not 'board-z'"):
        m.require_hardware("board-z")


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\0" * 1080 + b"\x53\xef" + b"\0" * 3000, "ext4"),
        (b"hsqs" + b"\0" * 4092, "squashfs"),
        (b"\0" * 257 + b"ustar\x0000" + b"\0" * 3000, "tar"),
        (b"\0" * 1024 + b"\xe2\xe1\xf5\xe0" + b"\0" * 3000, "erofs"),
        (b"\0" * 82 + b"FAT32   " + b"\0" * 420 + b"\x55\xaa", "vfat"),
        (b"random bytes" * 100, "raw"),
        (b"", "raw"),
    ],
)
def test_payload_type_detection(head: bytes, kind: str) -> None:
    assert detect_payload_type(head) == kind


def test_writer_refuses_bad_names_and_hooks(release: CryptoSigner) -> None:
    for name in ("../evil", "a/b", "Root", "", ".hidden", "x" * 64):
        with pytest.raises(UnsafePayloadNameError):
            build([release], {name: b"data"})
    with pytest.raises(BundleError, match="unknown hook phase"):
        build([release], {"rootfs": b"data"}, hooks={"pre-reboot": b"x"})
    with pytest.raises(BundleError, match="same name"):
        write_bundle(
            io.BytesIO(),
            product="p",
            version="1",
            compatible=["h"],
            payloads=[PayloadSource("a", io.BytesIO(b"1")), PayloadSource("a", io.BytesIO(b"2"))],
            signers=[release],
            spool=io.BytesIO(),
            created=datetime.now(UTC),
        )


def _stream_of(size: int) -> io.RawIOBase:
    """A readable stream of ``size`` pseudo-random bytes produced on the fly."""

    class Gen(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size
            self.block = os.urandom(1 << 16)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def, override]
            n = min(len(b), self.left, len(self.block))
            b[:n] = self.block[:n]
            self.left -= n
            return n

    return Gen()


def test_memory_is_bounded_independently_of_payload_size(release: CryptoSigner) -> None:
    """Write and read a 48 MiB payload; Python allocations stay at a few MiB."""
    size = 48 << 20
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as spool:
        tracemalloc.start()
        try:
            write_bundle(
                out,
                product="p",
                version="1",
                compatible=["h"],
                payloads=[
                    PayloadSource("rootfs", _stream_of(size), chunking=ChunkingParams.cdc(16384))
                ],
                signers=[release],
                spool=spool,
                created=CREATED,
                workers=2,
            )
            _, write_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            out.seek(0)
            head = read_head(out)
            head.verify(TrustedKeys((release.public_key,)))
            total = sum(len(e.data) for e in read_body(out, head) if isinstance(e, ChunkData))
            _, read_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert total == size
    assert write_peak < 8 << 20, f"writer peaked at {write_peak} bytes"
    assert read_peak < 4 << 20, f"reader peaked at {read_peak} bytes"


def test_payload_end_only_after_whole_payload(bundle: bytes, release: CryptoSigner) -> None:
    stream = io.BytesIO(bundle)
    head = read_head(stream)
    head.verify(TrustedKeys((release.public_key,)))
    seen = 0
    for ev in read_body(stream, head):
        if isinstance(ev, ChunkData):
            seen += len(ev.data)
        if isinstance(ev, PayloadEnd):
            assert seen == ev.payload.size
            seen = 0


def test_head_length_is_where_payloads_start(bundle: bytes, release: CryptoSigner) -> None:
    """The head (ADR 0004: the TUF target) is a prefix that reads and verifies on its own."""
    head = read_head(io.BytesIO(bundle))
    with pytest.raises(BundleError, match="not verified"):
        _ = head.length
    head.verify(TrustedKeys((release.public_key,)))
    prefix = bundle[: head.length]
    again = read_head(io.BytesIO(prefix))
    again.verify(TrustedKeys((release.public_key,)))
    assert prefix.endswith(b"#!/bin/sh\nexit 0\n")  # the hook is the last part of the head
    assert bundle[head.length : head.length + 4] == b"SKIP"  # the first index page follows
