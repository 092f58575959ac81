"""A TUF repository on disk: the directory a web server or object store publishes.

The directory holds ``metadata/`` and ``targets/`` in the consistent-snapshot
layout of :mod:`skylift.trust.repository`. Files are written atomically and in
an order that never lets a client see a timestamp or root pointing at a file
not there yet. Nothing is ever deleted: clients part-way through an update
may still fetch older versioned files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Protocol

from skylift.errors import UserInputError
from skylift.fsutil import atomic_write
from skylift.trust.errors import RepositoryError
from skylift.trust.repository import MAX_METADATA_BYTES, Repository

__all__ = ["RepositorySink", "load_repository", "publish_to", "save_repository"]

_METADATA = "metadata"


class _MetadataFiles(Mapping[str, bytes]):
    """``metadata/*.json`` of a repository directory, read only when asked for.

    Target contents (bundles, possibly gigabytes) are left out: loading a
    repository needs none of them.
    """

    def __init__(self, root: Path) -> None:
        self._dir = root / _METADATA

    def _path(self, key: str) -> Path | None:
        prefix, _, name = key.partition("/")
        if prefix != _METADATA or not name.endswith(".json") or "/" in name or name[0] == ".":
            return None
        return self._dir / name

    def __getitem__(self, key: str) -> bytes:
        path = self._path(key)
        if path is None:
            raise KeyError(key)
        try:
            with open(path, "rb") as f:
                # One byte over the bound is enough for the loader to refuse it.
                return f.read(MAX_METADATA_BYTES + 1)
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as e:
            raise UserInputError(f"cannot read {path}: {e.strerror or e}") from e

    def __iter__(self) -> Iterator[str]:
        try:
            names = sorted(os.listdir(self._dir))
        except FileNotFoundError:
            return iter(())
        except OSError as e:
            raise UserInputError(f"cannot list {self._dir}: {e.strerror or e}") from e
        return iter([f"{_METADATA}/{n}" for n in names if self._path(f"{_METADATA}/{n}")])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def load_repository(path: Path) -> Repository:
    """Load the repository published in directory ``path``.

    Only the metadata is read, each file bounded by ``MAX_METADATA_BYTES``.

    Raises:
        UserInputError: ``path`` is not a directory, or a file cannot be read.
        RepositoryError: the metadata is missing, oversized or does not verify
            (see :meth:`Repository.load`).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path} is not a repository directory")
    return Repository.load(_MetadataFiles(path))


def _write_order(rel: str) -> tuple[int, int, str]:
    # Contents first, then what lists them, the entry points last: a client
    # that reads the directory mid-save finds every file it is pointed at.
    # Root versions go in numeric order, as clients walk them one by one.
    name = rel.rpartition("/")[2]
    version = int(name.partition(".")[0]) if name.partition(".")[0].isdigit() else 0
    if rel == "metadata/timestamp.json":
        return (4, 0, rel)
    if rel == "metadata/root.json":
        return (3, 0, rel)
    if rel.endswith(".root.json"):
        return (2, version, rel)
    if rel.startswith(f"{_METADATA}/"):
        return (1, version, rel)
    return (0, 0, rel)


class RepositorySink(Protocol):
    """Where a repository is published: a directory, an object store prefix."""

    def read(self, rel: str, limit: int) -> bytes | None:
        """The bytes published at ``rel`` (at most ``limit`` + 1), or None if absent."""
        ...

    def write(self, rel: str, data: bytes) -> None:
        """Publish ``data`` at ``rel`` atomically."""
        ...


class _DirectorySink:
    def __init__(self, root: Path) -> None:
        self._root = root

    def _dest(self, rel: str) -> Path:
        return self._root.joinpath(*PurePosixPath(rel).parts)

    def read(self, rel: str, limit: int) -> bytes | None:
        dest = self._dest(rel)
        try:
            with open(dest, "rb") as f:
                return f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UserInputError(f"cannot read {dest}: {e.strerror or e}") from e

    def write(self, rel: str, data: bytes) -> None:
        dest = self._dest(rel)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, data)
        except OSError as e:
            raise UserInputError(f"cannot write {dest}: {e.strerror or e}") from e


def publish_to(sink: RepositorySink, repo: Repository) -> list[str]:
    """Publish ``repo`` through ``sink``; return the relative paths written.

    Files already there with the same content are left alone. A versioned
    file (``N.root.json``, ``N.targets.json``, ``N.snapshot.json``, a
    hash-prefixed target) is immutable once published: finding one with
    other content means two repositories share the place, and nothing is
    written over it. Everything is checked before anything is written, and
    writes go in an order that never shows a client a dangling reference.

    Raises:
        RepositoryError: targets have unsigned changes, or a published
            versioned file would change.
    """
    files = repo.publish()
    pending: list[tuple[str, bytes]] = []
    for rel in sorted(files, key=_write_order):
        parts = PurePosixPath(rel).parts
        if rel.startswith("/") or not parts or any(p in ("", ".", "..") for p in parts):
            raise RepositoryError(f"refusing to write outside the repository: {rel!r}")
        data = files[rel]
        existing = sink.read(rel, len(data))
        if existing == data:
            continue
        mutable = rel in ("metadata/root.json", "metadata/timestamp.json")
        if not mutable and existing is not None:
            raise RepositoryError(
                f"{rel} is already published with other content",
                hint="versioned files never change; is this place another repository?",
            )
        pending.append((rel, data))
    for rel, data in pending:
        sink.write(rel, data)
    return [rel for rel, _ in pending]


def save_repository(path: Path, repo: Repository) -> list[str]:
    """Write ``repo`` into directory ``path``; return the relative paths written.

    See :func:`publish_to` for what is written and refused.

    Raises:
        RepositoryError: targets have unsigned changes, or a published
            versioned file would change.
        UserInputError: a file cannot be read or written.
    """
    return publish_to(_DirectorySink(Path(path)), repo)
