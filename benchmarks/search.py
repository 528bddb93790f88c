"""Search at scale: memtrack's chosen faiss index vs two exact baselines, measured in one run.

Synthetic clustered, L2-normalised vectors (CLIP-like, cosine space): ``--n`` training vectors around
``--n / 100`` centres, and ``--queries`` queries -- half near-copies of training vectors (what a memorized
sample looks like), half fresh draws from the same mixture (an ordinary sample). The baseline searches the
way Somepalli et al.'s code does: ``torch.mm`` of query chunks against the training features, then topk
(the features read in blocks of 1M, the running top-k merged, so sets larger than memory work too). The
second baseline is the strongest exact CPU search at hand: faiss ``IndexFlatIP`` over the same
blocks with every query in one batch, so faiss runs one BLAS matrix product per block -- the speed-up
against it is the speed-up against the limit of exact search, not just against the usual peer.
memtrack's path is :mod:`memtrack.index.choice`: choose by size and memory budget, train on a sample, fill,
tune nprobe/efSearch to ``--recall-target`` recall@k on 1,000 held-out training vectors, search (with exact
re-ranking for PQ codes). Reported: recall@1 and recall@k against the brute-force truth (tie-aware), the
speed ratio to each baseline, bytes per vector (index file; the float32 vectors stay on disk, memory-mapped, for exact
re-checks), build time, peak memory, the machine's load average. The last line printed is one JSON object.

    python benchmarks/search.py                       # 1M x 512, 10k queries (~15 min on 2 busy cores)
    python benchmarks/search.py --n 100000 --queries 2000
    python benchmarks/search.py --n 10000000 --queries 1000 --data-file /scratch/x10m.npy   # 20 GB on disk

The 10M point was measured on the idle 2-core development machine with the third command (recall@1 0.974,
x114 against torch brute force, 76 min to build; docs/scale.md), before the IndexFlatIP baseline existed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memtrack.index import choice as ic
from memtrack.index import files as fx


def make_data(n: int, dim: int, n_queries: int, seed: int = 0, data_file: Path | None = None):
    """Clustered unit vectors, generated and normalised block by block (float32 throughout).

    With ``data_file`` the vectors go to a memory-mapped ``.npy`` file (for sets larger than memory: 10M x
    512 is 20 GB); the file is reused when it already holds an array of this shape.
    """
    rng = np.random.default_rng(seed)
    clusters = max(10, n // 100)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    reuse = False
    if data_file is None:
        x = np.empty((n, dim), np.float32)
    elif data_file.exists() and np.load(data_file, mmap_mode="r").shape == (n, dim):
        x, reuse = np.load(data_file, mmap_mode="r"), True
    else:
        x = np.lib.format.open_memmap(data_file, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        block = centres[rng.integers(0, clusters, e - s)] + 0.6 * rng.standard_normal((e - s, dim), dtype=np.float32)
        if not reuse:  # the generator is advanced either way, so the queries are the same
            x[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    if data_file is not None and not reuse:
        x.flush()
        x = np.load(data_file, mmap_mode="r")
    half = n_queries // 2
    near = x[rng.integers(0, n, half)] + 0.02 * rng.standard_normal((half, dim), dtype=np.float32)
    fresh = centres[rng.integers(0, clusters, n_queries - half)] + 0.6 * rng.standard_normal(
        (n_queries - half, dim), dtype=np.float32)
    q = np.concatenate([near, fresh])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def brute_force(x: np.ndarray, q: np.ndarray, k: int, chunk: int = 128, db_block: int = 1_000_000):
    """Somepalli et al.-style exact search: torch.mm of query chunks against every vector, then topk.

    The database is read in blocks of ``db_block`` vectors (one pass, each block against every query
    chunk, the running top-k merged), so a memory-mapped set larger than memory is read once.
    """
    import torch

    scores = torch.full((len(q), k), -float("inf"))
    ids = torch.zeros((len(q), k), dtype=torch.int64)
    queries = torch.from_numpy(np.ascontiguousarray(q))
    with torch.inference_mode():
        for b in range(0, len(x), db_block):
            db = torch.from_numpy(np.array(x[b:b + db_block], dtype=np.float32))  # a writable copy of the block
            for s in range(0, len(q), chunk):
                top = torch.mm(queries[s:s + chunk], db.T).topk(min(k, len(db)), dim=1)
                both_s = torch.cat([scores[s:s + chunk], top.values], 1)
                both_i = torch.cat([ids[s:s + chunk], top.indices + b], 1)
                best = both_s.topk(k, dim=1)
                scores[s:s + chunk], ids[s:s + chunk] = best.values, both_i.gather(1, best.indices)
    return scores.numpy(), ids.numpy()


def faiss_flat(x: np.ndarray, q: np.ndarray, k: int, db_block: int = 1_000_000):
    """Exact search with faiss ``IndexFlatIP``: all queries at once against each block (one BLAS GEMM per
    block inside faiss), the running top-k merged as in :func:`brute_force`."""
    import faiss

    queries = np.ascontiguousarray(q, dtype=np.float32)
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.zeros((len(q), k), dtype=np.int64)
    for b in range(0, len(x), db_block):
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(np.ascontiguousarray(x[b:b + db_block], dtype=np.float32))
        d, i = index.search(queries, min(k, index.ntotal))
        both_s, both_i = np.concatenate([scores, d], 1), np.concatenate([ids, i + b], 1)
        order = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(both_s, order, 1), np.take_along_axis(both_i, order, 1)
    return scores, ids


def recall(exact_scores: np.ndarray, got_ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int) -> tuple[float, float]:
    """Tie-aware recall@1 and recall@k: a hit is a returned vector at least as close as the exact k-th."""
    got = np.where(got_ids >= 0, got_ids, 0)
    s = np.einsum("nd,nkd->nk", q, x[got.reshape(-1)].reshape(*got.shape, -1))
    s = np.where(got_ids >= 0, s, -np.inf)
    tol = 1e-5
    r1 = float(np.mean(s[:, 0] >= exact_scores[:, 0] - tol))
    rk = float(np.mean((s[:, :k] >= exact_scores[:, k - 1:k] - tol).sum(1) / k))
    return r1, rk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--index-type", default="auto", choices=ic.INDEX_TYPES)
    p.add_argument("--memory-budget", default=None, help="e.g. 1GB (default: half the physical memory)")
    p.add_argument("--recall-target", type=float, default=0.95)
    p.add_argument("--data-file", type=Path, default=None,
                   help="keep the vectors in this memory-mapped .npy (needed when n x dim x 4 bytes is near RAM)")
    args = p.parse_args()
    load0 = os.getloadavg()
    out = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "cpus": os.cpu_count(),
           "machine": platform.machine()}

    t = time.perf_counter()
    x, q = make_data(args.n, args.dim, args.queries, data_file=args.data_file)
    out["data_s"] = round(time.perf_counter() - t, 1)

    # 1. the baseline: brute force in chunks (also the ground truth)
    t = time.perf_counter()
    exact_s, exact_i = brute_force(x, q, args.k)
    out["brute_force_s"] = round(time.perf_counter() - t, 2)
    print(f"brute force: {out['brute_force_s']} s for {args.queries} queries", flush=True)

    # 1b. the strongest exact baseline: faiss IndexFlatIP, every query in one BLAS batch
    t = time.perf_counter()
    _, flat_i = faiss_flat(x, q, args.k)
    out["flat_ip_s"] = round(time.perf_counter() - t, 2)
    out["flat_ip_recall_at_1"] = round(recall(exact_s, flat_i, x, q, args.k)[0], 4)  # exact: 1.0 up to ties
    print(f"faiss IndexFlatIP: {out['flat_ip_s']} s for {args.queries} queries", flush=True)

    # 2. memtrack's index: choose, train, fill, tune
    icfg = SimpleNamespace(memory_budget=args.memory_budget, index_type=args.index_type, on_disk=None, k=args.k,
                           recall_target=args.recall_target, recall_queries=1000)
    fetch = lambda ids: x[np.asarray(ids)]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        built = fx.build_faiss(Path(tmp), "clip", "cosine", args.dim, x, lambda a: np.ascontiguousarray(a), icfg)
        out["train_add_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        tuned = fx.tune_built(built, "cosine", fetch, args.n, icfg)
        out["tune_s"] = round(time.perf_counter() - t, 1)
        out["build_s"] = round(out["train_add_s"] + out["tune_s"], 1)
        fx.write_built(built, Path(tmp) / "clip.faiss")
        files = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.name.startswith("clip.")
                    and not f.name.endswith("trained.faiss"))
        out.update(index=built.choice.factory, kind=built.choice.kind, reason=built.choice.reason,
                   params=tuned.params, rerank=tuned.rerank, tuned_recall_at_k=round(tuned.recall_at_k, 4),
                   bytes_per_vector=round(files / args.n, 1), flat_bytes_per_vector=4 * args.dim)
        print(f"index {built.choice.factory} {tuned.params} rerank {tuned.rerank}: built in {out['build_s']} s",
              flush=True)

        # 3. search the queries
        t = time.perf_counter()
        _, got = ic.search_reranked(built.index, fetch, "cosine", q, args.k, tuned.rerank)
        out["index_search_s"] = round(time.perf_counter() - t, 3)
    r1, rk = recall(exact_s, got, x, q, args.k)
    half = args.queries // 2
    out.update(recall_at_1=round(r1, 4), recall_at_k=round(rk, 4),
               recall_at_1_near_copies=round(recall(exact_s[:half], got[:half], x, q[:half], args.k)[0], 4),
               recall_at_1_fresh=round(recall(exact_s[half:], got[half:], x, q[half:], args.k)[0], 4),
               speedup=round(out["brute_force_s"] / max(out["index_search_s"], 1e-9), 1),
               speedup_vs_flat_ip=round(out["flat_ip_s"] / max(out["index_search_s"], 1e-9), 1),
               ms_per_query_flat_ip=round(1000 * out["flat_ip_s"] / args.queries, 3),
               ms_per_query_index=round(1000 * out["index_search_s"] / args.queries, 3),
               ms_per_query_brute=round(1000 * out["brute_force_s"] / args.queries, 3),
               peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
               loadavg_before=[round(v, 2) for v in load0], loadavg_after=[round(v, 2) for v in os.getloadavg()])
    print(f"recall@1 {r1:.4f} (goal >= 0.95), recall@{args.k} {rk:.4f}; "
          f"{out['bytes_per_vector']} B/vector vs {4 * args.dim} for float32", flush=True)
    print(f"speed-up x{out['speedup']} vs torch brute force ({out['ms_per_query_index']} vs "
          f"{out['ms_per_query_brute']} ms/query), x{out['speedup_vs_flat_ip']} vs faiss IndexFlatIP "
          f"({out['ms_per_query_flat_ip']} ms/query)", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
