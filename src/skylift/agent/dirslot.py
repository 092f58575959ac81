"""Directory slots: a ``tar`` payload extracted into a directory, streamed in order.

A file or block slot takes chunks in any order, at their offsets. A
directory cannot: a tar archive is a stream, so the install produces the
payload's bytes in order, each chunk verified against the signed index
first, and feeds them to an extractor that writes the members into the
inactive directory as they arrive. Nothing of the archive is cached whole.

- **Rules.** The slot's ``include`` and ``exclude`` globs (relative paths;
  ``*`` and ``?`` stay within one path component, ``**`` crosses them) say
  what an install may replace. A pattern that matches a directory covers
  everything below it. Before extracting, every path of the inactive
  directory is removed except the excluded ones; members that are not
  included, or are excluded, are read past and not written.
- **Safety.** Member paths are relative, without ``..``; nothing is written
  through a symbolic link or over a directory; hard links point at members
  already extracted; sparse and unknown member types are refused. Owners
  are applied only when running as root.
- **Seed.** After a successful install the agent keeps a *tar-split*
  skeleton of the archive next to its state (header blocks, padding and
  the list of file-data holes, not the file data: a few hundred bytes per
  member). With it the active directory can be read back as the exact
  bytes of the archive it was installed from (:class:`TarSplitSeed`), so
  the next install cuts it with the payload's chunking and fetches only
  the chunks it lacks, as for an image. A file changed since is simply a
  seed chunk that no longer verifies: it is fetched.
- **Verification.** Every chunk is checked before the extractor sees it,
  and the whole stream against the payload's SHA-256. Then the tree is read
  back: every extracted member's type, mode, size, content digest and link
  target must be what the verified archive said.
- **Interruptions.** A directory install that is interrupted starts over
  (the directory is cleared again); verified chunks are fetched again
  unless the seed has them. The slot is marked bad before the first write,
  so it is never booted half written.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
import stat
import struct
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from skylift.agent.config import SlotConfig
from skylift.agent.install import (
    FetchRanges,
    Progress,
    answered,
    chunks_in,
    decode_object,
)
from skylift.agent.plan import (
    ChunkStep,
    InstallPlan,
    PlanTotals,
    SeedIndex,
    Source,
    coalesce,
    make_plan,
    seed_index,
)
from skylift.agent.slots import SlotDevice, SlotError, SlotPair, SlotReader
from skylift.bundle import PayloadEntry
from skylift.chunks import ChunkEntry, PackedEntries

__all__ = [
    "DirectoryInstall",
    "DirectorySlotError",
    "PathRules",
    "TarSplitSeed",
    "TreeEntry",
    "clear_directory",
    "extract_stream",
    "install_directory",
    "open_seed",
    "skeleton_path",
    "stream_plan",
    "verify_tree",
]

_log = logging.getLogger(__name__)

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
#: A pax extended header or GNU long name is held whole: bound it.
_MAX_EXTENDED = 1024 * 1024
_MAX_PATH = 4096
_MAX_MEMBERS = 2_000_000
#: The skeleton's JSON part (the holes list) is read whole: bound it.
_MAX_SKELETON_JSON = 128 * 1024 * 1024
_TRAILER = struct.Struct(">Q")
_SKELETON_VERSION = 1
#: Chunks that the target repeats are kept in memory up to this much, else fetched again
#: (it adds to the fetch window in the peak RSS, which must stay under 64 MiB).
_RETAIN_BYTES = 4 * 1024 * 1024
_REG_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_EXTENDED_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class DirectorySlotError(SlotError):
    """A directory install cannot go on: an unsafe or unsupported archive, or a changed tree."""


# -- include/exclude rules ------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out).rstrip("/") or "(?!)")


class PathRules:
    """Which paths of a directory slot an install replaces (see the module docstring)."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        self._include = [_glob_regex(p) for p in (include or ("**",))]
        self._exclude = [_glob_regex(p) for p in exclude]

    @staticmethod
    def _covers(patterns: Sequence[re.Pattern[str]], rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(p.fullmatch(q) for p in patterns for q in prefixes)

    def excluded(self, rel: str) -> bool:
        """``rel`` (or a directory above it) matches an exclude rule: never touched."""
        return self._covers(self._exclude, rel)

    def installs(self, rel: str) -> bool:
        """An install writes ``rel``: it is included and not excluded."""
        return self._covers(self._include, rel) and not self.excluded(rel)


def clear_directory(root: Path, rules: PathRules) -> None:
    """Remove everything under ``root`` except the excluded paths (and the directories above them).

    ``root`` is created when missing (its parent must exist).

    Raises:
        DirectorySlotError: ``root`` is not a directory (or is a symbolic link).
        OSError: a removal failed.
    """
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        os.mkdir(root, 0o755)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise DirectorySlotError(f"directory slot {root} is not a directory")
    _clear(str(root), "", rules)


def _clear(path: str, prefix: str, rules: PathRules) -> bool:
    kept = False
    with os.scandir(path) as it:
        children = list(it)
    for child in children:
        rel = prefix + child.name
        if rules.excluded(rel):
            kept = True
        elif child.is_dir(follow_symlinks=False):
            if _clear(child.path, rel + "/", rules):
                kept = True
            else:
                os.rmdir(child.path)
        else:
            os.unlink(child.path)
    return kept


# -- the tar-split skeleton -----------------------------------------------------------


def skeleton_path(state_dir: Path, slot: SlotConfig) -> Path:
    """Where the skeleton of the archive installed in ``slot`` is kept."""
    return state_dir / "slots" / f"{slot.slot_class}-{slot.name}.tarsplit"


class _SkeletonWriter:
    """Writes the archive's non-data bytes and its holes; :meth:`commit` publishes them."""

    def __init__(self, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        self._final = final
        self._tmp = final.with_name(final.name + ".tmp")
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit or discard
        self._holes: list[tuple[int, int, str | None]] = []
        self.pos = 0

    def raw(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self.pos += len(data)

    def hole(self, size: int, rel: str | None) -> None:
        if size:
            self._holes.append((self.pos, size, rel))
            self.pos += size

    def commit(self, sha256: str) -> None:
        doc = {
            "version": _SKELETON_VERSION,
            "size": self.pos,
            "sha256": sha256,
            "holes": [list(h) for h in self._holes],
        }
        tail = json.dumps(doc, separators=(",", ":")).encode()
        self._f.write(tail)
        self._f.write(_TRAILER.pack(len(tail)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self._final)
        fd = os.open(self._final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


class TarSplitSeed:
    """A directory read back as the bytes of the archive it was installed from (a SlotDevice).

    Header and padding bytes come from the skeleton; file data from the files
    in the directory. A file that is missing or shorter reads as zeros there:
    its chunks do not verify and are fetched.
    """

    def __init__(self, skeleton: Path, root: Path) -> None:
        self._root = root
        self._fd = os.open(skeleton, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._load()
        except BaseException:
            os.close(self._fd)
            raise
        self._file: tuple[str, int] | None = None

    def _load(self) -> None:
        end = os.fstat(self._fd).st_size
        if end < _TRAILER.size:
            raise DirectorySlotError("the directory slot's skeleton is truncated")
        (json_len,) = _TRAILER.unpack(os.pread(self._fd, _TRAILER.size, end - _TRAILER.size))
        if json_len > min(_MAX_SKELETON_JSON, end - _TRAILER.size):
            raise DirectorySlotError("the directory slot's skeleton is corrupt")
        raw_len = end - _TRAILER.size - json_len
        try:
            doc = json.loads(os.pread(self._fd, json_len, raw_len))
            size = int(doc["size"])
            holes = [(int(s), int(n), None if r is None else str(r)) for s, n, r in doc["holes"]]
            if doc["version"] != _SKELETON_VERSION:
                raise ValueError("version")
        except (ValueError, KeyError, TypeError) as e:
            raise DirectorySlotError("the directory slot's skeleton is corrupt") from e
        pos = hole_bytes = 0
        for start, n, _ in holes:
            if start < pos or n <= 0:
                raise DirectorySlotError("the directory slot's skeleton is corrupt")
            pos = start + n
            hole_bytes += n
        if pos > size or size - hole_bytes != raw_len:
            raise DirectorySlotError("the directory slot's skeleton does not add up")
        self._size = size
        self._starts = [h[0] for h in holes]
        self._holes = holes
        self._before = [0]  # hole bytes before hole i
        for _, n, _ in holes:
            self._before.append(self._before[-1] + n)

    def size(self) -> int:
        return self._size

    def read_range(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DirectorySlotError(f"read past the end of the archive ({offset}+{length})")
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            i = bisect.bisect_right(self._starts, pos) - 1
            if i >= 0 and pos < self._starts[i] + self._holes[i][1]:
                start, n, rel = self._holes[i]
                take = min(end, start + n) - pos
                out += self._file_bytes(rel, pos - start, take)
            else:
                nxt = self._starts[i + 1] if i + 1 < len(self._starts) else self._size
                take = min(end, nxt) - pos
                raw = pos - self._before[i + 1]
                data = os.pread(self._fd, take, raw)
                if len(data) != take:
                    raise DirectorySlotError("the directory slot's skeleton is truncated")
                out += data
            pos += take
        return bytes(out)

    def _file_bytes(self, rel: str | None, offset: int, length: int) -> bytes:
        if rel is None:
            return bytes(length)
        try:
            if self._file is None or self._file[0] != rel:
                self._close_file()
                fd = os.open(self._root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self._file = (rel, fd)
            data = os.pread(self._file[1], length, offset)
        except OSError:
            data = b""
        return data + bytes(length - len(data))

    def _close_file(self) -> None:
        if self._file is not None:
            os.close(self._file[1])
            self._file = None

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        raise DirectorySlotError("a directory seed is read-only")

    def zero_range(self, offset: int, length: int) -> None:
        raise DirectorySlotError("a directory seed is read-only")

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self._close_file()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_seed(state_dir: Path, slot: SlotConfig) -> TarSplitSeed | None:
    """The active directory slot as an archive to copy chunks from; None without a skeleton."""
    path = skeleton_path(state_dir, slot)
    try:
        return TarSplitSeed(path, slot.path)
    except FileNotFoundError:
        return None
    except (OSError, DirectorySlotError) as e:
        _log.warning("no seed for directory slot %s/%s: %s", slot.slot_class, slot.name, e)
        return None


# -- extracting a stream --------------------------------------------------------------


@dataclass(frozen=True)
class TreeEntry:
    """What one extracted member must look like when the tree is read back."""

    kind: str  # "file", "dir", "symlink", "chr", "blk", "fifo"
    mode: int
    size: int = 0
    sha256: bytes = b""
    link: str = ""
    rdev: int = 0
    uid: int = -1
    gid: int = -1


def _normalise(name: str) -> str | None:
    """The member's path relative to the slot, None for the root itself; refuses escapes."""
    if "\x00" in name or len(name) > _MAX_PATH:
        raise DirectorySlotError(f"the archive has a member with an invalid name {name[:80]!r}")
    if name.startswith("/"):
        raise DirectorySlotError(f"the archive has an absolute member path {name[:80]!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DirectorySlotError(f"the archive has a member path with '..': {name[:80]!r}")
    return "/".join(parts) or None


class _Extractor:
    """A tar stream in, members written under ``root``; one call of :meth:`feed` per piece."""

    def __init__(self, root: Path, rules: PathRules, skeleton: _SkeletonWriter) -> None:
        self._root = str(root)
        self._rules = rules
        self._skel = skeleton
        self._as_root = os.geteuid() == 0
        self._buf = bytearray()
        self._state = "header"  # header, extended, data, pad, end
        self._need = _BLOCK
        self._ext_type = b""
        self._ext_size = 0
        self._pax: dict[str, str] = {}
        self._global: dict[str, str] = {}
        self._long: dict[bytes, str] = {}
        self._left = 0
        self._fd = -1
        self._hash: hashlib._Hash | None = None
        self._current: tuple[str, tarfile.TarInfo, dict[str, str]] | None = None
        self._data_size = 0
        self._pad = 0
        self._hole_rel: str | None = None
        self._members = 0
        self._dirs: dict[str, tuple[int, int, int, float]] = {}
        self._checked_dirs: set[str] = set()
        self.tree: dict[str, TreeEntry] = {}

    # The stream, piece by piece.

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._state == "data":
                n = min(len(view), self._left)
                self._data(view[:n])
                view = view[n:]
            elif self._state == "pad":
                n = min(len(view), self._left)
                self._skel.raw(view[:n])
                self._left -= n
                view = view[n:]
                if not self._left:
                    self._state = "header"
                    self._need = _BLOCK
            elif self._state == "end":
                if any(view):
                    raise DirectorySlotError("the archive has data after its end-of-archive marker")
                self._skel.raw(view)
                view = view[len(view) :]
            else:
                take = min(len(view), self._need - len(self._buf))
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) == self._need:
                    block = bytes(self._buf)
                    self._buf.clear()
                    self._skel.raw(block)
                    if self._state == "header":
                        self._header(block)
                    else:
                        self._extended(block[: self._ext_size])

    def finish(self) -> dict[str, TreeEntry]:
        """Check the archive ended properly and apply directory modes; the tree to verify."""
        if self._state != "end":
            raise DirectorySlotError("the archive ends inside a member (no end-of-archive marker)")
        for rel in sorted(self._dirs, key=lambda r: -r.count("/")):
            mode, uid, gid, mtime = self._dirs[rel]
            path = os.path.join(self._root, rel)
            if self._as_root:
                os.lchown(path, uid, gid)
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime))
        return self.tree

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # Headers.

    def _header(self, block: bytes) -> None:
        if block == _ZERO_BLOCK:
            self._state = "end"
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise DirectorySlotError(
                f"the archive has a corrupt header at byte {self._skel.pos - _BLOCK}: {e}"
            ) from None
        if info.type in _EXTENDED_TYPES:
            if info.size > _MAX_EXTENDED:
                raise DirectorySlotError(
                    f"the archive has an extended header of {info.size} bytes "
                    f"(at most {_MAX_EXTENDED})"
                )
            self._ext_type = info.type
            self._ext_size = info.size
            self._need = -(-info.size // _BLOCK) * _BLOCK
            self._state = "extended"
            if not self._need:
                self._extended(b"")
            return
        self._members += 1
        if self._members > _MAX_MEMBERS:
            raise DirectorySlotError(f"the archive has more than {_MAX_MEMBERS} members")
        pax = {**self._global, **self._pax}
        name = self._long.get(tarfile.GNUTYPE_LONGNAME) or pax.get("path") or info.name
        link = self._long.get(tarfile.GNUTYPE_LONGLINK) or pax.get("linkpath") or info.linkname
        self._pax = {}
        self._long = {}
        size = info.size
        if "size" in pax:
            size = _pax_int(pax, "size")
        for key, attr in (("uid", "uid"), ("gid", "gid")):
            if key in pax:
                setattr(info, attr, _pax_int(pax, key))
        if "mtime" in pax:
            try:
                info.mtime = float(pax["mtime"])
            except ValueError:
                raise DirectorySlotError("the archive has a bad pax mtime") from None
        info.linkname = link
        self._member(name, info, size, pax)

    def _extended(self, data: bytes) -> None:
        self._state = "header"
        self._need = _BLOCK
        if self._ext_type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            text = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            self._long[self._ext_type] = text
            return
        records = _parse_pax(data)
        if self._ext_type == tarfile.XGLTYPE:
            self._global.update(records)
        else:
            self._pax.update(records)

    # Members.

    def _member(self, name: str, info: tarfile.TarInfo, size: int, pax: dict[str, str]) -> None:
        rel = _normalise(name)
        regular = info.type in _REG_TYPES
        if info.type == tarfile.GNUTYPE_SPARSE or info.type not in tarfile.SUPPORTED_TYPES:
            raise DirectorySlotError(
                f"the archive member {name[:80]!r} has type {info.type!r}, which directory "
                "slots do not install (sparse, volume or unknown)"
            )
        data = size if regular else 0
        install = rel is not None and self._rules.installs(rel)
        self._current = None
        if install:
            assert rel is not None
            self._current = (rel, info, pax)
            self._create(rel, info, pax)
        if data:
            self._data_size = data
            self._hole_rel = rel if install else None
            self._left = data
            self._pad = (-data) % _BLOCK
            self._state = "data"
            return
        if install and regular:
            self._close_file(0)
        self._state = "header"
        self._need = _BLOCK

    def _data(self, piece: memoryview) -> None:
        n = len(piece)
        if self._fd >= 0:
            assert self._hash is not None
            self._hash.update(piece)
            while piece:
                written = os.write(self._fd, piece)
                piece = piece[written:]
        self._left -= n
        if self._left:
            return
        # File data is not in the skeleton: a hole, read back from the file (or zeros).
        self._skel.hole(self._data_size, self._hole_rel)
        if self._fd >= 0:
            self._close_file(self._data_size)
        self._left = self._pad
        self._state = "pad" if self._pad else "header"
        self._need = _BLOCK

    def _create(self, rel: str, info: tarfile.TarInfo, pax: dict[str, str]) -> None:
        path = os.path.join(self._root, rel)
        self._parents(rel)
        mode = info.mode & 0o7777
        t = info.type
        if t == tarfile.DIRTYPE:
            self._make_dir(rel, path)
            self._dirs[rel] = (mode, info.uid, info.gid, float(info.mtime))
            self.tree[rel] = TreeEntry("dir", mode, uid=info.uid, gid=info.gid)
            return
        self._remove_existing(rel, path)
        self._dirs.pop(rel, None)
        if t in _REG_TYPES:
            self._fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            self._hash = hashlib.sha256()
            return
        if t == tarfile.SYMTYPE:
            os.symlink(info.linkname, path)
            self.tree[rel] = TreeEntry("symlink", 0, link=info.linkname)
            if self._as_root:
                os.lchown(path, info.uid, info.gid)
            return
        if t == tarfile.LNKTYPE:
            target = _normalise(info.linkname)
            entry = self.tree.get(target or "")
            if target is None or entry is None or entry.kind != "file":
                raise DirectorySlotError(
                    f"the archive member {rel!r} is a hard link to {info.linkname!r}, which "
                    "is not a file extracted before it"
                )
            os.link(os.path.join(self._root, target), path, follow_symlinks=False)
            self.tree[rel] = entry
            return
        kinds = {tarfile.CHRTYPE: "chr", tarfile.BLKTYPE: "blk", tarfile.FIFOTYPE: "fifo"}
        kind = kinds[t]
        rdev = os.makedev(info.devmajor, info.devminor) if kind != "fifo" else 0
        fmt = {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}[kind]
        try:
            os.mknod(path, fmt | 0o600, rdev)
        except PermissionError:
            raise DirectorySlotError(
                f"the archive member {rel!r} is a device node; creating it needs root"
            ) from None
        if self._as_root:
            os.lchown(path, info.uid, info.gid)
        os.chmod(path, mode)
        os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)
        self.tree[rel] = TreeEntry(kind, mode, rdev=rdev, uid=info.uid, gid=info.gid)

    def _close_file(self, size: int) -> None:
        assert self._current is not None
        assert self._hash is not None
        rel, info, pax = self._current
        fd = self._fd
        self._fd = -1
        try:
            if self._as_root:
                os.fchown(fd, info.uid, info.gid)
            os.fchmod(fd, info.mode & 0o7777)
            _set_xattrs(fd, pax, rel)
            os.utime(fd, (info.mtime, info.mtime))
        finally:
            os.close(fd)
        self.tree[rel] = TreeEntry(
            "file",
            info.mode & 0o7777,
            size=size,
            sha256=self._hash.digest(),
            uid=info.uid,
            gid=info.gid,
        )

    def _parents(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(len(parts)):
            sub = "/".join(parts[: i + 1])
            if sub in self._checked_dirs:
                continue
            path = os.path.join(self._root, sub)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise DirectorySlotError(
                        f"the archive member {rel!r} would be written through {sub!r}, "
                        "which is not a directory (a symbolic link, say)"
                    )
            self._checked_dirs.add(sub)

    def _make_dir(self, rel: str, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o700)
        else:
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(path)
                os.mkdir(path, 0o700)
        self._checked_dirs.add(rel)

    def _remove_existing(self, rel: str, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise DirectorySlotError(f"the archive member {rel!r} would replace a directory")
        os.unlink(path)
        self.tree.pop(rel, None)


def _pax_int(pax: dict[str, str], key: str) -> int:
    try:
        value = int(pax[key])
    except ValueError:
        raise DirectorySlotError(f"the archive has a bad pax {key} {pax[key][:20]!r}") from None
    if value < 0:
        raise DirectorySlotError(f"the archive has a negative pax {key}")
    return value


def _parse_pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header ("LEN key=value\\n" each)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise DirectorySlotError("the archive has a corrupt pax header") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or space < 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise DirectorySlotError("the archive has a corrupt pax header")
        key, sep, value = record[:-1].partition(b"=")
        if not sep:
            raise DirectorySlotError("the archive has a corrupt pax record")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


_XATTR = "SCHILY.xattr."


def _set_xattrs(fd: int, pax: dict[str, str], rel: str) -> None:
    for key, value in pax.items():
        if key.startswith(_XATTR):
            name = key[len(_XATTR) :]
            try:
                os.setxattr(fd, name, value.encode("utf-8", "surrogateescape"))
            except OSError as e:
                raise DirectorySlotError(
                    f"cannot set extended attribute {name!r} on {rel!r}: {e.strerror}"
                ) from None


def extract_stream(
    pieces: Iterable[bytes | memoryview], root: Path, rules: PathRules, skeleton: Path
) -> tuple[dict[str, TreeEntry], Callable[[str], None]]:
    """Extract a tar stream into ``root`` (cleared first); the tree, and how to keep its skeleton.

    The second value publishes the skeleton (given the archive's SHA-256);
    call it once the tree verified. On any error nothing is published.
    """
    writer = _SkeletonWriter(skeleton)
    extractor = _Extractor(root, rules, writer)
    try:
        for piece in pieces:
            extractor.feed(piece)
        tree = extractor.finish()
    except BaseException:
        extractor.abort()
        writer.discard()
        raise
    return tree, writer.commit


# -- reading the tree back ------------------------------------------------------------


def verify_tree(root: Path, tree: dict[str, TreeEntry]) -> None:
    """Read every extracted member back and compare it with the archive.

    Raises:
        DirectorySlotError: a member is missing or differs (type, mode, size,
            content, link target, device, owner when running as root).
    """
    as_root = os.geteuid() == 0
    kinds = {
        "file": stat.S_ISREG,
        "dir": stat.S_ISDIR,
        "symlink": stat.S_ISLNK,
        "chr": stat.S_ISCHR,
        "blk": stat.S_ISBLK,
        "fifo": stat.S_ISFIFO,
    }
    for rel, e in tree.items():
        path = root / rel

        def differs(what: str, rel: str = rel) -> DirectorySlotError:
            return DirectorySlotError(
                f"directory slot {root}: {rel!r} {what} after extracting",
                hint="the storage may be failing, or something wrote to the slot; "
                "the install will start over",
            )

        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise differs("is missing") from None
        if not kinds[e.kind](st.st_mode):
            raise differs(f"is not a {e.kind}")
        if e.kind == "symlink":
            if os.readlink(path) != e.link:
                raise differs("points elsewhere")
            continue
        if stat.S_IMODE(st.st_mode) != e.mode:
            raise differs(f"has mode {stat.S_IMODE(st.st_mode):o}, not {e.mode:o}")
        if as_root and (st.st_uid, st.st_gid) != (e.uid, e.gid):
            raise differs("has another owner")
        if e.kind in ("chr", "blk") and st.st_rdev != e.rdev:
            raise differs("is another device")
        if e.kind == "file" and (st.st_size != e.size or _file_sha256(path) != e.sha256):
            raise differs("has other content")


def _file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1024 * 1024):
            h.update(block)
    return h.digest()


# -- producing the payload in order ---------------------------------------------------


def stream_plan(
    plan: InstallPlan,
    *,
    fetch_ranges: FetchRanges,
    seed: SlotDevice | None,
    max_gap_bytes: int,
    max_ranges_per_request: int,
    max_range_bytes: int,
    on_progress: Callable[[Progress], None] | None = None,
    downloaded: list[int] | None = None,
) -> Iterator[bytes]:
    """Yield the payload's chunks in order, each verified; fetch what the seed lacks.

    Fetches go ahead of the output in windows of at most ``max_range_bytes``
    of pack (and as much decoded), so memory stays bounded. A chunk the
    target repeats is kept (up to 4 MiB of them) or fetched again. A seed
    chunk whose bytes changed since the seed was indexed is fetched.
    ``downloaded[0]`` counts the bytes received.

    Raises:
        ChunkRejectedError: a fetched chunk does not verify.
        InstallError: the fetcher answered other ranges than asked.
    """
    if plan.skipped:
        raise ValueError("a streamed install starts from the first chunk")
    counter = downloaded if downloaded is not None else [0]
    steps = plan.steps
    retain = _retained_digests(steps)
    kept: dict[bytes, bytes] = {}
    ready: dict[int, bytes] = {}
    decompressor = zstandard.ZstdDecompressor()
    done = 0

    def needs_pack(s: ChunkStep) -> bool:
        return s.source is Source.PACK or (
            s.source is Source.TARGET and s.entry.digest not in retain
        )

    def fill(first: int, also: ChunkStep | None = None) -> None:
        batch = [also] if also is not None else []
        stored = plain = 0
        for k in range(first, len(steps)):  # not steps[first:]: a copy of the rest each time
            if stored >= max_range_bytes or plain >= 2 * max_range_bytes:
                break
            s = steps[k]
            if needs_pack(s) and s.ordinal not in ready and (also is None or k != first):
                batch.append(s)
                stored += s.pack_range.length
                plain += s.entry.length
        by_start = {s.pack_range.start: s for s in batch}
        starts = sorted(by_start)
        requests = coalesce(
            [s.pack_range for s in batch],
            max_gap_bytes=max_gap_bytes,
            max_ranges_per_request=max_ranges_per_request,
            max_range_bytes=max_range_bytes,
        )
        for request in requests:
            for rng, data in answered(fetch_ranges, request):
                counter[0] += len(data)
                for s, obj in chunks_in(rng, data, starts, by_start):
                    ready[s.ordinal] = decode_object(s.entry, obj, decompressor)

    for n, step in enumerate(steps):
        data: bytes | None = None
        if step.source is Source.SEED and seed is not None:
            data = seed.read_range(step.source_offset, step.entry.length)
            if hashlib.sha256(data).digest() != step.entry.digest:
                data = None
        elif step.source is Source.TARGET and step.entry.digest in kept:
            data = kept[step.entry.digest]
        if data is None:
            if step.ordinal not in ready:
                fill(n, None if needs_pack(step) else step)
            data = ready.pop(step.ordinal)
        if step.entry.digest in retain and step.entry.digest not in kept:
            kept[step.entry.digest] = data
        done += len(data)
        yield data
        if on_progress is not None:
            on_progress(Progress("fetch", done, plan.size, counter[0]))


def _retained_digests(steps: Sequence[ChunkStep]) -> set[bytes]:
    """The repeated chunks kept in memory for their later copies (first come, within budget)."""
    repeated = {s.entry.digest for s in steps if s.source is Source.TARGET}
    retain: set[bytes] = set()
    budget = _RETAIN_BYTES
    for s in steps:
        d = s.entry.digest
        if d in repeated and d not in retain and s.entry.length <= budget:
            retain.add(d)
            budget -= s.entry.length
    return retain


@dataclass(frozen=True)
class DirectoryInstall:
    """What :func:`install_directory` did."""

    totals: PlanTotals
    downloaded_bytes: int
    members: int


def install_directory(
    pair: SlotPair,
    payload: PayloadEntry,
    entries: Sequence[ChunkEntry],
    *,
    fetch_ranges: FetchRanges,
    state_dir: Path,
    max_gap_bytes: int,
    max_ranges_per_request: int,
    max_range_bytes: int,
    check_plan: Callable[[PlanTotals], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> DirectoryInstall:
    """Install a ``tar`` payload into ``pair.inactive``, a directory slot (module docstring).

    ``check_plan`` sees the plan's totals before anything is touched (to
    refuse a download that is too large, say).

    Raises:
        DirectorySlotError: the payload is not a tar archive, or is unsafe,
            unsupported or corrupt; the tree read back differs.
        ChunkRejectedError, InstallError: as for an image install.
        OSError: writing the directory failed (disk full, say).
    """
    slot = pair.inactive
    if payload.type != "tar":
        raise DirectorySlotError(
            f"payload {payload.name} is a {payload.type} image; directory slot "
            f"{slot.slot_class}/{slot.name} takes tar payloads"
        )
    seed = open_seed(state_dir, pair.active)
    try:
        packed = entries if isinstance(entries, PackedEntries) else PackedEntries(entries)
        found = (
            seed_index(
                SlotReader(seed), payload.chunking, payload.size, wanted=packed.digest_table()
            )
            if seed is not None
            else SeedIndex()
        )
        plan = make_plan(
            packed,
            found,
            max_gap_bytes=max_gap_bytes,
            max_ranges_per_request=max_ranges_per_request,
            max_range_bytes=max_range_bytes,
        )
        if check_plan is not None:
            check_plan(plan.totals)
        rules = PathRules(slot.include, slot.exclude)
        skeleton = skeleton_path(state_dir, slot)
        # The old skeleton describes what is about to be removed.
        skeleton.unlink(missing_ok=True)
        clear_directory(slot.path, rules)
        downloaded = [0]
        whole = hashlib.sha256()
        size = [0]

        def pieces() -> Iterator[bytes]:
            for data in stream_plan(
                plan,
                fetch_ranges=fetch_ranges,
                seed=seed,
                max_gap_bytes=max_gap_bytes,
                max_ranges_per_request=max_ranges_per_request,
                max_range_bytes=max_range_bytes,
                on_progress=on_progress,
                downloaded=downloaded,
            ):
                whole.update(data)
                size[0] += len(data)
                yield data

        tree, keep_skeleton = extract_stream(pieces(), slot.path, rules, skeleton)
    finally:
        if seed is not None:
            seed.close()
    if size[0] != payload.size or whole.hexdigest() != payload.sha256:
        raise DirectorySlotError(f"payload {payload.name} does not match its sha256")
    os.sync()
    if on_progress is not None:
        on_progress(Progress("verify", 0, payload.size, downloaded[0]))
    verify_tree(slot.path, tree)
    keep_skeleton(payload.sha256)
    return DirectoryInstall(plan.totals, downloaded[0], len(tree))
