"""Text-to-image, DreamBooth and LoRA checkpoints: rebuild their pipeline on a base model; choose prompts.

diffusers' ``train_text_to_image.py`` and ``train_dreambooth.py`` save ``checkpoint-N/unet/`` (a
``UNet2DConditionModel``; ``unet_ema/`` with ``--use_ema``; ``text_encoder/`` when DreamBooth trains it)
and, at the end, a whole pipeline in the output dir. The ``*_lora.py`` scripts save
``pytorch_lora_weights.safetensors`` only. Neither kind of checkpoint holds the VAE, the tokenizer or the
frozen parts, so they are taken from the *base pipeline* the script fine-tuned
(``--pretrained_model_name_or_path``, memtrack's ``sampling.pretrained_model``):

==================  ========================================================================================
kind                pipeline
==================  ========================================================================================
``t2i_unet``        the base pipeline with the checkpoint's UNet (and text encoder, when saved) swapped in
``t2i_pipeline``    the final pipeline the script saved, loaded as it is
``lora``            the base pipeline with the LoRA weights loaded by ``load_lora_weights`` (needs ``peft``)
==================  ========================================================================================

The base pipeline is loaded once and kept (one at a time); a LoRA loaded for one checkpoint is unloaded
before the next one is built. The safety checker is switched off: it would replace flagged samples with
black images, which hides exactly the regurgitation memtrack looks for.

Prompts (``sampling.prompts``): ``captions`` -- the training captions recorded in the reference index,
most-duplicated first (Carlini et al. 2023 found duplicated training images the most extractable, and their
captions the strongest triggers); ``instance`` -- the DreamBooth instance prompt; ``file`` -- one prompt per
line. Each prompt is drawn with ``seeds_per_prompt`` seeds; ``num_samples`` caps the plan.

Example:
    >>> cfg = load_config("configs/text_to_image.yaml").sampling
    >>> prompts = resolve_prompts(cfg, ReferenceIndex.open("ref/"))
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from memtrack.sampling.checkpoints import CONDITIONAL_UNETS, LIVE, Checkpoint
from memtrack.config import SamplingConfig
from memtrack.errors import CheckpointError, ConfigError, DependencyError
from memtrack.sampling.unconditional import build_scheduler, load_unet, torch_dtype_of
from memtrack.utils import get_logger

logger = get_logger(__name__)

_BASE: dict = {}  # {(pretrained_model, dtype, device): pipeline} -- at most one entry


# ------------------------------------------------------------------------------------------- prompts


def resolve_prompts(cfg: SamplingConfig, index=None) -> Optional[list[str]]:
    """The prompts of the sample plan for a text-to-image run (None for ``prompts: none``).

    Args:
        cfg: the sampling config (``prompts``, ``instance_prompt``, ``prompt_file``).
        index: the :class:`~memtrack.index.reference.ReferenceIndex` whose records hold the training captions.

    Raises:
        ConfigError: the chosen source has no prompts, naming the field to set.
    """
    if cfg.prompts == "none":
        return None
    if cfg.prompts == "instance":
        if not cfg.instance_prompt:
            raise ConfigError("sampling.prompts is 'instance' but sampling.instance_prompt is empty",
                              hint="set sampling.instance_prompt (launch reads the script's --instance_prompt)")
        return [cfg.instance_prompt]
    if cfg.prompts == "file":
        return _prompt_file(cfg.prompt_file)
    captions = [r.caption for r in (index.records if index is not None else []) if r.caption]
    if not captions:
        raise ConfigError("sampling.prompts is 'captions' but the index's training records have no captions",
                          hint="build the index from an imagefolder with a caption column (data.caption_column), "
                               "or set sampling.prompts to instance or file")
    counts = Counter(captions)
    first = {c: i for i, c in reversed(list(enumerate(captions)))}
    return sorted(counts, key=lambda c: (-counts[c], first[c]))


def _prompt_file(path: Optional[str]) -> list[str]:
    if not path:
        raise ConfigError("sampling.prompts is 'file' but sampling.prompt_file is not set")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read sampling.prompt_file {path}: {exc}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"sampling.prompt_file {path} holds no prompts", hint="write one prompt per line")
    return prompts


def is_text_to_image(cfg: SamplingConfig) -> bool:
    """Whether a plan needs prompts: a base model is named, or prompts are given explicitly."""
    return cfg.prompts != "none" and (bool(cfg.pretrained_model) or cfg.prompts in ("instance", "file"))


# -------------------------------------------------------------------------------------- base pipeline


def base_pipeline(cfg: SamplingConfig):
    """The base pipeline named by ``sampling.pretrained_model`` (cached), with no LoRA loaded."""
    if not cfg.pretrained_model:
        raise ConfigError("text-to-image checkpoints need the base pipeline they were fine-tuned from",
                          hint="set sampling.pretrained_model (launch reads --pretrained_model_name_or_path)")
    key = (cfg.pretrained_model, cfg.dtype, cfg.device)
    if key not in _BASE:
        _BASE.clear()
        _BASE[key] = _load_pipeline_folder(cfg.pretrained_model, cfg)
    pipe = _BASE[key]
    _unload_lora(pipe)
    return pipe


def _load_pipeline_folder(name: str | Path, cfg: SamplingConfig):
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(str(name))
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        pipe = DiffusionPipeline.from_pretrained(str(name), **_dtype_kw(cfg.dtype), **extra)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"cannot load the pipeline {name!s}: {str(exc).splitlines()[0]}",
                          hint="check sampling.pretrained_model; offline it must be a local folder or cached"
                          ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(cfg.device)


def _dtype_kw(name: str) -> dict:
    """diffusers >= 0.36 names the argument ``dtype`` (``torch_dtype`` is deprecated); older ones ``torch_dtype``."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": torch_dtype_of(name)}


