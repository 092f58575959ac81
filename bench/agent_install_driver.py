"""The agent side of bench/agent_install.py: one install from a real hub, in its own process.

Run by bench/agent_install.py (never by hand, though it can be), so that the
peak RSS its parent measures is the agent's alone. It does what the updater
does for one offer, with the agent's own modules and nothing of the updater:

    HubClient.check -> fetch_head -> read_head + Manifest (the head's length and
    SHA-256 are what TUF signed) -> fetch_index (page chain verified from the
    manifest's first page digest; pack offsets derived from it) -> seed_index
    of the active slot (``--seed``) -> make_plan -> apply_plan into the inactive
    file slot, with its journal, including the final read-back of the slot.

It prints one JSON line: seconds per stage, the plan's totals, what
``apply_plan`` did, and the process's peak RSS (``VmHWM``), with how much of
it each stage added.
With ``--tracemalloc`` it also records the Python allocations at the highest
traced moment (slower; the figures of such a run are not the bench's).

    python bench/agent_install_driver.py --config agent.toml --booted B [--seed] \
        [--installed 1.0] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

_MIB = 1 << 20
# Snapshots are taken when the traced memory beats the last one by this much.
_SNAPSHOT_STEP_BYTES = 2 * _MIB
_TRACE_FRAMES = 12


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmHWM``: peak RSS; ``VmRSS``: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Peaks:
    """Peak RSS after each stage, and with tracemalloc the heaviest moment's snapshot."""

    def __init__(self, trace: bool) -> None:
        self.trace = trace
        self.stages: dict[str, float] = {}
        self._hwm = 0.0
        self.snapshot: tracemalloc.Snapshot | None = None
        self.snapshot_where = ""
        self._snapshot_bytes = 0

    def stage(self, name: str) -> None:
        """Attribute the growth of the peak RSS since the last call to ``name``."""
        hwm = _status_kib("VmHWM") / 1024
        self.stages[name] = self.stages.get(name, 0.0) + hwm - self._hwm
        self._hwm = hwm

    def sample(self, where: str) -> None:
        if not self.trace:
            return
        current, _ = tracemalloc.get_traced_memory()
        if current >= self._snapshot_bytes + _SNAPSHOT_STEP_BYTES:
            self._snapshot_bytes = current
            self.snapshot = tracemalloc.take_snapshot()
            self.snapshot_where = where

    def report(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"vmhwm_growth_mib": self.stages}
        if self.trace:
            current, peak = tracemalloc.get_traced_memory()
            doc["traced_peak_mib"] = peak / _MIB
            doc["traced_end_mib"] = current / _MIB
            if self.snapshot is not None:
                doc["snapshot_mib"] = self._snapshot_bytes / _MIB
                doc["snapshot_where"] = self.snapshot_where
                doc["top"] = [
                    {
                        "mib": s.size / _MIB,
                        "blocks": s.count,
                        "where": [
                            f"{f.filename.split('/src/')[-1]}:{f.lineno}" for f in s.traceback
                        ],
                    }
                    for s in self.snapshot.statistics("traceback")[:8]
                ]
        return doc


