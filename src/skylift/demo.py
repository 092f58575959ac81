"""``make demo``: the foundation end to end, as a release engineer would type it.

Generates release keys, builds an ext4 disk image from files on this
machine, makes a signed bundle, inspects, verifies and extracts it (from a
pipe), shows that a tampered copy and a bundle signed by the wrong key are
refused, and how many chunks a second release shares with the first.

Run: ``python -m skylift.demo [WORKDIR]`` (default ``.demo``; it is emptied first).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from skylift.bundle import ChunkData, TrustedKeys, read_body, read_head
from skylift.trust.keys import load_public_key

IMAGE_MIB = 48
HARDWARE = "demo-board-rev2"
_PASSPHRASE = "demo passphrase"  # noqa: S105 - a throw-away key made for the demo


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def _run(args: list[str], cwd: Path, *, expect: int = 0, stdin: Path | None = None) -> str:
    shown = "skylift " + " ".join(shlex.quote(a) for a in args)
    if stdin is not None:
        shown = f"cat {stdin.name} | {shown}"
    print(f"$ {shown}", flush=True)
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
        p = subprocess.run(
            [sys.executable, "-m", "skylift.cli.main", *args],
            cwd=cwd,
            stdin=f,
            capture_output=True,
            text=True,
            env={**os.environ, "SKYLIFT_KEY_PASSPHRASE": _PASSPHRASE, "COLUMNS": "110"},
            check=False,
        )
    for line in (p.stdout + p.stderr).splitlines():
        print(f"  {line}")
    if p.returncode != expect:
        raise SystemExit(f"demo failed: exit code {p.returncode}, expected {expect}")
    if expect:
        print(f"  (exit code {p.returncode}, as it should be)")
    return p.stdout


def _make_image(work: Path, name: str, tree: Path) -> Path:
    mke2fs = shutil.which("mke2fs") or "/sbin/mke2fs"
    if not os.access(mke2fs, os.X_OK):
        raise SystemExit("demo needs mke2fs (Debian package e2fsprogs); `make demo` installs it")
    image = work / name
    uuid, seed = "6f1b0c9e-2f4d-4a43-9d6b-0a7e5c3d2b10", "3c5d7e9f-1a2b-4c3d-8e4f-5a6b7c8d9e0f"
    # Fixed UUID, hash seed and clock: the same tree gives the same image (reproducible builds).
    subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-L", "rootfs", "-U", uuid,
         "-E", f"hash_seed={seed},root_owner=0:0", "-d", str(tree), str(image), f"{IMAGE_MIB}M"],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1750377600"},
    )  # fmt: skip
    return image


def _fill_tree(tree: Path) -> None:
    """Real files from this machine: Python's standard library and license texts."""
    src = Path(os.__file__).parent
    budget = 24 << 20
    for path in sorted(src.rglob("*.py")):
        if budget <= 0:
            break
        dest = tree / "usr/lib/python3" / path.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        budget -= path.stat().st_size
    (tree / "etc").mkdir(exist_ok=True)
    (tree / "etc/hostname").write_text("device\n")
    (tree / "etc/os-release").write_text('NAME="Skylift demo OS"\nVERSION_ID="1.0"\n')


def _chunk_digests(bundle: Path, pub: Path) -> list[str]:
    with open(bundle, "rb") as f:
        head = read_head(f)
        head.verify(TrustedKeys((load_public_key(pub.read_bytes()),)))
        return [e.entry.hexdigest for e in read_body(f, head) if isinstance(e, ChunkData)]


