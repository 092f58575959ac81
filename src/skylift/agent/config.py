"""The agent's configuration: ``agent.toml`` read into frozen dataclasses, strictly.

Every key is known: an unknown key, a wrong type or a value out of range is
refused with one line that names the file and the key, so a typo such as
``poll_intervall_s`` never silently falls back to a default. Fields carry
their unit in their name (``_s`` seconds, ``_bytes`` bytes). Relative paths
are taken relative to the directory of the configuration file.

Files named here (certificates, keys, hooks) are not opened when the
configuration is loaded: most of them do not exist before the first
enrollment. Only the layout is checked: slots and the data partition must
not overlap. docs/agent-config.md documents every key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from skylift.agent.pkcs11 import parse_uri
from skylift.agent.plan import DEFAULT_MAX_GAP_BYTES, DEFAULT_MAX_RANGES_PER_REQUEST
from skylift.errors import UserInputError

__all__ = [
    "BOOTLOADER_KINDS",
    "HOOK_PHASES",
    "SLOT_TYPES",
    "AgentConfig",
    "BootloaderConfig",
    "ConfigError",
    "DataConfig",
    "DownloadConfig",
    "HooksConfig",
    "HubConfig",
    "IdentityConfig",
    "SlotConfig",
    "StorageConfig",
    "load_config",
    "parse_config",
]

SlotType = Literal["file", "block", "directory"]
BootloaderKind = Literal["uboot", "grub", "file", "script"]
SLOT_TYPES: tuple[str, ...] = ("file", "block", "directory")
BOOTLOADER_KINDS: tuple[str, ...] = ("uboot", "grub", "file", "script")
HOOK_PHASES: tuple[str, ...] = ("pre_install", "post_install", "health_check", "on_rollback")

# As the bundle manifest and the device gateway allow them.
_CLASS = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_BOOTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_HARDWARE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_KIB = 1024
_MIB = 1024 * _KIB
_GIB = 1024 * _MIB
_TIB = 1024 * _GIB


class ConfigError(UserInputError):
    """The agent's configuration file is missing, not TOML, or has a bad key or value."""

    hint = "see docs/agent-config.md"


@dataclass(frozen=True)
class HubConfig:
    """Where the hub is and how often to ask it for updates."""

    url: str
    ca_file: Path | None
    poll_interval_s: float
    poll_jitter_s: float
    backoff_initial_s: float
    backoff_max_s: float
    request_timeout_s: float


@dataclass(frozen=True)
class IdentityConfig:
    """Who the device is: its mTLS identity and the ids it enrolls with.

    The key is a PEM file (``key_file``) or an object in a PKCS#11 token
    (``pkcs11_uri``, through ``pkcs11_module``: see :mod:`skylift.agent.pkcs11`).
    ``pkcs11_uri`` may carry a ``pin-value``: it is left out of ``repr``.
    """

    device_id: str
    product: str
    hardware_id: str
    cert_file: Path
    key_file: Path | None
    pkcs11_uri: str | None = field(repr=False)
    provisioning_key_file: Path | None
    pkcs11_module: Path | None = None


@dataclass(frozen=True)
class SlotConfig:
    """One slot: half of an A/B pair of a slot class.

    ``path`` is the image file, the block device or the directory.
    ``size_bytes`` bounds a ``file`` slot (it is created or extended up to it).
    """

    slot_class: str
    name: str
    type: SlotType
    path: Path
    size_bytes: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataConfig:
    """The data partition: kept across updates, never written by an install."""

    path: Path


@dataclass(frozen=True)
class BootloaderConfig:
    """Which bootloader backend, and its own options, passed through unread."""

    kind: BootloaderKind
    options: Mapping[str, Any]


@dataclass(frozen=True)
class HooksConfig:
    """The device's own executables per install phase (besides a bundle's hooks)."""

    pre_install: Path | None = None
    post_install: Path | None = None
    health_check: Path | None = None
    on_rollback: Path | None = None
    timeout_s: float = 300.0

    def for_phase(self, phase: str) -> Path | None:
        """The hook for ``phase`` (``pre_install``, ...), or None."""
        if phase not in HOOK_PHASES:
            raise ValueError(f"unknown hook phase {phase!r}")
        value: Path | None = getattr(self, phase)
        return value


@dataclass(frozen=True)
class StorageConfig:
    """Where the agent keeps its state, and how much it may store or download."""

    state_dir: Path
    max_metadata_bytes: int
    max_download_bytes: int
    max_journal_bytes: int
    max_queued_reports: int


