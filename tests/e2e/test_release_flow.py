"""The release engineer's and operator's day, through the real CLI against a real hub.

A hub made by ``skylift hub init`` serves its management API over TLS in a
thread; every step is a ``skylift`` subprocess, as a person or CI would type it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from skylift.hub.app import make_api_app
from skylift.hub.setup import init_hub, open_hub
from skylift.hub.tls import ServerThread, make_server, server_context

sys.path.insert(0, str(Path(__file__).parents[1]))
from bundle.conftest import realistic_payload  # real image-like content

PASS = "e2e passphrase"


class Cli:
    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [sys.executable, "-m", "skylift.cli.main", *args],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        if ok:
            assert p.returncode == 0, f"skylift {' '.join(args)}\n{p.stdout}\n{p.stderr}"
        else:
            assert p.returncode != 0, p.stdout
            assert "Traceback" not in p.stderr, p.stderr
        return p


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, Path]]:
    tmp = tmp_path_factory.mktemp("e2e")
    result = init_hub(tmp / "hub", organisation="acme", admin_email="ops@acme.example")
    ctx = open_hub(result.config)
    tls = server_context(
        result.config.ca_dir / "server.pem", result.config.ca_dir / "server.key",
        client_cas_pem=None, require_client_cert=False,
    )  # fmt: skip
    server = make_server(make_api_app(ctx), host="127.0.0.1", port=0, ssl_context=tls)
    with ServerThread(server) as thread:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLIFT_")}
        env |= {"SKYLIFT_KEY_PASSPHRASE": PASS, "XDG_CONFIG_HOME": str(tmp / "config"),
                "COLUMNS": "200"}  # fmt: skip
        cli = Cli(tmp, env)
        cli("login", f"https://127.0.0.1:{thread.port}", "--token", result.admin_token,
            "--ca", str(result.config.ca_dir / "device-ca.pem"))  # fmt: skip
        yield cli, tmp


def test_product_release_and_deployment(hub: tuple[Cli, Path]) -> None:
    cli, tmp = hub
    cli("keys", "generate", "root")
    cli("keys", "generate", "release")
    cli("product", "create", "acme-gw", "--root-key", "root.key", "--release-key", "release.key")
    data = realistic_payload(1_500_000, seed=21)
    (tmp / "v1.img").write_bytes(data)
    (tmp / "v2.img").write_bytes(data[:700_000] + b"patched!" + data[700_000:])
    for version, image in (("1.0.0", "v1.img"), ("1.1.0", "v2.img")):
        cli("bundle", "create", "--product", "acme-gw", "--version", version, "--hardware", "hw1",
            "--payload", f"rootfs={image}", "--key", "release.key", "-o", f"{version}.bundle")  # fmt: skip
    first = cli("release", "push", "1.0.0.bundle", "--key", "release.key")
    second = cli("release", "push", "1.1.0.bundle", "--key", "release.key")
    assert "released acme-gw 1.0.0" in first.stderr
    assert "released acme-gw 1.1.0" in second.stderr
    uploaded = [s.stderr.rsplit(", ", 1)[1] for s in (first, second)]
    assert uploaded[0] != uploaded[1]  # the second release uploads only what changed
    # the same version again, or a bundle signed by another key, is refused in one line
    again = cli("release", "push", "1.0.0.bundle", "--key", "release.key", ok=False)
    assert "error:" in again.stderr
    cli("keys", "generate", "intruder")
    cli("bundle", "create", "--product", "acme-gw", "--version", "6.6.6", "--hardware", "hw1",
        "--payload", "rootfs=v1.img", "--key", "intruder.key", "-o", "evil.bundle")  # fmt: skip
    evil = cli("release", "push", "evil.bundle", "--key", "intruder.key", ok=False)
    assert "error:" in evil.stderr
    listed = json.loads(cli("devices", "list", "--json").stdout)
    assert listed == []
