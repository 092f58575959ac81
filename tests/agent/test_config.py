"""agent.toml: the documented example parses; every bad key, type, range or overlap is one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from skylift.agent.config import ConfigError, load_config, parse_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "agent-config.md"


def documented_example() -> str:
    match = re.search(r"## Example\n.*?```toml\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/agent-config.md has no ```toml example"
    return match.group(1)


MINIMAL = """
[hub]
url = "https://hub.example.com"

[identity]
device_id = "gw-1"
product = "acme"
hardware_id = "board-a"
cert_file = "id/device.pem"
key_file = "id/device.key"

[[slot]]
class = "rootfs"
name = "A"
type = "file"
path = "slots/a.img"
size_bytes = 1048576

[[slot]]
class = "rootfs"
name = "B"
type = "file"
path = "slots/b.img"
size_bytes = 1048576

[bootloader]
kind = "file"
"""


def test_documented_example_parses() -> None:
    config = parse_config(documented_example(), source="agent.toml", base_dir=Path("/etc/skylift"))
    assert config.hub.url == "https://hub.example.com"
    assert config.hub.poll_interval_s == 300.0
    assert config.identity.key_file == Path("/var/lib/skylift/identity/device.key")
    assert config.identity.pkcs11_uri is None
    assert config.slot_classes == ("rootfs", "app")
    assert config.slot_names == ("A", "B")
    block = config.slots[0]
    assert (block.type, block.path, block.size_bytes) == ("block", Path("/dev/mmcblk0p2"), None)
    assert config.slots[2].size_bytes == 268435456
    assert config.data is not None and config.data.path == Path("/data")
    assert config.bootloader.kind == "uboot"
    assert dict(config.bootloader.options) == {
        "env_config": "/etc/fw_env.config",
        "boot_attempts": 3,
    }
    assert config.hooks.for_phase("health_check") == Path("/usr/libexec/skylift/health-check")
    assert config.hooks.pre_install is None
    assert config.hooks.timeout_s == 120.0
    assert config.storage.max_journal_bytes == 1048576
    assert config.download.max_ranges_per_request == 64
    assert config.download.deltas is True


def test_minimal_takes_defaults_and_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(MINIMAL)
    config = load_config(tmp_path / "agent.toml")
    assert config.identity.cert_file == tmp_path / "id/device.pem"
    assert config.slots[0].path == tmp_path / "slots/a.img"
    assert config.data is None
    assert config.storage.state_dir == Path("/var/lib/skylift")
    assert config.hub.poll_jitter_s == 30.0
    assert config.download.max_gap_bytes == 4096
    assert config.source == str(tmp_path / "agent.toml")


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(AttributeError):
        config.hub.url = "https://elsewhere"  # type: ignore[misc]


def _replace(old: str, new: str) -> str:
    assert old in MINIMAL
    return MINIMAL.replace(old, new, 1)


def _add(section: str, line: str) -> str:
    return _replace(f"[{section}]\n", f"[{section}]\n{line}\n")


EXTRA_SLOT_PAIR = """
[[slot]]
class = "app"
name = "A"
type = "directory"
path = "/srv/app-a"

