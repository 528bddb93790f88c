"""The ``watch`` and ``launch`` sub-commands (a plug-in of :mod:`memtrack.cli.main`): parse, call, print."""
from __future__ import annotations

import argparse
import os
import sys

from memtrack.utils import to_json

WATCH_EPILOG = """\
examples:
  memtrack watch runs/ddpm --index ref/                       # until Ctrl-C
  memtrack watch runs/ddpm --index ref/ --device cuda:1 --pid 4242   # until process 4242 exits
  memtrack watch runs/ddpm --index ref/ --once                # what is there now, then exit
"""

LAUNCH_EPILOG = """\
examples:
  memtrack launch --index ref/ --config configs/unconditional.yaml -- \\
      accelerate launch --num_processes 2 train_unconditional.py --train_data_dir data/train \\
      --output_dir runs/ddpm --checkpointing_steps 500
  memtrack launch --in-process --index ref/ --config configs/lora.yaml -- \\
      accelerate launch train_text_to_image_lora.py --pretrained_model_name_or_path base/ --output_dir runs/lora
  memtrack launch --stop-on 'nn_ratio.rate > 0.05' --index ref/ -- python train.py --output_dir runs/x
  memtrack launch --threads-for-training 6 --index ref/ -- python train.py --output_dir runs/x  # 8 cores: memtrack 2

exit code: the training command's; 1 when a --stop-on gate stopped training; 2 when tracking failed.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="reference index folder")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--device", help="sampling device, e.g. cuda:1 or cpu (sampling.device)")
    p.add_argument("--store", help="store folder (default OUTPUT_DIR/memtrack)")
    p.add_argument("--num-samples", type=int, help="samples per checkpoint (sampling.num_samples)")
    p.add_argument("--steps", type=int, help="denoising steps (sampling.num_inference_steps)")
    p.add_argument("--quiet-period", type=float, help="seconds a checkpoint must be unchanged before it is read")
    p.add_argument("--poll-interval", type=float, help="seconds between looks at the output dir")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--threads", type=int, help="memtrack's CPU threads (tracking.threads; default: 1 beside training)")


def add_parser(sub) -> None:
    w = sub.add_parser("watch", help="evaluate each checkpoint of a training run as it is saved (sidecar)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=WATCH_EPILOG)
    w.add_argument("run", help="the training script's --output_dir")
    _common(w)
    stop = w.add_mutually_exclusive_group()
    stop.add_argument("--pid", type=int, help="stop (after the final checkpoint) when this process exits")
    stop.add_argument("--once", action="store_true", help="evaluate what the run holds now, then exit")
    w.add_argument("--idle-timeout", type=float, help="stop after this many seconds without a new checkpoint")

    la = sub.add_parser("launch", help="run a training command and track every checkpoint it saves",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LAUNCH_EPILOG)
    _common(la)
    la.add_argument("--in-process", action="store_true",
                    help="evaluate inside the training processes (each rank samples its share)")
    la.add_argument("--strategy", choices=["deferred", "rank0"],
                    help="in-process with several ranks: tracking.in_process (see docs/integrations.md)")
    la.add_argument("--stop-on", action="append", default=[], metavar="GATE",
                    help="stop training when a gate trips, e.g. 'nn_ratio.rate > 0.05' (exit code 1)")
    la.add_argument("--threads-for-training", type=int, metavar="T",
                    help="give each training process T threads (OMP/MKL/OPENBLAS_NUM_THREADS); memtrack "
                         "then takes the cores left; default: the training command's environment untouched")
    la.add_argument("training_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                    help="the training command, after --")


def commands() -> dict:
    return {"watch": cmd_watch, "launch": cmd_launch}


def _overrides(args) -> dict:
    return {"sampling.device": args.device, "sampling.num_samples": args.num_samples,
            "sampling.num_inference_steps": args.steps, "tracking.quiet_period_s": args.quiet_period,
            "tracking.poll_interval_s": args.poll_interval,
            "tracking.in_process": getattr(args, "strategy", None), "tracking.threads": args.threads}


def _line(res) -> str:
    if res.skipped:
        return f"{res.checkpoint:>18}  skipped: {res.reason}"
    if res.cached:
        return f"{res.checkpoint:>18}  step {res.step:>6}  (stored earlier)"
    rates = "  ".join(f"{n} {m['rate']:.2f}" for n, m in res.metrics.items() if "rate" in m)
    return f"{res.checkpoint:>18}  step {res.step:>6}  {rates}  ({res.duration_s:.1f}s)"


def cmd_watch(args) -> int:
    from memtrack.budget import for_command
    from memtrack.config import load_config
    from memtrack.index.reference import ReferenceIndex
    from memtrack.scan.tracker import Tracker
    from memtrack.integrations.transform import verify_run_transform
    from memtrack.integrations.watch import Watcher

    cfg = load_config(args.config, {k: v for k, v in _overrides(args).items() if v is not None})
    for_command(cfg, beside_training=True)  # before any torch work (memtrack/budget.py)
    ref = ReferenceIndex.open(args.index)
    transform = verify_run_transform(ref, cfg, args.run)  # the run's hparams.yml, when it wrote one
    tracker = Tracker.from_config(cfg, index=ref, run_dir=args.run, store_dir=args.store)
    if tracker.store is not None:
        tracker.store.set_meta("training_transform", transform)
    watcher = Watcher(tracker, args.run, on_result=None if args.json else lambda ck, r: print(_line(r), flush=True))
    try:
        if args.once:
            watcher.finish()
        else:
            watcher.run(is_alive=_pid_alive(args.pid) if args.pid else (lambda: True),
                        idle_timeout=args.idle_timeout)
    finally:
        tracker.close()
    if args.json:
        print(to_json({"results": [r.to_dict() for r in watcher.results]}, default=str))
    return 0


def _pid_alive(pid: int):
    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return alive


def cmd_launch(args) -> int:
    from memtrack.integrations.launch import launch

    from memtrack.errors import ConfigError

    if args.strategy and not args.in_process:
        raise ConfigError("--strategy applies to --in-process only", hint="add --in-process, or drop --strategy")
    command = args.training_command[1:] if args.training_command[:1] == ["--"] else args.training_command
    result = launch(command, index=args.index, config=args.config, overrides=_overrides(args),
                    in_process=args.in_process, stop_on=args.stop_on, store=args.store,
                    training_threads=args.threads_for_training,
                    on_result=None if args.json else lambda ck, r: print("memtrack " + _line(r), flush=True))
    if args.json:
        print(to_json(result.to_dict(), default=str))
    else:
        for res in result.results if args.in_process else []:
            print("memtrack " + _line(res))
        if result.gate:
            print(f"memtrack: gate tripped: {result.gate}; training was stopped", file=sys.stderr)
        if result.error:
            print(f"memtrack: error: tracking failed: {result.error}", file=sys.stderr)
    return result.exit_code
