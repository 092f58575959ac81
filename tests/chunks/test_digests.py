"""DigestTable: the compact set of chunk digests the agent's seed index is built on."""

from __future__ import annotations

import hashlib

import pytest

from skylift.chunks.digests import DigestTable


def d(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


def test_digests_are_numbered_in_the_order_first_added_and_found_again() -> None:
    table = DigestTable()
    numbers = [table.add(d(i)) for i in range(1000)]  # grows from 8 slots, many times
    assert numbers == list(range(1000))
    assert [table.add(d(i)) for i in (5, 0, 999)] == [5, 0, 999]  # no new number
    assert len(table) == 1000
    assert all(table.find(d(i)) == i for i in range(1000))
    assert table.find(d(1000)) == -1
    assert d(3) in table and d(1000) not in table
    assert "not a digest" not in table
    assert list(table) == [d(i) for i in range(1000)]
    assert table.digest(7) == d(7)


def test_a_table_sized_ahead_holds_the_same_as_one_that_grew() -> None:
    grown = DigestTable(d(i) for i in range(300))
    sized = DigestTable((d(i) for i in range(300)), expected=300)
    assert list(grown) == list(sized)
    assert all(grown.find(x) == sized.find(x) for x in sized)


def test_digests_differing_in_one_byte_are_told_apart() -> None:
    a = bytes(32)
    b = bytes(31) + b"\x01"
    table = DigestTable([a, b, a])
    assert len(table) == 2
    assert table.find(a) == 0 and table.find(b) == 1


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33)])
def test_a_digest_of_another_length_is_refused_and_changes_nothing(bad: bytes) -> None:
    table = DigestTable([d(1)])
    with pytest.raises(ValueError, match="32 bytes"):
        table.add(bad)
    assert list(table) == [d(1)]


def test_numbers_out_of_range_are_refused() -> None:
    table = DigestTable([d(1)])
    with pytest.raises(IndexError):
        table.digest(1)
    with pytest.raises(IndexError):
        table.digest(-1)
