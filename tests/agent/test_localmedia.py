"""Installing from a bundle file: verified against the pinned root, served exactly as the hub's pack.

Real signed bundles (the real writer), a real TUF root (skylift.trust), the
real plan and executor into a file slot; the hub's own pack builder
(skylift.hub.content, allowed in tests) is the reference for every answer.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from bundle.conftest import realistic_payload  # tests/ is on sys.path under pytest
from skylift.agent.config import SlotConfig
from skylift.agent.errors import ReportTransportError
from skylift.agent.install import InstallResult, apply_plan
from skylift.agent.journal import InstallJournal, install_id
from skylift.agent.localmedia import LocalBundle
from skylift.agent.plan import ByteRange, make_plan, pack_offsets, seed_index
from skylift.agent.ports import HubPort, HubUnreachableError, Offer, UpdateRefusedError
from skylift.agent.slots import SlotDevice, open_for_install, open_for_reading
from skylift.bundle import (
    ChunkData,
    HookSource,
    IndexPageData,
    Limits,
    PayloadSource,
    TrustedKeys,
    read_body,
    read_head,
    write_bundle,
)
from skylift.bundle.format import pack_preamble
from skylift.chunks import ChunkEntry, ChunkingParams, PageChainVerifier
from skylift.hub.content import ReleaseContent
from skylift.hub.storage import LocalStore
from skylift.trust.keys import generate_private_key, signer_for
from skylift.trust.repository import offline_metadata

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
PRODUCT = "acme-gw"
HARDWARE = "board-a"
#: Small chunks and small pages: many chunks, many index pages between them.
PARAMS = ChunkingParams.cdc(8 * 1024)
ENTRIES_PER_PAGE = 8

V1 = realistic_payload(600_000, seed=21)
V2 = V1[:200_000] + b"a new feature" * 500 + V1[200_000:450_000] + b"\x01" * 777 + V1[451_000:]
APP = random.Random(5).randbytes(300_000)  # incompressible: many chunks, stored raw
HOOK = b"#!/bin/sh\nexit 0\n"


def _signer() -> CryptoSigner:
    return signer_for(generate_private_key())


def make_root(targets: Sequence[CryptoSigner], threshold: int = 1) -> bytes:
    """A product's image root.json whose targets role is ``targets`` (the release keys)."""
    root_key, snapshot_key, timestamp_key = _signer(), _signer(), _signer()
    root, _ = offline_metadata(
        keys={
            "root": [root_key.public_key],
            "targets": [s.public_key for s in targets],
            "snapshot": [snapshot_key.public_key],
            "timestamp": [timestamp_key.public_key],
        },
        thresholds={"targets": threshold},
        signers=[root_key, *targets],
        now=NOW,
    )
    return root


def make_bundle(
    signers: Sequence[CryptoSigner],
    version: str,
    payloads: dict[str, bytes],
    *,
    product: str = PRODUCT,
    compatible: tuple[str, ...] = (HARDWARE, "board-b"),
    min_agent_version: str = "0.1.0",
    hooks: dict[str, bytes] | None = None,
) -> bytes:
    out = io.BytesIO()
    with tempfile.TemporaryFile() as spool:
        write_bundle(
            out,
            product=product,
            version=version,
            compatible=compatible,
            payloads=[
                PayloadSource(name, io.BytesIO(data), chunking=PARAMS)
                for name, data in payloads.items()
            ],
            hooks=[HookSource(p, d) for p, d in (hooks or {}).items()],
            signers=signers,
            spool=spool,
            created=NOW,
            min_agent_version=min_agent_version,
            entries_per_page=ENTRIES_PER_PAGE,
        )
    return out.getvalue()


@dataclass(frozen=True)
class Keys:
    release: CryptoSigner
    second: CryptoSigner
    stranger: CryptoSigner
    root: bytes  # targets: release, threshold 1
    root_of_two: bytes  # targets: release and second, threshold 2


@pytest.fixture(scope="module")
def keys() -> Keys:
    release, second, stranger = _signer(), _signer(), _signer()
    return Keys(
        release, second, stranger, make_root([release]), make_root([release, second], threshold=2)
    )


