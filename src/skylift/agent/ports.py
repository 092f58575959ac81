"""The ports the agent's updater drives: what it needs from the hub, as one Protocol.

The updater (:mod:`skylift.agent.updater`) decides what to do; an
implementation of :class:`HubPort` does the network I/O:
:mod:`skylift.agent.hubclient` over mutual TLS against a real hub, and the
tests' simulators in memory. Keeping the port small keeps the updater
testable with every fault the network can produce.

Errors, by source (the updater reacts differently to each):

- :class:`HubUnreachableError`: transport (refused, timeout, TLS, 5xx). Retry
  later with back-off; nothing about the update is decided.
- :class:`UpdateRefusedError`: the hub's answer is untrustworthy or not for
  this device (signatures, expired metadata, hashes that disagree between
  the director and the image repository, other hardware, an older version,
  an oversized answer). The reason goes into the report; the running system
  is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from skylift.agent.plan import ByteRange
from skylift.agent.reports import Report
from skylift.errors import SkyliftError

__all__ = [
    "DeltaOffer",
    "HubPort",
    "HubUnreachableError",
    "Offer",
    "PayloadOffer",
    "PollAnswer",
    "UpdateRefusedError",
]


class HubUnreachableError(SkyliftError):
    """The hub could not be reached or answered with a server error; try again later."""


class UpdateRefusedError(SkyliftError):
    """What the hub offers cannot be trusted or is not for this device; the reason says why."""


@dataclass(frozen=True)
class PollAnswer:
    """One poll: ``changed`` is False on ``304 Not Modified``."""

    changed: bool
    poll_interval_s: float | None = None


@dataclass(frozen=True)
class PayloadOffer:
    """One payload of an offered release, as the target's custom fields describe it."""

    name: str
    slot_class: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DeltaOffer:
    """A per-pair delta the director names: ``payload`` from exactly ``from_version``.

    ``from_sha256`` and ``from_size`` are the old payload's (what the active
    slot must hold); ``sha256`` and ``length`` the delta file's.
    """

    payload: str
    from_version: str
    from_sha256: str
    from_size: int
    sha256: str
    length: int


@dataclass(frozen=True)
class Offer:
    """A release the director assigns to this device, verified against the image repository.

    ``target_name`` is the TUF target (``<version>.head``); ``length`` and
    ``sha256`` are the bundle head's, identical in both repositories.
    ``deployment_id`` comes from the director's custom fields when present.
    """

    product: str
    version: str
    target_name: str
    length: int
    sha256: str
    hardware_ids: tuple[str, ...]
    payloads: tuple[PayloadOffer, ...]
    deployment_id: int | None = None
    custom: Mapping[str, object] = field(default_factory=dict)
    deltas: tuple[DeltaOffer, ...] = ()


class HubPort(Protocol):
    """What the updater needs from the hub. Every method is blocking and bounded in time."""

    def poll(self, *, state: str, progress: int | None) -> PollAnswer:
        """One cheap poll carrying the device's state.

        Raises:
            HubUnreachableError: transport failure or 5xx.
        """
        ...

    def check(self, *, installed_version: str | None, allow_downgrade: bool) -> Offer | None:
        """Refresh both TUF repositories and cross-check them; the offer, or None.

        None: the director assigns nothing, or assigns what is installed.

        Raises:
            HubUnreachableError: transport failure or 5xx.
            UpdateRefusedError: anything untrustworthy or not for this device.
        """
        ...

    def fetch_head(self, offer: Offer) -> bytes:
        """The bundle head of ``offer``, checked against its length and SHA-256.

        Raises:
            HubUnreachableError, UpdateRefusedError.
        """
        ...

    def fetch_index(self, offer: Offer, payload: str) -> bytes:
        """The chunk index pages of one payload (the caller verifies them against the manifest).

        Raises:
            HubUnreachableError, UpdateRefusedError: oversized.
        """
        ...

    def fetch_ranges(
        self, offer: Offer, payload: str, ranges: Sequence[ByteRange]
    ) -> Iterable[tuple[ByteRange, bytes]]:
        """Byte ranges of one payload's pack, in few requests (what ``apply_plan`` calls).

        Raises:
            HubUnreachableError, UpdateRefusedError: an answer that is not the ranges asked.
        """
        ...

    def fetch_delta(self, offer: Offer, delta: DeltaOffer, dest: Path) -> int:
        """Download ``delta`` into ``dest``, resuming after the bytes ``dest`` holds.

        Returns the bytes downloaded by this call. ``dest`` ends up with
        exactly ``delta.length`` bytes; the caller checks their SHA-256.

        Raises:
            HubUnreachableError: transport failure (``dest`` keeps what arrived).
            UpdateRefusedError: the hub has no such delta, or answers otherwise.
        """
        ...

    def send(self, reports: Sequence[Report]) -> None:
        """Deliver reports (the :class:`~skylift.agent.reports.ReportSink` port).

        Raises:
            ReportTransportError, ReportRejectedError: as ``reports`` defines them.
        """
        ...
