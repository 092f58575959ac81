"""The dashboard in a real browser: Debian's Chromium driven by Playwright, a real hub, a fleet.

One hub for the module: ``init_hub`` on SQLite, its management port (API and
dashboard, TLS, background loops on: rollout ticks every 0.3 s) and its
device gateway (mutual TLS) served by uvicorn on 127.0.0.1. Six simulated
devices enroll with a provisioning key and report through the gateway,
each with its own certificate, acting only on what the hub's director
offers them (what their next poll would fetch). ``sim-3`` and ``sim-4`` fail
to install 1.1.0.

The story an operator lives at 3 a.m.: log in, search the fleet, open a
device, create a two-phase deployment while the form counts the devices it
selects, watch the bars move without reloading, see the rollout pause
itself when phase 2 fails past its gate and say why, resume, see it finish.
A viewer sees no pause button, and the server refuses the request a
forged button would send. Every page is saved as a screenshot, at 1280 px
and at phone width, under ``$SKYLIFT_TEST_ARTIFACTS`` (default
``test-artifacts/``) ``/dashboard``.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from hub.rollouts.conftest import Clock, Exploded, Hub
from skylift.hub import ca, rollouts
from skylift.hub.app import make_api_app, make_gateway_app
from skylift.hub.dashboard.routes import SNAPSHOT_INTERVAL_KEY
from skylift.hub.server import gateway_ssl_context
from skylift.hub.setup import init_hub, open_hub
from skylift.hub.tls import ServerThread, client_context, make_server, server_context

from .conftest import PASSWORD, add_user

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 15_000
DEVICES = [f"sim-{i}" for i in range(6)]
BAD = {"sim-3", "sim-4"}
ARTIFACTS = (
    Path(os.environ.get("SKYLIFT_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
    / "dashboard"
)


@dataclass
class SimDevice:
    device_id: str
    client: httpx.Client
    step: int = 0
    n: int = 0

    def report(self, state: str, **fields: Any) -> None:
        self.n += 1
        body = {"report_id": f"{self.device_id}-{self.n}-{uuid.uuid4().hex[:6]}", "kind": "state",
                "state": state, **fields}  # fmt: skip
        r = self.client.post("/device/v1/reports", json={"reports": [body]})
        assert r.status_code in (200, 201), r.text


@dataclass
class Fleet:
    """The simulated devices, driven by a bounded loop in a thread."""

    hub: Hub
    devices: list[SimDevice]
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    def tick(self) -> None:
        for d in self.devices:
            target = self.hub.ctx.director.assigned(d.device_id)
            if target is None or not target.path.startswith("1.1.0"):
                continue  # nothing offered: the device idles
            steps = [("downloading", {"progress": 40}), ("downloading", {"progress": 90}),
                     ("installed", {})]  # fmt: skip
            if d.step < len(steps):
                state, extra = steps[d.step]
                d.report(state, details={"version": "1.1.0"}, **extra)
            elif d.step == len(steps):
                if d.device_id in BAD:
                    d.report("failed", reason="post-install hook: sensor bus timeout",
                             details={"version": "1.1.0", "hook_output": "i2c-1: no ACK from 0x48"})  # fmt: skip
                else:
                    d.report("committed", details={"version": "1.1.0", "slot_class": "rootfs"})
            d.step += 1

    def run(self) -> None:
        try:
            for _ in range(1500):  # bounded: 1500 x 0.2 s = 5 min at most
                if self.stop.wait(0.2):
                    return
                self.tick()
        except BaseException as e:  # reported by the test, not lost in the thread
            self.errors.append(e)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, v1: Exploded, v2: Exploded
) -> Iterator[tuple[Hub, Fleet, str]]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium", pytrace=False)
    tmp = tmp_path_factory.mktemp("browser")
    result = init_hub(tmp / "hub", organisation="acme", admin_email="ops@acme.example",
                      gateway_port=0, api_port=0)  # fmt: skip
    clock = Clock()
    ctx = open_hub(replace(result.config, last_seen_flush_s=0.5), clock=clock)
    ctx.extra[rollouts.TICK_INTERVAL_KEY] = 0.3
    ctx.extra[SNAPSHOT_INTERVAL_KEY] = 3600.0
    ca_dir = result.config.ca_dir
    tls = server_context(ca_dir / "server.pem", ca_dir / "server.key", client_cas_pem=None,
                         require_client_cert=False)  # fmt: skip
    api = make_server(make_api_app(ctx), host="127.0.0.1", port=0, ssl_context=tls)
    gw = make_server(make_gateway_app(ctx), host="127.0.0.1", port=0,
                     ssl_context=gateway_ssl_context(ctx))  # fmt: skip
    with (
        ServerThread(api) as api_t,
        ServerThread(gw) as gw_t,
        anyio.from_thread.start_blocking_portal() as portal,
    ):
        base = f"https://127.0.0.1:{api_t.port}"
        client = httpx.AsyncClient(
            base_url=base, verify=client_context(ctx.device_ca_pem), timeout=10
        )
        hub = Hub(ctx, client, portal, clock, {"admin": result.admin_token})
        assert hub.create_product().status_code == 201
        for bundle in (v1, v2):
            assert hub.push(bundle).status_code == 201
        secret = hub.post("/products/gw/provisioning-keys", json={"name": "factory"}).json()["key"]
        add_user(hub, "operator@acme.example", "operator")
        add_user(hub, "viewer@acme.example", "viewer")
        gateway = f"https://127.0.0.1:{gw_t.port}"
        sims = []
        for i, device_id in enumerate(DEVICES):
            dkey = ca.generate_device_key()
            body = {"device_id": device_id, "product": "gw", "hardware_id": "hw1",
                    "csr": ca.make_csr(dkey, device_id).decode(), "provisioning_key": secret}  # fmt: skip
            with httpx.Client(verify=client_context(ctx.device_ca_pem), timeout=10) as anon:
                r = anon.post(gateway + "/device/v1/enroll", json=body)
            assert r.status_code == 201, r.text
            d = tmp / device_id
            d.mkdir()
            (d / "cert.pem").write_text(r.json()["certificate"])
            (d / "key.pem").write_bytes(ca.private_key_pem(dkey))
            mtls = httpx.Client(base_url=gateway, timeout=10, verify=client_context(
                ctx.device_ca_pem, d / "cert.pem", d / "key.pem"))  # fmt: skip
            sim = SimDevice(device_id, mtls)
            sim.report("committed", details={"version": "1.0.0", "slot_class": "rootfs"})
            sims.append(sim)
            if i < 2:
                r = hub.call("PUT", f"/devices/{device_id}/tags", json={"tags": ["ring=canary"]})
                assert r.status_code == 200, r.text
        fleet = Fleet(hub, sims)
        thread = threading.Thread(target=fleet.run, daemon=True)
        thread.start()
        try:
            yield hub, fleet, base
        finally:
            fleet.stop.set()
            thread.join(10)
            for s in sims:
                s.client.close()
            portal.call(client.aclose)
    ctx.sessions.kw["bind"].dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            yield b
        finally:
            b.close()


def _context(browser: Browser, base: str, **kw: Any) -> BrowserContext:
    c = browser.new_context(
        base_url=base, ignore_https_errors=True, viewport={"width": 1280, "height": 900}, **kw
    )
    c.set_default_timeout(TIMEOUT_MS)
    return c


def _shot(page: Page, name: str, *, phone: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if phone:
        size = page.viewport_size
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(ARTIFACTS / f"{name}-phone.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 400, (
            f"{name} scrolls sideways on a phone"
        )
        if size:
            page.set_viewport_size(size)


def _login(page: Page, email: str) -> None:
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Fleet overview")).to_be_visible()


def test_an_operator_watches_a_rollout_pause_itself_resumes_it_and_sees_it_finish(
    world: tuple[Hub, Fleet, str], browser: Browser
) -> None:
    hub, fleet, base = world
    ctx = _context(browser, base)
    page = ctx.new_page()
    page.goto("/login")
    page.get_by_label("Email").fill("operator@acme.example")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("wrong email or password")
    _shot(page, "01-login-refused")
    _login(page, "operator@acme.example")
    expect(page.locator('[data-figure="devices"]')).to_have_text("6")
    _shot(page, "02-overview")

    # Search the fleet, with the keyboard.
    page.get_by_role("link", name="Devices", exact=True).click()
    page.get_by_label("Search id").fill("sim-2")
    page.get_by_label("Search id").press("Enter")
    expect(page.locator("#device-count")).to_contain_text("1 device matches")
    _shot(page, "03-devices-search")
    page.get_by_role("link", name="sim-2").click()
    expect(page.get_by_role("heading", name="sim-2")).to_be_visible()
    expect(page.get_by_role("cell", name="1.0.0")).to_be_visible()
    _shot(page, "04-device")

    # A two-phase deployment; the form counts what it selects as it is filled in.
    page.goto("/deployments/new")
    page.get_by_label("Name", exact=True).fill("gw-1.1.0")
    page.get_by_label("Release").select_option("gw/1.1.0")
    expect(page.locator("#match-count")).to_have_text("6 devices match")
    page.get_by_label("Device id contains").fill("sim-1")
    expect(page.locator("#match-count")).to_have_text("1 device match")
    page.get_by_label("Device id contains").fill("")
    expect(page.locator("#match-count")).to_have_text("6 devices match")
    page.get_by_label(re.compile("^Phases")).fill("tag:ring=canary, 100")
    page.get_by_label(re.compile("^Failure gate")).fill("20")
    page.get_by_label(re.compile("^Minimum soak")).fill("0")
    _shot(page, "05-deployment-new")
    page.get_by_role("button", name="Create and start").click()
    expect(page.locator("#deployment-status")).to_have_text("active")
    page.evaluate("window.__notReloaded = true")

    # Phase 0, the canaries: the bar moves without a reload.
    phase1 = page.locator('tr[data-phase="0"] [data-done]')
    expect(phase1).to_have_attribute("data-done", "2", timeout=30_000)
    _shot(page, "06-deployment-progress", phone=False)
    # Phase 1: sim-3 and sim-4 fail: 2 of 4 is over the 20 % gate: paused, with the reason.
    expect(page.locator("#deployment-status")).to_have_text("paused", timeout=30_000)
    expect(page.locator("#paused-reason")).to_contain_text("phase 1: ")
    expect(page.locator("#paused-reason")).to_contain_text("(gate 20%)")
    expect(page.locator("#paused-reason")).to_contain_text(
        "post-install hook: sensor bus timeout (2)"
    )
    assert page.evaluate("window.__notReloaded") is True
    _shot(page, "07-deployment-paused")

    # A viewer, meanwhile: no button, and the server refuses the forged one.
    vctx = _context(browser, base)
    viewer = vctx.new_page()
    _login(viewer, "viewer@acme.example")
    viewer.goto(page.url)
    expect(viewer.locator("#deployment-status")).to_have_text("paused")
    expect(viewer.get_by_role("button", name="Resume")).to_have_count(0)
    expect(viewer.get_by_role("button", name="Pause")).to_have_count(0)
    csrf = viewer.locator('input[name="csrf"]').first.get_attribute("value")
    answer = viewer.request.post(page.url + "/resume", form={"csrf": csrf or ""},
                                 headers={"Origin": base}, max_redirects=0)  # fmt: skip
    assert answer.status == 403 and "needs the operator role" in answer.text()
    _shot(viewer, "08-deployment-as-viewer", phone=False)
    vctx.close()
    assert hub.deployment_row(1).status == "paused"

    # The operator resumes; the rest of phase 1 installs; the deployment completes.
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#deployment-status")).to_have_text("completed", timeout=30_000)
    expect(page.locator('tr[data-phase="1"] [data-count="failed"]')).to_have_text("2")
    expect(page.locator('tr[data-phase="1"] [data-count="committed"]')).to_have_text("2")
    expect(page.get_by_role("link", name="sim-3")).to_be_visible()
    _shot(page, "09-deployment-completed")

    # The rest of the dashboard, for the record.
    page.goto("/devices/sim-3")
    expect(page.get_by_text("i2c-1: no ACK from 0x48", exact=True)).to_be_attached()
    _shot(page, "10-device-failed")
    for path, heading, name in (("/", "Fleet overview", "11-overview-after"),
                                ("/releases", "Releases", "12-releases"),
                                ("/deployments", "Deployments", "13-deployments"),
                                ("/audit", "Audit log", "14-audit"),
                                ("/keys", "Provisioning keys and signer CAs", "15-keys")):  # fmt: skip
        page.goto(path)
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        _shot(page, name)
    expect(page.get_by_text("Only admins see provisioning keys")).to_be_visible()
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile("/login$"))
    assert not fleet.errors, fleet.errors
    ctx.close()
