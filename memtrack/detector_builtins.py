"""The built-in detectors, registered with :func:`memtrack.detector_registry.register_detector` like any
plug-in: the function that runs each one on a space's evidence, its citation and its regime."""
from __future__ import annotations

from .detector_registry import register_detector
from .detectors import SpaceEvidence, adaptive_l2, copy_score, duplicate_distance, nn_ratio, nn_ratio_dedup, tiled_l2

GU = "Gu et al. 2023, On Memorization in Diffusion Models"
CARLINI = "Carlini et al. 2023, Extracting Training Data from Diffusion Models"
SOMEPALLI = "Somepalli et al. CVPR 2023, Diffusion Art or Digital Forgery?"


def _pixel_images(ev: SpaceEvidence):
    shape = ev.image_shape
    n, k = ev.cand_ids.shape
    return ev.query.reshape(n, *shape), ev.cand_vecs.reshape(n, k, *shape)


register_detector("nn_ratio", "pixel",
                  lambda s, ev, cfg: nn_ratio(ev.query, ev.cand_vecs, cfg.nn_ratio, ev.cand_ids),
                  "Gu et al. 2023: d1/d2 < 1/3 on raw pixels", citation=GU, reproduction=True,
                  regime="two or more training images")
def _needs_lists(space: str, ev: SpaceEvidence, cfg) -> str | None:
    if ev.extra.get("train_neighbours") is None:
        return ("the index has no train->train neighbour lists (it was built by an older memtrack): rebuild it "
                "to get this detector")
    return None


def _dedup(space: str, ev: SpaceEvidence, cfg):
    rows, dist = ev.extra["train_neighbours"]
    return nn_ratio_dedup(ev.query, ev.cand_vecs, rows, dist, duplicate_distance(dist, cfg.nn_ratio), cfg.nn_ratio,
                          ev.cand_ids)


register_detector("nn_ratio_dedup", "pixel", _dedup,
                  "Gu et al.'s d1/d2 < 1/3, d2 taken past the nearest image's near-duplicates (memtrack's variant)",
                  citation=GU + " (ratio and threshold); the deduplicated d2 is memtrack's", reproduction=True,
                  check=_needs_lists,
                  regime="two or more training images that are not near-duplicates of each other; near-duplicate = "
                         "within 1/3 of the median train->train nearest-neighbour distance")
register_detector("tiled_l2", "pixel",
                  lambda s, ev, cfg: tiled_l2(*_pixel_images(ev), cfg.tiled_l2, cfg.tiled_grid, ev.cand_ids),
                  "Carlini et al. 2023: max over 4x4 tiles of RMS error <= delta", citation=CARLINI,
                  reproduction=True)
register_detector("adaptive_l2", "pixel",
                  lambda s, ev, cfg: adaptive_l2(ev.query, ev.cand_vecs, cfg.adaptive_alpha, cfg.adaptive_n,
                                                 ev.cand_ids),
                  "Carlini et al. 2023 (CIFAR-10): l2 / (alpha * mean l2 to the n nearest) <= 1",
                  citation=CARLINI + " (CIFAR-10 section)")
register_detector("copy", None,
                  lambda s, ev, cfg: copy_score(ev.query, ev.cand_vecs, cfg.copy, f"{s}_copy", ev.cand_ids),
                  "Somepalli et al. 2023: cosine similarity to the nearest training image >= tau",
                  citation=SOMEPALLI, reproduction=True)
