"""Does the thread budget keep a sidecar from slowing training down, and memtrack from collapsing?

Training and memtrack's sidecar run **on the same cores** (``--cores``, default every core this process may
use; both pinned there). Training is the demo's loop at a small size (:func:`memtrack.demo.train.build_unet`,
AdamW, the DDPM noise-prediction loss on real photographs, ``--resolution`` px, batch ``--batch``); it
reports its steps/s over ``--train-steps`` steps after a warm-up. The sidecar evaluates checkpoints of the
same model back to back (``Tracker.evaluate``: sample, embed, search, detect, store), exactly what ``watch``
does per checkpoint, and reports samples/s over the evaluations that ran entirely while training ran.

Phases (one round; ``--repeats`` rounds are interleaved and their medians reported):

* ``train_alone`` -- training alone, torch's default threads (every core);
* ``memtrack_alone`` -- the sidecar alone, torch's default threads (what memtrack did before budgets);
* ``shared_unbudgeted`` -- both at once, both with torch's default threads;
* ``shared_budget`` -- both at once, the sidecar on the default budget beside training (1 thread);
* ``shared_split`` -- training given ``--training-threads`` T (default cores - 1, as ``launch
  --threads-for-training T`` gives it), the sidecar the cores left.

Reported: training slowdown (steps/s alone / steps/s shared; the goal is <= 1.2 with a budget) and
memtrack's throughput ratio (samples/s shared / samples/s alone; "does not collapse"). The machine's load
average is recorded: on a busy machine the numbers mean nothing. The last line printed is one JSON object.

    python benchmarks/thread_budget.py --repeats 3                       # the measurement: an idle machine only
    python benchmarks/thread_budget.py --train-steps 20 --samples 4 --denoise 2 --resolution 16   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from memtrack import budget

SCENES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]
PHASES = ("train_alone", "memtrack_alone", "shared_unbudgeted", "shared_budget", "shared_split")


# ------------------------------------------------------------------------------------------- workers


def train_worker(args) -> None:
    """The training loop; writes {"start", "end", "steps", "threads"} and, with --save, a checkpoint."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from memtrack.demo.train import build_unet, demo_scheduler

    files = sorted(Path(args.data).glob("*.png"))
    images = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 127.5 - 1
                                        for f in files])).permute(0, 3, 1, 2).contiguous()
    torch.manual_seed(0)
    model = build_unet(args.resolution, block_out_channels=tuple(args.channels), norm_num_groups=8,
                       attention_levels=(1,))
    scheduler = demo_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        clean = images[torch.randint(0, len(images), (args.batch,))]
        noise = torch.randn_like(clean)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,))
        loss = F.mse_loss(model(scheduler.add_noise(clean, noise, t), t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):  # warm-up: first-call allocations are not training speed
        step()
    start = time.time()
    for _ in range(args.train_steps):
        step()
    end = time.time()
    if args.save:
        ck = Path(args.save) / f"checkpoint-{args.train_steps}"
        model.save_pretrained(ck / "unet")
        (ck / "random_states_0.pkl").write_bytes(b"\x80\x04N.")
    Path(args.out).write_text(json.dumps({"start": start, "end": end, "steps": args.train_steps,
                                          "threads": torch.get_num_threads()}))


def sidecar_worker(args) -> None:
    """Evaluate the run's checkpoints back to back until --stop appears (or --evals are done)."""
    if args.budget == "rule":
        budget.apply(budget.resolve(None, beside_training=True, training_threads=args.training_threads))
    import torch

    from memtrack.sampling.checkpoints import discover
    from memtrack.scan.tracker import Tracker

    tracker = Tracker.from_config(args.config, index=args.index, run_dir=args.run, store_dir=args.store)
    cks = discover(args.run, include_final=False)
    tracker.evaluate(cks[0], force=True)  # warm-up: loading and first-use costs are not throughput
    Path(args.ready).write_text(str(torch.get_num_threads()))
    done = 0
    with open(args.out, "w") as fh:
        while not Path(args.stop).exists() and (args.evals is None or done < args.evals):
            t0 = time.time()
            result = tracker.evaluate(cks[done % len(cks)], force=True)
            fh.write(json.dumps({"start": t0, "end": time.time(), "samples": result.n_samples,
                                 "threads": torch.get_num_threads()}) + "\n")
            fh.flush()
            done += 1
    tracker.close()


# ---------------------------------------------------------------------------------------- orchestration


def _env(threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in budget.THREAD_ENV}
    env.update(PYTHONPATH=str(REPO), MEMTRACK_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    if threads is not None:
        env.update({var: str(threads) for var in budget.THREAD_ENV})
    return env


class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.cores = set(args.cores) if args.cores else os.sched_getaffinity(0)
        self.count = 0

    def _popen(self, role_args: list, threads: int | None):
        cmd = [sys.executable, str(Path(__file__).resolve()), *role_args]
        return subprocess.Popen(cmd, env=_env(threads), preexec_fn=lambda: os.sched_setaffinity(0, self.cores),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def _train_args(self, out: Path, save: Path | None = None) -> list:
        a = self.args
        return ["--role", "train", "--data", str(self.work / "data"), "--out", str(out), "--train-steps",
                str(a.train_steps if save is None else 2), "--resolution", str(a.resolution), "--batch",
                str(a.batch), "--channels", *map(str, a.channels), *(["--save", str(save)] if save else [])]

    def setup(self) -> None:
        import skimage.data
        from PIL import Image

        data = self.work / "data"
        data.mkdir()
        for name in SCENES:
            im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            im.resize((self.args.resolution,) * 2, Image.Resampling.BICUBIC).save(data / f"{name}.png")
        _wait(self._popen(self._train_args(self.work / "setup.json", save=self.work / "run"), None), "setup")
        from memtrack.config import Config, EmbedderSpec
        from memtrack.data.dataset import read_dataset
        from memtrack.embedders.registry import get_embedder
        from memtrack.index.reference import ReferenceIndex

        spec = {"name": "pixel", "resolution": self.args.resolution}
        cfg = Config()
        cfg.index.embedders = [EmbedderSpec("pixel", {"resolution": self.args.resolution})]
        ReferenceIndex.build(read_dataset(data), [get_embedder(spec)], self.work / "ref", cfg)
        (self.work / "memtrack.yaml").write_text(
            f"sampling: {{num_samples: {self.args.samples}, batch_size: {self.args.samples}, "
            f"num_inference_steps: {self.args.denoise}}}\n")

    def train(self, threads: int | None) -> dict:
        out = self.work / f"train-{self._next()}.json"
        _wait(self._popen(self._train_args(out), threads), "training")
        return json.loads(out.read_text())

    def sidecar(self, mode: str, training_threads: int | None = None, evals: int | None = None):
        n = self._next()
        files = {k: self.work / f"{k}-{n}" for k in ("evals", "ready", "stop", "store")}
        role = ["--role", "sidecar", "--run", str(self.work / "run"), "--index", str(self.work / "ref"),
                "--config", str(self.work / "memtrack.yaml"), "--budget", mode, "--out", str(files["evals"]),
                "--ready", str(files["ready"]), "--stop", str(files["stop"]), "--store", str(files["store"]),
                *(["--training-threads", str(training_threads)] if training_threads else []),
                *(["--evals", str(evals)] if evals else [])]
        proc = self._popen(role, None)
        while not files["ready"].exists():
            if proc.poll() is not None:
                raise SystemExit(f"sidecar failed:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.2)
        return proc, files

    def _next(self) -> int:
        self.count += 1
        return self.count

    def phase(self, name: str) -> dict:
        a = self.args
        if name == "train_alone":
            t = self.train(None)
            return {"steps_per_s": t["steps"] / (t["end"] - t["start"]), "train_threads": t["threads"]}
        if name == "memtrack_alone":
            proc, files = self.sidecar("none", evals=a.evals or 3)
            _wait(proc, "sidecar")
            return {"samples_per_s": _throughput(_lines(files["evals"])), **_threads(files)}
        train_threads = a.training_threads if name == "shared_split" else None
        proc, files = self.sidecar("none" if name == "shared_unbudgeted" else "rule", train_threads)
        t = self.train(train_threads)
        files["stop"].touch()
        _wait(proc, "sidecar")
        inside = [e for e in _lines(files["evals"]) if e["start"] >= t["start"] and e["end"] <= t["end"]]
        return {"steps_per_s": t["steps"] / (t["end"] - t["start"]), "train_threads": t["threads"],
                "samples_per_s": _throughput(inside) if inside else None, "evals_inside": len(inside),
                **_threads(files)}


def _wait(proc, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{err[-3000:]}")


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _throughput(evals: list) -> float:
    return sum(e["samples"] for e in evals) / sum(e["end"] - e["start"] for e in evals)


def _threads(files: dict) -> dict:
    return {"memtrack_threads": int(files["ready"].read_text())}


def _median(rounds: list, key: str):
    values = [r[key] for r in rounds if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def summarize(rounds: dict, args, cores: int) -> dict:
    phases = {name: {**runs[0], "steps_per_s": _median(runs, "steps_per_s"),
                     "samples_per_s": _median(runs, "samples_per_s"),
                     "all_steps_per_s": [r.get("steps_per_s") for r in runs],
                     "all_samples_per_s": [r.get("samples_per_s") for r in runs]} for name, runs in rounds.items()}
    train0, mem0 = phases["train_alone"]["steps_per_s"], phases["memtrack_alone"]["samples_per_s"]
    slowdown, ratio = {}, {}
    for name in PHASES[2:]:
        p = phases[name]
        slowdown[name] = round(train0 / p["steps_per_s"], 3)
        ratio[name] = round(p["samples_per_s"] / mem0, 3) if p["samples_per_s"] else None
    return {"benchmark": "thread_budget", "machine": platform.platform(), "cores": cores,
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "setup": {"train_steps": args.train_steps, "resolution": args.resolution, "batch": args.batch,
                      "channels": args.channels, "samples": args.samples, "denoise": args.denoise,
                      "training_threads_split": args.training_threads, "repeats": args.repeats},
            "phases": phases, "training_slowdown": slowdown, "memtrack_throughput_ratio": ratio,
            "goal": "training_slowdown <= 1.2 with a budget; memtrack_throughput_ratio reported",
            "goal_met": {k: v <= 1.2 for k, v in slowdown.items() if k != "shared_unbudgeted"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=300, help="timed training steps per phase")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], help="the UNet's block_out_channels")
    p.add_argument("--samples", type=int, default=16, help="samples per evaluation")
    p.add_argument("--denoise", type=int, default=10, help="DDIM steps per sample")
    p.add_argument("--evals", type=int, help="evaluations timed in memtrack_alone (default 3)")
    p.add_argument("--cores", type=int, nargs="+", help="the cores both run on (default: all usable)")
    p.add_argument("--training-threads", type=int, help="training's threads in shared_split (default cores - 1)")
    p.add_argument("--repeats", type=int, default=1)
    # worker roles (the benchmark starts itself)
    for flag in ("--role", "--data", "--out", "--save", "--run", "--index", "--config", "--budget", "--ready",
                 "--stop", "--store"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "train":
        return train_worker(args)
    if args.role == "sidecar":
        return sidecar_worker(args)
    os.environ.setdefault("MEMTRACK_NO_PROGRESS", "1")
    cores = len(args.cores) if args.cores else budget.usable_cores()
    args.training_threads = args.training_threads or max(1, cores - 1)
    with tempfile.TemporaryDirectory(prefix="memtrack-budget-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.setup()
        rounds: dict = {name: [] for name in PHASES}
        for _ in range(args.repeats):
            for name in PHASES:
                rounds[name].append(bench.phase(name))
                print(f"{name:<18} {json.dumps(rounds[name][-1])}", flush=True)
    out = summarize(rounds, args, cores)
    print(f"{'phase':<18} {'train steps/s':>13} {'slowdown':>9} {'memtrack samples/s':>18} {'ratio':>6} threads")
    for name, ph in out["phases"].items():
        print(f"{name:<18} {ph.get('steps_per_s') or '-':>13} {out['training_slowdown'].get(name, '-'):>9} "
              f"{ph.get('samples_per_s') or '-':>18} {out['memtrack_throughput_ratio'].get(name, '-') or '-':>6} "
              f"train {ph.get('train_threads', '-')}, memtrack {ph.get('memtrack_threads', '-')}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
