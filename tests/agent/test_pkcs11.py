"""The device key in a PKCS#11 token: URIs, configuration, and a real SoftHSM2 token.

The TLS half (the key signing handshakes with a real hub) is in
``tests/agent/hubclient/test_pkcs11.py``. Every failure is one line that
names what to fix, and no PIN ever shows, in errors, logs or stderr.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from skylift.agent import pkcs11
from skylift.agent.config import ConfigError, parse_config
from skylift.agent.pkcs11 import Pkcs11Error, Pkcs11Uri, load_key, parse_uri
from skylift.hub import ca

from .softhsm import Token, softhsm_token


@pytest.fixture
def token(tmp_path_factory: pytest.TempPathFactory) -> Token:
    return softhsm_token(tmp_path_factory)


def _spki(key: ec.EllipticCurvePublicKey | object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- URIs -----------------------------------------------------------------------------------------

GOOD_URIS = [
    ("pkcs11:token=se;object=device", Pkcs11Uri("pkcs11:token=se;object=device")),
    (
        "pkcs11:token=se;id=%01;type=private?pin-source=file:/etc/pin",
        Pkcs11Uri("pkcs11:token=se;id=%01;type=private", pin_source=Path("/etc/pin")),
    ),
    (
        "pkcs11:object=k?pin-source=file:///run/p",
        Pkcs11Uri("pkcs11:object=k", pin_source=Path("/run/p")),
    ),
    ("pkcs11:object=k?pin-source=/run/p", Pkcs11Uri("pkcs11:object=k", pin_source=Path("/run/p"))),
    ("pkcs11:object=k?pin-value=12%2034", Pkcs11Uri("pkcs11:object=k", pin_value="12 34")),
    ("pkcs11:object=k;pin-value=1234", Pkcs11Uri("pkcs11:object=k", pin_value="1234")),
    (
        "pkcs11:object=k;x-vendor=1?module-path=/usr/lib/m.so",
        Pkcs11Uri("pkcs11:object=k;x-vendor=1", module_path=Path("/usr/lib/m.so")),
    ),
]


@pytest.mark.parametrize(("uri", "parsed"), GOOD_URIS)
def test_uris_are_split_into_engine_uri_pin_and_module(uri: str, parsed: Pkcs11Uri) -> None:
    assert parse_uri(uri) == parsed
    if parsed.pin_value is not None:
        assert parsed.pin_value not in str(parsed) + repr(parsed)


BAD_URIS = [
    ("token=se", "starting with pkcs11:"),
    ("pkcs11:object=k?pin-value=secret1&pin-source=/p", "not both"),
    ("pkcs11:object=k?pin-source=relative/pin", "absolute"),
    ("pkcs11:object=k?pin-source=https://x/pin", "absolute"),
    ("pkcs11:object=k?module-name=softhsm2", "module-name is not supported"),
    ("pkcs11:object=k?module-path=lib.so", "module-path must be an absolute"),
    ("pkcs11:colour=red", "unknown path attribute colour"),
    ("pkcs11:object", "not name=value"),
    ("pkcs11:object=k;pin-value=secret1;pin-value=secret1", "given twice"),
    ("pkcs11:object=a b", "spaces"),
]


@pytest.mark.parametrize(("uri", "problem"), BAD_URIS)
def test_bad_uris_are_refused_without_their_pin(uri: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as refused:
        parse_uri(uri)
    assert "secret1" not in str(refused.value)


# -- configuration ----------------------------------------------------------------------------

_CONFIG = """
[hub]
url = "https://hub.example"
[identity]
device_id = "d1"
product = "p"
hardware_id = "hw"
cert_file = "id/device.pem"
{identity}
[[slot]]
class = "rootfs"
name = "A"
type = "file"
path = "a.img"
size_bytes = 4096
[[slot]]
class = "rootfs"
name = "B"
type = "file"
path = "b.img"
size_bytes = 4096
[bootloader]
kind = "file"
"""


def test_config_takes_a_uri_and_a_module(tmp_path: Path) -> None:
    text = _CONFIG.format(
        identity='pkcs11_uri = "pkcs11:token=se;object=device?pin-value=secret1"\n'
        'pkcs11_module = "lib/module.so"'
    )
    config = parse_config(text, base_dir=tmp_path)
    assert config.identity.pkcs11_uri == "pkcs11:token=se;object=device?pin-value=secret1"
    assert config.identity.pkcs11_module == tmp_path / "lib/module.so"
    assert config.identity.key_file is None
    assert "secret1" not in repr(config)


@pytest.mark.parametrize(
    ("identity", "problem"),
    [
        ('key_file = "k"\npkcs11_module = "m.so"', "only a pkcs11_uri key needs"),
        ('pkcs11_uri = "pkcs11:object=k?pin-value=secret1&pin-source=/p"', "not both"),
        ('pkcs11_uri = "pkcs11:object=k?pin-source=secret1"', "absolute path"),
    ],
)
def test_config_refuses_what_the_agent_cannot_use(
    tmp_path: Path, identity: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as refused:
        parse_config(_CONFIG.format(identity=identity), base_dir=tmp_path)
    assert "secret1" not in refused.value.diagnostics()
    assert "[identity] pkcs11_" in refused.value.diagnostics()


# -- a real token -----------------------------------------------------------------------------


def test_the_key_stays_in_the_token_and_signs_a_csr(token: Token) -> None:
    with load_key(token.uri("spare"), module=token.module) as key:
        public = key.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
        assert _spki(public) == key.public_key_der
        csr = x509.load_pem_x509_csr(key.make_csr("dev-csr"))
        assert "pin" not in repr(key)
    assert csr.is_signature_valid
    assert _spki(csr.public_key()) == key.public_key_der
    assert csr.subject.rfc4514_string() == "CN=dev-csr"
    with pytest.raises(ValueError, match="closed"):
        key.make_csr("dev-csr")


def test_install_refuses_a_certificate_for_another_key(token: Token, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ca_cert, ca_key = ca.create_ca("test CA", now=now)
    csr = ca.make_csr(ca.generate_device_key(), "d1")
    other = tmp_path / "other.pem"
    other.write_bytes(ca.issue_device_cert(ca_cert, ca_key, csr, device_id="d1", now=now))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with load_key(token.uri("spare"), module=token.module) as key:
        with pytest.raises(Pkcs11Error, match="not for the token key"):
            key.install(context, other)
        with pytest.raises(Pkcs11Error, match="cannot load the device certificate .*No such file"):
            key.install(context, tmp_path / "missing.pem")


def _failures(token: Token, tmp_path: Path) -> dict[str, tuple[str, Path, str]]:
    """case -> (URI, module, what the one line must say)."""
    return {
        "wrong PIN": (token.locked_uri("wrong-pin-123"), token.module, "the token refused the PIN"),
        "missing object": (
            token.uri("nope"),
            token.module,
            "no private key matches pkcs11:token=skylift;object=nope;type=private",
        ),
        "missing token": (
            token.uri("factory").replace("token=skylift", "token=elsewhere"),
            token.module,
            "no private key matches",
        ),
        "missing module": (token.uri("factory"), tmp_path / "nope.so", "nope.so does not exist"),
        "unreadable PIN file": (
            token.uri("factory").replace(str(token.pin_file), str(tmp_path / "no-pin")),
            token.module,
            "cannot read the PIN file .*no-pin: No such file",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "wrong PIN",
        "missing object",
        "missing token",
        "missing module",
        "unreadable PIN file",
    ],
)
def test_failures_are_one_line_without_the_pin(
    token: Token,
    tmp_path: Path,
    case: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    uri, module, said = _failures(token, tmp_path)[case]
    with pytest.raises(Pkcs11Error) as refused:
        load_key(uri, module=module)
    line = refused.value.diagnostics()
    assert re.search(said, line), line
    assert "\n" not in line and refused.value.hint
    out, err = capfd.readouterr()
    for secret in (token.pin, token.locked_pin, "wrong-pin-123"):
        assert secret not in line + caplog.text + out + err


def test_one_module_per_process(token: Token) -> None:
    load_key(token.uri("spare"), module=token.module).close()
    other = pkcs11.default_module() or Path(sys.executable)
    with pytest.raises(Pkcs11Error, match="already uses the PKCS#11 module"):
        load_key(token.uri("spare"), module=other)


_FRESH_AGENT = """
import sys
from pathlib import Path
from skylift.agent.pkcs11 import Pkcs11Error, load_key
try:
    load_key(sys.argv[1], module=Path(sys.argv[2]))
