"""The device key in a PKCS#11 token (secure element, TPM, smart card): TLS and CSRs, key inside.

``[identity] pkcs11_uri`` names the key with an RFC 7512 URI
(``pkcs11:token=skylift;object=device?pin-source=file:/etc/skylift/pin``);
``pkcs11_module`` names the PKCS#11 module (default: the p11-kit proxy,
which reaches every module registered with p11-kit: SoftHSM2, OpenSC,
tpm2-pkcs11, ...).

Python's :mod:`ssl` loads private keys from PEM files only, and OpenSSL 3.0
as Debian 12 ships it has no PKCS#11 provider. So the key is reached the way
``openssl s_client -engine pkcs11 -keyform engine`` reaches it: through
libp11's OpenSSL engine ``pkcs11`` (package libengine-pkcs11-openssl),
driven with :mod:`ctypes` on **the same libcrypto and libssl that Python's
``_ssl`` module is linked with** (symbols are looked up through ``_ssl``'s
own handle, and the version is checked against :data:`ssl.OPENSSL_VERSION_NUMBER`).
:meth:`TokenKey.install` puts the engine's ``EVP_PKEY`` and the certificate
chain into an :class:`ssl.SSLContext`'s ``SSL_CTX``: every TLS handshake then
signs inside the token. An OpenSSL configuration file cannot do this: it can
load the engine, but ``SSL_CTX_use_PrivateKey_file``, which
:meth:`ssl.SSLContext.load_cert_chain` calls, reads PEM files only.

The ``SSL_CTX*`` of an :class:`ssl.SSLContext` is the first field after
``PyObject_HEAD`` in CPython's ``PySSLContext``. It is used only after it is
proven to be that context: its options, read through OpenSSL, must equal
what Python reports, before and after Python flips one of them.

OpenSSL hands out one ``pkcs11`` engine per process, and libp11 loads one
module into it: the engine is initialised once and kept for the life of the
process (finishing it would ``C_Finalize`` the module under every key loaded
from it), so one agent process uses one module. A PKCS#11 login belongs to
the process too: once logged in, a token asks for no PIN until the agent
restarts. Each ``SSL_CTX`` holds its own reference to its key.

The PIN comes from the URI (``pin-source=file:...`` preferred, or
``pin-value=...``). It is handed to the engine and to nothing else: never
logged, never in an error, never in :func:`repr`. Without a PIN the engine is
not allowed to prompt on a terminal; a token that needs one is an error.
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import re
import ssl
import sys
import sysconfig
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from skylift.device_identity import device_subject, validate_device_id
from skylift.errors import SkyliftError

__all__ = [
    "Pkcs11Error",
    "Pkcs11Uri",
    "TokenKey",
    "default_module",
    "load_key",
    "parse_uri",
]

_MAX_PIN_FILE_BYTES = 256
#: Path attributes (RFC 7512 section 2.3); ``x-`` vendor attributes are passed on too.
_PATH_ATTRIBUTES = frozenset(
    {
        "token", "manufacturer", "serial", "model", "library-manufacturer",
        "library-description", "library-version", "slot-manufacturer",
        "slot-description", "slot-id", "object", "type", "id",
    }
)  # fmt: skip
_QUERY_ATTRIBUTES = frozenset({"pin-source", "pin-value", "module-path"})
_PIN_ATTRIBUTES = frozenset({"pin-source", "pin-value"})
_ATTRIBUTE = re.compile(r"([a-z][a-z0-9-]*)=(.*)", re.DOTALL)

# OpenSSL 3 packs an error as (library, reason); a set top bit means "errno".
_ERR_SYSTEM_FLAG = 0x80000000
_ERR_REASON_MASK = 0x7FFFFF
# PKCS#11 return values libp11 reports as the reason of its "PKCS#11 module" errors.
_CKR_PIN_INCORRECT = 0xA0
_CKR_PIN_INVALID = 0xA1
_CKR_PIN_LEN_RANGE = 0xA2
_CKR_PIN_EXPIRED = 0xA3
_CKR_PIN_LOCKED = 0xA4
_CKR_TOKEN_NOT_PRESENT = 0xE0
_CKR_TOKEN_NOT_RECOGNIZED = 0xE1


class Pkcs11Error(SkyliftError):
    """The key in the PKCS#11 token cannot be used: module, engine, token, object or PIN."""

    hint = "check [identity] pkcs11_uri and pkcs11_module (see docs/agent-config.md)"


