"""The one orchestrator: every entry point ends in :meth:`Tracker.evaluate`.

``evaluate(checkpoint)`` = sample -> embed -> search -> detect -> aggregate -> store -> log. The CLI's
``scan``, ``watch`` and ``launch``, the accelerate hook and a custom loop's :meth:`Tracker.step` all call it;
``memtrack check`` calls :meth:`Tracker.assess` (embed -> search -> detect) on images from anywhere.

Example:
    >>> tracker = Tracker.from_config("configs/unconditional.yaml", index="ref/", run_dir="runs/ddpm")
    >>> for ck in discover("runs/ddpm"):
    ...     result = tracker.evaluate(ck)
    >>> result.metrics["nn_ratio"]["rate"]
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from memtrack.sampling.checkpoints import Checkpoint
from memtrack.config import Config, load_config
from memtrack.detectors.registry import run_detectors
from memtrack.detectors.types import DetectorOutput, SpaceEvidence
from memtrack.embedders.registry import Embedder, get_embedder
from memtrack.errors import CheckpointError, ConfigError
from memtrack.identity.space import face_evidence  # also registers the identity detectors
from memtrack.index.reference import ReferenceIndex
from memtrack.detectors.metrics import aggregate, per_sample_rows
from memtrack.scan.eval_identity import eval_key, series_identity, series_key, source_of
from memtrack.sampling.unconditional import SamplePlan, Samples, scheduler_identity, used_scheduler
from memtrack.sampling.registry import load_pipeline, planned_scheduler, sample
from memtrack.sampling.text_to_image import live_checkpoint, pipeline_for_models, prompts_for
from memtrack.store.run_store import RunStore
from memtrack.scan.probes import make_loss_gap_probe, run_probes
from memtrack.utils import atomic_write_bytes, get_logger

logger = get_logger(__name__)

THUMB_SIZE = 128


@dataclass
class EvalResult:
    """What one checkpoint evaluation produced (also what the store holds)."""

    step: int
    checkpoint: str
    metrics: dict = field(default_factory=dict)
    top_matches: list = field(default_factory=list)
    distinct_train_images: int = 0
    n_samples: int = 0
    duration_s: float = 0.0
    skipped: bool = False
    cached: bool = False
    reason: str | None = None
    probes: dict = field(default_factory=dict)
    series: str | None = None
    eval_key: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Tracker:
    """Evaluates checkpoints against a reference index and stores the results.

    Args:
        index: the opened :class:`~memtrack.index.reference.ReferenceIndex`.
        embedders: one embedder per index space to use (fingerprints are checked against the index).
        config: the :class:`~memtrack.config.Config`.
        store: the run's :class:`~memtrack.store.run_store.RunStore` (None: results are returned, not stored).
        run_dir: the training run's output dir (for its saved scheduler and the final pipeline).
        accelerator: an ``accelerate.Accelerator``; with several processes each samples its share.
        prompts: prompts for text-to-image sampling (None for unconditional models).
    """

    def __init__(self, index: ReferenceIndex, embedders: Sequence[Embedder], config: Config | None = None,
                 store: RunStore | None = None, run_dir: str | Path | None = None, accelerator: Any = None,
                 prompts: Sequence[str] | None = None):
        self.index = index
        self.embedders = list(embedders)
        self.config = config or Config()
        self.store = store
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.accelerator = accelerator
        for emb in self.embedders:
            index.check_embedder(emb)
        self.plan = SamplePlan.from_config(self.config.sampling, prompts)
        self._warn_untuned_k()
        self._loss_gap_probe = make_loss_gap_probe(self.config, index) if _is_main(accelerator) else None
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: str | Path | Config | None = None, *, index: str | Path | ReferenceIndex,
                    run_dir: str | Path | None = None, accelerator: Any = None, store: bool = True,
                    store_dir: str | Path | None = None, overrides: dict | None = None,
                    prompts: Sequence[str] | None = None) -> "Tracker":
        """Build a tracker from a config file (or object) and an index folder.

        The embedders are those the index was built with (their options come from the index manifest, so
        a scan cannot silently use another embedder); a config that lists embedders must match them.
        Text-to-image plans (``sampling.pretrained_model`` set) take their prompts from
        ``sampling.prompts`` unless ``prompts`` is given (:func:`~memtrack.sampling.text_to_image.resolve_prompts`).
        """
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        ref = index if isinstance(index, ReferenceIndex) else ReferenceIndex.open(index)
        if prompts is None:
            prompts = prompts_for(cfg.sampling, ref)
        embedders = embedders_for(ref, cfg)
        rs = None
        if store and run_dir is not None and _is_main(accelerator):
            rs = RunStore.open(run_dir, folder=store_dir)
            rs.set_meta("config", cfg.to_dict())
            rs.set_meta("index", {"path": str(Path(ref.path).resolve()), "fingerprint": ref.fingerprint,
                                  "n_train": ref.n_train, "content_hash": ref.content_hash})
        return cls(ref, embedders, cfg, rs, run_dir, accelerator, prompts)

    # ---------------------------------------------------------------------------------- evaluation
    def series_identity(self, ck: Checkpoint, scheduler: dict | None = None) -> dict:
        """What evaluating ``ck`` depends on apart from its weights (:mod:`memtrack.scan.eval_identity`).

        ``scheduler``: the identity of the scheduler that will sample (default: the one ``ck``'s pipeline
        builder plans, read from config files -- no model is loaded, so the store is asked first).
        """
        if scheduler is None:
            scheduler = scheduler_identity(planned_scheduler(ck, self.config.sampling, self.run_dir))
        return series_identity(self.config, self.index, self.plan, scheduler, [e.name for e in self.embedders],
                               source_of(ck))

    def eval_key(self, ck: Checkpoint, series: str | None = None) -> str:
        """What makes two evaluations of a checkpoint the same: its weights and its series key."""
        return eval_key(series or series_key(self.series_identity(ck)), ck)

    def evaluate(self, ck: Checkpoint, *, force: bool = False, pipeline=None) -> EvalResult:
        """Evaluate one checkpoint (answered from the store when evaluated before under the same key).

        ``pipeline``: sample with this pipeline instead of rebuilding one from ``ck`` (its scheduler is then
        the one in the key).
        """
        ident = self.series_identity(ck, used_scheduler(pipeline))
        series = series_key(ident)
        key = eval_key(series, ck)
        if not force:
            done = self._agree(self.store.find(ck.name, key) if self.store is not None else None)
            if done is not None:
                logger.info("%s already evaluated (key %s); skipping", ck.name, key)
                metrics = self.store.metrics(done.id) if self.store is not None else {}  # other processes: none
                return EvalResult(ck.step, ck.name, metrics, n_samples=done.n_samples, cached=True,
                                  skipped=done.status == "skipped", reason=done.reason, series=series, eval_key=key)
        t0 = time.perf_counter()
        # 1. sample (each process its share of the seed plan; gathered in global-index order)
        try:
            samples, pipe = self._sample(ck, pipeline)
        except CheckpointError as exc:
            return self._skip(ck, key, exc.message, series, ident)
        if not _is_main(self.accelerator):
            return EvalResult(ck.step, ck.name, n_samples=len(samples.images), skipped=True,
                              reason="not the main process")
        # 1b. the verdict is stored under the scheduler that sampled, should a builder not do what it planned
        ident, series, key = self._identity_used(ck, pipe, ident, series, key)
        timings = {"sampling": time.perf_counter() - t0}
        # 2-4. embed, search, detect
        outputs = self.assess(samples.images, timings=timings)
        # 5. aggregate
        agg = aggregate(outputs, self.index.train_ids, seeds=samples.seeds)
        # 5b. the sampling-free probes (loss gap, noise magnitude) on the same weights
        t_probe = time.perf_counter()
        probes = run_probes(pipe, self.config, self._loss_gap_probe,
                            [it.prompt for it in samples.items if it.prompt is not None])
        if probes:
            timings["probes"] = time.perf_counter() - t_probe
        result = EvalResult(ck.step, ck.name, agg["metrics"], agg["top_matches"], agg["distinct_train_images"],
                            len(samples.images), time.perf_counter() - t0, probes=probes, series=series, eval_key=key)
        # 6. store (thumbnails first, then one transaction)
        if self.store is not None:
            rows = self._sample_rows(samples, outputs, ck, key)
            info = {"checkpoint": ck.to_dict(), "top_matches": agg["top_matches"],
                    "distinct_train_images": agg["distinct_train_images"],
                    "thresholds": thresholds_block(outputs, self.config),
                    "timings": {k: round(v, 3) for k, v in timings.items()}, **probes}
            self.store.record(step=ck.step, checkpoint=ck.name, weights=ck.weights_name, eval_key=key,
                              metrics=agg["metrics"], samples=rows, info=info, duration_s=result.duration_s,
                              series=series, series_identity=ident)
        # 7. log next to the training loss
        self._log(result)
        return result

    def assess(self, images: Sequence[Image.Image], timings: dict | None = None) -> list[DetectorOutput]:
        """Embed ``images`` in every space, fetch their top-k training candidates, run the detectors.

        ``timings``, when given, receives the seconds each space took (embed + search) and the detectors'.
        """
        timings = {} if timings is None else timings
        evidence: dict[str, SpaceEvidence] = {}
        for emb in self.embedders:
            t0 = time.perf_counter()
            space = self.index.spaces[emb.name]
            if emb.identities:  # several faces per image, compared by identity
                evidence[emb.name] = face_evidence(self.index, emb, images, self.config)
            else:
                query = np.asarray(emb.embed(list(images)), dtype=np.float32)
                # k training images may have several vectors each (views): ask for k * views vectors
                _, ids = self.index.search(emb.name, query, self._k(emb.name) * space.views)
                shape = emb.pixel_shape
                extra = {"train_neighbours": self.index.train_neighbours(emb.name)} if shape else \
                    self._feature_extra(emb)
                evidence[emb.name] = SpaceEvidence(space.metric, query, self.index.record_rows(emb.name, ids),
                                                   self.index.candidates(emb.name, ids), shape, extra,
                                                   n_rows=space.n_rows)
            timings[emb.name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs = run_detectors(evidence, self.config.detectors)
        timings["detectors"] = time.perf_counter() - t0
        return outputs

    def step(self, global_step: int, *, unet=None, text_encoder=None, pipeline=None,
             force: bool = False) -> EvalResult | None:
        """Evaluate the live model of a custom training loop every ``tracking.every_n_steps`` steps.

        Call it on every process (with several, each samples its share of the plan; the main process
        stores and logs). Returns None between evaluations. The model is sampled where it is, in eval
        mode, and put back in the mode it was in.

        Example:
            >>> tracker = Tracker.from_config("configs/unconditional.yaml", index="ref/", run_dir=out,
            ...                               accelerator=accelerator)
            >>> tracker.step(global_step, unet=accelerator.unwrap_model(unet))
        """
        if not force and (global_step % self.config.tracking.every_n_steps or global_step == self._last_step):
            return None
        if unet is None and pipeline is None:
            raise ConfigError("Tracker.step needs the model: pass unet= (or pipeline=)")
        self._last_step = global_step
        model = unet if unet is not None else pipeline.unet
        if text_encoder is None and pipeline is not None:
            text_encoder = getattr(pipeline, "text_encoder", None)
        was_training = model.training
        model.eval()
        try:
            pipe = pipeline or pipeline_for_models(self.config.sampling, self.run_dir, unet, text_encoder)
            # keyed by the weights' content: a restarted or retrained run is never answered from the store
            ck = live_checkpoint(global_step, self.run_dir, model, text_encoder)
            return self.evaluate(ck, pipeline=pipe, force=force)
        finally:
            model.train(was_training)

    def _identity_used(self, ck: Checkpoint, pipe, ident: dict, series: str, key: str) -> tuple[dict, str, str]:
        """``(identity, series key, eval key)`` of the scheduler ``pipe`` really holds (the planned ones when
        they agree, which they do for every built-in builder; a plug-in's may not)."""
        used = used_scheduler(pipe)
        if used is None or used == ident["scheduler"]:
            return ident, series, key
        logger.warning("%s was sampled with a %s other than the scheduler planned (%s); its verdict is stored under "
                       "the one used", ck.name, used["class"], ident["scheduler"].get("class"))
        ident = self.series_identity(ck, used)
        return ident, series_key(ident), eval_key(series_key(ident), ck)

    def skip(self, ck: Checkpoint, reason: str) -> EvalResult:
        """Record ``ck`` as skipped (vanished, half-written, unknown layout) so it is never retried."""
        ident = self.series_identity(ck)
        return self._skip(ck, eval_key(series_key(ident), ck), reason, series_key(ident), ident)

    def _agree(self, value):
        """The main process's ``value`` on every process (decisions that select collective work)."""
        acc = self.accelerator
        if acc is None or getattr(acc, "num_processes", 1) <= 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _feature_extra(self, emb: Embedder) -> dict:
        """What a feature space's copy score needs: the descriptor's published thresholds, if any, and the
        train->train similarities to calibrate one on."""
        cache = self.__dict__.setdefault("_feature_extras", {})
        if emb.name not in cache:
            try:
                sims = self.index.baseline_values(emb.name)
            except OSError:
                sims = np.zeros(0)
            cache[emb.name] = {"train_similarity": sims,
                               "published_copy": getattr(emb, "published_copy_thresholds", None),
                               "copy_default": getattr(emb, "copy_threshold", None)}
        return cache[emb.name]

    def _warn_untuned_k(self) -> None:
        """An approximate index was tuned for one k; searching another leaves its recall unmeasured."""
        for emb in self.embedders:
            info = self.index.spaces[emb.name].info
            tuned = (info.get("recall") or {}).get("k")
            if info.get("index_kind", "flat") != "flat" and tuned and not emb.identities \
                    and tuned != self._k(emb.name):
                logger.warning("the %s index was tuned for k = %d candidates, this scan asks for %d: its recall at "
                               "this k was not measured (rebuild the index with index.k = %d)", emb.name, tuned,
                               self._k(emb.name), self._k(emb.name))

    def _k(self, space: str) -> int:
        """Training images (not vectors) to fetch per sample in ``space``."""
        k = max(self.config.index.k, 2)  # the k the index was tuned for; nn_ratio needs 2 images
        return max(1, min(k, self.index.spaces[space].n_rows))

    def _sample(self, ck: Checkpoint, pipeline) -> tuple[Samples, object]:
        """The plan's samples (gathered from every process) and this process's pipeline."""
        acc = self.accelerator
        if acc is None or getattr(acc, "num_processes", 1) <= 1:
            pipe = pipeline if pipeline is not None else load_pipeline(ck, self.config.sampling, self.run_dir)
            return sample(ck, self.plan, self.config.sampling, self.run_dir, pipeline=pipe), pipe
        from accelerate.utils import gather_object

        # Every process reaches the one gather, even when its share failed to load: a process that
        # raised instead would leave the others waiting in the collective.
        mine = self.plan.shard(acc.process_index, acc.num_processes)
        pipe = pipeline
        try:
            if pipe is None:
                pipe = load_pipeline(ck, self.config.sampling, self.run_dir)
            local = sample(ck, self.plan, self.config.sampling, self.run_dir, items=mine, pipeline=pipe)
            share = ("ok", [np.asarray(im, dtype=np.uint8) for im in local.images])
        except CheckpointError as exc:
            share = ("error", exc.message)
        shares = gather_object([share])
        errors = [msg for status, msg in shares if status == "error"]
        if errors:
            raise CheckpointError(errors[0])
        arrays = [a for _, part in shares for a in part]
        return Samples([Image.fromarray(a) for a in arrays], self.plan.items()), pipe

    def _skip(self, ck: Checkpoint, key: str, reason: str, series: str, ident: dict) -> EvalResult:
        logger.warning("skipping %s: %s", ck.name, reason)
        if self.store is not None:
            self.store.record_skip(step=ck.step, checkpoint=ck.name, eval_key=key, reason=reason, series=series,
                                   series_identity=ident)
        return EvalResult(ck.step, ck.name, skipped=True, reason=reason, series=series, eval_key=key)

    def _sample_rows(self, samples: Samples, outputs: list[DetectorOutput], ck: Checkpoint, key: str) -> list[dict]:
        thumbs = self.store.thumb_dir(key, ck.name)
        rows = per_sample_rows(outputs)
        out = []
        for i, (im, item, sha) in enumerate(zip(samples.images, samples.items, samples.hashes())):
            path = thumbs / f"{item.index:05d}.png"
            atomic_write_bytes(path, png_bytes(im, THUMB_SIZE))
            row = rows[i] if rows else {"scores": {}, "flags": {}, "matches": {}}
            out.append({"sample": item.index, "seed": item.seed, "prompt": item.prompt, "sha256": sha,
                        "thumb": str(path.relative_to(self.store.folder)), **row})
        return out

    def _log(self, result: EvalResult) -> None:
        acc = self.accelerator
        if acc is None or not getattr(acc, "trackers", None):
            return
        values = {f"memtrack/{name}": m["rate"] for name, m in result.metrics.items() if "rate" in m}
        values["memtrack/distinct_train_images"] = result.distinct_train_images
        acc.log(values, step=result.step)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def embedders_for(ref: ReferenceIndex, cfg: Config) -> list[Embedder]:
    """The embedders to scan with: the index's own, rebuilt from the options stored in its manifest.

    When the config names embedders explicitly (not the default), each must match the index's
    fingerprint for that space -- a scan with another embedder is refused, naming the difference.
    """
    if cfg.index.embedders == Config().index.embedders:
        return [get_embedder({"name": name, **space.info.get("options", {})}) for name, space in ref.spaces.items()]
    chosen = []
    for spec in cfg.index.embedders:
        emb = get_embedder(spec)
        ref.check_embedder(emb)
        chosen.append(emb)
    return chosen


def thresholds_block(outputs: Sequence[DetectorOutput], config: Config) -> dict:
    """The ``thresholds`` block of summary.json: per detector its value, direction, source (``published`` /
    ``calibrated`` / ``config`` / ``memtrack``), citation, regime and whether it applied (with the reason)."""
    from memtrack.detectors.registry import threshold_info

    return {o.name: threshold_info(o) for o in outputs}


def png_bytes(image: Image.Image, max_side: int | None = None) -> bytes:
    im = image.convert("RGB")
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or bool(getattr(accelerator, "is_main_process", True))
