"""The words every report format shares: metric labels, number formats, the onset sentence.

Pure: a ``summary`` dict (the ``summary.json`` schema) in, plain strings out. The HTML, Markdown and
terminal renderers all say the same thing the same way because they all say it through here.
"""
from __future__ import annotations

import math
from typing import Iterable

COUNT_LABELS: dict[str, str] = {
    "distinct_train_images": "distinct training images reproduced",
    "distinct_identities": "distinct identities reproduced",
}


def metric_labels() -> dict[str, str]:
    """``{metric: plain words}`` in reading order: each detector's own label, from its registry entry."""
    from memtrack.detectors.registry import metric_labels as registered

    return registered()


def label(metric: str) -> str:
    """``"near-copies (nn_ratio)"``; a metric without a label is named by itself."""
    words = COUNT_LABELS.get(metric) or metric_labels().get(metric)
    if not words:
        from memtrack.detectors.registry import metric_label

        words = metric_label(metric)
    return f"{words} ({metric})" if words else metric


def fmt_step(step: int | None) -> str:
    return "-" if step is None else f"{int(step):,}"


def fmt_pct(x: float | None) -> str:
    """``0.125 -> "12.5%"``; small non-zero rates keep two decimals so they never read as 0."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    pct = 100.0 * x
    if abs(pct - round(pct)) < 1e-9:
        return f"{pct:.0f}%"
    return f"{pct:.2f}%" if pct < 1 else f"{pct:.1f}%"


def fmt_num(x: float | None) -> str:
    """Three significant digits: ``0.3333 -> "0.333"``, ``12.345 -> "12.3"``."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.3g}"


def fmt_ci(block: dict) -> str:
    return f"[{fmt_pct(block.get('ci_low'))}, {fmt_pct(block.get('ci_high'))}]"


def comparison(score: float | None, threshold: float | None, direction: str) -> str:
    """``"0.12 < 0.333"``: the score next to its threshold, the sign saying which side flags."""
    if score is None or threshold is None or not math.isfinite(score):
        return fmt_num(score)
    sign = "<" if direction == "below" else ">"
    if (score < threshold) != (direction == "below") and score != threshold:
        sign = ">=" if direction == "below" else "<="
    return f"{fmt_num(score)} {sign} {fmt_num(threshold)}"


def checkpoints(summary: dict) -> list[dict]:
    """The checkpoints in step order."""
    return sorted(summary.get("checkpoints") or [], key=lambda c: c.get("step", 0))


def rate_metrics(summaries: Iterable[dict]) -> list[str]:
    """Every metric with a rate at some checkpoint of some run: known metrics first, then by name."""
    seen: set[str] = set()
    for s in summaries:
        for cp in s.get("checkpoints") or []:
            seen.update(m for m, b in (cp.get("metrics") or {}).items() if isinstance(b, dict) and "rate" in b)
    known = [m for m in metric_labels() if m in seen]
    return known + sorted(seen - set(known))


def not_applicable(summary: dict) -> dict[str, str]:
    """``{metric: reason}`` for the metrics that are not applicable at the latest checkpoint reporting them
    (a detector outside its regime reports a reason instead of a rate)."""
    out: dict[str, str] = {}
    for cp in checkpoints(summary):
        for m, b in (cp.get("metrics") or {}).items():
            if isinstance(b, dict) and b.get("applicable") is False:
                out[m] = str(b.get("reason") or "outside the detector's regime")
            elif isinstance(b, dict) and "rate" in b:
                out.pop(m, None)
    return out


def table_metrics(summaries: Iterable[dict]) -> list[str]:
    """The rows of a "latest checkpoint" table: every rate metric, then every not-applicable one."""
    summaries = list(summaries)
    rated = rate_metrics(summaries)
    na = {m for s in summaries for m in not_applicable(s)} - set(rated)
    return rated + sorted(na, key=_order)


