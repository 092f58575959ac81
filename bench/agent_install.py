"""Agent install speed and memory from a local hub, against ``cp`` of the same image.

Not a test: it prints figures, and ratios to ``cp`` measured in the same run,
and never fails on a slow result. Usage:

    python bench/agent_install.py [--size-mib 1024 | --quick] [--keep]
    make bench-agent BENCH_ARGS=--quick

What runs, all on 127.0.0.1, in a temporary directory removed at the end
(``--keep`` keeps it):

- v1: an ext4 image filled from /usr, built and cached as bench/bundle_create.py
  builds it (``${XDG_CACHE_HOME:-~/.cache}/skylift-bench/usr-<N>M.ext4``);
- v2: v1 with scattered 64 KiB-aligned blocks of 64 KiB rewritten (only blocks
  that are not all zeros, as an update changes files; each new block is another
  block of the image with every 64th byte flipped, so it compresses as the
  image does and matches no chunk of v1); about 5% of the chunks change, and
  the actual fraction is measured from the two releases' chunk indexes;
- a hub made by ``skylift hub init`` (SQLite, local storage) and run by
  ``skylift hub serve`` in its own process; product, keys, bundles and
  releases made and pushed with the ``skylift`` CLI as a release engineer
  does; a provisioning key from the CLI; the device enrolled by the agent's
  own ``ensure_identity``; the release assigned through the director
  (``Director.assign``, as the tests do);
- the agent side in its own process (bench/agent_install_driver.py), so its
  peak RSS (``VmHWM``, read by that process at its end) is its own: ``HubClient`` over
  mutual TLS, head, verified index, plan, ``apply_plan`` into a file
  slot with its journal, and the final read-back. First a fresh install of v1
  into an empty slot (unseeded), then the update to v2 into the other slot,
  seeded from the v1 slot;
- the reference: ``cp --reflink=never`` of the same image, then ``os.fsync``
  of the copy (timed together), before and after the installs; the faster is kept.

When the peak RSS misses the aim, the install is run again with tracemalloc
in the driver and the allocations at its heaviest moment are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
_REPO = _BENCH.parent
_DRIVER = _BENCH / "agent_install_driver.py"
sys.path.insert(0, str(_BENCH))
from bundle_create import _build_image, _require_tools  # noqa: E402 - the image, as cached there

_MIB = 1 << 20
_BLOCK = 64 * 1024
_CHANGED_CHUNKS = 0.05
# Calibrated on these images with the default chunking: their mean chunk is
# about 110 KiB (the free space cuts into 256 KiB chunks of zeros), and a
# rewritten 64 KiB block changes about 2.1 chunks (those it overlaps, and
# sometimes the next when a cut point moves).
_CHUNKS_PER_BLOCK = 2.1
_MEAN_CHUNK = 110 * 1024
_V2_SEED = 5
# The agent as a device runs it: installed without the hub extra, so securesystemslib
# finds no boto3 to import (this venv has it, for the hub's S3 storage).
_AS_DEVICE = ("--no-boto3",)
_PRODUCT = "bench-gw"
_HARDWARE = "bench-board"
_VERSIONS = ("1.0.0", "1.1.0")
_PASSPHRASE = "bench passphrase"  # noqa: S105 - throwaway keys of a throwaway hub
_START_TIMEOUT_S = 60.0
_CLI_TIMEOUT_S = 1200.0
_DRIVER_TIMEOUT_S = 1200.0
_RSS_AIM_MIB = 64.0
_CP_AIM = 0.5
_AIM = f"aim: peak RSS < {_RSS_AIM_MIB:.0f} MiB whatever the image size; install >= {_CP_AIM}x cp"


@dataclass
class Install:
    """One run of the driver: its JSON, with its peak RSS (VmHWM)."""

    doc: dict[str, Any]

    @property
    def rss_mib(self) -> float:
        return float(self.doc["peak_rss_mib"])

    @property
    def seconds(self) -> float:
        return float(self.doc["seconds"])

    @property
    def image_bytes(self) -> int:
        return int(self.doc["image_bytes"])


# --------------------------------------------------------------------------- images


def _cache() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skylift-bench"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _v2_blocks(size: int) -> int:
    chunks = size / _MEAN_CHUNK
    return max(1, round(chunks * _CHANGED_CHUNKS / _CHUNKS_PER_BLOCK))


def _make_v2(v1: Path, v2: Path, blocks: int) -> None:
    """Rewrite ``blocks`` scattered, non-zero 64 KiB blocks of a copy of ``v1``."""
    print(f"making {v2.name}: {blocks} scattered 64 KiB blocks of v1 rewritten")
    rng = random.Random(_V2_SEED)
    count = v1.stat().st_size // _BLOCK
    partial = v2.with_suffix(".partial")
    shutil.copyfile(v1, partial)
    zero = bytes(_BLOCK)
    with open(v1, "rb") as src, open(partial, "r+b") as out:

        def block(i: int) -> bytes:
            return os.pread(src.fileno(), _BLOCK, i * _BLOCK)

        used = [i for i in range(count) if block(i) != zero]
        chosen = sorted(rng.sample(used, min(blocks, len(used))))
        for i in chosen:
            new = bytearray(block(rng.choice(used)))
            new[::64] = bytes(b ^ 0x5A for b in new[::64])
            os.pwrite(out.fileno(), new, i * _BLOCK)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, v2)


def _images(size: int) -> tuple[Path, Path, int]:
    cache = _cache()
    v1 = cache / f"usr-{size // _MIB}M.ext4"
    if not v1.exists():
        _build_image(v1, size)
    blocks = _v2_blocks(size)
    v2 = cache / f"usr-{size // _MIB}M-v2-{blocks}x64K.ext4"
    if not v2.exists() or v2.stat().st_mtime < v1.stat().st_mtime:
        _make_v2(v1, v2, blocks)
    return v1, v2, blocks


# --------------------------------------------------------------------------- the hub


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Cli:
    """``skylift`` subprocesses in one working directory with one login."""

    def __init__(self, cwd: Path, config_home: Path) -> None:
        self.cwd = cwd
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLIFT_")}
        self.env = env | {
            "SKYLIFT_KEY_PASSPHRASE": _PASSPHRASE,
            "XDG_CONFIG_HOME": str(config_home),
            "COLUMNS": "200",
        }

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "skylift.cli.main", *args]

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        p = subprocess.run(
            self.argv(*args), cwd=self.cwd, env=self.env, input=stdin, capture_output=True,
            text=True, timeout=_CLI_TIMEOUT_S, check=False,
        )  # fmt: skip
        if p.returncode != 0:
            raise SystemExit(f"skylift {' '.join(args)} failed:\n{p.stderr.strip()[-2000:]}")
        return p.stdout

    def parallel(self, *calls: tuple[str, ...]) -> None:
        procs = [
            subprocess.Popen(
                self.argv(*args),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for args in calls
        ]
        failed = []
        for args, proc in zip(calls, procs, strict=True):
            try:
                _, err = proc.communicate(timeout=_CLI_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0:
                failed.append(f"skylift {' '.join(args)}:\n{err.strip()[-2000:]}")
        if failed:
            raise SystemExit("failed: " + "\n".join(failed))


def _wait_listening(ports: list[int], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    left = list(ports)
    while left and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the hub exited with {proc.returncode} during startup")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", left[0]), 0.2):
            left.pop(0)
            continue
        time.sleep(0.1)
    if left:
        raise SystemExit(f"the hub did not listen on {left} within {_START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def _serve(cli: _Cli, hub_dir: Path, ports: list[int], log: Path) -> Iterator[None]:
    """``skylift hub serve`` in its own process until the block ends."""
    argv = cli.argv("hub", "serve", str(hub_dir), "--log-level", "warning")
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cli.cwd, env=cli.env, stdout=out, stderr=out)
    try:
        _wait_listening(ports, proc)
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _agent_config(base: Path, gateway_port: int, ca: Path, size: int, device_id: str) -> Path:
    base.mkdir(parents=True)
    (base / "slots").mkdir()
    shutil.copyfile(ca, base / "hub-ca.pem")
    path = base / "agent.toml"
    path.write_text(f"""\
