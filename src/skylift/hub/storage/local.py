"""The object store as a local directory: the hub's embedded default.

A key ``a/b/c`` is the file ``ROOT/a/b/c``. Every write goes through
:func:`skylift.fsutil.atomic_writer` (temp file, fsync, ``os.replace``, fsync
the directory), and new directories are fsynced into their parents, so a
power cut leaves each object either old or new and never partial.

Containment: keys cannot name ``..`` (see :func:`~.base.validate_key`), and
symbolic links inside the root are not followed out of it, so no key reaches
a file outside ``ROOT``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NoReturn

from skylift.fsutil import atomic_writer, fsync_dir

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

__all__ = ["OBJECT_FILE_MODE", "LocalStore"]

#: Objects are published artefacts (signed, served to devices): readable by a web server.
OBJECT_FILE_MODE = 0o644
_DIR_MODE = 0o755
_CONFLICT_HINT = "a key cannot also be the first segments of another key"
_COPY_BUFFER_BYTES = 1024 * 1024
# The temp-file name atomic_writer uses beside the final file; such names are
# never keys here, or a listing could show half-written objects.
_TEMP_NAME = re.compile(r"\..+\.tmp-[0-9]+-[0-9]+")
# Writers of one key are serialised by a small set of striped locks (no lock
# per key), so the last put wins cleanly.
_LOCK_STRIPES = 64
# A file name holds 255 bytes on every common Linux filesystem, and atomic_writer
# needs room beside it for ".NAME.tmp-PID-N". S3 has no limit per segment.
_MAX_NAME = 230


class LocalStore:
    """Objects as files under one directory (created if absent)."""

    def __init__(self, root: Path) -> None:
        """Use (and create) the directory ``root``.

        Raises:
            StorageError: ``root`` cannot be created or is not a directory.
        """
        try:
            Path(root).mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            # Resolved once: containment is judged against the real directory.
            self._root = Path(root).resolve(strict=True)
        except OSError as e:
            raise StorageError(
                f"cannot use {root} as object store: {e.strerror or e}",
                hint="check the path and its permissions",
            ) from e
        if not self._root.is_dir():
            raise StorageError(f"cannot use {root} as object store: not a directory")
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    @property
    def root(self) -> Path:
        """The resolved directory that holds the objects."""
        return self._root

    def describe(self) -> str:
        """``file://`` URL of the directory."""
        return self._root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self._root)!r})"

    # -- paths ---------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """The file for ``key``, refusing keys that would leave the root."""
        validate_key(key)
        segments = key.split("/")
        if max(map(len, segments)) > _MAX_NAME:
            raise InvalidKeyError(
                f"object key {quote_key(key)} has a segment longer than {_MAX_NAME} characters,"
                " more than a file name in the local store can hold"
            )
        if _TEMP_NAME.fullmatch(segments[-1]):
            raise InvalidKeyError(
                f"object key {quote_key(key)} has the form of a temporary file of the local store"
            )
        path = self._root.joinpath(*segments)
        # The key itself cannot climb out; a symbolic link inside the root could.
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self._root):
            raise InvalidKeyError(
                f"object key {quote_key(key)} resolves outside the store {self._root}",
                hint="remove the symbolic link from the store directory",
            )
        return path

    def _lock(self, key: str) -> threading.Lock:
        return self._locks[zlib.crc32(key.encode()) % _LOCK_STRIPES]

    def _fail(self, action: str, key: str, e: OSError) -> NoReturn:
        """Translate an OSError into the storage family, naming the key."""
        if isinstance(e, FileNotFoundError | NotADirectoryError | IsADirectoryError):
            raise ObjectNotFoundError(f"no object {quote_key(key)} in {self.describe()}") from e
        raise StorageError(
            f"cannot {action} object {quote_key(key)} in {self._root}: {e.strerror or e}",
            hint="check free space and permissions of the store directory",
        ) from e

    def _ensure_parent(self, key: str, path: Path) -> None:
        """Create missing directories down to ``path``'s parent, each one durable."""
        parent = path.parent
        if parent.is_dir():
            return
        missing: list[Path] = []
        d = parent
        while d != self._root and not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, _DIR_MODE)
            except FileExistsError:
                if not d.is_dir():  # made by a concurrent put: fine if a directory
                    raise
            except NotADirectoryError as e:
                raise StorageError(
                    f"cannot put object {quote_key(key)}: a leading part is an object",
                    hint=_CONFLICT_HINT,
                ) from e
            fsync_dir(d.parent)
        if not parent.is_dir():
            raise StorageError(
                f"cannot put object {quote_key(key)}: a leading part is an object",
                hint=_CONFLICT_HINT,
            )

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        with self._lock(key):
            try:
                if path.is_dir():
                    raise StorageError(
                        f"cannot put object {quote_key(key)}: other objects' keys start with it",
                        hint=_CONFLICT_HINT,
                    )
                self._ensure_parent(key, path)
                with atomic_writer(path, mode=OBJECT_FILE_MODE) as f:
                    fill(f)
            except OSError as e:
                raise StorageError(
                    f"cannot put object {quote_key(key)} in {self._root}: {e.strerror or e}",
                    hint="check free space and permissions of the store directory",
                ) from e

    # -- the port --------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically and durably (see :class:`~.base.ObjectStore`).

        Raises:
            InvalidKeyError: bad key, or one that would leave the root.
            StorageError: the write failed (disk full, permissions, key conflict).
        """
        self._write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: Path) -> None:
        """Copy the file at ``path`` under ``key``, streaming, atomically and durably.

        Raises:
            InvalidKeyError: bad key, or one that would leave the root.
            StorageError: ``path`` cannot be read, or the write failed.
        """
        self._path(key)  # a bad key is refused before the source is even opened
        try:
            src = open(path, "rb")  # noqa: SIM115 - closed below, after the write
        except OSError as e:
            raise StorageError(
                f"cannot read {path} to store as object {quote_key(key)}: {e.strerror or e}"
            ) from e
        with src:
            self._write(key, lambda f: shutil.copyfileobj(src, f, _COPY_BUFFER_BYTES))

    def _open(self, key: str) -> tuple[BinaryIO, int]:
        """The open object and its size; only regular files are objects."""
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - returned to the caller
        except OSError as e:
            self._fail("read", key, e)
        try:
            st = os.fstat(f.fileno())
        except OSError as e:
            f.close()
            self._fail("read", key, e)
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise ObjectNotFoundError(f"no object {quote_key(key)} in {self.describe()}")
        return f, st.st_size

    def get(self, key: str, *, max_bytes: int) -> bytes:
        """The whole object, refused unread if larger than ``max_bytes``.

        Raises:
            InvalidKeyError: bad key.
            ObjectNotFoundError: no such object.
            ObjectTooLargeError: larger than ``max_bytes``.
            StorageError: the read failed.
        """
        f, size = self._open(key)
        with f:
            if size > max_bytes:
                raise ObjectTooLargeError(
                    f"object {quote_key(key)} is {size} bytes, more than the {max_bytes} allowed"
                )
            try:
                # The open file keeps its content even if a put replaces the name,
                # so the size seen by fstat is the size read.
                data = f.read(max_bytes + 1)
            except OSError as e:
                self._fail("read", key, e)
        if len(data) > max_bytes:  # only if something wrote into the file in place
            raise ObjectTooLargeError(
                f"object {quote_key(key)} is more than the {max_bytes} allowed"
            )
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``.

        Raises:
            InvalidKeyError: bad key.
            ObjectNotFoundError: no such object.
            InvalidRangeError: negative values or past the end.
            StorageError: the read failed.
        """
        check_range(key, offset, length)
        f, size = self._open(key)
        with f:
            if offset + length > size:
                raise InvalidRangeError(
                    f"range {offset}+{length} reaches past the end of object {quote_key(key)}"
                    f" ({size} bytes)"
                )
            try:
                data = os.pread(f.fileno(), length, offset)
            except OSError as e:
                self._fail("read", key, e)
        if len(data) != length:
            raise InvalidRangeError(f"object {quote_key(key)} shrank while its range was read")
        return data

    def _stat(self, key: str) -> os.stat_result | None:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            self._fail("stat", key, e)
        return st if stat.S_ISREG(st.st_mode) else None

    def size(self, key: str) -> int:
        """Size in bytes.

        Raises:
            InvalidKeyError: bad key.
            ObjectNotFoundError: no such object.
            StorageError: the stat failed.
        """
        st = self._stat(key)
        if st is None:
            raise ObjectNotFoundError(f"no object {quote_key(key)} in {self.describe()}")
        return st.st_size

    def exists(self, key: str) -> bool:
        """Whether the object exists.

        Raises:
            InvalidKeyError: bad key.
            StorageError: the stat failed for another reason than absence.
        """
        return self._stat(key) is not None

    def missing(self, keys: Iterable[str]) -> set[str]:
        """The keys among ``keys`` with no object (one stat each: local stats are cheap).

        Raises:
            InvalidKeyError: any key is bad (checked before the first stat).
            StorageError: a stat failed for another reason than absence.
        """
        wanted = set(keys)
        for key in wanted:
            self._path(key)
        return {key for key in wanted if self._stat(key) is None}

    def delete(self, key: str) -> None:
        """Remove the object; absent is fine.

        Empty directories are left in place: removing them would race with a
        concurrent put that has just created them.

        Raises:
            InvalidKeyError: bad key.
            StorageError: the unlink failed.
        """
        path = self._path(key)
        with self._lock(key):
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return  # nothing stored under this key (a directory is not an object)
            except OSError as e:
                self._fail("delete", key, e)
            try:
                fsync_dir(path.parent)
            except OSError as e:
                self._fail("delete", key, e)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, ascending, walking only the directories that can match.

        Raises:
            InvalidKeyError: invalid prefix.
            StorageError: a directory cannot be listed.
        """
        validate_prefix(prefix)
        *dirs, partial = prefix.split("/")
        start = self._root.joinpath(*dirs)
        if not Path(os.path.realpath(start)).is_relative_to(self._root):
            raise InvalidKeyError(
                f"key prefix {quote_key(prefix)} resolves outside the store {self._root}",
                hint="remove the symbolic link from the store directory",
            )
        base = "".join(f"{d}/" for d in dirs)
        return self._walk(start, base, partial)

    def _walk(self, directory: Path, base: str, partial: str) -> Iterator[str]:
        try:
            with os.scandir(directory) as it:
                entries = [e for e in it if e.name.startswith(partial)]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StorageError(
                f"cannot list {directory} in the object store: {e.strerror or e}"
            ) from e
        # Sorting a directory's key ``d/...`` as "d/" gives the same global order
        # as sorting the full keys (and so the same order as S3's listings).
        named: list[tuple[str, os.DirEntry[str], bool]] = []
        for entry in entries:
            # Symbolic links are skipped: they could lead out of the root.
            if entry.is_dir(follow_symlinks=False):
                named.append((entry.name + "/", entry, True))
            elif entry.is_file(follow_symlinks=False):
                named.append((entry.name, entry, False))
        for _, entry, is_dir in sorted(named, key=lambda t: t[0]):
            key = base + entry.name
            if is_dir:
                yield from self._walk(Path(entry.path), f"{key}/", "")
            elif not _TEMP_NAME.fullmatch(entry.name) and _is_key(key):
                yield key


def _is_key(name: str) -> bool:
    try:
        validate_key(name)
    except InvalidKeyError:
        return False
    return True
