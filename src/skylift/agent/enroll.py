"""Enrollment: how a device gets the certificate it talks to the hub with, once.

:func:`ensure_identity` runs at every start and does the least it must:

- **Certificate and key present** (enrolled before, or a factory
  certificate): check that they belong together, name this device and have
  not expired, and that the pinned TUF roots are there. No network.
- **No certificate, a provisioning key** (``[identity]
  provisioning_key_file``): generate the device key (P-256,
  :mod:`skylift.device_identity`) and write it with mode 0600, send a CSR to
  ``POST /device/v1/enroll`` over TLS that verifies the hub (no client
  certificate yet), then store the certificate, the issuing CA and the two
  roots the hub answered: the director's and the product image
  repository's. Those roots are what the agent pins for TUF
  (:class:`~skylift.agent.hubclient.PinnedFiles`); from then on it talks
  mutual TLS only.
- **A key in a PKCS#11 token** (``[identity] pkcs11_uri``): the same two
  cases, except that the key is never generated or written here. It was made
  in the token (secure element, TPM, smart card) when the device was built;
  the certificate must be for its public key, and an enrollment's CSR is
  signed in the token (:mod:`skylift.agent.pkcs11`).

Each step survives a power cut. The key is written atomically before the
CSR is sent, and a key found without a certificate is reused. The hub's
answer is saved whole (``trust/enrollment.json``) before anything is taken
from it, and the certificate is written last: a restart finishes from the
saved answer instead of asking again (the hub never issues an id twice).

Secrets stay secret: neither the provisioning key, nor the private key, nor
a token's PIN is ever logged or put in an error message.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID
from tuf.api.metadata import Metadata, Root

from skylift.agent import pkcs11
from skylift.agent.config import AgentConfig
from skylift.agent.hubclient import (
    GATEWAY_PREFIX,
    IdentityError,
    PinnedFiles,
    _one_line,
    _TooLarge,
    _TooSlow,
    _transient,
    _Transport,
    pinned_files,
    tls_context,
)
from skylift.agent.ports import HubUnreachableError
from skylift.device_identity import (
    DEVICE_URI_PREFIX,
    DevicePrivateKey,
    generate_device_key,
    make_csr,
    private_key_pem,
)
from skylift.errors import UserInputError
from skylift.fsutil import atomic_write, read_bounded

__all__ = ["EnrollmentError", "Identity", "IdentityError", "ensure_identity"]

log = logging.getLogger("skylift.agent.enroll")

_MAX_KEY_FILE_BYTES = 16 * 1024
_MAX_CERT_FILE_BYTES = 64 * 1024
_MAX_PROVISIONING_KEY_BYTES = 1024
_MAX_PROVISIONING_KEY_CHARS = 128
#: The answer carries a certificate, a CA and two roots: bounded by the roots.
_ANSWER_FIELDS = ("certificate", "ca", "director_root", "image_root", "poll_interval_s")


class EnrollmentError(IdentityError):
    """The hub refused to enroll the device, or answered with something unusable."""

    hint = ""


@dataclass(frozen=True)
class Identity:
    """What the device proves itself with, and where its pinned roots are.

    ``enrolled`` is True when this call enrolled the device (or finished an
    enrollment a crash interrupted); ``poll_interval_s`` is the hub's, then.
    ``key_file`` is None when the key is in a PKCS#11 token.
    """

    device_id: str
    cert_file: Path
    key_file: Path | None
    pinned: PinnedFiles
    enrolled: bool
    poll_interval_s: float | None = None


def ensure_identity(config: AgentConfig, *, now: datetime) -> Identity:
    """Use the device's certificate, or enroll once to get one (see the module docstring).

    ``now`` is the time certificates are checked against.

    Raises:
        IdentityError: a file is missing, unreadable or does not fit (a
            certificate without its key, for another device or key, expired;
            no certificate and no provisioning key; no pinned roots beside a
            factory certificate), or the PKCS#11 key cannot be used (module,
            engine, token, object or PIN: one line, never the PIN).
        EnrollmentError: the hub refused the enrollment (bad or used-up
            provisioning key, other product, id taken) or answered badly.
        HubUnreachableError: the hub could not be reached, timed out or
            answered 5xx; try again later.
    """
    identity = config.identity
    pinned = pinned_files(config)
    if identity.pkcs11_uri is not None:
        return _token_identity(config, identity.pkcs11_uri, pinned, now)
    key_file = identity.key_file
    if key_file is None:  # pragma: no cover - the configuration names one of the two
        raise IdentityError("[identity] names neither key_file nor pkcs11_uri")

    if identity.cert_file.exists():
        if not key_file.exists():
            raise IdentityError(f"{identity.cert_file} exists but its key {key_file} does not")
        key = _load_key(key_file)
        cert = _load_certificate(identity.cert_file)
        _check_certificate(cert, key.public_key(), identity.device_id, identity.cert_file, now)
        _require_roots(pinned)
        return Identity(identity.device_id, identity.cert_file, key_file, pinned, enrolled=False)

    key = _load_key(key_file) if key_file.exists() else _new_key(key_file)
    csr = partial(make_csr, key, identity.device_id)
    return _enroll(config, pinned, key.public_key(), csr, key_file, now)


def _token_identity(config: AgentConfig, uri: str, pinned: PinnedFiles, now: datetime) -> Identity:
    """:func:`ensure_identity` for a key that stays in a PKCS#11 token."""
    identity = config.identity
    try:
        with pkcs11.load_key(uri, module=identity.pkcs11_module) as key:
            public = key.public_key()
            if not identity.cert_file.exists():
                csr = partial(key.make_csr, identity.device_id)
                return _enroll(config, pinned, public, csr, None, now)
    except pkcs11.Pkcs11Error as e:
        raise IdentityError(e.message, hint=e.hint) from e
    cert = _load_certificate(identity.cert_file)
    _check_certificate(cert, public, identity.device_id, identity.cert_file, now)
    _require_roots(pinned)
    return Identity(identity.device_id, identity.cert_file, None, pinned, enrolled=False)