class _UnusableModule(Pkcs11Error):
    """The module itself did not load: the engine may still be pointed at another path."""


# -- the URI ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pkcs11Uri:
    """An RFC 7512 URI split into what the engine gets and what the agent keeps.

    ``engine_uri`` is the URI without its query and without any PIN: it is
    what the engine searches with, and what messages show. ``str()`` of the
    whole object is that same redacted text.
    """

    engine_uri: str
    pin_value: str | None = field(default=None, repr=False)
    pin_source: Path | None = None
    module_path: Path | None = None

    def __str__(self) -> str:
        return self.engine_uri


def parse_uri(uri: str) -> Pkcs11Uri:
    """Check ``uri`` and split off its PIN and module path; no file is opened.

    Accepted query attributes are ``pin-source`` (``file:`` URI or absolute
    path), ``pin-value`` and ``module-path``; ``pin-value`` is also taken from
    the path part, where OpenSC and libp11 examples often put it.

    Raises:
        ValueError: not a PKCS#11 URI, or an attribute this agent cannot use.
            The message never quotes a PIN.
    """
    if not uri.startswith("pkcs11:"):
        raise ValueError("must be a PKCS#11 URI (RFC 7512) starting with pkcs11:")
    if any(c.isspace() or not c.isprintable() for c in uri):
        raise ValueError("must not contain spaces or control characters")
    path, _, query = uri[len("pkcs11:") :].partition("?")
    kept: list[str] = []
    found: dict[str, str] = {}
    for part, separator, allowed in ((path, ";", _PATH_ATTRIBUTES), (query, "&", None)):
        for item in part.split(separator) if part else ():
            match = _ATTRIBUTE.fullmatch(item)
            if match is None:  # not quoted: it may be a PIN written without its name
                raise ValueError("has an attribute that is not name=value")
            name, value = match.groups()
            if name in _PIN_ATTRIBUTES or allowed is None:
                if name not in _QUERY_ATTRIBUTES:
                    raise ValueError(
                        f"query attribute {name} is not supported "
                        "(use pin-source, pin-value or module-path)"
                    )
                if name in found:
                    raise ValueError(f"{name} is given twice")
                found[name] = unquote(value)
                continue
            if name not in allowed and not name.startswith("x-"):
                raise ValueError(f"unknown path attribute {name}")
            kept.append(item)
    if "pin-source" in found and "pin-value" in found:
        raise ValueError("give pin-source or pin-value, not both")
    pin_source = None
    if "pin-source" in found:
        source = found["pin-source"]
        source = re.sub(r"^file://(?=/)", "", source)
        source = source.removeprefix("file:")
        if not source.startswith("/") or "\0" in source:
            raise ValueError("pin-source must be a file: URI or an absolute path")
        pin_source = Path(source)
    module_path = None
    if "module-path" in found:
        module_path = Path(found["module-path"])
        if not module_path.is_absolute():
            raise ValueError("module-path must be an absolute path")
    return Pkcs11Uri(
        engine_uri="pkcs11:" + ";".join(kept),
        pin_value=found.get("pin-value"),
        pin_source=pin_source,
        module_path=module_path,
    )


