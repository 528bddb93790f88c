"""The recall nn_ratio depends on: does the index find the 2nd nearest training image of a generated sample?

Gu et al.'s test divides d1 by d2, the distance to the *second*-nearest training image. An approximate
index that misses that image returns a farther one, d2 grows, d1/d2 shrinks -- a false "memorized". The
usual recall@k (training vectors querying the index) does not measure this: a training vector finds itself
first, and generated images do not lie where training vectors lie. So memtrack measures it on
**generated-like queries** made from the training set itself (pixel values in [0, 1], clipped):

* near-copies: a training image plus Gaussian noise, sigma = 0.01, 0.05 and 0.1 (what a memorizing model
  emits, from nearly exact to visibly noisy);
* blends: 50/50 and 80/20 mixtures of two training images (what a model between two images emits);
* fresh mixtures: the mean of 8 random training images plus noise sigma 0.05 (a new image, near none).

A query counts as a hit when the 2nd distinct training image the search returns (after the exact re-check
and the per-image minimum over views) is at the exact 2nd-neighbour distance. The exact answer comes from a
brute-force scan of the stored vectors, once per build.

Example:
    >>> second = SecondNeighbour(fetch, rows, k=10, n_queries=600)
    >>> second(lambda q, k: index.search(q, k)[1])
    0.995
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from memtrack.detectors.core import per_row

QUERY_MIX = ("near-copy sigma 0.01", "near-copy sigma 0.05", "near-copy sigma 0.1", "blend 50/50",
             "blend 80/20", "fresh mixture of 8")
_SIGMAS = (0.01, 0.05, 0.1)


def generated_like(fetch: Callable, n: int, n_queries: int, seed: int = 2) -> tuple[np.ndarray, list[str]]:
    """``n_queries`` generated-like pixel queries (``[m, dim]`` float32 in [0, 1]) and their kinds.

    ``fetch(ids) -> vectors`` returns prepared training vectors (pixel values in [0, 1]).
    """
    rng = np.random.default_rng(seed)
    per = max(1, n_queries // len(QUERY_MIX))
    a, b = rng.integers(0, n, per), rng.integers(0, n, per)
    xa, xb = fetch(a).astype(np.float32), fetch(b).astype(np.float32)
    parts = [xa + rng.normal(0.0, s, xa.shape).astype(np.float32) for s in _SIGMAS]
    parts += [0.5 * xa + 0.5 * xb, 0.8 * xa + 0.2 * xb]
    mix = np.mean([fetch(rng.integers(0, n, per)) for _ in range(8)], axis=0).astype(np.float32)
    parts.append(mix + rng.normal(0.0, 0.05, mix.shape).astype(np.float32))
    kinds = [k for k in QUERY_MIX for _ in range(per)]
    return np.clip(np.concatenate(parts), 0.0, 1.0).astype(np.float32), kinds


def _sq(q: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """Squared L2 from each query ``[m, d]`` to its candidates ``[m, c, d]``, as explicit differences."""
    return ((vecs.astype(np.float64) - q[:, None, :].astype(np.float64)) ** 2).sum(-1)


class SecondNeighbour:
    """The 2nd-neighbour recall of any ``search(queries, k) -> vector ids`` (see the module docstring).

    Args:
        fetch: ``fetch(ids) -> prepared vectors`` of the space.
        rows: ``[n_vectors]`` training-record row of each vector.
        k: vectors the scan asks for per query (training images x views).
        n_queries: generated-like queries (spread evenly over :data:`QUERY_MIX`).
    """

    def __init__(self, fetch: Callable, rows: np.ndarray, k: int, n_queries: int = 1000, seed: int = 2):
        self.fetch, self.rows, self.k = fetch, np.asarray(rows, np.int64), int(k)
        n = len(self.rows)
        self.queries, self.kinds = generated_like(fetch, n, n_queries, seed)
        views = int(np.bincount(self.rows).max()) if n else 1
        self.exact = self._exact(n, 2 * views + 2)

    def _exact(self, n: int, m: int, chunk: int = 16384) -> np.ndarray:
        """The exact 2nd-nearest-image squared distance of every query (a brute-force scan)."""
        q = self.queries
        qq = (q.astype(np.float64) ** 2).sum(1)[:, None]
        best_s = np.full((len(q), 0), np.inf)
        best_i = np.zeros((len(q), 0), np.int64)
        for start in range(0, n, chunk):
            ids = np.arange(start, min(n, start + chunk))
            x = self.fetch(ids).astype(np.float64)
            s = qq - 2 * q @ x.T + (x * x).sum(1)[None]
            s_all = np.concatenate([best_s, s], 1)
            i_all = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], 1)
            keep = np.argsort(s_all, axis=1, kind="stable")[:, :m]
            best_s, best_i = np.take_along_axis(s_all, keep, 1), np.take_along_axis(i_all, keep, 1)
        return self._second(best_i)

    def _second(self, ids: np.ndarray) -> np.ndarray:
        """Exact squared distance to the 2nd distinct training image among candidate vector ``ids``."""
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        vecs = self.fetch(safe.reshape(-1)).reshape(*ids.shape, -1)
        d = np.where(valid, _sq(self.queries, vecs), np.inf)
        ds, _ = per_row(d, np.where(valid, self.rows[safe], -1))
        return ds[:, 1] if ds.shape[1] > 1 else np.full(len(ids), np.inf)

    def hits(self, search: Callable) -> np.ndarray:
        """``[m]`` True where ``search`` finds the exact 2nd-neighbour distance."""
        found = self._second(np.asarray(search(self.queries, self.k), np.int64))
        return found <= self.exact * (1 + 1e-5) + 1e-9

    def __call__(self, search: Callable) -> float:
        return float(self.hits(search).mean()) if len(self.queries) else 1.0

    def by_kind(self, search: Callable) -> dict:
        """The recall per kind of query (see :data:`QUERY_MIX`)."""
        h = self.hits(search)
        kinds = np.asarray(self.kinds)
        return {kind: round(float(h[kinds == kind].mean()), 4) for kind in QUERY_MIX if (kinds == kind).any()}

    def describe(self) -> dict:
        return {"n_queries": int(len(self.queries)), "k": self.k, "queries": list(QUERY_MIX)}
