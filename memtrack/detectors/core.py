"""The published memorization tests, as pure functions on arrays.

Nothing here loads a model or touches a file. Each test takes the generated samples' vectors and the
*candidate* training vectors that the index proposed (``[n, k, ...]``) with the training-record row of each
candidate (``[n, k]``), recomputes the distances exactly in float64 on those candidates, and returns a
:class:`DetectorOutput` with one score and one verdict per sample. Distances are computed as explicit
differences, never through the ``|a|^2 + |b|^2 - 2ab`` expansion (what ``torch.cdist`` uses for large
inputs), so an exact copy is at distance exactly 0.

Candidates are never padded. A candidate whose row is ``-1`` means "no candidate" (the index found fewer
than it was asked for) and its vector slot is meaningless: every detector ignores it. A training image may
have several candidate vectors (a mirrored view, crop offsets): its distance is the minimum over them
(:func:`per_row`), and "the 2nd nearest training image" is another *row*, never another view of the same
image. A sample without the candidates its test needs gets no verdict (``judged`` is False) and is counted
under ``not_judged`` with the reason; a detector outside its defined regime is ``applicable=False`` with a
reason and reports no rate at all (:meth:`DetectorOutput.not_applicable`).

The registry (:func:`register_detector`, in :mod:`memtrack.detectors.registry`) lets the tracker run every
detector whose embedding space the index has; built-ins register through the same function.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from memtrack.detectors.types import DetectorOutput, SpaceEvidence  # noqa: F401  (the detectors' inputs and outputs)

_BLOCK_BYTES = 1 << 20  # float64 differences per block: inside one core's L2, so a block's passes stay in cache
FEWER_CANDIDATES = "fewer candidate training images than the test needs"


def _judged(mask: np.ndarray, reason: str = FEWER_CANDIDATES) -> tuple[np.ndarray | None, dict]:
    """(``judged`` field, ``not_judged`` counts) for a mask of the samples with a verdict."""
    mask = np.asarray(mask, bool)
    missing = int((~mask).sum())
    return (None, {}) if missing == 0 else (mask, {reason: missing})


def candidate_rows(candidates: np.ndarray, candidate_ids: np.ndarray | None) -> np.ndarray:
    """``[n, k]`` training rows of the candidates; without ids every candidate is its own image."""
    n, k = np.asarray(candidates).shape[:2]
    if candidate_ids is None:
        return np.broadcast_to(np.arange(k, dtype=np.int64), (n, k))
    ids = np.asarray(candidate_ids, np.int64)
    if ids.shape != (n, k):
        raise ValueError(f"candidate_ids must be [n, k] = {(n, k)}, got {ids.shape}")
    return ids


def per_row(dist: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's candidates reduced to distinct training images, nearest first.

    Args:
        dist: ``[n, k]`` distances (lower is closer) of each sample to its candidate vectors.
        rows: ``[n, k]`` the training row of each candidate; ``-1`` = no candidate (ignored).

    Returns:
        ``(d [n, k], rows [n, k])``: per training image the *minimum* distance over its candidate vectors,
        sorted ascending; slots beyond the distinct images are ``inf`` / ``-1``.
    """
    rows = np.asarray(rows, np.int64)
    d = np.where(rows >= 0, np.asarray(dist, np.float64), np.inf)
    d = np.where(np.isnan(d), np.inf, d)
    order = np.argsort(d, axis=1, kind="stable")
    ds, rs = np.take_along_axis(d, order, 1), np.take_along_axis(rows, order, 1)
    rs = np.where(np.isfinite(ds), rs, -1)
    k = rs.shape[1]
    earlier = np.tril(np.ones((k, k), bool), -1)  # [j, i]: i comes before j
    dup = np.zeros(rs.shape, bool)
    for s in range(0, len(rs), 256):  # [block, k, k] comparisons: a row seen earlier is a further view
        r = rs[s:s + 256]
        dup[s:s + 256] = ((r[:, :, None] == r[:, None, :]) & earlier[None]).any(axis=2)
    dup |= rs < 0
    ds, rs = np.where(dup, np.inf, ds), np.where(dup, -1, rs)
    order = np.argsort(ds, axis=1, kind="stable")
    return np.take_along_axis(ds, order, 1), np.take_along_axis(rs, order, 1)