def main() -> None:
    """Run the demo in the directory named on the command line (default ``.demo``)."""
    work = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"Skylift foundation demo in {work}")

    _say("1. A release engineer makes a release key (encrypted; passphrase from the environment)")
    print("$ export SKYLIFT_KEY_PASSPHRASE=...")
    _run(["keys", "generate", "release"], work)
    _run(["keys", "generate", "attacker"], work)

    _say(f"2. An OS image: a {IMAGE_MIB} MiB ext4 filesystem built from real files")
    tree = work / "rootfs-v1"
    _fill_tree(tree)
    v1 = _make_image(work, "rootfs-v1.ext4", tree)
    (work / "post-install.sh").write_text("#!/bin/sh\necho installed\n")
    print(f"  {v1.name}: {v1.stat().st_size} bytes")

    _say("3. Turn it into a signed bundle")
    _run(["bundle", "create", "--product", "demo-os", "--version", "1.0.0",
          "--hardware", HARDWARE, "--payload", "rootfs=rootfs-v1.ext4",
          "--hook", "post-install=post-install.sh", "--key", "release.key",
          "-o", "demo-os-1.0.0.bundle"], work)  # fmt: skip

    _say("4. Inspect it (reads only the head) and verify every byte against the public key")
    _run(["bundle", "inspect", "demo-os-1.0.0.bundle", "--key", "release.pub"], work)
    _run(["bundle", "verify", "demo-os-1.0.0.bundle", "--key", "release.pub",
          "--hardware", HARDWARE], work)  # fmt: skip

    _say("5. Extract from a pipe (a non-seekable stream), verifying as it goes")
    bundle = work / "demo-os-1.0.0.bundle"
    _run(["bundle", "extract", "-", "--key", "release.pub", "-o", "extracted"], work, stdin=bundle)
    same = (work / "extracted/rootfs.img").read_bytes() == v1.read_bytes()
    print(f"  extracted image identical to the original: {same}")
    if not same:
        raise SystemExit("demo failed: extracted image differs")

    _say("6. A copy with one flipped bit is refused, and extract leaves nothing behind")
    tampered = work / "tampered.bundle"
    data = bytearray(bundle.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10
    tampered.write_bytes(bytes(data))
    _run(["bundle", "verify", "tampered.bundle", "--key", "release.pub"], work, expect=1)
    _run(["bundle", "extract", "tampered.bundle", "--key", "release.pub", "-o", "bad-out"],
         work, expect=1)  # fmt: skip
    left = list((work / "bad-out").rglob("*")) if (work / "bad-out").exists() else []
    print(f"  files left in bad-out/: {len(left)}")

    _say("7. Wrong hardware, and a bundle signed by someone else's key, are refused")
    _run(["bundle", "verify", "demo-os-1.0.0.bundle", "--key", "release.pub",
          "--hardware", "other-board"], work, expect=1)  # fmt: skip
    _run(["bundle", "create", "--product", "demo-os", "--version", "6.6.6",
          "--hardware", HARDWARE, "--payload", "rootfs=rootfs-v1.ext4",
          "--key", "attacker.key", "-o", "evil.bundle"], work)  # fmt: skip
    _run(["bundle", "verify", "evil.bundle", "--key", "release.pub"], work, expect=1)

    _say("8. Release 1.0.1 changes a few files: most chunks are the same as in 1.0.0")
    (tree / "etc/os-release").write_text('NAME="Skylift demo OS"\nVERSION_ID="1.0.1"\n')
    (tree / "etc/motd").write_text("Welcome to 1.0.1\n")
    _make_image(work, "rootfs-v2.ext4", tree)
    _run(["bundle", "create", "--product", "demo-os", "--version", "1.0.1",
          "--hardware", HARDWARE, "--payload", "rootfs=rootfs-v2.ext4",
          "--key", "release.key", "-o", "demo-os-1.0.1.bundle"], work)  # fmt: skip
    pub = work / "release.pub"
    old = set(_chunk_digests(bundle, pub))
    new = _chunk_digests(work / "demo-os-1.0.1.bundle", pub)
    shared = sum(1 for d in new if d in old)
    print(
        f"  1.0.1 has {len(new)} chunks; {shared} ({100 * shared / len(new):.0f}%) are already "
        "in 1.0.0 (delta delivery builds on this; see issue 5)"
    )
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()[:16]
    _say(f"Demo finished: bundle sha256 {digest}…, everything verified, every bad copy refused")


if __name__ == "__main__":
    main()
