"""The HTML report: one self-contained file that opens anywhere (an e-mail attachment, a CI artifact).

No network: images are ``data:`` URIs, charts are inline SVG drawn by :mod:`memtrack.report.svg`, the
stylesheet is inline and there is no JavaScript. Every string that came from data is escaped.

Example:
    >>> from memtrack.report.html import render_html
    >>> page = render_html(summary, gallery)                       # one run
    >>> page = render_html(summary_a, [], runs=[summary_a, summary_b])   # runs overlaid
"""
from __future__ import annotations

import statistics

from memtrack.report.card import card_html
from memtrack.report.html_charts import curves_section, distributions_section, run_names, trajectories_section
from memtrack.report.html_gallery import identities_section, matches_section
from memtrack.report.html_probes import probes_section
from memtrack.report.markup import Raw, badge, esc, facts, section, table
from memtrack.analysis.series import series_lines
from memtrack.report.style import CSS
from memtrack.report.text import (changes_sentence, checkpoints, fmt_ci, fmt_num, fmt_pct, fmt_step, label, na_text,
                   onset_cell, onset_sentences, rate_metrics, recommended_sentence, table_metrics)


def render_html(summary: dict, gallery: list[dict], *, runs: list[dict] | None = None) -> str:
    """Render ``summary`` (the ``summary.json`` schema) and its gallery as one HTML page.

    Args:
        summary: the run to report; its header, verdict, galleries and distributions are shown.
        gallery: strongest matches and identity blends, each with its image bytes (see ``markup.img``).
        runs: summaries whose curves are overlaid on the same axes (``summary`` is added first when it is
            not among them). None or a single run gives the one-run report.
    """
    runs = _with_primary(summary, runs)
    sections = [
        ("verdict", _verdict(summary)),
        ("latest", _latest(summary)),
        ("runs", _runs_table(runs) if len(runs) > 1 else ""),
        ("curves", curves_section(runs)),
        ("matches", matches_section(summary, gallery or [])),
        ("identities", identities_section(summary, gallery or [])),
        ("trajectories", trajectories_section(summary)),
        ("probes", probes_section(summary)),
        ("distributions", distributions_section(summary)),
        ("card", card_html(summary)),
        ("setup", _setup(summary)),
    ]
    present = [anchor for anchor, part in sections if part]
    body = _header(summary, runs, present) + "".join(part for _, part in sections) + _footer(summary)
    title = f"memtrack: {summary.get('run') or 'run'}" + (f" and {len(runs) - 1} more" if len(runs) > 1 else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def _with_primary(summary: dict, runs: list[dict] | None) -> list[dict]:
    runs = list(runs or [])
    if not any(r is summary for r in runs):
        runs.insert(0, summary)
    else:
        runs.sort(key=lambda r: r is not summary)
    return runs


def _header(summary: dict, runs: list[dict], present: list[str]) -> Raw:
    cps = checkpoints(summary)
    bits = []
    if cps:
        bits.append(f"{len(cps)} checkpoint{'s' if len(cps) != 1 else ''} up to step {fmt_step(cps[-1]['step'])}")
    if summary.get("generated_at"):
        bits.append(f"generated {summary['generated_at']}")
    if summary.get("memtrack_version"):
        bits.append(f"memtrack {summary['memtrack_version']}")
    title = f"Memorization report: {summary.get('run') or 'unnamed run'}"
    if len(runs) > 1:
        title = "Memorization report: " + " vs ".join(run_names(runs))
    links = "".join(f'<a href="#{a}">{_NAV[a]}</a>' for a in present if a in _NAV)
    return Raw(f'<header><h1 class="wrap">{esc(title)}</h1><p class="meta">{esc(" · ".join(bits))}</p>'
               f'<nav aria-label="sections">{links}</nav></header>')


_NAV = {"verdict": "Summary", "latest": "Latest", "runs": "Runs", "curves": "Curves", "matches": "Matches",
        "identities": "Identities", "trajectories": "Trajectories", "probes": "Probes", "distributions": "Distributions",
        "card": "Detector card", "setup": "Set-up"}


def _verdict(summary: dict) -> Raw:
    sentences = onset_sentences(summary)
    began = any((o or {}).get("step") is not None and (o or {}).get("confirmed", True) is not False
                for o in (summary.get("onset") or {}).values())
    leaked = bool(((summary.get("identities") or {}).get("leaked")))
    cls = "verdict" if began or leaked else "verdict clean"
    body = "".join(f'<p class="lead">{esc(s)}</p>' for s in sentences)
    rec = recommended_sentence(summary)
    if rec:
        body += f'<p class="rec">{esc(rec)}</p>'
    changes = changes_sentence(summary)
    extra = f'<p class="changes">{esc(changes)}</p>' if changes else ""
    extra += "".join(f'<p class="series">{esc(line)}</p>' for line in series_lines(summary))
    return Raw(f'<section id="verdict" aria-label="summary"><div class="{cls}">{body}</div>{extra}</section>')


def _latest(summary: dict) -> Raw:
    """The latest checkpoint's rates next to each metric's onset: the at-a-glance table."""
    cps = checkpoints(summary)
    if not cps:
        return Raw("")
    cp = cps[-1]
    metrics, onsets = cp.get("metrics") or {}, summary.get("onset") or {}
    rows = []
    for m in table_metrics([summary]):
        b = metrics.get(m)
        onset = onset_cell(onsets.get(m))
        if b and b.get("applicable") is False:
            rows.append([label(m), na_text(b.get("reason")), "", "", "n/a"])
        elif b and "rate" in b:
            rows.append([label(m), fmt_pct(b["rate"]), fmt_ci(b), f"{b.get('count', '')}/{b.get('n', '')}", onset])
        else:
            rows.append([label(m), "not measured", "", "", onset])
    distinct = cp.get("distinct_train_images")
    note = (f"<p>{esc(f'{distinct} distinct training image' + ('s' if distinct != 1 else '') + ' reproduced')} "
            f"at this checkpoint.</p>") if isinstance(distinct, int) else ""
    head = (f"<p>Step {esc(fmt_step(cp['step']))}, {esc(cp.get('n_samples', '?'))} samples"
            + (f", weights {esc(cp['weights'])}" if cp.get("weights") else "") + ".</p>")
    return section("latest", "Latest checkpoint", head,
                   table(["metric", "flagged", "95% CI", "count/n", "onset step"], rows, numeric=(1, 2, 3, 4)), note)


def _runs_table(runs: list[dict]) -> Raw:
    metrics = rate_metrics(runs)
    rows = []
    for name, run in zip(run_names(runs), runs):
        cps = checkpoints(run)
        last = cps[-1] if cps else {}
        onsets = run.get("onset") or {}
        row = [name, fmt_step(last.get("step"))]
        for m in metrics:
            b = (last.get("metrics") or {}).get(m)
            o = (onsets.get(m) or {}).get("step")
            cell = fmt_pct(b["rate"]) if b and "rate" in b else "-"
            row.append(cell + (f" (onset {fmt_step(o)})" if o is not None else ""))
        rows.append(row)
    return section("runs", "Runs compared", "<p>Latest rate per metric, with the onset step where one was found.</p>",
                   table(["run", "latest step"] + metrics, rows, numeric=range(1, len(metrics) + 2)))


def _setup(summary: dict) -> Raw:
    ds, model, index = summary.get("dataset") or {}, summary.get("model") or {}, summary.get("index") or {}
    n_train = ds.get("n_train", index.get("n_train"))
    data_line = None
    if ds or n_train is not None:
        data_line = (f"{ds.get('root', '')} · {n_train if n_train is not None else '?'} images"
                     + (f" ({ds['n_skipped']} skipped)" if ds.get("n_skipped") else "")
                     + (f" · {ds['layout']}" if ds.get("layout") else ""))
    model_line = " · ".join(f"{k}: {v}" for k, v in model.items() if isinstance(v, (str, int, float)))
    grid = facts([("run", summary.get("run")), ("dataset", data_line), ("model", model_line or None),
                  ("index", f"{index.get('path', '')} · {index.get('n_train', '?')} training images"
                   if index else None),
                  ("training transform", _transform_line(index)),
                  ("sampling", _pairs(summary.get("sampling"))), ("onset rule", _onset_rule(summary)),
                  ("evaluation time", _eval_time(summary))])
    return section("setup", "Set-up", grid, _spaces_table(index), _thresholds_table(summary), _skipped(summary))


def _transform_line(index: dict) -> str | None:
    """The run's training transform as read (each value with its source) and what the index assumes."""
    t = index.get("training_transform") or {}
    if not t:
        return None
    run = t.get("run") or {}
    parts = [f"{k} {v.get('value')} ({v.get('source')})" for k, v in run.items() if isinstance(v, dict)]
    if t.get("unknown"):
        parts.append(f"not stated by the run: {', '.join(t['unknown'])} (the index's assumed)")
    return " · ".join(parts) or None


def _eval_time(summary: dict) -> str | None:
    """Median seconds per checkpoint evaluation, and where they went (stages by median, largest first)."""
    cps = [c for c in summary.get("checkpoints") or [] if isinstance(c.get("duration_s"), (int, float))]
    if not cps:
        return None
    stages: dict[str, list] = {}
    for c in cps:
        for name, sec in (c.get("timings") or {}).items():
            if isinstance(sec, (int, float)):
                stages.setdefault(name, []).append(float(sec))
    parts = sorted(((statistics.median(v), k) for k, v in stages.items()), reverse=True)
    detail = " · ".join(f"{k} {v:.1f} s" for v, k in parts)
    total = statistics.median(float(c["duration_s"]) for c in cps)
    return f"{total:.1f} s per checkpoint (median of {len(cps)})" + (f": {detail}" if detail else "")


def _pairs(block: dict | None) -> str | None:
    if not block:
        return None
    return " · ".join(f"{k}: {v}" for k, v in block.items() if isinstance(v, (str, int, float)) and v is not None)


def _onset_rule(summary: dict) -> str | None:
    rule = summary.get("onset_rule")
    if not rule or rule.get("baseline_rate") is None:
        return None
    return (f"first checkpoint whose {rule.get('interval', '95% Wilson lower bound')} exceeds "
            f"{fmt_pct(rule['baseline_rate'])} and stays above it for the next {rule.get('persistence', '?')} "
            "checkpoints")


def _skipped(summary: dict) -> Raw:
    skipped = summary.get("skipped") or []
    if not skipped:
        return Raw("")
    rows = [[fmt_step(s.get("step")), s.get("checkpoint", ""), s.get("reason", "")] for s in skipped]
    return Raw(f"<h3>Skipped checkpoints ({len(skipped)})</h3>" + table(["step", "checkpoint", "reason"], rows,
                                                                        numeric=(0,)))


def _spaces_table(index: dict) -> Raw:
    spaces = index.get("spaces") or {}
    if not spaces:
        return Raw("")
    rows = []
    for space, sp in spaces.items():
        recall, second = sp.get("recall_at_k"), sp.get("recall_2nd")
        rows.append([space, sp.get("name", ""), sp.get("metric", ""), sp.get("dim", ""), sp.get("index_type", ""),
                     "not measured" if recall is None else fmt_pct(recall),
                     "" if second is None else fmt_pct(second), _fingerprint(sp)])
    return Raw("<h3>Index</h3>" + table(["space", "embedder", "metric", "dim", "index", "recall@k",
                                         "2nd-neighbour recall", "fingerprint"], rows, numeric=(3, 5, 6)))


def _fingerprint(space: dict) -> str:
    """What identifies the embedder beyond name, metric and dim (weights hash, preprocessing, ...)."""
    if isinstance(space.get("fingerprint"), str):
        return space["fingerprint"]
    shown = {"name", "metric", "dim", "index_type", "n_vectors", "recall_at_k", "fingerprint", "recall_2nd",
             "recall_2nd_measured", "index_kind", "views"}
    return " · ".join(f"{k}: {_short(v)}" for k, v in space.items()
                      if k not in shown and isinstance(v, (str, int, float)) and v is not None)


def _short(value: object) -> object:
    """A long hex digest shortened to 12 characters: enough to compare, short enough to read."""
    if isinstance(value, str) and len(value) >= 32 and all(c in "0123456789abcdef" for c in value.lower()):
        return value[:12] + "…"
    return value


def _thresholds_table(summary: dict) -> Raw:
    """The detector cards: threshold, its source (published / calibrated / config / memtrack), citation, and
    the regime the definition holds in -- with the reason where a detector was not applicable."""
    ths = summary.get("thresholds") or {}
    if not ths:
        return Raw("")
    rows = []
    for det, th in ths.items():
        sign = "<" if th.get("direction", "below") == "below" else ">"
        flagged = f"score {sign} {fmt_num(th.get('value'))}" if th.get("value") is not None else "n/a"
        cite = " — ".join(x for x in (th.get("citation"), th.get("detail")) if x)
        regime = th.get("regime", "")
        if th.get("applicable") is False:
            regime = (regime + "; " if regime else "") + na_text(th.get("reason"))
        rows.append([label(det), flagged, badge(th["source"]) if th.get("source") else "", cite, regime])
    return Raw("<h3>Detectors and thresholds</h3>"
               + table(["detector", "flagged when", "source", "citation", "regime"], rows))


def _footer(summary: dict) -> Raw:
    return Raw("<footer><p>Rates are the share of generated samples a detector flags, with 95% Wilson score "
               "intervals. This file is self-contained: it loads nothing from the network.</p>"
               f"<p>{esc(summary.get('memtrack_version') and 'memtrack ' + summary['memtrack_version'] or 'memtrack')}"
               "</p></footer>")
