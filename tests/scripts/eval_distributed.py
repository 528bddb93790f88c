"""Evaluate one checkpoint, and the same weights as a live model through ``Tracker.step``, under accelerate.

Run with ``accelerate launch --num_processes N``: every process samples its share of the plan; the main
process stores the results in ``--store``. The test compares the stored sample hashes and metrics with a
single-process evaluation.
"""
from __future__ import annotations

import argparse
import json

from accelerate import Accelerator

from memtrack.sampling.checkpoints import discover
from memtrack.config import load_config
from memtrack.sampling.unconditional import load_unet
from memtrack.scan.tracker import Tracker


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--config", required=True)
    args = p.parse_args()

    acc = Accelerator(cpu=True)
    cfg = load_config(args.config, {"tracking.every_n_steps": 5})
    tracker = Tracker.from_config(cfg, index=args.index, run_dir=args.run, accelerator=acc, store_dir=args.store)
    ck = discover(args.run, include_final=False)[0]
    first = tracker.evaluate(ck)
    unet = load_unet(ck.weights)
    live = tracker.step(ck.step, unet=unet)
    off_cadence = tracker.step(ck.step + 1, unet=unet)
    if acc.is_main_process:
        print(json.dumps({"processes": acc.num_processes, "checkpoint": first.metrics, "live": live.metrics,
                          "off_cadence": off_cadence is None}), flush=True)
    tracker.close()
    acc.end_training()


if __name__ == "__main__":
    main()
