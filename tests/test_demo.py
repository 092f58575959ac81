"""``make demo`` keeps working: it runs end to end and refuses what it should."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    if not shutil.which("mke2fs") and not Path("/sbin/mke2fs").exists():
        pytest.fail("mke2fs is missing: `make test` installs e2fsprogs; run it through make")
    p = subprocess.run(
        [sys.executable, "-m", "skylift.demo", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "extracted image identical to the original: True" in out
    assert "files left in bad-out/: 0" in out
    assert out.count("(exit code 1, as it should be)") == 4
    assert "Traceback" not in out + p.stderr
