"""Installing from local media: a bundle file (USB stick, SD card) served as the hub would.

:class:`LocalBundle` implements :class:`~skylift.agent.ports.HubPort`, so the
updater installs from a file with the very code it uses for the hub: the
same plan, the same seed, the same per-chunk verification before a write.

Trust. The bundle's manifest must be signed by the threshold of the
``targets`` role keys of the product's pinned root.json (the release keys,
ADR 0004), checked with the same functions as ``skylift bundle verify
--root``; then the policy: the product, this device's hardware id in
``compatible``, ``min_agent_version``, and the version rule (not older than
the installed version unless a downgrade is explicitly allowed). The pinned
root is trusted because it is pinned, not because of its expiry date, which
is not checked: a device updated only from USB sticks may not see its hub
for years.

The pack. A bundle file interleaves index pages and chunks, and stores no
codec byte before a chunk; the hub's pack (``skylift.hub.content``) holds
each chunk as *codec byte + stored bytes*, back to back, so chunk *i*
starts at the sum of the sizes of the chunk objects before it
(:func:`skylift.agent.plan.pack_offsets`).
:meth:`LocalBundle.check` reads the whole file once, front to back, through
:func:`skylift.bundle.read_body`, which verifies every index page and every
chunk; as it goes it keeps, per payload, the index pages (the bytes
``fetch_index`` answers), the pack offsets and, per chunk, its codec and the
position of its stored bytes in the file: 17 bytes a chunk beside the
index's 41, which the updater holds whole anyway (``fetch_index`` returns
bytes). No chunk is kept. A pack range is
then answered from pieces: the codec byte from memory, the stored bytes read
from the file (chunks of one page are contiguous in the file, chunks of two
pages are not: an index page lies between them).

So a tampered, truncated or foreign bundle is refused by ``check``, before
the updater has written anything anywhere. Files on removable media can
change under us: the file's identity (device, inode, size, mtime, ctime) is
taken at ``check`` and every later read refuses a file that differs. That is
a fast refusal, not the safety net: everything fetched later is verified
again by its consumer (the head by its SHA-256, the index by the signed page
chain, each chunk by its digest before it is written).

Reports. There is no hub on a USB stick: :meth:`LocalBundle.send` raises
:class:`~skylift.agent.errors.ReportTransportError`, so the reports of a
local install stay in the agent's normal report queue and reach the hub when
the agent next talks to it.

Errors: a bundle that is not trusted or not for this device, or a file that
changed, is :class:`~skylift.agent.ports.UpdateRefusedError` (its reason
names the file and what is wrong, and is logged here); a medium that cannot
be read at all (removed, I/O error) is
:class:`~skylift.agent.ports.HubUnreachableError`, as a network failure is:
nothing was decided about the bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, NoReturn

from skylift import __version__
from skylift.agent.errors import ReportTransportError
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
    BundleError,
    BundleHead,
    ChunkData,
    IndexPageData,
    Limits,
    Manifest,
    TrustedKeys,
    read_body,
    read_head,
)
from skylift.errors import SkyliftError
from skylift.trust.repository import role_keys
from skylift.versions import compare_versions

__all__ = [
    "DEFAULT_MAX_INDEX_BYTES",
    "DEFAULT_MAX_RANGE_BYTES",
    "LocalBundle",
]

log = logging.getLogger("skylift.agent.localmedia")

#: Index pages kept per payload: as the hub's limit (1.2 M chunks, a 16 GiB image in 16 KiB chunks).
DEFAULT_MAX_INDEX_BYTES = 48 * 1024 * 1024
#: The longest pack range one answer may hold (the hub's limit for one request).
DEFAULT_MAX_RANGE_BYTES = 64 * 1024 * 1024
#: Bytes read from the file at once when answering a range (stored chunks are at most ~4 MiB).
_READ_BLOCK_BYTES = 1024 * 1024
_UNTOUCHED = "nothing was installed; the running system is unchanged"
_COPY_AGAIN = "nothing was installed; copy the bundle to the medium again"
#: A pack object: the codec byte, then the stored bytes (as skylift.agent.plan knows it).
_CODEC_BYTES = 1


@dataclass(frozen=True)
class _Stamp:
    """What identifies one version of a file: if any of it changes, so may the bytes."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _PackMap:
    """One payload as a pack: its index pages, and where each chunk's stored bytes are."""

    index: bytearray = field(default_factory=bytearray)
    #: Start of each chunk object in the pack, plus the end: the offsets table.
    offsets: array[int] = field(default_factory=lambda: array("Q", [0]))
    #: Start of each chunk's stored bytes in the bundle file.
    positions: array[int] = field(default_factory=lambda: array("Q"))
    codecs: bytearray = field(default_factory=bytearray)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def add_chunk(self, codec: int, position: int, stored_length: int) -> None:
        self.codecs.append(codec)
        self.positions.append(position)
        self.offsets.append(self.offsets[-1] + _CODEC_BYTES + stored_length)


