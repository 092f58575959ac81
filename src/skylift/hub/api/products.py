"""Products, their image repositories, provisioning keys and signer CAs.

A product is created from offline-signed metadata (ADR 0004): a root whose
``targets`` role holds the release keys and whose ``snapshot`` and
``timestamp`` roles hold the hub's online key, and a first, empty targets
signed by the release keys. The hub never sees a release key or a root key.

Root and targets arrive as JSON objects inside the request and are stored
as compact JSON. That is safe for TUF: signatures cover the canonical form
of ``signed``, which python-tuf recomputes from whatever bytes it reads, so
any faithful JSON encoding of the same document verifies (a test checks it).

Product names are hub-wide, not per organisation: they name object-store
prefixes (``image/<product>/``). A name another organisation holds is a 409
("taken on this hub"), which says that the name is used, never by whom.
"""

from __future__ import annotations

import json
from typing import Any

from securesystemslib.signer import Key
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from tuf.api.metadata import Metadata

from skylift.errors import UserInputError
from skylift.hub import ca, web
from skylift.hub.api.common import (
    NAME,
    PRODUCT_NAME,
    Body,
    Query,
    authorize,
    conflict_on_duplicate,
    find_product,
    path_id,
    rfc3339,
    route,
)
from skylift.hub.auth import Role, issue_secret
from skylift.hub.db.models import Product, ProvisioningKey, ReleaseKey, SignerCA
from skylift.hub.web import Conflict, HubContext, NotFound, Principal
from skylift.trust.repository import MAX_METADATA_BYTES, role_keys

__all__ = [
    "key_json",
    "product_json",
    "revoke_provisioning_key",
    "revoke_signer_ca",
    "routes",
    "signer_ca_json",
]

#: A CA certificate in PEM: a few KiB; a chain or a bundle is refused by ca_info anyway.
_MAX_PEM_CHARS = 64 * 1024
_MAX_USES = 1_000_000_000
_ONLINE_ROLES = ("snapshot", "timestamp")


def product_json(product: Product) -> dict[str, Any]:
    """A product as the API shows it (its release keys must be loaded)."""
    return {
        "name": product.name,
        "release_threshold": product.release_threshold,
        "release_keys": [k.keyid for k in product.release_keys],
        "created": rfc3339(product.created),
    }


def _metadata_bytes(doc: dict[str, Any], what: str) -> bytes:
    # Compact and ASCII-only: a lone surrogate in a string cannot break the
    # encoding, and the document is at most as large as the body it came in.
    data = json.dumps(doc, separators=(",", ":")).encode()
    if len(data) > MAX_METADATA_BYTES:
        raise UserInputError(f"{what} is larger than {MAX_METADATA_BYTES} bytes")
    return data


def _release_keys(ctx: HubContext, root: bytes) -> tuple[list[Key], int]:
    """The release keys and threshold of an offline root, after checking its online roles.

    Raises:
        TrustError: the root is malformed or not signed by its own root keys.
        UserInputError: snapshot or timestamp is not exactly the hub's online key,
            or the root has expired.
    """
    online = ctx.online_signers[0].public_key
    for role in _ONLINE_ROLES:
        keys, threshold = role_keys(root, role)
        if not (
            len(keys) == 1
            and threshold == 1
            and keys[0].keyid == online.keyid
            and keys[0].to_dict() == online.to_dict()
        ):
            raise UserInputError(
                f"the root's {role} role must be exactly the hub's online key "
                f"{online.keyid[:16]}... with threshold 1",
                hint="take the snapshot and timestamp keys from GET /api/v1/hub (online_keys)",
            )
    if Metadata.from_bytes(root).signed.is_expired(ctx.clock()):
        raise UserInputError("the root metadata has expired", hint="sign a new one")
    return role_keys(root, "targets")


def signer_ca_json(row: SignerCA, product: str | None) -> dict[str, Any]:
    info = ca.ca_info(row.cert_pem.encode())
    return {
        "id": row.id,
        "name": row.name,
        "product": product,
        "fingerprint": row.fingerprint,
        "subject": info["subject"],
        "not_after": rfc3339(info["not_after"]),
        "revoked": row.revoked,
        "created": rfc3339(row.created),
    }


def key_json(key: ProvisioningKey, product: str) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "product": product,
        "prefix": key.prefix,
        "uses": key.uses,
        "max_uses": key.max_uses,
        "expires": rfc3339(key.expires),
        "revoked": key.revoked,
        "created": rfc3339(key.created),
    }


def _products_by_id(session: Session, org_id: int) -> dict[int, str]:
    # .all(): a Result has keys(), so dict() would take it for a mapping.
    return dict(
        session.execute(select(Product.id, Product.name).where(Product.org_id == org_id)).all()
    )


