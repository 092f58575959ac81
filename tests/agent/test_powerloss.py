"""Power loss: SIGKILL the agent at every state transition and inside every long step.

The agent runs as its own process (``powerloss_driver.py``), updating a
device from v1 to v2 against a simulated hub whose state lives in files. A
scenario kills it once, at one point: after (and just before) each state
save, at the n-th slot write (half written), the n-th pack range received,
the n-th bootloader change, the n-th report batch the hub stored, during the
health-check hook, or at a random time. Half the scenarios also cut the
power there (the simulated board boots again); then the agent is restarted
until it is done, with the board powered on again whenever it asked for a
reboot. After each scenario:

- the slot the board boots holds exactly the v1 or the v2 image (its whole
  content, so it verifies against either index), and so does the slot it
  would boot next;
- the agent is idle, and the installed version it records for the booted
  slot is the one that slot holds (v2, or unknown for the factory v1);
- the hub received exactly one final status (committed, rolled back or
  failed) for every update id it heard of, and at least one.

The normal run covers more than a hundred kill points in well under a
minute on two cores: each run is a child forked from a driver that has
already imported everything, and the images are 2 MiB.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.powerloss_driver import DONE_EXIT, REBOOT_EXIT
from agent.simhub import (
    FileSink,
    agent_toml,
    build_bundle,
    final_reports,
    images,
    publish,
    save_release,
)
from skylift.agent.bootloader import SimulatedBootloader
from skylift.agent.config import parse_config
from skylift.agent.updater import read_status
from skylift.bundle import TrustedKeys
from skylift.trust.keys import generate_private_key, signer_for

DRIVER = Path(__file__).with_name("powerloss_driver.py")
V1, V2 = images()
DIGESTS = {hashlib.sha256(V1).hexdigest(): "1.0.0", hashlib.sha256(V2).hexdigest(): "2.0.0"}
MAX_RUNS = 25
SAMPLED_SITES = {"write": 20, "fetch": 10}  # long sites: this many kill points spread over them
#: Random-time kills; raise it for a longer soak: SKYLIFT_POWERLOSS_TIMED_KILLS=2000.
TIMED_KILLS = int(os.environ.get("SKYLIFT_POWERLOSS_TIMED_KILLS", "30"))


@dataclass(frozen=True)
class Scenario:
    """Kill run number ``run`` at ``kill`` (site, n) or after ``after_s``; maybe cut the power."""

    name: str
    run: int
    kill: tuple[str, int] | None = None
    after_s: float | None = None
    power_cut: bool = False


class Server:
    """One ``powerloss_driver.py serve`` process: forks one child per agent run."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lock = threading.Lock()

    def run(self, device: Path, release: Path, scenario: Scenario | None) -> dict[str, int]:
        req: dict[str, Any] = {"device": str(device), "release": str(release)}
        if scenario is not None:
            req["kill"] = scenario.kill
            req["kill_after_s"] = scenario.after_s
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        with self.lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        assert line, "the power-loss driver died"
        answer: dict[str, int] = json.loads(line)
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    signer = signer_for(generate_private_key())
    bundle = build_bundle(signer, "2.0.0", {"rootfs": V2})
    release = publish(bundle, TrustedKeys((signer.public_key,)))
    directory = tmp_path_factory.mktemp("release")
    save_release(release, directory)
    return directory


@pytest.fixture(scope="module")
def servers() -> Iterator[list[Server]]:
    pool = [Server(), Server()]
    yield pool
    for s in pool:
        s.close()


def new_device(root: Path) -> SimulatedBootloader:
    (root / "slots").mkdir(parents=True)
    (root / "slots" / "rootfs-a.img").write_bytes(V1)
    hook = root / "health-check"
    hook.write_text("#!/bin/sh\necho healthy\n")
    hook.chmod(0o755)
    (root / "agent.toml").write_text(agent_toml(root, hooks={"health_check": hook}))
    board = SimulatedBootloader(state_path=root / "boot.json")
    board.boot()
    return board


def play(server: Server, root: Path, release: Path, scenario: Scenario | None) -> dict[str, Any]:
    """Run one scenario to the end; what happened."""
    board = new_device(root)
    killed = 0
    for run in range(1, MAX_RUNS + 1):
        answer = server.run(root, release, scenario if scenario and scenario.run == run else None)
        if "signal" in answer:
            killed += 1
            if scenario is not None and scenario.power_cut:
                board.boot()
            continue
        if answer["exit"] == REBOOT_EXIT:
            board.boot()
            continue
        assert answer["exit"] == DONE_EXIT, (scenario, answer)
        break
    else:
        raise AssertionError(f"{scenario}: the agent never finished")
    finals = check_device(root, board, scenario)
    return {"killed": killed, "runs": run, "finals": finals}