def default_module() -> Path | None:
    """The p11-kit proxy module if it is installed (it loads every registered module)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    candidates = [
        Path("/usr/lib") / multiarch / "p11-kit-proxy.so",
        Path("/usr/lib64/p11-kit-proxy.so"),
        Path("/usr/lib/p11-kit-proxy.so"),
    ]
    return next((p for p in candidates if p.is_file()), None)


# -- OpenSSL, as Python's _ssl has it ---------------------------------------------------------

_P = ctypes.c_void_p
_READER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_PROTOTYPES: tuple[tuple[str, Any, list[Any]], ...] = (
    ("OpenSSL_version_num", ctypes.c_ulong, []),
    ("ERR_get_error", ctypes.c_ulong, []),
    ("ERR_clear_error", None, []),
    ("ERR_lib_error_string", ctypes.c_char_p, [ctypes.c_ulong]),
    ("ERR_reason_error_string", ctypes.c_char_p, [ctypes.c_ulong]),
    ("ENGINE_by_id", _P, [ctypes.c_char_p]),
    ("ENGINE_ctrl_cmd_string", ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]),
    ("ENGINE_init", ctypes.c_int, [_P]),
    ("ENGINE_free", ctypes.c_int, [_P]),
    ("ENGINE_load_private_key", _P, [_P, ctypes.c_char_p, _P, _P]),
    ("UI_create_method", _P, [ctypes.c_char_p]),
    ("UI_method_set_reader", ctypes.c_int, [_P, _READER]),
    ("EVP_PKEY_free", None, [_P]),
    ("EVP_sha256", _P, []),
    ("i2d_PUBKEY", ctypes.c_int, [_P, ctypes.POINTER(_P)]),
    ("SSL_CTX_get_options", ctypes.c_uint64, [_P]),
    ("SSL_CTX_use_certificate_chain_file", ctypes.c_int, [_P, ctypes.c_char_p]),
    ("SSL_CTX_use_PrivateKey", ctypes.c_int, [_P, _P]),
    ("SSL_CTX_check_private_key", ctypes.c_int, [_P]),
    ("d2i_X509_NAME", _P, [_P, ctypes.POINTER(_P), ctypes.c_long]),
    ("X509_NAME_free", None, [_P]),
    ("X509_REQ_new", _P, []),
    ("X509_REQ_free", None, [_P]),
    ("X509_REQ_set_version", ctypes.c_int, [_P, ctypes.c_long]),
    ("X509_REQ_set_subject_name", ctypes.c_int, [_P, _P]),
    ("X509_REQ_set_pubkey", ctypes.c_int, [_P, _P]),
    ("X509_REQ_sign", ctypes.c_int, [_P, _P, _P]),
    ("i2d_X509_REQ", ctypes.c_int, [_P, ctypes.POINTER(_P)]),
)


class _OpenSSL:
    """The OpenSSL functions this module calls, bound with their C prototypes."""

    def __init__(self, dll: ctypes.CDLL) -> None:
        self.dll = dll
        for name, restype, argtypes in _PROTOTYPES:
            function = getattr(dll, name)
            function.restype = restype
            function.argtypes = argtypes

    def errors(self) -> list[tuple[str, int, str]]:
        """Drain this thread's OpenSSL error queue: ``(library, reason code, reason)``."""
        found = []
        while code := int(self.dll.ERR_get_error()):
            if code & _ERR_SYSTEM_FLAG:  # an errno, e.g. a file that is not there
                errno = code & ~_ERR_SYSTEM_FLAG
                found.append(("system", errno, os.strerror(errno)))
                continue
            library = self.dll.ERR_lib_error_string(code) or b"?"
            reason = self.dll.ERR_reason_error_string(code) or b""
            found.append(
                (
                    library.decode(errors="replace"),
                    code & _ERR_REASON_MASK,
                    reason.decode(errors="replace") or f"error {code:#x}",
                )
            )
        return found

    def der(self, i2d: Callable[..., int], obj: int) -> bytes:
        """The DER an ``i2d_*`` function writes for ``obj``."""
        size = int(i2d(obj, None))
        if size <= 0:
            raise Pkcs11Error(f"OpenSSL cannot DER-encode the object: {self.last_error()}")
        buffer = ctypes.create_string_buffer(size)
        cursor = _P(ctypes.addressof(buffer))
        if int(i2d(obj, ctypes.byref(cursor))) != size:
            raise Pkcs11Error(f"OpenSSL cannot DER-encode the object: {self.last_error()}")
        return buffer.raw

    def last_error(self) -> str:
        errors = self.errors()
        return errors[0][2] if errors else "no reason given"


_lock = threading.Lock()
_openssl: _OpenSSL | None = None
_the_engine: _Engine | None = None
_no_prompt: int | None = None


def _refuse(_ui: int | None, _string: int | None) -> int:
    # The engine asks for a PIN the URI did not give: fail, never wait on a terminal.
    return -1


_refuse_prompt = _READER(_refuse)


def _lib() -> _OpenSSL:
    global _openssl
    if _openssl is not None:
        return _openssl
    # dlsym through _ssl's handle searches _ssl and the libraries it was linked
    # with: the very libssl and libcrypto whose SSL_CTX an SSLContext holds.
    path = getattr(_ssl, "__file__", None)
    try:
        dll = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        openssl = _OpenSSL(dll)
    except (OSError, AttributeError) as e:
        raise Pkcs11Error(
            f"cannot reach the OpenSSL ENGINE API of Python's ssl module: {e}",
            hint="PKCS#11 keys need Python linked with OpenSSL 1.1.1 or 3.x",
        ) from e
    version = int(openssl.dll.OpenSSL_version_num())
    if version != ssl.OPENSSL_VERSION_NUMBER:
        raise Pkcs11Error(
            f"the OpenSSL found ({version:#x}) is not the one Python's ssl module uses "
            f"({ssl.OPENSSL_VERSION_NUMBER:#x})",
            hint="PKCS#11 keys need Python's _ssl linked with a shared OpenSSL",
        )
    _openssl = openssl
    return openssl


