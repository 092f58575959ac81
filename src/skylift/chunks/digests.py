"""A compact set of chunk digests, each numbered by when it was added.

A Python ``set`` or ``dict`` of 131 072 SHA-256 digests (a 512 MiB image in
4 KiB blocks) costs 12 to 24 MiB: a bytes object, a hash slot, and for a
dict a value each. :class:`DigestTable` keeps the digests in one buffer
(32 bytes each) and an open-addressing table of their numbers (4 bytes a
slot, at most half full): about 40 bytes a digest, 5 MiB for that image.
The agent's seed index (:class:`skylift.agent.plan.SeedIndex`) and the
digests it wants (:meth:`skylift.chunks.index.PackedEntries.digest_table`)
are built on it. Slots are found by Python's own hash of the digest, which
is keyed per process: no chosen content can crowd one slot. Pure: no I/O.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

__all__ = ["DigestTable"]

_DIGEST_BYTES = 32
_EMPTY = -1


class DigestTable:
    """Distinct 32-byte digests, numbered 0, 1, ... in the order they were first added."""

    __slots__ = ("_digests", "_mask", "_slots")

    def __init__(self, digests: Iterable[bytes] = (), *, expected: int = 0) -> None:
        size = 8
        while size < 2 * expected:
            size *= 2
        self._slots = array("i", [_EMPTY]) * size
        self._mask = size - 1
        self._digests = bytearray()
        for digest in digests:
            self.add(digest)

    def __len__(self) -> int:
        return len(self._digests) // _DIGEST_BYTES

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, bytes) and self.find(digest) != _EMPTY

    def __iter__(self) -> Iterator[bytes]:
        view = bytes(self._digests)
        for start in range(0, len(view), _DIGEST_BYTES):
            yield view[start : start + _DIGEST_BYTES]

    def __repr__(self) -> str:
        return f"<DigestTable of {len(self)} digests>"

    def find(self, digest: bytes) -> int:
        """``digest``'s number, or -1 when it was never added."""
        slots, digests, mask = self._slots, self._digests, self._mask
        i = hash(digest) & mask
        while True:
            n = slots[i]
            if n == _EMPTY:
                return _EMPTY
            start = n * _DIGEST_BYTES
            if digests[start : start + _DIGEST_BYTES] == digest:
                return n
            i = (i + 1) & mask

    def add(self, digest: bytes) -> int:
        """``digest``'s number: the one it has, or the next when it is new.

        Raises:
            ValueError: not 32 bytes.
        """
        if len(digest) != _DIGEST_BYTES:
            raise ValueError("a chunk digest is 32 bytes")
        slots, digests, mask = self._slots, self._digests, self._mask
        i = hash(digest) & mask
        while True:
            n = slots[i]
            if n == _EMPTY:
                break
            start = n * _DIGEST_BYTES
            if digests[start : start + _DIGEST_BYTES] == digest:
                return n
            i = (i + 1) & mask
        number = len(self)
        slots[i] = number
        digests += digest
        if 2 * (number + 1) > len(slots):
            self._grow()
        return number

    def digest(self, number: int) -> bytes:
        """The digest numbered ``number``.

        Raises:
            IndexError: no such number.
        """
        if not 0 <= number < len(self):
            raise IndexError("no digest of that number")
        start = number * _DIGEST_BYTES
        return bytes(self._digests[start : start + _DIGEST_BYTES])

    def _grow(self) -> None:
        size = 2 * len(self._slots)
        slots = array("i", [_EMPTY]) * size
        mask = size - 1
        view = bytes(self._digests)
        for number, start in enumerate(range(0, len(view), _DIGEST_BYTES)):
            i = hash(view[start : start + _DIGEST_BYTES]) & mask
            while slots[i] != _EMPTY:
                i = (i + 1) & mask
            slots[i] = number
        self._slots, self._mask = slots, mask
