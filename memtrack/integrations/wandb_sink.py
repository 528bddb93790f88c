"""The sidecar's wandb logger: a wandb run of memtrack's own, in the training run's project and group.

In-process, memtrack logs through the script's own ``accelerator.trackers``, wandb included. The sidecar is
another process and cannot: it would have to write into the training's run while training writes to it.
wandb keeps one step counter per run and drops anything logged at a step below it, and the sidecar logs
each checkpoint *after* training has moved past that step -- so joining the training run (``WANDB_RUN_ID``
+ resume) would lose most of memtrack's points. Instead the sidecar logs to its own run:

* project: ``tracking.wandb_project``, else ``WANDB_PROJECT``, else ``memtrack`` -- set it to the project
  the script names (diffusers' scripts: ``accelerator.init_trackers("train_unconditional", ...)``);
* group: ``tracking.wandb_group``, else ``WANDB_RUN_GROUP``, else the output dir's name. wandb's own
  ``wandb.init`` reads ``WANDB_RUN_GROUP`` too, so ``WANDB_RUN_GROUP=ddpm-1 memtrack launch ...`` puts the
  training run and memtrack's run in one group, whose charts overlay them by step;
* name ``<output dir>-memtrack``, job type ``memtrack``, and an id derived from the output dir, resumed
  when the sidecar restarts (one memtrack run per training run);
* files under ``WANDB_DIR``, else ``<output dir>/memtrack/`` (never a ``checkpoint*`` name in the output dir).

The keys, values and steps are those of :class:`~.logging.TensorBoardSink`: ``memtrack/<metric>`` rates,
``memtrack/distinct_train_images``, and the match grid ``memtrack/strongest_matches`` as a
``wandb.Image`` list, the form accelerate's ``WandBTracker.log_images`` gives the in-process path.
``WANDB_MODE=offline`` works as everywhere in wandb (``wandb sync`` later).

Example:
    >>> sink = WandbSink.for_run("runs/ddpm", tracker.config.tracking)
    >>> sink.log(result, match_grid(tracker, ck, result))
    >>> sink.close()
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from memtrack.errors import DependencyError
from memtrack.utils import get_logger, stable_hash
from memtrack.integrations.scalars import GRID_TAG, result_scalars

logger = get_logger(__name__)

DEFAULT_PROJECT = "memtrack"


def is_wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


class WandbSink:
    """Logs each evaluation to memtrack's own wandb run (see the module doc for which run).

    Args:
        project, group, name, run_id: passed to ``wandb.init`` (``resume="allow"``).
        dir: the folder wandb writes its run files under.
    """

    def __init__(self, *, project: str, group: Optional[str], name: str, run_id: str, dir: str | Path):
        if not is_wandb_available():
            raise DependencyError("tracking.loggers lists wandb, but wandb is not installed",
                                  hint="pip install 'memtrack[wandb]' (or drop wandb from tracking.loggers)")
        self.init_kwargs = {"project": project, "group": group, "name": name, "id": run_id, "dir": str(dir),
                            "job_type": "memtrack", "resume": "allow"}
        self._run = None
        self._last_step: Optional[int] = None

    @classmethod
    def for_run(cls, run_dir: str | Path, tracking) -> "WandbSink":
        """The sink of a training run's output dir, with ``tracking`` (the config's tracking section)."""
        run_dir = Path(run_dir).resolve()
        folder = Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else run_dir / "memtrack"
        return cls(project=tracking.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                   group=tracking.wandb_group or os.environ.get("WANDB_RUN_GROUP") or run_dir.name,
                   name=f"{run_dir.name}-memtrack", run_id="memtrack-" + stable_hash(str(run_dir))[:16],
                   dir=folder)

    def log(self, result, grid: Optional[np.ndarray] = None) -> None:
        import wandb

        if self._last_step is not None and result.step < self._last_step:
            logger.warning("wandb: step %d comes after step %d; wandb drops steps that go back, so %s is "
                           "not logged there (it is stored)", result.step, self._last_step, result.checkpoint)
            return
        values: dict = dict(result_scalars(result))
        if grid is not None:
            values[GRID_TAG] = [wandb.Image(grid)]
        self._open().log(values, step=result.step)
        self._last_step = result.step

    def _open(self):
        if self._run is None:
            import wandb

            Path(self.init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(**self.init_kwargs)
        return self._run

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