@dataclass(frozen=True)
class DownloadConfig:
    """How missing chunks are grouped into HTTP range requests."""

    max_gap_bytes: int
    max_ranges_per_request: int
    max_range_bytes: int
    deltas: bool = True  # use a per-pair delta the director names (skylift.agent.pairdelta)
    #: Keep the chunks the inactive slot already holds where the payload puts them.
    reuse_inactive: bool = True
    #: Bound on the local chunk cache (skylift.agent.chunkcache); 0 turns it off.
    cache_max_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class AgentConfig:
    """The whole of ``agent.toml``."""

    hub: HubConfig
    identity: IdentityConfig
    slots: tuple[SlotConfig, ...]
    bootloader: BootloaderConfig
    hooks: HooksConfig
    storage: StorageConfig
    download: DownloadConfig
    data: DataConfig | None = None
    source: str = "agent.toml"

    @property
    def slot_classes(self) -> tuple[str, ...]:
        """The slot classes, in the order the file first names them."""
        return tuple(dict.fromkeys(s.slot_class for s in self.slots))

    @property
    def slot_names(self) -> tuple[str, ...]:
        """The two boot names every class uses (e.g. ``("A", "B")``), in file order."""
        return tuple(dict.fromkeys(s.name for s in self.slots))


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate ``agent.toml`` at ``path``.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or has a bad key or value.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_config(data, source=str(path), base_dir=path.parent)


def parse_config(
    data: bytes | str, *, source: str = "agent.toml", base_dir: Path | None = None
) -> AgentConfig:
    """Validate the TOML text ``data``; ``source`` names it in errors.

    Relative paths are resolved against ``base_dir`` (default: the current directory).

    Raises:
        ConfigError: not TOML, or a bad key or value.
    """
    text = data.decode("utf-8", errors="strict") if isinstance(data, bytes) else data
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:  # pragma: no cover - decode above raises first
        raise ConfigError(f"{source}: not UTF-8") from e
    return _Parser(source, base_dir or Path.cwd()).config(doc)


