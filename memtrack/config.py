"""memtrack's configuration: typed, documented dataclasses loaded from YAML.

A config file (see ``configs/*.yaml``) has one section per stage of the pipeline. Every field has a
default and help text; unknown fields and wrong types are refused with a message naming the field path,
e.g. ``sampling.num_samples: expected int, got 'many'``. The resolved config is saved with every index and
every run so a result can always say how it was made.

Example:
    >>> from memtrack.config import load_config
    >>> cfg = load_config("configs/unconditional.yaml", overrides={"sampling.num_samples": 16})
    >>> cfg.sampling.num_samples
    16
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from memtrack.errors import ConfigError, IndexError_


def documented_field(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    meta = {"help": help}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


INTERPOLATION_MODES = Literal["bilinear", "bicubic", "lanczos", "nearest", "nearest_exact", "box", "hamming"]


#: the index types ``index.index_type`` accepts (memtrack.index.choice builds them)
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf_flat", "ivf_pq")
#: the names ``tracking.loggers`` accepts; :func:`memtrack.integrations.logging.register_sink` adds to it
LOGGERS: set[str] = {"tensorboard", "wandb"}

@dataclass
class TransformConfig:
    """The training script's image transform (docs/transform.md). A field left unset (null) is read from the
    launched command or the run's recorded hparams.yml; one that is set wins over both. ``memtrack index
    build`` gives the pixel space the fields that are set."""

    resolution: Optional[int] = documented_field(None, "--resolution: the shorter side is resized to this and a square of it "
                                   "cropped (the pixel space's train_resolution)")
    interpolation: Optional[INTERPOLATION_MODES] = documented_field(None, "--image_interpolation_mode of the Resize (bilinear in "
                                                      "scripts without the flag)")
    crop: Optional[Literal["center", "random", "none"]] = documented_field(None, "center with --center_crop; random without it "
                                                             "(the scripts' default); none: squashed (not diffusers)")
    flip: Optional[bool] = documented_field(None, "--random_flip: the run mirrors images at random")

    def set_fields(self) -> dict:
        """The fields given a value."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class DataConfig:
    caption_column: str = documented_field("text", "metadata column holding the caption (HF imagefolder convention)")
    identity_column: str = documented_field("identity", "metadata column holding the person/identity label")
    max_image_pixels: int = documented_field(64_000_000, "images with more pixels are refused (decompression-bomb guard)")
    max_metadata_line_bytes: int = documented_field(1_000_000, "metadata lines longer than this are refused")
    follow_symlinks_outside: bool = documented_field(False, "allow files that resolve outside the dataset folder")
    transform: TransformConfig = documented_field(factory=TransformConfig, help="the training script's image transform")


@dataclass
class EmbedderSpec:
    """One embedding space of the reference index: a registered embedder name and its options."""

    name: str = documented_field("pixel", "registered embedder name: pixel, clip, face, ... (see `memtrack env`)")
    options: dict = documented_field(factory=dict, help="options of that embedder (validated by the embedder)")


@dataclass
class IndexConfig:
    embedders: list = documented_field(factory=lambda: [EmbedderSpec("pixel", {})],
                         help="embedding spaces to index: list of {name, options}")
    k: int = documented_field(10, "candidates returned by the index per query, re-checked exactly by the detectors")
    index_type: str = documented_field("auto", "faiss index: auto (exact Flat while the vectors take <= 256 MiB, then HNSW, "
                         "IVF-Flat, IVF+PQ with exact re-ranking, by size and memory budget; see docs/scale.md), "
                         "or force one of flat, hnsw, ivf_flat, ivf_pq")
    baseline_k: int = documented_field(50, "pixel space: nearest other training images kept per training image (train->train "
                         "lists: adaptive_l2 needs detectors.adaptive_n - 1 of them; near-duplicates and the tiled "
                         "baseline use them)")
    batch_size: int = documented_field(64, "images per embedding batch")
    memory_budget: Optional[Union[int, str]] = documented_field(None, "memory the faiss index may take, e.g. 16GB or 512MiB "
                                                  "(default: half the physical memory); larger IVF indexes keep "
                                                  "their lists on disk")
    recall_target: float = documented_field(0.95, "approximate indexes: nprobe/efSearch are tuned until recall@k against "
                              "exact search reaches this (measured on held-out training vectors)")
    recall_queries: int = documented_field(1000, "held-out training vectors used to measure recall")
    on_disk: Optional[bool] = documented_field(None, "IVF inverted lists in a file beside the index (default: when the "
                                 "index is larger than the memory budget)")
    shard_size: int = documented_field(10_000, "records per shard of a sharded / resumable build (--shard-dir, accelerate)")
    read_workers: int = documented_field(2, "threads reading and decoding images ahead of the embedder (0: none)")


