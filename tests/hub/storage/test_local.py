"""What only the directory backend has to prove: atomic writes, file modes, containment."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from skylift.hub.storage import (
    InvalidKeyError,
    LocalStore,
    ObjectNotFoundError,
    StorageError,
)
from skylift.hub.storage.local import OBJECT_FILE_MODE

KEY = "metadata/timestamp.json"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects")


def all_files(root: Path) -> list[str]:
    """Every file under ``root``, hidden temp files included."""
    return sorted(str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs)


def _fail(*_: Any, **__: Any) -> None:
    raise OSError(28, "No space left on device")


# -- atomicity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "write"),
    [
        pytest.param(os, lambda s, p: s.put(KEY, b"new content"), id="put-replace"),
        pytest.param(os, lambda s, p: s.put_file(KEY, p), id="put_file-replace"),
        pytest.param(shutil, lambda s, p: s.put_file(KEY, p), id="put_file-copy"),
    ],
)
def test_a_failed_write_leaves_the_old_object_and_no_temp_file(
    store: LocalStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: object,
    write: Callable[[LocalStore, Path], None],
) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"new content from a file")
    store.put(KEY, b"old content")
    # The crash lands after the new bytes are in the temp file (os.replace) or
    # half-way through copying them (shutil.copyfileobj).
    monkeypatch.setattr(target, "replace" if target is os else "copyfileobj", _fail)
    with pytest.raises(StorageError, match="No space left") as info:
        write(store, source)
    monkeypatch.undo()
    assert isinstance(info.value.__cause__, OSError)
    assert store.get(KEY, max_bytes=100) == b"old content"
    assert all_files(store.root) == [KEY]


def test_a_failed_first_write_leaves_no_object(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(StorageError):
        store.put(KEY, b"data")
    monkeypatch.undo()
    assert not store.exists(KEY)
    assert all_files(store.root) == []
    assert list(store.iter_keys()) == []


def test_concurrent_puts_of_one_key_never_collide(store: LocalStore) -> None:
    # Chunks are content-addressed: two workers storing the same chunk at once is normal.
    errors: list[BaseException] = []
    payloads = [bytes([n]) * 50_000 for n in range(8)]

    def writer(data: bytes) -> None:
        try:
            for _ in range(20):
                store.put(KEY, data)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert store.get(KEY, max_bytes=50_000) in payloads
    assert all_files(store.root) == [KEY]


# -- files and directories -------------------------------------------------------------


def test_objects_are_world_readable_whatever_the_umask(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"x")
    source.chmod(0o600)
    old = os.umask(0o077)
    try:
        store.put("a/put", b"x")
        store.put_file("a/put_file", source)
    finally:
        os.umask(old)
    for key in ("a/put", "a/put_file"):
        assert (store.root / key).stat().st_mode & 0o777 == OBJECT_FILE_MODE == 0o644


def test_opening_creates_the_root_and_refuses_a_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "deep" / "objects")
    assert store.root.is_dir()
    assert store.describe() == (tmp_path / "deep" / "objects").resolve().as_uri()
    (tmp_path / "plain-file").write_bytes(b"")
    with pytest.raises(StorageError, match="plain-file"):
        LocalStore(tmp_path / "plain-file")


@pytest.mark.parametrize(
    ("first", "second"),
    [("a", "a/b"), ("a/b", "a"), ("x/y", "x/y/z")],
)
def test_a_key_cannot_also_be_a_directory_of_keys(
    store: LocalStore, first: str, second: str
) -> None:
    store.put(first, b"1")
    with pytest.raises(
        StorageError, match="a leading part is an object|keys start with it"
    ) as info:
        store.put(second, b"2")
    assert "first segments of another key" in info.value.diagnostics()
    assert not isinstance(info.value, InvalidKeyError)
    assert store.get(first, max_bytes=1) == b"1"
    assert list(store.iter_keys()) == [first]


def test_a_directory_is_not_an_object(store: LocalStore) -> None:
    store.put("a/b", b"1")
    with pytest.raises(ObjectNotFoundError):
        store.get("a", max_bytes=10)
    with pytest.raises(ObjectNotFoundError):
        store.size("a")
    assert not store.exists("a")
    assert store.missing(["a", "a/b"]) == {"a"}
    store.delete("a")  # nothing stored under "a": a no-op, not an error
    assert store.exists("a/b")


def test_segments_longer_than_a_file_name_are_refused(store: LocalStore) -> None:
    # 255 bytes per file name, less room for the temp file written beside it.
    for key in ("x" * 231, f"{'x' * 231}/y"):
        with pytest.raises(InvalidKeyError, match="230"):
            store.put(key, b"")
    store.put("x" * 230, b"")
    store.put(f"{'d' * 230}/{'x' * 230}", b"")


def test_temp_file_names_are_reserved_and_never_listed(store: LocalStore) -> None:
    with pytest.raises(InvalidKeyError, match="temporary"):
        store.put("a/.b.tmp-123-0", b"")
    store.put("a/b", b"real")
    (store.root / "a" / ".b.tmp-4242-7").write_bytes(b"half written")  # a crashed writer
    (store.root / "a" / "not a key").write_bytes(b"foreign")
    assert list(store.iter_keys()) == ["a/b"]
    store.put("a/.b.tmp", b"")  # only the exact temp-file shape is reserved
    store.put("a/.tmp-1", b"")


# -- containment -------------------------------------------------------------------------


@pytest.fixture
def escape(store: LocalStore, tmp_path: Path) -> Path:
    """A directory outside the store, reachable through symbolic links inside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"outside the store")
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    (store.root / "file-link").symlink_to(outside / "secret")
    return outside


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.put("link/new", b"x"), id="put-through-dir-link"),
        pytest.param(lambda s: s.put("link/secret", b"x"), id="overwrite-through-dir-link"),
        pytest.param(lambda s: s.get("link/secret", max_bytes=100), id="get-through-dir-link"),
        pytest.param(lambda s: s.get("file-link", max_bytes=100), id="get-file-link"),
        pytest.param(lambda s: s.get_range("file-link", 0, 1), id="range-file-link"),
        pytest.param(lambda s: s.size("link/secret"), id="size"),
        pytest.param(lambda s: s.exists("link/secret"), id="exists"),
        pytest.param(lambda s: s.missing(["link/secret"]), id="missing"),
        pytest.param(lambda s: s.delete("link/secret"), id="delete"),
        pytest.param(lambda s: s.iter_keys("link/"), id="iter_keys"),
    ],
)
def test_symbolic_links_never_lead_out_of_the_root(
    store: LocalStore, escape: Path, call: Callable[[LocalStore], object]
) -> None:
    with pytest.raises(InvalidKeyError, match="outside the store"):
        call(store)
    assert sorted(p.name for p in escape.iterdir()) == ["secret"]
    assert (escape / "secret").read_bytes() == b"outside the store"


def test_listing_does_not_follow_symbolic_links(store: LocalStore, escape: Path) -> None:
    store.put("inside", b"x")
    assert list(store.iter_keys()) == ["inside"]
    assert escape.is_dir()
