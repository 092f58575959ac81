"""Directory slots: tar payloads extracted in order, include/exclude rules, the tar-split seed.

The extractor is fed real archives written by Python's ``tarfile`` (pax
format: long names, a symbolic link, a hard link, a FIFO, modes) in pieces
of random sizes; the tree is read back; the skeleton must give back the
archive byte for byte. The updater installs a tar payload into A/B
directory slots from the simulated hub, and the second release downloads
only what the first one's seed lacks.
"""

from __future__ import annotations

import io
import os
import random
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from agent.simhub import PRODUCT, SimHub, build_bundle, publish
from skylift.agent.bootloader import SimulatedBootloader
from skylift.agent.config import parse_config
from skylift.agent.dirslot import (
    DirectorySlotError,
    PathRules,
    TarSplitSeed,
    clear_directory,
    extract_stream,
    verify_tree,
)
from skylift.agent.machine import State
from skylift.agent.ports import UpdateRefusedError
from skylift.agent.statefile import Release
from skylift.agent.updater import Updater, verify_head
from skylift.bundle import TrustedKeys
from skylift.trust.keys import generate_private_key, signer_for

LONG = "deep/" + "x" * 120 + "/file.txt"  # longer than ustar's 100-byte name: a pax header


def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None, **kw: object) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    for k, v in kw.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def make_tar(version: int = 1, *, files: int = 40) -> bytes:
    """A small application tree; version 2 changes two files, adds one and drops one."""
    rng = random.Random(7)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "bin", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "lib", type=tarfile.DIRTYPE, mode=0o750)
        _add(tf, "bin/app", b"#!/bin/sh\necho app v%d\n" % version, mode=0o755)
        for i in range(files):
            body = rng.randbytes(rng.randrange(1000, 40_000))
            if version == 2 and i == 3:
                continue  # removed in v2
            if version == 2 and i in (10, 20):
                body = body[:500] + b"changed in v2" + body[513:]
            _add(tf, f"lib/mod{i:02d}.so", body, mode=0o644)
        if version == 2:
            _add(tf, "lib/new.so", rng.randbytes(5000), mode=0o644)
        _add(tf, "empty", b"", mode=0o600)
        _add(tf, LONG, b"long name\n", mode=0o644)
        _add(tf, "bin/link", type=tarfile.SYMTYPE, linkname="app")
        _add(tf, "bin/hard", type=tarfile.LNKTYPE, linkname="bin/app", mode=0o755)
        _add(tf, "run/fifo", type=tarfile.FIFOTYPE, mode=0o640)
    return out.getvalue()


def pieces(data: bytes, seed: int = 3) -> Iterator[bytes]:
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 7, 511, 512, 513, 4096, 70_000))
        yield data[pos : pos + n]
        pos += n


def extract(tmp_path: Path, data: bytes, rules: PathRules | None = None) -> Path:
    root = tmp_path / "slot"
    rules = rules or PathRules(("**",), ())
    clear_directory(root, rules)
    tree, keep = extract_stream(pieces(data), root, rules, tmp_path / "state" / "s.tarsplit")
    verify_tree(root, tree)
    keep("0" * 64)
    return root


def test_extracts_every_member_type_and_reads_back(tmp_path: Path) -> None:
    root = extract(tmp_path, make_tar())
    assert (root / "bin/app").read_bytes() == b"#!/bin/sh\necho app v1\n"
    assert stat.S_IMODE(os.stat(root / "bin/app").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "lib").st_mode) == 0o750
    assert os.readlink(root / "bin/link") == "app"
    assert os.stat(root / "bin/hard").st_ino == os.stat(root / "bin/app").st_ino
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    assert (root / LONG).read_bytes() == b"long name\n"
    assert (root / "empty").read_bytes() == b""
    assert os.stat(root / "lib/mod00.so").st_mtime == 1_700_000_000