[[slot]]
class = "app"
name = "B"
type = "directory"
path = "/srv/app-b"
"""

# (case, text, key named in the error, words of the problem)
BAD = [
    ("unknown top key", MINIMAL + "\n[agent]\nx = 1\n", "agent", "unknown key"),
    (
        "unknown hub key",
        _add("hub", "poll_intervall_s = 30"),
        "[hub] poll_intervall_s",
        "unknown key",
    ),
    ("http url", _replace("https://hub", "http://hub"), "[hub] url", "https://"),
    ("url with query", _replace('example.com"', 'example.com/?a=b"'), "[hub] url", "https://"),
    (
        "interval type",
        _add("hub", 'poll_interval_s = "300"'),
        "[hub] poll_interval_s",
        "number of seconds",
    ),
    (
        "interval bool",
        _add("hub", "poll_interval_s = true"),
        "[hub] poll_interval_s",
        "number of seconds",
    ),
    (
        "interval range",
        _add("hub", "poll_interval_s = 2"),
        "[hub] poll_interval_s",
        "from 5 to 86400",
    ),
    (
        "jitter above interval",
        _add("hub", "poll_interval_s = 60\npoll_jitter_s = 61"),
        "[hub] poll_jitter_s",
        "from 0 to 60",
    ),
    (
        "backoff max under initial",
        _add("hub", "backoff_initial_s = 60\nbackoff_max_s = 30"),
        "[hub] backoff_max_s",
        "from 60",
    ),
    (
        "missing hub",
        MINIMAL.replace('[hub]\nurl = "https://hub.example.com"\n', ""),
        "[hub]",
        "missing section",
    ),
    ("missing device id", _replace('device_id = "gw-1"\n', ""), "[identity] device_id", "missing"),
    ("bad device id", _replace('"gw-1"', '"gw 1"'), "[identity] device_id", "A-Z a-z"),
    (
        "both key and pkcs11",
        _add("identity", 'pkcs11_uri = "pkcs11:token=x"'),
        "[identity] key_file",
        "exactly one",
    ),
    (
        "neither key",
        _replace('key_file = "id/device.key"\n', ""),
        "[identity] key_file",
        "exactly one",
    ),
    (
        "pkcs11 not a uri",
        _replace('key_file = "id/device.key"', 'pkcs11_uri = "token=x"'),
        "[identity] pkcs11_uri",
        "pkcs11:",
    ),
    ("empty cert", _replace('"id/device.pem"', '""'), "[identity] cert_file", "non-empty string"),
    (
        "slot unknown key",
        _replace("size_bytes = 1048576\n\n[[slot]]", "size_bytes = 1048576\nsize = 3\n\n[[slot]]"),
        "slot[0] size",
        "unknown key",
    ),
    (
        "slot type",
        _replace('type = "file"', 'type = "nand"'),
        "slot[0] type",
        "one of file, block, directory",
    ),
    ("slot class", _replace('class = "rootfs"', 'class = "RootFS"'), "slot[0] class", "[a-z0-9]"),
    ("file without size", _replace("size_bytes = 1048576\n", ""), "slot[0] size_bytes", "missing"),
    (
        "file size range",
        _replace("size_bytes = 1048576", "size_bytes = 10"),
        "slot[0] size_bytes",
        "from 4096",
    ),
    (
        "file size float",
        _replace("size_bytes = 1048576", "size_bytes = 1048576.0"),
        "slot[0] size_bytes",
        "must be an integer",
    ),
    (
        "block with path",
        _replace(
            'type = "file"\npath = "slots/a.img"\nsize_bytes = 1048576',
            'type = "block"\npath = "/dev/sda2"',
        ),
        "slot[0] path",
        "not allowed here",
    ),
    (
        "block with size",
        _replace('type = "file"\npath = "slots/a.img"', 'type = "block"\ndevice = "/dev/sda2"'),
        "slot[0] size_bytes",
        "not allowed here",
    ),
    (
        "include on file slot",
        _replace("size_bytes = 1048576\n", 'size_bytes = 1048576\ninclude = ["**"]\n'),
        "slot[0] include",
        "only directory",
    ),
    (
        "directory glob escapes",
        MINIMAL
        + EXTRA_SLOT_PAIR.replace(
            'path = "/srv/app-a"', 'path = "/srv/app-a"\nexclude = ["../etc"]'
        ),
        "slot[2] exclude",
        "without '..'",
    ),
    (
        "one slot of a class",
        MINIMAL
        + EXTRA_SLOT_PAIR.split("[[slot]]")[0]
        + "[[slot]]"
        + EXTRA_SLOT_PAIR.split("[[slot]]")[1],
        "slot class 'app'",
        "exactly two",
    ),
    ("same name twice", _replace('name = "B"', 'name = "A"'), "slot class 'rootfs'", "exactly two"),
    (
        "names differ across classes",
        MINIMAL + EXTRA_SLOT_PAIR.replace('name = "B"', 'name = "C"'),
        "slot class 'app'",
        "differ from",
    ),
    (
        "no slots",
        MINIMAL.split("[[slot]]")[0] + '[bootloader]\nkind = "file"\n',
        "[[slot]]",
        "missing",
    ),
    (
        "slots overlap",
        _replace('path = "slots/b.img"', 'path = "slots/a.img"'),
        "[[slot]]",
        "slot rootfs/A (/etc/skylift/slots/a.img) overlaps slot rootfs/B",
    ),
    (
        "slot inside data",
        MINIMAL + '\n[data]\npath = "slots"\n',
        "[data] path",
        "overlaps the data partition",
    ),
    (
        "directory slot contains another",
        MINIMAL + EXTRA_SLOT_PAIR.replace("/srv/app-b", "/srv/app-a/b"),
        "[[slot]]",
        "overlaps",
    ),
    (
        "data unknown key",
        MINIMAL + '\n[data]\npath = "/data"\nmount = "/x"\n',
        "[data] mount",
        "unknown key",
    ),
    (
        "bootloader kind",
        _replace('kind = "file"', 'kind = "lilo"'),
        "[bootloader] kind",
        "one of uboot, grub, file, script",
    ),
    (
        "bootloader stray key",
        _replace('kind = "file"', 'kind = "file"\nenv = "/x"'),
        "[bootloader] env",
        "unknown key",
    ),
    (
        "bootloader options not a table",
        _replace('kind = "file"', 'kind = "file"\noptions = 3'),
        "[bootloader] options",
        "must be a table",
    ),
    (
        "hook phase unknown",
        MINIMAL + '\n[hooks]\npre_reboot = "/x"\n',
        "[hooks] pre_reboot",
        "unknown key",
    ),
    ("hook timeout", MINIMAL + "\n[hooks]\ntimeout_s = 0\n", "[hooks] timeout_s", "from 1"),
    (
        "storage range",
        MINIMAL + "\n[storage]\nmax_journal_bytes = 100\n",
        "[storage] max_journal_bytes",
        "from 4096",
    ),
    (
        "storage unknown",
        MINIMAL + "\n[storage]\nmax_download = 100\n",
        "[storage] max_download",
        "unknown key",
    ),
    (
        "download range",
        MINIMAL + "\n[download]\nmax_ranges_per_request = 0\n",
        "[download] max_ranges_per_request",
        "from 1",
    ),
    (
        "deltas not a bool",
        MINIMAL + '\n[download]\ndeltas = "no"\n',
        "[download] deltas",
        "must be true or false",
    ),
    (
        "reuse_inactive not a bool",
        MINIMAL + "\n[download]\nreuse_inactive = 1\n",
        "[download] reuse_inactive",
        "must be true or false",
    ),
    (
        "cache_max_bytes negative",
        MINIMAL + "\n[download]\ncache_max_bytes = -1\n",
        "[download] cache_max_bytes",
        "from 0",
    ),
    (
        "cache_max_bytes not an integer",
        MINIMAL + '\n[download]\ncache_max_bytes = "32M"\n',
        "[download] cache_max_bytes",
        "must be an integer",
    ),
    ("section not a table", "hooks = 3\n" + MINIMAL, "hooks", "must be a table"),
    ("not toml", MINIMAL + "\n[hub\n", "not valid TOML", ""),
]


@pytest.mark.parametrize(("text", "key", "problem"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_is_one_line_naming_file_and_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="/etc/skylift/agent.toml", base_dir=Path("/etc/skylift"))
    line = info.value.diagnostics()
    assert "\n" not in line
    assert line.startswith(f"/etc/skylift/agent.toml: {key}")
    assert problem in line
    assert "docs/agent-config.md" in line


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_pkcs11_instead_of_key_file() -> None:
    config = parse_config(
        _replace('key_file = "id/device.key"', 'pkcs11_uri = "pkcs11:token=se;object=device"')
    )
    assert config.identity.key_file is None
    assert config.identity.pkcs11_uri == "pkcs11:token=se;object=device"


def test_directory_slots_carry_rules() -> None:
    config = parse_config(
        MINIMAL
        + EXTRA_SLOT_PAIR.replace(
            'path = "/srv/app-a"', 'path = "/srv/app-a"\nexclude = ["var/**"]'
        )
    )
    app_a = config.slots[2]
    assert (app_a.type, app_a.include, app_a.exclude) == ("directory", ("**",), ("var/**",))


def test_deltas_can_be_turned_off() -> None:
    assert parse_config(MINIMAL, base_dir=Path("/etc")).download.reuse_inactive is True
    text = MINIMAL + "\n[download]\ndeltas = false\nreuse_inactive = false\n"
    config = parse_config(text, base_dir=Path("/etc"))
    assert config.download.deltas is False
    assert config.download.reuse_inactive is False
    assert config.download.max_gap_bytes == 4096  # the rest keeps its defaults


def test_chunk_cache_bound_defaults_to_32_mib_and_0_turns_it_off() -> None:
    assert parse_config(MINIMAL, base_dir=Path("/etc")).download.cache_max_bytes == 32 << 20
    for value in (0, 1 << 30):
        text = MINIMAL + f"\n[download]\ncache_max_bytes = {value}\n"
        assert parse_config(text, base_dir=Path("/etc")).download.cache_max_bytes == value
