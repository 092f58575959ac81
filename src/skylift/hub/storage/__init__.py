"""Object storage for the hub: one port, a directory backend and an S3 backend.

Pick a backend with :func:`open_store` from the storage URL of ``hub.toml``
or ``--storage``:

- ``/var/lib/skylift/objects``, ``./objects`` or ``file:///var/lib/skylift/objects``:
  a local directory (:class:`LocalStore`), created if absent;
- ``s3://bucket/optional/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1``:
  an S3-compatible service (:class:`S3Store`); credentials come from the
  standard AWS environment and configuration, never from the URL.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from .base import (
    MAX_KEY_LENGTH,
    InvalidKeyError,
    InvalidRangeError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectTooLargeError,
    StorageError,
    validate_key,
    validate_prefix,
)
from .local import LocalStore

if TYPE_CHECKING:
    from .s3 import S3Store

__all__ = [
    "MAX_KEY_LENGTH",
    "InvalidKeyError",
    "InvalidRangeError",
    "LocalStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectTooLargeError",
    "S3Store",
    "StorageError",
    "open_store",
    "validate_key",
    "validate_prefix",
]

_URL_HINT = (
    "use a directory path, file:///absolute/path or s3://bucket/prefix?endpoint=URL&region=NAME"
)
# Anything that starts like "scheme:" is a URL; a directory whose name has a
# colon can still be given as ./name.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
# Bucket names as S3 defines them (3-63 characters); dots allowed for older buckets.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_S3_PARAMS = frozenset({"endpoint", "region"})


def __getattr__(name: str) -> object:
    # Importing boto3 takes a quarter of a second: load it when an S3 store is
    # first asked for, so that the embedded hub and the CLI never pay for it.
    if name == "S3Store":
        from .s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bad(url: str, why: str) -> StorageError:
    return StorageError(f"invalid storage URL {_safe_url(url)!r}: {why}", hint=_URL_HINT)


def _safe_url(url: str) -> str:
    """The URL without any user:password part, bounded, for messages."""
    shown = re.sub(r"//[^/@?#]*@", "//***@", url)
    return shown if len(shown) <= 200 else f"{shown[:197]}..."


def open_store(url: str) -> ObjectStore:
    """The object store a storage URL names.

    Raises:
        StorageError: the URL is malformed (unknown scheme, missing bucket,
            credentials in the URL, unknown query parameter), or the local
            directory cannot be created.
    """
    url = url.strip()
    if not url:
        raise _bad(url, "it is empty")
    if not _SCHEME.match(url):
        return LocalStore(Path(url))
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise _bad(url, "a file URL must name an absolute path (file:///path)")
        if parts.query or parts.fragment:
            raise _bad(url, "a file URL takes no query or fragment")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise _bad(url, "a file URL must name an absolute path (file:///path)")
        return LocalStore(Path(path))
    if scheme == "s3":
        return _open_s3(url)
    raise _bad(url, f"unknown scheme {scheme!r}")


def _open_s3(url: str) -> ObjectStore:
    from .s3 import S3Store

    if not url.lower().startswith("s3://"):
        raise _bad(url, "expected s3://bucket/prefix")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise _bad(url, "credentials do not belong in the URL; use the AWS environment or profile")
    bucket = parts.netloc
    if not bucket:
        raise _bad(url, "no bucket name")
    if not _BUCKET.fullmatch(bucket):
        raise _bad(url, f"{bucket!r} is not a valid bucket name")
    if parts.fragment:
        raise _bad(url, "an s3 URL takes no fragment")
    prefix = unquote(parts.path).strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except InvalidKeyError as e:
            raise _bad(url, "the key prefix is not a valid key") from e
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise _bad(url, "the query is malformed") from e
    unknown = set(query) - _S3_PARAMS
    if unknown:
        raise _bad(url, f"unknown parameter {sorted(unknown)[0]!r} (known: endpoint, region)")
    for name, values in query.items():
        if len(values) != 1 or not values[0]:
            raise _bad(url, f"parameter {name!r} must be given once, with a value")
    endpoint = query.get("endpoint", [None])[0]
    region = query.get("region", [None])[0]
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise _bad(url, "endpoint must be an http:// or https:// URL")
        if ep.username is not None or ep.password is not None:
            raise _bad(url, "credentials do not belong in the endpoint URL")
        if ep.query or ep.fragment:
            raise _bad(url, "endpoint must not have a query or fragment")
        try:
            ep.port  # noqa: B018 - urlsplit checks the port only when asked
        except ValueError as e:
            raise _bad(url, "endpoint has an invalid port") from e
    if region is not None and not re.fullmatch(r"[a-z0-9-]{1,64}", region):
        raise _bad(url, f"{region!r} is not a region name")
    return S3Store(bucket, prefix=prefix, endpoint_url=endpoint, region=region)
