"""U-Boot: the environment that ``fw_printenv``/``fw_setenv`` read and write.

The environment is read and written directly, byte-compatible with the
``fw_printenv``/``fw_setenv`` tools (Debian package ``libubootenv-tool``) and
with U-Boot's own ``saveenv``, at the places ``fw_env.config`` names::

    # device            offset   env size  [sector size [sectors]]
    /dev/mmcblk0        0x3f8000 0x4000
    /dev/mmcblk0        0x3fc000 0x4000      # second line: redundant copy

One copy is ``CRC32 (little-endian) | NUL-separated name=value pairs | NUL``;
a redundant copy has a flag byte between CRC and data, incremented on every
write, and a write always goes to the older copy, so a power cut leaves the
newer one intact. Readers take the valid copy with the newest flag, as U-Boot
does. The CRC covers the whole data area; variables are written sorted by
name and the rest of the area is zero-filled, as U-Boot's ``saveenv`` does
(``fw_setenv`` leaves whatever its buffer held there; both are valid).

A single copy that is a whole regular file is replaced atomically (temp file,
fsync, rename); a single copy inside a block device is rewritten in place,
which only a redundant layout makes safe against power cuts. Raw MTD and UBI
devices need erase cycles and are not supported: use the script backend with
``fw_setenv`` there.

Slot selection follows RAUC's U-Boot integration: ``BOOT_ORDER`` lists the
bootnames (``"A B"``), ``BOOT_<slot>_LEFT`` counts the boots the slot has
left (hex, as U-Boot's ``setexpr`` writes it). The boot script, documented in
``docs/bootloaders.md`` and mirrored by :meth:`UBootScheme.boot`, boots the
first slot in order with attempts left and decrements its counter.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from skylift.agent.bootloader.base import (
    DEFAULT_ATTEMPTS,
    DEFAULT_SLOTS,
    PROC_CMDLINE,
    Bootloader,
    BootloaderError,
    SlotState,
    check_attempts,
    read_booted_slot,
)
from skylift.fsutil import atomic_write

__all__ = [
    "DEFAULT_FW_ENV_CONFIG",
    "MAX_ENV_BYTES",
    "EnvCopy",
    "FwEnvConfig",
    "UBootBootloader",
    "UBootEnv",
    "UBootScheme",
    "decode_env",
    "encode_env",
    "load_fw_env_config",
    "newest_copy",
    "parse_fw_env_config",
]

DEFAULT_FW_ENV_CONFIG = Path("/etc/fw_env.config")
MAX_ENV_BYTES = 1024 * 1024
_MAX_CONFIG_BYTES = 64 * 1024
_CRC = struct.Struct("<I")
_UNSUPPORTED_PREFIXES = ("/dev/mtd", "/dev/ubi")
_EMMC_BOOT = re.compile(r"mmcblk\d+boot\d+")


@dataclass(frozen=True)
class EnvCopy:
    """One copy of the environment: where it lives and how large it is."""

    device: Path
    offset: int
    size_bytes: int
    sector_size_bytes: int | None = None

    def __str__(self) -> str:
        return f"{self.device}@0x{self.offset:x}"


@dataclass(frozen=True)
class FwEnvConfig:
    """The parsed ``fw_env.config``: one copy, or two for a redundant environment."""

    copies: tuple[EnvCopy, ...]

    @property
    def redundant(self) -> bool:
        """True when the environment has two copies with a flag byte each."""
        return len(self.copies) == 2


def _parse_number(word: str, what: str, source: str, line_no: int) -> int:
    # fw_env.config numbers go through strtoul(..., 0): 0x hex, leading 0 octal, else decimal.
    text = word.lower()
    try:
        if text.startswith("0x"):
            value = int(text[2:], 16)
        elif len(text) > 1 and text.startswith("0"):
            value = int(text[1:], 8)
        else:
            value = int(text, 10)
    except ValueError:
        raise BootloaderError(f"{source} line {line_no}: {what} {word!r} is not a number") from None
    if value < 0:
        raise BootloaderError(f"{source} line {line_no}: {what} {word!r} is negative")
    return value


def parse_fw_env_config(text: str, *, source: str = "fw_env.config") -> FwEnvConfig:
    """Parse the text of an ``fw_env.config``.

    Raises:
        BootloaderError: no copy, more than two, a malformed line, sizes that
            differ or that are out of range.
    """
    copies: list[EnvCopy] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 3:
            raise BootloaderError(
                f"{source} line {line_no}: expected 'device offset size [sector size]'"
            )
        offset = _parse_number(fields[1], "offset", source, line_no)
        size = _parse_number(fields[2], "environment size", source, line_no)
        sector = (
            _parse_number(fields[3], "sector size", source, line_no) if len(fields) > 3 else None
        )
        if not _CRC.size + 2 < size <= MAX_ENV_BYTES:
            raise BootloaderError(
                f"{source} line {line_no}: environment size {size} is outside 7..{MAX_ENV_BYTES}"
            )
        copies.append(EnvCopy(Path(fields[0]), offset, size, sector or None))
    if not copies:
        raise BootloaderError(f"{source} names no environment device")
    if len(copies) > 2:
        raise BootloaderError(f"{source} names {len(copies)} environments; at most 2 are allowed")
    if len(copies) == 2 and copies[0].size_bytes != copies[1].size_bytes:
        raise BootloaderError(f"{source}: the two environment copies differ in size")
    return FwEnvConfig(tuple(copies))


def load_fw_env_config(path: Path = DEFAULT_FW_ENV_CONFIG) -> FwEnvConfig:
    """Read and parse an ``fw_env.config`` file.

    Raises:
        BootloaderError: unreadable, too large or malformed.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise BootloaderError(f"cannot read {path}: {e.strerror or e}") from e
    if len(raw) > _MAX_CONFIG_BYTES:
        raise BootloaderError(f"{path} is larger than {_MAX_CONFIG_BYTES} bytes")
    return parse_fw_env_config(raw.decode("utf-8", "replace"), source=str(path))