def _where(filename: str, lineno: int) -> str:
    for marker in ("/src/", "site-packages/", "/bench/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{lineno}"


def verified_entries(payload: Any, data: bytes) -> Any:
    """The chunk entries of ``payload``'s index pages, each page verified by the chain.

    Packed, as the updater's ``verify_index`` keeps them.
    """
    from skylift.chunks import PackedEntries, PageChainVerifier
    from skylift.chunks.index import ENTRY_SIZE, PAGE_HEADER_SIZE, parse_page_header

    per_page = PAGE_HEADER_SIZE + payload.index.entries_per_page * ENTRY_SIZE
    if len(data) > payload.index.pages * per_page:
        raise SystemExit(f"the index of {payload.name} is larger than its manifest declares")
    chain = PageChainVerifier(
        bytes.fromhex(payload.index.first_page_sha256),
        chunks=payload.chunks,
        payload_length=payload.size,
        max_chunk_bytes=payload.chunking.max_size,
    )
    entries = PackedEntries()
    pos = 0
    while not chain.done:
        body = parse_page_header(
            data[pos : pos + PAGE_HEADER_SIZE], max_entries=payload.index.entries_per_page
        )
        page = data[pos : pos + PAGE_HEADER_SIZE + body]
        pos += len(page)
        entries.extend(chain.accept(page).entries)
    if pos != len(data):
        raise SystemExit(f"the index of {payload.name} has trailing bytes")
    return entries


def _import_agent() -> None:
    """What an agent process imports to install (the updater aside)."""
    import skylift.agent.config
    import skylift.agent.hubclient
    import skylift.agent.install
    import skylift.agent.journal
    import skylift.agent.plan
    import skylift.agent.slots
    import skylift.bundle  # noqa: F401


def _install(args: argparse.Namespace, peaks: _Peaks) -> dict[str, Any]:
    from skylift.agent.config import load_config
    from skylift.agent.hubclient import HubClient
    from skylift.agent.install import Progress, apply_plan
    from skylift.agent.journal import InstallJournal, install_id
    from skylift.agent.plan import ByteRange, SeedIndex, make_plan, seed_index
    from skylift.agent.slots import SlotReader, open_for_install, open_for_reading, slot_pair
    from skylift.bundle import Manifest, read_head

    config = load_config(args.config)
    peaks.stage("imports")
    if args.tracemalloc:  # after the imports: their cost is measured by --imports-only
        tracemalloc.start(_TRACE_FRAMES)
    times: dict[str, float] = {}
    started = last = time.perf_counter()

    def lap(name: str, *, rss: bool = True) -> None:
        nonlocal last
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - last
        last = now
        if rss:
            peaks.stage(name)

    with HubClient(config) as client:
        offer = client.check(installed_version=args.installed, allow_downgrade=False)
        if offer is None:
            raise SystemExit("the director offers nothing")
        head = client.fetch_head(offer)  # length and SHA-256: what both repositories signed
        parsed = read_head(io.BytesIO(head))
        manifest = Manifest.from_bytes(parsed.manifest_bytes)
        manifest.require_hardware(config.identity.hardware_id)
        if (manifest.product, manifest.version) != (config.identity.product, offer.version):
            raise SystemExit(f"the head is {manifest.product} {manifest.version}, not the offer")
        lap("check+head")
        (payload,) = manifest.payloads
        index = client.fetch_index(offer, payload.name)
        entries = verified_entries(payload, index)
        lap("index")

        pair = slot_pair(config, payload.slot_class, args.booted)
        seed_dev = open_for_reading(pair.active) if args.seed else None
        seed = SeedIndex()
        if seed_dev is not None:
            seed = seed_index(
                SlotReader(seed_dev),
                payload.chunking,
                payload.size,
                wanted=entries.digest_table(),
            )
        lap("seed index")
        download = config.download
        journal_dir = config.storage.state_dir / "bench-install"
        journal_dir.mkdir(parents=True, exist_ok=True)
        journal = InstallJournal(
            journal_dir / f"{payload.name}.journal",
            install_id(pair.inactive.name, payload.sha256, payload.index.first_page_sha256),
            max_bytes=config.storage.max_journal_bytes,
        )
        plan = make_plan(
            entries,
            seed,
            verified=journal.verified,
            max_gap_bytes=download.max_gap_bytes,
            max_ranges_per_request=download.max_ranges_per_request,
            max_range_bytes=download.max_range_bytes,
        )
        del seed
        lap("plan")
        peaks.sample("after the plan")

        def fetch(ranges: Sequence[ByteRange]) -> Iterable[tuple[ByteRange, bytes]]:
            def pieces() -> Iterator[tuple[ByteRange, bytes]]:
                answers = iter(client.fetch_ranges(offer, payload.name, ranges))
                while True:
                    asked = time.perf_counter()
                    item = next(answers, None)
                    waited[0] += time.perf_counter() - asked
                    if item is None:
                        return
                    peaks.sample("fetch_ranges: a range received")
                    yield item

            return pieces()

        phase = [""]
        events = [0]
        waited = [0.0]  # inside HubClient.fetch_ranges: request, answer, parsing

        def progress(p: Progress) -> None:
            # Events come after each unit of work: the time since the last one was this phase's.
            events[0] += 1
            rss = p.phase == "fetch" or p.phase != phase[0] or events[0] % 256 == 0
            lap(f"apply: {p.phase}", rss=rss)
            phase[0] = p.phase
            peaks.sample(f"apply_plan: {p.phase}")

        slot = open_for_install(pair.inactive, payload.size)
        try:
            result = apply_plan(
                plan,
                fetch_ranges=fetch,
                slot=slot,
                seed=seed_dev,
                journal=journal,
                on_progress=progress,
                payload_sha256=payload.sha256,
                max_gap_bytes=download.max_gap_bytes,
            )
        finally:
            slot.close()
            if seed_dev is not None:
                seed_dev.close()
        lap("apply: last sync")
        journal.remove()
    if waited[0]:
        times = {
            k: w
            for key, v in times.items()
            for k, w in (
                [(key, v - waited[0]), ("apply: fetch, in HubClient.fetch_ranges", waited[0])]
                if key == "apply: fetch"
                else [(key, v)]
            )
        }
    total = time.perf_counter() - started
    t = plan.totals
    return {
        "version": offer.version,
        "image_bytes": payload.size,
        "seconds": total,
        "stages": times,
        "plan": {
            "chunks": t.chunks,
            "seed_chunks": t.seed_chunks,
            "target_copy_chunks": t.target_copy_chunks,
            "fetch_chunks": t.fetch_chunks,
            "fetch_bytes": t.fetch_bytes,
            "download_bytes": t.download_bytes,
            "requests": t.requests,
        },
        "result": {
            "seed_chunks": result.seed_chunks,
            "target_copy_chunks": result.target_copy_chunks,
            "fetched_chunks": result.fetched_chunks,
            "stale_seed_chunks": result.stale_seed_chunks,
            "downloaded_bytes": result.downloaded_bytes,
            "verified_bytes": result.verified_bytes,
        },
        "metadata_bytes": {"head": len(head), "index": len(index)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the device's agent.toml")
    parser.add_argument("--booted", default="B", help="the active slot name (default B)")
    parser.add_argument("--seed", action="store_true", help="seed from the active slot")
    parser.add_argument("--installed", help="the version the active slot holds")
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python allocations")
    parser.add_argument(
        "--imports-only", action="store_true", help="print the peak RSS after the imports"
    )
    parser.add_argument(
        "--no-boto3",
        action="store_true",
        help="make boto3 unimportable, as on a device without the hub extra",
    )
    args = parser.parse_args()
    if args.no_boto3:
        sys.modules["boto3"] = sys.modules["botocore"] = None  # type: ignore[assignment]
    if args.imports_only:
        _import_agent()
        json.dump({"peak_rss_mib": _status_kib("VmHWM") / 1024}, sys.stdout)
        sys.stdout.write("\n")
        return
    peaks = _Peaks(args.tracemalloc)
    peaks.stage("start")
    doc = _install(args, peaks)
    doc["peak_rss_mib"] = _status_kib("VmHWM") / 1024
    doc.update(peaks.report())
    json.dump(doc, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
