"""Who is calling the device gateway: client certificate -> device, checked on every request.

The TLS handshake is not enough. TLS 1.3 resumption carries the client
certificate of the first handshake and never verifies it again
(``skylift.hub.tls``), so a device keeps resuming after its certificate
expired, its signer CA was removed or it was revoked. Every request is
therefore checked here, at the application level:

- the certificate chains to the hub's device CA or a registered, non-revoked
  signer CA, and it and its issuer are valid *now* (``ca.verify_device_cert``);
- it is the certificate registered for the device it names;
- the device is not revoked.

What it costs: the full check (signature, database row) runs once per
certificate and is then cached by fingerprint. A cached identity is used
from memory, which keeps the poll path free of database work, and is kept
honest by :meth:`Identities.sync`, which a background loop runs about every
second:

- **revocations** are read from the database (devices stamped ``revoked_at``
  in the last :data:`REVOCATION_WINDOW_S`) into a per-process revoked set,
  so a device revoked by any hub process is refused within about a second
  (one revoked without a ``revoked_at`` stamp, within about a minute);
  a revocation made through this process's own API is immediate when the
  API calls :func:`skylift.hub.gateway.invalidate`;
- **signer CAs** are re-read (a small table); removing or revoking one drops
  every cached identity it vouched for, adding one also adds it to the live
  TLS context in ``ctx.extra["gateway_ssl"]`` (``skylift.hub.server``);
- each cached identity is **re-checked** against its devices row every
  :data:`REVALIDATE_S` (deleted devices, a replaced certificate) with one
  indexed ``IN`` query per batch, and one not re-checked for
  :data:`MAX_STALE_S` is not used at all;
- certificate **expiry** is compared with the hub's clock on every request.

A device whose certificate chains to a registered signer CA (made on a
factory line) and that the hub does not know yet is registered on its first
connection: product from the signer CA (or, for a CA registered for every
product of its organisation, from the ``X-Skylift-Product`` header), hardware
id from ``X-Skylift-Hardware`` (``unknown`` without one).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography import x509
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.types import Scope

from skylift.hub import ca
from skylift.hub.auth import AuthError, Forbidden
from skylift.hub.db.models import Device, EnrollmentMethod, Product, SignerCA
from skylift.hub.tls import client_cert_der, client_cert_from_proxy
from skylift.hub.web import HubContext

__all__ = [
    "HARDWARE_HEADER",
    "MAX_STALE_S",
    "PRODUCT_HEADER",
    "REVALIDATE_S",
    "REVOCATION_WINDOW_S",
    "DeviceRef",
    "Identities",
]

log = logging.getLogger("skylift.hub.gateway")

HARDWARE_HEADER = "x-skylift-hardware"
"""Hardware id a factory-certified device announces on its first connection."""
PRODUCT_HEADER = "x-skylift-product"
"""Product a factory-certified device names when its signer CA serves several."""

_HARDWARE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: A cached identity is re-checked against the devices table this often.
REVALIDATE_S = 30.0
#: A cached identity not re-checked for this long is checked again before use.
MAX_STALE_S = 120.0
#: Revocations stamped this far back are read on every sync: it covers clock
#: differences between hub processes and transactions that commit late.
REVOCATION_WINDOW_S = 60.0
#: Identities unused this long are dropped rather than re-checked (idle devices
#: poll every few minutes at most; re-reading them costs a miss, not an error).
_IDLE_S = 900.0
#: Revocations without a revoked_at stamp are looked for this often (see _sync_revocations).
_UNSTAMPED_SCAN_S = 60.0
_MAX_CACHED = 200_000
_REVALIDATE_BATCH = 1000
_UNKNOWN_HARDWARE = "unknown"


@dataclass(frozen=True)
class DeviceRef:
    """A verified caller: its devices row and the certificate it came with."""

    pk: int
    device_id: str
    org_id: int
    product_id: int
    product: str
    fingerprint: str
    issuer_fingerprint: str
    #: The earlier of the certificate's and its issuer's end of validity.
    not_after: datetime


@dataclass(frozen=True)
class _Signer:
    id: int
    org_id: int
    product_id: int | None
    fingerprint: str
    pem: bytes
    not_after: datetime


@dataclass
class _Entry:
    ref: DeviceRef
    validated_at: float
    last_used: float


# Each request of a connection brings the same certificate bytes object
# (skylift.hub.tls caches the PEM-to-DER step), whose hash Python keeps: a
# cache hit costs one dict lookup instead of a SHA-256 per poll.
@functools.lru_cache(maxsize=4096)
def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _peer_is_trusted(
    scope: Scope, proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    client = scope.get("client")
    if not proxies or not client:
        return False
    try:
        peer = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return any(peer in net for net in proxies)


class Identities:
    """Certificate-to-device resolution with a revocation-aware cache; one per hub process.

    Lookups (:meth:`lookup`) are memory only and safe on the event loop;
    :meth:`resolve` and :meth:`sync` touch the database and belong in a thread.
    """

    def __init__(self, ctx: HubContext, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._ctx = ctx
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # fingerprint -> entry, oldest validation first (the sweep's order).
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_device: dict[str, str] = {}
        self._revoked: set[str] = set()
        self._revoked_loaded = False
        self._unstamped_scanned = 0.0
        self._signers: dict[str, _Signer] | None = None
        device_ca = x509.load_pem_x509_certificate(ctx.device_ca_pem)
        self._device_ca_fp = ca.fingerprint(device_ca)
        self._device_ca_not_after = device_ca.not_valid_after_utc

    # ------------------------------------------------------------------ the request path

    def certificate(self, scope: Scope) -> bytes:
        """The caller's client certificate (DER): from the TLS connection, or a trusted proxy.

        Behind a proxy listed in ``trusted_proxies`` only the header counts,
        never a certificate the proxy itself presents.

        Raises:
            AuthError: there is none.
            ForwardedCertificateError: a trusted proxy's header is unusable.
        """
        proxies = self._ctx.config.trusted_proxies
        der = (
            client_cert_from_proxy(scope, proxies)
            if _peer_is_trusted(scope, proxies)
            else client_cert_der(scope)
        )
        if der is None:
            raise AuthError(
                "this endpoint needs a device client certificate (mutual TLS)",
                hint="enroll first: POST /device/v1/enroll",
            )
        return der

    def lookup(self, der: bytes) -> DeviceRef | None:
        """The cached, still valid identity for ``der``; None when it must be resolved.

        Raises:
            Forbidden: the device is revoked, or the certificate has expired since
                it was checked.
        """
        fp = _fingerprint(der)
        now = self._monotonic()
        with self._lock:
            entry = self._entries.get(fp)
            if entry is None or now - entry.validated_at > MAX_STALE_S:
                return None
            entry.last_used = now
            ref = entry.ref
            revoked = ref.device_id in self._revoked
        if revoked:
            raise Forbidden(f"device {ref.device_id} is revoked")
        if self._ctx.clock() > ref.not_after:
            raise Forbidden(
                f"the client certificate of device {ref.device_id} expired at "
                f"{ref.not_after.isoformat()}"
            )
        return ref

    def resolve(self, der: bytes, *, hardware: str | None, product: str | None) -> DeviceRef:
        """Verify ``der`` now, find (or register) its device, and cache the result. Blocking.

        Raises:
            Forbidden: the certificate does not verify now, names an unknown or
                revoked device, or is not the one registered for its device.
            SQLAlchemyError, StorageError: the database or the object store
                (registering a factory device) failed.
        """
        now = self._ctx.clock()
        signers = self._signer_map()
        trusted = [self._ctx.device_ca_pem, *(s.pem for s in signers.values())]
        try:
            ident = ca.verify_device_cert(der, trusted, now=now)
        except ca.CertificateError as e:
            raise Forbidden(f"client certificate refused: {e.message}") from e
        signer = None
        issuer_not_after = self._device_ca_not_after
        if ident.issuer_fingerprint != self._device_ca_fp:
            signer = signers[ident.issuer_fingerprint]
            issuer_not_after = signer.not_after
        if self.is_revoked(ident.device_id):
            raise Forbidden(f"device {ident.device_id} is revoked")
        ref = self._find_or_register(ident, signer, hardware, product)
        ref = replace(ref, not_after=min(ident.not_after, issuer_not_after))
        self._remember(ref)
        return ref

    def _find_or_register(
        self,
        ident: ca.DeviceIdentity,
        signer: _Signer | None,
        hardware: str | None,
        product: str | None,
    ) -> DeviceRef:
        # Two first connections of one factory device may race to register it:
        # the loser's insert fails on the unique id and the retry finds the row.
        try:
            with self._ctx.transaction() as session:
                return self._device_for(session, ident, signer, hardware, product)
        except IntegrityError:
            pass
        try:
            with self._ctx.transaction() as session:
                return self._device_for(session, ident, signer, hardware, product)
        except IntegrityError:
            raise Forbidden(f"device {ident.device_id} could not be registered") from None

    def _device_for(
        self,
        session: Session,
        ident: ca.DeviceIdentity,
        signer: _Signer | None,
        hardware: str | None,
        product: str | None,
    ) -> DeviceRef:
        row = session.execute(
            select(Device, Product.name)
            .join(Product, Product.id == Device.product_id)
            .where(Device.device_id == ident.device_id)
        ).one_or_none()
        if row is None:
            if signer is None:
                # Issued by the hub's own CA but not (or no longer) a device: deleted.
                raise Forbidden(f"device {ident.device_id} is not registered on this hub")
            return self._register(session, ident, signer, hardware, product)
        device, product_name = row
        if device.revoked:
            with self._lock:
                self._revoked.add(device.device_id)
            raise Forbidden(f"device {device.device_id} is revoked")
        if device.cert_fingerprint != ident.fingerprint:
            raise Forbidden(
                f"this certificate is not the one registered for device {device.device_id}"
            )
        if signer is not None and (
            signer.org_id != device.org_id or signer.product_id not in (None, device.product_id)
        ):
            raise Forbidden(
                f"the CA that issued this certificate may not vouch for device {device.device_id}"
            )
        return DeviceRef(
            pk=device.id,
            device_id=device.device_id,
            org_id=device.org_id,
            product_id=device.product_id,
            product=product_name,
            fingerprint=ident.fingerprint,
            issuer_fingerprint=ident.issuer_fingerprint,
            not_after=ident.not_after,
        )

    def _register(
        self,
        session: Session,
        ident: ca.DeviceIdentity,
        signer: _Signer,
        hardware: str | None,
        product: str | None,
    ) -> DeviceRef:
        device_id = ident.device_id
        try:
            ca.validate_device_id(device_id)
        except ca.DeviceIdError as e:
            raise Forbidden(f"the certificate's {e}") from e
        hardware_id = hardware or _UNKNOWN_HARDWARE
        if not _HARDWARE_ID.fullmatch(hardware_id):
            raise Forbidden("the X-Skylift-Hardware header is not a valid hardware id")
        query = select(Product).where(Product.org_id == signer.org_id)
        if signer.product_id is not None:
            query = query.where(Product.id == signer.product_id)
        elif product:
            query = query.where(Product.name == product)
        else:
            raise Forbidden(
                "this device's CA serves several products: name one in X-Skylift-Product"
            )
        found = session.scalars(query).one_or_none()
        if found is None or (product and found.name != product):
            raise Forbidden("the product of this device is not one its CA may vouch for")
        # A deleted device leaves its director repository: its id stays spent.
        if self._ctx.director.has_device(device_id):
            raise Forbidden(f"device id {device_id} was used before and cannot come back")
        device = Device(
            device_id=device_id,
            org_id=signer.org_id,
            product_id=found.id,
            hardware_id=hardware_id,
            cert_fingerprint=ident.fingerprint,
            cert_not_after=ident.not_after,
            enrolled_via=EnrollmentMethod.SIGNER_CA,
        )
        session.add(device)
        session.flush()
        self._ctx.director.ensure(device_id)
        log.info("registered device %s from signer CA %s", device_id, signer.fingerprint[:16])
        return DeviceRef(
            pk=device.id,
            device_id=device_id,
            org_id=signer.org_id,
            product_id=found.id,
            product=found.name,
            fingerprint=ident.fingerprint,
            issuer_fingerprint=ident.issuer_fingerprint,
            not_after=ident.not_after,
        )

    def _remember(self, ref: DeviceRef) -> None:
        now = self._monotonic()
        with self._lock:
            old = self._by_device.get(ref.device_id)
            if old is not None and old != ref.fingerprint:
                self._entries.pop(old, None)
            self._entries[ref.fingerprint] = _Entry(ref, now, now)
            self._entries.move_to_end(ref.fingerprint)
            self._by_device[ref.device_id] = ref.fingerprint
            while len(self._entries) > _MAX_CACHED:
                _, dropped = self._entries.popitem(last=False)
                self._forget_locked(dropped.ref)

    def _forget_locked(self, ref: DeviceRef) -> None:
        self._entries.pop(ref.fingerprint, None)
        if self._by_device.get(ref.device_id) == ref.fingerprint:
            del self._by_device[ref.device_id]

    def forget(self, device_id: str) -> None:
        """Drop ``device_id``'s cached identity: its next request is checked in full."""
        with self._lock:
            fp = self._by_device.pop(device_id, None)
            if fp is not None:
                self._entries.pop(fp, None)

    def is_revoked(self, device_id: str) -> bool:
        """Whether this process knows ``device_id`` as revoked."""
        with self._lock:
            return device_id in self._revoked

    # ------------------------------------------------------------------ background sync

    def sync(self, session: Session) -> set[str]:
        """Refresh signer CAs, revocations and stale identities from the database. Blocking.

        Returns the device ids newly known as revoked or dropped (the caller
        forgets their poll answers too).

        Raises:
            SQLAlchemyError: the database failed; the caches stay as they were
                and the next sync tries again.
        """
        dropped = self._sync_signers(session)
        dropped |= self._sync_revocations(session)
        dropped |= self._revalidate(session)
        return dropped

    def _signer_map(self) -> dict[str, _Signer]:
        signers = self._signers
        if signers is None:
            with self._ctx.sessions() as session:
                self._sync_signers(session)
            signers = self._signers
        assert signers is not None
        return signers

    def _sync_signers(self, session: Session) -> set[str]:
        rows = session.execute(
            select(
                SignerCA.id,
                SignerCA.org_id,
                SignerCA.product_id,
                SignerCA.fingerprint,
                SignerCA.cert_pem,
            ).where(SignerCA.revoked.is_(False))
        ).all()
        old = self._signers or {}
        if self._signers is not None and {r.fingerprint for r in rows} == set(old):
            return set()
        new: dict[str, _Signer] = {}
        for r in rows:
            pem = r.cert_pem.encode()
            try:
                not_after = x509.load_pem_x509_certificate(pem).not_valid_after_utc
            except ValueError:
                log.warning("signer CA %s does not parse; ignored", r.fingerprint[:16])
                continue
            new[r.fingerprint] = _Signer(
                r.id, r.org_id, r.product_id, r.fingerprint, pem, not_after
            )
        self._signers = new
        gone = set(old) - set(new)
        dropped: set[str] = set()
        with self._lock:
            for entry in list(self._entries.values()):
                if entry.ref.issuer_fingerprint in gone:
                    self._forget_locked(entry.ref)
                    dropped.add(entry.ref.device_id)
        live = self._ctx.extra.get("gateway_ssl")
        if isinstance(live, ssl.SSLContext):
            for fp in set(new) - set(old):
                try:
                    # Effective from the next full handshake (skylift.hub.tls).
                    live.load_verify_locations(cadata=new[fp].pem.decode("ascii"))
                except (ssl.SSLError, ValueError) as e:
                    log.warning("signer CA %s not added to TLS: %s", fp[:16], e)
        return dropped

    def _sync_revocations(self, session: Session) -> set[str]:
        query = select(Device.device_id).where(Device.revoked.is_(True))
        now = self._monotonic()
        if self._revoked_loaded:
            since = self._ctx.clock() - timedelta(seconds=REVOCATION_WINDOW_S)
            recent = Device.revoked_at >= since
            if now - self._unstamped_scanned < _UNSTAMPED_SCAN_S:
                # The revoked_at index answers this at once, however large the fleet.
                query = query.where(recent)
            else:
                # revoked_at NULL: a row revoked by something that did not stamp
                # it. Every never-revoked device matches the NULL half too, so
                # this reads the whole table (30 ms at 100k devices on SQLite):
                # once a minute, not every second.
                query = query.where(or_(Device.revoked_at.is_(None), recent))
                self._unstamped_scanned = now
        else:
            self._unstamped_scanned = now
        revoked = set(session.scalars(query))
        with self._lock:
            new = revoked - self._revoked
            self._revoked |= new
            self._revoked_loaded = True
            for device_id in new:
                fp = self._by_device.pop(device_id, None)
                if fp is not None:
                    self._entries.pop(fp, None)
        return new

    def _revalidate(self, session: Session) -> set[str]:
        now = self._monotonic()
        batch: dict[str, str] = {}
        dropped: set[str] = set()
        with self._lock:
            for fp, entry in self._entries.items():
                if now - entry.validated_at < REVALIDATE_S or len(batch) >= _REVALIDATE_BATCH:
                    break
                batch[entry.ref.device_id] = fp
            for device_id, fp in list(batch.items()):
                if now - self._entries[fp].last_used > _IDLE_S:
                    self._forget_locked(self._entries[fp].ref)
                    del batch[device_id]
        if not batch:
            return dropped
        rows = {
            r.device_id: r
            for r in session.execute(
                select(Device.device_id, Device.cert_fingerprint, Device.revoked).where(
                    Device.device_id.in_(list(batch))
                )
            )
        }
        with self._lock:
            for device_id, fp in batch.items():
                cached = self._entries.get(fp)
                if cached is None:
                    continue
                row = rows.get(device_id)
                if row is None or row.revoked or row.cert_fingerprint != fp:
                    self._forget_locked(cached.ref)
                    dropped.add(device_id)
                    if row is not None and row.revoked:
                        self._revoked.add(device_id)
                else:
                    cached.validated_at = now
                    self._entries.move_to_end(fp)
        return dropped
