"""In-process tracking: wrap ``Accelerator.save_state`` and evaluate each checkpoint after it is saved.

diffusers' scripts call ``accelerator.save_state(output_dir/"checkpoint-N")`` inside
``if accelerator.is_main_process:``. With several processes, only rank 0 is in ``save_state``; the other
ranks are already on their way to the next step's gradient all-reduce. Any collective started inside
``save_state`` -- a gather of samples, a barrier -- would wait forever for ranks that never come. So:

* **deferred** (the default with several processes): ``save_state`` returns untouched; rank 0 only notes
  the checkpoint. Every rank passes through ``Accelerator.backward``, ``wait_for_everyone`` and
  ``end_training`` at the same points, so those are wrapped: before the original runs, rank 0 broadcasts
  the step of a pending checkpoint (one 8-byte broadcast per call, -1 when there is none). When there is
  one, every rank loads it, samples its share of the seed plan (:meth:`SamplePlan.shard`), the samples are
  gathered on rank 0, which detects, stores and logs; then training resumes. The evaluation starts at the
  first backward after the save -- before the deletion that ``--checkpoints_total_limit`` performs at the
  next save, so nothing needs protecting.
* **rank0** (``tracking.in_process: rank0``): rank 0 evaluates alone, with the whole plan, inside
  ``save_state``. No collective is involved, so nothing can deadlock, and the per-step broadcast is
  avoided; but the other ranks sit in their next all-reduce for the whole evaluation.

The NCCL timeout trade-off: a rank waiting in a collective is killed after the process group's timeout
(torch's NCCL default is 10 minutes; ``train_unconditional.py`` raises it to 2 hours with
``InitProcessGroupKwargs``). With *deferred*, ranks wait only while rank 0 runs detection on the gathered
samples (sampling itself is shared), so the wait is short. With *rank0*, they wait for the whole
evaluation: keep ``num_samples x num_inference_steps`` small enough to finish well inside the timeout,
raise the timeout, or use the sidecar, which never blocks training.

Example:
    >>> hook = SaveStateHook(build_tracker, run_dir="runs/ddpm")
    >>> hook.install()          # before the script creates its Accelerator
    >>> ...                     # training; each checkpoint-N is evaluated
    >>> hook.finalize()         # main process: the final pipeline, anything left
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable, Optional

from memtrack.sampling.checkpoints import inspect
from memtrack.utils import get_logger
from memtrack.integrations.scalars import log_to_accelerator, match_grid

logger = get_logger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
WRAPPED = ("save_state", "backward", "wait_for_everyone", "end_training")

#: ``build(accelerator_or_None) -> Tracker``: the accelerator is passed when the tracker may use its
#: collectives (the deferred evaluation, a single process), None for a tracker that must not.
TrackerFactory = Callable[[Any], Any]


class SaveStateHook:
    """Evaluates every ``checkpoint-N`` that ``Accelerator.save_state`` writes, without deadlocks.

    Args:
        build: makes the :class:`~memtrack.scan.tracker.Tracker` (see :data:`TrackerFactory`).
        run_dir: the training output dir (default: the parent of the first checkpoint saved).
        strategy: ``deferred`` or ``rank0`` (see the module doc); one process always evaluates at once.
    """

    def __init__(self, build: TrackerFactory, *, run_dir: str | Path | None = None, strategy: str = "deferred"):
        if strategy not in ("deferred", "rank0"):
            raise ValueError(f"strategy must be 'deferred' or 'rank0', got {strategy!r}")
        self.build = build
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.strategy = strategy
        self.pending: list[tuple[int, str]] = []
        self.results: list = []
        self.accelerator = None
        self._trackers: dict = {}
        self._depth = 0  # > 0 inside save_state or an evaluation: no sync there
        self._originals: dict = {}
        self._warned = False

    # ------------------------------------------------------------------------------- installation
    def install(self) -> "SaveStateHook":
        """Wrap the methods on the ``Accelerator`` class (so the script's own instance is covered)."""
        from accelerate import Accelerator

        if self._originals:
            return self
        for name in WRAPPED:
            self._originals[name] = getattr(Accelerator, name)
        hook = self

        @functools.wraps(self._originals["save_state"])
        def save_state(acc, output_dir=None, *args, **kwargs):
            hook._depth += 1
            try:
                location = hook._originals["save_state"](acc, output_dir, *args, **kwargs)
            finally:
                hook._depth -= 1
            hook.after_save(acc, location or output_dir)
            return location

        def synced(name):
            original = self._originals[name]

            @functools.wraps(original)
            def method(acc, *args, **kwargs):
                hook.sync(acc)
                return original(acc, *args, **kwargs)
            return method

        Accelerator.save_state = save_state
        for name in WRAPPED[1:]:
            setattr(Accelerator, name, synced(name))
        return self

    def uninstall(self) -> None:
        from accelerate import Accelerator

        for name, fn in self._originals.items():
            setattr(Accelerator, name, fn)
        self._originals = {}

    # --------------------------------------------------------------------------------- the hooks
    def after_save(self, acc, location) -> None:
        """Called on every process that ran ``save_state``, after it returned."""
        self.accelerator = acc
        path = Path(location) if location is not None else None
        m = _CKPT.match(path.name) if path is not None else None
        if m is None:
            if not self._warned:
                logger.warning("memtrack evaluates checkpoint-<step> folders; %s is not one, so it (and any "
                               "like it) is not evaluated", location)
                self._warned = True
            return
        if self.run_dir is None:
            self.run_dir = path.parent
        step = int(m.group(1))
        if not acc.is_main_process:
            return
        if acc.num_processes <= 1 or self.strategy == "rank0":
            self._evaluate(acc, path, step, collective=False)
        else:
            self.pending.append((step, str(path)))

    def sync(self, acc) -> None:
        """The point every rank reaches: run the deferred evaluation of a pending checkpoint, if any."""
        self.accelerator = acc
        if self._depth or acc.num_processes <= 1 or self.strategy != "deferred":
            return
        import torch
        from accelerate.utils import broadcast, broadcast_object_list

        step = self.pending[0][0] if acc.is_main_process and self.pending else -1
        flag = broadcast(torch.tensor([step], dtype=torch.long, device=acc.device), from_process=0)
        step = int(flag.item())
        if step < 0:
            return
        box = [self.pending.pop(0)[1] if acc.is_main_process else None]
        broadcast_object_list(box, from_process=0)
        self._evaluate(acc, Path(box[0]), step, collective=True)

    # ------------------------------------------------------------------------------- evaluation
    def _tracker(self, acc, collective: bool):
        # "shared" holds the accelerator (its collectives, its trackers); "alone" must never touch them
        key = "shared" if acc is not None and (collective or acc.num_processes <= 1) else "alone"
        if key not in self._trackers:
            self._trackers[key] = self.build(acc if key == "shared" else None)
        return self._trackers[key]

    def _evaluate(self, acc, path: Path, step: int, *, collective: bool):
        self._depth += 1
        try:
            tracker = self._tracker(acc, collective)
            ck = inspect(path, step, path.name, tracker.config.sampling.prefer_ema)
            if collective:  # every rank must take the same branch
                from accelerate.utils import gather_object

                readable = all(gather_object([ck is not None]))
            else:
                readable = ck is not None
            if not readable:
                from memtrack.integrations.watch import placeholder_checkpoint

                result = tracker.skip(placeholder_checkpoint(path, step, path.name),
                                      "unknown layout: no unet/, unet_ema/ or LoRA weights")
            else:
                result = tracker.evaluate(ck)
                logger.info("%s evaluated in-process%s", ck.name,
                            f" across {acc.num_processes} processes" if collective else " on the main process")
                if acc.is_main_process and not (result.skipped or result.cached):
                    grid = match_grid(tracker, ck, result) if tracker.config.tracking.log_images else None
                    log_to_accelerator(acc, result, grid, scalars=tracker.accelerator is None)
            if acc.is_main_process:
                self.results.append(result)
            return result
        finally:
            self._depth -= 1

    def finalize(self) -> list:
        """After the script returned, on the main process: what no sync point reached, then a sweep
        (the final pipeline, any checkpoint not yet stored). Runs alone: the process group may be gone."""
        acc = self.accelerator
        if acc is not None and not acc.is_main_process:
            return []
        if self.pending:
            logger.info("evaluating %d checkpoint(s) saved after the last sync point on the main process alone",
                        len(self.pending))
        while self.pending:
            step, path = self.pending.pop(0)
            self._evaluate_alone(Path(path), step)
        if self.run_dir is None:
            return self.results
        from memtrack.integrations.watch import sweep

        tracker = self._tracker(None, collective=False)
        self.results.extend(sweep(tracker, self.run_dir))
        return self.results

    def _evaluate_alone(self, path: Path, step: int) -> Optional[Any]:
        tracker = self._tracker(None, collective=False)
        ck = inspect(path, step, path.name, tracker.config.sampling.prefer_ema)
        if ck is None:
            return None
        result = tracker.evaluate(ck)
        self.results.append(result)
        return result

    def close(self) -> None:
        for tracker in self._trackers.values():
            tracker.close()
        self._trackers = {}


def track_accelerator(index: str | Path, config: str | Path | None = None, *, run_dir: str | Path | None = None,
                      store_dir: str | Path | None = None, overrides: dict | None = None) -> SaveStateHook:
    """One line for a custom script: evaluate every ``checkpoint-N`` its ``Accelerator`` saves.

    Call it (on every process) before training; call ``.finalize()`` at the end for the final pipeline.

    Example:
        >>> hook = track_accelerator("ref/", "configs/unconditional.yaml", run_dir=args.output_dir)
        >>> ...  # accelerator.save_state(f"{args.output_dir}/checkpoint-{step}") as usual
        >>> hook.finalize()
    """
    from memtrack.config import load_config
    from memtrack.integrations.options import TrackingOptions, make_factory

    opts = TrackingOptions(str(index), str(config) if config else None, dict(overrides or {}),
                           str(store_dir) if store_dir else None, str(run_dir) if run_dir else None)
    strategy = load_config(opts.config, opts.overrides).tracking.in_process
    return SaveStateHook(make_factory(opts), run_dir=run_dir, strategy=strategy).install()
