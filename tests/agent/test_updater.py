"""The updater end to end in one process: file slots, the simulated bootloader, a simulated hub.

Each test drives :class:`~skylift.agent.updater.Updater` over real bundles
(v1 on slot A, v2 offered) with the simulated bootloader's ``boot`` as the
reboot, so a reboot is a power cycle and the next step resumes in the new
boot. Faults: refusals, the hub out of reach or answering 500s, a chunk
corrupt once or always, disk full while writing the slot, a health check
that fails or hangs.
"""

from __future__ import annotations

import errno
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from agent.simhub import (
    Faults,
    Published,
    SimHub,
    agent_toml,
    build_bundle,
    images,
    publish,
)
from skylift.agent.bootloader import SimulatedBootloader
from skylift.agent.config import AgentConfig, SlotConfig, parse_config
from skylift.agent.hooks import HookError, HookRunner
from skylift.agent.machine import Action, State
from skylift.agent.ports import UpdateRefusedError
from skylift.agent.slots import SlotDevice, open_for_install
from skylift.agent.statefile import Release
from skylift.agent.updater import Backoff, Updater, read_status, verify_head
from skylift.bundle import TrustedKeys
from skylift.trust.keys import generate_private_key, signer_for

V1, V2 = images()


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return signer_for(generate_private_key())


@pytest.fixture(scope="module")
def release_v2(signer: CryptoSigner) -> Published:
    bundle = build_bundle(signer, "2.0.0", {"rootfs": V2})
    return publish(bundle, TrustedKeys((signer.public_key,)))


@dataclass
class Device:
    """One simulated device under a temporary directory."""

    root: Path
    config: AgentConfig
    board: SimulatedBootloader
    hub: SimHub
    open_slot: Callable[[SlotConfig, int], SlotDevice] = open_for_install
    updaters: list[Updater] = field(default_factory=list)

    def updater(self) -> Updater:
        """A fresh agent process: nothing in memory, everything from disk."""
        u = Updater(
            self.config,
            hub=self.hub,
            bootloader=self.board,
            reboot=self.board.boot,
            sleep=lambda s: None,
            rng=random.Random(1),
            open_slot=self.open_slot,
        )
        self.updaters.append(u)
        return u

    def slot(self, name: str) -> bytes:
        path = self.root / "slots" / f"rootfs-{name.lower()}.img"
        return path.read_bytes() if path.exists() else b""

    def reports(self, state: str) -> list[dict]:
        return [r for r in self.hub.sink.all() if r.get("state") == state]


def make_device(
    tmp_path: Path,
    release: Published | None,
    *,
    faults: Faults | None = None,
    hooks: dict[str, str] | None = None,
    hook_timeout_s: float = 5,
) -> Device:
    hook_paths = {}
    for phase, body in (hooks or {}).items():
        path = tmp_path / "hooks" / phase
        path.parent.mkdir(exist_ok=True)
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
        hook_paths[phase] = path
    text = agent_toml(tmp_path, hooks=hook_paths, hook_timeout_s=hook_timeout_s)
    config = parse_config(text, base_dir=tmp_path)
    (tmp_path / "slots").mkdir(parents=True)
    (tmp_path / "slots" / "rootfs-a.img").write_bytes(V1)
    board = SimulatedBootloader(state_path=tmp_path / "boot.json")
    assert board.boot() == "A"
    return Device(tmp_path, config, board, SimHub(release, faults=faults))


def update_to_reboot(dev: Device) -> None:
    out = dev.updater().run_once()
    assert out.rebooting, out


# -- the happy path ------------------------------------------------------------------


