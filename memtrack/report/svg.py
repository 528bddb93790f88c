"""Small inline-SVG charts for the HTML report: no JavaScript, no libraries, no network.

Three chart kinds, each a pure function from numbers to an ``<svg>`` string: :func:`line_chart` (rates
over training steps with interval bands and onset markers, one or several runs), :func:`histogram`
(overlaid distributions with a threshold) and :func:`heatmap` (seed x step, colour = matched image).
Every label passes through :func:`esc`; charts scale with their container through ``viewBox``.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

# Okabe & Ito (2008) colour-blind-safe palette, in the order lines are given colours.
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
DASHES = ["", "7 4", "2 3", "9 3 2 3", "4 4", "1 2"]
INK, MUTED, GRID = "#1f2328", "#59636e", "#d8dee4"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"


def esc(text: object) -> str:
    """HTML/SVG-escape any value, quotes included (safe in text and in attribute values)."""
    return html.escape(str(text), quote=True)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (Heckbert's nice numbers)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


@dataclass
class Series:
    """One curve: ``points`` are ``(x, y, y_low, y_high)`` (low/high may be None: no band)."""

    label: str
    points: list[tuple[float, float, float | None, float | None]]
    colour: str = OKABE_ITO[0]
    dash: str = ""
    onset: float | None = None
    onset_between: Sequence[float] | None = None
    tips: list[str] = field(default_factory=list)   # one tooltip per point
    onset_colour: str | None = None                  # defaults to the line's colour
    band_opacity: float = 0.16                       # lighter when several runs overlap
    onset_tentative: bool = False                    # not yet confirmed by later checkpoints: "onset 7,500?"


class _Frame:
    """Maps data to pixels inside a plot area and draws its axes."""

    def __init__(self, width: int, height: int, left: int, right: int, top: int, bottom: int,
                 x_dom: tuple[float, float], y_dom: tuple[float, float]):
        self.w, self.h = width, height
        self.x0, self.x1, self.y0, self.y1 = left, width - right, height - bottom, top
        self.xd, self.yd = x_dom, y_dom

    def x(self, v: float) -> float:
        lo, hi = self.xd
        return self.x0 + (v - lo) / (hi - lo) * (self.x1 - self.x0)

    def y(self, v: float) -> float:
        lo, hi = self.yd
        return self.y0 - (v - lo) / (hi - lo) * (self.y0 - self.y1)

    def axes(self, xticks, yticks, xfmt: Callable, yfmt: Callable, xlabel: str, ylabel: str) -> list[str]:
        out = []
        for t in yticks:
            y = self.y(t)
            out.append(f'<line x1="{self.x0}" x2="{self.x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
            out.append(f'<text x="{self.x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{MUTED}">'
                       f'{esc(yfmt(t))}</text>')
        for t in xticks:
            x = self.x(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.y0}" y2="{self.y0 + 4}" stroke="{MUTED}"/>')
            out.append(f'<text x="{x:.1f}" y="{self.y0 + 17}" text-anchor="middle" fill="{MUTED}">'
                       f'{esc(xfmt(t))}</text>')
        out.append(f'<line x1="{self.x0}" x2="{self.x1}" y1="{self.y0}" y2="{self.y0}" stroke="{MUTED}"/>')
        out.append(f'<text x="{(self.x0 + self.x1) / 2:.1f}" y="{self.h - 4}" text-anchor="middle" '
                   f'fill="{MUTED}">{esc(xlabel)}</text>')
        if ylabel:
            out.append(f'<text x="12" y="{(self.y0 + self.y1) / 2:.1f}" text-anchor="middle" fill="{MUTED}" '
                       f'transform="rotate(-90 12 {(self.y0 + self.y1) / 2:.1f})">{esc(ylabel)}</text>')
        return out


def _svg(width: int, height: int, title: str, desc: str, body: list[str], max_width: int | None = None,
         min_width: int | None = None) -> str:
    limits = ([f"max-width:{max_width}px"] if max_width else []) + ([f"min-width:{min_width}px"] if min_width else [])
    cap = f' style="{";".join(limits)}"' if limits else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
            f'font-family="{FONT}" font-size="12" class="chart" preserveAspectRatio="xMinYMin meet"{cap}>'
            f'<title>{esc(title)}</title><desc>{esc(desc)}</desc>' + "".join(body) + "</svg>")


def _x_domain(xs: list[float]) -> tuple[float, float]:
    lo, hi = min(xs), max(xs)
    if hi == lo:
        pad = max(1.0, abs(lo) * 0.1)
        return lo - pad, hi + pad
    return lo, hi


def line_chart(series: list[Series], *, title: str, desc: str = "", percent: bool = True,
               xlabel: str = "training step", ylabel: str = "", width: int = 480, height: int = 250) -> str:
    """Curves over training steps with shaded interval bands and dashed vertical onset markers.

    With ``percent`` the y axis shows rates in % and starts at 0; otherwise it shows counts.
    """
    for s in series:  # a NaN would be an SVG parse error: drop the point, or its band
        keep = [i for i, p in enumerate(s.points) if _finite(p[0]) and _finite(p[1])]
        s.tips = [s.tips[i] for i in keep if i < len(s.tips)]
        s.points = [(s.points[i][0], s.points[i][1], *((s.points[i][2], s.points[i][3])
                     if _finite(s.points[i][2]) and _finite(s.points[i][3]) else (None, None))) for i in keep]
    series = [s for s in series if s.points]
    pts = [p for s in series for p in s.points]
    if not pts:
        return ""
    n_onsets = sum(1 for s in series if s.onset is not None)
    top = 12 + 13 * n_onsets
    xs = [p[0] for p in pts] + [s.onset for s in series if s.onset is not None]
    y_hi = max([p[3] if p[3] is not None else p[1] for p in pts] + [0.0])
    y_hi = max(y_hi * 1.05, 0.05 if percent else 4.0)  # counts: whole-number ticks
    yticks = nice_ticks(0.0, y_hi, 5)
    f = _Frame(width, height, 50, 26, top, 38, _x_domain(xs), (0.0, yticks[-1]))
    xticks = [t for t in nice_ticks(*f.xd, 5) if f.xd[0] - 1e-9 <= t <= f.xd[1] + 1e-9]
    yfmt = (lambda t: f"{100 * t:.0f}%" if abs(100 * t - round(100 * t)) < 1e-6 else f"{100 * t:.1f}%") \
        if percent else (lambda t: f"{t:g}")
    body = f.axes(xticks, yticks, _fmt_step_tick, yfmt, xlabel, ylabel)
    for s in series:
        band = [(p[0], p[2], p[3]) for p in s.points if p[2] is not None and p[3] is not None]
        if len(band) >= 2:
            up = " ".join(f"{f.x(x):.1f},{f.y(hi):.1f}" for x, _, hi in band)
            down = " ".join(f"{f.x(x):.1f},{f.y(lo):.1f}" for x, lo, _ in reversed(band))
            body.append(f'<polygon points="{up} {down}" fill="{s.colour}" fill-opacity="{s.band_opacity}" '
                        'stroke="none"/>')
        elif len(band) == 1:
            x, lo, hi = band[0]
            body.append(f'<line x1="{f.x(x):.1f}" x2="{f.x(x):.1f}" y1="{f.y(lo):.1f}" y2="{f.y(hi):.1f}" '
                        f'stroke="{s.colour}" stroke-opacity="0.35" stroke-width="6"/>')
    for i, s in enumerate(s for s in series if s.onset is not None):
        body.extend(_onset_marker(f, s, label_y=top - 4 - 13 * i))
    for s in series:
        line = " ".join(f"{f.x(p[0]):.1f},{f.y(p[1]):.1f}" for p in s.points)
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        body.append(f'<polyline points="{line}" fill="none" stroke="{s.colour}" stroke-width="2.2"{dash}/>')
        for j, p in enumerate(s.points):
            tip = s.tips[j] if j < len(s.tips) else f"{s.label}: {p[1]:g} at step {p[0]:,.0f}"
            body.append(f'<circle cx="{f.x(p[0]):.1f}" cy="{f.y(p[1]):.1f}" r="3.2" fill="{s.colour}" '
                        f'stroke="#fff" stroke-width="1"><title>{esc(tip)}</title></circle>')
    return _svg(width, height, title, desc, body)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _onset_marker(f: _Frame, s: Series, label_y: float) -> list[str]:
    out, colour = [], s.onset_colour or s.colour
    if s.onset_between and len(s.onset_between) == 2:
        a, b = (f.x(v) for v in s.onset_between)
        out.append(f'<rect x="{min(a, b):.1f}" y="{f.y1}" width="{abs(b - a):.1f}" height="{f.y0 - f.y1}" '
                   f'fill="{colour}" fill-opacity="0.1"/>')
    x = f.x(s.onset)
    out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{label_y + 3:.1f}" y2="{f.y0}" stroke="{colour}" '
               f'stroke-width="1.8" stroke-dasharray="5 3" class="onset"/>')
    anchor = "end" if x > f.x0 + 0.75 * (f.x1 - f.x0) else "start"
    dx = -4 if anchor == "end" else 4
    out.append(f'<text x="{x + dx:.1f}" y="{label_y:.1f}" text-anchor="{anchor}" fill="{colour}" '
               f'font-weight="600">onset {s.onset:,.0f}{"?" if s.onset_tentative else ""}</text>')
    return out


def _fmt_step_tick(t: float) -> str:
    if abs(t) >= 10_000:
        return f"{t / 1000:g}k"
    return f"{t:,.0f}" if t == round(t) else f"{t:g}"


@dataclass
class Distribution:
    label: str
    values: Sequence[float]
    colour: str


def histogram(dists: list[Distribution], *, title: str, xlabel: str, desc: str = "",
              markers: Sequence[tuple[float, str]] = (), bins: int | None = None, width: int = 480,
              height: int = 230) -> str:
    """Overlaid histograms (share of each distribution per bin) with labelled vertical markers."""
    allv = [float(v) for d in dists for v in d.values if v is not None and math.isfinite(float(v))]
    if not allv:
        return ""
    lo, hi = _x_domain(allv + [m[0] for m in markers])
    bins = bins or min(30, max(8, int(2 * math.sqrt(max(len(d.values) for d in dists)))))
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    shares = []
    for d in dists:
        vals = [float(v) for v in d.values if v is not None and math.isfinite(float(v))]
        counts = [0] * bins
        for v in vals:
            counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
        shares.append([c / max(len(vals), 1) for c in counts])
    yticks = nice_ticks(0.0, max(max(s) for s in shares) * 1.08 or 1.0, 4)
    top = 14 + 13 * len(markers)
    f = _Frame(width, height, 50, 26, top, 38, (lo, hi), (0.0, yticks[-1]))
    body = f.axes(nice_ticks(lo, hi, 6)[1:-1] if len(nice_ticks(lo, hi, 6)) > 3 else nice_ticks(lo, hi, 6),
                  yticks, lambda t: f"{t:g}", lambda t: f"{100 * t:.0f}%", xlabel, "")
    for d, share in zip(dists, shares):
        path = [f"M{f.x(lo):.1f},{f.y(0):.1f}"]
        for i, s in enumerate(share):
            path.append(f"L{f.x(edges[i]):.1f},{f.y(s):.1f} L{f.x(edges[i + 1]):.1f},{f.y(s):.1f}")
        path.append(f"L{f.x(hi):.1f},{f.y(0):.1f} Z")
        body.append(f'<path d="{" ".join(path)}" fill="{d.colour}" fill-opacity="0.22" stroke="{d.colour}" '
                    f'stroke-width="1.8"><title>{esc(d.label)} (n={len(d.values)})</title></path>')
    for i, (x, text) in enumerate(markers):
        px, ly = f.x(x), top - 4 - 13 * i
        anchor, dx = ("end", -4) if px > f.x0 + 0.7 * (f.x1 - f.x0) else ("start", 4)
        body.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{ly + 3:.1f}" y2="{f.y0}" stroke="{INK}" '
                    f'stroke-width="1.5" stroke-dasharray="5 3"/>')
        body.append(f'<text x="{px + dx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" fill="{INK}">{esc(text)}</text>')
    return _svg(width, height, title, desc, body)


def heatmap(rows: list[tuple[str, list[str | None], int | None]], columns: list[str],
            colours: dict[str, str], *, title: str, desc: str = "", other: str = "#8a8a8a") -> str:
    """A grid of ``rows`` = ``(row label, [cell key or None per column], locked column or None)``.

    A cell is filled with ``colours[key]`` (``other`` for keys without a colour), left blank for None;
    the locked column gets a ring. Every cell carries a tooltip.
    """
    if not rows or not columns:
        return ""
    cw = max(9.0, min(30.0, 620.0 / len(columns)))
    ch, left, top, bottom = 15.0, 70, 6, 40
    width = int(left + cw * len(columns) + 10)
    height = int(top + ch * len(rows) + bottom)
    body = []
    every = max(1, math.ceil(46 / cw))
    for j, col in enumerate(columns):
        if j % every == 0:
            x = left + cw * (j + 0.5)
            body.append(f'<text x="{x:.1f}" y="{top + ch * len(rows) + 15}" text-anchor="middle" '
                        f'fill="{MUTED}">{esc(col)}</text>')
    body.append(f'<text x="{left + cw * len(columns) / 2:.1f}" y="{height - 4}" text-anchor="middle" '
                f'fill="{MUTED}">training step</text>')
    for i, (name, cells, locked) in enumerate(rows):
        y = top + ch * i
        body.append(f'<text x="{left - 6}" y="{y + ch - 4:.1f}" text-anchor="end" fill="{MUTED}">{esc(name)}</text>')
        for j, key in enumerate(cells):
            x = left + cw * j
            tip = f"{name}, step {columns[j]}: " + ("no match" if key is None else str(key))
            fill = "#ffffff" if key is None else colours.get(key, other)
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cw - 1:.1f}" height="{ch - 1:.1f}" fill="{fill}" '
                        f'stroke="{GRID}" stroke-width="0.6"><title>{esc(tip)}</title></rect>')
        if locked is not None and 0 <= locked < len(cells):
            cx, cy = left + cw * (locked + 0.5) - 0.5, y + ch / 2 - 0.5
            body.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.4" fill="#fff" stroke="{INK}" stroke-width="1.6"/>')
    return _svg(width, height, title, desc, body, max_width=int(width * 1.15), min_width=int(width * 0.7))


def swatch(colour: str, dash: str = "", kind: str = "line") -> str:
    """A small legend key: a line (with the series' dash), a band, a dashed marker or a filled square."""
    if kind == "square":
        inner = f'<rect x="3" y="2" width="12" height="12" fill="{colour}" stroke="{GRID}"/>'
    elif kind == "band":
        inner = f'<rect x="1" y="4" width="22" height="8" fill="{colour}" fill-opacity="0.18"/>'
    elif kind == "ring":
        inner = f'<circle cx="12" cy="8" r="4" fill="#fff" stroke="{INK}" stroke-width="1.6"/>'
    else:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        inner = f'<line x1="1" x2="23" y1="8" y2="8" stroke="{colour}" stroke-width="2.4"{d}/>'
    return f'<svg class="swatch" width="24" height="16" viewBox="0 0 24 16" aria-hidden="true">{inner}</svg>'
