"""Detectors on candidates: memtrack's vectorized nn_ratio / tiled_l2 vs a per-pair Python loop and vs
the memory-bandwidth limit of reading the candidates.

For ``--samples`` generated images, each with ``--k`` candidate training images at ``--res`` px (what a scan
hands the detectors after the index search, float32 in [0, 1]), both implementations compute the same
statistics -- Gu et al.'s d1/d2 ratio on RMS pixel distances and Carlini et al.'s 4x4 tiled RMS distance --
and the results are asserted equal (and the planted exact copies at exactly 0) before the timings are
compared. The limit is the time numpy takes to read the candidate array once (a vertical ``np.add.reduce``
over its rows, in the same run): no detector that reads every candidate can beat it. Vectorized times and
the limit are the best of ``--repeats``; each loop runs once. Single-threaded (numpy's elementwise code is).
The last line printed is one JSON object.

    python benchmarks/detectors.py [--samples 1000] [--k 10] [--res 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memtrack.detectors.core import nn_ratio, tiled_l2  # noqa: E402


def loop_nn_ratio(q: np.ndarray, c: np.ndarray) -> list[float]:
    out = []
    for i in range(len(q)):
        d = []
        for j in range(c.shape[1]):
            diff = c[i, j].astype(np.float64).ravel() - q[i].astype(np.float64).ravel()
            d.append(math.sqrt(float((diff * diff).sum()) / diff.size))
        d1, d2 = sorted(d)[:2]
        out.append(d1 / d2 if d2 > 0 else 0.0)
    return out


def loop_tiled(q: np.ndarray, c: np.ndarray, grid: int = 4) -> list[float]:
    h = q.shape[-1]
    edges = np.linspace(0, h, grid + 1).round().astype(int)
    out = []
    for i in range(len(q)):
        best = math.inf
        for j in range(c.shape[1]):
            worst = 0.0
            for y0, y1 in zip(edges[:-1], edges[1:]):
                for x0, x1 in zip(edges[:-1], edges[1:]):
                    diff = c[i, j][:, y0:y1, x0:x1].astype(np.float64) - q[i][:, y0:y1, x0:x1].astype(np.float64)
                    worst = max(worst, math.sqrt(float((diff * diff).mean())))
            best = min(best, worst)
        out.append(best)
    return out


def timed(fn, *args, repeats: int = 1):
    """(result, best wall time over ``repeats`` calls)."""
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - t)
    return result, best


def read_once(c: np.ndarray) -> np.ndarray:
    """Read every candidate value once: the memory-bandwidth limit of any detector on these candidates."""
    return np.add.reduce(c.reshape(c.shape[0] * c.shape[1], -1), axis=0)  # rows of one candidate each


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="best of this many runs of the vectorized code")
    args = p.parse_args()
    load0 = os.getloadavg()
    rng = np.random.default_rng(0)
    q = rng.random((args.samples, 3, args.res, args.res), dtype=np.float32)
    c = np.clip(q[:, None] + 0.2 * rng.standard_normal((args.samples, args.k, 3, args.res, args.res),
                                                       dtype=np.float32), 0, 1)
    c[::7, 0] = q[::7]  # some exact copies: d1 = 0
    flat_q, flat_c = q.reshape(args.samples, -1), c.reshape(args.samples, args.k, -1)

    r = args.repeats
    _, t_read = timed(read_once, c, repeats=r)
    vec_nn, t_vec_nn = timed(lambda: nn_ratio(flat_q, flat_c).score, repeats=r)
    loop_nn, t_loop_nn = timed(loop_nn_ratio, q, c)
    np.testing.assert_allclose(vec_nn, loop_nn, rtol=1e-9, atol=1e-12)
    vec_t, t_vec_t = timed(lambda: tiled_l2(q, c).score, repeats=r)
    loop_t, t_loop_t = timed(loop_tiled, q, c)
    np.testing.assert_allclose(vec_t, loop_t, rtol=1e-9, atol=1e-12)
    assert (vec_nn[::7] == 0).all() and (vec_t[::7] == 0).all(), "an exact copy is not at distance exactly 0"

    gb = c.nbytes / 1e9
    out = {"samples": args.samples, "k": args.k, "res": args.res, "repeats": r, "results_equal": True,
           "exact_copies_at_zero": True, "candidate_bytes": int(c.nbytes),
           "read_once_s": round(t_read, 4), "read_once_gb_s": round(gb / t_read, 2),
           "nn_ratio_vectorized_s": round(t_vec_nn, 4), "nn_ratio_loop_s": round(t_loop_nn, 4),
           "nn_ratio_speedup": round(t_loop_nn / t_vec_nn, 1), "nn_ratio_vs_limit": round(t_vec_nn / t_read, 2),
           "tiled_l2_vectorized_s": round(t_vec_t, 4), "tiled_l2_loop_s": round(t_loop_t, 4),
           "tiled_l2_speedup": round(t_loop_t / t_vec_t, 1), "tiled_l2_vs_limit": round(t_vec_t / t_read, 2),
           "loadavg_before": [round(v, 2) for v in load0], "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    print(f"read the candidates once ({gb:.3f} GB): {t_read:.4f} s ({out['read_once_gb_s']} GB/s)")
    for name in ("nn_ratio", "tiled_l2"):
        print(f"{name}: vectorized {out[name + '_vectorized_s']:.4f} s vs loop {out[name + '_loop_s']:.3f} s "
              f"(x{out[name + '_speedup']}), {out[name + '_vs_limit']}x the read-once limit")
    print("results equal; exact copies at distance exactly 0")
    print(json.dumps(out))

if __name__ == "__main__":
    main()
