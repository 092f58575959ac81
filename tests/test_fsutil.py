"""skylift.fsutil: whole reads and writes at an offset, whatever the system call returns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skylift.fsutil import pread_full, pwrite_full


def test_whole_writes_and_reads_at_an_offset(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pwrite_full(fd, memoryview(data), 100)
        assert os.fstat(fd).st_size == 100 + len(data)
        assert pread_full(fd, len(data), 100) == data
        assert pread_full(fd, 10, 0) == bytes(10)  # the hole before the write
        # Past the end: only what there is.
        assert pread_full(fd, 50, 100 + len(data) - 20) == data[-20:]
        assert pread_full(fd, 5, 10 * len(data)) == b""
    finally:
        os.close(fd)


def test_short_system_calls_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A pipe, a signal or a network file system may read or write less than asked.
    real_pread, real_pwrite = os.pread, os.pwrite
    monkeypatch.setattr(os, "pread", lambda fd, n, off: real_pread(fd, min(n, 7), off))
    monkeypatch.setattr(os, "pwrite", lambda fd, b, off: real_pwrite(fd, b[:5], off))
    data = os.urandom(1000)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pwrite_full(fd, data, 3)
        assert pread_full(fd, 1000, 3) == data
    finally:
        os.close(fd)
