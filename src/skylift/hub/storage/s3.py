"""The object store on any S3-compatible service: AWS S3, MinIO, Ceph RGW, Garage.

One boto3 client per store (boto3 clients are thread-safe, sessions are
not), with bounded timeouts and retries so that a hung endpoint fails a
request in seconds instead of holding a hub worker for ever. Credentials come
from the standard AWS chain (environment, shared config, instance role) and
never from the store URL, so they can never show up in a message or a log.

Every botocore and boto3 error is translated here into the
:class:`~.base.StorageError` family. Messages are built from the error code
and HTTP status only, never from the server's free text or the request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from .base import (
    InvalidKeyError,
    InvalidRangeError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageError,
    check_range,
    quote_key,
    validate_key,
    validate_prefix,
)

__all__ = ["S3Store"]

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_HINTS = {
    "NoSuchBucket": "create the bucket or fix the bucket name in the storage URL",
    "AccessDenied": "check the AWS credentials and the bucket policy",
    "403": "check the AWS credentials and the bucket policy",
    "InvalidAccessKeyId": "check the AWS credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE)",
    "SignatureDoesNotMatch": "check the AWS secret key and the region",
    "AuthorizationHeaderMalformed": "check the region in the storage URL",
    "PermanentRedirect": "set the bucket's region in the storage URL (?region=...)",
    "301": "set the bucket's region in the storage URL (?region=...)",
    "SlowDown": "the store is throttling requests; retry later",
    "503": "the store is unavailable or throttling; retry later",
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
    "PartialCredentialsError": "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "EndpointConnectionError": "check the endpoint in the storage URL and that the store is up",
    "ConnectTimeoutError": "check the endpoint in the storage URL and that the store is up",
    "ReadTimeoutError": "the store is slow to answer; retry later",
}
_DEFAULT_HINT = "check the storage URL, the network and the store's health"
_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
)
# One list page: the S3 maximum, so a prefix costs as few requests as possible.
_LIST_PAGE_KEYS = 1000


class S3Store:
    """Objects in one bucket of an S3-compatible service, optionally under a key prefix."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_retries: int = 3,
        max_pool_connections: int = 32,
        multipart_threshold_bytes: int = 64 * 1024 * 1024,
        multipart_chunksize_bytes: int = 16 * 1024 * 1024,
        session: boto3.session.Session | None = None,
    ) -> None:
        """Connect lazily to ``bucket`` (no request is made here).

        ``prefix`` is prepended to every key (``"releases"`` stores key ``a``
        as ``releases/a``). ``endpoint_url`` selects a non-AWS service; it
        must not carry credentials. Each request is retried at most
        ``max_retries`` times (standard mode: throttling, 5xx, connection
        errors, with jittered back-off). ``session`` is the boto3 session to make
        the client from (a profile, explicit credentials, or one shared to
        save the ~0.1 s of loading the service model); by default a new one
        that reads the standard AWS environment and configuration.

        Raises:
            StorageError: invalid prefix or client configuration.
        """
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidKeyError as e:
                raise StorageError(
                    f"invalid key prefix {quote_key(prefix)} for bucket {bucket}"
                ) from e
        self._bucket = bucket
        self._prefix = f"{prefix}/" if prefix else ""
        self._endpoint_url = endpoint_url
        self._region = region
        s3_options: dict[str, Any] = {}
        checksums: dict[str, str] = {}
        if endpoint_url is not None:
            # MinIO, Ceph RGW and Garage all serve path-style requests; virtual
            # hosts need DNS set up per bucket, which a local service rarely has.
            s3_options["addressing_style"] = "path"
            # boto3 >= 1.36 sends new checksum headers by default that several
            # S3-compatible services reject (boto/boto3#4392). Integrity does not
            # depend on them: chunks are content-addressed, metadata is signed.
            checksums = {
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            }
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # botocore's "max_attempts" counts retries after the first request.
            retries={"max_attempts": max_retries, "mode": "standard"},
            max_pool_connections=max_pool_connections,
            s3=s3_options,
            **checksums,
        )
        try:
            # A session of its own: the default session is shared and not thread-safe.
            session = session or boto3.session.Session()
            self._client: Any = session.client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        except (botocore.exceptions.BotoCoreError, ValueError) as e:
            raise StorageError(
                f"cannot configure the S3 client for {self.describe()}: {type(e).__name__}"
            ) from e
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold_bytes,
            multipart_chunksize=multipart_chunksize_bytes,
            # Parts go up in parallel, but few: the hub already calls from a thread pool.
            max_concurrency=4,
        )

    @property
    def client(self) -> Any:
        """The boto3 S3 client, for event hooks (metrics, tests); do not change its config."""
        return self._client

    @property
    def bucket(self) -> str:
        """The bucket name."""
        return self._bucket

    @property
    def prefix(self) -> str:
        """The key prefix, ``""`` or ending in ``/``."""
        return self._prefix

    def describe(self) -> str:
        """``s3://bucket/prefix`` and, if not AWS, the endpoint (no credentials)."""
        where = f"s3://{self._bucket}/{self._prefix}"
        if self._endpoint_url:
            where += f" at {_without_userinfo(self._endpoint_url)}"
        if self._region:
            where += f" ({self._region})"
        return where

    def __repr__(self) -> str:
        return f"S3Store({self.describe()!r})"

    # -- errors and keys ---------------------------------------------------------

    def _name(self, key: str) -> str:
        """The S3 object name of a validated key."""
        return self._prefix + validate_key(key)

    def _fail(self, action: str, key: str, e: Exception) -> NoReturn:
        """Translate a boto3/botocore error into the storage family, naming the key."""
        code, status = _error_code(e)
        where = f"object {quote_key(key)} in {self.describe()}"
        if code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
            raise ObjectNotFoundError(f"no {where}") from e
        if code in ("InvalidRange", "416"):
            raise InvalidRangeError(f"cannot {action} {where}: range not satisfiable") from e
        detail = f"{code} (HTTP {status})" if status else code
        raise StorageError(
            f"cannot {action} {where}: {detail}",
            hint=_HINTS.get(code) or _HINTS.get(str(status), _DEFAULT_HINT),
        ) from e

    # -- the port ------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (a single PUT is atomic on S3).

        Raises:
            InvalidKeyError: bad key.
            StorageError: the request failed.
        """
        name = self._name(key)
        try:
            self._client.put_object(Bucket=self._bucket, Key=name, Body=data)
        except _ERRORS as e:
            self._fail("put", key, e)

    def put_file(self, key: str, path: Path) -> None:
        """Upload the file at ``path``, in parts above the multipart threshold.

        A multipart upload becomes visible only when completed, so it is as
        atomic as :meth:`put`; a failed one is aborted by boto3.

        Raises:
            InvalidKeyError: bad key.
            StorageError: ``path`` cannot be read, or the upload failed.
        """
        name = self._name(key)
        if not Path(path).is_file():
            raise StorageError(
                f"cannot read {path} to store as object {quote_key(key)}: not a file"
            )
        try:
            self._client.upload_file(str(path), self._bucket, name, Config=self._transfer)
        except OSError as e:
            raise StorageError(
                f"cannot read {path} to store as object {quote_key(key)}: {e.strerror or e}"
            ) from e
        except _ERRORS as e:
            self._fail("upload", key, e)

    def get(self, key: str, *, max_bytes: int) -> bytes:
        """The whole object, refused if larger than ``max_bytes``.

        One ranged GET for the first ``max_bytes + 1`` bytes: the reply's
        Content-Range tells the full size before the body is read, and the
        transfer is bounded even if the object is huge.

        Raises:
            InvalidKeyError: bad key.
            ObjectNotFoundError: no such object.
            ObjectTooLargeError: larger than ``max_bytes``.
            StorageError: the request failed.
        """
        name = self._name(key)
        if max_bytes < 0:
            raise ObjectTooLargeError(f"object {quote_key(key)} is larger than {max_bytes} bytes")
        try:
            reply = self._client.get_object(
                Bucket=self._bucket, Key=name, Range=f"bytes=0-{max_bytes}"
            )
        except botocore.exceptions.ClientError as e:
            if _error_code(e)[0] != "InvalidRange":
                self._fail("get", key, e)
            # S3 answers 416 to any range on an empty object: fetch it plainly.
            try:
                reply = self._client.get_object(Bucket=self._bucket, Key=name)
            except _ERRORS as e2:
                self._fail("get", key, e2)
        except _ERRORS as e:
            self._fail("get", key, e)
        body = reply["Body"]
        try:
            total = _total_size(reply)
            if total > max_bytes:
                raise ObjectTooLargeError(
                    f"object {quote_key(key)} is {total} bytes, more than the {max_bytes} allowed"
                )
            try:
                data: bytes = body.read(max_bytes + 1)
            except _ERRORS as e:
                self._fail("get", key, e)
        finally:
            body.close()
        if len(data) != total:
            raise StorageError(
                f"cannot get object {quote_key(key)}: got {len(data)} of its {total} bytes",
                hint=_DEFAULT_HINT,
            )
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset`` (``Range: bytes=a-b``).

        S3 shortens a range that runs past the end instead of refusing it;
        the reply is checked so that a short read is an error, not data.

        Raises:
            InvalidKeyError: bad key.
            ObjectNotFoundError: no such object.
            InvalidRangeError: negative values or past the end.
            StorageError: the request failed.
        """
        name = self._name(key)
        check_range(key, offset, length)
        if length == 0:
            # HTTP cannot express an empty range; the size answers the question.
            size = self.size(key)
            if offset > size:
                raise InvalidRangeError(
                    f"offset {offset} is past the end of object {quote_key(key)} ({size} bytes)"
                )
            return b""
        try:
            reply = self._client.get_object(
                Bucket=self._bucket, Key=name, Range=f"bytes={offset}-{offset + length - 1}"
            )
        except _ERRORS as e:
            self._fail("read a range of", key, e)
        body = reply["Body"]
        try:
            try:
                data: bytes = body.read(length + 1)
            except _ERRORS as e:
                self._fail("read a range of", key, e)
        finally:
            body.close()
        if len(data) != length:
            raise InvalidRangeError(
                f"range {offset}+{length} reaches past the end of object {quote_key(key)}"
                f" ({_total_size(reply)} bytes)"
            )
        return data

    def size(self, key: str) -> int:
        """Size in bytes (one HEAD).

        Raises:
            InvalidKeyError: bad key.
            ObjectNotFoundError: no such object.
            StorageError: the request failed.
        """
        name = self._name(key)
        try:
            reply = self._client.head_object(Bucket=self._bucket, Key=name)
        except _ERRORS as e:
            self._fail("stat", key, e)
        return int(reply["ContentLength"])

    def exists(self, key: str) -> bool:
        """Whether the object exists (one HEAD).

        Without ListBucket permission S3 answers 403, not 404, for an absent
        key; that is reported as an error rather than guessed to be "absent".

        Raises:
            InvalidKeyError: bad key.
            StorageError: the request failed.
        """
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    def missing(self, keys: Iterable[str]) -> set[str]:
        """The keys with no object, found by listing instead of one HEAD per key.

        The sorted keys are resolved by ListObjectsV2 pages that start just
        before the first unresolved key (``StartAfter``): a page settles every
        wanted key up to its last listed name, and gaps with no wanted key are
        skipped rather than paged through. Each request settles at least one
        key, so this never costs more requests than a HEAD per key; where
        wanted keys are dense it costs one request per 1,000 stored names.
        Publishing 16,000 new chunks against a store of 100,000 takes about
        100 requests instead of 16,000 HEADs (chunk names are uniform hashes).

        Raises:
            InvalidKeyError: any key is bad (checked before the first request).
            StorageError: a request failed.
        """
        wanted = sorted({validate_key(k) for k in keys})
        if len(wanted) == 1:
            return set() if self.exists(wanted[0]) else set(wanted)
        absent: set[str] = set()
        cut = len(self._prefix)
        i = 0
        while i < len(wanted):
            # Every wanted key from wanted[i] on shares this prefix: list only there.
            common = _common_prefix(wanted[i], wanted[-1])
            params = {
                "Bucket": self._bucket,
                "Prefix": self._prefix + common,
                "MaxKeys": _LIST_PAGE_KEYS,
            }
            # A proper prefix of a key sorts just before it: the page starts at
            # wanted[i] (or at names between the two, which no wanted key is).
            start_after = self._prefix + wanted[i][:-1]
            if start_after:
                params["StartAfter"] = start_after
            try:
                reply = self._client.list_objects_v2(**params)
            except _ERRORS as e:
                self._fail("list", f"{common}*", e)
            contents = reply.get("Contents", ())
            listed = {obj["Key"][cut:] for obj in contents}
            # None: the listing reached the end of the prefix, settling every key left.
            last = contents[-1]["Key"][cut:] if reply.get("IsTruncated") and contents else None
            j = i
            while j < len(wanted) and (last is None or wanted[j] <= last):
                if wanted[j] not in listed:
                    absent.add(wanted[j])
                j += 1
            if j == i:  # a truncated empty page would loop: settle the key by HEAD
                if not self.exists(wanted[i]):
                    absent.add(wanted[i])
                j = i + 1
            i = j
        return absent

    def delete(self, key: str) -> None:
        """Remove the object; S3 deletes are idempotent.

        Raises:
            InvalidKeyError: bad key.
            StorageError: the request failed.
        """
        name = self._name(key)
        try:
            self._client.delete_object(Bucket=self._bucket, Key=name)
        except _ERRORS as e:
            self._fail("delete", key, e)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, ascending, 1000 per ListObjectsV2 page.

        Raises:
            InvalidKeyError: invalid prefix (raised at the call, not at iteration).
            StorageError: a page request failed.
        """
        validate_prefix(prefix)
        return self._iter_keys(prefix)

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self._bucket,
            Prefix=self._prefix + prefix,
            PaginationConfig={"PageSize": _LIST_PAGE_KEYS},
        )
        cut = len(self._prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][cut:]
                    if _is_key(key):
                        yield key
        except _ERRORS as e:
            self._fail("list", f"{prefix}*", e)


def _error_code(e: BaseException) -> tuple[str, int | None]:
    """(error code, HTTP status) of a boto error; only names, never server text."""
    if isinstance(e, boto3.exceptions.S3UploadFailedError) and isinstance(
        e.__context__, botocore.exceptions.ClientError
    ):
        e = e.__context__
    if isinstance(e, botocore.exceptions.ClientError):
        error = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(error.get("Code") or status or "ClientError"), status
    return type(e).__name__, None


def _total_size(reply: dict[str, Any]) -> int:
    """The object's full size from a GET reply, ranged (Content-Range) or not."""
    content_range = reply.get("ContentRange")
    if content_range:
        # "bytes 0-99/1234": the total is after the slash.
        total = content_range.rpartition("/")[2]
        if total.isdigit():
            return int(total)
    return int(reply["ContentLength"])


def _without_userinfo(url: str) -> str:
    """``url`` without any ``user:password@`` (boto3 ignores it; it must not be shown)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def _is_key(name: str) -> bool:
    try:
        validate_key(name)
    except InvalidKeyError:
        return False
    return True
