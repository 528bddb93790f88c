"""Helpers for the unit tests of memtrack's pure core (detectors, metrics, dynamics, config, data, gate, store).

Training images are real photographs that scikit-image ships offline, resized to 32x32; nothing is
downloaded. (conftest.py is shared with other test modules; these helpers stay apart from it.)
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

SCENES5 = ("astronaut", "coffee", "chelsea", "rocket", "camera")


@functools.lru_cache(maxsize=None)
def scene(name: str, size: int = 32) -> Image.Image:
    """A scikit-image sample photograph as an RGB PIL image of ``size`` x ``size``."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size),
                                                                                Image.Resampling.BICUBIC)


def chw(image: Image.Image) -> np.ndarray:
    """``float64 [3, H, W]`` in [0, 1], the layout of the pixel embedder."""
    return np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255.0


def training_images(size: int = 32, names=SCENES5) -> np.ndarray:
    """``[n, 3, size, size]`` float64 training images in [0, 1]."""
    return np.stack([chw(scene(n, size)) for n in names])


def against_all(query: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Every query gets the whole training set as its candidates: ``[n, k, *image_shape]``."""
    return np.broadcast_to(train[None], (len(query), *train.shape)).copy()
