"""The persisted state: round trip, strict reading, recovery, and no torn write under SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from skylift.agent.errors import AgentStateError, InvalidTransitionError, StateFileError
from skylift.agent.machine import Event, Side, State, resume
from skylift.agent.reports import KIND_STATE_RESET, ReportQueue
from skylift.agent.statefile import (
    MAX_STATE_BYTES,
    STATE_FILE_NAME,
    Release,
    StateRecord,
    StateStore,
    decode_state,
    encode_state,
    open_state,
)
from skylift.errors import SkyliftError

T0 = datetime(2026, 11, 23, 19, 0, 0, 123456, tzinfo=UTC)
RELEASE = Release(
    product="gizmo",
    version="2.0.0",
    target="gizmo-2.0.0.bundle",
    sha256="ab" * 32,
    length=123_456_789,
)


def _in_trial() -> StateRecord:
    return StateRecord(
        state=State.TRIAL,
        generation=7,
        update_id="u-0123456789abcdef",
        deployment_id="dep-42",
        release=RELEASE,
        target_slot="B",
        previous_slot="A",
        previous_version="1.9.0",
        resumes=2,
        reboots=1,
        progress=100,
        reason=None,
        boot_id="3c1d0a5e-8f7b-4a51-9e0c-1f1e2d3c4b5a",
        entered_at=T0,
        updated_at=T0 + timedelta(seconds=5),
        started_at=T0 - timedelta(minutes=10),
        extra={"hook": "post_install"},
    )


def _doc(record: StateRecord) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(encode_state(record))
    return doc


def _bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# -- encoding -----------------------------------------------------------------


def test_round_trip_is_exact_and_canonical() -> None:
    record = _in_trial()
    data = encode_state(record)
    assert decode_state(data) == record
    assert encode_state(decode_state(data)) == data
    doc = json.loads(data)
    assert list(doc) == sorted(doc)
    assert b" " not in data and b"\n" not in data
    assert (doc["format"], doc["schema"]) == ("skylift-agent-state", 1)
    assert doc["entered_at"] == "2026-11-23T19:00:00.123456Z"


def test_idle_round_trips() -> None:
    assert decode_state(encode_state(StateRecord())) == StateRecord()


def test_a_naive_time_is_refused_on_encode() -> None:
    with pytest.raises(AgentStateError):
        encode_state(StateRecord(entered_at=datetime(2026, 1, 1)))


# Each case: a change to a valid document that must make it unusable.
BAD_DOCS: list[tuple[str, Any]] = [
    ("wrong schema", lambda d: d | {"schema": 2}),
    ("schema as text", lambda d: d | {"schema": "1"}),
    ("schema as bool", lambda d: d | {"schema": True}),
    ("no schema", lambda d: {k: v for k, v in d.items() if k != "schema"}),
    ("wrong format", lambda d: d | {"format": "something-else"}),
    ("unknown key", lambda d: d | {"surprise": 1}),
    ("missing key", lambda d: {k: v for k, v in d.items() if k != "resumes"}),
    ("unknown state", lambda d: d | {"state": "dancing"}),
    ("bool counter", lambda d: d | {"resumes": True}),
    ("negative counter", lambda d: d | {"reboots": -1}),
    ("progress over 100", lambda d: d | {"progress": 101}),
    ("progress as float", lambda d: d | {"progress": 50.0}),
    ("upper-case digest", lambda d: d | {"release": d["release"] | {"sha256": "AB" * 32}}),
    ("short digest", lambda d: d | {"release": d["release"] | {"sha256": "ab" * 31}}),
    ("negative length", lambda d: d | {"release": d["release"] | {"length": -1}}),
    ("release extra key", lambda d: d | {"release": d["release"] | {"x": 1}}),
    ("release not an object", lambda d: d | {"release": "gizmo-2.0.0"}),
    ("slot with a slash", lambda d: d | {"target_slot": "../B"}),
    ("long update id", lambda d: d | {"update_id": "u" * 41}),
    ("time without Z", lambda d: d | {"entered_at": "2026-11-23T19:00:00+01:00"}),
    ("time as number", lambda d: d | {"updated_at": 1_700_000_000}),
    ("reason too long", lambda d: d | {"reason": "x" * 2001}),
    ("extra not strings", lambda d: d | {"extra": {"a": 1}}),
    ("trial without release", lambda d: d | {"release": None}),
    ("trial without target slot", lambda d: d | {"target_slot": None}),
    ("idle naming an update", lambda d: d | {"state": "idle"}),
    ("not an object", lambda d: [d]),
]


@pytest.mark.parametrize(("name", "change"), BAD_DOCS, ids=[c[0] for c in BAD_DOCS])
def test_an_invalid_document_is_a_state_file_error(name: str, change: Any) -> None:
    data = _bytes(change(_doc(_in_trial())))
    with pytest.raises(StateFileError) as caught:
        decode_state(data)
    assert isinstance(caught.value, SkyliftError)
    assert "state file" in caught.value.diagnostics()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty", b""),
        ("not JSON", b"\x00\x01garbage"),
        ("not UTF-8", b'{"format": "\xff"}'),
        ("trailing bytes", encode_state(StateRecord()) + b"x"),
        ("two documents", encode_state(StateRecord()) * 2),
        ("deep nesting", b"[" * 100_000),
        ("oversize", b" " * (MAX_STATE_BYTES + 1)),
    ],
)
def test_damaged_bytes_are_a_state_file_error(name: str, data: bytes) -> None:
    with pytest.raises(StateFileError):
        decode_state(data)


def test_every_truncation_is_a_state_file_error() -> None:
    data = encode_state(_in_trial())
    for cut in range(len(data)):
        with pytest.raises(StateFileError):
            decode_state(data[:cut])


# -- the record's own steps ---------------------------------------------------


def test_advancing_follows_the_table_and_resets_the_loop_guard() -> None:
    record = _in_trial()
    committed = record.advanced(Event.HEALTH_OK, now=T0 + timedelta(minutes=1))
    assert committed.state is State.COMMITTED
    assert (committed.resumes, committed.progress, committed.entered_at) == (
        0,
        None,
        T0 + timedelta(minutes=1),
    )
    assert committed.release == RELEASE and committed.target_slot == "B"
    idle = committed.advanced(Event.REPORTED, now=T0 + timedelta(minutes=2))
    assert idle.state is State.IDLE
    assert (idle.release, idle.update_id, idle.target_slot, idle.reason) == (None,) * 4
    assert idle.generation == record.generation  # saving bumps it, not the step
    with pytest.raises(InvalidTransitionError):
        idle.advanced(Event.HEALTH_OK, now=T0)


def test_progress_resets_the_loop_guard_only_when_it_moves() -> None:
    record = replace(_in_trial(), state=State.DOWNLOADING, progress=40, resumes=3)
    assert record.with_progress(41, now=T0).resumes == 0
    assert record.with_progress(40, now=T0).resumes == 3
    with pytest.raises(ValueError, match="percentage"):
        record.with_progress(101, now=T0)


def test_resumed_records_the_decision_and_the_boot() -> None:
    record = replace(_in_trial(), state=State.REBOOTING, boot_id="boot-1", resumes=1)
    decision = resume(State.REBOOTING, Side.OLD, rebooted=True, resumes=record.resumes)
    after = record.resumed(decision, now=T0, boot_id="boot-2")
    assert after.state is State.ROLLED_BACK
    assert after.boot_id == "boot-2" and after.resumes == 0
    assert after.reason is not None and "fell back" in after.reason
    stay = resume(State.TRIAL, Side.NEW, rebooted=False, resumes=2)
    assert _in_trial().resumed(stay, now=T0, boot_id="boot-3").resumes == 3


# -- the store ----------------------------------------------------------------


def test_save_and_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load() is None
    saved = store.save(_in_trial())
    assert saved.generation == _in_trial().generation + 1
    assert store.load() == saved
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE_NAME]  # no temp file left


def test_a_failed_save_leaves_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    old = store.save(StateRecord())

    def disk_full(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("skylift.agent.statefile.atomic_write", disk_full)
    with pytest.raises(StateFileError, match="No space left"):
        store.save(_in_trial())
    assert store.load() == old


def test_an_oversize_file_is_refused_unread(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(b"{" + b" " * MAX_STATE_BYTES)
    with pytest.raises(StateFileError, match="larger than"):
        store.load()


# -- recovery -----------------------------------------------------------------


def _recover(tmp_path: Path, bad: bytes) -> tuple[Any, ReportQueue, StateStore]:
    store = StateStore(tmp_path / "state")
    store.path.parent.mkdir()
    store.path.write_bytes(bad)
    queue = ReportQueue(tmp_path / "reports")
    opened = open_state(store, queue, clock=lambda: T0)
    return opened, queue, store


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        encode_state(_in_trial())[:-10],
        _bytes(_doc(_in_trial()) | {"schema": 99}),
        b"\xff" * (MAX_STATE_BYTES + 10),
    ],
    ids=["empty", "truncated", "wrong schema", "oversize"],
)
def test_a_bad_state_file_is_kept_aside_reported_and_the_agent_starts_idle(
    tmp_path: Path, bad: bytes
) -> None:
    opened, queue, store = _recover(tmp_path, bad)
    assert opened.recovered
    assert opened.record.state is State.IDLE
    assert store.load() == opened.record  # the fresh idle record is on disk
    assert opened.kept_as is not None
    assert opened.kept_as.name == "state.json.corrupt-20261123T190000Z"
    assert opened.kept_as.read_bytes() == bad
    (report,) = queue.pending()
    assert (report.kind, report.state) == (KIND_STATE_RESET, State.IDLE)
    assert report.reason is not None
    assert "state file" in report.reason and opened.kept_as.name in report.reason
    assert report.final  # never dropped from a full queue


def test_recovery_killed_before_the_rename_queues_the_report_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Killed(BaseException):
        pass

    def die(self: StateStore, kept: Path) -> Path:
        raise Killed

    store = StateStore(tmp_path / "state")
    store.path.parent.mkdir()
    store.path.write_bytes(b"{broken")
    queue = ReportQueue(tmp_path / "reports")
    with monkeypatch.context() as patch:
        patch.setattr(StateStore, "set_aside", die)
        with pytest.raises(Killed):
            open_state(store, queue, clock=lambda: T0)
    assert len(queue) == 1
    opened = open_state(store, ReportQueue(tmp_path / "reports"), clock=lambda: T0)
    assert opened.recovered
    assert len(queue) == 1  # the same incident, the same report id: queued once


def test_two_incidents_make_two_reports(tmp_path: Path) -> None:
    opened, queue, store = _recover(tmp_path, b"{broken")
    store.path.write_bytes(b"{broken again")
    later = open_state(store, queue, clock=lambda: T0)
    assert later.recovered and later.kept_as != opened.kept_as
    assert len(queue) == 2


def test_no_file_is_a_fresh_idle_record_without_a_report(tmp_path: Path) -> None:
    queue = ReportQueue(tmp_path / "reports")
    opened = open_state(StateStore(tmp_path / "state"), queue, clock=lambda: T0)
    assert not opened.recovered
    assert opened.record.state is State.IDLE and opened.record.entered_at == T0
    assert len(queue) == 0


def test_a_good_file_is_loaded_and_temp_files_are_cleared(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    saved = store.save(_in_trial())
    leftover = tmp_path / f".{STATE_FILE_NAME}.tmp-123-0"
    leftover.write_bytes(b'{"half')
    opened = open_state(store, ReportQueue(tmp_path / "reports"), clock=lambda: T0)
    assert opened.record == saved and not opened.recovered
    assert not leftover.exists()


# -- no torn write under SIGKILL ----------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from dataclasses import replace
    from pathlib import Path
    from skylift.agent.statefile import StateRecord, StateStore

    store = StateStore(Path(sys.argv[1]))
    record = store.load() or StateRecord()
    print("ready", flush=True)
    while True:
        # Sizes and contents change with the generation: a mix of two records would show.
        g = record.generation
        record = store.save(replace(record, reason="x" * (g * 37 % 3000 % 2000), progress=g % 101))
    """
)


@pytest.mark.slow
def test_sigkill_while_saving_never_leaves_a_broken_state(tmp_path: Path) -> None:
    rng = random.Random(20261123)
    store = StateStore(tmp_path)
    last = 0
    advanced = 0
    for _ in range(100):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0, 0.004))  # where the kill lands, not an assertion
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        record = store.load()  # raises on a torn or partial file
        if record is None:
            assert last == 0
            continue
        g = record.generation - 1
        assert record.reason == "x" * (g * 37 % 3000 % 2000)
        assert record.progress == g % 101
        assert record.generation >= last
        advanced += record.generation > last
        last = record.generation
    assert advanced > 0  # the kills did land among saves
