"""``make demo``: the whole story on one machine, on embedded defaults, as people would type it.

A release engineer makes keys, builds an ext4 image from real files and a
signed bundle (a tampered copy is refused). A hub starts on SQLite and a
local object store. The operator logs in, creates the product, publishes
1.0.0 and a provisioning key. Three factory-fresh simulated devices (real
``skylift agent run`` processes with file slots and the ``file``
bootloader, :mod:`skylift.fleet.devices`) enroll over mutual TLS and
install 1.0.0. Release 1.1.0 changes a few files; pushing it uploads only
the chunks the hub lacks. It is deployed in two phases, a canary and then
everyone; one device's health check fails on 1.1.0 and it rolls back by
itself. The deployment status and the device list tell the story, every
process is stopped, and a summary checks each device's slot files against
the images.

Every CLI step is a ``skylift`` subprocess, shown as typed; the progress
lines while a deployment runs come from the management API (what ``deploy
status --json`` and ``devices list --json`` print). Every wait is bounded
and fails with the last lines of the logs concerned.

Run: ``python -m skylift.demo [WORKDIR]`` (default ``.demo``; it is emptied
first). :class:`Demo` is also what ``tests/e2e/test_fleet.py`` runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from skylift.bundle import ChunkData, TrustedKeys, read_body, read_head
from skylift.cli.common import human_size
from skylift.fleet.devices import DeviceSpec, Fleet, FleetError, die_with_parent, log_tail
from skylift.trust.keys import load_public_key

IMAGE_MIB = 32
PRODUCT = "demo-os"
HARDWARE = "demo-board-rev2"
V1, V2 = "1.0.0", "1.1.0"
CANARY_TAG = "ring=canary"
#: sensor-03 is the board on which 1.1.0 does not come up healthy.
DEVICES = (
    DeviceSpec("sensor-01"),
    DeviceSpec("sensor-02"),
    DeviceSpec("sensor-03", fail_health_on=(V2,)),
)
CANARY = "sensor-01"
#: How often the hub tells devices to poll (its minimum; the default is 300 s).
HUB_POLL_S = 10
#: How often the demo hub looks for releases to make per-pair deltas for (default 30 s).
HUB_DELTA_S = 2
#: Bounds of the waits, in seconds.
HUB_START_S = 30.0
ENROLL_S = 30.0
DEPLOY_S = 75.0
_PASSPHRASE = "demo passphrase"  # noqa: S105 - a throw-away key made for the demo
_SETTLED = ("completed", "paused", "aborted")
#: The hub log's lines for each API request (the demo's own polling, mostly): left out of tails.
_ACCESS_LOG = "uvicorn.access"


class DemoError(Exception):
    """A step of the demo failed; the message says which and shows the logs concerned."""


@dataclass
class StoryResult:
    """What happened, as the hub's management API and the device files tell it."""

    elapsed_s: float
    fleet: Fleet
    images: dict[str, Path]
    #: The deployments' final status (``GET /deployments/{id}``, as ``deploy status --json``).
    v1_deployment: dict[str, Any]
    v2_deployment: dict[str, Any]
    #: ``GET /devices/{id}`` of each device at the end (with its deployments).
    devices: dict[str, dict[str, Any]]
    #: Each device's events, newest first.
    events: dict[str, list[dict[str, Any]]]
    #: What ``release push`` printed on stderr, per version.
    pushed: dict[str, str]
    #: The agents' exit codes when stopped (SIGTERM).
    agent_exit_codes: dict[str, int | None] = field(default_factory=dict)
    #: Whether each device's booted slot holds exactly the image of the version the hub reports.
    slots_match: dict[str, bool] = field(default_factory=dict)


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def make_image(work: Path, name: str, tree: Path) -> Path:
    """An ext4 image of ``tree``, reproducible: fixed UUID, hash seed and clock."""
    mke2fs = shutil.which("mke2fs") or "/sbin/mke2fs"
    if not os.access(mke2fs, os.X_OK):
        raise DemoError("the demo needs mke2fs (Debian package e2fsprogs); `make demo` installs it")
    image = work / name
    uuid, seed = "6f1b0c9e-2f4d-4a43-9d6b-0a7e5c3d2b10", "3c5d7e9f-1a2b-4c3d-8e4f-5a6b7c8d9e0f"
    subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-L", "rootfs", "-U", uuid,
         "-E", f"hash_seed={seed},root_owner=0:0", "-d", str(tree), str(image), f"{IMAGE_MIB}M"],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1750377600"},
    )  # fmt: skip
    return image


