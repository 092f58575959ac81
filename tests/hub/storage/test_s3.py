"""What only the S3 backend has to prove: bounded requests, prefixes, and errors from the wire."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from skylift.hub.storage import ObjectNotFoundError, S3Store, StorageError

from .conftest import SECRET_ACCESS_KEY, count_requests, put_many, raw_names

MakeStore = Callable[..., S3Store]


def assert_one_safe_line(err: BaseException) -> None:
    assert isinstance(err, StorageError)
    for text in (str(err), err.diagnostics()):
        assert "\n" not in text
        assert SECRET_ACCESS_KEY not in text
        assert SECRET_ACCESS_KEY[:12] not in text


def test_get_asks_only_for_max_bytes_plus_one(make_s3_store: MakeStore) -> None:
    store = make_s3_store()
    store.put("big", b"b" * 100_000)
    ranges: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        ranges.append(params.get("Range", "<none>"))

    store.client.meta.events.register("provide-client-params.s3.GetObject", record)
    with pytest.raises(StorageError, match="100000 bytes"):
        store.get("big", max_bytes=1000)
    assert store.get("big", max_bytes=100_000) == b"b" * 100_000
    # The server can send no more than the bound plus one byte, whatever the object's size.
    assert ranges == ["bytes=0-1000", "bytes=0-100000"]


def test_get_of_an_empty_object_retries_without_a_range(make_s3_store: MakeStore) -> None:
    store = make_s3_store()
    store.put("empty", b"")
    with count_requests(store) as calls:
        assert store.get("empty", max_bytes=0) == b""
    assert calls["GetObject"] == 2  # S3 answers 416 to any range of an empty object


def test_prefix_is_applied_to_every_key_and_separates_stores(make_s3_store: MakeStore) -> None:
    releases = make_s3_store(prefix="releases")
    staging = make_s3_store(prefix="/staging/eu/")  # slashes around a prefix do not matter
    bare = make_s3_store(prefix="")
    releases.put("chunks/ab/abc", b"1")
    staging.put("chunks/ab/abc", b"2")
    bare.put("top", b"3")
    assert raw_names(bare) == ["releases/chunks/ab/abc", "staging/eu/chunks/ab/abc", "top"]
    assert list(releases.iter_keys()) == ["chunks/ab/abc"]
    assert list(staging.iter_keys()) == ["chunks/ab/abc"]
    assert staging.get("chunks/ab/abc", max_bytes=1) == b"2"
    assert list(bare.iter_keys("re")) == ["releases/chunks/ab/abc"]
    assert releases.missing(["chunks/ab/abc", "top"]) == {"top"}
    assert staging.prefix == "staging/eu/"
    # Without a prefix, one-character keys list from the very start of the bucket.
    assert bare.missing(["a", "top", "z"]) == {"a", "z"}


def test_listing_skips_names_that_are_not_keys(make_s3_store: MakeStore) -> None:
    store = make_s3_store()
    put_many(store, {"good/key": b"", "dir-marker/": b"", "with space": b"", "a//b": b""})
    assert list(store.iter_keys()) == ["good/key"]


def test_missing_never_costs_more_requests_than_keys(make_s3_store: MakeStore) -> None:
    store = make_s3_store()
    put_many(store, {f"chunks/{n:04d}": b"" for n in range(1100)})
    # Wanted keys far apart in a large listing: each costs one request, never a page walk.
    wanted = [f"chunks/{n:04d}" for n in (5, 550, 1099)] + ["chunks/5000", "zzz"]
    with count_requests(store) as calls:
        assert store.missing(wanted) == {"chunks/5000", "zzz"}
    assert sum(calls.values()) <= len(wanted)
    # Dense wanted keys: one page of 1,000 names settles 500 of them.
    with count_requests(store) as calls:
        assert store.missing(f"chunks/{n:04d}" for n in range(0, 1100, 2)) == set()
    assert calls["ListObjectsV2"] == 2


def test_a_missing_bucket_is_a_storage_error_not_a_missing_object(
    make_s3_store: MakeStore, tmp_path: Path
) -> None:
    store = make_s3_store()
    store_elsewhere = S3Store(
        "no-such-bucket-here", endpoint_url=store.client.meta.endpoint_url, region="us-east-1"
    )
    source = tmp_path / "source"
    source.write_bytes(b"x" * 100)
    for call in (
        lambda: store_elsewhere.put("k", b"x"),
        lambda: store_elsewhere.put_file("k", source),
        lambda: store_elsewhere.get("k", max_bytes=10),
        lambda: store_elsewhere.missing(["a", "b"]),
        lambda: list(store_elsewhere.iter_keys()),
    ):
        with pytest.raises(StorageError, match="NoSuchBucket") as info:
            call()
        assert not isinstance(info.value, ObjectNotFoundError)
        assert "create the bucket" in info.value.diagnostics()
        assert_one_safe_line(info.value)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections (bound, never listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_an_unreachable_endpoint_fails_fast_in_one_line(aws_env: None, closed_port: int) -> None:
    store = S3Store(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{closed_port}",
        region="us-east-1",
        connect_timeout_s=1,
        max_retries=0,
    )
    for call in (
        lambda: store.put("k", b"x"),
        lambda: store.exists("k"),
        lambda: store.get_range("k", 0, 1),
        lambda: list(store.iter_keys()),
    ):
        with pytest.raises(StorageError, match="EndpointConnectionError") as info:
            call()
        assert_one_safe_line(info.value)
        assert f"127.0.0.1:{closed_port}" in str(info.value)


def test_client_has_bounded_timeouts_and_retries(make_s3_store: MakeStore) -> None:
    config = make_s3_store().client.meta.config
    assert config.connect_timeout == 5.0
    assert config.read_timeout == 30.0
    # botocore counts the first request too: three retries are four attempts.
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}
    assert config.s3["addressing_style"] == "path"


def test_describe_names_bucket_prefix_and_endpoint(make_s3_store: MakeStore) -> None:
    store = make_s3_store(prefix="releases/v1")
    text = store.describe()
    assert text.startswith("s3://skylift-test-")
    assert "/releases/v1/ at http://127.0.0.1:" in text
    assert SECRET_ACCESS_KEY not in text and SECRET_ACCESS_KEY not in repr(store)


def test_missing_credentials_say_what_to_set(
    s3_endpoint: str, s3_bucket: str, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3Store(s3_bucket, endpoint_url=s3_endpoint, region="us-east-1")
    with pytest.raises(StorageError, match="NoCredentialsError") as info:
        store.put("k", b"x")
    assert "AWS_ACCESS_KEY_ID" in info.value.diagnostics()
    assert_one_safe_line(info.value)


def test_describe_never_shows_userinfo_of_an_endpoint(aws_env: None) -> None:
    store = S3Store("bucket", endpoint_url="http://user:hunter2@127.0.0.1:9000", region="x-1")
    assert store.describe() == "s3://bucket/ at http://127.0.0.1:9000 (x-1)"
