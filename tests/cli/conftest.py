"""Run the ``skylift`` command as a user or CI would.

``skylift`` runs the real command in a subprocess (exit code, stdin, no
traceback); ``skylift_fast`` calls the same ``main()`` entry point in this
process, for the long tables of refusals where start-up time would dominate.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from skylift.cli.main import main

PASSPHRASE = "correct horse battery staple"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The stderr of a failed command: it must be exactly one line, no traceback."""
        assert "Traceback" not in self.err, self.err
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        assert len(lines) == 1, self.err
        assert lines[0].startswith("error: "), self.err
        return lines[0]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLIFT_")}
    env["SKYLIFT_KEY_PASSPHRASE"] = PASSPHRASE
    env["COLUMNS"] = "200"
    return env


class Skylift:
    """The command in a subprocess."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd

    def __call__(self, *args: str | Path, stdin: bytes | None = None, **env: str) -> Result:
        p = subprocess.run(
            [sys.executable, "-m", "skylift.cli.main", *map(str, args)],
            cwd=self.cwd,
            env={**_env(), **env},
            input=stdin,
            capture_output=True,
            timeout=120,
            check=False,
        )
        return Result(p.returncode, p.stdout.decode(), p.stderr.decode())


class SkyliftInProcess:
    """The same entry point, called in this process."""

    def __init__(
        self, cwd: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
    ) -> None:
        self.cwd = cwd
        self.monkeypatch = monkeypatch
        self.capfd = capfd

    def __call__(self, *args: str | Path, **env: str) -> Result:
        with self.monkeypatch.context() as m:
            m.chdir(self.cwd)
            for k, v in {**_env(), **env}.items():
                m.setenv(k, v)
            self.capfd.readouterr()
            code = main([str(a) for a in args])
            captured = self.capfd.readouterr()
        return Result(code, captured.out, captured.err)


@pytest.fixture
def skylift(tmp_path: Path) -> Skylift:
    return Skylift(tmp_path)


@pytest.fixture
def skylift_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> SkyliftInProcess:
    return SkyliftInProcess(tmp_path, monkeypatch, capfd)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys, images, a hook and app.bundle, made once per module by the real command."""
    d = tmp_path_factory.mktemp("built")
    run = Skylift(d)
    assert run("keys", "generate", "release").code == 0
    assert run("keys", "generate", "other").code == 0
    rng = random.Random(5)
    image = b"".join(rng.randbytes(20_000) if i % 3 else b"text line\n" * 3000 for i in range(60))
    (d / "rootfs.img").write_bytes(image)
    (d / "kernel.img").write_bytes(image[:300_000])
    (d / "check.sh").write_text("#!/bin/sh\nexit 0\n")
    r = run(
        "bundle", "create", "--product", "acme-gw", "--version", "2.0.1",
        "--hardware", "board-a", "--hardware", "board-b",
        "--payload", "rootfs=rootfs.img", "--payload", "kernel=kernel.img",
        "--chunking", "kernel=fixed:4K",
        "--hook", "health-check=check.sh", "--key", "release.key", "-o", "app.bundle",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "wrote app.bundle: acme-gw 2.0.1, 2 payload(s)" in r.err
    return d


@pytest.fixture
def made(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the built files in this test's directory; returns app.bundle."""
    for f in built.iterdir():
        shutil.copy2(f, tmp_path / f.name)
    return tmp_path / "app.bundle"
