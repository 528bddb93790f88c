"""The built-in detectors, registered with :func:`memtrack.detectors.registry.register_detector` like any
plug-in: the function that runs each one on a space's evidence, its citation and its regime."""
from __future__ import annotations

import numpy as np

from memtrack.detectors.types import DetectorSpec, Provenance
from memtrack.detectors.core import SpaceEvidence, adaptive_l2, copy_score, duplicate_distance, nn_ratio, nn_ratio_dedup, tiled_l2

GU = "Gu et al. 2023, On Memorization in Diffusion Models"
CARLINI = "Carlini et al. 2023, Extracting Training Data from Diffusion Models"
SOMEPALLI = "Somepalli et al. CVPR 2023, Diffusion Art or Digital Forgery?"


def _pixel_images(ev: SpaceEvidence):
    shape = ev.image_shape
    n, k = ev.cand_ids.shape
    return ev.query.reshape(n, *shape), ev.cand_vecs.reshape(n, k, *shape)


BUILTINS: list[DetectorSpec] = []  # registered by memtrack.detectors.registry


def _declare(*args, **kwargs) -> None:
    BUILTINS.append(DetectorSpec(*args, **kwargs))


_declare("nn_ratio", "pixel",
                  lambda s, ev, cfg: nn_ratio(ev.query, ev.cand_vecs, cfg.nn_ratio, ev.cand_ids),
                  "Gu et al. 2023: d1/d2 < 1/3 on raw pixels", citation=GU, reproduction=True,
                  regime="two or more training images",
                  provenance=Provenance("published", ("nn_ratio",), GU, "d1/d2 < 1/3, the paper's threshold"),
         label="near-copies")
def _needs_lists(space: str, ev: SpaceEvidence, cfg) -> str | None:
    if ev.extra.get("train_neighbours") is None:
        return ("the index has no train->train neighbour lists (it was built by an older memtrack): rebuild it "
                "to get this detector")
    return None


def _dedup(space: str, ev: SpaceEvidence, cfg):
    rows, dist = ev.extra["train_neighbours"]
    return nn_ratio_dedup(ev.query, ev.cand_vecs, rows, dist, duplicate_distance(dist, cfg.nn_ratio), cfg.nn_ratio,
                          ev.cand_ids)


_declare("nn_ratio_dedup", "pixel", _dedup,
                  "Gu et al.'s d1/d2 < 1/3, d2 taken past the nearest image's near-duplicates (memtrack's variant)",
                  citation=GU + " (ratio and threshold); the deduplicated d2 is memtrack's", reproduction=True,
                  check=_needs_lists,
                  provenance=Provenance("memtrack", ("nn_ratio",), GU + " (the 1/3); memtrack's deduplicated d2",
                                        "Gu et al.'s 1/3 applied to memtrack's d2 past near-duplicates; the "
                                        "near-duplicate distance is calibrated on the train->train lists"),
                  regime="two or more training images that are not near-duplicates of each other; near-duplicate = "
                         "within 1/3 of the median train->train nearest-neighbour distance",
         label="near-copies of duplicated images")
# tiled_l2: tiles smaller than this are no evidence of copying. On held-out random 16-px crops (4-px tiles)
# tiled_l2's onset came at steps 100-200 while nn_ratio stayed at 0-3% and the samples were still blurry;
# Carlini et al. compare 128-px tiles of 512-px images. memtrack's own choice: 8 px (32-px images, 4x4 grid).
MIN_TILE_PX = 8


def _tiled_regime(space: str, ev: SpaceEvidence, cfg) -> str | None:
    h, w = ev.image_shape[1:]
    tile = min(h, w) // max(1, cfg.tiled_grid)
    if tile < MIN_TILE_PX:
        return (f"{cfg.tiled_grid}x{cfg.tiled_grid} tiles of a {h}x{w} image are {tile} px; tiled_l2 needs tiles of "
                f">= {MIN_TILE_PX} px (at 4 px it fires on blurry samples long before anything is memorized): index "
                f"at a resolution >= {MIN_TILE_PX * cfg.tiled_grid} px, or lower detectors.tiled_grid")
    return None


def _adaptive_regime(space: str, ev: SpaceEvidence, cfg) -> str | None:
    n = cfg.adaptive_n
    need = max(n, cfg.adaptive_min_train)
    if ev.n_rows is not None and ev.n_rows < need:
        return (f"adaptive_l2 normalises by the mean distance to the n = {n} nearest training images (Carlini et al. "
                f"2023, on CIFAR-10's 50,000); with fewer than {need:,} training images that neighbourhood is most "
                f"of the set and novel images are flagged too (detectors.adaptive_min_train); this training set "
                f"has {ev.n_rows}")
    lists = ev.extra.get("train_neighbours")
    if lists is None:
        return _needs_lists(space, ev, cfg)
    if lists[1].shape[1] < n - 1:
        return (f"the index keeps {lists[1].shape[1]} train->train neighbours per image; adaptive_n = {n} needs "
                f"{n - 1}: rebuild it with index.baseline_k >= {n - 1}")
    return None