@pytest.fixture(scope="module")
def v1(keys: Keys) -> bytes:
    return make_bundle([keys.release], "1.0.0", {"rootfs": V1})


@pytest.fixture(scope="module")
def v2(keys: Keys) -> bytes:
    """Two payloads and a hook, so that the second payload sits far into the file."""
    return make_bundle(
        [keys.release], "2.0.0", {"rootfs": V2, "app": APP}, hooks={"post-install": HOOK}
    )


def local(path: Path, keys: Keys, *, root: bytes | None = None, **kw: object) -> LocalBundle:
    return LocalBundle(
        path,
        trusted_root=root or keys.root,
        hardware_id=str(kw.pop("hardware_id", HARDWARE)),
        product=str(kw.pop("product", PRODUCT)),
        now=lambda: NOW,
        **kw,  # type: ignore[arg-type]
    )


def on_disk(tmp_path: Path, data: bytes, name: str = "update.bundle") -> Path:
    path = tmp_path / "usb" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


# -- the reference: what the hub serves for the same bundle ---------------------------------------


@dataclass
class HubRelease:
    head: bytes
    index: dict[str, bytes]
    offsets: dict[str, bytes]
    pack: dict[str, bytes]


def hub_release(tmp_path: Path, bundle: bytes, keys: Keys) -> HubRelease:
    """Ingest ``bundle`` into the hub's real content store, as release push would."""
    trusted = TrustedKeys((keys.release.public_key,))
    stream = io.BytesIO(bundle)
    head = read_head(stream)
    head.verify(trusted)
    indexes: dict[str, bytearray] = {}
    content = ReleaseContent(LocalStore(tmp_path / "hub-objects"))
    for ev in read_body(stream, head):
        if isinstance(ev, IndexPageData):
            indexes.setdefault(ev.payload.name, bytearray()).extend(ev.page)
        elif isinstance(ev, ChunkData):
            content.put_chunk(ev.entry.hexdigest, ev.entry.codec, ev.stored)
    head_bytes = bundle[: head.length]
    content.ingest(
        PRODUCT,
        head=head_bytes,
        indexes={k: bytes(v) for k, v in indexes.items()},
        trusted=trusted,
    )
    store = content._store
    prefix = f"releases/{PRODUCT}/{head.manifest.version}/"

    def get(key: str) -> bytes:
        return store.get(prefix + key, max_bytes=1 << 26)

    names = [p.name for p in head.manifest.payloads]
    return HubRelease(
        head=get("head"),
        index={n: get(f"{n}.index") for n in names},
        offsets={n: get(f"{n}.offsets") for n in names},
        pack={n: get(f"{n}.pack") for n in names},
    )


# -- a good bundle ---------------------------------------------------------------------------------


def test_a_good_bundle_is_offered(tmp_path: Path, keys: Keys, v2: bytes) -> None:
    lb = local(on_disk(tmp_path, v2), keys)
    port: HubPort = lb  # the updater's port, structurally
    offer = port.check(installed_version="1.0.0", allow_downgrade=False)
    assert offer is not None
    head = read_head(io.BytesIO(v2))
    head.verify(TrustedKeys((keys.release.public_key,)))
    assert (offer.product, offer.version, offer.target_name) == (PRODUCT, "2.0.0", "2.0.0.head")
    assert offer.length == head.length
    assert offer.sha256 == hashlib.sha256(v2[: head.length]).hexdigest()
    assert offer.hardware_ids == (HARDWARE, "board-b")
    assert [(p.name, p.slot_class, p.size, p.sha256) for p in offer.payloads] == [
        (p.name, p.slot_class, p.size, p.sha256) for p in head.manifest.payloads
    ]
    assert offer.deployment_id is None
    assert offer.custom["source"] == "local-media"
    assert port.fetch_head(offer) == v2[: head.length]


