"""The detector card in a report: what each detector the run used can and cannot see.

The card is measured by ``benchmarks/detector_card.py`` on labelled real images (exact copies, flips,
crops, shifts, JPEG, noise, colour jitter, duplicated training images, blends, novel images, augmented
faces, morphs, other people; see :mod:`memtrack.card.cases`) through the same ``Tracker.assess`` path a
scan uses, and shipped with the package as ``detector_card.json`` beside this module. A summary may carry
its own card (``summary["detector_card"]``, same schema), which then takes precedence. Nothing here opens
an index or a model: the report reads summary.json and package data only.

Pure functions: dicts in, strings out. :func:`card_html` and :func:`card_markdown` escape every string that
came from data (:func:`memtrack.report.markup.esc`, :func:`memtrack.report.markup.md`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

from memtrack.utils import get_logger
from memtrack.report.text import COUNT_LABELS, metric_labels

logger = get_logger(__name__)

PACKAGE_CARD = Path(__file__).with_name("detector_card.json")
SEES, MISSES, FALSE_ALARM = 0.9, 0.1, 0.05   # recall >= SEES: sees; <= MISSES: misses; FPR >= FALSE_ALARM: alarms


def load_package_card(path: Path | None = None) -> dict | None:
    """The card shipped with memtrack, or None when it is missing or unreadable (the report says so)."""
    path = path or PACKAGE_CARD
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("no detector card at %s (%s)", path, exc)
        return None
    return card if isinstance(card, dict) and isinstance(card.get("detectors"), dict) else None


def card_for(summary: dict) -> dict | None:
    """The summary's own card when it carries one, else the package's."""
    own = summary.get("detector_card")
    if isinstance(own, dict) and isinstance(own.get("detectors"), dict):
        return own
    return load_package_card()


def run_detectors(summary: dict) -> list[str]:
    """The detectors the run used: its thresholds block and the metric blocks of its checkpoints."""
    seen = {k for k in (summary.get("thresholds") or {}) if isinstance(k, str)}
    for cp in summary.get("checkpoints") or []:
        for name, block in (cp.get("metrics") or {}).items():
            if isinstance(block, dict) and ("rate" in block or "applicable" in block) and name not in COUNT_LABELS:
                seen.add(name)
    known = [m for m in metric_labels() if m in seen]
    return known + sorted(seen - set(known))


def card_rows(card: dict) -> Iterator[tuple[str, str, dict]]:
    """``(detector, case type, cell)`` for every detector and case type, then the detector's ``all`` row."""
    for det, entry in (card.get("detectors") or {}).items():
        for kind, cell in (entry.get("cases") or {}).items():
            yield det, kind, cell
        if isinstance(entry.get("all"), dict):
            yield det, "all", entry["all"]


def _frac(r: dict | None) -> str:
    if not r:
        return ""
    return f"{r.get('count', 0)}/{r.get('n', 0)}"


def _pct(r: dict | None) -> str:
    v = (r or {}).get("value")
    return "-" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{100 * v:.0f}%"


def cell_words(cell: dict | None) -> str:
    """``"recall 12/12"``, ``"flags 1/19"``, both for a mixed case type, or ``"n/a: reason"``."""
    if not isinstance(cell, dict):
        return "not measured"
    if cell.get("applicable") is False:
        return f"n/a: {cell.get('reason') or 'not applicable'}"
    parts = []
    if cell.get("recall"):
        parts.append(f"recall {_frac(cell['recall'])} ({_pct(cell['recall'])})")
    if cell.get("fpr"):
        parts.append(f"flags {_frac(cell['fpr'])} ({_pct(cell['fpr'])})")
    return " · ".join(parts) or "no cases"