class _Parser:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {problem}")

    # -- sections ---------------------------------------------------------

    def config(self, doc: dict[str, Any]) -> AgentConfig:
        known = {"hub", "identity", "slot", "data", "bootloader", "hooks", "storage", "download"}
        for key in doc:
            if key not in known:
                raise self.fail(key, "unknown key")
        slots = self.slots(doc.get("slot"))
        data = self.data(self.table(doc, "data", required=False))
        config = AgentConfig(
            hub=self.hub(self.table(doc, "hub")),
            identity=self.identity(self.table(doc, "identity")),
            slots=slots,
            bootloader=self.bootloader(self.table(doc, "bootloader")),
            hooks=self.hooks(self.table(doc, "hooks", required=False)),
            storage=self.storage(self.table(doc, "storage", required=False)),
            download=self.download(self.table(doc, "download", required=False)),
            data=data,
            source=self.source,
        )
        self.check_layout(slots, data)
        return config

    def table(self, doc: dict[str, Any], name: str, *, required: bool = True) -> _Table:
        value = doc.get(name)
        if value is None:
            if required:
                raise self.fail(f"[{name}]", "missing section")
            value = {}
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table ([" + name + "])")
        return _Table(self, f"[{name}]", value)

    def hub(self, t: _Table) -> HubConfig:
        url = t.string("url")
        if not re.fullmatch(r"https://[^\s/?#@]+(/[^\s?#]*)?", url):
            raise t.fail("url", "must be an https:// URL with a host and no query")
        interval = t.seconds("poll_interval_s", 300, low=5, high=86400)
        jitter = t.seconds("poll_jitter_s", min(30.0, interval / 2), low=0, high=interval)
        initial = t.seconds("backoff_initial_s", 10, low=1, high=86400)
        maximum = t.seconds("backoff_max_s", 3600, low=initial, high=7 * 86400)
        hub = HubConfig(
            url=url.rstrip("/"),
            ca_file=t.path("ca_file", required=False),
            poll_interval_s=interval,
            poll_jitter_s=jitter,
            backoff_initial_s=initial,
            backoff_max_s=maximum,
            request_timeout_s=t.seconds("request_timeout_s", 60, low=1, high=3600),
        )
        t.done()
        return hub

    def identity(self, t: _Table) -> IdentityConfig:
        device_id = t.string("device_id")
        if not _DEVICE_ID.fullmatch(device_id):
            raise t.fail("device_id", "must be 1-128 of A-Z a-z 0-9 . _ - starting with one")
        product = t.string("product")
        hardware = t.string("hardware_id")
        for key, value in (("product", product), ("hardware_id", hardware)):
            if not _HARDWARE.fullmatch(value):
                raise t.fail(key, "must be 1-128 of A-Z a-z 0-9 . _ - starting with one")
        key_file = t.path("key_file", required=False)
        pkcs11 = t.string("pkcs11_uri", required=False)
        if (key_file is None) == (pkcs11 is None):
            raise t.fail("key_file", "give exactly one of key_file and pkcs11_uri")
        if pkcs11 is not None:
            try:
                parse_uri(pkcs11)
            except ValueError as e:  # never quotes a PIN
                raise t.fail("pkcs11_uri", str(e)) from None
        else:
            t.forbid("pkcs11_module", "only a pkcs11_uri key needs a PKCS#11 module")
        identity = IdentityConfig(
            device_id=device_id,
            product=product,
            hardware_id=hardware,
            cert_file=t.path("cert_file"),
            key_file=key_file,
            pkcs11_uri=pkcs11,
            provisioning_key_file=t.path("provisioning_key_file", required=False),
            pkcs11_module=t.path("pkcs11_module", required=False),
        )
        t.done()
        return identity

    def slots(self, value: Any) -> tuple[SlotConfig, ...]:
        if value is None:
            raise self.fail("[[slot]]", "missing: declare an A/B pair of slots per class")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail("slot", "must be an array of tables ([[slot]])")
        slots = tuple(self.slot(_Table(self, f"slot[{i}]", v)) for i, v in enumerate(value))
        by_class: dict[str, list[SlotConfig]] = {}
        for s in slots:
            by_class.setdefault(s.slot_class, []).append(s)
        pairs: dict[str, set[str]] = {}
        for cls, members in by_class.items():
            names = {s.name for s in members}
            if len(members) != 2 or len(names) != 2:
                raise self.fail(
                    f"slot class {cls!r}",
                    f"needs exactly two slots with different names, has {len(members)}",
                )
            pairs[cls] = names
        first_class, first_names = next(iter(pairs.items()))
        for cls, names in pairs.items():
            if names != first_names:
                raise self.fail(
                    f"slot class {cls!r}",
                    f"slot names {sorted(names)} differ from {sorted(first_names)} of class "
                    f"{first_class!r} (the bootloader picks one name for all classes)",
                )
        return slots

    def slot(self, t: _Table) -> SlotConfig:
        cls = t.string("class")
        if not _CLASS.fullmatch(cls):
            raise t.fail("class", "must match [a-z0-9][a-z0-9_-]{0,62} (as in bundle manifests)")
        name = t.string("name")
        if not _BOOTNAME.fullmatch(name):
            raise t.fail("name", "must be 1-32 of A-Z a-z 0-9 _ - (the bootloader's slot name)")
        kind = t.choice("type", SLOT_TYPES)
        if kind == "block":
            t.forbid("path", "a block slot names its device with device =")
            path = t.path("device")
        else:
            t.forbid("device", f"a {kind} slot names its location with path =")
            path = t.path("path")
        size = None
        if kind == "file":
            size = t.integer("size_bytes", None, low=4096, high=64 * _TIB)
        else:
            t.forbid("size_bytes", f"only file slots take size_bytes (a {kind} slot has its own)")
        include: tuple[str, ...] = ()
        exclude: tuple[str, ...] = ()
        if kind == "directory":
            include = t.globs("include", default=("**",))
            exclude = t.globs("exclude", default=())
        else:
            for key in ("include", "exclude"):
                t.forbid(key, "only directory slots take include/exclude rules")
        slot = SlotConfig(cls, name, kind, path, size, include, exclude)
        t.done()
        return slot

    def data(self, t: _Table) -> DataConfig | None:
        if not t.value:
            return None
        data = DataConfig(path=t.path("path"))
        t.done()
        return data

    def bootloader(self, t: _Table) -> BootloaderConfig:
        kind = t.choice("kind", BOOTLOADER_KINDS)
        options = t.value.get("options", {})
        if not isinstance(options, dict):
            raise t.fail("options", "must be a table ([bootloader.options])")
        t.used.add("options")
        t.done()
        return BootloaderConfig(kind, MappingProxyType(dict(options)))

    def hooks(self, t: _Table) -> HooksConfig:
        paths = {phase: t.path(phase, required=False) for phase in HOOK_PHASES}
        hooks = HooksConfig(**paths, timeout_s=t.seconds("timeout_s", 300, low=1, high=86400))
        t.done()
        return hooks

    def storage(self, t: _Table) -> StorageConfig:
        state_dir = t.path("state_dir", required=False) or Path("/var/lib/skylift")
        storage = StorageConfig(
            state_dir=state_dir,
            max_metadata_bytes=t.integer(
                "max_metadata_bytes", 2 * _MIB, low=64 * _KIB, high=512 * _MIB
            ),
            max_download_bytes=t.integer("max_download_bytes", 16 * _GIB, low=_MIB, high=64 * _TIB),
            max_journal_bytes=t.integer("max_journal_bytes", _MIB, low=4 * _KIB, high=256 * _MIB),
            max_queued_reports=t.integer("max_queued_reports", 1000, low=10, high=1_000_000),
        )
        t.done()
        return storage

    def download(self, t: _Table) -> DownloadConfig:
        download = DownloadConfig(
            max_gap_bytes=t.integer("max_gap_bytes", DEFAULT_MAX_GAP_BYTES, low=0, high=64 * _MIB),
            max_ranges_per_request=t.integer(
                "max_ranges_per_request", DEFAULT_MAX_RANGES_PER_REQUEST, low=1, high=256
            ),
            max_range_bytes=t.integer("max_range_bytes", 4 * _MIB, low=_MIB, high=256 * _MIB),
            deltas=t.flag("deltas", True),
            reuse_inactive=t.flag("reuse_inactive", True),
            cache_max_bytes=t.integer("cache_max_bytes", 32 * _MIB, low=0, high=_GIB),
        )
        t.done()
        return download

    # -- layout -----------------------------------------------------------

    def check_layout(self, slots: tuple[SlotConfig, ...], data: DataConfig | None) -> None:
        places = [(f"slot {s.slot_class}/{s.name}", _real(s.path)) for s in slots]
        if data is not None:
            data_path = _real(data.path)
            for what, p in places:
                if _overlaps(p, data_path):
                    raise self.fail("[data] path", f"{what} ({p}) overlaps the data partition")
        for i, (what, p) in enumerate(places):
            for other, q in places[i + 1 :]:
                if _overlaps(p, q):
                    raise self.fail("[[slot]]", f"{what} ({p}) overlaps {other} ({q})")