def _prompt_refuser(openssl: _OpenSSL) -> int:
    global _no_prompt
    if _no_prompt is None:
        method = openssl.dll.UI_create_method(b"skylift: no PIN prompt")
        if not method or openssl.dll.UI_method_set_reader(method, _refuse_prompt) != 0:
            raise Pkcs11Error(f"OpenSSL cannot make a UI method: {openssl.last_error()}")
        _no_prompt = int(method)
    return _no_prompt


@dataclass
class _Engine:
    """The process's pkcs11 engine, and the module libp11 loaded into it (then fixed)."""

    handle: int
    module: str | None = None


def _engine(openssl: _OpenSSL, module: Path) -> _Engine:
    """libp11's engine, initialised once for the process and pointed at ``module``.

    OpenSSL hands out one pkcs11 engine per process, and libp11 loads its
    PKCS#11 module once: until a key load has reached a module, the path may
    change; after that, another module is an error.
    """
    global _the_engine
    if not module.is_file():
        raise Pkcs11Error(
            f"the PKCS#11 module {module} does not exist",
            hint="install the token's PKCS#11 module or fix [identity] pkcs11_module",
        )
    wanted = os.path.realpath(module)
    dll = openssl.dll
    engine = _the_engine
    if engine is not None and engine.module is not None:
        if engine.module != wanted:
            raise Pkcs11Error(
                f"this agent already uses the PKCS#11 module {engine.module}, not {module}",
                hint="one module per process: the p11-kit proxy reaches several tokens",
            )
        return engine
    if engine is None:
        handle = dll.ENGINE_by_id(b"pkcs11")
        if not handle:
            openssl.errors()
            raise Pkcs11Error(
                "OpenSSL has no engine pkcs11",
                hint="install libp11's OpenSSL engine (Debian: libengine-pkcs11-openssl)",
            )
        # QUIET: libp11 writes its own errors to stderr; ours are one line each.
        dll.ENGINE_ctrl_cmd_string(handle, b"QUIET", None, 1)
    else:
        handle = engine.handle
    # libp11 loads the module at the first key load: the path is set before ENGINE_init.
    if dll.ENGINE_ctrl_cmd_string(handle, b"MODULE_PATH", os.fsencode(module), 0) != 1:
        raise Pkcs11Error(f"the pkcs11 engine refuses the module {module}: {openssl.last_error()}")
    if engine is None:
        if dll.ENGINE_init(handle) != 1:
            reason = openssl.last_error()
            dll.ENGINE_free(handle)
            raise Pkcs11Error(f"the pkcs11 engine cannot start with {module}: {reason}")
        # ENGINE_init's functional reference keeps it for the life of the process.
        dll.ENGINE_free(handle)
        engine = _the_engine = _Engine(int(handle))
    return engine


def _read_pin(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_PIN_FILE_BYTES + 1)
    except OSError as e:
        raise Pkcs11Error(
            f"cannot read the PIN file {path}: {e.strerror or type(e).__name__}",
            hint="fix pin-source in [identity] pkcs11_uri",
        ) from None
    if len(data) > _MAX_PIN_FILE_BYTES:
        raise Pkcs11Error(f"the PIN file {path} is longer than {_MAX_PIN_FILE_BYTES} bytes")
    pin = data.removesuffix(b"\n").removesuffix(b"\r")
    if not pin or b"\0" in pin:
        raise Pkcs11Error(f"the PIN file {path} holds no PIN")
    return pin


