"""``skylift bundle``: create, inspect, verify and extract, and every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from .conftest import PASSPHRASE, Result, Skylift, SkyliftInProcess


def test_inspect_table_and_json(skylift_fast: SkyliftInProcess, made: Path) -> None:
    r = skylift_fast("bundle", "inspect", made)
    assert r.code == 0
    for text in ("acme-gw", "2.0.1", "board-a, board-b", "rootfs", "kernel", "fixed 4K",
                 "health-check", "not checked"):  # fmt: skip
        assert text in r.out, text
    r = skylift_fast("bundle", "inspect", made, "--json", "--key", "release.pub")
    doc = json.loads(r.out)
    assert doc["verified"] is True and doc["signatures"][0]["verified"] is True
    rootfs = next(p for p in doc["payloads"] if p["name"] == "rootfs")
    image = (made.parent / "rootfs.img").read_bytes()
    assert rootfs["sha256"] == hashlib.sha256(image).hexdigest()
    assert rootfs["size"] == len(image)


def test_verify_and_extract(skylift_fast: SkyliftInProcess, made: Path, tmp_path: Path) -> None:
    r = skylift_fast("bundle", "verify", made, "--key", "release.pub", "--hardware", "board-b")
    assert r.code == 0 and r.out.startswith("OK: acme-gw 2.0.1, signed by 1 trusted key(s)")
    r = skylift_fast("bundle", "extract", made, "--key", "release.pub", "-o", "out",
                "--payload", "kernel=kernel-copy.bin")  # fmt: skip
    assert r.code == 0, r.err
    assert (tmp_path / "out/rootfs.img").read_bytes() == (tmp_path / "rootfs.img").read_bytes()
    assert (tmp_path / "kernel-copy.bin").read_bytes() == (tmp_path / "kernel.img").read_bytes()
    hook = tmp_path / "out/hooks/health-check"
    assert hook.read_text() == "#!/bin/sh\nexit 0\n" and os.access(hook, os.X_OK)


def test_extract_from_a_pipe(skylift: Skylift, made: Path, tmp_path: Path) -> None:
    r = skylift("bundle", "extract", "-", "--key", "release.pub", "-o", "piped",
                stdin=made.read_bytes())  # fmt: skip
    assert r.code == 0, r.err
    assert (tmp_path / "piped/rootfs.img").read_bytes() == (tmp_path / "rootfs.img").read_bytes()


def test_create_from_a_pipe(skylift: Skylift, tmp_path: Path) -> None:
    skylift("keys", "generate", "k")
    data = os.urandom(500_000)
    r = skylift("bundle", "create", "--product", "p", "--version", "1", "--hardware", "h",
                "--payload", "rootfs=-", "--key", "k.key", "-o", "p.bundle", stdin=data)  # fmt: skip
    assert r.code == 0, r.err
    assert skylift("bundle", "extract", "p.bundle", "--key", "k.pub", "-o", "x").code == 0
    assert (tmp_path / "x/rootfs.img").read_bytes() == data


def test_default_chunking_per_payload_type_and_the_override(
    skylift_fast: SkyliftInProcess, made: Path, tmp_path: Path
) -> None:
    """ext4 gets fixed blocks, other data FastCDC 16K (ADR 0005); --chunking still wins."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
    if mkfs is None:
        pytest.skip("mkfs.ext4 is not installed (Debian package e2fsprogs)")
    with open(tmp_path / "rootfs.ext4", "wb") as f:
        f.truncate(8 << 20)
    subprocess.run([mkfs, "-q", "-F", "-b", "4096", str(tmp_path / "rootfs.ext4")], check=True)
    create = ("bundle", "create", "--product", "p", "--version", "1", "--hardware", "h",
              "--payload", "rootfs=rootfs.ext4", "--payload", "app=rootfs.img",
              "--key", "release.key")  # fmt: skip
    r = skylift_fast(*create, "-o", "default.bundle")
    assert r.code == 0, r.err
    assert "  rootfs: ext4, fixed 4K, 2048 chunks" in r.err
    assert "  app: raw, fastcdc-2020 4K/16K/64K, " in r.err
    rows = _payload_rows(skylift_fast("bundle", "inspect", "default.bundle"))
    assert rows["rootfs"][:3] == ["rootfs", "ext4", "8.0 MiB"]
    assert (rows["rootfs"][5], rows["app"][5]) == ("fixed 4K", "fastcdc-2020 4K/16K/64K")
    r = skylift_fast(*create, "--chunking", "rootfs=cdc:64K", "--chunking", "app=fixed:8K",
                     "-o", "chosen.bundle")  # fmt: skip
    assert r.code == 0, r.err
    rows = _payload_rows(skylift_fast("bundle", "inspect", "chosen.bundle"))
    assert (rows["rootfs"][5], rows["app"][5]) == ("fastcdc-2020 16K/64K/256K", "fixed 8K")


