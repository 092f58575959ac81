"""Both object-store backends behind one ``store`` fixture, S3 on a real S3-protocol server.

The S3 backend talks HTTP to moto's standalone server on 127.0.0.1 (no
mocking of boto3): requests are signed, ranged, paginated and multipart for
real. The server runs in a thread of this process for the whole session;
each test gets a fresh bucket and fake credentials that are removed from the
environment afterwards.

Moto costs about 10 ms of CPU per request, so tests that need thousands of
objects *seed* them straight into the server's in-process state
(:func:`put_many`); what they test (listing, ``missing``) still goes over HTTP.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer

from skylift.hub.storage import LocalStore, ObjectStore, S3Store

#: The fake secret key: distinctive, so a test can prove it never leaks into a message.
SECRET_ACCESS_KEY = "SkyliftTestSecret0123456789abcdefNEVERSHOWN"
ACCESS_KEY_ID = "AKIASKYLIFTTESTING01"
REGION = "us-east-1"
#: Small parts so that a 20 MiB put_file goes up in four parts (S3's minimum part is 5 MiB).
MULTIPART_BYTES = 5 * 1024 * 1024
BACKENDS = ["local", "s3"]

_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 at a port the OS picked."""
    # Werkzeug logs every request at INFO; thousands of lines help nobody.
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug_log.setLevel(level)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials for this test only; no real AWS configuration is read."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    # Keep the developer's ~/.aws and the EC2 metadata service out of the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3_session() -> boto3.session.Session:
    """One boto3 session with fixed fake credentials, shared so that the S3 service
    model is loaded once rather than for each of ~70 stores (0.2 s each)."""
    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=REGION,
    )


@pytest.fixture(scope="session")
def _s3_admin(s3_endpoint: str, s3_session: boto3.session.Session) -> Any:
    """A plain boto3 client for test setup."""
    return s3_session.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def s3_bucket(s3_endpoint: str, _s3_admin: Any, aws_env: None) -> Iterator[str]:
    """A fresh, empty bucket, emptied and removed afterwards to free the server's memory.

    Only this bucket: moto's global reset would also wipe the state of any
    other moto server or mock that tests elsewhere run in this process.
    """
    name = f"skylift-test-{os.getpid()}-{next(_bucket_numbers)}"
    _s3_admin.create_bucket(Bucket=name)
    yield name
    _drop_bucket(name)


@pytest.fixture
def make_s3_store(
    s3_endpoint: str, s3_bucket: str, s3_session: boto3.session.Session
) -> Callable[..., S3Store]:
    """Build S3 stores on the test's bucket (prefix ``releases`` unless told otherwise)."""

    def make(**kwargs: Any) -> S3Store:
        options: dict[str, Any] = {
            "prefix": "releases",
            "endpoint_url": s3_endpoint,
            "region": REGION,
            "multipart_threshold_bytes": MULTIPART_BYTES,
            "multipart_chunksize_bytes": MULTIPART_BYTES,
            "session": s3_session,
        }
        options.update(kwargs)
        return S3Store(s3_bucket, **options)

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    return str(request.param)


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """A LocalStore in tmp_path, or an S3Store on a fresh bucket under a prefix."""
    if backend == "local":
        return LocalStore(tmp_path / "objects")
    make: Callable[..., S3Store] = request.getfixturevalue("make_s3_store")
    return make()


def raw_names(store: ObjectStore) -> list[str]:
    """Every name the backend holds, beneath the store's view: files (hidden ones too) or the whole bucket."""
    if isinstance(store, LocalStore):
        return sorted(
            str(Path(d, f).relative_to(store.root))
            for d, _, files in os.walk(store.root)
            for f in files
        )
    assert isinstance(store, S3Store)
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", ()))


@contextlib.contextmanager
def count_requests(store: ObjectStore) -> Iterator[Counter[str]]:
    """Count HTTP requests by S3 operation name (stays empty for a local store).

    ``before-send`` fires once per HTTP attempt, so retries would be counted too.
    """
    calls: Counter[str] = Counter()
    if not isinstance(store, S3Store):
        yield calls
        return
    lock = threading.Lock()  # multipart uploads send parts from worker threads

    def count(event_name: str, **_: Any) -> None:
        with lock:
            calls[event_name.rsplit(".", 1)[-1]] += 1

    events = store.client.meta.events
    events.register("before-send.s3", count)
    try:
        yield calls
    finally:
        events.unregister("before-send.s3", count)


def _moto_s3() -> Any:
    """moto's in-process S3 state, which the ThreadedMotoServer in this process serves."""
    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def _drop_bucket(name: str) -> None:
    """Remove a test bucket and free its objects' buffers, in microseconds rather than
    the seconds that deleting thousands of keys over HTTP takes."""
    backend = _moto_s3()
    bucket = backend.get_bucket(name)
    for key in bucket.keys.values():
        key.dispose()
    for upload in bucket.multiparts.values():
        upload.dispose()
    bucket.keys.clear()
    bucket.multiparts.clear()
    backend.delete_bucket(name)


def put_many(store: ObjectStore, items: dict[str, bytes]) -> None:
    """Store many small objects quickly: in parallel locally, seeded into moto for S3."""
    if isinstance(store, S3Store):
        # moto's own API on the server's state (ThreadedMotoServer shares this
        # process): 2,000 objects in milliseconds instead of 20 s of PUTs.
        backend = _moto_s3()
        for key, data in items.items():
            backend.put_object(store.bucket, store.prefix + key, data)
        return
    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in pool.map(lambda kv: store.put(*kv), items.items()):
            pass