def check_device(root: Path, board: SimulatedBootloader, scenario: Scenario | None) -> list[str]:
    config = parse_config((root / "agent.toml").read_text(), base_dir=root)
    booted = board.current()
    for name in {booted, board.primary()}:
        content = (root / "slots" / f"rootfs-{name.lower()}.img").read_bytes()
        assert hashlib.sha256(content).hexdigest() in DIGESTS, (scenario, name)
    held = DIGESTS[
        hashlib.sha256((root / "slots" / f"rootfs-{booted.lower()}.img").read_bytes()).hexdigest()
    ]
    status = read_status(config, board)
    assert status.state == "idle", (scenario, status)
    assert not status.problems, (scenario, status.problems)
    installed = {s.name: s.installed_version for s in status.slots}[booted]
    assert installed == (held if held == "2.0.0" else None), (scenario, booted, installed)
    finals = final_reports(FileSink(root / "hub-reports.jsonl"))
    assert finals, scenario
    by_update: dict[str, set[str]] = defaultdict(set)
    for r in finals:
        by_update[r["details"]["update_id"]].add(r["report_id"])
    assert all(len(ids) == 1 for ids in by_update.values()), (scenario, by_update)
    if any(r["state"] == "committed" for r in finals):
        assert held == "2.0.0", scenario
    return sorted(r["state"] for r in finals)


def scenarios(profile: list[dict[str, Any]], run_times: list[float]) -> list[Scenario]:
    """Every kill point the clean run passed, plus samples of the long sites and random times."""
    rng = random.Random(20261123)
    out: list[Scenario] = []
    for run, counts in enumerate(profile, start=1):
        for site, total in sorted(counts.items()):
            points = range(1, total + 1)
            if site in SAMPLED_SITES and total > SAMPLED_SITES[site]:
                points = sorted(rng.sample(range(1, total + 1), SAMPLED_SITES[site]))
            for n in points:
                for cut in (False, True) if site in ("save", "boot") else (n % 2 == 0,):
                    out.append(
                        Scenario(
                            f"run{run}-{site}-{n}{'-cut' if cut else ''}",
                            run,
                            (site, n),
                            power_cut=cut,
                        )
                    )
    for i in range(TIMED_KILLS):
        run = 1 if i % 3 else 2
        after = rng.uniform(0.0, 0.8 * run_times[run - 1])
        out.append(
            Scenario(f"run{run}-after-{after:.3f}s", run, after_s=after, power_cut=i % 2 == 0)
        )
    return out


def test_sigkill_at_every_transition_and_inside_long_steps(
    tmp_path: Path, release_dir: Path, servers: list[Server]
) -> None:
    # The clean run: what there is to kill, and how long each run takes.
    import time

    clean = tmp_path / "clean"
    started = time.monotonic()
    result = play(servers[0], clean, release_dir, None)
    assert result["killed"] == 0
    total_s = time.monotonic() - started
    profile = [
        json.loads(line)["counts"] for line in (clean / "counts.jsonl").read_text().splitlines()
    ]
    assert len(profile) == 2  # up to the reboot, then the trial up to done
    assert profile[0]["write"] > 10
    assert profile[0]["fetch"] > 3
    run_times = [total_s * 0.7, total_s * 0.3]

    cases = scenarios(profile, run_times)
    assert len(cases) >= 100

    def one(i_case: tuple[int, Scenario]) -> tuple[Scenario, dict[str, Any]]:
        i, case = i_case
        return case, play(servers[i % 2], tmp_path / f"s{i:03d}", release_dir, case)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, enumerate(cases)))
    killed = sum(1 for _, r in results if r["killed"])
    assert killed >= 100, f"only {killed} of {len(cases)} scenarios were killed"
    outcomes = Counter(state for _, r in results for state in r["finals"])
    # Kills before the try commit in the end; power cuts around the try roll back.
    assert outcomes["committed"] > 0
    assert outcomes["rolled_back"] > 0
    print(
        f"\npower loss: {len(cases)} scenarios, {killed} killed, final statuses "
        f"{dict(outcomes)}, clean run {total_s:.2f}s"
    )
