"""The poll path, the hub's hot path: ETags answered from memory, last-seen times in batches.

A device polls every few minutes and almost always hears ``304 Not
Modified``. That answer costs no database work and no object-store read:

- :class:`PollCache` keeps, per device, the ETag and body of its last answer.
  An entry is dropped when the director's assignment for the device changes:
  in this process through :func:`skylift.hub.gateway.invalidate` (called by
  whoever assigns), across processes by the gateway's sync loop, which reads
  ``director_targets.updated`` about every second. Entries also expire after
  :data:`POLL_CACHE_TTL_S` as a safety net for a writer that signals neither.
- :class:`LastSeenBuffer` records each poll's time (and the state the agent
  announces in ``X-Skylift-State``) in memory; a background loop writes them
  all with one batched ``UPDATE`` (executemany) per flush interval.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, func, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from skylift.errors import UserInputError
from skylift.hub.db.models import Device, DeviceState
from skylift.hub.repositories import UnknownRepositoryError
from skylift.hub.web import HubContext

__all__ = [
    "POLL_CACHE_TTL_S",
    "LastSeenBuffer",
    "PollAnswer",
    "PollCache",
    "compute_answer",
    "etag_matches",
    "parse_state",
]

#: Safety net: a cached answer is recomputed after this long whatever happened.
POLL_CACHE_TTL_S = 900.0
_MAX_ENTRIES = 200_000
# Invalidations remembered to refuse a stale answer computed concurrently.
_MAX_INVALIDATIONS = 10_000
_ETAG_CHARS = 24
_MAX_IF_NONE_MATCH = 2048
# A dict lookup: calling the enum on every poll showed in the profile (bench/poll.py).
_STATES = {s.value: s for s in DeviceState}

# Core, not ORM: one executemany UPDATE with bound parameters per flush.
_devices = cast(Table, Device.__table__)


@dataclass(frozen=True)
class PollAnswer:
    """What ``GET /poll`` answers a device while nothing changes: its ETag and 200 body."""

    etag: str
    body: bytes


class PollCache:
    """device id -> last poll answer, bounded, with invalidation that wins every race.

    An answer computed from the store while the assignment changed must not
    be cached: :meth:`begin` returns a sequence number before the answer is
    computed, and :meth:`put` refuses it if the device was invalidated since.
    """

    def __init__(
        self,
        *,
        ttl_s: float = POLL_CACHE_TTL_S,
        max_entries: int = _MAX_ENTRIES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[PollAnswer, float]] = OrderedDict()
        self._seq = 0
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        # Invalidations older than those remembered happened at or before this.
        self._floor = 0

    def get(self, device_id: str) -> PollAnswer | None:
        """The cached answer for ``device_id``, if there is a fresh one."""
        with self._lock:
            hit = self._entries.get(device_id)
            if hit is None:
                return None
            answer, at = hit
            if self._monotonic() - at > self._ttl_s:
                del self._entries[device_id]
                return None
            return answer

    def begin(self) -> int:
        """A sequence number to pass to :meth:`put` after computing an answer."""
        with self._lock:
            return self._seq

    def put(self, device_id: str, answer: PollAnswer, started: int) -> bool:
        """Cache ``answer`` unless ``device_id`` was invalidated after ``started``."""
        with self._lock:
            last = self._invalidated.get(device_id, self._floor)
            if last > started:
                return False
            self._entries[device_id] = (answer, self._monotonic())
            self._entries.move_to_end(device_id)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
            return True

    def invalidate(self, device_id: str) -> None:
        """Forget ``device_id``'s answer; the next poll recomputes it."""
        with self._lock:
            self._seq += 1
            self._entries.pop(device_id, None)
            self._invalidated[device_id] = self._seq
            self._invalidated.move_to_end(device_id)
            while len(self._invalidated) > _MAX_INVALIDATIONS:
                _, seq = self._invalidated.popitem(last=False)
                self._floor = max(self._floor, seq)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def compute_answer(ctx: HubContext, device_id: str) -> PollAnswer:
    """The poll answer for ``device_id`` from the director repository. Blocking.

    The ETag covers the director's timestamp (re-signed on every change of
    the device's targets), the assigned target, the revoked flag and the poll
    interval: whatever the device would act on.

    Raises:
        RepositoryError: the stored director repository does not verify.
    """
    target = ctx.director.assigned(device_id)
    try:
        timestamp = hashlib.sha256(ctx.director.read(device_id, "metadata/timestamp.json"))
        marker = timestamp.hexdigest()
    except UnknownRepositoryError:
        marker = "none"
    interval = ctx.config.poll_interval_s
    update_doc = None
    if target is not None:
        update_doc = {"version": target.custom.get("version"), "target": target.path}
    key = json.dumps(
        [
            marker,
            target.path if target else None,
            target.hashes if target else None,
            False,
            interval,
        ],
        sort_keys=True,
    )
    etag = hashlib.sha256(key.encode()).hexdigest()[:_ETAG_CHARS]
    body = json.dumps(
        {"etag": etag, "poll_interval_s": interval, "update": update_doc}, separators=(",", ":")
    ).encode()
    return PollAnswer(etag, body)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if not if_none_match or len(if_none_match) > _MAX_IF_NONE_MATCH:
        return False
    for candidate in if_none_match.split(","):
        value = candidate.strip()
        if value == "*":
            return True
        value = value.removeprefix("W/").strip('"')
        if value == etag:
            return True
    return False


