"""The OpenAPI 3.1 document of the management API, built from a table in code.

Every endpoint of docs/api.md ("Management API") is one :class:`Operation`
row: method, path, role, bodies and answers as hand-written JSON Schemas
(OpenAPI 3.1 schemas are JSON Schema 2020-12). Request schemas are closed
(``additionalProperties: false``) because the hub refuses unknown fields;
answer schemas of endpoints whose shape docs/api.md leaves partly open
(releases, deployments) require what it names and allow more.

Served at ``GET /api/v1/openapi.json`` without a token (see
:mod:`skylift.hub.api.core`). Tests check that every path of docs/api.md is
here, that every ``$ref`` resolves, that every route the app serves is
described, and validate real answers against these schemas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from skylift.hub.api.common import DEFAULT_LIMIT, DEVICE_ID, MAX_LIMIT, NAME, PRODUCT_NAME, TAG
from skylift.hub.web import MAX_JSON_BYTES

__all__ = ["OPERATIONS", "SCHEMAS", "Operation", "Param", "document"]

Schema = dict[str, Any]

API_VERSION = "1.0.0"
_HEX64 = "^[0-9a-f]{64}$"


def _anchored(pattern: re.Pattern[str]) -> str:
    # JSON Schema patterns search; the hub matches whole strings.
    return f"^{pattern.pattern}$"


def ref(name: str) -> Schema:
    """A reference to ``#/components/schemas/<name>``."""
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(
    props: dict[str, Schema],
    *,
    required: list[str] | None = None,
    closed: bool = True,
    description: str | None = None,
) -> Schema:
    """An object schema; all properties required unless ``required`` says otherwise."""
    schema: Schema = {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
    }
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def _null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _list(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def _items(name: str, *, paged: bool = False) -> Schema:
    props: dict[str, Schema] = {"items": _list(ref(name))}
    if paged:
        props["next_cursor"] = _null({"type": "string"})
    return _obj(props)


_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_BOOL: Schema = {"type": "boolean"}
_TIME: Schema = ref("Time")
_ID: Schema = {"type": "integer", "minimum": 1}
_TUF: Schema = {
    "type": "object",
    "description": "TUF metadata as JSON: {signatures, signed}",
    "required": ["signatures", "signed"],
}
_COUNTS = ("pending", "downloading", "installed", "committed", "failed", "rolled_back")

_DEVICE_STATES = [
    "idle", "checking", "downloading", "installing", "installed", "rebooting", "trial",
    "committed", "rolled_back", "failed",
]  # fmt: skip
_DEVICE_PROPS: dict[str, Schema] = {
    "device_id": ref("DeviceId"),
    "product": ref("ProductName"),
    "hardware_id": _STR,
    "tags": _list(ref("Tag")),
    "slots": {
        "type": "object",
        "additionalProperties": _STR,
        "description": "slot class -> installed version",
    },
    "state": {"enum": _DEVICE_STATES},
    "state_reason": _null(_STR),
    "progress": _null({"type": "integer", "minimum": 0, "maximum": 100}),
    "last_seen": _null(_TIME),
    "revoked": _BOOL,
    "revoked_at": _null(_TIME),
    "revoke_reason": _null(_STR),
    "certificate": _obj({"fingerprint": {"type": "string", "pattern": _HEX64}, "not_after": _TIME}),
    "enrolled_via": {"enum": ["provisioning", "signer_ca"]},
    "created": _TIME,
}

_PROVISIONING_KEY_PROPS: dict[str, Schema] = {
    "id": _ID,
    "name": ref("Name"),
    "product": ref("ProductName"),
    "prefix": _STR,
    "uses": {"type": "integer", "minimum": 0},
    "max_uses": _null(_INT),
    "expires": _null(_TIME),
    "revoked": _BOOL,
    "created": _TIME,
}
_TOKEN_PROPS: dict[str, Schema] = {
    "id": _ID,
    "name": _STR,
    "role": {"enum": ["viewer", "operator", "admin"]},
    "prefix": _STR,
    "created": _TIME,
    "last_used": _null(_TIME),
    "expires": _null(_TIME),
    "revoked": _BOOL,
}

#: components/schemas.
SCHEMAS: dict[str, Schema] = {
    "Error": _obj(
        {"error": {"type": "string", "description": "one line: what failed, what to do"}}
    ),
    "Time": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339 UTC, e.g. 2026-11-23T19:00:00Z",
    },
    "Name": {"type": "string", "pattern": _anchored(NAME)},
    "ProductName": {"type": "string", "pattern": _anchored(PRODUCT_NAME)},
    "Tag": {"type": "string", "pattern": _anchored(TAG)},
    "DeviceId": {"type": "string", "pattern": _anchored(DEVICE_ID)},
    "TufMetadata": _TUF,
    "TufKey": _obj(
        {
            "keyid": {"type": "string", "pattern": _HEX64},
            "keytype": _STR,
            "scheme": _STR,
            "keyval": {"type": "object"},
        },
        closed=False,
        description="a TUF key dict with its keyid",
    ),
    "Hub": _obj(
        {
            "name": _STR,
            "organisation": _STR,
            "role": {"enum": ["viewer", "operator", "admin"]},
            "online_keys": _obj({"snapshot": ref("TufKey"), "timestamp": ref("TufKey")}),
            "director_root": ref("TufMetadata"),
            "gateway_url": {"type": "string", "format": "uri"},
        }
    ),
    "Product": _obj(
        {
            "name": ref("ProductName"),
            "release_threshold": {"type": "integer", "minimum": 1},
            "release_keys": _list({"type": "string", "pattern": _HEX64}),
            "created": _TIME,
        }
    ),
    "ProductCreate": _obj(
        {
            "name": ref("ProductName"),
            "root": ref("TufMetadata"),
            "targets": ref("TufMetadata"),
        },
        description="root: snapshot and timestamp must be the hub's online key (GET /hub)",
    ),
    "ProvisioningKeyCreate": _obj(
        {
            "name": ref("Name"),
            "max_uses": _null({"type": "integer", "minimum": 1, "maximum": 1_000_000_000}),
            "expires": _null(_TIME),
        },
        required=["name"],
    ),
    "ProvisioningKey": _obj(_PROVISIONING_KEY_PROPS),
    "ProvisioningKeyCreated": _obj(
        {
            **_PROVISIONING_KEY_PROPS,
            "key": {"type": "string", "pattern": "^pk_", "description": "shown once"},
        }
    ),
    "SignerCACreate": _obj(
        {
            "name": ref("Name"),
            "product": _null(ref("ProductName")),
            "certificate": {"type": "string", "description": "one CA certificate, PEM"},
        },
        required=["name", "certificate"],
    ),
    "SignerCA": _obj(
        {
            "id": _ID,
            "name": ref("Name"),
            "product": _null(ref("ProductName")),
            "fingerprint": {"type": "string", "pattern": _HEX64},
            "subject": _STR,
            "not_after": _TIME,
            "revoked": _BOOL,
            "created": _TIME,
        }
    ),
    "Device": _obj(_DEVICE_PROPS),
    "DeviceDeployment": _obj(
        {
            "id": _ID,
            "name": _STR,
            "status": {"enum": ["active", "paused", "aborted", "completed"]},
            "phase": {"type": "integer", "minimum": 0},
            "device_status": {"enum": list(_COUNTS)},
            "device_reason": _null(_STR),
        },
        description="status: the deployment's; device_status: this device's in it",
    ),
    "DeviceDetail": _obj({**_DEVICE_PROPS, "deployments": _list(ref("DeviceDeployment"))}),
    "DevicePage": _items("Device", paged=True),
    "TagsUpdate": _obj({"tags": _list(ref("Tag"), maxItems=64)}),
    "RevokeRequest": _obj({"reason": {"type": "string", "minLength": 1, "maxLength": 1024}}),
    "Event": _obj(
        {
            "id": _ID,
            "report_id": _STR,
            "kind": _STR,
            "state": _null(_STR),
            "progress": _null(_INT),
            "result": _null(_STR),
            "reason": _null(_STR),
            "details": _null({"type": "object"}),
            "created": _TIME,
            "device_time": _null(_TIME),
        }
    ),
    "EventPage": _items("Event", paged=True),
    "ChunksMissingRequest": _obj(
        {"digests": _list({"type": "string", "pattern": _HEX64}, maxItems=100_000)}
    ),
    "ChunksMissing": _obj({"missing": _list({"type": "string", "pattern": _HEX64})}, closed=False),
    "ChunksStored": _obj(
        {
            "stored": {"type": "integer", "minimum": 0},
            "present": {"type": "integer", "minimum": 0},
        },
        description="Chunks of the batch stored now, and those the hub had already",
    ),
    "ReleaseCreate": _obj(
        {
            "targets": ref("TufMetadata"),
            "head": {"type": "string", "contentEncoding": "base64"},
            "indexes": {
                "type": "object",
                "additionalProperties": {"type": "string", "contentEncoding": "base64"},
            },
        },
        description="targets: the next N.targets.json, signed offline; at most 64 MiB",
    ),
    "Bandwidth": _obj(
        {
            "devices": {"type": "integer", "minimum": 0},
            "downloaded_bytes": {"type": "integer", "minimum": 0},
            "image_bytes": {"type": "integer", "minimum": 0},
            "saved_bytes": _INT,
            "saved_percent": _null({"type": "number"}),
        },
        description="What the devices that reported their sizes downloaded, against the "
        "size of the images they installed (saved: not downloaded whole, uncompressed)",
    ),
    "ReleaseDelta": _obj(
        {
            "from_version": _STR,
            "payload": _STR,
            "status": {"enum": ["pending", "ready", "larger", "too_large", "failed"]},
            "length": _null({"type": "integer", "minimum": 1}),
            "sha256": _null({"type": "string", "pattern": _HEX64}),
            "chunk_plan_bytes": _null({"type": "integer", "minimum": 0}),
            "error": _null(_STR),
            "seconds": _null({"type": "number", "minimum": 0}),
            "created": _TIME,
            "finished": _null(_TIME),
            "attempts": {"type": "integer", "minimum": 0},
        },
        description="A per-pair delta from an older release's payload: ready ones are offered "
        "to devices; larger (than the chunk plan of a device running that release) ones are "
        "not; too_large and failed say why in error; a failed one is tried again later, three "
        "attempts in all",
    ),
    "Release": _obj(
        {
            "version": _STR,
            "target": _STR,
            "length": {"type": "integer", "minimum": 0},
            "sha256": {"type": "string", "pattern": _HEX64},
            "hardware_ids": _list(_STR),
            "payload_size": {"type": "integer", "minimum": 0},
            "stored_size": {"type": "integer", "minimum": 0},
            "bandwidth": ref("Bandwidth"),
            "created": _TIME,
            "created_by": _STR,
            "deltas": _list(ref("ReleaseDelta")),
        },
        required=[
            "version",
            "target",
            "length",
            "sha256",
            "hardware_ids",
            "payload_size",
            "stored_size",
            "created",
            "created_by",
            "deltas",
        ],
        closed=False,
    ),
    "Selector": _obj(
        {
            "tags": _list(ref("Tag")),
            "hardware": _STR,
            "versions": _list(_STR),
            "devices": _list(ref("DeviceId")),
            "q": _STR,
        },
        required=[],
    ),
    "PhaseSpec": {
        "oneOf": [
            _obj({"percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}}),
            _obj({"tag": ref("Tag")}),
        ]
    },
    "DeploymentCreate": _obj(
        {
            "name": ref("Name"),
            "product": ref("ProductName"),
            "version": _STR,
            "selector": ref("Selector"),
            "phases": _list(ref("PhaseSpec"), minItems=1),
            "failure_gate_percent": {"type": "number", "minimum": 0, "maximum": 100},
            "min_soak_s": {"type": "integer", "minimum": 0},
            "allow_downgrade": _BOOL,
        },
        required=[
            "name",
            "product",
            "version",
            "selector",
            "phases",
            "failure_gate_percent",
            "min_soak_s",
        ],
    ),
    "PhaseStatus": _obj(
        {
            "phase": {"type": "integer", "minimum": 0},
            "percent": _null({"type": "number"}),
            "tag": _null(_STR),
            "started_at": _null(_TIME),
            "completed_at": _null(_TIME),
            "devices": {"type": "integer", "minimum": 0},
            "counts": _obj({c: {"type": "integer", "minimum": 0} for c in _COUNTS}, closed=False),
            "failure_rate_percent": _null({"type": "number"}),
        },
        required=["phase", "started_at", "completed_at", "devices", "counts"],
        closed=False,
    ),
    "DeploymentStatus": _obj(
        {
            "id": _ID,
            "name": _STR,
            "product": _STR,
            "version": _STR,
            "status": {"enum": ["active", "paused", "aborted", "completed"]},
            "paused_reason": _null(_STR),
            "current_phase": {"type": "integer", "minimum": 0},
            "failure_gate_percent": {"type": "number"},
            "min_soak_s": _INT,
            "phases": _list(ref("PhaseStatus")),
            "bandwidth": ref("Bandwidth"),
            "created": _TIME,
            "created_by": _STR,
        },
        closed=False,
    ),
    "DeploymentSummary": _obj(
        {
            "id": _ID,
            "name": _STR,
            "product": _STR,
            "version": _STR,
            "status": {"enum": ["active", "paused", "aborted", "completed"]},
        },
        closed=False,
    ),
    "PauseRequest": _obj({"reason": _STR}, required=[]),
    "AuditEntry": _obj(
        {
            "id": _ID,
            "actor": _STR,
            "action": _STR,
            "target_type": _STR,
            "target_id": _null(_STR),
            "details": _null({"type": "object"}),
            "created": _TIME,
        }
    ),
    "AuditPage": _items("AuditEntry", paged=True),
    "TokenCreate": _obj(
        {
            "name": ref("Name"),
            "role": {"enum": ["viewer", "operator", "admin"]},
            "expires": _null(_TIME),
        },
        required=["name", "role"],
    ),
    "Token": _obj(_TOKEN_PROPS),
    "TokenCreated": _obj(
        {
            **_TOKEN_PROPS,
            "token": {"type": "string", "pattern": "^sk_", "description": "shown once"},
        }
    ),
}


@dataclass(frozen=True)
class Param:
    """A query, path or header parameter."""

    name: str
    where: str = "query"
    schema: Schema = field(default_factory=lambda: dict(_STR))
    description: str = ""
    repeatable: bool = False
    required: bool = False


@dataclass(frozen=True)
class Operation:
    """One endpoint: who may call it, what it takes, what it answers."""

    method: str
    path: str
    role: str | None  # None: no token needed
    summary: str
    tag: str
    body: Schema | None = None
    body_media: str = "application/json"
    body_limit: int = MAX_JSON_BYTES
    body_required: bool = True
    params: tuple[Param, ...] = ()
    status: int = 200
    answer: Schema | None = None  # None: no content
    answer_media: tuple[str, ...] = ("application/json",)
    more_statuses: dict[int, str] = field(default_factory=dict)
    conflicts: bool = False
    #: Error statuses beyond those the rest implies (404 for a product named in the body).
    extra_errors: tuple[int, ...] = ()


_PAGE = (
    Param("limit", schema={"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                           "default": DEFAULT_LIMIT}),
    Param("cursor", description="next_cursor of the previous page"),
)  # fmt: skip
_PRODUCT = Param("name", "path", {"$ref": "#/components/schemas/ProductName"})
_DEVICE = Param("device_id", "path", {"$ref": "#/components/schemas/DeviceId"})

#: The management API, in the order of docs/api.md.
OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/hub", "viewer", "The hub's online keys, director root and gateway",
              "hub", answer=ref("Hub")),
    Operation("GET", "/products", "viewer", "List products", "products",
              answer=_items("Product")),
    Operation("POST", "/products", "admin", "Create a product from offline-signed metadata",
              "products", body=ref("ProductCreate"), status=201, answer=ref("Product"),
              conflicts=True),
    Operation("GET", "/products/{name}", "viewer", "Show a product", "products",
              params=(_PRODUCT,), answer=ref("Product")),
    Operation("GET", "/products/{name}/image/{file}", "viewer",
              "A file of the product's image repository, as stored", "products",
              params=(_PRODUCT, Param("file", "path", description=(
                  "metadata/root.json, metadata/N.targets.json, targets/<sha256>.<name>, ..."
                  " (may contain /)"))),
              answer={"description": "TUF metadata (JSON) or a target file (bytes)"},
              answer_media=("application/json", "application/octet-stream")),
    Operation("POST", "/products/{name}/provisioning-keys", "admin",
              "Create a provisioning key (shown once)", "products", params=(_PRODUCT,),
              body=ref("ProvisioningKeyCreate"), status=201,
              answer=ref("ProvisioningKeyCreated"), conflicts=True),
    Operation("GET", "/products/{name}/provisioning-keys", "admin", "List provisioning keys",
              "products", params=(_PRODUCT,), answer=_items("ProvisioningKey")),
    Operation("DELETE", "/provisioning-keys/{id}", "admin", "Revoke a provisioning key",
              "products", params=(Param("id", "path", _ID),), status=204),
    Operation("POST", "/signer-cas", "admin", "Register a signer CA", "products",
              body=ref("SignerCACreate"), status=201, answer=ref("SignerCA"), conflicts=True,
              extra_errors=(404,)),
    Operation("GET", "/signer-cas", "viewer", "List signer CAs", "products",
              answer=_items("SignerCA")),
    Operation("DELETE", "/signer-cas/{id}", "admin", "Revoke a signer CA", "products",
              params=(Param("id", "path", _ID),), status=204),
    Operation("GET", "/devices", "viewer", "List and select devices", "devices",
              params=(
                  Param("product", schema=ref("ProductName")),
                  Param("tag", schema=ref("Tag"), repeatable=True,
                        description="repeatable; a device must have all"),
                  Param("hardware"),
                  Param("version", description="installed in any slot class"),
                  Param("state", schema={"enum": _DEVICE_STATES}),
                  Param("seen_since", schema=_TIME),
                  Param("seen_before", schema=_TIME),
                  Param("q", description="device id contains this, ignoring case"),
                  *_PAGE,
              ),
              answer=ref("DevicePage")),
    Operation("GET", "/devices/{device_id}", "viewer", "Show a device", "devices",
              params=(_DEVICE,), answer=ref("DeviceDetail")),
    Operation("PUT", "/devices/{device_id}/tags", "operator", "Replace a device's tags",
              "devices", params=(_DEVICE,), body=ref("TagsUpdate"), answer=ref("Device")),
    Operation("POST", "/devices/{device_id}/revoke", "operator", "Revoke a device", "devices",
              params=(_DEVICE,), body=ref("RevokeRequest"), answer=ref("Device")),
    Operation("DELETE", "/devices/{device_id}", "admin",
              "Delete a device (its id stays reserved: it cannot enroll again)", "devices",
              params=(_DEVICE,), status=204),
    Operation("GET", "/devices/{device_id}/events", "viewer", "A device's events, newest first",
              "devices", params=(_DEVICE, *_PAGE), answer=ref("EventPage")),
    Operation("POST", "/chunks/missing", "operator", "Which of these chunks the hub lacks",
              "releases", body=ref("ChunksMissingRequest"), body_limit=8 * 1024 * 1024,
              answer=ref("ChunksMissing")),
    Operation("POST", "/chunks", "operator",
              "Upload a batch of chunks, as stored (digest, codec, length, bytes each)",
              "releases",
              body={"type": "string", "contentMediaType": "application/octet-stream"},
              body_media="application/octet-stream", body_limit=16 * 1024 * 1024,
              answer=ref("ChunksStored")),
    Operation("PUT", "/chunks/{digest}", "operator", "Upload one chunk, as stored", "releases",
              params=(Param("digest", "path", {"type": "string", "pattern": _HEX64}),
                      Param("X-Skylift-Codec", "header", {"enum": ["0", "1"]}, required=True,
                            description="0: raw, 1: zstd")),
              body={"type": "string", "contentMediaType": "application/octet-stream"},
              body_media="application/octet-stream", body_limit=4 * 1024 * 1024 + 1024,
              status=201, more_statuses={200: "The chunk was there already"}),
    Operation("POST", "/products/{name}/releases", "operator",
              "Publish a release: targets signed offline, head and index pages", "releases",
              params=(_PRODUCT,), body=ref("ReleaseCreate"), body_limit=64 * 1024 * 1024,
              status=201, answer=ref("Release"), conflicts=True),
    Operation("GET", "/products/{name}/releases", "viewer", "List a product's releases",
              "releases", params=(_PRODUCT,), answer=_items("Release")),
    Operation("GET", "/products/{name}/releases/{version}", "viewer",
              "Show a release, with its per-pair deltas", "releases",
              params=(_PRODUCT, Param("version", "path", _STR)), answer=ref("Release")),
    Operation("POST", "/deployments", "operator", "Start a deployment", "deployments",
              body=ref("DeploymentCreate"), status=201, answer=ref("DeploymentStatus"),
              conflicts=True),
    Operation("GET", "/deployments", "viewer", "List deployments", "deployments",
              params=(Param("status", schema={"enum": ["active", "paused", "aborted",
                                                       "completed"]}),),
              answer=_items("DeploymentSummary")),
    Operation("GET", "/deployments/{id}", "viewer", "A deployment's status", "deployments",
              params=(Param("id", "path", _ID),), answer=ref("DeploymentStatus")),
    Operation("POST", "/deployments/{id}/pause", "operator", "Pause a deployment",
              "deployments", params=(Param("id", "path", _ID),), body=ref("PauseRequest"),
              body_required=False, answer=ref("DeploymentStatus"), conflicts=True),
    Operation("POST", "/deployments/{id}/resume", "operator", "Resume a deployment",
              "deployments", params=(Param("id", "path", _ID),),
              answer=ref("DeploymentStatus"), conflicts=True),
    Operation("POST", "/deployments/{id}/abort", "operator", "Abort a deployment",
              "deployments", params=(Param("id", "path", _ID),),
              answer=ref("DeploymentStatus"), conflicts=True),
    Operation("GET", "/audit", "viewer", "The audit log, newest first", "audit",
              params=(Param("action"), Param("actor"), Param("since", schema=_TIME), *_PAGE),
              answer=ref("AuditPage")),
    Operation("POST", "/tokens", "admin", "Create an API token (shown once)", "tokens",
              body=ref("TokenCreate"), status=201, answer=ref("TokenCreated")),
    Operation("GET", "/tokens", "admin", "List API tokens (never their secrets)", "tokens",
              answer=_items("Token")),
    Operation("DELETE", "/tokens/{id}", "admin", "Revoke an API token", "tokens",
              params=(Param("id", "path", _ID),), status=204),
    Operation("GET", "/openapi.json", None, "This document", "hub",
              answer={"type": "object", "description": "OpenAPI 3.1"}),
)  # fmt: skip

_ERRORS = {
    400: "Bad input: malformed JSON, an unknown field, a value out of bounds",
    401: "No token, or a malformed, unknown, revoked or expired one",
    403: "The token's role does not allow this",
    404: "No such thing in your organisation",
    409: "Conflicts with the current state",
    413: "The body is over this endpoint's limit",
}
_ROLE_RANK = {"viewer": 1, "operator": 2, "admin": 3}


def _error_statuses(op: Operation) -> list[int]:
    statuses = {400} if op.body is not None or op.params else set()
    if op.role is not None:
        statuses.add(401)
        if _ROLE_RANK[op.role] > 1:
            statuses.add(403)
    if any(p.where == "path" for p in op.params):
        statuses.add(404)
    if op.body is not None:
        statuses.add(413)
    if op.conflicts:
        statuses.add(409)
    statuses.update(op.extra_errors)
    return sorted(statuses)


def _parameter(p: Param) -> Schema:
    schema = _list(p.schema) if p.repeatable else p.schema
    out: Schema = {"name": p.name, "in": p.where, "schema": schema}
    if p.where == "path" or p.required:
        out["required"] = True
    if p.repeatable:
        out["style"], out["explode"] = "form", True
    if p.description:
        out["description"] = p.description
    return out


def _operation(op: Operation) -> Schema:
    out: Schema = {
        "operationId": f"{op.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', op.path).strip('_')}",
        "summary": op.summary,
        "tags": [op.tag],
    }
    if op.role is None:
        out["security"] = []
        out["description"] = "No token needed."
    else:
        out["description"] = f"Role: {op.role} or above."
        out["x-skylift-role"] = op.role
    if op.params:
        out["parameters"] = [_parameter(p) for p in op.params]
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "description": f"At most {op.body_limit} bytes.",
            "content": {op.body_media: {"schema": op.body}},
        }
    answer: Schema = {"description": op.summary}
    if op.answer is not None:
        answer["content"] = {media: {"schema": op.answer} for media in op.answer_media}
    responses: Schema = {str(op.status): answer}
    for status, text in op.more_statuses.items():
        responses[str(status)] = {"description": text}
    for status in _error_statuses(op):
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    out["responses"] = responses
    return out


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document, as JSON-ready data."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Skylift hub management API",
            "version": API_VERSION,
            "description": (
                "Bearer tokens scoped to one organisation and a role (viewer < operator < admin)."
                ' Errors are {"error": "one line"}; a refused request changes nothing.'
                " Lists page with ?limit= and ?cursor= (next_cursor, null on the last page)."
                " Every change writes an audit entry."
            ),
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in OPERATIONS)],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "sk_..."}
            },
            "schemas": SCHEMAS,
            "responses": {
                f"E{status}": {
                    "description": text,
                    "content": {"application/json": {"schema": ref("Error")}},
                }
                for status, text in _ERRORS.items()
            },
        },
    }
