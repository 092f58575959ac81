"""The bundle manifest: what a bundle holds, for which product and hardware.

The manifest is canonical JSON (sorted keys, no spaces, ASCII) and is signed
as bytes. A reader refuses a manifest whose bytes are not the canonical
encoding of what they parse to, so there is exactly one byte string for
each manifest (no duplicate keys, no alternative spellings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from skylift.bundle.errors import HardwareMismatchError, ManifestError, UnsafePayloadNameError
from skylift.chunks import ChunkingParams, ChunkingParamsError

__all__ = [
    "FORMAT_VERSION",
    "HOOK_PHASES",
    "MANIFEST_TYPE",
    "HookEntry",
    "IndexRef",
    "Manifest",
    "PayloadEntry",
    "canonical_json",
    "check_name",
]

FORMAT_VERSION = 1
MANIFEST_TYPE = "skylift-bundle-manifest"
HOOK_PHASES = ("pre-install", "post-install", "health-check", "on-rollback")
PAYLOAD_TYPES = ("ext4", "erofs", "squashfs", "tar", "vfat", "raw")

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_PRODUCT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_MAX_PAYLOADS = 16
_MAX_HARDWARE = 256


def canonical_json(obj: Any) -> bytes:
    """The one byte encoding Skylift signs: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def check_name(name: str, what: str = "payload name") -> str:
    """Return ``name`` if it is safe as a file name component, else raise.

    Names are lowercase letters, digits, ``-`` and ``_``, starting with a
    letter or digit: no separators, no dots, nothing that escapes a directory.

    Raises:
        UnsafePayloadNameError: the name does not match.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UnsafePayloadNameError(
            f"{what} {name!r} is not allowed: use a-z, 0-9, '-' and '_' (at most 63)"
        )
    return name


@dataclass(frozen=True)
class IndexRef:
    """Where a payload's chunk index starts and how it is laid out."""

    first_page_sha256: str
    pages: int
    entries_per_page: int


@dataclass(frozen=True)
class PayloadEntry:
    """One payload: its slot class, kind, size, digest, chunking and index."""

    name: str
    slot_class: str
    type: str
    size: int
    sha256: str
    chunking: ChunkingParams
    compression_level: int
    chunks: int
    stored_size: int
    index: IndexRef

    def to_dict(self) -> dict[str, Any]:
        """The JSON form inside the manifest."""
        return {
            "name": self.name,
            "slot_class": self.slot_class,
            "type": self.type,
            "size": self.size,
            "sha256": self.sha256,
            "chunking": self.chunking.to_dict(),
            "compression": {"algorithm": "zstd", "level": self.compression_level},
            "chunks": self.chunks,
            "stored_size": self.stored_size,
            "index": {
                "first_page_sha256": self.index.first_page_sha256,
                "pages": self.index.pages,
                "entries_per_page": self.index.entries_per_page,
            },
        }


