"""Detectors inside their regime: outside it a detector says "not applicable" and why -- never a rate -- and
that flows end to end: aggregate -> store -> summary.json -> terminal / Markdown / HTML -> gates -> onsets and
the recommended checkpoint.

Before this file, adaptive_l2 ran on 8-image training sets (it averages over the n = 50 nearest training
images and flagged 64/64 samples of an almost untrained checkpoint), drove the demo's recommended checkpoint,
and tiled_l2 called any dark blur a copy of a dark, nearly uniform training crop.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers_core import training_images
from memtrack.config import Config, DetectorsConfig, EmbedderSpec
from memtrack.data.dataset import read_dataset
from memtrack.detectors.registry import run_detectors
from memtrack.detectors.core import SpaceEvidence, TOO_FLAT, tiled_l2
from memtrack.analysis.dynamics import last_clean_checkpoint, onsets
from memtrack.embedders.registry import get_embedder
from memtrack.errors import GateError
from memtrack.index.reference import ReferenceIndex
from memtrack.detectors.metrics import aggregate
from memtrack.report.gate import check_gates
from memtrack.report.markdown import render_markdown
from memtrack.report.html import render_html
from memtrack.analysis.summary import build_summary
from memtrack.report.terminal import render_table
from memtrack.store.run_store import RunStore
from memtrack.scan.tracker import Tracker


def _save(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray((np.asarray(img).transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(folder / f"i{i}.png")
    return folder


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """An 8-image, 32-px pixel index (five photos and three shifted crops of them)."""
    photos = training_images(32)
    extra = [np.roll(photos[i], 5, axis=2) for i in range(3)]
    folder = _save(tmp_path_factory.mktemp("eight") / "data", list(photos) + extra)
    cfg = Config()
    cfg.index.embedders = [EmbedderSpec("pixel", {"resolution": 32})]
    ref = ReferenceIndex.build(read_dataset(folder), [get_embedder(s) for s in cfg.index.embedders],
                               tmp_path_factory.mktemp("ref") / "ref", cfg)
    return ref, cfg


def _tracker(ref, cfg):
    return Tracker(ref, [get_embedder(s) for s in cfg.index.embedders], cfg)


# ------------------------------------------------------------------------------------------- adaptive


def test_adaptive_l2_on_eight_training_images_is_not_applicable_and_says_why(eight):
    ref, cfg = eight
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    out = {o.name: o for o in _tracker(ref, cfg).assess(noise)}["adaptive_l2"]
    assert not out.applicable and not out.flagged.any()
    assert "n = 50" in out.reason and "has 8" in out.reason
    block = aggregate([out])["metrics"]["adaptive_l2"]
    assert block == {"applicable": False, "reason": out.reason}          # no rate, no interval, no count


def test_adaptive_l2_needs_the_lists_to_reach_n(eight):
    ref, cfg = eight
    ev = SpaceEvidence("l2", np.zeros((1, 3 * 32 * 32), np.float32), np.zeros((1, 2), np.int64),
                       np.zeros((1, 2, 3 * 32 * 32), np.float32), (3, 32, 32),
                       {"train_neighbours": (np.zeros((1000, 9), np.int64), np.ones((1000, 9)))}, n_rows=1000)
    out = {o.name: o for o in run_detectors({"pixel": ev}, DetectorsConfig())}["adaptive_l2"]
    assert not out.applicable and "index.baseline_k >= 49" in out.reason


def test_adaptive_l2_below_adaptive_min_train_is_not_applicable(eight):
    """58 training images (the detector card's set) are >= n = 50 but the neighbourhood is most of the set:
    the card measured 84% false positives on novel images there, so memtrack needs adaptive_min_train."""
    lists = (np.zeros((58, 60), np.int64), np.ones((58, 60)))
    ev = SpaceEvidence("l2", np.zeros((1, 3 * 32 * 32), np.float32), np.zeros((1, 2), np.int64),
                       np.zeros((1, 2, 3 * 32 * 32), np.float32), (3, 32, 32), {"train_neighbours": lists}, n_rows=58)
    out = {o.name: o for o in run_detectors({"pixel": ev}, DetectorsConfig())}["adaptive_l2"]
    assert not out.applicable and "fewer than 1,000 training images" in out.reason
    cfg = DetectorsConfig(adaptive_min_train=50)
    ok = {o.name: o for o in run_detectors({"pixel": ev}, cfg)}["adaptive_l2"]
    assert ok.applicable


# -------------------------------------------------------------------------------------------- tiled


def test_tiled_l2_on_16_px_images_is_not_applicable():
    ev = SpaceEvidence("l2", np.zeros((2, 768), np.float32), np.zeros((2, 2), np.int64),
                       np.zeros((2, 2, 768), np.float32), (3, 16, 16), n_rows=6)
    out = {o.name: o for o in run_detectors({"pixel": ev}, DetectorsConfig())}["tiled_l2"]
    assert not out.applicable and "4 px" in out.reason and ">= 8 px" in out.reason
    assert {o.name: o for o in run_detectors({"pixel": ev}, DetectorsConfig(tiled_grid=2))}["tiled_l2"].applicable


def test_a_dark_blur_is_not_a_copy_of_a_dark_nearly_uniform_training_crop():
    rng = np.random.default_rng(1)
    photos = training_images(32)
    dark = np.clip(0.08 + rng.normal(0, 0.02, (3, 32, 32)), 0, 1)        # a nearly uniform dark crop
    train = np.concatenate([photos, dark[None]])
    blur = np.full((1, 3, 32, 32), 0.1)                                    # an early, featureless dark sample
    cand = np.broadcast_to(train, (1, *train.shape)).copy()
    out = tiled_l2(blur, cand)
    assert out.score[0] <= 0.15 and out.match[0] == 5                      # by the numbers, "a near-copy" ...
    assert not out.flagged[0] and not out.judged_mask()[0]                 # ... but no verdict, with the reason
    assert out.not_judged == {TOO_FLAT: 1}
    block = aggregate([out])["metrics"]["tiled_l2"]
    assert block["applicable"] is False and "nearly uniform" in block["reason"]
    # a copy of a structured training image is still judged, and flagged
    copy = tiled_l2(photos[:1], cand)
    assert copy.flagged[0] and copy.judged_mask()[0] and copy.match[0] == 0


# --------------------------------------------------------------------------------- end to end: n/a


def _ck(step, nn_low, adaptive):
    nn = {"rate": nn_low * 2, "ci_low": nn_low, "ci_high": min(1.0, nn_low * 3 + 0.05), "count": 1, "n": 8}
    return {"step": step, "metrics": {"nn_ratio": nn, "adaptive_l2": adaptive}}


NA = {"applicable": False, "reason": "adaptive_l2 normalises by the mean distance to the n = 50 nearest training "
                                     "images (Carlini et al. 2023); this training set has 8"}


def test_not_applicable_never_drives_onsets_or_the_recommendation():
    cks = [_ck(100, 0.0, NA), _ck(200, 0.0, NA), _ck(300, 0.05, NA), _ck(400, 0.06, NA), _ck(500, 0.07, NA)]
    on = onsets(cks)
    assert on["adaptive_l2"] == {"step": None, "between": None, "confirmed": False, "provisional": None,
                                 "applicable": False, "reason": NA["reason"]}
    assert on["nn_ratio"]["step"] == 300
    rec = last_clean_checkpoint(cks, {**on, "adaptive_l2": {"step": 100, "applicable": False}})
    assert rec["step"] == 200 and "nn_ratio" in rec["reason"]


def test_not_applicable_flows_from_the_store_to_every_report_and_the_gates(eight, tmp_path):
    ref, cfg = eight
    tracker = _tracker(ref, cfg)
    store = RunStore.open(tmp_path / "run")
    photos = training_images(32)
    for step, frac in ((100, 0.0), (200, 0.5), (300, 1.0)):
        imgs = [Image.fromarray(((frac * photos[i % 5] + (1 - frac) * 0.5).transpose(1, 2, 0) * 255)
                                .round().astype(np.uint8)) for i in range(8)]
        agg = aggregate(tracker.assess(imgs), ref.train_ids)
        store.record(step=step, checkpoint=f"checkpoint-{step}", weights="unet", eval_key=f"k{step}",
                     metrics=agg["metrics"], samples=[], info={"distinct_train_images": agg["distinct_train_images"]})
    summary = json.loads(json.dumps(build_summary(store, tmp_path / "run", ref, cfg)))
    store.close()
    block = summary["checkpoints"][-1]["metrics"]["adaptive_l2"]
    assert block["applicable"] is False and "has 8" in block["reason"] and "rate" not in block
    assert summary["onset"]["adaptive_l2"]["applicable"] is False
    assert "adaptive_l2" not in summary["recommended_checkpoint"]["reason"]
    term = render_table(summary)
    assert "n/a: adaptive_l2 normalises" in term and "Not applicable here: adaptive near-copies" in term
    md = render_markdown(summary, [], tmp_path / "md")
    assert "n/a: adaptive\\_l2 normalises" in md
    html = render_html(summary, [])
    assert "n/a: adaptive_l2 normalises" in html
    with pytest.raises(GateError, match="not applicable") as err:
        check_gates(summary, ["adaptive_l2.rate > 0.1"])
    assert "has 8" in err.value.message
    with pytest.raises(GateError, match="not applicable"):
        check_gates(summary, ["adaptive_l2.onset != null"])
    assert check_gates(summary, ["nn_ratio.rate >= 0"])[0][1] is True


# ------------------------------------------------------------------------------- threshold provenance


def _pixel_evidence():
    photos = training_images(32)
    q = photos[:2].reshape(2, -1).astype(np.float32)
    cand = np.broadcast_to(photos.reshape(5, -1), (2, 5, 3 * 32 * 32)).astype(np.float32).copy()
    rows = np.tile(np.arange(5), (2, 1))
    return {"pixel": SpaceEvidence("l2", q, rows, cand, (3, 32, 32), n_rows=5)}


def test_a_threshold_set_in_the_config_is_reported_as_config_and_defaults_keep_their_provenance():
    from memtrack.scan.tracker import thresholds_block

    cfg = Config()
    default = thresholds_block(run_detectors(_pixel_evidence(), cfg.detectors), cfg)
    assert default["nn_ratio"]["source"] == "published" and "Gu et al." in default["nn_ratio"]["citation"]
    assert default["tiled_l2"]["source"] == "memtrack"            # the paper publishes no linking threshold
    assert default["adaptive_l2"]["source"] == "published" and default["adaptive_l2"]["applicable"] is False
    assert "n = 50" in default["adaptive_l2"]["regime"] and "has 5" in default["adaptive_l2"]["reason"]
    assert ">= 8 px" in default["tiled_l2"]["regime"]
    cfg.detectors.nn_ratio = 0.25
    cfg.detectors.tiled_l2 = 0.1
    changed = thresholds_block(run_detectors(_pixel_evidence(), cfg.detectors), cfg)
    assert changed["nn_ratio"]["source"] == "config" and changed["nn_ratio"]["value"] == 0.25
    assert "detectors.nn_ratio = 0.25" in changed["nn_ratio"]["detail"]
    assert changed["tiled_l2"]["source"] == "config"
    assert all(th["source"] in ("published", "calibrated", "config", "memtrack") for th in changed.values())


def test_the_identity_interpolation_ratio_is_memtracks_choice_never_published():
    from memtrack.detectors.registry import get_detector
    from memtrack.detectors.core import DetectorOutput

    out = DetectorOutput("identity_interpolation", np.zeros(1), np.zeros(1, bool), np.zeros(1, np.int64), 0.6,
                         "above", {"verification_threshold_source": np.array(["calibrated"], dtype=object)})
    prov = get_detector("identity_interpolation").provenance
    source, detail = prov.of("face", DetectorsConfig(), out)
    assert source == "memtrack" and "verification threshold is calibrated" in detail
    assert prov.of("face", DetectorsConfig(identity_ratio=0.7), out)[0] == "config"


# ------------------------------------------------------------------------------------- confirmed onsets


def _summary_with_a_late_rise():
    cks = [_ck(s, lo, {"rate": 0.0, "ci_low": 0.0, "ci_high": 0.3, "count": 0, "n": 8})
           for s, lo in ((100, 0.0), (200, 0.0), (300, 0.0), (400, 0.2))]
    on = onsets(cks)
    return {"run": "r", "checkpoints": cks, "onset": on, "onset_rule": {"baseline_rate": 0.01, "persistence": 2},
            "recommended_checkpoint": last_clean_checkpoint(cks, on)}


def test_an_unconfirmed_onset_does_not_trip_onset_gates_or_move_the_recommendation():
    s = _summary_with_a_late_rise()
    assert s["onset"]["nn_ratio"]["step"] is None and s["onset"]["nn_ratio"]["provisional"]["step"] == 400
    [(gate, tripped, observed)] = check_gates(s, ["nn_ratio.onset != null"])
    assert not tripped and observed is None
    assert s["recommended_checkpoint"]["step"] == 400 and "not yet confirmed" in s["recommended_checkpoint"]["reason"]
    # a summary written by an older memtrack (an unconfirmed step in "step") is read the same way
    old = {**s, "onset": {"nn_ratio": {"step": 400, "between": [300, 400], "confirmed": False}}}
    assert check_gates(old, ["nn_ratio.onset != null"])[0][1] is False
    # and the reports show it apart, as provisional
    term = render_table(s)
    assert "provisional 400" in term and "rose at step 400 (between 300 and 400): provisional" in term
    assert "began at step" not in term


def test_a_confirmed_onset_trips_the_gate_and_drives_the_recommendation():
    cks = [_ck(s, lo, NA) for s, lo in ((100, 0.0), (200, 0.05), (300, 0.06), (400, 0.07))]
    on = onsets(cks)
    s = {"checkpoints": cks, "onset": on}
    assert on["nn_ratio"] == {"step": 200, "between": [100, 200], "confirmed": True, "provisional": None}
    assert check_gates(s, ["nn_ratio.onset != null"])[0][1] is True
    assert last_clean_checkpoint(cks, on)["step"] == 100
