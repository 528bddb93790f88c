"""The report's figures: metric curves (one run or several overlaid), the per-seed trajectory heat map,
the train->train baseline and the identity calibration distributions."""
from __future__ import annotations

from collections import Counter

from memtrack.report import svg
from memtrack.report.markup import Raw, badge, esc, legend, section, table
from memtrack.report.text import (COUNT_LABELS, checkpoints, count_series, fmt_ci, fmt_num, fmt_pct,
                   fmt_step, label, rate_metrics, series)


def run_names(runs: list[dict]) -> list[str]:
    """Legend names: the run names, numbered when two runs share one."""
    names = [str(r.get("run") or f"run {i + 1}") for i, r in enumerate(runs)]
    dup = {n for n, c in Counter(names).items() if c > 1}
    return [f"{n} ({i + 1})" if n in dup else n for i, n in enumerate(names)]


def _style(i: int, n_runs: int) -> tuple[str, str]:
    """Colour and dash of run i: colour alone never carries the distinction."""
    if n_runs == 1:
        return svg.OKABE_ITO[0], ""
    return svg.OKABE_ITO[i % 7], svg.DASHES[i % len(svg.DASHES)]


def _rate_series(run: dict, metric: str, name: str, colour: str, dash: str,
                 onset_colour: str | None = None) -> svg.Series | None:
    pts = series(run, metric)
    if not pts:
        return None
    onset = ((run.get("onset") or {}).get(metric) or {})
    tips = [f"{name} - step {fmt_step(s)}: {fmt_pct(b['rate'])} {fmt_ci(b)}"
            + (f", {b['count']}/{b['n']}" if "count" in b and "n" in b else "") for s, b in pts]
    return svg.Series(name, [(s, b["rate"], b.get("ci_low"), b.get("ci_high")) for s, b in pts], colour, dash,
                      onset.get("step"), onset.get("between"), tips, onset_colour=onset_colour,
                      onset_tentative=onset.get("confirmed") is False)


def _threshold_note(summary: dict, metric: str) -> str:
    th = (summary.get("thresholds") or {}).get(metric)
    if not th or th.get("value") is None:
        return ""
    sign = "<" if th.get("direction", "below") == "below" else ">"
    src = th.get("source") or "default"
    cite = f", {th['citation']}" if th.get("citation") else ""
    return f"flagged when {metric} {sign} {fmt_num(th['value'])} ({src}{cite})"


def metric_figure(runs: list[dict], metric: str) -> Raw:
    names = run_names(runs)
    lines = []
    for i, (run, name) in enumerate(zip(runs, names)):
        onset_colour = svg.OKABE_ITO[1] if len(runs) == 1 else None  # one run: vermillion marks the onset
        s = _rate_series(run, metric, name, *_style(i, len(runs)), onset_colour=onset_colour)
        if s is not None:
            if len(runs) > 1:  # overlapping bands and onset windows would turn to mud
                s.band_opacity, s.onset_between = 0.08, None
            lines.append(s)
    if not lines:
        return Raw("")
    last_step, last = series(runs[0], metric)[-1] if series(runs[0], metric) else (None, None)
    desc = (f"{label(metric)} over training steps" +
            (f"; latest {fmt_pct(last['rate'])} at step {fmt_step(last_step)}" if last else ""))
    chart = svg.line_chart(lines, title=f"{label(metric)}: share of samples flagged", desc=desc)
    notes = [n for n in (_threshold_note(runs[0], metric),) if n]
    if len(runs) == 1 and last:
        notes.insert(0, f"latest {fmt_pct(last['rate'])} {fmt_ci(last)} at step {fmt_step(last_step)}")
    key = legend((svg.swatch(s.colour, s.dash), s.label) for s in lines) if len(runs) > 1 else ""
    cap = f"<figcaption>{esc('; '.join(notes))}</figcaption>" if notes else ""
    return Raw(f'<figure class="metric" data-metric="{esc(metric)}"><h3>{esc(label(metric))}</h3>'
               f"{chart}{key}{cap}</figure>")