def _load_failure(
    uri: Pkcs11Uri, module: Path, errors: list[tuple[str, int, str]], *, pin: bool
) -> Pkcs11Error:
    """One line for what libp11 and the module said; no PIN is in their texts."""
    for library, reason, text in errors:
        if library == "PKCS#11 module":
            if reason in (_CKR_PIN_INCORRECT, _CKR_PIN_INVALID, _CKR_PIN_LEN_RANGE):
                return Pkcs11Error(
                    f"the token refused the PIN for {uri}",
                    hint="check the PIN that pin-source or pin-value gives",
                )
            if reason in (_CKR_PIN_LOCKED, _CKR_PIN_EXPIRED):
                state = "locked" if reason == _CKR_PIN_LOCKED else "expired"
                return Pkcs11Error(
                    f"the token's PIN for {uri} is {state}",
                    hint="the token's security officer must unblock or reset it",
                )
            if reason in (_CKR_TOKEN_NOT_PRESENT, _CKR_TOKEN_NOT_RECOGNIZED):
                return Pkcs11Error(
                    f"no token for {uri} is present", hint="check that the token is plugged in"
                )
        if library == "libp11" and "load" in text.lower() and "module" in text.lower():
            return _UnusableModule(
                f"cannot load the PKCS#11 module {module}: {text}",
                hint="check [identity] pkcs11_module",
            )
        if library == "UI routines":
            return Pkcs11Error(
                f"the token needs a PIN to use {uri}",
                hint="add ?pin-source=file:/path/to/pin to [identity] pkcs11_uri",
            )
        if "not found" in text.lower():
            # Without a login a token shows no private key: the URI may lack its PIN.
            return Pkcs11Error(
                f"no private key matches {uri} in the tokens of {module}",
                hint="check token=, object= or id= in [identity] pkcs11_uri (pkcs11-tool -O)"
                if pin
                else "add ?pin-source=file:/path/to/pin to [identity] pkcs11_uri if the token "
                "needs a login, else check its token=, object= or id=",
            )
    said = errors[0][2] if errors else "no reason given"
    return Pkcs11Error(f"cannot load the private key {uri} from {module}: {said}")


def _ssl_ctx(openssl: _OpenSSL, context: ssl.SSLContext) -> int:
    """The ``SSL_CTX*`` inside ``context``, proven to be it (see the module docstring)."""
    if sys.implementation.name != "cpython" or not isinstance(context, ssl.SSLContext):
        raise Pkcs11Error("PKCS#11 keys need CPython's ssl.SSLContext")
    pointer = _P.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        raise Pkcs11Error("cannot find the SSL_CTX of this ssl.SSLContext")
    probe = ssl.OP_CIPHER_SERVER_PREFERENCE  # server-side only: harmless on a client
    before = context.options
    matches = int(openssl.dll.SSL_CTX_get_options(pointer)) == int(before)
    try:
        context.options = before ^ probe
        matches = matches and int(openssl.dll.SSL_CTX_get_options(pointer)) == int(before ^ probe)
    finally:
        context.options = before
    if not matches:
        raise Pkcs11Error(
            "this Python's ssl.SSLContext does not hold its SSL_CTX where CPython does",
            hint="use a key_file, or a CPython build whose _ssl links a shared OpenSSL",
        )
    return int(pointer)


# -- the key ----------------------------------------------------------------------------------


