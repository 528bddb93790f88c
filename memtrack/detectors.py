"""The published memorization tests, as pure functions on arrays.

Nothing here loads a model or touches a file. Each test takes the generated samples' vectors and the
*candidate* training vectors that the index proposed (``[n, k, ...]``), recomputes the distances exactly in
float64 on those candidates, and returns a :class:`DetectorOutput` with one score and one verdict per
sample. Distances are computed as explicit differences, never through the ``|a|^2 + |b|^2 - 2ab``
expansion (what ``torch.cdist`` uses for large inputs), so an exact copy is at distance exactly 0.

The registry (:func:`register_detector`) lets the tracker run every detector whose embedding space the
index has; built-ins register through the same function.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

_CHUNK = 16  # samples per block when materialising [chunk, k, D] differences


@dataclass
class DetectorOutput:
    """Per-sample result of one detector.

    Attributes:
        name: metric name (``nn_ratio``, ``tiled_l2``, ``clip_copy``, ...).
        score: ``[n]`` the detector's statistic.
        flagged: ``[n]`` verdicts.
        match: ``[n]`` the training row each sample was matched to (-1 for none).
        threshold: the threshold applied; ``direction`` says whether low or high scores are flagged.
        extra: further ``[n]`` arrays (e.g. d1 and d2).
    """

    name: str
    score: np.ndarray
    flagged: np.ndarray
    match: np.ndarray
    threshold: float
    direction: Literal["below", "above"]
    extra: dict = field(default_factory=dict)
    threshold_source: str = "default"

    def to_dict(self) -> dict:
        return {"name": self.name, "score": self.score.tolist(), "flagged": self.flagged.tolist(),
                "match": self.match.tolist(), "threshold": self.threshold, "direction": self.direction,
                "extra": {k: np.asarray(v).tolist() for k, v in self.extra.items()},
                "threshold_source": self.threshold_source}


def _as_candidates(query: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(query)
    c = np.asarray(candidates)
    if c.ndim != q.ndim + 1 or c.shape[0] != q.shape[0] or c.shape[2:] != q.shape[1:]:
        raise ValueError(f"candidates must be [n, k, *query.shape[1:]]; got query {q.shape}, candidates {c.shape}")
    return q, c


def exact_rms_distances(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """RMS distance ``||x - y||_2 / sqrt(D)`` from each query to each of its candidates: ``[n, k]`` float64.

    Computed as explicit differences in float64, so identical vectors give exactly 0.
    """
    q, c = _as_candidates(query, candidates)
    n, k = c.shape[:2]
    out = np.empty((n, k), dtype=np.float64)
    dim = int(np.prod(q.shape[1:])) if q.ndim > 1 else 1
    for s in range(0, n, _CHUNK):
        diff = c[s:s + _CHUNK].astype(np.float64) - q[s:s + _CHUNK, None].astype(np.float64)
        out[s:s + _CHUNK] = np.sqrt((diff.reshape(diff.shape[0], k, -1) ** 2).sum(-1) / dim)
    return out


def nn_ratio(query: np.ndarray, candidates: np.ndarray, threshold: float = 1 / 3,
             candidate_ids: np.ndarray | None = None) -> DetectorOutput:
    """Nearest-neighbour distance ratio (Gu et al. 2023, "On Memorization in Diffusion Models").

    A generated image x is memorized when ``d1 / d2 < 1/3``, where d1 and d2 are the distances from x to
    its nearest and second-nearest training images, ``d = ||x - y||_2 / sqrt(C*H*W)`` on raw pixels (Gu et
    al.'s ``mem_ratio.py`` uses uint8 values; memtrack uses [0, 1] values -- the ratio is scale-free, d1
    is reported in [0, 1] units).

    When the nearest training image is duplicated, an exact copy has ``d1 = d2 = 0``; the ratio is then
    defined as 0 (memorized), not NaN.

    Args:
        query: ``[n, D]`` pixel vectors of the samples, values in [0, 1].
        candidates: ``[n, k, D]`` pixel vectors of each sample's k >= 2 nearest training images.
        threshold: flagged when ``d1 / d2 < threshold`` (default 1/3).
        candidate_ids: ``[n, k]`` training rows of the candidates (``match`` reports them).
    """
    d = exact_rms_distances(query, candidates)
    if d.shape[1] < 2:
        raise ValueError("nn_ratio needs at least 2 candidates per sample (and 2 training images)")
    order = np.argsort(d, axis=1, kind="stable")
    d1 = np.take_along_axis(d, order[:, :1], 1)[:, 0]
    d2 = np.take_along_axis(d, order[:, 1:2], 1)[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 0.0)
    match = order[:, 0] if candidate_ids is None else np.take_along_axis(candidate_ids, order[:, :1], 1)[:, 0]
    return DetectorOutput("nn_ratio", ratio, ratio < threshold, match.astype(np.int64), float(threshold),
                          "below", {"d1": d1, "d2": d2})


def _tile_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def tiled_distances(query: np.ndarray, candidates: np.ndarray, grid: int = 4) -> np.ndarray:
    """Carlini et al.'s tiled distance to every candidate: ``[n, k]`` max over tiles of per-tile RMS."""
    q, c = _as_candidates(query, candidates)
    if q.ndim != 4:
        raise ValueError(f"tiled_l2 needs images [n, C, H, W]; got {q.shape}")
    h, w = q.shape[2:]
    if grid > min(h, w):
        raise ValueError(f"tiled_l2 grid {grid} is larger than the image ({h}x{w})")
    n, k = c.shape[:2]
    out = np.zeros((n, k), dtype=np.float64)
    for s in range(0, n, _CHUNK):
        diff2 = (c[s:s + _CHUNK].astype(np.float64) - q[s:s + _CHUNK, None].astype(np.float64)) ** 2
        for y0, y1 in _tile_bounds(h, grid):
            for x0, x1 in _tile_bounds(w, grid):
                tile = np.sqrt(diff2[..., y0:y1, x0:x1].mean(axis=(-3, -2, -1)))
                np.maximum(out[s:s + _CHUNK], tile, out=out[s:s + _CHUNK])
    return out