def describe(name: str, entry: dict, cases: dict) -> str:
    """One sentence: which case types the detector sees, misses, partly sees, and where it false-alarms."""
    if entry.get("applicable") is False:
        return f"{name}: not applicable on the card's training set ({entry.get('reason') or 'no reason given'})."
    sees, partly, misses, alarms = [], [], [], []
    for kind, cell in (entry.get("cases") or {}).items():
        rec, fpr = (cell or {}).get("recall"), (cell or {}).get("fpr")
        if rec:
            v = rec.get("value", 0.0)
            (sees if v >= SEES else misses if v <= MISSES else partly).append(
                kind if v >= SEES or v <= MISSES else f"{kind} {_pct(rec)}")
        if fpr and fpr.get("value", 0.0) >= FALSE_ALARM:
            alarms.append(f"{kind} {_pct(fpr)}")
    bits = [f"sees {', '.join(sees)}" if sees else "sees none of the card's reproductions"]
    if partly:
        bits.append(f"partly sees {', '.join(partly)}")
    if misses:
        bits.append(f"misses {', '.join(misses)}")
    bits.append(f"false alarms on {', '.join(alarms)}" if alarms else "no false alarms at or above 5%")
    return f"{name}: " + "; ".join(bits) + "."


def provenance(card: dict) -> str:
    """Where the card's numbers come from, in one or two sentences."""
    s = card.get("setup") or {}
    version = card.get("memtrack_version", "?")
    if card.get("scope") == "index":
        return (f"Measured on this run's own index: {s.get('n_cases', '?')} labelled cases made at "
                f"{s.get('resolution', '?')} px from {s.get('images') or 'its training images'}, judged against "
                f"the index itself by memtrack {version} (memtrack index build --card). It holds no duplicated or "
                "held-out images: its negatives are blends and morphs.")
    return (f"Measured on {s.get('n_train', '?')} training images at {s.get('resolution', '?')} px "
            f"({s.get('n_duplicated', 0)} held twice, {s.get('n_faces', 0)} faces of "
            f"{len(s.get('identities') or [])} people) and {s.get('n_cases', '?')} labelled cases, through the same "
            f"embed-search-detect path a scan uses, by memtrack {version}"
            + (f" with: {card['command']}" if card.get("command") else "")
            + ". These are real photographs, not your training set: build the index with --card to measure the "
              "detectors on your own images.")


def mismatches(card: dict, summary: dict, detectors: list[str]) -> list[str]:
    """Where this run differs from the card's conditions (resolution, thresholds, memtrack version)."""
    notes = []
    pixel = ((summary.get("index") or {}).get("spaces") or {}).get("pixel") or {}
    card_res = (card.get("setup") or {}).get("resolution")
    if pixel.get("resolution") is not None and card_res is not None and pixel["resolution"] != card_res:
        notes.append(f"This run's pixel space is {pixel['resolution']} px; the card was measured at {card_res} px.")
    card_t = ((((card.get("setup") or {}).get("spaces") or {}).get("pixel") or {}).get("transform")) or {}
    run_t = pixel.get("transform") or {}
    for key, what in (("flip", "mirrored views indexed"), ("crop", "crop")):
        if key in card_t and key in run_t and card_t[key] != run_t[key]:
            notes.append(f"This run's pixel space has {key} = {run_t[key]}; the card was measured with {key} = "
                         f"{card_t[key]} ({what}), so its rows for flipped or cropped copies do not apply as they are.")
    ths = summary.get("thresholds") or {}
    for det in detectors:
        ran = (ths.get(det) or {}).get("value")
        measured = ((card.get("detectors") or {}).get(det) or {}).get("threshold")
        if isinstance(ran, (int, float)) and isinstance(measured, (int, float)) and abs(ran - measured) > 1e-9:
            notes.append(f"{det} ran with threshold {ran:.3g}; the card measured it at {measured:.3g}.")
    ver = summary.get("memtrack_version")
    if ver and card.get("memtrack_version") and ver != card["memtrack_version"]:
        notes.append(f"The card comes from memtrack {card['memtrack_version']}; this report from {ver}.")
    return notes


