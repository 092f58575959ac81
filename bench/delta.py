"""Delta download size on real Debian image pairs, against casync, zchunk, xdelta3 and OSTree.

Not a test: it prints figures, and ratios to anchors measured in the same run
on the same files, and never fails on a slow or big result. Usage:

    python bench/delta.py [--pairs small,big] [--types ext4,squashfs,tar]
                          [--chunkings cdc:64K,cdc:16K,cdc:8K,fixed:4K] [--no-anchors] [--quick]
    make bench-delta BENCH_ARGS=--quick

The corpus is what make-corpus.sh builds (default ``~/.cache/skylift-bench-corpus``,
``--corpus`` or ``$CORPUS`` to change): ``img/v1``, ``img/v1s`` (one package and
/etc/motd more) and ``img/v2`` (upgrades, four packages and their dependencies,
/etc edits), each as a 512 MiB ext4 image, a squashfs image and a tar archive,
plus the ``rootfs/`` trees. Pairs: small = v1 -> v1s, big = v1 -> v2.

For each pair and image type:

- Skylift, for each chunking: ``skylift bundle create --chunking rootfs=SPEC``
  of the new image (wall seconds, peak RSS), then ``skylift delta plan --seed
  OLD --json --key`` (the agent's planner on the pack the hub builds): bytes
  a device downloads, head + index + offsets included, and HTTP requests;
- zstd -19 -T2 of the whole new image: what a device downloads without delta;
- casync: ``casync make`` (default 64 KiB average chunks) of both images into
  two stores; the compressed chunks the new index needs that the old store
  lacks, plus the new .caibx (casync fetches one chunk per request);
- zchunk: ``zck`` of both images; ``zck_delta_size old.zck new.zck``;
- xdelta3 ``-9 -S lzma -B <old size>`` (``-S djw`` if lzma is not built in)
  from the old image to the new;
- OSTree: both trees committed from the tar archives (device nodes skipped,
  OSTree stores none) into an archive repository, then ``ostree static-delta
  generate --inline`` twice, and the smaller of what a client fetches is the
  anchor: with the defaults, the delta file *plus* its fallback objects
  (objects over 4 MB are left out of the delta, and a client fetches their
  ``.filez`` from the repository: on the big pairs, python3.11 and
  libcrypto, 4.5 MB the delta file alone does not count); and with every
  object in the delta (``--min-fallback-size=0``) in one part
  (``--max-chunk-size=1024``: one xz stream). The same figure for every
  image type of a pair.

With ``--apply``, each default plan and per-pair delta is also installed by the
agent's code in a process of its own, bench/agent_child.py (apply seconds, and
that process's peak RSS as the agent's), and casync's anchor also times
``casync extract`` of the new index with the old image as seed (the store
holds the new image's chunks; ``--reflink=no``, as between two partitions).
The agent's process imports what a device has: a device installs Skylift's
base dependencies only, this venv also has the hub and dev extras, and
securesystemslib imports boto3 when it can (13 to 20 MiB more RSS). The
top-level modules of the extras' distributions that no base dependency
needs (``_not_on_a_device``, from the installed metadata) are made
unimportable in that process before it imports Skylift.

Missing Debian packages are installed with scripts/ensure-debs; an anchor whose
tool still cannot run is reported as not measured, with the reason.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import zstandard

from skylift.agent.plan import (
    DEFAULT_MAX_GAP_BYTES,
    DEFAULT_MAX_RANGE_BYTES,
    DEFAULT_MAX_RANGES_PER_REQUEST,
    Source,
)
from skylift.chunks import ChunkingParams
from skylift.cli.delta import plan_delta
from skylift.deltamaker import make_delta
from skylift.errors import SkyliftError

_BENCH = Path(__file__).resolve().parent
_REPO = _BENCH.parent
#: Where the agent's installs run (``--apply``), with what a device imports.
_CHILD = _BENCH / "agent_child.py"
_MB = 1_000_000
_PAIRS = {"small": ("v1", "v1s"), "big": ("v1", "v2")}
_TYPES = {"ext4": "ext4", "squashfs": "sqfs", "tar": "tar"}
#: "default": no --chunking, the writer's pick for the payload type (ADR 0005); its row
#: also measures the per-pair delta from the old image (``delta plan --pair-delta``).
_CHUNKINGS = ("default", "cdc:64K", "cdc:16K", "cdc:8K", "fixed:4K")
_DEFAULT = "skylift default"
_PAIR_DELTA = "skylift per-pair delta"
#: Debian package of each tool the bench drives (the Makefile's DELTA_BENCH_DEBS).
_TOOLS = {
    "zstd": "zstd",
    "casync": "casync",
    "zck": "zchunk",
    "zck_delta_size": "zchunk",
    "xdelta3": "xdelta3",
    "ostree": "ostree",
    "tar": "tar",
}
_ANCHORS = ("zstd -19", "casync", "zchunk", "xdelta3", "ostree")
_DIFF_ANCHORS = ("casync", "zchunk", "xdelta3")
_CDC_ANCHORS = ("casync", "zchunk")
#: The issue's aim for the agent's peak RSS while it installs.
_RSS_AIM_MIB = 64


@dataclass
class Row:
    """One method's figures for one pair and image type."""

    method: str
    download_bytes: int | None = None
    requests: int | None = None
    note: str = ""
    detail: dict[str, float | int | str] = field(default_factory=dict)


