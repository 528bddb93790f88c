"""Where a CLIP embedder's architecture and weights come from: resolved and checked before building.

:func:`resolve_weights` turns :class:`memtrack.embedders.clip.ClipOptions` into a :class:`_Source` -- an open_clip
architecture name and config, its preprocessing, and a pretrained tag, a weights file or a local folder --
without building the model, refusing the combinations that load silently wrong (OpenAI weights on a GELU
architecture). The options and the embedder itself are in :mod:`memtrack.embedders.clip`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from memtrack.errors import ConfigError, DependencyError
from memtrack.utils import get_logger, sha256_file, stable_hash

if TYPE_CHECKING:
    from memtrack.embedders.clip import ClipOptions

logger = get_logger(__name__)

DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
LOCAL_DIR = "local-dir:"
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz", ".ckpt")


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


def import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise DependencyError(f"the clip embedder needs the open_clip_torch package ({exc})",
                              hint="pip install open_clip_torch") from None
    return open_clip


# --------------------------------------------------------------------------------------------- resolving


def resolve_weights(o: ClipOptions) -> _Source:
    oc = import_open_clip()
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
    src.preprocess["size"] = model_and_pretrained(cfg["vision_cfg"].get("image_size", 224))
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
    preprocess["size"] = model_and_pretrained(cfg.get("vision_cfg", {}).get("image_size", 224))
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


def openai_weights(oc: Any) -> dict[str, str]:
    """sha256 of OpenAI's released .pt files (open_clip's URLs carry them) -> architecture name."""
    out = {}
    for model, tag in oc.list_pretrained():
        url = oc.get_pretrained_url(model, tag)
        if "openaipublic" in url:
            out[url.split("/")[-2]] = model.removesuffix("-quickgelu")
    return out


def _default_preprocess(oc: Any) -> dict:
    return dataclasses.asdict(oc.transform.PreprocessCfg())


def model_and_pretrained(size: Any) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, computed once per (path, mtime, size) in this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def clip_load_error(src: _Source, exc: Exception) -> ConfigError:
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
