"""The report's two plots as inline SVG: reputation over time (polylines) and audits per
node (stacked horizontal bars). No plotting library, no JavaScript: plain SVG text.

Every label is `html.escape`d, since node ids and model ids come from the network.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# Distinguishable on white and for common colour-vision deficiencies (Okabe-Ito, then extras).
_PALETTE = (
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#cc79a7",
    "#56b4e9",
    "#d55e00",
    "#f0e442",
    "#000000",
    "#7f7f7f",
    "#8c564b",
)
_DASHES = ("", "6 3", "2 2", "8 3 2 3")  # after the palette runs out, the same colours dashed
PASSED, FAILED, INCONCLUSIVE = "#2e7d32", "#c62828", "#9e9e9e"
_QUARANTINED = "#c62828"


@dataclass(frozen=True, kw_only=True, slots=True)
class Series:
    """One line: a subject's score over time."""

    label: str
    points: Sequence[tuple[float, float]]  # (unix time, score in [y_min, y_max])
    alert: bool = False  # quarantined now: drawn thick, with the label flagged


@dataclass(frozen=True, kw_only=True, slots=True)
class Mark:
    """A moment worth seeing on the time axis: a quarantine or a re-admission."""

    at: float
    label: str
    kind: Literal["quarantine", "readmit"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Bar:
    """One row of the audits chart."""

    label: str
    passed: int
    failed: int
    inconclusive: int
    alert: bool = False


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _n(x: float) -> str:
    """A coordinate with one decimal: keeps a plot of thousands of points small."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _time_label(at: float, span: float) -> str:
    fmt = "%H:%M:%S" if span < 86_400 else "%Y-%m-%d %H:%M" if span < 30 * 86_400 else "%Y-%m-%d"
    return time.strftime(fmt, time.gmtime(at))


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    marks: Sequence[Mark] = (),
    y_min: float | None = None,
    y_max: float = 1.0,
    width: int = 760,
    height: int = 300,
) -> str:
    """Score against time, one polyline per series, legend on the right, `marks` as ticks
    along the top edge (red: quarantine, green: re-admission). Times are UTC. Without
    `y_min` the axis starts at the lowest score rounded down to a tenth, so that small
    dips stay visible."""
    legend_w = 220
    left, right, top, bottom = 44, legend_w + 16, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [p[0] for s in series for p in s.points] + [m.at for m in marks]
    if y_min is None:
        lowest = min((p[1] for s in series for p in s.points), default=0.0)
        y_min = max(0.0, min(math.floor(lowest * 10) / 10, y_max - 0.1))
    t0, t1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if t1 <= t0:
        t0, t1 = t0 - 0.5, t1 + 0.5
    y_span = (y_max - y_min) or 1.0

    def px(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * plot_w

    def py(v: float) -> float:
        return top + (1 - (min(max(v, y_min), y_max) - y_min) / y_span) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{_e(title)}</title>",
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{_e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>',
    ]
    for i in range(5):  # y grid
        v = y_min + y_span * i / 4
        y = _n(py(v))
        out.append(f'<line x1="{left}" y1="{y}" x2="{left + plot_w}" y2="{y}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y}" text-anchor="end" dominant-baseline="middle">{v:.2f}</text>')
    for i in range(5):  # x ticks
        t = t0 + (t1 - t0) * i / 4
        x = _n(px(t))
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(f'<line x1="{x}" y1="{top + plot_h}" x2="{x}" y2="{top + plot_h + 4}" stroke="#888"/>')
        out.append(f'<text x="{x}" y="{top + plot_h + 16}" text-anchor="{anchor}">{_e(_time_label(t, t1 - t0))}</text>')
    out.append(f'<text x="{left + plot_w}" y="{height - 6}" text-anchor="end" fill="#666">time (UTC)</text>')
    for m in marks:
        x = _n(px(m.at))
        color = _QUARANTINED if m.kind == "quarantine" else PASSED
        out.append(
            f'<line x1="{x}" y1="{top}" x2="{x}" y2="{top + 8}" stroke="{color}" stroke-width="2">'
            f"<title>{_e(m.label)}</title></line>"
        )
    for i, s in enumerate(series):
        color = _QUARANTINED if s.alert else _PALETTE[i % len(_PALETTE)]
        dash = _DASHES[(i // len(_PALETTE)) % len(_DASHES)]
        style = f' stroke-dasharray="{dash}"' if dash else ""
        stroke_w = "2.5" if s.alert else "1.5"
        if len(s.points) == 1:
            (t, v), *_ = s.points
            out.append(f'<circle cx="{_n(px(t))}" cy="{_n(py(v))}" r="2.5" fill="{color}"/>')
        elif s.points:
            pts = " ".join(f"{_n(px(t))},{_n(py(v))}" for t, v in s.points)
            out.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="{stroke_w}"{style} points="{pts}">'
                f"<title>{_e(s.label)}</title></polyline>"
            )
        ly = top + 6 + i * 14
        if ly > top + plot_h + bottom - 14:
            continue  # the legend is full; the tables list every subject anyway
        lx = left + plot_w + 12
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 18}" y2="{ly}" stroke="{color}" stroke-width="2"{style}/>')
        label = s.label if len(s.label) <= 30 else s.label[:29] + "…"
        flag = " (quarantined)" if s.alert else ""
        out.append(f'<text x="{lx + 22}" y="{ly}" dominant-baseline="middle">{_e(label + flag)}</text>')
    out.append("</svg>")
    return "".join(out)


def stacked_bars(bars: Sequence[Bar], *, title: str, width: int = 760) -> str:
    """Audits per subject: passed, failed and inconclusive stacked left to right."""
    left, right, top, row = 230, 60, 44, 18
    plot_w = width - left - right
    height = top + row * max(len(bars), 1) + 12
    most = max((b.passed + b.failed + b.inconclusive for b in bars), default=0) or 1
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{_e(title)}</title>",
        f'<text x="8" y="16" font-size="13" font-weight="bold">{_e(title)}</text>',
    ]
    lx = left
    for name, color in (("passed", PASSED), ("failed", FAILED), ("inconclusive", INCONCLUSIVE)):
        out.append(f'<rect x="{lx}" y="24" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{lx + 14}" y="33">{name}</text>')
        lx += 100
    for i, b in enumerate(bars):
        y = top + i * row
        label = b.label if len(b.label) <= 36 else b.label[:35] + "…"
        weight = ' font-weight="bold" fill="#c62828"' if b.alert else ""
        out.append(
            f'<text x="{left - 6}" y="{y + row / 2}" text-anchor="end" dominant-baseline="middle"{weight}>'
            f"{_e(label)}</text>"
        )
        x = float(left)
        for count, color, name in (
            (b.passed, PASSED, "passed"),
            (b.failed, FAILED, "failed"),
            (b.inconclusive, INCONCLUSIVE, "inconclusive"),
        ):
            if count:
                w = count / most * plot_w
                out.append(
                    f'<rect x="{_n(x)}" y="{y + 2}" width="{_n(max(w, 0.5))}" height="{row - 4}" fill="{color}">'
                    f"<title>{_e(b.label)}: {count} {name}</title></rect>"
                )
                x += w
        total = b.passed + b.failed + b.inconclusive
        out.append(f'<text x="{_n(x + 4)}" y="{y + row / 2}" dominant-baseline="middle">{total}</text>')
    out.append("</svg>")
    return "".join(out)
