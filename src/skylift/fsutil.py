"""Durable file writes (temp file, fsync, rename, fsync the directory); whole pread/pwrite.

Every file Skylift writes for keeps goes through here, so that a power cut
leaves either the old file or the new one under the final name, never a
partial one. :func:`pread_full` and :func:`pwrite_full` loop over the short
reads and writes ``os.pread`` and ``os.pwrite`` may return.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from skylift.errors import UserInputError

__all__ = [
    "atomic_write",
    "atomic_writer",
    "fsync_dir",
    "pread_full",
    "pwrite_full",
    "read_bounded",
]

_TEMP_COUNTER = itertools.count()


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on a clean exit make it ``path`` durably.

    On an exception the temp file is removed and ``path`` is left as it was.
    The file is created with ``mode`` from the start (a private key is never
    readable by others, not even for an instant).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    # Process and a per-process counter: two writers of one path never share a temp file.
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{next(_TEMP_COUNTER)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widen beyond ``mode``
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode=mode) as f:
        f.write(data)


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes of ``fd`` from ``offset``; fewer only where the file ends.

    Raises:
        OSError: reading failed.
    """
    parts: list[bytes] = []
    done = 0
    while done < length:
        block = os.pread(fd, length - done, offset + done)
        if not block:
            break
        parts.append(block)
        done += len(block)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def pwrite_full(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset``.

    Raises:
        OSError: writing failed.
    """
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def read_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """Read a whole small file, refusing one larger than ``limit`` bytes.

    Raises:
        UserInputError: the file is missing, unreadable, or larger than ``limit``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UserInputError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(data) > limit:
        raise UserInputError(f"{what} {path} is larger than {limit} bytes")
    return data
