"""Report sections for the sampling-free probes (loss gap, noise magnitude) and for *which* training images
were reproduced (first step, near-duplicates, simplicity)."""
from __future__ import annotations

from memtrack.report import svg
from memtrack.report.markup import Raw, esc, legend, section, table
from memtrack.report.text import fmt_num, fmt_step


def _gap_figure(summary: dict) -> str:
    gap = summary.get("loss_gap")
    if not gap:
        return ""
    on = gap.get("onset") or {}
    series = [svg.Series("held-out - train loss", [(s, g, None, None) for s, g in zip(gap["steps"], gap["gap_mean"])],
                         svg.OKABE_ITO[0], onset=on.get("step"), onset_between=on.get("between"),
                         onset_colour=svg.OKABE_ITO[1], onset_tentative=not on.get("confirmed", True),
                         tips=[f"step {fmt_step(s)}: gap {fmt_num(g)}" for s, g in zip(gap["steps"], gap["gap_mean"])])]
    chart = svg.line_chart(series, title="Loss gap: held-out minus training denoising loss", percent=False,
                           desc="the held-out loss departs from the training loss when the model starts to memorize")
    sampled = {m: (o or {}).get("step") for m, o in (summary.get("onset") or {}).items()}
    rows = [["loss gap (probe, no sampling)", fmt_step(on.get("step")) if on.get("step") is not None else "none"]]
    rows += [[f"{m} (sampled)", fmt_step(s) if s is not None else "none"] for m, s in sampled.items()]
    return (f'<figure class="metric"><h3>Loss gap</h3>{chart}<figcaption>{esc(on.get("rule", ""))}; '
            f'{esc(gap.get("citation", ""))}</figcaption></figure>'
            + f"<h3>Onsets side by side</h3>{table(['signal', 'onset step'], rows, numeric=(1,))}")


def _noise_part(summary: dict) -> str:
    nm = summary.get("noise_magnitude")
    if not nm:
        return ""
    series = [svg.Series(name, [(s, v, None, None) for s, v in zip(nm["steps"], nm[key])], colour)
              for name, key, colour in (("median", "p50", svg.OKABE_ITO[0]), ("95th percentile", "p95", svg.OKABE_ITO[2]),
                                        ("max", "max", svg.OKABE_ITO[1]))]
    chart = svg.line_chart(series, title="Text-conditional noise magnitude per prompt", percent=False)
    key = legend((svg.swatch(s.colour), s.label) for s in series)
    top = table(["rank", "prompt (latest checkpoint)", "magnitude"],
                [[t["rank"], t["prompt"], fmt_num(t["magnitude"])] for t in nm.get("top_latest", [])], numeric=(0, 2))
    return (f'<figure class="metric"><h3>Noise magnitude</h3>{chart}{key}<figcaption>high values mark memorized '
            f'prompts; {esc(nm.get("citation", ""))}</figcaption></figure><h3>Top-ranked prompts</h3>{top}')


def _which_part(summary: dict, max_rows: int = 30) -> str:
    wi = summary.get("which_images")
    if not wi:
        return ""
    rep = [m for m in wi["images"] if m.get("reproduced")]
    if not rep:
        return ""
    rows = [[m["train_id"], fmt_step(m["first_step"]), m["n_seeds"], m["near_duplicates"],
             fmt_num(m["bytes_per_pixel"]), m["risk_rank"]] for m in rep[:max_rows]]
    s = wi.get("summary", {})
    note = ("Duplicated and simple images are reported to be memorized first (Carlini et al. 2023; Somepalli et "
            "al. 2023); near-duplicates are other training images within the near-duplicate distance (1/3 of the "
            "median train-to-train nearest-neighbour distance), simplicity is the PNG size in bytes per pixel "
            "(lower is simpler).")
    extra = ""
    if s.get("reproduced", {}).get("n") is not None:
        extra = f" Reproduced: {s['reproduced']['n']}; never reproduced: {s.get('not_reproduced', {}).get('n', 0)}."
    return (f"<h3>Which training images were reproduced</h3><p>{esc(note + extra)}</p>"
            + table(["training image", "first step", "seeds", "near-duplicates", "bytes / pixel", "risk rank"],
                    rows, numeric=(1, 2, 3, 4, 5)))


def probes_section(summary: dict) -> Raw:
    parts = [p for p in (_gap_figure(summary), _noise_part(summary), _which_part(summary)) if p]
    if not parts:
        return Raw("")
    return section("probes", "Early warnings and reproduced images", *parts)
