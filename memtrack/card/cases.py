"""The labelled ground truth of the detector card: reproductions and non-reproductions of training images.

From real photographs (:class:`Source`, at any size) :func:`ground_truth` makes a training set at the
working resolution ``r`` -- each photograph through the pixel embedder's own preprocessing (shorter side
resized to ``r``, centre crop), some of them present twice (the second copy with Gaussian noise sigma 0.01,
a near-duplicate) -- and a list of :class:`Case` images, each labelled for three questions:

* ``copy``: is it a reproduction of a training image? (what nn_ratio, tiled_l2, adaptive_l2 and the
  ``<space>_copy`` detectors are for)
* ``identity_leak``: does it show a training person, clearly that one person?
* ``identity_interpolation``: does it blend two training people?

Case types (:data:`CASE_TYPES`, a registry) and their labels:

    exact, hflip, crop_center, crop_offset, shift_{1,2,4}px, jpeg_q{75,50}, noise_{0.02,0.05,0.1},
    jitter ............... copy = True for every training image; identity_leak = True when it is a face
    dup_exact, dup_noise . copy = True: copies of a training image that is in the training set twice
    face_augmented ....... copy = True, identity_leak = True: a training face rotated, zoomed, brightened
    blend ................ all False: a 50/50 pixel blend of two non-face training images is not a copy of
                           either (it holds half of each; no copy detector should call it a copy of one)
    morph ................ identity_interpolation = True: a 50/50 blend of two training *people* (the
                           balanced morph of memtrack.identity.detect's measurements); copy and leak False
    novel ................ all False: held-out photographs that are not in the training set
    other_person ......... all False: faces of people who are not in the training set

A blend of two scenes and a morph of two people are the same operation; what differs is the question
asked. Pure functions: PIL images in, PIL images out, seeded noise; nothing is read or written here.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from memtrack.embedders.pixel import PixelEmbedder, PixelOptions

LABELS = ("copy", "identity_leak", "identity_interpolation")
DUPLICATE_SIGMA = 0.01
CROP_ZOOM = 0.8            # crop_center keeps the central 80% of the photograph
JITTER = 0.2               # colour jitter factors in [1 - JITTER, 1 + JITTER] (torchvision ColorJitter(0.2, ...))
FACE_ROTATION_DEG = 8.0


@dataclass
class Source:
    """A real photograph (any size). ``identity`` names the person when it is a face chip."""

    name: str
    image: Image.Image
    identity: Optional[str] = None
    file_name: Optional[str] = None   # the training image's id (default ``<name>.png``)


@dataclass
class TrainImage:
    """One image of the card's training set, at the working resolution."""

    name: str                      # file name in the training folder (``<source>.png``)
    image: Image.Image
    source: Source
    duplicate_of: Optional[str] = None   # the training image this one is a noisy second copy of


@dataclass
class Case:
    """One labelled test image. ``targets`` are the training images (names) it reproduces, if any."""

    kind: str
    image: Image.Image
    labels: dict
    targets: tuple = ()
    identities: tuple = ()         # the training people it shows (leak: one; morph: two)
    origin: str = ""               # what it was made from (a training or novel image name)


@dataclass
class CaseType:
    description: str
    labels: dict                   # the labels for a non-face training image; faces add identity_leak
    per_train: Optional[Callable] = None   # fn(train_image, r, rng) -> image | None, one case per image


@dataclass
class GroundTruth:
    resolution: int
    train: list
    cases: list = field(default_factory=list)
    seed: int = 0

    @property
    def case_types(self) -> list[str]:
        seen = dict.fromkeys(c.kind for c in self.cases)
        return list(seen)


# ------------------------------------------------------------------------------------ transforms


def _to_u8(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8))


def add_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian noise of standard deviation ``sigma`` on [0, 1] pixel values, rounded back to uint8."""
    a = np.asarray(image.convert("RGB"), np.float64) / 255.0
    return _to_u8(a + rng.normal(0.0, sigma, a.shape))


def shift(image: Image.Image, px: int) -> Image.Image:
    """The content moved ``px`` pixels right and down; the uncovered border repeats the edge pixels."""
    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    return Image.fromarray(np.pad(a, ((px, 0), (px, 0), (0, 0)), mode="edge")[:h, :w])


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def colour_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor drawn from [0.8, 1.2]."""
    out = image.convert("RGB")
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhance(out).enhance(float(rng.uniform(1 - JITTER, 1 + JITTER)))
    return out


