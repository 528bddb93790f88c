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
    >>> from memtrack.embedders import get_embedder
    >>> emb = get_embedder({"name": "clip", "model": "ViT-B-32", "pretrained": "/models/open_clip_model.bin"})
    >>> emb.dim
    512
    >>> vectors = emb.embed(images)  # float32 [n, 512], unit rows
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
from PIL import Image

from ..config import _f
from ..errors import ConfigError, DependencyError
from ..utils import get_logger, progress_bar, sha256_file, stable_hash
from . import register_embedder
from .base import Embedder, EmbedderOptions, l2_normalise

logger = get_logger(__name__)

DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
RANDOM_SEED = 0  # random weights (pretrained: null) are drawn from this seed, so "random" is one space
LOCAL_DIR = "local-dir:"
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz", ".ckpt")


@dataclass
class ClipOptions(EmbedderOptions):
    model: str = _f("ViT-B-32", "open_clip architecture (open_clip.list_models()) or local-dir:/folder")
    pretrained: Optional[str] = _f(DEFAULT_PRETRAINED, "pretrained tag (downloads once), path to a weights "
                                   "file, or null for random weights (tests only); a local-dir: folder brings "
                                   "its own weights")
    model_config: Optional[str] = _f(None, "open_clip architecture JSON for a custom model; model must be its "
                                     "file name without .json")
    device: str = _f("cpu", "torch device: cpu, cuda, cuda:1, ...")
    precision: Literal["fp32", "fp16", "bf16"] = _f("fp32", "autocast precision of the forward pass")
    num_workers: int = _f(0, "DataLoader worker processes that preprocess images")


@dataclass
class _Source:
    """Where the architecture and weights come from, resolved (and checked) without building the model."""

    create_name: str  # the name given to open_clip
    model: str  # the name recorded in the fingerprint (a path is not: moving a folder keeps the space)
    model_cfg: dict
    preprocess: dict  # open_clip PreprocessCfg fields, as create_model will set them
    pretrained: Optional[str] = None  # the argument given to open_clip: a tag, a file, or None
    tag: Optional[str] = None
    weights_file: Optional[Path] = None
    config_file: Optional[Path] = None  # registered with open_clip.add_model_config before building
    config_hash: Optional[str] = None  # for architectures from the user's files, not open_clip's built-ins

    @property
    def random(self) -> bool:
        return self.pretrained is None and self.weights_file is None


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise DependencyError(f"the clip embedder needs the open_clip_torch package ({exc})",
                              hint="pip install open_clip_torch") from None
    return open_clip


# --------------------------------------------------------------------------------------------- resolving


def _resolve(o: ClipOptions) -> _Source:
    oc = _open_clip()
    if o.model.startswith("hf-hub:"):
        raise ConfigError(f"clip option model={o.model!r}: hf-hub: models are not supported",
                          hint=f"download the repository (hf download {o.model[7:]} --local-dir DIR) and use "
                               "model: local-dir:DIR, so the weights are hashed and nothing is fetched later")
    if o.model.startswith(LOCAL_DIR):
        return _resolve_local_dir(o, oc)
    name = o.model.replace("/", "-")  # open_clip accepts ViT-B/32 for ViT-B-32
    config_file = config_hash = None
    if o.model_config is not None:
        cfg, config_file = _read_model_config(o, name, oc)
        config_hash = stable_hash(cfg)
    else:
        cfg = oc.get_model_config(name)
        if cfg is None:
            close = difflib.get_close_matches(name, oc.list_models(), n=3)
            raise ConfigError(f"clip option model={o.model!r} is not an open_clip architecture",
                              hint=(f"did you mean {', '.join(close)}? " if close else "")
                              + "see open_clip.list_models(), or give model_config: /path/arch.json "
                                "or model: local-dir:/folder")
    src = _Source(create_name=name, model=name, model_cfg=cfg, preprocess=_default_preprocess(oc),
                  config_file=config_file, config_hash=config_hash)
    if o.pretrained is not None:
        tag_cfg = oc.get_pretrained_cfg(name, o.pretrained)
        if tag_cfg:
            _check_quick_gelu(name, cfg, o.pretrained, tag_cfg)
            src.tag = src.pretrained = o.pretrained.lower().replace("-", "_")
            src.preprocess = oc.transform.merge_preprocess_dict(src.preprocess, tag_cfg)
        else:
            src.weights_file = _weights_file(o, name, oc)
            src.pretrained = str(src.weights_file)
            if "openai" in str(src.weights_file).lower() and not cfg.get("quick_gelu", False):
                logger.warning("clip: weights file %s looks like OpenAI's, which need the QuickGELU architecture; "
                               "if so, set model: %s-quickgelu", src.weights_file, name)
    src.preprocess["size"] = _pair(cfg["vision_cfg"].get("image_size", 224))
    return src


