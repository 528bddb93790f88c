"""The SSCD space: Pizzi et al.'s self-supervised copy-detection descriptor, compared by cosine.

SSCD (Pizzi et al., CVPR 2022, "A Self-Supervised Descriptor for Image Copy Detection";
facebookresearch/sscd-copy-detection) is the descriptor the memorization literature measures copies with:
Somepalli et al. (CVPR 2023) call a generation a copy above cosine 0.5 (loose), Wen et al. (ICLR 2024)
above 0.7, and Pizzi et al. report cosine > 0.75 as a copy at ~90% precision on DISC for
``sscd_disc_mixup``. Those thresholds belong to this descriptor -- memtrack applies them here and nowhere
else (``sscd_copy``; the CLIP space calibrates its own).

**Weights are the user's.** The models are released under CC-BY-NC 4.0 (non-commercial); memtrack does
not download or ship them. Point ``weights`` at a TorchScript file from the SSCD repository, e.g.
``sscd_disc_mixup.torchscript.pt`` (ResNet50, 512-d, the recommended default) or
``sscd_disc_large.torchscript.pt`` (ResNeXt101, 1024-d). A TorchScript file is a program: load only files
you trust. Its sha256 goes into the fingerprint.

Preprocessing follows the SSCD README: ``small_288`` resizes the small edge to 288 px (aspect kept,
bilinear, as torchvision's ``Resize(288)`` on a PIL image), ``skew_320`` resizes to a 320 x 320 square;
then ToTensor and ImageNet normalisation (mean 0.485/0.456/0.406, std 0.229/0.224/0.225). The models emit
L2-normalised descriptors; memtrack normalises again (a no-op for them, a guarantee for any other file).

Example:
    >>> emb = get_embedder({"name": "sscd", "weights": "/models/sscd_disc_mixup.torchscript.pt"})
    >>> vectors = emb.embed(images)  # float32 [n, 512], unit rows
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Sequence

import numpy as np
from PIL import Image

from memtrack.errors import ConfigError, DependencyError
from memtrack.embedders.base import Embedder, EmbedderOptions, l2_normalise

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PIZZI = "Pizzi et al. CVPR 2022, A Self-Supervised Descriptor for Image Copy Detection"


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class SscdOptions(EmbedderOptions):
    """Options of the ``sscd`` embedder.

    Args:
        batch_size: images per forward pass (images of one size after resizing are batched together).
    """

    weights: Optional[str] = _f(None, "path to an SSCD TorchScript file, e.g. sscd_disc_mixup.torchscript.pt "
                                "(facebookresearch/sscd-copy-detection; CC-BY-NC 4.0, brought by the user)")
    preprocess: Literal["small_288", "skew_320"] = _f("small_288", "SSCD's README: resize the small edge to 288 "
                                                     "(small_288) or to a 320x320 square (skew_320)")
    device: str = _f("cpu", "torch device: cpu, cuda, cuda:1, ...")


def _resize(image: Image.Image, mode: str) -> Image.Image:
    image = image.convert("RGB")
    if mode == "skew_320":
        return image.resize((320, 320), Image.Resampling.BILINEAR)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(288 * long / short)  # torchvision's Resize(int): the small edge to 288, the long one floored
    size = (288, new_long) if w <= h else (new_long, 288)
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def preprocess(image: Image.Image, mode: str = "small_288") -> np.ndarray:
    """``float32 [3, H, W]``: resized as SSCD's README says, scaled to [0, 1], ImageNet-normalised."""
    x = np.asarray(_resize(image, mode), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - np.asarray(MEAN, np.float32)[:, None, None]) / np.asarray(STD, np.float32)[:, None, None]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SscdEmbedder(Embedder):
    """SSCD descriptors from a user-supplied TorchScript file (see the module docstring)."""

    name = "sscd"
    metric = "cosine"
    Options = SscdOptions
    #: copy thresholds published for this descriptor (cosine): the copy score reports them as ``published``
    published_copy_thresholds: ClassVar[dict] = {
        0.5: "Somepalli et al. CVPR 2023, Diffusion Art or Digital Forgery? (SSCD > 0.5, loose)",
        0.7: "Wen et al. ICLR 2024, Detecting, Explaining, and Mitigating Memorization (SSCD > 0.7)",
        0.75: PIZZI + " (cosine > 0.75: copies at ~90% precision on DISC)",
    }
    copy_threshold: ClassVar[float] = 0.5

    def __init__(self, options: SscdOptions | None = None):
        super().__init__(options)
        o = self.options
        if not o.weights:
            raise ConfigError("the sscd embedder needs weights: the path to an SSCD TorchScript file",
                              hint="download e.g. sscd_disc_mixup.torchscript.pt from facebookresearch/"
                                   "sscd-copy-detection (CC-BY-NC 4.0) and set weights: /path/to/it")
        self._path = Path(o.weights).expanduser()
        if not self._path.is_file():
            raise ConfigError(f"sscd weights file not found: {self._path}", hint="check the path given to weights")
        if o.batch_size <= 0:
            raise ConfigError(f"sscd option batch_size must be > 0, got {o.batch_size}")
        self._model: Any = None
        self._dim: Optional[int] = None
        self._sha: Optional[str] = None

    def _build(self) -> Any:
        if self._model is not None:
            return self._model
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - torch is a core dependency
            raise DependencyError("the sscd embedder needs torch", hint="pip install torch") from exc
        try:
            with warnings.catch_warnings():  # SSCD ships TorchScript; torch's deprecation notice is not the user's
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
                model = torch.jit.load(str(self._path), map_location=self.options.device)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConfigError(f"cannot load {self._path} as a TorchScript model: {str(exc).splitlines()[0][:200]}",
                              hint="use a .torchscript.pt file from the SSCD repository (not .classy.pt or "
                                   ".torchvision.pt weight files)") from None
        self._model = model.eval()
        return self._model

    @property
    def dim(self) -> int:
        if self._dim is None:  # one forward pass on a blank image tells the descriptor's size
            self._dim = int(self._forward(np.zeros((1, 3, 288, 288), np.float32)).shape[1])
        return self._dim

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        model = self._build()
        with torch.inference_mode():
            out = model(torch.from_numpy(batch).to(self.options.device))
        out = out.float().cpu().numpy()
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise ConfigError(f"{self._path} returned shape {tuple(out.shape)} for a batch of {len(batch)} images; an "
                              "SSCD model returns [batch, dim] descriptors")
        return out

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``float32 [n, dim]`` unit rows; images of one size after resizing are batched together."""
        arrays = [preprocess(im, self.options.preprocess) for im in images]
        out = np.zeros((len(arrays), self.dim), np.float32)
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape, []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.options.batch_size):
                part = idx[s:s + self.options.batch_size]
                out[part] = self._forward(np.stack([arrays[i] for i in part]))
        return l2_normalise(out) if len(out) else out

    def _fingerprint_extra(self) -> dict:
        if self._sha is None:
            self._sha = _sha256(self._path)
        return {"weights": "sha256:" + self._sha, "preprocess": self.options.preprocess, "mean": list(MEAN),
                "std": list(STD)}

    def close(self) -> None:
        self._model = None
