"""``skylift keys``: files, modes, passphrases, and no key material in any output."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from securesystemslib.signer import SSlibKey

from skylift.trust.keys import load_private_key, load_public_key

from .conftest import Skylift

PASS = "correct horse battery staple"


def test_generate_writes_an_encrypted_0600_key(skylift: Skylift, tmp_path: Path) -> None:
    r = skylift("keys", "generate", "release")
    assert r.code == 0, r.err
    key, pub = tmp_path / "release.key", tmp_path / "release.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    private = load_private_key(key.read_bytes(), PASS.encode())
    keyid = SSlibKey.from_crypto(private.public_key()).keyid
    assert r.out.strip() == keyid  # stdout is the key id alone: scripts capture it
    assert load_public_key(pub.read_bytes()).keyid == keyid
    # neither the passphrase nor any key bytes reach the terminal
    body = key.read_text().splitlines()[1]
    for text in (r.out, r.err):
        assert PASS not in text and body not in text and "PRIVATE" not in text


def test_generate_refuses_to_overwrite(skylift: Skylift, tmp_path: Path) -> None:
    assert skylift("keys", "generate", "k").code == 0
    before = (tmp_path / "k.key").read_bytes()
    r = skylift("keys", "generate", "k")
    assert r.code == 1 and "exists" in r.error_line
    assert (tmp_path / "k.key").read_bytes() == before
    assert skylift("keys", "generate", "k", "--force").code == 0
    assert (tmp_path / "k.key").read_bytes() != before


def test_generate_needs_a_passphrase_or_the_opt_out(skylift: Skylift, tmp_path: Path) -> None:
    r = skylift("keys", "generate", "k", SKYLIFT_KEY_PASSPHRASE="")
    assert r.code == 1 and "--insecure-plaintext" in r.error_line
    assert not (tmp_path / "k.key").exists()
    r = skylift("keys", "generate", "k", "--insecure-plaintext", SKYLIFT_KEY_PASSPHRASE="")
    assert r.code == 0 and "NOT encrypted" in r.err
    assert b"ENCRYPTED" not in (tmp_path / "k.key").read_bytes()
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600


def test_bad_key_names_are_refused(skylift: Skylift, tmp_path: Path) -> None:
    for name in ("../escape", "a/b", ".hidden", ""):
        r = skylift("keys", "generate", name)
        assert r.code != 0
    assert not list(tmp_path.parent.glob("escape*"))


def test_export_public(skylift: Skylift, tmp_path: Path) -> None:
    keyid = skylift("keys", "generate", "r").out.strip()
    r = skylift("keys", "export-public", "r.key")
    assert r.code == 0 and r.out.startswith("-----BEGIN PUBLIC KEY-----")
    assert f"key id: {keyid}" in r.err
    assert load_public_key(r.out.encode()).keyid == keyid
    r = skylift("keys", "export-public", "r.key", "--format", "tuf", "-o", "r.json")
    assert r.code == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["keyid"] == keyid and doc["keytype"] == "ed25519"
    assert load_public_key((tmp_path / "r.json").read_bytes()).keyid == keyid


def test_export_public_with_a_wrong_or_missing_passphrase(skylift: Skylift) -> None:
    skylift("keys", "generate", "r")
    r = skylift("keys", "export-public", "r.key", SKYLIFT_KEY_PASSPHRASE="wrong")
    assert r.code == 1 and "passphrase does not decrypt" in r.error_line
    r = skylift("keys", "export-public", "r.key", SKYLIFT_KEY_PASSPHRASE="")
    assert r.code == 1 and "SKYLIFT_KEY_PASSPHRASE" in r.error_line
    r = skylift("keys", "export-public", "missing.key")
    assert r.code == 1 and "cannot read key file missing.key" in r.error_line
