"""Train -> train: every training image's nearest *other* training images, found once when the index is built.

One search of the index with every training vector as a query gives, exactly re-checked on the candidates:

* the **baseline** of each vector: its statistic to the nearest vector of *another* training record (the
  mirrored view of the same image, or a second face in the same photo, is the same record and never counts);
* for the pixel space, each record's ``index.baseline_k`` nearest other records with their RMS distances
  (the minimum over both images' views) -- the lists that give Carlini et al.'s adaptive distance its
  normaliser, nn_ratio_dedup its near-duplicates, and the report its near-duplicate counts;
* for the pixel space, the **tiled baseline**: each record's tiled L2 distance to the nearest other record
  among those neighbours -- the reference the tiled_l2 threshold is calibrated against.

``search(prepared queries, k) -> candidate ids`` and ``fetch(ids) -> raw values`` may address another array
than the queries (an incremental add compares old records with the new ones only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from memtrack.detectors.core import exact_rms_distances, per_row, tiled_distances
from memtrack.index.files import prepare_vectors

_WORK = 2e7  # float64 values per block of candidates (~160 MB)


@dataclass
class TrainNeighbours:
    """See the module docstring. Records without vectors have NaN / -1 entries."""

    base: np.ndarray                       # [n queried vectors] statistic to the nearest other record
    rows: Optional[np.ndarray] = None      # [n queried records, keep] nearest other records, -1 = none
    dist: Optional[np.ndarray] = None      # [n queried records, keep] their distances, ascending
    tiled: Optional[np.ndarray] = None     # [n queried records] tiled L2 to the nearest of them
    records: Optional[np.ndarray] = None   # [n queried records] which records the lists belong to


def _distances(metric: str, q: np.ndarray, cand: np.ndarray, rms: bool) -> np.ndarray:
    """Lower-is-closer exact distances: RMS (pixels) or Euclidean, or minus the cosine similarity."""
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        cn = cand / np.maximum(np.linalg.norm(cand, axis=2, keepdims=True), 1e-12)
        return -np.einsum("nd,nkd->nk", qn, cn)
    return exact_rms_distances(q, cand) * (1.0 if rms else np.sqrt(cand.shape[2]))


def compute(metric: str, stored, divisor: float, rows: np.ndarray, query_ids: np.ndarray, search: Callable,
            fetch: Callable, cand_rows: np.ndarray, keep: int, views: int, rms: bool = True,
            lists: bool = False, tiled: tuple | None = None) -> TrainNeighbours:
    """Train->train statistics of the vectors ``stored[query_ids]`` (see the module docstring).

    Args:
        rows: record row of every vector of ``stored``.
        search: ``search(prepared queries, k) -> candidate ids``; ``fetch(ids)`` their raw values (float64).
        cand_rows: record row of every candidate id.
        keep: other records to keep per record (1 for the baseline alone); ``views`` the most vectors per record.
        lists: also return the per-record lists; ``tiled``: ``(image shape, grid)`` for the tiled baseline.
    """
    query_ids = np.asarray(query_ids, np.int64)
    rows = np.asarray(rows, np.int64)
    order = query_ids[np.argsort(rows[query_ids], kind="stable")]  # a record's vectors side by side
    qrec = rows[order]
    records, starts = np.unique(qrec, return_index=True)
    k = int((keep + 1) * views)
    base = np.full(len(rows), np.nan)
    out_r = np.full((len(records), keep), -1, np.int64) if lists else None
    out_d = np.full((len(records), keep), np.inf) if lists else None
    out_t = np.full(len(records), np.inf) if tiled else None
    block = max(1, int(_WORK // max(1, k * np.asarray(stored[:1]).reshape(1, -1).shape[1])))
    bounds = list(starts) + [len(order)]
    r0 = 0
    while r0 < len(records):
        r1 = r0 + 1
        while r1 < len(records) and bounds[r1 + 1] - bounds[r0] <= block:
            r1 += 1
        vids = order[bounds[r0]:bounds[r1]]
        d, crow, cand, q = _search_block(metric, stored, divisor, vids, rows, search, fetch, cand_rows, k, rms)
        ds, rs = per_row(d, crow)
        if ds.shape[1] < keep:  # fewer vectors in the index than asked for
            pad = keep - ds.shape[1]
            ds = np.pad(ds, ((0, 0), (0, pad)), constant_values=np.inf)
            rs = np.pad(rs, ((0, 0), (0, pad)), constant_values=-1)
        stat = -ds[:, 0] if metric == "cosine" else ds[:, 0]
        base[vids] = np.where(np.isfinite(ds[:, 0]), stat, np.nan)
        local = np.searchsorted(records, rows[vids]) - r0
        if lists:
            _merge_lists(out_r, out_d, r0, r1, local, ds[:, :keep], rs[:, :keep], keep)
        if tiled:
            shape, grid = tiled
            td = tiled_distances(q.reshape(len(q), *shape), cand.reshape(len(q), cand.shape[1], *shape), grid)
            np.minimum.at(out_t, local + r0, per_row(td, crow)[0][:, 0])
        r0 = r1
    return TrainNeighbours(base[query_ids], out_r, out_d, out_t, records)


def _search_block(metric, stored, divisor, vids, rows, search, fetch, cand_rows, k, rms):
    q = np.asarray(stored[vids], np.float64) / divisor
    cids = np.asarray(search(prepare_vectors(metric, stored[vids], divisor), k), np.int64)
    valid = cids >= 0
    cand = fetch(np.where(valid, cids, 0))
    crow = np.where(valid, np.asarray(cand_rows)[np.where(valid, cids, 0)], -1)
    crow = np.where(crow == rows[vids][:, None], -1, crow)  # the same record (its other views) never counts
    return _distances(metric, q, cand, rms), crow, cand, q


def _merge_lists(out_r, out_d, r0: int, r1: int, local: np.ndarray, ds: np.ndarray, rs: np.ndarray, keep: int):
    """Fold each vector's list into its record's (minimum over the record's views, per other record)."""
    n = r1 - r0
    width = int(np.bincount(local, minlength=n).max())
    slot = np.zeros(len(local), np.int64)
    seen = np.zeros(n, np.int64)
    for i, r in enumerate(local):  # position of each vector among its record's vectors
        slot[i], seen[r] = seen[r], seen[r] + 1
    grid_d = np.full((n, width, keep), np.inf)
    grid_r = np.full((n, width, keep), -1, np.int64)
    grid_d[local, slot], grid_r[local, slot] = ds, rs
    md, mr = per_row(grid_d.reshape(n, -1), grid_r.reshape(n, -1))
    out_d[r0:r1], out_r[r0:r1] = md[:, :keep], mr[:, :keep]


def merge(old_rows: np.ndarray, old_dist: np.ndarray, new_rows: np.ndarray, new_dist: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Two neighbour lists of the same records merged: the ``keep`` nearest distinct records of both."""
    keep = old_rows.shape[1]
    ds, rs = per_row(np.concatenate([old_dist, new_dist], 1), np.concatenate([old_rows, new_rows], 1))
    return rs[:, :keep], ds[:, :keep]


def raw_fetch(stored, divisor: float) -> Callable:
    """``fetch(ids) -> float64 values / divisor`` of ``stored`` (ids of any shape)."""
    def fetch(ids):
        ids = np.asarray(ids)
        return np.asarray(stored[ids.reshape(-1)], np.float64).reshape(*ids.shape, -1) / divisor
    return fetch