@dataclass
class Case:
    pair: str
    image: str
    old: Path
    new: Path
    rows: list[Row] = field(default_factory=list)

    def best(
        self, methods: Sequence[str] = (), *, skylift: bool = False, estimates: bool = False
    ) -> Row | None:
        """The row with the fewest bytes among ``methods``, or Skylift's chunk plans.

        ``skylift``: the chunk plans, measured or (``estimates``) estimated; the
        per-pair delta is not one (see :func:`_aim_lines`).
        """

        def wanted(r: Row) -> bool:
            if not skylift:
                return r.method in methods
            chunk_plan = r.method.startswith("skylift") and r.method != _PAIR_DELTA
            return chunk_plan and ("(est.)" in r.method) == estimates

        chosen = [r for r in self.rows if r.download_bytes is not None and wanted(r)]
        return min(chosen, key=lambda r: r.download_bytes or 0, default=None)


#: Runs a command and writes "<exit code> <peak RSS KiB>" to argv[1]. A small, freshly
#: exec'd process: a child forked from this big one would report this one's peak RSS
#: (Linux carries the parent's RSS high-water mark over the exec of a vfork'd child).
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')\n"
)


def _run(
    argv: Sequence[str | Path], scratch: Path, *, stdout: Path | None = None
) -> tuple[float, float, str]:
    """Run ``argv``; return (wall seconds, the command's peak RSS in MiB, its stdout text).

    With ``stdout`` the output goes to that file and the text returned is empty.

    Raises:
        RuntimeError: the command failed (its last stderr lines say why).
        FileNotFoundError: the program is not installed.
    """
    args = [str(a) for a in argv]
    if shutil.which(args[0]) is None:
        raise FileNotFoundError(2, "not installed", args[0])
    out_path = stdout or scratch / ".stdout"
    err_path = scratch / ".stderr"
    status_path = scratch / ".status"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(out_path), flags, 0o644),
        (os.POSIX_SPAWN_OPEN, 2, str(err_path), flags, 0o644),
    ]
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(status_path), *args]
    start = time.perf_counter()
    pid = os.posix_spawn(sys.executable, launcher, os.environ, file_actions=actions)
    _, status, _ = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    try:
        code, rss_kib = (int(x) for x in status_path.read_text().split())
    except (OSError, ValueError):
        code, rss_kib = os.waitstatus_to_exitcode(status) or 1, 0
    status_path.unlink(missing_ok=True)
    text = "" if stdout else out_path.read_text(errors="replace")
    if code:
        tail = " | ".join(err_path.read_text(errors="replace").strip().splitlines()[-2:])
        raise RuntimeError(f"{Path(args[0]).name} exited with {code}: {tail}")
    return elapsed, rss_kib / 1024, text


def _skylift(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "skylift.cli.main", *args]


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / _MB:.3f}"


def _fill(row: Row, doc: dict[str, Any]) -> None:
    """Download figures of ``skylift delta plan --json`` into ``row``."""
    b, c = doc["bytes"], doc["chunks"]
    row.download_bytes = int(b["total"])
    row.requests = int(doc["requests"])
    metadata = int(b["head"]) + int(b["index"])
    gaps = int(b["ranges"]) - int(b["fetched_objects"])
    row.detail.update(
        ranges_bytes=int(b["ranges"]),
        object_bytes=int(b["fetched_objects"]),
        gap_bytes=gaps,
        metadata_bytes=metadata,
        index_bytes=int(b["index"]),
        chunks=int(c["total"]),
        fetched_chunks=int(c["fetched"]),
    )
    row.note = (
        f"{c['fetched']}/{c['total']} chunks fetched: {_mb(int(b['fetched_objects']))} MB "
        f"+ {_mb(gaps)} MB gaps + {_mb(metadata)} MB head/index"
    )


