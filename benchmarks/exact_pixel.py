"""Where exact (Flat) pixel search stops being affordable on this machine -- the limits in index_choice.py.

Times faiss ``IndexFlatL2`` on random pixel-like vectors: a scan's 64 queries (one checkpoint's samples) and a
512-query block (how the build's train->train search runs, every training image a query), and derives the
throughput in GFLOP/s (2 x n x dim multiply-adds per query). From those it prints, for the limits memtrack
uses (``PIXEL_SCAN_MAX`` = n x dim, ``PIXEL_BUILD_MAX`` = n^2 x dim), the seconds they cost here, and the
largest exact pixel set at 32, 64 and 128 px. The last line printed is one JSON object.

    python benchmarks/exact_pixel.py [--n 20000] [--dim 3072] [--threads 2]

Run it on an idle machine for real numbers; a small ``--n`` is enough (the cost is linear in n x dim).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memtrack.index import choice as ic


def timed(index, q: np.ndarray, k: int) -> float:
    index.search(q[:2], k)  # warm-up
    t0 = time.perf_counter()
    index.search(q, k)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=3 * 32 * 32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    faiss = ic.faiss_module()
    faiss.omp_set_num_threads(a.threads)
    x = np.random.default_rng(0).random((a.n, a.dim), dtype=np.float32)
    index = faiss.IndexFlatL2(a.dim)
    index.add(x)
    t64 = timed(index, x[:64] + 0.01, 10)
    t512 = timed(index, x[:512], 51)
    scan_gflops = 2 * 64 * a.n * a.dim / t64 / 1e9
    build_gflops = 2 * 512 * a.n * a.dim / t512 / 1e9
    scan_s = 2 * 64 * ic.PIXEL_SCAN_MAX / (scan_gflops * 1e9)
    build_s = 2 * ic.PIXEL_BUILD_MAX / (build_gflops * 1e9)
    largest = {f"{r}px": int(min(ic.PIXEL_SCAN_MAX / (3 * r * r), (ic.PIXEL_BUILD_MAX / (3 * r * r)) ** 0.5))
               for r in (32, 64, 128)}
    out = {"n": a.n, "dim": a.dim, "threads": a.threads, "load": round(os.getloadavg()[0], 2),
           "flat_64_queries_s": round(t64, 3), "flat_512_queries_s": round(t512, 3),
           "scan_gflops": round(scan_gflops, 1), "build_gflops": round(build_gflops, 1),
           "scan_limit_s": round(scan_s, 1), "build_limit_s": round(build_s), "largest_exact": largest}
    print(f"64 queries over {a.n:,} x {a.dim}: {t64:.3f} s ({scan_gflops:.1f} GFLOP/s); 512 queries: {t512:.3f} s "
          f"({build_gflops:.1f} GFLOP/s)")
    print(f"at the limits: a scan of 64 samples {scan_s:.1f} s, the train->train build {build_s / 3600:.1f} h; "
          f"largest exact pixel set: {largest}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
