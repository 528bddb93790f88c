"""The sampling-free probes, as the tracker runs them on each checkpoint (see :mod:`memtrack.probes.loss_gap`).

* The loss gap needs the training images and a held-out set that were never trained on
  (``dynamics.heldout_dir``). Both are decoded once, the first ``dynamics.loss_gap_images`` of each in a
  fixed order, and reused at every checkpoint with the same noise.
* The noise magnitude (text-to-image) runs on the checkpoint's pipeline with the plan's prompts.

The results go into the evaluation's stored ``info`` and from there into ``summary.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from memtrack.config import Config
from memtrack.data.dataset import open_image, read_images
from memtrack.errors import ConfigError, DataError
from memtrack.utils import get_logger

logger = get_logger(__name__)


class LossGapProbe:
    """Holds the fixed train / held-out image sets; :meth:`run` measures one model."""

    def __init__(self, config: Config, train_paths: Sequence[str]):
        d = config.dynamics
        if not d.heldout_dir:
            raise ConfigError("dynamics.loss_gap needs dynamics.heldout_dir: a folder of images from the same "
                              "distribution that the model never trained on",
                              hint="set dynamics.heldout_dir, or turn dynamics.loss_gap off")
        held, _ = read_images(d.heldout_dir, config.data.max_image_pixels)
        if not held:
            raise DataError(f"dynamics.heldout_dir {d.heldout_dir} holds no readable image")
        n = d.loss_gap_images
        self.train = [open_image(p, config.data.max_image_pixels) for p in list(train_paths)[:n]]
        self.heldout = [open_image(p, config.data.max_image_pixels) for p in held[:n]]
        self.timesteps = d.loss_gap_timesteps
        self.seed = config.sampling.seed
        self._tensors: dict[int, tuple] = {}

    def run(self, unet, scheduler) -> dict:
        from memtrack.probes.loss_gap import loss_gap, prepare_images

        size = unet.config.sample_size
        size = int(size if isinstance(size, int) else size[0])
        if size not in self._tensors:  # decode + resize once per resolution
            self._tensors[size] = (prepare_images(self.train, size), prepare_images(self.heldout, size))
        train, held = self._tensors[size]
        return loss_gap(unet, scheduler, train, held, self.timesteps, self.seed)


def make_loss_gap_probe(config: Config, index) -> LossGapProbe | None:
    """The probe when ``dynamics.loss_gap`` is on (training images: the index's records, in order)."""
    if not config.dynamics.loss_gap:
        return None
    paths = [r.path for r in index.records if Path(r.path).is_file()]
    return LossGapProbe(config, paths)


def run_probes(pipeline, config: Config, loss_gap_probe: LossGapProbe | None, prompts: Sequence[str] | None) -> dict:
    """The probes that apply to this pipeline; a probe that fails is logged and left out, not fatal."""
    out: dict = {}
    if loss_gap_probe is not None:
        if getattr(pipeline, "text_encoder", None) is not None:
            logger.warning("the loss-gap probe supports unconditional models only; skipped")
        else:
            out["loss_gap"] = loss_gap_probe.run(pipeline.unet, pipeline.scheduler)
    if config.dynamics.noise_magnitude and prompts and getattr(pipeline, "text_encoder", None) is not None:
        from memtrack.probes.loss_gap import noise_magnitude, noise_magnitude_block

        unique = list(dict.fromkeys(prompts))
        s = config.sampling
        mags = noise_magnitude(pipeline, unique, config.dynamics.noise_magnitude_steps or s.num_inference_steps,
                               s.guidance_scale, s.seed, height=s.resolution, width=s.resolution)
        block = noise_magnitude_block(unique, mags)
        block["per_prompt"] = {p: float(m) for p, m in zip(unique, mags)}
        out["noise_magnitude"] = block
    return out


def loss_gap_block(checkpoints: Sequence[dict], config: Config) -> dict | None:
    """The summary's ``loss_gap`` block: the curves and their onset, beside the sampling onsets."""
    from memtrack.probes.loss_gap import loss_gap_onset

    rows = [(c["step"], c["loss_gap"]) for c in checkpoints if c.get("loss_gap")]
    if not rows:
        return None
    steps = [s for s, _ in rows]
    gap = [g["gap_mean"] for _, g in rows]
    held = [g["heldout_mean"] for _, g in rows]
    return {"steps": steps, "gap_mean": gap, "heldout_mean": held, "train_mean": [g["train_mean"] for _, g in rows],
            "timesteps": rows[0][1]["timesteps"],
            "onset": loss_gap_onset(steps, gap, held, persistence=config.dynamics.persistence),
            "citation": "Favero, Sclocchi & Wyart 2025; Bonnaire et al. 2025"}


def noise_magnitude_summary(checkpoints: Sequence[dict]) -> dict | None:
    """Per checkpoint, the noise-magnitude distribution; and how it relates to the sampled verdicts."""
    rows = [(c["step"], c["noise_magnitude"]) for c in checkpoints if c.get("noise_magnitude")]
    if not rows:
        return None
    return {"steps": [s for s, _ in rows], "p50": [b["p50"] for _, b in rows], "p95": [b["p95"] for _, b in rows],
            "max": [b["max"] for _, b in rows], "top_latest": rows[-1][1]["top"],
            "citation": "Wen et al., ICLR 2024"}
