"""The gateway's per-process state: caches, buffers, and the loops that keep them true.

One :class:`GatewayState` per :class:`~skylift.hub.web.HubContext` (in
``ctx.extra``), registered process-wide so that any module can call
:func:`invalidate` without holding the context. Hub processes share nothing
but the database and the object store; what one process caches, another
learns about through :meth:`GatewayState.sync`, which a background loop runs
every :data:`SYNC_INTERVAL_S`:

- revocations and signer CAs (``Identities.sync``): a device revoked by any
  process is refused by this one within about a second;
- director assignments: ``director_targets.updated`` newer than the last look
  drops the device's cached poll answer.

The other loop writes the batched last-seen times every
``ctx.config.last_seen_flush_s`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from skylift.hub import web
from skylift.hub.db.models import Device, DirectorTargets, Release
from skylift.hub.gateway.identity import REVOCATION_WINDOW_S, Identities
from skylift.hub.gateway.poll import LastSeenBuffer, PollCache
from skylift.hub.web import HubContext

__all__ = ["SYNC_INTERVAL_S", "GatewayState", "invalidate", "state_for"]

log = logging.getLogger("skylift.hub.gateway")

#: How often each process re-reads revocations, signer CAs and director changes.
SYNC_INTERVAL_S = 1.0
#: The flush loop wakes this often to see whether a flush is due (the interval
#: is read from the configuration each time, so it can change at run time).
_FLUSH_TICK_S = 0.25
# Even a zero interval in the configuration must not spin the event loop.
_MIN_FLUSH_TICK_S = 0.05
# Log a failing loop at most this often: one line a second would drown the log.
_LOG_EVERY_S = 60.0
_MAX_RELEASES = 10_000
_EXTRA_KEY = "skylift.gateway.state"

_STATES: weakref.WeakSet[GatewayState] = weakref.WeakSet()
_STATES_LOCK = threading.Lock()


class GatewayState:
    """Everything the gateway keeps in memory for one hub context."""

    def __init__(self, ctx: HubContext) -> None:
        self.ctx = ctx
        self.identities = Identities(ctx)
        self.polls = PollCache()
        self.last_seen = LastSeenBuffer()
        self._lock = threading.Lock()
        # One sync at a time: the loop's, or one a caller runs by hand.
        self._sync_lock = threading.Lock()
        # (product id, version) of releases known to exist: they are never deleted.
        self._releases: OrderedDict[tuple[int, str], None] = OrderedDict()
        self._director_seen: dict[str, datetime] = {}
        self._last_flush = time.monotonic()
        self._last_error_log = 0.0

    # ------------------------------------------------------------------ for other modules

    def invalidate(self, device_id: str) -> None:
        """Drop what this process caches about ``device_id`` (poll answer and identity)."""
        self.polls.invalidate(device_id)
        self.identities.forget(device_id)

    def release_exists(self, product_id: int, version: str) -> bool:
        """Whether product ``product_id`` has release ``version``. Blocking on a cache miss.

        Raises:
            SQLAlchemyError: the database failed.
        """
        key = (product_id, version)
        with self._lock:
            if key in self._releases:
                return True
        with self.ctx.sessions() as session:
            found = session.scalar(
                select(Release.id).where(
                    Release.product_id == product_id, Release.version == version
                )
            )
        if found is None:
            return False
        with self._lock:
            self._releases[key] = None
            while len(self._releases) > _MAX_RELEASES:
                self._releases.popitem(last=False)
        return True

    # ------------------------------------------------------------------ sync and flush

    def sync(self) -> None:
        """One round of cross-process refresh (see the module docstring). Blocking.

        Raises:
            SQLAlchemyError: the database failed (the loop logs it and tries again).
        """
        with self._sync_lock, self.ctx.sessions() as session:
            for device_id in self.identities.sync(session):
                self.polls.invalidate(device_id)
            self._sync_director(session)

    def _sync_director(self, session: Session) -> None:
        since = self.ctx.clock() - timedelta(seconds=REVOCATION_WINDOW_S)
        rows = session.execute(
            select(Device.device_id, DirectorTargets.updated)
            .join(Device, Device.id == DirectorTargets.device_id)
            .where(DirectorTargets.updated >= since)
        ).all()
        for device_id, updated in rows:
            if self._director_seen.get(device_id) != updated:
                self._director_seen[device_id] = updated
                self.polls.invalidate(device_id)
        self._director_seen = {d: u for d, u in self._director_seen.items() if u >= since}

    def flush_last_seen(self) -> int:
        """Write the pending last-seen times now; how many devices. Blocking.

        Raises:
            SQLAlchemyError: the database refused the batch (kept for the next flush).
        """
        self._last_flush = time.monotonic()
        return self.last_seen.flush(self.ctx.sessions)

    async def sync_loop(self) -> None:
        """Run :meth:`sync` every :data:`SYNC_INTERVAL_S` for the life of the process."""
        while True:
            await self._guarded(self.sync, "gateway sync")
            await asyncio.sleep(SYNC_INTERVAL_S)

    async def flush_loop(self) -> None:
        """Flush last-seen times every ``last_seen_flush_s``; a last flush on shutdown."""
        try:
            while True:
                flush_s = self.ctx.config.last_seen_flush_s
                await asyncio.sleep(max(_MIN_FLUSH_TICK_S, min(_FLUSH_TICK_S, flush_s)))
                due = time.monotonic() - self._last_flush >= self.ctx.config.last_seen_flush_s
                if due:
                    await self._guarded(self.flush_last_seen, "last-seen flush")
        finally:
            # Cancelled at shutdown: what is pending would be lost otherwise.
            # shield: the cancellation must not interrupt the write half-way.
            if self.last_seen.pending():
                with contextlib.suppress(Exception):
                    await asyncio.shield(web.run(self.last_seen.flush, self.ctx.sessions))

    async def _guarded(self, fn: Callable[[], object], what: str) -> None:
        try:
            await web.run(fn)
        except Exception as e:
            # A loop that dies silently would leave revocations unread: log and go on.
            now = time.monotonic()
            if now - self._last_error_log >= _LOG_EVERY_S:
                self._last_error_log = now
                log.warning("%s failed (retrying): %s", what, str(e).splitlines()[0][:200])

    def loops(self) -> list[Callable[[], Awaitable[None]]]:
        """The background loops for ``app.py``."""
        return [self.sync_loop, self.flush_loop]


def state_for(ctx: HubContext) -> GatewayState:
    """The gateway state of ``ctx``, made on first use."""
    with _STATES_LOCK:
        state = ctx.extra.get(_EXTRA_KEY)
        if not isinstance(state, GatewayState):
            state = GatewayState(ctx)
            ctx.extra[_EXTRA_KEY] = state
            _STATES.add(state)
        return state


def invalidate(device_id: str) -> None:
    """Tell every gateway in this process that ``device_id`` changed.

    Call it after changing what the director assigns to a device, revoking
    or deleting it: its next poll is answered afresh, its next request checked
    in full. Other hub processes learn the same within about a second from
    the database (``director_targets.updated``, ``devices.revoked_at``).
    """
    with _STATES_LOCK:
        states = list(_STATES)
    for state in states:
        state.invalidate(device_id)