class DeltaBench:
    """Runs every method on every case, in one scratch directory, one command at a time."""

    def __init__(
        self, work: Path, chunkings: Sequence[str], anchors: bool, *, apply: bool = False
    ) -> None:
        self.work = work
        self.chunkings = chunkings
        self.anchors = anchors
        self.apply = apply
        self._casync_stores: dict[Path, Path] = {}
        self._zck: dict[Path, Path] = {}
        self._ostree_commits: dict[Path, str] = {}
        self._ostree_rows: dict[tuple[Path, Path], Row] = {}
        self._xdelta_secondary = "lzma"
        self.key = work / "bench.key"
        _run(_skylift("keys", "generate", "bench", "--dir", work, "--insecure-plaintext"), work)
        #: What the agent's processes may not import (``--block`` of bench/agent_child.py).
        self.not_on_device = _not_on_a_device() if apply else []
        if apply:
            print(
                f"agent processes: {len(self.not_on_device)} top-level modules of the hub and "
                f"dev extras made unimportable ({', '.join(self.not_on_device[:6])}, ...)"
            )

    def _agent(self, *args: str | Path) -> list[str | Path]:
        """The command running bench/agent_child.py with ``args``, as a device would."""
        return [sys.executable, _CHILD, "--block", ",".join(self.not_on_device), *args]

    # -- Skylift --------------------------------------------------------------------------

    def skylift(self, case: Case) -> None:
        for spec in self.chunkings:
            bundle = self.work / "new.bundle"
            rows = [Row(f"skylift {spec}")]
            try:
                default = spec == "default"
                chunking = () if default else ("--chunking", f"rootfs={spec}")
                create_s, create_rss, _ = _run(
                    _skylift(
                        "bundle", "create", "--product", "bench", "--version", "2",
                        "--hardware", "bench-board", "--payload", f"rootfs={case.new}",
                        *chunking, "--key", self.key, "-o", bundle,
                    ),
                    self.work,
                )  # fmt: skip
                plan_s, plan_rss, text = _run(
                    _skylift(
                        "delta", "plan", "--seed", case.old, bundle, "--json",
                        "--key", self.key.with_suffix(".pub"),
                        *(("--pair-delta",) if default else ()),
                    ),
                    self.work,
                )  # fmt: skip
                doc = json.loads(text)
                _fill(rows[0], doc)
                if default:
                    rows[0].method = f"{_DEFAULT} ({_describe(doc['chunking'])})"
                    pair = doc["pair_delta"]
                    rows.append(
                        Row(
                            _PAIR_DELTA,
                            int(pair["bytes"]),
                            1,
                            f"from exactly {case.old.name}, the delta a hub offers "
                            f"({_delta_kind(pair)}); made in "
                            f"{pair['seconds']:.1f} s with the plan; the hub offers it: "
                            f"{'yes' if doc['method'] == 'delta' else 'no (chunks smaller)'}",
                        )
                    )
                    if self.apply:
                        self._apply_delta(case, doc["chunking"], rows[-1])
                rows[0].detail.update(
                    bundle_bytes=bundle.stat().st_size,
                    create_s=round(create_s, 1),
                    create_rss_mib=round(create_rss),
                    plan_s=round(plan_s, 1),
                    plan_rss_mib=round(plan_rss),
                )
                rows[0].note += (
                    f"; bundle {_mb(bundle.stat().st_size)} MB made in {create_s:.1f} s "
                    f"({create_rss:.0f} MiB); plan {plan_s:.1f} s, {plan_rss:.0f} MiB"
                )
                if self.apply:
                    self._apply(case, bundle, rows[0])
                rows += self._without_gaps_and_grouped(case, bundle, spec)
            except (RuntimeError, OSError, ValueError, KeyError, SkyliftError) as e:
                rows[0].note = f"not measured: {e}"
            finally:
                bundle.unlink(missing_ok=True)
            for row in rows:
                case.rows.append(row)
                print(f"  {row.method:<32} {_mb(row.download_bytes):>9} MB  {row.note}", flush=True)

    def _apply(self, case: Case, bundle: Path, row: Row) -> None:
        pack, index = self.work / "new.pack", self.work / "new.index"
        try:
            _write_pack(bundle, self.key.with_suffix(".pub"), pack, index)
            _, rss, text = _run(
                self._agent("plan", bundle, case.old, pack, index, self.work), self.work
            )
            doc = json.loads(text)
            row.detail.update(
                agent_plan_s=round(doc["plan_s"], 2),
                apply_s=round(doc["apply_s"], 2),
                agent_rss_mib=round(rss),
            )
            if doc["downloaded"] != row.detail.get("ranges_bytes"):
                row.note += f"; apply downloaded {doc['downloaded']} bytes, plan said otherwise"
            row.note += (
                f"; agent: seed indexed and planned in {doc['plan_s']:.1f} s, applied in "
                f"{doc['apply_s']:.1f} s, peak RSS {rss:.0f} MiB"
            )
        except (RuntimeError, OSError, ValueError, KeyError, SkyliftError) as e:
            row.note += f"; apply not measured: {e}"
        finally:
            pack.unlink(missing_ok=True)
            index.unlink(missing_ok=True)
            (self.work / "slot-b.img").unlink(missing_ok=True)
            (self.work / "journal").unlink(missing_ok=True)

    def _apply_delta(self, case: Case, chunking: dict[str, Any], row: Row) -> None:
        """Make the delta here, then time the agent applying it in a process of its own."""
        delta = self.work / "pair.delta"
        try:
            size = _write_delta(case.old, case.new, ChunkingParams.from_dict(chunking), delta)
            if size != row.download_bytes:
                row.note += f"; the delta written is {size} bytes, the plan said otherwise"
            _, rss, text = _run(
                self._agent("delta", delta, case.old, case.new, self.work), self.work
            )
            doc = json.loads(text)
            row.detail.update(
                check_s=round(doc["check_s"], 2),
                apply_s=round(doc["apply_s"], 2),
                agent_rss_mib=round(rss),
            )
            row.note += (
                f"; agent: active slot checked in {doc['check_s']:.1f} s, delta applied "
                f"(read back included) in {doc['apply_s']:.1f} s, peak RSS {rss:.0f} MiB"
            )
        except (RuntimeError, OSError, ValueError, KeyError, SkyliftError) as e:
            row.note += f"; apply not measured: {e}"
        finally:
            delta.unlink(missing_ok=True)
            (self.work / "slot-b.img").unlink(missing_ok=True)

    def _without_gaps_and_grouped(self, case: Case, bundle: Path, spec: str) -> list[Row]:
        """The same plan with --max-gap 0, and an estimate of grouped compression on the wire.

        ``plan_delta`` is the function ``skylift delta plan`` runs. The
        estimate (issue item 2, not implemented) compresses the chunks the
        device fetches as one zstd stream instead of one frame per chunk.
        """
        d = plan_delta(bundle, case.old, max_gap_bytes=0)
        gap0 = Row(f"skylift {spec} gap0")
        _fill(gap0, d.to_dict())
        fetched = bytearray()
        with open(case.new, "rb") as f:
            for step in d.plan.steps_from(Source.PACK):
                f.seek(step.entry.offset)
                fetched += f.read(step.entry.length)
        sizes = {}
        for level in (3, 19):
            compressor = zstandard.ZstdCompressor(level=level, threads=2)
            sizes[level] = len(compressor.compress(bytes(fetched)))
        grouped = Row(
            f"skylift {spec} grouped (est.)",
            d.metadata_bytes + sizes[19],
            d.plan.totals.requests,
            f"estimate: head+index + the {d.plan.totals.fetch_chunks} fetched chunks "
            f"({_mb(len(fetched))} MB) as one zstd -19 stream; -3: "
            f"{_mb(d.metadata_bytes + sizes[3])} MB",
        )
        grouped.detail.update(grouped3_bytes=d.metadata_bytes + sizes[3], estimate=1)
        return [gap0, grouped]

    # -- anchors --------------------------------------------------------------------------

    def anchor_rows(self, case: Case) -> None:
        methods: list[tuple[str, Callable[[Case], Row]]] = [
            ("zstd -19", self._zstd),
            ("casync", self._casync),
            ("zchunk", self._zchunk),
            ("xdelta3", self._xdelta3),
            ("ostree", self._ostree),
        ]
        for name, measure in methods:
            start = time.perf_counter()
            try:
                row = measure(case)
            except FileNotFoundError as e:
                row = Row(name, note=f"not measured: {e.filename or e} is not installed")
            except (RuntimeError, OSError, ValueError) as e:
                row = Row(name, note=f"not measured: {e}")
            if row.download_bytes is not None:
                row.detail["seconds"] = round(time.perf_counter() - start, 1)
            case.rows.append(row)
            print(f"  {row.method:<32} {_mb(row.download_bytes):>9} MB  {row.note}", flush=True)

    def _zstd(self, case: Case) -> Row:
        out = self.work / "new.zst"
        try:
            _run(["zstd", "-19", "-T2", "-q", "-c", case.new], self.work, stdout=out)
            return Row("zstd -19", out.stat().st_size, 1, "whole new image, -T2")
        finally:
            out.unlink(missing_ok=True)

    def _casync_store(self, image: Path, name: str) -> tuple[Path, Path]:
        store, index = self.work / f"{name}.castr", self.work / f"{name}.caibx"
        if name == "new":
            shutil.rmtree(store, ignore_errors=True)
        elif image in self._casync_stores:
            return self._casync_stores[image], index
        _run(["casync", "make", f"--store={store}", index, image], self.work)
        if name != "new":
            self._casync_stores[image] = store
        return store, index

    def _casync(self, case: Case) -> Row:
        old_store, _ = self._casync_store(case.old, f"old-{case.old.name}")
        new_store, new_index = self._casync_store(case.new, "new")
        have = {p.name for p in old_store.rglob("*.cacnk")}
        need = [p for p in new_store.rglob("*.cacnk") if p.name not in have]
        chunk_bytes = sum(p.stat().st_size for p in need)
        index_bytes = new_index.stat().st_size
        row = Row(
            "casync",
            chunk_bytes + index_bytes,
            len(need) + 1,
            f"{len(need)} chunks + .caibx {_mb(index_bytes)} MB; one GET per chunk",
        )
        if self.apply:
            self._casync_extract(case, new_store, new_index, row)
        shutil.rmtree(new_store)
        return row

    def _casync_extract(self, case: Case, store: Path, index: Path, row: Row) -> None:
        """Time ``casync extract`` of the new index with the old image as seed.

        What casync's device does (the seed indexed, its chunks reused, the
        others read from the local store that holds the new image's), into a
        fresh file; no reflinks from the seed, as between two partitions.
        """
        out = self.work / "casync-out.img"
        out.unlink(missing_ok=True)
        try:
            seconds, rss, _ = _run(
                ["casync", "extract", f"--store={store}", f"--seed={case.old}",
                 "--seed-output=no", "--reflink=no", index, out],
                self.work,
            )  # fmt: skip
            if not filecmp.cmp(out, case.new, shallow=False):
                raise ValueError("casync extract wrote other bytes than the new image's")
            row.detail.update(extract_s=round(seconds, 2), extract_rss_mib=round(rss))
            row.note += (
                f"; extract with the old image as seed {seconds:.1f} s, peak RSS {rss:.0f} MiB"
            )
        except (RuntimeError, OSError, ValueError) as e:
            row.note += f"; extract not measured: {e}"
        finally:
            out.unlink(missing_ok=True)

    def _zck_file(self, image: Path, name: str) -> Path:
        if name != "new" and image in self._zck:
            return self._zck[image]
        out = self.work / f"{name}.zck"
        _run(["zck", "-o", out, image], self.work)
        if name != "new":
            self._zck[image] = out
        return out

    def _zchunk(self, case: Case) -> Row:
        old = self._zck_file(case.old, f"old-{case.old.name}")
        new = self._zck_file(case.new, "new")
        try:
            _, _, text = _run(["zck_delta_size", old, new], self.work)
        finally:
            new.unlink(missing_ok=True)
        for line in text.splitlines():  # "Would download N of M bytes", "Matched a of b chunks"
            words = line.split()
            if line.startswith("Would download") and len(words) >= 5:
                matched = next((ln for ln in text.splitlines() if ln.startswith("Matched")), "")
                return Row("zchunk", int(words[2]), None, f"zck_delta_size; {matched.lower()}")
        raise ValueError(f"unexpected zck_delta_size output: {text.strip()[:120]!r}")

    def _xdelta3(self, case: Case) -> Row:
        out = self.work / "new.vcdiff"
        window = str(max(case.old.stat().st_size, 1 << 20))
        try:
            while True:
                argv = ["xdelta3", "-9", "-S", self._xdelta_secondary, "-B", window]
                try:
                    _run([*argv, "-e", "-f", "-s", case.old, case.new, out], self.work)
                    break
                except RuntimeError as e:
                    if self._xdelta_secondary == "lzma" and "lzma" in str(e).lower():
                        print(f"  xdelta3: no lzma ({e}); using -S djw")
                        self._xdelta_secondary = "djw"
                        continue
                    raise
            note = f"-9 -S {self._xdelta_secondary} -B {window}; one request"
            return Row("xdelta3", out.stat().st_size, 1, note)
        finally:
            out.unlink(missing_ok=True)

    def _ostree_commit(self, repo: Path, tree: Path) -> str:
        if tree in self._ostree_commits:
            return self._ostree_commits[tree]
        skip = self.work / "ostree-skip"
        # OSTree stores no device nodes or fifos (a booted system mounts /dev).
        with tarfile.open(tree) as t:
            special = [m.name for m in t if m.ischr() or m.isblk() or m.isfifo()]
        skip.write_text("".join("/" + n.lstrip("./") + "\n" for n in special))
        _, _, text = _run(
            ["ostree", "commit", f"--repo={repo}", f"--branch=b{len(self._ostree_commits)}",
             f"--tree=tar={tree}", f"--skip-list={skip}", "--tar-autocreate-parents"],
            self.work,
        )  # fmt: skip
        commit = text.strip().splitlines()[-1]
        self._ostree_commits[tree] = commit
        return commit

    def _ostree(self, case: Case) -> Row:
        repo = self.work / "ostree-repo"
        if not (repo / "config").exists():
            _run(["ostree", "init", f"--repo={repo}", "--mode=archive"], self.work)
        # The same trees whatever the image type: commit the tar archives of the pair.
        old_tar = case.old.with_suffix(".tar")
        new_tar = case.new.with_suffix(".tar")
        if (old_tar, new_tar) in self._ostree_rows:
            return self._ostree_rows[old_tar, new_tar]
        old, new = self._ostree_commit(repo, old_tar), self._ostree_commit(repo, new_tar)
        out = self.work / "ostree.delta"
        figures: list[tuple[int, str]] = []
        try:
            for options, what in (
                ((), "defaults"),
                (("--min-fallback-size=0", "--max-chunk-size=1024"), "no fallback, one part"),
            ):
                _, _, text = _run(
                    ["ostree", "static-delta", "generate", f"--repo={repo}", f"--from={old}",
                     f"--to={new}", "--inline", *options, f"--filename={out}"],
                    self.work,
                )  # fmt: skip
                # Objects left out of the delta, which a client fetches on their own
                # (generate names them on stderr: "fallback for <checksum> (size)").
                log = text + (self.work / ".stderr").read_text(errors="replace")
                fallback = [
                    (repo / "objects" / c[:2] / f"{c[2:]}.filez").stat().st_size
                    for c in re.findall(r"^fallback for ([0-9a-f]{64})\b", log, re.M)
                ]
                size = out.stat().st_size
                figures.append(
                    (
                        size + sum(fallback),
                        f"{what}: delta {_mb(size)} MB"
                        + (f" + {len(fallback)} fallback objects {_mb(sum(fallback))} MB"
                           if fallback else ""),
                    )
                )  # fmt: skip
        finally:
            out.unlink(missing_ok=True)
        row = Row(
            "ostree",
            min(figures)[0],
            None,
            "static delta of the tree, the smaller of: " + "; ".join(f for _, f in figures),
        )
        self._ostree_rows[old_tar, new_tar] = row
        return row


