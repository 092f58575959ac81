"""A real hub for the end-to-end tests: management API and device gateway, one context.

``init_hub`` makes a hub on SQLite; its management API (bearer tokens, TLS)
and its device gateway (mutual TLS, as ``skylift hub serve`` sets it up) are
served by uvicorn in threads from the same :class:`HubContext`, so that a
revocation through the API is seen by the gateway at once, as in one
``hub serve`` process. Every CLI step is a ``skylift`` subprocess, as a
person or CI would type it; devices enroll and report through the real
gateway with keys and CSRs made by :mod:`skylift.hub.ca`.

:class:`Cli` checks on every call that no secret (API tokens, provisioning
keys) appears in what the command printed, unless the call is the one that
reveals it.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from skylift.hub import ca
from skylift.hub.app import make_api_app, make_gateway_app
from skylift.hub.server import gateway_ssl_context
from skylift.hub.setup import init_hub, open_hub
from skylift.hub.tls import ServerThread, client_context, make_server, server_context
from skylift.hub.web import HubContext

sys.path.insert(0, str(Path(__file__).parents[1]))
from bundle.conftest import realistic_payload  # real image-like content

PASS = "e2e passphrase"
PRODUCT = "acme-gw"
VERSIONS = ("1.0.0", "1.1.0")
TIMEOUT_S = 10.0


class Cli:
    """``skylift`` as a subprocess; refuses output that shows a secret it should not."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.secrets: set[str] = set()
        self.calls = 0

    def __call__(
        self,
        *args: str,
        ok: bool = True,
        stdin: str | None = None,
        reveals: str | None = None,
        env: dict[str, str] | None = None,
        fast: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``skylift ARGS`` and check its exit, its error line and its secrets.

        ``fast`` calls the same ``main()`` in this process instead (no
        stdin): for variants of a command that has run as a subprocess
        already, where start-up time would dominate.
        """
        self.calls += 1
        if fast:
            p = self._in_process(list(args), env or {})
        else:
            p = subprocess.run(
                [sys.executable, "-m", "skylift.cli.main", *args],
                cwd=self.cwd, env={**self.env, **(env or {})}, input=stdin,
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        return self.check(args, p, ok=ok, reveals=reveals)

    def parallel(
        self, calls: list[tuple[tuple[str, ...], dict[str, str] | None]], *, ok: bool = True
    ) -> list[subprocess.CompletedProcess[str]]:
        """Run independent subprocess calls at once (``(args, env)`` each)."""
        self.calls += len(calls)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "skylift.cli.main", *args],
                cwd=self.cwd,
                env={**self.env, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            for args, env in calls
        ]
        results = []
        for (args, _), proc in zip(calls, procs, strict=True):
            stdout, stderr = proc.communicate(timeout=120)
            p = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
            results.append(self.check(args, p, ok=ok))
        return results

    def _in_process(self, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        from skylift.cli.main import main

        saved_env, saved_cwd = dict(os.environ), os.getcwd()
        out, err = io.StringIO(), io.StringIO()
        try:
            os.environ.clear()
            os.environ.update({**self.env, **env})
            os.chdir(self.cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args)
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            os.chdir(saved_cwd)
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

    def check(
        self,
        args: tuple[str, ...],
        p: subprocess.CompletedProcess[str],
        *,
        ok: bool = True,
        reveals: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        where = f"skylift {' '.join(args)}\n{p.stdout}\n{p.stderr}"
        if ok:
            assert p.returncode == 0, where
        else:
            assert p.returncode == 1, where
            assert "Traceback" not in p.stderr, where
            lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), where
            assert p.stdout == "", where
        for secret in self.secrets:
            assert secret not in p.stderr, f"a secret on stderr of {where}"
            if secret != reveals:
                assert secret not in p.stdout, f"a secret on stdout of {where}"
        return p


@dataclass
class Device:
    """An enrolled device: its id and an mTLS client for the gateway."""

    device_id: str
    client: httpx.Client
    reports: int = 0

    def report(self, state: str, **fields: Any) -> httpx.Response:
        self.reports += 1
        body = {"report_id": f"r{self.reports}-{uuid.uuid4().hex[:8]}", "kind": "state",
                "state": state, **fields}  # fmt: skip
        return self.client.post("/device/v1/reports", json={"reports": [body]})


@dataclass
class Hub:
    """The running hub, its admin token and the logged-in CLI."""

    ctx: HubContext
    cli: Cli
    tmp: Path
    api_url: str
    gateway_url: str
    ca_path: Path
    admin_token: str
    released: list[subprocess.CompletedProcess[str]] = field(default_factory=list)
    _clients: list[httpx.Client] = field(default_factory=list)

    @property
    def ca_pem(self) -> bytes:
        return self.ctx.device_ca_pem

    def api(self, token: str | None = None) -> httpx.Client:
        """An httpx client of the management API (the admin's token unless given)."""
        client = httpx.Client(
            base_url=self.api_url + "/api/v1", verify=client_context(self.ca_pem),
            headers={"Authorization": f"Bearer {token or self.admin_token}"}, timeout=TIMEOUT_S,
        )  # fmt: skip
        self._clients.append(client)
        return client

    def enroll_response(
        self, device_id: str, provisioning_key: str, hardware_id: str = "hw1"
    ) -> tuple[httpx.Response, ca.DevicePrivateKey]:
        key = ca.generate_device_key()
        body = {
            "device_id": device_id, "product": PRODUCT, "hardware_id": hardware_id,
            "csr": ca.make_csr(key, device_id).decode(), "provisioning_key": provisioning_key,
        }  # fmt: skip
        with httpx.Client(verify=client_context(self.ca_pem), timeout=TIMEOUT_S) as anonymous:
            return anonymous.post(self.gateway_url + "/device/v1/enroll", json=body), key

    def enroll(self, device_id: str, provisioning_key: str, hardware_id: str = "hw1") -> Device:
        """Enroll through ``POST /device/v1/enroll``; a client presenting the new certificate."""
        answer, key = self.enroll_response(device_id, provisioning_key, hardware_id)
        assert answer.status_code == 201, answer.text
        base = self.tmp / "devices" / device_id
        base.mkdir(parents=True)
        (base / "cert.pem").write_text(answer.json()["certificate"])
        (base / "key.pem").write_bytes(ca.private_key_pem(key))
        client = httpx.Client(
            base_url=self.gateway_url, timeout=TIMEOUT_S,
            verify=client_context(self.ca_pem, base / "cert.pem", base / "key.pem"),
        )  # fmt: skip
        self._clients.append(client)
        return Device(device_id, client)

    def rows(self, stmt: Any) -> list[Any]:
        with self.ctx.sessions() as session:
            return list(session.execute(stmt).all())

    def scalar_rows(self, stmt: Any) -> list[Any]:
        with self.ctx.sessions() as session:
            rows = list(session.scalars(stmt).all())
            session.expunge_all()
            return rows

    def close(self) -> None:
        for client in self._clients:
            client.close()


@pytest.fixture(scope="package")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("e2e")
    result = init_hub(
        tmp / "hub", organisation="acme", admin_email="ops@acme.example",
        gateway_port=0, api_port=0,
    )  # fmt: skip
    # Last-seen times stay in memory (an hour), so the database changes only when a test does.
    ctx = open_hub(replace(result.config, last_seen_flush_s=3600.0))
    ca_dir = result.config.ca_dir
    api_tls = server_context(
        ca_dir / "server.pem", ca_dir / "server.key", client_cas_pem=None,
        require_client_cert=False,
    )  # fmt: skip
    api = make_server(make_api_app(ctx), host="127.0.0.1", port=0, ssl_context=api_tls)
    gateway = make_server(
        make_gateway_app(ctx), host="127.0.0.1", port=0, ssl_context=gateway_ssl_context(ctx)
    )
    with ServerThread(api) as api_thread, ServerThread(gateway) as gateway_thread:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLIFT_")}
        env |= {"SKYLIFT_KEY_PASSPHRASE": PASS, "XDG_CONFIG_HOME": str(tmp / "config"),
                "COLUMNS": "200"}  # fmt: skip
        cli = Cli(tmp, env)
        cli.secrets.add(result.admin_token)
        hub = Hub(
            ctx=ctx, cli=cli, tmp=tmp, api_url=f"https://127.0.0.1:{api_thread.port}",
            gateway_url=f"https://127.0.0.1:{gateway_thread.port}",
            ca_path=ca_dir / "device-ca.pem", admin_token=result.admin_token,
        )  # fmt: skip
        # The token on stdin, as a script would pass it (never on the command line).
        login = cli("login", hub.api_url, "--token", "-", "--ca", str(hub.ca_path),
                    stdin=result.admin_token + "\n")  # fmt: skip
        assert "logged in to acme as admin of acme" in login.stderr
        try:
            yield hub
        finally:
            hub.close()
    ctx.sessions.kw["bind"].dispose()


@pytest.fixture(scope="package")
def released(hub: Hub) -> Hub:
    """Product acme-gw with releases 1.0.0 and 1.1.0, made and pushed through the CLI."""
    cli, tmp = hub.cli, hub.tmp
    cli.parallel([(("keys", "generate", "root"), None), (("keys", "generate", "release"), None)])
    cli("product", "create", PRODUCT, "--root-key", "root.key", "--release-key", "release.key")
    data = realistic_payload(1_500_000, seed=21)
    (tmp / "v1.img").write_bytes(data)
    (tmp / "v2.img").write_bytes(data[:700_000] + b"patched!" + data[700_000:])
    cli.parallel([
        (("bundle", "create", "--product", PRODUCT, "--version", version, "--hardware", "hw1",
          "--payload", f"rootfs={image}", "--key", "release.key", "-o", f"{version}.bundle"), None)
        for version, image in zip(VERSIONS, ("v1.img", "v2.img"), strict=True)
    ])  # fmt: skip
    for version in VERSIONS:
        hub.released.append(cli("release", "push", f"{version}.bundle", "--key", "release.key"))
    return hub


def table_snapshot(hub: Hub, *models: Any) -> dict[str, list[str]]:
    """Every row of ``models``' tables, to show that a refused command changed nothing."""
    with hub.ctx.sessions() as session:
        return {
            m.__tablename__: sorted(repr(tuple(r)) for r in session.execute(select(m.__table__)))
            for m in models
        }
