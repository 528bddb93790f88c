"""The terminal view: the latest checkpoint's rates and every onset as a plain-text table.

Used by ``memtrack status RUN`` and at the end of ``memtrack report``. Control characters from data (an
escape sequence in a run name) are shown as ``?`` so a hostile name cannot drive the terminal.

Example:
    >>> print(render_table(summary))
    run my-run: step 8,000 (64 samples, unet_ema), 16 checkpoints
    metric                            flagged  95% CI          count/n  onset
    near-copies (nn_ratio)              28.1%  [18.6%, 40.1%]    18/64  step 4,500 (4,000-4,500)
    semantic copies (clip_copy)            0%      [0%, 5.7%]     0/64  none
    ...
"""
from __future__ import annotations

import unicodedata

from memtrack.analysis.series import series_lines
from memtrack.report.text import (changes_sentence, checkpoints, fmt_ci, fmt_pct, fmt_step, label, na_text, onset_cell,
                   onset_sentences, recommended_sentence, table_metrics)

_HEADERS = ("metric", "flagged", "95% CI", "count/n", "onset")
_RIGHT = {1, 2, 3}


def render_table(summary: dict) -> str:
    """The latest checkpoint's rate, 95% Wilson interval and count/n per metric, with each onset."""
    cps = checkpoints(summary)
    run = summary.get("run") or "unnamed run"
    if not cps:
        return f"run {run}: no checkpoints evaluated yet."
    cp = cps[-1]
    head = (f"run {run}: step {fmt_step(cp['step'])} ({cp.get('n_samples', '?')} samples"
            + (f", {cp['weights']}" if cp.get("weights") else "") + f"), {len(cps)} checkpoint"
            + ("s" if len(cps) != 1 else ""))
    rows = [_row(m, (cp.get("metrics") or {}).get(m), (summary.get("onset") or {}).get(m))
            for m in table_metrics([summary])]
    lines = [head, *_grid(rows)] if rows else [head, "no metrics recorded."]
    distinct = cp.get("distinct_train_images")
    if isinstance(distinct, int):
        lines.append(f"distinct training images reproduced: {distinct}")
    lines.append("")
    lines.extend(onset_sentences(summary))
    for extra in (recommended_sentence(summary), changes_sentence(summary)):
        if extra:
            lines.append(extra)
    lines.extend(series_lines(summary))
    return "\n".join(_printable(line) for line in lines)


def _row(metric: str, block: dict | None, onset: dict | None) -> tuple[str, ...]:
    if onset and onset.get("step") is not None and onset.get("confirmed", True) is not False:
        between = onset.get("between")
        when = f"step {fmt_step(onset['step'])}" + (
            f" ({fmt_step(between[0])}-{fmt_step(between[1])})" if between and len(between) == 2 else "")
    else:
        when = onset_cell(onset)
    if block and block.get("applicable") is False:
        return (label(metric), na_text(block.get("reason")), "", "", "n/a")
    if not block or "rate" not in block:
        return (label(metric), "not measured", "", "", when)
    count = f"{block['count']}/{block['n']}" if "count" in block and "n" in block else ""
    return (label(metric), fmt_pct(block["rate"]), fmt_ci(block), count, when)


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    table = [_HEADERS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_HEADERS))]
    out = []
    for r in table:
        cells = [r[i].rjust(widths[i]) if i in _RIGHT and r is not _HEADERS else r[i].ljust(widths[i])
                 for i in range(len(r))]
        out.append("  ".join(cells).rstrip())
    return out


def _printable(text: str) -> str:
    return "".join("?" if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in text)
