"""Per-pair deltas on the device: used when the active slot holds the old release, else chunks.

The updater over real bundles and the simulated hub (as tests/agent/test_updater.py):
the device installs 2.0.0 from chunks (its factory image has no release on
record), commits it, then is offered 3.0.0 with a delta the director names
from 2.0.0. Deltas are made by the hub's own code (skylift.chunks.delta).
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from agent.simhub import Faults, Published, build_bundle, delta_offer, make_delta, publish
from agent.test_updater import V2, Device, make_device
from skylift.agent.machine import State
from skylift.agent.pairdelta import parse_deltas
from skylift.bundle import TrustedKeys
from skylift.chunks import zstreams
from skylift.trust.keys import generate_private_key, signer_for


def _v3() -> bytes:
    rng = random.Random(33)
    v3 = bytearray(V2)
    for _ in range(5):  # small edits in place, as a config change or a patched file
        at = rng.randrange(0, len(v3) - 3000)
        v3[at : at + 3000] = rng.randbytes(3000)
    at = len(v3) // 3  # and one insertion, which shifts what follows
    return bytes(v3[:at] + rng.randbytes(5000) + v3[at:])


V3 = _v3()
DELTA = make_delta(V2, V3)


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return signer_for(generate_private_key())


def _releases(signer: CryptoSigner, v2: bytes, v3: bytes) -> tuple[Published, Published]:
    """2.0.0 and 3.0.0 published, with ``v2`` and ``v3`` as their rootfs."""
    trusted = TrustedKeys((signer.public_key,))
    return (
        publish(build_bundle(signer, "2.0.0", {"rootfs": v2}), trusted),
        publish(build_bundle(signer, "3.0.0", {"rootfs": v3}), trusted),
    )


@pytest.fixture(scope="module")
def releases(signer: CryptoSigner) -> tuple[Published, Published]:
    return _releases(signer, V2, V3)


def _on_v2(tmp_path: Path, releases: tuple[Published, Published]) -> Device:
    """A device that installed and committed 2.0.0 (slot B), then is offered 3.0.0."""
    v2, _ = releases
    dev = make_device(tmp_path, v2, hooks={"health_check": "exit 0"})
    updater = dev.updater()
    assert updater.run_once().rebooting
    assert updater.run_once().state is State.IDLE
    assert updater.installed_versions() == {"B": "2.0.0"}
    dev.hub.calls.clear()
    return dev


def _offer_v3(dev: Device, releases: tuple[Published, Published], delta: bytes = DELTA) -> None:
    _, v3 = releases
    offer = replace(v3.offer, deltas=(delta_offer("rootfs", "2.0.0", V2, delta),))
    dev.hub.release = replace(v3, offer=offer)
    dev.hub.deltas[f"rootfs.{hashlib.sha256(V2).hexdigest()}"] = delta


def _install_v3(dev: Device) -> None:
    updater = dev.updater()
    assert updater.run_once().rebooting
    assert dev.board.current() == "A"
    assert dev.slot("A")[: len(V3)] == V3
    assert updater.run_once().state is State.IDLE
    assert updater.installed_versions() == {"A": "3.0.0", "B": "2.0.0"}


def test_delta_from_the_running_release_is_all_that_is_downloaded(
    tmp_path: Path, releases: tuple[Published, Published]
) -> None:
    dev = _on_v2(tmp_path, releases)
    _offer_v3(dev, releases)
    ranges_before = dev.hub.bytes_served
    _install_v3(dev)
    # Neither the chunk index nor a pack range: the delta replaces both.
    assert "delta" in dev.hub.calls
    assert "index" not in dev.hub.calls and "ranges" not in dev.hub.calls
    assert dev.hub.bytes_served == ranges_before
    assert dev.hub.delta_bytes_served == len(DELTA)
    (installed,) = [r for r in dev.reports("installed") if r["details"]["version"] == "3.0.0"]
    assert installed["details"]["downloaded_bytes"] == len(DELTA)
    # Far less than the chunks it replaces: V3 changed 20 KB of 2 MiB.
    assert len(DELTA) < 60_000
    # Nothing is left behind in the state dir.
    assert not list((tmp_path / "state").rglob("*.delta"))


def test_a_modified_active_slot_is_not_used_as_the_delta_base(
    tmp_path: Path, releases: tuple[Published, Published]
) -> None:
    dev = _on_v2(tmp_path, releases)
    _offer_v3(dev, releases)
    b = tmp_path / "slots" / "rootfs-b.img"
    data = bytearray(b.read_bytes())
    data[100] ^= 1  # a mounted filesystem's superblock changes, say
    b.write_bytes(bytes(data))
    _install_v3(dev)
    # Checked before downloading: no delta bytes, chunks instead.
    assert "delta" not in dev.hub.calls
    assert "index" in dev.hub.calls and "ranges" in dev.hub.calls
    assert dev.hub.delta_bytes_served == 0


def test_a_delta_that_is_not_the_signed_one_falls_back_to_chunks(
    tmp_path: Path, releases: tuple[Published, Published]
) -> None:
    dev = _on_v2(tmp_path, releases)
    _offer_v3(dev, releases)
    key = f"rootfs.{hashlib.sha256(V2).hexdigest()}"
    tampered = bytearray(DELTA)
    tampered[-10] ^= 0x40
    dev.hub.deltas[key] = bytes(tampered)  # the director still names the good one
    _install_v3(dev)
    assert "delta" in dev.hub.calls and "ranges" in dev.hub.calls


def test_a_signed_delta_that_does_not_rebuild_the_payload_falls_back_to_chunks(
    tmp_path: Path, releases: tuple[Published, Published]
) -> None:
    # A hub that made a wrong delta and signed it: the payload's own hash catches it.
    wrong = make_delta(V2, V3[:-1] + bytes([V3[-1] ^ 1]))
    dev = _on_v2(tmp_path, releases)
    _offer_v3(dev, releases, wrong)
    _install_v3(dev)
    assert "delta" in dev.hub.calls and "ranges" in dev.hub.calls


def test_an_interrupted_delta_download_resumes_where_it_stopped(
    tmp_path: Path, releases: tuple[Published, Published]
) -> None:
    dev = _on_v2(tmp_path, releases)
    _offer_v3(dev, releases)
    dev.hub.faults = Faults(delta_cut_at=len(DELTA) // 2)
    first = dev.updater().run_once()
    assert not first.rebooting and first.delay_s and first.delay_s > 0  # back-off
    _install_v3(dev)
    assert dev.hub.delta_bytes_served == len(DELTA)  # the first half was not fetched again
    assert "ranges" not in dev.hub.calls


def test_a_delta_from_another_release_is_not_used(
    tmp_path: Path, releases: tuple[Published, Published]
) -> None:
    dev = _on_v2(tmp_path, releases)
    _offer_v3(dev, releases)
    _, v3 = releases
    other = delta_offer("rootfs", "1.9.0", V2, DELTA)
    dev.hub.release = replace(dev.hub.release, offer=replace(v3.offer, deltas=(other,)))
    _install_v3(dev)
    assert "delta" not in dev.hub.calls and "ranges" in dev.hub.calls


def test_with_deltas_off_the_device_installs_from_chunks(
    tmp_path: Path, releases: tuple[Published, Published]
) -> None:
    dev = _on_v2(tmp_path, releases)
    dev.config = replace(dev.config, download=replace(dev.config.download, deltas=False))
    _offer_v3(dev, releases)
    _install_v3(dev)
    assert "delta" not in dev.hub.calls and "ranges" in dev.hub.calls


def test_director_deltas_are_parsed_strictly_and_malformed_ones_skipped() -> None:
    good = {
        "from_version": "2.0.0",
        "from_sha256": "a" * 64,
        "from_size": 4096,
        "sha256": "b" * 64,
        "length": 1000,
    }
    deltas, skipped = parse_deltas(
        {
            "deltas": {
                "rootfs": [
                    good,
                    {**good, "from_sha256": "A" * 64},  # not lowercase hex
                    {**good, "length": 10},  # shorter than a header
                    {**good, "from_size": True},  # a bool is not a size
                    {**good, "from_version": "../x"},
                    "not an object",
                ],
                "Bad Name": [good],
                "app": "not a list",
            }
        }
    )
    assert [(d.payload, d.from_version, d.length) for d in deltas] == [("rootfs", "2.0.0", 1000)]
    assert len(skipped) == 7
    assert parse_deltas({}) == ((), [])
    assert parse_deltas({"deltas": []}) == ((), ["the director's 'deltas' is not an object"])


# -- payloads of zlib streams (squashfs with gzip) ------------------------------------------------


def _blocks_image(changed: tuple[int, ...]) -> bytes:
    """A squashfs-like payload: a raw header, then 24 blocks of text, each a zlib stream."""
    words = [random.Random(i).randbytes(6).hex() for i in range(300)]
    out = bytearray(b"hsqs" + bytes(92))
    for n in range(24):
        rng = random.Random(n)  # the same blocks in both versions ...
        text = " ".join(rng.choice(words) for _ in range(6000)).encode()
        if n in changed:  # ... but for a few bytes of these
            text = text[:500] + b"patched!" + text[508:]
        out += zlib.compress(text, 9)
    return bytes(out)


Z2 = _blocks_image(())
Z3 = _blocks_image((4, 17))
Z_DELTA = make_delta(Z2, Z3)


@pytest.fixture(scope="module")
def zlib_releases(signer: CryptoSigner) -> tuple[Published, Published]:
    return _releases(signer, Z2, Z3)


def _on_z2_offered_z3(
    tmp_path: Path, releases: tuple[Published, Published], delta: bytes
) -> Device:
    z2, z3 = releases
    dev = make_device(tmp_path, z2, hooks={"health_check": "exit 0"})
    updater = dev.updater()
    assert updater.run_once().rebooting
    assert updater.run_once().state is State.IDLE
    dev.hub.calls.clear()
    offer = replace(z3.offer, deltas=(delta_offer("rootfs", "2.0.0", Z2, delta),))
    dev.hub.release = replace(z3, offer=offer)
    dev.hub.deltas[f"rootfs.{hashlib.sha256(Z2).hexdigest()}"] = delta
    updater = dev.updater()
    assert updater.run_once().rebooting
    assert dev.slot("A")[: len(Z3)] == Z3
    assert updater.run_once().state is State.IDLE
    return dev


def test_a_payload_of_zlib_streams_comes_as_a_zlib_delta(
    tmp_path: Path, zlib_releases: tuple[Published, Published]
) -> None:
    assert Z_DELTA[:4] == b"SKZ1"
    dev = _on_z2_offered_z3(tmp_path, zlib_releases, Z_DELTA)
    assert "delta" in dev.hub.calls and "ranges" not in dev.hub.calls
    assert dev.hub.delta_bytes_served == len(Z_DELTA)
    # Two blocks changed by 8 bytes each: the delta carries those bytes and the tables,
    # where a plain delta would carry both changed blocks whole (about 29 KB).
    assert len(Z_DELTA) < 4000


def test_a_device_whose_zlib_deflates_otherwise_installs_from_chunks(
    tmp_path: Path, zlib_releases: tuple[Published, Published]
) -> None:
    """The delta names level 1 for a changed block where the hub's zlib used 9."""
    header_size = zstreams.HEADER_SIZE
    old_len, new_count, new_len = struct.unpack(">I I I", Z_DELTA[header_size - 12 : header_size])
    new_table = Z_DELTA[header_size + old_len : header_size + old_len + new_len]
    streams = zstreams.parse_table(new_table, new_count, len(Z3))
    k = next(i for i, s in enumerate(streams) if s.source < 0)
    streams[k] = replace(streams[k], level=1)
    table = zstreams.encode_table(streams)
    other = (
        Z_DELTA[: header_size - 4]
        + struct.pack(">I", len(table))
        + Z_DELTA[header_size : header_size + old_len]
        + table
        + Z_DELTA[header_size + old_len + new_len :]
    )
    dev = _on_z2_offered_z3(tmp_path, zlib_releases, other)
    # The delta was fetched and failed at that stream; the chunks made the payload.
    assert "delta" in dev.hub.calls and "ranges" in dev.hub.calls
