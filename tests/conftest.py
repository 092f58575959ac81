"""Fixtures shared across the test suite."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner, Key

from skylift.demo import Demo, StoryResult
from skylift.trust.keys import generate_private_key, signer_for


@dataclass(frozen=True)
class DemoRun:
    """One run of ``make demo``'s story: what it printed and what it found."""

    output: str
    result: StoryResult


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The demo's story, run once for the session (a minute): a real hub, three agents.

    tests/test_demo.py checks what it says, tests/e2e/test_fleet.py what it did.
    """
    if not shutil.which("mke2fs") and not Path("/sbin/mke2fs").exists():
        pytest.fail("mke2fs is missing: `make test` installs e2fsprogs; run it through make")
    out = io.StringIO()
    demo = Demo(tmp_path_factory.mktemp("demo") / "demo", out=out, tour=True)
    try:
        result = demo.story()
    finally:
        print(out.getvalue())  # the account, shown by pytest when a test fails
    return DemoRun(out.getvalue(), result)


def new_signers(count: int) -> list[CryptoSigner]:
    """``count`` fresh ed25519 signers."""
    return [signer_for(generate_private_key()) for _ in range(count)]


@dataclass
class RoleSigners:
    """Signers for the four TUF roles of one repository: three root keys, one per other role."""

    root: list[CryptoSigner] = field(default_factory=lambda: new_signers(3))
    targets: list[CryptoSigner] = field(default_factory=lambda: new_signers(1))
    snapshot: list[CryptoSigner] = field(default_factory=lambda: new_signers(1))
    timestamp: list[CryptoSigner] = field(default_factory=lambda: new_signers(1))

    def keys(self) -> dict[str, list[Key]]:
        return {
            role: [s.public_key for s in getattr(self, role)]
            for role in ("root", "targets", "snapshot", "timestamp")
        }

    @property
    def online(self) -> list[CryptoSigner]:
        return [*self.snapshot, *self.timestamp]

    @property
    def all(self) -> list[CryptoSigner]:
        return [*self.root, *self.targets, *self.online]


@pytest.fixture
def role_signers() -> RoleSigners:
    """Fresh signers for root (three keys), targets, snapshot and timestamp."""
    return RoleSigners()


@pytest.fixture(name="new_signers")
def new_signers_fixture() -> Callable[[int], list[CryptoSigner]]:
    """A factory of fresh ed25519 signers."""
    return new_signers
