"""``skylift bundle``: create, inspect, verify and extract update bundles."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from skylift.bundle import (
    BundleHead,
    ChunkData,
    HookSource,
    PayloadSource,
    TrustedKeys,
    read_body,
    read_head,
    write_bundle,
)
from skylift.chunks import ChunkingParams, ChunkingParamsError
from skylift.cli.common import err, human_size, load_signer, out, trusted_keys
from skylift.cli.extract import extract as extract_payloads
from skylift.errors import UserInputError
from skylift.fsutil import fsync_dir, read_bounded

app = typer.Typer(no_args_is_help=True, help="Create, inspect, verify and extract bundles.")

_MAX_HOOK_BYTES = 1 << 20

KeyOpt = Annotated[
    list[Path] | None,
    typer.Option("--key", "-k", help="Trusted release public key (repeat for several)."),
]
RootOpt = Annotated[
    Path | None,
    typer.Option("--root", help="Trusted TUF root.json: its targets role's keys and threshold."),
]
ThresholdOpt = Annotated[
    int | None, typer.Option("--threshold", help="Signatures needed (default: 1, or the root's).")
]
HardwareOpt = Annotated[
    str | None, typer.Option("--hardware", help="Refuse unless compatible with this hardware id.")
]


def _split_pair(value: str, option: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise UserInputError(f"{option} takes NAME=VALUE, not {value!r}")
    return name, rest


def _parse_chunking(spec: str) -> ChunkingParams:
    kind, _, size = spec.partition(":")
    try:
        n = int(size[:-1]) * 1024 if size.upper().endswith("K") else int(size)
        if kind == "fixed":
            return ChunkingParams.fixed(n)
        if kind == "cdc":
            return ChunkingParams.cdc(n)
    except ValueError:
        pass
    except ChunkingParamsError as e:
        raise UserInputError(f"--chunking {spec}: {e.message}") from e
    raise UserInputError(f"--chunking takes NAME=cdc:SIZE or NAME=fixed:SIZE, not {spec!r}")


def _open_input(path: str, stack: ExitStack) -> io.BufferedReader:
    if path == "-":
        return cast(io.BufferedReader, sys.stdin.buffer)
    try:
        return stack.enter_context(open(path, "rb"))
    except OSError as e:
        raise UserInputError(f"cannot read {path}: {e.strerror or e}") from e


@app.command()
def create(
    product: Annotated[str, typer.Option(help="Product name.")],
    version: Annotated[str, typer.Option(help="Version of this release.")],
    hardware: Annotated[
        list[str], typer.Option("--hardware", help="Compatible hardware id (repeat).")
    ],
    payload: Annotated[
        list[str], typer.Option("--payload", help="NAME=FILE, e.g. rootfs=rootfs.ext4 (repeat).")
    ],
    key: Annotated[
        list[Path], typer.Option("--key", "-k", help="Release private key (repeat for several).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The bundle file to write.")],
    hook: Annotated[
        list[str] | None,
        typer.Option(
            "--hook", help="PHASE=FILE: pre-install, post-install, health-check, on-rollback."
        ),
    ] = None,
    chunking: Annotated[
        list[str] | None,
        typer.Option(
            "--chunking",
            help=(
                "NAME=cdc:SIZE or NAME=fixed:SIZE for one payload (repeat). Default by "
                "payload type: ext4 and erofs fixed blocks of the filesystem's block size, "
                "vfat of its cluster size (4K unless the data area is cluster-aligned), "
                "never under 4K; squashfs, tar and anything else cdc:16K (ADR 0005)."
            ),
        ),
    ] = None,
    compression_level: Annotated[int, typer.Option(help="zstd level per chunk.")] = 3,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Threads (default: CPUs).")] = 0,
    min_agent_version: Annotated[str, typer.Option(help="Oldest agent that may install it.")] = (
        "0.1.0"
    ),
) -> None:
    """Make a signed bundle from payload images, hooks and release key(s)."""
    if not 1 <= compression_level <= 22:
        raise UserInputError("--compression-level must be within 1..22")
    signers = [load_signer(k) for k in key]
    chunk_specs = dict(_split_pair(c, "--chunking") for c in chunking or [])
    hooks = []
    for h in hook or []:
        phase, path = _split_pair(h, "--hook")
        hooks.append(HookSource(phase, read_bounded(Path(path), _MAX_HOOK_BYTES, "hook")))
    pairs = [_split_pair(p, "--payload") for p in payload]
    names = {n for n, _ in pairs}
    stray = set(chunk_specs) - names
    if stray:
        raise UserInputError(f"--chunking names no payload: {', '.join(sorted(stray))}")
    total = 0
    for _, path in pairs:
        if path != "-" and os.path.isfile(path):
            total += os.path.getsize(path)
    out_dir = output.parent if str(output.parent) else Path(".")
    if not out_dir.is_dir():
        raise UserInputError(f"{out_dir} is not a directory")
    tmp = out_dir / f".{output.name}.partial-{os.getpid()}"
    with ExitStack() as stack:
        sources = [
            PayloadSource(
                name,
                _open_input(path, stack),
                chunking=_parse_chunking(chunk_specs[name]) if name in chunk_specs else None,
            )
            for name, path in pairs
        ]
        spool = stack.enter_context(tempfile.TemporaryFile(dir=out_dir, prefix=".skylift-spool-"))
        progress = stack.enter_context(
            Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=err,
                transient=True,
                disable=not err.is_terminal,
            )
        )
        task = progress.add_task("chunking", total=total or None)
        try:
            with open(tmp, "xb") as f:
                manifest = write_bundle(
                    f,
                    product=product,
                    version=version,
                    compatible=hardware,
                    payloads=sources,
                    hooks=hooks,
                    signers=signers,
                    spool=spool,
                    created=datetime.now(UTC),
                    min_agent_version=min_agent_version,
                    compression_level=compression_level,
                    workers=jobs or min(os.cpu_count() or 1, 4),
                    progress=lambda n: progress.advance(task, n),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, output)
            fsync_dir(out_dir)
        finally:
            tmp.unlink(missing_ok=True)
    size = output.stat().st_size
    err.print(
        f"wrote {output}: {manifest.product} {manifest.version}, "
        f"{len(manifest.payloads)} payload(s), {human_size(manifest.total_size)} -> "
        f"{human_size(size)}"
    )
    for p in manifest.payloads:
        err.print(f"  {p.name}: {p.type}, {p.chunking.describe()}, {p.chunks} chunks")


def _open_verified(
    path: str, trusted: TrustedKeys, hardware: str | None, stack: ExitStack
) -> tuple[io.BufferedReader, BundleHead]:
    """Open a bundle, verify its manifest, check the hardware; the body is still to read."""
    stream = _open_input(path, stack)
    head = read_head(stream)
    head.verify(trusted)
    if hardware is not None:
        head.manifest.require_hardware(hardware)
    return stream, head


def _describe(head: BundleHead) -> dict[str, Any]:
    d = head.unverified_manifest().to_dict()
    d["signatures"] = [
        {"keyid": s.keyid, "verified": s.keyid in head.verified_by} for s in head.signatures
    ]
    d["verified"] = head.verified
    return d


@app.command()
def inspect(
    bundle: Annotated[str, typer.Argument(help="Bundle file, or - for standard input.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    key: KeyOpt = None,
    root: RootOpt = None,
    threshold: ThresholdOpt = None,
) -> None:
    """Show a bundle's manifest (reads only its head). With --key/--root, checks signatures."""
    with ExitStack() as stack:
        head = read_head(_open_input(bundle, stack))
    if key or root:
        head.verify(trusted_keys(key or [], root, threshold))
    if as_json:
        typer.echo(json.dumps(_describe(head), indent=2, sort_keys=True))
        return
    m = head.unverified_manifest()
    summary = Table.grid(padding=(0, 2))
    summary.add_row("product", m.product)
    summary.add_row("version", m.version)
    summary.add_row("hardware", ", ".join(m.compatible))
    summary.add_row("created", m.created.strftime("%Y-%m-%d %H:%M:%S UTC"))
    summary.add_row("min agent", m.min_agent_version)
    for s in head.signatures:
        state = "[green]verified[/]" if s.keyid in head.verified_by else "not checked"
        if (key or root) and s.keyid not in head.verified_by:
            state = "[yellow]not a trusted key[/]"
        summary.add_row("signed by", f"{s.keyid}  {state}")
    for h in m.hooks:
        summary.add_row("hook", f"{h.phase} ({h.size} bytes, sha256 {h.sha256[:16]}…)")
    out.print(summary)
    table = Table(title="payloads", title_justify="left")
    for col in ("name", "slot", "type", "size", "stored", "chunks", "chunking", "sha256"):
        table.add_column(col, justify="right" if col in ("size", "stored", "chunks") else "left")
    for p in m.payloads:
        table.add_row(
            p.name,
            p.slot_class,
            p.type,
            human_size(p.size),
            human_size(p.stored_size),
            str(p.chunks),
            p.chunking.describe(),
            p.sha256[:16] + "…",
        )
    out.print(table)


