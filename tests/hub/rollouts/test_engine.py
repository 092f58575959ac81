"""The rollout engine's pure decisions: tables of cases, no database."""

from __future__ import annotations

import pytest

from skylift.hub.rollouts import (
    PhaseCounts,
    PhasePlan,
    Verdict,
    compare_versions,
    evaluate,
    pause_reason,
    plan_phases,
)


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("1.0.0", "1.0.1"),
        ("1.9", "1.10"),
        ("1.2.3~rc1", "1.2.3"),
        ("1.2.3~rc1", "1.2.3~rc2"),
        ("1.2.3", "1.2.3+build1"),
        ("1.2", "1.2.0.1"),
        ("2024.01.5", "2024.1.06"),
        ("1.0a", "1.0b"),
        ("1.0b", "1.0.1"),
        ("9", "10"),
    ],
)
def test_versions_order_as_dpkg_does(older: str, newer: str) -> None:
    assert compare_versions(older, newer) < 0
    assert compare_versions(newer, older) > 0
    assert compare_versions(older, older) == 0


@pytest.mark.parametrize(("a", "b"), [("1.0", "1.00"), ("01.2", "1.2"), ("", "")])
def test_equal_versions(a: str, b: str) -> None:
    assert compare_versions(a, b) == 0


def _counts(**kw: int) -> PhaseCounts:
    return PhaseCounts(**kw)


# counts, gate %, soaked s (min soak 600), acknowledged, verdict
CASES = [
    ("empty-phase-advances-at-once", _counts(), 5, 0, 0, Verdict.ADVANCE),
    ("all-committed-before-soak-holds", _counts(committed=10), 5, 599, 0, Verdict.HOLD),
    ("all-committed-after-soak", _counts(committed=10), 5, 600, 0, Verdict.ADVANCE),
    ("quorum-90-percent", _counts(committed=9, pending=1), 5, 600, 0, Verdict.ADVANCE),
    ("below-quorum-holds", _counts(committed=8, pending=1, downloading=1), 5, 10**6, 0, Verdict.HOLD),
    ("silent-phase-never-advances", _counts(pending=10), 100, 10**6, 0, Verdict.HOLD),
    ("failures-count-as-finished", _counts(committed=17, failed=1, rolled_back=1, pending=1), 10, 600, 0,
     Verdict.ADVANCE),
    ("over-gate-pauses-even-before-soak", _counts(failed=2, pending=8), 10, 0, 0, Verdict.PAUSE),
    ("at-gate-does-not-pause", _counts(failed=1, committed=9), 10, 600, 0, Verdict.ADVANCE),
    ("gate-0-pauses-on-first-failure", _counts(rolled_back=1, pending=99), 0, 0, 0, Verdict.PAUSE),
    ("gate-100-never-pauses", _counts(failed=10), 100, 600, 0, Verdict.ADVANCE),
    ("acknowledged-failures-do-not-pause", _counts(failed=2, committed=8), 10, 600, 2, Verdict.ADVANCE),
    ("a-new-failure-after-resume-pauses", _counts(failed=3, committed=7), 10, 600, 2, Verdict.PAUSE),
    ("denominator-is-the-phase", _counts(failed=2, pending=998), 1, 0, 0, Verdict.HOLD),
]  # fmt: skip


@pytest.mark.parametrize(
    ("counts", "gate", "soaked", "acknowledged", "verdict"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_evaluate(
    counts: PhaseCounts, gate: float, soaked: float, acknowledged: int, verdict: Verdict
) -> None:
    assert (
        evaluate(
            counts,
            gate_percent=gate,
            min_soak_s=600,
            soaked_s=soaked,
            acknowledged_failures=acknowledged,
        )
        is verdict
    )


def test_pause_reason_names_phase_rate_gate_and_reasons() -> None:
    counts = PhaseCounts(failed=2, rolled_back=1, committed=7)
    assert (
        pause_reason(1, counts, 10.0, [("disk full", 2), ("health check failed", 1)])
        == "phase 1: 30.0% failed (gate 10%): disk full (2), health check failed (1)"
    )
    assert pause_reason(0, counts, 12.5, []) == "phase 0: 30.0% failed (gate 12.5%)"


def test_counts_as_the_api_shows_them() -> None:
    c = PhaseCounts(pending=1, downloading=2, installed=3, committed=4, failed=5, rolled_back=6)
    assert c.devices == 21 and c.failures == 11 and c.finished == 15
    assert c.as_dict() == {
        "pending": 1, "downloading": 2, "installed": 3, "committed": 4, "failed": 5,
        "rolled_back": 6,
    }  # fmt: skip
    assert PhaseCounts().failure_rate_percent == 0.0


DEVICES = {pk: f"dev-{pk:03d}" for pk in range(1, 201)}


def test_percent_phases_are_cumulative_stable_and_start_with_a_canary() -> None:
    phases = [PhasePlan(percent=1), PhasePlan(percent=10), PhasePlan(percent=50),
              PhasePlan(percent=100)]  # fmt: skip
    plan = plan_phases(7, DEVICES, {}, phases)
    assert plan == plan_phases(7, dict(reversed(DEVICES.items())), {}, phases)  # order-free
    sizes = [sum(1 for p in plan.values() if p == n) for n in range(4)]
    assert sizes == [2, 18, 80, 100]
    # A wider rollout keeps its first devices: the 1 % lead the 10 %.
    wider = plan_phases(7, DEVICES, {}, [PhasePlan(percent=10), PhasePlan(percent=100)])
    assert {pk for pk, p in plan.items() if p <= 1} == {pk for pk, p in wider.items() if p == 0}
    # Another deployment picks other canaries.
    other = plan_phases(8, DEVICES, {}, phases)
    assert {pk for pk, p in plan.items() if p == 0} != {pk for pk, p in other.items() if p == 0}
    # However small the share, the first phase has a device.
    assert list(plan_phases(1, {1: "a", 2: "b"}, {}, [PhasePlan(percent=1),
                PhasePlan(percent=100)]).values()).count(0) == 1  # fmt: skip


def test_tag_phases_take_what_earlier_phases_left() -> None:
    tags = {1: {"canary"}, 2: {"canary", "eu"}, 3: {"eu"}, 4: {"eu"}, 5: set()}
    devices = {pk: f"d{pk}" for pk in range(1, 11)}
    plan = plan_phases(
        3,
        devices,
        tags,
        [PhasePlan(tag="canary"), PhasePlan(tag="eu"), PhasePlan(percent=100)],
    )
    assert plan[1] == plan[2] == 0
    assert plan[3] == plan[4] == 1
    assert {pk for pk, p in plan.items() if p == 2} == set(range(5, 11))
    # A percentage after a tag phase counts the whole selection but skips those taken.
    mixed = plan_phases(3, devices, tags, [PhasePlan(tag="canary"), PhasePlan(percent=50),
                                          PhasePlan(percent=100)])  # fmt: skip
    assert sum(1 for p in mixed.values() if p == 1) <= 5
    assert len(mixed) == 10