def _enroll(
    config: AgentConfig,
    pinned: PinnedFiles,
    public: PublicKeyTypes,
    csr: Callable[[], bytes],
    key_file: Path | None,
    now: datetime,
) -> Identity:
    """Finish a saved enrollment answer for ``public``, or ask the hub with ``csr()``."""
    identity = config.identity
    answer = _saved_answer(pinned, public, identity.device_id, now)
    if answer is None:
        if identity.provisioning_key_file is None:
            raise IdentityError(
                f"no device certificate at {identity.cert_file} and no provisioning key to "
                "enroll with",
                hint="set [identity] provisioning_key_file, or install a factory certificate",
            )
        secret = _read_provisioning_key(identity.provisioning_key_file)
        doc = _request_enrollment(config, csr(), secret)
        answer = _Answer.parse(doc, public, identity.device_id, now)
        try:
            pinned.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(pinned.enrollment, json.dumps(doc, sort_keys=True).encode())
        except OSError as e:
            raise IdentityError(
                f"cannot save the enrollment answer in {pinned.directory}: {e}"
            ) from e
    _install(answer, pinned, identity.cert_file)
    log.info("device %s enrolled with the hub at %s", identity.device_id, config.hub.url)
    return Identity(
        identity.device_id,
        identity.cert_file,
        key_file,
        pinned,
        enrolled=True,
        poll_interval_s=answer.poll_interval_s,
    )


# -- keys and certificates --------------------------------------------------------------------


def _load_key(path: Path) -> DevicePrivateKey:
    try:
        data = read_bounded(path, _MAX_KEY_FILE_BYTES, "device key")
    except UserInputError as e:
        raise IdentityError(e.message) from e
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the device key %s is readable by others (mode %o)", path, mode & 0o777)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Never the cause's text: it may quote the file.
        raise IdentityError(
            f"the device key {path} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise IdentityError(f"the device key {path} is neither an EC nor an ed25519 key")
    return key


def _new_key(path: Path) -> DevicePrivateKey:
    key = generate_device_key()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, private_key_pem(key), mode=0o600)
    except OSError as e:
        raise IdentityError(f"cannot write the device key {path}: {e.strerror or e}") from e
    log.info("generated the device key %s", path)
    return key


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        data = read_bounded(path, _MAX_CERT_FILE_BYTES, "device certificate")
        return x509.load_pem_x509_certificate(data)
    except UserInputError as e:
        raise IdentityError(e.message) from e
    except ValueError:
        raise IdentityError(f"the device certificate {path} is not a PEM certificate") from None


