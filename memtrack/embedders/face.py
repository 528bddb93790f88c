"""The face space: detect -> align -> embed, one identity vector per face (issue 4, part 1).

Three recognisers share one detector (dlib) and one interface:

* ``dlib`` (default, offline): HOG frontal detector (or the MMOD CNN detector), the 5-point shape
  predictor, ``dlib.get_face_chip`` alignment (150 px, padding 0.25) and
  ``dlib_face_recognition_resnet_model_v1`` -> 128-d (King, "High Quality Face Recognition with Deep Metric
  Learning", dlib blog 2017: 99.38% on LFW). Same person when the *Euclidean* distance between the raw
  descriptors is < 0.6. The descriptors are not unit-norm (measured 1.37-1.46), so this space declares
  ``metric = "l2"`` and is never re-normalised.
* ``arcface``: an insightface recognition ONNX file the user downloads (Deng et al., CVPR 2019; e.g.
  buffalo_l ``w600k_r50.onnx``, 112 px, LFW 99.83%, non-commercial licence), run by onnxruntime. Faces are
  warped to insightface's 5-point template (eye centres, nose tip, mouth corners from dlib's 68-point
  predictor); input ``(x - 127.5) / 127.5`` RGB NCHW. ``metric = "cosine"``, unit rows.
* ``facenet``: facenet-pytorch's InceptionResnetV1 (Schroff et al., CVPR 2015; VGGFace2 weights, 512-d,
  LFW 99.65%) from a ``state_dict`` file the user gives; 160-px 5-point chips, ``(x - 127.5) / 128``.
  facenet-pytorch pins torch<2.3, so it is installed with ``pip install --no-deps facenet-pytorch``; this
  path is tested with random weights only. ``metric = "cosine"``, unit rows.

Distances, for every backend, are Euclidean between the vectors this embedder returns
(:meth:`FaceEmbedder.distance`; for unit rows ``d = sqrt(2 - 2 cos)``), so one ratio test and one
threshold unit serve all three. :attr:`FaceEmbedder.published_threshold` in that unit: dlib 0.6; ArcFace 1.2
(cosine similarity 0.28, FAR 0.1% on LFW); FaceNet 1.04 (deepface's ``Facenet512`` euclidean_l2, the same
VGGFace2 weights). :func:`memtrack.identity.detect.calibrate_threshold` replaces it with the training set's own.

``align: assume_aligned`` embeds the whole image as the aligned chip (resized to the chip size): for
pre-aligned 32-64 px crops (CelebA/FFHQ style) where detectors find nothing. Measured (dlib): 32-px chips
upsampled lie 0.35-0.39 from their own full-resolution chip and 0.68-0.70 from the other person; 24 px
0.46-0.48 / 0.66; 16 px 0.58-0.60 / 0.62 -- identity is gone -- hence ``min_face = 20``. With
``verify`` (the default) an image counts as a face only when the detector finds one in it resized to
160 px. Measured on the demo (32-px chips, HOG): all 4 training face chips and none of its 4 scenes pass;
of 32 samples of an early, still noisy checkpoint none pass -- without the check 6 of 64 such noise samples
scored 0.55-0.60 from Grace Hopper, under dlib's 0.6, and were counted as identity leaks -- while 11 of 32
samples of the last checkpoint, the faces among them, pass.

Example:
    >>> from memtrack.data.dataset import open_image
    >>> from memtrack.embedders.registry import get_embedder
    >>> face = get_embedder({"name": "face"})
    >>> batch = face.embed_faces([open_image("group.jpg")])   # every face: vectors [m, 128], image_index [m]
    >>> face.embed([open_image("portrait.jpg")])                 # [n, 128]: best face per image, NaN if none
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional, Sequence

import numpy as np
from PIL import Image

from memtrack.errors import ConfigError, DependencyError
from memtrack.utils import sha256_file
from memtrack.embedders.base import Embedder, EmbedderOptions, ReferenceVectors

_FACE_HINT = "pip install 'memtrack[face]'  (installs dlib-bin and face_recognition_models)"
DLIB_PADDING = 0.25
#: ``assume_aligned`` + ``verify``: the side an image is resized to before the detector looks for a face in it.
VERIFY_SIZE = 160


def is_dlib_available() -> bool:
    return importlib.util.find_spec("dlib") is not None


def is_facenet_available() -> bool:
    return importlib.util.find_spec("facenet_pytorch") is not None and importlib.util.find_spec("torch") is not None


def dlib_model_dir(folder: str | None = None) -> Path:
    """The folder of dlib's ``.dat`` files: ``folder``, or the installed face_recognition_models package.

    The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__`` imports
    ``pkg_resources``, which recent setuptools no longer ships.
    """
    if folder is None:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise DependencyError("the face embedder needs dlib's model files from face_recognition_models",
                                  hint=_FACE_HINT)
        path = Path(list(spec.submodule_search_locations)[0]) / "models"
    else:
        path = Path(folder)
    if not (path / "dlib_face_recognition_resnet_model_v1.dat").is_file():
        raise ConfigError(f"no dlib_face_recognition_resnet_model_v1.dat in {path}",
                          hint="face.model_path (dlib backend) must be a folder of dlib .dat files, or unset")
    return path


def sha256_of(path: str | Path) -> str:
    """sha256 of a model file, cached per (path, size, mtime)."""
    st = os.stat(path)
    return _sha256_cached(str(path), st.st_size, st.st_mtime)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    return sha256_file(path)


@dataclass
class FaceOptions(EmbedderOptions):
    """Options of the ``face`` embedder.

    Args:
        backend: ``dlib`` (default, offline) | ``arcface`` (ONNX file in ``model_path``) | ``facenet``.
        align: ``detect`` (find, landmark and align every face) | ``assume_aligned`` (the whole image is one
            aligned chip; for pre-aligned 32-64 px crops).
        detector: dlib's ``hog`` frontal detector (default) or the ``cnn`` MMOD detector (slow on CPU).
        upsample: times the image is doubled before detection (HOG finds faces >= 80 px / 2**upsample).
        min_score: detection score threshold (dlib's ``adjust_threshold``; 0.0 is dlib's default).
        min_face: faces whose box (detect) or image short side (assume_aligned) is smaller, in pixels, are
            dropped: below ~20 px identity does not survive (module docstring).
        verify: with ``assume_aligned``, keep an image as a face only when the detector finds a face in it
            resized to 160 px (a face chip then fills the detector's 80-px window). Without this check every
            image is "a face": a recogniser places noise and scenes somewhere, sometimes within the threshold
            of a training identity (module docstring). Turn off only for sets the detector cannot read.
        model_path: ArcFace ONNX file; FaceNet ``state_dict`` file; for dlib an optional folder of ``.dat``
            files (default: the installed face_recognition_models package).
        device: ``cpu`` or ``cuda[:N]`` for ArcFace (onnxruntime) and FaceNet (torch); dlib-bin is CPU-only.
    """

    backend: Literal["dlib", "arcface", "facenet"] = "dlib"
    align: Literal["detect", "assume_aligned"] = "detect"
    detector: Literal["hog", "cnn"] = "hog"
    upsample: int = 1
    min_score: float = 0.0
    min_face: int = 20
    verify: bool = True
    model_path: Optional[str] = None
    device: str = "cpu"


@dataclass
class AlignedFaces:
    """Faces found in a batch of images, aligned, not yet embedded. Per image, most confident face first.

    Attributes:
        chips: ``uint8 [m, s, s, 3]`` aligned RGB chips (s = the recogniser's chip size).
        image_index: ``int64 [m]`` the input image each face came from (images with no face have no row).
        boxes: ``float32 [m, 4]`` (left, top, right, bottom) in input pixels, right/bottom exclusive.
        scores: ``float32 [m]`` detector confidence (HOG SVM score, CNN confidence; NaN when assume_aligned).
        n_images: the number of input images.
    """

    chips: np.ndarray
    image_index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    n_images: int


@dataclass
class FaceBatch:
    """Every face of a batch of images, embedded: ``vectors float32 [m, d]``, the rest as :class:`AlignedFaces`."""

    vectors: np.ndarray
    image_index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    n_images: int

    def counts(self) -> np.ndarray:
        """Faces per input image, ``int64 [n_images]`` (0 = no face found)."""
        return np.bincount(self.image_index, minlength=self.n_images).astype(np.int64)

    def to_dict(self) -> dict:
        return {"vectors": self.vectors.tolist(), "image_index": self.image_index.tolist(),
                "boxes": self.boxes.tolist(), "scores": self.scores.tolist(), "n_images": self.n_images}


class FaceEmbedder(Embedder):
    """Identity vectors of faces (see the module docstring for backends, metrics and thresholds)."""

    name = "face"
    Options = FaceOptions
    identities = True

    def __init__(self, options: FaceOptions | None = None):
        super().__init__(options)
        o = self.options
        if not 0 <= o.upsample <= 4:
            raise ConfigError(f"face.upsample must be in 0..4, got {o.upsample}",
                              hint="1 finds faces down to ~40 px; each step costs 4x the detection time")
        if o.min_face < 0:
            raise ConfigError(f"face.min_face must be >= 0 pixels, got {o.min_face}")
        if o.batch_size <= 0:
            raise ConfigError(f"face.batch_size must be > 0, got {o.batch_size}")
        if not is_dlib_available():
            raise DependencyError("the face embedder needs dlib (detection, landmarks, alignment)", hint=_FACE_HINT)
        self._dir = dlib_model_dir(o.model_path if o.backend == "dlib" else None)
        self.recognizer: Recognizer = _backend(o.backend)(o, self._dir)

    @property
    def metric(self) -> str:  # type: ignore[override]  # depends on the backend
        return self.recognizer.metric

    @property
    def dim(self) -> int:
        return self.recognizer.dim

    @property
    def chip_size(self) -> int:
        return self.recognizer.chip_size

    @property
    def published_threshold(self) -> float:
        """The recogniser's published same-person threshold on :meth:`distance`."""
        return self.recognizer.published_threshold

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Euclidean distance between face vectors, broadcasting over leading axes (float64)."""
        diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        return np.sqrt((diff ** 2).sum(-1))

    def detect_and_align(self, images: Sequence[Image.Image]) -> AlignedFaces:
        """Find every face of every image and align it to the recogniser's chip (no embedding)."""
        o, s = self.options, self.chip_size
        chips, index, boxes, scores = [], [], [], []
        for i, image in enumerate(images):
            image = image.convert("RGB")
            w, h = image.size
            if o.align == "assume_aligned":
                score = self._verify(image) if o.verify else np.nan
                if min(w, h) >= max(o.min_face, 1) and score is not None:
                    chip = image if image.size == (s, s) else image.resize((s, s), Image.Resampling.BICUBIC)
                    chips.append(np.asarray(chip, dtype=np.uint8))
                    index.append(i), boxes.append((0, 0, w, h)), scores.append(score)
                continue
            rgb = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
            models = self._models
            # 1. detect, most confident first  2. landmarks  3. align to the recogniser's template
            for rect, score in models.detect(rgb, o.upsample, o.min_score, o.min_face):
                chips.append(self.recognizer.align(rgb, models.landmarks(rgb, rect)))
                index.append(i), scores.append(score)
                boxes.append((rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1))
        return AlignedFaces(np.stack(chips) if chips else np.zeros((0, s, s, 3), np.uint8),
                            np.asarray(index, dtype=np.int64), np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                            np.asarray(scores, dtype=np.float32), len(images))

    def _verify(self, image: Image.Image) -> float | None:
        """The best detector score of a face in ``image`` resized to :data:`VERIFY_SIZE`, or None: no face."""
        rgb = np.asarray(image.resize((VERIFY_SIZE, VERIFY_SIZE), Image.Resampling.BICUBIC), dtype=np.uint8)
        found = self._models.detect(np.ascontiguousarray(rgb), 0, self.options.min_score, 0)
        return max(score for _, score in found) if found else None

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """Embed aligned chips ``uint8 [m, s, s, 3]`` (e.g. from :meth:`detect_and_align`): ``float32 [m, d]``."""
        chips = np.asarray(chips, dtype=np.uint8)
        s = self.chip_size
        if chips.ndim != 4 or chips.shape[1:] != (s, s, 3):
            raise ValueError(f"chips must be uint8 [m, {s}, {s}, 3] for backend {self.options.backend!r}, "
                             f"got {chips.shape}")
        bs = self.options.batch_size
        out = [self.recognizer.embed_chips(chips[j:j + bs]) for j in range(0, len(chips), bs)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    def embed_faces(self, images: Sequence[Image.Image]) -> FaceBatch:
        """Every face of every image: vectors, the image each came from, boxes and detector scores."""
        f = self.detect_and_align(images)
        return FaceBatch(self.embed_chips(f.chips), f.image_index, f.boxes, f.scores, f.n_images)

    def embed_reference(self, images: Sequence[Image.Image]) -> ReferenceVectors:
        """A training image is indexed under every face found in it (none when it has none)."""
        fb = self.embed_faces(images)
        return ReferenceVectors(fb.vectors, fb.image_index)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """One row per image: its *most confident* face, or a row of NaN when no face was found.

        Most confident, not largest: on augmented copies of the astronaut and Hopper images (random crops,
        +-10 degree rotations, flips, brightness 0.7-1.3, 0.4-1x scale; upsample 1) HOG also fires on other
        things -- 24 extra boxes in 80 images, mostly the astronaut's mission patch, as large as her face.
        Over 680 such images the top-scoring box was the face in 678 (in the two misses a false box beat it
        by 0.02 and 0.12), the largest box in 640. :meth:`embed_faces` keeps every box.
        """
        batch = self.embed_faces(images)
        out = np.full((len(images), self.dim), np.nan, dtype=np.float32)
        first = np.unique(batch.image_index, return_index=True)  # faces come best-first per image
        out[first[0]] = batch.vectors[first[1]]
        return out

    @property
    def _models(self) -> "_DlibModels":
        return _load_dlib(str(self._dir), self.options.detector, self.recognizer.landmark_points)

    def _fingerprint_extra(self) -> dict:
        o = self.options
        fp = {"backend": o.backend, "align": o.align, "chip_size": self.chip_size, "min_face": o.min_face}
        if o.align == "assume_aligned":
            fp["verify"] = {"detector": o.detector, "size": VERIFY_SIZE, "min_score": o.min_score} if o.verify else False
        if o.align == "detect":
            lm = _LANDMARKS[self.recognizer.landmark_points]
            fp.update({"detector": o.detector, "upsample": o.upsample, "min_score": o.min_score,
                       "landmarks": lm, "landmarks_sha256": sha256_of(self._dir / lm)})
        fp.update(self.recognizer.fingerprint())
        return fp


# ------------------------------------------------------------------------------------------- dlib


_LANDMARKS = {5: "shape_predictor_5_face_landmarks.dat", 68: "shape_predictor_68_face_landmarks.dat"}


class _DlibModels:
    """dlib's detector and shape predictor, loaded once per (folder, detector, landmark count)."""

    def __init__(self, folder: str, detector: str, points: int):
        import dlib

        self.kind = detector
        if detector == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(os.path.join(folder, "mmod_human_face_detector.dat"))
        else:
            self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(os.path.join(folder, _LANDMARKS[points]))

    def detect(self, rgb: np.ndarray, upsample: int, min_score: float, min_face: int) -> list:
        if self.kind == "cnn":
            found = [(d.rect, float(d.confidence)) for d in self._detector(rgb, upsample) if d.confidence >= min_score]
        else:
            rects, scores, _ = self._detector.run(rgb, upsample, min_score)
            found = list(zip(rects, map(float, scores)))
        found = [(r, s) for r, s in found if min(r.width(), r.height()) >= min_face]
        return sorted(found, key=lambda rs: -rs[1])

    def landmarks(self, rgb: np.ndarray, rect):
        return self._predictor(rgb, rect)


@functools.lru_cache(maxsize=8)
def _load_dlib(folder: str, detector: str, points: int) -> _DlibModels:
    return _DlibModels(folder, detector, points)


@functools.lru_cache(maxsize=4)
def _load_dlib_recognizer(path: str):
    import dlib

    return dlib.face_recognition_model_v1(path)


# ------------------------------------------------------------------------------------ recognisers


class Recognizer:
    """One identity model: its chip geometry, how it aligns a face, and how it embeds chips."""

    metric: ClassVar[str]
    chip_size: int
    dim: int
    published_threshold: ClassVar[float]
    landmark_points: ClassVar[int] = 5

    def __init__(self, options: FaceOptions, dlib_dir: Path):
        self.options = options
        self.dlib_dir = dlib_dir

    def align(self, rgb: np.ndarray, shape) -> np.ndarray:
        import dlib

        return dlib.get_face_chip(rgb, shape, size=self.chip_size, padding=DLIB_PADDING)

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        return {}


class DlibRecognizer(Recognizer):
    metric, chip_size, dim, published_threshold = "l2", 150, 128, 0.6
    _FILE = "dlib_face_recognition_resnet_model_v1.dat"

    def __init__(self, options: FaceOptions, dlib_dir: Path):
        super().__init__(options, dlib_dir)
        if options.device != "cpu":
            raise ConfigError(f"face.device {options.device!r}: the dlib backend runs on the CPU only",
                              hint="use device: cpu, or backend: arcface / facenet on a GPU")

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        net = _load_dlib_recognizer(str(self.dlib_dir / self._FILE))
        return np.asarray([np.asarray(v) for v in net.compute_face_descriptor(list(chips))], dtype=np.float32)

    def fingerprint(self) -> dict:
        return {"model": self._FILE, "model_sha256": sha256_of(self.dlib_dir / self._FILE),
                "padding": DLIB_PADDING, "distance": "euclidean, raw descriptors"}


#: ``face.backend`` -> recogniser class; :mod:`.face_backends` adds ArcFace and FaceNet (the embedder
#: registry imports it with the built-ins, so ``get_embedder`` always sees them)
RECOGNIZERS: dict[str, type[Recognizer]] = {"dlib": DlibRecognizer}


def register_recognizer(name: str, cls: type[Recognizer]) -> None:
    """Make ``name`` usable as ``face.backend``."""
    RECOGNIZERS[name] = cls


def _backend(name: str) -> type[Recognizer]:
    """The recogniser class of ``face.backend``."""
    if name not in RECOGNIZERS:
        raise ConfigError(f"face.backend {name!r} is not registered (known: {', '.join(sorted(RECOGNIZERS))})",
                          hint="build the embedder with memtrack.get_embedder, or import memtrack.embedders.face_backends")
    return RECOGNIZERS[name]

__all__ = ["FaceEmbedder", "FaceOptions", "FaceBatch", "AlignedFaces", "Recognizer", "is_dlib_available",
           "is_facenet_available", "dlib_model_dir", "sha256_of"]
