"""Per-checkpoint aggregation: Wilson intervals, rate blocks, distinct matches, strongest matches."""
from __future__ import annotations

import json

import numpy as np
import pytest

from memtrack.detectors.core import DetectorOutput
from memtrack.detectors.metrics import aggregate, per_sample_rows, rate_block, wilson_interval


@pytest.mark.parametrize("count,n,low,high", [
    (0, 64, 0.0, 0.05663),      # the docstring's example: informative at zero successes
    (5, 10, 0.23659, 0.76341),  # textbook value
    (64, 64, 0.94337, 1.0),     # symmetric to 0/64
    (1, 2, 0.09453, 0.90547),
    (10, 100, 0.05523, 0.17437),
])
def test_wilson_interval_known_values(count, n, low, high):
    lo, hi = wilson_interval(count, n)
    assert lo == pytest.approx(low, abs=1e-5)
    assert hi == pytest.approx(high, abs=1e-5)


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for count, n in [(0, 1), (3, 7), (17, 32), (31, 32), (250, 1000), (1, 1_000_000)]:
        ci = stats.binomtest(count, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(count, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_interval_n_zero_is_uninformative():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("count,n", [(-1, 5), (6, 5), (0, -1)])
def test_wilson_interval_refuses_impossible_counts(count, n):
    with pytest.raises(ValueError, match="0 <= count <= n"):
        wilson_interval(count, n)


def test_wilson_interval_stays_in_unit_interval_and_contains_the_rate():
    for n in (1, 2, 3, 10, 64, 1000):
        for count in range(0, n + 1, max(1, n // 17)):
            lo, hi = wilson_interval(count, n)
            assert 0.0 <= lo <= count / n <= hi <= 1.0
    # a wider z gives a wider interval
    assert wilson_interval(5, 10, z=2.576)[0] < wilson_interval(5, 10)[0]


def test_rate_block():
    b = rate_block(np.array([True, False, False, True]))
    assert b["rate"] == 0.5 and b["count"] == 2 and b["n"] == 4
    assert (b["ci_low"], b["ci_high"]) == wilson_interval(2, 4)
    empty = rate_block(np.array([], dtype=bool))
    assert empty["rate"] == 0.0 and empty["n"] == 0 and (empty["ci_low"], empty["ci_high"]) == (0.0, 1.0)


def _out(name, score, flagged, match, threshold, direction="below", **extra):
    return DetectorOutput(name, np.asarray(score, float), np.asarray(flagged, bool), np.asarray(match, np.int64),
                          threshold, direction, {k: np.asarray(v) for k, v in extra.items()})


def _outputs():
    nn = _out("nn_ratio", [0.0, 0.2, 0.9, 0.1, 0.5], [True, True, False, True, False], [3, 3, 1, 0, 2], 1 / 3,
              d1=[0.0, 0.02, 0.3, 0.01, 0.2], d2=[0.0, 0.1, 0.33, 0.1, 0.4])
    tiled = _out("tiled_l2", [0.05, 0.4, 0.6, 0.14, 0.3], [True, False, False, True, False], [3, 3, 1, 4, 2], 0.15)
    clip = _out("clip_copy", [0.97, 0.4, 0.3, 0.8, 0.2], [True, False, False, True, False], [3, 2, 1, 0, 4], 0.5,
                "above")
    return [nn, tiled, clip]


def test_aggregate_counts_rates_and_distinct_images():
    agg = aggregate(_outputs(), train_ids=[f"img{i}.png" for i in range(5)], top=50, seeds=[10, 11, 12, 13, 14])
    m = agg["metrics"]
    assert m["nn_ratio"]["count"] == 3 and m["nn_ratio"]["n"] == 5 and m["nn_ratio"]["rate"] == 0.6
    assert (m["nn_ratio"]["ci_low"], m["nn_ratio"]["ci_high"]) == wilson_interval(3, 5)
    assert m["nn_ratio"]["distinct"] == 2            # samples 0 and 1 both reproduce image 3
    assert m["tiled_l2"]["distinct"] == 2            # images 3 and 4
    assert m["clip_copy"]["distinct"] == 2           # images 3 and 0
    assert m["nn_ratio"]["mean"] == pytest.approx(0.34)
    assert m["nn_ratio"]["p50"] == pytest.approx(0.2)
    # distinct training images reproduced by any sample-level detector: {0, 3, 4}
    assert agg["distinct_train_images"] == 3 and m["distinct_train_images"] == {"count": 3}
    assert len(agg["top_matches"]) == 3 + 2 + 2
    json.dumps(agg)  # plain JSON types only


def test_aggregate_top_matches_are_the_most_extreme_first_with_ids_and_seeds():
    agg = aggregate(_outputs(), train_ids=[f"img{i}.png" for i in range(5)], top=3, seeds=[10, 11, 12, 13, 14])
    top = agg["top_matches"]
    assert len(top) == 3
    # margins past the threshold, relative to it: nn 0.0 -> 1.0, tiled 0.05 -> 0.667, clip 0.97 -> 0.94,
    # nn 0.1 -> 0.7, clip 0.8 -> 0.6, nn 0.2 -> 0.4, tiled 0.14 -> 0.067
    assert [(t["detector"], t["score"]) for t in top] == [("nn_ratio", 0.0), ("clip_copy", 0.97), ("nn_ratio", 0.1)]
    assert top[0]["seed"] == 10 and top[0]["sample"] == 0 and top[0]["train_id"] == "img3.png"
    assert top[1]["seed"] == 10 and top[1]["train_row"] == 3
    assert top[2]["seed"] == 13 and top[2]["train_id"] == "img0.png"
    assert all(t["threshold"] > 0 and t["direction"] in ("below", "above") for t in top)


def test_aggregate_without_ids_or_seeds_and_unmatched_flags():
    out = _out("nn_ratio", [0.0, 0.1], [True, True], [-1, 2], 1 / 3)
    agg = aggregate([out])
    assert agg["metrics"]["nn_ratio"]["distinct"] == 1     # match -1 (none) is not a training image
    assert [t["seed"] for t in agg["top_matches"]] == [0, 1]
    assert agg["top_matches"][0]["train_id"] is None


def test_aggregate_of_nothing_flagged():
    out = _out("tiled_l2", [0.5, 0.6], [False, False], [0, 1], 0.15)
    agg = aggregate([out])
    assert agg["metrics"]["tiled_l2"]["count"] == 0 and agg["metrics"]["tiled_l2"]["distinct"] == 0
    assert agg["distinct_train_images"] == 0 and agg["top_matches"] == []
    assert agg["metrics"]["tiled_l2"]["ci_high"] == pytest.approx(wilson_interval(0, 2)[1])


def test_per_sample_rows():
    rows = per_sample_rows(_outputs())
    assert len(rows) == 5
    assert rows[0]["flags"] == {"nn_ratio": True, "tiled_l2": True, "clip_copy": True}
    assert rows[2]["matches"]["clip_copy"] == 1
    assert rows[1]["scores"]["nn_ratio.d1"] == pytest.approx(0.02)
    assert per_sample_rows([]) == []
    json.dumps(rows)