def test_update_v1_to_v2_commits_and_reports(tmp_path: Path, release_v2: Published) -> None:
    dev = make_device(tmp_path, release_v2, hooks={"health_check": "exit 0"})
    updater = dev.updater()
    out = updater.run_once()
    assert out.rebooting
    assert out.action is Action.REBOOT
    assert dev.board.current() == "B"  # the reboot was the simulated power cycle
    assert dev.slot("B") == V2
    # Only what the seed lacks was downloaded.
    assert dev.hub.bytes_served < len(release_v2.packs["rootfs"]) // 2

    out = updater.run_once()  # resumes in the new boot: trial, health check, commit
    assert out.state is State.IDLE
    assert updater.installed_versions() == {"B": "2.0.0"}
    assert dev.board.state("B").bootable
    assert dev.board.primary() == "B"
    committed = dev.reports("committed")
    assert len(committed) == 1
    assert committed[0]["details"]["version"] == "2.0.0"
    assert committed[0]["details"]["slot_class"] == "rootfs"
    # What delta delivery saved, in the reports: pack bytes fetched against the image size.
    (installed,) = dev.reports("installed")
    for report in (installed, committed[0]):
        assert report["details"]["downloaded_bytes"] == dev.hub.bytes_served
        assert report["details"]["image_bytes"] == len(V2)
    states = [r["state"] for r in dev.hub.sink.all() if r["kind"] == "update"]
    assert states == ["downloading", "installing", "installed", "rebooting", "trial", "committed"]
    assert any(r["kind"] == "progress" for r in dev.hub.sink.all())

    # Nothing more to do: the installed version is what the hub assigns.
    assert dev.updater().run_once().action is Action.CHECK
    status = read_status(dev.config, dev.board)
    assert status.state == "idle"
    assert {s.name: s.installed_version for s in status.slots} == {"A": None, "B": "2.0.0"}
    assert status.pending_reports == 0
    assert status.last_result == "committed 2.0.0"


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_what_the_inactive_slot_already_holds_is_neither_downloaded_nor_written(
    tmp_path: Path, release_v2: Published, reuse: bool
) -> None:
    # The other slot still holds 2.0.0, but for two damaged chunks' worth of bytes
    # (a release withdrawn and deployed again, a journal lost).
    dev = make_device(tmp_path, release_v2, hooks={"health_check": "exit 0"})
    if not reuse:
        hooks = {"health_check": tmp_path / "hooks" / "health_check"}
        text = agent_toml(tmp_path, hooks=hooks) + "\n[download]\nreuse_inactive = false\n"
        dev.config = parse_config(text, base_dir=tmp_path)
        assert dev.config.download.reuse_inactive is False
    held = bytearray(V2)
    held[100_000:100_100] = bytes(100)
    held[len(V2) - 50 :] = b"x" * 50
    (tmp_path / "slots" / "rootfs-b.img").write_bytes(bytes(held))
    writes: list[int] = []

    def counting(slot: SlotConfig, size: int) -> SlotDevice:
        device = open_for_install(slot, size)
        write_at = device.write_at

        def write(offset: int, data: bytes) -> None:
            writes.append(len(data))
            write_at(offset, data)

        device.write_at = write  # type: ignore[method-assign]
        return device

    dev.open_slot = counting
    update_to_reboot(dev)
    assert dev.slot("B") == V2
    pack = len(release_v2.packs["rootfs"])
    if reuse:
        # The two damaged chunks (from the active slot or the hub), and nothing else,
        # were written.
        assert dev.hub.bytes_served < 200_000 and 0 < sum(writes) < 200_000
    else:
        assert dev.hub.bytes_served > 200_000  # what the active slot (1.0.0) lacks
        assert sum(writes) >= len(V2) - 4096 * 2
    assert dev.hub.bytes_served < pack
    out = dev.updater().run_once()
    assert out.state is State.IDLE and dev.board.primary() == "B"


def test_every_healthy_boot_marks_the_running_slot_good(
    tmp_path: Path, release_v2: Published
) -> None:
    dev = make_device(tmp_path, None)
    dev.board.boot()  # spends one attempt of A
    assert dev.board.state("A").attempts_left == 1
    dev.updater().run_once()
    assert dev.board.state("A").attempts_left == 3


# -- trial failures ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "timeout_s", "reason"),
    [
        ("echo disk check failed; exit 3", 5, "exited with status 3"),
        ("echo waiting; sleep 30", 1, "timed out after 1 s"),
    ],
    ids=["fails", "hangs"],
)
def test_failed_health_check_rolls_back_with_the_reason(
    tmp_path: Path, release_v2: Published, hook: str, timeout_s: float, reason: str
) -> None:
    dev = make_device(
        tmp_path,
        release_v2,
        hooks={"health_check": hook, "on_rollback": "echo rollback hook ran"},
        hook_timeout_s=timeout_s,
    )
    update_to_reboot(dev)
    out = dev.updater().run_once()  # trial fails: mark bad, reboot into A
    assert out.rebooting
    assert out.action is Action.ROLL_BACK
    assert dev.board.current() == "A"
    assert not dev.board.state("B").bootable
    out = dev.updater().run_once()  # on the old slot: report rolled_back
    assert out.state is State.IDLE
    (rolled,) = dev.reports("rolled_back")
    assert reason in rolled["reason"]
    assert "rollback hook ran" in rolled["details"]["hook_output"]
    assert dev.slot("A") == V1
    assert not dev.reports("committed")
    # The hub keeps offering it (its director still names it); the agent does
    # not try it again, in this process or after a restart: no install loop.
    for _ in range(2):
        out = dev.updater().run_once()
        assert out.state is State.IDLE and not out.rebooting
        assert "not trying 2.0.0 again" in (out.note or "")
    assert dev.board.current() == "A" and dev.slot("A") == V1
    assert len(dev.reports("rolled_back")) == 1 and not dev.reports("downloading")[1:]
    # Once the hub offers something else (here: nothing), the same release may be tried again.
    offered, dev.hub.release = dev.hub.release, None
    dev.updater().run_once()
    dev.hub.release = offered
    assert dev.updater().run_once().rebooting


