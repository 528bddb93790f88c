"""How much does tracking slow training down? One run of each mode on this machine.

Trains ``tests/scripts/train_tiny.py`` (a tiny UNet2DModel at 16 px, shaped like diffusers'
train_unconditional.py) three times, same arguments and seed:

* ``none``       -- ``python train_tiny.py ...`` alone;
* ``sidecar``    -- ``memtrack launch`` (a watcher process samples each checkpoint beside training);
* ``in-process`` -- ``memtrack launch --in-process`` (sampling inside ``save_state``, blocking training).

For each it reports the training loop's wall and CPU time (measured by the script itself, from its first
step to its final save), and the whole command's wall time and CPU time (all its processes, from start to
exit: imports, the sidecar, the evaluation of the final pipeline). Ratios are relative to ``none``. On a
shared machine wall times swing with the load; CPU seconds are the steadier measure of the work added.
On a machine with few cores the sidecar competes with training for the CPU; with a spare GPU
(``--device cuda:1``) it would not. The last line printed is one JSON object.

    python benchmarks/tracking_overhead.py [--steps 60] [--every 15] [--samples 16] [--denoise 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "tests" / "scripts" / "train_tiny.py"
MODES = ("none", "sidecar", "in-process")
SCENES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]


def write_data(folder: Path, size: int = 16) -> Path:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True)
    for name in SCENES:
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        im.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{name}.png")
    return folder


def build_index(data: Path, out: Path) -> Path:
    from memtrack.config import Config, EmbedderSpec
    from memtrack.data.dataset import read_dataset
    from memtrack.embedders.registry import get_embedder
    from memtrack.index.reference import ReferenceIndex

    cfg = Config()
    cfg.index.embedders = [EmbedderSpec("pixel", {"resolution": 16})]
    ReferenceIndex.build(read_dataset(data), [get_embedder({"name": "pixel", "resolution": 16})], out, cfg)
    return out


def run_mode(mode: str, work: Path, data: Path, index: Path, config: Path, args) -> dict:
    out = work / f"run-{mode}"
    timing = work / f"timing-{mode}.json"
    script = [sys.executable, str(TRAIN), "--train_data_dir", str(data), "--output_dir", str(out),
              "--max_train_steps", str(args.steps), "--checkpointing_steps", str(args.every), "--use_ema",
              "--train_batch_size", "6", "--timing_file", str(timing)]
    if mode == "none":
        cmd = script
    else:
        cmd = [sys.executable, "-m", "memtrack", "launch", "--index", str(index), "--config", str(config),
               *(["--in-process"] if mode == "in-process" else []), "--", *script]
    env = {**os.environ, "MEMTRACK_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    train = json.loads(timing.read_text())
    return {"mode": mode, "train_s": round(train["train_s"], 2), "wall_s": round(wall, 2),
            "train_cpu_s": round(train["train_cpu_s"], 2), "cpu_s": round(cpu, 2), "steps": train["steps"]}


def _median(runs: list[dict]) -> dict:
    import statistics

    out = dict(runs[0])
    for key in ("train_s", "wall_s", "train_cpu_s", "cpu_s"):
        out[key] = round(statistics.median(r[key] for r in runs), 2)
        out[key + "_all"] = [r[key] for r in runs]
    return out


def main() -> None:
    os.environ.setdefault("MEMTRACK_NO_PROGRESS", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--every", type=int, default=15, help="--checkpointing_steps")
    p.add_argument("--samples", type=int, default=16, help="samples per checkpoint")
    p.add_argument("--denoise", type=int, default=10, help="DDIM steps per sample")
    p.add_argument("--repeats", type=int, default=1, help="rounds (modes interleaved); medians are reported")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="memtrack-bench-") as tmp:
        work = Path(tmp)
        data = write_data(work / "data")
        index = build_index(data, work / "ref")
        config = work / "memtrack.yaml"
        config.write_text(f"sampling: {{num_samples: {args.samples}, batch_size: {args.samples}, "
                          f"num_inference_steps: {args.denoise}}}\n"
                          "tracking: {quiet_period_s: 0.5, poll_interval_s: 0.2}\n")
        rounds = [[run_mode(m, work, data, index, config, args) for m in MODES] for _ in range(args.repeats)]
    results = [_median([rnd[i] for rnd in rounds]) for i in range(len(MODES))]
    base = results[0]
    for r in results:
        for key in ("train_s", "wall_s", "train_cpu_s", "cpu_s"):
            r[key.replace("_s", "_ratio")] = round(r[key] / base[key], 3)
    print(f"{'mode':<11} {'loop wall s':>11} {'x':>5} {'cmd wall s':>10} {'x':>5} {'loop cpu s':>10} {'x':>5} "
          f"{'cmd cpu s':>9} {'x':>5}")
    for r in results:
        print(f"{r['mode']:<11} {r['train_s']:>11.1f} {r['train_ratio']:>5.2f} {r['wall_s']:>10.1f} "
              f"{r['wall_ratio']:>5.2f} {r['train_cpu_s']:>10.1f} {r['train_cpu_ratio']:>5.2f} {r['cpu_s']:>9.1f} "
              f"{r['cpu_ratio']:>5.2f}")
    import torch

    summary = {"benchmark": "tracking_overhead", "machine": platform.platform(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(), "repeats": args.repeats,
               "setup": {"steps": args.steps, "checkpointing_steps": args.every,
                         "checkpoints": args.steps // args.every,
                         "samples_per_checkpoint": args.samples, "ddim_steps": args.denoise, "resolution": 16},
               "results": results,
               "overhead": {r["mode"]: {"train_wall": r["train_ratio"], "command_wall": r["wall_ratio"],
                                        "train_cpu": r["train_cpu_ratio"], "command_cpu": r["cpu_ratio"]}
                            for r in results[1:]}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