def na_text(reason: str | None) -> str:
    """How a table cell says "not applicable": ``"n/a: <reason>"``."""
    return f"n/a: {reason}" if reason else "n/a"


def series(summary: dict, metric: str) -> list[tuple[int, dict]]:
    """``[(step, block)]`` for the checkpoints that measured ``metric`` (it may be added mid-run)."""
    out = []
    for cp in checkpoints(summary):
        block = (cp.get("metrics") or {}).get(metric)
        if isinstance(block, dict) and block.get("rate") is not None:
            out.append((int(cp["step"]), block))
    return out


def count_series(summary: dict, name: str) -> list[tuple[int, float]]:
    """``[(step, count)]`` for a derived count such as ``distinct_train_images``."""
    out = []
    for cp in checkpoints(summary):
        value = cp.get(name)
        if value is None:
            value = ((cp.get("metrics") or {}).get(name) or {}).get("count")
        if isinstance(value, (int, float)):
            out.append((int(cp["step"]), value))
    return out


def onset_clause(metric: str, onset: dict, first: bool, first_step: int | None) -> str:
    words = label(metric)
    clause = f"{words[:1].upper() + words[1:]} began at step {fmt_step(onset['step'])}" if first \
        else f"{words} at step {fmt_step(onset['step'])}"
    between = onset.get("between")
    if between and len(between) == 2:
        clause += f" (between {fmt_step(between[0])} and {fmt_step(between[1])})"
    elif first_step is not None and onset["step"] == first_step:
        clause += " (already at the first checkpoint evaluated)"
    if onset.get("confirmed") is False:
        clause += ", not yet confirmed by later checkpoints"
    return clause


def onset_cell(onset: dict | None) -> str:
    """The onset column of a table: the confirmed step, ``provisional <step>``, ``none``, or ``n/a``."""
    if onset is None:
        return ""
    if onset.get("applicable") is False:
        return "n/a"
    if onset.get("step") is not None and onset.get("confirmed", True) is not False:
        return fmt_step(onset["step"])
    prov = (onset.get("provisional") or {}).get("step")
    if prov is None and onset.get("step") is not None:  # an older summary's unconfirmed onset
        prov = onset["step"]
    return f"provisional {fmt_step(prov)}" if prov is not None else "none"


def provisional_sentence(metric: str, prov: dict, persistence) -> str:
    words = label(metric)
    between = prov.get("between")
    where = f" (between {fmt_step(between[0])} and {fmt_step(between[1])})" if between and len(between) == 2 else ""
    k = f"the next {persistence} checkpoints" if persistence else "later checkpoints"
    return (f"{words[:1].upper() + words[1:]} rose at step {fmt_step(prov.get('step'))}{where}: provisional, not an "
            f"onset until {k} confirm it.")


