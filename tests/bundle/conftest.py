"""Bundles built by the real writer, and tools to forge validly signed bad ones."""

from __future__ import annotations

import io
import random
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

from skylift.bundle import HookSource, PayloadSource, write_bundle
from skylift.bundle.format import PREAMBLE_SIZE, pack_preamble
from skylift.bundle.manifest import canonical_json
from skylift.bundle.signature import encode_signatures, sign_manifest
from skylift.chunks import ChunkingParams
from skylift.trust.keys import generate_private_key, signer_for

CREATED = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def realistic_payload(size: int, seed: int = 7) -> bytes:
    """Text, zero runs and noise, like a filesystem image."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(3, 9)).hex() for _ in range(300)]
    parts: list[bytes] = []
    n = 0
    while n < size:
        kind = rng.random()
        if kind < 0.5:
            part = " ".join(rng.choice(words) for _ in range(rng.randint(50, 3000))).encode()
        elif kind < 0.75:
            part = bytes(rng.randint(1000, 100_000))
        else:
            part = rng.randbytes(rng.randint(1000, 50_000))
        parts.append(part)
        n += len(part)
    return b"".join(parts)[:size]


def build(
    signers: list[CryptoSigner],
    payloads: dict[str, bytes],
    *,
    hooks: dict[str, bytes] | None = None,
    chunking: ChunkingParams | None = None,
    compatible: tuple[str, ...] = ("board-a", "board-b"),
    workers: int = 1,
    entries_per_page: int = 1024,
) -> bytes:
    out = io.BytesIO()
    with tempfile.TemporaryFile() as spool:
        write_bundle(
            out,
            product="acme-gw",
            version="1.2.3",
            compatible=compatible,
            payloads=[
                PayloadSource(name, io.BytesIO(data), chunking=chunking)
                for name, data in payloads.items()
            ],
            hooks=[HookSource(p, d) for p, d in (hooks or {}).items()],
            signers=signers,
            spool=spool,
            created=CREATED,
            workers=workers,
            entries_per_page=entries_per_page,
        )
    return out.getvalue()


def split(bundle: bytes) -> tuple[dict[str, Any], bytes]:
    """(manifest dict, everything after the signature section)."""
    import json
    import struct

    _, _, mlen, slen = struct.unpack(">8sIII", bundle[:PREAMBLE_SIZE])
    manifest = json.loads(bundle[PREAMBLE_SIZE : PREAMBLE_SIZE + mlen])
    return manifest, bundle[PREAMBLE_SIZE + mlen + slen :]


def forge(
    bundle: bytes,
    signer: CryptoSigner,
    mutate: Callable[[dict[str, Any]], None],
    body: Callable[[bytes], bytes] = lambda b: b,
) -> bytes:
    """Change the manifest and sign it again with a trusted key: only the
    reader's consistency checks stand between such a bundle and a device."""
    manifest, rest = split(bundle)
    mutate(manifest)
    data = canonical_json(manifest)
    sigs = encode_signatures(sign_manifest(data, [signer]))
    return pack_preamble(len(data), len(sigs)) + data + sigs + body(rest)


@pytest.fixture(scope="session")
def release() -> CryptoSigner:
    return signer_for(generate_private_key())


@pytest.fixture(scope="session")
def stranger() -> CryptoSigner:
    return signer_for(generate_private_key())


@pytest.fixture(scope="session")
def payload() -> bytes:
    return realistic_payload(600_000)


@pytest.fixture(scope="session")
def bundle(release: CryptoSigner, payload: bytes) -> bytes:
    """Two payloads (one with small chunks so it spans several index pages) and a hook."""
    return build(
        [release],
        {"rootfs": payload, "app": payload[:100_000]},
        hooks={"post-install": b"#!/bin/sh\nexit 0\n"},
    )


@pytest.fixture(scope="session")
def small_bundle(release: CryptoSigner) -> bytes:
    """A small bundle with many chunks and index pages, for exhaustive corruption tests."""
    return build(
        [release],
        {"rootfs": realistic_payload(5000, seed=3)},
        hooks={"health-check": b"#!/bin/sh\ntrue\n"},
        chunking=ChunkingParams.fixed(512),
        entries_per_page=4,
    )
