"""A simulated hub for the updater's tests: the HubPort over real bundles, with faults.

:func:`publish` does what the hub's ingest does (``skylift.hub.content``,
which the agent's tests may import but the agent may not): it reads a real
bundle, verifies it, and keeps the head (the TUF target), each payload's
index pages and its pack (codec byte + stored bytes per chunk, in index
order; the agent derives where each chunk starts from the index).
:class:`SimHub` serves one assigned release from those, as the director and
the device gateway would, and records the reports it receives, keeping each
``report_id`` once as the hub does.

Faults (:class:`Faults`): the next N requests fail as unreachable or with a
server error (both :class:`HubUnreachableError`, as the real client raises
them), a chunk that arrives corrupt once or always, an offer refused by the
trust checks, a tampered index.

For the power-loss test the release can be written to a directory
(:func:`save_release`) and the reports kept in a JSON-lines file
(:class:`FileSink`), so the simulator survives the agent being killed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner

from skylift import deltamaker
from skylift.agent.errors import ReportTransportError
from skylift.agent.machine import FINAL_STATES
from skylift.agent.plan import ByteRange
from skylift.agent.ports import (
    DeltaOffer,
    HubUnreachableError,
    Offer,
    PayloadOffer,
    PollAnswer,
    UpdateRefusedError,
)
from skylift.agent.reports import Report
from skylift.bundle import (
    ChunkData,
    HookSource,
    IndexPageData,
    PayloadSource,
    TrustedKeys,
    read_body,
    read_head,
    write_bundle,
)
from skylift.chunks import ChunkingParams

__all__ = [
    "PARAMS",
    "PRODUCT",
    "Faults",
    "FileSink",
    "MemorySink",
    "Published",
    "SimHub",
    "agent_toml",
    "build_bundle",
    "final_reports",
    "images",
    "load_release",
    "publish",
    "save_release",
]

PRODUCT = "acme-gw"
#: Small chunks, so a few MiB image has a few hundred of them.
PARAMS = ChunkingParams.cdc(8 * 1024)
_CREATED = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def build_bundle(
    signer: CryptoSigner,
    version: str,
    images: dict[str, bytes],
    *,
    compatible: tuple[str, ...] = ("board-a",),
    product: str = PRODUCT,
    hooks: dict[str, bytes] | None = None,
) -> bytes:
    """A real signed bundle with one payload per slot class (payload name = class)."""
    out = io.BytesIO()
    with tempfile.TemporaryFile() as spool:
        write_bundle(
            out,
            product=product,
            version=version,
            compatible=compatible,
            payloads=[
                PayloadSource(name, io.BytesIO(data), chunking=PARAMS)
                for name, data in images.items()
            ],
            hooks=[HookSource(p, d) for p, d in (hooks or {}).items()],
            signers=[signer],
            spool=spool,
            created=_CREATED,
        )
    return out.getvalue()


def make_delta(old: bytes, new: bytes, params: ChunkingParams = PARAMS) -> bytes:
    """A per-pair delta from ``old`` to ``new``, as the hub makes it (skylift.deltamaker)."""
    with tempfile.TemporaryDirectory(prefix="simhub-delta-") as tmp:
        old_path, new_path, dest = Path(tmp, "old"), Path(tmp, "new"), Path(tmp, "delta")
        old_path.write_bytes(old)
        new_path.write_bytes(new)
        deltamaker.make_delta(
            old_path,
            new_path,
            params,
            dest,
            old_sha256=hashlib.sha256(old).hexdigest(),
            new_sha256=hashlib.sha256(new).hexdigest(),
        )
        return dest.read_bytes()


def delta_offer(payload: str, from_version: str, old: bytes, delta: bytes) -> DeltaOffer:
    """What the director names for ``delta``."""
    return DeltaOffer(
        payload,
        from_version,
        hashlib.sha256(old).hexdigest(),
        len(old),
        hashlib.sha256(delta).hexdigest(),
        len(delta),
    )


def images(size: int = 2 * 1024 * 1024, seed: int = 11) -> tuple[bytes, bytes]:
    """Two versions of one image: the second mostly shares the first's chunks."""
    rng = random.Random(seed)
    v1 = bytearray()
    while len(v1) < size:
        if rng.random() < 0.3:
            v1 += bytes(rng.randint(1000, 40_000))
        else:
            v1 += rng.randbytes(rng.randint(1000, 30_000))
    v1 = v1[:size]
    v2 = bytearray(v1)
    for _ in range(12):  # a dozen edits, as a point release makes
        at = rng.randrange(0, size - 20_000)
        v2[at : at + 20_000] = rng.randbytes(20_000)
    return bytes(v1), bytes(v2)


