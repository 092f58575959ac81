"""The agent's side of the device gateway: :class:`HubClient`, the :class:`HubPort` over mutual TLS.

One urllib3 pool of keep-alive HTTPS connections presents the device's
certificate (``[identity] cert_file``/``key_file``) and trusts the hub's
server certificate through ``[hub] ca_file`` (the system store without
one). Every request has a connect and a per-read timeout
(``request_timeout_s``) and a deadline for the whole answer, and every answer
is read with a cap, so a hub or a middlebox that stalls, drips or streams
forever is cut off. Retrying, and backing off, is the caller's business.

:meth:`HubClient.check` is Uptane's rule on python-tuf's ngclient: refresh
the device's director repository and the product's image repository (both
through :class:`MTLSFetcher`, from the roots pinned at enrollment, see
:mod:`skylift.agent.enroll`), then :func:`cross_check` the director's
target against the image repository's: same name, length and hashes, this
product, this hardware, not older than what is installed. The rest fetches
what the updater needs for an offer it has accepted: the bundle head (the
TUF target, checked by length and SHA-256), a payload's chunk index (as one
zstd frame when the hub has it, else raw; the caller verifies the pages),
and byte ranges of its pack, several per request (``multipart/byteranges``).

Errors, as :mod:`skylift.agent.ports` defines them: transport failures,
timeouts, 5xx and refusals of the device's request during ``poll`` and
``check`` are :class:`HubUnreachableError` (nothing is decided; try again);
anything untrustworthy or not for this device, oversized answers included,
is :class:`UpdateRefusedError` with a one-line reason, also logged here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import urllib3
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from skylift.agent import pkcs11
from skylift.agent.config import AgentConfig
from skylift.agent.errors import ReportRejectedError, ReportTransportError
from skylift.agent.pairdelta import parse_deltas
from skylift.agent.plan import ByteRange
from skylift.agent.ports import (
    DeltaOffer,
    HubUnreachableError,
    Offer,
    PayloadOffer,
    PollAnswer,
    UpdateRefusedError,
)
from skylift.agent.reports import MAX_BATCH, Report
from skylift.chunks import IndexCorruptError, decompress_index
from skylift.errors import SkyliftError
from skylift.versions import compare_versions

__all__ = [
    "GATEWAY_PREFIX",
    "MAX_HEAD_BYTES",
    "MAX_RANGES_PER_REQUEST",
    "MAX_RANGE_REQUEST_BYTES",
    "HubClient",
    "IdentityError",
    "MTLSFetcher",
    "PinnedFiles",
    "cross_check",
    "parse_byteranges",
    "pinned_files",
    "tls_context",
]

log = logging.getLogger("skylift.agent.hubclient")

#: Where the device gateway lives under ``[hub] url``.
GATEWAY_PREFIX = "/device/v1"
#: As the hub's ``MAX_HEAD_BYTES``: a bundle head larger than this is refused.
MAX_HEAD_BYTES = 6 * 1024 * 1024
#: What the hub answers in one request at most (docs/api.md): 512 ranges, 64 MiB.
MAX_RANGES_PER_REQUEST = 512
MAX_RANGE_REQUEST_BYTES = 64 * 1024 * 1024
#: Default cap on a chunk index, compressed or not: a 100 GiB payload in 64 KiB chunks fits.
DEFAULT_MAX_RELEASE_FILE_BYTES = 64 * 1024 * 1024
#: Answers that are only JSON bookkeeping (poll, reports, errors).
_MAX_SMALL_ANSWER_BYTES = 64 * 1024
_MAX_ERROR_BYTES = 4096
_MAX_TIMESTAMP_BYTES = 64 * 1024
_READ_BYTES = 64 * 1024
# The whole-answer deadline is the request timeout plus the time the largest
# allowed answer takes at this rate: a link slower than this on average (a
# drip-feed, a middlebox trickling) is cut, however long each read takes.
_MIN_RATE_BYTES_PER_S = 16 * 1024
# A multipart part's delimiter and headers, at most (the hub's are about 120 bytes).
_PART_OVERHEAD_BYTES = 1024
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
_PAYLOAD = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*")
_USER_AGENT = "skylift-agent"


class IdentityError(SkyliftError):
    """The device's identity (certificate, key, pinned roots) is missing or cannot be used."""

    hint = "enroll the device (provisioning_key_file) or install its factory certificate"


# -- the files the device trusts --------------------------------------------------------------


