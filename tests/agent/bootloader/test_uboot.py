"""U-Boot environment: the format, fw_env.config, and the real fw_printenv/fw_setenv.

The round trips drive Debian's ``fw_printenv``/``fw_setenv`` (package
``libubootenv-tool``) against the same files and ``fw_env.config`` as the agent.
"""

from __future__ import annotations

import os
import subprocess
import zlib
from pathlib import Path

import pytest

from skylift.agent.bootloader import BootloaderError, UBootBootloader
from skylift.agent.bootloader.uboot import (
    MAX_ENV_BYTES,
    UBootEnv,
    UBootScheme,
    decode_env,
    encode_env,
    load_fw_env_config,
    newest_copy,
    parse_fw_env_config,
)

from .rigs import ENV_SIZE, require_tool, write_fw_env_config

PACKAGE = "libubootenv-tool"


def fw_printenv(config: Path) -> dict[str, str]:
    tool = require_tool("fw_printenv", PACKAGE)
    out = subprocess.run(
        [tool, "-c", str(config)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def fw_setenv(config: Path, *pairs: str, tmp_path: Path) -> None:
    tool = require_tool("fw_setenv", PACKAGE)
    default = tmp_path / "default.env"  # used only when no copy is valid
    default.touch()
    subprocess.run(
        [tool, "-c", str(config), "-f", str(default), *pairs],
        capture_output=True,
        check=True,
        timeout=30,
    )


def blank_file(tmp_path: Path, redundant: bool) -> Path:
    config = write_fw_env_config(tmp_path, redundant=redundant)
    (tmp_path / "uboot.env").write_bytes(bytes(ENV_SIZE * (2 if redundant else 1)))
    return config


# --- fw_env.config -----------------------------------------------------------


def test_config_single_and_redundant() -> None:
    single = parse_fw_env_config("# comment\n/dev/mmcblk0  0x3f8000  0x4000  0x200\n")
    assert not single.redundant
    copy = single.copies[0]
    assert (copy.device, copy.offset, copy.size_bytes, copy.sector_size_bytes) == (
        Path("/dev/mmcblk0"),
        0x3F8000,
        0x4000,
        0x200,
    )
    double = parse_fw_env_config("/dev/mmcblk0 0x3f8000 0x4000\n/dev/mmcblk0 4177920 16384 # b\n")
    assert double.redundant
    assert double.copies[1].offset == 0x3FC000


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no environment device"),
        ("# only a comment\n", "no environment device"),
        ("/dev/x 0\n", "expected"),
        ("/dev/x zero 0x4000\n", "not a number"),
        ("/dev/x 0 0x4000\n/dev/x 0x4000 0x2000\n", "differ in size"),
        ("/dev/x 0 0x4000\n/dev/x 0x4000 0x4000\n/dev/x 0x8000 0x4000\n", "at most 2"),
        (f"/dev/x 0 {MAX_ENV_BYTES + 1}\n", "outside"),
        ("/dev/x 0 4\n", "outside"),
    ],
)
def test_config_errors(text: str, fragment: str) -> None:
    with pytest.raises(BootloaderError, match=fragment):
        parse_fw_env_config(text)


def test_missing_config_is_a_bootloader_error(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="cannot read"):
        UBootBootloader(config_path=tmp_path / "nope.config")


# --- the format ---------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    variables = {"BOOT_ORDER": "A B", "bootcmd": "run a; run b", "empty": "", "ü": "ö"}
    for flag in (None, 7):
        image = encode_env(variables, 256, flag=flag)
        assert len(image) == 256
        assert decode_env(image, redundant=flag is not None) == (flag, variables)


def test_encoding_is_sorted_terminated_and_zero_filled() -> None:
    image = encode_env({"b": "2", "a": "1"}, 32)
    data = image[4:]
    assert data == b"a=1\0b=2\0\0" + bytes(32 - 4 - 9)
    assert int.from_bytes(image[:4], "little") == zlib.crc32(data)


