"""Per-checkpoint aggregation: rates with Wilson intervals, score distributions, distinct matches.

Pure functions: detector outputs in, plain dicts out (the ``metrics`` block of ``summary.json``). A rate
counts only the samples that got a verdict (``n``); the others are listed under ``not_judged`` with the
reason. A detector outside its regime becomes ``{"applicable": false, "reason": ...}``: no rate, no
interval, no matches -- nothing downstream can mistake it for a clean 0%.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from memtrack.detectors.registry import is_reproduction
from memtrack.detectors.core import DetectorOutput, summarise


def wilson_interval(count: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is informative at 0 successes:
    ``wilson_interval(0, 64) == (0.0, 0.0566...)``. ``n == 0`` gives ``(0.0, 1.0)``.
    """
    if n < 0 or count < 0 or count > n:
        raise ValueError(f"wilson_interval needs 0 <= count <= n, got count={count}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = count / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    if count == 0:
        low = 0.0
    if count == n:
        high = 1.0
    return low, high


def rate_block(flags: np.ndarray) -> dict:
    """``{"rate", "ci_low", "ci_high", "count", "n"}`` for a boolean array of per-sample verdicts."""
    flags = np.asarray(flags, dtype=bool)
    n, count = int(flags.size), int(flags.sum())
    low, high = wilson_interval(count, n)
    return {"rate": count / n if n else 0.0, "ci_low": low, "ci_high": high, "count": count, "n": n}


def not_applicable_block(reason: str) -> dict:
    """The metric block of a detector outside its regime."""
    return {"applicable": False, "reason": reason}


def metric_block(out: DetectorOutput) -> dict:
    """One detector's block: rate over the judged samples, score statistics, distinct matches."""
    if not out.applicable:
        return not_applicable_block(out.reason or "outside the detector's regime")
    judged = out.judged_mask()
    if not judged.any():
        reasons = "; ".join(f"{n} sample(s): {r}" for r, n in out.not_judged.items()) or "no sample was judged"
        return not_applicable_block(f"no sample could be judged ({reasons})")
    block = rate_block(out.flagged[judged])
    stats = summarise(out.score[judged])
    block.update({"mean": stats["mean"], "p50": stats["p50"], "p95": stats["p95"]})
    hit = out.match[out.flagged & judged & (out.match >= 0)]
    block["distinct"] = int(len(set(hit.tolist())))
    if out.not_judged:
        block["not_judged"] = {str(r): int(n) for r, n in out.not_judged.items()}
    return block


def aggregate(outputs: Sequence[DetectorOutput], train_ids: Sequence[str] | None = None,
              top: int = 8, seeds: Sequence[int] | None = None) -> dict:
    """Aggregate one checkpoint's detector outputs.

    Returns ``{"metrics": {name: {rate, ci_low, ci_high, count, n, mean, p50, p95, distinct[, not_judged]}
    | {applicable: false, reason}}, "distinct_train_images": int, "top_matches": [...]}`` where
    ``distinct`` counts the training images that at least one flagged sample reproduces, and
    ``top_matches`` lists the strongest flagged matches.
    """
    metrics: dict[str, dict] = {}
    reproduced: set[int] = set()
    matches = []
    for out in outputs:
        block = metric_block(out)
        metrics[out.name] = block
        if "rate" not in block:
            continue
        hit = out.match[out.flagged & out.judged_mask() & (out.match >= 0)]
        _identity_counts(out, block)
        if is_reproduction(out.name):
            reproduced.update(hit.tolist())
        matches.extend(_flagged_matches(out, train_ids, seeds))
    metrics["distinct_train_images"] = {"count": len(reproduced)}
    matches.sort(key=lambda m: _strength(m))
    return {"metrics": metrics, "distinct_train_images": len(reproduced), "top_matches": matches[:top]}


def _flagged_matches(out: DetectorOutput, train_ids: Sequence[str] | None, seeds: Sequence[int] | None) -> list:
    matches = []
    for i in np.flatnonzero(out.flagged & out.judged_mask()):
        extra = {}
        if "match_b" in out.extra:  # a blend of two identities: the second one's training image too
            rb = int(out.extra["match_b"][i])
            extra = {"train_row_b": rb, "train_id_b": train_ids[rb] if train_ids is not None and rb >= 0 else None,
                     "identity_a": out.extra.get("identity_a_name", [None] * (i + 1))[i],
                     "identity_b": out.extra.get("identity_b_name", [None] * (i + 1))[i]}
        elif "identity_name" in out.extra:
            extra = {"identity": out.extra["identity_name"][i]}
        matches.append({**extra,
            "seed": int(seeds[i]) if seeds is not None else int(i),
            "sample": int(i),
            "train_row": int(out.match[i]),
            "train_id": train_ids[int(out.match[i])] if train_ids is not None and out.match[i] >= 0 else None,
            "detector": out.name,
            "score": float(out.score[i]),
            "threshold": out.threshold,
            "direction": out.direction,
        })
    return matches


def _identity_counts(out: DetectorOutput, block: dict) -> None:
    """Identity detectors: which identities (or pairs of identities) the flagged samples reproduce."""
    flagged = np.flatnonzero(out.flagged)
    if "identity_name" in out.extra:
        counts: dict[str, int] = {}
        for i in flagged:
            if out.extra["identity_name"][i]:
                counts[str(out.extra["identity_name"][i])] = counts.get(str(out.extra["identity_name"][i]), 0) + 1
        block["identities"] = sorted(counts)
        block["identity_counts"] = dict(sorted(counts.items()))
        block["distinct"] = len(counts)
    if "identity_a_name" in out.extra:
        pairs = sorted({" + ".join(sorted((str(out.extra["identity_a_name"][i]), str(out.extra["identity_b_name"][i]))))
                        for i in flagged})
        block["pairs"] = pairs
        block["distinct"] = len(pairs)


def _strength(m: dict) -> float:
    """Sort key: how far past its threshold a match is, relative to the threshold (most extreme first)."""
    t = m["threshold"] or 1.0
    margin = (t - m["score"]) / abs(t) if m["direction"] == "below" else (m["score"] - t) / abs(t)
    return -margin


def per_sample_rows(outputs: Iterable[DetectorOutput]) -> list[dict]:
    """One dict per sample: ``{"scores": {name: score}, "flags": {name: bool}, "matches": {name: row}}``.

    Detectors that are not applicable are left out; a sample a detector could not judge has its score as
    None and its flag False.
    """
    outputs = [o for o in outputs if o.applicable]
    if not outputs:
        return []
    n = len(outputs[0].score)
    rows = [{"scores": {}, "flags": {}, "matches": {}} for _ in range(n)]
    for out in outputs:
        judged = out.judged_mask()
        for i in range(n):
            rows[i]["scores"][out.name] = _scalar(out.score[i]) if judged[i] else None
            rows[i]["flags"][out.name] = bool(out.flagged[i] and judged[i])
            rows[i]["matches"][out.name] = int(out.match[i])
        for key, arr in out.extra.items():
            arr = np.asarray(arr)
            for i in range(n):
                rows[i]["scores"][f"{out.name}.{key}"] = _scalar(arr[i])
    return rows


def _scalar(v):
    if v is None or isinstance(v, str):
        return v
    v = float(v)
    return v if math.isfinite(v) else None