def _resolve_local_dir(o: ClipOptions, oc: Any) -> _Source:
    folder = Path(o.model[len(LOCAL_DIR):]).expanduser()
    if o.model_config is not None:
        raise ConfigError(f"clip options model={o.model!r} and model_config={o.model_config!r} conflict: the "
                          "folder's open_clip_config.json defines the architecture", hint="remove model_config")
    if o.pretrained not in (None, DEFAULT_PRETRAINED):
        raise ConfigError(f"clip option pretrained={o.pretrained!r} conflicts with model={o.model!r}: a "
                          "local-dir: folder brings its own weights", hint="remove pretrained")
    hint = "local-dir: needs a folder with open_clip_config.json and a weights file (.safetensors, .bin, .pth)"
    if not folder.is_dir():
        raise ConfigError(f"clip option model={o.model!r}: folder not found: {folder}", hint=hint)
    config_path = folder / "open_clip_config.json"
    try:
        local = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"clip option model={o.model!r}: {config_path} is missing", hint=hint) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"clip option model={o.model!r}: cannot read {config_path}: {exc}") from None
    if not isinstance(local, dict) or not isinstance(local.get("model_cfg"), dict):
        raise ConfigError(f"clip option model={o.model!r}: {config_path} has no 'model_cfg' section", hint=hint)
    from open_clip.factory import _find_checkpoint_in_dir  # the file open_clip itself will load

    weights = _find_checkpoint_in_dir(folder)
    if weights is None:
        raise ConfigError(f"clip option model={o.model!r}: no weights file in {folder}", hint=hint)
    cfg = local["model_cfg"]
    preprocess = oc.transform.merge_preprocess_dict(_default_preprocess(oc), local.get("preprocess_cfg") or {})
    preprocess["size"] = _pair(cfg.get("vision_cfg", {}).get("image_size", 224))
    return _Source(create_name=LOCAL_DIR + str(folder.resolve()), model="local-dir", model_cfg=cfg,
                   preprocess=preprocess, weights_file=Path(weights).resolve(), config_hash=stable_hash(cfg))


def _read_model_config(o: ClipOptions, name: str, oc: Any) -> tuple[dict, Path]:
    path = Path(o.model_config).expanduser()
    what = f"clip option model_config={o.model_config!r}"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found: {path}",
                          hint="give an open_clip architecture JSON like open_clip/model_configs/ViT-B-32.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc}") from None
    if isinstance(cfg, dict) and "model_cfg" in cfg:
        raise ConfigError(f"{what} is an open_clip_config.json (model_cfg + preprocess_cfg), not an architecture",
                          hint=f"for a folder with that file and its weights use model: local-dir:{path.parent}")
    if not (isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))):
        raise ConfigError(f"{what}: an architecture needs the keys embed_dim, vision_cfg and text_cfg")
    if path.stem != name:
        raise ConfigError(f"{what} defines the architecture {path.stem!r} (open_clip names architectures by file "
                          f"name), but model is {o.model!r}", hint=f"set model: {path.stem}")
    if (Path(oc.__file__).parent / "model_configs" / path.name).is_file():
        raise ConfigError(f"{what} would replace open_clip's built-in architecture {name!r}",
                          hint="rename the file (and set model to the new name)")
    return cfg, path.resolve()


def _weights_file(o: ClipOptions, name: str, oc: Any) -> Path:
    path = Path(o.pretrained).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        raise ConfigError(f"clip option pretrained={o.pretrained!r} is a folder, not a weights file",
                          hint=f"for a folder with open_clip_config.json use model: local-dir:{path}")
    tags = ", ".join(oc.list_pretrained_tags_by_model(name)) or "none"
    if "/" in o.pretrained or os.sep in o.pretrained or path.suffix in _WEIGHT_SUFFIXES:
        raise ConfigError(f"clip option pretrained: weights file not found: {path}",
                          hint=f"check the path; pretrained tags of {name}: {tags}")
    raise ConfigError(f"clip option pretrained={o.pretrained!r} is neither a pretrained tag of {name} nor a file",
                      hint=f"tags of {name}: {tags}; or a weights file path; or null for random weights")


def _check_quick_gelu(name: str, cfg: dict, tag: str, tag_cfg: dict) -> None:
    want, have = bool(tag_cfg.get("quick_gelu", False)), bool(cfg.get("quick_gelu", False))
    if want != have:
        fix = f"{name}-quickgelu" if want else name.removesuffix("-quickgelu")
        act = {True: "QuickGELU", False: "GELU"}
        raise ConfigError(f"clip: pretrained tag {tag!r} was trained with {act[want]}, but model {name!r} uses "
                          f"{act[have]}; its features would be silently wrong", hint=f"set model: {fix}")


def _openai_weights(oc: Any) -> dict[str, str]:
    """sha256 of OpenAI's released .pt files (open_clip's URLs carry them) -> architecture name."""
    out = {}
    for model, tag in oc.list_pretrained():
        url = oc.get_pretrained_url(model, tag)
        if "openaipublic" in url:
            out[url.split("/")[-2]] = model.removesuffix("-quickgelu")
    return out


def _default_preprocess(oc: Any) -> dict:
    return dataclasses.asdict(oc.transform.PreprocessCfg())


def _pair(size: Any) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, computed once per (path, mtime, size) in this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


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
        self._source = _resolve(o)
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
        oc, src = _open_clip(), self._source
        _check_device_available(self._device)
        if src.weights_file is not None:
            self._weights_sha = weights_sha256(src.weights_file)
            arch = _openai_weights(oc).get(self._weights_sha)
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
            raise _load_error(src, exc) from exc
        actual = dict(model.visual.preprocess_cfg)
        actual["size"] = _pair(actual["size"])
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
    return {"image_size": list(_pair(pp["size"])), "mean": [float(v) for v in pp["mean"]],
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


def _load_error(src: _Source, exc: Exception) -> ConfigError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if src.tag is not None:
        return ConfigError(f"clip: could not get the weights of pretrained tag {src.tag!r} for {src.model}: {first}",
                           hint="downloading needs network access once; offline, download the weights file and set "
                                "pretrained: /path/to/file")
    if src.weights_file is not None:
        return ConfigError(f"clip: weights file {src.weights_file} does not load into architecture "
                           f"{src.create_name!r}: {first}",
                           hint="model must name the architecture the weights were trained with")
    return ConfigError(f"clip: cannot build open_clip model {src.create_name!r}: {first}")


register_embedder("clip", ClipEmbedder)
