"""The overview's throughput charts: geometry of a server-rendered SVG bar chart.

Computes where each bar, gridline and label goes from `queries.Throughput`; the
`_chart.html` macro writes the SVG (escaped by Jinja), so the chart needs no JavaScript and no
image route, and the Content-Security-Policy needs no change for it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from dbqueue.web.queries import Throughput

WIDTH = 560
HEIGHT = 132
LEFT = 36  # room for the y-axis labels
BOTTOM = 18  # room for the time labels
TOP = 6
# name -> (bucket seconds, buckets, seconds between time labels, heading)
RANGES = {
    "hour": (60, 60, 600, "per minute, last hour"),
    "day": (900, 96, 3 * 3600, "per 15 minutes, last 24 hours"),
}


@dataclasses.dataclass
class Bar:
    x: float
    width: float
    ok_y: float
    ok_height: float
    failed_y: float
    failed_height: float
    title: str


@dataclasses.dataclass
class Chart:
    queue: str
    bars: list[Bar]
    y_max: int
    ticks: list[tuple[float, str]]
    succeeded: int
    failed: int
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    base: int = HEIGHT - BOTTOM


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... at or above `value` (at least 1)."""
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale >= value:
                return step * scale
        scale *= 10


def _clock(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%H:%M")


def layout(data: Throughput, queue: str, label_every: int) -> Chart:
    """One queue's chart: stacked bars (succeeded below, failed above) per bucket."""
    ok = data.succeeded.get(queue, [0] * data.buckets)
    bad = data.failed.get(queue, [0] * data.buckets)
    y_max = _nice_ceiling(max((a + b for a, b in zip(ok, bad, strict=True)), default=0))
    plot_height = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT) / data.buckets
    bars = []
    for i, (n_ok, n_bad) in enumerate(zip(ok, bad, strict=True)):
        begins = data.start + dt.timedelta(seconds=i * data.step)
        ok_height = plot_height * n_ok / y_max
        failed_height = plot_height * n_bad / y_max
        base = HEIGHT - BOTTOM
        bars.append(
            Bar(
                x=round(LEFT + i * slot + 0.5, 2),
                width=round(max(slot - 1.0, 1.0), 2),
                ok_y=round(base - ok_height, 2),
                ok_height=round(ok_height, 2),
                failed_y=round(base - ok_height - failed_height, 2),
                failed_height=round(failed_height, 2),
                title=f"{_clock(begins)} UTC: {n_ok} succeeded, {n_bad} failed",
            )
        )
    ticks = []
    for i in range(data.buckets + 1):
        moment = data.start + dt.timedelta(seconds=i * data.step)
        if int(moment.timestamp()) % label_every == 0:
            ticks.append((round(LEFT + i * slot, 2), _clock(moment)))
    return Chart(queue, bars, y_max, ticks, sum(ok), sum(bad))


def charts(data: Throughput, label_every: int) -> list[Chart]:
    """A chart for every queue that finished a task in the window, by name."""
    return [layout(data, q, label_every) for q in sorted(set(data.succeeded) | set(data.failed))]