@dataclass(frozen=True)
class HookEntry:
    """An executable run by the agent in one phase of an install."""

    phase: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON form inside the manifest."""
        return {"phase": self.phase, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest. Build with the constructor, parse with :meth:`from_bytes`."""

    product: str
    version: str
    compatible: tuple[str, ...]
    created: datetime
    payloads: tuple[PayloadEntry, ...]
    hooks: tuple[HookEntry, ...] = ()
    min_agent_version: str = "0.1.0"
    format: int = field(default=FORMAT_VERSION)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the manifest."""
        return {
            "type": MANIFEST_TYPE,
            "format": self.format,
            "product": self.product,
            "version": self.version,
            "compatible": list(self.compatible),
            "created": self.created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "min_agent_version": self.min_agent_version,
            "hooks": [h.to_dict() for h in self.hooks],
            "payloads": [p.to_dict() for p in self.payloads],
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed; validates first.

        Raises:
            ManifestError, UnsafePayloadNameError: a field is invalid.
        """
        data = canonical_json(self.to_dict())
        Manifest.from_bytes(data)  # one validator for writer and reader
        return data

    @property
    def total_size(self) -> int:
        """Uncompressed bytes of all payloads."""
        return sum(p.size for p in self.payloads)

    def payload(self, name: str) -> PayloadEntry:
        """The payload called ``name``; raises KeyError if there is none."""
        for p in self.payloads:
            if p.name == name:
                return p
        raise KeyError(name)

    def require_hardware(self, hardware_id: str) -> None:
        """Raise HardwareMismatchError unless ``hardware_id`` is listed as compatible."""
        if hardware_id not in self.compatible:
            raise HardwareMismatchError(
                f"bundle {self.product} {self.version} is for hardware "
                f"{', '.join(self.compatible)}, not {hardware_id!r}"
            )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate manifest bytes (which must be canonical JSON).

        Raises:
            ManifestError: not canonical JSON, wrong shape or out-of-range values.
            UnsafePayloadNameError: a payload name could escape a directory.
        """
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError("manifest is not valid JSON") from e
        if canonical_json(obj) != data:
            raise ManifestError("manifest is not in canonical form")
        try:
            return _parse(obj)
        except ChunkingParamsError as e:
            raise ManifestError(f"manifest: {e.message}") from e


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ManifestError(f"manifest: {what}")


def _fields(obj: Any, keys: set[str], where: str) -> Mapping[str, Any]:
    _require(isinstance(obj, dict), f"{where} must be an object")
    _require(set(obj) == keys, f"{where} has missing or unknown fields")
    return obj  # type: ignore[no-any-return]


def _int(value: Any, where: str, low: int = 0, high: int = 2**63) -> int:
    _require(type(value) is int and low <= value <= high, f"{where} is out of range")
    return int(value)


def _str(value: Any, pattern: re.Pattern[str], where: str) -> str:
    _require(isinstance(value, str) and pattern.fullmatch(value) is not None, f"bad {where}")
    return str(value)


def _parse(obj: Any) -> Manifest:
    m = _fields(
        obj,
        {
            "type",
            "format",
            "product",
            "version",
            "compatible",
            "created",
            "min_agent_version",
            "hooks",
            "payloads",
        },
        "manifest",
    )
    _require(m["type"] == MANIFEST_TYPE, "not a Skylift bundle manifest")
    _require(
        type(m["format"]) is int and m["format"] == FORMAT_VERSION,
        f"unsupported manifest format {m['format']!r}",
    )
    compatible = m["compatible"]
    _require(
        isinstance(compatible, list) and 1 <= len(compatible) <= _MAX_HARDWARE,
        "compatible must list 1 to 256 hardware ids",
    )
    hardware = tuple(_str(h, _PRODUCT, "hardware id") for h in compatible)
    _require(len(set(hardware)) == len(hardware), "compatible lists a hardware id twice")
    created_s = m["created"]
    _require(
        isinstance(created_s, str) and _TIMESTAMP.fullmatch(created_s) is not None,
        "created must be a UTC time written YYYY-MM-DDTHH:MM:SSZ",
    )
    try:
        created = datetime.strptime(created_s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError as e:
        raise ManifestError("manifest: created is not an RFC 3339 UTC time") from e
    hooks = _parse_hooks(m["hooks"])
    payloads = _parse_payloads(m["payloads"])
    return Manifest(
        product=_str(m["product"], _PRODUCT, "product"),
        version=_str(m["version"], _VERSION, "version"),
        compatible=hardware,
        created=created,
        payloads=payloads,
        hooks=hooks,
        min_agent_version=_str(m["min_agent_version"], _VERSION, "min_agent_version"),
    )


def _parse_hooks(value: Any) -> tuple[HookEntry, ...]:
    _require(isinstance(value, list) and len(value) <= len(HOOK_PHASES), "hooks must be a list")
    hooks = []
    for h in value:
        f = _fields(h, {"phase", "size", "sha256"}, "hook")
        _require(f["phase"] in HOOK_PHASES, f"unknown hook phase {f['phase']!r}")
        hooks.append(
            HookEntry(
                phase=str(f["phase"]),
                size=_int(f["size"], "hook size", 1, 1 << 20),
                sha256=_str(f["sha256"], _HEX64, "hook sha256"),
            )
        )
    _require(len({h.phase for h in hooks}) == len(hooks), "two hooks for one phase")
    return tuple(hooks)


def _parse_payloads(value: Any) -> tuple[PayloadEntry, ...]:
    _require(
        isinstance(value, list) and 1 <= len(value) <= _MAX_PAYLOADS,
        f"payloads must list 1 to {_MAX_PAYLOADS} payloads",
    )
    payloads = []
    for p in value:
        f = _fields(
            p,
            {
                "name",
                "slot_class",
                "type",
                "size",
                "sha256",
                "chunking",
                "compression",
                "chunks",
                "stored_size",
                "index",
            },
            "payload",
        )
        compression = _fields(f["compression"], {"algorithm", "level"}, "compression")
        _require(compression["algorithm"] == "zstd", "unknown compression algorithm")
        index = _fields(f["index"], {"first_page_sha256", "pages", "entries_per_page"}, "index")
        _require(f["type"] in PAYLOAD_TYPES, f"unknown payload type {f['type']!r}")
        chunks = _int(f["chunks"], "chunk count")
        per_page = _int(index["entries_per_page"], "entries_per_page", 1, 65536)
        pages = _int(index["pages"], "index pages", 1)
        _require(pages == max(1, -(-chunks // per_page)), "index page count does not fit")
        size = _int(f["size"], "payload size")
        _require((size == 0) == (chunks == 0), "payload size and chunk count disagree")
        payloads.append(
            PayloadEntry(
                name=check_name(f["name"]),
                slot_class=check_name(f["slot_class"], "slot class"),
                type=str(f["type"]),
                size=size,
                sha256=_str(f["sha256"], _HEX64, "payload sha256"),
                chunking=ChunkingParams.from_dict(f["chunking"]),
                compression_level=_int(compression["level"], "compression level", -7, 22),
                chunks=chunks,
                stored_size=_int(f["stored_size"], "stored size"),
                index=IndexRef(
                    first_page_sha256=_str(index["first_page_sha256"], _HEX64, "index digest"),
                    pages=pages,
                    entries_per_page=per_page,
                ),
            )
        )
    _require(len({p.name for p in payloads}) == len(payloads), "two payloads with one name")
    return tuple(payloads)