def test_environment_full() -> None:
    with pytest.raises(BootloaderError, match="full"):
        encode_env({"x": "y" * 100}, 64)


@pytest.mark.parametrize(
    ("flags", "newest"),
    [
        ((1, 2), 1),
        ((2, 1), 0),
        ((255, 0), 1),
        ((0, 255), 0),
        ((5, 5), 0),
        ((None, 3), 1),
        ((3, None), 0),
        ((None, None), None),
    ],
)
def test_newest_copy_follows_u_boot(
    flags: tuple[int | None, int | None], newest: int | None
) -> None:
    assert newest_copy(flags) == newest


# --- interop with Debian's fw_printenv / fw_setenv -----------------------------


@pytest.mark.parametrize("redundant", [False, True], ids=["single", "redundant"])
def test_agent_writes_fw_printenv_reads(tmp_path: Path, redundant: bool) -> None:
    config = blank_file(tmp_path, redundant)
    env = UBootEnv(load_fw_env_config(config))
    env.create({"bootdelay": "2", "bootcmd": "run distro_bootcmd"})
    bl = UBootBootloader(config_path=config)
    bl.mark_good("A")
    bl.try_once("B")
    assert fw_printenv(config) == {
        "BOOT_A_LEFT": "3",
        "BOOT_B_LEFT": "3",
        "BOOT_ORDER": "B A",
        "bootcmd": "run distro_bootcmd",
        "bootdelay": "2",
    }
    bl.mark_bad("B")
    assert fw_printenv(config)["BOOT_ORDER"] == "A"
    assert fw_printenv(config)["BOOT_B_LEFT"] == "0"
    bl.mark_bad("A")  # an empty BOOT_ORDER is deleted, as fw_setenv does
    assert "BOOT_ORDER" not in fw_printenv(config)


@pytest.mark.parametrize("redundant", [False, True], ids=["single", "redundant"])
def test_fw_setenv_writes_agent_reads(tmp_path: Path, redundant: bool) -> None:
    config = blank_file(tmp_path, redundant)
    fw_setenv(
        config, "BOOT_ORDER", "B A", "BOOT_A_LEFT", "3", "BOOT_B_LEFT", "2", tmp_path=tmp_path
    )
    bl = UBootBootloader(config_path=config)
    assert bl.primary() == "B"
    assert bl.state("B").attempts_left == 2
    fw_setenv(config, "BOOT_B_LEFT", "0", tmp_path=tmp_path)
    assert bl.primary() == "A"
    assert not bl.state("B").bootable
    fw_setenv(config, "BOOT_ORDER", tmp_path=tmp_path)  # deleting falls back to the default
    assert bl.env.read() == {"BOOT_A_LEFT": "3", "BOOT_B_LEFT": "0"}


def test_redundant_writes_alternate_with_fw_setenv(tmp_path: Path) -> None:
    config = blank_file(tmp_path, redundant=True)
    env = UBootEnv(load_fw_env_config(config))
    for i in range(6):  # agent and tool take turns; each must read the other's newest copy
        if i == 0:
            env.create({"counter": "0"})
        elif i % 2:
            fw_setenv(config, "counter", str(i), tmp_path=tmp_path)
        else:
            env.update({"counter": str(i)})
        assert env.read()["counter"] == str(i)
        assert fw_printenv(config)["counter"] == str(i)
    _, flag, _ = env._load()
    assert flag is not None
    assert flag >= 5


