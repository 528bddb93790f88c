"""The Markdown report, for pull-request comments: a compact table, one chart, the top matches.

Images are written as files next to the ``.md`` (the caller writes the returned text into ``out_dir``);
the chart is a PNG drawn with matplotlib's Agg canvas (no display, no global backend switch). Every
string from data is escaped for both HTML and Markdown, so a caption cannot inject markup or links.

Example:
    >>> text = render_markdown(summary, gallery, Path("report"))
    >>> (Path("report") / "memtrack.md").write_text(text)
"""
from __future__ import annotations

import io
from pathlib import Path

from memtrack.utils import atomic_write_bytes
from memtrack.report.card import card_markdown
from memtrack.report.markup import md
from memtrack.report.html_charts import run_names
from memtrack.report.markup import image_mime
from memtrack.analysis.series import series_lines
from memtrack.report.svg import DASHES, OKABE_ITO
from memtrack.report.text import (changes_sentence, checkpoints, comparison, fmt_ci, fmt_pct, fmt_step, label, na_text,
                   onset_cell, onset_sentences, rate_metrics, recommended_sentence, series, table_metrics)

_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}
_PREFIX = "memtrack-"


def render_markdown(summary: dict, gallery: list[dict], out_dir: Path, *, runs: list[dict] | None = None) -> str:
    """Write the chart and gallery images into ``out_dir`` and return the Markdown that links them.

    Args:
        summary: the run (``summary.json`` schema).
        gallery: strongest matches and blends with image bytes (as for the HTML report).
        out_dir: where the ``.md`` will live; images are written there as ``memtrack-*.png``.
        runs: further summaries to overlay on the chart (``summary`` first).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [summary] + [r for r in (runs or []) if r is not summary]
    cps = checkpoints(summary)
    title = f"### memtrack: {md(summary.get('run') or 'run')}"
    if cps:
        title += f" (step {fmt_step(cps[-1]['step'])}, {len(cps)} checkpoints)"
    parts = [title, "", *_verdict(summary), _latest_table(summary)]
    if len(runs) > 1:
        parts.append(_runs_table(runs))
    chart = write_rates_chart(runs, out_dir / f"{_PREFIX}rates.png")
    if chart:
        parts.append(f"![Rates over training steps with 95% intervals and onsets]({chart})")
    parts.append(_matches(summary, gallery or [], out_dir))
    parts.append(card_markdown(summary))
    return "\n\n".join(p for p in parts if p).replace("\n\n\n", "\n\n").rstrip() + "\n"


def _verdict(summary: dict) -> list[str]:
    sentences = onset_sentences(summary)
    lines = [f"**{md(sentences[0])}**"] if sentences else []
    lines += [md(s) for s in sentences[1:]]
    lines += [md(s) for s in (recommended_sentence(summary), changes_sentence(summary)) if s]
    lines += [md(s) for s in series_lines(summary)]
    return ["  \n".join(lines)] if lines else []


def _latest_table(summary: dict) -> str:
    cps = checkpoints(summary)
    if not cps:
        return ""
    cp, onsets = cps[-1], summary.get("onset") or {}
    rows = ["| metric | flagged | 95% CI | count/n | onset step |", "|---|--:|--:|--:|--:|"]
    for m in table_metrics([summary]):
        b = (cp.get("metrics") or {}).get(m)
        o = onsets.get(m)
        onset = onset_cell(o)
        if b and b.get("applicable") is False:
            rows.append(f"| {md(label(m))} | {md(na_text(b.get('reason')))} | | | n/a |")
        elif b and "rate" in b:
            rows.append(f"| {md(label(m))} | {fmt_pct(b['rate'])} | {fmt_ci(b)} | {b.get('count', '')}/{b.get('n', '')}"
                        f" | {onset} |")
        else:
            rows.append(f"| {md(label(m))} | not measured | | | {onset} |")
    return "\n".join(rows)


def _runs_table(runs: list[dict]) -> str:
    metrics = rate_metrics(runs)
    rows = ["| run | " + " | ".join(md(m) for m in metrics) + " |", "|---|" + "--:|" * len(metrics)]
    for name, run in zip(run_names(runs), runs):
        cells = []
        for m in metrics:
            pts = series(run, m)
            o = ((run.get("onset") or {}).get(m) or {}).get("step")
            cells.append((fmt_pct(pts[-1][1]["rate"]) if pts else "-") + (f" (onset {fmt_step(o)})" if o else ""))
        rows.append(f"| {md(name)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_rates_chart(runs: list[dict], path: Path) -> str | None:
    """Small multiples of every rate over steps (bands = 95% intervals, dashed = onset) as one PNG."""
    metrics = rate_metrics(runs)
    if not metrics:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 2 if len(metrics) > 1 else 1
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4.6 * cols, 2.6 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    names = run_names(runs)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        for i, run in enumerate(runs):
            if len(runs) == 1:
                _plot_run(ax, run, metric, names[i], OKABE_ITO[0], "", onset_colour=OKABE_ITO[1])
            else:
                colour = OKABE_ITO[i % 7]
                _plot_run(ax, run, metric, names[i], colour, DASHES[i % len(DASHES)], onset_colour=colour)
        ax.set_title(_mpl(label(metric)), fontsize=10)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
        if k >= len(metrics) - cols:
            ax.set_xlabel("training step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if len(runs) > 1 and k == 0:
            ax.legend(fontsize=7, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def _mpl(text: str) -> str:
    """Matplotlib reads ``$...$`` as mathtext: show a data string's dollars literally."""
    return text.replace("$", r"\$")