def count_figure(runs: list[dict], name: str) -> Raw:
    names = run_names(runs)
    lines = []
    for i, (run, rname) in enumerate(zip(runs, names)):
        pts = count_series(run, name)
        if pts:
            colour, dash = _style(i, len(runs))
            lines.append(svg.Series(rname, [(s, v, None, None) for s, v in pts], colour, dash,
                                    tips=[f"{rname} - step {fmt_step(s)}: {v:g}" for s, v in pts]))
    if not lines:
        return Raw("")
    chart = svg.line_chart(lines, title=label(name), percent=False)
    key = legend((svg.swatch(s.colour, s.dash), s.label) for s in lines) if len(runs) > 1 else ""
    return Raw(f'<figure class="metric" data-metric="{esc(name)}"><h3>{esc(label(name))}</h3>{chart}{key}</figure>')


def curves_section(runs: list[dict]) -> Raw:
    metrics = rate_metrics(runs)
    figs = [metric_figure(runs, m) for m in metrics] + [count_figure(runs, n) for n in COUNT_LABELS]
    figs = [f for f in figs if f]
    if not figs:
        return Raw("")
    c = svg.OKABE_ITO[0] if len(runs) == 1 else svg.MUTED
    o = svg.OKABE_ITO[1] if len(runs) == 1 else svg.MUTED
    any_onset = any((o or {}).get("step") is not None for r in runs for o in (r.get("onset") or {}).values())
    key = legend([(svg.swatch(c), "share of samples flagged" if len(runs) == 1 else "rate (one line per run)"),
                  (svg.swatch(c, kind="band"), "95% Wilson interval")]
                 + ([(svg.swatch(o, "5 3"), "onset")] if any_onset else [])
                 + ([(svg.swatch(o, kind="band"), "between the last clean and the first flagged checkpoint")]
                    if any_onset and len(runs) == 1 else []))
    runs_key = ""
    if len(runs) > 1:
        runs_key = legend((svg.swatch(*_style(i, len(runs))), n) for i, n in enumerate(run_names(runs)))
        runs_key = Raw(f"<p><strong>Runs compared:</strong></p>{runs_key}")
    return section("curves", "Metrics over training", runs_key, key, f'<div class="grid">{"".join(figs)}</div>',
                   rates_table(runs[0]))


def rates_table(summary: dict) -> Raw:
    """Every checkpoint's rates, for readers who want the numbers behind the curves."""
    metrics = rate_metrics([summary])
    cps = checkpoints(summary)
    if not metrics or not cps:
        return Raw("")
    rows = []
    for cp in cps:
        ms = cp.get("metrics") or {}
        rows.append([fmt_step(cp["step"]), cp.get("n_samples", "")] +
                    [_rate_cell(ms.get(m)) for m in metrics])
    t = table(["step", "samples"] + metrics, rows, numeric=range(0, len(metrics) + 2))
    return Raw(f"<details><summary>Rates at every checkpoint ({len(cps)})</summary>{t}</details>")


def _rate_cell(block: dict | None) -> str:
    if isinstance(block, dict) and "rate" in block:
        return f"{fmt_pct(block['rate'])} {fmt_ci(block)}"
    return "n/a" if isinstance(block, dict) and block.get("applicable") is False else "not measured"


