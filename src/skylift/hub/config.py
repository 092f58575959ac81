"""The hub's configuration: ``DIR/hub.toml``, read into a typed, validated object.

Paths in the file are relative to the hub directory. Command-line options of
``skylift hub serve`` (``--database``, ``--storage``) override the file, so
one directory can run on embedded defaults or against PostgreSQL and S3.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from skylift.errors import UserInputError
from skylift.fsutil import atomic_write, read_bounded

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_DELTA_MAX_PAYLOAD_BYTES",
    "DEFAULT_DELTA_PREVIOUS_RELEASES",
    "HubConfig",
    "ListenConfig",
    "load_config",
    "write_config",
]

CONFIG_NAME = "hub.toml"
_MAX_CONFIG_BYTES = 64 * 1024
#: ``[deltas] previous_releases``: deltas to each release from this many before it.
DEFAULT_DELTA_PREVIOUS_RELEASES = 2
#: ``[deltas] max_payload_bytes``: larger payloads get no delta (4 GiB).
DEFAULT_DELTA_MAX_PAYLOAD_BYTES = 4 * 1024**3
_MAX_DELTA_PREVIOUS_RELEASES = 16


@dataclass(frozen=True)
class ListenConfig:
    """Where one of the hub's two TLS endpoints listens."""

    host: str
    port: int


@dataclass(frozen=True)
class HubConfig:
    """Everything ``skylift hub serve`` needs, resolved to absolute paths."""

    directory: Path
    name: str
    database_url: str
    storage_url: str
    gateway: ListenConfig
    api: ListenConfig
    #: Addresses of TLS proxies allowed to pass a verified client certificate in a header.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: How often devices are told to poll, and how long last-seen times are batched.
    poll_interval_s: int = 300
    last_seen_flush_s: float = 5.0
    #: Request bodies above this are refused before they are read.
    max_request_bytes: int = 8 * 1024 * 1024
    device_cert_validity_days: int = 3650
    #: Per-pair deltas: from this many previous releases of a product (0: none).
    delta_previous_releases: int = DEFAULT_DELTA_PREVIOUS_RELEASES
    #: Payloads larger than this (old or new) get no delta.
    delta_max_payload_bytes: int = DEFAULT_DELTA_MAX_PAYLOAD_BYTES
    #: Seconds between two looks for releases that need deltas, when none is pending.
    delta_interval_s: int = 30
    #: Make zlib deltas (through inflated streams: squashfs with gzip) where they fit;
    #: False: plain deltas only (more bytes, no deflating on devices).
    delta_zlib: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def keys_dir(self) -> Path:
        """Online signing keys (0600): snapshot, timestamp, director."""
        return self.directory / "keys"

    @property
    def ca_dir(self) -> Path:
        """The device CA and the hub's own TLS certificate."""
        return self.directory / "ca"

    def with_overrides(self, *, database_url: str | None, storage_url: str | None) -> HubConfig:
        """This configuration with the database and storage named on the command line."""
        return replace(
            self,
            database_url=database_url or self.database_url,
            storage_url=storage_url or self.storage_url,
        )


def _require(cond: bool, message: str, path: Path) -> None:
    if not cond:
        raise UserInputError(f"{path}: {message}")


def _listen(section: Any, name: str, path: Path) -> ListenConfig:
    _require(isinstance(section, dict), f"[{name}] must be a table", path)
    host, port = section.get("host"), section.get("port")
    _require(isinstance(host, str) and bool(host), f"[{name}] host must be a string", path)
    _require(type(port) is int and 0 <= port <= 65535, f"[{name}] port must be 0..65535", path)
    return ListenConfig(host, port)


