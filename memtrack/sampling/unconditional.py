"""Rebuild a pipeline from a checkpoint and draw the fixed sample plan.

Seeds are identities: sample ``i`` starts from noise drawn by its own CPU ``torch.Generator`` seeded with
``seed + i``, at every checkpoint, whatever the batch size, device or number of processes. That is what
lets memtrack follow one seed across training ("seed 17 locked onto training image 3 at step 4,500").

Checkpoints hold no scheduler, so it is rebuilt from the run's saved ``scheduler/`` folder when there is
one (the final pipeline has it), else from the config (the script's ``--ddpm_num_steps``,
``--ddpm_beta_schedule``, ``--prediction_type``), and sampled with DDIM by default.

Pipeline builders are registered by checkpoint kind (:func:`register_pipeline_builder`), so text-to-image,
DreamBooth and LoRA checkpoints plug in without an if/elif chain here. Each registers, beside its builder,
where its scheduler comes from (:func:`planned_scheduler`): the scheduler actually used is part of the
evaluation key, and it is known from config files before any weights are loaded, so a stored verdict is
found (or not) first. :func:`scheduler_identity` is what the key holds.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from memtrack.sampling.checkpoints import Checkpoint
from memtrack.config import SamplingConfig
from memtrack.errors import CheckpointError, ConfigError
from memtrack.utils import get_logger, json_safe, progress_bar, stable_hash

logger = get_logger(__name__)


@dataclass(frozen=True)
class SampleItem:
    """One planned sample: its global index, its seed and (text-to-image) its prompt."""

    index: int
    seed: int
    prompt: Optional[str] = None


@dataclass
class SamplePlan:
    """The fixed plan drawn at every checkpoint. ``prompts`` x ``seeds_per_prompt`` for text-to-image."""

    num_samples: int = 64
    seed: int = 0
    prompts: Optional[list] = None
    seeds_per_prompt: int = 1

    @classmethod
    def from_config(cls, cfg: SamplingConfig, prompts: Sequence[str] | None = None) -> "SamplePlan":
        return cls(cfg.num_samples, cfg.seed, list(prompts) if prompts else None, cfg.seeds_per_prompt)

    def items(self) -> list[SampleItem]:
        if not self.prompts:
            return [SampleItem(i, self.seed + i) for i in range(self.num_samples)]
        out = []
        for p_i, prompt in enumerate(self.prompts):
            for s in range(self.seeds_per_prompt):
                i = p_i * self.seeds_per_prompt + s
                out.append(SampleItem(i, self.seed + i, prompt))
        return out[: self.num_samples] if self.num_samples else out

    def shard(self, rank: int, world: int) -> list[SampleItem]:
        """The contiguous block of items that process ``rank`` of ``world`` draws (by global index)."""
        items = self.items()
        n = len(items)
        base, extra = divmod(n, world)
        start = rank * base + min(rank, extra)
        return items[start:start + base + (1 if rank < extra else 0)]

    def key(self) -> str:
        return stable_hash(asdict(self))


@dataclass
class Samples:
    """Drawn images and the plan items they belong to (same order)."""

    images: list
    items: list

    @property
    def seeds(self) -> list[int]:
        return [it.seed for it in self.items]

    def hashes(self) -> list[str]:
        return [hashlib.sha256(np.asarray(im, dtype=np.uint8).tobytes()).hexdigest() for im in self.images]


# ---------------------------------------------------------------------------------------- schedulers


def build_scheduler(cfg: SamplingConfig, run_dir: Path | None = None):
    """The sampling scheduler: the run's saved ``scheduler/`` config if any, else the config's fields.

    Raises:
        ConfigError: the saved config cannot be read or built (a run-level problem: the scan stops with
            this message rather than recording every checkpoint as skipped).
    """
    import diffusers

    saved, source = _saved_scheduler(run_dir), "the run's scheduler/scheduler_config.json"
    if saved is None:
        saved, source = {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule,
                         "prediction_type": cfg.prediction_type}, "the sampling config"
    if cfg.scheduler in ("ddim", "ddpm"):
        cls = diffusers.DDIMScheduler if cfg.scheduler == "ddim" else diffusers.DDPMScheduler
    else:
        name = saved.get("_class_name")
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            raise ConfigError("sampling.scheduler is 'run' but the run saved no scheduler/ folder with a known class",
                              hint="use sampling.scheduler: ddim")
    try:
        return cls.from_config(saved)
    except (TypeError, ValueError, RuntimeError, NotImplementedError, OverflowError, AttributeError) as exc:
        raise ConfigError(f"cannot build a {cls.__name__} from {source}: {exc}",
                          hint="fix or remove the run's scheduler/ folder, or set the sampling.* scheduler fields"
                          ) from None


def _saved_scheduler(run_dir: Path | None) -> dict | None:
    """The run's saved ``scheduler/scheduler_config.json`` as a dict, or None when there is none."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    import json

    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the run's scheduler config {path}: {exc}",
                          hint="fix or remove the run's scheduler/ folder") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a scheduler config (expected a JSON object, got {type(saved).__name__})",
                          hint="fix or remove the run's scheduler/ folder")
    return saved


# ------------------------------------------------------------------------------------------ builders

def scheduler_identity(scheduler) -> dict:
    """``{"class", "config"}``: what sampling with ``scheduler`` depends on.

    ``config`` holds the class's constructor arguments as resolved (defaults filled in). Keys the class
    does not take (a DDPM-only ``variance_type`` left in a config that DDIM was built from) and diffusers'
    bookkeeping (``_diffusers_version``, ``_use_default_values``) are left out: they change nothing.
    """
    import inspect

    params = set(inspect.signature(type(scheduler).__init__).parameters) - {"self"}
    config = {k: v for k, v in dict(scheduler.config).items() if k in params}
    return {"class": type(scheduler).__name__, "config": json_safe(config)}


