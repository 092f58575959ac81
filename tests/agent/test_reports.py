"""The on-disk report queue: order, outages, restarts, dedup, bounds, and kills mid-delivery."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest

# The hub's own parser: what the agent queues must be what the gateway accepts.
# (Only the tests touch skylift.hub; the agent package never imports it.)
from skylift.agent.errors import ReportQueueError, ReportRejectedError, ReportTransportError
from skylift.agent.machine import State
from skylift.agent.reports import (
    KIND_PROGRESS,
    KIND_STATE_RESET,
    KIND_UPDATE,
    MAX_DETAILS_BYTES,
    MAX_HOOK_OUTPUT_BYTES,
    MAX_REASON_CHARS,
    Report,
    ReportQueue,
    step_report_id,
)
from skylift.hub.gateway.reports import parse_reports

T0 = datetime(2026, 11, 23, 19, 0, tzinfo=UTC)


def _clock() -> Any:
    ticks = count()
    return lambda: T0 + timedelta(seconds=next(ticks))


def _queue(path: Path, **kwargs: Any) -> ReportQueue:
    return ReportQueue(path, clock=_clock(), **kwargs)


@dataclass
class FakeHub:
    """A report endpoint that parses like the gateway and stores each report_id once."""

    down: bool = False
    accept_batches: int | None = None  # then go down
    refuse_ids: set[str] = field(default_factory=set)
    received: list[str] = field(default_factory=list)  # every id, every time it came
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # in arrival order

    def send(self, reports: Sequence[Report]) -> None:
        if self.down or self.accept_batches == 0:
            raise ReportTransportError("connection refused")
        if any(r.report_id in self.refuse_ids for r in reports):
            raise ReportRejectedError("400 reports[0]: bad")
        wire = [r.to_wire() for r in reports]
        parse_reports(json.loads(json.dumps({"reports": wire})))  # raises on what the hub refuses
        for doc in wire:
            self.received.append(doc["report_id"])
            self.stored.setdefault(doc["report_id"], doc)
        if self.accept_batches is not None:
            self.accept_batches -= 1


def _fill(queue: ReportQueue, n: int) -> list[Report]:
    return [
        queue.enqueue(KIND_PROGRESS, state=State.DOWNLOADING, progress=i % 101) for i in range(n)
    ]


# -- order and wire shape -----------------------------------------------------


def test_reports_are_pending_and_delivered_in_order(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    queued = [
        queue.enqueue(KIND_UPDATE, state=State.DOWNLOADING, progress=0),
        queue.enqueue(KIND_PROGRESS, state=State.DOWNLOADING, progress=50),
        queue.enqueue(KIND_UPDATE, state=State.INSTALLED, result="ok"),
        queue.enqueue(
            KIND_UPDATE,
            state=State.COMMITTED,
            details={"slot_class": "rootfs", "version": "2.0.0"},
        ),
    ]
    assert [r.seq for r in queued] == [1, 2, 3, 4]
    assert queue.pending() == queued
    hub = FakeHub()
    assert queue.deliver(hub, max_batch=3) == 4
    assert list(hub.stored) == [r.report_id for r in queued]
    assert queue.pending() == [] and len(queue) == 0
    committed = hub.stored[queued[3].report_id]
    assert committed["state"] == "committed"
    assert committed["details"] == {"slot_class": "rootfs", "version": "2.0.0", "seq": 4}
    assert committed["device_time"] == "2026-11-23T19:00:03.000000Z"


def test_report_ids_are_unique_and_files_are_named_by_sequence(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    reports = _fill(queue, 30)
    assert len({r.report_id for r in reports}) == 30
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{n:016d}.json" for n in range(1, 31)]


def test_the_wire_form_has_only_the_gateway_fields() -> None:
    report = Report("r-1", 9, KIND_UPDATE, T0, state=State.FAILED, reason="disk full")
    assert report.to_wire() == {
        "report_id": "r-1",
        "kind": "update",
        "state": "failed",
        "reason": "disk full",
        "details": {"seq": 9},
        "device_time": "2026-11-23T19:00:00.000000Z",
    }


# -- outages and restarts -----------------------------------------------------


def test_an_outage_keeps_everything_in_order_until_the_hub_is_back(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    queued = _fill(queue, 7)
    hub = FakeHub(down=True)
    with pytest.raises(ReportTransportError):
        queue.deliver(hub)
    assert queue.pending() == queued
    hub.down = False
    assert queue.deliver(hub) == 7
    assert list(hub.stored) == [r.report_id for r in queued]


def test_a_failure_midway_stops_delivery_and_keeps_the_rest_in_order(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    queued = _fill(queue, 10)
    hub = FakeHub(accept_batches=2)
    with pytest.raises(ReportTransportError):
        queue.deliver(hub, max_batch=3)
    assert list(hub.stored) == [r.report_id for r in queued[:6]]
    assert queue.pending() == queued[6:]
    hub.accept_batches = None
    queue.deliver(hub, max_batch=3)
    assert list(hub.stored) == [r.report_id for r in queued]
    assert hub.received == list(hub.stored)  # nothing was sent twice


def test_a_restart_finds_the_queue_and_continues_the_sequence(tmp_path: Path) -> None:
    first = _queue(tmp_path)
    queued = _fill(first, 3)
    again = _queue(tmp_path)  # the agent restarted (or the device rebooted)
    assert again.pending() == queued
    hub = FakeHub()
    again.deliver(hub)
    # The spool is empty now; numbers still go on, so order holds across restarts.
    later = _queue(tmp_path).enqueue(KIND_UPDATE, state=State.IDLE)
    assert later.seq == 4


def test_enqueueing_a_step_twice_stores_it_once(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    report_id = step_report_id("u-1", State.COMMITTED)
    first = queue.enqueue(KIND_UPDATE, state=State.COMMITTED, report_id=report_id)
    # Killed after queueing but before saving idle: on resume it is queued again.
    assert queue.enqueue(KIND_UPDATE, state=State.COMMITTED, report_id=report_id) == first
    assert len(queue) == 1
    hub = FakeHub()
    queue.deliver(hub)
    # Already delivered: queued and sent again, and the hub keeps one.
    queue.enqueue(KIND_UPDATE, state=State.COMMITTED, report_id=report_id)
    queue.deliver(hub)
    assert hub.received == [report_id, report_id]
    assert list(hub.stored) == [report_id]


def test_step_report_ids_fit_the_gateway() -> None:
    assert step_report_id("a" * 40, State.ROLLED_BACK, 999) == f"{'a' * 40}.rolled_back.999"
    with pytest.raises(ValueError, match="report id"):
        step_report_id("has space", State.TRIAL)


# -- bad reports and bad files ------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 2, 5])
def test_a_report_the_hub_refuses_is_set_aside_and_the_rest_go_on(
    tmp_path: Path, max_batch: int
) -> None:
    queue = _queue(tmp_path)
    queued = _fill(queue, 5)
    hub = FakeHub(refuse_ids={queued[2].report_id})
    assert queue.deliver(hub, max_batch=max_batch) == 4
    assert list(hub.stored) == [r.report_id for i, r in enumerate(queued) if i != 2]
    (kept,) = (tmp_path / "rejected").glob(f"{queued[2].seq:016d}-*.json")
    assert json.loads(kept.read_bytes())["report_id"] == queued[2].report_id
    assert "refused" in kept.with_suffix(".why").read_text()
    assert len(queue) == 0


def test_a_damaged_spool_file_is_set_aside_not_sent(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    queued = _fill(queue, 3)
    (tmp_path / f"{queued[1].seq:016d}.json").write_bytes(b'{"schema": 1, "report_')
    assert queue.pending() == [queued[0], queued[2]]
    assert len(list((tmp_path / "rejected").glob(f"{queued[1].seq:016d}-*.json"))) == 1


def test_temp_files_left_by_a_kill_are_removed(tmp_path: Path) -> None:
    _fill(_queue(tmp_path), 1)
    leftover = tmp_path / ".0000000000000002.json.tmp-99-0"
    leftover.write_bytes(b'{"half')
    assert len(_queue(tmp_path)) == 1
    assert not leftover.exists()


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"kind": "has space"}, "kind"),
        ({"kind": "k" * 33}, "kind"),
        ({"kind": KIND_UPDATE, "progress": 101}, "progress"),
        ({"kind": KIND_UPDATE, "progress": True}, "progress"),
        ({"kind": KIND_UPDATE, "result": ""}, "result"),
        ({"kind": KIND_UPDATE, "report_id": "a/b"}, "report_id"),
        ({"kind": KIND_UPDATE, "details": {"blob": "x" * MAX_DETAILS_BYTES}}, "bytes"),
        ({"kind": KIND_UPDATE, "details": {"when": T0}}, "JSON"),
    ],
)
def test_what_the_hub_would_refuse_is_refused_when_queued(
    tmp_path: Path, fields: dict[str, Any], problem: str
) -> None:
    queue = _queue(tmp_path)
    kind = fields.pop("kind")
    with pytest.raises(ReportQueueError, match=problem):
        queue.enqueue(kind, **fields)
    assert len(queue) == 0


def test_long_reasons_and_hook_output_are_cut_to_fit(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    output = "début\n" * 2000 + "the last line says why\n" + "\U0001f4a5" * 3000
    report = queue.enqueue(
        KIND_UPDATE,
        state=State.ROLLED_BACK,
        reason="r" * (MAX_REASON_CHARS + 500),
        hook_output=output,
        details={"version": "2.0.0"},
    )
    assert report.reason is not None and len(report.reason) == MAX_REASON_CHARS
    assert report.details is not None
    kept = report.details["hook_output"]
    assert len(json.dumps(kept, separators=(",", ":"))) <= MAX_HOOK_OUTPUT_BYTES
    assert kept.startswith("[...cut]") and output.endswith(kept[len("[...cut] ") :])
    assert report.details["version"] == "2.0.0"
    short = queue.enqueue(KIND_UPDATE, state=State.FAILED, hook_output="ok\n")
    assert short.details == {"hook_output": "ok\n"}
    hub = FakeHub()
    queue.deliver(hub)  # the hub's parser takes them
    assert len(hub.stored) == 2


# -- bounds -------------------------------------------------------------------


def test_over_the_limit_progress_goes_first_then_steps_and_never_final_status(
    tmp_path: Path,
) -> None:
    queue = _queue(tmp_path, max_reports=4)
    failed = queue.enqueue(KIND_UPDATE, state=State.FAILED, reason="disk full")
    step = queue.enqueue(KIND_UPDATE, state=State.DOWNLOADING)
    queue.enqueue(KIND_PROGRESS, state=State.DOWNLOADING, progress=10)  # dropped first
    p2 = queue.enqueue(KIND_PROGRESS, state=State.DOWNLOADING, progress=20)
    p3 = queue.enqueue(KIND_PROGRESS, state=State.DOWNLOADING, progress=30)
    assert queue.pending() == [failed, step, p2, p3]  # oldest progress dropped
    committed = queue.enqueue(KIND_UPDATE, state=State.COMMITTED)
    assert queue.pending() == [failed, step, p3, committed]
    reset = queue.enqueue(KIND_STATE_RESET, state=State.IDLE, reason="state file corrupt")
    assert queue.pending() == [failed, step, committed, reset]
    rolled = queue.enqueue(KIND_UPDATE, state=State.ROLLED_BACK)
    assert queue.pending() == [failed, committed, reset, rolled]  # then the oldest step
    # Only final-status reports left: the queue keeps them all, over its limit.
    more = queue.enqueue(KIND_UPDATE, state=State.FAILED, reason="again")
    assert queue.pending() == [failed, committed, reset, rolled, more]
    hub = FakeHub()
    queue.deliver(hub)
    assert list(hub.stored) == [r.report_id for r in (failed, committed, reset, rolled, more)]


def test_a_long_outage_stays_bounded(tmp_path: Path) -> None:
    queue = _queue(tmp_path, max_reports=20)
    _fill(queue, 100)
    final = queue.enqueue(KIND_UPDATE, state=State.COMMITTED)
    _fill(queue, 100)
    pending = queue.pending()
    assert len(pending) == 20
    assert final in pending
    assert [r.seq for r in pending] == sorted(r.seq for r in pending)
    assert len(os.listdir(tmp_path)) == 20


# -- kills between send and remove --------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, and nothing catches it."""