def fill_tree(tree: Path) -> None:
    """Real files from this machine: Python's standard library, about 12 MiB of it."""
    src = Path(os.__file__).parent
    budget = 12 << 20
    for path in sorted(src.rglob("*.py")):
        if budget <= 0:
            break
        dest = tree / "usr/lib/python3" / path.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        budget -= path.stat().st_size
    (tree / "etc").mkdir(exist_ok=True)
    (tree / "etc/hostname").write_text("device\n")
    (tree / "etc/os-release").write_text(f'NAME="Skylift demo OS"\nVERSION_ID="{V1}"\n')


def change_tree(tree: Path) -> list[str]:
    """Release 1.1.0: a new os-release and motd, and a few library files patched."""
    (tree / "etc/os-release").write_text(f'NAME="Skylift demo OS"\nVERSION_ID="{V2}"\n')
    (tree / "etc/motd").write_text(f"Welcome to Skylift demo OS {V2}\n")
    changed = ["etc/os-release", "etc/motd"]
    for rel in ("usr/lib/python3/json/encoder.py", "usr/lib/python3/base64.py"):
        path = tree / rel
        if path.exists():
            path.write_text(path.read_text() + f"\n# patched in {V2}\n")
            changed.append(rel)
    return changed


def chunk_sizes(bundle: Path, pub: Path) -> dict[str, int]:
    """``{chunk digest: stored (compressed) size}`` of a bundle, verified against ``pub``."""
    with open(bundle, "rb") as f:
        head = read_head(f)
        head.verify(TrustedKeys((load_public_key(pub.read_bytes()),)))
        return {
            e.entry.hexdigest: len(e.stored) for e in read_body(f, head) if isinstance(e, ChunkData)
        }


