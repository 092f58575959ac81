"""Bad bundles: every corruption, truncation and forgery is refused with its own error.

The fault matrix of the bundle parser: truncation, bit flip, oversize,
wrong key, unknown version, and validly signed manifests that lie.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner

from skylift.bundle import (
    BundleError,
    ChunkDigestError,
    CorruptIndexError,
    Limits,
    ManifestError,
    NotABundleError,
    PayloadDigestError,
    PayloadSizeError,
    SectionTooLargeError,
    SignatureError,
    TrailingDataError,
    TruncatedBundleError,
    TrustedKeys,
    UnsafePayloadNameError,
    UnsupportedFormatError,
    read_body,
    read_head,
)
from skylift.bundle.format import PREAMBLE_SIZE
from skylift.errors import SkyliftError

from .conftest import forge, split


def read_fully(data: bytes, signer: CryptoSigner, limits: Limits | None = None) -> int:
    """Read and verify a whole bundle; returns the number of events."""
    stream = io.BytesIO(data)
    head = read_head(stream, limits=limits)
    head.verify(TrustedKeys((signer.public_key,)))
    return sum(1 for _ in read_body(stream, head, limits=limits))


def _flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def _other_hex(data: bytes, pos: int) -> bytes:
    """Another hex digit at ``pos`` (a flipped bit can leave hex: 'a' ^ 1 is '`')."""
    b = bytearray(data)
    assert chr(b[pos]) in "0123456789abcdef", "not a hex digit"
    b[pos] = ord("1") if b[pos] == ord("0") else ord("0")
    return bytes(b)


def _set_u32(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack(">I", value) + data[offset + 4 :]


def _sig_offset(b: bytes) -> int:
    return PREAMBLE_SIZE + struct.unpack(">I", b[12:16])[0]


def _upper_sig(b: bytes) -> bytes:
    """Same signature, hex in capitals: bytes.fromhex would accept it; the reader must not."""
    start = _sig_offset(b)
    end = start + struct.unpack(">I", b[16:20])[0]
    return (
        b[:start]
        + b[start:end]
        .replace(b'"sig":"', b'"sig":"')
        .upper()
        .replace(b'"SIGNATURES":[{"KEYID":"', b'"signatures":[{"keyid":"')
        .replace(b'","SIG":"', b'","sig":"')
        + b[end:]
    )


def _payload(m: dict[str, Any], name: str = "rootfs") -> dict[str, Any]:
    return next(p for p in m["payloads"] if p["name"] == name)


def test_the_fixture_reads(bundle: bytes, small_bundle: bytes, release: CryptoSigner) -> None:
    assert read_fully(bundle, release) > 5
    assert read_fully(small_bundle, release) > 5


# (name, how to damage the real bundle, the error a reader must raise)
RAW_CASES: list[tuple[str, Callable[[bytes], bytes], type[BundleError]]] = [
    ("empty file", lambda b: b"", TruncatedBundleError),
    ("not a bundle", lambda b: b"PK\x03\x04" + b[4:], NotABundleError),
    ("truncated preamble", lambda b: b[: PREAMBLE_SIZE - 1], TruncatedBundleError),
    ("truncated manifest", lambda b: b[: PREAMBLE_SIZE + 10], TruncatedBundleError),
    ("truncated in the middle", lambda b: b[: len(b) // 2], TruncatedBundleError),
    ("last byte missing", lambda b: b[:-1], TruncatedBundleError),
    ("trailing data", lambda b: b + b"\0", TrailingDataError),
    ("unknown format version", lambda b: _set_u32(b, 8, 2), UnsupportedFormatError),
    ("oversized manifest", lambda b: _set_u32(b, 12, 2 << 20), SectionTooLargeError),
    ("oversized signatures", lambda b: _set_u32(b, 16, 1 << 20), SectionTooLargeError),
    ("zero-length manifest", lambda b: _set_u32(b, 12, 0), SectionTooLargeError),
    ("manifest byte flipped", lambda b: _flip(b, PREAMBLE_SIZE + 30), SignatureError),
    ("signature keyid changed", lambda b: _other_hex(b, _sig_offset(b) + 40), SignatureError),
    ("signature hex upper-cased", lambda b: _upper_sig(b), ManifestError),
    ("chunk byte flipped", lambda b: _flip(b, len(b) - 100), ChunkDigestError),
]


@pytest.mark.parametrize(
    ("mutate", "error"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES]
)
def test_damaged_bundles(
    bundle: bytes, release: CryptoSigner, mutate: Callable[[bytes], bytes], error: type[BundleError]
) -> None:
    with pytest.raises(error) as info:
        read_fully(mutate(bundle), release)
    line = info.value.diagnostics()
    assert "\n" not in line and len(line) < 300


def test_wrong_key(bundle: bytes, stranger: CryptoSigner) -> None:
    with pytest.raises(SignatureError, match="0 valid signature"):
        read_fully(bundle, stranger)


def test_signature_of_another_manifest(bundle: bytes, release: CryptoSigner) -> None:
    """A valid signature moved onto a changed manifest does not verify."""
    _, rest = split(bundle)
    other = forge(bundle, release, lambda m: m.update(version="9.9.9"))
    mlen = struct.unpack(">I", other[12:16])[0]
    sigs = bundle[_sig_offset(bundle) : _sig_offset(bundle) + struct.unpack(">I", bundle[16:20])[0]]
    spliced = (
        _set_u32(other[:PREAMBLE_SIZE], 16, len(sigs))
        + other[PREAMBLE_SIZE : PREAMBLE_SIZE + mlen]
        + sigs
        + rest
    )
    with pytest.raises(SignatureError):
        read_fully(spliced, release)


# Manifests signed by the trusted key that lie about the body: the reader's
# own consistency checks must catch them.
FORGED: list[tuple[str, Callable[[dict[str, Any]], None], type[BundleError]]] = [
    (
        "payload longer than declared",
        lambda m: _payload(m).update(size=_payload(m)["size"] - 1),
        PayloadSizeError,
    ),
    (
        "payload shorter than declared",
        lambda m: _payload(m).update(size=_payload(m)["size"] + 1),
        PayloadSizeError,
    ),
    (
        "fewer chunks declared",
        lambda m: _payload(m).update(chunks=_payload(m)["chunks"] - 1),
        PayloadSizeError,
    ),
    ("whole-payload digest", lambda m: _payload(m).update(sha256="0" * 64), PayloadDigestError),
    (
        "index digest",
        lambda m: _payload(m)["index"].update(first_page_sha256="1" * 64),
        CorruptIndexError,
    ),
    ("hook digest", lambda m: m["hooks"][0].update(sha256="2" * 64), PayloadDigestError),
    (
        "name escapes a directory",
        lambda m: _payload(m).update(name="../../etc/passwd"),
        UnsafePayloadNameError,
    ),
    ("name with a slash", lambda m: _payload(m).update(name="a/b"), UnsafePayloadNameError),
    ("unknown field", lambda m: m.update(extra=1), ManifestError),
    ("unknown payload type", lambda m: _payload(m).update(type="iso9660"), ManifestError),
    ("negative size", lambda m: _payload(m).update(size=-5), ManifestError),
    ("size as a string", lambda m: _payload(m).update(size="5"), ManifestError),
    ("no hardware", lambda m: m.update(compatible=[]), ManifestError),
    ("bad version string", lambda m: m.update(version="1.0; rm -rf /"), ManifestError),
    ("manifest format 2", lambda m: m.update(format=2), ManifestError),
    ("huge chunk size", lambda m: _payload(m)["chunking"].update(max_size=1 << 30), ManifestError),
    ("duplicate payload", lambda m: m["payloads"].append(dict(_payload(m))), ManifestError),
    ("page count", lambda m: _payload(m)["index"].update(pages=7), ManifestError),
    ("format true, not 1", lambda m: m.update(format=True), ManifestError),
    ("unpadded created time", lambda m: m.update(created="2026-1-5T1:2:3Z"), ManifestError),
    (
        "stored size",
        lambda m: _payload(m).update(stored_size=_payload(m)["stored_size"] + 1),
        PayloadSizeError,
    ),
]


@pytest.mark.parametrize(("mutate", "error"), [c[1:] for c in FORGED], ids=[c[0] for c in FORGED])
def test_signed_but_inconsistent_manifests(
    bundle: bytes,
    release: CryptoSigner,
    mutate: Callable[[dict[str, Any]], None],
    error: type[BundleError],
) -> None:
    with pytest.raises(error):
        read_fully(forge(bundle, release, mutate), release)


def test_non_canonical_manifest_is_refused(bundle: bytes, release: CryptoSigner) -> None:
    import json

    from skylift.bundle.format import pack_preamble
    from skylift.bundle.signature import encode_signatures, sign_manifest

    m, rest = split(bundle)
    data = json.dumps(m, indent=1).encode()  # same content, other bytes
    sigs = encode_signatures(sign_manifest(data, [release]))
    with pytest.raises(ManifestError, match="canonical"):
        read_fully(pack_preamble(len(data), len(sigs)) + data + sigs + rest, release)


def test_limits_are_the_readers(bundle: bytes, release: CryptoSigner) -> None:
    with pytest.raises(SectionTooLargeError, match="limit is 100"):
        read_fully(bundle, release, Limits(max_manifest_bytes=100))


def test_every_single_bit_flip_is_detected(small_bundle: bytes, release: CryptoSigner) -> None:
    """Exhaustive over every byte (one bit each): no byte of a bundle is unauthenticated."""
    for pos in range(len(small_bundle)):
        bad = _flip(small_bundle, pos, pos % 8)
        with pytest.raises(BundleError):
            read_fully(bad, release)


def test_every_truncation_is_detected(small_bundle: bytes, release: CryptoSigner) -> None:
    for cut in range(len(small_bundle)):
        with pytest.raises(TruncatedBundleError):
            read_fully(small_bundle[:cut], release)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_corruptions_never_pass(
    data: st.DataObject, bundle: bytes, release: CryptoSigner
) -> None:
    """Random flips, overwrites, insertions and deletions anywhere in a real bundle."""
    b = bytearray(bundle)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        pos = data.draw(st.integers(0, len(b) - 1), label="position")
        kind = data.draw(st.sampled_from(["flip", "overwrite", "insert", "delete"]), label="kind")
        if kind == "flip":
            b[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "overwrite":
            new = data.draw(st.integers(0, 255))
            if new == b[pos]:
                new ^= 0xFF
            b[pos] = new
        elif kind == "insert":
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
        else:
            del b[pos : pos + data.draw(st.integers(1, 64))]
    if bytes(b) == bundle:
        return
    with pytest.raises(SkyliftError) as info:
        read_fully(bytes(b), release)
    assert isinstance(info.value, BundleError)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(min_value=0))
def test_random_truncations_never_pass(cut: int, bundle: bytes, release: CryptoSigner) -> None:
    with pytest.raises(TruncatedBundleError):
        read_fully(bundle[: cut % len(bundle)], release)
