"""``skylift delta``: what a device running one image downloads to install a bundle.

``skylift delta plan --seed OLD_IMAGE NEW.bundle`` computes the download an
agent would make, with the agent's own code: the bundle's chunk index (read
from the bundle, skipping the chunk bytes; counted as the compressed copy the
hub serves and the agent fetches), the pack layout the hub builds and the
agent derives (:func:`skylift.agent.plan.pack_offsets`), the seed cut with
the payload's chunking parameters
(:func:`skylift.agent.plan.seed_index`) and the install plan with its
coalesced range requests (:func:`skylift.agent.plan.make_plan`). Nothing is
written and no network is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from rich.table import Table

from skylift.agent.plan import (
    DEFAULT_MAX_GAP_BYTES,
    DEFAULT_MAX_RANGE_BYTES,
    DEFAULT_MAX_RANGES_PER_REQUEST,
    InstallPlan,
    Source,
    make_plan,
    seed_index,
)
from skylift.bundle import (
    BundleHead,
    ChunkData,
    CorruptIndexError,
    Limits,
    Manifest,
    PayloadEntry,
    PayloadSizeError,
    TruncatedBundleError,
    TrustedKeys,
    read_body,
    read_head,
)
from skylift.chunks import ChunkError, IndexTotalsError, PackedEntries, PageChainVerifier
from skylift.chunks.index import PAGE_HEADER_SIZE, compress_index, parse_page_header
from skylift.cli.bundle import KeyOpt, RootOpt, ThresholdOpt
from skylift.cli.common import err, human_size, out, trusted_keys
from skylift.deltamaker import make_delta
from skylift.errors import UserInputError

__all__ = ["DeltaPlan", "app", "measure_pair_delta", "plan_delta"]

app = typer.Typer(no_args_is_help=True, help="What a device downloads for an update.")

_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class DeltaPlan:
    """What one device would download for one payload, and why."""

    manifest: Manifest
    payload: PayloadEntry
    verified_by: tuple[str, ...]
    seed_bytes: int
    head_bytes: int
    index_bytes: int
    index_pages_bytes: int
    plan: InstallPlan
    max_gap_bytes: int
    max_range_bytes: int
    max_ranges_per_request: int
    #: Bytes of the per-pair delta from the seed (``--pair-delta``), and seconds to make it.
    pair_delta_bytes: int | None = None
    pair_delta_seconds: float | None = None
    #: ``plain``, or ``zlib`` (through the payloads' inflated zlib streams), and for
    #: ``zlib`` the streams the delta goes through and those the device deflates.
    pair_delta_kind: str | None = None
    pair_delta_streams: tuple[int, int] = (0, 0)

    @property
    def chunk_bytes(self) -> int:
        """What the chunk plan downloads: head, compressed index, pack ranges."""
        return self.metadata_bytes + self.plan.totals.download_bytes

    @property
    def method(self) -> str:
        """``delta`` when a per-pair delta was measured and is smaller, else ``chunks``.

        What a hub offers a device running exactly the seed (it offers a
        delta only when it is smaller than the chunk plan).
        """
        if self.pair_delta_bytes is not None and self.pair_delta_bytes < self.chunk_bytes:
            return "delta"
        return "chunks"

    @property
    def verified(self) -> bool:
        """True when the manifest's signatures were checked against trusted keys."""
        return bool(self.verified_by)

    @property
    def metadata_bytes(self) -> int:
        """Head (the TUF target) and compressed index: fetched before any chunk."""
        return self.head_bytes + self.index_bytes

    @property
    def fetched_object_bytes(self) -> int:
        """Bytes of the chunk objects fetched (codec byte + stored bytes), gaps excluded."""
        return sum(s.pack_range.length for s in self.plan.steps.iter_from(Source.PACK))

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        t = self.plan.totals
        ranges = sum(len(r.ranges) for r in self.plan.requests)
        return {
            "method": self.method,
            "pair_delta": None
            if self.pair_delta_bytes is None
            else {
                "bytes": self.pair_delta_bytes,
                "seconds": self.pair_delta_seconds,
                "kind": self.pair_delta_kind,
                "streams": self.pair_delta_streams[0],
                "recompressed_streams": self.pair_delta_streams[1],
            },
            "product": self.manifest.product,
            "version": self.manifest.version,
            "verified": self.verified,
            "verified_by": list(self.verified_by),
            "payload": self.payload.name,
            "type": self.payload.type,
            "chunking": self.payload.chunking.to_dict(),
            "payload_bytes": self.payload.size,
            "stored_bytes": self.payload.stored_size,
            "seed_bytes": self.seed_bytes,
            "chunks": {
                "total": t.chunks,
                "seed": t.seed_chunks,
                "target_copy": t.target_copy_chunks,
                "fetched": t.fetch_chunks,
            },
            "bytes": {
                "seed": t.seed_bytes,
                "target_copy": t.target_copy_bytes,
                "fetched_uncompressed": t.fetch_bytes,
                "fetched_objects": self.fetched_object_bytes,
                "ranges": t.download_bytes,
                "head": self.head_bytes,
                "index": self.index_bytes,
                "index_uncompressed": self.index_pages_bytes,
                "total": t.download_bytes + self.metadata_bytes,
            },
            "requests": t.requests,
            "ranges": ranges,
            "limits": {
                "max_gap_bytes": self.max_gap_bytes,
                "max_range_bytes": self.max_range_bytes,
                "max_ranges_per_request": self.max_ranges_per_request,
            },
        }


