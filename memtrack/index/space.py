"""One space of the reference index: how its vectors are stored, its faiss index built and tuned, and its
train->train baseline computed. :class:`memtrack.index.reference.ReferenceIndex` assembles the spaces; incremental
adds (:mod:`memtrack.index.update`) reuse the same helpers.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from memtrack.index import choice as ic
from memtrack.index import files as fx
from memtrack.index import neighbours as nb
from memtrack.index.files import prepare_vectors
from memtrack.index import shards as sh
from memtrack.config import Config
from memtrack.data.dataset import Record
from memtrack.detectors.core import summarise
from memtrack.embedders.registry import Embedder


# ------------------------------------------------------------------------------------- faiss helpers


def _faiss():
    return ic.faiss_module()


def make_faiss_index(metric: str, dim: int, n: int, index_type: str = "flat", memory_budget: int | None = None):
    """The (untrained) faiss index for a space: ``flat`` is exact; ``auto`` chooses by size (docs/scale.md)."""
    return ic.make_index(ic.choose_index(n, dim, memory_budget, index_type), metric, dim)


# -------------------------------------------------------------------------------------------- build


def views_of(rows: np.ndarray) -> int:
    """The most vectors one training record has (mirrored views, crop offsets, faces); at least 1. A search
    asks for k * views vectors so that k distinct training images come back."""
    rows = np.asarray(rows, np.int64)
    return int(max(1, np.bincount(rows).max())) if len(rows) else 1


def second_neighbour_check(emb: Embedder, fetch, rows: np.ndarray, icfg, views: int):
    """The 2nd-neighbour recall check of a pixel space (None for other spaces), at the scan's k."""
    if not emb.pixel_space or len(rows) < 3:
        return None
    from memtrack.index.recall import SecondNeighbour

    return SecondNeighbour(fetch, rows, max(2, icfg.k) * views, icfg.recall_queries)


def _to_stored(emb: Embedder, vec: np.ndarray) -> np.ndarray:
    divisor, dtype = emb.storage
    if dtype == "uint8":
        return np.rint(vec * 255.0).clip(0, 255).astype(np.uint8)
    return vec.astype(np.float32)


def tiled_spec(emb: Embedder, config: Config, grid: int | None = None) -> tuple | None:
    """``(image shape, grid)`` for the tiled train->train baseline of a pixel space (None otherwise)."""
    res = getattr(emb.options, "resolution", None)
    grid = config.detectors.tiled_grid if grid is None else grid
    if not emb.pixel_space or res is None or grid > res:
        return None
    return (3, int(res), int(res)), int(grid)


def _baseline(metric: str, vectors: np.ndarray, divisor: float, faiss_index, k: int, rms: bool = True,
              rows: np.ndarray | None = None, keep: int = 1, lists: bool = False,
              tiled: tuple | None = None) -> nb.TrainNeighbours:
    """Each vector's statistic to the nearest vector of *another* training record (exact re-check on
    candidates), and with ``lists`` each record's ``keep`` nearest other records (see
    :mod:`memtrack.index.neighbours`).

    cosine spaces: the top cosine similarity (Somepalli et al.'s train->train baseline);
    l2 spaces: the distance to the nearest other record -- RMS per pixel for the pixel space (``rms``),
    plain Euclidean otherwise (face descriptors, whose thresholds are Euclidean).
    ``faiss_index`` is anything with ``search(queries, k) -> (scores, ids)``; ``k`` is the number of other
    records the baseline needs (1).
    """
    m = len(vectors)
    rows = np.arange(m) if rows is None else np.asarray(rows, np.int64)
    keep = max(int(k), int(keep))
    if m < 2 or len(np.unique(rows)) < 2:
        return nb.TrainNeighbours(np.full(m, np.nan))
    search = lambda q, kk: faiss_index.search(q, min(kk, m))[1]  # noqa: E731
    return nb.compute(metric, vectors, divisor, rows, np.arange(m), search, nb.raw_fetch(vectors, divisor), rows,
                      keep, views_of(rows), rms, lists, tiled)


