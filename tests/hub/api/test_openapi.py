"""The OpenAPI document: valid 3.1, complete against docs/api.md and against what the app serves.

Every other API test also checks each answer against this document (see
conftest.check_against_document); here the document itself is checked, and
the roles it states are tried on every route the app serves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from starlette.routing import Mount, Route

from skylift.hub import openapi
from skylift.hub.app import make_api_app

from .conftest import Hub

API_MD = Path(__file__).parents[3] / "docs" / "api.md"
_ROW = re.compile(r"^\| (GET|POST|PUT|DELETE) `/api/v1(/[^`]*)` \| (\w+) \|", re.M)


def _shape(path: str) -> str:
    """``/tokens/{token_id:int}`` and ``/tokens/{id}`` -> ``/tokens/{}``."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def _contract() -> list[tuple[str, str, str]]:
    """(method, path, role) of every row of docs/api.md's management table."""
    text = API_MD.read_text()
    section = text.split("## Management API", 1)[1].split("\n## ", 1)[0]
    rows = _ROW.findall(section)
    assert len(rows) >= 30, "docs/api.md's management table was not found"
    return rows


def _documented() -> dict[tuple[str, str], dict[str, Any]]:
    doc = openapi.document()
    return {
        (method.upper(), _shape(path)): op
        for path, methods in doc["paths"].items()
        for method, op in methods.items()
    }


def _served(hub: Hub) -> set[tuple[str, str]]:
    app = make_api_app(hub.ctx)
    served = set()
    mounts = [r for r in app.routes if isinstance(r, Mount)]
    # The rest is the dashboard's pages at /, for browsers, outside the API.
    assert [m.path for m in mounts] == ["/api/v1"]
    assert not any(r.path.startswith("/api") for r in app.routes if isinstance(r, Route))
    for mount in mounts:
        for route in mount.routes:
            assert isinstance(route, Route)
            for method in route.methods or ():
                if method != "HEAD":  # Starlette's, with every GET
                    served.add((method, _shape(route.path)))
    return served


def test_document_is_valid_openapi_3_1() -> None:
    import openapi_spec_validator as validator

    doc = openapi.document()
    assert doc["openapi"] == "3.1.0"
    validator.validate(doc)
    # The served form is plain JSON: nothing in it that json cannot carry.
    assert json.loads(json.dumps(doc)) == doc


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"external reference {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_every_ref_resolves_and_every_schema_is_used() -> None:
    doc = openapi.document()
    refs = _refs(doc)
    assert refs
    for ref in refs:
        _resolve(doc, ref)
    used = {r.rsplit("/", 1)[1] for r in refs if r.startswith("#/components/schemas/")}
    assert set(doc["components"]["schemas"]) - used == set()
    ids = [op["operationId"] for methods in doc["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))


def test_every_endpoint_of_the_contract_is_documented_with_its_role() -> None:
    documented = _documented()
    for method, path, role in _contract():
        op = documented.get((method, _shape(path)))
        assert op is not None, f"{method} {path} is missing from the OpenAPI document"
        assert op["x-skylift-role"] == role, f"{method} {path}: {op['x-skylift-role']} != {role}"
    extra = set(documented) - {(m, _shape(p)) for m, p, _ in _contract()}
    assert extra == {("GET", "/openapi.json")}


def test_every_served_route_is_documented(shared_hub: Hub) -> None:
    served, documented = _served(shared_hub), set(_documented())
    assert served - documented == set()
    # And what this module set serves is all there (releases and deployments
    # are another module's; they are checked when present).
    mine = {k for k in documented if not k[1].startswith(("/chunks", "/deployments"))}
    mine -= {("POST", "/products/{}/releases"), ("GET", "/products/{}/releases")}
    assert mine <= served


_FILL = {
    "name": "gw",
    "device_id": "d1",
    "id": "1",
    "digest": "0" * 64,
    "file": "metadata/root.json",
    "version": "1.0.0",
}


def _call(hub: Hub, method: str, path: str, op: dict[str, Any], token: str | None) -> int:
    url = re.sub(r"\{(\w+)\}", lambda m: _FILL[m.group(1)], path)
    content = op.get("requestBody", {}).get("content", {})
    kwargs: dict[str, Any] = {}
    if "application/json" in content:
        kwargs["json"] = {}
    elif content:
        kwargs["content"] = b"x"
        kwargs["headers"] = {"X-Skylift-Codec": "0"}
    return hub.call(method, url, token=token, **kwargs).status_code


def test_roles_are_enforced_as_documented(shared_hub: Hub) -> None:
    """Generated from the document: no token is 401, a lower role is 403, nothing changes."""
    hub = shared_hub
    hub.tokens |= {"viewer": hub.add_token("viewer"), "operator": hub.add_token("operator")}
    served = _served(hub)
    before = hub.state()
    doc = openapi.document()
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if (method.upper(), _shape(path)) not in served or "x-skylift-role" not in op:
                continue
            role = op["x-skylift-role"]
            assert _call(hub, method.upper(), path, op, None) == 401, (method, path)
            lower = {"viewer": [], "operator": ["viewer"], "admin": ["viewer", "operator"]}[role]
            for token in lower:
                assert _call(hub, method.upper(), path, op, token) == 403, (method, path, token)
    assert hub.state() == before


def test_served_document_is_the_table(shared_hub: Hub) -> None:
    assert shared_hub.get("/openapi.json", token=None).json() == openapi.document()