def revoke_provisioning_key(session: Session, who: Principal, key_id: int) -> None:
    """Revoke the caller's provisioning key ``key_id``, audited; again changes nothing.

    Raises:
        NotFound: no such key in the caller's organisation.
    """
    key = session.scalars(
        select(ProvisioningKey).where(
            ProvisioningKey.org_id == who.org_id, ProvisioningKey.id == key_id
        )
    ).one_or_none()
    if key is None:
        raise NotFound(f"no provisioning key {key_id}")
    if key.revoked:
        return  # nothing changes, nothing to record
    key.revoked = True
    web.audit(
        session, who, "provisioning_key.revoke", "provisioning_key", key.id, {"name": key.name}
    )


def revoke_signer_ca(session: Session, who: Principal, ca_id: int) -> None:
    """Revoke the caller's signer CA ``ca_id``, audited; again changes nothing.

    Raises:
        NotFound: no such CA in the caller's organisation.
    """
    row = session.scalars(
        select(SignerCA).where(SignerCA.org_id == who.org_id, SignerCA.id == ca_id)
    ).one_or_none()
    if row is None:
        raise NotFound(f"no signer CA {ca_id}")
    if row.revoked:
        return
    # Revoked, not deleted: the fingerprint stays taken, so the same
    # CA cannot quietly come back under another organisation.
    row.revoked = True
    web.audit(
        session,
        who,
        "signer_ca.revoke",
        "signer_ca",
        row.id,
        {"name": row.name, "fingerprint": row.fingerprint},
    )