def crop_center(source: Image.Image, r: int) -> Image.Image:
    """The central ``CROP_ZOOM`` of the photograph's centre square, at ``r`` px: a mild zoom-in."""
    w, h = source.size
    s = min(w, h) * CROP_ZOOM
    left, top = (w - s) / 2, (h - s) / 2
    return source.convert("RGB").resize((r, r), Image.Resampling.BICUBIC, box=(left, top, left + s, top + s))


def crop_offset(source: Image.Image, r: int) -> Image.Image | None:
    """The far-edge ``r x r`` window of the photograph with its shorter side resized to ``r``.

    What diffusers' ``RandomCrop(resolution)`` can hand the model, where the index holds the centre crop.
    None for (nearly) square photographs, which have no other window.
    """
    w, h = source.size
    scale = r / min(w, h)
    nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
    if max(nw, nh) - r < 2:
        return None
    im = source.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
    return im.crop((nw - r, nh - r, nw, nh))


def face_augment(source: Image.Image, r: int, rng: np.random.Generator) -> Image.Image:
    """A training face rotated by +-8 degrees, zoomed in 10% and brightened or darkened by up to 15%."""
    im = source.convert("RGB")
    angle = FACE_ROTATION_DEG * (1 if rng.random() < 0.5 else -1)
    fill = tuple(int(v) for v in np.asarray(im).reshape(-1, 3).mean(0))
    im = im.rotate(angle, Image.Resampling.BICUBIC, fillcolor=fill)
    w, h = im.size
    s = min(w, h) / 1.1
    im = im.resize((r, r), Image.Resampling.BICUBIC, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
    return ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.85, 1.15)))


def blend(a: Image.Image, b: Image.Image) -> Image.Image:
    return Image.blend(a.convert("RGB"), b.convert("RGB"), 0.5)


# ------------------------------------------------------------------------------------ registry

_COPY = {"copy": True, "identity_leak": False, "identity_interpolation": False}
_NONE = {"copy": False, "identity_leak": False, "identity_interpolation": False}

CASE_TYPES: dict[str, CaseType] = {
    "exact": CaseType("an exact copy of a training image", _COPY, lambda t, r, g: t.image.copy()),
    "hflip": CaseType("a training image mirrored left-right", _COPY, lambda t, r, g: ImageOps.mirror(t.image)),
    "crop_center": CaseType("the central 80% of a training photograph (a mild zoom)", _COPY,
                            lambda t, r, g: crop_center(t.source.image, r)),
    "crop_offset": CaseType("the far-edge window a random crop can give (non-square photographs only)", _COPY,
                            lambda t, r, g: crop_offset(t.source.image, r)),
    **{f"shift_{s}px": CaseType(f"a training image shifted by {s} px right and down", _COPY,
                                (lambda s: lambda t, r, g: shift(t.image, s))(s)) for s in (1, 2, 4)},
    **{f"jpeg_q{q}": CaseType(f"a training image re-compressed as JPEG at quality {q}", _COPY,
                              (lambda q: lambda t, r, g: jpeg(t.image, q))(q)) for q in (75, 50)},
    **{f"noise_{s:g}": CaseType(f"a training image with Gaussian noise sigma {s:g} (pixels in [0, 1])", _COPY,
                                (lambda s: lambda t, r, g: add_noise(t.image, s, g))(s)) for s in (0.02, 0.05, 0.1)},
    "jitter": CaseType("a training image with brightness, contrast and saturation jittered by up to 20%", _COPY,
                       lambda t, r, g: colour_jitter(t.image, g)),
    "dup_exact": CaseType("an exact copy of a training image that the training set holds twice", _COPY),
    "dup_noise": CaseType("a copy of a twice-held training image with noise sigma 0.02", _COPY),
    "face_augmented": CaseType("a training face rotated 8 degrees, zoomed 10%, brightness changed", _COPY),
    "blend": CaseType("a 50/50 pixel blend of two non-face training images (a copy of neither)", _NONE),
    "morph": CaseType("a 50/50 pixel blend of two training people (an identity interpolation)",
                      {**_NONE, "identity_interpolation": True}),
    "novel": CaseType("a held-out photograph that is not in the training set", _NONE),
    "other_person": CaseType("the face of a person who is not in the training set", _NONE),
}


def default_case_types() -> list[str]:
    return list(CASE_TYPES)


# ------------------------------------------------------------------------------------ building


def to_square(image: Image.Image, resolution: int) -> Image.Image:
    """The pixel space's view of ``image`` at ``resolution`` (bilinear resize, centre crop, alpha dropped)."""
    return PixelEmbedder(PixelOptions(resolution=resolution)).canonical(image)


