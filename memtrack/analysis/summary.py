"""Turn a run store into ``summary.json`` (the stable schema of ARCHITECTURE.md) and gallery items."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from memtrack import __version__
from memtrack.card.measure import read_index_card
from memtrack.config import Config, from_dict
from memtrack.data.dataset import open_image
from memtrack.analysis.dynamics import last_clean_checkpoint, match_table, onsets, png_bytes_per_pixel, trajectories, which_images
from memtrack.scan.probes import loss_gap_block, noise_magnitude_summary
from memtrack.errors import DataError, MemtrackError
from memtrack.index.reference import ReferenceIndex
from memtrack.store.run_store import RunStore
from memtrack.utils import get_logger
from memtrack.analysis.series import Selection, identity_of, one_per_step, sampling_block, series_block

logger = get_logger(__name__)

RATE_KEYS = ("rate", "ci_low", "ci_high", "count", "n")


def open_index_for(store: RunStore, index: str | Path | ReferenceIndex | None = None) -> Optional[ReferenceIndex]:
    """The index a run was scanned against (recorded in its store), or None when it is gone."""
    if isinstance(index, ReferenceIndex):
        return index
    path = index or (store.get_meta("index") or {}).get("path")
    if not path:
        return None
    try:
        return ReferenceIndex.open(path)
    except MemtrackError as exc:
        logger.warning("the index %s cannot be opened (%s); the report will show no training images", path,
                       exc.message)
        return None


def build_summary(store: RunStore, run_dir: str | Path, index: ReferenceIndex | None = None,
                  config: Config | None = None, selection: Selection | None = None) -> dict:
    """The ``summary.json`` dict of one run, from its store: one evaluation series (``selection``,
    default the latest; see :mod:`memtrack.analysis.series`), with the others listed in ``series``."""
    if config is None:
        stored = store.get_meta("config")
        config = from_dict(Config, stored) if stored else Config()
    selection = selection or Selection(store.latest_series())
    evals, duplicates = one_per_step(store.evaluations(series=selection.key) if selection.key else [])
    identity = identity_of(store, selection.key)
    index = index_for_series(index, identity, selection.key)
    checkpoints, thresholds = [], {}
    for ev in evals:
        info = ev.info
        thresholds.update(info.get("thresholds", {}))
        checkpoints.append({
            "step": ev.step, "checkpoint": ev.checkpoint, "n_samples": ev.n_samples, "weights": ev.weights,
            "path": info.get("checkpoint", {}).get("path"), "metrics": ev.metrics,
            "distinct_train_images": info.get("distinct_train_images", 0),
            "top_matches": info.get("top_matches", []), "duration_s": ev.duration_s,
            "timings": info.get("timings", {}),
            **{k: info[k] for k in ("loss_gap", "noise_magnitude") if k in info},
        })
    skipped = [{"step": e.step, "checkpoint": e.checkpoint, "reason": e.reason}
               for e in store.evaluations(status="skipped", series=selection.key)] if selection.key else []
    on = onsets(checkpoints, config.dynamics.baseline_rate, config.dynamics.persistence)
    summary = {
        "memtrack_version": __version__,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": str(run_dir),
        "index": index.summary() if index is not None else store.get_meta("index", {}),
        "thresholds": thresholds,
        "checkpoints": checkpoints,
        "skipped": skipped,
        "onset": on,
        "onset_rule": {"baseline_rate": config.dynamics.baseline_rate,
                       "persistence": config.dynamics.persistence,
                       "interval": "95% Wilson lower bound"},
        "recommended_checkpoint": last_clean_checkpoint(checkpoints, on),
        "sampling": sampling_block(identity, evals),
        "series": series_block(store, selection, duplicates),
    }
    if index is not None:
        summary["dataset"] = dict(index.manifest.get("dataset", {}))
        summary["baseline"] = _baseline_block(index)
        card = read_index_card(index.path)  # measured on this index's own images (index build --card)
        if card is not None:
            summary["detector_card"] = card
    transform = store.get_meta("training_transform")  # the run's transform and where it was read
    if transform is not None and isinstance(summary["index"], dict):
        summary["index"] = {**summary["index"], "training_transform": transform}
    identities = identities_block(checkpoints, index)
    if identities:
        summary["identities"] = identities
    gap = loss_gap_block(checkpoints, config)
    if gap:
        summary["loss_gap"] = gap
    noise = noise_magnitude_summary(checkpoints)
    if noise:
        summary["noise_magnitude"] = noise
    summary.update(seed_dynamics(store, evals, index, config))
    return summary


def index_for_series(index: ReferenceIndex | None, identity: dict, key: str | None) -> Optional[ReferenceIndex]:
    """``index`` when the series' stored rows name its training images: it is the index the series was
    computed against, or grew from it by ``add`` (rows only appended). A rebuilt index is not used: its
    rows may name other images."""
    used = (identity.get("index") or {}).get("content_hash")
    if index is None or not used or index.extends(used):
        return index
    logger.warning("the index %s is not the one evaluation series %s was computed against (content %s, now %s): "
                   "the report shows no training images; rescan to evaluate against it", index.path, key,
                   used, index.content_hash)
    return None


def seed_dynamics(store: RunStore, evals: list, index: ReferenceIndex | None, config: Config) -> dict:
    """Per-seed trajectories and which training images were reproduced (and whether duplicated / simple)."""
    if not evals:
        return {}
    train_ids = index.train_ids if index is not None else None
    table = match_table([(ev.step, store.samples(ev.id)) for ev in evals], train_ids)
    idents = {r.id: r.identity for r in index.records if r.identity} if index is not None else None
    out = {"trajectories": trajectories(table["steps"], table["seeds"], table["matches"], identities=idents or None)}
    if index is not None and "pixel" in index.spaces:
        dup, simple = training_image_factors(index, config)
        out["which_images"] = which_images(index.train_ids, table["steps"], table["matches"], near_duplicates=dup,
                                           bytes_per_pixel=simple, seeds=table["seeds"])
    return out


def training_image_factors(index: ReferenceIndex, config: Config) -> tuple[list[int], list[float]]:
    """Per training image: its near-duplicates inside the training set and its simplicity.

    Near-duplicates: other training images (never another view of the same one) in its train->train list
    within the near-duplicate distance (:func:`memtrack.detectors.core.duplicate_distance`, the definition
    nn_ratio_dedup uses). Simplicity: PNG bytes per pixel at the index resolution.
    """
    import numpy as np

    from memtrack.detectors.core import duplicate_distance
    from memtrack.analysis.dynamics import near_duplicate_counts

    space = index.spaces["pixel"]
    res = int(space.fingerprint["resolution"])
    dup, simple = [0] * index.n_train, [0.0] * index.n_train
    lists = index.train_neighbours("pixel")
    if lists is not None:
        rows, dist = lists
        counts = near_duplicate_counts(dist, duplicate_distance(dist, config.detectors.nn_ratio), "below",
                                       neighbour_ids=np.asarray(rows, np.int64))
        dup = [int(c) for c in counts[:index.n_train]]
    seen = set()
    for vid in range(len(space.rows)):  # the first vector of each record: its image as indexed
        rec = int(space.rows[vid])
        if rec not in seen:
            seen.add(rec)
            simple[rec] = png_bytes_per_pixel(np.asarray(space.vectors[vid]).reshape(3, res, res))
    return dup, simple


def identities_block(checkpoints: list[dict], index: ReferenceIndex | None) -> dict:
    """Leaked identities with the first step each leaked, blended pairs, and the threshold calibration."""
    leaked: dict[str, dict] = {}
    blended: dict[str, dict] = {}
    for ck in sorted(checkpoints, key=lambda c: c["step"]):
        leak = ck["metrics"].get("identity_leak", {})
        for name in leak.get("identities", []):
            leaked.setdefault(name, {"identity": name, "first_step": ck["step"], "checkpoints": 0})
            leaked[name]["checkpoints"] += 1
        for pair in ck["metrics"].get("identity_interpolation", {}).get("pairs", []):
            blended.setdefault(pair, {"pair": pair, "first_step": ck["step"], "checkpoints": 0})
            blended[pair]["checkpoints"] += 1
        if "identities" in leak:
            ck["metrics"]["distinct_identities"] = {"count": len(leak["identities"])}
    if checkpoints:
        latest = checkpoints[-1]["metrics"].get("identity_leak", {}).get("identity_counts", {})
        for name, row in leaked.items():
            row["count"] = latest.get(name, 0)
    meta = index.manifest.get("identity") if index is not None else None
    if not (leaked or blended or meta):
        return {}
    out = {"leaked": sorted(leaked.values(), key=lambda r: (r["first_step"], r["identity"])),
           "blended": sorted(blended.values(), key=lambda r: (r["first_step"], r["pair"]))}
    if meta:
        cal = meta.get("calibration", {})
        out["calibration"] = {**cal, "far": cal.get("far_target")}
        out["groups"] = meta.get("groups", {})
    return out


def _baseline_block(index: ReferenceIndex) -> dict:
    out = {}
    for name, stats in index.manifest.get("baseline", {}).items():
        block = dict(stats)
        try:
            vals = index.baseline_values(name)
            block["values"] = [float(v) for v in vals[:5000] if v == v]
        except OSError:
            pass
        out[name] = block
    return out


def build_gallery(store: RunStore, summary: dict, index: ReferenceIndex | None, max_images: int = 12,
                  per_image: int = 5) -> list[dict]:
    """The strongest matches of the run (latest checkpoints first), with sample and training images.

    At most ``per_image`` items (one per seed) for each of at most ``max_images`` training images (a blend
    counts as its first image), so that a run whose seeds all copy one image still shows the others; the
    report groups the items by training image (:func:`memtrack.report.html_gallery.group_matches`).
    """
    items, seen, per = [], set(), {}
    pngs: dict = {}
    key = (summary.get("series") or {}).get("key")
    evals = {e.checkpoint: e for e in store.evaluations(series=key)} if key else {}
    for ck in sorted(summary["checkpoints"], key=lambda c: -c["step"]):
        ev = evals.get(ck["checkpoint"])
        if ev is None:
            continue
        samples = {s["sample"]: s for s in store.samples(ev.id)}
        for m in ck.get("top_matches", []):
            tid = m.get("train_id")
            full = tid not in per and len(per) >= max_images
            if (m["seed"], tid) in seen or full or per.get(tid, 0) >= per_image:
                continue
            seen.add((m["seed"], tid))
            s = samples.get(m.get("sample", -1))
            if s is None or not s.get("thumb"):
                continue
            try:
                sample_png = (store.folder / s["thumb"]).read_bytes()
            except OSError:
                continue
            per[tid] = per.get(tid, 0) + 1
            items.append(_gallery_item(ck["step"], m, sample_png, index, pngs))
    return items


def _gallery_item(step: int, m: dict, sample_png: bytes, index: ReferenceIndex | None, pngs: dict) -> dict:
    """One gallery item; ``pngs`` caches the training thumbnails by (row, id), encoded once per image."""
    def train_png(rec):
        key = (rec.id, rec.path) if rec is not None else None
        if key not in pngs:
            pngs[key] = _train_png(rec)
        return pngs[key]

    rec = _record(index, m.get("train_row"), m.get("train_id"))
    blend = None
    if m.get("train_row_b") is not None:
        rec_b = _record(index, m["train_row_b"], m.get("train_id_b"))
        blend = {"a_png": train_png(rec), "b_png": train_png(rec_b),
                 "a": m.get("identity_a") or m.get("train_id"), "b": m.get("identity_b") or m.get("train_id_b")}
    return {"step": step, "seed": m["seed"], "detector": m["detector"], "score": m["score"],
            "threshold": m.get("threshold"), "direction": m.get("direction"),
            "sample_png": sample_png, "train_png": train_png(rec), "train_id": m.get("train_id"),
            "caption": rec.caption if rec else None,
            "identity": m.get("identity") or (rec.identity if rec else None), "blend": blend}


def _record(index: ReferenceIndex | None, row, train_id=None):
    """The training record of a stored match, when the index still holds it at that row."""
    if index is None or row is None or row < 0 or row >= len(index.records):
        return None
    rec = index.records[row]
    return rec if train_id is None or rec.id == train_id else None


def _train_png(rec) -> bytes | None:
    if rec is None:
        return None
    from memtrack.scan.tracker import THUMB_SIZE, png_bytes

    try:
        return png_bytes(open_image(rec.path), THUMB_SIZE)
    except DataError:
        return None