def _payload_rows(r: Result) -> dict[str, list[str]]:
    """``inspect``'s payload table: name -> [slot, type, size, stored, chunks, chunking, …]."""
    assert r.code == 0, r.err
    cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in r.out.splitlines() if "│" in ln]
    return {row[0]: row[1:] for row in cells if len(row) == 8 and row[0] != "name"}


def _flip(path: Path, where: float) -> Path:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x04
    bad = path.with_name("bad.bundle")
    bad.write_bytes(bytes(data))
    return bad


def _cut(path: Path, n: int) -> Path:
    bad = path.with_name("bad.bundle")
    bad.write_bytes(path.read_bytes()[:n])
    return bad


def _version(path: Path, v: int) -> Path:
    data = path.read_bytes()
    bad = path.with_name("bad.bundle")
    bad.write_bytes(data[:8] + struct.pack(">I", v) + data[12:])
    return bad


def _oversize(path: Path) -> Path:
    data = path.read_bytes()
    bad = path.with_name("bad.bundle")
    bad.write_bytes(data[:12] + struct.pack(">I", 64 << 20) + data[16:])
    return bad


CASES = [
    # (id, make the bad input, extra args, what the one error line says)
    (
        "bit flipped in a chunk",
        lambda p: _flip(p, 0.6),
        [],
        "digest mismatch|stored chunk bytes|zstd",
    ),
    ("bit flipped in the manifest", lambda p: _flip(p, 0.0002), [], "valid signature|magic"),
    ("truncated", lambda p: _cut(p, 400_000), [], "bundle ends in the middle of"),
    ("empty file", lambda p: _cut(p, 0), [], "bundle ends in the middle of the preamble"),
    ("unknown format version", lambda p: _version(p, 7), [], "format version 7 is not supported"),
    ("oversized manifest", _oversize, [], "manifest declares 67108864 bytes; the limit"),
    ("wrong key", lambda p: p, ["--key", "other.pub"], "0 valid signature"),
    ("hardware mismatch", lambda p: p, ["--hardware", "board-z"], "not 'board-z'"),
    ("not a file", lambda p: p.with_name("nope.bundle"), [], "cannot read"),
]


