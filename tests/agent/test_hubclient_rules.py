"""The hub client's pure rules: the Uptane cross-check and multipart byte ranges.

The version order is skylift.versions' (tests/test_versions.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from tuf.api.metadata import TargetFile

from skylift.agent.hubclient import cross_check, parse_byteranges
from skylift.agent.ports import PayloadOffer, UpdateRefusedError

SHA = "ab" * 32
CUSTOM: dict[str, Any] = {
    "product": "acme",
    "version": "1.2.0",
    "hardware_ids": ["hw1", "hw2"],
    "payloads": {"rootfs": {"size": 1000, "sha256": "cd" * 32, "slot_class": "rootfs"}},
}


def _target(
    path: str = "1.2.0.head", length: int = 100, sha: str = SHA, **custom: Any
) -> TargetFile:
    return TargetFile(length, {"sha256": sha}, path, {"custom": {**CUSTOM, **custom}})


def _check(director: dict[str, TargetFile], image: dict[str, TargetFile], **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "product": "acme", "hardware_id": "hw1", "installed_version": "1.1.0",
        "allow_downgrade": False,
    }  # fmt: skip
    options.update(kwargs)
    return cross_check(director, image.get, **options)


def test_agreeing_repositories_make_an_offer() -> None:
    target = _target()
    offer = _check({target.path: _target(deployment_id=7)}, {target.path: target})
    assert (offer.version, offer.length, offer.sha256) == ("1.2.0", 100, SHA)
    assert offer.hardware_ids == ("hw1", "hw2")
    assert offer.payloads == (PayloadOffer("rootfs", "rootfs", 1000, "cd" * 32),)
    assert offer.deployment_id == 7
    assert _check({}, {target.path: target}) is None
    assert _check({target.path: target}, {target.path: target}, installed_version="1.2.0") is None


@pytest.mark.parametrize(
    ("director", "image", "kwargs", "reason"),
    [
        ({"1.2.0.head": _target(), "1.3.0.head": _target("1.3.0.head", version="1.3.0")},
         {}, {}, "names 2 targets"),
        ({"1.2.0.head": _target()}, {}, {}, "which the image repository does not list"),
        ({"1.2.0.head": _target(sha="00" * 32)}, {"1.2.0.head": _target()}, {}, "hashes differ"),
        ({"1.2.0.head": _target(length=99)}, {"1.2.0.head": _target()}, {}, "length 99"),
        ({"1.2.0.head": _target()}, {"1.2.0.head": _target(product="other")}, {},
         "for product 'other', not acme"),
        ({"1.2.0.head": _target()}, {"1.2.0.head": _target()}, {"hardware_id": "hw9"},
         r"for hardware \['hw1', 'hw2'\], not this device's hw9"),
        ({"1.2.0.head": _target()}, {"1.2.0.head": _target()}, {"installed_version": "1.10"},
         "older than the installed 1.10"),
        ({"1.2.0.head": _target()}, {"1.2.0.head": _target(version="1.3.0")}, {},
         "does not name version 1.3.0.head"),
        ({"1.2.0.head": _target()}, {"1.2.0.head": _target(version=None)}, {}, "no valid version"),
        ({"1.2.0.head": _target()}, {"1.2.0.head": _target(hardware_ids="hw1")}, {},
         "no list of hardware ids"),
        ({"1.2.0.head": _target()}, {"1.2.0.head": _target(payloads={"rootfs": {"size": -1}})}, {},
         "payload 'rootfs' is malformed"),
        ({"1.2.0.head": _target(length=10**8)}, {"1.2.0.head": _target(length=10**8)}, {},
         "the bundle head is 100000000 bytes"),
    ],
    ids=["two targets", "not listed", "hashes", "length", "product", "hardware", "older",
         "name and version", "no version", "hardware not a list", "bad payload", "huge head"],
)  # fmt: skip
def test_refusals(
    director: dict[str, TargetFile], image: dict[str, TargetFile], kwargs: Any, reason: str
) -> None:
    with pytest.raises(UpdateRefusedError, match=reason):
        _check(director, image, **kwargs)


def test_downgrade_when_allowed() -> None:
    target = _target()
    offer = _check({target.path: target}, {target.path: target}, installed_version="9",
                   allow_downgrade=True)  # fmt: skip
    assert offer.version == "1.2.0"


def _multipart(parts: list[tuple[int, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for start, data in parts:
        out += (
            (
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {start}-{start + len(data) - 1}/1000\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


def test_parses_multipart_byteranges_even_with_the_boundary_in_the_data() -> None:
    parts = [(0, b"--b0undary\r\n"), (500, b"\r\n--b0undary--\r\n" * 3)]
    body = _multipart(parts)
    assert parse_byteranges(body, 'multipart/byteranges; boundary="b0undary"') == parts


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (_multipart([(0, b"abc")])[:-20], "multipart/byteranges; boundary=b0undary", "truncated"),
        (_multipart([(0, b"abc")]), "multipart/byteranges", "no usable boundary"),
        (_multipart([(0, b"abc")]), "application/octet-stream", "not byte ranges"),
        (b"--b0undary\r\nContent-Range: bytes 5-1/9\r\n\r\nx\r\n--b0undary--",
         "multipart/byteranges; boundary=b0undary", "bad Content-Range"),
        (b"--b0undary\r\nContent-Type: x\r\n\r\nabc\r\n--b0undary--",
         "multipart/byteranges; boundary=b0undary", "bad Content-Range"),
        (_multipart([(i * 10, b"x") for i in range(5)]),
         "multipart/byteranges; boundary=b0undary", "over 4 parts"),
        (b"--b0undary--\r\n", "multipart/byteranges; boundary=b0undary", "no part"),
    ],
    ids=["truncated", "no boundary", "not multipart", "backwards range", "no range",
         "too many parts", "empty"],
)  # fmt: skip
def test_refuses_bad_multipart(body: bytes, content_type: str, reason: str) -> None:
    with pytest.raises(UpdateRefusedError, match=reason):
        parse_byteranges(body, content_type, max_parts=4)
