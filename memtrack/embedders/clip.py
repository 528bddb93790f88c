"""The CLIP space: open_clip image features, L2-normalised, compared by cosine.

Somepalli et al. CVPR 2023 ("Diffusion Art or Digital Forgery?") score copying by the cosine similarity of
image features; this embedder provides such features from any open_clip model.

Where the weights come from (options ``model`` and ``pretrained``):

* a pretrained tag — ``model: ViT-B-32, pretrained: laion2b_s34b_b79k`` — downloaded by open_clip on first
  use (network needed once, then cached by open_clip / huggingface_hub);
* a weights file — ``pretrained: /models/vit_b_32.bin`` — the file's sha256 goes into the fingerprint;
* a folder — ``model: local-dir:/models/clip`` holding ``open_clip_config.json`` and a weights file, the
  layout of open_clip repositories on the Hugging Face hub (``hf download laion/... --local-dir X``);
* a custom architecture — ``model_config: /models/my-arch.json`` (open_clip's ``model_configs/*.json``
  format; open_clip names it by its file name, so ``model: my-arch``) with a weights file;
* ``pretrained: null`` — random weights (seeded, so reproducible), useful for tests only.

OpenAI's weights were trained with QuickGELU and need the ``-quickgelu`` architecture (``ViT-B-32-quickgelu``).
A mismatch loads without error and silently gives other features, so this embedder refuses the ``openai``
tag with a GELU architecture, refuses OpenAI's own ``.pt`` files (recognised by their sha256) likewise, and
warns when the path of a weights file mentions "openai" (converted copies cannot be recognised by hash).

Example:
    >>> from memtrack.embedders.registry import get_embedder
    >>> emb = get_embedder({"name": "clip", "model": "ViT-B-32", "pretrained": "/models/open_clip_model.bin"})
    >>> emb.dim
    512
    >>> vectors = emb.embed(images)  # float32 [n, 512], unit rows
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np
from PIL import Image

from memtrack.config import documented_field
from memtrack.errors import ConfigError
from memtrack.utils import get_logger, progress_bar
from memtrack.embedders.base import Embedder, EmbedderOptions, l2_normalise
from memtrack.embedders.clip_source import DEFAULT_PRETRAINED, clip_load_error, import_open_clip, openai_weights, model_and_pretrained, resolve_weights, weights_sha256

logger = get_logger(__name__)

RANDOM_SEED = 0  # random weights (pretrained: null) are drawn from this seed, so "random" is one space


@dataclass
class ClipOptions(EmbedderOptions):
    model: str = documented_field("ViT-B-32", "open_clip architecture (open_clip.list_models()) or local-dir:/folder")
    pretrained: Optional[str] = documented_field(DEFAULT_PRETRAINED, "pretrained tag (downloads once), path to a weights "
                                   "file, or null for random weights (tests only); a local-dir: folder brings "
                                   "its own weights")
    model_config: Optional[str] = documented_field(None, "open_clip architecture JSON for a custom model; model must be its "
                                     "file name without .json")
    device: str = documented_field("cpu", "torch device: cpu, cuda, cuda:1, ...")
    precision: Literal["fp32", "fp16", "bf16"] = documented_field("fp32", "autocast precision of the forward pass")
    num_workers: int = documented_field(0, "DataLoader worker processes that preprocess images")


# --------------------------------------------------------------------------------------------- building


class _LogsToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "open_clip" in record.pathname:
            logger.debug("open_clip: %s", record.getMessage())
        elif logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs on the root logger, and ``logging.warning()`` then calls ``basicConfig`` in the user's
    process; unless the application configured logging, route those records to memtrack's DEBUG log."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    handler = _LogsToDebug()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


@contextlib.contextmanager
def _seeded(on: bool):
    if not on:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


class _Preprocessed:
    """Map-style dataset for torch's DataLoader: image i through (the PIL part of) open_clip's transform."""

    def __init__(self, images: Sequence[Image.Image], transform: Any, as_uint8: bool):
        self.images, self.transform, self.as_uint8 = images, transform, as_uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        image = self.images[i]
        out = self.transform(image if image.mode == "RGB" else image.convert("RGB"))
        return np.array(out, dtype=np.uint8) if self.as_uint8 else out


@dataclass
class _Pipeline:
    """open_clip's inference transform, split where it leaves PIL.

    It ends with ToTensor and Normalize. Those two run here once per batch, on the device, instead of once
    per image: the same float32 arithmetic (x / 255, then (x - mean) / std, so the result is bit-identical),
    uint8 batches to transfer, and no per-image start-up of torch's threads (per image, they took a third
    of ViT-B-32's forward time on a busy 2-core CPU). A transform of any other shape runs whole, per image.
    """

    per_image: Any
    mean: Any = None  # [1, C, 1, 1] float32 on the device, or None: per_image is the whole transform
    std: Any = None

    @classmethod
    def split(cls, preprocess: Any, device: Any) -> "_Pipeline":
        import torch
        from torchvision import transforms as T

        steps = list(getattr(preprocess, "transforms", ()))
        if len(steps) < 2 or not (isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize)):
            return cls(preprocess)
        stats = [torch.as_tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                 for v in (steps[-1].mean, steps[-1].std)]
        return cls(T.Compose(steps[:-2]), *stats)

    def dataset(self, images: Sequence[Image.Image]) -> _Preprocessed:
        return _Preprocessed(images, self.per_image, as_uint8=self.mean is not None)

    def finish(self, batch: Any, device: Any) -> Any:
        """A collated batch -> the model's float32 NCHW input on ``device``."""
        batch = batch.to(device, non_blocking=True)
        if self.mean is None:
            return batch
        return batch.permute(0, 3, 1, 2).contiguous().float().div_(255).sub_(self.mean).div_(self.std)


