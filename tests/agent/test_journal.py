"""The install journal: survives reopen, a torn or corrupt record, another install; bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from skylift.agent.journal import (
    HEADER_SIZE,
    RECORD_SIZE,
    InstallJournal,
    JournalError,
    OrdinalRanges,
    install_id,
)

ID = install_id("rootfs/B", "ab" * 32)


def test_committed_ordinals_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "install.journal"
    j = InstallJournal(path, ID)
    for i in (0, 1, 2, 5, 6):
        j.add(i)
    assert len(j.verified) == 0  # not durable before commit
    j.commit()
    j.add(9)  # never committed: lost, as after a power cut
    again = InstallJournal(path, ID)
    assert sorted(again.verified) == [0, 1, 2, 5, 6]
    assert 9 not in again.verified
    assert again.dropped_records == 0
    # Consecutive ordinals are stored as ranges: 2 records, not 5.
    assert path.stat().st_size == HEADER_SIZE + 2 * RECORD_SIZE


def test_a_span_of_ordinals_is_one_record(tmp_path: Path) -> None:
    path = tmp_path / "install.journal"
    j = InstallJournal(path, ID)
    j.add_span(10, 300)  # a run of copied chunks
    j.add(300)
    j.add_span(5, 5)  # empty: nothing
    with pytest.raises(ValueError, match="not negative"):
        j.add_span(-1, 3)
    j.commit()
    again = InstallJournal(path, ID)
    assert list(again.verified) == list(range(10, 301))
    assert path.stat().st_size == HEADER_SIZE + RECORD_SIZE


def test_torn_last_record_is_dropped_and_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "install.journal"
    j = InstallJournal(path, ID)
    j.add(0)
    j.commit()
    j.add(10)
    j.commit()
    data = path.read_bytes()
    path.write_bytes(data[: -RECORD_SIZE // 2])  # power lost mid-append
    again = InstallJournal(path, ID)
    assert list(again.verified) == [0]
    assert again.dropped_records == 1
    assert path.stat().st_size == HEADER_SIZE + RECORD_SIZE
    again.add(3)
    again.commit()
    assert sorted(InstallJournal(path, ID).verified) == [0, 3]


@pytest.mark.parametrize("damage", ["bit flip", "zeros"])
def test_corrupt_record_ends_the_journal_there(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "install.journal"
    j = InstallJournal(path, ID)
    for i in (0, 4, 8):
        j.add(i)
        j.commit()
    data = bytearray(path.read_bytes())
    second = HEADER_SIZE + RECORD_SIZE
    if damage == "bit flip":
        data[second + 7] ^= 0x01
    else:
        data[second : second + RECORD_SIZE] = bytes(RECORD_SIZE)
    path.write_bytes(bytes(data))
    again = InstallJournal(path, ID)
    # Never trust what follows a bad record: re-fetching is safe, a wrong skip is not.
    assert list(again.verified) == [0]
    assert again.dropped_records == 2


def test_another_installs_journal_is_started_afresh(tmp_path: Path) -> None:
    path = tmp_path / "install.journal"
    j = InstallJournal(path, ID)
    j.add(1)
    j.commit()
    other = InstallJournal(path, install_id("rootfs/B", "cd" * 32))
    assert len(other.verified) == 0
    assert path.stat().st_size == HEADER_SIZE


def test_damaged_header_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "install.journal"
    j = InstallJournal(path, ID)
    j.add(1)
    j.commit()
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert len(InstallJournal(path, ID).verified) == 0


def test_journal_is_bounded_by_compaction(tmp_path: Path) -> None:
    path = tmp_path / "install.journal"
    limit = HEADER_SIZE + 8 * RECORD_SIZE
    j = InstallJournal(path, ID, max_bytes=limit)
    for i in range(100):  # one commit per chunk: 100 records without compaction
        j.add(i)
        j.commit()
        assert path.stat().st_size <= limit
    assert list(InstallJournal(path, ID, max_bytes=limit).verified) == list(range(100))


def test_journal_too_fragmented_to_fit_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "install.journal"
    limit = HEADER_SIZE + 4 * RECORD_SIZE
    j = InstallJournal(path, ID, max_bytes=limit)
    for i in range(0, 10, 2):  # five separate ranges cannot fit in four records
        j.add(i)
    with pytest.raises(JournalError, match="would exceed"):
        j.commit()


def test_reset_and_remove(tmp_path: Path) -> None:
    path = tmp_path / "install.journal"
    j = InstallJournal(path, ID)
    j.add(1)
    j.commit()
    j.reset()
    assert len(InstallJournal(path, ID).verified) == 0
    j.remove()
    assert not path.exists()


def test_ordinal_ranges_merge() -> None:
    r = OrdinalRanges([(5, 7), (0, 2)])
    r.add(2)
    r.add(4)
    assert r.spans() == [(0, 3), (4, 7)]
    r.add_span(1, 10)
    assert r.spans() == [(0, 10)]
    assert len(r) == 10
    assert 9 in r and 10 not in r and "1" not in r