def _header_size(redundant: bool) -> int:
    return _CRC.size + (1 if redundant else 0)


def encode_env(variables: Mapping[str, str], size_bytes: int, *, flag: int | None = None) -> bytes:
    """One environment copy of ``size_bytes``: CRC, flag byte if ``flag`` is given, data.

    Raises:
        BootloaderError: a name or value U-Boot cannot hold, or the variables
            do not fit.
    """
    data = bytearray()
    for name in sorted(variables, key=lambda n: n.encode("utf-8", "surrogateescape")):
        value = variables[name]
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise BootloaderError(f"U-Boot cannot store variable {name!r}")
        data += f"{name}={value}".encode("utf-8", "surrogateescape") + b"\0"
    if not data:
        data += b"\0"
    data += b"\0"
    room = size_bytes - _header_size(flag is not None)
    if len(data) > room:
        raise BootloaderError(f"U-Boot environment is full ({len(data)} bytes, room for {room})")
    data += bytes(room - len(data))
    header = _CRC.pack(zlib.crc32(data))
    if flag is not None:
        header += bytes([flag & 0xFF])
    return header + bytes(data)


def decode_env(
    image: bytes, *, redundant: bool, where: str = "U-Boot environment"
) -> tuple[int | None, dict[str, str]]:
    """Check and parse one environment copy; returns its flag (or None) and its variables.

    Raises:
        BootloaderError: wrong CRC, no end marker, or an entry without ``=``.
    """
    header = _header_size(redundant)
    if len(image) <= header + 1:
        raise BootloaderError(f"{where} is truncated ({len(image)} bytes)")
    (crc,) = _CRC.unpack_from(image)
    flag = image[_CRC.size] if redundant else None
    data = image[header:]
    if zlib.crc32(data) != crc:
        raise BootloaderError(f"{where} has a bad CRC")
    end = 0 if data[:1] == b"\0" else data.find(b"\0\0")
    if end < 0:
        raise BootloaderError(f"{where} has no end marker")
    variables: dict[str, str] = {}
    for entry in data[:end].split(b"\0") if end else []:
        name, sep, value = entry.partition(b"=")
        if not sep or not name:
            raise BootloaderError(f"{where} holds an entry without a name")
        # Later definitions win, as in U-Boot's himport.
        variables[name.decode("utf-8", "surrogateescape")] = value.decode(
            "utf-8", "surrogateescape"
        )
    return flag, variables


