"""One space of the reference index: how its vectors are stored, its faiss index built and tuned, and its
train->train baseline computed. :class:`memtrack.index.ReferenceIndex` assembles the spaces; incremental
adds (:mod:`memtrack.index_update`) reuse the same helpers.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from . import index_choice as ic
from . import index_faiss as fx
from . import shards as sh
from .config import Config
from .data import Record
from .detectors import exact_rms_distances, summarise
from .embedders import Embedder


# ------------------------------------------------------------------------------------- faiss helpers


def _faiss():
    return ic.faiss_module()


def make_faiss_index(metric: str, dim: int, n: int, index_type: str = "flat", memory_budget: int | None = None):
    """The (untrained) faiss index for a space: ``flat`` is exact; ``auto`` chooses by size (docs/scale.md)."""
    return ic.make_index(ic.choose_index(n, dim, memory_budget, index_type), metric, dim)


def _prepare(metric: str, vectors: np.ndarray, divisor: float) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors).astype(np.float32) / np.float32(divisor))
    if metric == "cosine":
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


# -------------------------------------------------------------------------------------------- build


def _storage(emb: Embedder) -> tuple[float, str]:
    """(divisor, dtype) of a space's stored vectors: the pixel space keeps exact uint8 pixels."""
    return (255.0, "uint8") if emb.metric == "l2" and emb.name == "pixel" else (1.0, "float32")


def is_pixel_space(emb: Embedder) -> bool:
    """The space of raw pixels, where nn_ratio, tiled_l2 and adaptive_l2 are defined (exact uint8 storage)."""
    return _storage(emb)[1] == "uint8"


def views_of(rows: np.ndarray) -> int:
    """The most vectors one training record has (mirrored views, crop offsets); 1 when each has one."""
    rows = np.asarray(rows, np.int64)
    return int(np.bincount(rows).max()) if len(rows) else 1


def second_neighbour_check(emb: Embedder, fetch, rows: np.ndarray, icfg, views: int):
    """The 2nd-neighbour recall check of a pixel space (None for other spaces), at the scan's k."""
    if not is_pixel_space(emb) or len(rows) < 3:
        return None
    from .index_recall import SecondNeighbour

    return SecondNeighbour(fetch, rows, max(2, icfg.k) * views, icfg.recall_queries)


def _to_stored(emb: Embedder, vec: np.ndarray) -> np.ndarray:
    divisor, dtype = _storage(emb)
    if dtype == "uint8":
        return np.rint(vec * 255.0).clip(0, 255).astype(np.uint8)
    return vec.astype(np.float32)


def _nearest_other(metric: str, stored, divisor: float, qids: np.ndarray, search, k: int, rms: bool,
                   exclude_self: bool = True) -> np.ndarray:
    """For each query vector ``stored[qids]``: its statistic to the nearest *other* candidate that
    ``search(prepared queries, k) -> (scores, candidate ids)`` proposes, re-checked exactly.

    ``search`` may return ids of another array than ``stored`` (``exclude_self=False``, ``fetch`` below)."""
    out = np.full(len(qids), np.nan)
    for s in range(0, len(qids), 256):
        ids_q = qids[s:s + 256]
        raw_q = np.asarray(stored[ids_q], dtype=np.float64) / divisor
        cand_ids, cand = search(_prepare(metric, stored[ids_q], divisor), k)
        valid = cand_ids >= 0
        if exclude_self:
            valid &= cand_ids != ids_q[:, None]
        if metric == "cosine":
            qn = raw_q / np.maximum(np.linalg.norm(raw_q, axis=1, keepdims=True), 1e-12)
            cn = cand / np.maximum(np.linalg.norm(cand, axis=2, keepdims=True), 1e-12)
            stat = np.where(valid, np.einsum("nd,nkd->nk", qn, cn), -np.inf).max(1)
        else:
            d = np.where(valid, exact_rms_distances(raw_q, cand), np.inf)
            stat = d.min(1) * (1.0 if rms else np.sqrt(cand.shape[2]))
        out[s:s + 256] = np.where(valid.any(1), stat, np.nan)
    return out


def _candidates_of(stored, divisor: float, index_search):
    """A ``search`` for :func:`_nearest_other` over ``stored``: candidate ids and their raw values."""
    def search(q, k):
        _, ids = index_search(q, k)
        return ids, np.asarray(stored[np.where(ids >= 0, ids, 0).reshape(-1)], np.float64).reshape(
            *ids.shape, -1) / divisor
    return search


