"""``memtrack check``: the embed -> search -> detect path on any folder of generated images.

No checkpoint is needed: images from any model or service are judged against the reference index with the
same detectors and thresholds as a scan.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memtrack.config import load_config
from memtrack.data.dataset import open_image, read_images
from memtrack.errors import DataError
from memtrack.index.reference import ReferenceIndex
from memtrack.detectors.metrics import not_applicable_block, rate_block
from memtrack.scan.tracker import embedders_for, thresholds_block
from memtrack.detectors.registry import run_detectors  # noqa: F401  (re-exported for API users)


def check_folder(images_dir: str | Path, index_dir: str | Path, config: str | Path | None = None,
                 batch_size: int = 64) -> dict:
    """Judge every image in ``images_dir`` against the index.

    Returns ``{"images": [{"file", "flags", "scores", "matches"}], "rates": {detector: {rate, ci_low,
    ci_high, count, n}}, "thresholds": {...}, "skipped": [...]}``.
    """
    from memtrack.scan.tracker import Tracker

    cfg = load_config(config)
    ref = ReferenceIndex.open(index_dir)
    tracker = Tracker(ref, embedders_for(ref, cfg), cfg)
    paths, skipped = read_images(images_dir, cfg.data.max_image_pixels)
    if not paths:
        raise DataError(f"no readable images in {images_dir}", hint="memtrack check reads png/jpg/webp/... files")
    folder = Path(images_dir)
    results, flags_by_name, outputs_all = [], {}, []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        outputs = tracker.assess([open_image(p, cfg.data.max_image_pixels) for p in batch])
        outputs_all.extend(outputs)
        for j, p in enumerate(batch):
            results.append(_image_entry(p.relative_to(folder).as_posix(), j, outputs, ref))
        for o in outputs:
            flags_by_name.setdefault(o.name, []).append(o)
    rates = {name: _rates(chunks) for name, chunks in flags_by_name.items()}
    return {"images": results, "rates": rates, "thresholds": thresholds_block(outputs_all, cfg),
            "skipped": [s.to_dict() for s in skipped]}


def _image_entry(name: str, j: int, outputs, ref) -> dict:
    """One image's flags, scores and matches; detectors outside their regime are left out."""
    entry = {"file": name, "flags": {}, "scores": {}, "matches": []}
    for o in outputs:
        if not o.applicable:
            continue
        judged = bool(o.judged_mask()[j])
        entry["flags"][o.name] = bool(o.flagged[j]) and judged
        entry["scores"][o.name] = float(o.score[j]) if judged else None
        for key, arr in o.extra.items():
            v = np.asarray(arr)[j]
            entry["scores"][f"{o.name}.{key}"] = v if v is None or isinstance(v, str) else float(v)
        row = int(o.match[j])
        if row >= 0 and judged:
            entry["matches"].append({"detector": o.name, "train_id": ref.records[row].id,
                                     "score": float(o.score[j]), "flagged": bool(o.flagged[j])})
    return entry


def _rates(chunks) -> dict:
    """The rate over every batch of one detector (not applicable when it was in no batch)."""
    live = [o for o in chunks if o.applicable]
    if not live:
        return not_applicable_block(chunks[0].reason or "outside the detector's regime")
    return rate_block(np.concatenate([o.flagged[o.judged_mask()] for o in live]))