def _regular_file(path: Path, what: str, *, allow_block_device: bool = False) -> int:
    """The size of ``path``, refusing what is not a readable file (one line, no traceback)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserInputError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        hint = "give the active slot's image file or block device" if allow_block_device else None
        raise UserInputError(f"{what} {path} is a directory, not an image file", hint=hint)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if allow_block_device and stat.S_ISBLK(st.st_mode):
        with open(path, "rb") as f:
            return f.seek(0, os.SEEK_END)
    raise UserInputError(f"{what} {path} is not a regular file")


def _choose_payload(manifest: Manifest, name: str | None) -> tuple[int, PayloadEntry]:
    names = [p.name for p in manifest.payloads]
    if name is None:
        if len(names) == 1:
            return 0, manifest.payloads[0]
        raise UserInputError(
            f"the bundle has {len(names)} payloads ({', '.join(names)})",
            hint="choose the one the seed is for with --payload NAME",
        )
    if name not in names:
        raise UserInputError(f"the bundle has no payload {name!r} (it has {', '.join(names)})")
    i = names.index(name)
    return i, manifest.payloads[i]


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TruncatedBundleError(f"bundle ends in the middle of {what}")
    return data


def _read_index(
    f: BinaryIO, payload: PayloadEntry, file_size: int, limits: Limits
) -> tuple[PackedEntries, bytes]:
    """Read one payload's index pages from ``f`` (at the payload's start), skipping its chunks.

    Returns the entries and the pages as the hub stores them.

    Each page is checked against the chain that starts at the manifest's
    ``first_page_sha256``; chunk bytes are skipped (the plan needs only
    their stored lengths), so they are neither read nor verified.

    Raises:
        CorruptIndexError, PayloadSizeError, TruncatedBundleError.
    """
    where = f"payload {payload.name!r}"
    chain = PageChainVerifier(
        bytes.fromhex(payload.index.first_page_sha256),
        chunks=payload.chunks,
        payload_length=payload.size,
        max_chunk_bytes=min(limits.max_chunk_bytes, payload.chunking.max_size),
    )
    max_entries = min(limits.max_entries_per_page, payload.index.entries_per_page)
    entries = PackedEntries()
    raw = bytearray()
    pages = 0
    stored_total = 0
    try:
        while not chain.done:
            if pages == payload.index.pages:
                raise CorruptIndexError(f"{where}: index has more pages than the manifest declares")
            header = _read_exact(f, PAGE_HEADER_SIZE, f"the index of {where}")
            body_len = parse_page_header(header, max_entries=max_entries)
            page_bytes = header + _read_exact(f, body_len, f"the index of {where}")
            page = chain.accept(page_bytes)
            raw += page_bytes
            pages += 1
            stored = sum(e.stored_length for e in page.entries)
            stored_total += stored
            if f.seek(stored, os.SEEK_CUR) > file_size:
                raise TruncatedBundleError(f"bundle ends in the middle of a chunk of {where}")
            entries.extend(page.entries)
    except IndexTotalsError as e:
        raise PayloadSizeError(f"{where} differs from its declared size: {e.message}") from e
    except ChunkError as e:
        raise CorruptIndexError(f"{where}: {e.message}") from e
    if pages != payload.index.pages:
        raise CorruptIndexError(f"{where}: index has fewer pages than the manifest declares")
    if stored_total != payload.stored_size:
        raise PayloadSizeError(f"{where}: stored size differs from the manifest")
    return entries, bytes(raw)


def plan_delta(
    bundle: Path,
    seed: Path,
    *,
    payload_name: str | None = None,
    trusted: TrustedKeys | None = None,
    max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
    max_range_bytes: int = DEFAULT_MAX_RANGE_BYTES,
    max_ranges_per_request: int = DEFAULT_MAX_RANGES_PER_REQUEST,
    count_index: bool = True,
) -> DeltaPlan:
    """Plan the install of ``bundle`` on a device whose active slot holds ``seed``.

    ``trusted`` are the keys to check the manifest's signatures with; None
    reads it unverified (the result says so). Index pages are always checked
    against the manifest's hash chain; chunk bytes are not read.
    ``count_index`` False leaves the compressed index's size at 0 (what the
    bench's apply does, to measure the agent's memory and not zstd -19's).

    Raises:
        UserInputError: a path is missing, a directory or not a file; the
            payload is ambiguous or unknown; a limit is out of range.
        BundleError: the bundle is malformed, truncated, or not signed by
            the trusted keys.
    """
    if max_gap_bytes < 0 or max_range_bytes < 1 or max_ranges_per_request < 1:
        raise UserInputError(
            "--max-gap must be >= 0, --max-range and --max-ranges-per-request >= 1"
        )
    bundle_size = _regular_file(bundle, "bundle")
    seed_size = _regular_file(seed, "seed", allow_block_device=True)
    limits = Limits()
    with open(bundle, "rb") as f:
        head: BundleHead = read_head(f, limits=limits)
        if trusted is not None:
            head.verify(trusted)
            manifest = head.manifest
        else:
            manifest = head.unverified_manifest()
        index_no, payload = _choose_payload(manifest, payload_name)
        head_bytes = f.tell() + sum(h.size for h in manifest.hooks)
        f.seek(head_bytes)
        entries = PackedEntries()
        pages = b""
        for p in manifest.payloads[: index_no + 1]:
            entries, pages = _read_index(f, p, bundle_size, limits)
    with open(seed, "rb") as s:
        seeds = seed_index(s, payload.chunking, payload.size, wanted=entries.digest_table())
    plan = make_plan(
        entries,
        seeds,
        max_gap_bytes=max_gap_bytes,
        max_range_bytes=max_range_bytes,
        max_ranges_per_request=max_ranges_per_request,
    )
    return DeltaPlan(
        manifest=manifest,
        payload=payload,
        verified_by=tuple(head.verified_by),
        seed_bytes=seed_size,
        head_bytes=head_bytes,
        # zstd -19 of a large index takes seconds and about 100 MiB: only when asked.
        index_bytes=len(compress_index(pages)) if count_index else 0,
        index_pages_bytes=len(pages),
        plan=plan,
        max_gap_bytes=max_gap_bytes,
        max_range_bytes=max_range_bytes,
        max_ranges_per_request=max_ranges_per_request,
    )


def measure_pair_delta(d: DeltaPlan, bundle: Path, seed: Path, trusted: TrustedKeys) -> DeltaPlan:
    """``d`` with the size of the per-pair delta from ``seed`` to its payload.

    Made as the hub makes it (:func:`skylift.deltamaker.make_delta`: the
    seed and the payload cut with :func:`~skylift.chunks.delta.pair_chunking`,
    literals compressed against the seed and the bytes made before them,
    through both inflated forms when zlib streams make the payload): the
    payload is first written out of the bundle to a temporary file
    (signatures checked against ``trusted``, every chunk verified); the
    delta is made there, measured and removed.

    Raises:
        BundleError: the bundle is not signed by ``trusted`` or does not verify.
    """
    started = time.perf_counter()
    payload = d.payload
    with tempfile.TemporaryDirectory(prefix="skylift-delta-") as tmp:
        new_path = Path(tmp) / "new.img"
        with open(bundle, "rb") as f, open(new_path, "wb") as new_out:
            head = read_head(f)
            head.verify(trusted)
            for event in read_body(f, head):
                if isinstance(event, ChunkData) and event.payload.name == payload.name:
                    new_out.write(event.data)
        with open(seed, "rb") as old_f:
            old_sha = hashlib.file_digest(old_f, "sha256").hexdigest()
        made = make_delta(
            seed,
            new_path,
            payload.chunking,
            Path(tmp) / "delta",
            old_sha256=old_sha,
            new_sha256=payload.sha256,
        )
    return replace(
        d,
        pair_delta_bytes=made.length,
        pair_delta_seconds=round(time.perf_counter() - started, 1),
        pair_delta_kind=made.kind,
        pair_delta_streams=(made.streams, made.deflated),
    )


def _parse_bytes(text: str, option: str) -> int:
    """``65536``, ``64K``, ``4M`` -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = _SIZE_UNITS.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in _SIZE_UNITS else t
    if not digits.isdigit():
        raise UserInputError(f"{option} takes a number of bytes such as 65536 or 64K, not {text!r}")
    return int(digits) * unit


