"""``memtrack launch``: start an unmodified training command and track every checkpoint it saves.

The command is run as given (``accelerate launch ... train.py ...``, ``python train.py ...``, ``torchrun
...``). memtrack reads the script's own flags from it -- ``--output_dir`` (required: where checkpoints
appear and where ``memtrack/`` is kept), ``--pretrained_model_name_or_path`` (the base pipeline of
text-to-image, DreamBooth and LoRA runs), ``--instance_prompt``, ``--resolution``, ``--ddpm_num_steps``,
``--ddpm_beta_schedule``, ``--prediction_type``, ``--logging_dir`` -- and uses each where the config file
leaves the matching field unset. It also reads the training transform (``--resolution``, ``--center_crop``,
``--random_flip``, ``--image_interpolation_mode``; :mod:`.transform`) and refuses, before training starts,
an index whose pixel space was built for another one.

Two modes:

* **sidecar** (default): this process follows the output dir with a :class:`~.watch.Watcher` while the
  command runs, on ``--device``; it never blocks training.
* **in-process** (``--in-process``): the command's script is run through
  ``-m memtrack.integrations.inprocess`` (see :mod:`.hooks`), so every rank samples its share right after
  each save; this process only waits, watches the gates, and after a crash evaluates what exists.

The exit code is the training command's. With ``--stop-on`` gates, a tripped gate stops training
(SIGTERM, then SIGKILL after 30 s) and the exit code is 1. When tracking itself fails, training is left
to finish, the error is reported, and the exit code is the training's, or 2 if training succeeded.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from memtrack.errors import ConfigError, MemtrackError
from memtrack.utils import get_logger
from memtrack.integrations.inprocess import ENV, TrackingOptions, script_flag
from memtrack.integrations.transform import verify_run_transform

logger = get_logger(__name__)

INPROCESS_MODULE = "memtrack.integrations.inprocess"
#: script flag -> config field it fills when the config file leaves it unset
SCRIPT_FLAGS = {
    "--pretrained_model_name_or_path": "sampling.pretrained_model",
    "--instance_prompt": "sampling.instance_prompt",
    "--resolution": "sampling.resolution",
    "--ddpm_num_steps": "sampling.num_train_timesteps",
    "--ddpm_beta_schedule": "sampling.beta_schedule",
    "--prediction_type": "sampling.prediction_type",
    "--logging_dir": "tracking.logging_dir",
}
_INT_FIELDS = ("sampling.resolution", "sampling.num_train_timesteps")
KILL_GRACE_S = 30.0


@dataclass
class TrainingCommand:
    """A training command line and the script flags memtrack reads from it."""

    argv: list
    flags: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, argv: Sequence[str]) -> "TrainingCommand":
        argv = list(argv)
        if argv and argv[0] == "--":
            argv = argv[1:]
        if not argv:
            raise ConfigError("no training command given", hint="memtrack launch --index ref/ -- accelerate launch "
                                                                 "train.py --output_dir runs/x ...")
        flags = {}
        for name in ["--output_dir", *SCRIPT_FLAGS]:
            value = script_flag(argv, name)
            if value is not None:
                flags[name] = value
        return cls(argv, flags)

    @property
    def output_dir(self) -> Path:
        if "--output_dir" not in self.flags:
            raise ConfigError("the training command has no --output_dir",
                              hint="memtrack follows the script's --output_dir; pass it explicitly")
        return Path(self.flags["--output_dir"])

    def overrides(self, config_path: str | Path | None) -> dict:
        """Config overrides taken from the script's flags, for fields the config file does not set."""
        explicit = _explicit_fields(config_path)
        out = {}
        for flag, dotted in SCRIPT_FLAGS.items():
            if flag in self.flags and dotted not in explicit:
                value = self.flags[flag]
                out[dotted] = int(value) if dotted in _INT_FIELDS and value.isdigit() else value
        return out

    def in_process(self) -> list:
        """The same command with the script run through the in-process module."""
        argv = list(self.argv)
        for i, tok in enumerate(argv[1:], start=1):
            if tok.endswith(".py"):
                return argv[:i] + ["-m", INPROCESS_MODULE] + argv[i:]
            if tok in ("-m", "--module") and i + 1 < len(argv):
                return argv[:i] + ["-m", INPROCESS_MODULE, "--module"] + argv[i + 1:]
        raise ConfigError(f"cannot find the training script in {' '.join(argv)[:200]!r}",
                          hint="the command must run a .py script (or -m module) for --in-process")


def _explicit_fields(config_path) -> set:
    if config_path is None:
        return set()
    import yaml

    try:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return set()  # load_config reports it properly
    return {f"{sec}.{key}" for sec, body in data.items() if isinstance(body, dict) for key in body}


# ------------------------------------------------------------------------------------------- running


@dataclass
class LaunchResult:
    """How a launch ended."""

    exit_code: int
    training_code: Optional[int]
    gate: Optional[str] = None
    error: Optional[str] = None
    results: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["results"] = [r.to_dict() for r in self.results]
        return d


