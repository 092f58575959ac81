"""The code paths that make polling cheap (bench/poll.py) behave as the slow ones did.

- the bare ASGI poll endpoint: headers, ETag forms, HEAD, the 503 for a
  broken director repository, refusals as JSON;
- both uvicorn protocols (httptools when installed, h11 always) carry the
  client certificate to the gateway;
- the gateway's access log is off while another server's stays on;
- revocations without a ``revoked_at`` stamp are found by the slower scan.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from skylift.hub import tls
from skylift.hub.app import make_gateway_app
from skylift.hub.db.models import Device
from skylift.hub.gateway import identity
from skylift.hub.gateway.identity import Identities
from skylift.hub.server import client_cas
from skylift.trust.errors import RepositoryError

from .conftest import TIMEOUT_S, Hub

_PROTOCOLS = [tls.TLSExtensionH11Protocol]
if tls.TLSExtensionHttpToolsProtocol is not None:
    _PROTOCOLS.append(tls.TLSExtensionHttpToolsProtocol)


@pytest.fixture
def etag(hub: Hub) -> tuple[httpx.Client, str]:
    client = hub.client(hub.enroll())
    first = client.get("/poll")
    assert first.status_code == 200
    return client, first.headers["etag"]


def _server(hub: Hub, **kwargs: Any) -> tls.ServerThread:
    """Another gateway server on the package's hub, with a TLS context of its own.

    Not ``gateway_ssl_context``: that would become the live context new signer
    CAs are added to, and the package's own server would stop learning them.
    """
    context = tls.server_context(
        hub.ctx.config.ca_dir / "server.pem",
        hub.ctx.config.ca_dir / "server.key",
        client_cas_pem=client_cas(hub.ctx),
        require_client_cert=False,
    )
    server = tls.make_server(
        make_gateway_app(hub.ctx), host="127.0.0.1", port=0, ssl_context=context, **kwargs
    )
    return tls.ServerThread(server, startup_timeout_s=10, shutdown_timeout_s=5)


@pytest.mark.parametrize(
    ("if_none_match", "status"),
    [
        ("{etag}", 304),
        ("W/{etag}", 304),
        ('"other", {etag}', 304),
        ("*", 304),
        ('"other"', 200),
        ("", 200),
    ],
    ids=["exact", "weak", "list", "star", "other", "empty"],
)
def test_if_none_match_forms(
    etag: tuple[httpx.Client, str], if_none_match: str, status: int
) -> None:
    client, value = etag
    answer = client.get("/poll", headers={"If-None-Match": if_none_match.format(etag=value)})
    assert answer.status_code == status
    assert answer.headers["etag"] == value
    assert answer.headers["cache-control"] == "private, no-cache"
    if status == 200:
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["etag"] == value.strip('"')
    else:
        assert answer.content == b""


def test_head_answers_without_a_body(etag: tuple[httpx.Client, str]) -> None:
    client, value = etag
    answer = client.head("/poll")
    assert answer.status_code == 200
    assert answer.content == b""
    assert client.head("/poll", headers={"If-None-Match": value}).status_code == 304


def test_a_bad_state_header_is_a_json_400(etag: tuple[httpx.Client, str]) -> None:
    client, _ = etag
    answer = client.get("/poll", headers={"X-Skylift-State": "dancing"})
    assert answer.status_code == 400
    assert "not an agent state" in answer.json()["error"]
    assert client.get("/poll", headers={"X-Skylift-State": "idle"}).status_code == 200


def test_a_broken_director_repository_is_503(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    client = hub.client(hub.enroll())

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RepositoryError("director metadata does not verify")

    monkeypatch.setattr("skylift.hub.gateway.routes.compute_answer", broken)
    answer = client.get("/poll")
    assert answer.status_code == 503
    assert answer.json() == {"error": "the hub cannot serve this device's director now"}


@pytest.mark.parametrize("protocol", _PROTOCOLS, ids=lambda p: p.__name__)
def test_each_protocol_carries_the_client_certificate(hub: Hub, protocol: type) -> None:
    device = hub.enroll()
    with _server(hub, http=protocol) as thread:
        url = f"https://127.0.0.1:{thread.port}/device/v1"
        with httpx.Client(base_url=url, verify=hub.tls(device), timeout=TIMEOUT_S) as client:
            first = client.get("/poll")
            assert first.status_code == 200
            again = client.get("/poll", headers={"If-None-Match": first.headers["etag"]})
            assert again.status_code == 304
        with httpx.Client(base_url=url, verify=hub.tls(), timeout=TIMEOUT_S) as anonymous:
            assert anonymous.get("/poll").status_code == 401


@pytest.mark.parametrize("access_log", [False, True])
def test_access_log_is_per_server(
    hub: Hub, access_log: bool, caplog: pytest.LogCaptureFixture
) -> None:
    device = hub.enroll()
    with (
        caplog.at_level(logging.INFO, logger="uvicorn.access"),
        _server(hub, access_log=access_log) as thread,
    ):
        url = f"https://127.0.0.1:{thread.port}/device/v1"
        with httpx.Client(base_url=url, verify=hub.tls(device), timeout=TIMEOUT_S) as client:
            assert client.get("/poll").status_code == 200
    logged = [r for r in caplog.records if r.name == "uvicorn.access"]
    assert bool(logged) == access_log


def test_an_unstamped_revocation_is_found_by_the_slower_scan(hub: Hub) -> None:
    device = hub.enroll()
    clock = [1000.0]
    identities = Identities(hub.ctx, monotonic=lambda: clock[0])
    with hub.ctx.sessions() as session:
        identities.sync(session)  # the first sync loads every revocation
    with hub.ctx.transaction() as session:
        session.execute(
            update(Device).where(Device.device_id == device.device_id).values(revoked=True)
        )
    clock[0] += 1.0
    with hub.ctx.sessions() as session:
        identities.sync(session)
    assert not identities.is_revoked(device.device_id)
    clock[0] += identity._UNSTAMPED_SCAN_S
    with hub.ctx.sessions() as session:
        assert device.device_id in identities.sync(session)
    assert identities.is_revoked(device.device_id)