def _as_candidates(query: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(query)
    c = np.asarray(candidates)
    if c.ndim != q.ndim + 1 or c.shape[0] != q.shape[0] or c.shape[2:] != q.shape[1:]:
        raise ValueError(f"candidates must be [n, k, *query.shape[1:]]; got query {q.shape}, candidates {c.shape}")
    return q, c


def _block_rows(per_sample: int) -> int:
    """Samples per block so that a block's float64 differences (``per_sample`` values each) fit ``_BLOCK_BYTES``."""
    return max(1, _BLOCK_BYTES // (8 * max(per_sample, 1)))


def _differences(cands: np.ndarray, query: np.ndarray, out: np.ndarray, qbuf: np.ndarray) -> np.ndarray:
    """``out = float64(cands) - float64(query)`` (query broadcast over the candidates), in preallocated buffers.

    Three cache-resident passes (cast the candidates, cast the query, subtract in place) instead of a mixed-type
    ufunc, whose buffered casting is ~2x slower. The float64 difference of two float32 values is exact for pixel
    values, so identical vectors give exactly 0.
    """
    np.copyto(out, cands)
    np.copyto(qbuf, query)
    return np.subtract(out, qbuf, out=out)


def exact_rms_distances(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """RMS distance ``||x - y||_2 / sqrt(D)`` from each query to each of its candidates: ``[n, k]`` float64.

    Computed as explicit differences in float64, so identical vectors give exactly 0. Blocks of samples are
    sized to stay in cache; per block: differences (:func:`_differences`), then one ``einsum`` dot per pair.
    Measured (``benchmarks/detectors.py``, 1,000 samples x 10 candidates of 3x32x32, one core): about 2.5x
    the time numpy takes to read the float32 candidates once; the earlier per-chunk ``(diff ** 2).sum()``
    took ~3x longer.
    """
    q, c = _as_candidates(query, candidates)
    n, k = c.shape[:2]
    dim = int(np.prod(q.shape[1:])) if q.ndim > 1 else 1
    qf, cf = q.reshape(n, 1, dim), c.reshape(n, k, dim)
    sq = np.empty((n, k), dtype=np.float64)
    b = _block_rows(k * dim)
    diff, qbuf = np.empty((b, k, dim)), np.empty((b, 1, dim))
    for s in range(0, n, b):
        m = min(b, n - s)
        d = _differences(cf[s:s + m], qf[s:s + m], diff[:m], qbuf[:m])
        sq[s:s + m] = np.einsum("bkd,bkd->bk", d, d)
    return np.sqrt(sq / dim)


def _match(rows: np.ndarray) -> np.ndarray:
    return np.asarray(rows[:, 0] if rows.shape[1] else np.full(len(rows), -1), np.int64)


def nn_ratio(query: np.ndarray, candidates: np.ndarray, threshold: float = 1 / 3,
             candidate_ids: np.ndarray | None = None) -> DetectorOutput:
    """Nearest-neighbour distance ratio (Gu et al. 2023, "On Memorization in Diffusion Models").

    A generated image x is memorized when ``d1 / d2 < 1/3``, where d1 and d2 are the distances from x to
    its nearest and second-nearest training images, ``d = ||x - y||_2 / sqrt(C*H*W)`` on raw pixels (Gu et
    al.'s ``mem_ratio.py`` uses uint8 values; memtrack uses [0, 1] values -- the ratio is scale-free, d1
    is reported in [0, 1] units). A training image's distance is the minimum over its candidate vectors,
    and d2 belongs to another training image (never another view of the nearest one).

    When the nearest training image is duplicated exactly, an exact copy has ``d1 = d2 = 0``; the ratio is
    then defined as 0 (memorized), not NaN. A duplicate that is not exact (a re-encoded or noisy copy)
    puts d2 next to d1 and the ratio near 1: see :func:`nn_ratio_dedup`.

    Args:
        query: ``[n, D]`` pixel vectors of the samples, values in [0, 1].
        candidates: ``[n, k, D]`` pixel vectors of each sample's k >= 2 candidate training vectors.
        threshold: flagged when ``d1 / d2 < threshold`` (default 1/3).
        candidate_ids: ``[n, k]`` training rows of the candidates (-1: no candidate); ``match`` reports
            them. None: every candidate is a distinct training image.
    """
    if np.asarray(candidates).shape[1:2] and np.asarray(candidates).shape[1] < 2:
        raise ValueError("nn_ratio needs at least 2 candidates per sample (and 2 training images)")
    ds, rs = per_row(exact_rms_distances(query, candidates), candidate_rows(candidates, candidate_ids))
    d1, d2 = ds[:, 0], ds[:, 1]
    ok = np.isfinite(d2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ok, np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 0.0), np.nan)
    judged, missing = _judged(ok)
    return DetectorOutput("nn_ratio", ratio, ok & (np.nan_to_num(ratio, nan=np.inf) < threshold), _match(rs),
                          float(threshold), "below", {"d1": np.where(np.isfinite(d1), d1, np.nan),
                                                      "d2": np.where(ok, d2, np.nan)},
                          judged=judged, not_judged=missing)


def duplicate_distance(neighbour_dist: np.ndarray, ratio: float = 1 / 3) -> float:
    """The near-duplicate distance of a training set: ``ratio`` x the median distance from a training image
    to its nearest other one (``neighbour_dist[:, 0]``, the train->train baseline).

    Two training images are near-duplicates when they are as much closer to each other than a typical
    training image is to its nearest neighbour as Gu et al.'s test demands of a copy (``ratio`` = 1/3):
    a re-encoded, resized or noisy copy qualifies, two different photographs do not. Calibrated on the
    training set; when more than half of it is duplicated the median is itself a duplicate distance and only
    near-exact copies qualify.
    """
    first = np.asarray(neighbour_dist, np.float64)[:, 0] if np.ndim(neighbour_dist) == 2 else np.zeros(0)
    first = first[np.isfinite(first)]
    return float(ratio * np.median(first)) if first.size else 0.0


def nn_ratio_dedup(query: np.ndarray, candidates: np.ndarray, neighbour_rows: np.ndarray,
                   neighbour_dist: np.ndarray, near_duplicate: float, threshold: float = 1 / 3,
                   candidate_ids: np.ndarray | None = None) -> DetectorOutput:
    """Gu et al.'s nearest-neighbour ratio with d2 taken past the nearest image's near-duplicates (memtrack).

    :func:`nn_ratio` (Gu et al. 2023, "On Memorization in Diffusion Models") is defeated by a duplicated
    training image unless the copy is exact: a model that memorized an image it saw twice (a noisy or
    re-encoded second copy) emits a sample between the two, d1 ~ d2 and the ratio ~ 1 -- yet duplicated
    images are the ones memorized first (Carlini et al. 2023; Somepalli et al. 2023). This variant keeps d1
    and Gu et al.'s threshold, and takes d2 as the distance to the nearest training image that is *not* a
    near-duplicate of the nearest one: a training image within ``near_duplicate`` of it in the index's
    train->train lists (:func:`duplicate_distance`). A sample is then memorized when it is much closer to the
    duplicated image than to anything else.

    Args:
        query, candidates, candidate_ids: as for :func:`nn_ratio`.
        neighbour_rows, neighbour_dist: ``[n_train, k]`` every training image's nearest other training
            images and their RMS distances (``-1`` / inf for none), as the index stores them.
        near_duplicate: the RMS distance within which a training image is a near-duplicate.
    """
    ds, rs = per_row(exact_rms_distances(query, candidates), candidate_rows(candidates, candidate_ids))
    nbr_rows, nbr_dist = np.asarray(neighbour_rows, np.int64), np.asarray(neighbour_dist, np.float64)
    m = rs[:, 0]
    safe = np.where(m >= 0, m, 0)
    dup_rows = np.where((nbr_dist[safe] <= near_duplicate) & (nbr_rows[safe] >= 0) & (m[:, None] >= 0),
                        nbr_rows[safe], -2)
    is_dup = (rs[:, :, None] == dup_rows[:, None, :]).any(axis=2) & (rs >= 0)
    other = (rs >= 0) & ~is_dup
    other[:, 0] = False
    j = np.argmax(other, axis=1)
    ok = other.any(axis=1) & (m >= 0)
    d1, d2 = ds[:, 0], np.where(ok, ds[np.arange(len(ds)), j], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ok, np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 0.0), np.nan)
    judged, missing = _judged(ok, "every candidate training image is a near-duplicate of the nearest one")
    return DetectorOutput("nn_ratio_dedup", ratio, ok & (np.nan_to_num(ratio, nan=np.inf) < threshold), _match(rs),
                          float(threshold), "below",
                          {"d1": np.where(np.isfinite(d1), d1, np.nan), "d2": d2,
                           "duplicates_skipped": is_dup[:, 1:].sum(axis=1).astype(np.float64)},
                          judged=judged, not_judged=missing, info={"near_duplicate_rms": float(near_duplicate)})


def _tile_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def tiled_distances(query: np.ndarray, candidates: np.ndarray, grid: int = 4) -> np.ndarray:
    """Carlini et al.'s tiled distance to every candidate: ``[n, k]`` max over tiles of per-tile RMS.

    Explicit float64 differences as in :func:`exact_rms_distances` (an exact copy is at exactly 0). When the
    grid divides the image, each block is copied tile-major (``[.., tile_y, tile_x, C, th, tw]``) while it is
    cast, so every tile's squared error is one contiguous dot product; otherwise the uneven tiles of
    :func:`_tile_bounds` are summed with ``np.add.reduceat``.
    """
    q, c = _as_candidates(query, candidates)
    if q.ndim != 4:
        raise ValueError(f"tiled_l2 needs images [n, C, H, W]; got {q.shape}")
    h, w = q.shape[2:]
    if grid > min(h, w):
        raise ValueError(f"tiled_l2 grid {grid} is larger than the image ({h}x{w})")
    if h % grid == 0 and w % grid == 0:
        return _tiled_even(q, c, grid)
    return _tiled_uneven(q, c, grid)


def _tiled_even(q: np.ndarray, c: np.ndarray, grid: int) -> np.ndarray:
    """:func:`tiled_distances` for equal tiles: per block a tile-major cast, a subtraction, one dot per tile."""
    (n, k, ch, h, w), g = c.shape, grid
    th, tw = h // g, w // g
    out = np.empty((n, k), dtype=np.float64)
    b = _block_rows(k * ch * h * w)
    diff, qbuf = np.empty((b, k, g, g, ch, th, tw)), np.empty((b, 1, g, g, ch, th, tw))
    for s in range(0, n, b):
        m = min(b, n - s)
        cs = c[s:s + m].reshape(m, k, ch, g, th, g, tw).transpose(0, 1, 3, 5, 2, 4, 6)
        qs = q[s:s + m].reshape(m, 1, ch, g, th, g, tw).transpose(0, 1, 3, 5, 2, 4, 6)
        d = _differences(cs, qs, diff[:m], qbuf[:m]).reshape(m, k, g * g, -1)
        out[s:s + m] = np.einsum("bktx,bktx->bkt", d, d).max(axis=2)
    return np.sqrt(out / (ch * th * tw))


def _tiled_uneven(q: np.ndarray, c: np.ndarray, grid: int) -> np.ndarray:
    """:func:`tiled_distances` for tiles of unequal size (the image is not a multiple of the grid)."""
    n, k, ch, h, w = c.shape
    ys, xs = _tile_bounds(h, grid), _tile_bounds(w, grid)
    y0, x0 = [a for a, _ in ys], [a for a, _ in xs]
    count = ch * np.outer([b - a for a, b in ys], [b - a for a, b in xs]).astype(np.float64)
    out = np.empty((n, k), dtype=np.float64)
    b = _block_rows(k * ch * h * w)
    diff, qbuf = np.empty((b, k, ch, h, w)), np.empty((b, 1, ch, h, w))
    for s in range(0, n, b):
        m = min(b, n - s)
        d = _differences(c[s:s + m], q[s:s + m, None], diff[:m], qbuf[:m])
        sums = np.add.reduceat(np.add.reduceat(np.square(d, out=d).sum(axis=2), y0, axis=2), x0, axis=3)
        out[s:s + m] = (sums / count).reshape(m, k, -1).max(axis=2)
    return np.sqrt(out)


def flat_distance(images: np.ndarray, grid: int = 4) -> np.ndarray:
    """``[n]`` the tiled distance from each image to the flat image of its own mean colour: how far a
    featureless image (what an early, blurry sample looks like) would be from it."""
    x = np.asarray(images, np.float64)
    flat = np.broadcast_to(x.mean(axis=(-2, -1), keepdims=True), x.shape)
    return tiled_distances(flat, x[:, None], grid)[:, 0]


TOO_FLAT = ("the matched training image is nearly uniform: a flat image of its mean colour is within the threshold, "
            "so any blur of that colour would count as a copy")


def tiled_l2(query: np.ndarray, candidates: np.ndarray, threshold: float = 0.15, grid: int = 4,
             candidate_ids: np.ndarray | None = None) -> DetectorOutput:
    """Tiled L2 distance (Carlini et al. 2023, "Extracting Training Data from Diffusion Models").

    Both images are split into a ``grid x grid`` (default 4x4) grid of non-overlapping tiles; the distance
    is the *maximum* over tiles of the per-tile RMS pixel error (pixels in [0, 1]), so one differing tile
    is enough to reject a match. A sample is a near-copy when its smallest tiled distance over the
    candidates is ``<= threshold``. The paper does not publish the threshold it used to link generations;
    memtrack's default 0.15 is its own starting point, to calibrate against the tiled train->train baseline
    that the index stores.

    Regime: a match is evidence of copying only if the training image has structure. When a flat image of
    its own mean colour is within ``threshold`` of it (tiled distance) -- a dark, nearly uniform crop -- any
    blur of that colour "copies" it, so such a sample gets no verdict (counted under ``not_judged``). Tiles
    must also be large enough (the registry's check: >= 8 px).

    Args:
        query: ``[n, C, H, W]`` samples in [0, 1].
        candidates: ``[n, k, C, H, W]`` candidate training images in [0, 1].
        candidate_ids: ``[n, k]`` their training rows (-1: no candidate).
    """
    rows = candidate_rows(candidates, candidate_ids)
    d = tiled_distances(query, candidates, grid)
    ds, rs = per_row(d, rows)
    score = ds[:, 0]
    found = np.isfinite(score)
    slot = np.argmin(np.where(rows >= 0, np.nan_to_num(d, nan=np.inf), np.inf), axis=1)
    best = np.asarray(candidates)[np.arange(len(slot)), slot]
    structured = flat_distance(np.where(found[:, None, None, None], best, 0.0), grid) > threshold
    ok = found & structured
    judged, missing = _judged(found)
    if (found & ~structured).any():
        judged = ok
        missing = {**missing, TOO_FLAT: int((found & ~structured).sum())}
    return DetectorOutput("tiled_l2", np.where(found, score, np.nan), ok & (score <= threshold), _match(rs),
                          float(threshold), "below", judged=judged, not_judged=missing)


def neighbourhood_mean(neighbour_dist: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Carlini et al.'s normaliser for training images ``rows``: the mean distance from each to its ``n``
    nearest training images, itself included (distance 0) -- ``(0 + sum of its n - 1 nearest others) / n``.
    NaN where the image has fewer than ``n - 1`` neighbours in ``neighbour_dist`` (or ``rows`` is -1)."""
    nd = np.asarray(neighbour_dist, np.float64)
    rows = np.asarray(rows, np.int64)
    if n - 1 > nd.shape[1]:
        return np.full(len(rows), np.nan)
    picked = nd[np.where(rows >= 0, rows, 0), :max(n - 1, 0)]
    mean = picked.sum(axis=1) / n
    return np.where((rows >= 0) & np.isfinite(mean), mean, np.nan)


def adaptive_l2(query: np.ndarray, candidates: np.ndarray, neighbour_dist: np.ndarray, alpha: float = 0.5,
                n_neighbours: int = 50, candidate_ids: np.ndarray | None = None) -> DetectorOutput:
    """Adaptive (reference-normalised) distance (Carlini et al. 2023, "Extracting Training Data from Diffusion
    Models", Section 5.1, CIFAR-10).

    The paper: ``l(x_hat, x; S_x_hat) = l2(x_hat, x) / (alpha * E_{y in S_x_hat}[l2(x_hat, y)])``, "where
    S_x_hat is the set containing the n closest elements from the training dataset to the example x_hat.
    This distance is small if the extracted image x is much closer to the training image x_hat compared to
    the n closest neighbors of x_hat in the training set." So x_hat is the *training* image nearest to the
    generated image x, and the normaliser is the mean distance from that training image to its own n nearest
    training images -- not from the generated image (memtrack's earlier reading); x_hat, being in the
    training set, is its own closest element (aidotse/LeakPro's ``reference_neighborhood_means`` reads it the
    same way). Flagged when ``<= 1``; alpha = 0.5, n = 50 as in the paper. The normalisers come from the
    index's exact train->train lists (:func:`neighbourhood_mean`), so only the nearest candidate is needed.

    Regime: the definition needs n training images (the registry reports "not applicable" below that); a
    sample whose matched image has fewer than n - 1 neighbours in the lists gets no verdict.

    Args:
        neighbour_dist: ``[n_train, >= n - 1]`` each training image's distances to its nearest others.
    """
    ds, rs = per_row(exact_rms_distances(query, candidates), candidate_rows(candidates, candidate_ids))
    d1, m = ds[:, 0], rs[:, 0]
    mean = neighbourhood_mean(neighbour_dist, m, n_neighbours)
    ok = np.isfinite(d1) & np.isfinite(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(mean > 0, d1 / (alpha * np.where(mean > 0, mean, 1.0)), np.where(d1 > 0, np.inf, 0.0))
    score = np.where(ok, score, np.nan)
    judged, missing = _judged(ok)
    return DetectorOutput("adaptive_l2", score, ok & (np.nan_to_num(score, nan=np.inf) <= 1.0), _match(rs), 1.0,
                          "below", {"d1": np.where(np.isfinite(d1), d1, np.nan), "neighbourhood": mean},
                          judged=judged, not_judged=missing,
                          info={"alpha": float(alpha), "n": int(n_neighbours)})


def copy_score(query: np.ndarray, candidates: np.ndarray, threshold: float = 0.5, name: str = "copy",
               candidate_ids: np.ndarray | None = None) -> DetectorOutput:
    """Embedding copy score (Somepalli et al., CVPR 2023, "Diffusion Art or Digital Forgery?").

    The cosine similarity of L2-normalised features between a generated image and its most similar
    training image; a copy when ``>= threshold``. A copy threshold belongs to its descriptor: SSCD's
    published 0.5 (Somepalli et al.) means nothing in CLIP space, where unrelated images often exceed 0.5
    (the registry calibrates CLIP's on the training set's own train->train similarities). The vectors are
    re-normalised here, so cosine is exact even if the index is approximate.
    """
    q, c = _as_candidates(query, candidates)
    rows = candidate_rows(c, candidate_ids)
    qn = q.astype(np.float64) / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    cn = c.astype(np.float64) / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
    sims = np.einsum("nd,nkd->nk", qn, cn)
    ds, rs = per_row(-sims, rows)
    score = -ds[:, 0]
    ok = np.isfinite(score)
    judged, missing = _judged(ok)
    return DetectorOutput(name, np.where(ok, score, np.nan), ok & (score >= threshold), _match(rs),
                          float(threshold), "above", judged=judged, not_judged=missing)


def summarise(values: np.ndarray) -> dict:
    """Mean and percentiles (50/75/90/95/99) of a score distribution; empty input gives NaNs."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": float("nan"), **{f"p{p}": float("nan") for p in (50, 75, 90, 95, 99)}}
    return {"n": int(v.size), "mean": float(v.mean()),
            **{f"p{p}": float(np.percentile(v, p)) for p in (50, 75, 90, 95, 99)}}