class ClipEmbedder(Embedder):
    """open_clip image features; see the module docstring for where the weights come from."""

    name = "clip"
    metric = "cosine"
    Options = ClipOptions

    def __init__(self, options: ClipOptions | None = None):
        super().__init__(options)
        o = self.options
        if o.batch_size <= 0:
            raise ConfigError(f"clip option batch_size must be > 0, got {o.batch_size}")
        if o.num_workers < 0:
            raise ConfigError(f"clip option num_workers must be >= 0, got {o.num_workers}")
        if o.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"clip option precision must be one of fp32, fp16, bf16, got {o.precision!r}")
        self._source = resolve_weights(o)
        self._device = _torch_device(o.device)
        self._model: Any = None
        self._pipeline: Optional[_Pipeline] = None
        self._weights_sha: Optional[str] = None  # captured when the model is built

    @property
    def dim(self) -> int:
        return int(self._source.model_cfg["embed_dim"])

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        n, o = len(images), self.options
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        model, pipeline = self._build()
        loader = torch.utils.data.DataLoader(pipeline.dataset(images), batch_size=o.batch_size,
                                             num_workers=o.num_workers, pin_memory=self._device.type == "cuda")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(o.precision)
        out = np.empty((n, self.dim), dtype=np.float32)
        start = 0
        with progress_bar(total=n, desc="clip embed", unit="img", disable=True if len(loader) == 1 else None) as bar, \
                torch.inference_mode(), torch.autocast(self._device.type, dtype=dtype, enabled=dtype is not None):
            for batch in loader:
                features = model.encode_image(pipeline.finish(batch, self._device))
                out[start:start + len(batch)] = features.float().cpu().numpy()
                start += len(batch)
                bar.update(len(batch))
        return l2_normalise(out)

    def _build(self) -> tuple[Any, Any]:
        """Create the model and its preprocessing pipeline (once)."""
        if self._model is not None:
            return self._model, self._pipeline
        oc, src = import_open_clip(), self._source
        _check_device_available(self._device)
        if src.weights_file is not None:
            self._weights_sha = weights_sha256(src.weights_file)
            arch = openai_weights(oc).get(self._weights_sha)
            if arch is not None and not src.model_cfg.get("quick_gelu", False):
                raise ConfigError(f"clip: {src.weights_file} is OpenAI's {arch} checkpoint, trained with QuickGELU, "
                                  f"but model {src.model!r} uses GELU; its features would be silently wrong",
                                  hint=f"set model: {arch}-quickgelu")
        if src.random:
            logger.warning("clip: pretrained is null, so %s has random weights (seed %d): only useful for tests",
                           src.model, RANDOM_SEED)
        if src.config_file is not None:
            oc.add_model_config(src.config_file)  # now, so no other registration under this name intervenes
        try:
            with _quiet_open_clip(), _seeded(src.random):
                model, _, preprocess = oc.create_model_and_transforms(
                    src.create_name, pretrained=src.pretrained, device=self._device, precision="fp32")
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise clip_load_error(src, exc) from exc
        actual = dict(model.visual.preprocess_cfg)
        actual["size"] = model_and_pretrained(actual["size"])
        if _fingerprint_preprocess(actual) != _fingerprint_preprocess(src.preprocess):
            logger.warning("clip: open_clip preprocesses with %s, not the predicted %s; the fingerprint follows "
                           "the model", actual, src.preprocess)
            src.preprocess = actual
        self._model, self._pipeline = model.eval(), _Pipeline.split(preprocess, self._device)
        return self._model, self._pipeline

    def _fingerprint_extra(self) -> dict:
        src = self._source
        if src.weights_file is not None:
            weights = "sha256:" + (self._weights_sha or weights_sha256(src.weights_file))
        elif src.tag is not None:
            weights = "tag:" + src.tag
        else:
            weights = f"random:seed={RANDOM_SEED}"
        return {"model": src.model, "weights": weights, "model_config": src.config_hash,
                **_fingerprint_preprocess(src.preprocess), "precision": self.options.precision}

    def close(self) -> None:
        on_cuda = self._model is not None and self._device.type == "cuda"
        self._model = self._pipeline = None
        if on_cuda:
            import torch

            torch.cuda.empty_cache()


def _fingerprint_preprocess(pp: dict) -> dict:
    return {"image_size": list(model_and_pretrained(pp["size"])), "mean": [float(v) for v in pp["mean"]],
            "std": [float(v) for v in pp["std"]], "interpolation": pp["interpolation"],
            "resize_mode": pp["resize_mode"], "fill_color": int(pp.get("fill_color", 0))}


def _torch_device(spec: str) -> Any:
    import torch

    try:
        return torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"clip option device={spec!r} is not a torch device", hint="use cpu, cuda or cuda:1") from None


def _check_device_available(device: Any) -> None:
    import torch

    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"clip option device={str(device)!r}, but torch sees {count} CUDA device(s)",
                              hint="use device: cpu, or a CUDA device index below the count")
