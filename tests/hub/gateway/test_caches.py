"""The gateway's memory: poll answers, identities and last-seen times stay true to the database."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from skylift.hub.auth import Forbidden
from skylift.hub.db.models import Device, DeviceState
from skylift.hub.gateway.identity import MAX_STALE_S, REVALIDATE_S, Identities
from skylift.hub.gateway.poll import LastSeenBuffer, PollAnswer, PollCache, etag_matches

from .conftest import Hub

NO_SUCH_ROW = 2**31 - 1


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_answer_computed_across_an_invalidation_is_not_cached() -> None:
    cache = PollCache()
    started = cache.begin()
    cache.invalidate("dev-1")  # the director changed while the old answer was being read
    assert not cache.put("dev-1", PollAnswer("old", b"{}"), started)
    assert cache.get("dev-1") is None
    started = cache.begin()
    assert cache.put("dev-1", PollAnswer("new", b"{}"), started)
    assert cache.get("dev-1") == PollAnswer("new", b"{}")
    cache.invalidate("dev-2")  # another device's change does not matter
    assert cache.get("dev-1") is not None


def test_poll_answers_expire_and_stay_bounded() -> None:
    clock = FakeMonotonic()
    cache = PollCache(ttl_s=60, max_entries=2, monotonic=clock)
    for name in ("a", "b", "c"):
        cache.put(name, PollAnswer(name, b""), cache.begin())
    assert cache.get("a") is None and len(cache) == 2
    clock.now += 61
    assert cache.get("b") is None


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ('"abc"', True),
        ('W/"abc"', True),
        ('"x", "abc"', True),
        ("*", True),
        ('"abcd"', False),
        (None, False),
        ("", False),
        ('"abc"' + " " * 3000, False),
    ],
)
def test_if_none_match(header: str | None, matches: bool) -> None:
    assert etag_matches(header, "abc") is matches


def test_a_failed_flush_keeps_the_times_for_the_next(hub: Hub) -> None:
    buffer = LastSeenBuffer()
    t0 = datetime.now(UTC)
    buffer.record(NO_SUCH_ROW, t0, DeviceState.IDLE)

    class Broken:
        def begin(self) -> Session:
            raise OperationalError("UPDATE", {}, Exception("database is gone"))

    with pytest.raises(OperationalError):
        buffer.flush(Broken())  # type: ignore[arg-type]
    assert buffer.pending() == 1
    buffer.record(NO_SUCH_ROW, t0 + timedelta(seconds=1), None)  # newer, no state: state stays
    device = hub.enroll()
    pk = hub.device_row(device.device_id).id
    buffer.record(pk, t0 + timedelta(seconds=2), DeviceState.TRIAL)
    sessions: sessionmaker[Session] = hub.ctx.sessions
    assert buffer.flush(sessions) == 2  # a row gone meanwhile is simply not updated
    assert hub.device_row(device.device_id).state is DeviceState.TRIAL


def test_a_deleted_device_is_dropped_by_the_sweep(hub: Hub) -> None:
    device = hub.enroll()
    der = ssl.PEM_cert_to_DER_cert(device.cert.read_text())
    clock = FakeMonotonic()
    identities = Identities(hub.ctx, monotonic=clock)
    ref = identities.resolve(der, hardware=None, product=None)
    assert identities.lookup(der) == ref
    with hub.ctx.sessions.begin() as session:
        session.execute(delete(Device).where(Device.device_id == device.device_id))
    assert identities.lookup(der) == ref  # memory, until the sweep looks
    clock.now += REVALIDATE_S + 1
    with hub.ctx.sessions() as session:
        assert identities.sync(session) == {device.device_id}
    assert identities.lookup(der) is None
    with pytest.raises(Forbidden, match="not registered"):
        identities.resolve(der, hardware=None, product=None)


def test_an_identity_the_sweep_did_not_reach_is_checked_again(hub: Hub) -> None:
    device = hub.enroll()
    der = ssl.PEM_cert_to_DER_cert(device.cert.read_text())
    clock = FakeMonotonic()
    identities = Identities(hub.ctx, monotonic=clock)
    identities.resolve(der, hardware=None, product=None)
    clock.now += MAX_STALE_S + 1
    assert identities.lookup(der) is None  # stale: resolved from the database again
    with hub.ctx.sessions() as session:
        assert (
            session.scalar(select(Device.revoked).where(Device.device_id == device.device_id))
            is False
        )
