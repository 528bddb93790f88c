"""Across checkpoints: when did a metric start to rise, and what did each seed do.

Pure functions over per-checkpoint records; no models, no files.
"""
from __future__ import annotations

from typing import Sequence


def onset(steps: Sequence[int], ci_lows: Sequence[float | None], baseline_rate: float = 0.01,
          persistence: int = 2) -> dict:
    """The onset step of one metric.

    The onset is the first checkpoint whose 95% Wilson lower bound exceeds ``baseline_rate`` and stays
    above it at each of the next ``persistence`` checkpoints. A rise at one of the last checkpoints, with
    fewer than ``persistence`` checkpoints after it, is still reported (it has not fallen back yet) but
    marked ``"confirmed": False``. A spike that falls back is not an onset.

    Returns:
        ``{"step": int | None, "between": [previous step, onset step] | None, "confirmed": bool}``;
        ``between`` brackets the onset by the checkpoint before it (``None`` when it is the first).
    """
    pairs = sorted((int(s), lo) for s, lo in zip(steps, ci_lows))
    above = [lo is not None and lo > baseline_rate for _, lo in pairs]
    for i, ok in enumerate(above):
        if not ok:
            continue
        following = above[i + 1:i + 1 + persistence]
        if all(following):
            step = pairs[i][0]
            between = [pairs[i - 1][0], step] if i > 0 else None
            return {"step": step, "between": between, "confirmed": len(following) == persistence}
    return {"step": None, "between": None, "confirmed": False}


def onsets(checkpoints: Sequence[dict], baseline_rate: float = 0.01, persistence: int = 2) -> dict:
    """``onset`` for every rate metric found in summary-style checkpoint dicts."""
    names: list[str] = []
    for ck in checkpoints:
        for name, m in ck.get("metrics", {}).items():
            if "ci_low" in m and name not in names:
                names.append(name)
    steps = [ck["step"] for ck in checkpoints]
    return {name: onset(steps, [ck.get("metrics", {}).get(name, {}).get("ci_low") for ck in checkpoints],
                        baseline_rate, persistence) for name in names}


def last_clean_checkpoint(checkpoints: Sequence[dict], onset_blocks: dict) -> dict:
    """The recommended checkpoint: the last one before the earliest onset of any metric."""
    first = [o["step"] for o in onset_blocks.values() if o.get("step") is not None]
    steps = sorted(ck["step"] for ck in checkpoints)
    if not steps:
        return {"step": None, "reason": "no checkpoints evaluated"}
    if not first:
        return {"step": steps[-1], "reason": "no metric has an onset; the latest checkpoint is clean"}
    earliest = min(first)
    before = [s for s in steps if s < earliest]
    metric = min((o["step"], n) for n, o in onset_blocks.items() if o.get("step") is not None)[1]
    if not before:
        return {"step": None, "reason": f"{metric} rose at the first evaluated checkpoint ({earliest}); "
                                        "no evaluated checkpoint is clean"}
    return {"step": before[-1], "reason": f"last checkpoint before the onset of {metric} at step {earliest}"}
