"""What an evaluation is computed from, and the keys that name it.

A stored verdict is reused only for an evaluation with the same inputs, and a report draws only
evaluations of one series on one curve. Two keys make that so:

* the **series key** hashes everything except the checkpoint's weights (:func:`series_identity`): the
  sampling config and plan (seeds, prompts), the scheduler actually used (class and resolved settings:
  the run's ``scheduler/`` folder, the config's fallback, or the base pipeline's), the detector config, the
  spaces searched and the reference index's content hash (records, vectors, search settings; see
  :mod:`memtrack.index.content_hash`), the probes' settings, whether the weights are saved checkpoints or live
  in-memory states, and :data:`EVALUATION_VERSION`;
* the **evaluation key** of one checkpoint hashes its series key and its weights (the fingerprint of its
  files, or the content hash of a live model's state dict).

Live states (``Tracker.step``'s ``step-N``) and saved checkpoints (``checkpoint-N``, ``final``) are
different series: at one step they can hold different weights (the raw model and its EMA, say), and one
curve holds one state per step.

Example:
    >>> ident = series_identity(cfg, index, plan, scheduler_identity(sched), ["pixel"], "saved")
    >>> key = eval_key(series_key(ident), ck)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from memtrack.sampling.checkpoints import Checkpoint
from memtrack.config import Config
from memtrack.utils import stable_hash

#: Bump when a change to sampling, embedding or the detectors changes verdicts for unchanged inputs:
#: every stored evaluation then belongs to an older series and checkpoints are evaluated again.
EVALUATION_VERSION = 1
#: Sampling fields that do not change the samples (seeds are identities, whatever the batch or device).
_NOT_SAMPLING = ("device", "batch_size")
_PROBE_PREFIXES = ("loss_gap", "noise_magnitude", "heldout")


def series_identity(config: Config, index, plan, scheduler: dict, spaces: Sequence[str], source: str) -> dict:
    """Everything an evaluation depends on except the weights (what the series key hashes).

    Args:
        config: the evaluation's config.
        index: the :class:`~memtrack.index.reference.ReferenceIndex` searched (its ``content_hash``).
        plan: the :class:`~memtrack.sampling.unconditional.SamplePlan` drawn.
        scheduler: :func:`memtrack.sampling.unconditional.scheduler_identity` of the scheduler that samples.
        spaces: the index spaces searched.
        source: ``saved`` (checkpoint folders) or ``live`` (``Tracker.step``'s in-memory models).
    """
    cfg = config.to_dict()
    return {
        "version": EVALUATION_VERSION, "source": source,
        "sampling": {k: v for k, v in cfg["sampling"].items() if k not in _NOT_SAMPLING},
        "plan": {"key": plan.key(), "n_samples": len(plan.items())},
        "scheduler": scheduler,
        "detectors": cfg["detectors"], "index_k": cfg["index"]["k"],
        "index": {"content_hash": index.content_hash, "spaces": sorted(spaces)},
        "probes": {k: v for k, v in cfg["dynamics"].items() if k.startswith(_PROBE_PREFIXES)},
    }


def series_key(identity: dict) -> str:
    return stable_hash(identity)


def eval_key(series: str, ck: Checkpoint) -> str:
    """One checkpoint's evaluation key: its series and its weights."""
    return stable_hash({"series": series, "weights": ck.fingerprint(), "weights_name": ck.weights_name})


def source_of(ck: Checkpoint) -> str:
    return "live" if ck.live else "saved"


def space_names(index, config: Config) -> list[str]:
    """The spaces a scan searches: the index's own, or those the config names (see ``embedders_for``)."""
    if config.index.embedders == Config().index.embedders:
        return list(index.spaces)
    return [spec.name for spec in config.index.embedders]


def checkpoint_from_info(info: dict) -> Checkpoint | None:
    """The :class:`Checkpoint` an evaluation recorded (its ``info["checkpoint"]``), or None."""
    d = info.get("checkpoint") if isinstance(info, dict) else None
    try:
        return Checkpoint(int(d["step"]), Path(d["path"]), str(d["name"]), d["kind"], Path(d["weights"]),
                          str(d["weights_name"]), complete=True, content=d.get("content"))
    except (KeyError, TypeError, ValueError):
        return None


def config_series(config: Config, index, run_dir: str | Path | None, checkpoints: Iterable[Checkpoint]) -> dict:
    """``{series key: identity}`` that evaluating ``checkpoints`` with ``config`` against ``index`` gives now.

    The scheduler of each is the one its pipeline builder plans (from config files, no weights), so a
    report can find the series a config produces without sampling anything.
    """
    from memtrack.sampling.unconditional import SamplePlan, scheduler_identity
    from memtrack.sampling.registry import planned_scheduler
    from memtrack.sampling.text_to_image import prompts_for

    plan = SamplePlan.from_config(config.sampling, prompts_for(config.sampling, index))
    spaces = space_names(index, config)
    run = Path(run_dir) if run_dir is not None else None
    out: dict[str, dict] = {}
    seen: set = set()
    for ck in checkpoints:
        which = (ck.kind, ck.live, str(ck.path))
        if which in seen:
            continue
        seen.add(which)
        sched = scheduler_identity(planned_scheduler(ck, config.sampling, run))
        ident = series_identity(config, index, plan, sched, spaces, source_of(ck))
        out[series_key(ident)] = ident
    return out
