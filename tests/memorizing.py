"""Models that memorize, so that scans, onsets, galleries and gates are tested on known positives.

Two kinds, both built in temp folders from real photographs that installed packages ship:

* **The copycat.** :class:`CopycatPipeline` is called the way memtrack calls a diffusers pipeline
  (``pipeline(batch_size=..., generator=[...], num_inference_steps=..., output_type="pil")``) and returns,
  for each sample, either a fresh image or a training image: exact, noised at a given sigma, mirrored or
  cropped. Which samples copy is fixed by a schedule over checkpoints, so every rate, onset and gate of a
  scan is known in advance. :func:`write_copycat_run` writes a run whose ``checkpoint-N/unet/`` folders hold
  a real tiny UNet (so discovery, fingerprints and the store see an ordinary run) plus ``copycat.json``
  (inside ``unet/``, so that a changed schedule changes the checkpoint's fingerprint);
  :func:`scan_copycat` evaluates it through :meth:`memtrack.scan.tracker.Tracker.evaluate` with
  ``pipeline=``, exactly as ``memtrack scan`` does but with the copycat as the sampler.

* **A really trained model.** :func:`train_memorizing_run` trains memtrack's demo DDPM
  (:func:`memtrack.demo.train.train_demo`, the diffusers ``train_unconditional.py`` layout) on three real
  8x8 images until its samples are near-copies; :func:`build_index` indexes the same images.

The copycat's schedule rule: sample ``i`` (seed ``plan_seed + i``) is a copy at a checkpoint with ``c``
copies when ``i < c``, so a seed that copies keeps copying at every later checkpoint with at least as many
copies. Copy ``i`` reproduces training image ``i % n_train`` (images sorted by file name), in the
``kinds[i % len(kinds)]`` way. A fresh sample is uniform noise seeded by its seed: it is equally far from
every training image (nn_ratio's d1/d2 near 1, tiled RMS above 0.2), never a near-copy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
from PIL import Image

COPYCAT_FILE = "copycat.json"
KINDS = ("exact", "noise", "flip", "crop")


def training_images(train_dir: Path) -> list[tuple[str, Image.Image]]:
    """(file name, RGB image) of every PNG in ``train_dir``, sorted by name (the copycat's numbering)."""
    return [(p.name, Image.open(p).convert("RGB")) for p in sorted(Path(train_dir).glob("*.png"))]


@dataclass
class CopycatPipeline:
    """A sampler that copies training images on a schedule; seeds are identities, as in memtrack.

    Args:
        train: (file name, image) of the training set, in copy order.
        copies: samples ``0 .. copies-1`` are copies; the rest are fresh.
        kinds: how copy ``i`` is made, cycled: ``exact``, ``noise`` (Gaussian, std ``sigma`` in [0, 1]
            pixel units, then rounded to uint8), ``flip`` (mirrored left-right), ``crop`` (the central
            ``crop`` fraction, resized back).
        sigma: noise std for ``noise`` copies.
        crop: the kept fraction of the side for ``crop`` copies.
        plan_seed: the plan's base seed: sample ``i`` is drawn with seed ``plan_seed + i``.
    """

    train: list
    copies: int
    kinds: Sequence[str] = ("exact",)
    sigma: float = 0.01
    crop: float = 0.75
    plan_seed: int = 0
    calls: list = field(default_factory=list)

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"copycat kinds must be among {KINDS}, got {list(self.kinds)}")

    @classmethod
    def for_checkpoint(cls, ck) -> "CopycatPipeline":
        """The copycat described by ``checkpoint-N/unet/copycat.json`` (see :func:`write_copycat_run`)."""
        spec = json.loads((Path(ck.weights) / COPYCAT_FILE).read_text())
        return cls(training_images(Path(spec.pop("train_dir"))), **spec)

    # -------------------------------------------------------------------------------------- sampling
    def source(self, index: int) -> tuple[str, str] | None:
        """(kind, training file name) that sample ``index`` copies, or None when it is fresh."""
        if index >= self.copies:
            return None
        return self.kinds[index % len(self.kinds)], self.train[index % len(self.train)][0]

    def image(self, seed: int) -> Image.Image:
        """The sample drawn with ``seed`` (a pure function of the seed and the schedule)."""
        index = seed - self.plan_seed
        size = self.train[0][1].size
        src = self.source(index)
        if src is None:
            rng = np.random.default_rng([seed, 7])
            return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        kind, name = src
        im = dict(self.train)[name]
        if kind == "noise":
            rng = np.random.default_rng([seed, 11])
            a = np.asarray(im, np.float64) / 255.0 + rng.normal(0.0, self.sigma, (size[1], size[0], 3))
            return Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8))
        if kind == "flip":
            return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if kind == "crop":
            w, h = size
            cw, ch = max(1, round(w * self.crop)), max(1, round(h * self.crop))
            left, top = (w - cw) // 2, (h - ch) // 2
            return im.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BILINEAR)
        return im.copy()

    @property
    def scheduler(self):
        """A default DDIM scheduler: the copycat does not denoise, but callers may ask what samples."""
        from diffusers import DDIMScheduler

        if not hasattr(self, "_scheduler"):
            self._scheduler = DDIMScheduler()
        return self._scheduler

    def __call__(self, *, generator, num_inference_steps=None, output_type="pil", batch_size=None, **_):
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        seeds = [int(g.initial_seed()) for g in gens]
        self.calls.append(seeds)
        return SimpleNamespace(images=[self.image(s) for s in seeds])


