"""Which evaluation series a report shows, and how it says so.

A run's store can hold several series (see :mod:`memtrack.scan.eval_identity`): the index grew, the sampling
config changed, the run saved its ``scheduler/``, live ``step-N`` states beside saved ``checkpoint-N``
folders. Their rates were computed from different things, so a report shows exactly one -- the latest by
default, or the one ``--key`` or ``--config`` names -- and lists the others, never mixing them on a curve.

The ``series`` block of summary.json::

    {"key": str, "selected_by": "latest|key|config", "legacy": bool, "source": "saved|live|null",
     "n_checkpoints": int, "n_samples": [int], "first_evaluated": str, "last_evaluated": str,
     "index_content_hash": str|null,                  # the reference index it was computed against
     "duplicate_steps": [{"step", "checkpoint"}],     # left off the curve (another state at that step)
     "others": [{"key", "legacy", "source", "n_checkpoints", "n_samples", "first_evaluated", "last_evaluated"}]}
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from memtrack.errors import ConfigError
from memtrack.index.content_hash import short
from memtrack.store.run_store import RunStore, Series

SAMPLING_KEYS = ("num_samples", "seed", "num_inference_steps", "scheduler", "guidance_scale")


@dataclass
class Selection:
    """The series a report shows and why: ``latest``, ``key`` (``--key``) or ``config`` (``--config``)."""

    key: Optional[str]
    selected_by: str = "latest"


def choose_series(store: RunStore, *, key: str | None = None, candidates: dict | None = None,
                  source: str | None = None) -> Selection:
    """The series to show: ``key`` (a prefix is enough), the stored one among ``candidates`` (the keys a
    config gives; the newest when several are stored), or the latest.

    Raises:
        StoreError: ``key`` names no stored series, or several.
        ConfigError: no series of ``candidates`` is stored (``source`` names the config).
    """
    if key is not None:
        return Selection(store.resolve_series(key), "key")
    if candidates is not None:
        stored = [s for s in store.list_series() if s.key in candidates]
        if not stored:
            listed = ", ".join(f"{s.key} ({s.n_checkpoints} checkpoints)" for s in store.list_series()) or "none"
            raise ConfigError(f"{source or 'the config'} gives evaluation series {', '.join(sorted(candidates))}, "
                              f"which {store.folder} does not hold (it holds: {listed})",
                              hint="scan the run with that config first, or choose a stored series with --key")
        return Selection(stored[0].key, "config")
    return Selection(store.latest_series(), "latest")


def one_per_step(evals: list) -> tuple[list, list[dict]]:
    """A curve has one state per step: the newest evaluation of each step, and the ones left off.

    Only the legacy series can hold two checkpoints at one step (``checkpoint-N`` and an older ``final``
    given that step); newer series keep live and saved states apart.
    """
    by_step: dict[int, object] = {}
    for ev in evals:
        kept = by_step.get(ev.step)
        if kept is None or (ev.created, ev.id) > (kept.created, kept.id):
            by_step[ev.step] = ev
    kept_ids = {ev.id for ev in by_step.values()}
    left = [{"step": ev.step, "checkpoint": ev.checkpoint} for ev in evals if ev.id not in kept_ids]
    return sorted(by_step.values(), key=lambda e: (e.step, e.id)), left


def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None


def _entry(s: Series) -> dict:
    return {"key": s.key, "legacy": s.legacy, "source": s.identity.get("source"), "n_checkpoints": s.n_checkpoints,
            "n_samples": list(s.n_samples), "first_evaluated": _iso(s.first_evaluated),
            "last_evaluated": _iso(s.last_evaluated)}


def series_block(store: RunStore, selection: Selection, duplicates: list[dict]) -> dict:
    """The ``series`` block of summary.json (see the module docstring)."""
    every = store.list_series()
    chosen = next((s for s in every if s.key == selection.key), None)
    block = {**(_entry(chosen) if chosen else {"key": selection.key, "legacy": False, "source": None,
                                               "n_checkpoints": 0, "n_samples": [], "first_evaluated": None,
                                               "last_evaluated": None}),
             "selected_by": selection.selected_by,
             "index_content_hash": ((chosen.identity.get("index") or {}).get("content_hash") if chosen else None),
             "others": [_entry(s) for s in every if s.key != selection.key]}
    if duplicates:
        block["duplicate_steps"] = duplicates
    return block


def identity_of(store: RunStore, key: str | None) -> dict:
    return next((s.identity for s in store.list_series() if s.key == key), {})


def sampling_block(identity: dict, evals: list) -> dict:
    """The sampling settings the series was computed with, as it stored them (not the latest config).

    A legacy series did not store them: only the sample count is known, when every checkpoint agrees.
    """
    stored = identity.get("sampling")
    if isinstance(stored, dict):
        return {k: stored.get(k) for k in SAMPLING_KEYS if k in stored}
    counts = sorted({ev.n_samples for ev in evals})
    return {"num_samples": counts[0] if len(counts) == 1 else None}


def series_lines(summary: dict) -> list[str]:
    """Plain sentences: which series the report shows and which others exist (for every renderer)."""
    block = summary.get("series")
    if not isinstance(block, dict) or not block.get("key"):
        return []
    how = {"latest": "the latest", "key": "chosen with --key", "config": "chosen with --config"}.get(
        block.get("selected_by"), "")
    head = (f"evaluation series {block['key']} ({how}; {_counts(block)}"
            + ("; legacy: evaluated before memtrack recorded what evaluations were computed from, so its "
               "checkpoints may mix settings" if block.get("legacy") else "") + ")")
    lines = [head]
    used, now = block.get("index_content_hash"), (summary.get("index") or {}).get("content_hash")
    if used and now and used != now:
        lines.append(f"the reference index changed since (content {short(used)}, now {short(now)}): "
                     "`memtrack scan` evaluates the checkpoints against it")
    dups = block.get("duplicate_steps") or []
    if dups:
        lines.append(f"left off the curve: {', '.join(d['checkpoint'] for d in dups)} (a newer evaluation at the "
                     "same step is shown)")
    others = block.get("others") or []
    if others:
        lines.append(f"{len(others)} other series in this store, not shown (choose one with --key KEY):")
        lines.extend(f"  {o['key']}: {_counts(o)}, last evaluated {o.get('last_evaluated') or '?'}" for o in others)
    return lines


def _counts(entry: dict) -> str:
    n = entry.get("n_checkpoints", 0)
    samples = "/".join(str(x) for x in entry.get("n_samples") or []) or "?"
    source = f", {entry['source']} weights" if entry.get("source") else ""
    return f"{n} checkpoint{'s' if n != 1 else ''}, {samples} samples{source}"


def select_series(store: RunStore, run_dir, *, key: str | None = None, config: str | None = None,
                  index=None) -> Selection:
    """:func:`choose_series` for the CLI: ``--key KEY``, or ``--config FILE`` -- the series that config and
    the run's index (``index``, default the one recorded in the store) give the run's checkpoints now.

    Raises:
        ConfigError: both are given, the config is invalid, or the run's index cannot be found.
    """
    if key is not None and config is not None:
        raise ConfigError("--key and --config both choose the series to show; give one of them")
    if config is None:
        return choose_series(store, key=key)
    from memtrack.config import load_config
    from memtrack.scan.eval_identity import checkpoint_from_info, config_series
    from memtrack.index.reference import ReferenceIndex

    cfg = load_config(config)
    path = index or (store.get_meta("index") or {}).get("path")
    if not path:
        raise ConfigError(f"--config needs the index the run was scanned with, and {store.folder} records none",
                          hint="pass --index DIR")
    ref = index if isinstance(index, ReferenceIndex) else ReferenceIndex.open(path)
    cks = [ck for ck in (checkpoint_from_info(ev.info) for ev in store.evaluations(latest_per_checkpoint=False))
           if ck is not None]
    return choose_series(store, candidates=config_series(cfg, ref, run_dir, cks), source=config)
