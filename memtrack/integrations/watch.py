"""The sidecar: follow a training run's output dir and evaluate every checkpoint it saves.

The training script is not touched. A *stager* thread looks at the output dir every
``tracking.poll_interval_s`` seconds; a ``checkpoint-N`` folder is ready once accelerate has written
``random_states_0.pkl`` (it writes it last) and no file in it has changed for ``tracking.quiet_period_s``.
The stager then hardlinks the files memtrack reads (``unet/`` or ``unet_ema/``, ``text_encoder/``, the
LoRA file; a copy where hardlinks are impossible) into ``<run>/memtrack/staging/step-N`` -- so when
``--checkpoints_total_limit`` deletes the folder a moment later, the staged files live on -- and queues it.
The main thread evaluates the queue in step order. A checkpoint that vanishes before it could be staged,
or whose layout memtrack does not know, is recorded as skipped in the store, with a warning naming it, and
never retried.

When the training process exits, :meth:`Watcher.finish` evaluates what is left: the last checkpoints
(no quiet period needed any more) and the final pipeline or LoRA weights saved in the output dir.

Example:
    >>> tracker = Tracker.from_config("configs/unconditional.yaml", index="ref/", run_dir="runs/ddpm")
    >>> Watcher(tracker, "runs/ddpm").run(is_alive=lambda: proc.poll() is None)
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from memtrack.sampling.checkpoints import LORA_FILE, Checkpoint, discover, inspect
from memtrack.errors import CheckpointError
from memtrack.utils import get_logger
from memtrack.integrations.logging import log_to_accelerator, match_grid, sinks_for_run

logger = get_logger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "random_states_0.pkl"
STAGED = ("unet", "unet_ema", "text_encoder", LORA_FILE, COMPLETE_MARKER)


@dataclass
class Event:
    """What the stager hands the evaluator: a staged checkpoint, or one that is gone."""

    name: str
    step: int
    staged: Optional[Path] = None
    reason: Optional[str] = None


# ------------------------------------------------------------------------------------------- staging


def stage(src: Path, dest: Path) -> Path:
    """Hardlink (or copy) the files memtrack reads from checkpoint ``src`` into ``dest``.

    Hardlinks share the file's data, so the staged copy survives ``shutil.rmtree(src)`` and costs no
    space; modification times are kept either way, so the checkpoint's fingerprint is unchanged.

    Raises:
        FileNotFoundError: ``src`` (or a file in it) vanished while it was being staged.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        for name in STAGED:
            path = src / name
            if path.is_dir():
                for f in sorted(path.rglob("*")):
                    if f.is_file():
                        _link(f, dest / f.relative_to(src))
            elif path.is_file():
                _link(path, dest / name)
        if not any(dest.iterdir()):
            raise FileNotFoundError(f"{src} is gone")
    except FileNotFoundError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except FileNotFoundError:
        raise
    except OSError:  # another file system, or links not supported: copy, keeping the mtime
        shutil.copy2(src, dest)


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for f in folder.rglob("*"):
        newest = max(newest, f.stat().st_mtime)
    return newest


def checkpoint_dirs(run_dir: Path) -> dict[str, int]:
    """``{name: step}`` of the ``checkpoint-N`` folders in ``run_dir`` now."""
    out = {}
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return out
    for e in entries:
        m = _CKPT.match(e.name)
        if m and e.is_dir():
            out[e.name] = int(m.group(1))
    return out


# ------------------------------------------------------------------------------------------- watcher


