"""The local chunk cache: chunks downloaded for an install that did not stay, kept for the next.

A release that fails its health check is rolled back; the next release is
often the same plus a fix. For a content-defined payload (tar, squashfs) the
fix shifts offsets, so the inactive slot holds few chunks *in place*
(:func:`~skylift.agent.plan.held_in_place`) and the device would download
again what it fetched an hour ago. The cache keeps those chunks, bounded:

- ``<state_dir>/chunk-cache/data``: chunks' decoded bytes, appended;
- ``<state_dir>/chunk-cache/index``: one fixed-size record a chunk
  (32-byte SHA-256, u64 offset in ``data``, u32 length, big-endian).

Integrity comes from hashing, not from fsync ordering: the executor hashes
every chunk it reads from the cache before writing it, exactly as a seed
chunk (:func:`~skylift.agent.install.apply_plan`), so a record naming torn
bytes after a power cut only makes that chunk stale (it is fetched instead).
Loading is bounded and validated; a malformed cache is discarded and starts
empty. Nothing here may make an install fail: every I/O error turns the
cache off for the rest of the install, logged once.

The cache is emptied when a release is committed: its chunks are then in
the active slot, the seed of the next install.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from skylift.agent.slots import SlotError
from skylift.chunks import MAX_CHUNK_BYTES
from skylift.fsutil import pread_full, pwrite_full

__all__ = [
    "CACHE_DIR",
    "CacheReader",
    "ChunkCache",
    "clear_cache",
]

#: Under the agent's state directory.
CACHE_DIR = "chunk-cache"
_DATA = "data"
_INDEX = "index"
_RECORD = struct.Struct(">32sQI")
#: Smaller chunks are not kept (a payload's last chunk may be shorter than the chunking
#: minimum): a record costs 44 bytes. This also bounds the index: at most
#: ``max_bytes // _MIN_CHUNK`` records.
_MIN_CHUNK = 64

_log = logging.getLogger("skylift.agent")


class ChunkCache:
    """An opened chunk cache: look chunks up, read them (:meth:`reader`), add fetched ones.

    Open it with :meth:`open`; close it when the install is done.
    """

    def __init__(self, directory: Path, max_bytes: int, data_fd: int, index_fd: int) -> None:
        self._directory = directory
        self._max_bytes = max_bytes
        self._data_fd: int | None = data_fd
        self._index_fd: int | None = index_fd
        self._chunks: dict[bytes, tuple[int, int]] = {}
        self._data_end = 0  # where the next chunk is appended
        self._index_end = 0  # where the next record is written
        self._full_logged = False

    @classmethod
    def open(cls, directory: Path, max_bytes: int) -> ChunkCache:
        """Open (creating it, mode 0700, files 0600) the cache in ``directory``.

        A malformed cache is discarded (logged once) and starts empty.

        Raises:
            OSError: the directory or its files cannot be created or opened
                (the caller installs without a cache).
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # one left by someone else keeps no wider mode
        data_fd = _open_file(directory / _DATA)
        try:
            index_fd = _open_file(directory / _INDEX)
        except OSError:
            os.close(data_fd)
            raise
        cache = cls(directory, max_bytes, data_fd, index_fd)
        try:
            cache._load()
        except BaseException:
            cache.close()
            raise
        return cache

    @property
    def chunks(self) -> Mapping[bytes, tuple[int, int]]:
        """``{digest: (offset, length)}`` of the cached chunks (``make_plan(cached=...)``)."""
        return MappingProxyType(self._chunks)

    @property
    def data_bytes(self) -> int:
        """Bytes of the data file in use (chunks appended so far)."""
        return self._data_end

    def reader(self) -> CacheReader:
        """The cached chunks' bytes as a read-only slot (``apply_plan(cache=...)``)."""
        return CacheReader(self)

    def add(self, digest: bytes, data: bytes | memoryview) -> None:
        """Keep ``data`` (a verified chunk whose SHA-256 is ``digest``), if it fits.

        A chunk already cached, or too small or large to be a chunk worth
        keeping, is left out; once the data file would grow past
        ``max_bytes``, nothing more is added (logged once). Never raises: an
        I/O error turns the cache off for the rest of this install.
        """
        length = len(data)
        if self._data_fd is None or self._index_fd is None or digest in self._chunks:
            return
        if len(digest) != 32 or not _MIN_CHUNK <= length <= MAX_CHUNK_BYTES:
            return
        if self._data_end + length > self._max_bytes:
            if not self._full_logged:
                _log.info("the chunk cache is full (%d bytes); keeping no more", self._data_end)
                self._full_logged = True
            return
        offset = self._data_end
        try:
            pwrite_full(self._data_fd, data, offset)
            # The record after its bytes; no fsync: a torn pair is a stale chunk, no more.
            pwrite_full(
                self._index_fd,
                _RECORD.pack(digest, offset, length),
                self._index_end,
            )
        except OSError as e:
            self._off(f"cannot write it: {e.strerror or e}")
            return
        self._chunks[digest] = (offset, length)
        self._data_end = offset + length
        self._index_end += _RECORD.size

    def read_range(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the data file at ``offset``; zeros where it cannot be read.

        Bytes that are not there read as zeros, which hash wrong: the
        executor then fetches those chunks. Never raises.
        """
        if self._data_fd is None or length <= 0:
            return bytes(max(length, 0))
        try:
            data = pread_full(self._data_fd, length, offset)
        except OSError as e:
            self._off(f"cannot read it: {e.strerror or e}")
            data = b""
        return data if len(data) == length else data + bytes(length - len(data))

    def clear(self) -> None:
        """Forget every cached chunk and empty the files. Never raises."""
        self._chunks.clear()
        self._data_end = self._index_end = 0
        self._full_logged = False
        try:
            for fd in (self._index_fd, self._data_fd):  # the index first: no record outlives
                if fd is not None:
                    os.ftruncate(fd, 0)
        except OSError as e:
            self._off(f"cannot empty it: {e.strerror or e}")

    def close(self) -> None:
        """Close the files (no sync: the cache's bytes are checked when read)."""
        for fd in (self._data_fd, self._index_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._index_fd = None

    def __enter__(self) -> ChunkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loading

    def _load(self) -> None:
        assert self._data_fd is not None
        assert self._index_fd is not None
        data_size = os.fstat(self._data_fd).st_size
        index_size = os.fstat(self._index_fd).st_size
        max_records = self._max_bytes // _MIN_CHUNK
        if index_size > max_records * _RECORD.size:
            self._discard(f"its index is {index_size} bytes")
            return
        torn = index_size % _RECORD.size  # a power cut while a record was appended
        index_size -= torn
        if data_size > self._max_bytes:
            self._discard(f"its data is {data_size} bytes, more than {self._max_bytes}")
            return
        raw = pread_full(self._index_fd, index_size, 0)
        if len(raw) != index_size:
            self._discard("its index could not be read whole")
            return
        dropped = 0
        for digest, offset, length in _RECORD.iter_unpack(raw):
            if not _MIN_CHUNK <= length <= MAX_CHUNK_BYTES or offset + length > data_size:
                dropped += 1
            elif digest not in self._chunks:
                self._chunks[digest] = (offset, length)
        self._index_end = index_size
        if torn or len(self._chunks) * _RECORD.size != index_size:
            # The index is rewritten with the records kept (the first of each digest).
            if torn:
                _log.info("chunk cache: a record torn by a power cut dropped")
            if dropped:
                _log.warning("chunk cache: %d record(s) naming no cached bytes dropped", dropped)
            records = b"".join(_RECORD.pack(d, o, n) for d, (o, n) in self._chunks.items())
            os.ftruncate(self._index_fd, 0)
            pwrite_full(self._index_fd, records, 0)
            self._index_end = len(records)
        self._data_end = data_size

    def _discard(self, why: str) -> None:
        _log.warning("chunk cache in %s discarded (%s); it starts empty", self._directory, why)
        self.clear()

    def _off(self, why: str) -> None:
        _log.warning("chunk cache in %s turned off for this install: %s", self._directory, why)
        self._chunks.clear()
        self.close()


class CacheReader:
    """A :class:`~skylift.agent.slots.SlotDevice` over the cache's data file, read-only.

    Reads never fail (bytes that are not there read as zeros, and hash
    wrong); writing is a :class:`~skylift.agent.slots.SlotError`. Closing it
    leaves the cache open.
    """

    def __init__(self, cache: ChunkCache) -> None:
        self._cache = cache

    def size(self) -> int:
        """Bytes of cached chunks."""
        return self._cache.data_bytes

    def read_range(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (zeros where they cannot be read)."""
        return self._cache.read_range(offset, length)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Refused: chunks are added with :meth:`ChunkCache.add`."""
        raise SlotError("the chunk cache is not a slot to write")

    def zero_range(self, offset: int, length: int) -> None:
        """Refused, as :meth:`write_at`."""
        raise SlotError("the chunk cache is not a slot to write")

    def sync(self) -> None:
        """Nothing to make durable."""

    def close(self) -> None:
        """Nothing to release (the cache is closed by its owner)."""


def clear_cache(directory: Path) -> None:
    """Empty the cache in ``directory`` without opening it (nothing is created). Never raises."""
    for name in (_INDEX, _DATA):
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            _log.warning("cannot empty the chunk cache in %s: %s", directory, e.strerror or e)
            return


def _open_file(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd
