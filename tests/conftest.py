"""Fixtures shared across the test suite."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from securesystemslib.signer import CryptoSigner, Key

from skylift.trust.keys import generate_private_key, signer_for


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
