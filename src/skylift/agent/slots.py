"""Slots: where images are written (the inactive slot) and read (verification, seed).

The port is :class:`SlotDevice`: positional reads and writes, a size, and
``sync``. Implementations are found in a table keyed by slot type, as RAUC
does; an unknown or unsupported type is an explicit error, never a no-op.

- ``file``: a regular file used as a disk image (loopback image, the demo and
  the tests). Opening it for an install creates it, or cuts or extends it, to
  exactly the image's size, never beyond the configured ``size_bytes``.
- ``block``: a block device. Same code path; its capacity is found by seeking
  to its end; it is never resized.
- ``directory``: not a device. A bundle's ``tar`` payload is extracted into
  it by :mod:`skylift.agent.dirslot`; opening one here is
  :class:`UnsupportedSlotError`.

Pairing (:func:`slot_pair`) says which slot of a class is active (the one the
bootloader booted) and which one an install may write.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from skylift.agent.config import AgentConfig, SlotConfig
from skylift.errors import SkyliftError
from skylift.fsutil import pread_full, pwrite_full

__all__ = [
    "SlotDevice",
    "SlotError",
    "SlotPair",
    "SlotReader",
    "SlotTooSmallError",
    "UnsupportedSlotError",
    "open_for_install",
    "open_for_reading",
    "slot_pair",
]


class SlotError(SkyliftError):
    """A slot cannot be opened, read, written or synced (an installation failure)."""


class SlotTooSmallError(SlotError):
    """The image is larger than the slot; nothing was written."""


class UnsupportedSlotError(SlotError):
    """The slot's type has no writer (yet); nothing was written."""


