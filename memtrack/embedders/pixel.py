"""The pixel space: images resized to a small fixed resolution, raw values in [0, 1], compared by L2.

This is the space in which Gu et al. 2023 ("On Memorization in Diffusion Models") and Carlini et al. 2023
("Extracting Training Data from Diffusion Models") define their tests, so vectors are *not* normalised.
Vectors are laid out channel-first (C, H, W), so ``v.reshape(3, r, r)`` recovers the image for tiling.

Preprocessing matches diffusers' ``train_unconditional.py``: resize the shorter side to ``resolution``
then centre-crop (``crop: center``), or squash the whole image (``crop: none``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from . import register_embedder
from .base import Embedder, EmbedderOptions

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclass
class PixelOptions(EmbedderOptions):
    """Options of the ``pixel`` embedder.

    Args:
        resolution: side of the square the image is resized to; use the training resolution (Carlini et al.
            and Gu et al. compare in the model's own pixel space).
        crop: ``center`` resizes the shorter side and centre-crops; ``none`` squashes to a square.
        resample: the resampling filter.
    """

    resolution: int = 32
    crop: Literal["center", "none"] = "center"
    resample: Literal["bicubic", "bilinear", "lanczos", "nearest"] = "bicubic"


def to_square(image: Image.Image, resolution: int, crop: str = "center", resample: str = "bicubic") -> Image.Image:
    """RGB, shorter side resized to ``resolution`` and centre-cropped (or squashed with crop='none')."""
    image = image.convert("RGB")
    method = _RESAMPLE[resample]
    if crop == "none":
        return image.resize((resolution, resolution), method) if image.size != (resolution, resolution) else image
    w, h = image.size
    if (w, h) == (resolution, resolution):
        return image
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), method)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def pixels(images: Sequence[Image.Image], resolution: int, crop: str = "center", resample: str = "bicubic") -> np.ndarray:
    """``uint8 [n, 3, r, r]`` arrays of the preprocessed images."""
    out = np.empty((len(images), 3, resolution, resolution), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(to_square(im, resolution, crop, resample), dtype=np.uint8).transpose(2, 0, 1)
    return out


class PixelEmbedder(Embedder):
    name = "pixel"
    metric = "l2"
    Options = PixelOptions

    @property
    def dim(self) -> int:
        return 3 * self.options.resolution ** 2

    @property
    def resolution(self) -> int:
        return self.options.resolution

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        o = self.options
        arr = pixels(images, o.resolution, o.crop, o.resample)
        return (arr.reshape(len(images), -1).astype(np.float32) / 255.0)

    def _fingerprint_extra(self) -> dict:
        o = self.options
        return {"resolution": o.resolution, "crop": o.crop, "resample": o.resample, "scale": "[0,1] from uint8",
                "layout": "CHW"}


register_embedder("pixel", PixelEmbedder)
