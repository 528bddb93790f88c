"""Across checkpoints: when did a metric start to rise, and what did each seed do.

Pure functions over per-checkpoint records; no models, no files.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def onset(steps: Sequence[int], ci_lows: Sequence[float | None], baseline_rate: float = 0.01,
          persistence: int = 2) -> dict:
    """The onset step of one metric.

    The onset is the first checkpoint whose 95% Wilson lower bound exceeds ``baseline_rate`` and stays
    above it at each of the next ``persistence`` checkpoints -- only such a *confirmed* onset is an onset
    (``step``): it trips an ``onset != null`` gate and drives the recommended checkpoint. A rise at one of the
    last checkpoints, with fewer than ``persistence`` checkpoints after it (all still above), is reported as
    ``provisional`` and nothing else. A spike that falls back is neither.

    Returns:
        ``{"step": int | None, "between": [previous step, onset step] | None, "confirmed": bool,
        "provisional": {"step", "between"} | None}``; ``between`` brackets the onset by the checkpoint
        before it (``None`` when it is the first).
    """
    pairs = sorted(((int(s), lo) for s, lo in zip(steps, ci_lows)), key=lambda p: p[0])  # lo may be None
    above = [lo is not None and lo > baseline_rate for _, lo in pairs]
    for i, ok in enumerate(above):
        following = above[i + 1:i + 1 + persistence]
        if not ok or not all(following):
            continue
        step = pairs[i][0]
        between = [pairs[i - 1][0], step] if i > 0 else None
        if len(following) == persistence:
            return {"step": step, "between": between, "confirmed": True, "provisional": None}
        return {"step": None, "between": None, "confirmed": False,
                "provisional": {"step": step, "between": between}}
    return {"step": None, "between": None, "confirmed": False, "provisional": None}


def onsets(checkpoints: Sequence[dict], baseline_rate: float = 0.01, persistence: int = 2) -> dict:
    """``onset`` for every rate metric found in summary-style checkpoint dicts.

    A metric that is not applicable (``{"applicable": false, "reason"}``, a detector outside its regime) at
    the latest checkpoint that reports it gets ``{"step": None, ..., "applicable": False, "reason": ...}``:
    it has no onset and never drives the recommended checkpoint. Checkpoints where a metric was not
    applicable count as "not above" for it.
    """
    names: list[str] = []
    for ck in checkpoints:
        for name, m in ck.get("metrics", {}).items():
            if isinstance(m, dict) and ("ci_low" in m or m.get("applicable") is False) and name not in names:
                names.append(name)
    ordered = sorted(checkpoints, key=lambda c: c["step"])
    steps = [ck["step"] for ck in checkpoints]
    out = {}
    for name in names:
        latest = next((c["metrics"][name] for c in reversed(ordered) if name in c.get("metrics", {})), {})
        if latest.get("applicable") is False:
            out[name] = {"step": None, "between": None, "confirmed": False, "provisional": None, "applicable": False,
                         "reason": latest.get("reason") or "outside the detector's regime"}
            continue
        out[name] = onset(steps, [ck.get("metrics", {}).get(name, {}).get("ci_low") for ck in checkpoints],
                          baseline_rate, persistence)
    return out


def _drives(o: dict) -> bool:
    """Whether an onset block may drive the recommendation: a confirmed step, on an applicable metric."""
    return (o.get("step") is not None and o.get("confirmed", True) is not False
            and o.get("applicable", True) is not False)


def last_clean_checkpoint(checkpoints: Sequence[dict], onset_blocks: dict) -> dict:
    """The recommended checkpoint: the last one before the earliest *confirmed* onset of any applicable
    metric. Provisional rises are named in the reason but do not move the recommendation."""
    provisional = sorted(((o["provisional"]["step"], n) for n, o in onset_blocks.items()
                          if o.get("applicable", True) is not False and (o.get("provisional") or {}).get("step")
                          is not None))
    onset_blocks = {n: o for n, o in onset_blocks.items() if _drives(o)}
    first = [o["step"] for o in onset_blocks.values()]
    steps = sorted(ck["step"] for ck in checkpoints)
    if not steps:
        return {"step": None, "reason": "no checkpoints evaluated"}
    if not first:
        note = "" if not provisional else (
            f" ({provisional[0][1]} rose at step {provisional[0][0]}, not yet confirmed by later checkpoints)")
        return {"step": steps[-1], "reason": "no metric has a confirmed onset; the latest checkpoint is clean" + note}
    earliest = min(first)
    before = [s for s in steps if s < earliest]
    metric = min((o["step"], n) for n, o in onset_blocks.items())[1]
    if not before:
        return {"step": None, "reason": f"{metric} rose at the first evaluated checkpoint ({earliest}); "
                                        "no evaluated checkpoint is clean"}
    return {"step": before[-1], "reason": f"last checkpoint before the onset of {metric} at step {earliest}"}


# ------------------------------------------------------------------------------- per-seed trajectories

#: Detectors whose flagged match names a reproduced training image, in the order :func:`match_table`
#: prefers them when several flag one sample (the ``*_copy`` spaces come after, by name).
REPRODUCTION_DETECTORS = ("nn_ratio", "nn_ratio_dedup", "tiled_l2")


def match_table(evaluations: Sequence[tuple[int, Sequence[dict]]], train_ids: Sequence[str] | None = None,
                detectors: Sequence[str] | None = None) -> dict:
    """The seed x checkpoint match table that :func:`trajectories` and :func:`which_images` read.

    Args:
        evaluations: ``(step, sample rows)`` per checkpoint; a row is a dict as the run store keeps it,
            ``{"seed": int, "flags": {detector: bool}, "matches": {detector: training row}}``.
        train_ids: training ids by row (None: the row number, as a string, is the id).
        detectors: the detectors whose flagged match counts, most trusted first. Default: ``nn_ratio``,
            ``nn_ratio_dedup``, ``tiled_l2``, then every ``*_copy`` space -- the detectors that say *which*
            image was reproduced (those registered with ``reproduction=True``, the set that
            :func:`memtrack.detectors.metrics.aggregate` counts as distinct reproduced images).

    Returns:
        ``{"steps": [int], "seeds": [int], "matches": [[train_id | None per seed] per checkpoint]}`` -- one
        row per checkpoint, in step order; a sample's entry is the match of the first detector in
        ``detectors`` that flagged it, None when none did (or the seed was not drawn at that checkpoint).
    """
    evaluations = sorted(evaluations, key=lambda e: int(e[0]))
    seeds = sorted({int(r["seed"]) for _, rows in evaluations for r in rows})
    column = {s: j for j, s in enumerate(seeds)}
    table = []
    for _, rows in evaluations:
        line: list = [None] * len(seeds)
        for r in rows:
            line[column[int(r["seed"])]] = _flagged_match(r, train_ids, detectors)
        table.append(line)
    return {"steps": [int(s) for s, _ in evaluations], "seeds": seeds, "matches": table}


def _flagged_match(row: dict, train_ids: Sequence[str] | None, detectors: Sequence[str] | None):
    flags, matches = row.get("flags", {}), row.get("matches", {})
    order = list(detectors) if detectors is not None else (
        [d for d in REPRODUCTION_DETECTORS if d in flags] + sorted(d for d in flags if d.endswith("_copy")))
    for name in order:
        hit = matches.get(name)
        if flags.get(name) and hit is not None and int(hit) >= 0:
            return train_ids[int(hit)] if train_ids is not None else str(int(hit))
    return None


def _lock_index(column: Sequence) -> int | None:
    """Index of the first checkpoint from which ``column`` holds one non-None value to the end."""
    if not column or column[-1] is None:
        return None
    i = len(column) - 1
    while i > 0 and column[i - 1] == column[-1]:
        i -= 1
    return i


def trajectories(steps: Sequence[int], seeds: Sequence[int], matches: Sequence[Sequence],
                 identities: dict | None = None, top: int = 10) -> dict:
    """Follow every seed across checkpoints: what it reproduces, when it locks on, whether it switches.

    Seeds are identities (sample i starts from the same noise at every checkpoint), so the sample of one
    seed at successive checkpoints shows how the model's map from noise to image settles -- Kadkhodaie et
    al. 2024 follow fixed noise the same way.

    Definitions, over the evaluated checkpoints in step order:

    * a seed **matches** training image x at a checkpoint when its sample was flagged as a reproduction
      of x there (``matches[i][j] == x``; None = not flagged);
    * a seed is **locked** onto x from checkpoint i when it matches x at checkpoint i *and at every later
      evaluated checkpoint*, and not at checkpoint i - 1 (i is the earliest such checkpoint). ``locked_step``
      is the step of checkpoint i, None when the seed does not match one image from some checkpoint to the
      last. A single unflagged or different match later breaks a lock; a match at the last checkpoint
      alone is a lock from that step (it has not let go yet);
    * a seed **switched** when its matches name two or more distinct training images;
    * an **attractor** is a training image that at least one seed is locked onto; ``attractors`` counts,
      at every checkpoint, the images that have become attractors by that step (non-decreasing).

    Args:
        steps: ``[n_checkpoints]`` training steps (any order; sorted here, duplicates refused).
        seeds: ``[n_seeds]`` the seed of each column of ``matches``.
        matches: ``[n_checkpoints][n_seeds]`` training id (or None), as :func:`match_table` builds it.
        identities: ``{train_id: identity}`` for the training images that show a known person; adds the
            same per-seed view over identities (a seed may lock onto a person across two of her images).
        top: how many seeds ``earliest`` lists.

    Returns:
        ``{"steps": [int], "seeds": [int], "matches": [[train_id | None per step] per seed],
        "locked_step": [int | None per seed], "locked_to": [train_id | None per seed],
        "switched": [bool per seed], "attractors": [{"step", "count"}],
        "earliest": [{"seed", "step", "train_id"}]}``, plus ``"identities"``,
        ``"identity_locked_step"`` and ``"identity_switched"`` when ``identities`` is given.

    Example:
        >>> t = trajectories([100, 200, 300], [0, 1], [["a", None], ["a", "b"], ["a", "a"]])
        >>> t["locked_step"], t["locked_to"], t["switched"]
        ([100, 300], ['a', 'a'], [False, True])
    """
    order, steps, seeds = _check_table(steps, seeds, matches)
    per_seed = [[matches[i][j] for i in order] for j in range(len(seeds))]
    locks = [_lock_index(col) for col in per_seed]
    locked_step = [steps[i] if i is not None else None for i in locks]
    locked_to = [col[-1] if i is not None else None for col, i in zip(per_seed, locks)]
    out = {
        "steps": steps, "seeds": seeds, "matches": per_seed, "locked_step": locked_step, "locked_to": locked_to,
        "switched": [len({m for m in col if m is not None}) > 1 for col in per_seed],
        "attractors": _attractor_counts(steps, locked_step, locked_to),
        "earliest": sorted(({"seed": s, "step": st, "train_id": x} for s, st, x in zip(seeds, locked_step, locked_to)
                            if st is not None), key=lambda e: (e["step"], e["seed"]))[:top],
    }
    if identities is not None:
        people = [[identities.get(m) if m is not None else None for m in col] for col in per_seed]
        id_locks = [_lock_index(col) for col in people]
        out["identities"] = people
        out["identity_locked_step"] = [steps[i] if i is not None else None for i in id_locks]
        out["identity_switched"] = [len({p for p in col if p is not None}) > 1 for col in people]
    return out


def _check_table(steps: Sequence[int], seeds: Sequence[int], matches: Sequence[Sequence]):
    if len(matches) != len(steps):
        raise ValueError(f"matches needs one row per checkpoint: {len(steps)} steps, {len(matches)} rows")
    bad = [i for i, row in enumerate(matches) if len(row) != len(seeds)]
    if bad:
        raise ValueError(f"matches row {bad[0]} has {len(matches[bad[0]])} entries; expected one per seed "
                         f"({len(seeds)})")
    if len(set(int(s) for s in steps)) != len(steps):
        raise ValueError(f"steps must be distinct, got {list(steps)}")
    order = sorted(range(len(steps)), key=lambda i: int(steps[i]))
    return order, [int(steps[i]) for i in order], [int(s) for s in seeds]


def _attractor_counts(steps: list[int], locked_step: list, locked_to: list) -> list[dict]:
    first: dict = {}
    for st, x in zip(locked_step, locked_to):
        if st is not None:
            first[x] = min(st, first.get(x, st))
    return [{"step": s, "count": sum(1 for v in first.values() if v <= s)} for s in steps]


# ------------------------------------------------------------------------------- which images, and why


def png_bytes_per_pixel(image) -> float:
    """Simplicity of an image: its lossless PNG size in bytes per pixel (lower = simpler).

    The image is encoded in memory (zlib level 9, no optimiser pass, so the number is reproducible);
    the ~60 bytes of PNG chunk overhead are included. Compare images at one resolution -- the index's.

    Args:
        image: a PIL image, or a uint8 array ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` (C = 1 or 3),
            as the pixel index stores its vectors once reshaped.
    """
    import io

    from PIL import Image

    if not isinstance(image, Image.Image):
        a = np.asarray(image)
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = np.moveaxis(a, 0, -1)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.dtype != np.uint8:
            raise ValueError(f"png_bytes_per_pixel needs uint8 pixels, got {a.dtype}")
        image = Image.fromarray(a)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=9, optimize=False)
    return len(buf.getvalue()) / float(image.size[0] * image.size[1])


def near_duplicate_counts(scores: np.ndarray, threshold: float, direction: str = "below",
                          neighbour_ids: np.ndarray | None = None) -> np.ndarray:
    """How many *other* training images lie within ``threshold`` of each training image.

    Args:
        scores: ``[n, n]`` train x train distances or similarities, or ``[n, k]`` scores of each image's k
            nearest training images (the index's train->train search) with their rows in ``neighbour_ids``.
        threshold: a pair is a near-duplicate when its score is ``<= threshold`` (``direction="below"``,
            distances) or ``>= threshold`` (``"above"``, similarities).
        neighbour_ids: ``[n, k]`` training rows of ``scores`` (-1 = none); None when ``scores`` is square.
            An image never counts as its own duplicate. With top-k input the count saturates at k - 1.
    """
    s = np.asarray(scores, dtype=np.float64)
    if direction not in ("below", "above"):
        raise ValueError(f"direction must be 'below' or 'above', got {direction!r}")
    n = s.shape[0]
    ids = np.broadcast_to(np.arange(s.shape[1]), s.shape) if neighbour_ids is None else np.asarray(neighbour_ids)
    if neighbour_ids is None and s.shape != (n, n):
        raise ValueError(f"scores must be square [n, n] without neighbour_ids; got {s.shape}")
    if ids.shape != s.shape:
        raise ValueError(f"neighbour_ids {ids.shape} must have the shape of scores {s.shape}")
    close = s <= threshold if direction == "below" else s >= threshold
    valid = (ids >= 0) & (ids != np.arange(n)[:, None]) & np.isfinite(s)
    return (close & valid).sum(axis=1).astype(np.int64)


def which_images(train_ids: Sequence[str], steps: Sequence[int], matches: Sequence[Sequence], *,
                 near_duplicates: Sequence[int], bytes_per_pixel: Sequence[float],
                 seeds: Sequence[int] | None = None) -> dict:
    """Which training images were reproduced, when, and whether they were the duplicated and simple ones.

    Duplicated and simple training images are reported to be memorized first: Carlini et al. 2023
    ("Extracting Training Data from Diffusion Models") find duplicated images far more extractable, and
    Somepalli et al. 2023 link replication to duplication in the training set. memtrack measures both
    factors for each training image, so the report can show whether *this* run follows that pattern:

    * ``first_step``: the first evaluated step at which some seed's sample was flagged as a reproduction of
      it (None: never); ``n_seeds``: how many distinct seeds ever reproduced it;
    * ``near_duplicates``: other training images within the near-duplicate threshold
      (:func:`near_duplicate_counts` on the index's train->train search);
    * ``bytes_per_pixel``: its PNG size at the index resolution (:func:`png_bytes_per_pixel`);
    * ``risk_rank``: 1 = most near-duplicates, ties broken by the simpler (smaller) image -- the order in
      which the literature expects images to be memorized.

    The list is ranked reproduced images first, by ``first_step`` then ``risk_rank``; then the others by
    ``risk_rank``. ``summary`` compares reproduced and not-reproduced images and gives Spearman
    correlations of ``first_step`` with both factors over the reproduced images (None with fewer than 3,
    or when either side is constant): a negative correlation with ``near_duplicates`` and a positive one
    with ``bytes_per_pixel`` are what the literature predicts.

    Args:
        train_ids: every training image's id, by row.
        steps, matches: the match table (``[n_checkpoints][n_seeds]`` ids or None; :func:`match_table`).
        near_duplicates: ``[n_train]`` counts, by row.
        bytes_per_pixel: ``[n_train]`` simplicity, by row.
        seeds: the seeds of the columns of ``matches`` (only used to count distinct seeds; default 0..).
    """
    n = len(train_ids)
    if len(near_duplicates) != n or len(bytes_per_pixel) != n:
        raise ValueError(f"near_duplicates ({len(near_duplicates)}) and bytes_per_pixel ({len(bytes_per_pixel)}) "
                         f"need one value per training image ({n})")
    order, steps_sorted, seed_list = _check_table(steps, seeds if seeds is not None else
                                                  range(len(matches[0]) if matches else 0), matches)
    first, who = _first_reproductions(order, steps_sorted, seed_list, matches)
    risk = sorted(range(n), key=lambda r: (-int(near_duplicates[r]), float(bytes_per_pixel[r]), r))
    risk_rank = {r: k + 1 for k, r in enumerate(risk)}
    images = [{"train_id": tid, "row": r, "reproduced": tid in first, "first_step": first.get(tid),
               "n_seeds": len(who.get(tid, ())), "near_duplicates": int(near_duplicates[r]),
               "bytes_per_pixel": float(bytes_per_pixel[r]), "risk_rank": risk_rank[r]}
              for r, tid in enumerate(train_ids)]
    images.sort(key=lambda m: (not m["reproduced"], m["first_step"] or 0, m["risk_rank"]))
    return {"images": images, "summary": _reproduction_summary(images)}


def _first_reproductions(order, steps_sorted, seeds, matches) -> tuple[dict, dict]:
    first: dict = {}
    who: dict = {}
    for i, step in zip(order, steps_sorted):
        for seed, tid in zip(seeds, matches[i]):
            if tid is None:
                continue
            first.setdefault(tid, step)
            who.setdefault(tid, set()).add(seed)
    return first, who


def _reproduction_summary(images: list[dict]) -> dict:
    def group(rows):
        if not rows:
            return {"n": 0, "mean_near_duplicates": None, "median_bytes_per_pixel": None}
        return {"n": len(rows), "mean_near_duplicates": float(np.mean([m["near_duplicates"] for m in rows])),
                "median_bytes_per_pixel": float(np.median([m["bytes_per_pixel"] for m in rows]))}

    rep = [m for m in images if m["reproduced"]]
    steps = [m["first_step"] for m in rep]
    return {"n_train": len(images), "n_reproduced": len(rep), "reproduced": group(rep),
            "not_reproduced": group([m for m in images if not m["reproduced"]]),
            "spearman": {"first_step_vs_near_duplicates": _spearman(steps, [m["near_duplicates"] for m in rep]),
                         "first_step_vs_bytes_per_pixel": _spearman(steps, [m["bytes_per_pixel"] for m in rep])}}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation, None with fewer than 3 pairs or a constant side."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])