# -- apply: the agent's executor on the same plan -------------------------------------------


def _not_on_a_device() -> list[str]:
    """Top-level modules installed here for the hub and dev extras only, not on a device.

    The distributions the ``hub`` and ``dev`` extras of skylift require, with
    theirs (the extras they name included), less those the base dependencies
    require, with theirs: every top-level module one of them provides and no
    base distribution also provides. Environment markers other than ``extra``
    count as true: a distribution left out on this host is not installed.
    """

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    def closure(extras: Sequence[str]) -> set[str]:
        todo, seen = [("skylift", e) for e in extras], set()
        while todo:
            dist, extra = todo.pop()
            if (dist, extra) in seen:
                continue
            seen.add((dist, extra))
            try:
                requires = metadata.requires(dist) or []
            except metadata.PackageNotFoundError:
                continue
            for req in requires:
                spec, _, marker = req.partition(";")
                named = {norm(e) for e in re.findall(r"extra\s*==\s*[\"']([^\"']+)", marker)}
                if extra not in (named or {""}):
                    continue
                m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
                if m:
                    name = norm(m[1])
                    todo.append((name, ""))
                    todo += [(name, norm(e)) for e in (m[2] or "").split(",") if e.strip()]
        return {d for d, _ in seen}

    base = closure([""])
    extras_only = closure(["hub", "dev"]) - base
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if module not in sys.stdlib_module_names
        and {norm(d) for d in dists} & extras_only
        and not {norm(d) for d in dists} & base
    )


