"""The hub client and the remote commands' helpers, without a hub (httpx.MockTransport).

The end-to-end tests (tests/e2e) run every command against a real hub; these
pin down what is hard to provoke there: page bounds, odd answers, progress
without a terminal, terminal escapes in what devices report.
"""

from __future__ import annotations

import io
import json
import stat
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from skylift.cli import client as client_mod
from skylift.cli import remote
from skylift.cli.client import (
    ApiError,
    Credentials,
    HubClient,
    hub_url,
    load_credentials,
    save_credentials,
    segment,
)
from skylift.errors import UserInputError

TOKEN = "sk_abcdefgh_secretsecretsecret"
CREDS = Credentials("https://hub.example:8080", TOKEN)


def _client(handler: httpx.MockTransport | None = None) -> HubClient:
    return HubClient(CREDS, transport=handler)


def _pager(
    total: int, seen: list[httpx.Request], *, empty_with_cursor: bool = False
) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        start = int(request.url.params.get("cursor") or 0)
        limit = int(request.url.params["limit"])
        if empty_with_cursor:
            return httpx.Response(200, json={"items": [], "next_cursor": "7"})
        items = [{"n": i} for i in range(start, min(start + limit, total))]
        more = start + limit < total
        return httpx.Response(
            200, json={"items": items, "next_cursor": str(start + limit) if more else None}
        )

    return httpx.MockTransport(handle)


def test_pages_follow_cursors_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "PAGE_LIMIT", 3)
    seen: list[httpx.Request] = []
    with _client(_pager(10, seen)) as c:
        assert [i["n"] for i in c.pages("/devices", [("tag", "lab")], 100)] == list(range(10))
        assert not c.more
        assert [r.url.params.get("cursor") for r in seen] == [None, "3", "6", "9"]
        assert all(r.url.params["tag"] == "lab" for r in seen)
        seen.clear()
        assert [i["n"] for i in c.pages("/devices", [], 5)] == [0, 1, 2, 3, 4]
        assert c.more  # the hub has more than --limit
        assert [r.url.params["limit"] for r in seen] == ["3", "2"]


def test_pages_stop_at_an_empty_page_and_after_max_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []
    with _client(_pager(0, seen, empty_with_cursor=True)) as c:
        assert list(c.pages("/devices", [], 1000)) == []
        assert len(seen) == 1
    monkeypatch.setattr(client_mod, "PAGE_LIMIT", 1)
    monkeypatch.setattr(client_mod, "MAX_PAGES", 4)
    seen.clear()
    with _client(_pager(1000, seen)) as c:
        assert len(list(c.pages("/devices", [], 1000))) == 4
        assert len(seen) == 4 and c.more


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"error": "no device 'x'"}, "hub answered 404: no device 'x'"),
        (401, {"error": "the API token is unknown or revoked"}, "run 'skylift login' again"),
        (
            403,
            {"error": "creating a deployment needs the operator role"},
            "needs the operator role",
        ),
        (502, "<html>\n<b>Bad Gateway</b>\n</html>", "hub answered 502: <html> <b>Bad Gateway</b>"),
        (400, ["not", "an", "object"], "hub answered 400"),
        (302, "", "hub answered 302"),
    ],
)
def test_refusals_are_one_line_without_the_token(status: int, body: object, expected: str) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers={"location": "https://evil.example/"})
        return httpx.Response(status, json=body)

    with _client(httpx.MockTransport(handle)) as c, pytest.raises(ApiError) as e:
        c.json("GET", "/hub")
    line = e.value.diagnostics()
    assert expected in line and "\n" not in line and TOKEN not in line
    assert e.value.status == status


def test_a_non_json_success_and_an_unreachable_hub_are_api_errors() -> None:
    html = httpx.MockTransport(lambda r: httpx.Response(200, text="<html>"))
    with _client(html) as c, pytest.raises(ApiError, match="is not JSON"):
        c.json("GET", "/hub")

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with _client(httpx.MockTransport(refuse)) as c, pytest.raises(ApiError) as e:
        c.json("GET", "/hub")
    assert "cannot reach the hub at https://hub.example:8080" in str(e.value)
    assert TOKEN not in e.value.diagnostics()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://hub.example:8080", "https://hub.example:8080"),
        ("https://hub.example:8080/", "https://hub.example:8080"),
        ("https://hub.example/api/v1/", "https://hub.example"),
        ("https://[::1]:8080", "https://[::1]:8080"),
    ],
)
def test_hub_urls(url: str, expected: str) -> None:
    assert hub_url(url) == expected


@pytest.mark.parametrize(
    "url", ["http://hub.example:8080", "hub.example:8080", "https://", "https://h:99999", "ftp://h"]
)
def test_hub_urls_refused(url: str) -> None:
    with pytest.raises(UserInputError, match="not an https URL"):
        hub_url(url)


def test_path_segments_are_quoted_and_dot_segments_refused() -> None:
    assert segment("pump-001", "device id") == "pump-001"
    assert segment("a/b?c#d", "device id") == "a%2Fb%3Fc%23d"
    for bad in ("", ".", ".."):
        with pytest.raises(UserInputError):
            segment(bad, "device id")


