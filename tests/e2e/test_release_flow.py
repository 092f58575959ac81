"""The release engineer's day, through the real CLI against a real hub.

``released`` (conftest) creates product acme-gw and pushes 1.0.0 and 1.1.0
with ``skylift`` subprocesses; this checks what they printed and what the
hub holds, and that bad pushes are refused in one line.
"""

from __future__ import annotations

import json
import re

from sqlalchemy import select

from skylift.hub.db.models import Release

from .conftest import PRODUCT, Hub


def test_push_uploads_only_missing_chunks_and_publishes(released: Hub) -> None:
    first, second = released.released
    assert "released acme-gw 1.0.0" in first.stderr
    assert "released acme-gw 1.1.0" in second.stderr
    # Without a terminal, plain progress lines (no bar, no escape codes) on stderr.
    plan = [re.search(r"uploading (\d+) of (\d+) chunk\(s\)", p.stderr) for p in (first, second)]
    assert plan[0] and plan[1], (first.stderr, second.stderr)
    assert plan[0].group(1) == plan[0].group(2)  # the first release uploads everything
    assert 0 < int(plan[1].group(1)) < int(plan[1].group(2))  # the second only what changed
    # ... and says what it skipped: the other chunks, their stored bytes.
    skips = [
        re.search(r"skipping (\d+) the hub has, .* \((\d+) bytes\)", p.stderr)
        for p in (first, second)
    ]
    assert skips[0] and skips[1], (first.stderr, second.stderr)
    assert skips[0].groups() == ("0", "0")
    assert int(skips[1].group(1)) == int(plan[1].group(2)) - int(plan[1].group(1))
    assert int(skips[1].group(2)) > 0
    assert "\x1b[" not in first.stderr + second.stderr
    assert first.stdout == second.stdout == ""
    uploaded = [p.stderr.strip().rsplit(", ", 1)[1] for p in (first, second)]
    assert uploaded[0] != uploaded[1]
    versions = released.scalar_rows(select(Release.version).order_by(Release.id))
    assert versions == ["1.0.0", "1.1.0"]


def test_bad_pushes_are_refused_in_one_line(released: Hub) -> None:
    cli = released.cli
    bundle = ("bundle", "create", "--hardware", "hw1", "--payload", "rootfs=v1.img")
    cli.parallel([
        # signed by a key that is not a release key of the product (its root key)
        ((*bundle, "--product", PRODUCT, "--version", "6.6.6", "--key", "root.key",
          "-o", "evil.bundle"), None),
        # for a product the hub does not have
        ((*bundle, "--product", "nobody-gw", "--version", "1.0.0", "--key", "release.key",
          "-o", "nobody.bundle"), None),
    ])  # fmt: skip
    again, evil, nobody = cli.parallel(
        [
            (("release", "push", "1.0.0.bundle", "--key", "release.key"), None),
            (("release", "push", "evil.bundle", "--key", "root.key"), None),
            (("release", "push", "nobody.bundle", "--key", "release.key"), None),
        ],
        ok=False,
    )
    # All refused before any upload.
    assert "1.0.0 is released already" in again.stderr
    assert "the key(s) given provide 0" in evil.stderr
    assert "404" in nobody.stderr and "nobody-gw" in nobody.stderr
    versions = released.scalar_rows(select(Release.version).order_by(Release.id))
    assert versions == ["1.0.0", "1.1.0"]
    assert json.loads(cli("devices", "list", "--json", "--tag", "nobody").stdout) == []