def test_answers_are_byte_identical_to_the_hubs_pack(tmp_path: Path, keys: Keys, v2: bytes) -> None:
    hub = hub_release(tmp_path, v2, keys)
    lb = local(on_disk(tmp_path, v2), keys)
    offer = lb.check(installed_version=None, allow_downgrade=False)
    assert offer is not None
    assert lb.fetch_head(offer) == hub.head
    for name in ("rootfs", "app"):
        assert lb.fetch_index(offer, name) == hub.index[name]
        pack = hub.pack[name]
        offsets = [o for (o,) in struct.iter_unpack(">Q", hub.offsets[name])]
        # What the agent derives from the index is the hub's offsets table.
        entries = _entries(hub.index[name], hub.head, keys, name)
        assert list(pack_offsets(entries)) == offsets
        assert len(offsets) > 3 * ENTRIES_PER_PAGE  # ranges below cross index pages
        n = len(pack)
        ranges = [
            ByteRange(0, n),  # the whole pack: every page boundary of the file
            ByteRange(0, 1),  # a codec byte alone
            ByteRange(1, 2),  # the first stored byte alone
            ByteRange(offsets[3], offsets[4]),  # one chunk object
            ByteRange(offsets[3] + 1, offsets[4]),  # its stored bytes only
            ByteRange(offsets[5] - 3, offsets[6] + 2),  # straddles chunk objects
            # across the boundary of the first and second index page
            ByteRange(offsets[ENTRIES_PER_PAGE - 1] + 7, offsets[ENTRIES_PER_PAGE + 1] + 5),
            # across many pages, starting and ending mid-object
            ByteRange(offsets[2] + 11, offsets[3 * ENTRIES_PER_PAGE] + 1),
            ByteRange(n - 1, n),  # the very last byte
            *(ByteRange(offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)),
        ]
        answers = list(lb.fetch_ranges(offer, name, ranges))
        assert [r for r, _ in answers] == ranges
        for r, data in answers:
            assert data == pack[r.start : r.end], r


# -- installing with the real plan and executor ----------------------------------------------------


def _slot(path: Path, name: str) -> SlotConfig:
    return SlotConfig("rootfs", name, "file", path, size_bytes=4 << 20)


def _entries(index: bytes, head_bytes: bytes, keys: Keys, payload: str) -> list[ChunkEntry]:
    """What the updater does with fetched index bytes: verify the chain against the manifest."""
    head = read_head(io.BytesIO(head_bytes))
    head.verify(TrustedKeys((keys.release.public_key,)))
    p = head.manifest.payload(payload)
    chain = PageChainVerifier(
        bytes.fromhex(p.index.first_page_sha256),
        chunks=p.chunks,
        payload_length=p.size,
        max_chunk_bytes=p.chunking.max_size,
    )
    entries: list[ChunkEntry] = []
    pos = 0
    while not chain.done:
        (count,) = struct.unpack_from(">I", index, pos + 4)
        size = 72 + 41 * count
        entries += chain.accept(index[pos : pos + size]).entries
        pos += size
    assert pos == len(index)
    return entries


@dataclass
class Installed:
    result: InstallResult
    image: bytes
    read_bytes: int


def install(
    tmp_path: Path,
    lb: LocalBundle,
    offer: Offer,
    keys: Keys,
    *,
    seed_image: bytes | None = None,
) -> Installed:
    """The updater's path from an offer to a written, verified slot."""
    head_bytes = lb.fetch_head(offer)
    entries = _entries(lb.fetch_index(offer, "rootfs"), head_bytes, keys, "rootfs")
    payload = next(p for p in offer.payloads if p.name == "rootfs")
    seed: dict[bytes, tuple[int, int]] = {}
    seed_dev: SlotDevice | None = None
    if seed_image is not None:
        (tmp_path / "a.img").write_bytes(seed_image)
        seed_dev = open_for_reading(_slot(tmp_path / "a.img", "A"))
        with open(tmp_path / "a.img", "rb") as f:
            seed = seed_index(f, PARAMS, len(seed_image), wanted={e.digest for e in entries})
    plan = make_plan(entries, seed)
    read = 0

    def fetch(ranges: Sequence[ByteRange]) -> Iterable[tuple[ByteRange, bytes]]:
        nonlocal read
        for r, data in lb.fetch_ranges(offer, "rootfs", ranges):
            read += len(data)
            yield r, data

    journal = InstallJournal(tmp_path / "rootfs.journal", install_id("rootfs/B", payload.sha256))
    slot = open_for_install(_slot(tmp_path / "b.img", "B"), plan.size)
    try:
        result = apply_plan(
            plan,
            fetch_ranges=fetch,
            slot=slot,
            seed=seed_dev,
            journal=journal,
            payload_sha256=payload.sha256,
        )
    finally:
        slot.close()
        if seed_dev is not None:
            seed_dev.close()
    return Installed(result, (tmp_path / "b.img").read_bytes(), read)