def card_view(summary: dict) -> dict | None:
    """What a renderer needs: the card's rows for the run's detectors, sentences and notes; None without any."""
    detectors = run_detectors(summary)
    if not detectors:
        return None
    card = card_for(summary)
    if card is None:
        return {"detectors": [], "rows": [], "sentences": [], "notes": [
            "No detector card is available (the package's detector_card.json is missing); regenerate it with "
            "python benchmarks/detector_card.py --option pixel.flip=true --write-package-card"], "provenance": ""}
    entries = card.get("detectors") or {}
    shown = [d for d in detectors if d in entries]
    cases = card.get("cases") or {}
    rows = [(kind, (cases.get(kind) or {}).get("description", ""),
             [cell_words(((entries[d].get("cases") or {}).get(kind))) for d in shown])
            for kind in _case_order(card, shown)]
    notes = mismatches(card, summary, shown)
    for d in detectors:
        if d not in entries:
            reason = (card.get("not_measured") or {}).get(d) or _family_reason(card, d)
            notes.append(f"{d} is not on the card" + (f": {reason}" if reason else "."))
    return {"detectors": shown, "rows": rows, "notes": notes, "provenance": provenance(card),
            "sentences": [describe(d, entries[d], cases) for d in shown]}


def _family_reason(card: dict, det: str) -> str | None:
    """``clip_copy`` is measured, or not, as the registered detector ``copy``."""
    for name, why in (card.get("not_measured") or {}).items():
        if det.endswith(f"_{name}"):
            return why
    return None


def _case_order(card: dict, shown: list[str]) -> list[str]:
    order = list(card.get("cases") or {})
    for d in shown:
        order += [k for k in ((card["detectors"][d].get("cases")) or {}) if k not in order]
    return order


# ------------------------------------------------------------------------------------ rendering

_INTRO = ("How often each detector this run used flags labelled reproductions of training images (recall) and "
          "images that are not reproductions (flags), measured on the card's ground truth. A detector cannot see "
          "what it misses here; expect the same blind spots in this run.")
_RULE = (f"Sees: recall at least {SEES:.0%} on the card's cases of that kind; misses: at most {MISSES:.0%}; "
         f"false alarms: at least {FALSE_ALARM:.0%} of non-reproductions flagged.")


def card_html(summary: dict):
    """The HTML section ``#card`` (empty when the run used no detector)."""
    from memtrack.report.markup import Raw, esc, section, table

    view = card_view(summary)
    if view is None:
        return Raw("")
    parts = [f"<p>{esc(_INTRO)}</p>"]
    if view["provenance"]:
        parts.append(f'<p class="meta">{esc(view["provenance"])}</p>')
    parts += [f'<p class="changes">{esc(n)}</p>' for n in view["notes"]]
    if view["sentences"]:
        parts += [f"<p>{esc(s)}</p>" for s in view["sentences"]]
        parts.append(f'<p class="meta">{esc(_RULE)}</p>')
    if view["rows"]:
        rows = [[kind, desc, *cells] for kind, desc, cells in view["rows"]]
        parts.append(table(["case", "what it is", *view["detectors"]], rows,
                           numeric=range(2, 2 + len(view["detectors"])),
                           caption="detector card: recall and false alarms per kind of case"))
    return section("card", "Detector card: what each detector can and cannot see", *parts)


def card_markdown(summary: dict) -> str:
    """The same card as a collapsed Markdown block (empty when the run used no detector)."""
    from memtrack.report.markup import md

    view = card_view(summary)
    if view is None:
        return ""
    lines = ["<details><summary>Detector card: what each detector can and cannot see</summary>", "", md(_INTRO)]
    if view["provenance"]:
        lines += ["", md(view["provenance"])]
    lines += ["", *[f"- {md(n)}" for n in view["notes"]]] if view["notes"] else []
    lines += ["", *[f"- {md(s)}" for s in view["sentences"]], "", md(_RULE)] if view["sentences"] else []
    if view["rows"]:
        lines += ["", "| case | what it is | " + " | ".join(md(d) for d in view["detectors"]) + " |",
                  "|---|---|" + "--:|" * len(view["detectors"])]
        lines += [f"| {md(kind)} | {md(desc)} | " + " | ".join(md(c) for c in cells) + " |"
                  for kind, desc, cells in view["rows"]]
    return "\n".join(lines + ["", "</details>"])