@dataclass
class SamplingConfig:
    num_samples: int = documented_field(64, "samples drawn from every checkpoint; sample i always starts from the same noise")
    batch_size: int = documented_field(32, "samples per forward batch")
    seed: int = documented_field(0, "base seed; sample i uses seed + i")
    num_inference_steps: int = documented_field(50, "denoising steps per sample")
    scheduler: Literal["ddim", "ddpm", "run"] = documented_field("ddim", "sampler: ddim, ddpm, or the run's own saved scheduler")
    prefer_ema: bool = documented_field(True, "evaluate unet_ema/ when a checkpoint has it")
    device: str = documented_field("cpu", "torch device for sampling, e.g. cuda:1")
    dtype: Literal["float32", "float16", "bfloat16"] = documented_field("float32", "sampling precision")
    num_train_timesteps: int = documented_field(1000, "scheduler fallback when the run saved no scheduler/ (--ddpm_num_steps)")
    beta_schedule: str = documented_field("linear", "scheduler fallback (--ddpm_beta_schedule)")
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = documented_field("epsilon", "scheduler fallback (--prediction_type)")
    pretrained_model: Optional[str] = documented_field(None, "base pipeline for text-to-image / DreamBooth / LoRA checkpoints")
    prompts: Literal["captions", "instance", "file", "none"] = documented_field("captions", "prompt source for text-to-image")
    prompt_file: Optional[str] = documented_field(None, "one prompt per line, with prompts: file")
    instance_prompt: Optional[str] = documented_field(None, "the DreamBooth instance prompt, with prompts: instance")
    seeds_per_prompt: int = documented_field(1, "samples per prompt (prompts x seeds)")
    guidance_scale: float = documented_field(7.5, "classifier-free guidance scale for text-to-image")
    resolution: Optional[int] = documented_field(None, "output resolution for text-to-image (default: the model's)")


@dataclass
class DetectorsConfig:
    nn_ratio: float = documented_field(1 / 3, "Gu et al. 2023: memorized if d1/d2 < this")
    tiled_l2: float = documented_field(0.15, "Carlini et al. 2023: near-copy if max tile RMS distance <= this")
    tiled_grid: int = documented_field(4, "tiles per side for tiled_l2")
    copy: Optional[float] = documented_field(None, "copy if cosine similarity >= this, in every feature space (default: each "
                               "descriptor's own -- SSCD's published 0.5, Somepalli et al. 2023; others calibrated "
                               "on the training set, see copy_quantile)")
    copy_thresholds: dict = documented_field(factory=dict, help="per-space copy thresholds, e.g. {sscd: 0.7} (Wen et al.) or "
                               "{clip: 0.93}; override copy")
    copy_quantile: float = documented_field(0.99, "a descriptor without a published copy threshold (CLIP) is calibrated: the "
                              "threshold is this quantile of the training images' cosine similarity to their "
                              "nearest other training image")
    adaptive_alpha: float = documented_field(0.5, "Carlini et al. 2023 adaptive distance alpha")
    adaptive_n: int = documented_field(50, "Carlini et al. 2023 adaptive distance: neighbours averaged")
    adaptive_min_train: int = documented_field(1000, "adaptive_l2 is applicable only from this many training images (memtrack's "
                                 "choice: the paper averages 50 neighbours of CIFAR-10's 50,000; with 58 training "
                                 "images the detector card measured 84% false positives on novel images)")
    identity_far: float = documented_field(0.001, "target false-match rate for the calibrated identity threshold")
    identity_threshold: Optional[float] = documented_field(None, "override the identity verification threshold (default: calibrated, else published)")
    identity_ratio: float = documented_field(0.6, "identity interpolation: d1/d2 above this means no single identity dominates")
    calibrate: bool = documented_field(True, "calibrate thresholds on the training set where the detector allows it")