def _print_text(d: DeltaPlan, bundle: Path, seed: Path) -> None:
    t = d.plan.totals
    p = d.payload
    summary = Table.grid(padding=(0, 2))
    summary.add_row("bundle", f"{bundle}: {d.manifest.product} {d.manifest.version}")
    summary.add_row(
        "signatures",
        f"verified ({len(d.verified_by)} trusted key(s))"
        if d.verified
        else "NOT verified (give --key or --root to check them)",
    )
    summary.add_row(
        "payload",
        f"{p.name} ({p.type}, {human_size(p.size)}, {p.chunking.describe()}, "
        f"{human_size(p.stored_size)} stored)",
    )
    summary.add_row("seed", f"{seed} ({human_size(d.seed_bytes)})")
    if d.pair_delta_bytes is None:
        summary.add_row("method", "chunks (--pair-delta also measures a delta from the seed)")
    else:
        zlib = (
            f"; through {d.pair_delta_streams[0]} compressed streams, "
            f"{d.pair_delta_streams[1]} recompressed on the device"
            if d.pair_delta_kind == "zlib"
            else ""
        )
        summary.add_row(
            "method",
            f"{d.method}: a per-pair delta from the seed is {d.pair_delta_bytes} bytes "
            f"({human_size(d.pair_delta_bytes)}, made in {d.pair_delta_seconds:.1f} s{zlib}), "
            f"the chunk plan {d.chunk_bytes} bytes",
        )
    out.print(summary)
    table = Table(title="what the device does", title_justify="left")
    for col, justify in (("", "left"), ("chunks", "right"), ("bytes", "right"), ("", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_row("total", str(t.chunks), str(t.target_bytes), human_size(t.target_bytes))
    table.add_row(
        "reused from seed", str(t.seed_chunks), str(t.seed_bytes), human_size(t.seed_bytes)
    )
    table.add_row(
        "copied within target",
        str(t.target_copy_chunks),
        str(t.target_copy_bytes),
        human_size(t.target_copy_bytes),
    )
    table.add_row(
        "fetched (uncompressed)", str(t.fetch_chunks), str(t.fetch_bytes), human_size(t.fetch_bytes)
    )
    out.print(table)
    ranges = sum(len(r.ranges) for r in d.plan.requests)
    download = Table(title="download", title_justify="left")
    download.add_column("")
    download.add_column("bytes", justify="right")
    download.add_column("", justify="right")
    rows = (
        ("head + index (compressed)", d.metadata_bytes),
        (f"pack ranges ({ranges} ranges, gaps included)", t.download_bytes),
        ("total", d.metadata_bytes + t.download_bytes),
    )
    for label, n in rows:
        download.add_row(label, str(n), human_size(n))
    out.print(download)
    out.print(
        f"{t.requests} HTTP request(s) for the pack (max gap {d.max_gap_bytes}, max range "
        f"{d.max_range_bytes}, {d.max_ranges_per_request} ranges per request)"
    )


@app.command("plan")
def plan(
    bundle: Annotated[Path, typer.Argument(help="The new release's bundle file.")],
    seed: Annotated[
        Path,
        typer.Option("--seed", help="Image the device runs now (its active slot's contents)."),
    ],
    payload: Annotated[
        str | None,
        typer.Option("--payload", help="Payload the seed is for (default: the only one)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    max_gap: Annotated[
        str,
        typer.Option(
            "--max-gap", help="Fetch gaps up to this many bytes rather than split a range."
        ),
    ] = str(DEFAULT_MAX_GAP_BYTES),
    max_range: Annotated[
        str, typer.Option("--max-range", help="Largest merged range in bytes.")
    ] = str(DEFAULT_MAX_RANGE_BYTES),
    max_ranges_per_request: Annotated[
        int, typer.Option("--max-ranges-per-request", help="Ranges in one HTTP request.")
    ] = DEFAULT_MAX_RANGES_PER_REQUEST,
    key: KeyOpt = None,
    root: RootOpt = None,
    threshold: ThresholdOpt = None,
    pair_delta: Annotated[
        bool,
        typer.Option(
            "--pair-delta",
            help="Also make the per-pair delta a hub would offer a device running exactly "
            "SEED (slower: compresses the changed bytes) and say which method wins.",
        ),
    ] = False,
) -> None:
    """Print what a device running SEED downloads to install BUNDLE: bytes, requests, chunks.

    Uses the agent's planner on the pack the hub would build. Without --key or
    --root the manifest's signatures are not checked, and the output says so.
    """
    gap = _parse_bytes(max_gap, "--max-gap")
    rng = _parse_bytes(max_range, "--max-range")
    if pair_delta and not (key or root):
        raise UserInputError(
            "--pair-delta reads the payload's bytes, which needs the bundle's signatures "
            "checked: give --key or --root"
        )
    trusted = trusted_keys(key or [], root, threshold) if key or root else None
    d = plan_delta(
        bundle,
        seed,
        payload_name=payload,
        trusted=trusted,
        max_gap_bytes=gap,
        max_range_bytes=rng,
        max_ranges_per_request=max_ranges_per_request,
    )
    if pair_delta:
        assert trusted is not None
        d = measure_pair_delta(d, bundle, seed, trusted)
    if as_json:
        typer.echo(json.dumps(d.to_dict(), indent=2, sort_keys=True))
    else:
        _print_text(d, bundle, seed)
    if not d.verified:
        err.print("note: the bundle's signatures were not checked (give --key or --root)")
