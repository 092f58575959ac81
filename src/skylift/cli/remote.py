"""Commands that talk to a hub: login, products, releases, devices, deployments, keys, CAs.

All of them go through :class:`skylift.cli.client.HubClient` (imported when a
command runs: it needs the ``hub`` extra's HTTP client) and match the
management API of docs/api.md exactly.

Output: tables and the one thing a script wants go to stdout (``--json``
where a command lists or shows something); progress and confirmations go to
stderr. Nothing here prints a token or a key, except ``provisioning create``,
which prints the new key, alone, on stdout: it is shown only once. Every
string that comes from the hub is printed as plain text, never as rich
markup, with control characters replaced: device-reported reasons are not
trusted to drive the terminal.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from skylift.bundle import ChunkData, IndexPageData, TrustedKeys, read_body, read_head
from skylift.chunks.index import chunk_record
from skylift.cli.common import err, human_size, load_signer, out
from skylift.errors import UserInputError
from skylift.fsutil import read_bounded

if TYPE_CHECKING:
    from skylift.cli.client import HubClient

__all__ = [
    "audit",
    "deploy_app",
    "devices_app",
    "events",
    "login",
    "product_app",
    "provisioning_app",
    "release_app",
    "signer_ca_app",
]

product_app = typer.Typer(no_args_is_help=True, help="Products and their image repositories.")
release_app = typer.Typer(
    no_args_is_help=True, help="Publish bundles to the hub; list and show releases."
)
devices_app = typer.Typer(no_args_is_help=True, help="Inspect and manage devices.")
deploy_app = typer.Typer(no_args_is_help=True, help="Roll releases out in phases.")
provisioning_app = typer.Typer(
    no_args_is_help=True, help="Provisioning keys: what devices enroll with."
)
signer_ca_app = typer.Typer(
    no_args_is_help=True, help="Signer CAs: your own CAs whose device certificates the hub accepts."
)

#: Digests per ``POST /chunks/missing`` (the API takes up to 100 000).
_MISSING_BATCH = 10_000
#: Without a terminal, a progress line at most this often.
_PLAIN_PROGRESS_S = 5.0
_MAX_PEM_BYTES = 64 * 1024
_DURATION = re.compile(r"(\d{1,6})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Deployment statuses ``deploy status --watch`` stops at.
_SETTLED = ("completed", "paused", "aborted")
_JSON = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]


def _client() -> HubClient:
    from skylift.cli.client import HubClient, load_credentials

    return HubClient(load_credentials())


def _seg(value: str, what: str) -> str:
    from skylift.cli.client import segment

    return segment(value, what)


def _plain(value: object) -> str:
    """A value from the hub as one printable line: control characters become ``?``."""
    text = "" if value is None else str(value)
    return "".join("?" if unicodedata.category(c) == "Cc" else c for c in text)


def _t(value: object, empty: str = "") -> Text:
    """A table cell: plain text (no markup), ``empty`` for None or ''."""
    text = _plain(value)
    return Text(text if text else empty)


def _say(message: str) -> None:
    """A confirmation on stderr; ``message`` is plain text."""
    err.print(Text(_plain(message)))


def _print_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2))


def _time_arg(value: str | None, what: str, *, future: bool = False) -> str | None:
    """``2026-11-23T19:00:00Z`` as given, or a duration (``90m``, ``2h``, ``7d``) from now.

    A duration counts back (``--seen-since 1h``: the last hour) or, with
    ``future``, forward (``--expires 30d``). The hub checks RFC 3339 times.
    """
    if value is None:
        return None
    m = _DURATION.fullmatch(value.strip())
    if m is None:
        return value
    delta = timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    moment = datetime.now(UTC) + (delta if future else -delta)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise UserInputError("--limit must be at least 1")


# -- login and products ---------------------------------------------------------------------------


def login(
    url: Annotated[str, typer.Argument(help="The hub's API, e.g. https://hub.example:8080")],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="SKYLIFT_TOKEN",
            show_envvar=False,
            help="API token; '-' reads it from stdin (else prompted, or from SKYLIFT_TOKEN).",
        ),
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="CA certificate that signed the hub's.")] = None,
) -> None:
    """Store the hub URL and API token (file mode 0600) after checking that they work."""
    from skylift.cli.client import Credentials, HubClient, hub_url, save_credentials

    base = hub_url(url)
    if token == "-":  # noqa: S105 - "read it from stdin", not a password
        token = sys.stdin.readline()
    elif token is None:
        if not sys.stdin.isatty():
            raise UserInputError(
                "no API token", hint="pass --token -, and the token on stdin, or set SKYLIFT_TOKEN"
            )
        token = typer.prompt("API token", hide_input=True)
    token = token.strip()
    if not token:
        raise UserInputError("the API token is empty")
    creds = Credentials(base, token, ca.resolve() if ca else None)
    with HubClient(creds) as client:
        info = client.json("GET", "/hub")
    path = save_credentials(creds)
    _say(
        f"logged in to {info.get('name', base)} as {info.get('role', '?')} of "
        f"{info.get('organisation', '?')}; credentials in {path} (mode 0600)"
    )


def _keys_of(paths: list[Path]) -> list[Any]:
    return [load_signer(p) for p in paths]


@product_app.command("create")
def product_create(
    name: Annotated[str, typer.Argument(help="Product name (a-z, 0-9, . _ -).")],
    root_key: Annotated[
        list[Path], typer.Option("--root-key", help="Root private key(s): offline, kept safe.")
    ],
    release_key: Annotated[
        list[Path], typer.Option("--release-key", help="Release private key(s).")
    ],
    root_threshold: Annotated[int, typer.Option(help="Root signatures needed.")] = 1,
    release_threshold: Annotated[int, typer.Option(help="Release signatures needed.")] = 1,
) -> None:
    """Create a product: its image repository's root and first targets are signed here, offline."""
    from securesystemslib.signer import Key

    from skylift.trust.repository import offline_metadata

    roots, releases = _keys_of(root_key), _keys_of(release_key)
    with _client() as client:
        info = client.json("GET", "/hub")
        online = {
            role: Key.from_dict(k["keyid"], {f: v for f, v in k.items() if f != "keyid"})
            for role, k in info["online_keys"].items()
        }
        root, targets = offline_metadata(
            keys={
                "root": [s.public_key for s in roots],
                "targets": [s.public_key for s in releases],
                "snapshot": [online["snapshot"]],
                "timestamp": [online["timestamp"]],
            },
            thresholds={"root": root_threshold, "targets": release_threshold},
            signers=[*roots, *releases],
            now=datetime.now(UTC),
        )
        product = client.json(
            "POST",
            "/products",
            json={"name": name, "root": json.loads(root), "targets": json.loads(targets)},
        )
    _say(
        f"product {product['name']} created; releases need {product['release_threshold']} "
        f"signature(s) of {len(product['release_keys'])} release key(s)"
    )