def test_new_slot_that_never_comes_up_falls_back(tmp_path: Path, release_v2: Published) -> None:
    dev = make_device(tmp_path, release_v2)
    update_to_reboot(dev)
    # The new slot's kernel never starts an agent: the bootloader counts down by itself.
    while dev.board.current() == "B":
        dev.board.boot()
    dev.updater().run_once()
    (rolled,) = dev.reports("rolled_back")
    assert "fell back" in rolled["reason"]


def test_mark_bad_on_trial_rolls_back_and_mark_good_commits(
    tmp_path: Path, release_v2: Published
) -> None:
    dev = make_device(tmp_path, release_v2)
    update_to_reboot(dev)
    assert dev.updater().mark(good=False) is State.ROLLED_BACK
    assert dev.board.current() == "A"
    dev.updater().run_once()
    assert "marked the new slot bad" in dev.reports("rolled_back")[0]["reason"]

    dev2 = make_device(tmp_path / "second", release_v2)
    update_to_reboot(dev2)
    assert dev2.updater().mark(good=True) is State.IDLE
    assert dev2.reports("committed")


# -- the chunk cache: what a rolled-back release downloaded serves the next one -------------


def test_chunks_of_a_rolled_back_release_are_not_downloaded_again(
    tmp_path: Path, signer: CryptoSigner, release_v2: Published
) -> None:
    # 3.0.0 is 2.0.0 with a fix near its start: every later chunk moved (content-defined
    # chunking), so the inactive slot, which still holds 2.0.0, holds few of them in place.
    v3 = V2[:1000] + b"the fix" * 40 + V2[1000:]
    release_v3 = publish(
        build_bundle(signer, "3.0.0", {"rootfs": v3}), TrustedKeys((signer.public_key,))
    )
    served: dict[str, int] = {}
    for mode in ("cache", "no cache"):
        root = tmp_path / mode.replace(" ", "-")
        root.mkdir()
        dev = make_device(root, release_v2, hooks={"health_check": "exit 1"})
        cache_dir = root / "state" / "chunk-cache"
        if mode == "no cache":
            hooks = {"health_check": root / "hooks" / "health_check"}
            text = agent_toml(root, hooks=hooks) + "\n[download]\ncache_max_bytes = 0\n"
            dev.config = parse_config(text, base_dir=root)
        update_to_reboot(dev)  # 2.0.0
        assert dev.updater().run_once().action is Action.ROLL_BACK
        assert dev.updater().run_once().state is State.IDLE
        assert dev.reports("rolled_back") and dev.board.current() == "A"
        if mode == "cache":
            assert (cache_dir / "data").stat().st_size > 0
        else:
            assert not cache_dir.exists()

        (root / "hooks" / "health_check").write_text("#!/bin/sh\nexit 0\n")
        dev.hub.release = release_v3
        before = dev.hub.bytes_served
        update_to_reboot(dev)  # 3.0.0
        served[mode] = dev.hub.bytes_served - before
        assert dev.slot("B") == v3
        (installed,) = [r for r in dev.reports("installed") if r["details"]["version"] == "3.0.0"]
        assert installed["details"]["downloaded_bytes"] == served[mode]
        assert dev.updater().run_once().state is State.IDLE
        assert dev.reports("committed")
        # Committed: its chunks are the next install's seed; the cache is emptied.
        assert not any(p.stat().st_size for p in cache_dir.glob("*"))
    assert served["no cache"] > 100_000  # what 1.0.0 lacks, again
    assert served["cache"] < served["no cache"] // 4


# -- refusals: failed with the reason, the running system untouched --------------------


def _other_hardware(signer: CryptoSigner) -> Published:
    bundle = build_bundle(signer, "2.0.0", {"rootfs": V2}, compatible=("board-z",))
    return publish(bundle, TrustedKeys((signer.public_key,)))


