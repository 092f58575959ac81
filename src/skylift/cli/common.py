"""What every subcommand shares: consoles, passphrases, trusted keys, size formatting."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from securesystemslib.signer import CryptoSigner

from skylift.bundle import TrustedKeys
from skylift.errors import UserInputError
from skylift.fsutil import read_bounded
from skylift.trust.keys import MAX_KEY_FILE_BYTES, load_private_key, load_public_key, signer_for

__all__ = [
    "PASSPHRASE_ENV",
    "err",
    "human_size",
    "load_private",
    "load_signer",
    "out",
    "passphrase_for_new_key",
    "trusted_keys",
]

PASSPHRASE_ENV = "SKYLIFT_KEY_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def passphrase_for_new_key() -> bytes:
    """The passphrase for a new key: from the environment, or asked twice.

    Raises:
        UserInputError: none available, or the two entries differ.
    """
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    if not _interactive():
        raise UserInputError(
            "no passphrase for the new key",
            hint=f"set {PASSPHRASE_ENV}, or pass --insecure-plaintext to store it unencrypted",
        )
    first = getpass.getpass("Passphrase for the new key: ")
    if not first:
        raise UserInputError("an empty passphrase does not protect a key")
    if getpass.getpass("Same passphrase again: ") != first:
        raise UserInputError("the two passphrases differ")
    return first.encode()


def _passphrase_for(path: Path, data: bytes) -> bytes | None:
    if b"ENCRYPTED" not in data:
        return None
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    if _interactive():
        return getpass.getpass(f"Passphrase for {path}: ").encode()
    return None  # load_private_key then says a passphrase is required, with the hint


def load_private(path: Path) -> Ed25519PrivateKey:
    """The private key in ``path``, decrypted with the passphrase from env or prompt."""
    data = read_bounded(path, MAX_KEY_FILE_BYTES, "key file")
    return load_private_key(data, _passphrase_for(path, data))


def load_signer(path: Path) -> CryptoSigner:
    """A signer for the private key file at ``path`` (asks for its passphrase if needed)."""
    return signer_for(load_private(path))


def trusted_keys(keys: list[Path], root: Path | None, threshold: int | None) -> TrustedKeys:
    """The keys a bundle must be signed by: public key files, or a TUF root's targets role.

    Raises:
        UserInputError: neither or both given, or the threshold does not fit.
    """
    if bool(keys) == bool(root):
        raise UserInputError("give the release public key(s) with --key, or a root with --root")
    if root is not None:
        from skylift.trust.repository import MAX_METADATA_BYTES, role_keys

        role, role_threshold = role_keys(read_bounded(root, MAX_METADATA_BYTES, "root"), "targets")
        return TrustedKeys(tuple(role), threshold or role_threshold)
    loaded = tuple(load_public_key(read_bounded(p, MAX_KEY_FILE_BYTES, "key file")) for p in keys)
    n = threshold or 1
    if not 1 <= n <= len(loaded):
        raise UserInputError(f"--threshold {n} does not fit {len(loaded)} key(s)")
    return TrustedKeys(loaded, n)


def human_size(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