except Pkcs11Error as e:
    print(e.diagnostics())
"""


def _in_a_fresh_process(token: Token, uri: str, module: Path, **env: str) -> str:
    """What a freshly started agent says: the engine and its module are per process."""
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_AGENT, uri, str(module)],
        capture_output=True, text=True, timeout=30, check=True, env={**os.environ, **env},
    )  # fmt: skip
    # libp11 prints dlopen's complaint itself, QUIET or not; never a PIN.
    assert token.pin not in done.stdout + done.stderr
    return done.stdout


def test_a_file_that_is_no_module_is_named(token: Token, tmp_path: Path) -> None:
    not_a_module = tmp_path / "not-a-module.so"
    not_a_module.write_bytes(b"\x7fELF, but not really")
    said = _in_a_fresh_process(token, token.uri("factory"), not_a_module)
    assert said.startswith(f"cannot load the PKCS#11 module {not_a_module}: ")
    assert said.count("\n") == 1


def test_a_token_that_needs_a_pin_it_was_not_given(token: Token) -> None:
    # In a fresh process: libp11 remembers the last PIN it was given, for any token.
    said = _in_a_fresh_process(token, "pkcs11:token=locked;object=device", token.module)
    assert said.startswith("no private key matches pkcs11:token=locked;object=device in ")
    assert said.endswith("(add ?pin-source=file:/path/to/pin to [identity] pkcs11_uri if the "
                         "token needs a login, else check its token=, object= or id=)\n")  # fmt: skip


def test_a_missing_engine_is_named(token: Token, tmp_path: Path) -> None:
    # OpenSSL looks its engines up in OPENSSL_ENGINES: here, an empty directory.
    said = _in_a_fresh_process(
        token, token.uri("factory"), token.module, OPENSSL_ENGINES=str(tmp_path)
    )
    assert said.startswith("OpenSSL has no engine pkcs11 (")
    assert "libengine-pkcs11-openssl" in said and said.count("\n") == 1


def test_the_ssl_ctx_is_found_only_in_a_real_context(token: Token) -> None:
    class NotAContext:
        pass

    with (
        load_key(token.uri("spare"), module=token.module) as key,
        pytest.raises(Pkcs11Error, match="ssl.SSLContext"),
    ):
        key.install(NotAContext(), Path("x.pem"))  # type: ignore[arg-type]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    before = context.options
    assert pkcs11._ssl_ctx(pkcs11._lib(), context)
    assert context.options == before


def test_the_default_module_is_the_p11_kit_proxy() -> None:
    module = pkcs11.default_module()
    assert module is None or module.name == "p11-kit-proxy.so"