def _other_product(signer: CryptoSigner) -> Published:
    bundle = build_bundle(signer, "2.0.0", {"rootfs": V2}, product="other-gw")
    return publish(bundle, TrustedKeys((signer.public_key,)))


def _no_rootfs(signer: CryptoSigner) -> Published:
    bundle = build_bundle(signer, "2.0.0", {"app": V2})
    return publish(bundle, TrustedKeys((signer.public_key,)))


REFUSALS: list[tuple[str, Callable[[CryptoSigner], Published] | None, Faults, str]] = [
    ("check refused", None, Faults(refuse="targets metadata expired"), "expired"),
    ("other hardware", _other_hardware, Faults(), "not 'board-a'"),
    ("other product", _other_product, Faults(), "for product other-gw"),
    ("unknown slot class", _no_rootfs, Faults(), "slot class 'app'"),
    ("tampered index", None, Faults(tamper_index=True), "does not verify"),
    ("corrupt chunk always", None, Faults(corrupt="always"), "corrupt twice"),
]


@pytest.mark.parametrize(
    ("name", "make", "faults", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_refusal_fails_with_reason_and_touches_nothing(
    tmp_path: Path,
    signer: CryptoSigner,
    release_v2: Published,
    name: str,
    make: Callable[[CryptoSigner], Published] | None,
    faults: Faults,
    reason: str,
) -> None:
    release = make(signer) if make else release_v2
    dev = make_device(tmp_path, release, faults=faults)
    out = dev.updater().run_once()
    assert out.state is State.FAILED or out.state is State.IDLE
    dev.updater().run_once()
    (failed,) = dev.reports("failed")
    assert reason in failed["reason"], failed["reason"]
    assert not dev.reports("rebooting")
    assert dev.board.current() == "A"
    assert dev.board.primary() == "A"
    assert dev.slot("A") == V1
    assert not dev.board.state("B").bootable or dev.slot("B") == b""
    assert read_status(dev.config, dev.board).state == "idle"


def test_corrupt_chunk_once_is_fetched_again(tmp_path: Path, release_v2: Published) -> None:
    dev = make_device(tmp_path, release_v2, faults=Faults(corrupt="once"))
    update_to_reboot(dev)
    dev.updater().run_once()
    assert dev.reports("committed")
    assert dev.slot("B") == V2


# -- the hub out of reach -------------------------------------------------------------


@pytest.mark.parametrize("message", ["connection refused", "hub answered 500"])
def test_hub_unreachable_backs_off_then_updates(
    tmp_path: Path, release_v2: Published, message: str
) -> None:
    dev = make_device(tmp_path, release_v2, faults=Faults(down=3, down_message=message))
    updater = dev.updater()
    delays = []
    for _ in range(3):
        out = updater.run_once()
        assert out.state is State.IDLE
        assert out.delay_s > 0
        delays.append(out.delay_s)
    assert delays[0] < delays[2] <= 8  # exponential, capped by backoff_max_s
    out = updater.run_once()
    assert out.rebooting  # the hub is back: the update goes through
    updater.run_once()
    assert dev.reports("committed")


def test_network_cut_during_download_resumes_from_the_journal(
    tmp_path: Path, release_v2: Published
) -> None:
    dev = make_device(tmp_path, release_v2, faults=Faults(fail_ranges_after=3))
    updater = dev.updater()
    out = updater.run_once()
    assert out.state is State.INSTALLING
    assert out.delay_s > 0
    served = dev.hub.bytes_served
    out = updater.run_once()
    assert out.rebooting
    dev.updater().run_once()
    assert dev.reports("committed")
    # What was verified before the cut was not fetched again.
    assert dev.hub.bytes_served - served < dev.hub.bytes_served


def test_reports_wait_in_the_queue_while_the_hub_is_down(
    tmp_path: Path, release_v2: Published
) -> None:
    dev = make_device(tmp_path, release_v2)
    update_to_reboot(dev)
    dev.hub.faults.down = 1000
    updater = dev.updater()
    updater.run_once()  # commits; the committed report cannot be sent
    assert not dev.reports("committed")
    assert len(updater.queue) > 0
    dev.hub.faults.down = 0
    updater.run_once()
    assert len(dev.reports("committed")) == 1
    assert len(updater.queue) == 0


# -- disk full -----------------------------------------------------------------------


class _FullDisk:
    """A slot on a disk that fills up after ``room`` bytes (ENOSPC, as the kernel says it)."""

    def __init__(self, inner: SlotDevice, room: int) -> None:
        self._inner = inner
        self._room = room

    def size(self) -> int:
        return self._inner.size()

    def read_range(self, offset: int, length: int) -> bytes:
        return self._inner.read_range(offset, length)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        self._inner.write_at(offset, data)

    def zero_range(self, offset: int, length: int) -> None:
        self._inner.zero_range(offset, length)  # a hole takes no room

    def sync(self) -> None:
        self._inner.sync()

    def close(self) -> None:
        self._inner.close()


def test_disk_full_while_writing_the_slot_fails_and_old_slot_boots(
    tmp_path: Path, release_v2: Published
) -> None:
    dev = make_device(tmp_path, release_v2)
    dev.open_slot = lambda slot, size: _FullDisk(open_for_install(slot, size), 512 * 1024)
    out = dev.updater().run_once()
    assert out.state is State.IDLE
    (failed,) = dev.reports("failed")
    assert "no space left" in failed["reason"]
    assert not dev.board.state("B").bootable
    assert dev.board.boot() == "A"
    assert dev.slot("A") == V1


# -- hooks around the install ----------------------------------------------------------


def test_pre_install_hook_failure_cancels_before_writing(
    tmp_path: Path, release_v2: Published
) -> None:
    dev = make_device(tmp_path, release_v2, hooks={"pre_install": "echo no; exit 1"})
    dev.updater().run_once()
    (failed,) = dev.reports("failed")
    assert "pre_install hook" in failed["reason"]
    assert failed["details"]["hook_output"].strip() == "no"
    assert dev.slot("B") == b""


def test_post_install_hook_sees_the_update(tmp_path: Path, release_v2: Published) -> None:
    out_file = tmp_path / "seen"
    dev = make_device(
        tmp_path,
        release_v2,
        hooks={
            "post_install": f'echo "$SKYLIFT_VERSION $SKYLIFT_SLOT $SKYLIFT_PREVIOUS_SLOT" > {out_file}'
        },
    )
    update_to_reboot(dev)
    assert out_file.read_text().split() == ["2.0.0", "B", "A"]


def test_a_missing_configured_hook_is_refused_at_start(tmp_path: Path) -> None:
    dev = make_device(tmp_path, None, hooks={"health_check": "exit 0"})
    (tmp_path / "hooks" / "health_check").unlink()
    with pytest.raises(HookError, match="does not exist"):
        HookRunner(dev.config.hooks).check()


# -- pieces ----------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    b = Backoff(10, 100, random.Random(3))
    delays = [b.next_delay() for _ in range(8)]
    for n, d in enumerate(delays[:4]):
        step = min(100, 10 * 2**n)
        assert step / 2 <= d <= step
    assert all(50 <= d <= 100 for d in delays[4:])
    b.reset()
    assert b.next_delay() <= 10


def test_verify_head_refuses_a_head_that_is_not_the_offer(
    tmp_path: Path, release_v2: Published
) -> None:
    dev = make_device(tmp_path, None)
    o = release_v2.offer
    release = Release(o.product, o.version, o.target_name, o.sha256, o.length)
    assert verify_head(release_v2.head, release, dev.config).version == "2.0.0"
    bad = Release(o.product, "2.0.1", o.target_name, o.sha256, o.length)
    with pytest.raises(UpdateRefusedError, match="offer said 2.0.1"):
        verify_head(release_v2.head, bad, dev.config)
    with pytest.raises(UpdateRefusedError, match="length and SHA-256"):
        verify_head(release_v2.head + b"x", release, dev.config)
    assert hashlib.sha256(release_v2.head).hexdigest() == o.sha256


# -- the CLI over the same device ------------------------------------------------------


def test_cli_status_and_mark_good(tmp_path: Path, release_v2: Published) -> None:

    from skylift.cli.main import main

    dev = make_device(tmp_path, release_v2)
    toml = tmp_path / "agent.toml"
    toml.write_text(agent_toml(tmp_path))
    update_to_reboot(dev)
    assert main(["agent", "mark-good", "--config", str(toml)]) == 0  # commits the trial
    assert dev.board.state("B").bootable
    status = read_status(dev.config, dev.board)
    assert status.state == "idle"
    assert status.last_result == "committed 2.0.0"
    assert main(["agent", "status", "--config", str(toml)]) == 0
    assert main(["agent", "status", "--json", "--config", str(toml)]) == 0


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from skylift.cli.main import main

    assert main(["agent", "status", "--config", str(tmp_path / "missing.toml")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "missing.toml" in lines[0]