def test_the_skeleton_gives_back_the_archive_byte_for_byte(tmp_path: Path) -> None:
    data = make_tar()
    root = extract(tmp_path, data)
    seed = TarSplitSeed(tmp_path / "state" / "s.tarsplit", root)
    try:
        assert seed.size() == len(data)
        assert seed.read_range(0, len(data)) == data
        rng = random.Random(5)
        for _ in range(200):
            start = rng.randrange(len(data))
            n = rng.randrange(min(len(data) - start, 50_000) + 1)
            assert seed.read_range(start, n) == data[start : start + n]
        # A file changed since reads as its new bytes: those chunks will not verify.
        (root / "lib/mod05.so").write_bytes(b"tampered")
        assert seed.read_range(0, len(data)) != data
        with pytest.raises(DirectorySlotError, match="past the end"):
            seed.read_range(len(data) - 1, 2)
    finally:
        seed.close()


def test_verify_tree_notices_a_changed_file_mode_or_link(tmp_path: Path) -> None:
    data = make_tar()
    root = tmp_path / "slot"
    rules = PathRules(("**",), ())
    clear_directory(root, rules)
    tree, _ = extract_stream(pieces(data), root, rules, tmp_path / "s.tarsplit")
    (root / "lib/mod07.so").write_bytes(b"x" * tree["lib/mod07.so"].size)
    with pytest.raises(DirectorySlotError, match="'lib/mod07.so' has other content"):
        verify_tree(root, tree)
    tree.pop("lib/mod07.so")
    os.chmod(root / "bin/app", 0o700)
    tree.pop("bin/hard")
    with pytest.raises(DirectorySlotError, match="'bin/app' has mode 700, not 755"):
        verify_tree(root, tree)
    tree.pop("bin/app")
    os.unlink(root / "bin/link")
    os.symlink("elsewhere", root / "bin/link")
    with pytest.raises(DirectorySlotError, match="'bin/link' points elsewhere"):
        verify_tree(root, tree)


def test_exclude_keeps_paths_and_include_limits_what_is_written(tmp_path: Path) -> None:
    root = tmp_path / "slot"
    (root / "data").mkdir(parents=True)
    (root / "data" / "db.sqlite").write_bytes(b"keep me")
    (root / "stale.txt").write_text("from the previous install")
    (root / "lib").mkdir()
    (root / "lib" / "old.so").write_text("old")
    rules = PathRules(("bin/**", "lib", "data/**"), ("data", "lib/mod1?.so"))
    clear_directory(root, rules)
    assert (root / "data" / "db.sqlite").read_bytes() == b"keep me"
    assert not (root / "stale.txt").exists()
    assert not (root / "lib").exists()
    tree, _ = extract_stream(pieces(make_tar()), root, rules, tmp_path / "s.tarsplit")
    verify_tree(root, tree)
    assert (root / "bin" / "app").exists()
    assert (root / "lib" / "mod09.so").exists()
    assert not (root / "lib" / "mod10.so").exists()  # excluded by lib/mod1?.so
    assert not (root / "empty").exists()  # not included
    assert not (root / "run").exists()
    assert (root / "data" / "db.sqlite").read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("../evil", b"x", {})], "with '..'"),
        ([("/etc/evil", b"x", {})], "absolute member path"),
        (
            [("out", None, {"type": tarfile.SYMTYPE, "linkname": "/tmp"}), ("out/x", b"x", {})],
            "written through 'out'",
        ),
        ([("h", None, {"type": tarfile.LNKTYPE, "linkname": "nowhere"})], "hard link"),
        ([("d", None, {"type": tarfile.DIRTYPE}), ("d", b"x", {})], "would replace a directory"),
    ],
    ids=["dotdot", "absolute", "through-symlink", "dangling-hardlink", "file-over-dir"],
)
def test_unsafe_archives_are_refused(
    tmp_path: Path, members: list[tuple[str, bytes | None, dict[str, object]]], message: str
) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, kw in members:
            _add(tf, name, data, **kw)
    root = tmp_path / "deep" / "slot"
    root.parent.mkdir()
    rules = PathRules(("**",), ())
    clear_directory(root, rules)
    skeleton = tmp_path / "s.tarsplit"
    with pytest.raises(DirectorySlotError, match=message):
        extract_stream(pieces(out.getvalue()), root, rules, skeleton)
    assert not (tmp_path / "deep" / "evil").exists()
    assert not (tmp_path / "evil").exists()
    assert not skeleton.exists()
    assert not skeleton.with_name("s.tarsplit.tmp").exists()


