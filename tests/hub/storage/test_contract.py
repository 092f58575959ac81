"""The object-store contract: every test runs against the local directory and S3 alike."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from skylift.hub.storage import (
    InvalidKeyError,
    InvalidRangeError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectTooLargeError,
    StorageError,
)

from .conftest import MULTIPART_BYTES, count_requests, put_many, raw_names

KEY = "bundles/acme-gw/1.2.3.head"
RANGE_DATA = bytes(range(256)) * 40  # 10,240 bytes; every offset has a recognisable byte


def chunk_key(n: int) -> str:
    """A chunk key as the hub lays them out: chunks/ab/abcdef..."""
    digest = hashlib.sha256(n.to_bytes(4, "big")).hexdigest()
    return f"chunks/{digest[:2]}/{digest}"


# -- put and get --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"x", id="one-byte"),
        pytest.param(bytes(range(256)), id="all-byte-values"),
        pytest.param(b"\x00" * 4096, id="zeros"),
        pytest.param(b"\r\n\x1a\xff{}\n", id="text-lookalike"),
        pytest.param(random.Random(1).randbytes(300_000), id="300k-random"),
    ],
)
def test_put_get_round_trip(store: ObjectStore, data: bytes) -> None:
    store.put(KEY, data)
    assert store.get(KEY, max_bytes=len(data)) == data  # the bound is inclusive
    assert store.get(KEY, max_bytes=len(data) + 10_000) == data
    assert store.size(KEY) == len(data)
    assert store.exists(KEY)


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "/".join(["x" * 230] * 4 + ["y" * 100]),  # 1024 characters
        "metadata/1.root.json",
        "a.b/c-d_e/F0",
        ".hidden/..a/.../a..b",
        "/".join(["s"] * 100),
    ],
)
def test_valid_edge_keys_round_trip(store: ObjectStore, key: str) -> None:
    store.put(key, key.encode())
    assert store.get(key, max_bytes=2048) == key.encode()
    assert list(store.iter_keys()) == [key]


@pytest.mark.parametrize(
    ("first", "second"),
    [(b"old content", b"new"), (b"short", b"a much longer replacement"), (b"x", b"")],
)
def test_put_overwrites(store: ObjectStore, first: bytes, second: bytes) -> None:
    store.put(KEY, first)
    store.put(KEY, second)
    assert store.get(KEY, max_bytes=100) == second
    assert store.size(KEY) == len(second)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.get(KEY, max_bytes=100), id="get"),
        pytest.param(lambda s: s.get_range(KEY, 0, 1), id="get_range"),
        pytest.param(lambda s: s.get_range(KEY, 0, 0), id="get_range-empty"),
        pytest.param(lambda s: s.size(KEY), id="size"),
    ],
)
def test_missing_object_is_not_found(store: ObjectStore, call: Callable[[Any], object]) -> None:
    store.put("bundles/other", b"data")  # the store is not empty, just lacks this key
    with pytest.raises(ObjectNotFoundError, match="1.2.3.head"):
        call(store)
    assert not store.exists(KEY)


@pytest.mark.parametrize(("size", "max_bytes"), [(1000, 999), (1000, 0), (1, 0), (300_000, 65536)])
def test_get_refuses_oversized_object(store: ObjectStore, size: int, max_bytes: int) -> None:
    store.put(KEY, b"z" * size)
    too_large = pytest.raises(
        ObjectTooLargeError, match=rf"{size} bytes, more than the {max_bytes}"
    )
    with count_requests(store) as calls, too_large:
        store.get(KEY, max_bytes=max_bytes)
    # S3: one ranged GET whose reply states the size; no separate HEAD needed.
    assert calls["HeadObject"] == 0
    assert calls["GetObject"] <= 1


# -- ranges -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        pytest.param(0, 10, id="start"),
        pytest.param(5000, 1234, id="middle"),
        pytest.param(10_230, 10, id="end"),
        pytest.param(0, 10_240, id="whole"),
        pytest.param(10_239, 1, id="last-byte"),
        pytest.param(0, 0, id="zero-length-at-start"),
        pytest.param(777, 0, id="zero-length-inside"),
        pytest.param(10_240, 0, id="zero-length-at-end"),
    ],
)
def test_get_range_returns_exactly_those_bytes(
    store: ObjectStore, offset: int, length: int
) -> None:
    store.put(KEY, RANGE_DATA)
    assert store.get_range(KEY, offset, length) == RANGE_DATA[offset : offset + length]


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        pytest.param(10_235, 10, id="runs-past-end"),
        pytest.param(0, 10_241, id="one-byte-too-long"),
        pytest.param(10_240, 1, id="starts-at-end"),
        pytest.param(50_000, 1, id="starts-past-end"),
        pytest.param(10_241, 0, id="zero-length-past-end"),
        pytest.param(-1, 5, id="negative-offset"),
        pytest.param(0, -1, id="negative-length"),
    ],
)
def test_get_range_past_the_end_is_an_error(store: ObjectStore, offset: int, length: int) -> None:
    store.put(KEY, RANGE_DATA)
    with pytest.raises(InvalidRangeError, match="1.2.3.head"):
        store.get_range(KEY, offset, length)


def test_get_range_of_empty_object(store: ObjectStore) -> None:
    store.put(KEY, b"")
    assert store.get_range(KEY, 0, 0) == b""
    with pytest.raises(InvalidRangeError):
        store.get_range(KEY, 0, 1)


# -- existence, many keys at once ----------------------------------------------------


def test_exists_and_missing_over_2000_chunk_keys(store: ObjectStore, backend: str) -> None:
    present = [chunk_key(n) for n in range(2000)]
    absent = [chunk_key(n) for n in range(2000, 4000)]  # interleaved in the same chunks/xx/
    put_many(store, {k: k[-8:].encode() for k in present})

    with count_requests(store) as calls:
        assert store.missing([*present, *absent, *absent[:10]]) == set(absent)
    if backend == "s3":
        # Two pages of 1,000 names cover the store: far from one request per key.
        assert calls["HeadObject"] == 0
        assert 1 <= calls["ListObjectsV2"] <= 4, calls

    # Sparse: a few wanted keys scattered over a large store cost at most one request each.
    sparse = [present[0], present[1999], absent[5], "chunks/zz/none", "other/key"]
    with count_requests(store) as calls:
        assert store.missing(sparse) == {absent[5], "chunks/zz/none", "other/key"}
    assert sum(calls.values()) <= len(sparse)

    assert store.missing([]) == set()
    assert store.missing(iter(present[:3])) == set()
    assert store.missing([absent[0]]) == {absent[0]}
    assert store.exists(present[123])
    assert not store.exists(absent[123])


def test_missing_with_keys_outside_and_at_prefix_boundaries(store: ObjectStore) -> None:
    stored = ["a", "a-", "a.b", "a0", "ab/c", "b/a", "b/b", "metadata/root.json"]
    put_many(store, dict.fromkeys(stored, b"1"))
    asked = ["a", "a-", "a-b", "a.b", "a.c", "a0", "a00", "ab/c", "ab/d", "b/a", "b/c", "c"]
    assert store.missing(asked) == {"a-b", "a.c", "a00", "ab/d", "b/c", "c"}


# -- delete and list ------------------------------------------------------------------


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put(KEY, b"data")
    store.put("bundles/keep", b"kept")
    store.delete(KEY)
    store.delete(KEY)
    store.delete("never/stored")
    assert not store.exists(KEY)
    with pytest.raises(ObjectNotFoundError):
        store.get(KEY, max_bytes=10)
    assert list(store.iter_keys()) == ["bundles/keep"]


def test_iter_keys_is_sorted_and_filtered_by_prefix(store: ObjectStore) -> None:
    # '-' < '.' < '/' < '0' in ASCII: a directory walk must still list in S3's order.
    keys = ["A", "a-c", "a.x", "a/b", "a/c/d", "a0", "ab/c", "chunks/00/x", "chunks/0a/y"]
    put_many(store, dict.fromkeys(keys, b""))
    assert list(store.iter_keys()) == sorted(keys)
    assert list(store.iter_keys("")) == sorted(keys)
    assert list(store.iter_keys("a")) == ["a-c", "a.x", "a/b", "a/c/d", "a0", "ab/c"]
    assert list(store.iter_keys("a/")) == ["a/b", "a/c/d"]
    assert list(store.iter_keys("chunks/0")) == ["chunks/00/x", "chunks/0a/y"]
    assert list(store.iter_keys("chunks/0a/y")) == ["chunks/0a/y"]
    assert list(store.iter_keys("nothing/")) == []
    assert list(store.iter_keys("a/c/d/deeper")) == []


def test_iter_keys_pages_through_more_than_1000_keys(store: ObjectStore, backend: str) -> None:
    keys = {f"chunks/{n % 7:02x}/{n:06d}": b"" for n in range(2100)}
    keys["other/one"] = b""
    put_many(store, keys)
    with count_requests(store) as calls:
        listed = list(store.iter_keys("chunks/"))
    assert listed == sorted(k for k in keys if k.startswith("chunks/"))
    if backend == "s3":
        assert calls["ListObjectsV2"] == 3  # 1000 + 1000 + 100


# -- large files ----------------------------------------------------------------------


def test_put_file_streams_20_mib_and_ranges_read_back(
    store: ObjectStore, backend: str, tmp_path: Path
) -> None:
    size = 20 * 1024 * 1024
    data = random.Random(20).randbytes(size)
    source = tmp_path / "bundle.skb"
    source.write_bytes(data)

    with count_requests(store) as calls:
        store.put_file("bundles/big.skb", source)
    if backend == "s3":
        assert calls["CreateMultipartUpload"] == 1
        assert calls["UploadPart"] == size // MULTIPART_BYTES
        assert calls["CompleteMultipartUpload"] == 1

    assert store.size("bundles/big.skb") == size
    for offset, length in [
        (0, 4096),
        (MULTIPART_BYTES - 100, 200),  # across the first part boundary
        (3 * MULTIPART_BYTES + 12_345, 65_536),
        (size - 1000, 1000),
    ]:
        assert store.get_range("bundles/big.skb", offset, length) == data[offset : offset + length]
    with pytest.raises(InvalidRangeError):
        store.get_range("bundles/big.skb", size - 10, 11)
    with pytest.raises(ObjectTooLargeError):
        store.get("bundles/big.skb", max_bytes=size - 1)


def test_put_file_of_a_missing_source_is_a_storage_error(
    store: ObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(StorageError, match="no-such-file"):
        store.put_file(KEY, tmp_path / "no-such-file")
    assert not store.exists(KEY)


# -- invalid keys ----------------------------------------------------------------------

INVALID_KEYS = [
    pytest.param("../x", id="dotdot-first"),
    pytest.param("/x", id="leading-slash"),
    pytest.param("a//b", id="empty-segment"),
    pytest.param("a/./b", id="dot-segment"),
    pytest.param("a/../b", id="dotdot-segment"),
    pytest.param("a b", id="space"),
    pytest.param("x" * 1025, id="1025-chars"),
    pytest.param("", id="empty"),
    pytest.param("a/", id="trailing-slash"),
    pytest.param(".", id="dot"),
    pytest.param("..", id="dotdot"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("a\nb", id="newline"),
    pytest.param("caf\u00e9", id="non-ascii"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a?b", id="query-char"),
]

EVERY_METHOD: list[Any] = [
    pytest.param(lambda s, k, f: s.put(k, b"data"), id="put"),
    pytest.param(lambda s, k, f: s.put_file(k, f), id="put_file"),
    pytest.param(lambda s, k, f: s.get(k, max_bytes=100), id="get"),
    pytest.param(lambda s, k, f: s.get_range(k, 0, 1), id="get_range"),
    pytest.param(lambda s, k, f: s.size(k), id="size"),
    pytest.param(lambda s, k, f: s.exists(k), id="exists"),
    pytest.param(lambda s, k, f: s.missing(["good/key", k]), id="missing"),
    pytest.param(lambda s, k, f: s.delete(k), id="delete"),
]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_refused_by_every_method_and_nothing_is_written(
    store: ObjectStore, key: str, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"file data")
    for param in EVERY_METHOD:
        (call,) = param.values
        with pytest.raises(InvalidKeyError) as info:
            call(store, key, source)
        assert "\n" not in str(info.value), param.id
    assert raw_names(store) == []


@pytest.mark.parametrize("prefix", ["../", "/x", "a//", "a b", "a/./", "x/../y", "\u00e9"])
def test_invalid_list_prefixes_are_refused_at_the_call(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.iter_keys(prefix)  # refused before the first next()


# -- messages ---------------------------------------------------------------------------


def test_errors_are_one_line_naming_the_key(store: ObjectStore, tmp_path: Path) -> None:
    store.put(KEY, RANGE_DATA)
    failures: list[Callable[[], object]] = [
        lambda: store.get("bundles/absent", max_bytes=10),
        lambda: store.get(KEY, max_bytes=10),
        lambda: store.get_range(KEY, 10_000, 1000),
        lambda: store.size("bundles/absent"),
        lambda: store.put("bad key", b""),
        lambda: store.put_file(KEY, tmp_path / "absent-file"),
    ]
    for fail in failures:
        with pytest.raises(StorageError) as info:
            fail()
        err = info.value
        for text in (str(err), err.diagnostics()):
            assert "\n" not in text
            assert "SkyliftTestSecret" not in text
        assert any(name in str(err) for name in ("bundles/absent", KEY, "bad key", "absent-file"))


def test_describe_names_the_place(store: ObjectStore, backend: str) -> None:
    assert isinstance(store, ObjectStore)  # the Protocol is runtime-checkable
    text = store.describe()
    assert text.startswith("file:///" if backend == "local" else "s3://skylift-test-")
    assert "SkyliftTestSecret" not in text
