"""hub.toml: defaults that work, overrides, and one-line errors for bad values."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from skylift.errors import UserInputError
from skylift.hub.config import CONFIG_NAME, load_config, write_config


def test_defaults_round_trip(tmp_path: Path) -> None:
    write_config(tmp_path, name="lab", gateway_port=8443, api_port=8080)
    c = load_config(tmp_path)
    assert c.name == "lab"
    assert c.database_url == f"sqlite:///{tmp_path.resolve()}/hub.db"
    assert c.storage_url == f"file://{tmp_path.resolve()}/objects"
    assert (c.gateway.port, c.api.port) == (8443, 8080)
    assert c.trusted_proxies == ()
    assert (c.delta_previous_releases, c.delta_max_payload_bytes) == (2, 4 << 30)
    o = c.with_overrides(database_url="postgresql://db/skylift", storage_url=None)
    assert o.database_url == "postgresql://db/skylift"
    assert o.storage_url == c.storage_url


def test_absolute_urls_are_kept(tmp_path: Path) -> None:
    write_config(tmp_path, name="lab", gateway_port=1, api_port=2)
    text = (tmp_path / CONFIG_NAME).read_text()
    text = text.replace('url = "sqlite:///hub.db"', 'url = "sqlite:////var/lib/hub.db"')
    text = text.replace("trusted_proxies = []", 'trusted_proxies = ["10.0.0.0/8", "::1"]')
    (tmp_path / CONFIG_NAME).write_text(text)
    c = load_config(tmp_path)
    assert c.database_url == "sqlite:////var/lib/hub.db"
    assert c.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("port = 8443", "port = 70000", "port must be 0..65535"),
        ("port = 8443", 'port = "8443"', "port must be 0..65535"),
        ("trusted_proxies = []", 'trusted_proxies = ["not-an-ip"]', "trusted_proxies"),
        ("interval_s = 300", "interval_s = 1", "interval_s"),
        ('url = "sqlite:///hub.db"', "", "[database] url is missing"),
        ("[hub]", "[hub", "not valid TOML"),
        ("previous_releases = 2", "previous_releases = -1", "previous_releases must be 0..16"),
        ("previous_releases = 2", "previous_releases = 17", "previous_releases must be 0..16"),
        ("previous_releases = 2", 'previous_releases = "2"', "previous_releases must be 0..16"),
        ("max_payload_bytes = 4294967296", "max_payload_bytes = 0", "max_payload_bytes"),
        ("interval_s = 30\n", "interval_s = 0\n", "[deltas] interval_s must be 1..3600"),
        ("interval_s = 30\n", "interval_s = 3601\n", "[deltas] interval_s must be 1..3600"),
        ("zlib = true", 'zlib = "yes"', "[deltas] zlib must be true or false"),
    ],
)
def test_bad_values_are_one_line(tmp_path: Path, old: str, new: str, message: str) -> None:
    write_config(tmp_path, name="lab", gateway_port=8443, api_port=8080)
    path = tmp_path / CONFIG_NAME
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(UserInputError) as info:
        load_config(tmp_path)
    assert message in info.value.diagnostics()
    assert "\n" not in info.value.diagnostics()


def test_delta_settings(tmp_path: Path) -> None:
    write_config(tmp_path, name="lab", gateway_port=8443, api_port=8080)
    path = tmp_path / CONFIG_NAME
    text = path.read_text().replace("previous_releases = 2", "previous_releases = 0")
    text = text.replace("interval_s = 30\n", "interval_s = 2\n")
    text = text.replace("zlib = true", "zlib = false")
    path.write_text(text.replace("max_payload_bytes = 4294967296", "max_payload_bytes = 1048576"))
    c = load_config(tmp_path)
    assert (c.delta_previous_releases, c.delta_max_payload_bytes) == (0, 1 << 20)
    assert c.delta_interval_s == 2 and c.delta_zlib is False
    # A hub.toml written before the setting existed gets the defaults.
    text = path.read_text()
    path.write_text(text[: text.index("[deltas]")])
    c = load_config(tmp_path)
    assert (c.delta_previous_releases, c.delta_max_payload_bytes) == (2, 4 << 30)
    assert c.delta_interval_s == 30 and c.delta_zlib is True


def test_not_a_hub_directory(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not a hub directory"):
        load_config(tmp_path)
