"""Commands that talk to a hub: login, products, releases, devices, deployments.

All of them go through :class:`skylift.cli.client.HubClient` (imported when a
command runs: it needs the ``hub`` extra's HTTP client).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from skylift.bundle import ChunkData, IndexPageData, TrustedKeys, read_body, read_head
from skylift.cli.common import err, human_size, load_signer, out
from skylift.errors import UserInputError

if TYPE_CHECKING:
    from skylift.cli.client import HubClient

__all__ = ["deploy_app", "devices_app", "login", "product_app", "release_app"]

product_app = typer.Typer(no_args_is_help=True, help="Products and their image repositories.")
release_app = typer.Typer(no_args_is_help=True, help="Publish bundles to the hub.")
devices_app = typer.Typer(no_args_is_help=True, help="Inspect and manage devices.")
deploy_app = typer.Typer(no_args_is_help=True, help="Roll releases out in phases.")

_MISSING_BATCH = 10_000


def _client() -> HubClient:
    from skylift.cli.client import HubClient, load_credentials

    return HubClient(load_credentials())


def login(
    url: Annotated[str, typer.Argument(help="The hub, e.g. https://hub.example:8080")],
    token: Annotated[
        str | None, typer.Option(envvar="SKYLIFT_TOKEN", help="API token (or prompted).")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="CA certificate that signed the hub's.")] = None,
) -> None:
    """Store the hub URL and API token (mode 0600) after checking that they work."""
    from skylift.cli.client import Credentials, HubClient, save_credentials

    if token is None:
        token = typer.prompt("API token", hide_input=True)
    creds = Credentials(url, token.strip(), ca.resolve() if ca else None)
    with HubClient(creds) as client:
        info = client.json("GET", "/hub")
    path = save_credentials(creds)
    err.print(f"logged in to {info.get('name', url)}; credentials in {path}")


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
    err.print(
        f"product {product['name']} created; releases need {product['release_threshold']} "
        f"signature(s) of {len(product['release_keys'])} release key(s)"
    )


def _scan(path: Path, trusted: TrustedKeys) -> tuple[bytes, Any, dict[str, bytes], list[str]]:
    """Head bytes, manifest, index pages per payload and chunk digests, from one pass."""
    with open(path, "rb") as f:
        head = read_head(f)
        head.verify(trusted)
        indexes: dict[str, bytearray] = {}
        digests: list[str] = []
        for event in read_body(f, head):
            if isinstance(event, IndexPageData):
                indexes.setdefault(event.payload.name, bytearray()).extend(event.page)
            elif isinstance(event, ChunkData):
                digests.append(event.entry.hexdigest)
    with open(path, "rb") as f:
        head_bytes = f.read(head.length)
    return head_bytes, head.manifest, {k: bytes(v) for k, v in indexes.items()}, digests


@release_app.command("push")
def release_push(
    bundle: Annotated[Path, typer.Argument(help="The bundle file.")],
    key: Annotated[list[Path], typer.Option("--key", "-k", help="Release private key(s).")],
) -> None:
    """Publish a bundle: upload only the chunks the hub lacks, sign the new targets offline."""
    from skylift.trust.repository import sign_next_targets

    signers = _keys_of(key)
    trusted = TrustedKeys(tuple(s.public_key for s in signers), 1)
    head, manifest, indexes, digests = _scan(bundle, trusted)
    product = manifest.product
    with _client() as client:
        missing: set[str] = set()
        unique = sorted(set(digests))
        for i in range(0, len(unique), _MISSING_BATCH):
            batch = unique[i : i + _MISSING_BATCH]
            missing |= set(
                client.json("POST", "/chunks/missing", json={"digests": batch})["missing"]
            )
        uploaded = 0
        with open(bundle, "rb") as f, Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), console=err, transient=True, disable=not err.is_terminal,
        ) as progress:  # fmt: skip
            task = progress.add_task("uploading chunks", total=None)
            h = read_head(f)
            h.verify(trusted)
            for event in read_body(f, h):
                if isinstance(event, ChunkData) and event.entry.hexdigest in missing:
                    client.request(
                        "PUT",
                        f"/chunks/{event.entry.hexdigest}",
                        content=event.stored,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "X-Skylift-Codec": str(event.entry.codec),
                        },
                    )
                    missing.discard(event.entry.hexdigest)
                    uploaded += len(event.stored)
                    progress.advance(task, len(event.stored))
        root = client.request("GET", f"/products/{product}/image/metadata/root.json").content
        timestamp = client.json("GET", f"/products/{product}/image/metadata/timestamp.json")
        snapshot_version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
        snapshot = client.json(
            "GET", f"/products/{product}/image/metadata/{snapshot_version}.snapshot.json"
        )
        targets_version = snapshot["signed"]["meta"]["targets.json"]["version"]
        current = client.request(
            "GET", f"/products/{product}/image/metadata/{targets_version}.targets.json"
        ).content
        custom = {
            "product": product,
            "version": manifest.version,
            "hardware_ids": list(manifest.compatible),
            "payloads": {
                p.name: {"size": p.size, "sha256": p.sha256, "slot_class": p.slot_class}
                for p in manifest.payloads
            },
        }
        targets = sign_next_targets(
            current,
            path=f"{manifest.version}.head",
            content=head,
            custom=custom,
            signers=signers,
            root=root,
            now=datetime.now(UTC),
        )
        release = client.json(
            "POST",
            f"/products/{product}/releases",
            json={
                "targets": json.loads(targets),
                "head": base64.b64encode(head).decode(),
                "indexes": {n: base64.b64encode(d).decode() for n, d in indexes.items()},
            },
        )
    err.print(
        f"released {product} {release['version']}: {len(set(digests))} chunks, "
        f"{human_size(uploaded)} uploaded"
    )


def _device_row(d: dict[str, Any]) -> list[str]:
    slots = ", ".join(f"{k}={v}" for k, v in sorted((d.get("slots") or {}).items()))
    return [
        d["device_id"], d.get("product", ""), d.get("hardware_id", ""), slots or "-",
        str(d.get("state", "")), ", ".join(d.get("tags") or []), str(d.get("last_seen") or "-"),
        "revoked" if d.get("revoked") else "",
    ]  # fmt: skip


@devices_app.command("list")
def devices_list(
    tag: Annotated[
        list[str] | None, typer.Option(help="Only devices with this tag (repeat).")
    ] = None,
    product: Annotated[str | None, typer.Option()] = None,
    hardware: Annotated[str | None, typer.Option()] = None,
    version: Annotated[str | None, typer.Option()] = None,
    state: Annotated[str | None, typer.Option()] = None,
    q: Annotated[str | None, typer.Option("--search", help="Device id contains.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (all pages).")] = 1000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List devices, following pages up to --limit."""
    params: list[tuple[str, str]] = [("tag", t) for t in tag or []]
    for name, value in (("product", product), ("hardware", hardware), ("version", version),
                        ("state", state), ("q", q)):  # fmt: skip
        if value:
            params.append((name, value))
    items: list[dict[str, Any]] = []
    cursor = None
    with _client() as client:
        while len(items) < limit:
            page = client.json(
                "GET", "/devices",
                params=[*params, ("limit", str(min(500, limit - len(items)))),
                        *([("cursor", cursor)] if cursor else [])],
            )  # fmt: skip
            items += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    table = Table()
    for col in ("device", "product", "hardware", "installed", "state", "tags", "last seen", ""):
        table.add_column(col)
    for d in items:
        table.add_row(*_device_row(d))
    out.print(table)
    err.print(f"{len(items)} device(s)")


