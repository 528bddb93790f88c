"""The report's evidence: strongest matches (generated | nearest training image), identity blends
(generated | identity A | identity B) and the leaked-identities table."""
from __future__ import annotations

from memtrack.report.markup import Raw, badge, esc, img, section, table
from memtrack.report.text import checkpoints, comparison, fmt_step, label


def _threshold_source(summary: dict, detector: str) -> Raw | str:
    th = (summary.get("thresholds") or {}).get(detector) or {}
    return badge(th["source"]) if th.get("source") else ""


def _verdict_line(summary: dict, item: dict) -> str:
    det = str(item.get("detector", ""))
    th = (summary.get("thresholds") or {}).get(det) or {}
    direction = item.get("direction") or th.get("direction") or "below"
    cmp = comparison(item.get("score"), item.get("threshold", th.get("value")), direction)
    where = f"step {fmt_step(item.get('step'))}, seed {item.get('seed')}"
    return (f'<p class="facts-line"><strong>{esc(label(det))}</strong>: {esc(cmp)} '
            f'{_threshold_source(summary, det)}<br>{esc(where)}</p>')


def match_card(summary: dict, item: dict) -> str:
    tid = item.get("train_id") or "unknown training image"
    pics = (f'<figure>{img(item.get("sample_png"), "generated sample, seed " + str(item.get("seed")))}'
            f"<figcaption>generated</figcaption></figure>"
            f'<figure>{img(item.get("train_png"), "nearest training image " + str(tid))}'
            f"<figcaption>training: <code>{esc(tid)}</code></figcaption></figure>")
    caption = item.get("caption")
    cap = f'<p class="caption">&ldquo;{esc(caption)}&rdquo;</p>' if caption else ""
    ident = f'<p class="facts-line">identity: {esc(item["identity"])}</p>' if item.get("identity") else ""
    return (f'<figure class="card"><div class="imgs">{pics}</div>{_verdict_line(summary, item)}'
            f"{cap}{ident}</figure>")


def blend_card(summary: dict, item: dict) -> str:
    b = item["blend"]
    a_name, b_name = str(b.get("a", "identity A")), str(b.get("b", "identity B"))
    pics = (f'<figure>{img(item.get("sample_png"), "generated sample, seed " + str(item.get("seed")))}'
            f"<figcaption>generated</figcaption></figure>"
            f'<figure>{img(b.get("a_png"), "identity A: " + a_name)}<figcaption>A: {esc(a_name)}</figcaption></figure>'
            f'<figure>{img(b.get("b_png"), "identity B: " + b_name)}<figcaption>B: {esc(b_name)}</figcaption></figure>')
    return f'<figure class="card"><div class="imgs three">{pics}</div>{_verdict_line(summary, item)}</figure>'


def matches_section(summary: dict, gallery: list[dict]) -> Raw:
    items = [g for g in gallery if not g.get("blend")]
    if not items:
        return top_matches_table(summary)
    intro = ("<p>The strongest flagged matches: each generated sample beside the training image it is closest "
             "to, with the score and the threshold it crossed.</p>")
    return section("matches", "Strongest matches", intro,
                   f'<div class="cards">{"".join(match_card(summary, g) for g in items)}</div>')


def top_matches_table(summary: dict) -> Raw:
    """Without a gallery, the latest checkpoint's strongest matches as a table (no images)."""
    cps = checkpoints(summary)
    top = (cps[-1].get("top_matches") or []) if cps else []
    if not top:
        return Raw("")
    rows = [[m.get("train_id") or "", label(str(m.get("detector", ""))),
             comparison(m.get("score"), m.get("threshold"), m.get("direction", "below")), m.get("seed", "")]
            for m in top]
    return section("matches", "Strongest matches",
                   f"<p>At step {esc(fmt_step(cps[-1]['step']))} (no images were provided).</p>",
                   table(["training image", "detector", "score", "seed"], rows, numeric=(3,)))


def identities_section(summary: dict, gallery: list[dict]) -> Raw:
    leaked = ((summary.get("identities") or {}).get("leaked")) or []
    blends = [g for g in gallery if g.get("blend")]
    parts = []
    if leaked:
        rows = sorted(leaked, key=lambda r: (r.get("first_step") is None, r.get("first_step") or 0,
                                             str(r.get("identity"))))
        parts.append(f"<h3>Leaked identities ({len(leaked)})</h3>")
        parts.append(table(["identity", "first step", "samples at the latest checkpoint"],
                           [[r.get("identity"), fmt_step(r.get("first_step")), r.get("count", "")] for r in rows],
                           numeric=(1, 2)))
    if blends:
        parts.append("<h3>Identity blends</h3><p>Generated faces that resemble two training identities at once.</p>")
        parts.append(f'<div class="cards">{"".join(blend_card(summary, g) for g in blends)}</div>')
    return section("identities", "Identities", *parts)
