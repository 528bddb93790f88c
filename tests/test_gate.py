"""``--fail-on`` gates: parsing, evaluation on summary dicts, errors, fuzzing."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memtrack.errors import GateError
from memtrack.report.gate import FIELDS, check_gates, parse_gate


def _summary():
    def ck(step, rate, count, distinct, ci_low):
        return {"step": step, "metrics": {
            "nn_ratio": {"rate": rate, "ci_low": ci_low, "ci_high": min(1.0, rate + 0.1), "count": count, "n": 64,
                         "distinct": distinct},
            "tiled_l2": {"rate": 0.0, "ci_low": 0.0, "ci_high": 0.057, "count": 0, "n": 64, "distinct": 0},
            "distinct_train_images": {"count": distinct}}}
    # checkpoints deliberately out of order: the latest is the highest step, not the last in the list
    return {"checkpoints": [ck(300, 0.25, 16, 3, 0.16), ck(100, 0.0, 0, 0, 0.0), ck(200, 0.05, 3, 1, 0.016)],
            "onset": {"nn_ratio": {"step": 200, "between": [100, 200]},
                      "tiled_l2": {"step": None, "between": None}}}


@pytest.mark.parametrize("text,metric,field,op,value", [
    ("nn_ratio.rate > 0.01", "nn_ratio", "rate", ">", 0.01),
    ("  nn_ratio.ci_low>=0.5 ", "nn_ratio", "ci_low", ">=", 0.5),
    ("clip_copy.count == 0", "clip_copy", "count", "==", 0.0),
    ("identity_leak.onset != null", "identity_leak", "onset", "!=", None),
    ("identity_leak.onset == None", "identity_leak", "onset", "==", None),
    ("x.distinct <= 1e3", "x", "distinct", "<=", 1000.0),
    ("Tiled_L2.ci_high < -1", "Tiled_L2", "ci_high", "<", -1.0),
])
def test_parse(text, metric, field, op, value):
    g = parse_gate(text)
    assert (g.metric, g.field, g.op, g.value) == (metric, field, op, value)
    assert g.text == text.strip()


@pytest.mark.parametrize("text,words", [
    ("nn_ratio.rate", "cannot parse gate"),
    ("nn_ratio > 0.1", "cannot parse gate"),
    ("nn_ratio.rate >> 0.1", "cannot parse gate"),
    ("nn_ratio.rate >>0.1", "'>0.1' is not a number or null"),
    ("nn_ratio.rate = 0.1", "cannot parse gate"),
    ("nn_ratio.rate > 0.1 and x.rate > 0", "cannot parse gate"),
    ("nn_ratio.score > 0.1", "unknown field 'score'"),
    ("nn_ratio.rate > abc", "'abc' is not a number or null"),
    ("nn_ratio.rate > nan", "must be finite"),
    ("nn_ratio.rate > inf", "must be finite"),
    ("nn_ratio.onset > null", "null can only be compared with == or !="),
    ("__import__('os').system('x').rate > 1", "cannot parse gate"),
    ("x" * 300 + ".rate > 1", "is not a short expression"),
    ("", "cannot parse gate"),
])
def test_parse_errors(text, words):
    with pytest.raises(GateError) as err:
        parse_gate(text)
    assert words in err.value.message


def test_parse_refuses_non_strings():
    with pytest.raises(GateError):
        parse_gate(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("text,tripped,observed", [
    ("nn_ratio.rate > 0.2", True, 0.25),          # read from the latest checkpoint (step 300)
    ("nn_ratio.rate > 0.3", False, 0.25),
    ("nn_ratio.rate >= 0.25", True, 0.25),
    ("nn_ratio.count == 16", True, 16),
    ("nn_ratio.count != 16", False, 16),
    ("nn_ratio.distinct < 3", False, 3),
    ("nn_ratio.ci_low > 0.01", True, 0.16),
    ("tiled_l2.ci_high <= 0.057", True, 0.057),
    ("distinct_train_images.count >= 3", True, 3),
    ("nn_ratio.onset != null", True, 200),
    ("nn_ratio.onset == null", False, 200),
    ("nn_ratio.onset <= 200", True, 200),
    ("tiled_l2.onset != null", False, None),
    ("tiled_l2.onset == null", True, None),
    ("tiled_l2.onset < 1000", False, None),       # no onset: an ordered comparison with null never trips
    ("tiled_l2.onset != 5", True, None),          # ... but null is not equal to 5
    ("tiled_l2.onset == 5", False, None),
])
def test_evaluate(text, tripped, observed):
    assert parse_gate(text).evaluate(_summary()) == (tripped, observed)


def test_unknown_metric_is_an_error_that_lists_the_known_ones():
    with pytest.raises(GateError, match="unknown metric 'nn_ration'") as err:
        parse_gate("nn_ration.rate > 0").evaluate(_summary())
    assert "nn_ratio" in err.value.hint and "tiled_l2" in err.value.hint


def test_a_field_the_metric_does_not_have_is_an_error_not_a_silent_pass():
    # distinct_train_images has only a count: "rate > 0" could never trip, so it is refused
    with pytest.raises(GateError, match="metric 'distinct_train_images' has no field 'rate'") as err:
        parse_gate("distinct_train_images.rate > 0").evaluate(_summary())
    assert "count" in err.value.hint


def test_empty_summary():
    with pytest.raises(GateError, match="metrics in this run: none"):
        parse_gate("nn_ratio.rate > 0").evaluate({"checkpoints": [], "onset": {}})
    # a metric known only from the onset block has no latest value
    assert parse_gate("nn_ratio.rate > 0").evaluate({"checkpoints": [], "onset": {"nn_ratio": {"step": None}}}) \
        == (False, None)


def test_metric_missing_at_the_latest_checkpoint_reads_as_null():
    s = _summary()
    s["checkpoints"].append({"step": 400, "metrics": {"tiled_l2": {"rate": 0.0, "ci_low": 0.0}}})
    assert parse_gate("nn_ratio.rate > 0").evaluate(s) == (False, None)


def test_check_gates_parses_everything_before_judging():
    with pytest.raises(GateError, match="cannot parse"):
        check_gates(_summary(), ["nn_ratio.rate > 0.2", "oops"])
    results = check_gates(_summary(), ["nn_ratio.rate > 0.2", "tiled_l2.rate > 0"])
    assert [(g.text, tripped, obs) for g, tripped, obs in results] == [
        ("nn_ratio.rate > 0.2", True, 0.25), ("tiled_l2.rate > 0", False, 0.0)]


@settings(max_examples=600, deadline=None)
@given(st.one_of(
    st.text(max_size=250),
    st.builds(lambda m, f, o, v: f"{m}.{f}{o}{v}", st.text(max_size=12), st.sampled_from(FIELDS + ("x", "")),
              st.sampled_from(["<", ">", "==", "!=", "<=", ">=", "=>", "=", " "]),
              st.one_of(st.text(max_size=12), st.floats().map(repr), st.integers().map(str))),
))
def test_fuzz_parse_gate_raises_only_gate_errors(text):
    try:
        g = parse_gate(text)
    except GateError as exc:
        assert exc.message
        return
    assert g.field in FIELDS and g.op in ("<", ">", "==", "!=", "<=", ">=")
    try:
        g.evaluate(_summary())
    except GateError:
        pass