@devices_app.command("show")
def devices_show(device_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Everything about one device, and its latest events."""
    with _client() as client:
        d = client.json("GET", f"/devices/{device_id}")
        events = client.json("GET", f"/devices/{device_id}/events", params={"limit": 20})["items"]
    if as_json:
        typer.echo(json.dumps({"device": d, "events": events}, indent=2))
        return
    grid = Table.grid(padding=(0, 2))
    for k in ("device_id", "product", "hardware_id", "state", "state_reason", "last_seen",
              "enrolled_via", "revoked", "revoke_reason"):  # fmt: skip
        grid.add_row(k, str(d.get(k)))
    grid.add_row("slots", json.dumps(d.get("slots")))
    grid.add_row("tags", ", ".join(d.get("tags") or []))
    out.print(grid)
    table = Table(title="latest events")
    for col in ("time", "kind", "state", "progress", "result", "reason"):
        table.add_column(col)
    for e in events:
        table.add_row(*(str(e.get(c) or "") for c in ("created", "kind", "state", "progress",
                                                      "result", "reason")))  # fmt: skip
    out.print(table)


@devices_app.command("tag")
def devices_tag(device_id: str, tags: Annotated[list[str], typer.Argument()]) -> None:
    """Replace a device's tags."""
    with _client() as client:
        d = client.json("PUT", f"/devices/{device_id}/tags", json={"tags": tags})
    err.print(f"{d['device_id']}: tags {', '.join(d['tags']) or '(none)'}")


@devices_app.command("revoke")
def devices_revoke(
    device_id: str, reason: Annotated[str, typer.Option(help="Why, for the record.")]
) -> None:
    """Revoke a device: its certificate is refused on its next request."""
    with _client() as client:
        client.json("POST", f"/devices/{device_id}/revoke", json={"reason": reason})
    err.print(f"{device_id} revoked")


def _print_status(s: dict[str, Any]) -> None:
    out.print(
        f"deployment {s['id']} {s['name']}: {s['product']} {s['version']}  [bold]{s['status']}[/]"
        + (f"  ({s['paused_reason']})" if s.get("paused_reason") else "")
    )
    table = Table()
    for col in ("phase", "group", "devices", "pending", "downloading", "installed", "committed",
                "failed", "rolled back", "failure rate"):  # fmt: skip
        table.add_column(col, justify="right")
    for p in s["phases"]:
        c = p["counts"]
        group = f"{p['percent']}%" if p.get("percent") is not None else f"tag {p.get('tag')}"
        marker = "▶ " if p["phase"] == s["current_phase"] and s["status"] == "active" else ""
        table.add_row(
            f"{marker}{p['phase']}", group, str(p["devices"]), *(str(c.get(k, 0)) for k in (
                "pending", "downloading", "installed", "committed", "failed", "rolled_back")),
            f"{p['failure_rate_percent']:.1f}% / {s['failure_gate_percent']}%",
        )  # fmt: skip
    out.print(table)


@deploy_app.command("create")
def deploy_create(
    name: Annotated[str, typer.Option(help="A name people will recognise.")],
    product: Annotated[str, typer.Option()],
    version: Annotated[str, typer.Option(help="The release to roll out.")],
    phase: Annotated[
        list[str], typer.Option(help="Phase: 10 (percent of the selection) or tag:NAME (repeat).")
    ],
    tag: Annotated[list[str] | None, typer.Option(help="Select devices with this tag.")] = None,
    hardware: Annotated[str | None, typer.Option(help="Select this hardware id.")] = None,
    from_version: Annotated[
        list[str] | None, typer.Option(help="Select devices running this version.")
    ] = None,
    device: Annotated[list[str] | None, typer.Option(help="Select this device (repeat).")] = None,
    gate: Annotated[float, typer.Option(help="Pause above this failure %.")] = 5.0,
    soak: Annotated[int, typer.Option(help="Minimum seconds per phase.")] = 3600,
    allow_downgrade: Annotated[bool, typer.Option()] = False,
) -> None:
    """Create a phased deployment."""
    phases: list[dict[str, Any]] = []
    for p in phase:
        if p.startswith("tag:"):
            phases.append({"tag": p.removeprefix("tag:")})
        else:
            try:
                phases.append({"percent": float(p.rstrip("%"))})
            except ValueError as e:
                raise UserInputError(f"--phase takes a percentage or tag:NAME, not {p!r}") from e
    selector: dict[str, Any] = {}
    if tag:
        selector["tags"] = tag
    if hardware:
        selector["hardware"] = hardware
    if from_version:
        selector["versions"] = from_version
    if device:
        selector["devices"] = device
    body = {
        "name": name, "product": product, "version": version, "selector": selector,
        "phases": phases, "failure_gate_percent": gate, "min_soak_s": soak,
        "allow_downgrade": allow_downgrade,
    }  # fmt: skip
    with _client() as client:
        _print_status(client.json("POST", "/deployments", json=body))


@deploy_app.command("status")
def deploy_status(
    deployment: int, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Per-phase progress, failure rate against the gate, and why it paused."""
    with _client() as client:
        s = client.json("GET", f"/deployments/{deployment}")
    if as_json:
        typer.echo(json.dumps(s, indent=2))
    else:
        _print_status(s)


def _transition(deployment: int, action: str, body: dict[str, Any] | None = None) -> None:
    with _client() as client:
        _print_status(client.json("POST", f"/deployments/{deployment}/{action}", json=body or {}))


@deploy_app.command("pause")
def deploy_pause(
    deployment: int, reason: Annotated[str, typer.Option()] = "paused by operator"
) -> None:
    """Stop offering the release to more devices."""
    _transition(deployment, "pause", {"reason": reason})


@deploy_app.command("resume")
def deploy_resume(deployment: int) -> None:
    """Continue a paused deployment."""
    _transition(deployment, "resume")


@deploy_app.command("abort")
def deploy_abort(deployment: int) -> None:
    """Stop for good; devices that have not installed it are no longer offered it."""
    _transition(deployment, "abort")