@dataclass
class DyingHub(FakeHub):
    """Stores the batch, then the agent dies before it hears the answer."""

    die_after: int = 1_000_000

    def send(self, reports: Sequence[Report]) -> None:
        super().send(reports)
        self.die_after -= 1
        if self.die_after <= 0:
            raise Killed


def test_a_kill_after_the_hub_stored_a_batch_resends_it_and_the_hub_keeps_one(
    tmp_path: Path,
) -> None:
    queued = _fill(_queue(tmp_path), 40)
    hub = DyingHub()
    rng = random.Random(7)
    for _ in range(100):
        hub.die_after = rng.randint(1, 3)
        try:
            _queue(tmp_path).deliver(hub, max_batch=4)  # a fresh agent process each time
        except Killed:
            continue
        break
    else:
        pytest.fail("delivery never finished")
    ids = [r.report_id for r in queued]
    assert len(hub.received) > len(ids)  # some batches really were sent twice
    assert set(hub.received) == set(ids)  # at least once
    assert list(dict.fromkeys(hub.received)) == ids  # first arrivals in order
    assert list(hub.stored) == ids  # dedup by id: exactly once, in order
    assert len(_queue(tmp_path)) == 0


DELIVERER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from skylift.agent.reports import ReportQueue

    spool, log = Path(sys.argv[1]), sys.argv[2]

    class LoggingHub:
        def send(self, reports):
            line = " ".join(r.report_id for r in reports) + "\\n"
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    queue = ReportQueue(spool)
    print("ready", flush=True)
    queue.deliver(LoggingHub(), max_batch=3)
    """
)


@pytest.mark.slow
def test_sigkill_at_random_points_of_delivery_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    spool, log = tmp_path / "spool", tmp_path / "hub.log"
    queued = _fill(ReportQueue(spool), 150)
    rng = random.Random(11)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    kills = 0
    for attempt in range(80):
        child = subprocess.Popen(
            [sys.executable, "-c", DELIVERER, str(spool), str(log)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        if attempt < 60:
            time.sleep(rng.uniform(0, 0.003))  # where the kill lands, not an assertion
            child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        kills += child.returncode == -signal.SIGKILL
        if child.returncode == 0:
            break
        assert child.returncode == -signal.SIGKILL
    else:
        pytest.fail("delivery never finished")
    assert kills >= 1
    received = [i for line in log.read_text().splitlines() for i in line.split()]
    ids = [r.report_id for r in queued]
    assert set(received) == set(ids)  # at least once
    assert list(dict.fromkeys(received)) == ids  # dedup by id: exactly once, in order
    assert len(ReportQueue(spool)) == 0
    assert not (spool / "rejected").exists()  # no file was ever torn