def tiled_l2(query: np.ndarray, candidates: np.ndarray, threshold: float = 0.15, grid: int = 4,
             candidate_ids: np.ndarray | None = None) -> DetectorOutput:
    """Tiled L2 distance (Carlini et al. 2023, "Extracting Training Data from Diffusion Models").

    Both images are split into a ``grid x grid`` (default 4x4) grid of non-overlapping tiles; the distance
    is the *maximum* over tiles of the per-tile RMS pixel error (pixels in [0, 1]), so one differing tile
    is enough to reject a match. A sample is a near-copy when its smallest tiled distance over the
    candidates is ``<= threshold``. The paper does not publish the threshold it used to link generations;
    memtrack's default 0.15 is a starting point to calibrate (see the report's train->train baseline).

    Args:
        query: ``[n, C, H, W]`` samples in [0, 1].
        candidates: ``[n, k, C, H, W]`` candidate training images in [0, 1].
    """
    d = tiled_distances(query, candidates, grid)
    best = np.argmin(d, axis=1)
    score = d[np.arange(d.shape[0]), best]
    match = best if candidate_ids is None else candidate_ids[np.arange(len(best)), best]
    return DetectorOutput("tiled_l2", score, score <= threshold, match.astype(np.int64), float(threshold), "below")


def adaptive_l2(query: np.ndarray, candidates: np.ndarray, alpha: float = 0.5, n_neighbours: int = 50,
                candidate_ids: np.ndarray | None = None) -> DetectorOutput:
    """Adaptive (reference-normalised) distance (Carlini et al. 2023, CIFAR-10 section).

    ``l(x_hat, x; S) = l2(x_hat, x) / (alpha * mean_{y in S} l2(x_hat, y))`` where x is the nearest training
    image and S the ``n`` nearest training images of the generated image x_hat. Flagged when ``<= 1``:
    the nearest image is much closer than the typical close neighbour. Defaults alpha = 0.5, n = 50; when
    fewer than ``n`` candidates are available (small training sets), all candidates are used.

    ``candidates`` must hold the exact nearest neighbours (the index searches with ``k >= n``).
    """
    d = exact_rms_distances(query, candidates)
    order = np.argsort(d, axis=1, kind="stable")
    ds = np.take_along_axis(d, order, 1)
    n = min(n_neighbours, ds.shape[1])
    mean_n = ds[:, :n].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(mean_n > 0, ds[:, 0] / (alpha * np.where(mean_n > 0, mean_n, 1.0)), 0.0)
    match = order[:, 0] if candidate_ids is None else np.take_along_axis(candidate_ids, order[:, :1], 1)[:, 0]
    return DetectorOutput("adaptive_l2", score, score <= 1.0, match.astype(np.int64), 1.0, "below",
                          {"alpha": np.full(len(score), alpha), "n": np.full(len(score), n)})


