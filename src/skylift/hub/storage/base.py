"""The object-store port: what the hub needs from a place that keeps blobs.

Bundle heads, chunk index pages, content-addressed chunks and TUF metadata
all live under string keys in one store. The interface is the smallest one
that covers the hub's uses, synchronous (the hub calls it from a thread
pool), and the same for every backend: :class:`~skylift.hub.storage.local.LocalStore`
(a directory, the embedded default) and :class:`~skylift.hub.storage.s3.S3Store`
(any S3-compatible service). One contract test suite runs against both.

Keys are validated here, once, so that every backend accepts exactly the
same set and none of them has to think about ``..``, empty segments or
characters a filesystem or a URL would treat specially.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from skylift.errors import SkyliftError

__all__ = [
    "MAX_KEY_LENGTH",
    "InvalidKeyError",
    "InvalidRangeError",
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectTooLargeError",
    "StorageError",
    "check_range",
    "quote_key",
    "validate_key",
    "validate_prefix",
]

#: The longest key accepted, in characters (S3 allows 1024 bytes; keys are ASCII).
MAX_KEY_LENGTH = 1024

# ASCII only: a key is then the same string on every filesystem, in every URL
# and in S3's UTF-8 byte order, so listings sort the same on every backend.
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_PARTIAL_SEGMENT = re.compile(r"[A-Za-z0-9._-]*")


class StorageError(SkyliftError):
    """The object store failed or refused an operation (base of this family)."""


class ObjectNotFoundError(StorageError):
    """No object is stored under the key."""


class ObjectTooLargeError(StorageError):
    """The object is larger than the caller's bound; nothing of it was read."""


class InvalidKeyError(StorageError):
    """The key is not of the form the store accepts; nothing was read or written."""

    hint = "keys are '/'-separated segments of A-Z a-z 0-9 . _ - (no '.' or '..' segment)"


class InvalidRangeError(StorageError):
    """A byte range is negative or reaches past the end of the object."""


def quote_key(key: str) -> str:
    """A key as it may appear in a one-line message: quoted, bounded, control characters escaped."""
    shown = key if len(key) <= 80 else f"{key[:77]}..."
    return repr(shown)


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key.

    A key is ``/``-separated segments of ``[A-Za-z0-9._-]``, with no empty
    segment (so no leading, trailing or double ``/``), no ``.`` or ``..``
    segment, and at most :data:`MAX_KEY_LENGTH` characters.

    Raises:
        InvalidKeyError: the key breaks one of these rules.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"object key must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError("object key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"object key {quote_key(key)} is {len(key)} characters, more than {MAX_KEY_LENGTH}"
        )
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise InvalidKeyError(f"invalid object key {quote_key(key)}")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start a valid key (``""`` matches every key).

    The prefix is a plain string prefix, as in S3: ``chunks/ab`` matches
    ``chunks/ab/...`` and ``chunks/abc``. Every complete segment (those
    followed by ``/``) obeys the key rules; the last one may be partial.

    Raises:
        InvalidKeyError: no valid key can start with ``prefix``.
    """
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"key prefix must be a string, not {type(prefix).__name__}")
    if len(prefix) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"key prefix {quote_key(prefix)} is longer than {MAX_KEY_LENGTH}")
    *complete, partial = prefix.split("/")
    for segment in complete:
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise InvalidKeyError(f"invalid key prefix {quote_key(prefix)}")
    if not _PARTIAL_SEGMENT.fullmatch(partial):
        raise InvalidKeyError(f"invalid key prefix {quote_key(prefix)}")
    return prefix


def check_range(key: str, offset: int, length: int) -> None:
    """Refuse a negative offset or length before any I/O.

    Raises:
        InvalidRangeError: ``offset`` or ``length`` is negative.
    """
    if offset < 0 or length < 0:
        raise InvalidRangeError(
            f"invalid byte range offset={offset} length={length} for object {quote_key(key)}"
        )


@runtime_checkable
class ObjectStore(Protocol):
    """Blobs under string keys: the hub's only view of object storage.

    Every method validates its keys first (:func:`validate_key`) and raises
    :class:`InvalidKeyError` before touching the backend. Every backend
    failure surfaces as a :class:`StorageError` subclass with a one-line
    message naming the key; credentials never appear in it.

    A key must not also be the first segments of another key (``a`` and
    ``a/b``): S3 allows it, a directory cannot hold both, so portable callers
    never do it and :class:`~skylift.hub.storage.local.LocalStore` refuses it.
    """

    def describe(self) -> str:
        """Where the objects are, for people and logs (never any secret)."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there.

        Atomic: a concurrent reader sees the old object or the new one, never
        a part of one.

        Raises:
            InvalidKeyError: bad key.
            StorageError: the backend refused or failed.
        """
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key`` without reading it whole into memory.

        As atomic as :meth:`put`.

        Raises:
            InvalidKeyError: bad key.
            StorageError: ``path`` cannot be read, or the backend failed.
        """
        ...

    def get(self, key: str, *, max_bytes: int) -> bytes:
        """The whole object, if it is no larger than ``max_bytes``.

        The size is checked before the body is read, so an oversized object
        costs no memory and (on S3) at most ``max_bytes + 1`` bytes of transfer.

        Raises:
            InvalidKeyError: bad key.
            ObjectNotFoundError: nothing is stored under ``key``.
            ObjectTooLargeError: the object is larger than ``max_bytes``.
            StorageError: the backend failed.
        """
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of the object, starting at ``offset``.

        A zero ``length`` returns ``b""`` if ``offset`` is within the object
        (or at its end).

        Raises:
            InvalidKeyError: bad key.
            ObjectNotFoundError: nothing is stored under ``key``.
            InvalidRangeError: negative values, or the range reaches past the end.
            StorageError: the backend failed.
        """
        ...

    def size(self, key: str) -> int:
        """The object's size in bytes.

        Raises:
            InvalidKeyError: bad key.
            ObjectNotFoundError: nothing is stored under ``key``.
            StorageError: the backend failed.
        """
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``.

        Raises:
            InvalidKeyError: bad key.
            StorageError: the backend failed (not merely "absent").
        """
        ...

    def missing(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` have no object: one call for a whole batch of chunks.

        All keys are validated before the first request.

        Raises:
            InvalidKeyError: any key is bad.
            StorageError: the backend failed.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; nothing stored there is not an error.

        Raises:
            InvalidKeyError: bad key.
            StorageError: the backend failed.
        """
        ...

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Every valid key starting with ``prefix``, in ascending order.

        Objects whose names are not valid keys (written by something else)
        are skipped: every key yielded works with every other method.

        Raises:
            InvalidKeyError: no valid key can start with ``prefix``.
            StorageError: the backend failed (possibly part-way through).
        """
        ...
