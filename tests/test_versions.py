"""Release version order (dpkg's), which the hub and the agent share."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skylift.hub import rollouts
from skylift.versions import compare_versions

# (older, newer): each pair strictly ordered; the table is also checked both ways round.
ORDERED = [
    ("1.0", "1.1"),
    ("1.9", "1.10"),
    ("1.2.3", "1.2.10"),
    ("1.2", "1.2.0"),
    ("1.2.3~rc1", "1.2.3"),
    ("1.2.3~rc1", "1.2.3~rc2"),
    ("1.2.3~~", "1.2.3~"),
    ("1.2.3~", "1.2.3"),
    ("1.2.3", "1.2.3a"),
    ("1.2.3", "1.2.3+build1"),
    ("1.2.3a", "1.2.3+"),  # letters before other symbols
    ("1.2.3-1", "1.2.3.1"),  # "-" (45) before "." (46)
    ("1.2.3+b", "1.2.3-a"),  # "+" (43) before "-" (45)
    ("1.2.3-1", "1.2.3_1"),  # "-" (45) before "_" (95)
    ("A", "a"),
    ("a", "b"),
    ("1a", "1b"),
    ("0.9", "1"),
    ("2", "10"),
    ("99", "100"),
    ("1.2.3", "2"),
    ("2026.11", "2026.12"),
    ("1.0-rc1", "1.0.0"),  # semver's pre-release: needs "~" to sort before the release
    ("0", "0a"),
    ("", "0a"),
    ("9" * 30, "1" + "0" * 30),
]

EQUAL = [
    ("1.2.3", "1.2.3"),
    ("1.01", "1.1"),
    ("1.0", "1.00"),
    ("007", "7"),
    ("0", ""),
    ("0", "00"),
    ("", ""),
]


@pytest.mark.parametrize(("older", "newer"), ORDERED)
def test_ordered_pairs(older: str, newer: str) -> None:
    assert compare_versions(older, newer) < 0
    assert compare_versions(newer, older) > 0


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_equal_versions(a: str, b: str) -> None:
    assert compare_versions(a, b) == 0
    assert compare_versions(b, a) == 0


def test_sorting_the_table_keeps_every_ordered_pair() -> None:
    everything = sorted({v for pair in ORDERED + EQUAL for v in pair})
    ranked = sorted(everything, key=functools.cmp_to_key(compare_versions))
    for older, newer in ORDERED:
        assert ranked.index(older) < ranked.index(newer), (older, newer)


def test_hub_and_agent_use_this_order() -> None:
    from skylift.agent import hubclient, localmedia

    assert rollouts.compare_versions is compare_versions
    assert hubclient.compare_versions is compare_versions
    assert localmedia.compare_versions is compare_versions


# Versions as manifests allow them, biased towards digits and the separators that matter.
_VERSION = st.text(alphabet="0123456789.~+-_aAzZ", max_size=12)


@given(_VERSION, _VERSION, _VERSION)
def test_generated_versions_are_a_total_order(a: str, b: str, c: str) -> None:
    assert compare_versions(a, a) == 0
    assert (compare_versions(a, b) > 0) == (compare_versions(b, a) < 0)
    if compare_versions(a, b) <= 0 and compare_versions(b, c) <= 0:
        assert compare_versions(a, c) <= 0


@given(st.text(max_size=8), st.text(max_size=8))
def test_any_text_compares_without_error(a: str, b: str) -> None:
    # Not manifest versions (an installed version comes from the state file).
    assert isinstance(compare_versions(a, b), int)
    assert (compare_versions(a, b) > 0) == (compare_versions(b, a) < 0)
