"""When does the demo DDPM start to memorize, as a function of the training-set size n? (issue 5, part 8)

For each n, the demo model (``memtrack.demo.train.train_demo`` with ``RECIPE["train"]``; only the
resolution, the length of the run, the checkpoint interval and the seed are set here, the same for every
n) is trained on the first n images of a fixed pool of real photographs (``benchmarks/photos.py``), so
the training sets are nested and nothing but n changes. Each run is then measured with memtrack alone:
``ReferenceIndex.build`` -> ``Tracker.evaluate`` on every checkpoint (``discover``) -> ``onsets`` (the
d1/d2 < 1/3 rate of Gu et al. 2023, 95% Wilson lower bound above 1% for two more checkpoints), beside
the loss-gap onset (``memtrack.probes.loss_gap``: held-out minus train denoising loss on 7 held-out photographs)
and the per-seed trajectories. Bonnaire et al. 2025 and Favero et al. 2025 report tau_mem growing about
linearly with n; the script fits the log-log slope and says what it found.

Each run lasts ``--steps-per-image`` x n steps (at least ``--min-steps``). The learning rate is held
constant after warm-up here (the demo's own recipe decays it on a cosine over the run), so the first s
steps of a run do not depend on its length -- a longer window only watches longer -- nor, since
``train_demo`` saves checkpoints under a forked RNG, on the checkpoint interval. Prints a table; saves a plot (``--out``); the last line is one JSON object.

    python benchmarks/onset_vs_size.py --sizes 4 8 16 --out onset_vs_size.png [--threads 1]

On a shared CPU, ``--threads 1`` is much faster than torch's default of one thread per core (tiny models
stall when their threads wait for busy cores).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MEMTRACK_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import photos  # noqa: E402


def write_set(folder: Path, images: list) -> Path:
    """An imagefolder of PNGs (no metadata: unconditional)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, im in images:
        im.save(folder / f"{name}.png")
    return folder


def run_size(n: int, seed: int, args, pool: list, heldout: list, root: Path) -> dict:
    from memtrack.sampling.checkpoints import discover
    from memtrack.data.dataset import read_dataset
    from memtrack.demo.run import demo_config
    from memtrack.demo.train import RECIPE, demo_scheduler, train_demo
    from memtrack.analysis.dynamics import match_table, onsets, trajectories
    from memtrack.embedders.registry import get_embedder
    from memtrack.index.reference import ReferenceIndex
    from memtrack.probes.loss_gap import loss_gap, loss_gap_onset
    from memtrack.sampling.unconditional import load_unet
    from memtrack.scan.tracker import Tracker

    # 1. the training set and the run: only n differs between sizes
    base = root / f"n{n}-seed{seed}"
    data = write_set(base / "data", pool[:n])
    train = dict(RECIPE["train"], resolution=args.resolution, checkpointing_steps=args.checkpointing_steps,
                 max_steps=max(args.min_steps, args.steps_per_image * n), seed=seed,
                 lr_scheduler="constant_with_warmup")
    t0 = time.perf_counter()
    train_demo(data, base / "run", progress=False, **train)
    t_train = time.perf_counter() - t0

    # 2. memtrack: index, evaluate every checkpoint, onsets; the loss gap of the same weights
    cfg = demo_config(args.resolution, face=False)
    cfg.sampling.num_samples = args.samples
    ref = ReferenceIndex.build(read_dataset(data, cfg.data), [get_embedder(s) for s in cfg.index.embedders],
                               base / "ref", cfg)
    tracker = Tracker.from_config(cfg, index=ref, run_dir=base / "run")
    gaps = []
    t0 = time.perf_counter()
    try:
        for ck in discover(base / "run", prefer_ema=cfg.sampling.prefer_ema, include_final=False):
            tracker.evaluate(ck)
            gaps.append(loss_gap(load_unet(ck.weights), demo_scheduler(), [im for _, im in pool[:n]],
                                 [im for _, im in heldout], timesteps=8, seed=0))
        evals = tracker.store.evaluations()
        table = match_table([(e.step, tracker.store.samples(e.id)) for e in evals], ref.train_ids)
    finally:
        tracker.close()
    t_eval = time.perf_counter() - t0

    # 3. the dynamics
    steps = [e.step for e in evals]
    on = onsets([{"step": e.step, "metrics": e.metrics} for e in evals], cfg.dynamics.baseline_rate,
                cfg.dynamics.persistence)
    gap_on = loss_gap_onset(steps, [g["gap_mean"] for g in gaps], [g["heldout_mean"] for g in gaps])
    traj = trajectories(table["steps"], table["seeds"], table["matches"])
    return {"n": n, "seed": seed, "max_steps": train["max_steps"], "recipe": train, "steps": steps,
            "nn_ratio": [e.metrics["nn_ratio"]["rate"] for e in evals],
            "nn_ratio_ci_low": [e.metrics["nn_ratio"]["ci_low"] for e in evals],
            "distinct": [e.metrics.get("distinct_train_images", {}).get("count", 0) for e in evals],
            "onset": on.get("nn_ratio", {}), "onset_tiled_l2": on.get("tiled_l2", {}).get("step"),
            "gap": [g["gap_mean"] for g in gaps], "train_loss": [g["train_mean"] for g in gaps],
            "heldout_loss": [g["heldout_mean"] for g in gaps], "gap_onset": gap_on["step"],
            "gap_onset_block": {k: gap_on[k] for k in ("step", "between", "confirmed")},
            "attractors_final": traj["attractors"][-1]["count"] if traj["attractors"] else 0,
            "first_lock": traj["earliest"][0]["step"] if traj["earliest"] else None,
            "train_s": round(t_train, 1), "eval_s": round(t_eval, 1)}