@dataclass(frozen=True)
class PinnedFiles:
    """Where the agent keeps what it trusts, under ``<state_dir>/trust/``.

    ``image_root`` and ``director_root`` are the TUF roots pinned at
    enrollment (version 1 of each, as the hub answered); a device with a
    factory certificate has them installed there by its image. ``hub_ca`` is
    the CA that issued the device certificate (the enrollment answer's
    ``ca``), kept for the record; ``enrollment`` is the enrollment answer
    itself, saved before anything else so a crash never loses a certificate
    the hub issued.
    """

    directory: Path

    @property
    def image_root(self) -> Path:
        """The product image repository's root, version 1."""
        return self.directory / "image-root.json"

    @property
    def director_root(self) -> Path:
        """The director repository's root, version 1."""
        return self.directory / "director-root.json"

    @property
    def hub_ca(self) -> Path:
        """The CA that issued the device certificate."""
        return self.directory / "hub-ca.pem"

    @property
    def enrollment(self) -> Path:
        """The saved enrollment answer."""
        return self.directory / "enrollment.json"


def pinned_files(config: AgentConfig) -> PinnedFiles:
    """The trusted files' locations for ``config``."""
    return PinnedFiles(config.storage.state_dir / "trust")


def tls_context(config: AgentConfig, *, client_cert: bool = True) -> ssl.SSLContext:
    """A TLS 1.2+ client context for the hub: server checked, the device certificate presented.

    The server is verified against ``[hub] ca_file``, or the system trust store
    without one; hostnames are checked. ``client_cert=False`` is for enrollment.
    A ``pkcs11_uri`` key stays in its token: the context signs handshakes
    there (:mod:`skylift.agent.pkcs11`).

    Raises:
        IdentityError: a certificate, key or CA file cannot be loaded, or the
            PKCS#11 module, engine, token, PIN or key cannot be used.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca_file = config.hub.ca_file
    try:
        if ca_file is not None:
            ctx.load_verify_locations(cafile=str(ca_file))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as e:
        raise IdentityError(
            f"cannot load the hub CA {ca_file}: {_one_line(e)}", hint="check [hub] ca_file"
        ) from e
    if client_cert:
        identity = config.identity
        if identity.pkcs11_uri is not None:
            try:
                with pkcs11.load_key(identity.pkcs11_uri, module=identity.pkcs11_module) as key:
                    key.install(ctx, identity.cert_file)
            except pkcs11.Pkcs11Error as e:
                raise IdentityError(e.message, hint=e.hint) from e
            return ctx
        try:
            ctx.load_cert_chain(str(identity.cert_file), str(identity.key_file))
        except (OSError, ssl.SSLError) as e:
            raise IdentityError(
                f"cannot load the device certificate {identity.cert_file} "
                f"with its key {identity.key_file}: {_one_line(e)}"
            ) from e
    return ctx


# -- versions and the Uptane cross-check (pure) -----------------------------------------------


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _payloads(custom: Mapping[str, Any], name: str) -> tuple[PayloadOffer, ...]:
    raw = custom.get("payloads", {})
    if not isinstance(raw, dict):
        raise UpdateRefusedError(f"{name}: the custom field 'payloads' is not an object")
    payloads = []
    for payload, doc in sorted(raw.items()):
        if not (
            isinstance(payload, str)
            and _PAYLOAD.fullmatch(payload)
            and isinstance(doc, dict)
            and type(doc.get("size")) is int
            and doc["size"] >= 0
            and isinstance(doc.get("sha256"), str)
            and _SHA256.fullmatch(doc["sha256"])
            and isinstance(doc.get("slot_class"), str)
        ):
            raise UpdateRefusedError(f"{name}: payload {_short(payload, 40)} is malformed")
        payloads.append(PayloadOffer(payload, doc["slot_class"], doc["size"], doc["sha256"]))
    return tuple(payloads)


def cross_check(
    director: Mapping[str, TargetFile],
    image: Callable[[str], TargetFile | None],
    *,
    product: str,
    hardware_id: str,
    installed_version: str | None,
    allow_downgrade: bool,
    max_head_bytes: int = MAX_HEAD_BYTES,
) -> Offer | None:
    """Uptane's rule: the offer both verified repositories agree on, or None.

    ``director`` is the device's director targets (verified); ``image`` looks a
    target up in the product's verified image repository. None when the
    director names nothing, or names the installed version.

    Raises:
        UpdateRefusedError: the director names more than one target, or one the
            image repository lacks or describes otherwise (length, hashes); the
            target is for another product or hardware, older than
            ``installed_version`` (unless ``allow_downgrade``), malformed, or
            its head larger than ``max_head_bytes``.
    """
    if not director:
        return None
    if len(director) > 1:
        names = ", ".join(sorted(director)[:3])
        raise UpdateRefusedError(
            f"the director names {len(director)} targets ({names}); a device installs one"
        )
    ((name, wanted),) = director.items()
    listed = image(name)
    if listed is None:
        raise UpdateRefusedError(
            f"the director names {_short(name)}, which the image repository does not list"
        )
    differences = []
    if listed.length != wanted.length:
        differences.append(f"length {wanted.length} (director) vs {listed.length} (image)")
    if dict(listed.hashes) != dict(wanted.hashes):
        differences.append("the hashes differ")
    if differences:
        raise UpdateRefusedError(
            f"the director and the image repository disagree on {_short(name)}: "
            + ", ".join(differences)
        )
    sha256 = listed.hashes.get("sha256")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise UpdateRefusedError(f"{_short(name)} has no SHA-256 hash in the image repository")
    custom = listed.custom
    version = custom.get("version")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise UpdateRefusedError(f"{_short(name)} has no valid version: {_short(version)}")
    if name != f"{version}.head":
        raise UpdateRefusedError(f"target {_short(name)} does not name version {version}.head")
    if custom.get("product") != product:
        raise UpdateRefusedError(
            f"{name} is for product {_short(custom.get('product'))}, not {product}"
        )
    hardware = custom.get("hardware_ids")
    if not isinstance(hardware, list) or not all(isinstance(h, str) for h in hardware):
        raise UpdateRefusedError(f"{name} has no list of hardware ids")
    if hardware_id not in hardware:
        raise UpdateRefusedError(
            f"{name} is for hardware {_short(hardware)}, not this device's {hardware_id}"
        )
    if listed.length > max_head_bytes:
        raise UpdateRefusedError(
            f"{name}: the bundle head is {listed.length} bytes; this agent takes at most "
            f"{max_head_bytes}"
        )
    if installed_version is not None:
        order = compare_versions(version, installed_version)
        if order == 0:
            return None
        if order < 0 and not allow_downgrade:
            raise UpdateRefusedError(
                f"{name} is older than the installed {installed_version} "
                "(a downgrade must be allowed explicitly)"
            )
    deployment = wanted.custom.get("deployment_id")
    # The director's own field (its online key signs it): optional, so a
    # malformed entry costs the delta, not the update.
    deltas, skipped = parse_deltas(wanted.custom)
    for reason in skipped:
        log.warning("director target %s: %s; ignored", name, reason)
    return Offer(
        product=product,
        version=version,
        target_name=name,
        length=listed.length,
        sha256=sha256,
        hardware_ids=tuple(hardware),
        payloads=_payloads(custom, name),
        deployment_id=deployment if type(deployment) is int else None,
        custom=dict(custom),
        deltas=deltas,
    )


# -- multipart/byteranges (pure) --------------------------------------------------------------


def _content_range(value: str | None) -> tuple[int, int]:
    """``(start, end_exclusive)`` of a ``Content-Range`` value."""
    match = _CONTENT_RANGE.fullmatch(value or "")
    if match is None:
        raise UpdateRefusedError(f"the hub sent a bad Content-Range: {_short(value, 60)}")
    start, last = int(match.group(1)), int(match.group(2))
    if last < start:
        raise UpdateRefusedError(f"the hub sent a bad Content-Range: {_short(value, 60)}")
    return start, last + 1


def parse_byteranges(
    body: bytes, content_type: str, *, max_parts: int = MAX_RANGES_PER_REQUEST
) -> list[tuple[int, bytes]]:
    """The parts of a ``multipart/byteranges`` body: ``(start offset, bytes)`` each.

    Each part's length is taken from its ``Content-Range``, so a boundary
    string inside the data cannot cut it.

    Raises:
        UpdateRefusedError: not multipart, no boundary, a part without a valid
            ``Content-Range``, truncated, or more than ``max_parts`` parts.
    """
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/byteranges":
        raise UpdateRefusedError(f"the hub sent {_short(kind.strip(), 60)}, not byte ranges")
    boundary = ""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not 1 <= len(boundary) <= 70:
        raise UpdateRefusedError("the hub's multipart answer has no usable boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    position = body.find(delimiter)
    if position < 0:
        raise UpdateRefusedError("the hub's multipart answer has no part")
    position += len(delimiter)
    parts: list[tuple[int, bytes]] = []
    while not body.startswith(b"--", position):
        line_end = body.find(b"\r\n", position)
        headers_end = body.find(b"\r\n\r\n", position)
        if line_end < 0 or headers_end < line_end:
            raise UpdateRefusedError("the hub's multipart answer is truncated")
        content_range = None
        for line in body[line_end + 2 : headers_end].split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-range":
                content_range = value
        start, end = _content_range(content_range)
        data_start = headers_end + 4
        data = body[data_start : data_start + (end - start)]
        position = data_start + len(data)
        if len(data) != end - start or not body.startswith(b"\r\n" + delimiter, position):
            raise UpdateRefusedError("the hub's multipart answer is truncated")
        position += 2 + len(delimiter)
        parts.append((start, data))
        if len(parts) > max_parts:
            raise UpdateRefusedError(f"the hub's multipart answer has over {max_parts} parts")
    if not parts:
        raise UpdateRefusedError("the hub's multipart answer has no part")
    return parts


def _slice(parts: Sequence[tuple[int, bytes]], wanted: ByteRange) -> bytes:
    for start, data in parts:
        if start <= wanted.start and wanted.end <= start + len(data):
            return data[wanted.start - start : wanted.end - start]
    raise UpdateRefusedError(
        f"the hub's answer lacks bytes {wanted.start}-{wanted.end - 1} of the pack"
    )


def _groups(
    ranges: Sequence[ByteRange], max_ranges: int, max_bytes: int = MAX_RANGE_REQUEST_BYTES
) -> Iterator[list[ByteRange]]:
    """Ranges in request-sized groups, in the order given (bounded count and bytes)."""
    group: list[ByteRange] = []
    size = 0
    for r in ranges:
        if group and (len(group) >= max_ranges or size + r.length > max_bytes):
            yield group
            group, size = [], 0
        group.append(r)
        size += r.length
    if group:
        yield group


# -- HTTP plumbing ----------------------------------------------------------------------------


# urllib3 prefixes its errors with the connection's repr; the message names the hub already.
_CONNECTION_REPR = re.compile(r"^\w*Connection(Pool)?\([^)]*\): ")


def _one_line(error: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = _CONNECTION_REPR.sub("", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_line(body: bytes) -> str:
    """The hub's ``{"error": ...}`` line, or nothing useful."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return _one_line(doc["error"])
    return ""