def onset_sentences(summary: dict) -> list[str]:
    """The report's first words, e.g. ``["Near-copies (nn_ratio) began at step 4,500 (between 4,000 and
    4,500); identity leakage (identity_leak) at step 6,000; 3 identities leaked.",
    "No onset detected for tiled near-copies (tiled_l2) through step 6,000."]``."""
    cps = checkpoints(summary)
    first_step = cps[0]["step"] if cps else None
    last_step = cps[-1]["step"] if cps else None
    onsets = summary.get("onset") or {}
    na = {m: (o or {}).get("reason") for m, o in onsets.items() if (o or {}).get("applicable") is False}
    onsets = {m: o for m, o in onsets.items() if m not in na}
    prov = {m: o["provisional"] for m, o in onsets.items() if (o or {}).get("step") is None
            and (o.get("provisional") or {}).get("step") is not None}
    began = sorted(((m, o) for m, o in onsets.items() if o and o.get("step") is not None),
                   key=lambda mo: (mo[1]["step"], _order(mo[0])))
    clean = [m for m in sorted(onsets, key=_order) if (onsets[m] or {}).get("step") is None and m not in prov]
    leaked = ((summary.get("identities") or {}).get("leaked")) or []
    clauses = [onset_clause(m, o, i == 0, first_step) for i, (m, o) in enumerate(began)]
    if leaked:
        clauses.append(f"{len(leaked)} identit{'y' if len(leaked) == 1 else 'ies'} leaked")
    sentences = []
    if clauses:
        text = "; ".join(clauses)
        sentences.append(text[:1].upper() + text[1:] + ".")
    through = f" through step {fmt_step(last_step)}" if last_step is not None else ""
    if clean:
        what = ("any applicable metric" if na else "any metric") if not began else ", ".join(label(m) for m in clean)
        sentences.append(f"No onset detected for {what}{through}.")
    elif not began and not leaked and not na and not prov:
        sentences.append(f"No onset detected{through}." if cps else "No checkpoints evaluated yet.")
    persistence = (summary.get("onset_rule") or {}).get("persistence")
    sentences += [provisional_sentence(m, p, persistence) for m, p in sorted(prov.items(), key=lambda i: _order(i[0]))]
    sentences += transient_sentences(summary, clean)
    sentences += [f"Not applicable here: {label(m)}: {reason}."
                  for m, reason in sorted(na.items(), key=lambda item: _order(item[0]))]
    return sentences


def transient_sentences(summary: dict, metrics: list[str]) -> list[str]:
    """For metrics without an onset that still rose above the baseline somewhere: where, how high, and
    that it fell back -- e.g. blends that appear while a model learns two faces, then give way to copies."""
    base = (summary.get("onset_rule") or {}).get("baseline_rate")
    if base is None:
        return []
    out = []
    for m in metrics:
        above = [(c["step"], c["metrics"][m]) for c in checkpoints(summary)
                 if isinstance((c.get("metrics") or {}).get(m), dict)
                 and isinstance(c["metrics"][m].get("ci_low"), (int, float)) and c["metrics"][m]["ci_low"] > base]
        if not above:
            continue
        peak_step, peak = max(above, key=lambda sm: (sm[1].get("rate") or 0, -sm[0]))
        where = (f"at step {fmt_step(above[0][0])}" if len(above) == 1 else
                 f"at {len(above)} checkpoints between steps {fmt_step(above[0][0])} and {fmt_step(above[-1][0])}")
        name = label(m)
        out.append(f"{name[:1].upper() + name[1:]} rose above {fmt_pct(base)} {where} "
                   f"(peak {fmt_pct(peak.get('rate'))} at step {fmt_step(peak_step)}) but did not stay above it, "
                   "so no onset is declared.")
    return out


def _order(metric: str) -> tuple[int, str]:
    keys = list(metric_labels())
    return (keys.index(metric) if metric in keys else len(keys), metric)


def recommended_sentence(summary: dict) -> str | None:
    rec = summary.get("recommended_checkpoint")
    if not rec:
        return None
    reason = rec.get("reason") or ""
    if rec.get("step") is None:
        return f"No clean checkpoint to recommend{': ' + reason if reason else '.'}"
    return f"Recommended checkpoint: step {fmt_step(rec['step'])}" + (f" ({reason})." if reason else ".")


def changes_sentence(summary: dict) -> str | None:
    ch = summary.get("changes")
    if not ch:
        return None
    new_cps = ch.get("new_checkpoints") or []
    new_onsets = ch.get("new_onsets") or []
    parts = []
    if new_cps:
        parts.append(f"{len(new_cps)} new checkpoint{'s' if len(new_cps) != 1 else ''} "
                     f"(step{'s' if len(new_cps) != 1 else ''} {', '.join(fmt_step(s) for s in new_cps)})")
    if new_onsets:
        parts.append("new onsets: " + ", ".join(label(m) for m in new_onsets))
    since = ch.get("since") or "the last report"
    return f"Since {since}: " + ("; ".join(parts) if parts else "nothing new") + "."