def newest_copy(flags: Sequence[int | None]) -> int | None:
    """Index of the copy U-Boot loads, given each copy's flag (``None``: invalid).

    Follows U-Boot's ``env_import_redund``: the greater flag wins, 0 beats 255
    (the counter wrapped), and copy 0 wins a tie.
    """
    valid = [i for i, f in enumerate(flags) if f is not None]
    if len(valid) < 2:
        return valid[0] if valid else None
    f0, f1 = flags[0], flags[1]
    assert f0 is not None
    assert f1 is not None
    if f0 == 255 and f1 == 0:
        return 1
    if f1 == 255 and f0 == 0:
        return 0
    return 1 if f1 > f0 else 0


class UBootEnv:
    """The U-Boot environment named by an ``fw_env.config``.

    Every read is bounded by the configured size; every write first reads and
    validates, so a corrupt environment is reported and left untouched.
    """

    def __init__(self, config: FwEnvConfig) -> None:
        self.config = config

    def read(self) -> dict[str, str]:
        """All variables of the environment U-Boot would load.

        Raises:
            BootloaderError: unreadable, or no copy with a valid CRC.
        """
        return self._load()[2]

    def update(self, changes: Mapping[str, str | None]) -> None:
        """Set variables and write the environment back.

        ``None`` or an empty value deletes a variable: U-Boot and ``fw_setenv``
        have no empty variables.

        Raises:
            BootloaderError: the environment is unreadable or corrupt, full,
                or the write failed.
        """
        index, flag, variables = self._load()
        for name, value in changes.items():
            if not value:
                variables.pop(name, None)
            else:
                variables[name] = value
        if self.config.redundant:
            assert flag is not None
            self._write(1 - index, encode_env(variables, self._size, flag=(flag + 1) & 0xFF))
        else:
            self._write(0, encode_env(variables, self._size))

    def create(self, variables: Mapping[str, str]) -> None:
        """Write a fresh environment holding ``variables``, whatever was there.

        For provisioning and tests, like ``fw_setenv`` on a blank device.

        Raises:
            BootloaderError: the variables do not fit, or the write failed.
        """
        if self.config.redundant:
            self._write(0, encode_env(variables, self._size, flag=1))
            self._write(1, encode_env(variables, self._size, flag=0))
        else:
            self._write(0, encode_env(variables, self._size))

    @property
    def _size(self) -> int:
        return self.config.copies[0].size_bytes

    def _load(self) -> tuple[int, int | None, dict[str, str]]:
        """The index, flag and variables of the copy U-Boot would load.

        A copy that cannot be opened or read is an error; a copy whose bytes
        are wrong is, in a redundant layout, just the older copy.
        """
        redundant = self.config.redundant
        parsed: list[tuple[int | None, dict[str, str]] | None] = []
        reasons: list[str] = []
        for copy in self.config.copies:
            image = _read_copy(copy)
            try:
                if len(image) != copy.size_bytes:
                    raise BootloaderError(
                        f"U-Boot environment {copy} is truncated "
                        f"({len(image)} of {copy.size_bytes} bytes)"
                    )
                parsed.append(
                    decode_env(image, redundant=redundant, where=f"U-Boot environment {copy}")
                )
            except BootloaderError as e:
                if not redundant:
                    raise
                parsed.append(None)
                reasons.append(e.message)
        if not redundant:
            only = parsed[0]
            assert only is not None
            return 0, None, only[1]
        index = newest_copy([p[0] if p is not None else None for p in parsed])
        if index is None:
            raise BootloaderError(
                f"no valid copy of the U-Boot environment: {'; '.join(reasons)}",
                hint="restore it with fw_setenv or saveenv in U-Boot",
            )
        chosen = parsed[index]
        assert chosen is not None
        return index, chosen[0], chosen[1]

    def _write(self, index: int, image: bytes) -> None:
        _write_copy(self.config.copies[index], image)