class _TooLarge(Exception):
    """An answer went past its cap."""


class _TooSlow(Exception):
    """An answer did not arrive by its deadline."""


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def reason(self) -> str:
        line = _error_line(self.body)
        return f"HTTP {self.status}" + (f": {line}" if line else "")


def _transient(status: int) -> bool:
    """Statuses that say "later", not "no": server errors, timeouts, rate limits."""
    return status >= 500 or status in (408, 429)


class _Transport:
    """A keep-alive pool with per-request timeouts, bounded reads and deadlines."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        timeout_s: float,
        maxsize: int,
        monotonic: Callable[[], float],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.monotonic = monotonic
        # Sent with every request (urllib3's pool-wide headers are replaced, not
        # merged, by a request's own, so they are merged in open()).
        self.headers = {"User-Agent": _USER_AGENT, **(headers or {})}
        self.pool = urllib3.PoolManager(
            num_pools=2,
            maxsize=maxsize,
            ssl_context=context,
            retries=False,
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        )

    def budget_s(self, limit: int) -> float:
        """How long an answer of at most ``limit`` bytes may take, in all."""
        return self.timeout_s + limit / _MIN_RATE_BYTES_PER_S

    def open(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """Send a request; the response with its body unread. Raises urllib3's errors."""
        return self.pool.request(
            method,
            url,
            body=body,
            headers={**self.headers, **(headers or {})},
            preload_content=False,
            decode_content=False,  # never asked for compression: no decompression bombs
            redirect=False,
        )

    def chunks(self, response: urllib3.BaseHTTPResponse, limit: int) -> Iterator[bytes]:
        """The body in pieces; raises _TooLarge past ``limit``, _TooSlow past its budget.

        The connection goes back to the pool only after a whole body; a body
        cut short closes it (draining an endless stream would never end).
        """
        received = 0
        whole = False
        budget_s = self.budget_s(limit)
        deadline = self.monotonic() + budget_s
        try:
            while True:
                piece = response.read1(_READ_BYTES, decode_content=False)
                if not piece:
                    whole = True
                    return
                received += len(piece)
                if received > limit:
                    raise _TooLarge(f"more than {limit} bytes")
                if self.monotonic() > deadline:
                    raise _TooSlow(f"not complete after {budget_s:.0f} s")
                yield piece
        finally:
            if not whole:
                response.close()
            response.release_conn()

    def read(self, response: urllib3.BaseHTTPResponse, limit: int) -> bytes:
        return b"".join(self.chunks(response, limit))

    def request(
        self,
        method: str,
        url: str,
        *,
        limit: int,
        error_limit: int = _MAX_ERROR_BYTES,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        ok: Iterable[int] = (200,),
    ) -> _Answer:
        """One whole request; an error status's body is read only up to ``error_limit``.

        Raises:
            urllib3.exceptions.HTTPError, _TooLarge, _TooSlow.
        """
        response = self.open(method, url, headers=headers, body=body)
        good = response.status in set(ok)
        try:
            data = self.read(response, limit if good else error_limit)
        except _TooLarge:
            if good:
                raise
            data = b""  # an oversized error page: its status says enough
        return _Answer(response.status, dict(response.headers.items()), data)

    def close(self) -> None:
        self.pool.clear()