def _write_pack(bundle: Path, key: Path, pack: Path, index: Path) -> None:
    """The pack the hub builds at ingest (each verified chunk as codec byte + stored bytes).

    And into ``index`` the payload's index pages, as the hub stores and serves them.
    """
    from skylift.bundle import ChunkData, IndexPageData, TrustedKeys, read_body, read_head
    from skylift.trust.keys import load_public_key

    with open(bundle, "rb") as f, open(pack, "wb") as out, open(index, "wb") as pages:
        head = read_head(f)
        head.verify(TrustedKeys((load_public_key(key.read_bytes()),)))
        for event in read_body(f, head):
            if isinstance(event, ChunkData):
                out.write(bytes([event.entry.codec]) + event.stored)
            elif isinstance(event, IndexPageData):
                pages.write(event.page)


def _delta_kind(pair: dict[str, Any]) -> str:
    if pair.get("kind") == "zlib":
        return (
            f"skylift.chunks.zstreams: through {pair['streams']} compressed streams inflated, "
            f"{pair['recompressed_streams']} recompressed on the device"
        )
    return "skylift.chunks.delta; literals against the old bytes"


def _write_delta(old: Path, new: Path, params: ChunkingParams, dest: Path) -> int:
    """The per-pair delta from ``old`` to ``new`` into ``dest``, as the hub makes it."""
    with open(old, "rb") as o, open(new, "rb") as n:
        old_sha = hashlib.file_digest(o, "sha256").hexdigest()
        new_sha = hashlib.file_digest(n, "sha256").hexdigest()
    return make_delta(old, new, params, dest, old_sha256=old_sha, new_sha256=new_sha).length