def agent_toml(
    root: Path,
    *,
    hooks: dict[str, Path] | None = None,
    hook_timeout_s: float = 5,
    slot_size_bytes: int = 16 * 1024 * 1024,
) -> str:
    """An agent.toml for a device under ``root``: rootfs A/B file slots, the file bootloader."""
    hook_lines = "".join(f'{phase} = "{path}"\n' for phase, path in (hooks or {}).items())
    return f"""
[hub]
url = "https://hub.invalid"
poll_interval_s = 5
poll_jitter_s = 1
backoff_initial_s = 1
backoff_max_s = 8

[identity]
device_id = "dev-1"
product = "{PRODUCT}"
hardware_id = "board-a"
cert_file = "{root}/identity/device.pem"
key_file = "{root}/identity/device.key"

[[slot]]
class = "rootfs"
name = "A"
type = "file"
path = "{root}/slots/rootfs-a.img"
size_bytes = {slot_size_bytes}

[[slot]]
class = "rootfs"
name = "B"
type = "file"
path = "{root}/slots/rootfs-b.img"
size_bytes = {slot_size_bytes}

[bootloader]
kind = "file"

[bootloader.options]
state_path = "{root}/boot.json"

[hooks]
{hook_lines}timeout_s = {hook_timeout_s}

[storage]
state_dir = "{root}/state"
"""


@dataclass
class Published:
    """One release as the hub serves it."""

    offer: Offer
    head: bytes
    indexes: dict[str, bytes]
    packs: dict[str, bytes]


def publish(bundle: bytes, trusted: TrustedKeys, *, deployment_id: int | None = 7) -> Published:
    """Verify ``bundle`` and cut it into what the hub serves (as ``skylift.hub.content`` does)."""
    stream = io.BytesIO(bundle)
    head = read_head(stream)
    head.verify(trusted)
    manifest = head.manifest
    head_bytes = bundle[: head.length]
    indexes: dict[str, bytearray] = {p.name: bytearray() for p in manifest.payloads}
    packs: dict[str, bytearray] = {p.name: bytearray() for p in manifest.payloads}
    for ev in read_body(stream, head):
        if isinstance(ev, IndexPageData):
            indexes[ev.payload.name] += ev.page
        elif isinstance(ev, ChunkData):
            name = ev.payload.name
            packs[name] += bytes([ev.entry.codec]) + ev.stored
    offer = Offer(
        product=manifest.product,
        version=manifest.version,
        target_name=f"{manifest.version}.head",
        length=len(head_bytes),
        sha256=hashlib.sha256(head_bytes).hexdigest(),
        hardware_ids=tuple(manifest.compatible),
        payloads=tuple(
            PayloadOffer(p.name, p.slot_class, p.size, p.sha256) for p in manifest.payloads
        ),
        deployment_id=deployment_id,
    )
    return Published(
        offer,
        head_bytes,
        {k: bytes(v) for k, v in indexes.items()},
        {k: bytes(v) for k, v in packs.items()},
    )


def save_release(release: Published, directory: Path) -> None:
    """Write ``release`` to ``directory`` (head, ``<payload>.index/.pack``, offer.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "head").write_bytes(release.head)
    for name in release.indexes:
        (directory / f"{name}.index").write_bytes(release.indexes[name])
        (directory / f"{name}.pack").write_bytes(release.packs[name])
    o = release.offer
    doc = {
        "product": o.product,
        "version": o.version,
        "target_name": o.target_name,
        "length": o.length,
        "sha256": o.sha256,
        "hardware_ids": list(o.hardware_ids),
        "payloads": [[p.name, p.slot_class, p.size, p.sha256] for p in o.payloads],
        "deployment_id": o.deployment_id,
    }
    (directory / "offer.json").write_text(json.dumps(doc))


def load_release(directory: Path) -> Published:
    """The release :func:`save_release` wrote."""
    doc = json.loads((directory / "offer.json").read_text())
    offer = Offer(
        product=doc["product"],
        version=doc["version"],
        target_name=doc["target_name"],
        length=doc["length"],
        sha256=doc["sha256"],
        hardware_ids=tuple(doc["hardware_ids"]),
        payloads=tuple(PayloadOffer(*p) for p in doc["payloads"]),
        deployment_id=doc["deployment_id"],
    )
    names = [p.name for p in offer.payloads]
    return Published(
        offer,
        (directory / "head").read_bytes(),
        {n: (directory / f"{n}.index").read_bytes() for n in names},
        {n: (directory / f"{n}.pack").read_bytes() for n in names},
    )


# -- report sinks ------------------------------------------------------------------


@dataclass
class MemorySink:
    """Reports as the hub stores them: by ``report_id``, once."""

    reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    def store(self, reports: Sequence[Report]) -> None:
        for r in reports:
            self.reports.setdefault(r.report_id, r.to_wire())

    def all(self) -> list[dict[str, Any]]:
        return list(self.reports.values())


class FileSink:
    """Reports appended to a JSON-lines file (fsynced): survives the agent being killed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def store(self, reports: Sequence[Report]) -> None:
        data = "".join(json.dumps(r.to_wire()) + "\n" for r in reports).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def all(self) -> list[dict[str, Any]]:
        """Every report, once per ``report_id`` (the first copy), as the hub keeps them."""
        seen: dict[str, dict[str, Any]] = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            if line.strip():
                doc = json.loads(line)
                seen.setdefault(doc["report_id"], doc)
        return list(seen.values())