def _check_supported(copy: EnvCopy) -> None:
    if str(copy.device).startswith(_UNSUPPORTED_PREFIXES):
        raise BootloaderError(
            f"U-Boot environment on {copy.device} needs flash erase cycles (not supported)",
            hint="use the script backend with fw_setenv for MTD and UBI environments",
        )


def _read_copy(copy: EnvCopy) -> bytes:
    _check_supported(copy)
    try:
        fd = os.open(copy.device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BootloaderError(
            f"cannot open U-Boot environment {copy.device}: {e.strerror or e}"
        ) from e
    try:
        chunks = bytearray()
        while len(chunks) < copy.size_bytes:
            chunk = os.pread(fd, copy.size_bytes - len(chunks), copy.offset + len(chunks))
            if not chunk:
                break
            chunks += chunk
    except OSError as e:
        raise BootloaderError(f"cannot read U-Boot environment {copy}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    return bytes(chunks)


def _write_copy(copy: EnvCopy, image: bytes) -> None:
    _check_supported(copy)
    device = Path(os.path.realpath(copy.device))
    try:
        try:
            st = os.stat(device)
        except FileNotFoundError:
            st = None
        if copy.offset == 0 and (
            st is None or (stat.S_ISREG(st.st_mode) and st.st_size == copy.size_bytes)
        ):
            # The whole file is this copy: replace it atomically.
            atomic_write(device, image, mode=stat.S_IMODE(st.st_mode) if st else 0o644)
            return
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < len(image):
                done += os.pwrite(fd, image[done:], copy.offset + done)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        hint = None
        if e.errno in (errno.EROFS, errno.EPERM, errno.EACCES) and _EMMC_BOOT.fullmatch(
            device.name
        ):
            hint = (
                f"eMMC boot partitions stay read-only until /sys/block/{device.name}/force_ro is 0"
            )
        raise BootloaderError(
            f"cannot write U-Boot environment {copy}: {e.strerror or e}", hint=hint
        ) from e


class UBootScheme:
    """RAUC's U-Boot variables: ``BOOT_ORDER`` and ``BOOT_<slot>_LEFT``.

    Pure: it reads a dict of variables and returns the changes to make, so
    the same rules serve the U-Boot backend, the simulated bootloader and the
    tests. :meth:`boot` is the boot script of ``docs/bootloaders.md`` in Python.
    """

    def __init__(self, slots: Sequence[str], attempts: int) -> None:
        self.slots = tuple(slots)
        self.attempts = attempts

    @staticmethod
    def left_var(slot: str) -> str:
        """The name of ``slot``'s attempts counter."""
        return f"BOOT_{slot}_LEFT"

    def order(self, env: Mapping[str, str]) -> list[str]:
        """``BOOT_ORDER`` as a list; unset means every slot, as the boot script defaults it."""
        raw = env.get("BOOT_ORDER", "")
        return raw.split() if raw.strip() else list(self.slots)

    def left(self, env: Mapping[str, str], slot: str) -> int:
        """Attempts left for ``slot``; unset means the default, garbage means none."""
        raw = env.get(self.left_var(slot), "")
        if not raw:
            return self.attempts
        try:
            return max(0, int(raw, 16))
        except ValueError:
            return 0

    def primary(self, env: Mapping[str, str]) -> str | None:
        """The first known slot in order with attempts left, or None."""
        for slot in self.order(env):
            if slot in self.slots and self.left(env, slot) > 0:
                return slot
        return None

    def state(self, env: Mapping[str, str], slot: str) -> SlotState:
        """Bootable when in ``BOOT_ORDER`` with attempts left (RAUC's rule)."""
        left = self.left(env, slot)
        return SlotState(bootable=slot in self.order(env) and left > 0, attempts_left=left)

    def try_once(self, env: Mapping[str, str], slot: str) -> dict[str, str | None]:
        """Changes that put ``slot`` first with a full counter, the others behind it."""
        order = [slot, *(s for s in self.order(env) if s != slot)]
        return {"BOOT_ORDER": " ".join(order), self.left_var(slot): f"{self.attempts:x}"}

    def mark_good(self, env: Mapping[str, str], slot: str) -> dict[str, str | None]:
        """Changes that refill ``slot``'s counter (and put it back in order if it was removed)."""
        changes: dict[str, str | None] = {self.left_var(slot): f"{self.attempts:x}"}
        order = self.order(env)
        if slot not in order:
            changes["BOOT_ORDER"] = " ".join([*order, slot])
        return changes

    def mark_bad(self, env: Mapping[str, str], slot: str) -> dict[str, str | None]:
        """Changes that empty ``slot``'s counter and take it out of the order."""
        order = [s for s in self.order(env) if s != slot]
        return {"BOOT_ORDER": " ".join(order), self.left_var(slot): "0"}

    def boot(self, env: Mapping[str, str]) -> tuple[str, dict[str, str | None]]:
        """What the boot script does at power-on: the slot it boots and the variables it saves.

        Raises:
            BootloaderError: no slot can boot even after the counters are reset
                (the real board would reset forever).
        """
        changes: dict[str, str | None] = {}
        # `test -n "${X}" || setenv X default` for the order and each counter.
        if not env.get("BOOT_ORDER"):
            changes["BOOT_ORDER"] = " ".join(self.slots)
        for slot in self.slots:
            if not env.get(self.left_var(slot)):
                changes[self.left_var(slot)] = f"{self.attempts:x}"
        for _ in range(2):  # the second round follows the `reset` after refilling
            merged = {**env, **{k: v for k, v in changes.items() if v is not None}}
            chosen = self.primary(merged)
            if chosen is not None:
                changes[self.left_var(chosen)] = f"{self.left(merged, chosen) - 1:x}"
                return chosen, changes
            for name in self.slots:
                changes[self.left_var(name)] = f"{self.attempts:x}"
        raise BootloaderError(
            f"no slot in BOOT_ORDER {env.get('BOOT_ORDER', '')!r} can boot; "
            "the board would reset forever"
        )


class UBootBootloader(Bootloader):
    """Slots chosen by U-Boot through its environment (RAUC's variable scheme).

    ``config_path`` is the ``fw_env.config``; ``cmdline_path`` the kernel
    command line that names the booted slot.
    """

    def __init__(
        self,
        *,
        config_path: Path = DEFAULT_FW_ENV_CONFIG,
        slots: Sequence[str] = DEFAULT_SLOTS,
        attempts: int = DEFAULT_ATTEMPTS,
        cmdline_path: Path = PROC_CMDLINE,
    ) -> None:
        super().__init__(slots=slots)
        self.attempts = check_attempts(attempts)
        self.env = UBootEnv(load_fw_env_config(Path(config_path)))
        self.scheme = UBootScheme(self.slots, self.attempts)
        self._cmdline_path = Path(cmdline_path)

    def primary(self) -> str:
        """See :meth:`Bootloader.primary`: what the boot script would pick at the next power-on."""
        return self.scheme.boot(self.env.read())[0]

    def current(self) -> str:
        """See :meth:`Bootloader.current`."""
        return read_booted_slot(self._cmdline_path)

    def try_once(self, slot: str) -> None:
        """See :meth:`Bootloader.try_once`."""
        self._check_slot(slot)
        self.env.update(self.scheme.try_once(self.env.read(), slot))

    def mark_good(self, slot: str) -> None:
        """See :meth:`Bootloader.mark_good`."""
        self._check_slot(slot)
        self.env.update(self.scheme.mark_good(self.env.read(), slot))

    def mark_bad(self, slot: str) -> None:
        """See :meth:`Bootloader.mark_bad`."""
        self._check_slot(slot)
        self.env.update(self.scheme.mark_bad(self.env.read(), slot))

    def state(self, slot: str) -> SlotState:
        """See :meth:`Bootloader.state`."""
        self._check_slot(slot)
        return self.scheme.state(self.env.read(), slot)