@pytest.mark.parametrize(
    ("make", "args", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("command", ["verify", "extract"])
def test_refusals_are_one_line_and_leave_nothing(
    skylift_fast: SkyliftInProcess,
    made: Path,
    tmp_path: Path,
    make,
    args,
    message,
    command,  # type: ignore[no-untyped-def]
) -> None:
    bad = make(made)
    key = [] if "--key" in args else ["--key", "release.pub"]
    extra = ["-o", "out"] if command == "extract" else []
    r: Result = skylift_fast("bundle", command, bad, *key, *args, *extra)
    assert r.code == 1
    import re

    assert re.search(message, r.error_line), r.error_line
    if command == "extract":
        left = (
            sorted(p.name for p in (tmp_path / "out").rglob("*"))
            if (tmp_path / "out").exists()
            else []
        )
        assert left == [], left


def test_forged_payload_name_cannot_escape(
    skylift_fast: SkyliftInProcess, made: Path, tmp_path: Path
) -> None:
    """A validly signed manifest naming ../ is refused before anything is written."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from bundle.conftest import forge  # the same forging helper the library tests use
    from skylift.trust.keys import load_private_key, signer_for

    signer = signer_for(
        load_private_key((tmp_path / "release.key").read_bytes(), PASSPHRASE.encode())
    )

    def rename(m: dict) -> None:  # type: ignore[type-arg]
        m["payloads"][0]["name"] = "../escaped"

    (tmp_path / "evil.bundle").write_bytes(forge(made.read_bytes(), signer, rename))
    r = skylift_fast("bundle", "extract", "evil.bundle", "--key", "release.pub", "-o", "out/inner")
    assert r.code == 1 and "'../escaped' is not allowed" in r.error_line
    assert not (tmp_path / "out/escaped.img").exists()
    assert not list(tmp_path.rglob("*escaped*"))


def test_usage_errors(skylift_fast: SkyliftInProcess, skylift: Skylift, made: Path) -> None:
    r = skylift_fast("bundle", "verify", made)
    assert r.code == 1 and "give the release public key" in r.error_line
    r = skylift_fast("bundle", "create", "--product", "p", "--version", "1", "--hardware", "h",
                "--payload", "rootfs", "--key", "release.key", "-o", "x.bundle")  # fmt: skip
    assert r.code == 1 and "--payload takes NAME=VALUE" in r.error_line
    r = skylift_fast("bundle", "create", "--product", "p", "--version", "1", "--hardware", "h",
                "--payload", "rootfs=rootfs.img", "--chunking", "rootfs=fixed:100",
                "--key", "release.key", "-o", "x.bundle")  # fmt: skip
    assert r.code == 1 and "power of two" in r.error_line and "--chunking" in r.error_line
    r = skylift_fast("bundle", "create", "--product", "p", "--version", "1", "--hardware", "h",
                "--payload", "../x=rootfs.img", "--key", "release.key", "-o", "x.bundle")  # fmt: skip
    assert r.code == 1 and "not allowed" in r.error_line
    assert not (made.parent / "x.bundle").exists()
    assert not list(made.parent.glob(".x.bundle*")) and not list(
        made.parent.glob(".skylift-spool*")
    )
    r = skylift("bundle", "frobnicate")
    assert r.code == 2 and "Traceback" not in r.err


def _root_json(tmp_path: Path, targets_key: Path) -> Path:
    """A TUF root (made by skylift.trust) whose targets role is ``targets_key``."""
    from datetime import UTC, datetime

    from skylift.trust.keys import generate_private_key, load_private_key, signer_for
    from skylift.trust.repository import Repository

    release = signer_for(load_private_key(targets_key.read_bytes(), PASSPHRASE.encode()))
    online = [signer_for(generate_private_key()) for _ in range(3)]
    repo = Repository.create(
        keys={
            "root": [online[0].public_key],
            "targets": [release.public_key],
            "snapshot": [online[1].public_key],
            "timestamp": [online[2].public_key],
        },
        thresholds=None,
        signers=[release, *online],
        now=datetime.now(UTC),
    )
    root = tmp_path / f"root-{targets_key.stem}.json"
    root.write_bytes(repo.publish()["metadata/root.json"])
    return root


def test_trust_from_a_tuf_root(skylift_fast: SkyliftInProcess, made: Path, tmp_path: Path) -> None:
    """--root trusts the targets role of a pinned root.json: the release key's, or nobody's."""
    good = _root_json(tmp_path, tmp_path / "release.key")
    other = _root_json(tmp_path, tmp_path / "other.key")
    r = skylift_fast("bundle", "verify", made, "--root", good)
    assert r.code == 0, r.err
    r = skylift_fast("bundle", "inspect", made, "--root", good, "--json")
    assert json.loads(r.out)["verified"] is True
    r = skylift_fast("bundle", "extract", made, "--root", other, "-o", "out")
    assert r.code == 1
    assert "0 valid signature" in r.error_line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # a root.json that was tampered with does not verify by its own keys
    doc = json.loads(good.read_text())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    good.write_text(json.dumps(doc))
    r = skylift_fast("bundle", "verify", made, "--root", good)
    assert r.code == 1
    assert "root" in r.error_line


def test_extract_to_a_device(skylift_fast: SkyliftInProcess, made: Path) -> None:
    """A device is written in place (never replaced by a rename)."""
    dev = Path("/dev/null")
    r = skylift_fast("bundle", "extract", made, "--key", "release.pub", "-o", "out",
                     "--payload", f"rootfs={dev}")  # fmt: skip
    assert r.code == 0, r.err
    assert f"rootfs: 1.3 MiB -> {dev}" in r.out
    import stat

    assert stat.S_ISCHR(dev.stat().st_mode)
    assert (made.parent / "out/kernel.img").exists()


def test_os_errors_are_one_line(skylift_fast: SkyliftInProcess, made: Path, tmp_path: Path) -> None:
    """A destination that cannot be written is reported in one line, not a traceback."""
    (tmp_path / "plain").write_text("a file where a directory should be")
    r = skylift_fast("bundle", "extract", made, "--key", "release.pub", "-o", "out",
                     "--payload", f"rootfs={tmp_path / 'plain/sub/rootfs.img'}")  # fmt: skip
    assert r.code == 1
    assert "plain" in r.error_line
    assert not (tmp_path / "out/kernel.img").exists()
