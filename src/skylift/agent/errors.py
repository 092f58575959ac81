"""The agent's own exception families: its state machine, state file and report queue.

Slots, configuration and bootloaders keep their errors beside their code
(:mod:`skylift.agent.slots`, :mod:`skylift.agent.config`); this module holds
the ones about the agent's bookkeeping and about getting reports to the hub.
"""

from __future__ import annotations

from skylift.errors import SkyliftError

__all__ = [
    "AgentStateError",
    "InvalidTransitionError",
    "ReportError",
    "ReportQueueError",
    "ReportRejectedError",
    "ReportTransportError",
    "StateFileError",
]


class AgentStateError(SkyliftError):
    """The agent's state machine or its persisted state cannot be used."""


class InvalidTransitionError(AgentStateError):
    """An event arrived in a state that does not accept it (a bug in the caller)."""


class StateFileError(AgentStateError):
    """The state file is unreadable, truncated, oversized or not in the expected schema.

    The agent recovers by keeping the file aside and starting from idle
    (see :func:`skylift.agent.statefile.open_state`).
    """


class ReportError(SkyliftError):
    """A report cannot be queued, read back or delivered."""


class ReportQueueError(ReportError):
    """The on-disk report queue cannot store or read a report."""


class ReportTransportError(ReportError):
    """The hub was not reached or did not confirm; the reports stay queued for another try."""

    hint = "the agent sends queued reports again when the hub is reachable"


class ReportRejectedError(ReportError):
    """The hub refused a report as malformed; sending it again would never succeed."""