def final_reports(sink: MemorySink | FileSink) -> list[dict[str, Any]]:
    """The distinct final-status reports a sink holds."""
    finals = {s.value for s in FINAL_STATES}
    return [r for r in sink.all() if r.get("kind") == "update" and r.get("state") in finals]


# -- the hub -------------------------------------------------------------------------


@dataclass
class Faults:
    """What the simulated hub does wrong, and how often."""

    down: int = 0  # the next N requests fail as unreachable
    down_message: str = "connection refused"
    corrupt: str | None = None  # "once" or "always": a flipped byte in the first chunk served
    refuse: str | None = None  # check() refuses with this reason
    tamper_index: bool = False  # serve index pages that do not match the manifest
    fail_ranges_after: int | None = None  # unreachable after this many ranges served (once)
    delta_cut_at: int | None = None  # a delta download stops (unreachable) at this byte, once


class SimHub:
    """The HubPort over one assigned release (or none), with :class:`Faults`.

    Like the director after a device reported a final status for a
    deployment, it stops offering a release once it received a final
    report naming that version.
    """

    def __init__(
        self,
        release: Published | None,
        *,
        sink: MemorySink | FileSink | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.release = release
        self.sink = sink if sink is not None else MemorySink()
        self.faults = faults or Faults()
        self.calls: list[str] = []
        self.ranges_served = 0
        self.bytes_served = 0
        self._corrupted = 0
        #: Delta files by ``<payload>.<from sha256>``, as the hub stores them.
        self.deltas: dict[str, bytes] = {}
        self.delta_bytes_served = 0

    # -- fault plumbing

    def _request(self, what: str) -> None:
        self.calls.append(what)
        if self.faults.down > 0:
            self.faults.down -= 1
            raise HubUnreachableError(f"hub unreachable: {self.faults.down_message}")

    def _mine(self, offer: Offer) -> Published:
        if self.release is None or offer.sha256 != self.release.offer.sha256:
            raise UpdateRefusedError("the hub has no such release")
        return self.release

    # -- HubPort

    def poll(self, *, state: str, progress: int | None) -> PollAnswer:
        self._request("poll")
        return PollAnswer(changed=True)

    def check(self, *, installed_version: str | None, allow_downgrade: bool) -> Offer | None:
        self._request("check")
        if self.faults.refuse is not None:
            raise UpdateRefusedError(self.faults.refuse)
        if self.release is None or installed_version == self.release.offer.version:
            return None
        # As the real hub's director does, it keeps naming the release after the
        # device failed or rolled it back: not trying again is the agent's job.
        return self.release.offer

    def fetch_head(self, offer: Offer) -> bytes:
        self._request("head")
        return self._mine(offer).head

    def fetch_index(self, offer: Offer, payload: str) -> bytes:
        self._request("index")
        data = self._mine(offer).indexes[payload]
        if self.faults.tamper_index:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return data

    def fetch_ranges(
        self, offer: Offer, payload: str, ranges: Sequence[ByteRange]
    ) -> Iterator[tuple[ByteRange, bytes]]:
        self._request("ranges")
        pack = self._mine(offer).packs[payload]
        for r in ranges:
            limit = self.faults.fail_ranges_after
            if limit is not None and self.ranges_served >= limit:
                self.faults.fail_ranges_after = None
                raise HubUnreachableError("hub unreachable: connection reset")
            data = bytearray(pack[r.start : r.end])
            corrupt = self.faults.corrupt
            if corrupt == "always" or (corrupt == "once" and self._corrupted == 0):
                self._corrupted += 1
                data[min(1, len(data) - 1)] ^= 0x55  # inside the first chunk asked
            self.ranges_served += 1
            self.bytes_served += len(data)
            yield r, bytes(data)

    def fetch_delta(self, offer: Offer, delta: DeltaOffer, dest: Path) -> int:
        self._request("delta")
        self._mine(offer)
        data = self.deltas.get(f"{delta.payload}.{delta.from_sha256}")
        if data is None:
            raise UpdateRefusedError("delta: the hub answered 404 Not Found")
        have = dest.stat().st_size if dest.exists() else 0
        if have > delta.length:
            dest.unlink()
            have = 0
        end = len(data)
        cut = self.faults.delta_cut_at
        if cut is not None and have < cut < end:
            self.faults.delta_cut_at = None
            end = cut
        with open(dest, "ab") as f:
            f.write(data[have:end])
        self.delta_bytes_served += end - have
        if end < len(data):
            raise HubUnreachableError("hub unreachable: connection reset")
        return end - have

    def send(self, reports: Sequence[Report]) -> None:
        self.calls.append("send")
        if self.faults.down > 0:
            self.faults.down -= 1
            raise ReportTransportError(f"hub unreachable: {self.faults.down_message}")
        self.sink.store(reports)
