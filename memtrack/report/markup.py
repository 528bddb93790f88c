"""HTML building blocks for the report: escaping, tables, sections, embedded images.

Every value that came from data goes through :func:`esc` (quotes included, so it is safe inside
attribute values too); markup this module builds itself is passed on as trusted :class:`Raw` text.
Images are embedded as ``data:`` URIs, so the report never loads anything.
"""
from __future__ import annotations

import base64
import html
import re
import struct
from typing import Iterable, Sequence

from memtrack.report.svg import esc


class Raw(str):
    """Markup built by the renderer itself: :func:`cell` passes it through unescaped."""


def cell(value: object) -> str:
    return value if isinstance(value, Raw) else esc("" if value is None else value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, numeric: Sequence[int] = (),
          caption: str = "") -> Raw:
    """A scrollable table; ``numeric`` columns are right-aligned with tabular figures."""
    head = "".join(f"<th scope=\"col\">{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        tds = "".join(f'<td class="num">{cell(v)}</td>' if i in numeric else f"<td>{cell(v)}</td>"
                      for i, v in enumerate(row))
        body.append(f"<tr>{tds}</tr>")
    cap = f"<caption class=\"sr\">{esc(caption)}</caption>" if caption else ""
    return Raw(f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead>'
               f'<tbody>{"".join(body)}</tbody></table></div>')


def section(anchor: str, title: str, *parts: str) -> Raw:
    body = "".join(p for p in parts if p)
    return Raw(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>') if body else Raw("")


def facts(items: Iterable[tuple[str, object]]) -> Raw:
    """A definition grid of ``(label, value)``; values that are None are left out."""
    rows = "".join(f"<div><dt>{esc(k)}</dt><dd>{cell(v)}</dd></div>" for k, v in items if v not in (None, ""))
    return Raw(f'<dl class="facts">{rows}</dl>') if rows else Raw("")


def badge(text: str) -> Raw:
    """A threshold's source as a badge: published, calibrated, config, memtrack (or an older "default")."""
    kind = text if text in ("default", "calibrated", "published", "config", "memtrack") else "other"
    return Raw(f'<span class="badge {kind}">{esc(text)}</span>')


def image_mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def img(data: bytes | None, alt: str) -> Raw:
    """An ``<img>`` with the bytes as a data URI, or a labelled placeholder when there is no image.

    Small images (the 32-64 px of a demo) are drawn with crisp pixels instead of a blur.
    """
    mime = image_mime(data) if data else None
    if mime is None:
        why = "no image" if not data else "image format not shown"
        return Raw(f'<div class="missing" role="img" aria-label="{esc(alt)}: {why}">{why}</div>')
    size = _png_size(data)
    small = ' class="px"' if size and max(size) < 160 else ""
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    b64 = base64.b64encode(data).decode("ascii")
    return Raw(f'<img{small}{dims} alt="{esc(alt)}" src="data:{mime};base64,{b64}">')


def legend(items: Iterable[tuple[str, str]]) -> Raw:
    """``(swatch markup, label)`` pairs in a wrapping row."""
    spans = "".join(f"<span>{sw}{esc(text)}</span>" for sw, text in items)
    return Raw(f'<div class="legend">{spans}</div>') if spans else Raw("")


def md(text: object) -> str:
    """Escape a data string for Markdown *and* the HTML GitHub allows in it; one line."""
    s = re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", re.sub(r"\s+", " ", str(text)).strip())
    return html.escape(s, quote=True)  # after the backslashes, so entities such as &#x27; stay whole
