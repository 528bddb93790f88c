"""Onset detection over checkpoints, on constructed Wilson lower-bound sequences."""
from __future__ import annotations

import pytest

from memtrack.analysis.dynamics import last_clean_checkpoint, onset, onsets

STEPS = [100, 200, 300, 400, 500, 600]


def test_no_onset_when_the_lower_bound_never_clears_the_baseline():
    assert onset(STEPS, [0.0, 0.0, 0.005, 0.01, 0.0, 0.01]) == {"step": None, "between": None, "confirmed": False,
                                                                "provisional": None}
    # exactly at the baseline is not above it
    assert onset(STEPS, [0.01] * 6, baseline_rate=0.01)["step"] is None


def test_clean_step():
    o = onset(STEPS, [0.0, 0.0, 0.0, 0.05, 0.10, 0.20])
    assert o == {"step": 400, "between": [300, 400], "confirmed": True, "provisional": None}


def test_noisy_rise_takes_the_first_persistent_crossing():
    # 200 crosses but falls back at 300; the rise that lasts starts at 400
    o = onset(STEPS, [0.0, 0.03, 0.0, 0.04, 0.02, 0.06])
    assert o == {"step": 400, "between": [300, 400], "confirmed": True, "provisional": None}


def test_spike_that_falls_back_is_not_an_onset():
    assert onset(STEPS, [0.0, 0.0, 0.2, 0.0, 0.0, 0.0])["step"] is None
    # a two-checkpoint spike with persistence 2 falls back before it is confirmed
    assert onset(STEPS, [0.0, 0.0, 0.2, 0.2, 0.0, 0.0])["step"] is None
    # ... but with persistence 1 it counts
    assert onset(STEPS, [0.0, 0.0, 0.2, 0.2, 0.0, 0.0], persistence=1)["step"] == 300


def test_rise_at_the_last_checkpoint_is_only_provisional():
    # not an onset (no step: no `onset != null` gate trips, the recommendation does not move), shown apart
    o = onset(STEPS, [0.0] * 5 + [0.3])
    assert o == {"step": None, "between": None, "confirmed": False,
                 "provisional": {"step": 600, "between": [500, 600]}}
    o = onset(STEPS, [0.0] * 4 + [0.3, 0.3])  # one checkpoint after it, persistence needs two
    assert o["step"] is None and not o["confirmed"] and o["provisional"]["step"] == 500
    # a rise at the second-to-last checkpoint that already fell back at the last is not an onset
    assert onset(STEPS, [0.0] * 4 + [0.3, 0.0])["step"] is None


def test_onset_at_the_first_checkpoint_has_no_bracket():
    o = onset(STEPS, [0.2] * 6)
    assert o == {"step": 100, "between": None, "confirmed": True, "provisional": None}


def test_steps_are_sorted_and_missing_values_are_not_above():
    o = onset([300, 100, 200, 400], [0.2, 0.0, None, 0.3], persistence=1)
    assert o == {"step": 300, "between": [200, 300], "confirmed": True, "provisional": None}
    assert onset([100, 200], [None, None])["step"] is None
    assert onset([], [])["step"] is None


def test_duplicate_steps_with_missing_values_do_not_crash():
    # sorting (step, ci_low) pairs used to compare None with a float when two steps were equal
    o = onset([100, 100, 200, 300], [None, 0.2, 0.2, 0.2])
    assert o["step"] == 100


def test_persistence_zero_and_custom_baseline():
    assert onset(STEPS, [0.0, 0.0, 0.2, 0.0, 0.0, 0.0], persistence=0)["step"] == 300
    # above 0.1 only at the last two checkpoints: one short of the persistence, so provisional
    assert onset(STEPS, [0.0, 0.05, 0.05, 0.05, 0.2, 0.2], baseline_rate=0.1)["provisional"]["step"] == 500
    assert onset(STEPS, [0.0, 0.05, 0.05, 0.2, 0.2, 0.2], baseline_rate=0.1)["step"] == 400


def _ck(step, **ci_lows):
    return {"step": step, "metrics": {name: {"rate": lo * 2, "ci_low": lo, "ci_high": lo * 3}
                                      for name, lo in ci_lows.items()} | {"distinct_train_images": {"count": 0}}}


def test_onsets_for_every_rate_metric():
    cks = [_ck(100, nn_ratio=0.0, tiled_l2=0.0), _ck(200, nn_ratio=0.05, tiled_l2=0.0),
           _ck(300, nn_ratio=0.1, tiled_l2=0.0), _ck(400, nn_ratio=0.2, tiled_l2=0.04)]
    on = onsets(cks)
    assert set(on) == {"nn_ratio", "tiled_l2"}  # distinct_train_images has no interval
    assert on["nn_ratio"] == {"step": 200, "between": [100, 200], "confirmed": True, "provisional": None}
    assert on["tiled_l2"] == {"step": None, "between": None, "confirmed": False,
                              "provisional": {"step": 400, "between": [300, 400]}}


def test_onsets_with_a_metric_missing_at_some_checkpoints():
    cks = [_ck(100, nn_ratio=0.0), _ck(200, nn_ratio=0.1, clip_copy=0.2), _ck(300, nn_ratio=0.1, clip_copy=0.3),
           _ck(400, nn_ratio=0.1, clip_copy=0.3)]
    on = onsets(cks)
    assert on["clip_copy"]["step"] == 200 and on["nn_ratio"]["step"] == 200


def test_last_clean_checkpoint():
    cks = [{"step": s} for s in (100, 200, 300, 400)]
    on = {"nn_ratio": {"step": 300}, "tiled_l2": {"step": 400}, "clip_copy": {"step": None}}
    rec = last_clean_checkpoint(cks, on)
    assert rec["step"] == 200 and "nn_ratio" in rec["reason"] and "300" in rec["reason"]

    rec = last_clean_checkpoint(cks, {"nn_ratio": {"step": None}})
    assert rec["step"] == 400 and "no metric has a confirmed onset" in rec["reason"]

    rec = last_clean_checkpoint(cks, {"tiled_l2": {"step": 100}})
    assert rec["step"] is None and "first evaluated checkpoint" in rec["reason"]

    assert last_clean_checkpoint([], {})["step"] is None


@pytest.mark.parametrize("lows,expected", [
    ([0.0, 0.0, 0.0, 0.0], None),
    ([0.0, 0.02, 0.03, 0.04], 200),
    ([0.0, 0.02, 0.0, 0.04], None),   # the rise at 400 is unconfirmed: it does not move the recommendation
])
def test_onset_feeds_the_recommendation(lows, expected):
    steps = [100, 200, 300, 400]
    on = {"nn_ratio": onset(steps, lows)}
    rec = last_clean_checkpoint([{"step": s} for s in steps], on)
    if expected is None:
        assert rec["step"] == 400
    else:
        assert rec["step"] == max(s for s in steps if s < expected)