class MTLSFetcher(FetcherInterface):
    """python-tuf's fetcher port over the client's mutual-TLS pool.

    ngclient bounds every download's length (``download_bytes``); this adds
    the deadline, and tells transport failures (:class:`SlowRetrievalError`,
    or a :class:`DownloadError` caused by urllib3) from HTTP statuses
    (:class:`DownloadHTTPError`).
    """

    def __init__(self, transport: _Transport, *, max_bytes: int) -> None:
        self._transport = transport
        self._max_bytes = max_bytes

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._transport.open("GET", url)
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exceptions.DownloadError(f"{_where(url)}: {_one_line(e)}") from e
        if response.status != 200:
            status = response.status
            response.close()
            response.release_conn()
            raise tuf_exceptions.DownloadHTTPError(f"HTTP {status} for {_where(url)}", status)
        return self._pieces(url, response)

    def _pieces(self, url: str, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        # ngclient cuts at its own max_length; this limit is only the backstop.
        limit = self._max_bytes + 1
        try:
            yield from self._transport.chunks(response, limit)
        except _TooLarge as e:
            raise tuf_exceptions.DownloadLengthMismatchError(f"{_where(url)}: {e}") from e
        except _TooSlow as e:
            raise tuf_exceptions.SlowRetrievalError(f"{_where(url)}: too slow, {e}") from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exceptions.DownloadError(f"{_where(url)}: {_one_line(e)}") from e


def _where(url: str) -> str:
    """A URL for messages: the path only (the host is the configured hub)."""
    return urlsplit(url).path or url


# -- the client -------------------------------------------------------------------------------


class HubClient:
    """:class:`~skylift.agent.ports.HubPort` against a real hub, over mutual TLS.

    Not thread-safe: one updater drives it. ``monotonic`` is the clock of the
    per-answer deadlines (tests pass their own).

    Raises (constructor):
        IdentityError: the certificate, key or hub CA cannot be loaded.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        max_release_file_bytes: int = DEFAULT_MAX_RELEASE_FILE_BYTES,
        pool_maxsize: int = 2,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._base = config.hub.url + GATEWAY_PREFIX
        self._max_release_file_bytes = max_release_file_bytes
        self._transport = _Transport(
            tls_context(config),
            timeout_s=config.hub.request_timeout_s,
            maxsize=pool_maxsize,
            monotonic=monotonic,
            # What the hub registers a factory-certified device with on its first
            # connection when its signer CA serves several products (docs/api.md).
            headers={
                "X-Skylift-Product": config.identity.product,
                "X-Skylift-Hardware": config.identity.hardware_id,
            },
        )
        self._pinned = pinned_files(config)
        self._tuf_dir = config.storage.state_dir / "tuf"
        # The ETag the hub's last poll answer carried, and the one the updater
        # has acted on (a check that completed): a failed check must not be
        # hidden behind a 304 at the next poll.
        self._seen_etag: str | None = None
        self._acted_etag: str | None = None
        self._poll_interval_s: float | None = None

    def close(self) -> None:
        """Close the pooled connections."""
        self._transport.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- poll -------------------------------------------------------------

    def poll(self, *, state: str, progress: int | None) -> PollAnswer:
        """``GET /poll`` with ``If-None-Match`` and ``X-Skylift-State``; see :class:`HubPort`.

        ``progress`` travels in reports: the poll path has no field for it.

        Raises:
            HubUnreachableError: transport failure, timeout, any status but 200
                and 304, or an answer that is not the gateway's.
        """
        headers = {"X-Skylift-State": state}
        if self._acted_etag is not None:
            headers["If-None-Match"] = self._acted_etag
        try:
            answer = self._call(
                "poll",
                "GET",
                "/poll",
                limit=_MAX_SMALL_ANSWER_BYTES,
                headers=headers,
                ok=(200, 304),
            )
        except _TooLarge as e:
            # Nothing is decided on a poll: an oversized answer is the hub's fault, try later.
            raise HubUnreachableError(f"poll: the hub's answer is {e}") from e
        if answer.status == 304:
            return PollAnswer(changed=False, poll_interval_s=self._poll_interval_s)
        if answer.status != 200:
            raise HubUnreachableError(f"poll: the hub answered {answer.reason()}")
        try:
            doc = json.loads(answer.body)
            interval = doc["poll_interval_s"]
            if type(interval) not in (int, float) or not 0 < interval <= 7 * 86400:
                raise ValueError("poll_interval_s out of range")
        except (ValueError, TypeError, KeyError) as e:
            raise HubUnreachableError(f"poll: the hub's answer is malformed: {_one_line(e)}") from e
        self._seen_etag = answer.headers.get("ETag") or answer.headers.get("etag")
        self._poll_interval_s = float(interval)
        return PollAnswer(changed=True, poll_interval_s=self._poll_interval_s)

    # -- check ------------------------------------------------------------

    def _updater(self, kind: str, metadata_url: str, root: Path) -> Updater:
        try:
            pinned = root.read_bytes()
        except OSError as e:
            raise IdentityError(
                f"no pinned {kind} root at {root}: {e.strerror or e}",
                hint="enroll the device, or install the roots with its factory certificate",
            ) from e
        directory = self._tuf_dir / kind
        limit = self._config.storage.max_metadata_bytes
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return Updater(
                metadata_dir=str(directory),
                metadata_base_url=metadata_url,
                target_base_url=f"{self._base}/image/targets/",
                fetcher=MTLSFetcher(self._transport, max_bytes=limit),
                config=UpdaterConfig(
                    max_root_rotations=32,
                    max_delegations=1,
                    root_max_length=limit,
                    timestamp_max_length=min(limit, _MAX_TIMESTAMP_BYTES),
                    snapshot_max_length=limit,
                    targets_max_length=limit,
                ),
                bootstrap=pinned,
            )
        except tuf_exceptions.RepositoryError as e:
            raise IdentityError(f"the pinned {kind} root {root} is unusable: {e}") from e
        except OSError as e:
            raise HubUnreachableError(
                f"cannot keep {kind} metadata in {directory}: {e.strerror or e}"
            ) from e

    def _refresh(self, kind: str, updater: Updater) -> None:
        """Refresh one repository, translating python-tuf's errors into the port's."""
        try:
            updater.refresh()
        except tuf_exceptions.DownloadLengthMismatchError as e:
            self._refuse(f"{kind} repository: an answer is longer than allowed ({_one_line(e)})")
        except tuf_exceptions.DownloadHTTPError as e:
            raise HubUnreachableError(f"{kind} repository: {_one_line(e)}") from e
        except tuf_exceptions.DownloadError as e:
            raise HubUnreachableError(f"{kind} repository: {_one_line(e)}") from e
        except tuf_exceptions.RepositoryError as e:
            self._refuse(f"{kind} repository: {type(e).__name__}: {_one_line(e)}")
        except OSError as e:
            raise HubUnreachableError(
                f"cannot keep {kind} metadata under {self._tuf_dir}: {e.strerror or e}"
            ) from e

    def _refuse(self, reason: str) -> NoReturn:
        log.warning("update refused: %s", reason)
        raise UpdateRefusedError(reason)

    def _director_targets(self, updater: Updater) -> dict[str, TargetFile]:
        # ngclient has no public "list every target"; the top-level targets it
        # just verified and persisted are in its metadata directory.
        path = self._tuf_dir / "director" / "targets.json"
        try:
            data = path.read_bytes()
            targets: Metadata[Targets] = Metadata.from_bytes(data)
        except (OSError, ValueError) as e:
            raise HubUnreachableError(f"cannot read the verified director targets: {e}") from e
        if targets.signed.delegations is not None:
            self._refuse("the director's targets delegate; a device's director must not")
        return dict(targets.signed.targets)

    def check(self, *, installed_version: str | None, allow_downgrade: bool) -> Offer | None:
        """Refresh the director and image repositories and :func:`cross_check` them.

        Raises:
            HubUnreachableError: transport failure, timeout or an HTTP error status.
            UpdateRefusedError: metadata that does not verify (signatures,
                expiry, rollback, oversize), or a cross-check that fails.
            IdentityError: a pinned root is missing or unusable.
        """
        identity = self._config.identity
        director = self._updater(
            "director",
            f"{self._base}/director/{quote(identity.device_id, safe='')}/metadata/",
            self._pinned.director_root,
        )
        self._refresh("director", director)
        assigned = self._director_targets(director)
        offer = None
        if assigned:
            image = self._updater("image", f"{self._base}/image/metadata/", self._pinned.image_root)
            self._refresh("image", image)

            def lookup(name: str) -> TargetFile | None:
                try:
                    return image.get_targetinfo(name)
                except tuf_exceptions.RepositoryError as e:
                    self._refuse(f"image repository: {type(e).__name__}: {_one_line(e)}")
                except tuf_exceptions.DownloadError as e:
                    raise HubUnreachableError(f"image repository: {_one_line(e)}") from e

            try:
                offer = cross_check(
                    assigned,
                    lookup,
                    product=identity.product,
                    hardware_id=identity.hardware_id,
                    installed_version=installed_version,
                    allow_downgrade=allow_downgrade,
                    max_head_bytes=min(MAX_HEAD_BYTES, self._config.storage.max_metadata_bytes),
                )
            except UpdateRefusedError as e:
                log.warning("update refused: %s", e.message)
                raise
        self._acted_etag = self._seen_etag or self._acted_etag
        return offer

    # -- content ----------------------------------------------------------

    def fetch_head(self, offer: Offer) -> bytes:
        """The bundle head from the image repository's consistent path, length and SHA-256 checked.

        Raises:
            HubUnreachableError: transport failure, timeout, 5xx.
            UpdateRefusedError: another status, or bytes that are not the head.
        """
        if not _SHA256.fullmatch(offer.sha256) or not 0 <= offer.length <= MAX_HEAD_BYTES:
            raise UpdateRefusedError(f"{offer.target_name}: the offer's length or hash is invalid")
        path = f"/image/targets/{offer.sha256}.{quote(offer.target_name, safe='')}"
        data = self._content("bundle head", path, limit=offer.length)
        if len(data) != offer.length:
            self._refuse(
                f"{offer.target_name}: the head is {len(data)} bytes, the metadata says "
                f"{offer.length}"
            )
        if hashlib.sha256(data).hexdigest() != offer.sha256:
            self._refuse(f"{offer.target_name}: the head's SHA-256 is not the one signed")
        return data

    def _release_path(self, offer: Offer, payload: str, kind: str) -> str:
        if not _VERSION.fullmatch(offer.version) or not _PAYLOAD.fullmatch(payload):
            raise ValueError(f"not a release file: {offer.version!r} {payload!r}")
        if offer.payloads and payload not in {p.name for p in offer.payloads}:
            raise ValueError(f"release {offer.version} has no payload {payload!r}")
        return f"/releases/{quote(offer.version, safe='')}/{payload}.{kind}"

    def fetch_index(self, offer: Offer, payload: str) -> bytes:
        """The chunk index pages of one payload (the caller verifies them).

        ``<payload>.index.zst`` first, the pages as one zstd frame (a fifth
        of the bytes for an image in 4 KiB blocks); ``<payload>.index`` when
        the hub has no compressed copy (a release published before it made
        them). Neither is trusted: the pages are verified by the caller.

        Raises:
            HubUnreachableError: transport failure, timeout, 5xx.
            UpdateRefusedError: another status, larger than the cap (compressed
                or not), or a compressed index that is not one sound zstd frame.
        """
        limit = self._max_release_file_bytes
        packed = self._content_answer(
            "chunk index",
            self._release_path(offer, payload, "index.zst"),
            limit=limit,
            ok=(404,),
        )
        if packed.status == 404:
            path = self._release_path(offer, payload, "index")
            return self._content("chunk index", path, limit=limit)
        try:
            return decompress_index(packed.body, limit)
        except IndexCorruptError as e:
            self._refuse(f"chunk index: {e.message}")

    def fetch_ranges(
        self, offer: Offer, payload: str, ranges: Sequence[ByteRange]
    ) -> Iterator[tuple[ByteRange, bytes]]:
        """Byte ranges of one payload's pack, in order, several per request.

        At most ``[download] max_ranges_per_request`` ranges and
        ``max_range_bytes`` (at most 64 MiB) per request; the hub merges
        neighbours, and each range asked is cut out of whatever part holds it.
        Empty ranges are answered without a request.

        Raises:
            HubUnreachableError: transport failure, timeout, 5xx.
            UpdateRefusedError: another status, or an answer that is not the
                ranges asked (whole pack, truncated, malformed, missing bytes).
            ValueError: a range with its end before its start.
        """
        path = self._release_path(offer, payload, "pack")
        for r in ranges:
            if r.start < 0 or r.length < 0:
                raise ValueError(f"not a byte range: {r.start}-{r.end}")
        per_request = min(self._config.download.max_ranges_per_request, MAX_RANGES_PER_REQUEST)
        # A whole answer is held while its ranges are cut out: its size bounds the
        # agent's memory (bench/agent_install.py), so it is the configured range size.
        max_bytes = min(self._config.download.max_range_bytes, MAX_RANGE_REQUEST_BYTES)
        for group in _groups(ranges, per_request, max_bytes):
            wanted = [r for r in group if r.length > 0]
            parts = self._fetch_group(path, wanted) if wanted else []
            for r in group:
                yield r, (_slice(parts, r) if r.length > 0 else b"")

    def fetch_delta(self, offer: Offer, delta: DeltaOffer, dest: Path) -> int:
        """Download a per-pair delta into ``dest`` (mode 0600), resuming after what it holds.

        Range requests of at most ``[download] max_range_bytes`` each, so
        memory stays bounded and an interrupted download resumes; at most
        ``length / max_range_bytes + 1`` requests.

        Raises:
            HubUnreachableError: transport failure, timeout, 5xx (``dest`` keeps
                what arrived).
            UpdateRefusedError: another status (the hub has no such delta),
                or an answer that is not the range asked.
        """
        path = self._release_path(offer, delta.payload, f"{delta.from_sha256}.delta")
        piece = min(self._config.download.max_range_bytes, MAX_RANGE_REQUEST_BYTES)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a file left by someone else keeps no wider mode
        got = 0
        with os.fdopen(fd, "ab") as f:
            have = f.seek(0, os.SEEK_END)
            if have > delta.length:
                f.truncate(0)
                have = 0
            while have < delta.length:
                n = min(piece, delta.length - have)
                answer = self._content_answer(
                    "delta",
                    path,
                    limit=n,
                    headers={"Range": f"bytes={have}-{have + n - 1}"},
                    ok=(206,),
                )
                content_range = answer.headers.get("Content-Range") or answer.headers.get(
                    "content-range"
                )
                if answer.status != 206:
                    self._refuse("delta: the hub answered the whole file, not the range asked")
                if _content_range(content_range) != (have, have + n) or len(answer.body) != n:
                    self._refuse("delta: the hub's answer is not the range asked")
                f.write(answer.body)
                f.flush()
                have += n
                got += n
            os.fsync(f.fileno())
        return got

    def _fetch_group(self, path: str, group: list[ByteRange]) -> list[tuple[int, bytes]]:
        header = "bytes=" + ",".join(r.header_value() for r in group)
        limit = sum(r.length for r in group) + _PART_OVERHEAD_BYTES * (len(group) + 1)
        answer = self._content_answer(
            "pack ranges", path, limit=limit, headers={"Range": header}, ok=(206,)
        )
        if answer.status == 200:
            self._refuse("the hub answered the whole pack instead of the ranges asked")
        content_type = answer.headers.get("Content-Type") or answer.headers.get("content-type")
        if content_type and content_type.lower().startswith("multipart/"):
            return parse_byteranges(answer.body, content_type, max_parts=len(group))
        content_range = answer.headers.get("Content-Range") or answer.headers.get("content-range")
        start, end = _content_range(content_range)
        if end - start != len(answer.body):
            self._refuse("the hub's range answer does not match its Content-Range")
        return [(start, answer.body)]

    def _content(self, what: str, path: str, *, limit: int) -> bytes:
        return self._content_answer(what, path, limit=limit).body

    def _content_answer(
        self,
        what: str,
        path: str,
        *,
        limit: int,
        headers: Mapping[str, str] | None = None,
        ok: Iterable[int] = (200,),
    ) -> _Answer:
        ok = tuple(ok)
        try:
            answer = self._call(what, "GET", path, limit=limit, headers=headers, ok=(*ok, 200))
        except _TooLarge as e:
            self._refuse(f"{what}: the hub's answer is {e} (an endless or oversized answer)")
        if answer.status not in (*ok, 200):
            if _transient(answer.status):
                raise HubUnreachableError(f"{what}: the hub answered {answer.reason()}")
            self._refuse(f"{what}: the hub answered {answer.reason()}")
        return answer

    # -- reports ----------------------------------------------------------

    def send(self, reports: Sequence[Report]) -> None:
        """``POST /reports`` with one batch; returns once the hub confirmed it.

        Raises:
            ReportTransportError: not confirmed: transport failure, timeout,
                5xx, 401/403 (the device is refused, not its reports), or an
                answer that is not the gateway's.
            ReportRejectedError: 400 or 413: the hub refuses the reports as malformed.
        """
        if not reports:
            return
        if len(reports) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} reports per batch")
        body = json.dumps({"reports": [r.to_wire() for r in reports]}).encode()
        try:
            answer = self._call(
                "reports",
                "POST",
                "/reports",
                limit=_MAX_SMALL_ANSWER_BYTES,
                headers={"Content-Type": "application/json"},
                body=body,
            )
        except HubUnreachableError as e:
            raise ReportTransportError(e.message) from e
        except _TooLarge as e:
            raise ReportTransportError(f"reports: the hub's answer is {e}") from e
        if answer.status in (400, 413, 422):
            raise ReportRejectedError(f"reports: the hub refused them: {answer.reason()}")
        if answer.status != 200:
            raise ReportTransportError(f"reports: the hub answered {answer.reason()}")
        try:
            doc = json.loads(answer.body)
            confirmed = doc["stored"] + doc["duplicates"]
        except (ValueError, TypeError, KeyError) as e:
            raise ReportTransportError("reports: the hub's answer is malformed") from e
        if confirmed != len(reports):
            log.warning("the hub confirmed %s of %d reports", confirmed, len(reports))

    # -- plumbing ---------------------------------------------------------

    def _call(
        self,
        what: str,
        method: str,
        path: str,
        *,
        limit: int,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        ok: Iterable[int] = (200,),
    ) -> _Answer:
        """One request; transport failures and deadlines become HubUnreachableError.

        Raises:
            HubUnreachableError: refused, reset, TLS failure, timeout, too slow.
            _TooLarge: a good answer larger than ``limit`` (the caller decides).
        """
        url = self._base + path
        try:
            return self._transport.request(
                method, url, limit=limit, headers=headers, body=body, ok=ok
            )
        except urllib3.exceptions.HTTPError as e:
            raise HubUnreachableError(
                f"{what}: cannot reach the hub at {self._config.hub.url}: {_one_line(e)}"
            ) from e
        except _TooSlow as e:
            raise HubUnreachableError(f"{what}: the hub's answer is too slow ({e})") from e