def test_install_from_the_file_unseeded_and_seeded(tmp_path: Path, keys: Keys, v2: bytes) -> None:
    path = on_disk(tmp_path, v2)
    lb = local(path, keys)
    offer = lb.check(installed_version="1.0.0", allow_downgrade=False)
    assert offer is not None

    (tmp_path / "cold").mkdir()
    cold = install(tmp_path / "cold", lb, offer, keys)
    assert cold.image == V2
    assert cold.result.seed_chunks == 0
    assert cold.read_bytes == cold.result.downloaded_bytes

    (tmp_path / "warm").mkdir()
    warm = install(tmp_path / "warm", lb, offer, keys, seed_image=V1)
    assert warm.image == V2
    assert warm.result.seed_chunks > 0
    assert warm.read_bytes < cold.read_bytes / 2  # most of V2 is already in V1


def test_an_agent_restarted_mid_install_resumes_from_the_file(
    tmp_path: Path, keys: Keys, v1: bytes, v2: bytes
) -> None:
    """A new LocalBundle, an offer rebuilt from the state file, no check: the file is
    scanned again, and must hold the head being installed."""
    path = on_disk(tmp_path, v2)
    first = local(path, keys).check(installed_version="1.0.0", allow_downgrade=False)
    assert first is not None
    rebuilt = Offer(
        first.product,
        first.version,
        first.target_name,
        first.length,
        first.sha256,
        first.hardware_ids,
        first.payloads,
    )
    (tmp_path / "resumed").mkdir()
    assert install(tmp_path / "resumed", local(path, keys), rebuilt, keys).image == V2
    path.write_bytes(v1)  # another bundle on the medium now
    with pytest.raises(UpdateRefusedError, match="holds acme-gw 1.0.0, not the release being"):
        local(path, keys).fetch_head(rebuilt)


# -- refusals --------------------------------------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x20
    return bytes(out)


def _head_length(bundle: bytes) -> int:
    _, _, mlen, slen = struct.unpack(">8sIII", bundle[:20])
    return 20 + int(mlen) + int(slen)


@dataclass(frozen=True)
class Refusal:
    """A bundle (made from the keys and a good bundle) and the words its refusal must hold."""

    name: str
    make: Callable[[Keys, bytes], bytes]
    reason: str
    installed: str | None = "0.9.0"
    root: Callable[[Keys], bytes] | None = None
    extra: tuple[tuple[str, object], ...] = ()