@dataclass
class DynamicsConfig:
    baseline_rate: float = documented_field(0.01, "onset: the Wilson lower bound must exceed this rate")
    persistence: int = documented_field(2, "onset: and stay above it for this many further checkpoints")
    loss_gap: bool = documented_field(False, "compute the held-out minus train denoising-loss gap per checkpoint")
    loss_gap_timesteps: int = documented_field(4, "timesteps spread over the schedule for the loss gap")
    loss_gap_images: int = documented_field(8, "training / held-out images used for the loss gap (cost: ~2 x images x "
                              "timesteps / (3 x batch) training steps; see benchmarks/loss_gap_cost.py)")
    heldout_dir: Optional[str] = documented_field(None, "folder of held-out images (same distribution, not trained on) for the "
                                    "loss gap")
    noise_magnitude: bool = documented_field(False, "text-to-image: Wen et al.'s noise magnitude of every prompt per checkpoint")
    noise_magnitude_steps: Optional[int] = documented_field(None, "sampling steps for the noise magnitude (default: "
                                              "sampling.num_inference_steps; Wen et al. find step 1 alone detects well)")


@dataclass
class TrackingConfig:
    """How training reaches the tracker: the sidecar watcher, the in-process hook, Tracker.step."""

    every_n_steps: int = documented_field(500, "Tracker.step evaluates the live model every this many steps (custom loops)")
    poll_interval_s: float = documented_field(2.0, "sidecar: seconds between looks at the output dir")
    quiet_period_s: float = documented_field(2.0, "sidecar: read a checkpoint once random_states_0.pkl exists and no file in it "
                                    "changed for this long")
    in_process: Literal["deferred", "rank0"] = documented_field("deferred", "in-process, several ranks: evaluate at the next point "
                                                  "every rank reaches, sharing the samples (deferred), or on rank 0 "
                                                  "alone inside save_state (rank0)")
    log_images: bool = documented_field(True, "log the strongest matches as an image grid next to the rates")
    grid_matches: int = documented_field(8, "matches (sample | training image pairs) in the image grid")
    logging_dir: Optional[str] = documented_field(None, "sidecar: tensorboard folder (default: the one the training script writes)")
    loggers: list = documented_field(factory=lambda: ["tensorboard"], help="sidecar: where each checkpoint's rates and match "
                       "grid go: tensorboard (an event file beside the script's), wandb (a run of memtrack's own in "
                       "the training's project and group; docs/integrations.md)")
    wandb_project: Optional[str] = documented_field(None, "wandb logger: the project (default WANDB_PROJECT, else memtrack); the "
                                      "name the script passes to init_trackers puts both runs in one project")
    wandb_group: Optional[str] = documented_field(None, "wandb logger: the group shared with the training run (default "
                                    "WANDB_RUN_GROUP, which the script's wandb.init reads too; else the output "
                                    "dir's name)")
    threads: Optional[int] = documented_field(None, "CPU threads of memtrack's own processes (torch, OpenMP, BLAS, faiss; never "
                                "the training command's); default: all usable cores for scan, 1 beside training "
                                "(watch, launch), or the cores launch --threads-for-training leaves "
                                "(docs/integrations.md)")


