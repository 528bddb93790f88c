"""``memtrack demo``: the whole path, offline, on a laptop CPU, in a few minutes.

1. write a small training set of real photographs that installed packages ship (two real faces with
   identity labels, four scenes) -- see :func:`memtrack.demo.train.build_demo_dataset`;
2. train a small diffusers ``UNet2DModel`` on it, saving ``checkpoint-N/unet`` (+ ``unet_ema``) folders the
   way diffusers' ``train_unconditional.py`` does;
3. build the reference index (pixel space, plus the face space when dlib is installed);
4. scan every checkpoint with a fixed seed plan;
5. write ``report.html`` and ``summary.json``.

The output folder holds ``data/``, ``run/`` (the training run; its store is ``run/memtrack/``), ``ref/``,
``report.html`` and ``summary.json``.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from memtrack.sampling.checkpoints import discover
from memtrack.config import Config, EmbedderSpec
from memtrack.data.dataset import read_dataset
from memtrack.demo.train import RECIPE, build_demo_dataset, train_demo
from memtrack.embedders.registry import get_embedder
from memtrack.errors import DataError
from memtrack.index.reference import ReferenceIndex
from memtrack.scan.tracker import Tracker
from memtrack.utils import get_logger

logger = get_logger(__name__)

QUICK = {"max_steps": 40, "checkpointing_steps": 20, "num_samples": 8, "num_inference_steps": 5}


def demo_config(resolution: int, quick: bool = False, face: bool | None = None) -> Config:
    """The config the demo evaluates with (the recipe's sampling plan; pixel + face spaces)."""
    cfg = Config()
    s = RECIPE["sampling"]
    cfg.sampling.num_samples = QUICK["num_samples"] if quick else s["num_samples"]
    cfg.sampling.num_inference_steps = QUICK["num_inference_steps"] if quick else s["num_inference_steps"]
    cfg.sampling.scheduler = s["scheduler"]
    cfg.sampling.seed = s["seed"]
    cfg.sampling.batch_size = 64
    specs = [EmbedderSpec("pixel", {"resolution": resolution})]
    if face if face is not None else _face_available():
        specs.append(EmbedderSpec("face", {"align": "assume_aligned"}))
    cfg.index.embedders = specs
    return cfg


def _face_available() -> bool:
    try:
        from memtrack.embedders.registry import list_embedders

        if "face" not in list_embedders():
            return False
        import dlib  # noqa: F401
        import importlib.util

        return importlib.util.find_spec("face_recognition_models") is not None
    except ImportError:
        return False


def run_demo(out: Path, *, quick: bool = False, overwrite: bool = False) -> dict:
    """Run the demo into ``out``; returns the paths of what it wrote."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"the demo folder {out} is not empty",
                            hint="choose a new --out, or pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = dict(RECIPE["train"])
    if quick:
        train.update(max_steps=QUICK["max_steps"], checkpointing_steps=QUICK["checkpointing_steps"])
    res = train["resolution"]
    cfg = demo_config(res, quick)

    # 1. the training set
    data_dir = build_demo_dataset(out / "data", res)
    # 2. train, checkpointing like diffusers' train_unconditional.py
    run_dir = out / "run"
    train_demo(data_dir, run_dir, **train)
    # 3. the reference index
    ds = read_dataset(data_dir, cfg.data)
    ref = ReferenceIndex.build(ds, [get_embedder(s) for s in cfg.index.embedders], out / "ref", cfg)
    # 4. scan every checkpoint
    tracker = Tracker.from_config(cfg, index=ref, run_dir=run_dir)
    try:
        for ck in discover(run_dir, prefer_ema=cfg.sampling.prefer_ema):
            tracker.evaluate(ck)
    finally:
        tracker.close()
    # 5. report
    from memtrack.report.write import write_report

    write_report([run_dir], out=out / "report.html", index=ref.path, quiet=False)
    logger.info("demo finished in %.0f s", time.perf_counter() - t0)
    return {"report": out / "report.html", "summary": out / "summary.json", "run": run_dir, "index": out / "ref"}
