"""Reports: one self-contained HTML file, Markdown for PR comments, JSON (``summary.json``), gates.

Example:
    >>> from memtrack.report.write import write_report
    >>> write_report(["runs/ddpm"], out="report.html", gates=["nn_ratio.rate > 0.01"])
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from memtrack.errors import GateError
from memtrack.store.run_store import RunStore
from memtrack.utils import atomic_write_json, atomic_write_text, get_logger
from memtrack.report.gate import check_gates, parse_gate
from memtrack.analysis.series import select_series
from memtrack.analysis.summary import build_gallery, build_summary, open_index_for

logger = get_logger(__name__)


def run_summary(run_dir: str | Path, *, store_dir: str | Path | None = None, index=None,
                with_index: bool = True, key: str | None = None, config: str | Path | None = None) -> dict:
    """The summary dict of one run (read-only access to its store), for one evaluation series: the
    latest, or the one ``key`` (a prefix) or ``config`` (a config file) names (:mod:`memtrack.analysis.series`)."""
    store = RunStore.open(run_dir, folder=store_dir, create=False, readonly=True)
    try:
        selection = select_series(store, run_dir, key=key, config=config, index=index)
        ref = open_index_for(store, index) if with_index else None
        return build_summary(store, run_dir, ref, selection=selection)
    finally:
        store.close()


def write_report(runs: Sequence[str | Path], *, out: str | Path | None = None, fmt: str = "html",
                 index: str | Path | None = None, store_dir: str | Path | None = None,
                 gates: Sequence[str] = (), quiet: bool = False, key: str | None = None,
                 config: str | Path | None = None) -> int:
    """Write the report of ``runs[0]`` (others overlaid) and ``summary.json`` beside it; evaluate gates.

    ``key`` / ``config`` choose the evaluation series of ``runs[0]`` (default: the latest; the others'
    latest are overlaid). Returns the exit code: 0 when every gate holds, 1 when one trips (each tripped
    gate is named on stderr). Gates are parsed, and checked against the run's metrics, before anything is
    written, so a typo (in the expression or the metric name) fails (exit 2) with the earlier report left
    as it was.
    """
    for g in gates:
        parse_gate(g)
    main_run = Path(runs[0])
    store = RunStore.open(main_run, folder=store_dir, create=False, readonly=True)
    try:
        selection = select_series(store, main_run, key=key, config=config, index=index)
        ref = open_index_for(store, index)
        summary = build_summary(store, main_run, ref, selection=selection)
        gallery = build_gallery(store, summary, ref) if fmt != "json" else []
    finally:
        store.close()
    judged = check_gates(summary, list(gates))  # an unknown metric or field raises here, before any write
    others = [run_summary(r, with_index=False) for r in runs[1:]]
    default_name = {"html": "report.html", "md": "report.md", "json": "summary.json"}[fmt]
    out = Path(out) if out else Path(store_dir or main_run / "memtrack") / default_name
    previous = _read_json(out.parent / "summary.json")
    if previous:
        summary["changes"] = _changes(previous, summary)
    summary_path = out.parent / "summary.json"
    atomic_write_json(summary_path, summary)
    if fmt == "html":
        from memtrack.report.html import render_html

        atomic_write_text(out, render_html(summary, gallery, runs=[summary, *others] if others else None))
    elif fmt == "md":
        from memtrack.report.markdown import render_markdown

        atomic_write_text(out, render_markdown(summary, gallery, out.parent))
    if not quiet:
        from memtrack.report.terminal import render_table

        print(render_table(summary))
        print(f"wrote {out}" + (f" and {summary_path}" if out != summary_path else ""))
    code = 0
    for gate, tripped, observed in judged:
        if tripped:
            print(f"memtrack: gate tripped: {gate.text} (observed {observed})", file=sys.stderr)
            code = 1
    return code


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _changes(previous: dict, current: dict) -> dict:
    """What changed since the last report of this run: new checkpoints and new onsets.

    When the last report showed another evaluation series, nothing of it carries over: every checkpoint
    and onset of this one is new, and ``series_changed_from`` names the old series.
    """
    old_series = (previous.get("series") or {}).get("key")
    changed = old_series is not None and old_series != (current.get("series") or {}).get("key")
    old_steps = set() if changed else {c["step"] for c in previous.get("checkpoints", [])}
    old_onsets = set() if changed else {m for m, o in previous.get("onset", {}).items() if o.get("step") is not None}
    extra = {"series_changed_from": old_series} if changed else {}
    return {"since": previous.get("generated_at"), **extra,
            "new_checkpoints": [c["step"] for c in current["checkpoints"] if c["step"] not in old_steps],
            "new_onsets": [m for m, o in current.get("onset", {}).items()
                           if o.get("step") is not None and m not in old_onsets]}


__all__ = ["write_report", "run_summary", "build_summary", "check_gates", "parse_gate", "GateError"]
