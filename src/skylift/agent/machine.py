"""The agent's state machine, as data: states, events, one transition table, a resume map.

As in the Mender client, states never name their successors: the agent's
steps post an :class:`Event` from a closed set, and :data:`TRANSITIONS` is the
one place that wires ``(state, event) -> next state``. Everything here is
pure: no file, no clock, no bootloader. The caller persists the new state
(:mod:`skylift.agent.statefile`) *before* it performs the state's
:class:`Action`, so a power cut at any instant leaves a state on disk whose
action can simply be done again.

Which slot runs matters as much as the state. :class:`Side` says whether the
device runs the *new* slot (the one the update wrote, the target) or the
*old* one (the slot it updated from). :data:`ACTIONS` gives what to do in a
state on a side; :func:`resume` decides, from the persisted state, the side
and whether the device rebooted since the state was written, where to go
when the agent starts:

================ =================== ==================== ===================
found state      old slot, same boot old slot, rebooted   new slot (any boot)
================ =================== ==================== ===================
idle             idle: wait          idle: wait           idle: wait
checking         checking: check     checking: check      checking: check
downloading      downloading         downloading          failed: roll back
installing       installing          installing           failed: roll back
installed        installed           installed            failed: roll back
rebooting        rebooting: reboot   rolled_back (the     trial: health check
                 (it never happened) bootloader fell back)
trial            rolled_back         rolled_back          trial: health check
committed        rolled_back         rolled_back          committed: commit
rolled_back      rolled_back: report rolled_back: report  rolled_back: roll back
failed           failed: report      failed: report       failed: roll back
================ =================== ==================== ===================

"Roll back" marks the new slot bad and reboots into the old one; "report"
queues the final report and then takes :attr:`Event.REPORTED` to idle.
Installing resumes by planning again: the inactive slot was marked bad
before the first byte was written, so it is not bootable until verified.

The loop guard: the persisted state carries how many times the agent has
already resumed it. Past ``max_resumes`` the agent stops retrying: every
state but ``idle`` and ``failed`` goes to ``failed`` with a reason (which on
the new slot still rolls back), and ``failed`` gives up rolling back and
just reports. Idle is never counted: restarting while idle is normal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from skylift.agent.errors import InvalidTransitionError

__all__ = [
    "ACTIONS",
    "DEFAULT_MAX_RESUMES",
    "FINAL_STATES",
    "RESUME",
    "TRANSITIONS",
    "Action",
    "Event",
    "Resume",
    "Side",
    "State",
    "action_for",
    "allowed_events",
    "resume",
    "side_of",
    "transition",
    "was_rebooted",
]

#: Resumes of one state before the agent gives up on it.
DEFAULT_MAX_RESUMES = 5


class State(enum.StrEnum):
    """Where the agent is in an update. The values are what the hub's ``state`` field takes."""

    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    INSTALLED = "installed"
    REBOOTING = "rebooting"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Event(enum.StrEnum):
    """What happened. The agent's steps post these; they never pick the next state."""

    CHECK = "check"  # time to ask the hub (poll timer or push)
    NO_UPDATE = "no_update"  # nothing to install, or the hub could not be asked this time
    UPDATE_FOUND = "update_found"  # both TUF chains name a release to install
    DOWNLOADED = "downloaded"  # every missing chunk is here, verified
    WRITTEN = "written"  # the inactive slot is written and verified
    REBOOT = "reboot"  # it is time to boot the new slot
    BOOTED_NEW = "booted_new"  # the device runs the new slot on trial
    HEALTH_OK = "health_ok"  # the health check passed on the new slot
    HEALTH_FAILED = "health_failed"  # the health check failed or timed out
    FELL_BACK = "fell_back"  # the bootloader booted the old slot by itself
    REPORTED = "reported"  # the final report is queued
    ERROR = "error"  # a step failed; the reason goes with it


#: States an update ends in; each is left by queueing its final report.
FINAL_STATES: frozenset[State] = frozenset({State.COMMITTED, State.ROLLED_BACK, State.FAILED})

_S, _E = State, Event

