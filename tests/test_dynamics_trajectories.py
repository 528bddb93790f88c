"""Per-seed trajectories and 'which images' on hand-built match tables (no models)."""
from __future__ import annotations

import numpy as np
import pytest

from memtrack.analysis.dynamics import (match_table, near_duplicate_counts, png_bytes_per_pixel, trajectories,
                               which_images)

STEPS = [100, 200, 300, 400, 500]
SEEDS = [0, 1, 2, 3, 4, 5]
_ = None
# rows = checkpoints, columns = seeds
TABLE = [
    # s0   s1   s2   s3   s4   s5
    ["a", _,   "b", _,   _,   "a"],   # 100
    ["a", _,   "b", "c", _,   _],     # 200
    ["a", "b", "a", "c", _,   "a"],   # 300
    ["a", "b", "a", _,   _,   "a"],   # 400
    ["a", "b", "a", "c", _,   "a"],   # 500
]


def test_locks_switches_and_never():
    t = trajectories(STEPS, SEEDS, TABLE)
    assert t["steps"] == STEPS and t["seeds"] == SEEDS
    assert t["matches"][2] == ["b", "b", "a", "a", "a"]  # transposed: one row per seed
    assert t["locked_step"] == [100, 300, 300, 500, None, 300]
    assert t["locked_to"] == ["a", "b", "a", "c", None, "a"]
    # s2 left b for a; s5 lost a at 200 and came back to it (no switch, but the lock starts at 300)
    assert t["switched"] == [False, False, True, False, False, False]


def test_late_lock_and_a_lock_broken_by_a_gap():
    # s3 matched c at 200 and 300, lost it at 400: its lock is the last checkpoint alone
    t = trajectories(STEPS, SEEDS, TABLE)
    assert t["locked_step"][3] == 500
    # a seed that matches until the second-to-last checkpoint and then lets go is not locked
    t = trajectories([1, 2, 3], [7], [["x"], ["x"], [None]])
    assert t["locked_step"] == [None] and t["locked_to"] == [None] and t["switched"] == [False]


def test_attractor_counts_and_earliest_seeds():
    t = trajectories(STEPS, SEEDS, TABLE)
    # a (seed 0 from 100), then b (seed 1) at 300, then c (seed 3) at 500
    assert t["attractors"] == [{"step": 100, "count": 1}, {"step": 200, "count": 1}, {"step": 300, "count": 2},
                               {"step": 400, "count": 2}, {"step": 500, "count": 3}]
    assert t["earliest"][:3] == [{"seed": 0, "step": 100, "train_id": "a"}, {"seed": 1, "step": 300, "train_id": "b"},
                                 {"seed": 2, "step": 300, "train_id": "a"}]
    assert len(trajectories(STEPS, SEEDS, TABLE, top=2)["earliest"]) == 2


def test_steps_in_any_order_are_sorted_with_their_rows():
    order = [4, 0, 3, 1, 2]
    t = trajectories([STEPS[i] for i in order], SEEDS, [TABLE[i] for i in order])
    assert t == trajectories(STEPS, SEEDS, TABLE)


def test_nothing_matched():
    t = trajectories([10, 20], [0, 1], [[None, None], [None, None]])
    assert t["locked_step"] == [None, None] and t["earliest"] == []
    assert t["attractors"] == [{"step": 10, "count": 0}, {"step": 20, "count": 0}]


def test_identities_follow_a_person_across_her_images():
    who = {"hopper_1": "Grace Hopper", "hopper_2": "Grace Hopper", "cat": None}
    table = [["hopper_1", "cat"], ["hopper_2", "cat"], ["hopper_1", "cat"]]
    t = trajectories([1, 2, 3], [0, 1], table, identities=who)
    assert t["switched"] == [True, False] and t["locked_step"] == [3, 1]
    assert t["identities"][0] == ["Grace Hopper"] * 3
    assert t["identity_locked_step"] == [1, None] and t["identity_switched"] == [False, False]


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="one row per checkpoint"):
        trajectories([1, 2], [0], [["a"]])
    with pytest.raises(ValueError, match="expected one per seed"):
        trajectories([1, 2], [0, 1], [["a", None], ["a"]])
    with pytest.raises(ValueError, match="distinct"):
        trajectories([1, 1], [0], [["a"], ["a"]])