def full_lists(tn: nb.TrainNeighbours, n_records: int, keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-record arrays over *every* record (those without vectors: -1 / inf / nan)."""
    rows = np.full((n_records, keep), -1, np.int32)
    dist = np.full((n_records, keep), np.inf, np.float32)
    tiled = np.full(n_records, np.nan, np.float32)
    if tn.records is not None and tn.rows is not None:
        rows[tn.records], dist[tn.records] = tn.rows, tn.dist
    if tn.records is not None and tn.tiled is not None:
        tiled[tn.records] = np.where(np.isfinite(tn.tiled), tn.tiled, np.nan)
    return rows, dist, tiled


def save_lists(tmp: Path, name: str, rows: np.ndarray, dist: np.ndarray, tiled: np.ndarray | None) -> None:
    """``<space>.neighbours.npy``, ``<space>.neighbour_dist.npy`` and the tiled baseline of a pixel space."""
    np.save(tmp / f"{name}.neighbours.npy", rows.astype(np.int32))
    np.save(tmp / f"{name}.neighbour_dist.npy", dist.astype(np.float32))
    if tiled is not None:
        np.save(tmp / f"{name}{TILED_SUFFIX}.baseline.npy", tiled.astype(np.float32))


TILED_SUFFIX = "_tiled"  # the tiled baseline is reported as the baseline of "<space>_tiled"


class Searcher:
    """``search(q, k)`` of a space's faiss index, with exact re-ranking where the codes are approximate."""

    def __init__(self, index, metric: str, fetch, rerank: int):
        self.index, self.metric, self.fetch, self.rerank = index, metric, fetch, rerank

    def search(self, q: np.ndarray, k: int):
        return ic.search_reranked(self.index, self.fetch, self.metric, q, k, self.rerank)


def write_space(tmp: Path, emb: Embedder, stored, rows: np.ndarray, records: Sequence[Record],
                 config: Config) -> dict:
    """Index, tune, baseline and save one space into ``tmp``; returns its manifest entry + baseline."""
    icfg = config.index
    divisor, dtype = emb.storage
    # 1. choose, train and fill the faiss index (on-disk inverted lists when over the memory budget)
    built = fx.build_faiss(tmp, emb.name, emb.metric, emb.dim, stored, lambda x: prepare_vectors(emb.metric, x, divisor),
                           icfg, exact=emb.pixel_space)
    fetch = lambda ids: prepare_vectors(emb.metric, stored[np.asarray(ids)], divisor)  # noqa: E731
    # 2. search parameters tuned to the recall target, recall measured against exact search -- for the
    #    pixel space also the recall of the 2nd nearest training image of generated-like queries
    views = 1 if emb.identities else views_of(rows)
    second = None if built.choice.kind == "flat" else second_neighbour_check(emb, fetch, rows, icfg, views)
    recall = fx.tune_built(built, emb.metric, fetch, len(stored), icfg, second)
    if emb.pixel_space and recall.recall_2nd is None:
        recall.recall_2nd = 1.0  # exact search: the 2nd neighbour is never missed
    searcher = Searcher(built.index, emb.metric, fetch, recall.rerank)
    # 3. the train->train baseline (nearest other *record*); for the pixel space also every record's
    #    index.baseline_k nearest other records and the tiled baseline
    pixel = emb.pixel_space
    keep = int(icfg.baseline_k) if pixel else 1
    tiled = tiled_spec(emb, config)
    tn = _baseline(emb.metric, stored, divisor, searcher, 1, rms=pixel, rows=rows, keep=keep, lists=pixel,
                   tiled=tiled)
    base = tn.base
    extra_baselines = {}
    if pixel:
        nrows, ndist, ntiled = full_lists(tn, len(records), keep)
        save_lists(tmp, emb.name, nrows, ndist, ntiled if tiled else None)
        if tiled:
            extra_baselines[emb.name + TILED_SUFFIX] = tiled_baseline_meta(tiled, keep, ntiled)
    identity_meta = None
    # 4. identities and the calibrated verification threshold (face spaces)
    if emb.identities:
        from memtrack.identity.space import build_identity

        arrays, identity_meta = build_identity(records, np.asarray(stored), rows, emb, config)
        for key, arr in arrays.items():
            np.save(tmp / f"{emb.name}.{key}.npy", arr)
    if not (tmp / f"{emb.name}.vectors.npy").exists():
        np.save(tmp / f"{emb.name}.vectors.npy", stored)
    np.save(tmp / f"{emb.name}.rows.npy", rows)
    np.save(tmp / f"{emb.name}.baseline.npy", base)
    fx.write_built(built, tmp / f"{emb.name}.faiss")
    meta = {"fingerprint": emb.fingerprint, "options": dataclasses.asdict(emb.options),
            "metric": emb.metric, "dim": emb.dim, "n_vectors": int(len(stored)), "views": views_of(rows), "dtype": dtype,
            "divisor": divisor, "index_type": type(built.index).__name__, **built.meta(),
            **recall_meta(recall, second)}
    if pixel:
        meta["train_neighbours"] = {"k": keep, "statistic": "RMS pixel distance, minimum over both images' views"}
    return {"meta": meta, "baseline": base, "identity": identity_meta, "extra_baselines": extra_baselines}


def recall_meta(recall, second=None) -> dict:
    """The manifest's recall fields; ``recall_2nd`` (pixel spaces) with how it was measured."""
    meta = {"recall_at_k": round(recall.recall_at_k, 4), "recall_at_1": round(recall.recall_at_1, 4),
            "rerank": recall.rerank, "search_params": recall.params, "recall": recall.to_dict()}
    if recall.recall_2nd is not None:
        meta["recall_2nd"] = round(float(recall.recall_2nd), 4)
        meta["recall_2nd_measured"] = (second.describe() if second is not None
                                       else {"exact": True, "note": "exact (Flat) search finds every neighbour"})
    return meta


def tiled_baseline_meta(tiled: tuple, keep: int, values: np.ndarray) -> dict:
    shape, grid = tiled
    return {"statistic": f"tiled L2 ({grid}x{grid} tiles of a {shape[1]}-px image) to the nearest other training "
                         f"image among its {keep} pixel-nearest", "grid": grid, **summarise(values)}


def baseline_record(emb: Embedder, base: np.ndarray) -> dict:
    return {"statistic": emb.baseline_words(), **summarise(base)}


def embed_in_memory(emb, records, config):
    vec, rows, failed = sh.embed_records(emb, records, config.index.batch_size, config.data.max_image_pixels,
                                         config.index.read_workers)
    return _to_stored(emb, vec), rows, failed