REFUSALS = [
    Refusal(
        "signed by an unknown key",
        lambda k, good: make_bundle([k.stranger], "2.0.0", {"rootfs": V1[:50_000]}),
        "not signed by this product's release keys",
    ),
    Refusal(
        "below the threshold",
        lambda k, good: make_bundle([k.release], "2.0.0", {"rootfs": V1[:50_000]}),
        "2 needed",
        root=lambda k: k.root_of_two,
    ),
    Refusal(
        "another product",
        lambda k, good: make_bundle(
            [k.release], "2.0.0", {"rootfs": V1[:50_000]}, product="other-gw"
        ),
        "for product 'other-gw', not 'acme-gw'",
    ),
    Refusal(
        "other hardware",
        lambda k, good: make_bundle(
            [k.release], "2.0.0", {"rootfs": V1[:50_000]}, compatible=("board-z",)
        ),
        "for hardware board-z, not 'board-a'",
    ),
    Refusal(
        "an older version",
        lambda k, good: make_bundle([k.release], "1.9.9", {"rootfs": V1[:50_000]}),
        "older than the installed 2.0.0",
        installed="2.0.0",
    ),
    Refusal(
        "a release candidate of the installed version",
        lambda k, good: make_bundle([k.release], "2.0.0~rc1", {"rootfs": V1[:50_000]}),
        "older than the installed 2.0.0",
        installed="2.0.0",
    ),
    Refusal(
        "too new for this agent",
        lambda k, good: make_bundle(
            [k.release], "2.0.0", {"rootfs": V1[:50_000]}, min_agent_version="9.0"
        ),
        "needs agent 9.0 or later",
    ),
    Refusal("a truncated file", lambda k, good: good[:-100], "ends in the middle of a chunk"),
    Refusal("truncated in its head", lambda k, good: good[:300], "ends in the middle of"),
    Refusal("an empty file", lambda k, good: b"", "ends in the middle of the preamble"),
    Refusal(
        "a bit flipped in the last chunk", lambda k, good: _flip(good, len(good) - 10), "chunk"
    ),
    Refusal(
        "a bit flipped in the first index page",
        lambda k, good: _flip(good, _head_length(good) + 100),
        "index",
    ),
    Refusal("a bit flipped in the manifest", lambda k, good: _flip(good, 60), "manifest"),
    Refusal("a byte after the end", lambda k, good: good + b"\x00", "after the end"),
    Refusal("not a bundle at all", lambda k, good: b"PK\x03\x04" + bytes(100), "not a Skylift"),
    Refusal(
        "an oversized head",
        lambda k, good: pack_preamble(2 << 20, 100) + bytes(1000),
        "the limit is 1048576",
    ),
    Refusal(
        "a head over a lower limit",
        lambda k, good: good,
        "the limit is 100",
        extra=(("limits", Limits(max_manifest_bytes=100)),),
    ),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.name for c in REFUSALS])
def test_refusals(
    tmp_path: Path, keys: Keys, v1: bytes, case: Refusal, caplog: pytest.LogCaptureFixture
) -> None:
    path = on_disk(tmp_path, case.make(keys, v1))
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    lb = local(path, keys, root=case.root(keys) if case.root else None, **dict(case.extra))
    with (
        caplog.at_level(logging.WARNING, logger="skylift.agent.localmedia"),
        pytest.raises(UpdateRefusedError) as exc,
    ):
        lb.check(installed_version=case.installed, allow_downgrade=False)
    assert case.reason in exc.value.message
    assert str(path) in exc.value.message
    assert case.reason in caplog.text  # logged locally
    # nothing written anywhere, and nothing to fetch
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    fake = Offer(PRODUCT, "2.0.0", "2.0.0.head", 1, "0" * 64, (HARDWARE,), ())
    with pytest.raises(UpdateRefusedError):
        lb.fetch_index(fake, "rootfs")


