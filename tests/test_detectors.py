"""The published memorization tests on hand-built cases (issue 2, "Tests").

Training images are five real photographs (scikit-image) at 32x32, pixels in [0, 1], laid out as the
pixel embedder lays them out ([3, H, W], flattened for the vector detectors).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers_core import against_all, scene, training_images
from memtrack.config import DetectorsConfig
from memtrack.detectors.core import (DetectorOutput, SpaceEvidence, _tile_bounds, adaptive_l2, copy_score,
                                     exact_rms_distances, nn_ratio, tiled_distances, tiled_l2)
from memtrack.detectors.registry import list_detectors, run_detectors

TRAIN = training_images()  # [5, 3, 32, 32]
N_TRAIN = len(TRAIN)
ASTRONAUT, COFFEE = 0, 1


def flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(*x.shape[: x.ndim - 3], -1)


def pixel_tests(query: np.ndarray, train: np.ndarray = TRAIN):
    """nn_ratio and tiled_l2 of ``query`` [n, 3, H, W] against every training image."""
    cand = against_all(query, train)
    return nn_ratio(flat(query), flat(cand)), tiled_l2(query, cand)


def test_the_training_images_are_distinct():
    # the premise of every case below: no two training images are near-copies of each other
    d = exact_rms_distances(flat(TRAIN), flat(against_all(TRAIN, TRAIN)))
    off = d[~np.eye(N_TRAIN, dtype=bool)]
    assert off.min() > 0.25


def test_exact_copy_is_flagged_by_both_with_zero_distances():
    nn, tiled = pixel_tests(TRAIN.copy())
    assert nn.extra["d1"].tolist() == [0.0] * N_TRAIN
    assert nn.score.tolist() == [0.0] * N_TRAIN
    assert nn.flagged.all()
    assert tiled.score.tolist() == [0.0] * N_TRAIN
    assert tiled.flagged.all()
    assert nn.match.tolist() == tiled.match.tolist() == list(range(N_TRAIN))


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_shifted_copy_is_not_a_near_copy_at_32px(shift):
    # A copy shifted by a few pixels (np.roll along the width). At 32x32 these photographs are dense in
    # texture: a 1-3 px shift moves every edge, so every tile's RMS error exceeds Carlini's delta = 0.15
    # (measured: 0.26, 0.35, 0.41) and d1/d2 is far above 1/3 (0.65, 0.95, 0.94). Both published tests are
    # pixel-aligned by design -- a shifted regurgitation is *missed*, which is why memtrack also runs the
    # embedding copy score (Somepalli et al.) that tolerates small translations.
    query = np.roll(TRAIN[ASTRONAUT], shift, axis=2)[None]
    nn, tiled = pixel_tests(query)
    assert not tiled.flagged[0] and tiled.score[0] > 0.2
    assert not nn.flagged[0] and nn.score[0] > 0.5
    assert tiled.match[0] == ASTRONAUT  # still the closest training image, just not close enough


def test_blend_of_two_training_images_is_not_memorized():
    # a 50/50 blend lies exactly halfway between two training images: d1 == d2, ratio 1
    query = (0.5 * TRAIN[ASTRONAUT] + 0.5 * TRAIN[COFFEE])[None]
    nn, tiled = pixel_tests(query)
    assert nn.extra["d1"][0] == pytest.approx(nn.extra["d2"][0], rel=1e-12)
    assert nn.score[0] == pytest.approx(1.0)
    assert not nn.flagged[0]
    assert not tiled.flagged[0]
    assert set(np.argsort(exact_rms_distances(flat(query), flat(against_all(query, TRAIN))))[0, :2]) == {0, 1}


def test_noise_is_not_flagged():
    rng = np.random.default_rng(0)
    query = rng.random((8, 3, 32, 32))
    nn, tiled = pixel_tests(query)
    assert not nn.flagged.any()
    assert not tiled.flagged.any()
    assert (nn.score > 0.5).all() and (tiled.score > 0.3).all()


def test_one_corrupted_tile_tiled_rejects_nn_ratio_flags():
    # Brighten one 8x8 tile of an exact copy by +0.3. The global distance barely moves (one tile of 16),
    # so d1/d2 stays below 1/3 (measured 0.23); the tiled distance takes the max over tiles, so this one
    # tile (RMS about 0.29 > 0.15) is enough to reject the match -- Carlini et al.'s design intent.
    query = TRAIN[ASTRONAUT].copy()
    query[:, 8:16, 8:16] = np.clip(query[:, 8:16, 8:16] + 0.3, 0, 1)
    nn, tiled = pixel_tests(query[None])
    assert nn.flagged[0] and nn.match[0] == ASTRONAUT
    assert not tiled.flagged[0]
    assert 0.15 < tiled.score[0] < 0.35
    # the distance to the right image is exactly that one tile's RMS
    tile_rms = np.sqrt(((query[:, 8:16, 8:16] - TRAIN[ASTRONAUT][:, 8:16, 8:16]) ** 2).mean())
    assert tiled.score[0] == pytest.approx(tile_rms, rel=1e-12)


def test_copy_of_a_duplicated_training_image_is_memorized_not_nan():
    train = np.concatenate([TRAIN, TRAIN[ASTRONAUT:ASTRONAUT + 1]])  # astronaut twice: d1 = d2 = 0
    with np.errstate(all="raise"):  # no 0/0 warning either
        nn, tiled = pixel_tests(TRAIN[ASTRONAUT][None], train)
    assert nn.extra["d1"][0] == 0.0 and nn.extra["d2"][0] == 0.0
    assert nn.score[0] == 0.0 and not np.isnan(nn.score[0])
    assert nn.flagged[0]
    assert tiled.flagged[0] and tiled.score[0] == 0.0
    assert nn.match[0] in (ASTRONAUT, N_TRAIN)


def _many_rows(n: int = 2000, dim: int = 3072):
    rng = np.random.default_rng(7)
    train = rng.random((n, dim), dtype=np.float32)  # pixel-like values in [0, 1]
    return train, train.copy()


def test_exact_copies_are_at_distance_exactly_zero_with_many_rows():
    train, query = _many_rows()
    rows = np.arange(len(train))
    # every sample's candidates: the next training image first, then its own (the copy is not in slot 0)
    cand = np.stack([np.roll(train, -1, axis=0), train], axis=1)
    ids = np.stack([np.roll(rows, -1), rows], axis=1)
    out = nn_ratio(query, cand, candidate_ids=ids)
    assert (out.extra["d1"] == 0.0).all()
    assert (out.score == 0.0).all() and out.flagged.all()
    assert out.match.tolist() == rows.tolist()  # each copy matched to its own training row
    # d2 is the true RMS distance to the other image, computed here in float64 without any matrix product
    other = np.sqrt(((query.astype(np.float64) - np.roll(train, -1, axis=0)) ** 2).mean(axis=1))
    np.testing.assert_allclose(out.extra["d2"], other, rtol=1e-6)
    assert other.min() > 0.3  # uniform pixels: far apart, so d1 = 0 is not a near-tie


def test_torch_cdist_is_not_exact_at_zero_which_is_why_memtrack_avoids_it():
    # torch.cdist switches to ||a||^2 + ||b||^2 - 2ab (a matrix multiply) for more than 25 rows; the
    # cancellation leaves identical rows at a distance of order 1e-2 instead of 0.
    torch = pytest.importorskip("torch")
    train, query = _many_rows()
    d = torch.cdist(torch.from_numpy(query), torch.from_numpy(train)).diagonal()
    if float(d.abs().max()) == 0.0:
        pytest.skip("this torch build's cdist happens to be exact here")
    assert float(d.max()) > 1e-4
    ours = exact_rms_distances(query[:64], np.stack([train[:64]], axis=1))
    assert (ours == 0.0).all()


def test_grayscale_training_images_become_rgb_and_match_exactly(tmp_path):
    from memtrack.data.dataset import open_image
    from memtrack.embedders.registry import get_embedder

    gray = Image.fromarray(np.asarray(scene("camera", 32).convert("L")), "L")
    gray.save(tmp_path / "camera.png")
    for name in ("astronaut", "coffee", "chelsea"):
        scene(name).save(tmp_path / f"{name}.png")
    files = ["camera.png", "astronaut.png", "coffee.png", "chelsea.png"]
    images = [open_image(tmp_path / f) for f in files]
    assert all(im.mode == "RGB" for im in images)
    emb = get_embedder({"name": "pixel", "resolution": 32})
    train = emb.embed(images)
    assert train.shape == (4, 3 * 32 * 32) and train.dtype == np.float32
    cam = train[0].reshape(3, 32, 32)
    assert np.array_equal(cam[0], cam[1]) and np.array_equal(cam[1], cam[2])  # gray replicated, not dropped
    query = emb.embed([gray])  # the sample: the same grayscale image (a PIL "L" image)
    nn = nn_ratio(query, train[None])
    assert nn.flagged[0] and nn.score[0] == 0.0 and nn.match[0] == 0
    tiled = tiled_l2(query.reshape(1, 3, 32, 32), train.reshape(1, 4, 3, 32, 32))
    assert tiled.flagged[0] and tiled.score[0] == 0.0


# ----------------------------------------------------------------------------------- adaptive distance


def _train_lists(train: np.ndarray):
    """Exact train->train lists of ``train`` [n, ...]: every other image, nearest first (rows, RMS)."""
    x = flat(train)
    n = len(x)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
    d[np.arange(n), np.arange(n)] = np.inf
    order = np.argsort(d, axis=1)[:, :n - 1]
    return order, np.take_along_axis(d, order, 1)


def test_adaptive_l2_on_a_constructed_case():
    # Carlini et al. 2023, Section 5.1: l2(x_hat, x) / (alpha * mean l2 from the *training* image x to its n
    # closest training elements, itself included). 1-d "images": distances are differences of values.
    train = np.array([[0.0], [0.1], [0.4], [1.0]])    # rows 0..3
    rows, dist = _train_lists(train[:, :, None, None])
    q = np.array([[0.05], [0.7], [0.0]])
    cand = np.broadcast_to(train, (3, 4, 1)).copy()
    out = adaptive_l2(q, cand, dist, alpha=0.5, n_neighbours=3)
    # sample 0: nearest row 0 (d1 0.05); row 0's 3 closest: itself (0), 0.1, 0.4 -> mean 0.5/3
    assert out.match.tolist() == [0, 2, 0]
    assert out.score[0] == pytest.approx(0.05 / (0.5 * 0.5 / 3))
    # sample 1: nearest row 2 (d1 0.3, tied with row 3 -- the first wins); row 2: 0, 0.3 (row 1), 0.4 (row 0)
    assert out.score[1] == pytest.approx(0.3 / (0.5 * 0.7 / 3))
    assert out.score[2] == 0.0 and not np.isnan(out.score[2])   # an exact copy
    assert out.flagged.tolist() == [True, False, True]
    assert out.extra["neighbourhood"][0] == pytest.approx(0.5 / 3)
    # the normaliser is the training image's, not the generated image's: moving the sample does not change it
    moved = adaptive_l2(q - np.array([[0.02], [0.0], [0.0]]), cand, dist, alpha=0.5, n_neighbours=3)
    assert moved.match[0] == 0 and moved.score[0] != out.score[0]
    assert moved.extra["neighbourhood"][0] == out.extra["neighbourhood"][0]
    # alpha scales the score inversely; n larger than the lists -> no verdict rather than a guess
    assert adaptive_l2(q, cand, dist, alpha=0.25, n_neighbours=3).score[0] == pytest.approx(2 * out.score[0])
    short = adaptive_l2(q, cand, dist, n_neighbours=5)
    assert not short.judged_mask().any() and not short.flagged.any()


def test_adaptive_l2_flags_copies_of_real_images_and_not_blends():
    rows, dist = _train_lists(TRAIN)
    queries = np.stack([TRAIN[COFFEE], 0.5 * TRAIN[ASTRONAUT] + 0.5 * TRAIN[COFFEE]])
    out = adaptive_l2(flat(queries), flat(against_all(queries, TRAIN)), dist, n_neighbours=4)
    assert out.flagged.tolist() == [True, False]
    assert out.match[0] == COFFEE


# ------------------------------------------------------------------------------------------ copy score


def test_copy_score_is_cosine_and_scale_free():
    rng = np.random.default_rng(1)
    cand = rng.normal(size=(4, 6, 16))
    q = cand[np.arange(4), [0, 3, 5, 2]] * np.array([[0.1], [1.0], [7.0], [1e3]])  # unnormalised copies
    unit = copy_score(q / np.linalg.norm(q, axis=1, keepdims=True),
                      cand / np.linalg.norm(cand, axis=2, keepdims=True), threshold=0.5)
    raw = copy_score(q, cand, threshold=0.5)
    assert raw.score == pytest.approx(np.ones(4), abs=1e-12)
    assert unit.score == pytest.approx(raw.score, abs=1e-12)
    assert raw.match.tolist() == [0, 3, 5, 2]
    assert raw.flagged.all() and raw.direction == "above"


def test_copy_score_known_angles_and_zero_vectors():
    q = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    cand = np.array([[[0.0, 1.0], [-1.0, 0.0]],       # orthogonal and opposite: best is 0
                     [[1.0, 1.0], [0.0, 3.0]],        # 45 degrees
                     [[1.0, 0.0], [0.0, 1.0]]])       # the zero vector is similar to nothing
    out = copy_score(q, cand, threshold=0.75, name="clip_copy")
    assert out.name == "clip_copy"
    assert out.score == pytest.approx([0.0, np.sqrt(0.5), 0.0])
    assert not np.isnan(out.score).any()
    assert out.flagged.tolist() == [False, False, False]
    assert copy_score(q, cand, threshold=0.7).flagged.tolist() == [False, True, False]


# -------------------------------------------------------------------------- shapes, ids, registry


@pytest.mark.parametrize("which", ["nn_ratio", "tiled_l2", "adaptive_l2", "copy"])
def test_outputs_have_one_entry_per_sample_and_map_matches_through_candidate_ids(which):
    rng = np.random.default_rng(3)
    n, k = 3, 4
    train_ids = np.array([[40, 41, 42, 43], [7, 8, 9, 10], [100, 3, 55, 2]])
    nearest_pos = [2, 0, 3]  # which candidate slot holds the exact copy
    cand = rng.random((n, k, 3, 8, 8))
    query = cand[np.arange(n), nearest_pos].copy()
    if which == "nn_ratio":
        out = nn_ratio(flat(query), flat(cand), candidate_ids=train_ids)
    elif which == "tiled_l2":
        out = tiled_l2(query, cand, candidate_ids=train_ids)
    elif which == "adaptive_l2":  # every training image 1.0 from its 49 nearest others
        out = adaptive_l2(flat(query), flat(cand), np.ones((101, 49)), candidate_ids=train_ids)
    else:
        out = copy_score(flat(query), flat(cand), candidate_ids=train_ids)
    assert isinstance(out, DetectorOutput)
    assert out.score.shape == out.flagged.shape == out.match.shape == (n,)
    assert out.flagged.dtype == bool and out.match.dtype == np.int64
    assert out.match.tolist() == [42, 7, 2]
    assert out.flagged.all()
    for arr in out.extra.values():
        assert np.asarray(arr).shape == (n,)
    d = json.loads(json.dumps(out.to_dict()))
    assert d["match"] == [42, 7, 2] and len(d["score"]) == n and d["direction"] in ("below", "above")


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="candidates must be"):
        nn_ratio(np.zeros((2, 12)), np.zeros((3, 2, 12)))
    with pytest.raises(ValueError, match="at least 2 candidates"):
        nn_ratio(np.zeros((2, 12)), np.zeros((2, 1, 12)))
    with pytest.raises(ValueError, match="needs images"):
        tiled_l2(np.zeros((2, 12)), np.zeros((2, 3, 12)))
    with pytest.raises(ValueError, match="larger than the image"):
        tiled_l2(np.zeros((1, 3, 3, 3)), np.zeros((1, 2, 3, 3, 3)), grid=4)


@pytest.mark.parametrize("size,grid", [(10, 4), (33, 4), (5, 4), (7, 3), (4, 4), (31, 5)])
def test_tile_bounds_partition_the_image_when_not_divisible(size, grid):
    bounds = _tile_bounds(size, grid)
    assert len(bounds) == grid
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a < b for a, b in bounds)                                  # no empty tile
    assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:]))      # contiguous, no overlap
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1                                    # as even as possible


def test_tiled_distance_with_uneven_tiles_uses_the_small_corner_tile():
    # 10x10 with a 4x4 grid: rows/cols split [0,2) [2,5) [5,8) [8,10); the corner tile is 2x2
    q = np.zeros((1, 3, 10, 10))
    c = np.zeros((1, 2, 3, 10, 10))
    c[0, 0, :, 9, 9] = 1.0            # one pixel differs in all channels
    c[0, 1, :, 4, 4] = 1.0            # same pixel count, inside a 3x3 tile
    d = tiled_distances(q, c, grid=4)
    assert d[0, 0] == pytest.approx(np.sqrt(3 / 12))     # RMS over the 2x2x3 corner tile
    assert d[0, 1] == pytest.approx(np.sqrt(3 / 27))     # RMS over a 3x3x3 tile


def test_tiled_distance_is_at_least_the_global_rms_and_equal_with_one_tile():
    rng = np.random.default_rng(5)
    q = rng.random((4, 3, 13, 11))
    c = rng.random((4, 3, 3, 13, 11))
    rms = exact_rms_distances(flat(q), flat(c))
    assert tiled_distances(q, c, grid=1) == pytest.approx(rms, rel=1e-12)
    assert (tiled_distances(q, c, grid=4) >= rms - 1e-12).all()


def test_registered_detectors_run_on_the_spaces_they_need():
    assert {"nn_ratio", "nn_ratio_dedup", "tiled_l2", "adaptive_l2", "copy"} <= set(list_detectors())
    rng = np.random.default_rng(2)
    query = TRAIN[[ASTRONAUT, COFFEE]]
    ids = np.tile(np.arange(N_TRAIN), (2, 1))
    pixel = SpaceEvidence("l2", flat(query).astype(np.float32), ids, flat(against_all(query, TRAIN)).astype(np.float32),
                          image_shape=(3, 32, 32), extra={"train_neighbours": _train_lists(TRAIN)}, n_rows=N_TRAIN)
    feats = rng.normal(size=(N_TRAIN, 8))
    clip = SpaceEvidence("cosine", feats[[ASTRONAUT, COFFEE]], ids, np.broadcast_to(feats, (2, N_TRAIN, 8)).copy())
    # clip has no published copy threshold, and 5 training images are too few to calibrate one: set it here
    cfg = DetectorsConfig(copy_thresholds={"clip": 0.9})
    outs = {o.name: o for o in run_detectors({"pixel": pixel, "clip": clip}, cfg)}
    assert {"nn_ratio", "nn_ratio_dedup", "tiled_l2", "adaptive_l2", "clip_copy"} <= set(outs)
    assert outs["clip_copy"].threshold == 0.9 and outs["clip_copy"].threshold_source == "config"
    uncalibrated = {o.name: o for o in run_detectors({"clip": clip}, DetectorsConfig())}["clip_copy"]
    assert not uncalibrated.applicable and "calibrating one needs" in uncalibrated.reason
    assert not {"identity_leak", "identity_interpolation"} & set(outs)  # they need the face space
    for name in ("nn_ratio", "nn_ratio_dedup", "tiled_l2", "clip_copy"):
        assert outs[name].flagged.tolist() == [True, True], name
        assert outs[name].match.tolist() == [ASTRONAUT, COFFEE], name
    # five training images: outside adaptive_l2's regime (the mean over the 50 nearest), no verdict at all
    ad = outs["adaptive_l2"]
    assert not ad.applicable and "n = 50" in ad.reason and "has 5" in ad.reason and not ad.flagged.any()
    assert outs["nn_ratio"].threshold == pytest.approx(1 / 3) and outs["tiled_l2"].threshold == 0.15
    assert outs["nn_ratio"].score.tolist() == [0.0, 0.0] and outs["tiled_l2"].score.tolist() == [0.0, 0.0]
    assert outs["clip_copy"].score == pytest.approx([1.0, 1.0])
    # without the pixel space the pixel detectors do not run; without a feature space no copy score does
    clip_only = {o.name for o in run_detectors({"clip": clip}, DetectorsConfig())}
    assert "clip_copy" in clip_only and not {"nn_ratio", "tiled_l2", "adaptive_l2"} & clip_only
    pixel_only = {o.name for o in run_detectors({"pixel": pixel}, DetectorsConfig())}
    assert {"nn_ratio", "tiled_l2", "adaptive_l2"} <= pixel_only and not any(n.endswith("_copy") for n in pixel_only)