class TokenKey:
    """A private key that stays in a PKCS#11 token, reached through OpenSSL's pkcs11 engine.

    Use as a context manager, or :meth:`close` it: an ``SSL_CTX`` it was
    installed into keeps its own reference.
    """

    def __init__(self, uri: Pkcs11Uri, module: Path, pkey: int, openssl: _OpenSSL) -> None:
        self.uri = uri
        self.module = module
        self._pkey: int | None = pkey
        self._openssl = openssl
        self.public_key_der: bytes = openssl.der(openssl.dll.i2d_PUBKEY, pkey)
        self._finalizer = weakref.finalize(self, openssl.dll.EVP_PKEY_free, pkey)

    def __repr__(self) -> str:
        return f"TokenKey({str(self.uri)!r}, module={str(self.module)!r})"

    def __enter__(self) -> TokenKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop this reference to the key (the token keeps the key itself)."""
        self._pkey = None
        self._finalizer()

    def _handle(self) -> int:
        if self._pkey is None:
            raise ValueError("the TokenKey is closed")
        return self._pkey

    def public_key(self) -> PublicKeyTypes:
        """The key's public half, as :mod:`cryptography` reads it."""
        return serialization.load_der_public_key(self.public_key_der)

    def install(self, context: ssl.SSLContext, cert_file: Path) -> None:
        """Make ``context`` present ``cert_file`` (PEM chain) and sign its handshakes in the token.

        Raises:
            Pkcs11Error: the context is not one this module can reach, the
                certificate file cannot be loaded, or it is not for this key.
        """
        pkey = self._handle()
        with _lock:
            openssl = self._openssl
            dll = openssl.dll
            dll.ERR_clear_error()
            ctx = _ssl_ctx(openssl, context)
            if dll.SSL_CTX_use_certificate_chain_file(ctx, os.fsencode(cert_file)) != 1:
                raise Pkcs11Error(
                    f"cannot load the device certificate {cert_file}: {openssl.last_error()}",
                    hint="install the device certificate (PEM) there",
                )
            if (
                dll.SSL_CTX_use_PrivateKey(ctx, pkey) != 1
                or dll.SSL_CTX_check_private_key(ctx) != 1
            ):
                openssl.errors()
                raise Pkcs11Error(
                    f"the device certificate {cert_file} is not for the token key {self.uri}",
                    hint="install the certificate issued for this key",
                )
            openssl.errors()

    def make_csr(self, device_id: str) -> bytes:
        """A PEM CSR for ``device_id``, signed in the token (the hub only checks the signature).

        Raises:
            Pkcs11Error: the token cannot sign (the key is not usable for signing).
            DeviceIdError: ``device_id`` is not of the allowed form.
        """
        validate_device_id(device_id)
        subject = device_subject(device_id).public_bytes()
        pkey = self._handle()
        with _lock:
            openssl = self._openssl
            dll = openssl.dll
            dll.ERR_clear_error()
            source = ctypes.create_string_buffer(subject, len(subject))
            name = dll.d2i_X509_NAME(None, ctypes.byref(_P(ctypes.addressof(source))), len(subject))
            request = dll.X509_REQ_new()
            try:
                ok = (
                    name
                    and request
                    and dll.X509_REQ_set_version(request, 0) == 1
                    and dll.X509_REQ_set_subject_name(request, name) == 1
                    and dll.X509_REQ_set_pubkey(request, pkey) == 1
                    and dll.X509_REQ_sign(request, pkey, dll.EVP_sha256()) > 0
                )
                if not ok:
                    raise Pkcs11Error(
                        f"the token cannot sign a CSR with {self.uri}: {openssl.last_error()}",
                        hint="the key must be a P-256 signing key",
                    )
                der = openssl.der(dll.i2d_X509_REQ, request)
            finally:
                dll.X509_REQ_free(request)
                dll.X509_NAME_free(name)
                openssl.errors()
        csr = x509.load_der_x509_csr(der)
        if not csr.is_signature_valid:
            raise Pkcs11Error(f"the token's signature on the CSR does not verify ({self.uri})")
        return csr.public_bytes(serialization.Encoding.PEM)


def load_key(uri: str, *, module: Path | None = None) -> TokenKey:
    """Open the private key ``uri`` names, in the token of ``module``.

    ``module`` defaults to the URI's ``module-path``, then to the p11-kit
    proxy. The PIN is read from ``pin-source`` (or ``pin-value``) each time.

    Raises:
        Pkcs11Error: one line, never quoting the PIN: the URI is malformed,
            the module or the engine is missing, the PIN file cannot be read,
            the token refused the PIN, or no such key is in the token.
    """
    try:
        parsed = parse_uri(uri)
    except ValueError as e:
        raise Pkcs11Error(f"[identity] pkcs11_uri: {e}") from None
    chosen = module or parsed.module_path or default_module()
    if chosen is None:
        raise Pkcs11Error(
            "no PKCS#11 module: the p11-kit proxy is not installed",
            hint="set [identity] pkcs11_module to the token's PKCS#11 module",
        )
    pin = parsed.pin_value.encode() if parsed.pin_value is not None else None
    if parsed.pin_source is not None:
        pin = _read_pin(parsed.pin_source)
    with _lock:
        openssl = _lib()
        openssl.dll.ERR_clear_error()
        engine = _engine(openssl, chosen)
        dll = openssl.dll
        if pin is not None and dll.ENGINE_ctrl_cmd_string(engine.handle, b"PIN", pin, 0) != 1:
            openssl.errors()
            raise Pkcs11Error("the pkcs11 engine does not take a PIN")
        ui = _prompt_refuser(openssl)
        pkey = dll.ENGINE_load_private_key(engine.handle, parsed.engine_uri.encode(), ui, None)
        errors = openssl.errors()
        failure = None if pkey else _load_failure(parsed, chosen, errors, pin=pin is not None)
        if not isinstance(failure, _UnusableModule):
            engine.module = os.path.realpath(chosen)
        if failure is not None:
            raise failure
        try:
            return TokenKey(parsed, chosen, int(pkey), openssl)
        except BaseException:
            dll.EVP_PKEY_free(pkey)
            raise