def _plot_run(ax, run: dict, metric: str, name: str, colour: str, dash: str, onset_colour: str) -> None:
    pts = series(run, metric)
    if not pts:
        return
    steps = [s for s, _ in pts]
    ax.fill_between(steps, [b.get("ci_low", b["rate"]) for _, b in pts], [b.get("ci_high", b["rate"]) for _, b in pts],
                    color=colour, alpha=0.15, linewidth=0)
    style = (0, tuple(float(x) for x in dash.split())) if dash else "-"
    ax.plot(steps, [b["rate"] for _, b in pts], color=colour, linestyle=style, marker="o", markersize=3,
            label=_mpl(name))
    onset = ((run.get("onset") or {}).get(metric) or {}).get("step")
    if onset is not None:
        ax.axvline(onset, color=onset_colour, linestyle="--", linewidth=1.2)


def _save_image(data: bytes | None, out_dir: Path, stem: str) -> str | None:
    mime = image_mime(data) if data else None
    if mime is None:
        return None
    name = f"{_PREFIX}{stem}.{_EXT[mime]}"
    atomic_write_bytes(out_dir / name, data)
    return name


def _thumb(name: str | None, alt: str) -> str:
    return f'<img src="{name}" width="96" alt="{md(alt)}">' if name else "(no image)"


def _matches(summary: dict, gallery: list[dict], out_dir: Path) -> str:
    if not gallery:
        return _top_matches_table(summary)
    rows = ["| generated | match | detector | score | step, seed |", "|---|---|---|---|--:|"]
    for i, g in enumerate(gallery, 1):
        gen = _thumb(_save_image(g.get("sample_png"), out_dir, f"match-{i}-generated"), "generated")
        if g.get("blend"):
            b = g["blend"]
            a = _thumb(_save_image(b.get("a_png"), out_dir, f"match-{i}-identity-a"), "identity A")
            bb = _thumb(_save_image(b.get("b_png"), out_dir, f"match-{i}-identity-b"), "identity B")
            match = f"{a} {bb}<br>A: {md(b.get('a', ''))}, B: {md(b.get('b', ''))}"
        else:
            train = _thumb(_save_image(g.get("train_png"), out_dir, f"match-{i}-training"), "training image")
            match = f"{train}<br>{md(g.get('train_id') or '')}"
            if g.get("caption"):
                match += f"<br>*{md(g['caption'])}*"
            if g.get("identity"):
                match += f"<br>identity: {md(g['identity'])}"
        score = comparison(g.get("score"), g.get("threshold"), g.get("direction", "below"))
        rows.append(f"| {gen} | {match} | {md(label(str(g.get('detector', ''))))} | {md(score)} | "
                    f"{fmt_step(g.get('step'))}, {md(g.get('seed'))} |")
    return f"<details><summary>Strongest matches ({len(gallery)})</summary>\n\n" + "\n".join(rows) + "\n\n</details>"


def _top_matches_table(summary: dict) -> str:
    cps = checkpoints(summary)
    top = (cps[-1].get("top_matches") or []) if cps else []
    if not top:
        return ""
    rows = ["| training image | detector | score | seed |", "|---|---|---|--:|"]
    for m in top:
        score = comparison(m.get("score"), m.get("threshold"), m.get("direction", "below"))
        rows.append(f"| {md(m.get('train_id') or '')} | {md(label(str(m.get('detector', ''))))} | {md(score)} | "
                    f"{md(m.get('seed'))} |")
    return "**Top matches at the latest checkpoint**\n\n" + "\n".join(rows)