def training_set(train: Sequence[Source], resolution: int, duplicates: int, seed: int = 0,
                 prepare: Callable | None = None) -> list[TrainImage]:
    """The training images at ``resolution``; the first ``duplicates`` non-face ones get a noisy twin.

    ``prepare(image) -> image`` turns a photograph into the training image (default: the pixel embedder's
    preprocessing, :func:`to_square`).
    """
    rng = np.random.default_rng([seed, 1])
    prepare = prepare or (lambda im: to_square(im, resolution))
    out = [TrainImage(s.file_name or f"{s.name}.png", prepare(s.image), s) for s in train]
    scenes = [t for t in out if t.source.identity is None]
    for t in scenes[:max(0, duplicates)]:
        out.append(TrainImage(f"{t.source.name}__dup.png", add_noise(t.image, DUPLICATE_SIGMA, rng), t.source,
                              duplicate_of=t.name))
    return out


def ground_truth(train: Sequence[Source], novel: Sequence[Source] = (), others: Sequence[Source] = (), *,
                 resolution: int = 32, duplicates: int = 2, case_types: Sequence[str] | None = None,
                 seed: int = 0, prepare: Callable | None = None) -> GroundTruth:
    """The card's training set and labelled cases (see the module docstring).

    Args:
        train: training photographs; those with ``identity`` are face chips of training people.
        novel: held-out photographs (never trained on).
        others: faces of people not in the training set.
        resolution: the working resolution in pixels (the pixel space and the generated samples).
        duplicates: how many non-face training images are present twice (second copy: noise sigma 0.01).
        case_types: which :data:`CASE_TYPES` to make (default all); unknown names raise ``ValueError``.
        seed: seeds every random draw (noise, jitter, augmentation).
        prepare: photograph -> training image (default: shorter side to ``resolution``, centre crop).
    """
    kinds = list(case_types) if case_types is not None else default_case_types()
    unknown = [k for k in kinds if k not in CASE_TYPES]
    if unknown:
        raise ValueError(f"unknown case types {unknown}; known: {', '.join(CASE_TYPES)}")
    images = training_set(train, resolution, duplicates, seed, prepare)
    gt = GroundTruth(resolution, images, seed=seed)
    originals = [t for t in images if t.duplicate_of is None]
    for kind in kinds:
        rng = np.random.default_rng([seed, 2, kinds.index(kind)])
        gt.cases.extend(_cases_of(kind, originals, images, novel, others, resolution, rng))
    return gt


def _copy_case(kind: str, t: TrainImage, image: Image.Image, twin: str | None = None) -> Case:
    face = t.source.identity is not None
    labels = {**CASE_TYPES[kind].labels, "identity_leak": face or CASE_TYPES[kind].labels["identity_leak"]}
    targets = (t.name,) + ((twin,) if twin else ())
    return Case(kind, image, labels, targets, (t.source.identity,) if face else (), t.name)


def _cases_of(kind: str, originals: list, images: list, novel, others, r: int, rng) -> list[Case]:
    ct = CASE_TYPES[kind]
    faces = [t for t in originals if t.source.identity is not None]
    scenes = [t for t in originals if t.source.identity is None]
    if ct.per_train is not None:
        out = []
        for t in originals:
            im = ct.per_train(t, r, rng)
            if im is not None:
                out.append(_copy_case(kind, t, im))
        return out
    if kind in ("dup_exact", "dup_noise"):
        twins = {t.duplicate_of: t.name for t in images if t.duplicate_of}
        return [_copy_case(kind, t, t.image.copy() if kind == "dup_exact" else add_noise(t.image, 0.02, rng),
                           twins[t.name]) for t in originals if t.name in twins]
    if kind == "face_augmented":
        return [_copy_case(kind, t, face_augment(t.source.image, r, rng)) for t in faces]
    if kind == "blend":
        half = len(scenes) // 2
        return [Case(kind, blend(a.image, b.image), dict(ct.labels), (), (), f"{a.name}+{b.name}")
                for a, b in zip(scenes[:half], scenes[half:2 * half])]
    if kind == "morph":
        pairs = [(a, b) for i, a in enumerate(faces) for b in faces[i + 1:] if a.source.identity != b.source.identity]
        return [Case(kind, blend(a.image, b.image), dict(ct.labels), (), (a.source.identity, b.source.identity),
                     f"{a.name}+{b.name}") for a, b in pairs]
    if kind in ("novel", "other_person"):
        pool = novel if kind == "novel" else others
        return [Case(kind, to_square(s.image, r), dict(ct.labels), (), (), s.name) for s in pool]
    raise ValueError(f"case type {kind!r} has no builder")