def routes(ctx: HubContext) -> list[BaseRoute]:
    """Products, image files, provisioning keys, signer CAs."""

    async def list_products(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "listing products")
        Query(request, allowed=())

        def work() -> list[dict[str, Any]]:
            with ctx.transaction() as session:
                products = session.scalars(
                    select(Product)
                    .where(Product.org_id == who.org_id)
                    .options(selectinload(Product.release_keys))
                    .order_by(Product.name)
                )
                return [product_json(p) for p in products]

        return JSONResponse({"items": await web.run(work)})

    async def create_product(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "creating a product")
        Query(request, allowed=())
        body = Body(await web.read_json(request), required=("name", "root", "targets"))
        name = body.string("name", pattern=PRODUCT_NAME)
        root = _metadata_bytes(body.object("root"), "root")
        targets = _metadata_bytes(body.object("targets"), "targets")

        def work() -> dict[str, Any]:
            keys, threshold = _release_keys(ctx, root)
            with (
                conflict_on_duplicate(f"product {name} exists already"),
                ctx.transaction() as session,
            ):
                if session.scalar(
                    select(Product.id).where(Product.org_id == who.org_id, Product.name == name)
                ):
                    raise Conflict(f"product {name} exists already")
                if ctx.images.exists(name):
                    raise Conflict(
                        f"the product name {name} is taken on this hub",
                        hint="product names are hub-wide; choose another",
                    )
                product = Product(
                    org_id=who.org_id,
                    name=name,
                    release_threshold=threshold,
                    release_keys=[ReleaseKey(keyid=k.keyid, public_key=k.to_dict()) for k in keys],
                )
                session.add(product)
                session.flush()  # the constraints speak before the store is written
                web.audit(
                    session,
                    who,
                    "product.create",
                    "product",
                    name,
                    {"release_threshold": threshold, "release_keys": sorted(k.keyid for k in keys)},
                )
                # Last, because the store is not transactional: everything that
                # can refuse the product has refused it by now. It verifies the
                # targets against the root and signs snapshot and timestamp.
                ctx.images.create(name, root=root, targets=targets)
                return product_json(product)

        return JSONResponse(await web.run(work), 201)

    async def show_product(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "reading a product")
        Query(request, allowed=())

        def work() -> dict[str, Any]:
            with ctx.transaction() as session:
                return product_json(find_product(session, who, request.path_params["name"]))

        return JSONResponse(await web.run(work))

    async def image_file(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "reading an image repository")
        Query(request, allowed=())
        name, rel = request.path_params["name"], request.path_params["file"]

        def work() -> bytes:
            with ctx.transaction() as session:
                find_product(session, who, name)
            # As stored, byte for byte: a client verifies these signatures itself.
            return ctx.images.read(name, rel)

        data = await web.run(work)
        media = "application/json" if rel.startswith("metadata/") else "application/octet-stream"
        return Response(data, media_type=media)

    async def create_provisioning_key(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "creating a provisioning key")
        Query(request, allowed=())
        body = Body(
            await web.read_json(request), required=("name",), optional=("max_uses", "expires")
        )
        key_name = body.string("name", pattern=NAME)
        max_uses = body.optional_integer("max_uses", lo=1, hi=_MAX_USES)
        expires = body.optional_time("expires")
        if expires is not None and expires <= ctx.clock():
            raise UserInputError("expires is in the past")
        secret = issue_secret("pk")

        def work() -> dict[str, Any]:
            message = f"product {request.path_params['name']} has a provisioning key {key_name}"
            with conflict_on_duplicate(message), ctx.transaction() as session:
                product = find_product(session, who, request.path_params["name"])
                key = ProvisioningKey(
                    org_id=who.org_id,
                    product_id=product.id,
                    name=key_name,
                    key_hash=secret.digest,
                    prefix=secret.prefix,
                    max_uses=max_uses,
                    expires=expires,
                )
                session.add(key)
                session.flush()
                web.audit(
                    session,
                    who,
                    "provisioning_key.create",
                    "provisioning_key",
                    key.id,
                    {
                        "product": product.name,
                        "name": key_name,
                        "max_uses": max_uses,
                        "expires": rfc3339(expires),
                    },
                )
                return {**key_json(key, product.name), "key": secret.value}

        return JSONResponse(await web.run(work), 201)

    async def list_provisioning_keys(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "listing provisioning keys")
        Query(request, allowed=())

        def work() -> list[dict[str, Any]]:
            with ctx.transaction() as session:
                product = find_product(session, who, request.path_params["name"])
                keys = session.scalars(
                    select(ProvisioningKey)
                    .where(
                        ProvisioningKey.org_id == who.org_id,
                        ProvisioningKey.product_id == product.id,
                    )
                    .order_by(ProvisioningKey.id)
                )
                return [key_json(k, product.name) for k in keys]

        return JSONResponse({"items": await web.run(work)})

    async def revoke_key_endpoint(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "revoking a provisioning key")
        Query(request, allowed=())
        key_id = path_id(request, "key_id", "provisioning key")

        def work() -> None:
            with ctx.transaction() as session:
                revoke_provisioning_key(session, who, key_id)

        await web.run(work)
        return Response(status_code=204)

    async def create_signer_ca(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "registering a signer CA")
        Query(request, allowed=())
        body = Body(
            await web.read_json(request), required=("name", "certificate"), optional=("product",)
        )
        ca_name = body.string("name", pattern=NAME)
        product_name = body.optional_string("product", max_chars=64)
        pem = body.string("certificate", max_chars=_MAX_PEM_CHARS, multiline=True)
        info = ca.ca_info(pem.encode())
        if info["not_after"] <= ctx.clock():
            raise UserInputError(f"the CA certificate expired on {rfc3339(info['not_after'])}")

        def work() -> dict[str, Any]:
            message = f"a signer CA named {ca_name}, or with this certificate, is registered"
            with (
                conflict_on_duplicate(message, hint="one CA certificate serves one organisation"),
                ctx.transaction() as session,
            ):
                product = find_product(session, who, product_name) if product_name else None
                row = SignerCA(
                    org_id=who.org_id,
                    product_id=product.id if product else None,
                    name=ca_name,
                    cert_pem=pem,
                    fingerprint=info["fingerprint"],
                )
                session.add(row)
                session.flush()
                web.audit(
                    session,
                    who,
                    "signer_ca.create",
                    "signer_ca",
                    row.id,
                    {
                        "name": ca_name,
                        "product": product_name,
                        "fingerprint": info["fingerprint"],
                        "subject": info["subject"],
                    },
                )
                return signer_ca_json(row, product_name)

        return JSONResponse(await web.run(work), 201)

    async def list_signer_cas(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "listing signer CAs")
        Query(request, allowed=())

        def work() -> list[dict[str, Any]]:
            with ctx.transaction() as session:
                names = _products_by_id(session, who.org_id)
                rows = session.scalars(
                    select(SignerCA).where(SignerCA.org_id == who.org_id).order_by(SignerCA.id)
                )
                return [
                    signer_ca_json(r, names.get(r.product_id) if r.product_id else None)
                    for r in rows
                ]

        return JSONResponse({"items": await web.run(work)})

    async def revoke_ca_endpoint(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "removing a signer CA")
        Query(request, allowed=())
        ca_id = path_id(request, "ca_id", "signer CA")

        def work() -> None:
            with ctx.transaction() as session:
                revoke_signer_ca(session, who, ca_id)

        await web.run(work)
        return Response(status_code=204)

    return [
        route("/products", list_products, "GET"),
        route("/products", create_product, "POST"),
        route("/products/{name}", show_product, "GET"),
        route("/products/{name}/image/{file:path}", image_file, "GET"),
        route("/products/{name}/provisioning-keys", create_provisioning_key, "POST"),
        route("/products/{name}/provisioning-keys", list_provisioning_keys, "GET"),
        route("/provisioning-keys/{key_id:int}", revoke_key_endpoint, "DELETE"),
        route("/signer-cas", create_signer_ca, "POST"),
        route("/signer-cas", list_signer_cas, "GET"),
        route("/signer-cas/{ca_id:int}", revoke_ca_endpoint, "DELETE"),
    ]