# -- releases -------------------------------------------------------------------------------------


def _scan(
    path: Path, trusted: TrustedKeys
) -> tuple[bytes, Any, dict[str, bytes], list[str], dict[str, int]]:
    """Head bytes, manifest, index pages, chunk digests and stored sizes, from one pass."""
    with open(path, "rb") as f:
        head = read_head(f)
        head.verify(trusted)
        indexes: dict[str, bytearray] = {}
        digests: list[str] = []
        sizes: dict[str, int] = {}
        for event in read_body(f, head):
            if isinstance(event, IndexPageData):
                indexes.setdefault(event.payload.name, bytearray()).extend(event.page)
            elif isinstance(event, ChunkData):
                digests.append(event.entry.hexdigest)
                sizes[event.entry.hexdigest] = len(event.stored)
    with open(path, "rb") as f:
        head_bytes = f.read(head.length)
    return head_bytes, head.manifest, {k: bytes(v) for k, v in indexes.items()}, digests, sizes


class _UploadProgress:
    """Bytes uploaded: a rich bar on a terminal, else a plain line every few seconds (stderr)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self._last = time.monotonic()
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> _UploadProgress:
        if err.is_terminal:
            self._bar = Progress(
                TextColumn("uploading chunks"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("upload", total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
            return
        now = time.monotonic()
        if now - self._last >= _PLAIN_PROGRESS_S and self.done < self.total:
            self._last = now
            percent = 100 * self.done // max(self.total, 1)
            _say(f"uploaded {human_size(self.done)} of {human_size(self.total)} ({percent}%)")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _missing(client: HubClient, digests: list[str]) -> set[str]:
    missing: set[str] = set()
    for i in range(0, len(digests), _MISSING_BATCH):
        batch = digests[i : i + _MISSING_BATCH]
        answer = client.json("POST", "/chunks/missing", json={"digests": batch})["missing"]
        missing |= set(answer) & set(batch)
    return missing


#: Chunks go up in batches (POST /chunks) of at most this many bytes and chunks (the
#: hub takes 16 MiB and 4096): a 512 MiB image in 4 KiB blocks is some 90 000 chunks,
#: one request each before.
_BATCH_BYTES = 8 * 1024 * 1024
_BATCH_CHUNKS = 2048


def _upload(
    client: HubClient, bundle: Path, trusted: TrustedKeys, missing: set[str], total: int
) -> int:
    """Upload the chunks of ``bundle`` in ``missing`` (each once), in batches; the bytes sent.

    A batch is :func:`skylift.chunks.index.chunk_record` after another (the
    hub's ``parse_chunk_batch`` reads them).
    """
    left = set(missing)
    batch = bytearray()
    count = 0
    sizes = 0

    def send() -> None:
        nonlocal batch, count, sizes
        if count:
            client.request(
                "POST",
                "/chunks",
                content=bytes(batch),
                headers={"Content-Type": "application/octet-stream"},
            )
            progress.advance(sizes)
        batch, count, sizes = bytearray(), 0, 0

    with open(bundle, "rb") as f, _UploadProgress(total) as progress:
        head = read_head(f)
        head.verify(trusted)
        for event in read_body(f, head):
            if isinstance(event, ChunkData) and event.entry.hexdigest in left:
                stored = event.stored
                record = chunk_record(event.entry.hexdigest, int(event.entry.codec), stored)
                if count == _BATCH_CHUNKS or len(batch) + len(record) > _BATCH_BYTES:
                    send()
                batch += record
                count += 1
                sizes += len(stored)
                left.discard(event.entry.hexdigest)
        send()
        return progress.done


@release_app.command("push")
def release_push(
    bundle: Annotated[Path, typer.Argument(help="The bundle file.")],
    key: Annotated[list[Path], typer.Option("--key", "-k", help="Release private key(s).")],
) -> None:
    """Publish a bundle: upload only the chunks the hub lacks, sign the new targets offline."""
    from skylift.trust.repository import sign_next_targets

    signers = _keys_of(key)
    trusted = TrustedKeys(tuple(s.public_key for s in signers), 1)
    head, manifest, indexes, digests, sizes = _scan(bundle, trusted)
    product, version = manifest.product, manifest.version
    p = _seg(product, "product name")
    with _client() as client:
        # Before any upload: the product exists, trusts these keys, and the version is new.
        info = client.json("GET", f"/products/{p}")
        known = set(info.get("release_keys") or [])
        signing = {s.public_key.keyid for s in signers} & known
        if len(signing) < int(info.get("release_threshold") or 1):
            raise UserInputError(
                f"{product} releases need {info.get('release_threshold')} signature(s) of its "
                f"{len(known)} release key(s); the key(s) given provide {len(signing)}",
                hint="give the product's release private key(s) with --key",
            )
        released = client.json("GET", f"/products/{p}/releases")["items"]
        if any(r.get("version") == version for r in released):
            raise UserInputError(
                f"{product} {version} is released already",
                hint="build the bundle with a new version",
            )
        unique = sorted(set(digests))
        missing = _missing(client, unique)
        total = sum(sizes[d] for d in missing)
        skipped = sum(sizes[d] for d in unique) - total
        _say(
            f"uploading {len(missing)} of {len(unique)} chunk(s), {human_size(total)}; "
            f"skipping {len(unique) - len(missing)} the hub has, {human_size(skipped)} "
            f"({skipped} bytes)"
        )
        uploaded = _upload(client, bundle, trusted, missing, total) if missing else 0
        meta = f"/products/{p}/image/metadata"
        root = client.request("GET", f"{meta}/root.json").content
        timestamp = client.json("GET", f"{meta}/timestamp.json")
        snapshot_version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
        snapshot = client.json("GET", f"{meta}/{snapshot_version}.snapshot.json")
        targets_version = snapshot["signed"]["meta"]["targets.json"]["version"]
        current = client.request("GET", f"{meta}/{targets_version}.targets.json").content
        custom = {
            "product": product,
            "version": version,
            "hardware_ids": list(manifest.compatible),
            "payloads": {
                pl.name: {"size": pl.size, "sha256": pl.sha256, "slot_class": pl.slot_class}
                for pl in manifest.payloads
            },
        }
        targets = sign_next_targets(
            current,
            path=f"{version}.head",
            content=head,
            custom=custom,
            signers=signers,
            root=root,
            now=datetime.now(UTC),
        )
        release = client.json(
            "POST",
            f"/products/{p}/releases",
            json={
                "targets": json.loads(targets),
                "head": base64.b64encode(head).decode(),
                "indexes": {n: base64.b64encode(d).decode() for n, d in indexes.items()},
            },
        )
    _say(
        f"released {product} {release['version']}: {len(unique)} chunks, "
        f"{human_size(uploaded)} uploaded"
    )


def _size(value: object) -> str:
    return human_size(value) if isinstance(value, int) else ""


def _deltas_summary(release: dict[str, Any]) -> str:
    """``2 ready, 1 pending`` for a release's deltas; ``-`` without any."""
    counts: dict[str, int] = {}
    for d in release.get("deltas") or []:
        status = _plain(d.get("status"))
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"


def _deltas_table(items: list[dict[str, Any]]) -> Table:
    table = Table(title="per-pair deltas")
    for col in ("from", "payload", "status", "delta", "chunk plan", "saved", "error"):
        table.add_column(col)
    for d in items:
        length, plan = d.get("length"), d.get("chunk_plan_bytes")
        saved = (
            f"{100 * (1 - length / plan):.0f}%"
            if isinstance(length, int) and isinstance(plan, int) and plan > 0
            else ""
        )
        status, attempts = d.get("status"), d.get("attempts")
        if status == "failed" and isinstance(attempts, int):
            status = f"failed ({attempts} attempt{'s' if attempts > 1 else ''})"
        table.add_row(
            _t(d.get("from_version")), _t(d.get("payload")), _t(status),
            _t(_size(length)), _t(_size(plan)), _t(saved), _t(d.get("error")),
        )  # fmt: skip
    return table


@release_app.command("list")
def release_list(
    product: Annotated[str, typer.Argument(help="The product.")],
    as_json: _JSON = False,
) -> None:
    """A product's releases, newest first, with how many of their deltas are ready."""
    with _client() as client:
        items = client.json("GET", f"/products/{_seg(product, 'product name')}/releases")["items"]
    if as_json:
        _print_json(items)
        return
    table = Table()
    for col in ("version", "payloads", "stored", "hardware", "deltas", "created", "by"):
        table.add_column(col)
    for r in items:
        table.add_row(
            _t(r.get("version")), _t(_size(r.get("payload_size"))),
            _t(_size(r.get("stored_size"))), _t(", ".join(r.get("hardware_ids") or [])),
            _t(_deltas_summary(r)), _t(r.get("created")), _t(r.get("created_by")),
        )  # fmt: skip
    out.print(table)


@release_app.command("show")
def release_show(
    product: Annotated[str, typer.Argument(help="The product.")],
    version: Annotated[str, typer.Argument(help="The release's version.")],
    as_json: _JSON = False,
) -> None:
    """One release: its target, sizes, bandwidth, and its per-pair deltas."""
    path = f"/products/{_seg(product, 'product name')}/releases/{_seg(version, 'version')}"
    with _client() as client:
        r = client.json("GET", path)
    if as_json:
        _print_json(r)
        return
    grid = Table.grid(padding=(0, 2))
    rows = [
        ("release", f"{product} {r.get('version')}"), ("target", r.get("target")),
        ("sha256", r.get("sha256")), ("hardware", ", ".join(r.get("hardware_ids") or [])),
        ("payloads", _size(r.get("payload_size"))), ("stored", _size(r.get("stored_size"))),
        ("created", f"{r.get('created')} by {r.get('created_by')}"),
    ]  # fmt: skip
    for k, v in rows:
        grid.add_row(Text(k, style="bold"), _t(v))
    out.print(grid)
    bandwidth = _bandwidth_line(r.get("bandwidth"))
    if bandwidth:
        out.print(Text(bandwidth))
    deltas = r.get("deltas") or []
    if deltas:
        out.print(_deltas_table(deltas))
    else:
        _say("no per-pair deltas (yet)")


# -- devices --------------------------------------------------------------------------------------


def _slots(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((d.get("slots") or {}).items()))


def _device_row(d: dict[str, Any]) -> list[Text]:
    return [
        _t(d.get("device_id")), _t(d.get("product")), _t(d.get("hardware_id")),
        _t(_slots(d), "-"), _t(d.get("state")), _t(", ".join(d.get("tags") or [])),
        _t(d.get("last_seen"), "never"), _t("revoked" if d.get("revoked") else ""),
    ]  # fmt: skip


def _more(client: HubClient, what: str) -> None:
    if client.more:
        _say(f"more {what} match; raise --limit to see them")


@devices_app.command("list")
def devices_list(
    tag: Annotated[
        list[str] | None, typer.Option(help="Only devices with this tag (repeat: all of them).")
    ] = None,
    product: Annotated[str | None, typer.Option(help="Only this product's devices.")] = None,
    hardware: Annotated[str | None, typer.Option(help="Only this hardware id.")] = None,
    version: Annotated[str | None, typer.Option(help="Only devices running this version.")] = None,
    state: Annotated[str | None, typer.Option(help="Only devices in this state.")] = None,
    seen_since: Annotated[
        str | None, typer.Option(help="Seen since: an RFC 3339 time or a duration (1h, 7d) ago.")
    ] = None,
    seen_before: Annotated[
        str | None, typer.Option(help="Not seen since: an RFC 3339 time or a duration ago.")
    ] = None,
    q: Annotated[str | None, typer.Option("--search", help="Device id contains this.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (following pages).")] = 1000,
    as_json: _JSON = False,
) -> None:
    """List devices, following the hub's pages up to --limit."""
    _check_limit(limit)
    params: list[tuple[str, str]] = [("tag", t) for t in tag or []]
    for name, value in (
        ("product", product), ("hardware", hardware), ("version", version), ("state", state),
        ("seen_since", _time_arg(seen_since, "--seen-since")),
        ("seen_before", _time_arg(seen_before, "--seen-before")), ("q", q),
    ):  # fmt: skip
        if value:
            params.append((name, value))
    with _client() as client:
        items = list(client.pages("/devices", params, limit))
        if as_json:
            _print_json(items)
        else:
            table = Table()
            for col in ("device", "product", "hardware", "installed", "state", "tags",
                        "last seen", ""):  # fmt: skip
                table.add_column(col)
            for d in items:
                table.add_row(*_device_row(d))
            out.print(table)
            _say(f"{len(items)} device(s)")
        _more(client, "devices")


def _events_table(items: list[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title)
    for col in ("time", "kind", "state", "progress", "result", "reason"):
        table.add_column(col)
    for e in items:
        progress = e.get("progress")
        table.add_row(
            _t(e.get("created")), _t(e.get("kind")), _t(e.get("state")),
            _t(f"{progress}%" if progress is not None else ""), _t(e.get("result")),
            _t(e.get("reason")),
        )  # fmt: skip
    return table


@devices_app.command("show")
def devices_show(
    device_id: Annotated[str, typer.Argument(help="The device id.")],
    events_shown: Annotated[int, typer.Option("--events", help="Latest events shown.")] = 20,
    as_json: _JSON = False,
) -> None:
    """Everything about one device, its deployments and its latest events."""
    if not 0 <= events_shown <= 500:
        raise UserInputError("--events must be from 0 to 500")
    path = f"/devices/{_seg(device_id, 'device id')}"
    with _client() as client:
        d = client.json("GET", path)
        events = []
        if events_shown:
            events = client.json("GET", f"{path}/events", params={"limit": events_shown})["items"]
    if as_json:
        _print_json({"device": d, "events": events})
        return
    grid = Table.grid(padding=(0, 2))
    cert = d.get("certificate") or {}
    revoked = (
        f"yes, {d.get('revoked_at') or '?'}: {d.get('revoke_reason') or ''}"
        if d.get("revoked")
        else "no"
    )
    progress = d.get("progress")
    rows = [
        ("device", d.get("device_id")), ("product", d.get("product")),
        ("hardware", d.get("hardware_id")), ("installed", _slots(d) or "-"),
        ("state", f"{d.get('state')}" + (f" {progress}%" if progress is not None else "")
         + (f" ({d['state_reason']})" if d.get("state_reason") else "")),
        ("tags", ", ".join(d.get("tags") or []) or "-"),
        ("last seen", d.get("last_seen") or "never"),
        ("enrolled", f"{d.get('created')} via {d.get('enrolled_via')}"),
        ("certificate", f"{cert.get('fingerprint')} until {cert.get('not_after')}"),
        ("revoked", revoked),
    ]  # fmt: skip
    for k, v in rows:
        grid.add_row(Text(k, style="bold"), _t(v))
    out.print(grid)
    deployments = d.get("deployments") or []
    if deployments:
        table = Table(title="deployments")
        for col in ("id", "name", "status", "phase", "device status", "reason"):
            table.add_column(col)
        for dep in deployments:
            keys = ("id", "name", "status", "phase", "device_status", "device_reason")
            table.add_row(*(_t(dep.get(k)) for k in keys))
        out.print(table)
    if events_shown:
        out.print(_events_table(events, "latest events"))


@devices_app.command("tag")
def devices_tag(
    device_id: Annotated[str, typer.Argument(help="The device id.")],
    tags: Annotated[list[str] | None, typer.Argument(help="The device's tags from now on.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every tag.")] = False,
) -> None:
    """Replace a device's tags (site:lab, ring=canary, ...)."""
    if bool(tags) == clear:
        raise UserInputError("give the device's new tags, or --clear to remove them all")
    with _client() as client:
        d = client.json(
            "PUT", f"/devices/{_seg(device_id, 'device id')}/tags", json={"tags": tags or []}
        )
    _say(f"{d['device_id']}: tags {', '.join(d['tags']) or '(none)'}")


@devices_app.command("revoke")
def devices_revoke(
    device_id: Annotated[str, typer.Argument(help="The device id.")],
    reason: Annotated[str, typer.Option(help="Why, for the record.")],
) -> None:
    """Revoke a device: the gateway refuses its certificate from its next request on."""
    with _client() as client:
        d = client.json(
            "POST", f"/devices/{_seg(device_id, 'device id')}/revoke", json={"reason": reason}
        )
    _say(f"{d['device_id']} revoked at {d.get('revoked_at')}: {d.get('revoke_reason')}")


def events(
    device_id: Annotated[str, typer.Argument(help="The device id.")],
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: _JSON = False,
) -> None:
    """A device's events (its reports), newest first."""
    _check_limit(limit)
    with _client() as client:
        items = list(client.pages(f"/devices/{_seg(device_id, 'device id')}/events", [], limit))
        if as_json:
            _print_json(items)
        else:
            out.print(_events_table(items))
        _more(client, "events")


def audit(
    action: Annotated[
        str | None, typer.Option(help="Only this action (device.revoke, deployment.create...).")
    ] = None,
    actor: Annotated[str | None, typer.Option(help="Only what this actor did.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Since an RFC 3339 time, or a duration (1h, 7d) ago.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: _JSON = False,
) -> None:
    """The audit log: every change made through the API, newest first."""
    _check_limit(limit)
    params = [
        (k, v)
        for k, v in (("action", action), ("actor", actor), ("since", _time_arg(since, "--since")))
        if v
    ]
    with _client() as client:
        items = list(client.pages("/audit", params, limit))
        if as_json:
            _print_json(items)
        else:
            table = Table()
            for col in ("time", "actor", "action", "target", "details"):
                table.add_column(col)
            for e in items:
                details = json.dumps(e.get("details"), separators=(",", ":"), sort_keys=True)
                table.add_row(
                    _t(e.get("created")), _t(e.get("actor")), _t(e.get("action")),
                    _t(f"{e.get('target_type')} {e.get('target_id')}"),
                    _t(details if len(details) <= 100 else details[:99] + "…"),
                )  # fmt: skip
            out.print(table)
        _more(client, "entries")


# -- provisioning keys and signer CAs -------------------------------------------------------------


@provisioning_app.command("create")
def provisioning_create(
    product: Annotated[str, typer.Argument(help="The product devices enroll into.")],
    name: Annotated[str, typer.Argument(help="A name for the key (a factory line, a batch).")],
    max_uses: Annotated[int | None, typer.Option(help="Enrollments it allows.")] = None,
    expires: Annotated[
        str | None, typer.Option(help="When it expires: an RFC 3339 time, or a duration (30d).")
    ] = None,
) -> None:
    """Create a provisioning key; the key alone is printed on stdout, this once."""
    body: dict[str, Any] = {"name": name}
    if max_uses is not None:
        body["max_uses"] = max_uses
    if expires is not None:
        body["expires"] = _time_arg(expires, "--expires", future=True)
    with _client() as client:
        k = client.json(
            "POST", f"/products/{_seg(product, 'product name')}/provisioning-keys", json=body
        )
    typer.echo(k["key"])
    _say(
        f"provisioning key {k['name']} (id {k['id']}, prefix {k['prefix']}) for "
        f"{k.get('product', product)} created; the key is shown only now: store it safely"
    )


@provisioning_app.command("list")
def provisioning_list(
    product: Annotated[str, typer.Argument(help="The product.")], as_json: _JSON = False
) -> None:
    """A product's provisioning keys (never the keys themselves)."""
    with _client() as client:
        items = client.json("GET", f"/products/{_seg(product, 'product name')}/provisioning-keys")[
            "items"
        ]
    if as_json:
        _print_json(items)
        return
    table = Table()
    for col in ("id", "name", "prefix", "uses", "expires", "revoked", "created"):
        table.add_column(col)
    for k in items:
        uses = f"{k.get('uses')}" + (f"/{k['max_uses']}" if k.get("max_uses") else "")
        table.add_row(
            _t(k.get("id")), _t(k.get("name")), _t(k.get("prefix")), _t(uses),
            _t(k.get("expires"), "never"), _t("revoked" if k.get("revoked") else ""),
            _t(k.get("created")),
        )  # fmt: skip
    out.print(table)


@provisioning_app.command("revoke")
def provisioning_revoke(key_id: Annotated[int, typer.Argument(help="The key's id.")]) -> None:
    """Revoke a provisioning key: no device enrolls with it any more."""
    with _client() as client:
        client.request("DELETE", f"/provisioning-keys/{key_id}")
    _say(f"provisioning key {key_id} revoked")


@signer_ca_app.command("add")
def signer_ca_add(
    name: Annotated[str, typer.Argument(help="A name for the CA.")],
    certificate: Annotated[Path, typer.Argument(help="The CA certificate (PEM).")],
    product: Annotated[str | None, typer.Option(help="Only for this product's devices.")] = None,
) -> None:
    """Register a CA whose device certificates the gateway accepts."""
    pem = read_bounded(certificate, _MAX_PEM_BYTES, "certificate")
    try:
        text = pem.decode("ascii")
    except UnicodeDecodeError as e:
        raise UserInputError(f"{certificate} is not a PEM certificate") from e
    body: dict[str, Any] = {"name": name, "certificate": text}
    if product:
        body["product"] = product
    with _client() as client:
        c = client.json("POST", "/signer-cas", json=body)
    _say(f"signer CA {c['name']} (id {c['id']}) added: {c['subject']}, until {c['not_after']}")


@signer_ca_app.command("list")
def signer_ca_list(as_json: _JSON = False) -> None:
    """The registered signer CAs."""
    with _client() as client:
        items = client.json("GET", "/signer-cas")["items"]
    if as_json:
        _print_json(items)
        return
    table = Table()
    for col in ("id", "name", "product", "subject", "fingerprint", "not after", "revoked"):
        table.add_column(col)
    for c in items:
        table.add_row(
            _t(c.get("id")), _t(c.get("name")), _t(c.get("product"), "(all)"), _t(c.get("subject")),
            _t(str(c.get("fingerprint") or "")[:16]), _t(c.get("not_after")),
            _t("revoked" if c.get("revoked") else ""),
        )  # fmt: skip
    out.print(table)


@signer_ca_app.command("remove")
def signer_ca_remove(ca_id: Annotated[int, typer.Argument(help="The CA's id.")]) -> None:
    """Remove a signer CA: certificates it signed are refused from now on."""
    with _client() as client:
        client.request("DELETE", f"/signer-cas/{ca_id}")
    _say(f"signer CA {ca_id} removed")


# -- deployments ----------------------------------------------------------------------------------


def _group(p: dict[str, Any]) -> str:
    if p.get("percent") is not None:
        return f"{p['percent']:g}%"
    return f"tag {p.get('tag')}"


def _status_view(s: dict[str, Any]) -> RenderableType:
    header = Text()
    header.append(f"deployment {s['id']} {_plain(s['name'])}: {_plain(s['product'])} ")
    header.append(f"{_plain(s['version'])}  ")
    header.append(_plain(s["status"]), style="bold")
    if s.get("paused_reason"):
        header.append(f"  ({_plain(s['paused_reason'])})")
    table = Table()
    for col in ("phase", "group", "devices", "pending", "downloading", "installed", "committed",
                "failed", "rolled back", "failure rate"):  # fmt: skip
        table.add_column(col, justify="right")
    for p in s["phases"]:
        c = p.get("counts") or {}
        current = p["phase"] == s.get("current_phase") and s["status"] in ("active", "paused")
        table.add_row(
            _t(f"{'▶ ' if current else ''}{p['phase']}"), _t(_group(p)), _t(p.get("devices", 0)),
            *(_t(c.get(k, 0)) for k in ("pending", "downloading", "installed", "committed",
                                        "failed", "rolled_back")),
            _t(f"{p.get('failure_rate_percent', 0):.1f}% / {s['failure_gate_percent']:g}%"),
        )  # fmt: skip
    bandwidth = _bandwidth_line(s.get("bandwidth"))
    return Group(header, table, Text(bandwidth)) if bandwidth else Group(header, table)


def _bandwidth_line(bw: Any) -> str | None:
    """What the devices that reported downloaded, in a line; None before any report."""
    if not isinstance(bw, dict) or not bw.get("devices"):
        return None
    n = int(bw["devices"])
    line = (
        f"bandwidth: {n} device{'s' if n != 1 else ''} downloaded "
        f"{human_size(int(bw['downloaded_bytes']))} for {human_size(int(bw['image_bytes']))} "
        "of images"
    )
    if bw.get("saved_percent") is not None:
        line += f" (saved {bw['saved_percent']:g}% against whole-image downloads)"
    return line


def _summary(s: dict[str, Any]) -> str:
    """One line for a log: where a deployment is."""
    totals: dict[str, int] = {}
    for p in s["phases"]:
        for k, v in (p.get("counts") or {}).items():
            totals[k] = totals.get(k, 0) + int(v)
    devices = sum(int(p.get("devices", 0)) for p in s["phases"])
    return (
        f"{datetime.now(UTC):%H:%M:%S} deployment {s['id']} {s['status']} in phase "
        f"{s.get('current_phase')} (phases 0-{len(s['phases']) - 1}): "
        f"{totals.get('committed', 0)}/{devices} committed, {totals.get('failed', 0)} failed, "
        f"{totals.get('rolled_back', 0)} rolled back"
    )


def _show_status(s: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(s)
    else:
        out.print(_status_view(s))


def _phases(phase: list[str]) -> list[dict[str, Any]]:
    phases: list[dict[str, Any]] = []
    for p in phase:
        if p.startswith("tag:"):
            phases.append({"tag": p.removeprefix("tag:")})
            continue
        try:
            value = float(p.strip().rstrip("%"))
        except ValueError:
            value = float("nan")
        if not 0 < value <= 100:
            raise UserInputError(
                f"--phase takes a percentage (0 < n <= 100) or tag:NAME, not {p!r}"
            )
        phases.append({"percent": int(value) if value.is_integer() else value})
    return phases


@deploy_app.command("create")
def deploy_create(
    name: Annotated[str, typer.Option(help="A name people will recognise.")],
    product: Annotated[str, typer.Option(help="The product.")],
    version: Annotated[str, typer.Option(help="The release to roll out.")],
    phase: Annotated[
        list[str],
        typer.Option(
            help="A phase, in order (repeat): tag:NAME, or a cumulative percentage of the "
            "selection; the last must be 100."
        ),
    ],
    tag: Annotated[
        list[str] | None, typer.Option(help="Select devices with this tag (repeat: all).")
    ] = None,
    hardware: Annotated[str | None, typer.Option(help="Select this hardware id.")] = None,
    from_version: Annotated[
        list[str] | None, typer.Option(help="Select devices running this version (repeat: any).")
    ] = None,
    device: Annotated[list[str] | None, typer.Option(help="Select this device (repeat).")] = None,
    q: Annotated[str | None, typer.Option("--search", help="Select ids containing this.")] = None,
    gate: Annotated[float, typer.Option(help="Pause when a phase's failure % exceeds this.")] = 5.0,
    soak: Annotated[int, typer.Option(help="Minimum seconds per phase.")] = 3600,
    allow_downgrade: Annotated[bool, typer.Option(help="Allow devices to go back.")] = False,
    as_json: _JSON = False,
) -> None:
    """Create a phased deployment of a release; phase 0 starts at once."""
    selector: dict[str, Any] = {}
    if tag:
        selector["tags"] = tag
    if hardware:
        selector["hardware"] = hardware
    if from_version:
        selector["versions"] = from_version
    if device:
        selector["devices"] = device
    if q:
        selector["q"] = q
    body = {
        "name": name, "product": product, "version": version, "selector": selector,
        "phases": _phases(phase), "failure_gate_percent": gate, "min_soak_s": soak,
        "allow_downgrade": allow_downgrade,
    }  # fmt: skip
    with _client() as client:
        _show_status(client.json("POST", "/deployments", json=body), as_json)


@deploy_app.command("list")
def deploy_list(
    status: Annotated[str | None, typer.Option(help="Only deployments in this status.")] = None,
    as_json: _JSON = False,
) -> None:
    """Deployments, newest first."""
    with _client() as client:
        items = client.json("GET", "/deployments", params={"status": status} if status else {})[
            "items"
        ]
    if as_json:
        _print_json(items)
        return
    table = Table()
    for col in ("id", "name", "product", "version", "status", "phase", "devices", "created"):
        table.add_column(col)
    for d in items:
        status_text = _plain(d.get("status")) + (
            f" ({_plain(d['paused_reason'])})" if d.get("paused_reason") else ""
        )
        table.add_row(
            _t(d.get("id")), _t(d.get("name")), _t(d.get("product")), _t(d.get("version")),
            _t(status_text), _t(f"{d.get('current_phase')} (0-{int(d.get('phases') or 1) - 1})"),
            _t(d.get("devices")), _t(d.get("created")),
        )  # fmt: skip
    out.print(table)


@contextmanager
def _live(enabled: bool, first: RenderableType) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.live import Live

    with Live(first, console=out, auto_refresh=False) as live:
        yield live


def _watch(client: HubClient, path: str, interval: float, timeout: float, as_json: bool) -> None:
    deadline = time.monotonic() + timeout
    s = client.json("GET", path)
    on_screen = out.is_terminal and not as_json
    with _live(on_screen, _status_view(s)) as live:
        if live is None:
            _say(_summary(s))
        while s["status"] not in _SETTLED:
            if time.monotonic() + interval > deadline:
                _say(f"still {s['status']} after {timeout:g} s; stopped watching")
                break
            time.sleep(interval)
            s = client.json("GET", path)
            if live is not None:
                live.update(_status_view(s), refresh=True)
            else:
                _say(_summary(s))
    if not on_screen:
        _show_status(s, as_json)


@deploy_app.command("status")
def deploy_status(
    deployment: Annotated[int, typer.Argument(help="The deployment's id.")],
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until completed, paused or aborted.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes (--watch).")] = 10.0,
    timeout: Annotated[float, typer.Option(help="Stop watching after this many seconds.")] = 3600,
    as_json: _JSON = False,
) -> None:
    """Per-phase progress, failure rate against the gate, and why it paused."""
    if watch and not (1 <= interval <= 3600 and 0 <= timeout <= 7 * 86400):
        raise UserInputError("--interval must be 1..3600 s and --timeout 0..604800 s")
    with _client() as client:
        path = f"/deployments/{deployment}"
        if watch:
            _watch(client, path, interval, timeout, as_json)
        else:
            _show_status(client.json("GET", path), as_json)


def _transition(
    deployment: int, action: str, as_json: bool, body: dict[str, Any] | None = None
) -> None:
    with _client() as client:
        s = client.json("POST", f"/deployments/{deployment}/{action}", json=body or {})
    _show_status(s, as_json)


@deploy_app.command("pause")
def deploy_pause(
    deployment: Annotated[int, typer.Argument(help="The deployment's id.")],
    reason: Annotated[str | None, typer.Option(help="Why (default: paused by you).")] = None,
    as_json: _JSON = False,
) -> None:
    """Stop offering the release to more devices."""
    _transition(deployment, "pause", as_json, {"reason": reason} if reason else None)


@deploy_app.command("resume")
def deploy_resume(
    deployment: Annotated[int, typer.Argument(help="The deployment's id.")], as_json: _JSON = False
) -> None:
    """Continue a paused deployment."""
    _transition(deployment, "resume", as_json)


@deploy_app.command("abort")
def deploy_abort(
    deployment: Annotated[int, typer.Argument(help="The deployment's id.")], as_json: _JSON = False
) -> None:
    """Stop for good; devices that have not installed it are no longer offered it."""
    _transition(deployment, "abort", as_json)
