"""``POST /device/v1/enroll``: a device trades a provisioning key and a CSR for its certificate.

Order of checks, so that a refused request changes nothing and tells an
unauthenticated caller nothing:

1. the body's shape (400): bounded, exactly the expected fields, a valid
   device id, hardware id and CSR size;
2. the provisioning key (401): known, not revoked, not expired, not used up;
3. the product (403 unless it is the key's product);
4. the device id (409 if it exists or ever existed: a revoked or deleted id
   never comes back);
5. the CSR (400), then in one transaction: the key's use count (a
   conditional UPDATE, so concurrent enrollments cannot overshoot
   ``max_uses``), the device row and its empty director repository.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography import x509
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from skylift.errors import UserInputError
from skylift.hub import ca
from skylift.hub.auth import AuthError, Forbidden, hash_secret, secret_matches, secret_prefix
from skylift.hub.db.models import Device, EnrollmentMethod, Product, ProvisioningKey
from skylift.hub.web import Conflict, HubContext

__all__ = ["MAX_ENROLL_BYTES", "EnrollRequest", "enroll", "parse_enroll"]

#: An enrollment body: a CSR (at most ``ca.MAX_CSR_BYTES``) and a few short strings.
MAX_ENROLL_BYTES = 64 * 1024
_FIELDS = frozenset({"device_id", "product", "hardware_id", "csr", "provisioning_key"})
_HARDWARE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PRODUCT = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


@dataclass(frozen=True)
class EnrollRequest:
    """A well-formed enrollment request (not yet authenticated)."""

    device_id: str
    product: str
    hardware_id: str
    csr: bytes
    provisioning_key: str


def _string(doc: dict[str, Any], name: str, limit: int) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise UserInputError(f"{name} must be a string of 1 to {limit} characters")
    return value


def parse_enroll(doc: dict[str, Any]) -> EnrollRequest:
    """Check the shape of an enrollment body.

    Raises:
        UserInputError: a field is missing, unknown, of the wrong type or form.
        DeviceIdError: ``device_id`` is not a device id this hub can serve.
    """
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise UserInputError(f"unknown field {unknown[0][:40]!r} in the enrollment request")
    device_id = ca.validate_device_id(_string(doc, "device_id", 128))
    product = _string(doc, "product", 63)
    if not _PRODUCT.fullmatch(product):
        raise UserInputError("product is not a product name")
    hardware_id = _string(doc, "hardware_id", 128)
    if not _HARDWARE_ID.fullmatch(hardware_id):
        raise UserInputError("hardware_id: use 1-128 characters from A-Z a-z 0-9 . _ -")
    csr = _string(doc, "csr", ca.MAX_CSR_BYTES)
    key = _string(doc, "provisioning_key", 128)
    return EnrollRequest(device_id, product, hardware_id, csr.encode("utf-8"), key)


def enroll(ctx: HubContext, req: EnrollRequest) -> dict[str, Any]:
    """Enroll a device; the 201 body. Blocking.

    Raises:
        AuthError: the provisioning key is malformed, unknown, revoked, expired
            or used up.
        Forbidden: the key is for another product.
        Conflict: the device id exists or existed.
        CertificateError: the CSR is unusable (400).
        UnknownRepositoryError: the product has no image repository (404).
    """
    now = ctx.clock()
    secret_prefix(req.provisioning_key)  # shape first: AuthError without a query
    key_hash = hash_secret(req.provisioning_key)
    with ctx.transaction() as session:
        key = session.scalars(
            select(ProvisioningKey).where(ProvisioningKey.key_hash == key_hash)
        ).one_or_none()
        if key is None or not secret_matches(req.provisioning_key, key.key_hash):
            raise AuthError("the provisioning key is unknown")
        if key.revoked:
            raise AuthError("the provisioning key is revoked")
        if key.expires is not None and key.expires <= now:
            raise AuthError("the provisioning key has expired")
        if key.max_uses is not None and key.uses >= key.max_uses:
            raise AuthError("the provisioning key is used up")
        product = session.scalars(
            select(Product).where(Product.org_id == key.org_id, Product.name == req.product)
        ).one_or_none()
        if product is None or product.id != key.product_id:
            raise Forbidden(f"this provisioning key does not enroll devices of {req.product}")
        taken = session.scalar(select(Device.id).where(Device.device_id == req.device_id))
        # A deleted device's row is gone but its director repository is not.
        if taken is not None or ctx.director.has_device(req.device_id):
            raise Conflict(
                f"device id {req.device_id} is taken (ids are never reused)",
                hint="give this device another id",
            )
        image_root = json.loads(ctx.images.read(product.name, "metadata/1.root.json"))
        director_root = json.loads(ctx.director.roots()[0])
        cert_pem = ca.issue_device_cert(
            ctx.device_ca_pem,
            ctx.device_ca_key_pem,
            req.csr,
            device_id=req.device_id,
            now=now,
            valid_for=timedelta(days=ctx.config.device_cert_validity_days),
        )
        cert = x509.load_pem_x509_certificate(cert_pem)
        used = session.execute(
            update(ProvisioningKey)
            .where(
                ProvisioningKey.id == key.id,
                ProvisioningKey.revoked.is_(False),
                or_(
                    ProvisioningKey.max_uses.is_(None),
                    ProvisioningKey.uses < ProvisioningKey.max_uses,
                ),
            )
            .values(uses=ProvisioningKey.uses + 1)
            .execution_options(synchronize_session=False)
        )
        if getattr(used, "rowcount", 0) != 1:
            raise AuthError("the provisioning key is used up")
        session.add(
            Device(
                device_id=req.device_id,
                org_id=key.org_id,
                product_id=product.id,
                hardware_id=req.hardware_id,
                cert_fingerprint=ca.fingerprint(cert),
                cert_not_after=cert.not_valid_after_utc,
                enrolled_via=EnrollmentMethod.PROVISIONING,
            )
        )
        try:
            session.flush()
        except IntegrityError:
            # Another enrollment of the same id committed first.
            raise Conflict(f"device id {req.device_id} is taken (ids are never reused)") from None
        # Before the commit: a device row never exists without its repository.
        ctx.director.ensure(req.device_id)
    return {
        "certificate": cert_pem.decode("ascii"),
        "ca": ctx.device_ca_pem.decode("ascii"),
        "director_root": director_root,
        "image_root": image_root,
        "poll_interval_s": ctx.config.poll_interval_s,
    }