def _scheduler(cfg: SamplingConfig, current):
    """The sampler: DDIM/DDPM built from the pipeline's own scheduler config, or the scheduler as saved."""
    import diffusers

    if cfg.scheduler == "run":
        return current
    cls = diffusers.DDIMScheduler if cfg.scheduler == "ddim" else diffusers.DDPMScheduler
    return cls.from_config(current.config)


def _derive(base, cfg: SamplingConfig, **components):
    """A pipeline sharing ``base``'s components, with ``components`` swapped in and the configured sampler."""
    pipe = type(base).from_pipe(base, **_dtype_kw(cfg.dtype),
                                scheduler=_scheduler(cfg, base.scheduler), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unload_lora(pipe) -> None:
    if getattr(pipe, "_memtrack_lora", False):
        pipe.unload_lora_weights()
        pipe._memtrack_lora = False


def load_text_encoder(folder: Path, dtype: str = "float32"):
    """Load a ``transformers`` text encoder saved with ``save_pretrained`` (class from its config)."""
    try:
        import transformers
    except ImportError:
        raise DependencyError("text-to-image checkpoints need transformers",
                              hint="pip install 'memtrack[text]'") from None
    try:
        arch = (json.loads((folder / "config.json").read_text()).get("architectures") or ["CLIPTextModel"])[0]
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {exc}") from None
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise CheckpointError(f"{folder} holds an unknown text encoder class {arch!r}")
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype" if major >= 5 else "torch_dtype": torch_dtype_of(dtype)}
    try:
        return cls.from_pretrained(folder, **dtype_kw)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the text encoder in {folder}: {exc}",
                              hint="the checkpoint may be half-written or corrupt") from None


# ------------------------------------------------------------------------------------------ builders


def build_t2i_unet(ck: Checkpoint, cfg: SamplingConfig, run_dir: Path | None):
    base = base_pipeline(cfg)
    swap = {"unet": load_unet(ck.weights, cfg.dtype).to(cfg.device)}
    if ck.text_encoder is not None:
        swap["text_encoder"] = load_text_encoder(ck.text_encoder, cfg.dtype).to(cfg.device)
    return _derive(base, cfg, **swap)


def build_t2i_pipeline(ck: Checkpoint, cfg: SamplingConfig, run_dir: Path | None):
    pipe = _load_pipeline_folder(ck.path, cfg)
    pipe.scheduler = _scheduler(cfg, pipe.scheduler)
    return pipe


def build_lora(ck: Checkpoint, cfg: SamplingConfig, run_dir: Path | None):
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise DependencyError("LoRA checkpoints are loaded with diffusers' load_lora_weights, which needs peft",
                              hint="pip install peft")
    base = base_pipeline(cfg)
    try:
        base.load_lora_weights(str(ck.weights.parent), weight_name=ck.weights.name, adapter_name="memtrack")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        _unload_lora(base)
        raise CheckpointError(f"cannot load the LoRA weights {ck.weights}: {str(exc).splitlines()[0]}",
                              hint="the file may be half-written, or belong to another base model") from None
    base._memtrack_lora = True
    return _derive(base, cfg)