@dataclass
class _Scanned:
    """What :meth:`LocalBundle.check` learnt and accepted."""

    offer: Offer
    stamp: _Stamp
    head_length: int
    packs: dict[str, _PackMap]


class _ScanStream:
    """A file read once, front to back: counts the bytes read and hashes the head."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.position = 0
        self.head_hash = hashlib.sha256()
        #: Bytes of the head; unknown (None) until the manifest is verified, and
        #: every byte read before that is part of the head anyway.
        self.head_end: int | None = None

    def read(self, n: int = -1, /) -> bytes:
        data = self._f.read(n)
        if self.head_end is None:
            self.head_hash.update(data)
        elif self.position < self.head_end:
            self.head_hash.update(data[: self.head_end - self.position])
        self.position += len(data)
        return data


class LocalBundle:
    """A bundle file on local media, as a :class:`~skylift.agent.ports.HubPort`.

    ``trusted_root`` is the product's pinned image root.json (its ``targets``
    role holds the release keys and their threshold); ``hardware_id`` and
    ``product`` are this device's. ``now`` is the clock (recorded in the
    offer's custom fields). ``agent_version`` is checked against the
    manifest's ``min_agent_version``.

    :meth:`check` reads and verifies the whole file; the ``fetch_*`` methods
    then answer for the offer it returned, and only while the file is
    unchanged. Called without a :meth:`check` (an agent that restarted during
    an install), they scan the file first and answer only if it holds the
    offer's head.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        trusted_root: bytes,
        hardware_id: str,
        product: str,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        agent_version: str = __version__,
        limits: Limits | None = None,
        max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES,
        max_range_bytes: int = DEFAULT_MAX_RANGE_BYTES,
    ) -> None:
        self._path = Path(path)
        self._trusted_root = trusted_root
        self._hardware_id = hardware_id
        self._product = product
        self._now = now
        self._agent_version = agent_version
        self._limits = limits or Limits()
        self._max_index_bytes = max_index_bytes
        self._max_range_bytes = max_range_bytes
        self._polled = False
        self._scanned: _Scanned | None = None

    @property
    def path(self) -> Path:
        """The bundle file."""
        return self._path

    # -- HubPort ---------------------------------------------------------------------------------

    def poll(self, *, state: str, progress: int | None) -> PollAnswer:
        """``changed=True`` the first time (there is a bundle to look at), then False."""
        changed = not self._polled
        self._polled = True
        return PollAnswer(changed=changed)

    def check(self, *, installed_version: str | None, allow_downgrade: bool) -> Offer | None:
        """Verify the whole bundle file and decide whether it is for this device.

        In order: the head (bounded by the reader's limits), the manifest's
        signatures against the pinned root's ``targets`` keys and threshold,
        the product, the hardware id, ``min_agent_version``, the version rule;
        then every hook, index page and chunk to the last byte, keeping what
        the ``fetch_*`` methods need. Returns None if the bundle holds the
        installed version (there is nothing to do), without reading its body.

        Raises:
            UpdateRefusedError: not a bundle, malformed, truncated, tampered with,
                signed by unknown keys or too few, for another product or
                hardware, too new for this agent, older than ``installed_version``
                without ``allow_downgrade``, or the file changed while read.
            HubUnreachableError: the file cannot be opened or read.
        """
        self._scanned = None
        scanned = self._scan(installed_version, allow_downgrade)
        self._scanned = scanned
        return None if scanned is None else scanned.offer

    def fetch_head(self, offer: Offer) -> bytes:
        """The bundle head (preamble, manifest, signatures, hooks), checked against the offer.

        Raises:
            UpdateRefusedError: not the offer :meth:`check` made, or the file changed.
            HubUnreachableError: the file cannot be read.
        """
        scanned = self._for(offer)
        with self._open(scanned.stamp) as (f, _):
            try:
                data = _read_at(f, 0, scanned.head_length)
            except OSError as e:
                raise self._unreadable(e) from e
            if len(data) != scanned.head_length or (
                hashlib.sha256(data).hexdigest() != offer.sha256
            ):
                self._refuse("the file changed since it was checked")
            self._same_file(f, scanned.stamp)
        return data

    def fetch_index(self, offer: Offer, payload: str) -> bytes:
        """The payload's index pages, exactly as the hub serves ``<payload>.index``.

        Raises:
            UpdateRefusedError: not the offer :meth:`check` made, an unknown payload,
                or the file changed since.
        """
        pack = self._pack(offer, payload)
        self._unchanged()
        return bytes(pack.index)

    def fetch_delta(self, offer: Offer, delta: DeltaOffer, dest: Path) -> int:
        """Never: a bundle file carries chunks, not deltas (its offers name none).

        Raises:
            UpdateRefusedError: always.
        """
        self._refuse("a bundle file has no per-pair deltas")

    def fetch_ranges(
        self, offer: Offer, payload: str, ranges: Sequence[ByteRange]
    ) -> Iterable[tuple[ByteRange, bytes]]:
        """Byte ranges of the payload's pack, each assembled from the bundle file.

        A range may span several chunks, which index pages separate in the
        file: each chunk object is its codec byte followed by its stored
        bytes, read from where the file holds them. Ranges are yielded one at
        a time, so memory holds one range (at most ``max_range_bytes``).

        Raises:
            UpdateRefusedError: not the offer :meth:`check` made, an unknown
                payload, a range outside the pack or longer than
                ``max_range_bytes``, or the file changed since it was checked
                (also while the ranges are read).
            HubUnreachableError: the file cannot be read.
        """
        scanned = self._for(offer)
        pack = self._pack(offer, payload)
        for r in ranges:
            if not 0 <= r.start < r.end <= pack.size:
                self._refuse(f"bytes {r.start}-{r.end} are outside the pack of {payload!r}")
            if r.length > self._max_range_bytes:
                self._refuse(
                    f"a range of {r.length} bytes is longer than {self._max_range_bytes} bytes"
                )
        self._unchanged()  # now, not only once the caller starts iterating
        return self._ranges(scanned.stamp, pack, list(ranges))

    def send(self, reports: Sequence[Report]) -> None:
        """Reports cannot be delivered from local media: they stay queued for the hub.

        Raises:
            ReportTransportError: always; the report queue keeps the reports, in order.
        """
        raise ReportTransportError(
            "no hub for local media: reports stay queued",
            hint="they are sent when the agent next reaches its hub",
        )

    # -- internals -------------------------------------------------------------------------------

    def _refuse(
        self, reason: str, cause: SkyliftError | None = None, *, hint: str = _UNTOUCHED
    ) -> NoReturn:
        message = f"bundle {self._path}: {reason}"
        log.warning("local install refused: %s", message)
        raise UpdateRefusedError(message, hint=hint) from cause

    @contextlib.contextmanager
    def _open(self, expected: _Stamp | None = None) -> Iterator[tuple[BinaryIO, _Stamp]]:
        """The file opened for reading: a regular file, and the one checked if ``expected``."""
        try:
            f = open(self._path, "rb")  # noqa: SIM115 (closed by the with below)
        except OSError as e:
            raise self._unreadable(e) from e
        with f:
            try:
                st = os.fstat(f.fileno())
            except OSError as e:
                raise self._unreadable(e) from e
            if not stat.S_ISREG(st.st_mode):
                self._refuse("not a regular file")
            stamp = _Stamp.of(st)
            if expected is not None and stamp != expected:
                self._refuse("the file changed since it was checked")
            yield f, stamp

    def _same_file(self, f: BinaryIO, stamp: _Stamp) -> None:
        try:
            now = _Stamp.of(os.fstat(f.fileno()))
        except OSError as e:
            raise self._unreadable(e) from e
        if now != stamp:
            self._refuse("the file changed since it was checked")

    def _unchanged(self) -> None:
        assert self._scanned is not None  # _pack checked it
        try:
            now = _Stamp.of(os.stat(self._path))
        except OSError as e:
            raise self._unreadable(e) from e
        if now != self._scanned.stamp:
            self._refuse("the file changed since it was checked")

    def _unreadable(self, e: OSError) -> HubUnreachableError:
        log.warning("cannot read %s: %s", self._path, e.strerror or e)
        return HubUnreachableError(
            f"cannot read the bundle {self._path}: {e.strerror or e}",
            hint="check that the medium is inserted and readable",
        )

    def _scan(self, installed_version: str | None, allow_downgrade: bool) -> _Scanned | None:
        """Read and verify the whole file once; what :meth:`check` offers, or None."""
        with self._open() as (f, stamp):
            stream = _ScanStream(f)
            try:
                head = self._verified_head(stream)
                manifest = head.manifest
                self._check_policy(manifest, installed_version, allow_downgrade)
                if (
                    installed_version is not None
                    and compare_versions(manifest.version, installed_version) == 0
                ):
                    log.info(
                        "%s holds the installed %s: nothing to do", self._path, manifest.version
                    )
                    return None
                stream.head_end = head.length
                packs = self._scan_body(stream, head)
            except OSError as e:
                raise self._unreadable(e) from e
            if stream.position != stamp.size:
                self._refuse("the file changed while it was read")
            self._same_file(f, stamp)
        offer = Offer(
            product=manifest.product,
            version=manifest.version,
            target_name=f"{manifest.version}.head",
            length=head.length,
            sha256=stream.head_hash.hexdigest(),
            hardware_ids=manifest.compatible,
            payloads=tuple(
                PayloadOffer(p.name, p.slot_class, p.size, p.sha256) for p in manifest.payloads
            ),
            custom={
                "source": "local-media",
                "path": str(self._path),
                "checked_at": self._now().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "signed_by": list(head.verified_by),
            },
        )
        log.info(
            "%s: %s %s verified (signed by %d release key(s), %d payload(s))",
            self._path,
            manifest.product,
            manifest.version,
            len(head.verified_by),
            len(manifest.payloads),
        )
        return _Scanned(offer, stamp, head.length, packs)

    def _for(self, offer: Offer) -> _Scanned:
        """What the scan of this file learnt, for ``offer`` (its head's SHA-256).

        An agent that restarted in the middle of an install has a new
        :class:`LocalBundle` and an offer rebuilt from its state file: the file
        is then scanned again (signatures, product, hardware and every chunk;
        not the version rule, which was decided when the install began) and
        must hold that very head.
        """
        if self._scanned is None:
            self._scanned = self._scan(None, True)
        scanned = self._scanned
        assert scanned is not None  # no installed version: never "nothing to do"
        if offer.sha256 != scanned.offer.sha256 or offer.length != scanned.offer.length:
            self._refuse(
                f"it holds {scanned.offer.product} {scanned.offer.version}, "
                f"not the release being installed ({offer.version})"
            )
        return scanned

    def _pack(self, offer: Offer, payload: str) -> _PackMap:
        pack = self._for(offer).packs.get(payload)
        if pack is None:
            self._refuse(f"the bundle has no payload {payload!r}")
        return pack

    def _verified_head(self, stream: _ScanStream) -> BundleHead:
        try:
            head = read_head(stream, limits=self._limits)
        except BundleError as e:
            self._refuse(e.message, e, hint=_COPY_AGAIN)
        try:
            keys, threshold = role_keys(self._trusted_root, "targets")
            trusted = TrustedKeys(tuple(keys), threshold)
        except (SkyliftError, ValueError) as e:
            log.warning("the pinned root metadata is unusable: %s", e)
            raise UpdateRefusedError(
                f"the pinned root metadata is unusable: {e}",
                hint="the device image's root.json is damaged; reinstall the device image",
            ) from e
        try:
            head.verify(trusted)
        except BundleError as e:
            self._refuse(
                f"{e.message}; not signed by this product's release keys",
                e,
                hint="nothing was installed; use a bundle released for this product",
            )
        return head

    def _check_policy(
        self, manifest: Manifest, installed_version: str | None, allow_downgrade: bool
    ) -> None:
        if manifest.product != self._product:
            self._refuse(f"it is for product {manifest.product!r}, not {self._product!r}")
        try:
            manifest.require_hardware(self._hardware_id)
        except BundleError as e:
            self._refuse(e.message, e)
        if compare_versions(self._agent_version, manifest.min_agent_version) < 0:
            self._refuse(
                f"it needs agent {manifest.min_agent_version} or later, "
                f"and this agent is {self._agent_version}"
            )
        if (
            installed_version is not None
            and not allow_downgrade
            and compare_versions(manifest.version, installed_version) < 0
        ):
            self._refuse(
                f"version {manifest.version} is older than the installed {installed_version}"
                " (a downgrade must be explicitly allowed)",
                hint="nothing was installed; allow the downgrade explicitly if it is intended",
            )

    def _scan_body(self, stream: _ScanStream, head: BundleHead) -> dict[str, _PackMap]:
        packs = {p.name: _PackMap() for p in head.manifest.payloads}
        try:
            for event in read_body(stream, head, limits=self._limits):
                if isinstance(event, IndexPageData):
                    pack = packs[event.payload.name]
                    if len(pack.index) + len(event.page) > self._max_index_bytes:
                        self._refuse(
                            f"the index of {event.payload.name!r} is larger than "
                            f"{self._max_index_bytes} bytes"
                        )
                    pack.index += event.page
                elif isinstance(event, ChunkData):
                    # read_body yields a chunk right after reading its stored bytes.
                    stored = len(event.stored)
                    packs[event.payload.name].add_chunk(
                        event.entry.codec, stream.position - stored, stored
                    )
        except BundleError as e:
            self._refuse(e.message, e, hint=_COPY_AGAIN)
        return packs

    def _ranges(
        self, stamp: _Stamp, pack: _PackMap, ranges: list[ByteRange]
    ) -> Iterator[tuple[ByteRange, bytes]]:
        with self._open(stamp) as (f, _):
            for r in ranges:
                try:
                    data = self._assemble(f, pack, r)
                except OSError as e:
                    raise self._unreadable(e) from e
                self._same_file(f, stamp)
                yield r, data

    def _assemble(self, f: BinaryIO, pack: _PackMap, r: ByteRange) -> bytes:
        out = bytearray()
        i = bisect_right(pack.offsets, r.start) - 1  # the chunk object holding r.start
        pos = r.start
        while pos < r.end:
            start, end = pack.offsets[i], pack.offsets[i + 1]
            if pos == start:
                out.append(pack.codecs[i])
                pos += _CODEC_BYTES
            stop = min(end, r.end)
            if pos < stop:
                # Object byte ``pos`` is stored byte ``pos - start - 1`` of chunk i.
                at = pack.positions[i] + (pos - start - _CODEC_BYTES)
                data = _read_at(f, at, stop - pos)
                if len(data) != stop - pos:
                    self._refuse("the file changed since it was checked (it is shorter)")
                out += data
                pos = stop
            i += 1
        return bytes(out)


def _read_at(f: BinaryIO, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``offset``, read in bounded blocks; fewer only at the end."""
    f.seek(offset)
    parts: list[bytes] = []
    left = length
    while left:
        block = f.read(min(left, _READ_BLOCK_BYTES))
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)
