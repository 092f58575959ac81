"""Agent memory of a verified index and its install plan with many chunks (issue 5).

Not a test: it prints figures and never fails on a large one. Usage:

    .venv/bin/python bench/plan_memory.py [--sizes 16384,131072] [--zeros 0.75] \\
        [--no-apply] [--keep]

ADR 0005 ("Agent memory"): a 512 MiB ext4 image in fixed 4 KiB blocks is
131 072 chunks, and the agent's peak RSS grew with them. This builds, for
each size N, a synthetic payload of N chunks of 4 KiB shaped like an ext4
image (75 % of the blocks are zeros and share one digest, ``--zeros``; the
others are distinct: a 512 MiB image filled from /usr has 27 % zeros and
83 366 distinct blocks), and in a process of its own per variant runs what
the updater runs, with the agent's own functions:

- ``index``: the index pages read from a file and verified by the updater's
  ``verify_index`` (the entries in the agent's form);
- ``seed``: ``wanted = entries.digest_table()`` as the updater builds it
  for ``seed_index``, and a synthetic ``SeedIndex`` (the zero block and 95 %
  of the distinct chunks, restricted to ``wanted``, as ``seed_index``
  returns it; the active slot is not cut here);
- ``plan``: ``make_plan(entries, seed, verified=journal.verified)``;
- ``apply`` (unless ``--no-apply``): ``apply_plan`` into a file slot, seeded
  from a file that holds the seed's chunks, with an in-memory pack fetcher
  and the journal, final read-back included (no fsync: memory, not speed).

The variant ``fresh`` is ``apply`` without a seed (a device's first install:
the distinct chunks fetched, the zero blocks copied from the first one).

The variant ``journal`` resumes from a *full* journal (as many disjoint
spans as ``DEFAULT_MAX_BYTES`` holds, every other chunk: the worst an
interrupted install can leave), to see what the verified ordinals cost.

Each variant runs twice, in fresh processes: once for the peak RSS
(``VmHWM`` minus its value after the imports), once under tracemalloc for
the peak of the Python allocations. Per-stage figures are the growth of the
peak; bytes a chunk are the whole growth over N.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent_install_driver import _status_kib  # bench/ is on sys.path when run as a script

_MIB = 1 << 20
_BLOCK = 4096
_ZERO_FRACTION = 0.75  # a sparse image; a 512 MiB image filled from /usr has 0.27
_SEEDED_FRACTION = 0.95
_LAYOUT_SEED = 5
# What a file slot writes zero ranges from; made before the baseline is read.
_ZEROS = bytes(1 << 20)


def _layout(n: int, zero_fraction: float = _ZERO_FRACTION) -> tuple[bytearray, list[int]]:
    """Per ordinal: 0 a zero block, 1 a distinct block in the seed, 2 one not in it."""
    rng = random.Random(_LAYOUT_SEED)
    kinds = bytearray(n)
    for i in range(n):
        if rng.random() >= zero_fraction:
            kinds[i] = 1 if rng.random() < _SEEDED_FRACTION else 2
    return kinds, [i for i in range(n) if kinds[i]]


def _content(i: int) -> bytes:
    """The distinct block at ordinal ``i`` (its digest is as good as random)."""
    return (i.to_bytes(8, "big") * (_BLOCK // 8))[:_BLOCK]


def _object(kinds: bytearray, i: int) -> bytes:
    """Chunk ``i`` as a pack object: codec byte 0 (raw), then its bytes."""
    return b"\0" + (_content(i) if kinds[i] else bytes(_BLOCK))


# -- the parent: payload files, one process per variant, the table ----------------------


def _build(n: int, where: Path, apply: bool, zero_fraction: float) -> dict[str, Any]:
    """Index pages (and the seed image) of the synthetic payload of ``n`` chunks."""
    from skylift.agent.journal import (
        DEFAULT_MAX_BYTES,
        HEADER_SIZE,
        RECORD_SIZE,
        InstallJournal,
        install_id,
    )
    from skylift.chunks import CODEC_NONE, IndexBuilder

    kinds, _distinct = _layout(n, zero_fraction)
    builder = IndexBuilder()
    zero = bytes(_BLOCK)
    zero_digest = hashlib.sha256(zero).digest()
    for i in range(n):
        if kinds[i]:
            data = _content(i)
            builder.add(_BLOCK, CODEC_NONE, hashlib.sha256(data).digest(), data)
        else:
            builder.add(_BLOCK, CODEC_NONE, zero_digest, zero)
    pages = builder.pages()
    (where / "index").write_bytes(b"".join(pages))
    if apply:
        with open(where / "seed.img", "wb") as f:
            f.truncate(n * _BLOCK)
            for i in range(n):
                if kinds[i] == 1:
                    f.seek(i * _BLOCK)
                    f.write(_content(i))
                elif kinds[i] == 2:  # another version of the block
                    f.seek(i * _BLOCK)
                    f.write(b"\xff" + _content(i)[1:])
    # A full journal: disjoint spans (every other chunk) up to the file's bound.
    spans = min((n + 1) // 2, (DEFAULT_MAX_BYTES - HEADER_SIZE) // RECORD_SIZE)
    journal = InstallJournal(where / "full.journal", install_id("bench", str(n)))
    for k in range(spans):
        journal.add(2 * k)
    journal.commit()
    return {
        "chunks": n,
        "size": n * _BLOCK,
        "pages": len(pages),
        "entries_per_page": builder.entries_per_page,
        "first_page_sha256": IndexBuilder.first_digest(pages).hex(),
        "journal_spans": spans,
        "zero_fraction": zero_fraction,
    }


def _run(where: Path, meta: dict[str, Any], variant: str, trace: bool) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child", str(where), "--variant", variant]
    if trace:
        args.append("--trace")
    out = subprocess.run(
        args, check=True, capture_output=True, text=True, input=json.dumps(meta)
    ).stdout
    doc: dict[str, Any] = json.loads(out.splitlines()[-1])
    return doc


def _main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = ["plan", "journal"] + ([] if args.no_apply else ["apply", "fresh"])
    tmp = Path(tempfile.mkdtemp(prefix="skylift-plan-memory-"))
    results: dict[tuple[int, str], dict[str, Any]] = {}
    try:
        for n in sizes:
            where = tmp / str(n)
            where.mkdir()
            started = time.perf_counter()
            meta = _build(n, where, not args.no_apply, args.zeros)
            print(f"N={n}: payload built in {time.perf_counter() - started:.1f} s", flush=True)
            for variant in variants:
                rss = _run(where, meta, variant, trace=False)
                traced = _run(where, meta, variant, trace=True)
                results[n, variant] = {"rss": rss, "traced": traced, "meta": meta}
                _print_row(n, variant, rss, traced)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    small, large = min(sizes), max(sizes)
    if small != large:
        print()
        for variant in variants:
            a, b = results.get((small, variant)), results.get((large, variant))
            if a is None or b is None:
                continue
            ra = a["rss"]["peak_growth_kib"] or 1
            ta = a["traced"]["traced_peak_bytes"] or 1
            rb = b["rss"]["peak_growth_kib"]
            tb = b["traced"]["traced_peak_bytes"]
            print(
                f"{variant:8} N={large} / N={small}: VmHWM growth x{rb / ra:.2f},"
                f" traced peak x{tb / ta:.2f} (chunks x{large / small:.0f})"
            )
    base = next(iter(results.values()))["rss"]["baseline_kib"] / 1024
    print(f"\nbaseline after imports (VmHWM): {base:.1f} MiB; a peak is that plus the growth")


def _print_row(n: int, variant: str, rss: dict[str, Any], traced: dict[str, Any]) -> None:
    growth = rss["peak_growth_kib"] * 1024
    peak = traced["traced_peak_bytes"]
    stages = ", ".join(f"{k} +{v / 1024:.1f}" for k, v in rss["stages_kib"].items())
    tstages = ", ".join(f"{k} {v / _MIB:.1f}" for k, v in traced["traced_stage_peaks"].items())
    held = traced["traced_held_after_plan"]
    print(
        f"  {variant:8} N={n:7}: VmHWM +{growth / _MIB:6.1f} MiB ({growth / n:5.0f} B/chunk);"
        f" traced peak {peak / _MIB:6.1f} MiB ({peak / n:5.0f} B/chunk);"
        f" index+seed+plan held {held / _MIB:.1f} MiB ({held / n:.0f} B/chunk);"
        f" make_plan {rss['seconds']['plan']:.2f} s\n"
        f"           VmHWM by stage (MiB): {stages}\n"
        f"           traced peak by stage (MiB): {tstages}",
        flush=True,
    )


# -- the child: what the updater does, measured ----------------------------------------


class _FileSlot:
    """A file as a slot (what the agent's file slot does, without fsync)."""

    def __init__(self, path: Path, size: int, *, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        self._fd = os.open(path, flags, 0o600)
        if create:
            os.ftruncate(self._fd, size)
        self._size = size

    def size(self) -> int:
        return self._size

    def read_range(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        os.pwrite(self._fd, data, offset)

    def zero_range(self, offset: int, length: int) -> None:
        zeros = memoryview(_ZEROS)
        while length > 0:
            n = min(length, len(zeros))
            os.pwrite(self._fd, zeros[:n], offset)
            offset, length = offset + n, length - n

    def sync(self) -> None:
        pass

    def close(self) -> None:
        os.close(self._fd)


def _child(where: Path, variant: str, trace: bool) -> None:
    import gc
    import tracemalloc

    from skylift.agent.install import apply_plan
    from skylift.agent.journal import InstallJournal, install_id
    from skylift.agent.plan import ByteRange, SeedIndex, make_plan
    from skylift.agent.updater import verify_index

    meta = json.loads(sys.stdin.read())
    n = meta["chunks"]
    kinds, distinct = _layout(n, meta["zero_fraction"])
    # The ordinals whose chunk the seed holds (the zero block at its first place).
    seeded = [i for i in distinct if kinds[i] == 1]
    seeded.append(kinds.index(0) if 0 in kinds else seeded[0])
    del distinct
    # Only what verify_index reads of a PayloadEntry (the manifest is not built here).
    payload = SimpleNamespace(
        name="rootfs",
        chunks=n,
        size=meta["size"],
        chunking=SimpleNamespace(max_size=_BLOCK),
        index=SimpleNamespace(
            first_page_sha256=meta["first_page_sha256"],
            pages=meta["pages"],
            entries_per_page=meta["entries_per_page"],
        ),
    )
    gc.collect()
    baseline = _status_kib("VmHWM")
    stages: dict[str, int] = {}
    peaks: dict[str, int] = {}
    seconds: dict[str, float] = {}
    last = [baseline, time.perf_counter()]
    if trace:
        tracemalloc.start()

    def stage(name: str) -> None:
        hwm = _status_kib("VmHWM")
        stages[name] = hwm - last[0]
        last[0] = hwm
        now = time.perf_counter()
        seconds[name] = now - last[1]
        last[1] = now
        if trace:
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()

    entries = verify_index(payload, (where / "index").read_bytes())
    stage("index")
    seed = SeedIndex()
    if variant != "fresh":  # without a seed device the updater cuts no seed
        wanted = entries.digest_table()  # as the updater builds it for seed_index
        seed = SeedIndex(expected=len(wanted))
        for i in seeded:
            digest = entries[i].digest
            if digest in wanted:
                seed.add(digest, i * _BLOCK, _BLOCK)
        del wanted
    del seeded
    stage("seed")
    journal_path = where / ("full.journal" if variant == "journal" else f"{variant}.journal")
    if variant != "journal":
        journal_path.unlink(missing_ok=True)
    journal = InstallJournal(journal_path, install_id("bench", str(n)))
    stage("journal")
    plan = make_plan(entries, seed, verified=journal.verified)
    stage("plan")
    held = tracemalloc.get_traced_memory()[0] if trace else 0
    doc: dict[str, Any] = {"plan_steps": len(plan.steps), "requests": plan.totals.requests}
    if variant in ("apply", "fresh"):

        def fetch(ranges: Sequence[ByteRange]) -> Iterator[tuple[ByteRange, bytes]]:
            # Each range is built once, whole, as the agent's HubClient holds one.
            size = _BLOCK + 1
            for r in ranges:
                first, last_ = r.start // size, (r.end - 1) // size
                pieces = [_object(kinds, i) for i in range(first, last_ + 1)]
                pieces[-1] = pieces[-1][: r.end - last_ * size]
                pieces[0] = pieces[0][r.start - first * size :]
                yield r, b"".join(pieces)

        slot = _FileSlot(where / "slot.img", meta["size"], create=True)
        seed_slot = _FileSlot(where / "seed.img", meta["size"], create=False) if seed else None
        try:
            result = apply_plan(
                plan, fetch_ranges=fetch, slot=slot, seed=seed_slot, journal=journal
            )
        finally:
            slot.close()
            if seed_slot is not None:
                seed_slot.close()
            (where / "slot.img").unlink()
        journal.remove()
        stage("apply")
        doc["fetched_chunks"] = result.fetched_chunks
    doc.update(
        baseline_kib=baseline,
        peak_growth_kib=_status_kib("VmHWM") - baseline,
        stages_kib=stages,
        seconds=seconds,
    )
    if trace:
        doc["traced_peak_bytes"] = max(peaks.values())
        doc["traced_stage_peaks"] = peaks
        doc["traced_held_after_plan"] = held
    print(json.dumps(doc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16384,131072", help="chunk counts, comma-separated")
    parser.add_argument("--no-apply", action="store_true", help="skip the apply_plan variant")
    parser.add_argument(
        "--zeros", type=float, default=_ZERO_FRACTION, help="fraction of zero blocks (0.75)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="plan", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.variant, args.trace)
    else:
        _main(args)


if __name__ == "__main__":
    main()
