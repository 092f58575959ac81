"""The chunking the writer picks per payload type when the caller picks none (ADR 0005).

Real images where the tools are installed (mke2fs always is: the Makefile's
TEST_DEBS has e2fsprogs), crafted superblocks for the rules and for hostile
values.
"""

from __future__ import annotations

import io
import random
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

from skylift.bundle import default_chunking, detect_payload_type
from skylift.chunks import ChunkingParams

from .conftest import build, split

MIB = 1 << 20
CDC_16K = {
    "algorithm": "fastcdc-2020",
    "avg_size": 16384,
    "min_size": 4096,
    "max_size": 65536,
    "normalization": 1,
    "seed": 0,
}
CDC = ChunkingParams.from_dict(CDC_16K)


def fixed(size: int) -> dict[str, Any]:
    return {
        "algorithm": "fixed",
        "avg_size": size,
        "min_size": size,
        "max_size": size,
        "normalization": 0,
        "seed": 0,
    }


def test_cdc_16k_is_the_adr_s() -> None:
    # 4 KiB min, 16 KiB average, 64 KiB max, normalisation 1, seed 0.
    assert ChunkingParams.cdc(16384).to_dict() == CDC_16K


# -- crafted heads -----------------------------------------------------------------------


def ext4_head(
    log_block_size: int, size: int = 4096, *, blocks: int = 0, bit64: bool = False
) -> bytes:
    head = bytearray(size)
    head[1080:1082] = b"\x53\xef"
    head[1048:1052] = struct.pack("<I", log_block_size)
    head[1028:1032] = struct.pack("<I", blocks & 0xFFFFFFFF)
    if bit64:
        head[1024 + 0x60 : 1024 + 0x64] = struct.pack("<I", 0x80)
        head[1024 + 0x150 : 1024 + 0x154] = struct.pack("<I", blocks >> 32)
    return bytes(head)


@pytest.mark.parametrize(
    ("log", "blocks", "bit64", "expected"),
    [
        (2, 1 << 19, False, 4096),  # 2 GiB in 4 KiB blocks: 512 Ki chunks, the most
        (2, (1 << 19) + 1, False, 8192),  # one block more: 8 KiB blocks
        (2, 1 << 20, False, 8192),  # 4 GiB
        (2, 1 << 22, False, 32768),  # 16 GiB
        (2, 1 << 32, True, 65536),  # 16 TiB (64bit): never above 64 KiB
        (2, 1 << 32, False, 4096),  # without the 64bit feature, _hi is not read: 0 blocks
    ],
)
def test_large_ext4_images_get_larger_blocks_to_bound_the_index(
    log: int, blocks: int, bit64: bool, expected: int
) -> None:
    head = ext4_head(log, blocks=blocks, bit64=bit64)
    assert default_chunking("ext4", head).to_dict() == fixed(expected)


def test_a_real_4_gib_ext4_image_gets_8k_blocks(tmp_path: Path) -> None:
    mkfs = _tool("mkfs.ext4", "e2fsprogs")
    image = tmp_path / "big.ext4"
    with open(image, "wb") as f:
        f.truncate(4 << 30)  # sparse: mke2fs writes only its metadata
    subprocess.run([mkfs, "-q", "-F", "-b", "4096", str(image)], check=True, capture_output=True)
    with open(image, "rb") as f:
        head = f.read(4096)
    assert default_chunking(detect_payload_type(head), head).to_dict() == fixed(8192)


def erofs_head(blkszbits: int) -> bytes:
    head = bytearray(4096)
    head[1024:1028] = b"\xe2\xe1\xf5\xe0"
    head[1036] = blkszbits
    return bytes(head)


