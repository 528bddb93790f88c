"""The embedder interface: images in, float32 vectors out, plus what it takes to compare them.

An embedder declares its ``metric``: ``"cosine"`` spaces return L2-normalised rows and are searched by
inner product; the ``"l2"`` pixel space returns raw pixel vectors and is searched by squared L2 (see
ARCHITECTURE.md, "Each space declares its metric"). Its ``fingerprint`` is a JSON-able dict (name,
weights hash, preprocessing, dim) that an index stores; a scan with a differing fingerprint is refused.

A training image can have several reference vectors (:meth:`Embedder.embed_reference`): every face of a
group photo, or the views a training script's augmentation can show the model (the mirrored image when
it flips, every crop offset when it crops at random). A query (a generated sample) always has one vector
per image (:meth:`Embedder.embed`; faces: :meth:`~memtrack.embedders.face.FaceEmbedder.embed_faces`).
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
from PIL import Image

Metric = Literal["cosine", "l2"]


Alpha = Literal["drop", "white"]


@dataclasses.dataclass
class EmbedderOptions:
    """Options common to every embedder; subclasses add their own fields.

    Args:
        batch_size: images per forward pass.
        alpha: how a training image that is not 8-bit RGB becomes RGB before embedding. ``drop`` (default)
            is PIL's ``Image.convert("RGB")``, exactly what diffusers' training scripts feed the model:
            transparency is discarded (the colour stored under transparent pixels shows), palette
            transparency too, and 16-bit samples are clipped at 255. ``white`` composites transparency on
            white and scales 16-bit samples to 8 bits (how the image looks in a viewer).
    """

    batch_size: int = 64
    alpha: Alpha = "drop"


@dataclasses.dataclass
class ReferenceVectors:
    """The reference vectors of a batch of images.

    Attributes:
        vectors: ``float32 [m, dim]``.
        image_index: ``int64 [m]`` the input image each vector belongs to, non-decreasing; an image can
            have several vectors (views, faces) or none (no face found).
    """

    vectors: np.ndarray
    image_index: np.ndarray


class Embedder(ABC):
    """Base class. Subclasses set ``name``, ``metric``, an ``Options`` dataclass, and implement ``embed``.

    ``embed`` takes a sequence of RGB ``PIL.Image`` objects (any size) and returns ``float32 [n, dim]``.
    """

    name: ClassVar[str]
    metric: ClassVar[Metric]
    Options: ClassVar[type] = EmbedderOptions
    #: the space groups its training vectors into identities (faces): the index stores identities and a
    #: calibrated verification threshold for it
    identities: ClassVar[bool] = False
    #: its vectors are the image's own pixels in [0, 255]: stored exactly as uint8, reshaped to images by
    #: the pixel detectors (:attr:`pixel_shape`), and the exact-search and train->train lists are built for it
    pixel_space: ClassVar[bool] = False
    #: what the index's baseline (each training vector's distance to its nearest other) measures, in words
    baseline_statistic: ClassVar[str] = ""

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    @property
    def pixel_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of the image a vector is (pixel spaces), else None."""
        if not self.pixel_space:
            return None
        res = int(self.options.resolution)
        return (3, res, res)

    @property
    def storage(self) -> tuple[float, str]:
        """``(divisor, dtype)`` of the stored vectors: pixel spaces keep exact uint8 pixels."""
        return (255.0, "uint8") if self.pixel_space else (1.0, "float32")

    def baseline_words(self) -> str:
        """What the index's baseline for this space measures (the manifest and the report say it)."""
        if self.baseline_statistic:
            return self.baseline_statistic
        return "cosine to nearest other" if self.metric == "cosine" else "distance to nearest other"

    def embed_reference(self, images: Sequence[Image.Image]) -> ReferenceVectors:
        """The vectors a training image is indexed under, with the image each came from.

        Default: one vector per image, :meth:`embed`. Embedders with several vectors per training image
        (the pixel space's augmentation views, every face of an image) override this.
        """
        vectors = np.asarray(self.embed(images), dtype=np.float32)
        return ReferenceVectors(vectors, np.arange(len(vectors), dtype=np.int64))

    @property
    def alpha(self) -> str:
        """How training images become RGB for this embedder (see :class:`EmbedderOptions`)."""
        return getattr(self.options, "alpha", "drop")

    @classmethod
    def options_for_transform(cls, options: dict, transform: dict) -> dict:
        """``options`` of this embedder made to follow a training ``transform`` (the set fields of
        ``data.transform``: resolution, interpolation, crop, flip). Default: unchanged."""
        return dict(options)

    def training_transform(self) -> dict | None:
        """The training script's transform this space reproduces (resolution, interpolation, crop, flip),
        or None when the space does not follow it. A run whose transform differs is refused."""
        return None

    @property
    def fingerprint(self) -> dict:
        """What must match between an index and a scan: name, metric, dim, alpha and ``_fingerprint_extra``."""
        fp = {"name": self.name, "metric": self.metric, "dim": int(self.dim), "alpha": self.alpha}
        fp.update(self._fingerprint_extra())
        return fp

    def _fingerprint_extra(self) -> dict:
        return {}

    def close(self) -> None:
        """Release models (optional)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


def fingerprint_diff(expected: dict, got: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints, e.g. ``["resolution: index has 32, this scan
    has 64"]``; nested dicts are compared key by key (``transform.flip: index has False, ...``)."""
    out = []
    for key in sorted(set(expected) | set(got)):
        a, b = expected.get(key), got.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(fingerprint_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: index has {a!r}, this scan has {b!r}")
    return out
