"""Small inline SVG line charts for `rayrlhf report`: our own drawing code, so the page opens offline.

A chart is a few series of (step, value) points; a value of None (NaN or null in metrics.jsonl) is a gap
in its line. Every finite point is a <circle> with a <title>, so hovering shows the exact value; a series
may carry a ±band (reward/mean ± reward/std) and may be drawn as steps (running totals such as faults/*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

WIDTH, HEIGHT = 600, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 12, 36  # margins: tick labels left and below
MAX_MARKERS = 400  # hover markers per series beyond which they are thinned (the line keeps every point)
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")

Point = tuple[int, float | None]


@dataclass
class Series:
    """One line: `key` is the metrics key (data-key on its SVG elements), `label` what the legend says."""

    key: str
    label: str
    points: list[Point]
    band: list[tuple[int, float | None, float | None]] = field(default_factory=list)  # (step, low, high); None: gap
    dashed: bool = False  # evaluation series: sparse points, dashed line
    steps: bool = False  # running totals: drawn as a staircase

    @property
    def finite(self) -> list[tuple[int, float]]:
        return [(s, v) for s, v in self.points if v is not None]


@dataclass
class Chart:
    title: str
    series: list[Series]


def finite(value: object) -> float | None:
    """A metrics value as a float, or None for a gap (null, NaN, inf, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = 1.0 if integer or lo == 0 else abs(lo) * 0.1
        lo, hi = (lo - pad, hi + pad) if not (integer and lo >= 0) else (max(0.0, lo - 1), max(0.0, lo - 1) + 2)
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        step = m * magnitude
        if step >= raw and (not integer or step == int(step)):
            break
    if integer:
        step = max(1.0, float(round(step)))
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    n = int(round((stop - start) / step))
    digits = max(0, 3 - math.floor(math.log10(step)))  # float noise off, at any scale (a KL of 4e-14 included)
    return [round(start + i * step, digits) for i in range(n + 1)]


def _sci(value: float, digits: int) -> str:
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.') if '.' in mantissa else mantissa}e{int(exponent)}"


def _small_or_large(value: float) -> bool:
    return value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3)


def fmt(value: float, digits: int = 4, sci: bool | None = None) -> str:
    """A compact number: 0.0123, 1.5e6, 2.5e-4, 12345 (`sci` forces or forbids the exponent form)."""
    if value == 0:
        return "0"
    if sci or (sci is None and _small_or_large(value)):
        return _sci(value, digits)
    if abs(value) >= 10**digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def tick_labels(ticks: list[float]) -> list[str]:
    """One style per axis (exponents when any tick needs one), with the fewest significant digits that tell
    every tick apart (a narrow range far from 0 needs more)."""
    sci = any(_small_or_large(t) for t in ticks)
    for digits in range(3, 13):
        labels = [fmt(t, digits, sci) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return [exact(t) for t in ticks]


def exact(value: float) -> str:
    """The value as hover text: enough digits to read it back."""
    return f"{value:.10g}"


def _segments(points: list[Point]) -> list[list[tuple[int, float]]]:
    """Runs of finite points, split at gaps."""
    out: list[list[tuple[int, float]]] = [[]]
    for s, v in points:
        if v is None:
            if out[-1]:
                out.append([])
        else:
            out[-1].append((s, v))
    return [seg for seg in out if seg]


def _markers(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= MAX_MARKERS:
        return points
    every = math.ceil(len(points) / MAX_MARKERS)
    kept = points[::every]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def svg_chart(chart: Chart) -> str:
    """The chart as an inline <svg> element (no xmlns: HTML5 inline SVG needs none, and the page names no URL)."""
    pts = [p for ser in chart.series for p in ser.finite]
    xs = [s for s, _ in pts]
    ys = [v for _, v in pts] + [b for ser in chart.series for _, lo, hi in ser.band for b in (lo, hi) if b is not None]
    xt = nice_ticks(min(xs), max(xs), 6, integer=True)
    yt = nice_ticks(min(ys), max(ys), 5)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def X(s: float) -> float:
        return LEFT + (s - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)

    def Y(v: float) -> float:
        return HEIGHT - BOTTOM - (v - y0) / (y1 - y0) * (HEIGHT - TOP - BOTTOM)

    out = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{escape(chart.title)}">']
    for t, label in zip(yt, tick_labels(yt)):
        out.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{Y(t):.1f}" y2="{Y(t):.1f}"/>'
                   f'<text class="tick" x="{LEFT - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{escape(label)}</text>')
    for t in xt:
        out.append(f'<line class="grid" x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
                   f'<text class="tick" x="{X(t):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{int(t)}</text>')
    out.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
               f'height="{HEIGHT - TOP - BOTTOM}"/>')
    out.append(f'<text class="axis" x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT - 4}" text-anchor="middle">step</text>')
    for i, ser in enumerate(chart.series):
        color, key = PALETTE[i % len(PALETTE)], escape(ser.key)
        high = {s: hi for s, _, hi in ser.band}
        for seg in _segments([(s, lo) for s, lo, _ in ser.band]):  # low and high are None together
            upper = " ".join(f"{X(s):.1f},{Y(high[s]):.1f}" for s, _ in seg)
            lower = " ".join(f"{X(s):.1f},{Y(lo):.1f}" for s, lo in reversed(seg))
            out.append(f'<polygon class="band" data-key="{key}" points="{upper} {lower}" fill="{color}"/>')
        dash = ' stroke-dasharray="5 3"' if ser.dashed else ""
        for seg in _segments(ser.points):
            coords = []
            for j, (s, v) in enumerate(seg):
                if ser.steps and j:  # hold the previous total until this step
                    coords.append(f"{X(s):.1f},{Y(seg[j - 1][1]):.1f}")
                coords.append(f"{X(s):.1f},{Y(v):.1f}")
            out.append(f'<polyline class="line" data-key="{key}" points="{" ".join(coords)}" stroke="{color}"{dash}>'
                       f"<title>{escape(ser.label)}</title></polyline>")
        radius = 2.5 if len(ser.finite) <= 60 else 1.5
        for s, v in _markers(ser.finite):
            out.append(f'<circle class="pt" data-key="{key}" cx="{X(s):.1f}" cy="{Y(v):.1f}" r="{radius}" fill="{color}">'
                       f"<title>{escape(ser.label)} at step {s}: {exact(v)}</title></circle>")
    out.append("</svg>")
    return "".join(out)


def legend(chart: Chart) -> str:
    """The chart's legend as HTML (it wraps, unlike SVG text)."""
    items = []
    for i, ser in enumerate(chart.series):
        style = "dashed" if ser.dashed else "solid"
        items.append(f'<span class="key"><span class="swatch {style}" style="border-color:{PALETTE[i % len(PALETTE)]}">'
                     f"</span>{escape(ser.label)}</span>")
    return f'<div class="legend">{"".join(items)}</div>'