def vfat_head(
    *,
    sector: int = 512,
    per_cluster: int = 8,
    reserved: int = 32,
    fats: int = 2,
    root_entries: int = 0,
    fat16_size: int = 0,
    fat32_size: int = 0,
) -> bytes:
    """A boot sector; FAT32 (its FAT size at 36) when ``fat16_size`` is 0."""
    head = bytearray(4096)
    struct.pack_into("<HBHBH", head, 11, sector, per_cluster, reserved, fats, root_entries)
    struct.pack_into("<H", head, 22, fat16_size)
    struct.pack_into("<I", head, 36, fat32_size)
    if fat16_size:
        head[54:59] = b"FAT16"
    else:
        head[82:87] = b"FAT32"
    head[510:512] = b"\x55\xaa"
    return bytes(head)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        # 1 and 2 KiB blocks: files move in steps fixed 4 KiB chunks cannot follow.
        (ext4_head(0), CDC_16K),
        (ext4_head(1), CDC_16K),
        (ext4_head(2), fixed(4096)),
        (ext4_head(3), fixed(8192)),
        (ext4_head(6), fixed(65536)),
        (ext4_head(7), CDC_16K),  # 128 KiB blocks: no ext4 has them
        (ext4_head(30), CDC_16K),  # 1 TiB "blocks"
        (ext4_head(0xFFFFFFFF), CDC_16K),
        (ext4_head(2, size=1082), fixed(4096)),  # the shortest head that is ext4
        (erofs_head(12), fixed(4096)),
        (erofs_head(9), CDC_16K),  # 512-byte blocks: as small ext4 blocks
        (erofs_head(11), CDC_16K),
        (erofs_head(14), fixed(16384)),
        (erofs_head(16), fixed(65536)),
        (erofs_head(17), CDC_16K),
        (erofs_head(0), CDC_16K),
        (erofs_head(255), CDC_16K),
        # FAT32, 32 KiB clusters, data area at sector 32 + 2 * 1008 = 2048 (1 MiB).
        (vfat_head(per_cluster=64, fat32_size=1008), fixed(32768)),
        # The same with 1000-sector FATs: data at sector 2032, not on a cluster boundary.
        (vfat_head(per_cluster=64, fat32_size=1000), fixed(4096)),
        # FAT16, 16 KiB clusters, 512 root entries (32 sectors): data at sector 96.
        (vfat_head(per_cluster=32, root_entries=512, fat16_size=16), fixed(16384)),
        (vfat_head(per_cluster=32, reserved=33, root_entries=512, fat16_size=16), fixed(4096)),
        # 17 root entries (544 bytes) take two sectors: data at sector 6 + 8 + 2 = 16.
        (vfat_head(per_cluster=16, reserved=6, root_entries=17, fat16_size=4), fixed(8192)),
        (vfat_head(per_cluster=16, reserved=7, root_entries=17, fat16_size=4), fixed(4096)),
        (vfat_head(per_cluster=4, fat32_size=1008), CDC_16K),  # 2 KiB clusters
        # 512 KiB clusters (4 KiB sectors x 128), aligned: capped at 64 KiB.
        (vfat_head(sector=4096, per_cluster=128, reserved=128, fat32_size=64), fixed(65536)),
        (vfat_head(per_cluster=1, fat32_size=1008), CDC_16K),  # 512-byte clusters
        # Nonsense boot sectors: content-defined chunks, no crash.
        (vfat_head(sector=0, fat32_size=1008), CDC_16K),
        (vfat_head(sector=3000, fat32_size=1008), CDC_16K),
        (vfat_head(per_cluster=0, fat32_size=1008), CDC_16K),
        (vfat_head(per_cluster=3, fat32_size=1008), CDC_16K),
        (vfat_head(fats=0, fat32_size=1008), CDC_16K),
        (vfat_head(reserved=0, fat32_size=1008), CDC_16K),
        (vfat_head(fat32_size=0), CDC_16K),
        (b"hsqs" + bytes(4092), CDC_16K),
        (b"\0" * 257 + b"ustar\x0000" + b"\0" * 3000, CDC_16K),
        (random.Random(1).randbytes(4096), CDC_16K),
        (b"", CDC_16K),
    ],
)
def test_rule_on_crafted_heads(head: bytes, expected: dict[str, Any]) -> None:
    assert default_chunking(detect_payload_type(head), head).to_dict() == expected


@pytest.mark.parametrize("kind", ["ext4", "erofs"])
def test_a_head_too_short_for_the_superblock_gets_cdc(kind: str) -> None:
    assert default_chunking(kind, bytes(1030)) == CDC


def test_a_vfat_head_too_short_gets_cdc_16k() -> None:
    assert default_chunking("vfat", vfat_head(per_cluster=64, fat32_size=1008)[:30]) == CDC


@pytest.mark.parametrize("kind", ["squashfs", "tar", "raw", "btrfs", ""])
def test_shifting_and_unknown_kinds_get_cdc_16k(kind: str) -> None:
    assert default_chunking(kind, ext4_head(2)).to_dict() == CDC_16K


def test_random_superblocks_never_crash_nor_exceed_64k() -> None:
    rng = random.Random(5)
    for _ in range(3000):
        head = bytearray(rng.randbytes(rng.choice((0, 20, 600, 1040, 4096))))
        kind = rng.choice(("ext4", "erofs", "vfat"))
        params = default_chunking(kind, bytes(head))
        assert params == CDC or (
            params.algorithm == "fixed" and 4096 <= params.avg_size <= 65536
        ), (kind, params)


# -- real images through the writer ------------------------------------------------------


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/sbin:/usr/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return path


def _recorded(signer: CryptoSigner, image: bytes, **kw: Any) -> tuple[str, dict[str, Any], int]:
    """(type, chunking, chunks) as the manifest of a bundle of ``image`` records them."""
    manifest, _ = split(build([signer], {"rootfs": image}, **kw))
    (p,) = manifest["payloads"]
    return p["type"], p["chunking"], p["chunks"]


