"""Storage URLs: which backend each one opens, and one-line refusals of bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from skylift.hub.storage import LocalStore, S3Store, StorageError, open_store

from .conftest import REGION


@pytest.mark.parametrize(
    ("url", "relative_root"),
    [
        pytest.param("{tmp}/objects", "objects", id="absolute-path"),
        pytest.param("objects/here", "objects/here", id="relative-path"),
        pytest.param("./odd:name", "odd:name", id="relative-path-with-colon"),
        pytest.param("file://{tmp}/objects", "objects", id="file-url"),
        pytest.param("file://localhost{tmp}/objects", "objects", id="file-url-localhost"),
        pytest.param("file://{tmp}/with%20space", "with space", id="file-url-escaped"),
        pytest.param("  {tmp}/objects  ", "objects", id="surrounding-blanks"),
    ],
)
def test_paths_open_a_local_store_and_create_it(
    url: str, relative_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store(url.replace("{tmp}", str(tmp_path)))
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / relative_root).resolve()
    assert store.root.is_dir()


@pytest.mark.parametrize(
    ("url", "bucket", "prefix", "endpoint", "region"),
    [
        ("s3://my-bucket", "my-bucket", "", None, None),
        ("s3://my-bucket/", "my-bucket", "", None, None),
        ("s3://my-bucket/releases", "my-bucket", "releases/", None, None),
        ("s3://my.bucket/a/b/", "my.bucket", "a/b/", None, None),
        (
            "s3://my-bucket/p?endpoint=http://127.0.0.1:9000&region=eu-west-1",
            "my-bucket",
            "p/",
            "http://127.0.0.1:9000",
            "eu-west-1",
        ),
        (
            "s3://bkt?endpoint=https://minio.example.com/s3-gateway",
            "bkt",
            "",
            "https://minio.example.com/s3-gateway",
            None,
        ),
        ("S3://bkt?region=us-east-1", "bkt", "", None, "us-east-1"),
    ],
)
def test_s3_urls_open_an_s3_store(
    aws_env: None,
    url: str,
    bucket: str,
    prefix: str,
    endpoint: str | None,
    region: str | None,
) -> None:
    store = open_store(url)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == (bucket, prefix)
    assert store.client.meta.endpoint_url.startswith(endpoint or "https://")
    if region:
        assert store.client.meta.region_name == region
    assert store.describe().startswith(f"s3://{bucket}/{prefix}")


BAD_URLS = [
    pytest.param("", "empty", id="empty"),
    pytest.param("   ", "empty", id="blank"),
    pytest.param("gs://bucket/x", "unknown scheme 'gs'", id="unknown-scheme"),
    pytest.param("https://s3.amazonaws.com/bucket", "unknown scheme 'https'", id="http-url"),
    pytest.param("s3:bucket", "expected s3://", id="s3-without-slashes"),
    pytest.param("s3://", "no bucket", id="no-bucket"),
    pytest.param("s3:///prefix", "no bucket", id="empty-bucket"),
    pytest.param("s3://Bad_Bucket", "not a valid bucket name", id="bad-bucket"),
    pytest.param("s3://ab", "not a valid bucket name", id="short-bucket"),
    pytest.param("s3://bucket:9000/x", "not a valid bucket name", id="port-on-bucket"),
    pytest.param("s3://AKIAXXX:hunter2secret@bucket/x", "credentials", id="credentials"),
    pytest.param("s3://bucket/a//b", "prefix", id="empty-prefix-segment"),
    pytest.param("s3://bucket/../x", "prefix", id="dotdot-prefix"),
    pytest.param("s3://bucket/x#frag", "fragment", id="fragment"),
    pytest.param("s3://bucket?endpoint=ftp://host", "http://", id="ftp-endpoint"),
    pytest.param("s3://bucket?endpoint=127.0.0.1:9000", "http://", id="endpoint-no-scheme"),
    pytest.param(
        "s3://bucket?endpoint=http://user:hunter2secret@host:9000",
        "credentials",
        id="endpoint-creds",
    ),
    pytest.param("s3://bucket?endpoint=http://host:99999", "port", id="endpoint-bad-port"),
    pytest.param("s3://bucket?endpoint=http://host?x=1", "query", id="endpoint-query"),
    pytest.param("s3://bucket?regoin=eu-west-1", "unknown parameter 'regoin'", id="typo"),
    pytest.param("s3://bucket?region=", "with a value", id="empty-region"),
    pytest.param("s3://bucket?region=a&region=b", "once", id="repeated-region"),
    pytest.param("s3://bucket?region=EU WEST", "not a region", id="bad-region"),
    pytest.param("s3://bucket?endpoint", "malformed", id="endpoint-without-value"),
    pytest.param("file://relative/path", "absolute path", id="file-relative"),
    pytest.param("file:///srv/objects?x=1", "no query", id="file-query"),
]


@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_bad_urls_are_refused_in_one_line(aws_env: None, url: str, why: str) -> None:
    with pytest.raises(StorageError) as info:
        open_store(url)
    err = info.value
    assert why in str(err)
    for text in (str(err), err.diagnostics()):
        assert "\n" not in text
        assert "hunter2secret" not in text
    assert "s3://bucket" in err.diagnostics()  # the hint shows the accepted forms


def test_an_s3_url_reads_credentials_from_the_environment(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/via-url?endpoint={s3_endpoint}&region={REGION}")
    store.put("metadata/1.root.json", b"{}")
    assert store.get("metadata/1.root.json", max_bytes=2) == b"{}"
    assert store.missing(["metadata/1.root.json", "metadata/2.root.json"]) == {
        "metadata/2.root.json"
    }
