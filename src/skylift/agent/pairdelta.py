"""Installing a payload from a per-pair delta, with the chunk plan as the fallback.

The director may name, in its signed custom field of the device's target,
deltas the hub made from earlier releases (:mod:`skylift.chunks.delta`;
docs/adr/0006-per-pair-deltas.md)::

    "deltas": {"rootfs": [{"from_version": "1.0.0", "from_sha256": "<hex>",
                           "from_size": 536870912, "sha256": "<hex>", "length": 226898}]}

The updater uses one when its active slot holds exactly that old payload
(same release version, then the SHA-256 of the slot's first ``from_size``
bytes), downloads it (resumable, its length and SHA-256 as the director
signed them), and writes the new payload into the inactive slot from it:
copies of the active slot and literals decompressed against it (through
the inflated form of both for a zlib delta: a squashfs image compressed with
gzip or xz, whose changed blocks the device compresses again). Whatever
the delta says, what is written must hash to the payload's SHA-256 from
the signed manifest, read back from the slot. Any failure (the slot was
modified, a corrupt delta, a mismatch) is logged and the updater installs
from chunks instead, as it would have without a delta.

Memory: one literal (at most 1 MiB), its dictionary (at most 1 MiB and 64 KiB of
the old payload and 2 MiB of the new bytes just made), those 2 MiB and a copy
buffer; for a zlib delta also the last four old streams inflated and up to
three new ones being deflated (at most 1 MiB each), 2 MiB made and waiting
for them, and the streams' positions: a peak RSS of 57 and 61 MiB for the
corpus's squashfs updates (bench/results/delta-2026-11-30-squashfs-zlib.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from skylift.agent.ports import DeltaOffer
from skylift.agent.slots import SlotDevice
from skylift.chunks.delta import HEADER_SIZE, DeltaError
from skylift.chunks.zstreams import rebuild

__all__ = ["apply_delta", "parse_deltas", "slot_holds"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
_PAYLOAD = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
#: At most this many deltas per payload are read from the director's custom field.
MAX_DELTAS_PER_PAYLOAD = 8
_READ_BYTES = 1024 * 1024
_MAX_SIZE = 1 << 44


def parse_deltas(custom: Mapping[str, Any]) -> tuple[tuple[DeltaOffer, ...], list[str]]:
    """The well-formed deltas of a director target's custom field, and why others were skipped.

    Deltas are optional: a malformed entry is skipped (the device installs
    from chunks), never a reason to refuse the update.
    """
    raw = custom.get("deltas")
    if raw is None:
        return (), []
    if not isinstance(raw, dict):
        return (), ["the director's 'deltas' is not an object"]
    found: list[DeltaOffer] = []
    skipped: list[str] = []
    for payload, entries in raw.items():
        if not isinstance(payload, str) or not _PAYLOAD.fullmatch(payload):
            skipped.append("a delta for a malformed payload name")
            continue
        if not isinstance(entries, list):
            skipped.append(f"deltas of {payload} are not a list")
            continue
        for entry in entries[:MAX_DELTAS_PER_PAYLOAD]:
            delta = _delta(payload, entry)
            if delta is None:
                skipped.append(f"a malformed delta for {payload}")
            else:
                found.append(delta)
    return tuple(found), skipped


def _delta(payload: str, entry: object) -> DeltaOffer | None:
    if not isinstance(entry, dict):
        return None
    version, old, size = entry.get("from_version"), entry.get("from_sha256"), entry.get("from_size")
    digest, length = entry.get("sha256"), entry.get("length")
    if not (
        isinstance(version, str)
        and _VERSION.fullmatch(version)
        and isinstance(old, str)
        and _SHA256.fullmatch(old)
        and isinstance(digest, str)
        and _SHA256.fullmatch(digest)
        and type(size) is int
        and 0 < size <= _MAX_SIZE
        and type(length) is int
        and HEADER_SIZE < length <= _MAX_SIZE
    ):
        return None
    return DeltaOffer(payload, version, old, size, digest, length)


def slot_holds(slot: SlotDevice, size: int, sha256: str) -> bool:
    """Whether the first ``size`` bytes of ``slot`` hash to ``sha256``."""
    if slot.size() < size:
        return False
    h = hashlib.sha256()
    for offset in range(0, size, _READ_BYTES):
        h.update(slot.read_range(offset, min(_READ_BYTES, size - offset)))
    return h.hexdigest() == sha256


def apply_delta(
    delta: BinaryIO,
    *,
    offer: DeltaOffer,
    payload_sha256: str,
    payload_size: int,
    old: SlotDevice,
    new: SlotDevice,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Write the new payload into ``new`` from the delta in ``delta`` and the old one in ``old``.

    ``delta`` is the whole delta file, already checked against the director's
    length and SHA-256. The header must join exactly ``offer``'s old payload
    and the payload the manifest signs; what is written is hashed as it goes
    and read back from ``new`` at the end.

    Raises:
        DeltaError: the delta is malformed, joins other payloads, or does not
            rebuild the payload (the slot read back differs, say).
        OSError, SlotError: reading ``old`` or writing ``new`` failed.
    """
    pieces = rebuild(
        delta.read,
        old.read_range,
        from_sha256=offer.from_sha256,
        from_size=offer.from_size,
        to_sha256=payload_sha256,
        to_size=payload_size,
    )
    for position, data in pieces:
        new.write_at(position, data)
        if on_progress is not None:
            on_progress(position + len(data))
    new.sync()
    if not slot_holds(new, payload_size, payload_sha256):
        raise DeltaError("the slot read back differs from what was written")
