"""Pipeline builders by checkpoint kind: the one place that knows how each kind of checkpoint is sampled.

A builder is ``builder(checkpoint, sampling_config, run_dir) -> pipeline``; its scheduler source builds the
scheduler it will sample with from config files alone (part of the evaluation key, so it loads no model).
Built-ins: ``unet`` and ``pipeline`` (unconditional), ``t2i_unet``, ``t2i_pipeline`` and ``lora``
(text-to-image). Register your own kind with :func:`register_pipeline_builder`.

Example:
    >>> register_pipeline_builder("my_kind", build_mine, scheduler=my_scheduler)
    >>> get_pipeline_builder("unet")   # the built-in, e.g. to wrap it
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional, Sequence

from memtrack.config import SamplingConfig
from memtrack.errors import CheckpointError
from memtrack.sampling.checkpoints import Checkpoint
from memtrack.sampling.unconditional import SampleItem, SamplePlan, Samples, build_scheduler, draw

PipelineBuilder = Callable[[Checkpoint, SamplingConfig, Optional[Path]], object]
#: ``(checkpoint, sampling_config, run_dir) -> scheduler``, built from config files alone (no weights)
SchedulerSource = Callable[[Checkpoint, SamplingConfig, Optional[Path]], object]
_BUILDERS: dict[str, PipelineBuilder] = {}
_SCHEDULERS: dict[str, SchedulerSource] = {}


def register_pipeline_builder(kind: str, builder: PipelineBuilder, *, scheduler: SchedulerSource | None = None,
                              overwrite: bool = False) -> None:
    """Register ``builder(checkpoint, sampling_config, run_dir) -> pipeline`` for a checkpoint kind.

    ``scheduler`` returns the scheduler ``builder`` will sample with, built from configs only: it is part
    of the evaluation key, computed before the store is asked whether the checkpoint is already done, so
    it must not load a model. Without it, the kind is taken to sample with :func:`build_scheduler`'s.
    """
    _load_builtins()
    if kind in _BUILDERS and not overwrite:
        raise ValueError(f"a pipeline builder for {kind!r} is already registered")
    _BUILDERS[kind] = builder
    if scheduler is not None:
        _SCHEDULERS[kind] = scheduler
    else:
        _SCHEDULERS.pop(kind, None)


def planned_scheduler(ck: Checkpoint, cfg: SamplingConfig, run_dir: Path | None = None):
    """The scheduler checkpoint ``ck`` will be sampled with, from config files alone (cheap: no weights)."""
    source = scheduler_source(ck.kind)
    return source(ck, cfg, run_dir) if source is not None else build_scheduler(cfg, run_dir)


def get_pipeline_builder(kind: str) -> PipelineBuilder:
    """The builder registered for checkpoint ``kind`` (a built-in or a plug-in)."""
    _load_builtins()
    if kind not in _BUILDERS:
        raise CheckpointError(f"no pipeline builder for checkpoint kind {kind!r}",
                              hint=f"known kinds: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[kind]


def scheduler_source(kind: str) -> Optional[SchedulerSource]:
    """The scheduler source registered with ``kind``'s builder (None: :func:`build_scheduler`'s)."""
    _load_builtins()
    return _SCHEDULERS.get(kind)


def pipeline_kinds() -> list[str]:
    _load_builtins()
    return sorted(_BUILDERS)


@functools.cache  # once: the built-ins register no more than once however often this is asked
def _load_builtins() -> None:
    from memtrack.sampling import text_to_image as t2i
    from memtrack.sampling import unconditional as unc

    for kind, builder, sched in [("unet", unc.build_unconditional, unc.unconditional_scheduler),
                                 ("pipeline", unc.build_unconditional, unc.unconditional_scheduler),
                                 ("t2i_unet", t2i.build_t2i_unet, t2i.base_scheduler),
                                 ("t2i_pipeline", t2i.build_t2i_pipeline, t2i.own_scheduler),
                                 ("lora", t2i.build_lora, t2i.base_scheduler)]:
        _BUILDERS.setdefault(kind, builder)
        _SCHEDULERS.setdefault(kind, sched)


def load_pipeline(ck: Checkpoint, cfg: SamplingConfig, run_dir: Path | None = None):
    """Rebuild the pipeline that samples checkpoint ``ck``."""
    _load_builtins()
    kind = ck.kind
    if kind not in _BUILDERS:
        raise CheckpointError(f"{ck.path}: no pipeline builder for checkpoint kind {kind!r}",
                              hint=f"known kinds: {', '.join(sorted(_BUILDERS))}")
    if not ck.weights.exists():
        raise CheckpointError(f"checkpoint {ck.path} vanished before it could be loaded")
    return _BUILDERS[kind](ck, cfg, run_dir)


def sample(ck: Checkpoint, plan: SamplePlan, cfg: SamplingConfig, run_dir: Path | None = None,
           items: Sequence[SampleItem] | None = None, pipeline=None) -> Samples:
    """Draw ``items`` (default: the whole plan) from checkpoint ``ck``."""
    items = list(items if items is not None else plan.items())
    pipe = pipeline if pipeline is not None else load_pipeline(ck, cfg, run_dir)
    images = draw(pipe, items, cfg, desc=f"sampling {ck.name}")
    return Samples(images, items)