def _real(path: Path) -> Path:
    # realpath: /dev/disk/by-label/x and /dev/sda2 are one device.
    return Path(os.path.realpath(path))


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


_MISSING: Any = object()


class _Table:
    """One TOML table being read; remembers which keys were used, to refuse the rest."""

    def __init__(self, parser: _Parser, where: str, value: dict[str, Any]) -> None:
        self.parser = parser
        self.where = where
        self.value = value
        self.used: set[str] = set()

    def fail(self, key: str, problem: str) -> ConfigError:
        return self.parser.fail(f"{self.where} {key}", problem)

    def done(self) -> None:
        for key in self.value:
            if key not in self.used:
                raise self.fail(key, "unknown key")

    def get(self, key: str, required: bool) -> Any:
        self.used.add(key)
        value = self.value.get(key, _MISSING)
        if value is _MISSING and required:
            raise self.fail(key, "missing")
        return value

    def forbid(self, key: str, why: str) -> None:
        if key in self.value:
            raise self.fail(key, f"not allowed here: {why}")

    def string(self, key: str, *, required: bool = True) -> Any:
        value = self.get(key, required)
        if value is _MISSING:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> Any:
        value = self.string(key)
        if value not in options:
            raise self.fail(key, f"must be one of {', '.join(options)} (got {value!r})")
        return value

    def path(self, key: str, *, required: bool = True) -> Any:
        value = self.string(key, required=required)
        if value is None:
            return None
        if "\0" in value:
            raise self.fail(key, "must be a path")
        return self.parser.base_dir / Path(value)

    def integer(self, key: str, default: int | None, *, low: int, high: int) -> Any:
        value = self.get(key, default is None)
        if value is _MISSING:
            return default
        if type(value) is not int:
            raise self.fail(key, f"must be an integer (got {type(value).__name__})")
        if not low <= value <= high:
            raise self.fail(key, f"must be from {low} to {high} (got {value})")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, False)
        if value is _MISSING:
            return default
        if type(value) is not bool:
            raise self.fail(key, f"must be true or false (got {type(value).__name__})")
        return value

    def seconds(self, key: str, default: float, *, low: float, high: float) -> float:
        value = self.get(key, False)
        if value is _MISSING:
            return float(default)
        if type(value) not in (int, float):
            raise self.fail(key, f"must be a number of seconds (got {type(value).__name__})")
        if not low <= value <= high:
            raise self.fail(key, f"must be from {low:g} to {high:g} seconds (got {value})")
        return float(value)

    def globs(self, key: str, *, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(key, False)
        if value is _MISSING:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "must be a list of non-empty glob strings")
        for pattern in value:
            if pattern.startswith("/") or ".." in Path(pattern).parts:
                raise self.fail(key, f"glob {pattern!r} must be relative and without '..'")
        return tuple(value)