def used_scheduler(pipeline) -> dict | None:
    """:func:`scheduler_identity` of a pipeline's scheduler; None without a pipeline or a diffusers scheduler."""
    sched = getattr(pipeline, "scheduler", None) if pipeline is not None else None
    return scheduler_identity(sched) if hasattr(sched, "config") else None


def torch_dtype_of(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


_EMA_KEYS = {"decay", "inv_gamma", "min_decay", "optimization_step", "power", "update_after_step", "use_ema_warmup"}


@contextlib.contextmanager
def _quiet_ema_config(cls, config: dict):
    """Silence diffusers' "config attributes ... will be ignored" warning for ``unet_ema/`` folders.

    ``EMAModel.save_pretrained`` writes its own settings (decay, optimization_step, ...) into the model's
    config.json; diffusers ignores them when loading, correctly, but warns once per checkpoint. Only that
    case is silenced: a config with any other unexpected key still warns.
    """
    import logging

    import inspect

    expected = set(inspect.signature(cls.__init__).parameters)
    extra = {k for k in config if not k.startswith("_")} - expected
    log = logging.getLogger("diffusers.configuration_utils")
    if not extra or not extra <= _EMA_KEYS:
        yield
        return
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def load_unet(folder: Path, dtype: str = "float32"):
    """Load a diffusers model saved with ``save_pretrained`` -- safetensors preferred.

    Weights are read only through safetensors or torch's weights-only unpickler: a ``.bin`` that holds
    anything but tensors (a pickle that could run code when loaded) is refused before diffusers opens it.
    """
    import diffusers

    config_path = folder / "config.json"
    try:
        import json

        config = json.loads(config_path.read_text())
        safetensors = _has_safetensors(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}",
                              hint="the checkpoint may be half-written, deleted or corrupt") from None
    cls_name = config.get("_class_name", "UNet2DModel") if isinstance(config, dict) else None
    if not isinstance(cls_name, str):
        raise CheckpointError(f"{config_path} is not a diffusers model config (a JSON object whose "
                              f"'_class_name' is a string)")
    cls = getattr(diffusers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise CheckpointError(f"{config_path} names an unknown model class {cls_name!r} (not a diffusers model)")
    if not safetensors:
        _refuse_pickled_code(folder)
    try:
        with _quiet_ema_config(cls, config):
            return cls.from_pretrained(folder, torch_dtype=torch_dtype_of(dtype), use_safetensors=safetensors)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the model in {folder}: {exc}",
                              hint="the checkpoint may be half-written or corrupt") from None


def _has_safetensors(folder: Path) -> bool:
    return any(p.suffix == ".safetensors" for p in folder.iterdir())


def _refuse_pickled_code(folder: Path) -> None:
    """Open each pickle-based weights file with torch's weights-only unpickler before diffusers reads it.

    diffusers 0.42 passes ``weights_only=True`` itself; checking here keeps the guarantee whatever the
    installed versions, and names the file that is refused.
    """
    import pickle
    import re
    import zipfile

    import torch

    for path in sorted(folder.glob("*.bin")):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported (global: GLOBAL [\w.]+|operand \d+)", str(exc))
            detail = found.group(0) if found else ""
            raise CheckpointError(f"refused {path}: it holds pickled objects other than tensors, which could run "
                                  f"code when loaded" + (f" ({detail})" if detail else ""),
                                  hint="re-save the model with save_pretrained(..., safe_serialization=True)"
                                  ) from None
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}",
                                  hint="the checkpoint may be half-written or corrupt") from None


def build_unconditional(ck: Checkpoint, cfg: SamplingConfig, run_dir: Path | None):
    import diffusers

    unet = load_unet(ck.weights, cfg.dtype)
    if type(unet).__name__ != "UNet2DModel":
        raise CheckpointError(f"{ck.weights} holds a {type(unet).__name__}, not an unconditional UNet2DModel",
                              hint="set sampling.pretrained_model to the base pipeline for text-to-image runs")
    scheduler = build_scheduler(cfg, run_dir)
    pipe_cls = diffusers.DDIMPipeline if isinstance(scheduler, diffusers.DDIMScheduler) else diffusers.DDPMPipeline
    pipe = pipe_cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(cfg.device)


def unconditional_scheduler(ck: Checkpoint, cfg: SamplingConfig, run_dir: Path | None):
    return build_scheduler(cfg, run_dir)


# ------------------------------------------------------------------------------------------- drawing


def draw(pipeline, items: Sequence[SampleItem], cfg: SamplingConfig, *, desc: str = "sampling") -> list:
    """Run ``pipeline`` on the plan items in batches; one CPU generator per sample, seeded by its seed."""
    import torch

    images: list = []
    bar = progress_bar(total=len(items), desc=desc, unit="img")
    for start in range(0, len(items), cfg.batch_size):
        batch = items[start:start + cfg.batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(it.seed)) for it in batch]
        kwargs = dict(generator=gens, num_inference_steps=cfg.num_inference_steps, output_type="pil")
        if batch[0].prompt is not None:
            kwargs.update(prompt=[it.prompt for it in batch], guidance_scale=cfg.guidance_scale)
            if cfg.resolution:
                kwargs.update(height=cfg.resolution, width=cfg.resolution)
        else:
            kwargs.update(batch_size=len(batch))
        with torch.inference_mode():
            out = pipeline(**kwargs)
        images.extend(im.convert("RGB") for im in out.images)
        bar.update(len(batch))
    bar.close()
    return images


def to_uint8(images: Sequence[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