@dataclass
class Config:
    """The whole memtrack config. Sections: data, index, sampling, detectors, dynamics, tracking."""

    data: DataConfig = documented_field(factory=DataConfig, help="how the training set is read")
    index: IndexConfig = documented_field(factory=IndexConfig, help="the reference index")
    sampling: SamplingConfig = documented_field(factory=SamplingConfig, help="how checkpoints are sampled")
    detectors: DetectorsConfig = documented_field(factory=DetectorsConfig, help="detector thresholds")
    dynamics: DynamicsConfig = documented_field(factory=DynamicsConfig, help="onset and probes")
    tracking: TrackingConfig = documented_field(factory=TrackingConfig, help="sidecar, in-process and Tracker.step settings")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def copy(self) -> "Config":
        return from_dict(Config, self.to_dict())


# --------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _show(value: Any, limit: int = 80) -> str:
    """``repr`` for error messages, shortened; ints over 4,300 digits cannot even be repr'd."""
    try:
        text = repr(value)
    except ValueError:
        return f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [arg for arg in args if arg is not type(None)]
        for arg in real:
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if len(real) == 1 and real[0] in (int, float) and numeric:  # a number of the right kind, a bad
                    raise exc from None                                    # value: "expected a finite number"
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: must be one of {_type_name(tp)}, got {_show(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:  # float(10**400) raises OverflowError; nan/inf would silently disable a threshold
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
            raise ConfigError(f"{path}: expected a finite number, got {_show(value)}")
        raise ConfigError(f"{path}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {_show(value)}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
        raise ConfigError(f"{path}: expected a list, got {_show(value)}")
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown fields and wrong types by path."""
    where = path or "config"
    if isinstance(data, cls):
        return data
    if data is None:  # a YAML section whose fields are all commented out (``sampling:``): the defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__} {_show(data)}"[:300])
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        close = difflib.get_close_matches(unknown[0], list(fields), n=1) if isinstance(unknown[0], str) else []
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: unknown field {_show(unknown[0])}", hint=f"{guess}known fields here: {known}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(hints[name], value, sub)
    obj = cls(**kwargs)
    if cls is IndexConfig:
        obj.embedders = [embedder_spec(e, f"{where}.embedders[{i}]") for i, e in enumerate(obj.embedders)]
    _validate(obj, where)
    return obj


def embedder_spec(value: Any, path: str) -> EmbedderSpec:
    if isinstance(value, EmbedderSpec):
        return value
    if isinstance(value, str):
        return EmbedderSpec(value, {})
    if isinstance(value, dict):
        value = dict(value)
        if "name" not in value:
            raise ConfigError(f"{path}: an embedder needs a 'name' (pixel, clip, face, ...)")
        name = _coerce(str, value.pop("name"), f"{path}.name")
        opts = value.pop("options", {})
        opts = _coerce(dict, opts, f"{path}.options")
        opts.update(value)  # allow the flat form {name: clip, model: ViT-B-32}
        return EmbedderSpec(name, opts)
    raise ConfigError(f"{path}: expected an embedder name or mapping, got {_show(value)}")


_POSITIVE = {
    "SamplingConfig": ("num_samples", "batch_size", "num_inference_steps", "seeds_per_prompt", "num_train_timesteps"),
    "IndexConfig": ("k", "baseline_k", "batch_size", "recall_queries", "shard_size"),
    "DetectorsConfig": ("tiled_grid", "adaptive_n", "adaptive_min_train"),
    "DynamicsConfig": ("loss_gap_timesteps", "loss_gap_images"),
    "DataConfig": ("max_image_pixels", "max_metadata_line_bytes"),
    "TrackingConfig": ("every_n_steps", "grid_matches", "poll_interval_s"),
}


def _validate(obj: Any, where: str) -> None:
    for name in _POSITIVE.get(type(obj).__name__, ()):
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{where}.{name} must be > 0, got {_show(value)}")
    if isinstance(obj, TransformConfig) and obj.resolution is not None and obj.resolution <= 0:
        raise ConfigError(f"{where}.resolution must be > 0, got {_show(obj.resolution)}")
    if isinstance(obj, DetectorsConfig):
        if not 0.0 < obj.identity_far < 1.0:
            raise ConfigError(f"{where}.identity_far must be in (0, 1), got {obj.identity_far}")
        if obj.nn_ratio <= 0 or obj.tiled_l2 <= 0:
            raise ConfigError(f"{where}: nn_ratio and tiled_l2 thresholds must be > 0")
        if not 0.0 < obj.copy_quantile < 1.0:
            raise ConfigError(f"{where}.copy_quantile must be in (0, 1), got {obj.copy_quantile}")
        for space, value in obj.copy_thresholds.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1.0 <= value <= 1.0:
                raise ConfigError(f"{where}.copy_thresholds.{space} must be a cosine similarity in [-1, 1], got "
                                  f"{_show(value)}")
        if obj.adaptive_alpha <= 0:  # the adaptive distance divides by alpha
            raise ConfigError(f"{where}.adaptive_alpha must be > 0, got {obj.adaptive_alpha}")
    if isinstance(obj, DynamicsConfig):
        if not 0.0 <= obj.baseline_rate < 1.0:
            raise ConfigError(f"{where}.baseline_rate must be in [0, 1), got {obj.baseline_rate}")
        if obj.persistence < 0:
            raise ConfigError(f"{where}.persistence must be >= 0, got {obj.persistence}")
    if isinstance(obj, TrackingConfig) and obj.quiet_period_s < 0:
        raise ConfigError(f"{where}.quiet_period_s must be >= 0, got {obj.quiet_period_s}")
    if isinstance(obj, TrackingConfig):
        _validate_loggers(obj.loggers, where)
    if isinstance(obj, TrackingConfig) and obj.threads is not None and obj.threads < 1:
        raise ConfigError(f"{where}.threads must be >= 1, got {obj.threads}", hint="leave it unset for the default rule")
    if isinstance(obj, IndexConfig):
        _validate_index(obj, where)


def _validate_loggers(loggers: list, where: str) -> None:
    for name in loggers:
        if not isinstance(name, str) or name not in LOGGERS:
            raise ConfigError(f"{where}.loggers: unknown logger {_show(name)}",
                              hint=f"known loggers: {', '.join(sorted(LOGGERS))}")


def _validate_index(obj: "IndexConfig", where: str) -> None:
    from memtrack.utils import parse_bytes

    if obj.index_type not in INDEX_TYPES:
        raise ConfigError(f"{where}.index_type must be one of {', '.join(INDEX_TYPES)}, got {_show(obj.index_type)}")
    if not 0.0 < obj.recall_target <= 1.0:
        raise ConfigError(f"{where}.recall_target must be in (0, 1], got {obj.recall_target}")
    if obj.read_workers < 0:
        raise ConfigError(f"{where}.read_workers must be >= 0, got {obj.read_workers}")
    try:
        parse_bytes(obj.memory_budget)
    except IndexError_ as exc:
        raise ConfigError(f"{where}.memory_budget: {exc.message}", hint=exc.hint) from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted ``overrides``.

    Args:
        path: a YAML file; missing sections take their defaults.
        overrides: ``{"sampling.num_samples": 16, ...}`` applied on top (CLI flags use this).

    Raises:
        ConfigError: naming the file and the field when the file is unreadable, not YAML, or invalid.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}", hint="check the path given to --config") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: ints over 4,300 digits
            raise ConfigError(f"{path} is not valid YAML: {(str(exc).splitlines() or [''])[0][:200]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    try:
        return from_dict(Config, data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc.message}", hint=exc.hint) from None
        raise


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, default, help) for every field: the source of the config reference in the docs."""
    rows = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(describe(hint, name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((name, repr(default), f.metadata.get("help", "")))
    return rows
