"""Which faiss index a space gets, its search parameters, and its measured recall (files: index_faiss.py).

The choice follows autofaiss's rules (criteo/autofaiss, ``get_optimal_index_keys_v2``), bent where
memtrack differs from a retrieval service: a scan asks few queries (samples per checkpoint), the detectors
re-check candidates exactly, and indexes must be memory-mappable and mergeable shard by shard.

1. **Flat** (exact) while the float32 vectors take at most ``FLAT_MAX_BYTES`` (256 MiB: ~131k CLIP
   vectors, ~21k 32x32 pixel vectors) and fit the budget -- a query then costs a few ms on two cores.
   The **pixel space** stays exact much longer (``exact=True``): nn_ratio divides by the distance to the
   2nd nearest training image, and an approximate search that misses it makes d1/d2 smaller -- a false
   "memorized". It is Flat while a scan's 64 queries cost at most ``PIXEL_SCAN_MAX`` (n x dim) and the
   build's train->train search at most ``PIXEL_BUILD_MAX`` (n^2 x dim), and the float32 vectors fit the
   budget: CIFAR-10 (50k x 3072) and FFHQ at 64 px (70k x 12288) are searched exactly (docs/scale.md).
2. **HNSW32** below ``HNSW_MAX`` vectors when it fits the budget (autofaiss: HNSW whenever it fits; we stop
   at 250k because its build is ~4k vectors/s on two cores and it cannot be memory-mapped or merged on disk).
3. **IVF{4*sqrt(n), power of two},Flat** below ``IVF_FLAT_MAX`` (1M, autofaiss's threshold) when it fits.
4. **IVF{nlist}[_HNSW32],PQ{m}x4fs** otherwise: ``m`` the largest of autofaiss's PQ sizes (capped at d/8)
   whose codes fit the budget; the HNSW coarse quantizer from 16,384 lists, its efSearch following nprobe
   (at 4,096 lists with its default efSearch it lost 12% of near-copy queries). PQ distances are approximate, so memtrack searches ``rerank`` times more
   candidates and re-ranks them exactly from the memory-mapped ``.vectors.npy``. autofaiss uses
   ``OPQ{m}_{y},...,PQ{m}x8``; on two cores OPQ64 took > 270 s and PQ64x8 196 s to train on 20k x 512
   vectors, 4-bit fast-scan PQ64x4fs 3.3 s -- and since codes only need to shortlist for the exact
   re-ranking, memtrack uses the 4-bit codes (``x4`` without fast-scan when the lists live on disk).

Search parameters (``nprobe``, ``efSearch``) are tuned by binary search to a recall target; recall@k is
measured leave-one-out on held-out training vectors (each query's own vector is ignored, so a query behaves
as if it were not in the index) against exact search, and stored in the manifest. Where the pixel space is
approximate, the tuning must also reach the target on the recall that nn_ratio depends on: the **2nd
nearest training image** of generated-like queries (near-copies at three noise levels, blends of two
training images, fresh mixtures -- never training vectors themselves, which find themselves), re-ranking
more candidates exactly (``rerank``) until it does (:class:`SecondNeighbour`). A target that cannot be met
is a warning, never a silent collapse.

Example:
    >>> choice = choose_index(n=2_000_000, dim=512, memory_budget=1 << 30)
    >>> choice.factory, choice.on_disk
    ('IVF4096,PQ64x4fs', False)
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from memtrack.errors import DependencyError, IndexError_
from memtrack.config import INDEX_TYPES  # noqa: F401  (the vocabulary lives with the config)
from memtrack.utils import get_logger, parse_bytes  # noqa: F401

logger = get_logger(__name__)

FLAT_MAX_BYTES = 256 << 20
HNSW_MAX = 250_000
IVF_FLAT_MAX = 1_000_000
HNSW_M = 32
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # autofaiss's candidates
ID_BYTES = 8  # an inverted list stores one int64 id per vector
# an HNSW coarse quantizer only pays off with many lists; with its default efSearch (16) it lost 12% of
# near-copy queries at 1M vectors / 4096 lists (measured), so its efSearch follows nprobe (autofaiss: 2x)
HNSW_QUANTIZER_MIN = 16384
QUANTIZER_EF_MIN = 128
# Exact pixel search, measured on the 2-core development machine (load ~1.3; faiss IndexFlatL2, 2 threads):
# 64 queries over 20k x 3072 took 0.23 s (34 GFLOP/s), 512 queries 0.92 s (68 GFLOP/s). So a scan's 64
# queries cost ~n*dim / 2.7e8 s: 2^31 elements (700k 32-px images) take ~8 s per checkpoint. The build's
# train->train search (every training image a query) costs ~n^2*dim / 3.4e10 s: 1.2e14 takes ~1 h, so it
# binds first (~200k 32-px images, 100k at 64 px, 50k at 128 px). Beyond either, HNSW/IVF with the 2nd
# neighbour's recall measured and tuned. More cores move both limits up in proportion (measure them with
# benchmarks/exact_pixel.py).
PIXEL_SCAN_MAX = 1 << 31
PIXEL_BUILD_MAX = 1.2e14


def faiss_module():
    try:
        import faiss  # noqa: WPS433
    except ImportError as exc:  # pragma: no cover - core dependency
        raise DependencyError("faiss is not installed", hint="pip install faiss-cpu") from exc
    return faiss


@dataclass
class IndexChoice:
    """A chosen index: faiss factory string, family, estimated resident bytes, and why."""

    kind: str                      # flat | hnsw | ivf_flat | ivf_pq
    factory: str
    est_bytes: int
    reason: str
    nlist: int = 0
    rerank: int = 1                # candidates searched per requested one, re-ranked exactly
    on_disk: bool = False          # inverted lists in a .ivfdata file, not in memory
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def default_memory_budget() -> int:
    """Half the machine's physical memory (the index shares it with the model and the sampler)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def n_lists(n: int) -> int:
    """IVF lists: 4*sqrt(n) rounded to a power of two (autofaiss), with >= 39 training points per list."""
    if n < 2:
        return 1
    want = 2 ** round(math.log2(4 * math.sqrt(n)))
    return int(max(1, min(want, n // 39 or 1)))


def _pq_size(dim: int, n: int, budget: int, nlist: int) -> int:
    cap = max(4, dim // 8)
    fitting = [m for m in PQ_SIZES if m <= cap and m < dim]
    for m in fitting:
        if n * (m + ID_BYTES) + nlist * dim * 4 <= budget:
            return m
    return fitting[-1]


def _factory(kind: str, dim: int, n: int, nlist: int, budget: int) -> tuple[str, int, int]:
    """(factory string, estimated resident bytes, rerank) of one index family."""
    if kind == "flat":
        return "Flat", n * dim * 4, 1
    if kind == "hnsw":
        return f"HNSW{HNSW_M}", n * (dim * 4 + HNSW_M * 2 * 4 + 16), 1
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat", n * (dim * 4 + ID_BYTES) + nlist * dim * 4, 1
    m = _pq_size(dim, n, budget, nlist)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_MIN else f"IVF{nlist}"
    est = n * (m // 2 + ID_BYTES) + nlist * dim * 4
    return f"{coarse},PQ{m}x4fs", est, 8


def exact_affordable(n: int, dim: int, budget: int) -> Optional[str]:
    """Why exact (Flat) search of a pixel space is affordable, or None (limits in the module docstring)."""
    if n * dim * 4 > budget:
        return None
    if n * dim > PIXEL_SCAN_MAX or float(n) * n * dim > PIXEL_BUILD_MAX:
        return None
    return (f"pixel space, {n:,} x {dim}: exact search is affordable (scan <= {PIXEL_SCAN_MAX:.2g} n*dim, "
            f"train->train <= {PIXEL_BUILD_MAX:.2g} n^2*dim), so nn_ratio's 2nd neighbour is never missed")


def choose_index(n: int, dim: int, memory_budget: Optional[int] = None, index_type: str = "auto",
                 on_disk: Optional[bool] = None, exact: bool = False) -> IndexChoice:
    """The index for ``n`` vectors of ``dim`` under ``memory_budget`` bytes (see the module docstring).

    Args:
        index_type: ``auto`` applies the rules; ``flat``/``hnsw``/``ivf_flat``/``ivf_pq`` force a family.
        on_disk: inverted lists on disk (None: when the IVF index would exceed the budget).
        exact: the space's detectors need the exact 2nd neighbour (the pixel space): Flat while affordable.
    """
    if index_type not in INDEX_TYPES:
        raise IndexError_(f"unknown index_type {index_type!r}", hint=f"use one of {', '.join(INDEX_TYPES)}")
    budget = memory_budget or default_memory_budget()
    nlist = n_lists(n)
    exact_reason = exact_affordable(n, dim, budget) if exact and index_type == "auto" else None
    if index_type != "auto":
        kind, reason = index_type, "index_type set in the config"
    elif exact_reason:
        kind, reason = "flat", exact_reason
    elif n * dim * 4 <= min(FLAT_MAX_BYTES, budget):
        kind, reason = "flat", f"{n:,} vectors x {dim} fit in {FLAT_MAX_BYTES >> 20} MiB: exact search is cheap"
    elif n < HNSW_MAX and _factory("hnsw", dim, n, nlist, budget)[1] <= budget:
        kind, reason = "hnsw", f"{n:,} < {HNSW_MAX:,} vectors and HNSW fits the budget"
    elif n < IVF_FLAT_MAX and _factory("ivf_flat", dim, n, nlist, budget)[1] <= budget:
        kind, reason = "ivf_flat", f"{n:,} < {IVF_FLAT_MAX:,} vectors and IVF-Flat fits the budget"
    else:
        kind, reason = "ivf_pq", f"{n:,} vectors: compressed codes, exact re-ranking from the stored vectors"
    factory, est, rerank = _factory(kind, dim, n, nlist, budget)
    if on_disk and not kind.startswith("ivf"):
        raise IndexError_(f"on-disk inverted lists need an IVF index, not {kind}",
                          hint="use index_type ivf_flat or ivf_pq (or auto), or drop on_disk")
    disk = kind.startswith("ivf") and (on_disk if on_disk is not None else est > budget)
    if disk and kind == "ivf_pq":
        factory = factory.replace("x4fs", "x4")  # fast-scan block lists cannot live on disk
    if est > budget and not disk:
        logger.warning("the %s index of %s vectors needs ~%.1f GB, over the memory budget of %.1f GB",
                       kind, f"{n:,}", est / 1e9, budget / 1e9)
    return IndexChoice(kind, factory, int(est), reason, nlist if kind.startswith("ivf") else 0, rerank, bool(disk))


def make_index(choice: IndexChoice, metric: str, dim: int):
    """An empty (untrained) faiss index for ``choice``; cosine spaces search by inner product."""
    faiss = faiss_module()
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if choice.kind == "flat":
        return faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    return faiss.index_factory(dim, choice.factory, fmetric)


def training_sample(n: int, choice: IndexChoice, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of the vectors the quantizer is trained on (40 per list -- faiss warns below 39 --
    and at least 10k, which PQ codebooks of 256 centroids need)."""
    size = min(n, max(40 * max(choice.nlist, 1), 10_000))
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


# ------------------------------------------------------------------------------------------ parameters


def set_search_params(index, params: dict) -> None:
    """Apply ``{"nprobe": 16}`` / ``{"efSearch": 64}`` through faiss's ParameterSpace (any wrapping)."""
    if not params:
        return
    faiss = faiss_module()
    space = faiss.GpuParameterSpace() if _is_gpu(index) else faiss.ParameterSpace()
    for key, value in params.items():
        space.set_index_parameter(index, key, value)


def _is_gpu(index) -> bool:
    return "Gpu" in type(index).__name__


def _param_range(kind: str, index, k: int) -> tuple[str, list[int]]:
    if kind == "hnsw":
        return "efSearch", sorted({max(k, 16) * 2 ** i for i in range(9)})
    if kind.startswith("ivf"):
        nlist = faiss_module().extract_index_ivf(index).nlist
        return "nprobe", list(range(1, min(nlist, 2048) + 1))
    return "", []


# -------------------------------------------------------------------------------------------- recall


@dataclass
class RecallResult:
    """Recall@k of an index against exact search, measured leave-one-out on ``n_queries`` training vectors."""

    recall_at_k: float
    recall_at_1: float
    k: int
    n_queries: int
    params: dict
    target: Optional[float] = None
    met: bool = True
    tuned: bool = False
    rerank: int = 1
    recall_2nd: Optional[float] = None   # 2nd nearest training image of generated-like queries (pixel)

    def to_dict(self) -> dict:
        return asdict(self)


def _exact_others(fetch: Callable, n: int, qids: np.ndarray, k: int, metric: str, chunk: int = 65536):
    """Exact scores of each query's top-k *other* vectors (higher is better), streaming the database."""
    queries = fetch(qids)
    best = np.full((len(qids), k), -np.inf)
    for start in range(0, n, chunk):
        block = fetch(np.arange(start, min(n, start + chunk)))
        s = _scores(queries, block, metric)
        own = (qids >= start) & (qids < start + len(block))
        s[np.nonzero(own)[0], qids[own] - start] = -np.inf
        kk = min(k, s.shape[1])
        top = -np.partition(-s, kk - 1, axis=1)[:, :kk]
        merged = np.concatenate([best, top], axis=1)
        best = -np.sort(-merged, axis=1)[:, :k]
    return best


def _scores(q: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    """Higher-is-better scores: inner product, or minus squared L2 -- in float64, because the float32
    expansion loses ~1e-4 to cancellation, enough to call a tied (duplicate) neighbour a miss."""
    q, x = np.asarray(q, np.float64), np.asarray(x, np.float64)
    if metric == "cosine":
        return q @ x.T
    return -((q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None])


def measure_recall(search: Callable, fetch: Callable, n: int, metric: str, k: int, qids: np.ndarray,
                   exact: Optional[np.ndarray] = None) -> tuple[float, float]:
    """(recall@k, recall@1), tie-aware: a returned neighbour counts when its exact score is at least the
    exact k-th best *other* score. ``search(queries, k) -> ids``; ``fetch(ids) -> prepared vectors``."""
    k = max(1, min(k, n - 1))
    exact = _exact_others(fetch, n, qids, k, metric) if exact is None else exact
    queries = fetch(qids)
    ids = search(queries, k + 1)
    hits_k, hits_1 = 0.0, 0.0
    for i, qid in enumerate(qids):
        got = [j for j in ids[i] if j >= 0 and j != qid][:k]
        if not got:
            continue
        s = _scores(queries[i:i + 1], fetch(np.asarray(got)), metric)[0]
        tol = 1e-5 * max(1.0, abs(float(exact[i, 0])))
        hits_k += float((s >= exact[i, k - 1] - tol).sum()) / k
        hits_1 += float(s[0] >= exact[i, 0] - tol)
    return hits_k / len(qids), hits_1 / len(qids)


def held_out(n: int, n_queries: int, seed: int = 1) -> np.ndarray:
    if n <= n_queries:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, n_queries, replace=False))


def tune(index, kind: str, search_with: Callable, fetch: Callable, n: int, metric: str, k: int,
         target: float, n_queries: int = 1000, rerank_options: tuple = (1,),
         second: Optional[Callable] = None) -> RecallResult:
    """Smallest search parameter (nprobe / efSearch) whose leave-one-out recall@k reaches ``target``.

    ``search_with(queries, k, rerank) -> ids`` searches ``index`` as it is set now. With ``second``
    (``second(search) -> recall``, e.g. a :class:`memtrack.index.recall.SecondNeighbour`), the recall of
    the 2nd nearest training image must reach ``target`` too. When even the largest parameter misses the
    target, the next ``rerank`` option is tried; then the best reachable setting is kept and a warning names
    the recall reached.
    """
    qids = held_out(n, n_queries)
    kk = max(1, min(k, n - 1))
    exact = _exact_others(fetch, n, qids, kk, metric)
    name, values = _param_range(kind, index, kk)
    hnsw_q = has_hnsw_quantizer(index)

    def params(value: int) -> dict:
        extra = {"quantizer_efSearch": max(2 * value, QUANTIZER_EF_MIN)} if hnsw_q and name == "nprobe" else {}
        return {name: value, **extra}

    def recall(value: Optional[int], rerank: int) -> tuple:
        if name:
            set_search_params(index, params(value))
        r = measure_recall(lambda q, kq: search_with(q, kq, rerank), fetch, n, metric, kk, qids, exact)
        r2 = second(lambda q, kq: search_with(q, kq, rerank)) if second is not None else None
        return r[0], r[1], r2

    def ok(r: tuple) -> bool:
        return r[0] >= target and (r[2] is None or r[2] >= target)

    def result(r: tuple, prm: dict, met: bool, tuned: bool, rerank: int) -> RecallResult:
        return RecallResult(r[0], r[1], kk, len(qids), prm, target, met, tuned, rerank, r[2])

    if not name:
        r = recall(None, 1)
        return result(r, {}, ok(r), False, 1)
    for rerank in rerank_options:
        top = recall(values[-1], rerank)
        if ok(top):
            break
    if not ok(top):
        set_search_params(index, params(values[-1]))
        logger.warning("recall target %.2f not reached: recall@%d is %.3f%s with %s=%d and rerank %d (the largest "
                       "tried); detectors will miss some true neighbours -- use index_type flat, or a larger "
                       "memory budget", target, kk, top[0],
                       "" if top[2] is None else f", 2nd-neighbour recall {top[2]:.3f}", name, values[-1], rerank)
        return result(top, params(values[-1]), False, True, rerank)
    lo, hi, best = 0, len(values) - 1, top
    while lo < hi:  # smallest value meeting the target (recall grows with the parameter)
        mid = (lo + hi) // 2
        r = recall(values[mid], rerank)
        if ok(r):
            hi, best = mid, r
        else:
            lo = mid + 1
    set_search_params(index, params(values[hi]))
    return result(best, params(values[hi]), True, True, rerank)


def has_hnsw_quantizer(index) -> bool:
    try:
        ivf = faiss_module().extract_index_ivf(index)
    except RuntimeError:
        return False
    return "HNSW" in type(faiss_module().downcast_index(ivf.quantizer)).__name__


def search_reranked(index, fetch: Callable, metric: str, queries: np.ndarray, k: int, rerank: int = 1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """faiss search; with ``rerank > 1``, ``k * rerank`` candidates re-ranked by exact distance.

    Returns faiss-style ``(scores, ids)``: inner products (descending) for cosine spaces, squared L2
    (ascending) otherwise; ids -1 where fewer exist.
    """
    if rerank <= 1:
        return index.search(queries, k)
    _, cand = index.search(queries, k * rerank)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(queries), 256):
        c = cand[s:s + 256]
        valid = c >= 0
        vecs = fetch(np.where(valid, c, 0).reshape(-1)).reshape(*c.shape, -1)
        q = queries[s:s + 256, None, :]
        sc = (vecs * q).sum(-1) if metric == "cosine" else -((vecs - q) ** 2).sum(-1)
        sc = np.where(valid, sc, -np.inf)
        order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        scores[s:s + 256] = np.take_along_axis(sc, order, 1)
        ids[s:s + 256] = np.where(np.isfinite(scores[s:s + 256]), np.take_along_axis(c, order, 1), -1)
    if metric != "cosine":
        scores = np.where(ids >= 0, -scores, np.inf).astype(np.float32)
    return scores, ids