_TABLE: dict[tuple[State, Event], State] = {
    (_S.IDLE, _E.CHECK): _S.CHECKING,
    (_S.CHECKING, _E.NO_UPDATE): _S.IDLE,
    (_S.CHECKING, _E.UPDATE_FOUND): _S.DOWNLOADING,
    (_S.DOWNLOADING, _E.DOWNLOADED): _S.INSTALLING,
    (_S.INSTALLING, _E.WRITTEN): _S.INSTALLED,
    (_S.INSTALLED, _E.REBOOT): _S.REBOOTING,
    (_S.REBOOTING, _E.BOOTED_NEW): _S.TRIAL,
    (_S.REBOOTING, _E.FELL_BACK): _S.ROLLED_BACK,
    (_S.TRIAL, _E.HEALTH_OK): _S.COMMITTED,
    (_S.TRIAL, _E.HEALTH_FAILED): _S.ROLLED_BACK,
    (_S.TRIAL, _E.FELL_BACK): _S.ROLLED_BACK,
    # Saved as committed, then rebooted before the new slot was marked good.
    (_S.COMMITTED, _E.FELL_BACK): _S.ROLLED_BACK,
    (_S.COMMITTED, _E.REPORTED): _S.IDLE,
    (_S.ROLLED_BACK, _E.REPORTED): _S.IDLE,
    (_S.FAILED, _E.REPORTED): _S.IDLE,
}
# "failed with a reason from any state" (failed itself ends by reporting).
_TABLE.update({(s, _E.ERROR): _S.FAILED for s in State if s is not _S.FAILED})

#: The one transition table: ``(state, event) -> next state``.
TRANSITIONS: Mapping[tuple[State, Event], State] = MappingProxyType(_TABLE)