def saved_pipeline_scheduler(name: str | Path, cfg: SamplingConfig):
    """The sampler a pipeline folder (or hub name) gives, from its config files alone (no weights loaded).

    The class is the one ``model_index.json`` names (what ``DiffusionPipeline.from_pretrained`` builds),
    its settings those of ``scheduler/scheduler_config.json``; then :func:`_scheduler` applies
    ``sampling.scheduler`` exactly as the builders do.
    """
    import diffusers

    try:
        index = diffusers.DiffusionPipeline.load_config(str(name))
        saved = diffusers.DDIMScheduler.load_config(str(name), subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"cannot read the scheduler config of the pipeline {name!s}: {str(exc).splitlines()[0]}",
                          hint="check sampling.pretrained_model; offline it must be a local folder or cached"
                          ) from None
    entry = index.get("scheduler") if isinstance(index, dict) else None
    cls_name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else saved.get("_class_name")
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ConfigError(f"the pipeline {name!s} names an unknown scheduler class {cls_name!r}",
                          hint="its model_index.json and scheduler/scheduler_config.json must name a diffusers scheduler")
    return _scheduler(cfg, cls.from_config(saved))


def base_scheduler(ck: Checkpoint, cfg: SamplingConfig, run_dir: Path | None):
    """The base pipeline's sampler: the loaded one when it is cached, else read from its config files."""
    if not cfg.pretrained_model:
        base_pipeline(cfg)  # raises the ConfigError that names sampling.pretrained_model
    loaded = _BASE.get((cfg.pretrained_model, cfg.dtype, cfg.device))
    if loaded is not None:
        return _scheduler(cfg, loaded.scheduler)
    return saved_pipeline_scheduler(cfg.pretrained_model, cfg)


def own_scheduler(ck: Checkpoint, cfg: SamplingConfig, run_dir: Path | None):
    return saved_pipeline_scheduler(ck.path, cfg)




# --------------------------------------------------------------------------------------- live models


def pipeline_for_models(cfg: SamplingConfig, run_dir: Path | None, unet, text_encoder=None):
    """A pipeline around in-memory models (a custom loop's ``Tracker.step``), on the UNet's own device.

    The live UNet is not moved or copied: sampling runs where it trains. A text-conditional UNet is put
    on the base pipeline (whose other parts are moved to the UNet's device).
    """
    import diffusers

    device = next(unet.parameters()).device
    if type(unet).__name__ in CONDITIONAL_UNETS:
        swap = {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}
        return _derive(base_pipeline(cfg), cfg, **swap).to(device)
    scheduler = build_scheduler(cfg, run_dir)
    cls = diffusers.DDIMPipeline if isinstance(scheduler, diffusers.DDIMScheduler) else diffusers.DDPMPipeline
    pipe = cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights_hash(*models) -> str:
    """``sha256:<hex>`` of the models' state dicts: every tensor's name, dtype, shape and bytes, in order.

    The identity of an in-memory model (``Tracker.step``): a restarted, resumed or retrained run whose
    weights differ gets another hash, identical weights the same one. ``None`` entries are skipped.
    Tensors are copied to the CPU one at a time (peak extra memory: the largest tensor).

    Cost: sha256 speed over the state dict's bytes, after each tensor's copy to the CPU. Measured on the
    project's 2-core CPU machine (sha256 at 1.8 GB/s there; median of 5): the tests' 16-px UNet2DModel
    (0.2 MB) 0.8 ms; a DDPM-CIFAR10-sized UNet2DModel (35.7M parameters, 143 MB float32) 123 ms. A
    Stable Diffusion 1.x UNet (3.4 GB float32) would take ~2 s at that rate plus its device-to-host copy
    (extrapolated, not measured) -- small next to sampling 64 images, and paid once per evaluation.
    """
    import torch

    h = hashlib.sha256()
    for i, model in enumerate(m for m in models if m is not None):
        state = model.state_dict()
        h.update(f"model {i} {type(model).__name__} {len(state)}\n".encode())
        for name in sorted(state):
            t = state[name].detach()
            h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
            flat = t.reshape(-1).cpu().contiguous()
            h.update(flat.view(torch.uint8).numpy())  # bytes, whatever the dtype (bfloat16 has no numpy twin)
    return "sha256:" + h.hexdigest()


def live_checkpoint(step: int, run_dir: Path | None, unet=None, text_encoder=None) -> Checkpoint:
    """The :class:`Checkpoint` record of an in-memory model at ``step`` (named ``step-N`` in the store).

    Its fingerprint is :func:`weights_hash` of ``unet`` (and ``text_encoder`` when it is sampled), so the
    store answers from its cache only for the very same weights.
    """
    folder = Path(run_dir) if run_dir is not None else Path(".")
    kind = "t2i_unet" if type(unet).__name__ in CONDITIONAL_UNETS else "unet"
    content = weights_hash(unet, text_encoder) if unet is not None else None
    return Checkpoint(step, folder, f"step-{step}", kind, folder, LIVE, files=[], content=content)


def prompts_for(cfg: SamplingConfig, index=None) -> Optional[Sequence[str]]:
    """Prompts when the plan is text-to-image (:func:`is_text_to_image`), else None."""
    return resolve_prompts(cfg, index) if is_text_to_image(cfg) else None