class SlotDevice(Protocol):
    """An opened slot: positional reads and writes. Close it when done."""

    def size(self) -> int:
        """Bytes that can be read now."""
        ...

    def read_range(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; raises SlotError if fewer are there."""
        ...

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write all of ``data`` at ``offset``; raises SlotError on failure."""
        ...

    def zero_range(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros; raises SlotError on failure."""
        ...

    def sync(self) -> None:
        """Make every write so far durable (fsync); raises SlotError on failure."""
        ...

    def close(self) -> None:
        """Release the slot (no sync implied)."""
        ...


class SlotReader:
    """A slot as a stream (``readinto``), for cutting it into seed chunks."""

    def __init__(self, slot: SlotDevice) -> None:
        self._slot = slot
        self._pos = 0
        self._size = slot.size()

    def readinto(self, b: memoryview, /) -> int:
        n = min(len(b), self._size - self._pos, 1024 * 1024)
        if n <= 0:
            return 0
        b[:n] = self._slot.read_range(self._pos, n)
        self._pos += n
        return n


@dataclass(frozen=True)
class SlotPair:
    """The two slots of one class: the one running now, and the one to write."""

    active: SlotConfig
    inactive: SlotConfig


def slot_pair(config: AgentConfig, slot_class: str, booted: str) -> SlotPair:
    """The active and inactive slot of ``slot_class``, given the bootloader's ``booted`` name.

    Raises:
        SlotError: the configuration has no such class, or no slot named ``booted``.
    """
    members = [s for s in config.slots if s.slot_class == slot_class]
    if not members:
        raise SlotError(
            f"no slot of class {slot_class!r} is configured",
            hint=f"add an A/B pair of [[slot]] with class = {slot_class!r} to the agent config",
        )
    active = [s for s in members if s.name == booted]
    if len(active) != 1:
        names = ", ".join(s.name for s in members)
        raise SlotError(
            f"the bootloader booted slot {booted!r}, but class {slot_class!r} has {names}"
        )
    (inactive,) = (s for s in members if s.name != booted)
    return SlotPair(active[0], inactive)


def open_for_reading(slot: SlotConfig) -> SlotDevice:
    """Open ``slot`` read-only (the active slot as a seed, or a slot to verify).

    Raises:
        UnsupportedSlotError: a directory slot.
        SlotError: it cannot be opened.
    """
    return _opener(slot)(slot, None)


def open_for_install(slot: SlotConfig, image_size: int) -> SlotDevice:
    """Open ``slot`` for writing an image of ``image_size`` bytes.

    The capacity is checked before anything is created, resized or written.

    Raises:
        SlotTooSmallError: the image does not fit.
        UnsupportedSlotError: a directory slot.
        SlotError: it cannot be opened or resized.
    """
    if image_size < 0:
        raise ValueError("image_size must not be negative")
    return _opener(slot)(slot, image_size)


_Opener = Callable[[SlotConfig, "int | None"], SlotDevice]


def _opener(slot: SlotConfig) -> _Opener:
    try:
        return _OPENERS[slot.type]
    except KeyError:
        raise UnsupportedSlotError(f"slot type {slot.type!r} is unknown") from None


def _open_directory(slot: SlotConfig, image_size: int | None) -> SlotDevice:
    raise UnsupportedSlotError(
        f"slot {slot.slot_class}/{slot.name} is a directory slot: it takes a tar payload "
        "extracted into it, not an image written to it"
    )


def _open_file(slot: SlotConfig, image_size: int | None) -> SlotDevice:
    where = f"slot {slot.slot_class}/{slot.name} ({slot.path})"
    if image_size is None:
        return _FdSlot(_os_open(slot.path, os.O_RDONLY, where), where)
    capacity = slot.size_bytes
    if capacity is not None and image_size > capacity:
        raise _too_small(where, image_size, capacity)
    fd = _os_open(slot.path, os.O_RDWR | os.O_CREAT, where)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SlotError(f"{where} is not a regular file", hint="use type = 'block' for devices")
        os.ftruncate(fd, image_size)
    except OSError as e:
        os.close(fd)
        raise SlotError(f"cannot size {where} to {image_size} bytes: {e.strerror or e}") from e
    except BaseException:
        os.close(fd)
        raise
    return _FdSlot(fd, where)


def _open_block(slot: SlotConfig, image_size: int | None) -> SlotDevice:
    where = f"slot {slot.slot_class}/{slot.name} ({slot.path})"
    flags = os.O_RDONLY if image_size is None else os.O_RDWR
    fd = _os_open(slot.path, flags, where)
    device = _FdSlot(fd, where)
    if image_size is not None and image_size > device.size():
        capacity = device.size()
        device.close()
        raise _too_small(where, image_size, capacity)
    return device


_OPENERS: dict[str, _Opener] = {
    "file": _open_file,
    "block": _open_block,
    "directory": _open_directory,
}


def _too_small(where: str, image_size: int, capacity: int) -> SlotTooSmallError:
    return SlotTooSmallError(
        f"the image ({image_size} bytes) is larger than {where} ({capacity} bytes); "
        "nothing was written",
        hint="build a smaller image or give the slot more room",
    )


def _os_open(path: os.PathLike[str] | str, flags: int, where: str) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise SlotError(f"cannot open {where}: {e.strerror or e}") from e


class _FdSlot:
    """A slot behind one file descriptor: a regular file or a block device."""

    def __init__(self, fd: int, where: str) -> None:
        self._fd = fd
        self._where = where

    def size(self) -> int:
        try:
            return os.lseek(self._fd, 0, os.SEEK_END)  # works for block devices too
        except OSError as e:
            raise SlotError(f"cannot find the size of {self._where}: {e.strerror or e}") from e

    def read_range(self, offset: int, length: int) -> bytes:
        try:
            data = pread_full(self._fd, length, offset)
        except OSError as e:
            raise SlotError(f"cannot read {self._where}: {e.strerror or e}") from e
        if len(data) != length:
            raise SlotError(
                f"{self._where} ends before byte {offset + length} (read {offset}+{length})"
            )
        return data

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        try:
            pwrite_full(self._fd, data, offset)
        except OSError as e:
            raise SlotError(f"cannot write {self._where}: {e.strerror or e}") from e

    def zero_range(self, offset: int, length: int) -> None:
        """Zeros, not written where the kernel can: a hole in a file, a zero-out on a device.

        ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` frees a file's blocks (reads give
        zeros, as after ``cp`` of a sparse image) and, on a block device, has
        the kernel zero the range (``blkdev_issue_zeroout``). Where it is not
        supported (another file system, an old kernel), zeros are written.
        """
        if length <= 0:
            return
        if _punch_hole(self._fd, offset, length):
            return
        zeros = memoryview(bytes(min(length, 1024 * 1024)))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.write_at(offset, zeros[:n])
            offset += n

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise SlotError(f"cannot sync {self._where}: {e.strerror or e}") from e

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: ctypes.CDLL | None = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """``fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length)``; False where unsupported."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise SlotError(f"cannot zero bytes {offset}+{length} of a slot: {os.strerror(err)}")