def loglog_slope(rows: list[dict], key: str = "onset") -> float | None:
    """Least-squares slope of log(onset step) on log(n), over every run with an onset."""
    pts = [(math.log(r["n"]), math.log(r[key]["step"])) for r in rows if r[key].get("step")]
    if len({x for x, _ in pts}) < 2:
        return None
    xs, ys = zip(*pts)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def per_size(rows: list[dict], key: str) -> dict:
    """``{n: {"median": step | None, "onsets": [step | None per seed]}}``; no onset counts as latest."""
    out = {}
    for n in sorted({r["n"] for r in rows}):
        vals = [r[key].get("step") for r in rows if r["n"] == n]
        ranked = sorted(vals, key=lambda v: (v is None, v or 0))
        mid = ranked[(len(ranked) - 1) // 2]  # lower median; None when half or more never rose
        out[n] = {"median": mid, "onsets": vals}
    return out


def plot(rows: list[dict], slope: float | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    sizes = sorted({r["n"] for r in rows})
    colours = {n: f"C{i}" for i, n in enumerate(sizes)}
    styles = ["-", "--", ":", "-."]
    for r in rows:
        c, ls = colours[r["n"]], styles[r["seed"] % len(styles)]
        label = f"n = {r['n']}, seed {r['seed']}"
        ax1.plot(r["steps"], r["nn_ratio"], ls=ls, color=c, marker="o", ms=2, label=label)
        ax2.plot(r["steps"], r["gap"], ls=ls, color=c, marker="o", ms=2, label=label)
        if r["onset"].get("step"):
            ax1.plot([r["onset"]["step"]], [0], marker="v", color=c, ms=8)
        if r["gap_onset_block"].get("step"):
            ax2.plot([r["gap_onset_block"]["step"]], [0], marker="v", color=c, ms=8)
    ax1.set(xlabel="training step", ylabel="d1/d2 < 1/3 rate", title="memorized samples (triangles: onsets)")
    ax2.set(xlabel="training step", ylabel="held-out - train loss", title="loss gap (triangles: its onsets)")
    for key, label, mk, dx in (("onset", "d1/d2 onset", "o", 1.0), ("gap_onset_block", "loss-gap onset", "s", 1.04)):
        pts = [(r["n"] * dx, r[key]["step"]) for r in rows if r[key].get("step")]
        if pts:
            ax3.plot(*zip(*pts), marker=mk, ls="none", label=label)
    meds = [(n, m["median"]) for n, m in per_size(rows, "onset").items() if m["median"]]
    if meds:
        ax3.plot(*zip(*meds), color="C0", lw=1)
        n0, s0 = meds[0]
        ax3.plot(sizes, [s0 * n / n0 for n in sizes], color="grey", ls="--", lw=1, label="proportional to n")
    ax3.set(xscale="log", yscale="log", xlabel="training images n", ylabel="onset step",
            title=f"onset vs n (log-log slope {slope:.2f})" if slope is not None else "onset vs n")
    ax3.set_xticks(sizes, [str(n) for n in sizes])
    ax3.minorticks_off()
    for ax in (ax1, ax2, ax3):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def print_table(rows: list[dict]) -> None:
    print(f"{'n':>4} {'seed':>4} {'steps':>6} {'onset':>6} {'between':>12} {'tiled_l2':>8} {'gap onset':>9} "
          f"{'gap between':>12} {'rate@end':>8} {'distinct@end':>12} {'attractors':>10} {'first lock':>10}")
    for r in rows:
        o, go = r["onset"], r["gap_onset_block"]
        print(f"{r['n']:>4} {r['seed']:>4} {r['max_steps']:>6} {str(o.get('step')):>6} {str(o.get('between')):>12} "
              f"{str(r['onset_tiled_l2']):>8} {str(go['step']):>9} {str(go['between']):>12} "
              f"{r['nn_ratio'][-1]:>8.3f} {r['distinct'][-1]:>12} {r['attractors_final']:>10} "
              f"{str(r['first_lock']):>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16], help="training-set sizes (<= 37)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds per size")
    ap.add_argument("--resolution", type=int, default=16, help="image side in pixels (default 16)")
    ap.add_argument("--steps-per-image", type=int, default=125, help="run length = this x n steps")
    ap.add_argument("--min-steps", type=int, default=1500, help="shortest run")
    ap.add_argument("--checkpointing-steps", type=int, default=100)
    ap.add_argument("--samples", type=int, default=64, help="samples per checkpoint (fixed seeds)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path("onset_vs_size.png"), help="the plot (PNG)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep runs here (default: a temp folder, removed)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pool, heldout = photos.split(args.resolution)
    if max(args.sizes) > len(pool):
        ap.error(f"--sizes go up to {len(pool)} (the photograph pool), got {max(args.sizes)}")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="onset_vs_size-"))
    t0 = time.perf_counter()
    rows = []
    try:
        for n in sorted(args.sizes):
            for seed in args.seeds:
                rows.append(run_size(n, seed, args, pool, heldout, root))
                r = rows[-1]
                print(f"n={n} seed={seed}: onset {r['onset'].get('step')}, gap onset {r['gap_onset']}, "
                      f"train {r['train_s']} s, eval {r['eval_s']} s", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    slope, gap_slope = loglog_slope(rows), loglog_slope(rows, "gap_onset_block")
    plot(rows, slope, args.out)
    print_table(rows)
    medians = per_size(rows, "onset")
    print("median onset per n: " + ", ".join(f"{n}: {m['median']}" for n, m in medians.items()))
    print("no onset at two or more sizes: no slope" if slope is None else
          f"log-log slope of onset vs n = {slope:.2f} (tau_mem proportional to n would be 1.00); "
          f"loss-gap onset slope = {gap_slope if gap_slope is None else round(gap_slope, 2)}")
    print(json.dumps({"benchmark": "onset_vs_size", "sizes": sorted(args.sizes), "seeds": args.seeds,
                      "resolution": args.resolution, "samples": args.samples,
                      "checkpointing_steps": args.checkpointing_steps,
                      "onset": {str(n): m for n, m in medians.items()},
                      "gap_onset": {str(n): m for n, m in per_size(rows, "gap_onset_block").items()},
                      "loglog_slope": slope, "gap_loglog_slope": gap_slope, "runs": rows, "plot": str(args.out),
                      "total_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
                      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