def _resolve_url(url: str, directory: Path) -> str:
    """``sqlite:///hub.db`` and ``file://objects`` are relative to the hub directory."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{directory / url.removeprefix('sqlite:///')}"
    if url.startswith("file://") and not url.startswith("file:///"):
        return f"file://{directory / url.removeprefix('file://')}"
    return url


def load_config(directory: Path) -> HubConfig:
    """Read and validate ``DIR/hub.toml``.

    Raises:
        UserInputError: missing, unreadable, not TOML, or a value out of range
            (one line naming the file and the setting).
    """
    directory = directory.resolve()
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise UserInputError(
            f"{directory} is not a hub directory (no {CONFIG_NAME})",
            hint="create one with 'skylift hub init DIR'",
        )
    try:
        doc = tomllib.loads(read_bounded(path, _MAX_CONFIG_BYTES, "configuration").decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: not valid TOML ({e})") from e
    hub = doc.get("hub", {})
    _require(isinstance(hub, dict), "[hub] must be a table", path)
    name = hub.get("name", "skylift")
    _require(isinstance(name, str) and 0 < len(name) <= 64, "[hub] name is invalid", path)
    database = doc.get("database", {}).get("url")
    storage = doc.get("storage", {}).get("url")
    _require(isinstance(database, str) and bool(database), "[database] url is missing", path)
    _require(isinstance(storage, str) and bool(storage), "[storage] url is missing", path)
    gateway_doc = doc.get("gateway", {})
    proxies = gateway_doc.get("trusted_proxies", [])
    _require(isinstance(proxies, list), "[gateway] trusted_proxies must be a list", path)
    try:
        networks = tuple(ipaddress.ip_network(p) for p in proxies)
    except (ValueError, TypeError) as e:
        raise UserInputError(f"{path}: [gateway] trusted_proxies: {e}") from e
    poll = doc.get("poll", {})
    interval = poll.get("interval_s", 300)
    _require(type(interval) is int and 10 <= interval <= 86400, "[poll] interval_s", path)
    deltas = doc.get("deltas", {})
    _require(isinstance(deltas, dict), "[deltas] must be a table", path)
    previous = deltas.get("previous_releases", DEFAULT_DELTA_PREVIOUS_RELEASES)
    _require(
        type(previous) is int and 0 <= previous <= _MAX_DELTA_PREVIOUS_RELEASES,
        f"[deltas] previous_releases must be 0..{_MAX_DELTA_PREVIOUS_RELEASES}",
        path,
    )
    max_payload = deltas.get("max_payload_bytes", DEFAULT_DELTA_MAX_PAYLOAD_BYTES)
    _require(
        type(max_payload) is int and max_payload > 0,
        "[deltas] max_payload_bytes must be a positive integer",
        path,
    )
    delta_interval = deltas.get("interval_s", 30)
    _require(
        type(delta_interval) is int and 1 <= delta_interval <= 3600,
        "[deltas] interval_s must be 1..3600",
        path,
    )
    delta_zlib = deltas.get("zlib", True)
    _require(type(delta_zlib) is bool, "[deltas] zlib must be true or false", path)
    return HubConfig(
        directory=directory,
        name=name,
        database_url=_resolve_url(database, directory),
        storage_url=_resolve_url(storage, directory),
        gateway=_listen(gateway_doc, "gateway", path),
        api=_listen(doc.get("api", {}), "api", path),
        trusted_proxies=networks,
        poll_interval_s=interval,
        delta_previous_releases=previous,
        delta_max_payload_bytes=max_payload,
        delta_interval_s=delta_interval,
        delta_zlib=delta_zlib,
    )


def write_config(directory: Path, *, name: str, gateway_port: int, api_port: int) -> Path:
    """Write the default ``hub.toml`` (embedded SQLite, local object store, loopback)."""
    path = directory / CONFIG_NAME
    text = f"""\
# Skylift hub configuration. Paths are relative to this directory.
[hub]
name = "{name}"

[database]
# Production: url = "postgresql://user@host/skylift" (or skylift hub serve --database ...)
url = "sqlite:///hub.db"

[storage]
# Production: url = "s3://bucket/prefix?endpoint=https://s3.example&region=eu-west-1"
url = "file://objects"

[gateway]
# Devices connect here with mutual TLS.
host = "127.0.0.1"
port = {gateway_port}
# TLS proxies allowed to pass the verified client certificate (X-Client-Cert).
trusted_proxies = []

[api]
# Management API and dashboard (TLS, bearer tokens or a password session).
host = "127.0.0.1"
port = {api_port}

[poll]
interval_s = 300

[deltas]
# Per-pair deltas to each release from this many previous releases (0: none).
previous_releases = 2
# Payloads larger than this get no delta (the hub rebuilds both on its disk).
max_payload_bytes = 4294967296
# Seconds between two looks for new releases when no delta is pending.
interval_s = 30
# Deltas through the inflated blocks of payloads of zlib or xz streams (squashfs
# with gzip or xz): ten times smaller for a small update; devices compress the
# changed blocks again.
zlib = true
"""
    atomic_write(path, text.encode())
    return path