@pytest.mark.parametrize("redundant", [False, True], ids=["single", "redundant"])
def test_bytes_match_fw_setenv(tmp_path: Path, redundant: bool) -> None:
    """Same variables, same bytes: CRC-covered data up to the end marker, and flag.

    libubootenv 0.3.2 leaves its uninitialised buffer after the end marker
    (its CRC covers that too); U-Boot's saveenv and the agent zero-fill it.
    So the data are compared up to and including the end marker, and each
    side's CRC is checked over its own data area.
    """
    pairs = {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3", "bootcmd": "run x"}
    theirs_dir, ours_dir = tmp_path / "theirs", tmp_path / "ours"
    theirs_dir.mkdir()
    ours_dir.mkdir()
    theirs_config = blank_file(theirs_dir, redundant)
    ours_config = blank_file(ours_dir, redundant)
    fw_setenv(theirs_config, *[x for kv in pairs.items() for x in kv], tmp_path=tmp_path)
    # fw_setenv wrote its first copy where U-Boot looks for the newer one; do the same.
    ours = UBootEnv(load_fw_env_config(ours_config))
    theirs = UBootEnv(load_fw_env_config(theirs_config))
    index, flag, _ = theirs._load()
    header = 5 if redundant else 4
    if redundant:
        ours._write(index, encode_env(pairs, ENV_SIZE, flag=flag))
    else:
        ours.create(pairs)
    theirs_image = (theirs_dir / "uboot.env").read_bytes()[index * ENV_SIZE :][:ENV_SIZE]
    ours_image = (ours_dir / "uboot.env").read_bytes()[index * ENV_SIZE :][:ENV_SIZE]
    end = theirs_image.index(b"\0\0", header) + 2
    assert ours_image[4:end] == theirs_image[4:end]
    assert ours_image[end:] == bytes(ENV_SIZE - end)
    for image in (ours_image, theirs_image):
        assert int.from_bytes(image[:4], "little") == zlib.crc32(image[header:])
    assert fw_printenv(ours_config) == fw_printenv(theirs_config) == pairs


def test_single_whole_file_is_replaced_atomically(tmp_path: Path) -> None:
    config = blank_file(tmp_path, redundant=False)
    path = tmp_path / "uboot.env"
    UBootEnv(load_fw_env_config(config)).create({})
    path.chmod(0o600)
    before = os.stat(path)
    UBootBootloader(config_path=config).try_once("B")
    after = os.stat(path)
    assert after.st_ino != before.st_ino
    assert after.st_mode & 0o777 == 0o600
    assert after.st_size == ENV_SIZE


def test_redundant_write_goes_to_the_older_copy(tmp_path: Path) -> None:
    config = blank_file(tmp_path, redundant=True)
    env = UBootEnv(load_fw_env_config(config))
    env.create({"x": "0"})
    path = tmp_path / "uboot.env"
    for i in range(1, 4):
        before = path.read_bytes()
        older = 1 - env._load()[0]
        env.update({"x": str(i)})
        after = path.read_bytes()
        kept = slice((1 - older) * ENV_SIZE, (2 - older) * ENV_SIZE)
        assert after[kept] == before[kept]  # the newer copy is never touched
        assert env._load()[0] == older


# --- corrupt inputs -------------------------------------------------------------


def _valid(variables: dict[str, str] | None = None) -> bytes:
    return encode_env(variables or {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3"}, ENV_SIZE)


def _with_crc(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "little") + data


CORRUPT_SINGLE = {
    "bit flip in data": lambda: _valid()[:10] + bytes([_valid()[10] ^ 1]) + _valid()[11:],
    "bit flip in crc": lambda: bytes([_valid()[0] ^ 0x80]) + _valid()[1:],
    "truncated": lambda: _valid()[: ENV_SIZE // 2],
    "empty file": lambda: b"",
    "erased flash": lambda: b"\xff" * ENV_SIZE,
    "all zeros": lambda: bytes(ENV_SIZE),
    "garbage": lambda: bytes((i * 37 + 11) % 256 for i in range(ENV_SIZE)),
    "no end marker": lambda: _with_crc(b"a=1\0" * ((ENV_SIZE - 4) // 4)),
    "entry without =": lambda: _with_crc((b"a=1\0junk\0\0").ljust(ENV_SIZE - 4, b"\0")),
}


@pytest.mark.parametrize("case", list(CORRUPT_SINGLE))
def test_corrupt_single_env_is_refused_and_left_alone(tmp_path: Path, case: str) -> None:
    config = write_fw_env_config(tmp_path, redundant=False)
    path = tmp_path / "uboot.env"
    path.write_bytes(CORRUPT_SINGLE[case]())
    before = path.read_bytes()
    (tmp_path / "cmdline").write_text("rauc.slot=A\n")
    bl = UBootBootloader(config_path=config, cmdline_path=tmp_path / "cmdline")
    for call in (
        bl.primary,
        lambda: bl.state("A"),
        lambda: bl.try_once("B"),
        lambda: bl.mark_good("A"),
        lambda: bl.mark_bad("B"),
    ):
        with pytest.raises(BootloaderError) as info:
            call()
        assert "\n" not in info.value.diagnostics()
    assert path.read_bytes() == before
    assert bl.current() == "A"  # the command line does not depend on the environment


def test_redundant_with_one_corrupt_copy_uses_the_other_and_repairs_it(tmp_path: Path) -> None:
    config = blank_file(tmp_path, redundant=True)
    env = UBootEnv(load_fw_env_config(config))
    env.create({"BOOT_ORDER": "B A"})
    path = tmp_path / "uboot.env"
    image = bytearray(path.read_bytes())
    image[10] ^= 0xFF  # copy 0, the newer one, is hit by a power cut
    path.write_bytes(bytes(image))
    assert env.read() == {"BOOT_ORDER": "B A"}
    assert fw_printenv(config) == {"BOOT_ORDER": "B A"}
    env.update({"BOOT_ORDER": "A B"})  # goes to copy 0, replacing the broken one
    assert env._load()[0] == 0
    assert fw_printenv(config)["BOOT_ORDER"] == "A B"


def test_redundant_with_both_copies_corrupt_is_refused(tmp_path: Path) -> None:
    config = write_fw_env_config(tmp_path, redundant=True)
    path = tmp_path / "uboot.env"
    path.write_bytes(b"\xff" * (2 * ENV_SIZE))
    bl = UBootBootloader(config_path=config)
    with pytest.raises(BootloaderError, match="no valid copy"):
        bl.try_once("B")
    assert path.read_bytes() == b"\xff" * (2 * ENV_SIZE)


def test_missing_device_is_a_bootloader_error(tmp_path: Path) -> None:
    config = write_fw_env_config(tmp_path, redundant=False)
    with pytest.raises(BootloaderError, match="cannot open"):
        UBootBootloader(config_path=config).primary()


def test_mtd_is_refused_with_a_hint(tmp_path: Path) -> None:
    config = tmp_path / "fw_env.config"
    config.write_text("/dev/mtd1 0x0 0x10000 0x10000\n")
    with pytest.raises(BootloaderError, match="erase") as info:
        UBootBootloader(config_path=config).primary()
    assert "script backend" in info.value.diagnostics()


# --- the boot script mirror -----------------------------------------------------


def test_boot_script_on_an_empty_environment_sets_its_defaults() -> None:
    slot, changes = UBootScheme(("A", "B"), 3).boot({})
    assert slot == "A"
    assert changes == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "2", "BOOT_B_LEFT": "3"}


def test_boot_script_resets_counters_when_every_slot_is_spent() -> None:
    env = {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "0"}
    assert UBootScheme(("A", "B"), 3).boot(env) == ("B", {"BOOT_A_LEFT": "3", "BOOT_B_LEFT": "2"})


def test_boot_script_with_an_empty_order_cannot_boot() -> None:
    with pytest.raises(BootloaderError, match="reset forever"):
        UBootScheme(("A", "B"), 3).boot({"BOOT_ORDER": "C"})


@pytest.mark.parametrize(("raw", "left"), [("3", 3), ("0", 0), ("a", 10), ("0x2", 2), ("zz", 0)])
def test_counters_are_hex_as_setexpr_writes_them(raw: str, left: int) -> None:
    assert UBootScheme(("A", "B"), 3).left({"BOOT_A_LEFT": raw}, "A") == left
