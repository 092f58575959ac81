"""Release versions: which of two is newer.

The agent refuses a release older than the installed one unless a downgrade
is explicitly allowed; the hub orders versions the same way when it decides
what to offer. Both sides must agree, or a device would refuse what the hub
considers an upgrade, so both use this one module (hub and agent may not
import each other).

Pure: no I/O.
"""

from __future__ import annotations

__all__ = ["compare_versions"]


def _order(c: str) -> int:
    # dpkg's character order: "~" before the end of a part, letters before other symbols.
    if c == "" or c.isdigit():
        return 0
    if c == "~":
        return -1
    if c.isascii() and c.isalpha():
        return ord(c)
    return ord(c) + 256


def compare_versions(a: str, b: str) -> int:
    """Compare release versions as dpkg does: negative if ``a`` is older, 0 if equal, else positive.

    Runs of digits compare as numbers (``1.10 > 1.9``, ``1.01 == 1.1``),
    other characters by dpkg's order: ``~`` sorts before anything, even the
    end, so ``1.2.3~rc1 < 1.2.3``; letters sort before other symbols. Semantic
    versions compare as expected except for pre-release suffixes, which need
    ``~`` instead of ``-``. Manifest versions hold only ``[0-9A-Za-z.+~_-]``.
    """
    i = j = 0
    while i < len(a) or j < len(b):
        # A non-digit part: compare character by character in dpkg's order.
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i] if i < len(a) else "")
            bc = _order(b[j] if j < len(b) else "")
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        # A digit part: compare as numbers, leading zeros ignored.
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        first_diff = 0
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i, j = i + 1, j + 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0