def _baseline(metric: str, vectors: np.ndarray, divisor: float, faiss_index, k: int, rms: bool = True) -> np.ndarray:
    """Each vector's statistic to its nearest *other* training vector (exact re-check on candidates).

    cosine spaces: the top cosine similarity (Somepalli et al.'s train->train baseline);
    l2 spaces: the distance to the nearest other vector -- RMS per pixel for the pixel space (``rms``),
    plain Euclidean otherwise (face descriptors, whose thresholds are Euclidean).
    ``faiss_index`` is anything with ``search(queries, k) -> (scores, ids)``.
    """
    m = len(vectors)
    if m < 2:
        return np.full(m, np.nan)
    search = _candidates_of(vectors, divisor, faiss_index.search)
    return _nearest_other(metric, vectors, divisor, np.arange(m), search, min(k + 1, m), rms)


class _Searcher:
    """``search(q, k)`` of a space's faiss index, with exact re-ranking where the codes are approximate."""

    def __init__(self, index, metric: str, fetch, rerank: int):
        self.index, self.metric, self.fetch, self.rerank = index, metric, fetch, rerank

    def search(self, q: np.ndarray, k: int):
        return ic.search_reranked(self.index, self.fetch, self.metric, q, k, self.rerank)


def _write_space(tmp: Path, emb: Embedder, stored, rows: np.ndarray, records: Sequence[Record],
                 config: Config) -> dict:
    """Index, tune, baseline and save one space into ``tmp``; returns its manifest entry + baseline."""
    icfg = config.index
    divisor, dtype = _storage(emb)
    # 1. choose, train and fill the faiss index (on-disk inverted lists when over the memory budget)
    built = fx.build_faiss(tmp, emb.name, emb.metric, emb.dim, stored, lambda x: _prepare(emb.metric, x, divisor),
                           icfg, exact=is_pixel_space(emb))
    fetch = lambda ids: _prepare(emb.metric, stored[np.asarray(ids)], divisor)  # noqa: E731
    # 2. search parameters tuned to the recall target, recall measured against exact search -- for the
    #    pixel space also the recall of the 2nd nearest training image of generated-like queries
    views = 1 if hasattr(emb, "embed_faces") else views_of(rows)
    second = None if built.choice.kind == "flat" else second_neighbour_check(emb, fetch, rows, icfg, views)
    recall = fx.tune_built(built, emb.metric, fetch, len(stored), icfg, second)
    if is_pixel_space(emb) and recall.recall_2nd is None:
        recall.recall_2nd = 1.0  # exact search: the 2nd neighbour is never missed
    searcher = _Searcher(built.index, emb.metric, fetch, recall.rerank)
    # 3. the train->train baseline
    base = _baseline(emb.metric, stored, divisor, searcher, 1, rms=emb.name == "pixel")
    identity_meta = None
    # 4. identities and the calibrated verification threshold (face spaces)
    if hasattr(emb, "embed_faces"):
        from .identity_index import build_identity

        arrays, identity_meta = build_identity(records, np.asarray(stored), rows, emb, config)
        for key, arr in arrays.items():
            np.save(tmp / f"{emb.name}.{key}.npy", arr)
    if not (tmp / f"{emb.name}.vectors.npy").exists():
        np.save(tmp / f"{emb.name}.vectors.npy", stored)
    np.save(tmp / f"{emb.name}.rows.npy", rows)
    np.save(tmp / f"{emb.name}.baseline.npy", base)
    fx.write_built(built, tmp / f"{emb.name}.faiss")
    meta = {"fingerprint": emb.fingerprint, "options": dataclasses.asdict(emb.options),
            "metric": emb.metric, "dim": emb.dim, "n_vectors": int(len(stored)), "dtype": dtype,
            "divisor": divisor, "index_type": type(built.index).__name__, **built.meta(),
            **_recall_meta(recall, second)}
    if not hasattr(emb, "embed_faces"):
        meta["views"] = views
    return {"meta": meta, "baseline": base, "identity": identity_meta}


def _recall_meta(recall, second=None) -> dict:
    """The manifest's recall fields; ``recall_2nd`` (pixel spaces) with how it was measured."""
    meta = {"recall_at_k": round(recall.recall_at_k, 4), "recall_at_1": round(recall.recall_at_1, 4),
            "rerank": recall.rerank, "search_params": recall.params, "recall": recall.to_dict()}
    if recall.recall_2nd is not None:
        meta["recall_2nd"] = round(float(recall.recall_2nd), 4)
        meta["recall_2nd_measured"] = (second.describe() if second is not None
                                       else {"exact": True, "note": "exact (Flat) search finds every neighbour"})
    return meta


def _baseline_meta(emb_name: str, metric: str, base: np.ndarray) -> dict:
    stat = ("cosine to nearest other" if metric == "cosine" else "RMS pixel distance to nearest other"
            if emb_name == "pixel" else "distance to nearest other")
    return {"statistic": stat, **summarise(base)}


def _embedded_in_memory(emb, records, config):
    vec, rows, failed = sh.embed_records(emb, records, config.index.batch_size, config.data.max_image_pixels,
                                         config.index.read_workers)
    return _to_stored(emb, vec), rows, failed