@pytest.mark.parametrize(
    ("block_size", "expected"),
    [(4096, 4096), (8192, 8192), (65536, 65536)],
)
def test_ext4_image_gets_fixed_blocks_of_its_block_size(
    release: CryptoSigner, tmp_path: Path, block_size: int, expected: int
) -> None:
    mkfs = _tool("mkfs.ext4", "e2fsprogs")
    image = tmp_path / "rootfs.ext4"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(
        [mkfs, "-q", "-F", "-b", str(block_size), str(image)], check=True, capture_output=True
    )
    kind, chunking, chunks = _recorded(release, image.read_bytes())
    assert (kind, chunking, chunks) == ("ext4", fixed(expected), 16 * MIB // expected)


@pytest.mark.parametrize("block_size", [1024, 2048])
def test_ext4_image_of_small_blocks_gets_cdc_16k(
    release: CryptoSigner, tmp_path: Path, block_size: int
) -> None:
    mkfs = _tool("mkfs.ext4", "e2fsprogs")
    image = tmp_path / "rootfs.ext4"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(
        [mkfs, "-q", "-F", "-b", str(block_size), str(image)], check=True, capture_output=True
    )
    kind, chunking, _ = _recorded(release, image.read_bytes())
    assert (kind, chunking) == ("ext4", CDC_16K)


def test_erofs_image_gets_fixed_4k(release: CryptoSigner, tmp_path: Path) -> None:
    mkfs = _tool("mkfs.erofs", "erofs-utils")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/motd").write_text("hello\n" * 1000)
    # mkfs.erofs 1.5 (bookworm) has no block size option: 4 KiB, the page size.
    subprocess.run(
        [mkfs, "--quiet", str(tmp_path / "img"), str(tmp_path / "tree")],
        check=True,
        capture_output=True,
    )
    kind, chunking, _ = _recorded(release, (tmp_path / "img").read_bytes())
    assert (kind, chunking) == ("erofs", fixed(4096))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # mkfs.fat aligns the data area to the cluster size unless given -a.
        (["-F", "16", "-s", "16", "-S", "512"], fixed(8192)),
        (["-F", "32", "-s", "1", "-S", "512"], CDC_16K),  # 512-byte clusters
    ],
)
def test_vfat_image(
    release: CryptoSigner, tmp_path: Path, args: list[str], expected: dict[str, Any]
) -> None:
    mkfs = _tool("mkfs.vfat", "dosfstools")
    image = tmp_path / "boot.vfat"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    subprocess.run([mkfs, *args, str(image)], check=True, capture_output=True)
    kind, chunking, _ = _recorded(release, image.read_bytes())
    assert (kind, chunking) == ("vfat", expected)


def test_squashfs_image_gets_cdc_16k(release: CryptoSigner, tmp_path: Path) -> None:
    mksquashfs = _tool("mksquashfs", "squashfs-tools")
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(3)
    for i in range(20):
        (tree / f"f{i}").write_bytes(rng.randbytes(5000) + b"text\n" * 4000)
    image = tmp_path / "rootfs.squashfs"
    subprocess.run(
        [mksquashfs, str(tree), str(image), "-noappend", "-quiet", "-no-progress"],
        check=True,
        capture_output=True,
    )
    kind, chunking, _ = _recorded(release, image.read_bytes())
    assert (kind, chunking) == ("squashfs", CDC_16K)


def test_tar_gets_cdc_16k(release: CryptoSigner) -> None:
    data = io.BytesIO()
    rng = random.Random(4)
    with tarfile.open(fileobj=data, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(10):
            body = rng.randbytes(30_000)
            info = tarfile.TarInfo(f"usr/lib/f{i}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    kind, chunking, _ = _recorded(release, data.getvalue())
    assert (kind, chunking) == ("tar", CDC_16K)


def test_unknown_data_gets_cdc_16k(release: CryptoSigner) -> None:
    kind, chunking, _ = _recorded(release, random.Random(6).randbytes(300_000))
    assert (kind, chunking) == ("raw", CDC_16K)


def test_the_caller_s_chunking_wins(release: CryptoSigner, tmp_path: Path) -> None:
    mkfs = _tool("mkfs.ext4", "e2fsprogs")
    image = tmp_path / "rootfs.ext4"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run([mkfs, "-q", "-F", "-b", "4096", str(image)], check=True, capture_output=True)
    kind, chunking, _ = _recorded(release, image.read_bytes(), chunking=ChunkingParams.cdc(65536))
    assert (kind, chunking) == ("ext4", ChunkingParams.cdc(65536).to_dict())
    kind, chunking, _ = _recorded(
        release, random.Random(6).randbytes(300_000), chunking=ChunkingParams.fixed(4096)
    )
    assert (kind, chunking) == ("raw", fixed(4096))
