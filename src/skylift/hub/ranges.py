"""HTTP range requests (RFC 9110 §14): parsing ``Range`` and building ``multipart/byteranges``.

Devices fetch the chunks they lack from a pack with one request carrying
many ranges. The parser bounds the number of ranges and merges overlapping
or adjacent ones (a client cannot make the hub read a byte twice), so the
work per request is bounded however the header is written.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_RANGES",
    "ByteRange",
    "RangeNotSatisfiable",
    "multipart_body",
    "parse_range",
]

#: More ranges than this in one request are refused (416): a device merges neighbours first.
MAX_RANGES = 512
_SPEC = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


class RangeNotSatisfiable(Exception):
    """The Range header is malformed, has too many ranges, or none fits the resource (416)."""


@dataclass(frozen=True, order=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive, as HTTP counts them."""

    start: int
    end: int

    @property
    def length(self) -> int:
        """Number of bytes in the range."""
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        """The ``Content-Range`` value for this range of a resource of ``size`` bytes."""
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str, size: int, *, max_ranges: int = MAX_RANGES) -> list[ByteRange]:
    """The ranges of ``header`` that fall within ``size`` bytes, sorted and merged.

    Raises:
        RangeNotSatisfiable: not ``bytes=...``, malformed, more than ``max_ranges``
            ranges, or no range overlaps the resource.
    """
    unit, sep, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not sep:
        raise RangeNotSatisfiable("only byte ranges are supported")
    parts = specs.split(",")
    if len(parts) > max_ranges:
        raise RangeNotSatisfiable(f"more than {max_ranges} ranges in one request")
    ranges: list[ByteRange] = []
    for part in parts:
        m = _SPEC.fullmatch(part)
        if m is None or (not m.group(1) and not m.group(2)):
            raise RangeNotSatisfiable(f"malformed range {part.strip()[:40]!r}")
        first, last = m.group(1), m.group(2)
        if first:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            if last and int(last) < start:
                raise RangeNotSatisfiable(f"malformed range {part.strip()[:40]!r}")
        else:  # suffix: the last N bytes
            n = int(last)
            if n == 0:
                continue
            start, end = max(size - n, 0), size - 1
        if start < size:
            ranges.append(ByteRange(start, end))
    if not ranges:
        raise RangeNotSatisfiable("no range falls within the resource")
    ranges.sort()
    merged = [ranges[0]]
    for r in ranges[1:]:
        last_range = merged[-1]
        if r.start <= last_range.end + 1:  # overlapping or adjacent: one read
            merged[-1] = ByteRange(last_range.start, max(last_range.end, r.end))
        else:
            merged.append(r)
    return merged


def multipart_body(
    parts: Sequence[tuple[ByteRange, bytes]], size: int, content_type: str
) -> tuple[bytes, str]:
    """A ``multipart/byteranges`` body and its Content-Type (with the boundary)."""
    boundary = secrets.token_hex(16)
    out = bytearray()
    for r, data in parts:
        out += (
            f"--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Range: {r.content_range(size)}\r\n\r\n"
        ).encode()
        out += data
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/byteranges; boundary={boundary}"