def test_match_table_from_stored_sample_rows():
    ids = ["cat", "coffee", "rocket"]
    rows_200 = [
        {"seed": 5, "flags": {"nn_ratio": True, "tiled_l2": True}, "matches": {"nn_ratio": 2, "tiled_l2": 1}},
        {"seed": 6, "flags": {"nn_ratio": False, "tiled_l2": True}, "matches": {"nn_ratio": 0, "tiled_l2": 1}},
        {"seed": 7, "flags": {"nn_ratio": False, "pixel_copy": False, "clip_copy": True},
         "matches": {"nn_ratio": 0, "clip_copy": 0}},
    ]
    rows_100 = [{"seed": 6, "flags": {"nn_ratio": False}, "matches": {"nn_ratio": 0}}]
    t = match_table([(200, rows_200), (100, rows_100)], ids)
    assert t["steps"] == [100, 200] and t["seeds"] == [5, 6, 7]
    # nn_ratio is preferred; tiled_l2 next; then the *_copy spaces; seed 5 was not drawn at step 100
    assert t["matches"] == [[None, None, None], ["rocket", "coffee", "cat"]]
    only_tiled = match_table([(200, rows_200)], ids, detectors=["tiled_l2"])
    assert only_tiled["matches"] == [["coffee", "coffee", None]]
    assert match_table([(200, rows_200)])["matches"] == [["2", "1", "0"]]  # rows as ids


# ----------------------------------------------------------------------------------------- which images


def test_png_bytes_per_pixel_orders_flat_below_noise():
    rng = np.random.default_rng(0)
    flat = np.full((16, 16, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert png_bytes_per_pixel(flat) < 0.5 < 2.5 < png_bytes_per_pixel(noise)
    # CHW (as the pixel index stores vectors) and PIL give the same number
    from PIL import Image

    assert png_bytes_per_pixel(np.moveaxis(noise, -1, 0)) == png_bytes_per_pixel(Image.fromarray(noise))
    with pytest.raises(ValueError, match="uint8"):
        png_bytes_per_pixel(noise.astype(np.float32))


def test_near_duplicate_counts_full_matrix_and_top_k():
    d = np.array([[0.0, 0.01, 0.5], [0.01, 0.0, 0.4], [0.5, 0.4, 0.0]])
    assert near_duplicate_counts(d, 0.05).tolist() == [1, 1, 0]  # self never counts
    sims = 1 - d
    assert near_duplicate_counts(sims, 0.95, "above").tolist() == [1, 1, 0]
    ids = np.array([[0, 1], [1, 0], [2, -1]])
    scores = np.array([[0.0, 0.01], [0.0, 0.01], [0.0, np.nan]])
    assert near_duplicate_counts(scores, 0.05, neighbour_ids=ids).tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="square"):
        near_duplicate_counts(scores, 0.05)
    with pytest.raises(ValueError, match="direction"):
        near_duplicate_counts(d, 0.05, "up")


def test_which_images_ranks_reproduced_first_then_by_risk():
    ids = ["a", "b", "c", "d"]
    table = [["a", None], ["a", "c"], ["a", "c"]]
    out = which_images(ids, [10, 20, 30], table, near_duplicates=[3, 0, 1, 2],
                       bytes_per_pixel=[0.8, 0.5, 1.2, 2.0], seeds=[0, 1])
    rows = out["images"]
    assert [m["train_id"] for m in rows] == ["a", "c", "d", "b"]
    a = rows[0]
    assert a == {"train_id": "a", "row": 0, "reproduced": True, "first_step": 10, "n_seeds": 1,
                 "near_duplicates": 3, "bytes_per_pixel": 0.8, "risk_rank": 1}
    assert rows[1]["first_step"] == 20 and rows[2]["first_step"] is None
    assert [m["risk_rank"] for m in rows] == [1, 3, 2, 4]  # most duplicated first, then simplest
    s = out["summary"]
    assert s["n_train"] == 4 and s["n_reproduced"] == 2
    assert s["reproduced"]["mean_near_duplicates"] == 2.0 and s["not_reproduced"]["median_bytes_per_pixel"] == 1.25
    assert s["spearman"]["first_step_vs_near_duplicates"] is None  # fewer than 3 reproduced images


def test_which_images_correlations_follow_the_data():
    ids = [f"img{i}" for i in range(5)]
    # images reproduced in order 0, 1, 2, 3, 4: fewer duplicates and more bytes later
    table = [["img0", None, None, None, None], ["img0", "img1", None, None, None],
             ["img0", "img1", "img2", None, None], ["img0", "img1", "img2", "img3", "img4"]]
    out = which_images(ids, [1, 2, 3, 4], table, near_duplicates=[4, 3, 2, 1, 1],
                       bytes_per_pixel=[0.5, 0.7, 0.9, 1.1, 1.3])
    sp = out["summary"]["spearman"]
    assert sp["first_step_vs_near_duplicates"] < -0.9 and sp["first_step_vs_bytes_per_pixel"] > 0.9
    with pytest.raises(ValueError, match="one value per training image"):
        which_images(ids, [1], [[None] * 5], near_duplicates=[0], bytes_per_pixel=[1.0] * 5)
