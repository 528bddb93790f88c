"""Put each checkpoint's memorization rates next to the training loss.

In-process (and :meth:`Tracker.step`), rates go to the training run's own accelerate trackers
(``accelerator.log``: tensorboard by default, wandb when the script uses it) under ``memtrack/`` at the
checkpoint's step. The sidecar runs in another process, so it cannot reach those trackers: it logs through
the sinks ``tracking.loggers`` names (:func:`sinks_for_run`) -- ``tensorboard``, its own event file
(``*.memtrack``) in the script's tensorboard folder, which TensorBoard merges into the same run, and
``wandb``, a wandb run of its own grouped with the training run (:mod:`.wandb_sink`). All of them also log
the strongest matches as one image: a grid of (generated sample | nearest training image) pairs,
strongest first.

Example:
    >>> sink = TensorBoardSink.for_run("runs/ddpm")
    >>> sink.log(result, match_grid(tracker, ck, result))
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from memtrack.config import LOGGERS
from memtrack.integrations.scalars import (GRID_TAG, PREFIX, TILE, log_to_accelerator, match_grid,  # noqa: F401
                                           result_scalars)
from memtrack.utils import get_logger

logger = get_logger(__name__)

class TensorBoardSink:
    """A ``SummaryWriter`` of memtrack's own, writing into the training script's tensorboard folder.

    Args:
        log_dir: the folder; created on first use.
        search: instead of ``log_dir``: the folder to find the script's event files under.
        fallback: the folder to write to when ``search`` holds none (see :meth:`for_run`).
    """

    def __init__(self, log_dir: str | Path | None = None, *, search: str | Path | None = None,
                 fallback: str | Path | None = None):
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._search = Path(search) if search is not None else None
        self._fallback = Path(fallback) if fallback is not None else None
        self._writer = None
        self._failed = False

    @classmethod
    def for_run(cls, run_dir: str | Path, logging_dir: str | Path | None = None) -> "TensorBoardSink":
        """The sink of a training run. At the first result (the script creates its writer after memtrack
        starts) it looks under ``run_dir/logging_dir`` (``logging_dir``: the script's ``--logging_dir``;
        default: all of ``run_dir``) for the folder of the script's newest event file, and writes there;
        with none, into ``run_dir/logging_dir/memtrack`` (``run_dir/logs/memtrack`` by default)."""
        run_dir = Path(run_dir)
        root = run_dir / logging_dir if logging_dir is not None else run_dir
        fallback = root / "memtrack" if logging_dir is not None else run_dir / "logs" / "memtrack"
        return cls(search=root, fallback=fallback)

    @property
    def log_dir(self) -> Path:
        if self._log_dir is None:
            found = find_event_dir(self._search) if self._search is not None and self._search.is_dir() else None
            self._log_dir = found or self._fallback
        return self._log_dir

    def log(self, result, grid: Optional[np.ndarray] = None) -> None:
        writer = self._open()
        if writer is None:
            return
        for tag, value in result_scalars(result).items():
            writer.add_scalar(tag, value, global_step=result.step)
        if grid is not None:
            writer.add_image(GRID_TAG, grid, global_step=result.step, dataformats="HWC")
        writer.flush()

    def _open(self):
        if self._writer is None and not self._failed:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._failed = True
                logger.warning("tensorboard is not installed; memtrack results are stored but not logged "
                               "to tensorboard (pip install tensorboard)")
                return None
            self._writer = SummaryWriter(str(self.log_dir), filename_suffix=".memtrack")
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def find_event_dir(run_dir: Path) -> Optional[Path]:
    """The folder of the newest tensorboard event file under ``run_dir`` that memtrack did not write."""
    found = [p for p in Path(run_dir).rglob("events.out.tfevents.*")
             if not p.name.endswith(".memtrack") and "memtrack" not in p.relative_to(run_dir).parts[:1]]
    if not found:
        return None
    return max(found, key=lambda p: p.stat().st_mtime).parent


# ------------------------------------------------------------------------------------ sink registry

#: ``name -> factory(run_dir, tracking_config) -> sink`` (a sink has ``log(result, grid)`` and ``close()``)
SINKS: dict[str, Callable] = {}


def register_sink(name: str, factory: Callable, *, overwrite: bool = False) -> None:
    """Make ``name`` usable in ``tracking.loggers``; refuses to replace a sink unless ``overwrite``."""
    if not name or not name.isidentifier():
        raise ValueError(f"sink names are identifiers, got {name!r}")
    if name in SINKS and not overwrite:
        raise ValueError(f"sink {name!r} is already registered")
    SINKS[name] = factory
    LOGGERS.add(name)


def _wandb_sink(run_dir, tracking):
    from memtrack.integrations.wandb_sink import WandbSink  # wandb is optional: imported only when asked for

    return WandbSink.for_run(run_dir, tracking)


register_sink("tensorboard", lambda run_dir, tracking: TensorBoardSink.for_run(run_dir, tracking.logging_dir))
register_sink("wandb", _wandb_sink)


class Sinks:
    """Several sinks as one: each result goes to all of them."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)

    def log(self, result, grid: Optional[np.ndarray] = None) -> None:
        for sink in self.sinks:
            sink.log(result, grid)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def sinks_for_run(run_dir: str | Path, tracking) -> Sinks:
    """The sidecar's sinks for a training run: one per name in ``tracking.loggers``."""
    return Sinks([SINKS[name](run_dir, tracking) for name in tracking.loggers])
