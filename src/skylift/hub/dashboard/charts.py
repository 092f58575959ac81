"""Charts as server-rendered SVG: a rollout's progress bar, version adoption over time. Pure.

No script and no style attribute: colours come from classes that the
dashboard's stylesheet defines (the Content-Security-Policy allows no
inline style), geometry from SVG attributes. Each chart carries a text
equivalent (``role="img"`` and ``aria-label``) for screen readers, and the
pages show the same figures as numbers next to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date

from markupsafe import Markup, escape

__all__ = ["BAR_ORDER", "adoption_chart", "progress_bar"]

#: Rollout statuses in the order the bar stacks them, left to right.
BAR_ORDER = ("committed", "installed", "downloading", "failed", "rolled_back", "pending")
_WIDTH, _HEIGHT = 600, 220
_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 44, 12, 12, 28


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def progress_bar(counts: Mapping[str, int], *, label: str) -> Markup:
    """A stacked bar of a phase's (or deployment's) devices by rollout status."""
    total = sum(counts.get(s, 0) for s in BAR_ORDER)
    parts = [f"{counts.get(s, 0)} {s.replace('_', ' ')}" for s in BAR_ORDER if counts.get(s)]
    text = f"{label}: " + (", ".join(parts) if parts else "no devices")
    rects = []
    x = 0.0
    for status in BAR_ORDER:
        n = counts.get(status, 0)
        if not n or not total:
            continue
        w = 100 * n / total
        rects.append(
            f'<rect class="bar-{status}" x="{_num(x)}" y="0" width="{_num(w)}" height="10"/>'
        )
        x += w
    svg = (
        f'<svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" role="img" '
        f'aria-label="{escape(text)}"><rect class="bar-empty" x="0" y="0" width="100" '
        f'height="10"/>{"".join(rects)}</svg>'
    )
    return Markup(svg)  # noqa: S704 - built from numbers and escaped text only


def adoption_chart(days: Sequence[date], series: Mapping[str, Sequence[int]]) -> Markup:
    """Each version's share of the fleet per day, as lines (points when there is one day)."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    if not days or not any(totals):
        return Markup('<p class="muted">No installed versions reported yet.</p>')
    plot_w = _WIDTH - _PAD_LEFT - _PAD_RIGHT
    plot_h = _HEIGHT - _PAD_TOP - _PAD_BOTTOM

    def x(i: int) -> float:
        return _PAD_LEFT + (plot_w * i / (len(days) - 1) if len(days) > 1 else plot_w / 2)

    def y(share: float) -> float:
        return _PAD_TOP + plot_h * (1 - share)

    out: list[str] = [
        f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="'
        + str(
            escape(
                "Share of devices per version, "
                + f"{days[0].isoformat()} to {days[-1].isoformat()}: "
                + "; ".join(
                    f"{v} {100 * vals[-1] / totals[-1]:.0f}% now" if totals[-1] else v
                    for v, vals in series.items()
                )
            )
        )
        + '">'
    ]
    for share in (0, 0.5, 1):
        out.append(
            f'<line class="grid" x1="{_PAD_LEFT}" x2="{_WIDTH - _PAD_RIGHT}" '
            f'y1="{_num(y(share))}" y2="{_num(y(share))}"/>'
            f'<text class="axis" x="{_PAD_LEFT - 6}" y="{_num(y(share) + 4)}" '
            f'text-anchor="end">{int(share * 100)}%</text>'
        )
    out.append(f'<text class="axis" x="{_PAD_LEFT}" y="{_HEIGHT - 8}">{days[0].isoformat()}</text>')
    if len(days) > 1:
        out.append(
            f'<text class="axis" x="{_WIDTH - _PAD_RIGHT}" y="{_HEIGHT - 8}" '
            f'text-anchor="end">{days[-1].isoformat()}</text>'
        )
    for n, (version, values) in enumerate(series.items()):
        points = [(x(i), y(values[i] / totals[i] if totals[i] else 0)) for i in range(len(days))]
        cls = f"s{n % 7}"
        title = f"<title>{escape(version)}</title>"
        if len(points) > 1:
            path = " ".join(f"{_num(px)},{_num(py)}" for px, py in points)
            out.append(f'<polyline class="line {cls}" points="{path}">{title}</polyline>')
        for px, py in points[-1:] if len(points) > 1 else points:
            out.append(f'<circle class="dot {cls}" cx="{_num(px)}" cy="{_num(py)}" r="4"/>')
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - numbers and escaped text only