def transition(state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``.

    Raises:
        InvalidTransitionError: ``state`` does not accept ``event``.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = ", ".join(e.value for e in allowed_events(state))
        raise InvalidTransitionError(
            f"event {event.value!r} is not allowed in state {state.value!r}",
            hint=f"{state.value!r} accepts: {allowed}",
        ) from None


def allowed_events(state: State) -> tuple[Event, ...]:
    """The events ``state`` accepts, in :class:`Event` order."""
    return tuple(e for e in Event if (state, e) in TRANSITIONS)


class Side(enum.StrEnum):
    """Which slot the device runs, relative to the update in progress."""

    OLD = "old"  # the slot it updated from (or any slot, with no update in progress)
    NEW = "new"  # the slot the update wrote: the target


class Action(enum.StrEnum):
    """What the agent does in a state, once the state is on disk. Every action may be redone."""

    WAIT = "wait"  # until the next poll, then post CHECK
    CHECK = "check"  # ask the hub; post UPDATE_FOUND or NO_UPDATE
    DOWNLOAD = "download"  # fetch what is missing (chunks already there count); post DOWNLOADED
    INSTALL = "install"  # plan, mark the inactive slot bad, write, verify; post WRITTEN
    SCHEDULE_REBOOT = "schedule_reboot"  # report installed; post REBOOT when rebooting is allowed
    REBOOT = "reboot"  # tell the bootloader to try the new slot once; reboot
    HEALTH_CHECK = "health_check"  # run the health check; post HEALTH_OK or HEALTH_FAILED
    COMMIT = "commit"  # mark the new slot good; queue the committed report; post REPORTED
    ROLL_BACK = "roll_back"  # mark the new slot bad; reboot into the old slot
    REPORT = "report"  # queue the final report; post REPORTED


_BOTH = tuple(Side)

_ACTIONS: dict[tuple[State, Side], Action] = {
    **{(_S.IDLE, side): Action.WAIT for side in _BOTH},
    **{(_S.CHECKING, side): Action.CHECK for side in _BOTH},
    (_S.DOWNLOADING, Side.OLD): Action.DOWNLOAD,
    (_S.INSTALLING, Side.OLD): Action.INSTALL,
    (_S.INSTALLED, Side.OLD): Action.SCHEDULE_REBOOT,
    (_S.REBOOTING, Side.OLD): Action.REBOOT,
    (_S.TRIAL, Side.NEW): Action.HEALTH_CHECK,
    (_S.COMMITTED, Side.NEW): Action.COMMIT,
    (_S.ROLLED_BACK, Side.NEW): Action.ROLL_BACK,
    (_S.ROLLED_BACK, Side.OLD): Action.REPORT,
    (_S.FAILED, Side.NEW): Action.ROLL_BACK,
    (_S.FAILED, Side.OLD): Action.REPORT,
}

#: What to do in a state, on a side. Pairs that cannot happen (downloading
#: while running the slot being written) are absent: :func:`resume` never
#: lands on them.
ACTIONS: Mapping[tuple[State, Side], Action] = MappingProxyType(_ACTIONS)


def action_for(state: State, side: Side) -> Action:
    """The action for ``state`` on ``side``.

    Raises:
        InvalidTransitionError: the agent cannot be in ``state`` on ``side``.
    """
    try:
        return ACTIONS[(state, side)]
    except KeyError:
        raise InvalidTransitionError(
            f"state {state.value!r} cannot hold while running the {side.value} slot"
        ) from None


_WRITING_NEW = "the device runs the slot the update was writing"
_FELL_BACK_BOOT = "the bootloader fell back to the old slot: the new slot did not boot"
_FELL_BACK_TRIAL = "the bootloader fell back to the old slot during the trial boot"
_FELL_BACK_COMMIT = "the bootloader fell back to the old slot before the commit was recorded"

# (found state, side, rebooted since it was written) -> (event to take or None to stay, reason)
_RESUME: dict[tuple[State, Side, bool], tuple[Event | None, str | None]] = {}
for _rebooted in (False, True):
    for _side in Side:
        _RESUME[(_S.IDLE, _side, _rebooted)] = (None, None)
        _RESUME[(_S.CHECKING, _side, _rebooted)] = (None, None)
        _RESUME[(_S.ROLLED_BACK, _side, _rebooted)] = (None, None)
        _RESUME[(_S.FAILED, _side, _rebooted)] = (None, None)
    for _state in (_S.DOWNLOADING, _S.INSTALLING, _S.INSTALLED):
        _RESUME[(_state, Side.OLD, _rebooted)] = (None, None)
        _RESUME[(_state, Side.NEW, _rebooted)] = (_E.ERROR, _WRITING_NEW)
    _RESUME[(_S.REBOOTING, Side.NEW, _rebooted)] = (_E.BOOTED_NEW, None)
    _RESUME[(_S.TRIAL, Side.NEW, _rebooted)] = (None, None)
    _RESUME[(_S.TRIAL, Side.OLD, _rebooted)] = (_E.FELL_BACK, _FELL_BACK_TRIAL)
    _RESUME[(_S.COMMITTED, Side.NEW, _rebooted)] = (None, None)
    _RESUME[(_S.COMMITTED, Side.OLD, _rebooted)] = (_E.FELL_BACK, _FELL_BACK_COMMIT)
# Saved as rebooting and still the same boot on the old slot: the reboot never happened.
_RESUME[(_S.REBOOTING, Side.OLD, False)] = (None, None)
_RESUME[(_S.REBOOTING, Side.OLD, True)] = (_E.FELL_BACK, _FELL_BACK_BOOT)

#: The resume map: ``(found state, side, rebooted) -> (event or None, reason)``.
RESUME: Mapping[tuple[State, Side, bool], tuple[Event | None, str | None]] = MappingProxyType(
    _RESUME
)


@dataclass(frozen=True)
class Resume:
    """Where the agent goes when it starts and finds a persisted state.

    ``event`` is the transition taken (``None``: stay in the found state);
    ``resumes`` is the loop-guard counter to persist with ``state``;
    ``reason`` is set when the move needs one (failed, rolled back).
    """

    state: State
    action: Action
    event: Event | None
    reason: str | None
    resumes: int


def resume(
    found: State,
    side: Side,
    *,
    rebooted: bool,
    resumes: int,
    max_resumes: int = DEFAULT_MAX_RESUMES,
) -> Resume:
    """Decide where to go on start, from the persisted state and what actually booted.

    ``side`` is the slot the device runs now relative to the update's target
    (:func:`side_of`), ``rebooted`` whether it booted since ``found`` was
    written (:func:`was_rebooted`), ``resumes`` how often ``found`` was
    already resumed (persisted with it).
    """
    event, reason = RESUME[(found, side, rebooted)]
    if event is not None:
        state = transition(found, event)
        return Resume(state, action_for(state, side), event, reason, resumes=0)
    if found is State.IDLE:
        return Resume(found, action_for(found, side), None, None, resumes=0)
    if resumes < max_resumes:
        return Resume(found, action_for(found, side), None, None, resumes=resumes + 1)
    gave_up = f"gave up after {resumes} restarts in state {found.value!r}"
    if found is State.FAILED:
        # Rolling back keeps failing: say so and stop; the bootloader still
        # falls back by itself at the next boot, as the new slot is not marked good.
        return Resume(found, Action.REPORT, None, gave_up, resumes=resumes + 1)
    state = transition(found, Event.ERROR)
    return Resume(state, action_for(state, side), Event.ERROR, gave_up, resumes=0)


def side_of(booted_slot: str, target_slot: str | None) -> Side:
    """:attr:`Side.NEW` when the booted slot is the update's target slot, else :attr:`Side.OLD`."""
    return Side.NEW if target_slot is not None and booted_slot == target_slot else Side.OLD


def was_rebooted(boot_id: str | None, saved_boot_id: str | None) -> bool:
    """Whether the device booted since the state was saved, from the kernel's boot ids.

    Unknown on either side counts as rebooted: then only the booted slot
    decides, which never keeps a device on an uncommitted slot.
    """
    return boot_id is None or saved_boot_id is None or boot_id != saved_boot_id
