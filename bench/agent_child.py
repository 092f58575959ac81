"""The agent side of ``bench/delta.py --apply``: one install, in a process of its own.

Run by bench/delta.py (never by hand, though it can be), so that the peak RSS
its parent measures is the agent's alone, with what a device imports: a device
installs Skylift's base dependencies only, this venv also has the hub and dev
extras (boto3 and the rest), and securesystemslib imports boto3 when it can
(its AWS signer), about 13 MiB more than a device pays. So the first thing done
here, before any Skylift import, is to make the top-level modules the parent
names with ``--block`` unimportable (``sys.modules[name] = None``); the parent
derives them from the installed metadata (bench/delta.py's ``_not_on_a_device``),
so that this process does not pay importlib.metadata's own memory.

    python bench/agent_child.py [--block boto3,botocore,...] plan BUNDLE SEED PACK INDEX WORK
    python bench/agent_child.py [--block boto3,botocore,...] delta DELTA OLD NEW WORK

``plan``: the agent's install of a chunk plan, as the updater does it (the
manifest from the bundle's head, the index pages the hub stores verified by
their chain, ``seed_index``, ``make_plan``, ``apply_plan``); the pack is read
from a local file instead of HTTP, the slot is a file. ``delta``: the agent's
apply of a per-pair delta (``slot_holds``, ``apply_delta``). Each prints one
JSON line of seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _apply_plan(bundle: str, seed: str, pack: str, index: str, work: str) -> None:
    """Plan as the agent does, then install with its ``apply_plan`` (JSON out).

    Prints the seconds to plan (the seed indexed included), the seconds to
    apply (write, verify, read back) and the bytes fetched.
    """
    from agent_install_driver import verified_entries
    from skylift.agent.config import SlotConfig
    from skylift.agent.install import apply_plan
    from skylift.agent.journal import InstallJournal, install_id
    from skylift.agent.plan import (
        DEFAULT_MAX_RANGE_BYTES,
        DEFAULT_MAX_RANGES_PER_REQUEST,
        make_plan,
        seed_index,
    )
    from skylift.agent.slots import open_for_install, open_for_reading
    from skylift.bundle import Manifest, read_head

    start = time.perf_counter()
    # The parent verified the signatures; an agent trusts the head by the
    # length and SHA-256 TUF signed, and parses it so.
    with open(bundle, "rb") as f:
        manifest = Manifest.from_bytes(read_head(f).manifest_bytes)
    (payload,) = manifest.payloads
    entries = verified_entries(payload, Path(index).read_bytes())
    with open(seed, "rb") as s:
        seeds = seed_index(s, payload.chunking, payload.size, wanted=entries.digest_table())
    plan = make_plan(entries, seeds)
    del seeds
    planned = time.perf_counter()
    size = payload.size
    target = open_for_install(SlotConfig("rootfs", "b", "file", Path(work) / "slot-b.img"), size)
    source = open_for_reading(SlotConfig("rootfs", "a", "file", Path(seed)))
    journal = InstallJournal(Path(work) / "journal", install_id("bench", payload.sha256))
    with open(pack, "rb") as p:

        def fetch(ranges: Sequence[Any]) -> Iterator[tuple[Any, bytes]]:
            # As the hub client: one answer of at most max_range_bytes (and
            # max_ranges_per_request ranges) held at a time, then cut into ranges.
            group: list[Any] = []
            for r in [*ranges, None]:
                full = r is None or (
                    group
                    and (
                        sum(g.length for g in group) + r.length > DEFAULT_MAX_RANGE_BYTES
                        or len(group) == DEFAULT_MAX_RANGES_PER_REQUEST
                    )
                )
                if full:
                    answer = [os.pread(p.fileno(), g.length, g.start) for g in group]
                    yield from zip(group, answer, strict=True)
                    group = []
                if r is not None:
                    group.append(r)

        result = apply_plan(
            plan,
            fetch_ranges=fetch,
            slot=target,
            seed=source,
            journal=journal,
            payload_sha256=payload.sha256,
        )
    done = time.perf_counter()
    target.close()
    source.close()
    print(
        json.dumps(
            {
                "plan_s": planned - start,
                "apply_s": done - planned,
                "downloaded": result.downloaded_bytes,
            }
        )
    )


def _apply_delta(delta: str, old: str, new: str, work: str) -> None:
    """What a device does with a delta: check its active slot, apply, read back (JSON out)."""
    from skylift.agent.config import SlotConfig
    from skylift.agent.pairdelta import apply_delta, slot_holds
    from skylift.agent.ports import DeltaOffer
    from skylift.agent.slots import open_for_install, open_for_reading

    def sha(path: str) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    old_size, new_size = Path(old).stat().st_size, Path(new).stat().st_size
    old_sha, new_sha, delta_sha = sha(old), sha(new), sha(delta)
    offer = DeltaOffer("rootfs", "1", old_sha, old_size, delta_sha, Path(delta).stat().st_size)
    source = open_for_reading(SlotConfig("rootfs", "a", "file", Path(old)))
    target = open_for_install(
        SlotConfig("rootfs", "b", "file", Path(work) / "slot-b.img"), new_size
    )
    start = time.perf_counter()
    if not slot_holds(source, old_size, old_sha):
        raise SystemExit("the old image does not hash as it did")
    checked = time.perf_counter()
    with open(delta, "rb") as f:
        apply_delta(
            f,
            offer=offer,
            payload_sha256=new_sha,
            payload_size=new_size,
            old=source,
            new=target,
        )
    done = time.perf_counter()
    target.close()
    source.close()
    print(json.dumps({"check_s": checked - start, "apply_s": done - checked}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--block", default="", help="top-level modules to make unimportable")
    parser.add_argument("what", choices=("plan", "delta"))
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    for name in filter(None, args.block.split(",")):
        sys.modules[name] = None  # type: ignore[assignment]
    # What a running agent has imported (the updater, its hub client, python-tuf),
    # so that the peak RSS is a daemon's, not that of the few functions used here.
    import skylift.agent.updater  # noqa: F401

    if args.what == "plan" and len(args.paths) == 5:
        _apply_plan(*args.paths)
    elif args.what == "delta" and len(args.paths) == 4:
        _apply_delta(*args.paths)
    else:
        parser.error(f"{args.what}: wrong number of paths")


if __name__ == "__main__":
    main()
