"""The vectorised distance kernels against straightforward per-pair definitions (issue 13 part 4).

The references below are the published definitions written the obvious way, one pair at a time in float64:
Gu et al. 2023's RMS pixel distance and d1/d2 ratio, Carlini et al. 2023's max-over-tiles RMS error.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from memtrack.detectors import core as detectors
from memtrack.detectors.core import _tile_bounds, exact_rms_distances, nn_ratio, tiled_distances, tiled_l2


def ref_rms(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    out = np.empty(c.shape[:2])
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            diff = c[i, j].astype(np.float64).ravel() - q[i].astype(np.float64).ravel()
            out[i, j] = math.sqrt(float((diff * diff).sum()) / diff.size)
    return out


def ref_tiled(q: np.ndarray, c: np.ndarray, grid: int) -> np.ndarray:
    out = np.empty(c.shape[:2])
    ys, xs = _tile_bounds(q.shape[2], grid), _tile_bounds(q.shape[3], grid)
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            worst = 0.0
            for y0, y1 in ys:
                for x0, x1 in xs:
                    diff = c[i, j][:, y0:y1, x0:x1].astype(np.float64) - q[i][:, y0:y1, x0:x1].astype(np.float64)
                    worst = max(worst, math.sqrt(float((diff * diff).mean())))
            out[i, j] = worst
    return out


def pairs(rng, n, k, shape, dtype=np.float32, copies=True):
    """Samples and candidates near them; every third sample has an exact copy among its candidates."""
    q = rng.random((n, *shape)).astype(dtype)
    c = np.clip(q[:, None] + 0.3 * rng.standard_normal((n, k, *shape)), 0, 1).astype(dtype)
    if copies:
        c[::3, k // 2] = q[::3]
    return q, c


@pytest.fixture(params=[1 << 20, 4096], ids=["default-blocks", "tiny-blocks"])
def blocks(request, monkeypatch):
    """Run each test with the default block size and with blocks of a single sample (many block edges)."""
    monkeypatch.setattr(detectors, "_BLOCK_BYTES", request.param)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k,dim", [(7, 5, 48), (33, 2, 3 * 8 * 8), (1, 1, 1), (0, 3, 12)])
def test_rms_distances_equal_the_per_pair_definition(blocks, dtype, n, k, dim):
    q, c = pairs(np.random.default_rng(n * 100 + k), n, k, (dim,), dtype)
    np.testing.assert_allclose(exact_rms_distances(q, c), ref_rms(q, c), rtol=1e-12, atol=0)


def test_rms_distances_of_exact_copies_are_exactly_zero(blocks):
    q, c = pairs(np.random.default_rng(1), 12, 4, (3 * 16 * 16,))
    d = exact_rms_distances(q, c)
    assert (d[::3, 2] == 0.0).all()
    assert (np.delete(d, 2, axis=1) > 0).all()


def test_rms_distances_accept_uint8_pixels_without_wrapping():
    # uint8 a - b would wrap around; the kernel subtracts in float64
    q = np.array([[0, 255, 10]], np.uint8)
    c = np.array([[[255, 0, 10], [0, 255, 10]]], np.uint8)
    np.testing.assert_array_equal(exact_rms_distances(q, c), [[math.sqrt(2 * 255 ** 2 / 3), 0.0]])


@pytest.mark.parametrize("hw,grid", [((32, 32), 4), ((16, 24), 4), ((10, 10), 4), ((13, 11), 3), ((8, 8), 1),
                                     ((9, 12), 2)])
def test_tiled_distances_equal_the_per_pair_definition(blocks, hw, grid):
    q, c = pairs(np.random.default_rng(sum(hw) + grid), 5, 4, (3, *hw))
    np.testing.assert_allclose(tiled_distances(q, c, grid), ref_tiled(q, c, grid), rtol=1e-12, atol=0)


@pytest.mark.parametrize("hw", [(32, 32), (30, 30)])
def test_tiled_distances_of_exact_copies_are_exactly_zero(blocks, hw):
    q, c = pairs(np.random.default_rng(2), 9, 3, (3, *hw))
    d = tiled_distances(q, c, 4)
    assert (d[::3, 1] == 0.0).all()
    assert (np.delete(d, 1, axis=1) > 0).all()


def test_tiled_distance_sees_one_changed_tile():
    # the max over tiles: one tile off by 0.5 everywhere gives exactly 0.5, whatever the other 15 do
    q = np.zeros((1, 3, 32, 32), np.float32)
    c = np.zeros((1, 1, 3, 32, 32), np.float32)
    c[0, 0, :, 8:16, 24:32] = 0.5
    assert tiled_distances(q, c, 4)[0, 0] == 0.5


def test_nn_ratio_and_tiled_l2_scores_equal_the_definitions(blocks):
    q, c = pairs(np.random.default_rng(3), 20, 6, (3, 16, 16))
    rms = ref_rms(q.reshape(20, -1), c.reshape(20, 6, -1))
    d = np.sort(rms, axis=1)
    expected = np.where(d[:, 1] > 0, d[:, 0] / np.where(d[:, 1] > 0, d[:, 1], 1), 0.0)
    out = nn_ratio(q.reshape(20, -1), c.reshape(20, 6, -1))
    np.testing.assert_allclose(out.score, expected, rtol=1e-12, atol=0)
    assert (out.score[::3] == 0.0).all() and (out.extra["d1"][::3] == 0.0).all()
    tiled = tiled_l2(q, c)
    np.testing.assert_allclose(tiled.score, ref_tiled(q, c, 4).min(axis=1), rtol=1e-12, atol=0)
    assert (tiled.score[::3] == 0.0).all()


def test_flat_distance_is_the_tiled_distance_to_the_mean_colour():
    x = np.random.default_rng(4).random((6, 3, 12, 12))
    flat = np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape)
    np.testing.assert_allclose(detectors.flat_distance(x), ref_tiled(flat, x[:, None], 4)[:, 0], rtol=1e-12)
    assert detectors.flat_distance(np.full((1, 3, 8, 8), 0.25))[0] == 0.0
