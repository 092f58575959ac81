"""``GET /device/v1/poll``: 304 from memory, a new answer when the director changes, batched last-seen."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, select, update

from skylift.hub.db.models import Device, DeviceState, DirectorTargets
from skylift.hub.gateway import invalidate

from .conftest import PRODUCT, VERSION, Enrolled, Hub


def _target(hub: Hub) -> Any:
    return hub.ctx.images.load(PRODUCT).target_files[f"{VERSION}.head"]


@contextmanager
def _statements(hub: Hub) -> Iterator[list[tuple[str, bool, int]]]:
    """Every statement the hub's engine runs meanwhile: (SQL, executemany, parameter sets)."""
    seen: list[tuple[str, bool, int]] = []

    def listener(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        seen.append((statement, many, len(params) if many else 1))

    event.listen(hub.engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(hub.engine, "before_cursor_execute", listener)


def _writes(statements: list[tuple[str, bool, int]]) -> list[tuple[str, bool, int]]:
    return [
        s for s in statements if s[0].lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE"))
    ]


def test_poll_answers_304_until_the_director_assigns(hub: Hub) -> None:
    device = hub.enroll()
    client = hub.client(device)
    first = client.get("/poll")
    assert first.status_code == 200
    body = first.json()
    assert body == {
        "etag": body["etag"],
        "poll_interval_s": hub.ctx.config.poll_interval_s,
        "update": None,
    }
    assert first.headers["etag"] == f'"{body["etag"]}"'
    same = client.get("/poll", headers={"If-None-Match": first.headers["etag"]})
    assert same.status_code == 304
    assert same.content == b""
    assert same.headers["etag"] == first.headers["etag"]
    assert client.get("/poll", headers={"If-None-Match": '"something-else"'}).status_code == 200

    assert hub.ctx.director.assign(device.device_id, _target(hub))
    # Cached: without a signal the answer is the old one, from memory.
    assert client.get("/poll", headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    invalidate(device.device_id)
    changed = client.get("/poll", headers={"If-None-Match": first.headers["etag"]})
    assert changed.status_code == 200
    assert changed.json()["update"] == {"version": VERSION, "target": f"{VERSION}.head"}
    assert changed.json()["etag"] != body["etag"]
    again = client.get("/poll", headers={"If-None-Match": f"W/{changed.headers['etag']}"})
    assert again.status_code == 304


def test_another_process_assigning_is_seen_within_a_second(hub: Hub) -> None:
    """The director_targets row is the cross-process signal; no invalidate() in this process."""
    device = hub.enroll()
    client = hub.client(device)
    etag = client.get("/poll").headers["etag"]
    hub.ctx.director.assign(device.device_id, _target(hub))
    row = hub.device_row(device.device_id)
    with hub.ctx.sessions.begin() as session:
        session.add(
            DirectorTargets(
                device_id=row.id, version=2, signed_targets=b"{}",
                expires=datetime.now(UTC) + timedelta(days=1), updated=datetime.now(UTC),
            )
        )  # fmt: skip
    start = time.monotonic()
    status = 304
    while status == 304 and time.monotonic() - start < 5:
        answer = client.get("/poll", headers={"If-None-Match": etag})
        status = answer.status_code
        time.sleep(0.05)
    assert status == 200
    assert answer.json()["update"]["version"] == VERSION
    assert time.monotonic() - start < 2.5  # the sync loop runs about every second


def test_polls_write_nothing_and_a_flush_writes_one_batched_update(hub: Hub) -> None:
    devices = [hub.enroll() for _ in range(3)]
    clients = [hub.client(d) for d in devices]
    etags = [c.get("/poll").headers["etag"] for c in clients]
    hub.state.flush_last_seen()  # start from nothing pending
    started = datetime.now(UTC)
    with _statements(hub) as statements:
        for _ in range(5):
            for client, etag in zip(clients, etags, strict=True):
                answer = client.get(
                    "/poll", headers={"If-None-Match": etag, "X-Skylift-State": "idle"}
                )
                assert answer.status_code == 304
    assert _writes(statements) == []  # 15 polls, no database write
    for d in devices:
        assert (
            hub.device_row(d.device_id).last_seen is None
            or hub.device_row(d.device_id).last_seen < started
        )

    with _statements(hub) as statements:
        assert hub.state.flush_last_seen() >= 3
    writes = _writes(statements)
    assert len(writes) == 1, writes  # one UPDATE for the whole batch
    sql, many, rows = writes[0]
    assert sql.lstrip().upper().startswith("UPDATE DEVICES")
    assert many and rows >= 3
    for d in devices:
        seen = hub.device_row(d.device_id).last_seen
        assert seen is not None and seen >= started - timedelta(seconds=1)
    with _statements(hub) as statements:
        assert hub.state.flush_last_seen() == 0  # nothing pending: no statement at all
    assert _writes(statements) == []


def test_announced_state_is_recorded_with_last_seen(hub: Hub) -> None:
    device = hub.enroll()
    client = hub.client(device)
    assert client.get("/poll", headers={"X-Skylift-State": "downloading"}).status_code == 200
    assert client.get("/poll").status_code == 200  # no header: the last state announced stays
    hub.state.flush_last_seen()
    row = hub.device_row(device.device_id)
    assert row.state is DeviceState.DOWNLOADING
    assert row.last_seen is not None


def test_a_bad_state_header_is_refused_and_not_recorded(hub: Hub, device: Enrolled) -> None:
    client = hub.client(device)
    before = hub.snapshot()
    answer = client.get("/poll", headers={"X-Skylift-State": "hacking"})
    assert answer.status_code == 400
    assert "X-Skylift-State" in answer.json()["error"]
    assert hub.state.last_seen.pending() == 0
    assert hub.snapshot() == before


def test_the_background_loop_flushes_last_seen(hub: Hub) -> None:
    device = hub.enroll()
    client = hub.client(device)
    undo = hub.set_config(last_seen_flush_s=0.2)
    try:
        assert client.get("/poll").status_code == 200
        deadline = time.monotonic() + 5
        while hub.device_row(device.device_id).last_seen is None:
            assert time.monotonic() < deadline, "last_seen was never flushed"
            time.sleep(0.05)
    finally:
        undo()


def test_a_revoked_device_gets_no_cached_answer(hub: Hub) -> None:
    device = hub.enroll()
    client = hub.client(device)
    etag = client.get("/poll").headers["etag"]
    assert client.get("/poll", headers={"If-None-Match": etag}).status_code == 304
    with hub.ctx.sessions.begin() as session:
        session.execute(
            update(Device)
            .where(Device.device_id == device.device_id)
            .values(revoked=True, revoked_at=datetime.now(UTC))
        )
    hub.state.sync()  # what the loop does about every second (timed in test_security)
    answer = client.get("/poll", headers={"If-None-Match": etag})
    assert answer.status_code == 403
    assert "revoked" in answer.json()["error"]
    with hub.ctx.sessions() as session:
        assert session.scalar(select(Device.revoked).where(Device.device_id == device.device_id))