def test_a_truncated_or_trailing_archive_is_refused(tmp_path: Path) -> None:
    data = make_tar()
    rules = PathRules(("**",), ())
    root = tmp_path / "slot"
    clear_directory(root, rules)
    with pytest.raises(DirectorySlotError, match="ends inside a member"):
        extract_stream([data[: len(data) // 2]], root, rules, tmp_path / "s.tarsplit")
    clear_directory(root, rules)
    with pytest.raises(DirectorySlotError, match="after its end-of-archive"):
        extract_stream([data + b"junk"], root, rules, tmp_path / "s.tarsplit")


# -- through the updater ----------------------------------------------------------------


def dir_toml(root: Path) -> str:
    return f"""
[hub]
url = "https://hub.invalid"

[identity]
device_id = "dev-1"
product = "{PRODUCT}"
hardware_id = "board-a"
cert_file = "{root}/identity/device.pem"
key_file = "{root}/identity/device.key"

[[slot]]
class = "app"
name = "A"
type = "directory"
path = "{root}/app-a"
exclude = ["var"]

[[slot]]
class = "app"
name = "B"
type = "directory"
path = "{root}/app-b"
exclude = ["var"]

[bootloader]
kind = "file"

[storage]
state_dir = "{root}/state"
"""


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return signer_for(generate_private_key())


def test_updater_installs_tar_payloads_into_directory_slots_with_the_seed(
    tmp_path: Path, signer: CryptoSigner
) -> None:
    trusted = TrustedKeys((signer.public_key,))
    v1 = publish(build_bundle(signer, "1.0.0", {"app": make_tar(1)}), trusted)
    v2 = publish(build_bundle(signer, "2.0.0", {"app": make_tar(2)}), trusted)
    config = parse_config(dir_toml(tmp_path), base_dir=tmp_path)
    (tmp_path / "app-a" / "var").mkdir(parents=True)
    (tmp_path / "app-b" / "var").mkdir(parents=True)
    (tmp_path / "app-b" / "var" / "log").write_text("device data")
    (tmp_path / "app-b" / "leftover").write_text("removed by the install")
    board = SimulatedBootloader(state_path=tmp_path / "boot.json")
    assert board.boot() == "A"
    hub = SimHub(v1)

    def run() -> State:
        u = Updater(
            config, hub=hub, bootloader=board, reboot=board.boot, sleep=lambda s: None,
            rng=random.Random(1),
        )  # fmt: skip
        out = u.run_once()
        if out.rebooting:
            out = u.run_once()
        return out.state

    assert run() is State.IDLE
    assert board.current() == "B"
    assert (tmp_path / "app-b" / "bin" / "app").read_bytes() == b"#!/bin/sh\necho app v1\n"
    assert (tmp_path / "app-b" / "var" / "log").read_text() == "device data"
    assert not (tmp_path / "app-b" / "leftover").exists()
    first = hub.bytes_served
    assert first >= len(v1.packs["app"]) * 0.9  # nothing to seed from

    hub.release = v2
    hub.bytes_served = 0
    assert run() is State.IDLE
    assert board.current() == "A"
    app_a = tmp_path / "app-a"
    assert (app_a / "bin" / "app").read_bytes() == b"#!/bin/sh\necho app v2\n"
    assert (app_a / "lib" / "new.so").exists()
    assert not (app_a / "lib" / "mod03.so").exists()
    assert b"changed in v2" in (app_a / "lib" / "mod10.so").read_bytes()
    # Seeded from slot B's tree through its skeleton: a fraction of the pack.
    assert 0 < hub.bytes_served < len(v2.packs["app"]) // 4, (
        hub.bytes_served,
        len(v2.packs["app"]),
    )
    committed = [r for r in hub.sink.all() if r.get("state") == "committed"]
    assert [r["details"]["version"] for r in committed] == ["1.0.0", "2.0.0"]


def test_an_image_payload_for_a_directory_slot_is_refused(
    tmp_path: Path, signer: CryptoSigner
) -> None:
    trusted = TrustedKeys((signer.public_key,))
    image = publish(build_bundle(signer, "1.0.0", {"app": bytes(64 * 1024)}), trusted)
    config = parse_config(dir_toml(tmp_path), base_dir=tmp_path)
    with pytest.raises(UpdateRefusedError, match="directory slot and takes tar payloads"):
        o = image.offer
        verify_head(
            image.head, Release(o.product, o.version, o.target_name, o.sha256, o.length), config
        )
