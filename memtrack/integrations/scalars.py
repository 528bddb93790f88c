"""What every logger gets from one checkpoint: the ``memtrack/<metric>`` scalars and the strongest-matches
grid (generated sample | nearest training image, strongest first), and how they reach accelerate's trackers.

:mod:`.logging` (tensorboard) and :mod:`.wandb_sink` log the same two things through here.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from PIL import Image

from memtrack.data.records import open_image
from memtrack.errors import DataError
from memtrack.utils import get_logger

logger = get_logger(__name__)

PREFIX = "memtrack/"
TILE = 64
GRID_TAG = PREFIX + "strongest_matches"


def result_scalars(result) -> dict:
    """``{"memtrack/<metric>": rate, ..., "memtrack/distinct_train_images": n}`` of one evaluation."""
    values = {f"{PREFIX}{name}": float(m["rate"]) for name, m in result.metrics.items() if "rate" in m}
    values[f"{PREFIX}distinct_train_images"] = int(result.distinct_train_images)
    return values


def match_grid(tracker, ck, result, max_pairs: Optional[int] = None) -> Optional[np.ndarray]:
    """An HWC uint8 image: one row per strong match, the sample's thumbnail beside its training image.

    Built from what the evaluation stored (sample thumbnails) and the index (training images); None when
    nothing was flagged or the tracker has no store (non-main processes).
    """
    if tracker.store is None or not result.top_matches:
        return None
    max_pairs = max_pairs or tracker.config.tracking.grid_matches
    thumbs = tracker.store.thumb_dir(getattr(result, "eval_key", None) or tracker.eval_key(ck), ck.name)
    rows, seen = [], set()
    for m in result.top_matches:
        key = (m.get("sample"), m.get("train_row"))
        if key in seen or len(rows) >= max_pairs:
            continue
        seen.add(key)
        sample = _tile(thumbs / f"{int(m.get('sample', -1)):05d}.png")
        train = _train_tile(tracker.index, m.get("train_row"))
        if sample is not None:
            rows.append(np.concatenate([sample, train if train is not None else np.zeros_like(sample)], axis=1))
    return np.concatenate(rows, axis=0) if rows else None


def _tile(source) -> Optional[np.ndarray]:
    try:
        im = open_image(source) if not isinstance(source, Image.Image) else source
    except (DataError, OSError):
        return None
    return np.asarray(im.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), dtype=np.uint8)


def _train_tile(index, row) -> Optional[np.ndarray]:
    if index is None or row is None or not 0 <= int(row) < len(index.records):
        return None
    return _tile(index.records[int(row)].path)


# ------------------------------------------------------------------------------- accelerate trackers


def log_to_accelerator(accelerator: Any, result, grid: Optional[np.ndarray], *, scalars: bool = True) -> None:
    """Log ``result`` (and the match grid) to ``accelerator.trackers`` at the checkpoint's step.

    Only the main process logs (accelerate's trackers live there). ``scalars=False`` when the
    :class:`~memtrack.scan.tracker.Tracker` already logged them itself (it does when it holds the accelerator).
    """
    if accelerator is None or not getattr(accelerator, "is_main_process", True):
        return
    trackers = list(getattr(accelerator, "trackers", None) or [])
    if not trackers:
        return
    if scalars:
        accelerator.log(result_scalars(result), step=result.step)
    if grid is None:
        return
    for t in trackers:
        try:
            if t.name == "tensorboard":
                t.log_images({GRID_TAG: grid[None]}, step=result.step, dataformats="NHWC")
            else:
                t.log_images({GRID_TAG: [grid]}, step=result.step)
        except (NotImplementedError, AttributeError, TypeError, ValueError) as exc:
            logger.info("tracker %s takes no images (%s); the match grid is not logged there", t.name, exc)


# ----------------------------------------------------------------------------------- sidecar sink
