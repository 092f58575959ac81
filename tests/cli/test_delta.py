"""``skylift delta plan``: the download a device would make, and every refusal.

The images are made of random 4 KiB blocks, so that the expected plan can be
worked out by hand: which blocks changed, which repeat, where the gaps are.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from skylift.bundle import HookSource, PayloadSource, write_bundle
from skylift.chunks import ChunkingParams
from skylift.trust.keys import generate_private_key, public_key_pem, signer_for

from .conftest import Result, Skylift, SkyliftInProcess

BLOCK = 4096
BLOCKS = 128
#: Blocks the new image replaces with fresh bytes; block 100 repeats new block 10.
CHANGED = (10, 11, 40)
REPEAT = (100, 10)
RAW_OBJECT = BLOCK + 1  # random blocks are stored raw: codec byte + 4096 bytes
INDEX_BYTES = 72 + 41 * BLOCKS


def _bundle(
    path: Path, payloads: dict[str, tuple[Path, ChunkingParams]], hooks: Sequence[HookSource] = ()
) -> None:
    """Write ``path`` signed by a new key whose public half goes to ``<stem>.pub``."""
    key = generate_private_key()
    spool_path = path.with_suffix(".spool")
    with open(path, "wb") as out, open(spool_path, "w+b") as spool:
        files = {name: open(p, "rb") for name, (p, _) in payloads.items()}  # noqa: SIM115
        try:
            write_bundle(
                out,
                product="acme-gw",
                version="2.0",
                compatible=["board-a"],
                payloads=[PayloadSource(n, files[n], chunking=c) for n, (_, c) in payloads.items()],
                signers=[signer_for(key)],
                hooks=hooks,
                spool=spool,
                created=datetime(2026, 11, 1, tzinfo=UTC),
            )
        finally:
            for f in files.values():
                f.close()
    spool_path.unlink()
    path.with_suffix(".pub").write_bytes(public_key_pem(key.public_key()))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """old.img, new.img (blocks changed and repeated), shifted.img (bytes inserted), bundles."""
    d = tmp_path_factory.mktemp("delta")
    rng = random.Random(11)
    old = [rng.randbytes(BLOCK) for _ in range(BLOCKS)]
    new = list(old)
    for i in CHANGED:
        new[i] = rng.randbytes(BLOCK)
    new[REPEAT[0]] = new[REPEAT[1]]
    (d / "old.img").write_bytes(b"".join(old))
    (d / "new.img").write_bytes(b"".join(new))
    # 100 bytes inserted near the middle: every later fixed block moves, CDC resynchronises.
    flat = b"".join(old)
    (d / "shifted.img").write_bytes(flat[:200_000] + rng.randbytes(100) + flat[200_000:])
    (d / "other.img").write_bytes(rng.randbytes(BLOCK * BLOCKS))
    fixed = ChunkingParams.fixed(BLOCK)
    _bundle(d / "new.bundle", {"rootfs": (d / "new.img", fixed)})
    _bundle(d / "shifted.bundle", {"rootfs": (d / "shifted.img", ChunkingParams.cdc(8192))})
    _bundle(
        d / "two.bundle",
        {"rootfs": (d / "new.img", fixed), "app": (d / "shifted.img", fixed)},
        [HookSource("health-check", b"#!/bin/sh\nexit 0\n")],
    )
    (d / "other.pub").write_bytes(public_key_pem(generate_private_key().public_key()))
    (d / "notes.txt").write_text("not a bundle\n" * 10)
    (d / "seeds").mkdir()
    return d


def _json(r: Result) -> dict[str, object]:
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert isinstance(doc, dict)
    return doc


def test_plan_reuses_the_seed_and_fetches_only_changed_blocks(
    skylift: Skylift, images: Path
) -> None:
    r = skylift("delta", "plan", "--seed", images / "old.img", images / "new.bundle", "--json")
    doc = _json(r)
    assert doc["method"] == "chunks" and doc["verified"] is False
    assert "not checked" in r.err
    assert doc["chunks"] == {
        "total": BLOCKS,
        "seed": BLOCKS - len(CHANGED) - 1,
        "target_copy": 1,  # block 100 is copied from block 10 once it is written
        "fetched": len(CHANGED),
    }
    b = doc["bytes"]
    assert isinstance(b, dict)
    assert b["fetched_uncompressed"] == len(CHANGED) * BLOCK
    assert b["fetched_objects"] == len(CHANGED) * RAW_OBJECT
    # 10 and 11 are adjacent; 40 is 28 objects (> 64 KiB) further: two ranges, one request.
    assert doc["ranges"] == 2 and doc["requests"] == 1
    assert b["ranges"] == len(CHANGED) * RAW_OBJECT
    # The index is counted as the hub serves it, compressed: random blocks have
    # 128 distinct digests, so zstd saves little beyond the repeated lengths.
    assert b["index_uncompressed"] == INDEX_BYTES
    assert INDEX_BYTES // 2 < b["index"] < INDEX_BYTES
    assert b["total"] == b["ranges"] + b["head"] + b["index"]


def test_coalescing_limits_change_ranges_and_requests(
    skylift_fast: SkyliftInProcess, images: Path
) -> None:
    args = ("delta", "plan", "--seed", images / "old.img", images / "new.bundle", "--json")
    merged = _json(skylift_fast(*args, "--max-gap", "128K"))
    # One range from block 10 to block 40: the 28 blocks between are downloaded too.
    assert merged["ranges"] == 1 and merged["requests"] == 1
    assert merged["bytes"]["ranges"] == (40 - 10 + 1) * RAW_OBJECT  # type: ignore[index]
    split = _json(skylift_fast(*args, "--max-ranges-per-request", "1"))
    assert split["ranges"] == 2 and split["requests"] == 2
    capped = _json(skylift_fast(*args, "--max-gap", "128K", "--max-range", str(RAW_OBJECT)))
    assert capped["ranges"] == 3  # no merged range may exceed one object
    assert capped["bytes"]["ranges"] == len(CHANGED) * RAW_OBJECT  # type: ignore[index]


def test_verified_text_output(skylift_fast: SkyliftInProcess, images: Path) -> None:
    args = ("delta", "plan", "--seed", images / "old.img", images / "new.bundle")
    r = skylift_fast(*args, "--key", images / "new.pub")
    assert r.code == 0, r.err
    assert "verified (1 trusted key(s))" in r.out and "NOT verified" not in r.out
    assert "not checked" not in r.err
    assert "1 HTTP request(s)" in r.out
    total = _json(skylift_fast(*args, "--json"))["bytes"]["total"]  # type: ignore[index]
    rows = {ln.split("│")[1].strip(): ln.split("│")[2].strip() for ln in r.out.splitlines()
            if ln.count("│") >= 4}  # fmt: skip
    assert rows["pack ranges (2 ranges, gaps included)"] == str(len(CHANGED) * RAW_OBJECT)
    assert rows["fetched (uncompressed)"] == str(len(CHANGED))
    assert rows["total"] == str(total)  # the download table's total row comes last


def test_seed_cut_with_the_bundles_own_chunking(
    skylift_fast: SkyliftInProcess, images: Path
) -> None:
    # CDC resynchronises after an insertion: the seed covers all but the chunk around it.
    doc = _json(
        skylift_fast(
            "delta", "plan", "--seed", images / "old.img", images / "shifted.bundle", "--json"
        )
    )
    chunks = doc["chunks"]
    assert isinstance(chunks, dict) and chunks["total"] > 20
    assert 1 <= chunks["fetched"] <= 3 and chunks["seed"] == chunks["total"] - chunks["fetched"]
    assert doc["chunking"]["algorithm"] == "fastcdc-2020"  # type: ignore[index]
    # A seed that shares nothing: everything is fetched.
    doc = _json(
        skylift_fast(
            "delta", "plan", "--seed", images / "other.img", images / "new.bundle", "--json"
        )
    )
    assert doc["chunks"]["seed"] == 0  # type: ignore[index]
    assert doc["chunks"]["fetched"] == BLOCKS - 1  # type: ignore[index]  # block 100 is a copy


def test_several_payloads_need_payload_option(skylift_fast: SkyliftInProcess, images: Path) -> None:
    args = ("delta", "plan", "--seed", images / "old.img", images / "two.bundle")
    assert "--payload" in skylift_fast(*args).error_line
    doc = _json(skylift_fast(*args, "--payload", "app", "--json", "--key", images / "two.pub"))
    assert doc["payload"] == "app" and doc["verified"] is True
    # The second payload's index is found after the first payload's chunks.
    assert doc["chunks"]["seed"] >= 1  # type: ignore[index]
    doc = _json(skylift_fast(*args, "--payload", "rootfs", "--json"))
    assert doc["chunks"]["fetched"] == len(CHANGED)  # type: ignore[index]
    # The head the device fetches ends where the first index page starts (after the hook).
    head = doc["bytes"]["head"]  # type: ignore[index]
    assert (images / "two.bundle").read_bytes()[head : head + 4] == b"SKIP"


def _truncated(d: Path) -> Path:
    data = (d / "new.bundle").read_bytes()
    (d / "cut.bundle").write_bytes(data[: len(data) - 5000])
    return d / "cut.bundle"


def _flipped_index(d: Path) -> Path:
    data = bytearray((d / "new.bundle").read_bytes())
    first_page = data.index(b"SKIP")
    data[first_page + 72 + 5] ^= 1  # a stored length inside the first index entry
    (d / "flip.bundle").write_bytes(bytes(data))
    return d / "flip.bundle"


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (("--seed", "old.img", "missing.bundle"), "cannot read bundle"),
        (("--seed", "missing.img", "new.bundle"), "cannot read seed"),
        (("--seed", "old.img", "notes.txt"), "not a Skylift bundle"),
        (("--seed", "seeds", "new.bundle"), "seed seeds is a directory"),
        (("--seed", "old.img", "seeds"), "bundle seeds is a directory"),
        (("--seed", "old.img", "new.bundle", "--key", "other.pub"), "0 valid signature(s)"),
        (("--seed", "old.img", "two.bundle", "--payload", "kernel"), "no payload 'kernel'"),
        (("--seed", "old.img", "new.bundle", "--max-gap", "lots"), "--max-gap takes"),
        (("--seed", "old.img", "new.bundle", "--max-range", "0"), "--max-range"),
        (("--seed", "old.img", "CUT"), "ends in the middle"),
        (("--seed", "old.img", "FLIP"), "index page does not match its digest"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(
    skylift_fast: SkyliftInProcess, images: Path, args: tuple[str, ...], expect: str
) -> None:
    special = {"CUT": _truncated, "FLIP": _flipped_index}
    argv = [str(special[a](images)) if a in special else a for a in args]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in images.iterdir())
    skylift_fast.cwd = images
    r = skylift_fast("delta", "plan", *argv)
    assert r.code == 1
    assert expect in r.error_line, r.err
    assert r.out == ""
    assert sorted((p.name, p.stat().st_mtime_ns) for p in images.iterdir()) == before


def test_a_bad_seed_fails_in_a_subprocess(skylift: Skylift, images: Path) -> None:
    r = skylift("delta", "plan", "--seed", images / "seeds", images / "new.bundle")
    assert r.code == 1 and "is a directory" in r.error_line and r.out == ""


def test_pair_delta_is_measured_and_chosen_when_smaller(
    skylift_fast: SkyliftInProcess, images: Path
) -> None:
    args = ("delta", "plan", "--seed", images / "old.img", images / "new.bundle", "--json")
    plain = _json(skylift_fast(*args))
    assert plain["method"] == "chunks" and plain["pair_delta"] is None
    refused = skylift_fast(*args, "--pair-delta")
    assert refused.code != 0 and "give --key or --root" in refused.err
    key = ("--key", images / "new.pub")
    doc = _json(skylift_fast(*args, "--pair-delta", *key))
    delta = doc["pair_delta"]
    assert isinstance(delta, dict)
    b = doc["bytes"]
    assert isinstance(b, dict)
    # Random blocks do not compress: the delta is the three new ones and the repeat of one
    # of them (a one-block literal takes only the 8 KiB made just before it, and the
    # repeated block is further back), plus a little; the chunk plan adds the head and
    # the index to three blocks, so the delta wins.
    literal = (len(CHANGED) + 1) * BLOCK
    assert literal < delta["bytes"] < literal + 1024
    assert delta["bytes"] < b["total"]
    assert doc["method"] == "delta"
    assert (delta["kind"], delta["streams"], delta["recompressed_streams"]) == ("plain", 0, 0)
    # A seed unrelated to the bundle: the delta is the whole payload, as is the chunk plan.
    other = _json(
        skylift_fast(
            "delta", "plan", "--seed", images / "other.img", images / "new.bundle", "--json",
            "--pair-delta", *key,
        )
    )  # fmt: skip
    pair, totals = other["pair_delta"], other["bytes"]
    assert isinstance(pair, dict) and isinstance(totals, dict)
    assert pair["bytes"] > (BLOCKS - 1) * BLOCK  # one block repeats, within one frame
    # Then the delta wins only by the head and index the chunk plan adds.
    assert other["method"] == ("delta" if pair["bytes"] < totals["total"] else "chunks")
    assert totals["total"] - pair["bytes"] < totals["head"] + totals["index"]


def test_pair_delta_of_zlib_blocks_says_so(skylift_fast: SkyliftInProcess, tmp_path: Path) -> None:
    """A payload of zlib streams (as squashfs with gzip): the delta goes through them."""
    rng = random.Random(12)
    words = [rng.randbytes(5).hex() for _ in range(200)]
    texts = [" ".join(rng.choice(words) for _ in range(5000)).encode() for _ in range(12)]
    old = b"HEAD" * 24 + b"".join(zlib.compress(t, 9) for t in texts)
    texts[5] = texts[5][:100] + b"CHANGED!" + texts[5][108:]
    new = b"HEAD" * 24 + b"".join(zlib.compress(t, 9) for t in texts)
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    _bundle(tmp_path / "z.bundle", {"rootfs": (tmp_path / "new.img", ChunkingParams.cdc(16384))})
    args = ("delta", "plan", "--seed", tmp_path / "old.img", tmp_path / "z.bundle")
    key = ("--key", tmp_path / "z.pub")
    doc = _json(skylift_fast(*args, "--json", "--pair-delta", *key))
    delta = doc["pair_delta"]
    assert isinstance(delta, dict)
    assert (delta["kind"], delta["streams"], delta["recompressed_streams"]) == ("zlib", 12, 1)
    # Eight bytes changed: far less than the changed stream compressed (about 13 KB).
    assert delta["bytes"] < 2000 and doc["method"] == "delta"
    text = skylift_fast(*args, "--pair-delta", *key)
    assert text.code == 0, text.err
    words = " ".join(text.out.split())
    assert "through 12 compressed streams, 1 recompressed on the device" in words