def test_credentials_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    for var in ("SKYLIFT_HUB", "SKYLIFT_TOKEN", "SKYLIFT_CA"):
        monkeypatch.delenv(var, raising=False)
    path = save_credentials(CREDS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_credentials() == CREDS
    assert TOKEN not in repr(CREDS)
    path.write_text(json.dumps({"url": "https://h", "token": 5}))
    with pytest.raises(UserInputError, match="malformed"):
        load_credentials()
    monkeypatch.setenv("SKYLIFT_HUB", "http://plain.example")
    monkeypatch.setenv("SKYLIFT_TOKEN", TOKEN)
    with pytest.raises(UserInputError, match="not an https URL"):
        load_credentials()


def test_a_missing_ca_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="cannot use .* as the hub's CA certificate"):
        HubClient(Credentials("https://h", TOKEN, tmp_path / "nope.pem"))


def test_phases() -> None:
    assert remote._phases(["tag:ring=canary", "10%", "50", "100"]) == [
        {"tag": "ring=canary"}, {"percent": 10}, {"percent": 50}, {"percent": 100}
    ]  # fmt: skip
    assert remote._phases(["12.5"]) == [{"percent": 12.5}]
    for bad in ("0", "-5", "101", "half", "nan"):
        with pytest.raises(UserInputError, match="--phase takes"):
            remote._phases([bad])


def test_time_arguments() -> None:
    assert remote._time_arg("2026-11-23T19:00:00Z", "x") == "2026-11-23T19:00:00Z"
    ago, ahead = remote._time_arg("2h", "x"), remote._time_arg("30d", "x", future=True)
    assert ago is not None and ahead is not None and ago < ahead
    assert remote._time_arg(None, "x") is None


def test_hub_strings_are_plain_text_without_terminal_escapes() -> None:
    reason = "disk [bold red]full[/]\x1b]0;pwned\x07\x1b[2J"
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=200).print(remote._t(reason))
    shown = buf.getvalue()
    assert "[bold red]full[/]" in shown  # markup shown as typed, not interpreted
    assert "\x07" not in shown and "]0;pwned" in shown and "\x1b]0" not in shown


def _progress(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> str:
    buf = io.StringIO()
    monkeypatch.setattr(remote, "err", Console(file=buf, force_terminal=terminal, width=100))
    monkeypatch.setattr(remote, "_PLAIN_PROGRESS_S", 0.0)
    with remote._UploadProgress(4 * 1024 * 1024) as progress:
        for _ in range(4):
            progress.advance(1024 * 1024)
    return buf.getvalue()


def test_upload_progress_plain_lines_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _progress(monkeypatch, terminal=False).splitlines()
    assert lines == [
        "uploaded 1.0 MiB of 4.0 MiB (25%)",
        "uploaded 2.0 MiB of 4.0 MiB (50%)",
        "uploaded 3.0 MiB of 4.0 MiB (75%)",
    ]


def test_upload_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _progress(monkeypatch, terminal=True)
    assert "uploading chunks" in shown and "\x1b[" in shown
    assert "uploaded 1.0 MiB" not in shown


class _Statuses:
    """A client whose deployment goes through ``statuses``, one per GET."""

    def __init__(self, *statuses: str) -> None:
        self.statuses = list(statuses)
        self.gets = 0

    def json(self, method: str, path: str, **kw: object) -> dict[str, object]:
        status = self.statuses[min(self.gets, len(self.statuses) - 1)]
        self.gets += 1
        phase = {"phase": 0, "percent": 100, "tag": None, "devices": 2,
                 "counts": {"pending": 1, "committed": 1}, "failure_rate_percent": 0.0}  # fmt: skip
        return {"id": 7, "name": "night", "product": "acme-gw", "version": "1.1.0",
                "status": status, "paused_reason": None, "current_phase": 0,
                "failure_gate_percent": 5.0, "phases": [phase]}  # fmt: skip


@pytest.mark.parametrize("terminal", [False, True])
def test_watch_refreshes_until_settled(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(remote, "out", Console(file=out, force_terminal=terminal, width=150))
    monkeypatch.setattr(remote, "err", Console(file=err, width=150))
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    fake = _Statuses("active", "active", "completed")
    remote._watch(fake, "/deployments/7", 2.0, 3600, as_json=False)  # type: ignore[arg-type]
    assert fake.gets == 3 and sleeps == [2.0, 2.0]
    assert "completed" in out.getvalue() and "night" in out.getvalue()
    if not terminal:
        assert err.getvalue().count("deployment 7 active in phase 0") == 2


def test_watch_is_bounded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err = io.StringIO()
    monkeypatch.setattr(remote, "err", Console(file=err, width=150))
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    fake = _Statuses("active")
    remote._watch(fake, "/deployments/7", 10.0, 35, as_json=True)  # type: ignore[arg-type]
    assert fake.gets == 4  # at 0, 10, 20, 30 s; 40 would be past 35
    assert "still active after 35 s" in err.getvalue()
    assert json.loads(capsys.readouterr().out)["status"] == "active"
