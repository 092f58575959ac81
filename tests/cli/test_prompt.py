"""Passphrases typed at a real terminal (a pseudo-terminal): asked, never echoed."""

from __future__ import annotations

import os
import pty
import select
import sys
import time
from pathlib import Path

from skylift.trust.keys import load_private_key


def _run_in_pty(args: list[str], answers: list[str], cwd: Path) -> tuple[int, str]:
    """Run skylift on a pty, answering each prompt (a line ending in ':') in turn."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLIFT_")}
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes skylift, with the pty as its terminal
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "skylift.cli.main", *args], env)  # noqa: S606
    out = b""
    pending = list(answers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(fd, 1024)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
        if pending and out.rstrip().endswith(b":"):
            os.write(fd, pending.pop(0).encode() + b"\n")
            out += b"<answered>"
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_generate_asks_twice_and_never_echoes(tmp_path: Path) -> None:
    code, out = _run_in_pty(["keys", "generate", "k"], ["s3cret pass", "s3cret pass"], tmp_path)
    assert code == 0, out
    assert "Passphrase for the new key:" in out
    assert "Same passphrase again:" in out
    assert "s3cret" not in out
    load_private_key((tmp_path / "k.key").read_bytes(), b"s3cret pass")

    code, out = _run_in_pty(["keys", "export-public", "k.key"], ["s3cret pass"], tmp_path)
    assert code == 0, out
    assert "Passphrase for k.key:" in out
    assert "BEGIN PUBLIC KEY" in out
    assert "s3cret" not in out


def test_mismatched_passphrases_write_nothing(tmp_path: Path) -> None:
    code, out = _run_in_pty(["keys", "generate", "k"], ["one", "two"], tmp_path)
    assert code == 1
    assert "the two passphrases differ" in out
    assert not list(tmp_path.iterdir())