def launch(command: Sequence[str], *, index: str | Path, config: str | Path | None = None,
           overrides: dict | None = None, in_process: bool = False, stop_on: Sequence[str] = (),
           store: str | Path | None = None, env: dict | None = None,
           on_result: Callable | None = None, training_threads: int | None = None) -> LaunchResult:
    """Run ``command`` and track its checkpoints; see the module doc.

    Args:
        command: the training command line (argv list).
        index: the reference index folder.
        config: a memtrack YAML config.
        overrides: dotted config overrides (CLI flags); they win over the script's flags.
        in_process: run the script through :mod:`.inprocess` instead of watching from here.
        stop_on: gate expressions (``'nn_ratio.rate > 0.05'``); one tripping stops training.
        store: the store folder (default ``OUTPUT_DIR/memtrack``).
        env: extra environment variables for the training command.
        on_result: called with ``(checkpoint, result)`` after each evaluation made in this process.
        training_threads: threads for each training process (its ``OMP_NUM_THREADS``...); None leaves the
            command's environment as it was. This process takes the thread budget of
            :mod:`memtrack.budget` (``tracking.threads``, else the cores training leaves).
    """
    from memtrack import budget
    from memtrack.config import load_config
    from memtrack.index.reference import ReferenceIndex
    from memtrack.report.gate import parse_gate

    cmd = TrainingCommand.parse(command)
    run_dir = cmd.output_dir
    merged = {**cmd.overrides(config), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    cfg = load_config(config, merged)  # 1. fail before training starts: config, index, transform, gates
    ref = ReferenceIndex.open(index)
    transform = verify_run_transform(ref, cfg, run_dir, command=cmd.argv)
    for g in stop_on:
        parse_gate(g)
    _record_transform(run_dir, store, transform)
    budget.for_command(cfg, beside_training=True, training_threads=training_threads, training_argv=cmd.argv)
    child_env = {**budget.training_env(os.environ, training_threads), **(env or {})}
    if in_process:
        opts = TrackingOptions(str(index), str(config) if config else None, merged,
                               str(store) if store else None, str(run_dir))
        child_env[ENV] = opts.to_env()
        return _run_in_process(cmd.in_process(), child_env, cfg, ref, run_dir, store, stop_on)
    return _run_sidecar(cmd.argv, child_env, cfg, ref, run_dir, store, stop_on, on_result)


def _record_transform(run_dir, store, record: dict) -> None:
    """Keep the run's transform (and where each value was read) in the run store, for summary.json."""
    from memtrack.store.run_store import RunStore

    rs = RunStore.open(run_dir, folder=store)
    try:
        rs.set_meta("training_transform", record)
    finally:
        rs.close()


def _tracker(cfg, ref, run_dir, store):
    from memtrack.scan.tracker import Tracker

    return Tracker.from_config(cfg, index=ref, run_dir=run_dir, store_dir=store)


def _run_sidecar(argv, env, cfg, ref, run_dir, store, stop_on, on_result=None) -> LaunchResult:
    from memtrack.integrations.watch import Watcher

    tracker = _tracker(cfg, ref, run_dir, store)  # 2. the store exists before the first checkpoint
    tripped: list = []

    def gates(ck, result):
        if on_result is not None:
            on_result(ck, result)
        hit = _tripped(tracker.store, run_dir, stop_on) if stop_on and not result.skipped else None
        if hit:
            tripped.append(hit)
        return bool(hit)

    watcher = Watcher(tracker, run_dir, on_result=gates)
    proc = subprocess.Popen(argv, env=env)  # 3. train
    error = None
    try:
        watcher.run(is_alive=lambda: proc.poll() is None)
    except MemtrackError as exc:
        error = exc.message
        logger.error("tracking stopped: %s; training continues untracked", exc.message)
    except BaseException:
        _stop(proc)
        raise
    finally:
        tracker.close()
    return _ending(proc, tripped, error, watcher.results)


def _run_in_process(argv, env, cfg, ref, run_dir, store, stop_on) -> LaunchResult:
    from memtrack.integrations.watch import sweep

    proc = subprocess.Popen(argv, env=env)
    tripped: list = []
    try:
        while proc.poll() is None:
            hit = _tripped_readonly(run_dir, store, stop_on) if stop_on else None
            if hit:
                tripped.append(hit)
                break
            time.sleep(cfg.tracking.poll_interval_s)
    except BaseException:
        _stop(proc)
        raise
    results, error = [], None
    if not tripped:
        proc.wait()
        tracker = _tracker(cfg, ref, run_dir, store)  # 4. after a crash: what exists (cached when done)
        try:
            results = sweep(tracker, run_dir)
        except MemtrackError as exc:
            error = exc.message
            logger.error("evaluating what the run left failed: %s", exc.message)
        finally:
            tracker.close()
    return _ending(proc, tripped, error, results)


def _ending(proc, tripped, error, results) -> LaunchResult:
    if tripped:
        logger.warning("gate tripped: %s; stopping training", tripped[0])
        _stop(proc)
        return LaunchResult(1, proc.returncode, gate=tripped[0], results=results)
    code = proc.wait()
    exit_code = code if code >= 0 else 128 - code
    if error and exit_code == 0:
        exit_code = 2
    return LaunchResult(exit_code, code, error=error, results=results)


def _tripped(store, run_dir, gates) -> Optional[str]:
    from memtrack.report.gate import check_gates
    from memtrack.analysis.summary import build_summary

    for gate, hit, observed in check_gates(build_summary(store, run_dir), list(gates)):
        if hit:
            return f"{gate.text} (observed {observed})"
    return None


def _tripped_readonly(run_dir, store_dir, gates) -> Optional[str]:
    from memtrack.errors import StoreError
    from memtrack.store.run_store import RunStore

    try:
        store = RunStore.open(run_dir, folder=store_dir, create=False, readonly=True)
    except StoreError:
        return None  # nothing stored yet
    try:
        if not store.evaluations():
            return None
        return _tripped(store, run_dir, gates)
    finally:
        store.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the training command (accelerate/torchrun pass it on to their workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