# -- corpus, tools, report ------------------------------------------------------------------


def _ensure_tools() -> None:
    missing = sorted({pkg for tool, pkg in _TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    print(f"installing missing Debian packages: {' '.join(missing)}", flush=True)
    code = subprocess.call([str(_REPO / "scripts" / "ensure-debs"), *missing])
    if code:
        print(f"ensure-debs failed (exit {code}); anchors needing them are reported as missing")


def _tool_versions() -> str:
    pkgs = sorted(set(_TOOLS.values()))
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Package} ${Version}\\n", *pkgs],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        return "unknown"
    return ", ".join(out.split("\n")[:-1]) or "unknown"


def _cases(corpus: Path, pairs: Sequence[str], types: Sequence[str]) -> list[Case]:
    cases = []
    for pair in pairs:
        old, new = _PAIRS[pair]
        for kind in types:
            ext = _TYPES[kind]
            case = Case(
                pair, kind, corpus / "img" / f"{old}.{ext}", corpus / "img" / f"{new}.{ext}"
            )
            for p in (
                case.old,
                case.new,
                case.old.with_suffix(".tar"),
                case.new.with_suffix(".tar"),
            ):
                if not p.is_file():
                    sys.exit(
                        f"delta: {p} is missing: build the corpus with make-corpus.sh all "
                        f"(CORPUS={corpus}; see the script's header)"
                    )
            cases.append(case)
    return cases


def _ratio(a: Row | None, b: Row | None) -> str:
    if a is None or b is None or not b.download_bytes:
        return "n/a"
    return f"{(a.download_bytes or 0) / b.download_bytes:.2f}x"


def _describe(chunking: dict[str, Any]) -> str:
    if chunking["algorithm"] == "fixed":
        return f"fixed {chunking['avg_size'] // 1024}K"
    return f"cdc {chunking['avg_size'] // 1024}K"


def _row(case: Case, prefix: str) -> Row | None:
    return next(
        (r for r in case.rows if r.method.startswith(prefix) and r.download_bytes is not None),
        None,
    )


def _apply_aim(c: Case) -> str | None:
    """The apply aim for ``c``: the agent's speed to casync extract's, its peak RSS to 64 MiB.

    The same image written, so the ratio of speeds is casync's seconds over
    Skylift's: apply alone, and with what precedes it that casync extract
    also does (the seed indexed and the plan made; the delta's check of the
    active slot). None when either was not measured.
    """
    casync = next((r for r in c.rows if r.method == "casync"), None)
    extract = casync.detail.get("extract_s") if casync else None
    if not isinstance(extract, float) or casync is None:
        return None
    parts = []
    for what, row, before, step in (
        ("the default chunk plan", _row(c, _DEFAULT), "agent_plan_s", "seed indexing and plan"),
        ("the per-pair delta", _row(c, _PAIR_DELTA), "check_s", "active slot's check"),
    ):
        apply_s, prior_s = (row.detail.get(k) if row else None for k in ("apply_s", before))
        rss = row.detail.get("agent_rss_mib") if row else None
        if not isinstance(apply_s, float) or not isinstance(prior_s, float):
            continue
        speed, whole = extract / max(apply_s, 0.01), extract / max(apply_s + prior_s, 0.01)
        under = "under" if isinstance(rss, int) and rss < _RSS_AIM_MIB else "not under"
        parts.append(
            f"{what}: apply {apply_s:.2f} s vs casync extract {extract:.2f} s: {speed:.1f}x "
            f"casync's speed ({apply_s + prior_s:.2f} s with the {step}: {whole:.1f}x); "
            f"agent peak RSS {rss} MiB, {under} {_RSS_AIM_MIB} MiB"
        )
    if not parts:
        return None
    return (
        f"{c.pair} {c.image} apply: " + "; ".join(parts) + f" (casync extract peak RSS "
        f"{casync.detail.get('extract_rss_mib')} MiB)"
    )


def _aim_lines(cases: Sequence[Case]) -> list[str]:
    """Issue 5's aims, per pair: what a device downloads with the defaults, and applies."""

    def name(r: Row | None) -> str:
        return f"{r.method} {_mb(r.download_bytes)} MB" if r else "-"

    lines = []
    for c in cases:
        chunks, pair = _row(c, _DEFAULT), _row(c, _PAIR_DELTA)
        offered = min(
            (r for r in (chunks, pair) if r is not None),
            key=lambda r: r.download_bytes or 0,
            default=None,
        )
        lines.append(
            f"{c.pair} {c.image}: from exactly the old version, {name(offered)} = "
            f"{_ratio(offered, c.best(_ANCHORS))} the best anchor ({name(c.best(_ANCHORS))}), "
            f"{_ratio(offered, c.best(_DIFF_ANCHORS))} the best of casync/zchunk/xdelta3; "
            f"from any version (chunks), {name(chunks)} = "
            f"{_ratio(chunks, c.best(_CDC_ANCHORS))} the best of casync/zchunk "
            f"({name(c.best(_CDC_ANCHORS))})"
        )
        apply = _apply_aim(c)
        if apply:
            lines.append(apply)
    return lines


def _ratio_lines(cases: Sequence[Case]) -> list[str]:
    lines = []

    def name(r: Row | None) -> str:
        return f"{r.method} {_mb(r.download_bytes)} MB" if r else "-"

    for c in cases:
        ours, est = c.best(skylift=True), c.best(skylift=True, estimates=True)
        anchor, diff = c.best(_ANCHORS), c.best(_DIFF_ANCHORS)
        lines.append(
            f"{c.pair} {c.image}: {name(ours)} = {_ratio(ours, anchor)} the best anchor "
            f"({name(anchor)}), {_ratio(ours, diff)} the best of casync/zchunk/xdelta3 "
            f"({name(diff)}); with grouped compression (estimate) {name(est)} = "
            f"{_ratio(est, anchor)} / {_ratio(est, diff)}"
        )
    return lines


def _table(cases: Sequence[Case]) -> list[str]:
    head = ("pair", "image", "method", "download MB", "requests", "vs best anchor", "notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for c in cases:
        anchor = c.best(_ANCHORS)
        for r in c.rows:
            req = "-" if r.requests is None else str(r.requests)
            lines.append(
                f"| {c.pair} | {c.image} | {r.method} | {_mb(r.download_bytes)} | {req} | "
                f"{_ratio(r, anchor) if r.download_bytes is not None else '-'} | {r.note} |"
            )
    return lines


def _print_text(cases: Sequence[Case]) -> None:
    print(f"\n{'pair':<6}{'image':<10}{'method':<32}{'MB':>10}{'requests':>10}{'x anchor':>10}")
    for c in cases:
        anchor = c.best(_ANCHORS)
        for r in c.rows:
            req = "-" if r.requests is None else str(r.requests)
            x = _ratio(r, anchor) if r.download_bytes is not None else "-"
            print(
                f"{c.pair:<6}{c.image:<10}{r.method:<32}{_mb(r.download_bytes):>10}{req:>10}{x:>10}"
            )


def _home_relative(path: Path) -> str:
    try:
        return "~/" + str(path.resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)


_APPLIED = (
    "apply: the agent's apply_plan (apply_delta for the per-pair delta) in its own process, "
    "bench/agent_child.py (pack read from a local file, not HTTP; file slot; includes the "
    "final read-back); agent peak RSS is that process's, plan included, importing what a "
    "device has: the modules of the hub and dev extras that no base dependency needs are "
    "unimportable there (boto3 among them, which securesystemslib imports when it can); "
    "casync extract: the new .caibx from a local store holding its chunks, the old image as "
    "seed (--reflink=no), its time and peak RSS"
)
_NOT_APPLIED = (
    "apply time, agent RSS and casync extract: not measured in this run (--apply measures "
    "them; bench/agent_install.py measures installs from a real hub)"
)


def _write_markdown(
    path: Path, cases: Sequence[Case], corpus: Path, seconds: float, *, applied: bool
) -> None:
    info = corpus / "meta" / "info.txt"
    sums = corpus / "meta" / "sha256sums"
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Delta download bytes, {created}",
        "",
        "Made by `bench/delta.py` (all figures from one run, on the same files). Bytes are what",
        "a device running the old image downloads to install the new one. Skylift: head + chunk",
        "index (zstd, as the hub serves it) + the coalesced HTTP ranges of the pack (gaps",
        "included), from",
        f"`skylift delta plan` with the agent's defaults (max gap {DEFAULT_MAX_GAP_BYTES} bytes, "
        f"max range {DEFAULT_MAX_RANGE_BYTES} bytes, {DEFAULT_MAX_RANGES_PER_REQUEST} ranges "
        "per request); multipart headers (~100 bytes a range) are not counted.",
        "1 MB = 10^6 bytes.",
        "",
        f"- host: {platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"Python {platform.python_version()}; run took {seconds / 60:.0f} min",
        f"- tools: {_tool_versions()}",
        f"- corpus: `{_home_relative(corpus)}` (make-corpus.sh), images:",
    ]
    if sums.is_file():
        lines += [f"  - `{ln.split()[1]}` sha256 {ln.split()[0][:16]}…" for ln in
                  sums.read_text().splitlines() if ln.strip()]  # fmt: skip
    if info.is_file():
        lines += [f"  - {ln}" for ln in info.read_text().splitlines() if ln.startswith("du ")]
    lines += [
        f"- {_APPLIED if applied else _NOT_APPLIED}",
        "- `plan` RSS is the `skylift delta plan` process: the agent's seed indexing and plan.",
        "",
        *_table(cases),
        "",
        "## Aims (issue 5): the defaults against the anchors",
        "",
        "With the defaults a hub and an agent use: the per-pair delta when the device runs",
        "exactly the old version and the delta is smaller, else the chunk plan of the default",
        "chunking (which any old version gets).",
        *(
            [
                "",
                "With --apply, each case's second line is the agent's apply time against casync",
                "extract's (the same image written: the ratio of speeds is casync's seconds over",
                "Skylift's), alone and with what casync extract also does (the seed indexed and",
                "the plan made; the delta's check of the active slot), and the agent's peak RSS",
                f"against the aim, under {_RSS_AIM_MIB} MiB. The agent fsyncs the slot and reads",
                "it back; casync extract does neither.",
            ]
            if applied
            else []
        ),
        "",
        *[f"- {ln}" for ln in _aim_lines(cases)],
        "",
        "## Ratios (Skylift's best chunk plan, any chunking, to the best anchor)",
        "",
        *[f"- {ln}" for ln in _ratio_lines(cases)],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    default_corpus = os.environ.get("CORPUS") or str(cache / "skylift-bench-corpus")
    parser.add_argument("--corpus", type=Path, default=Path(default_corpus))
    parser.add_argument("--pairs", default="small,big", help="small (v1->v1s), big (v1->v2)")
    parser.add_argument("--types", default="ext4,squashfs,tar", help="image types")
    parser.add_argument("--chunkings", default=",".join(_CHUNKINGS), help="--chunking specs")
    parser.add_argument("--no-anchors", action="store_true", help="measure Skylift only")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: small pair, tar, cdc:64K and fixed:4K"
    )
    parser.add_argument(
        "--out", type=Path, help="markdown file (default bench/results/delta-DATE.md)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--apply",
        action="store_true",
        help="also install each plan with the agent's apply_plan (time, peak RSS)",
    )
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.types, args.chunkings = "small", "tar", "default,fixed:4K"
    pairs = [p for p in args.pairs.split(",") if p]
    types = [t for t in args.types.split(",") if t]
    bad = [p for p in pairs if p not in _PAIRS] + [t for t in types if t not in _TYPES]
    if bad:
        sys.exit(f"delta: unknown pair or type: {', '.join(bad)}")
    cases = _cases(args.corpus, pairs, types)
    if not args.no_anchors:
        _ensure_tools()
    start = time.perf_counter()
    scratch_root = cache / "skylift-bench"
    scratch_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="delta-", dir=scratch_root))
    try:
        chunkings = [c for c in args.chunkings.split(",") if c]
        bench = DeltaBench(work, chunkings, not args.no_anchors, apply=args.apply)
        for case in cases:
            print(f"\n{case.pair} {case.image}: {case.old.name} -> {case.new.name}", flush=True)
            bench.skylift(case)
            if bench.anchors:
                bench.anchor_rows(case)
            else:
                print("  anchors: not measured (--no-anchors)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    _print_text(cases)
    print("\naims (the defaults, all bytes a device downloads, to the anchors):")
    for line in _aim_lines(cases):
        print(f"  {line}")
    print("\nratios (Skylift's best chunk plan, any chunking, to the anchors):")
    for line in _ratio_lines(cases):
        print(f"  {line}")
    print(_APPLIED if args.apply else _NOT_APPLIED)
    out = args.out or _BENCH / "results" / f"delta-{datetime.now(UTC):%Y-%m-%d}.md"
    _write_markdown(out, cases, args.corpus, seconds, applied=args.apply)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