def _public_der(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _names(cert: x509.Certificate) -> set[str]:
    """The device ids a certificate names: SAN ``urn:skylift:device:`` URIs, else its CN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    found = {u[len(DEVICE_URI_PREFIX) :] for u in uris if u.startswith(DEVICE_URI_PREFIX)}
    if found:
        return found
    return {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}


def _check_certificate(
    cert: x509.Certificate,
    public: PublicKeyTypes,
    device_id: str,
    where: Path | str,
    now: datetime,
) -> None:
    if _public_der(cert.public_key()) != _public_der(public):
        raise IdentityError(f"the device certificate {where} is not for the device key")
    names = _names(cert)
    if names != {device_id}:
        shown = ", ".join(sorted(names)[:3]) or "no device"
        raise IdentityError(
            f"the device certificate {where} names {shown}, not {device_id}",
            hint="check [identity] device_id",
        )
    if cert.not_valid_after_utc <= now:
        raise IdentityError(
            f"the device certificate {where} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            hint="the device needs a new certificate",
        )
    if cert.not_valid_before_utc > now:
        # Boards without a real-time clock often boot in 1970: warn, TLS decides.
        log.warning("the device certificate %s is not valid yet (clock %s)", where, now)


def _require_roots(pinned: PinnedFiles) -> None:
    for path in (pinned.director_root, pinned.image_root):
        if not path.is_file():
            raise IdentityError(
                f"the pinned TUF root {path} is missing",
                hint="a device with a factory certificate needs its roots installed there",
            )


# -- talking to the hub -----------------------------------------------------------------------


def _read_provisioning_key(path: Path) -> str:
    try:
        data = read_bounded(path, _MAX_PROVISIONING_KEY_BYTES, "provisioning key file")
    except UserInputError as e:
        raise IdentityError(e.message) from e
    try:
        secret = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise IdentityError(f"the provisioning key file {path} is not ASCII text") from None
    if not secret or len(secret) > _MAX_PROVISIONING_KEY_CHARS or not secret.isprintable():
        raise IdentityError(
            f"the provisioning key file {path} does not hold one provisioning key (pk_...)"
        )
    return secret


def _request_enrollment(config: AgentConfig, csr: bytes, secret: str) -> dict[str, Any]:
    identity = config.identity
    body = json.dumps(
        {
            "device_id": identity.device_id,
            "product": identity.product,
            "hardware_id": identity.hardware_id,
            "csr": csr.decode("ascii"),
            "provisioning_key": secret,
        }
    ).encode()
    transport = _Transport(
        tls_context(config, client_cert=False),
        timeout_s=config.hub.request_timeout_s,
        maxsize=1,
        monotonic=time.monotonic,
    )
    limit = 4 * config.storage.max_metadata_bytes + 64 * 1024
    try:
        answer = transport.request(
            "POST",
            config.hub.url + GATEWAY_PREFIX + "/enroll",
            limit=limit,
            headers={"Content-Type": "application/json"},
            body=body,
            ok=(201,),
        )
    except (urllib3.exceptions.HTTPError, _TooSlow) as e:
        raise HubUnreachableError(
            f"enrollment: cannot reach the hub at {config.hub.url}: {_one_line(e)}"
        ) from e
    except _TooLarge as e:
        raise EnrollmentError(f"the hub's enrollment answer is {e}") from e
    finally:
        transport.close()
    if answer.status != 201:
        _refused(config, answer.status, answer.reason())
    try:
        doc = json.loads(answer.body)
    except ValueError:
        raise EnrollmentError("the hub's enrollment answer is not JSON") from None
    if not isinstance(doc, dict):
        raise EnrollmentError("the hub's enrollment answer is not a JSON object")
    return doc


def _refused(config: AgentConfig, status: int, reason: str) -> None:
    identity = config.identity
    if _transient(status):
        raise HubUnreachableError(f"enrollment: the hub answered {reason}")
    if status == 401:
        raise EnrollmentError(
            f"the hub refused the provisioning key in {identity.provisioning_key_file}: {reason}",
            hint="ask the operator for a valid provisioning key",
        )
    if status == 403:
        raise EnrollmentError(
            f"the provisioning key does not enroll devices of {identity.product}: {reason}",
            hint="check [identity] product and the provisioning key",
        )
    if status == 409:
        raise EnrollmentError(
            f"device id {identity.device_id} is taken on the hub: {reason}",
            hint="ids are never reused: give this device another [identity] device_id",
        )
    raise EnrollmentError(f"the hub refused the enrollment: {reason}")


# -- the answer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    certificate: bytes
    ca: bytes
    director_root: bytes
    image_root: bytes
    poll_interval_s: float | None

    @classmethod
    def parse(
        cls, doc: dict[str, Any], public: PublicKeyTypes, device_id: str, now: datetime
    ) -> _Answer:
        """Check an enrollment answer against the device's public key and id.

        Raises:
            EnrollmentError: a field is missing or unusable.
        """
        missing = [f for f in _ANSWER_FIELDS[:4] if f not in doc]
        if missing:
            raise EnrollmentError(f"the hub's enrollment answer lacks {', '.join(missing)}")
        certificate, ca = doc["certificate"], doc["ca"]
        if not isinstance(certificate, str) or not isinstance(ca, str):
            raise EnrollmentError("the hub's enrollment answer has no PEM certificate and CA")
        try:
            cert = x509.load_pem_x509_certificate(certificate.encode("ascii"))
            x509.load_pem_x509_certificate(ca.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise EnrollmentError("the hub's enrollment answer has an unusable PEM") from None
        try:
            _check_certificate(cert, public, device_id, "issued by the hub", now)
        except IdentityError as e:
            raise EnrollmentError(e.message) from e
        interval = doc.get("poll_interval_s")
        return cls(
            certificate=certificate.encode("ascii"),
            ca=ca.encode("ascii"),
            director_root=_root(doc["director_root"], "director"),
            image_root=_root(doc["image_root"], "image"),
            poll_interval_s=float(interval) if isinstance(interval, int | float) else None,
        )


def _root(value: object, kind: str) -> bytes:
    """A root as the hub answered it (JSON), checked to be a self-signed TUF root."""
    if not isinstance(value, dict):
        raise EnrollmentError(f"the hub's enrollment answer has no {kind} root")
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    try:
        md: Metadata[Root] = Metadata.from_bytes(data)
        if not isinstance(md.signed, Root):
            raise ValueError("not a root")
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except Exception as e:  # python-tuf raises several families for a bad document
        raise EnrollmentError(f"the hub's {kind} root is unusable: {_one_line(e)}") from e
    return data


def _saved_answer(
    pinned: PinnedFiles, public: PublicKeyTypes, device_id: str, now: datetime
) -> _Answer | None:
    """The answer a crash left behind, if it is for this key; else None."""
    path = pinned.enrollment
    if not path.exists():
        return None
    try:
        doc = json.loads(read_bounded(path, 8 * 1024 * 1024, "enrollment answer"))
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        return _Answer.parse(doc, public, device_id, now)
    except (UserInputError, ValueError, EnrollmentError) as e:
        reason = e.message if isinstance(e, UserInputError | EnrollmentError) else str(e)
        log.warning("ignoring the saved enrollment answer %s: %s", path, reason)
        return None


def _install(answer: _Answer, pinned: PinnedFiles, cert_file: Path) -> None:
    """Write the roots and CA, then the certificate: its presence means "enrolled"."""
    try:
        pinned.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(pinned.director_root, answer.director_root)
        atomic_write(pinned.image_root, answer.image_root)
        atomic_write(pinned.hub_ca, answer.ca)
        cert_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cert_file, answer.certificate)
    except OSError as e:
        raise IdentityError(f"cannot store the enrollment in {pinned.directory}: {e}") from e