def trajectories_section(summary: dict, max_rows: int = 80) -> Raw:
    traj = summary.get("trajectories")
    if not traj or not traj.get("steps") or not traj.get("seeds"):
        return Raw("")
    steps = [int(s) for s in traj["steps"]]
    locked = traj.get("locked_step") or [None] * len(traj["seeds"])
    rows = []
    for seed, cells, lock in zip(traj["seeds"], traj.get("matches") or [], locked):
        cells = [None if c is None else str(c) for c in cells][:len(steps)]
        if any(c is not None for c in cells):
            first = next(j for j, c in enumerate(cells) if c is not None)
            col = steps.index(int(lock)) if lock is not None and int(lock) in steps else None
            rows.append((col if col is not None else len(steps), first, f"seed {seed}", cells, col))
    n_seeds = len(traj["seeds"])
    if not rows:
        return section("trajectories", "Per-seed trajectories",
                       f"<p>None of the {n_seeds} seeds matched a training image at any checkpoint.</p>")
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    shown = rows[:max_rows]
    freq = Counter(c for r in shown for c in r[3] if c is not None)
    palette = svg.OKABE_ITO[:7]
    colours = {tid: palette[i] for i, (tid, _) in enumerate(freq.most_common(len(palette)))}
    chart = svg.heatmap([(r[2], r[3], r[4]) for r in shown], [fmt_step(s) for s in steps], colours,
                        title="Per-seed trajectories: matched training image by seed and step",
                        desc=f"{len(rows)} of {n_seeds} seeds matched a training image at some checkpoint")
    items = [(svg.swatch(c, kind="square"), f"{tid} ({freq[tid]} cells)") for tid, c in colours.items()]
    if len(freq) > len(colours):
        items.append((svg.swatch("#8a8a8a", kind="square"), f"{len(freq) - len(colours)} other training images"))
    items += [(svg.swatch("#ffffff", kind="square"), "no match"), (svg.swatch("", kind="ring"), "locked on")]
    intro = (f"<p>Each row is one seed (the same starting noise at every checkpoint); colour is the training "
             f"image it matched. {len(rows)} of {n_seeds} seeds matched at some checkpoint"
             + (f"; the first {max_rows} are shown" if len(rows) > max_rows else "")
             + ". Hover a cell for the file name.</p>")
    return section("trajectories", "Per-seed trajectories", intro, legend(items),
                   f'<figure class="heat">{chart}</figure>')


def baseline_part(summary: dict) -> tuple[list[str], Raw]:
    """The baseline histograms (where values are stored) and the percentile table of every space."""
    base = summary.get("baseline") or {}
    if not base:
        return [], Raw("")
    figs, rows = [], []
    for space, b in base.items():
        rows.append([space, b.get("n")] + [fmt_num(b.get(k)) for k in ("mean", "p50", "p75", "p90", "p95", "p99")])
        if b.get("values"):
            marks = [(b[k], f"{k} {fmt_num(b[k])}") for k in ("p50", "p95") if b.get(k) is not None]
            chart = svg.histogram([svg.Distribution(f"{space} train->train", b["values"], svg.OKABE_ITO[2])],
                                  title=f"{space}: distance from each training image to its nearest other one",
                                  xlabel=f"nearest-neighbour distance ({space})", markers=marks)
            figs.append(f'<figure class="dist"><h3>Train &rarr; train: {esc(space)}</h3>{chart}<figcaption>each '
                        "training image's distance to its nearest other training image</figcaption></figure>")
    return figs, Raw("<h3>Train &rarr; train baseline</h3><p>How close training images are to each other: the "
                     "reference for calling a generated sample a copy.</p>" +
                     table(["space", "n", "mean", "p50", "p75", "p90", "p95", "p99"], rows, numeric=range(1, 8)))


def calibration_part(summary: dict) -> Raw:
    cal = (summary.get("identities") or {}).get("calibration")
    if not cal or not (cal.get("genuine") or cal.get("impostor")):
        return Raw("")
    dists = [svg.Distribution("same identity (genuine)", cal.get("genuine") or [], svg.OKABE_ITO[0]),
             svg.Distribution("different identities (impostor)", cal.get("impostor") or [], svg.OKABE_ITO[4])]
    thr = cal.get("threshold")
    marks = [(thr, f"threshold {fmt_num(thr)}")] if thr is not None else []
    chart = svg.histogram(dists, title="Identity calibration: genuine vs impostor pair distances",
                          xlabel="face embedding distance", markers=marks)
    key = legend([(svg.swatch(d.colour, kind="band"), f"{d.label}, {len(d.values)} pairs") for d in dists]
                 + ([(svg.swatch(svg.INK, "5 3"), "threshold")] if marks else []))
    far = f"; false-accept rate {fmt_pct(cal['far'])}" if cal.get("far") is not None else ""
    src = badge(cal["source"]) if cal.get("source") else ""
    return Raw(f"<figure class=\"dist\"><h3>Identity calibration</h3>{chart}{key}<figcaption>threshold "
               f"{esc(fmt_num(thr))} {src}{esc(far)}</figcaption></figure>")


def distributions_section(summary: dict) -> Raw:
    figs, base_table = baseline_part(summary)
    figs = figs + [f for f in (calibration_part(summary),) if f]
    grid = f'<div class="grid">{"".join(figs)}</div>' if figs else ""
    return section("distributions", "Reference distributions", grid, base_table)