_declare("tiled_l2", "pixel",
                  lambda s, ev, cfg: tiled_l2(*_pixel_images(ev), cfg.tiled_l2, cfg.tiled_grid, ev.cand_ids),
                  "Carlini et al. 2023: max over 4x4 tiles of RMS error <= delta", citation=CARLINI,
                  reproduction=True, check=_tiled_regime,
                  provenance=Provenance("memtrack", ("tiled_l2", "tiled_grid"), CARLINI + " (the tiled distance)",
                                        "the paper publishes no threshold for linking generations; 0.15 is "
                                        "memtrack's starting point -- compare it with the tiled train->train "
                                        "baseline (summary.json baseline.pixel_tiled)"),
                  regime=f"tiles of >= {MIN_TILE_PX} px (32-px images with the 4x4 grid); a sample matched to a nearly "
                         "uniform training image (a flat image of its mean colour within delta) is not judged",
         label="tiled near-copies")
_declare("adaptive_l2", "pixel",
                  lambda s, ev, cfg: adaptive_l2(ev.query, ev.cand_vecs, ev.extra["train_neighbours"][1],
                                                 cfg.adaptive_alpha, cfg.adaptive_n, ev.cand_ids),
                  "Carlini et al. 2023 (CIFAR-10): l2 / (alpha * mean l2 from the nearest training image to its n "
                  "nearest) <= 1", citation=CARLINI + ", Section 5.1 (CIFAR-10)", check=_adaptive_regime,
                  provenance=Provenance("published", ("adaptive_alpha", "adaptive_n"), CARLINI + ", Section 5.1",
                                        "alpha = 0.5, n = 50, flagged when <= 1, as in the paper"),
                  regime="at least detectors.adaptive_min_train (1,000) training images, so that the matched image's n = 50 "
                         "nearest are a small neighbourhood, as on CIFAR-10 in the paper",
         label="adaptive near-copies")
# ------------------------------------------------------------------------------ copy scores, per descriptor

#: fewer training images than this give no meaningful train->train quantile to calibrate a copy threshold on
MIN_CALIBRATION = 10


def copy_threshold(space: str, ev: SpaceEvidence, cfg) -> tuple[float | None, str, str]:
    """``(threshold, source, detail)`` of a feature space's copy score; threshold None: cannot be set (detail
    says why). A copy threshold belongs to its descriptor:

    1. ``detectors.copy_thresholds[space]``, then ``detectors.copy`` -- ``published`` when the value is one the
       descriptor's literature publishes (SSCD: 0.5 Somepalli et al., 0.7 Wen et al.), else ``config``;
    2. the descriptor's own published default (the embedder's ``copy_threshold``: SSCD 0.5);
    3. otherwise (CLIP, any descriptor without one) ``calibrated``: the ``detectors.copy_quantile`` quantile of
       the training images' cosine similarity to their nearest *other* training image -- a sample is a copy
       when it is closer to a training image than 99% of training images are to any other one. CLIP cosine is
       not SSCD cosine: unrelated images often exceed 0.5 in CLIP space.
    """
    published = {float(k): str(v) for k, v in (ev.extra.get("published_copy") or {}).items()}
    settings = ((cfg.copy_thresholds.get(space), f"detectors.copy_thresholds.{space}"), (cfg.copy, "detectors.copy"))
    for value, where in settings:
        if value is not None:
            cite = next((c for v, c in published.items() if abs(v - float(value)) < 1e-9), None)
            if cite:
                return float(value), "published", f"{where} = {value}: {cite}"
            return float(value), "config", f"set in the config: {where} = {value}"
    default = ev.extra.get("copy_default")
    if default is not None and float(default) in published:
        return float(default), "published", published[float(default)]
    sims = np.asarray(ev.extra.get("train_similarity", []), np.float64)
    sims = sims[np.isfinite(sims)]
    if sims.size < MIN_CALIBRATION:
        return None, "calibrated", (f"{space} has no published copy threshold and calibrating one needs the "
                                    f"train->train similarities of >= {MIN_CALIBRATION} training images (this index: "
                                    f"{sims.size}); set detectors.copy_thresholds.{space}")
    q = cfg.copy_quantile
    tau = float(np.quantile(sims, q))
    return tau, "calibrated", (f"calibrated: the {100 * q:g}th percentile of {sims.size} training images' cosine "
                               f"similarity to their nearest other training image")


def _copy_regime(space: str, ev: SpaceEvidence, cfg) -> str | None:
    value, _, detail = copy_threshold(space, ev, cfg)
    return detail if value is None else None


def _copy(space: str, ev: SpaceEvidence, cfg):
    value, source, detail = copy_threshold(space, ev, cfg)
    out = copy_score(ev.query, ev.cand_vecs, value, f"{space}_copy", ev.cand_ids)
    out.threshold_source = source
    out.info["threshold_detail"] = detail
    return out


_declare("copy", None, _copy,
                  "Somepalli et al. 2023: cosine similarity to the nearest training image >= tau, tau the "
                  "descriptor's own (published for SSCD, calibrated on train->train for CLIP)",
                  citation=SOMEPALLI, reproduction=True, check=_copy_regime,
                  regime="a copy threshold for this descriptor: published (SSCD) or calibrated on >= "
                         f"{MIN_CALIBRATION} training images",
                  provenance=Provenance("calibrated", (), SOMEPALLI,
                                        resolve=lambda s, cfg, out: None if not out.applicable else
                                        (out.threshold_source, out.info.get("threshold_detail", ""))),
         label={"pixel": "pixel copies", "sscd": "copies (SSCD descriptor)", "clip": "semantic copies", "*": "copies ({space})"})