[hub]
url = "https://127.0.0.1:{gateway_port}"
ca_file = "hub-ca.pem"
request_timeout_s = 60

[identity]
device_id = "{device_id}"
product = "{_PRODUCT}"
hardware_id = "{_HARDWARE}"
cert_file = "identity/device.pem"
key_file = "identity/device.key"
provisioning_key_file = "provisioning.key"

[[slot]]
class = "rootfs"
name = "A"
type = "file"
path = "slots/a.img"
size_bytes = {size}

[[slot]]
class = "rootfs"
name = "B"
type = "file"
path = "slots/b.img"
size_bytes = {size}

[bootloader]
kind = "file"

[storage]
state_dir = "state"
""")
    return path


def _chunk_entries(hub_dir: Path, bundle: Path, version: str) -> list[Any]:
    """A release's chunk index as the hub stores it, verified against the bundle's manifest."""
    from agent_install_driver import verified_entries
    from skylift.bundle import Manifest, read_head
    from skylift.hub.config import load_config
    from skylift.hub.content import version_segment
    from skylift.hub.storage import open_store

    with open(bundle, "rb") as f:
        manifest = Manifest.from_bytes(read_head(f).manifest_bytes)
    (payload,) = manifest.payloads
    store = open_store(load_config(hub_dir).storage_url)
    key = f"releases/{_PRODUCT}/{version_segment(version)}/{payload.name}.index"
    return verified_entries(payload, store.get(key, max_bytes=1 << 30))


def _assign(hub_dir: Path, device_id: str, version: str) -> None:
    """Make the director name ``version`` for the device, as the tests do."""
    from skylift.hub.config import load_config
    from skylift.hub.setup import open_hub

    ctx = open_hub(load_config(hub_dir))
    try:
        target = ctx.images.load(_PRODUCT).target_files[f"{version}.head"]
        ctx.director.assign(device_id, target)
    finally:
        ctx.sessions.kw["bind"].dispose()


# --------------------------------------------------------------------------- measuring


def _run_driver(config: Path, out: Path, *args: str) -> Install:
    """The driver in a child process, and its JSON.

    Its peak RSS is the ``VmHWM`` it reads itself at the end: ``ru_maxrss``
    from ``wait4`` is no good here, because posix_spawn (vfork) children
    inherit the parent's high-water mark at exec, and this process is larger
    than the agent's.
    """
    argv = [sys.executable, str(_DRIVER), "--config", str(config), *args]
    log = out.with_suffix(".log")
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in (out, log)]
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fds[0], 1), (os.POSIX_SPAWN_DUP2, fds[1], 2)]
        pid = os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions)
    finally:
        for fd in fds:
            os.close(fd)
    deadline = time.monotonic() + _DRIVER_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise SystemExit(f"the agent driver took over {_DRIVER_TIMEOUT_S:.0f} s; see {log}")
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"the agent driver failed ({code}):\n{log.read_text()[-3000:]}")
    return Install(json.loads(out.read_text()))


def _imports_rss(out: Path, extra: tuple[str, ...]) -> float:
    """Peak RSS of a driver that only imports what it installs with."""
    run = _run_driver(out / "agent.toml", out / "imports.json", "--imports-only", *extra)
    return run.rss_mib


def _cp(image: Path, dest: Path) -> float:
    """Seconds for ``cp --reflink=never image dest`` and ``os.fsync`` of ``dest``."""
    dest.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", str(image), str(dest)], check=True, timeout=600)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    dest.unlink()
    return elapsed


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * _MIB):
            pass


# --------------------------------------------------------------------------- report


def _mb_s(n: int, seconds: float) -> float:
    return n / seconds / 1e6


def _stages(run: Install) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in run.doc["stages"].items())


def _rss_stages(run: Install) -> str:
    return ", ".join(f"{k} +{v:.1f}" for k, v in run.doc["vmhwm_growth_mib"].items())


def _profile_lines(title: str, doc: dict[str, Any]) -> list[str]:
    lines = [
        f"{title}: peak RSS {doc['peak_rss_mib']:.0f} MiB with tracemalloc on; Python "
        f"allocations peak {doc.get('traced_peak_mib', 0):.1f} MiB; heaviest snapshot "
        f"{doc.get('snapshot_mib', 0):.1f} MiB, taken at {doc.get('snapshot_where', '-')}:"
    ]
    for top in [t for t in doc.get("top", []) if t["mib"] >= 0.5][:4]:
        lines.append(f"  {top['mib']:7.1f} MiB in {top['blocks']} blocks, allocated at")
        lines += [f"      {w}" for w in reversed(top["where"][-5:])]
    return lines


def _report(
    size: int,
    blocks: int,
    changed: tuple[int, int, int],
    cp_runs: list[float],
    fresh: Install,
    update: Install,
    imports: tuple[float, float],
) -> list[str]:
    changed_chunks, total_chunks, new_bytes = changed
    cp_best = min(cp_runs)
    cp_mb_s = _mb_s(size, cp_best)
    lines = [
        f"v2: {blocks} scattered 64 KiB blocks rewritten: {changed_chunks} of {total_chunks} "
        f"chunks ({100 * changed_chunks / total_chunks:.1f}%) are not in v1's index",
        "reference: cp --reflink=never + os.fsync(copy): "
        + ", ".join(f"{s:.2f} s" for s in cp_runs)
        + f" (before, after the installs); best {cp_mb_s:.0f} MB/s",
        "",
        f"{'run':<22}{'seconds':>9}{'MB/s':>8}{'x cp':>7}{'peak RSS MiB':>14}"
        f"{'chunks fetched':>18}{'downloaded':>20}",
    ]
    for name, run in (("fresh install (v1)", fresh), ("update v1 -> v2", update)):
        plan, result = run.doc["plan"], run.doc["result"]
        meta = sum(run.doc["metadata_bytes"].values())
        down = result["downloaded_bytes"] + meta
        fetched = f"{result['fetched_chunks']}/{plan['chunks']}"
        lines.append(
            f"{name:<22}{run.seconds:>9.2f}{_mb_s(size, run.seconds):>8.0f}"
            f"{cp_best / run.seconds:>7.2f}{run.rss_mib:>14.1f}{fetched:>18}"
            f"{down / _MIB:>10.1f} MiB {100 * down / size:>5.1f}%"
        )
    u = update.doc
    meta = sum(u["metadata_bytes"].values())
    down = u["result"]["downloaded_bytes"] + meta
    lines += [
        "",
        f"update: {u['result']['downloaded_bytes'] / _MIB:.1f} MiB of pack ranges in "
        f"{u['plan']['requests']} requests + {meta / _MIB:.2f} MiB of head and index "
        f"= {100 * down / size:.1f}% of the {size / _MIB:.0f} MiB image; the new chunks are "
        f"{new_bytes / _MIB:.1f} MiB uncompressed; {u['plan']['seed_chunks']} chunks from the "
        f"seed, {u['plan']['target_copy_chunks']} copied within the target",
        f"stages, fresh (s): {_stages(fresh)}",
        f"stages, update (s): {_stages(update)}",
        f"peak RSS growth by stage, fresh (MiB): {_rss_stages(fresh)}",
        f"peak RSS growth by stage, update (MiB): {_rss_stages(update)}",
        f"agent imports alone: peak RSS {imports[1]:.1f} MiB as on a device (the installs above "
        f"run so); {imports[0]:.1f} MiB with boto3 importable, as in this venv with the hub "
        "extra (securesystemslib.signer imports it when it is installed)",
        _AIM,
    ]
    ratio = cp_best / fresh.seconds
    for name, run in (("fresh", fresh), ("update", update)):
        met = "met" if run.rss_mib < _RSS_AIM_MIB else "MISSED"
        lines.append(f"  peak RSS, {name}: {run.rss_mib:.1f} MiB -> {met}")
    lines.append(
        f"  fresh install {ratio:.2f}x cp -> {'met' if ratio >= _CP_AIM else 'MISSED'} "
        f"(update: {cp_best / update.seconds:.2f}x cp)"
    )
    return lines


# --------------------------------------------------------------------------- main


def _machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"


def _run(size: int, keep: bool, profile: bool) -> None:
    v1, v2, blocks = _images(size)
    size = v1.stat().st_size
    print(
        f"agent install bench: {size / _MIB:.0f} MiB ext4 image from /usr; hub "
        f"(skylift hub serve, SQLite, local storage) and agent on 127.0.0.1; {_machine()}"
    )
    base = Path(tempfile.mkdtemp(prefix="skylift-agent-bench-"))
    try:
        _bench(base, v1, v2, blocks, size, profile)
    finally:
        if keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _bench(base: Path, v1: Path, v2: Path, blocks: int, size: int, profile: bool) -> None:
    from skylift.agent.config import load_config as load_agent_config
    from skylift.agent.enroll import ensure_identity

    work = base / "work"
    work.mkdir()
    cli = _Cli(work, base / "config")
    hub_dir = base / "hub"
    gateway_port, api_port = _free_port(), _free_port()
    started = time.monotonic()
    token = cli("hub", "init", str(hub_dir), "--org", "bench", "--admin-email",
                "ops@bench.example", "--gateway-port", str(gateway_port), "--api-port",
                str(api_port), "--no-password").strip()  # fmt: skip
    ca = hub_dir / "ca" / "device-ca.pem"
    with _serve(cli, hub_dir, [gateway_port, api_port], base / "hub.log"):
        cli("login", f"https://127.0.0.1:{api_port}", "--token", "-", "--ca", str(ca),
            stdin=token + "\n")  # fmt: skip
        cli.parallel(("keys", "generate", "root"), ("keys", "generate", "release"))
        cli("product", "create", _PRODUCT, "--root-key", "root.key", "--release-key",
            "release.key")  # fmt: skip
        bundles = [work / f"{v}.bundle" for v in _VERSIONS]
        cli.parallel(*[
            ("bundle", "create", "--product", _PRODUCT, "--version", version, "--hardware",
             _HARDWARE, "--payload", f"rootfs={image}", "--key", "release.key", "-o", str(out),
             "-j", "1")
            for version, image, out in zip(_VERSIONS, (v1, v2), bundles, strict=True)
        ])  # fmt: skip
        for bundle in bundles:
            cli("release", "push", str(bundle), "--key", "release.key")
        secret = cli("provisioning", "create", _PRODUCT, "bench").strip()
        device_id = "bench-device-1"
        config_path = _agent_config(base / "device", gateway_port, ca, size, device_id)
        (base / "device" / "provisioning.key").write_text(secret + "\n")
        ensure_identity(load_agent_config(config_path), now=datetime.now(UTC))
        print(f"hub, product, 2 releases and an enrolled device made in "
              f"{time.monotonic() - started:.0f} s")  # fmt: skip

        known = {e.digest for e in _chunk_entries(hub_dir, bundles[0], _VERSIONS[0])}
        new = _chunk_entries(hub_dir, bundles[1], _VERSIONS[1])
        changed = [e for e in new if e.digest not in known]
        changed_stats = (len(changed), len(new), sum(e.length for e in changed))
        del known, new, changed
        for bundle in bundles:
            bundle.unlink()
        out = base / "runs"
        out.mkdir()

        _warm(v1)
        cp_runs = [_cp(v1, base / "cp.img")]
        _assign(hub_dir, device_id, _VERSIONS[0])
        fresh = _run_driver(config_path, out / "fresh.json", "--booted", "B", *_AS_DEVICE)
        _assign(hub_dir, device_id, _VERSIONS[1])
        update_args = ("--booted", "A", "--seed", "--installed", _VERSIONS[0], *_AS_DEVICE)
        update = _run_driver(config_path, out / "update.json", *update_args)
        _warm(v1)
        cp_runs.append(_cp(v1, base / "cp.img"))
        print()
        imports = (_imports_rss(out, ()), _imports_rss(out, ("--no-boto3",)))
        print("\n".join(_report(size, blocks, changed_stats, cp_runs, fresh, update, imports)))

        profiles = []
        if profile or fresh.rss_mib >= _RSS_AIM_MIB:
            _assign(hub_dir, device_id, _VERSIONS[0])
            doc = _run_driver(config_path, out / "fresh-trace.json", "--booted", "B",
                              "--tracemalloc", *_AS_DEVICE).doc  # fmt: skip
            profiles += _profile_lines("fresh install, traced", doc)
        if profile or update.rss_mib >= _RSS_AIM_MIB:
            _assign(hub_dir, device_id, _VERSIONS[1])
            doc = _run_driver(config_path, out / "update-trace.json", *update_args,
                              "--tracemalloc").doc  # fmt: skip
            profiles += _profile_lines("update, traced", doc)
        if profiles:
            print()
            print("memory profile (tracemalloc in the driver, a separate run of each):")
            print("\n".join(profiles))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    parser.add_argument("--quick", action="store_true", help="128 MiB image, for a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the hub, slots and logs")
    parser.add_argument(
        "--profile", action="store_true", help="profile memory even when the RSS aim is met"
    )
    args = parser.parse_args()
    _require_tools("mke2fs", "tar", "cp")
    size = (128 if args.quick else args.size_mib) * _MIB
    if size < 16 * _MIB:
        parser.error("--size-mib: at least 16")
    _run(size, args.keep, args.profile)


if __name__ == "__main__":
    main()
