"""Logins per day by protocol as an SVG bar chart, drawn on the server.

Only geometry here (numbers and class names); the template writes the
SVG, escaped like every other value. Colours live in static/style.css.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 10, 28


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    cls: str            # "p-imap", "p-pop3", ... (style.css)
    title: str          # the tooltip: day, protocol, counts


@dataclass
class Chart:
    width: int = WIDTH
    height: int = HEIGHT
    bars: list[Bar] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)     # (y, label)
    x_labels: list[tuple[float, str]] = field(default_factory=list)    # (x, label)
    legend: list[tuple[str, str]] = field(default_factory=list)        # (cls, protocol)
    total: int = 0
    baseline: float = HEIGHT - BOTTOM


def nice_top(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value``."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= value:
                return m * step
        step *= 10


def daily_chart(rows: list[dict], start_day: dt.date, days: int,
                protocols: tuple[str, ...]) -> Chart:
    """Stacked bars, one per day from ``start_day``; a segment per protocol
    (allowed and refused logins together; the tooltip tells them apart)."""
    per_day: dict[dt.date, dict[str, dict]] = {}
    for r in rows:
        per_day.setdefault(r["day"], {})[r["protocol"]] = r
    seen = [p for p in protocols if any(p in d for d in per_day.values())]
    top = nice_top(max([sum(r["allowed"] + r["denied"] for r in d.values())
                        for d in per_day.values()] + [1]))
    chart = Chart(legend=[(f"p-{p}", p) for p in seen])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / days
    for i in range(5):
        value = top * i // 4
        chart.y_ticks.append((TOP + plot_h - plot_h * value / top, f"{value:,}"))
    for i in range(days):
        day = start_day + dt.timedelta(days=i)
        x = LEFT + i * slot
        if i % 5 == 0 or i == days - 1:
            chart.x_labels.append((x + slot / 2, day.strftime("%m-%d")))
        y = TOP + plot_h
        for p in seen:
            r = per_day.get(day, {}).get(p)
            if not r or not (r["allowed"] + r["denied"]):
                continue
            n = r["allowed"] + r["denied"]
            h = plot_h * n / top
            y -= h
            chart.total += n
            chart.bars.append(Bar(round(x + 1, 2), round(y, 2), round(max(slot - 2, 1), 2),
                                  round(h, 2), f"p-{p}",
                                  f"{day.isoformat()} {p}: {r['allowed']:,} allowed, "
                                  f"{r['denied']:,} refused"))
    return chart