@app.command()
def verify(
    bundle: Annotated[str, typer.Argument(help="Bundle file, or - for standard input.")],
    key: KeyOpt = None,
    root: RootOpt = None,
    threshold: ThresholdOpt = None,
    hardware: HardwareOpt = None,
) -> None:
    """Check signatures, then every hook, index page and chunk, to the last byte."""
    trusted = trusted_keys(key or [], root, threshold)
    with ExitStack() as stack:
        stream, head = _open_verified(bundle, trusted, hardware, stack)
        chunks = sum(isinstance(e, ChunkData) for e in read_body(stream, head))
    m = head.manifest
    out.print(
        f"OK: {m.product} {m.version}, signed by {len(head.verified_by)} trusted key(s), "
        f"{len(m.payloads)} payload(s), {chunks} chunks verified"
    )


@app.command()
def extract(
    bundle: Annotated[str, typer.Argument(help="Bundle file, or - for standard input.")],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where payloads go as NAME.img.")
    ] = Path("."),
    payload: Annotated[
        list[str] | None,
        typer.Option("--payload", help="NAME=PATH: write this payload to a file or device."),
    ] = None,
    key: KeyOpt = None,
    root: RootOpt = None,
    threshold: ThresholdOpt = None,
    hardware: HardwareOpt = None,
) -> None:
    """Verify and write payloads to files or devices; nothing is left half-written."""
    trusted = trusted_keys(key or [], root, threshold)
    destinations = {n: Path(p) for n, p in (_split_pair(v, "--payload") for v in payload or [])}
    with ExitStack() as stack:
        stream, head = _open_verified(bundle, trusted, hardware, stack)
        output_dir.mkdir(parents=True, exist_ok=True)
        done = extract_payloads(stream, head, output_dir, destinations)
    for name, dest, n in done:
        out.print(f"{name}: {human_size(n)} -> {dest}")
