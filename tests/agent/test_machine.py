"""The agent's state machine as a table: transitions, the resume map, the loop guard."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skylift.agent.errors import InvalidTransitionError
from skylift.agent.machine import (
    ACTIONS,
    DEFAULT_MAX_RESUMES,
    FINAL_STATES,
    RESUME,
    TRANSITIONS,
    Action,
    Event,
    Side,
    State,
    action_for,
    allowed_events,
    resume,
    side_of,
    transition,
    was_rebooted,
)
from skylift.errors import SkyliftError


def _reachable(start: State) -> set[State]:
    seen, todo = {start}, deque([start])
    while todo:
        state = todo.popleft()
        for (source, _event), target in TRANSITIONS.items():
            if source is state and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


# -- the transition table -----------------------------------------------------


def test_the_happy_path_is_a_chain_of_events() -> None:
    steps = [
        (Event.CHECK, State.CHECKING),
        (Event.UPDATE_FOUND, State.DOWNLOADING),
        (Event.DOWNLOADED, State.INSTALLING),
        (Event.WRITTEN, State.INSTALLED),
        (Event.REBOOT, State.REBOOTING),
        (Event.BOOTED_NEW, State.TRIAL),
        (Event.HEALTH_OK, State.COMMITTED),
        (Event.REPORTED, State.IDLE),
    ]
    state = State.IDLE
    for event, expected in steps:
        state = transition(state, event)
        assert state is expected


TO_REBOOTING = [Event.CHECK, Event.UPDATE_FOUND, Event.DOWNLOADED, Event.WRITTEN, Event.REBOOT]


@pytest.mark.parametrize(
    ("path", "end"),
    [
        ([Event.CHECK, Event.NO_UPDATE], State.IDLE),
        ([Event.CHECK, Event.UPDATE_FOUND, Event.ERROR], State.FAILED),
        (
            [*TO_REBOOTING, Event.BOOTED_NEW, Event.HEALTH_FAILED],
            State.ROLLED_BACK,
        ),
        (
            [*TO_REBOOTING, Event.FELL_BACK, Event.REPORTED],
            State.IDLE,
        ),
    ],
)
def test_other_paths(path: list[Event], end: State) -> None:
    state = State.IDLE
    for event in path:
        state = transition(state, event)
    assert state is end


def test_every_state_is_reachable_from_idle() -> None:
    assert _reachable(State.IDLE) == set(State)


def test_every_state_can_reach_a_final_state_and_every_final_state_returns_to_idle() -> None:
    for state in State:
        assert _reachable(state) & FINAL_STATES, state
    for state in FINAL_STATES:
        assert transition(state, Event.REPORTED) is State.IDLE


def test_every_state_but_failed_can_fail_and_failed_only_reports() -> None:
    for state in State:
        if state is State.FAILED:
            assert allowed_events(state) == (Event.REPORTED,)
        else:
            assert transition(state, Event.ERROR) is State.FAILED


def test_every_state_has_a_way_out_and_no_transition_starts_nowhere() -> None:
    sources = {source for source, _ in TRANSITIONS}
    assert sources == set(State)  # every state has an exit, and only real states do
    assert set(TRANSITIONS.values()) <= _reachable(State.IDLE)


def test_the_update_states_cannot_be_skipped() -> None:
    # The only ways into the states that touch slots and the bootloader.
    into = {
        target: {source for (source, _), t in TRANSITIONS.items() if t is target}
        for target in State
    }
    assert into[State.DOWNLOADING] == {State.CHECKING}
    assert into[State.INSTALLING] == {State.DOWNLOADING}
    assert into[State.INSTALLED] == {State.INSTALLING}
    assert into[State.REBOOTING] == {State.INSTALLED}
    assert into[State.TRIAL] == {State.REBOOTING}
    assert into[State.COMMITTED] == {State.TRIAL}  # only a passed health check commits
    assert into[State.ROLLED_BACK] == {State.REBOOTING, State.TRIAL, State.COMMITTED}


def test_the_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(State.IDLE, Event.HEALTH_OK)] = State.COMMITTED  # type: ignore[index]


@pytest.mark.parametrize(
    ("state", "event"),
    [pair for pair in itertools.product(State, Event) if pair not in TRANSITIONS],
)
def test_an_event_a_state_does_not_accept_is_a_clear_error(state: State, event: Event) -> None:
    with pytest.raises(InvalidTransitionError) as caught:
        transition(state, event)
    assert isinstance(caught.value, SkyliftError)
    text = caught.value.diagnostics()
    assert repr(event.value) in text and repr(state.value) in text
    for allowed in allowed_events(state):
        assert allowed.value in text


@given(st.lists(st.sampled_from(list(Event)), max_size=60))
def test_a_random_walk_follows_the_table_exactly(events: list[Event]) -> None:
    state = State.IDLE
    for event in events:
        if (state, event) in TRANSITIONS:
            state = transition(state, event)
            assert state in State
        else:
            with pytest.raises(InvalidTransitionError):
                transition(state, event)
    # Wherever the walk stopped, the update can still end.
    assert _reachable(state) & FINAL_STATES


# -- the resume map -----------------------------------------------------------


def test_the_resume_map_covers_every_state_side_and_boot() -> None:
    assert set(RESUME) == set(itertools.product(State, Side, (False, True)))


@pytest.mark.parametrize(("found", "side", "rebooted"), sorted(RESUME))
def test_every_resume_takes_a_legal_transition_and_lands_on_a_defined_action(
    found: State, side: Side, rebooted: bool
) -> None:
    decision = resume(found, side, rebooted=rebooted, resumes=0)
    if decision.event is None:
        assert decision.state is found
    else:
        assert transition(found, decision.event) is decision.state
        assert decision.resumes == 0
    assert ACTIONS[(decision.state, side)] is decision.action
    if decision.state in (State.ROLLED_BACK, State.FAILED) and decision.event is not None:
        assert decision.reason  # a rollback or a failure always says why


# (found, side, rebooted) -> (state, action, event); the table in machine's docstring.
RESUME_CASES = [
    (State.IDLE, Side.OLD, True, State.IDLE, Action.WAIT, None),
    (State.CHECKING, Side.OLD, False, State.CHECKING, Action.CHECK, None),
    (State.DOWNLOADING, Side.OLD, False, State.DOWNLOADING, Action.DOWNLOAD, None),
    (State.DOWNLOADING, Side.OLD, True, State.DOWNLOADING, Action.DOWNLOAD, None),
    (State.INSTALLING, Side.OLD, True, State.INSTALLING, Action.INSTALL, None),
    (State.INSTALLED, Side.OLD, True, State.INSTALLED, Action.SCHEDULE_REBOOT, None),
    # Running the slot being written: never stay there.
    (State.DOWNLOADING, Side.NEW, True, State.FAILED, Action.ROLL_BACK, Event.ERROR),
    (State.INSTALLING, Side.NEW, False, State.FAILED, Action.ROLL_BACK, Event.ERROR),
    # Saved rebooting, same boot, old slot: the reboot did not happen yet.
    (State.REBOOTING, Side.OLD, False, State.REBOOTING, Action.REBOOT, None),
    (State.REBOOTING, Side.NEW, True, State.TRIAL, Action.HEALTH_CHECK, Event.BOOTED_NEW),
    # The bootloader fell back by itself.
    (State.REBOOTING, Side.OLD, True, State.ROLLED_BACK, Action.REPORT, Event.FELL_BACK),
    (State.TRIAL, Side.NEW, False, State.TRIAL, Action.HEALTH_CHECK, None),
    (State.TRIAL, Side.NEW, True, State.TRIAL, Action.HEALTH_CHECK, None),
    (State.TRIAL, Side.OLD, True, State.ROLLED_BACK, Action.REPORT, Event.FELL_BACK),
    (State.COMMITTED, Side.NEW, True, State.COMMITTED, Action.COMMIT, None),
    (State.COMMITTED, Side.OLD, True, State.ROLLED_BACK, Action.REPORT, Event.FELL_BACK),
    # Saved rolled_back or failed while still on the new slot: roll back (again).
    (State.ROLLED_BACK, Side.NEW, False, State.ROLLED_BACK, Action.ROLL_BACK, None),
    (State.ROLLED_BACK, Side.OLD, True, State.ROLLED_BACK, Action.REPORT, None),
    (State.FAILED, Side.NEW, True, State.FAILED, Action.ROLL_BACK, None),
    (State.FAILED, Side.OLD, False, State.FAILED, Action.REPORT, None),
]


@pytest.mark.parametrize(
    ("found", "side", "rebooted", "state", "action", "event"),
    RESUME_CASES,
    ids=[f"{c[0]}-{c[1]}-{'reboot' if c[2] else 'restart'}" for c in RESUME_CASES],
)
def test_resume_cases(
    found: State,
    side: Side,
    rebooted: bool,
    state: State,
    action: Action,
    event: Event | None,
) -> None:
    decision = resume(found, side, rebooted=rebooted, resumes=0)
    assert (decision.state, decision.action, decision.event) == (state, action, event)


def test_a_fallback_says_the_bootloader_fell_back() -> None:
    decision = resume(State.TRIAL, Side.OLD, rebooted=True, resumes=0)
    assert decision.reason is not None and "fell back" in decision.reason


def test_side_and_reboot_detection() -> None:
    assert side_of("B", "B") is Side.NEW
    assert side_of("A", "B") is Side.OLD
    assert side_of("A", None) is Side.OLD
    assert was_rebooted("boot-2", "boot-1") is True
    assert was_rebooted("boot-1", "boot-1") is False
    # Unknown boot ids count as a reboot: the booted slot alone decides.
    assert was_rebooted(None, "boot-1") is True
    assert was_rebooted("boot-1", None) is True


def test_actions_that_cannot_happen_are_refused() -> None:
    with pytest.raises(InvalidTransitionError):
        action_for(State.DOWNLOADING, Side.NEW)
    with pytest.raises(InvalidTransitionError):
        action_for(State.TRIAL, Side.OLD)


# -- the loop guard -----------------------------------------------------------


def test_resuming_counts_and_moving_resets_the_counter() -> None:
    first = resume(State.DOWNLOADING, Side.OLD, rebooted=False, resumes=0)
    assert first.resumes == 1
    again = resume(State.DOWNLOADING, Side.OLD, rebooted=False, resumes=first.resumes)
    assert again.resumes == 2
    moved = resume(State.REBOOTING, Side.NEW, rebooted=True, resumes=4)
    assert moved.state is State.TRIAL and moved.resumes == 0


def test_idle_is_never_counted() -> None:
    decision = resume(State.IDLE, Side.OLD, rebooted=False, resumes=10_000, max_resumes=1)
    assert (decision.state, decision.action, decision.resumes) == (State.IDLE, Action.WAIT, 0)


def test_a_trial_boot_loop_fails_then_rolls_back_then_gives_up() -> None:
    # The new slot keeps crashing during the health check, and rolling back
    # keeps failing too: the guard must end it with a report.
    state, resumes, chain = State.TRIAL, 0, []
    for _ in range(4 * (DEFAULT_MAX_RESUMES + 2)):
        decision = resume(state, Side.NEW, rebooted=True, resumes=resumes)
        state, resumes = decision.state, decision.resumes
        chain.append((decision.state, decision.action))
        if decision.action is Action.REPORT:
            break
    assert chain[:DEFAULT_MAX_RESUMES] == [(State.TRIAL, Action.HEALTH_CHECK)] * DEFAULT_MAX_RESUMES
    assert chain[DEFAULT_MAX_RESUMES] == (State.FAILED, Action.ROLL_BACK)
    assert chain[-1] == (State.FAILED, Action.REPORT)
    assert len(chain) == 2 * DEFAULT_MAX_RESUMES + 2
    assert decision.reason is not None and "gave up" in decision.reason


def test_giving_up_on_the_old_slot_fails_and_reports() -> None:
    decision = resume(State.DOWNLOADING, Side.OLD, rebooted=False, resumes=3, max_resumes=3)
    assert (decision.state, decision.action, decision.event) == (
        State.FAILED,
        Action.REPORT,
        Event.ERROR,
    )
    assert decision.reason == "gave up after 3 restarts in state 'downloading'"


@given(
    found=st.sampled_from(list(State)),
    side=st.sampled_from(list(Side)),
    rebooted=st.booleans(),
    max_resumes=st.integers(min_value=0, max_value=8),
)
def test_no_restart_loop_is_endless(
    found: State, side: Side, rebooted: bool, max_resumes: int
) -> None:
    # Worst case: every action is killed before it has any effect. Whatever
    # state the agent starts in, it must reach "report and go idle" (or idle).
    state, resumes = found, 0
    for _ in range(3 * (max_resumes + 2)):
        decision = resume(state, side, rebooted=rebooted, resumes=resumes, max_resumes=max_resumes)
        state, resumes = decision.state, decision.resumes
        if decision.action in (Action.REPORT, Action.WAIT):
            break
    else:
        pytest.fail(f"still looping from {found} on the {side} slot")
    assert state in FINAL_STATES or state is State.IDLE
