"""The pixel space: each training image as the training script's transform shows it to the model, raw
values in [0, 1], compared by L2.

This is the space in which Gu et al. 2023 ("On Memorization in Diffusion Models") and Carlini et al. 2023
("Extracting Training Data from Diffusion Models") define their tests, so vectors are *not* normalised.
Vectors are laid out channel-first (C, H, W), so ``v.reshape(3, r, r)`` recovers the image for tiling.

The transform is diffusers' (docs/transform.md tabulates it per script): the image converted to RGB as
``Image.convert("RGB")`` does (``alpha: drop``), ``Resize(train_resolution)`` of its shorter side with the
script's interpolation, ``CenterCrop`` or ``RandomCrop`` to a square, and ``RandomHorizontalFlip`` when the
run flips. memtrack calls torchvision's own ``Resize``/``CenterCrop``/``crop``/``hflip`` on the PIL image
(torchvision computes the long side as ``int(R * long / short)`` and resizes with PIL's antialiased
filter), so a reference view is byte-identical to what the script fed the model. When the pixel space is
smaller than the training resolution, every view is then reduced to ``resolution`` with PIL's bilinear
filter -- the same reduction a generated sample goes through -- so a sample that reproduces a training
view lies at distance exactly 0.

The views of a training image (:meth:`PixelEmbedder.embed_reference`; one vector each):

* ``crop: center``: the centre crop, and with ``flip`` its mirror image;
* ``crop: random``: crops at offsets 0, s, 2s, ... and the last offset along the long side (``s`` =
  ``crop_stride``, by default one pixel of the pixel space, so every offset ``RandomCrop`` can draw is
  indexed when ``resolution == train_resolution``), each also mirrored with ``flip``;
* ``crop: none``: the image squashed to a square (memtrack's own; no diffusers script does this).

A query (:meth:`PixelEmbedder.embed`, a generated sample) is its centre view: a ``train_resolution``-square
sample passes through Resize and CenterCrop unchanged and is only reduced.

Example:
    >>> emb = get_embedder({"name": "pixel", "resolution": 32, "crop": "random", "flip": True})
    >>> ref = emb.embed_reference([open_image("a.png", alpha="drop")])   # ref.vectors [views, 3072]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
from PIL import Image

from memtrack.errors import ConfigError
from memtrack.embedders.base import Embedder, EmbedderOptions, ReferenceVectors

#: torchvision's InterpolationMode names, as diffusers' ``--image_interpolation_mode`` spells them
INTERPOLATIONS = ("bilinear", "bicubic", "lanczos", "nearest", "nearest_exact", "box", "hamming")
Interpolation = Literal["bilinear", "bicubic", "lanczos", "nearest", "nearest_exact", "box", "hamming"]
#: how a view larger than the pixel space is reduced to it (memtrack's step; samples get the same)
REDUCE = "bilinear"
#: data.transform field -> the pixel option that reproduces it
TRANSFORM_OPTIONS = {"resolution": "train_resolution", "interpolation": "interpolation", "crop": "crop", "flip": "flip"}


@dataclass
class PixelOptions(EmbedderOptions):
    """Options of the ``pixel`` embedder. The last five reproduce the training script's transform.

    Args:
        resolution: side of the square pixel space; vectors have ``3 * resolution**2`` values. Carlini et
            al. and Gu et al. compare in the model's own pixel space (``resolution = train_resolution``);
            a smaller space is cheaper and reduces every view to it.
        train_resolution: the training script's ``--resolution``: the shorter side is resized to it and a
            square of it cropped (default: ``resolution``). Must be >= ``resolution``.
        interpolation: the Resize filter: the script's ``--image_interpolation_mode`` (bilinear in scripts
            without that flag: train_unconditional.py, train_dreambooth.py).
        crop: ``center`` (``--center_crop``) | ``random`` (the scripts' default without ``--center_crop``:
            crops along the long side are indexed, see ``crop_stride``) | ``none`` (squash the whole image to
            a square; memtrack's own, not a diffusers transform).
        flip: the run flips at random (``--random_flip``): the mirror image of every view is indexed too.
        crop_stride: with ``crop: random``, training pixels between indexed crop offsets; 0 (default) is one
            pixel of the pixel space (``ceil(train_resolution / resolution)``), which indexes every offset
            when ``resolution == train_resolution``.
        resample: deprecated name of ``interpolation``, read from indexes built before memtrack followed the
            training transform.
    """

    resolution: int = 32
    train_resolution: Optional[int] = None
    interpolation: Interpolation = "bilinear"
    crop: Literal["center", "random", "none"] = "center"
    flip: bool = False
    crop_stride: int = 0
    resample: Optional[str] = None

    def __post_init__(self):
        if self.resample is not None:  # the old name wins only where the new one is left at its default
            if self.interpolation not in ("bilinear", self.resample):
                raise ConfigError(f"pixel: resample {self.resample!r} and interpolation {self.interpolation!r} "
                                  "disagree", hint="set interpolation only (resample is its old name)")
            self.interpolation, self.resample = self.resample, None
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"pixel.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                              f"got {self.interpolation!r}")
        if self.resolution <= 0 or (self.train_resolution is not None and self.train_resolution < self.resolution):
            raise ConfigError(f"pixel: resolution {self.resolution} must be > 0 and <= train_resolution "
                              f"{self.train_resolution}", hint="the pixel space can reduce the training view, "
                                                              "not enlarge it")
        if self.crop_stride < 0:
            raise ConfigError(f"pixel.crop_stride must be >= 0, got {self.crop_stride}")


def _tv():
    """torchvision's transforms (imported on first use: it pulls in torch)."""
    from torchvision import transforms
    from torchvision.transforms import functional

    return transforms, functional


def tv_interpolation(name: str):
    """torchvision's ``InterpolationMode`` named as diffusers' ``--image_interpolation_mode`` does."""
    transforms, _ = _tv()
    return getattr(transforms.InterpolationMode, name.upper())


@dataclass
class AlignedView:
    """The best-aligned view of a training image for a query (:meth:`PixelEmbedder.best_aligned`).

    Attributes:
        distance: RMS pixel distance in [0, 1] (0: the query reproduces this view exactly).
        offset: the crop's offset along the resized image's long side, in training pixels.
        mirrored: the view is the mirror image.
        vector: the view's pixel vector, ``float32 [dim]``.
    """

    distance: float
    offset: int
    mirrored: bool
    vector: np.ndarray


def crop_offsets(long: int, size: int, stride: int) -> list[int]:
    """Offsets along a side of ``long`` pixels at which a ``size`` crop is indexed: every ``stride``-th,
    and always the last one (``RandomCrop`` draws from ``0 .. long - size``)."""
    last = long - size
    return sorted(set(range(0, last + 1, max(1, stride))) | {last}) if last > 0 else [0]


class PixelEmbedder(Embedder):
    name = "pixel"
    metric = "l2"
    pixel_space = True
    baseline_statistic = "RMS pixel distance to nearest other"
    Options = PixelOptions

    @property
    def dim(self) -> int:
        return 3 * self.options.resolution ** 2

    @property
    def resolution(self) -> int:
        return self.options.resolution

    @property
    def train_resolution(self) -> int:
        return self.options.train_resolution or self.options.resolution

    @property
    def crop_stride(self) -> int:
        """The stride in training pixels between indexed random-crop offsets (0 resolved)."""
        return self.options.crop_stride or math.ceil(self.train_resolution / self.resolution)

    # ----------------------------------------------------------------------------------- transform
    def rgb(self, image: Image.Image) -> Image.Image:
        """``image`` as RGB following ``alpha`` (a no-op for RGB images such as
        :func:`~memtrack.data.dataset.open_image` returns)."""
        from memtrack.data.dataset import to_rgb

        return to_rgb(image, self.alpha)

    def resized(self, image: Image.Image) -> Image.Image:
        """The training script's ``Resize`` (shorter side to ``train_resolution``; a square with crop none)."""
        transforms, _ = _tv()
        r = self.train_resolution
        size = (r, r) if self.options.crop == "none" else r
        return transforms.Resize(size, interpolation=tv_interpolation(self.options.interpolation))(self.rgb(image))

    def centre(self, width: int, height: int) -> tuple[int, int]:
        """``(top, left)`` of the centre crop, rounded as torchvision's ``CenterCrop`` rounds it."""
        r = self.train_resolution
        return int(round((height - r) / 2.0)), int(round((width - r) / 2.0))

    def origins(self, width: int, height: int) -> list[tuple[int, int]]:
        """``(top, left)`` of every indexed crop of a resized ``width x height`` image."""
        r = self.train_resolution
        if self.options.crop != "random":
            return [self.centre(width, height)]
        if width >= height:
            return [(0, x) for x in crop_offsets(width, r, self.crop_stride)]
        return [(y, 0) for y in crop_offsets(height, r, self.crop_stride)]

    def crop(self, resized: Image.Image, top: int, left: int, flipped: bool) -> Image.Image:
        """One view of a resized image: the crop at ``(top, left)``, mirrored if ``flipped``, reduced."""
        _, F = _tv()
        r = self.train_resolution
        view = F.crop(resized, top, left, r, r)
        if flipped:
            view = F.hflip(view)
        if self.resolution != r:
            view = view.resize((self.resolution, self.resolution), Image.Resampling[REDUCE.upper()])
        return view

    def views(self, image: Image.Image) -> list[Image.Image]:
        """Every indexed view of a training image: the crops (see :meth:`origins`), then their mirrors."""
        big = self.resized(image)
        flips = (False, True) if self.options.flip else (False,)
        return [self.crop(big, top, left, f) for f in flips for top, left in self.origins(*big.size)]

    def canonical(self, image: Image.Image) -> Image.Image:
        """The query view: centre crop, not mirrored."""
        big = self.resized(image)
        return self.crop(big, *self.centre(*big.size), False)

    # ------------------------------------------------------------------------------------- vectors
    @staticmethod
    def _vectors(views: Sequence[Image.Image]) -> np.ndarray:
        if not views:
            return np.zeros((0, 0), np.float32)
        arr = np.stack([np.asarray(v, dtype=np.uint8).transpose(2, 0, 1) for v in views])
        return arr.reshape(len(views), -1).astype(np.float32) / 255.0

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self._vectors([self.canonical(im) for im in images])

    def embed_reference(self, images: Sequence[Image.Image]) -> ReferenceVectors:
        """Every view the training transform can show the model (module docstring), with its image."""
        if self.options.crop != "random" and not self.options.flip:
            return super().embed_reference(images)  # one view per image: the query view
        views, index = [], []
        for i, im in enumerate(images):
            got = self.views(im)
            views.extend(got)
            index.extend([i] * len(got))
        vec = self._vectors(views) if views else np.zeros((0, self.dim), np.float32)
        return ReferenceVectors(vec, np.asarray(index, dtype=np.int64))

    # --------------------------------------------------------------------------------- exact check
    def best_aligned(self, image: Image.Image, query: np.ndarray, *, near: Optional[int] = None) -> AlignedView:
        """The view of training ``image`` closest to ``query`` over *every* crop offset (stride 1) and both
        mirrors (when the run flips).

        The exact check behind ``crop: random`` when the indexed offsets are ``crop_stride > 1`` apart (a
        pixel space smaller than the training resolution): the index proposes the training image from its
        nearest stored view; this finds the offset the sample actually reproduces. ``near``: search only
        offsets within ``crop_stride`` of this one.
        """
        big = self.resized(image)
        w, h = big.size
        along = (lambda top, left: left) if w >= h else (lambda top, left: top)  # noqa: E731
        if self.options.crop == "random":
            last = max(w, h) - self.train_resolution
            boxes = [(0, o) if w >= h else (o, 0) for o in range(last + 1)]
        else:
            boxes = self.origins(w, h)
        if near is not None:
            boxes = [b for b in boxes if abs(along(*b) - near) <= self.crop_stride] or boxes
        q = np.asarray(query, dtype=np.float64).reshape(-1)
        best = AlignedView(math.inf, 0, False, np.zeros(self.dim, np.float32))
        for flipped in ((False, True) if self.options.flip else (False,)):
            for top, left in boxes:
                vec = self._vectors([self.crop(big, top, left, flipped)])[0]
                d = float(np.sqrt(np.mean((vec.astype(np.float64) - q) ** 2)))
                if d < best.distance:
                    best = AlignedView(d, along(top, left), flipped, vec)
        return best

    # ------------------------------------------------------------------------------- fingerprint
    @classmethod
    def options_for_transform(cls, options: dict, transform: dict) -> dict:
        """Pixel options following ``transform``; a field the options already set differently is refused."""
        out = dict(options)
        for field, value in transform.items():
            key = TRANSFORM_OPTIONS[field]
            if key in out and out[key] is not None and out[key] != value:
                raise ConfigError(f"pixel option {key}: {out[key]!r} contradicts data.transform.{field}: {value!r}",
                                  hint="set the training transform in one place (data.transform or the --flags)")
            out[key] = value
        r = out.get("train_resolution")
        if r is not None and "resolution" not in out:
            out["resolution"] = min(r, PixelOptions.resolution)  # the space never enlarges the training view
        return out

    def training_transform(self) -> dict:
        o = self.options
        return {"resolution": self.train_resolution, "interpolation": o.interpolation, "crop": o.crop,
                "flip": bool(o.flip)}

    def _fingerprint_extra(self) -> dict:
        transform = self.training_transform()
        if self.options.crop == "random":
            transform["crop_stride"] = self.crop_stride
        fp = {"resolution": self.resolution, "transform": transform, "scale": "[0,1] from uint8", "layout": "CHW"}
        if self.resolution != self.train_resolution:
            fp["reduce"] = REDUCE
        return fp


def describe_transform(t: dict) -> str:
    """A training transform as the scripts' torchvision pipeline reads, e.g.
    ``Resize(64, bilinear) · RandomCrop(64) · RandomHorizontalFlip``; unknown fields are shown as ``?``."""
    r = t.get("resolution", "?")
    crops = {"center": f"CenterCrop({r})", "random": f"RandomCrop({r})", "none": "(squashed)"}
    crop = crops.get(t.get("crop"), "crop ?")
    flip = {True: " · RandomHorizontalFlip", False: "", None: " · flip ?"}.get(t.get("flip"), "")
    return f"Resize({r}, {t.get('interpolation') or '?'}) · {crop}{flip}"


def pixels(images: Sequence[Image.Image], resolution: int, crop: str = "center",
           interpolation: str = "bilinear") -> np.ndarray:
    """``uint8 [n, 3, r, r]`` arrays of the images' query views (centre crop) at ``resolution``."""
    emb = PixelEmbedder(PixelOptions(resolution=resolution, crop=crop, interpolation=interpolation))
    out = np.empty((len(images), 3, resolution, resolution), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(emb.canonical(im), dtype=np.uint8).transpose(2, 0, 1)
    return out
