"""What the loss-gap probe costs, in training steps of the same model, measured in the same process.

The model is the demo's UNet (``memtrack.demo.train.build_unet``, RECIPE sizes) at ``--resolution``;
a training step is the demo trainer's own step (``accelerate`` on CPU, AdamW, RECIPE's batch size:
noise, forward, MSE, backward, clip, optimizer step). The probe is ``memtrack.probes.loss_gap.loss_gap`` on
real photographs (``benchmarks/photos.py``) for several (images per set, timesteps) settings. Training
steps and probe calls alternate over ``--rounds`` rounds; medians are reported, and the ratio probe /
step says how many training steps one probe call costs. The last line is one JSON object.

    python benchmarks/loss_gap_cost.py --resolution 32 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import photos  # noqa: E402

SETTINGS = [(32, 8), (16, 8), (8, 4)]  # (images per set, timesteps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default: RECIPE's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()

    import torch
    from accelerate import Accelerator

    from memtrack.demo.train import RECIPE, _train_step, build_unet, demo_scheduler
    from memtrack.probes.loss_gap import loss_gap, prepare_images

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # 1. the model and the trainer's step, as train_demo builds them
    acc = Accelerator(cpu=True)
    recipe = RECIPE["train"]
    args.batch_size = args.batch_size or recipe["batch_size"]
    model = build_unet(args.resolution, **{k: recipe[k] for k in ("block_out_channels", "layers_per_block",
                                                                    "norm_num_groups") if k in recipe})
    sched = demo_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-6)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    model, opt, lr_sched = acc.prepare(model, opt, lr_sched)
    pool, held = photos.split(args.resolution)
    images = prepare_images([im for _, im in pool], args.resolution)
    heldout = prepare_images([im for _, im in held] + [im for _, im in pool[::-1]], args.resolution)
    batch = images[torch.arange(args.batch_size) % len(images)]

    # 2. warm up both paths, then alternate
    for _ in range(2):
        _train_step(model, batch, sched, opt, lr_sched, acc)
    for n, k in SETTINGS:
        loss_gap(model, sched, images[:n], heldout[:n], timesteps=k)
    step_s: list[float] = []
    probe_s: dict = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for _ in range(args.steps_per_round):
            t0 = time.perf_counter()
            _train_step(model, batch, sched, opt, lr_sched, acc)
            step_s.append(time.perf_counter() - t0)
        for n, k in SETTINGS:
            t0 = time.perf_counter()
            loss_gap(model, sched, images[:n], heldout[:n], timesteps=k)
            probe_s[(n, k)].append(time.perf_counter() - t0)

    step = statistics.median(step_s)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {params / 1e6:.2f}M parameters, {args.resolution}x{args.resolution}, "
          f"training step (batch {args.batch_size}): {step * 1000:.0f} ms (median of {len(step_s)})")
    print(f"{'images/set':>10} {'timesteps':>9} {'rows':>5} {'probe ms':>9} {'x train step':>12}")
    rows = []
    for (n, k), times in probe_s.items():
        t = statistics.median(times)
        rows.append({"images_per_set": n, "timesteps": k, "forward_rows": 2 * n * k, "probe_s": t,
                     "ratio_to_train_step": t / step})
        print(f"{n:>10} {k:>9} {2 * n * k:>5} {t * 1000:>9.0f} {t / step:>12.2f}")
    print(json.dumps({"benchmark": "loss_gap_cost", "resolution": args.resolution, "batch_size": args.batch_size,
                      "params": params, "train_step_s": step, "probes": rows, "rounds": args.rounds,
                      "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
