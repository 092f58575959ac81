"""Range headers: parsed within bounds, merged, and answered as multipart/byteranges."""

from __future__ import annotations

import email.parser
import email.policy

import pytest

from skylift.hub.ranges import ByteRange, RangeNotSatisfiable, multipart_body, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, [(0, 9)]),
        ("bytes=90-", 100, [(90, 99)]),
        ("bytes=-10", 100, [(90, 99)]),
        ("bytes=-500", 100, [(0, 99)]),
        ("bytes=95-200", 100, [(95, 99)]),
        ("bytes=0-9, 20-29", 100, [(0, 9), (20, 29)]),
        ("bytes=20-29,0-9", 100, [(0, 9), (20, 29)]),
        ("bytes=0-9,10-19", 100, [(0, 19)]),  # adjacent: merged
        ("bytes=0-50,10-20", 100, [(0, 50)]),  # contained
        ("bytes=0-9,200-300", 100, [(0, 9)]),  # the one outside is dropped
        ("BYTES = 5-5", 100, [(5, 5)]),
    ],
)
def test_parse(header: str, size: int, expected: list[tuple[int, int]]) -> None:
    assert [(r.start, r.end) for r in parse_range(header, size)] == expected


@pytest.mark.parametrize(
    "header",
    [
        "items=0-1",
        "bytes",
        "bytes=",
        "bytes=a-b",
        "bytes=5-1",
        "bytes=-",
        "bytes=200-300",
        "bytes=-0",
        "bytes=1-2-3",
        "bytes=" + ",".join(["0-1"] * 513),
    ],
)
def test_refused(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def test_multipart_body_parses_back() -> None:
    data = bytes(range(256)) * 4
    ranges = parse_range("bytes=0-3,100-199,1000-", len(data))
    body, content_type = multipart_body(
        [(r, data[r.start : r.end + 1]) for r in ranges], len(data), "application/octet-stream"
    )
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = list(msg.iter_parts())
    assert [p["Content-Range"] for p in parts] == [
        "bytes 0-3/1024",
        "bytes 100-199/1024",
        "bytes 1000-1023/1024",
    ]
    assert [p.get_payload(decode=True) for p in parts] == [data[0:4], data[100:200], data[1000:]]


def test_byte_range() -> None:
    r = ByteRange(10, 19)
    assert r.length == 10
    assert r.content_range(50) == "bytes 10-19/50"