@pytest.mark.parametrize("where", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_a_bit_flipped_anywhere_in_the_body_is_refused(
    tmp_path: Path, keys: Keys, v2: bytes, where: float
) -> None:
    start = _head_length(v2)
    at = start + int((len(v2) - start) * where)
    lb = local(on_disk(tmp_path, _flip(v2, at)), keys)
    with pytest.raises(UpdateRefusedError):
        lb.check(installed_version=None, allow_downgrade=False)


def test_an_older_version_with_a_downgrade_allowed(tmp_path: Path, keys: Keys, v1: bytes) -> None:
    lb = local(on_disk(tmp_path, v1), keys)
    with pytest.raises(UpdateRefusedError, match="older than the installed 2.0.0"):
        lb.check(installed_version="2.0.0", allow_downgrade=False)
    offer = lb.check(installed_version="2.0.0", allow_downgrade=True)
    assert offer is not None
    assert offer.version == "1.0.0"


def test_the_installed_version_is_nothing_to_do(tmp_path: Path, keys: Keys, v1: bytes) -> None:
    lb = local(on_disk(tmp_path, v1), keys)
    assert lb.check(installed_version="1.0.0", allow_downgrade=False) is None
    assert lb.check(installed_version="1.00.0", allow_downgrade=True) is None  # same version
    assert lb.check(installed_version=None, allow_downgrade=False) is not None


def test_a_tampered_bundle_for_another_device_names_the_policy_first(
    tmp_path: Path, keys: Keys
) -> None:
    """Policy is decided on the signed head: another product's bundle is not even scanned."""
    other = make_bundle([keys.release], "2.0.0", {"rootfs": V1[:50_000]}, product="other-gw")
    lb = local(on_disk(tmp_path, _flip(other, len(other) - 10)), keys)
    with pytest.raises(UpdateRefusedError, match="for product 'other-gw'"):
        lb.check(installed_version=None, allow_downgrade=False)


# -- the file changes under us ---------------------------------------------------------------------


def _checked(tmp_path: Path, keys: Keys, bundle: bytes) -> tuple[Path, LocalBundle, Offer]:
    path = on_disk(tmp_path, bundle)
    lb = local(path, keys)
    offer = lb.check(installed_version=None, allow_downgrade=False)
    assert offer is not None
    return path, lb, offer


def _rewrite_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # as FAT would show it


CHANGES: list[tuple[str, Callable[[Path, bytes], object]]] = [
    ("rewritten in place", lambda p, other: _rewrite_same_size(p)),
    ("replaced by another bundle", lambda p, other: p.write_bytes(other)),
    ("cut short", lambda p, other: os.truncate(p, p.stat().st_size - 1000)),
    ("touched", lambda p, other: os.utime(p, ns=(0, 0))),
]

FETCHES: list[tuple[str, Callable[[LocalBundle, Offer], object]]] = [
    ("head", lambda lb, o: lb.fetch_head(o)),
    ("index", lambda lb, o: lb.fetch_index(o, "rootfs")),
    ("ranges", lambda lb, o: list(lb.fetch_ranges(o, "rootfs", [ByteRange(0, 100)]))),
]


@pytest.mark.parametrize(("change", "alter"), CHANGES, ids=[c for c, _ in CHANGES])
@pytest.mark.parametrize(("what", "fetch"), FETCHES, ids=[f for f, _ in FETCHES])
def test_a_file_changed_after_check_is_refused(
    tmp_path: Path,
    keys: Keys,
    v1: bytes,
    v2: bytes,
    change: str,
    alter: Callable[[Path, bytes], object],
    what: str,
    fetch: Callable[[LocalBundle, Offer], object],
) -> None:
    path, lb, offer = _checked(tmp_path, keys, v2)
    fetch(lb, offer)  # fine before
    alter(path, v1)
    with pytest.raises(UpdateRefusedError, match="since it was checked"):
        fetch(lb, offer)


@pytest.mark.parametrize(("what", "fetch"), FETCHES, ids=[f for f, _ in FETCHES])
def test_a_medium_removed_after_check_is_unreachable(
    tmp_path: Path,
    keys: Keys,
    v2: bytes,
    what: str,
    fetch: Callable[[LocalBundle, Offer], object],
) -> None:
    """Nothing is decided about the bundle: as with a hub that went away, try again later."""
    path, lb, offer = _checked(tmp_path, keys, v2)
    path.unlink()
    with pytest.raises(HubUnreachableError, match="cannot read the bundle"):
        fetch(lb, offer)


def test_a_file_changed_while_ranges_are_read(tmp_path: Path, keys: Keys, v2: bytes) -> None:
    path, lb, offer = _checked(tmp_path, keys, v2)
    answers = iter(lb.fetch_ranges(offer, "rootfs", [ByteRange(0, 100), ByteRange(100, 200)]))
    next(answers)
    _rewrite_same_size(path)
    with pytest.raises(UpdateRefusedError, match="since it was checked"):
        next(answers)


# -- the port's other answers ----------------------------------------------------------------------


def test_fetches_answer_only_for_the_checked_offer(tmp_path: Path, keys: Keys, v2: bytes) -> None:
    path = on_disk(tmp_path, v2)
    lb = local(path, keys)
    fake = Offer(PRODUCT, "2.0.1", "2.0.1.head", 1, "0" * 64, (HARDWARE,), ())
    with pytest.raises(UpdateRefusedError, match=r"holds acme-gw 2\.0\.0, not the release being"):
        lb.fetch_head(fake)  # before check: scanned, and not what is asked for
    offer = lb.check(installed_version=None, allow_downgrade=False)
    assert offer is not None
    with pytest.raises(UpdateRefusedError, match="not the release being installed"):
        lb.fetch_index(fake, "rootfs")
    with pytest.raises(UpdateRefusedError, match="no payload 'kernel'"):
        lb.fetch_index(offer, "kernel")
    head_bytes = lb.fetch_head(offer)
    size = pack_offsets(_entries(lb.fetch_index(offer, "app"), head_bytes, keys, "app"))[-1]
    for bad in (ByteRange(size - 1, size + 1), ByteRange(5, 5), ByteRange(-1, 3)):
        with pytest.raises(UpdateRefusedError, match="outside the pack"):
            lb.fetch_ranges(offer, "app", [bad])


def test_ranges_longer_than_the_limit_are_refused(tmp_path: Path, keys: Keys, v2: bytes) -> None:
    lb = local(on_disk(tmp_path, v2), keys, max_range_bytes=1000)
    offer = lb.check(installed_version=None, allow_downgrade=False)
    assert offer is not None
    assert len(next(iter(lb.fetch_ranges(offer, "rootfs", [ByteRange(0, 1000)])))[1]) == 1000
    with pytest.raises(UpdateRefusedError, match="longer than 1000 bytes"):
        lb.fetch_ranges(offer, "rootfs", [ByteRange(0, 1001)])


def test_an_index_over_the_limit_is_refused(tmp_path: Path, keys: Keys, v2: bytes) -> None:
    lb = local(on_disk(tmp_path, v2), keys, max_index_bytes=500)
    with pytest.raises(UpdateRefusedError, match="index of 'rootfs' is larger than 500 bytes"):
        lb.check(installed_version=None, allow_downgrade=False)


def test_poll_says_changed_once(tmp_path: Path, keys: Keys, v1: bytes) -> None:
    lb = local(on_disk(tmp_path, v1), keys)
    assert lb.poll(state="idle", progress=None).changed
    assert not lb.poll(state="idle", progress=None).changed


def test_reports_stay_queued_for_the_hub(tmp_path: Path, keys: Keys, v1: bytes) -> None:
    """The queue keeps what a sink does not confirm: local installs report when the hub is back."""
    from skylift.agent.machine import State
    from skylift.agent.reports import KIND_UPDATE, ReportQueue

    lb = local(on_disk(tmp_path, v1), keys)
    queue = ReportQueue(tmp_path / "spool")
    queue.enqueue(KIND_UPDATE, state=State.IDLE, result="success", reason="installed from usb")
    with pytest.raises(ReportTransportError, match="no hub for local media"):
        queue.deliver(lb)
    assert len(queue.pending()) == 1


def test_a_missing_file_or_a_directory(tmp_path: Path, keys: Keys) -> None:
    missing = local(tmp_path / "nothing.bundle", keys)
    with pytest.raises(HubUnreachableError, match="cannot read the bundle"):
        missing.check(installed_version=None, allow_downgrade=False)
    directory = local(tmp_path, keys)
    with pytest.raises((UpdateRefusedError, HubUnreachableError)):
        directory.check(installed_version=None, allow_downgrade=False)


def test_an_unusable_pinned_root_refuses(tmp_path: Path, keys: Keys, v1: bytes) -> None:
    lb = local(on_disk(tmp_path, v1), keys, root=b'{"signed": {}}')
    with pytest.raises(UpdateRefusedError, match="pinned root metadata is unusable"):
        lb.check(installed_version=None, allow_downgrade=False)
