"""A real SoftHSM2 token for the agent's PKCS#11 tests, made once per test process.

SoftHSM reads ``SOFTHSM2_CONF`` once, when the process first initialises the
module, and a PKCS#11 login belongs to the whole process. So every token
and key the tests use is made here, up front, by ``softhsm2-util`` and
``pkcs11-tool`` (the keys are generated inside the token and are not
extractable), and the environment variable stays set for the process:

- token ``skylift`` (PIN in a file) with P-256 keys ``factory``, ``enroll``
  and ``spare``;
- token ``locked``, never logged into with its right PIN: the wrong-PIN cases
  use it, since once a process is logged in a token asks for no PIN again.

Missing tools fail the tests (never skip them): ``make setup`` installs them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["KEYS", "Token", "softhsm_token"]

_MODULES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
)
KEYS = ("factory", "enroll", "spare")


@dataclass(frozen=True)
class Token:
    """The tokens of this process: where they are, their module, PINs and URIs."""

    directory: Path
    module: Path
    pin: str
    pin_file: Path
    locked_pin: str

    def uri(self, key: str) -> str:
        """The URI of ``key`` in token ``skylift``, its PIN read from a file."""
        return f"pkcs11:token=skylift;object={key};type=private?pin-source=file:{self.pin_file}"

    def locked_uri(self, pin: str) -> str:
        """The URI of the key in token ``locked``, with ``pin`` given inline."""
        return f"pkcs11:token=locked;object=device;type=private?pin-value={pin}"


_token: Token | None = None


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        pytest.fail(f"{args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")


def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Token:
    """The process's SoftHSM2 tokens, made on first use."""
    global _token
    if _token is not None:
        return _token
    module = next((m for m in _MODULES if m.is_file()), None)
    missing = [tool for tool in ("softhsm2-util", "pkcs11-tool") if shutil.which(tool) is None]
    if module is None or missing:
        pytest.fail(
            "SoftHSM2 and OpenSC are needed for the PKCS#11 tests "
            f"(missing: {', '.join(missing) or 'libsofthsm2.so'}): run `make setup`"
        )
    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\n"
        "objectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)  # for this process, as SoftHSM reads it once
    pin, locked_pin = f"pin-{secrets.token_hex(4)}", f"pin-{secrets.token_hex(4)}"
    pin_file = directory / "pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    for label, token_pin, keys in (("skylift", pin, KEYS), ("locked", locked_pin, ("device",))):
        _run("softhsm2-util", "--init-token", "--free", "--label", label,
             "--pin", token_pin, "--so-pin", secrets.token_hex(8))  # fmt: skip
        for number, key in enumerate(keys, 1):
            _run("pkcs11-tool", "--module", str(module), "--token-label", label,
                 "--login", "--pin", token_pin, "--keypairgen", "--key-type", "EC:prime256v1",
                 "--label", key, "--id", f"{number:02x}")  # fmt: skip
    _token = Token(directory, module, pin, pin_file, locked_pin)
    return _token
