"""Writing verified payloads to files or devices, never leaving a partial file.

A payload going to a regular file is written to a temporary file beside the
destination and renamed into place only after the whole payload verified.
A payload going to a block or character device is written in place (a
device cannot be renamed); its capacity is checked first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from skylift.bundle import (
    BundleHead,
    ChunkData,
    HookData,
    PayloadEnd,
    PayloadEntry,
    PayloadStart,
    UnsafePayloadNameError,
    check_name,
    read_body,
)
from skylift.bundle.reader import ReadStream
from skylift.errors import UserInputError
from skylift.fsutil import atomic_write, fsync_dir

__all__ = ["ExtractResult", "default_destination", "extract"]


class ExtractResult(list[tuple[str, Path, int]]):
    """(payload name, where it went, bytes written) for each payload extracted."""


def default_destination(out_dir: Path, payload: PayloadEntry) -> Path:
    """``OUT_DIR/NAME.img``, after making sure the name cannot leave ``out_dir``.

    Raises:
        UnsafePayloadNameError: the name would escape ``out_dir``.
    """
    name = check_name(payload.name)
    dest = out_dir / f"{name}.img"
    if dest.resolve().parent != out_dir.resolve():
        raise UnsafePayloadNameError(f"payload name {payload.name!r} escapes {out_dir}")
    return dest


class _Sink:
    def __init__(self, payload: PayloadEntry, dest: Path) -> None:
        self.payload = payload
        self.dest = dest
        self.written = 0
        self.device = dest.exists() and (
            stat.S_ISBLK(dest.stat().st_mode) or stat.S_ISCHR(dest.stat().st_mode)
        )
        if self.device:
            self.tmp = dest
            self.file: BinaryIO = open(dest, "r+b")  # noqa: SIM115 - closed in finish/abort
            capacity = self.file.seek(0, os.SEEK_END)
            self.file.seek(0)
            if stat.S_ISBLK(dest.stat().st_mode) and capacity < payload.size:
                self.file.close()
                raise UserInputError(
                    f"{dest} holds {capacity} bytes; payload {payload.name} needs {payload.size}"
                )
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.written += len(data)

    def close(self) -> None:
        """Flush to stable storage; the file keeps its temporary name."""
        self.file.flush()
        try:
            os.fsync(self.file.fileno())
        except OSError as e:
            # Character devices (and some block drivers) cannot be synced.
            if not (self.device and e.errno in (errno.EINVAL, errno.ENOTSUP)):
                raise
        self.file.close()

    def commit(self) -> None:
        """Give the file its final name (a device is already in place)."""
        if not self.device:
            os.replace(self.tmp, self.dest)
            fsync_dir(self.dest.parent)

    def abort(self) -> None:
        self.file.close()
        if not self.device:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


def extract(
    stream: ReadStream,
    head: BundleHead,
    out_dir: Path,
    destinations: dict[str, Path],
    *,
    with_hooks: bool = True,
) -> ExtractResult:
    """Stream the verified body of a bundle into files or devices.

    Files get their final names only once the whole bundle verified, so a
    failure at any byte leaves no output file under a final name.

    ``destinations`` maps payload names to paths; the others go to
    ``OUT_DIR/NAME.img``. Hooks go to ``OUT_DIR/hooks/PHASE`` (mode 0755).

    Raises:
        BundleError: the body does not verify (nothing partial is left behind).
        UserInputError: a destination is unusable.
    """
    unknown = set(destinations) - {p.name for p in head.manifest.payloads}
    if unknown:
        raise UserInputError(f"the bundle has no payload named {', '.join(sorted(unknown))}")
    result = ExtractResult()
    sink: _Sink | None = None
    done: list[_Sink] = []
    hooks: list[HookData] = []  # at most four of at most 1 MiB: kept until the end
    try:
        for event in read_body(stream, head):
            if isinstance(event, ChunkData):
                assert sink is not None
                sink.write(event.data)
            elif isinstance(event, PayloadStart):
                p = event.payload
                sink = _Sink(p, destinations.get(p.name) or default_destination(out_dir, p))
            elif isinstance(event, PayloadEnd):
                assert sink is not None
                sink.close()
                done.append(sink)
                sink = None
            elif isinstance(event, HookData) and with_hooks:
                hooks.append(event)
    except BaseException:
        for s in [*done, *([sink] if sink else [])]:
            s.abort()
        raise
    # Only a bundle that verified to its last byte gives its files their names.
    for s in done:
        s.commit()
        result.append((s.payload.name, s.dest, s.written))
    for h in hooks:
        hook_dir = out_dir / "hooks"
        hook_dir.mkdir(parents=True, exist_ok=True)
        dest = hook_dir / check_name(h.hook.phase, "hook phase")
        atomic_write(dest, h.data, mode=0o755)
        result.append((f"hook {h.hook.phase}", dest, len(h.data)))
    return result
