"""Bundle creation speed and memory, measured against sha256 and zstd on the same image.

Not a test: it prints figures and ratios to reference runs made in the same
process on the same file, and never fails on a slow result. Usage:

    python bench/bundle_create.py [--quick | --size 1G | --image PATH] [--repeat 2]
    make bench BENCH_ARGS=--quick

The image is an ext4 filesystem filled with files from /usr (binaries,
libraries, data, headers), built once with mke2fs -d and cached under
${XDG_CACHE_HOME:-~/.cache}/skylift-bench/. Needs mke2fs (e2fsprogs) and zstd.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_BLOCK = 1 << 20
_MIB = 1 << 20
_FILL = 0.7  # share of the image the copied files take; ext4 metadata needs the rest
_ROOTS = ("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/include", "/usr/lib")
_AIM = (
    "aim: bundle creation >= 0.5x zstd -3 -T1 on one core, faster than that with two; "
    "peak RSS < 200 MiB"
)


@dataclass
class Run:
    method: str
    seconds: float = float("inf")
    rss_mib: float | None = None
    out_bytes: int = 0

    def keep_best(self, seconds: float, rss_mib: float | None, out_bytes: int = 0) -> None:
        """Keep the fastest time, but the highest peak RSS of all runs."""
        self.seconds = min(self.seconds, seconds)
        self.rss_mib = max(self.rss_mib or 0.0, rss_mib) if rss_mib is not None else None
        self.out_bytes = out_bytes or self.out_bytes


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    suffix = text[-1:].upper()
    return int(text[:-1]) * units[suffix] if suffix in units else int(text)


def _require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(
            f"bundle_create: missing {', '.join(missing)}; run "
            "scripts/ensure-debs zstd e2fsprogs (or make bench)",
            file=sys.stderr,
        )
        sys.exit(2)


def _walk(root: str, seen: set[str]) -> Iterator[tuple[str, int]]:
    """(path, bytes it costs on ext4) for regular files and symlinks under ``root``."""
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if os.path.join(top, d) not in seen)
        for name in sorted(files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            if os.path.islink(path):
                yield path, 0
            elif os.path.isfile(path) and os.access(path, os.R_OK):
                yield path, -(-st.st_size // 4096) * 4096


def _pick_files(budget: int) -> list[str]:
    """Equal shares of bytes from each root in turn, so the image mixes kinds of file."""
    seen: set[str] = set()
    heap: list[tuple[int, int, Iterator[tuple[str, int]]]] = []
    for i, root in enumerate(_ROOTS):
        if os.path.isdir(root):
            heap.append((0, i, _walk(root, set(seen))))
            seen.add(root)
    picked: list[str] = []
    total = 0
    while heap and total < budget:
        taken, i, it = heapq.heappop(heap)
        entry = next(it, None)
        if entry is None:
            continue
        path, cost = entry
        if total + cost <= budget:
            picked.append(path.lstrip("/"))
            total += cost
        heapq.heappush(heap, (taken + cost, i, it))
    return picked


def _build_image(path: Path, size: int) -> None:
    _require_tools("mke2fs", "tar")
    print(f"building {path} ({size // _MIB} MiB ext4 from /usr; cached for later runs)")
    files = _pick_files(int(size * _FILL))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix="staging-") as staging:
        root = Path(staging) / "root"
        root.mkdir()
        listing = Path(staging) / "files"
        listing.write_text("\n".join(files) + "\n")
        tar = "tar -C / --no-recursion --ignore-failed-read -cf - -T {} | tar -C {} -xf -"
        cmd = tar.format(listing, root)
        subprocess.run(["sh", "-c", cmd], check=True, stderr=subprocess.DEVNULL)
        inodes = len(files) * 13 // 10 + 4096
        partial = path.with_suffix(".partial")
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-N", str(inodes), "-d", str(root),
             str(partial), f"{size // 1024}k"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    os.replace(partial, path)


def _spawn(argv: list[str], stdout: str) -> tuple[float, float, int]:
    """Run ``argv`` with stdout to a file; return (wall seconds, peak RSS MiB, exit code)."""
    actions = [(os.POSIX_SPAWN_OPEN, 1, stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    return elapsed, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def _sha256(path: Path) -> float:
    """Seconds to hash the file in 1 MiB blocks (also how the page cache is warmed)."""
    start = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return time.perf_counter() - start


def _child(image: str, out: str, workers: int) -> None:
    """Create one bundle; print JSON with the seconds write_bundle took and its size."""
    from skylift.bundle import PayloadSource, write_bundle
    from skylift.trust.keys import generate_private_key, signer_for

    signer = signer_for(generate_private_key())
    with open(image, "rb") as f, open(out, "wb") as o:
        start = time.perf_counter()
        with tempfile.TemporaryFile(dir=os.path.dirname(out)) as spool:
            write_bundle(
                o,
                product="bench",
                version="1.0",
                compatible=["bench-board"],
                payloads=[PayloadSource("rootfs", f)],
                signers=[signer],
                spool=spool,
                created=datetime.now(UTC),
                workers=workers,
            )
        o.flush()
        elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "size": os.path.getsize(out)}))


def _bundle(image: Path, cache: Path, workers: int) -> tuple[float, float, int]:
    out = cache / f"bench-w{workers}.skybundle"
    result = cache / f"bench-w{workers}.json"
    argv = [sys.executable, __file__, "--child", str(image), str(out), str(workers)]
    try:
        _, rss, code = _spawn(argv, str(result))
        if code != 0:
            sys.exit(f"bundle creation with workers={workers} failed (exit code {code})")
        data = json.loads(result.read_text())
    finally:
        out.unlink(missing_ok=True)
        result.unlink(missing_ok=True)
    return float(data["seconds"]), rss, int(data["size"])


def _zstd_size(image: Path, cache: Path) -> int:
    out = cache / "bench.zst"
    try:
        _spawn(["zstd", "-q", "-3", "-T1", "-c", str(image)], str(out))
        return out.stat().st_size
    finally:
        out.unlink(missing_ok=True)


def _report(runs: dict[str, Run], image_bytes: int, zstd_bytes: int, repeat: int) -> None:
    ref_zstd, ref_sha = runs["zstd1"].seconds, runs["sha256"].seconds
    print(f"\nimage {image_bytes / _MIB:.0f} MiB, best of {repeat} runs, warm page cache")
    print(f"{'method':<26}{'seconds':>9}{'MB/s':>9}{'x zstd-T1':>11}{'x sha256':>10}{'RSS MiB':>9}")
    for r in runs.values():
        rss = f"{r.rss_mib:.0f}" if r.rss_mib is not None else "-"
        print(
            f"{r.method:<26}{r.seconds:>9.2f}{image_bytes / r.seconds / 1e6:>9.0f}"
            f"{ref_zstd / r.seconds:>11.2f}{ref_sha / r.seconds:>10.2f}{rss:>9}"
        )
    bundle_bytes = runs["w1"].out_bytes
    print(
        f"\nsizes: image {image_bytes / _MIB:.1f} MiB, zstd -3 {zstd_bytes / _MIB:.1f} MiB "
        f"({image_bytes / zstd_bytes:.2f}:1), bundle {bundle_bytes / _MIB:.1f} MiB "
        f"({image_bytes / bundle_bytes:.2f}:1), bundle/zstd {bundle_bytes / zstd_bytes:.3f}"
    )
    one, two = ref_zstd / runs["w1"].seconds, ref_zstd / runs["w2"].seconds
    peak = max(runs["w1"].rss_mib or 0.0, runs["w2"].rss_mib or 0.0)
    print(_AIM)
    print(
        f"  one core: {one:.2f}x zstd -3 -T1 -> {'met' if one >= 0.5 else 'NOT met'}; "
        f"two workers: {two:.2f}x zstd -3 -T1, {two / one:.2f}x one worker, "
        f"{runs['zstd2'].seconds / runs['w2'].seconds:.2f}x zstd -3 -T2 -> "
        f"{'met' if two > one and two >= 0.5 else 'NOT met'}; "
        f"peak RSS {peak:.0f} MiB -> {'met' if peak < 200 else 'NOT met'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="image size to build (default 1G)")
    parser.add_argument("--quick", action="store_true", help="256 MiB image, for a smoke run")
    parser.add_argument("--image", type=Path, help="use this image instead of building one")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each method (best kept)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    _require_tools("zstd")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skylift-bench"
    cache.mkdir(parents=True, exist_ok=True)
    image: Path = args.image
    if image is None:
        size = 256 * _MIB if args.quick else _parse_size(args.size)
        image = cache / f"usr-{size // _MIB}M.ext4"
        if not image.exists():
            _build_image(image, size)
    elif not image.is_file():
        sys.exit(f"bundle_create: {image} is not a file")
    image_bytes = image.stat().st_size
    _sha256(image)  # warm the page cache, so every method reads from memory
    runs = {
        "sha256": Run("sha256 (hashlib, 1 MiB)"),
        "zstd1": Run("zstd -3 -T1"),
        "zstd2": Run("zstd -3 -T2"),
        "w1": Run("skylift bundle, workers=1"),
        "w2": Run("skylift bundle, workers=2"),
    }
    for i in range(args.repeat):  # interleaved, so a noisy moment hits one run, not one method
        print(f"run {i + 1}/{args.repeat} ...", flush=True)
        runs["sha256"].keep_best(_sha256(image), None)
        for key, threads in (("zstd1", "-T1"), ("zstd2", "-T2")):
            seconds, rss, _ = _spawn(["zstd", "-q", "-3", threads, "-c", str(image)], os.devnull)
            runs[key].keep_best(seconds, rss)
        for key, workers in (("w1", 1), ("w2", 2)):
            runs[key].keep_best(*_bundle(image, cache, workers))
    _report(runs, image_bytes, _zstd_size(image, cache), args.repeat)
    print("bundle seconds are timed inside the child around write_bundle (no interpreter start)")


if __name__ == "__main__":
    main()