def copy_score(query: np.ndarray, candidates: np.ndarray, threshold: float = 0.5, name: str = "copy",
               candidate_ids: np.ndarray | None = None) -> DetectorOutput:
    """Embedding copy score (Somepalli et al., CVPR 2023, "Diffusion Art or Digital Forgery?").

    The cosine similarity of L2-normalised features between a generated image and its most similar
    training image; a copy when ``>= threshold`` (SSCD: 0.5 is the paper's loose threshold, > 0.75 about
    90% precision on DISC). The vectors are re-normalised here, so cosine is exact even if the index is
    approximate. Report the distribution beside the train->train baseline (:func:`train_baseline`).
    """
    q, c = _as_candidates(query, candidates)
    qn = q.astype(np.float64) / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    cn = c.astype(np.float64) / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
    sims = np.einsum("nd,nkd->nk", qn, cn)
    best = np.argmax(sims, axis=1)
    score = sims[np.arange(len(best)), best]
    match = best if candidate_ids is None else candidate_ids[np.arange(len(best)), best]
    return DetectorOutput(name, score, score >= threshold, match.astype(np.int64), float(threshold), "above")


def summarise(values: np.ndarray) -> dict:
    """Mean and percentiles (50/75/90/95/99) of a score distribution; empty input gives NaNs."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": float("nan"), **{f"p{p}": float("nan") for p in (50, 75, 90, 95, 99)}}
    return {"n": int(v.size), "mean": float(v.mean()),
            **{f"p{p}": float(np.percentile(v, p)) for p in (50, 75, 90, 95, 99)}}


# ------------------------------------------------------------------------------------------ registry


@dataclass
class SpaceEvidence:
    """What the index returned for one embedding space: queries and their k candidates."""

    metric: str
    query: np.ndarray          # [n, d]
    cand_ids: np.ndarray       # [n, k] training rows
    cand_vecs: np.ndarray      # [n, k, d]
    image_shape: tuple | None = None  # (C, H, W) for pixel spaces
    extra: dict = field(default_factory=dict)  # space-specific inputs (identities, thresholds, ...)


@dataclass
class DetectorSpec:
    name: str
    space: str | None            # the embedder space it needs; None = any feature space (one per space)
    fn: Callable[[str, SpaceEvidence, object], DetectorOutput]
    description: str = ""


_DETECTORS: dict[str, DetectorSpec] = {}


def register_detector(name: str, space: str | None, fn: Callable, description: str = "",
                      overwrite: bool = False) -> None:
    """Register a detector ``fn(space_name, evidence, detectors_config) -> DetectorOutput``.

    ``space`` names the embedding space it needs (``"pixel"``), or None to run once on every cosine
    (feature) space, producing ``<space>_<name>`` metrics.
    """
    if not re.match(r"^[a-z][a-z0-9_]{0,47}$", name):
        raise ValueError(f"detector name {name!r} must be a lowercase identifier")
    if name in _DETECTORS and not overwrite:
        raise ValueError(f"a detector named {name!r} is already registered")
    _DETECTORS[name] = DetectorSpec(name, space, fn, description)


def _load_builtins() -> None:
    from . import identity_index  # noqa: F401  (registers identity_leak, identity_interpolation)


def list_detectors() -> list[str]:
    _load_builtins()
    return sorted(_DETECTORS)


def run_detectors(evidence: dict[str, SpaceEvidence], cfg) -> list[DetectorOutput]:
    """Run every registered detector whose space is present; returns one output per metric."""
    _load_builtins()
    outputs = []
    for spec in _DETECTORS.values():
        if spec.space is not None:
            if spec.space in evidence:
                outputs.append(spec.fn(spec.space, evidence[spec.space], cfg))
        else:
            for space, ev in evidence.items():
                if ev.metric == "cosine" and space != "face":
                    outputs.append(spec.fn(space, ev, cfg))
    return outputs


def _pixel_images(ev: SpaceEvidence) -> tuple[np.ndarray, np.ndarray]:
    shape = ev.image_shape
    n, k = ev.cand_ids.shape
    return ev.query.reshape(n, *shape), ev.cand_vecs.reshape(n, k, *shape)


register_detector("nn_ratio", "pixel",
                  lambda s, ev, cfg: nn_ratio(ev.query, ev.cand_vecs, cfg.nn_ratio, ev.cand_ids),
                  "Gu et al. 2023: d1/d2 < 1/3 on raw pixels")
register_detector("tiled_l2", "pixel",
                  lambda s, ev, cfg: tiled_l2(*_pixel_images(ev), cfg.tiled_l2, cfg.tiled_grid, ev.cand_ids),
                  "Carlini et al. 2023: max over 4x4 tiles of RMS error <= delta")
register_detector("adaptive_l2", "pixel",
                  lambda s, ev, cfg: adaptive_l2(ev.query, ev.cand_vecs, cfg.adaptive_alpha, cfg.adaptive_n,
                                                 ev.cand_ids),
                  "Carlini et al. 2023 (CIFAR-10): l2 / (alpha * mean l2 to the n nearest) <= 1")
register_detector("copy", None,
                  lambda s, ev, cfg: copy_score(ev.query, ev.cand_vecs, cfg.copy, f"{s}_copy", ev.cand_ids),
                  "Somepalli et al. 2023: cosine similarity to the nearest training image >= tau")
