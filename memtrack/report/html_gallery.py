"""The report's evidence: reproduced training images (one card each: how many seeds, the first step, the
strongest example beside the training image), identity blends (generated | identity A | identity B) and the
leaked-identities table. The per-seed view is the trajectory map (:mod:`memtrack.report.html_charts`)."""
from __future__ import annotations

import math

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


def reproductions(trajectories: dict | None) -> dict[str, dict]:
    """``{train_id: {"seeds": [...], "first_step": int}}`` from the per-seed trajectories: every seed whose
    sample matched the training image at some checkpoint, and the earliest such step."""
    out: dict[str, dict] = {}
    traj = trajectories or {}
    steps = [int(s) for s in traj.get("steps") or []]
    for seed, cells in zip(traj.get("seeds") or [], traj.get("matches") or []):
        for step, tid in zip(steps, cells):
            if tid is not None:
                r = out.setdefault(str(tid), {"seeds": set(), "first_step": step})
                r["seeds"].add(seed)
                r["first_step"] = min(r["first_step"], step)
    return {t: {"seeds": sorted(r["seeds"]), "first_step": r["first_step"]} for t, r in out.items()}


def margin(item: dict) -> float:
    """How far past its threshold a match is, relative to the threshold -- the order of a checkpoint's
    ``top_matches`` (:mod:`memtrack.metrics`), comparable across detectors; -inf without a usable score."""
    try:
        s, t = float(item.get("score")), float(item.get("threshold"))
    except (TypeError, ValueError):
        return -math.inf
    if not (math.isfinite(s) and math.isfinite(t)) or t == 0:
        return -math.inf
    return (s - t) / abs(t) if item.get("direction") == "above" else (t - s) / abs(t)


def group_matches(items: list[dict], trajectories: dict | None = None) -> list[dict]:
    """The gallery's matches, one group per training image.

    Each group: ``train_id``, ``train_png``, ``best`` (the item furthest past its threshold, :func:`margin`;
    ties go to the earlier item, i.e. the later checkpoint), ``seeds`` and ``first_step`` (over the whole
    run from ``trajectories`` when they know the image -- ``from_trajectories`` -- else over the items),
    ``n_seeds`` and ``n_examples`` (items in the group). Items without a training id get a group each.
    Groups are ordered by ``n_seeds`` (most first), then ``first_step``, then id.

    Example:
        >>> g = group_matches([{"train_id": "cam", "seed": 1, "step": 200, "score": 0.2, "threshold": 0.33},
        ...                    {"train_id": "cam", "seed": 4, "step": 100, "score": 0.1, "threshold": 0.33}])
        >>> g[0]["n_seeds"], g[0]["first_step"], g[0]["best"]["seed"]
        (2, 100, 4)
    """
    runs = reproductions(trajectories)
    by_image: dict[str, list[dict]] = {}
    for i, item in enumerate(items):
        by_image.setdefault(str(item["train_id"]) if item.get("train_id") else f"\0{i}", []).append(item)
    groups = []
    for key, members in by_image.items():
        run = runs.get(key)
        seeds = run["seeds"] if run else sorted({m["seed"] for m in members if m.get("seed") is not None})
        steps = [m["step"] for m in members if m.get("step") is not None]
        groups.append({"train_id": members[0].get("train_id"), "best": max(members, key=margin),
                       "train_png": next((m["train_png"] for m in members if m.get("train_png")), None),
                       "seeds": seeds, "n_seeds": len(seeds), "n_examples": len(members),
                       "first_step": run["first_step"] if run else (min(steps) if steps else None),
                       "from_trajectories": run is not None})
    return sorted(groups, key=lambda g: (-g["n_seeds"], g["first_step"] is None, g["first_step"] or 0,
                                         str(g["train_id"])))


def _seeds_line(group: dict, n_seeds_run: int | None) -> str:
    seeds = group["seeds"]
    shown = ", ".join(str(s) for s in seeds[:12]) + (f", &hellip; ({len(seeds) - 12} more)" if len(seeds) > 12 else "")
    of = f" of {n_seeds_run}" if n_seeds_run and group["from_trajectories"] else ""
    where = "" if group["from_trajectories"] else " among the strongest matches"
    noun = "seed" if len(seeds) == 1 else "seeds"
    return (f'<p class="facts-line"><strong>{len(seeds)}{esc(of)} {noun}</strong>{esc(where)} ({shown}); '
            f'first at step {esc(fmt_step(group["first_step"]))}</p>')


def match_card(summary: dict, group: dict) -> str:
    """One reproduced training image: its best example beside it, how many seeds, since when."""
    item = group["best"]
    tid = group.get("train_id") or "unknown training image"
    pics = (f'<figure>{img(item.get("sample_png"), "best generated sample, seed " + str(item.get("seed")))}'
            f"<figcaption>best example</figcaption></figure>"
            f'<figure>{img(group.get("train_png"), "nearest training image " + str(tid))}'
            f"<figcaption>training: <code>{esc(tid)}</code></figcaption></figure>")
    caption = item.get("caption")
    cap = f'<p class="caption">&ldquo;{esc(caption)}&rdquo;</p>' if caption else ""
    ident = f'<p class="facts-line">identity: {esc(item["identity"])}</p>' if item.get("identity") else ""
    n_run = len((summary.get("trajectories") or {}).get("seeds") or []) or None
    return (f'<figure class="card"><div class="imgs">{pics}</div>{_seeds_line(group, n_run)}'
            f"{_verdict_line(summary, item)}{cap}{ident}</figure>")


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
    groups = group_matches(items, summary.get("trajectories"))
    per_seed = (' The per-seed view is the <a href="#trajectories">trajectory map</a>.'
                if (summary.get("trajectories") or {}).get("seeds") else "")
    intro = (f"<p>{len(groups)} reproduced training image{'s' if len(groups) != 1 else ''}, one card each: how "
             "many seeds reproduced it, the first step at which one did, and its strongest example (furthest past "
             f"its threshold) with the score and the threshold it crossed.{per_seed}</p>")
    return section("matches", "Reproduced training images", intro,
                   f'<div class="cards">{"".join(match_card(summary, g) for g in groups)}</div>')


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