# ------------------------------------------------------------------------------------------ copycat runs


def write_copycat_run(run: Path, schedule: dict[int, int], train_dir: Path, *, kinds: Sequence[str] = ("exact",),
                      sigma: float = 0.01, crop: float = 0.75, plan_seed: int = 0) -> Path:
    """A run with one ``checkpoint-<step>`` per ``schedule`` entry (step -> number of copies).

    Each holds a real tiny UNet (``unet/``), the copycat spec beside the weights, and
    ``random_states_0.pkl`` (complete, as accelerate leaves it). The UNet is seeded by the checkpoint's
    position and spec, so two checkpoints that sample differently never share weights (nor, whatever
    memtrack hashes, an evaluation key).
    """
    import hashlib

    from conftest import write_checkpoint

    for i, (step, copies) in enumerate(sorted(schedule.items())):
        spec = {"train_dir": str(Path(train_dir).resolve()), "copies": int(copies), "kinds": list(kinds),
                "sigma": sigma, "crop": crop, "plan_seed": plan_seed}
        text = json.dumps(spec, indent=1)
        seed = int.from_bytes(hashlib.sha256(f"{i}:{text}".encode()).digest()[:4], "little") % (1 << 31)
        ck = write_checkpoint(run, step, seed=seed)
        (ck / "unet" / COPYCAT_FILE).write_text(text)
    return run


def copycat_builder(fallback):
    """A pipeline builder for the ``unet`` checkpoint kind: the copycat where ``unet/copycat.json`` says so,
    else ``fallback`` (memtrack's own builder). Registered by the ``copycat_sampling`` fixture, it makes
    ``memtrack scan``, ``watch`` and ``launch`` sample copycat checkpoints in this process."""

    def build(ck, cfg, run_dir):
        if (Path(ck.weights) / COPYCAT_FILE).is_file():
            return CopycatPipeline.for_checkpoint(ck)
        return fallback(ck, cfg, run_dir)
    return build


def copycat_tracker(run: Path, index: Path, *, num_samples: int = 16, store_dir: Path | None = None,
                    overrides: dict | None = None):
    """A :class:`~memtrack.scan.tracker.Tracker` for a copycat run (one denoising step: the copycat ignores it)."""
    from memtrack.scan.tracker import Tracker

    over = {"sampling.num_samples": num_samples, "sampling.num_inference_steps": 1, **(overrides or {})}
    return Tracker.from_config(None, index=index, run_dir=run, store_dir=store_dir, overrides=over)


def scan_copycat(run: Path, index: Path, **kw) -> list:
    """``memtrack scan`` of a copycat run: every checkpoint evaluated with its copycat as the sampler."""
    from memtrack.sampling.checkpoints import discover

    tracker = copycat_tracker(run, index, **kw)
    try:
        return [tracker.evaluate(ck, pipeline=CopycatPipeline.for_checkpoint(ck)) for ck in discover(run)]
    finally:
        tracker.close()


# ----------------------------------------------------------------------------------- a trained memorizer

#: Three distinct real photographs (scikit-image), 8x8: RMS distance 0.36 between the nearest two.
MEMORIZED_SCENES = ("camera", "coffee", "rocket")
#: :func:`memtrack.demo.train.train_demo` arguments. Tuned on a 2-core CPU (one torch thread): at 8 px a
#: (16, 32)-channel UNet memorizes three images in a few hundred steps, where 16 px needs thousands. With
#: these settings the nn_ratio rate of 16 DDIM-20 samples was 0, 0, 2/16, 7/16, 6/16, 7/16 at steps 100..600.
MEMORIZING_RECIPE = {"max_steps": 600, "checkpointing_steps": 100, "resolution": 8, "batch_size": 16, "lr": 5e-3,
                     "lr_scheduler": "cosine", "lr_warmup_steps": 20, "use_ema": True, "ema_decay": 0.99, "seed": 0,
                     "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
                     "attention_levels": ()}


def train_memorizing_run(folder: Path, threads: int = 1) -> SimpleNamespace:
    """Train the demo DDPM on :data:`MEMORIZED_SCENES` with :data:`MEMORIZING_RECIPE`.

    Returns ``data`` (the training folder), ``run`` (the run folder: ``checkpoint-100 .. -600`` with
    ``unet/`` + ``unet_ema/``, and the final pipeline) and ``train_s`` (wall seconds of the training).
    """
    import time

    import torch

    from conftest import write_training_set
    from memtrack.demo.train import train_demo

    folder = Path(folder)
    data = write_training_set(folder / "data", size=MEMORIZING_RECIPE["resolution"], names=MEMORIZED_SCENES)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        train_demo(data, folder / "run", progress=False, **MEMORIZING_RECIPE)
    finally:
        torch.set_num_threads(before)
    return SimpleNamespace(data=data, run=folder / "run", train_s=time.perf_counter() - t0)


def build_index(data: Path, out: Path, resolution: int) -> Path:
    """A pixel reference index of ``data`` at ``resolution``."""
    from memtrack.config import Config, EmbedderSpec
    from memtrack.data.dataset import read_dataset
    from memtrack.embedders.registry import get_embedder
    from memtrack.index.reference import ReferenceIndex

    cfg = Config()
    cfg.index.embedders = [EmbedderSpec("pixel", {"resolution": resolution})]
    ReferenceIndex.build(read_dataset(data), [get_embedder(s) for s in cfg.index.embedders], out, cfg)
    return out