def parse_state(value: str | None) -> DeviceState | None:
    """The agent state of an ``X-Skylift-State`` header.

    Raises:
        UserInputError: not one of the agent's states.
    """
    if value is None:
        return None
    state = _STATES.get(value) or _STATES.get(value.strip())
    if state is None:
        names = ", ".join(s.value for s in DeviceState)
        raise UserInputError(f"X-Skylift-State {value[:32]!r} is not an agent state ({names})")
    return state


class LastSeenBuffer:
    """Poll times and announced states, kept in memory and written in one batch per flush."""

    def __init__(self, *, max_pending: int = 1_000_000) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[datetime, DeviceState | None]] = {}
        self._max_pending = max_pending
        #: Flushes that wrote something; the count tests and metrics read.
        self.flushes = 0

    def record(self, device_pk: int, when: datetime, state: DeviceState | None) -> None:
        """Note that device row ``device_pk`` polled at ``when`` (in memory only)."""
        with self._lock:
            prev = self._pending.get(device_pk)
            if prev is None and len(self._pending) >= self._max_pending:
                return  # bounded: a device missed now is recorded on its next poll
            if state is None and prev is not None:
                state = prev[1]
            self._pending[device_pk] = (when, state)

    def pending(self) -> int:
        """How many devices wait for the next flush."""
        with self._lock:
            return len(self._pending)

    def flush(self, sessions: sessionmaker[Session]) -> int:
        """Write every pending last-seen time in one UPDATE (executemany); how many rows.

        On a database error the times are put back for the next flush (a newer
        poll recorded meanwhile wins) and the error is raised.

        Raises:
            SQLAlchemyError: the database refused the batch.
        """
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        # Sorted by primary key: two hub processes flushing at once lock rows
        # in the same order and cannot deadlock each other.
        params = [
            {"b_id": pk, "b_seen": when, "b_state": state}
            for pk, (when, state) in sorted(batch.items())
        ]
        statement = (
            update(_devices)
            .where(_devices.c.id == bindparam("b_id"))
            .values(
                last_seen=bindparam("b_seen"),
                state=func.coalesce(
                    bindparam("b_state", type_=_devices.c.state.type), _devices.c.state
                ),
            )
        )
        try:
            with sessions.begin() as session:
                session.execute(statement, params)
        except SQLAlchemyError:
            with self._lock:
                for pk, item in batch.items():
                    newer = self._pending.get(pk)
                    if newer is None or newer[0] < item[0]:
                        self._pending[pk] = item
            raise
        self.flushes += 1
        return len(batch)