class Demo:
    """The story, step by step; ``out`` gets the readable account."""

    def __init__(self, work: Path, *, out: TextIO | None = None, tour: bool = True) -> None:
        self.work = work.resolve()
        self.out = out or sys.stdout
        self.tour = tour
        self.started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLIFT_")}
        # Credentials of `skylift login` stay in the work dir, not in the user's ~/.config.
        env |= {"SKYLIFT_KEY_PASSPHRASE": _PASSPHRASE, "XDG_CONFIG_HOME": str(self.work / "config"),
                "COLUMNS": "120", "NO_COLOR": "1"}  # fmt: skip
        self.env = env
        self.hub_dir = self.work / "hub"
        self.hub_log = self.work / "hub.log"
        self.hub: subprocess.Popen[bytes] | None = None
        self._hub_log_file: IO[bytes] | None = None
        self.api_url = ""
        self.gateway_url = ""
        self.fleet: Fleet | None = None
        self.agent_exit_codes: dict[str, int | None] = {}
        self._client: Any = None

    # -- printing and running ------------------------------------------------------------

    def print(self, text: str = "") -> None:
        """One line of the account."""
        print(text, file=self.out, flush=True)

    def say(self, text: str, *, clock: bool = True) -> None:
        """A step's heading, with the time since the start."""
        self.print(f"\n\033[1m== {text}\033[0m" + (f"  [{self.elapsed():.0f} s]" if clock else ""))

    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.started

    def run(
        self,
        *args: str,
        expect: int = 0,
        stdin: Path | None = None,
        hide_stdout: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``skylift ARGS`` as a subprocess in the work dir, shown as typed, output indented.

        ``hide_stdout``: what to print instead of stdout (a secret the command reveals).
        """
        shown = "skylift " + " ".join(shlex.quote(a) for a in args)
        if stdin is not None:
            shown += f" < {stdin.relative_to(self.work)}"
        self.print(f"$ {shown}")
        with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
            p = subprocess.run(
                [sys.executable, "-m", "skylift.cli.main", *args],
                cwd=self.work, stdin=f, capture_output=True, text=True, env=self.env,
                timeout=120, check=False,
            )  # fmt: skip
        stdout = hide_stdout if hide_stdout is not None else p.stdout
        for line in (stdout.rstrip("\n") + "\n" + p.stderr).strip("\n").splitlines():
            self.print(f"  {line}")
        if p.returncode != expect:
            raise DemoError(
                f"`{shown}` exited with code {p.returncode}, expected {expect}:\n{p.stderr}"
            )
        if expect:
            self.print(f"  (exit code {p.returncode}, as it should be)")
        return p

    # -- the story ----------------------------------------------------------------------

    def story(self) -> StoryResult:
        """Run every step; stop every process it started, even when a step fails."""
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.print(f"Skylift demo in {self.work}: a hub, three simulated devices, two releases")
        try:
            return self._story()
        finally:
            self.stop()

    def _story(self) -> StoryResult:
        work = self.work
        self.say("1. A release engineer makes the product's keys (encrypted, passphrase from env)")
        self.print("$ export SKYLIFT_KEY_PASSPHRASE=...")
        self.run("keys", "generate", "root")
        self.run("keys", "generate", "release")

        self.say(f"2. Release {V1}: a {IMAGE_MIB} MiB ext4 image of real files, as a signed bundle")
        tree = work / "rootfs"
        fill_tree(tree)
        images = {V1: make_image(work, f"rootfs-{V1}.ext4", tree)}
        self.print(f"  {images[V1].name}: {images[V1].stat().st_size} bytes")
        bundles = {V1: self._bundle(V1, images[V1])}
        if self.tour:
            self.run("bundle", "verify", bundles[V1].name, "--key", "release.pub",
                     "--hardware", HARDWARE)  # fmt: skip
            tampered = work / "tampered.bundle"
            data = bytearray(bundles[V1].read_bytes())
            data[len(data) * 2 // 3] ^= 0x10
            tampered.write_bytes(bytes(data))
            self.print("# one bit flipped in a copy:")
            self.run("bundle", "verify", tampered.name, "--key", "release.pub", expect=1)

        self.say("3. A hub on embedded defaults: SQLite, local object store, TLS on 127.0.0.1")
        self.start_hub()

        self.say(f"4. The operator logs in, creates {PRODUCT}, publishes {V1}, makes a device key")
        token_file = work / "admin.token"
        self.run("login", self.api_url, "--token", "-", "--ca", "hub/ca/device-ca.pem",
                 stdin=token_file)  # fmt: skip
        self.run("product", "create", PRODUCT, "--root-key", "root.key",
                 "--release-key", "release.key")  # fmt: skip
        pushed = {V1: self._push(bundles[V1])}
        made = self.run(
            "provisioning", "create", PRODUCT, "factory-line", "--max-uses", str(len(DEVICES)),
            "--expires", "1d", hide_stdout="pk_… (the key; the factory puts it on each device)",
        )  # fmt: skip
        provisioning_key = made.stdout.strip()

        self.say("5. Three factory-fresh devices: empty slots A and B, no certificate yet")
        fleet = self.start_fleet(provisioning_key, images[V1].stat().st_size)
        self.wait_enrolled()
        self.run("devices", "tag", CANARY, CANARY_TAG)

        self.say(f"6. Deploy {V1} to every device, one phase; they install it into slot B")
        v1_id = self._deploy("first-install", V1, ["100"])
        v1_status = self.watch(v1_id)
        self._require(v1_status["status"] == "completed", f"{V1} deployment", v1_status)

        self.say(f"7. Release {V2} changes a few files; the hub receives only the new chunks")
        changed = change_tree(tree)
        self.print(f"  changed: {', '.join(changed)}")
        images[V2] = make_image(work, f"rootfs-{V2}.ext4", tree)
        bundles[V2] = self._bundle(V2, images[V2])
        pushed[V2] = self._push(bundles[V2])
        self.print(f"# in the background the hub makes a per-pair delta from {V1} to {V2}:"
                   f"\n# devices running exactly {V1} download it instead of chunks")  # fmt: skip
        release_path = f"/products/{PRODUCT}/releases/{V2}"
        self.wait_for(
            lambda: any(
                d.get("status") not in ("pending", None)
                for d in self._api("GET", release_path).get("deltas") or []
            ),
            60,
            f"the hub's delta from {V1} to {V2}",
        )
        self.run("release", "show", PRODUCT, V2)

        self.say(f"8. Deploy {V2} in two phases: the canary first, then everyone")
        self.print(
            "# --gate 50: a phase pauses the deployment when more than half of its devices fail."
            "\n# A failing canary (1 of 1) would stop it there; in the second phase one device"
            "\n# of two may roll back (50 %) and the rollout still completes."
        )
        v2_id = self._deploy("sensors-1.1", V2, [f"tag:{CANARY_TAG}", "100"], gate=50)
        v2_status = self.watch(v2_id)
        self._require(v2_status["status"] == "completed", f"{V2} deployment", v2_status)

        self.say("9. Where things stand")
        self.run("deploy", "status", str(v2_id))
        self.print("# state: what each agent said last (idle between updates)")
        self.run("devices", "list")
        bad = [d.device_id for d in DEVICES if V2 in d.fail_health_on]
        for device_id in bad:
            self.print(f"# {device_id}'s reports: {V2} written to slot A, tried, health check "
                       "failed, back to slot B")  # fmt: skip
            self.run("events", device_id, "--limit", "4")
        devices = {d.device_id: self._api("GET", f"/devices/{d.device_id}") for d in DEVICES}
        events = {
            d.device_id: self._api("GET", f"/devices/{d.device_id}/events")["items"]
            for d in DEVICES
        }

        self.say("10. Stop everything")
        self.stop()

        result = StoryResult(
            elapsed_s=self.elapsed(), fleet=fleet, images=images, v1_deployment=v1_status,
            v2_deployment=v2_status, devices=devices, events=events, pushed=pushed,
            agent_exit_codes=self.agent_exit_codes,
        )  # fmt: skip
        self.summary(result, bundles)
        return result

    # -- steps ----------------------------------------------------------------------------

    def _bundle(self, version: str, image: Path) -> Path:
        name = f"{PRODUCT}-{version}.bundle"
        self.run("bundle", "create", "--product", PRODUCT, "--version", version,
                 "--hardware", HARDWARE, "--payload", f"rootfs={image.name}",
                 "--key", "release.key", "-o", name)  # fmt: skip
        return self.work / name

    def _push(self, bundle: Path) -> str:
        p = self.run("release", "push", bundle.name, "--key", "release.key")
        return p.stderr

    def _deploy(self, name: str, version: str, phases: list[str], *, gate: float = 0) -> int:
        args = ["deploy", "create", "--name", name, "--product", PRODUCT, "--version", version]
        for phase in phases:
            args += ["--phase", phase]
        p = self.run(*args, "--gate", f"{gate:g}", "--soak", "0")
        found = re.search(r"deployment (\d+) ", p.stdout)
        if not found:
            raise DemoError(f"`deploy create` printed no deployment id:\n{p.stdout}")
        return int(found.group(1))

    def start_hub(self) -> None:
        """``hub init`` on free ports, a short poll interval, ``hub serve`` in the background."""
        gateway_port, api_port = _free_ports(2)
        p = self.run(
            "hub", "init", "hub", "--org", "demo", "--no-password",
            "--gateway-port", str(gateway_port), "--api-port", str(api_port),
            hide_stdout="sk_… (the admin's API token, shown once: kept in admin.token)",
        )  # fmt: skip
        token_file = self.work / "admin.token"
        token_file.touch(mode=0o600)
        token_file.write_text(p.stdout.strip() + "\n")
        config = self.hub_dir / "hub.toml"
        text = config.read_text()
        for old in ("\ninterval_s = 300\n", "\ninterval_s = 30\n"):
            if old not in text:
                raise DemoError(f"{config} has no {old.strip()} to shorten")
        text = text.replace("\ninterval_s = 300\n", f"\ninterval_s = {HUB_POLL_S}\n")
        config.write_text(text.replace("\ninterval_s = 30\n", f"\ninterval_s = {HUB_DELTA_S}\n"))
        self.print(f"# in hub/hub.toml, [poll] interval_s = {HUB_POLL_S} (default 300): "
                   f"devices poll every {HUB_POLL_S} s; [deltas] interval_s = {HUB_DELTA_S} "
                   "(default 30): the hub looks for new releases to make deltas for every "
                   f"{HUB_DELTA_S} s")  # fmt: skip
        self.print("$ skylift hub serve hub > hub.log 2>&1 &")
        self._hub_log_file = open(self.hub_log, "ab")  # noqa: SIM115 - closed in stop()
        self.hub = subprocess.Popen(
            [sys.executable, "-m", "skylift.cli.main", "hub", "serve", "hub"],
            cwd=self.work, env={**self.env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
            stdout=self._hub_log_file, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )  # fmt: skip
        self.api_url = f"https://127.0.0.1:{api_port}"
        self.gateway_url = f"https://127.0.0.1:{gateway_port}"

        def listening() -> bool:
            for port in (gateway_port, api_port):
                with socket.socket() as s:
                    s.settimeout(1)
                    if s.connect_ex(("127.0.0.1", port)) != 0:
                        return False
            return True

        self.wait_for(listening, HUB_START_S, "the hub to listen on its two ports")
        self.print(f"  gateway {self.gateway_url} (devices, mutual TLS), API {self.api_url}")

    def start_fleet(self, provisioning_key: str, image_bytes: int) -> Fleet:
        """Lay the devices out and start their agents."""
        self.fleet = Fleet.layout(
            self.work / "fleet", DEVICES, hub_url=self.gateway_url,
            ca_file=self.hub_dir / "ca" / "device-ca.pem", product=PRODUCT, hardware_id=HARDWARE,
            provisioning_key=provisioning_key, slot_size_bytes=2 * image_bytes,
        )  # fmt: skip
        for d in self.fleet.devices:
            health = f"fails on {', '.join(d.spec.fail_health_on)}" if d.spec.fail_health_on else (
                "always passes")  # fmt: skip
            self.print(f"  fleet/{d.device_id}/: agent.toml, provisioning.key, 2 file slots of "
                       f"{_mib(2 * image_bytes)}, boot.json, health-check ({health})")  # fmt: skip
        self.print("$ skylift agent run --config fleet/<device>/agent.toml > "
                   "fleet/<device>/agent.log 2>&1 &   # for each device")  # fmt: skip
        self.fleet.start(env=self.env)
        return self.fleet

    def wait_enrolled(self) -> None:
        """Until the hub lists every device (each enrolled with the provisioning key)."""
        seen: set[str] = set()

        def enrolled() -> bool:
            for d in self._api("GET", f"/devices?product={PRODUCT}"):
                if d["device_id"] not in seen:
                    seen.add(d["device_id"])
                    fingerprint = d["certificate"]["fingerprint"][:16]
                    self.print(
                        f"  [{self.elapsed():3.0f} s] {d['device_id']} enrolled "
                        f"(certificate {fingerprint}…)"
                    )
            return len(seen) == len(DEVICES)

        self.wait_for(enrolled, ENROLL_S, "every device to enroll", devices=True)

    def watch(self, deployment_id: int) -> dict[str, Any]:
        """Print a line whenever the deployment or a device changes; the settled status."""
        self.print(f"  watching deployment {deployment_id} (the API's deployment status and "
                   "device list, every second):")  # fmt: skip
        last = ""
        status: dict[str, Any] = {}

        def settled() -> bool:
            nonlocal last, status
            status = self._api("GET", f"/deployments/{deployment_id}")
            devices = self._api("GET", f"/devices?product={PRODUCT}")
            line = _progress_line(status, devices)
            if line != last:
                self.print(f"  [{self.elapsed():3.0f} s] {line}")
                last = line
            return status["status"] in _SETTLED

        self.wait_for(settled, DEPLOY_S, f"deployment {deployment_id} to settle", devices=True)
        return status

    def summary(self, result: StoryResult, bundles: dict[str, Path]) -> None:
        """Check each device's slots against the images; print what happened, in figures."""
        fleet = result.fleet
        digests = {v: _sha256(p) for v, p in result.images.items()}
        self.print("  slot files against the images (sha256):")
        for d in fleet.devices:
            hub_view = result.devices[d.device_id]
            reported = (hub_view.get("slots") or {}).get("rootfs")
            booted = d.booted_slot()
            ok = booted is not None and d.slot_sha256(booted) == digests.get(reported or "")
            result.slots_match[d.device_id] = ok
            other = "B" if booted == "A" else "A"
            other_v = next((v for v, h in digests.items() if h == d.slot_sha256(other)), "?")
            self.print(f"    {d.device_id}: the hub says {reported} ({hub_view['state']}); booted "
                       f"slot {booted} holds {reported if ok else 'SOMETHING ELSE'}; slot "
                       f"{other} holds {other_v}")  # fmt: skip
        pub = self.work / "release.pub"
        old, new = chunk_sizes(bundles[V1], pub), chunk_sizes(bundles[V2], pub)
        fresh = {d: n for d, n in new.items() if d not in old}
        size = result.images[V2].stat().st_size
        v2 = result.v2_deployment["phases"]
        totals = {k: sum(p["counts"].get(k, 0) for p in v2) for k in ("committed", "rolled_back")}
        self.say(f"Demo finished in {result.elapsed_s:.0f} s", clock=False)
        self.print(f"  {V1}: installed on {len(fleet.devices)} factory-fresh devices; {V2}: "
                   f"{totals['committed']} committed it, {totals['rolled_back']} rolled back "
                   "by itself")  # fmt: skip
        for device_id, items in result.events.items():
            for e in items:
                if e.get("state") == "rolled_back":
                    details = e.get("details") or {}
                    said = str(details.get("hook_output") or "").strip()
                    self.print(
                        f"  {device_id} rolled back {details.get('version')}: {e.get('reason')}"
                        + (f" (its output: {said})" if said else "")
                    )
                    break
        uploads = [ln.strip() for ln in result.pushed[V2].splitlines() if "uploading" in ln]
        self.print(f"  release push {V2}: {uploads[0] if uploads else '?'}")
        self.print(f"  {V2} has {len(new)} chunks; {len(new) - len(fresh)} of them are in {V1}. "
                   f"A device on {V1} would fetch the other {len(fresh)} as chunks: "
                   f"{_mib(sum(fresh.values()))} compressed, for a {_mib(size)} image; "
                   f"the hub's delta from {V1} replaces them")  # fmt: skip
        self.print("  (computed from the two bundles; what each device reported:)")
        for device_id, items in result.events.items():
            for e in items:
                details = e.get("details") or {}
                if e.get("state") == "installed" and details.get("version") == V2:
                    fetched, image = details.get("downloaded_bytes"), details.get("image_bytes")
                    if isinstance(fetched, int) and isinstance(image, int) and image:
                        share = f"{100 * fetched / image:.1f}%"
                        self.print(
                            f"    {device_id} fetched {human_size(fetched)} for {V2}, "
                            f"{share} of its {_mib(image)} image"
                        )
                    break
        every = all(result.slots_match.values())
        self.print(f"  every device's booted slot holds exactly the image it reports: {every}")
        if not every:
            raise DemoError("a device's booted slot does not hold the image the hub says it runs")

    # -- waiting and stopping --------------------------------------------------------------

    def wait_for(
        self, condition: Callable[[], bool], timeout_s: float, what: str, *, devices: bool = False
    ) -> None:
        """Call ``condition`` every second until true; after ``timeout_s``, DemoError and logs."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_processes()
            try:
                if condition():
                    return
            except OSError as e:  # the hub not listening yet, a file being replaced
                last_error = str(e)
            else:
                last_error = ""
            if time.monotonic() > deadline:
                hub_tail = log_tail(self.hub_log, skip=_ACCESS_LOG)
                logs = f"the end of {self.hub_log.name} (without API requests):\n{hub_tail}"
                if devices and self.fleet is not None:
                    for d in self.fleet.devices:
                        logs += f"\nthe end of {d.log_path.relative_to(self.work)}:\n{d.log_tail()}"
                raise DemoError(
                    f"gave up waiting for {what} after {timeout_s:g} s"
                    + (f" ({last_error})" if last_error else "")
                    + f"\n{logs}"
                )
            time.sleep(1.0)

    def _check_processes(self) -> None:
        if self.hub is not None and self.hub.poll() is not None:
            raise DemoError(
                f"the hub exited with code {self.hub.returncode}; the end of "
                f"{self.hub_log.name}:\n{log_tail(self.hub_log, skip=_ACCESS_LOG)}"
            )
        if self.fleet is not None:
            try:
                self.fleet.check_running()
            except FleetError as e:
                raise DemoError(e.message) from e

    def _require(self, ok: bool, what: str, status: dict[str, Any]) -> None:
        if not ok:
            raise DemoError(
                f"the {what} ended {status['status']}"
                + (f" ({status['paused_reason']})" if status.get("paused_reason") else "")
                + ", not completed"
            )

    def _api(self, method: str, path: str) -> Any:
        """The management API, in this process, with the token ``skylift login`` stored."""
        if self._client is None:
            from skylift.cli.client import Credentials, HubClient

            token = (self.work / "admin.token").read_text().strip()
            ca = self.hub_dir / "ca" / "device-ca.pem"
            self._client = HubClient(Credentials(self.api_url, token, ca))
        doc = self._client.json(method, path)
        return doc["items"] if path.startswith("/devices?") else doc

    def stop(self) -> None:
        """Stop the devices' agents and the hub (SIGTERM, SIGKILL after a bounded wait)."""
        if self.fleet is not None and any(d.process for d in self.fleet.devices):
            codes = self.fleet.stop()
            self.agent_exit_codes.update(codes)
            self.print(
                "  agents stopped: " + ", ".join(f"{k} (exit {v})" for k, v in codes.items())
            )
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.hub is not None:
            self.hub.send_signal(signal.SIGTERM)
            try:
                code = self.hub.wait(10)
            except subprocess.TimeoutExpired:
                self.hub.kill()
                code = self.hub.wait()
            how = "SIGTERM" if code == -signal.SIGTERM else f"exit {code}"
            self.print(f"  hub stopped ({how}; see hub.log)")
            self.hub = None
        if self._hub_log_file is not None:
            self._hub_log_file.close()
            self._hub_log_file = None


def _progress_line(status: dict[str, Any], devices: list[dict[str, Any]]) -> str:
    phases = status["phases"]
    head = f"{status['status']}, phase {status['current_phase']} of 0-{len(phases) - 1}"
    parts = [head]
    for d in sorted(devices, key=lambda d: d["device_id"]):
        state = d.get("state") or "?"
        if d.get("progress") is not None and state in ("downloading", "installing"):
            state += f" {d['progress']}%"
        version = (d.get("slots") or {}).get("rootfs")
        parts.append(f"{d['device_id']} {state}" + (f" (runs {version})" if version else ""))
    return " | ".join(parts)


@contextmanager
def _exit_on_error() -> Iterator[None]:
    try:
        yield
    except DemoError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def main() -> None:
    """Run the demo in the directory named on the command line (default ``.demo``)."""
    work = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo")
    with _exit_on_error():
        Demo(work).story()


if __name__ == "__main__":
    main()