class Watcher:
    """Evaluates each checkpoint of a run once, as it appears.

    Args:
        tracker: the :class:`~memtrack.scan.tracker.Tracker` (holding the run's store).
        run_dir: the training script's ``--output_dir``.
        sink: where results are logged: ``"auto"`` (the sinks ``tracking.loggers`` names, see
            :func:`~.logging.sinks_for_run`), another sink, or None (store only).
        on_result: called with ``(checkpoint, result)`` after each evaluation; returning True stops the
            watcher (``--stop-on`` gates use this).
    """

    def __init__(self, tracker, run_dir: str | Path, *, sink="auto", on_result: Callable | None = None):
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        cfg = tracker.config.tracking
        self.poll_interval = cfg.poll_interval_s
        self.quiet_period = cfg.quiet_period_s
        self.prefer_ema = tracker.config.sampling.prefer_ema
        self.sink = sinks_for_run(self.run_dir, cfg) if sink == "auto" else sink
        self.on_result = on_result
        folder = tracker.store.folder if tracker.store is not None else self.run_dir / "memtrack"
        self.staging = folder / "staging"
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.results: list = []
        self.stopped = False
        self._claimed: set[str] = set()    # staged or given up on by the stager (never twice)
        self._seen: dict[str, int] = {}    # folders seen on disk, not yet claimed
        self._done: set[str] = set()       # evaluated or skipped by the evaluator

    # 1. the stager: look, stage what is ready, report what vanished
    def scan_once(self, *, final: bool = False) -> None:
        """One look at the output dir. ``final``: the trainer has exited; no quiet period applies."""
        present = checkpoint_dirs(self.run_dir)
        for name, step in sorted(present.items(), key=lambda kv: kv[1]):
            if name in self._claimed:
                continue
            self._seen[name] = step
            src = self.run_dir / name
            try:
                if not (src / COMPLETE_MARKER).is_file():
                    if final:
                        self._give_up(name, step, "half-written: accelerate never wrote random_states_0.pkl")
                    continue
                if not final and time.time() - _newest_mtime(src) < self.quiet_period:
                    continue
                staged = stage(src, self.staging / f"step-{step}")
            except FileNotFoundError:
                continue  # vanished mid-look; reported below when it is really gone
            self._claimed.add(name)
            self._seen.pop(name, None)
            self.events.put(Event(name, step, staged=staged))
        for name, step in list(self._seen.items()):
            if name not in present:
                self._give_up(name, step, "vanished before it could be read (deleted by --checkpoints_total_limit?)")

    def _give_up(self, name: str, step: int, reason: str) -> None:
        self._claimed.add(name)
        self._seen.pop(name, None)
        self.events.put(Event(name, step, reason=reason))

    # 2. the evaluator: everything queued, in step order
    def drain(self) -> list:
        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                break
        out = []
        for ev in sorted(events, key=lambda e: e.step):
            if self.stopped or ev.name in self._done:
                continue
            out.append(self._handle(ev))
        return out

    def _handle(self, ev: Event):
        self._done.add(ev.name)
        if ev.staged is None:
            return self.tracker.skip(placeholder_checkpoint(self.run_dir / ev.name, ev.step, ev.name), ev.reason)
        try:
            ck = inspect(ev.staged, ev.step, ev.name, self.prefer_ema)
            if ck is None:
                return self.tracker.skip(placeholder_checkpoint(ev.staged, ev.step, ev.name),
                                         "unknown layout: no unet/, unet_ema/ or LoRA weights")
            return self._evaluate(ck)
        finally:
            shutil.rmtree(ev.staged, ignore_errors=True)

    def _evaluate(self, ck: Checkpoint):
        result = self.tracker.evaluate(ck)
        self.results.append(result)
        if not result.skipped and not result.cached:
            grid = match_grid(self.tracker, ck, result) if self.tracker.config.tracking.log_images else None
            if self.sink is not None:
                self.sink.log(result, grid)
            log_to_accelerator(self.tracker.accelerator, result, grid, scalars=False)
        if self.on_result is not None and self.on_result(ck, result):
            self.stopped = True
        return result

    # 3. the loop
    def run(self, is_alive: Callable[[], bool] = lambda: True, *, idle_timeout: float | None = None) -> list:
        """Stage in a background thread and evaluate here until ``is_alive()`` turns False (then
        :meth:`finish`), a stop is requested by ``on_result``, or nothing new came for ``idle_timeout`` s."""
        stop = threading.Event()
        failed: list = []

        def stager():
            while not stop.is_set():
                try:
                    self.scan_once()
                except OSError as exc:  # a transient listing error must not end the watch
                    logger.warning("could not look at %s: %s", self.run_dir, exc)
                except Exception as exc:  # anything else is a bug: end the watch, loudly, from the main thread
                    failed.append(exc)
                    return
                stop.wait(self.poll_interval)

        thread = threading.Thread(target=stager, name="memtrack-stager", daemon=True)
        thread.start()
        last_new = time.monotonic()
        try:
            while is_alive() and not self.stopped:
                if failed:
                    raise failed[0]
                if self.drain():
                    last_new = time.monotonic()
                elif idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
                    break
                time.sleep(min(self.poll_interval, 0.5))
        finally:
            stop.set()
            thread.join()
        if not self.stopped:
            self.finish()
        return self.results

    def finish(self) -> list:
        """After training: evaluate the remaining checkpoints, then the final pipeline / LoRA weights."""
        self.scan_once(final=True)
        out = self.drain()
        if self.stopped:
            return out
        final = final_checkpoint(self.run_dir, self.prefer_ema)
        if final is not None and final.name not in self._done:
            self._done.add(final.name)
            out.append(self._evaluate(final))
        if self.sink is not None:
            self.sink.close()
        return out


def final_checkpoint(run_dir: Path, prefer_ema: bool = True) -> Optional[Checkpoint]:
    """The final pipeline / LoRA weights saved in ``run_dir`` (None when absent or identical to the last
    checkpoint, following :func:`~memtrack.sampling.checkpoints.discover`)."""
    try:
        cks = discover(run_dir, prefer_ema=prefer_ema, include_final=True)
    except CheckpointError:
        return None
    return cks[-1] if cks[-1].name == "final" else None


def sweep(tracker, run_dir: str | Path) -> list:
    """Evaluate every complete checkpoint and the final pipeline not yet in the store (after training)."""
    return Watcher(tracker, run_dir).finish()


def placeholder_checkpoint(path: Path, step: int, name: str) -> Checkpoint:
    """A record for a checkpoint that cannot be read, so its skip can be stored."""
    return Checkpoint(step, path, name, "unet", path / "unet", "unknown", files=[])
