"""The detector card: its numbers on cases whose answer is known, strict JSON, and its place in the reports."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import real_image
from memtrack.card.measure import cell, label_of, measure_card
from memtrack.card.cases import CASE_TYPES, Source, ground_truth
from memtrack.config import EmbedderSpec
from memtrack.detectors.metrics import wilson_interval
from memtrack.report import card as report_card
from memtrack.report.html import render_html
from memtrack.report.markdown import render_markdown

ROOT = Path(__file__).resolve().parent.parent
XSS = "<script>window.__pwned=9</script>"


def _tiny_card(case_types=("exact", "novel", "dup_exact", "blend"), duplicates=1, **kw):
    train = [Source(n, real_image(n)) for n in ("coffee", "chelsea", "rocket")]
    gt = ground_truth(train, [Source("camera", real_image("camera")), Source("coins", real_image("coins"))],
                      resolution=16, duplicates=duplicates, case_types=list(case_types))
    return gt, measure_card(gt, [EmbedderSpec("pixel", {"resolution": 16})], **kw)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_card()


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def test_exact_copies_are_recalled_and_novel_images_are_not_flagged(tiny):
    gt, card = tiny
    nn = card["detectors"]["nn_ratio"]
    assert nn["label"] == "copy" and nn["threshold"] == pytest.approx(1 / 3) and nn["direction"] == "below"
    exact = nn["cases"]["exact"]
    assert (exact["n"], exact["tp"], exact["fn"], exact["fp"], exact["tn"], exact["wrong_match"]) == (3, 3, 0, 0, 0, 0)
    assert exact["recall"]["value"] == 1.0
    assert (exact["recall"]["ci_low"], exact["recall"]["ci_high"]) == pytest.approx(wilson_interval(3, 3))
    assert exact["fpr"] is None  # no negatives among exact copies: undefined, not 0
    novel = nn["cases"]["novel"]
    assert (novel["n"], novel["tp"], novel["fp"], novel["fn"], novel["tn"]) == (2, 0, 0, 0, 2)
    assert novel["recall"] is None and novel["precision"] is None and novel["fpr"]["value"] == 0.0
    # an exact copy of a training image held twice has d1 = 0: Gu et al.'s ratio is 0, memorized
    dup = nn["cases"]["dup_exact"]
    assert (dup["n"], dup["tp"], dup["wrong_match"]) == (1, 1, 0)
    assert card["cases"]["blend"]["positives"]["copy"] == 0
    for det, entry in card["detectors"].items():
        for kind, c in entry["cases"].items():
            if c.get("applicable") is False:  # out of its regime here (tiled_l2 at 16 px): a reason, no counts
                assert c["reason"] and "n" not in c, (det, kind)
                continue
            assert c["n"] == c["tp"] + c["fp"] + c["fn"] + c["tn"] == card["cases"][kind]["n"], (det, kind)
    assert card["setup"]["n_train"] == 4 and card["setup"]["n_duplicated"] == 1 and card["setup"]["resolution"] == 16


def test_every_detector_assess_returns_is_a_row(tiny):
    _, card = tiny
    assert {"nn_ratio", "tiled_l2", "adaptive_l2"} <= set(card["detectors"])
    # the per-space copy detector and the identity detectors had no space here: named, with the reason
    assert {"copy", "identity_leak", "identity_interpolation"} <= set(card["not_measured"])


def test_card_json_is_strict(tiny):
    _, card = tiny
    text = json.dumps(card, allow_nan=False)
    assert json.loads(text) == card
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in _walk(card))


def test_cell_counts_and_intervals():
    c = cell(3, 1, 1, 5, wrong=1)
    assert c["n"] == 10 and c["wrong_match"] == 1
    assert c["recall"]["value"] == 0.75 and c["fpr"]["value"] == pytest.approx(1 / 6)
    assert c["precision"]["value"] == 0.75
    assert (c["fpr"]["ci_low"], c["fpr"]["ci_high"]) == pytest.approx(wilson_interval(1, 6))
    assert cell(0, 0, 0, 4)["precision"] is None and cell(0, 0, 0, 4)["recall"] is None


def test_labels_of_detectors_and_variants():
    assert label_of("nn_ratio") == label_of("sscd_copy") == label_of("nn_ratio_dedup") == "copy"
    assert label_of("identity_leak") == "identity_leak"
    assert label_of("identity_interpolation") == "identity_interpolation"


def test_ground_truth_labels():
    train = [Source("coffee", real_image("coffee")), Source("a1", real_image("astronaut"), "A"),
             Source("h1", real_image("grace_hopper"), "H")]
    gt = ground_truth(train, [], resolution=16, duplicates=1)
    by = {}
    for c in gt.cases:
        by.setdefault(c.kind, []).append(c)
    assert all(c.labels["copy"] for c in by["exact"])
    assert [c.labels["identity_leak"] for c in by["exact"]] == [False, True, True]
    assert [c.identities for c in by["morph"]] == [("A", "H")]
    assert by["morph"][0].labels == {"copy": False, "identity_leak": False, "identity_interpolation": True}
    assert by["dup_exact"][0].targets == ("coffee.png", "coffee__dup.png")
    assert len(by["face_augmented"]) == 2 and all(c.labels["identity_leak"] for c in by["face_augmented"])
    assert "blend" not in by  # one non-face training image: no pair to blend
    with pytest.raises(ValueError, match="unknown case types"):
        ground_truth(train, [], resolution=16, case_types=["exakt"])


def test_a_detector_out_of_its_regime_shows_not_applicable(monkeypatch, capsys):
    """A detector that reports ``applicable = False`` gets its reason in every cell, and no numbers."""
    from memtrack.scan.tracker import Tracker

    real = Tracker.assess

    def assess(self, images, timings=None):
        outs = real(self, images, timings)
        for o in outs:
            if o.name == "adaptive_l2":
                o.applicable, o.reason = False, "fewer than 50 training images"
        return outs

    monkeypatch.setattr(Tracker, "assess", assess)
    _, card = _tiny_card(case_types=("exact", "novel"))
    entry = card["detectors"]["adaptive_l2"]
    assert entry["applicable"] is False
    assert entry["cases"]["exact"] == {"applicable": False, "reason": "fewer than 50 training images"}
    assert "rate" not in json.dumps(entry) and card["detectors"]["nn_ratio"]["applicable"] is True
    words = report_card.cell_words(entry["cases"]["exact"])
    assert words == "n/a: fewer than 50 training images"
    bench = _benchmark()
    bench.print_table(card)
    out = capsys.readouterr().out
    assert re.search(r"adaptive_l2\s+exact\s+n/a\s+not applicable: fewer than 50 training images", out)


def test_samples_a_detector_gives_no_verdict_are_counted_as_not_judged(monkeypatch):
    """A sample without a verdict (tiled_l2 on a copy of a nearly uniform image) counts as not flagged, and the
    card says how many there were, so a low recall is not mistaken for a miss."""
    from memtrack.scan.tracker import Tracker

    real = Tracker.assess

    def assess(self, images, timings=None):
        outs = real(self, images, timings)
        for o in outs:
            if o.name == "nn_ratio":
                o.judged = np.zeros(len(images), bool)
                o.judged[0] = True
                o.flagged = o.flagged & o.judged
        return outs

    monkeypatch.setattr(Tracker, "assess", assess)
    _, card = _tiny_card(case_types=("exact", "novel"))
    exact = card["detectors"]["nn_ratio"]["cases"]["exact"]
    assert exact["not_judged"] == exact["n"] - 1 and exact["tp"] == 1
    assert card["detectors"]["nn_ratio"]["all"]["not_judged"] >= exact["not_judged"]
    assert "not_judged" not in card["detectors"]["identity_leak" if "identity_leak" in card["detectors"]
                                                  else "nn_ratio_dedup"]["cases"]["exact"]


def test_a_new_detector_or_variant_becomes_a_row(monkeypatch):
    """Rows come from what ``assess`` returns: a variant registered after the card was written shows up."""
    import copy as _copy

    from memtrack.config import Config
    from memtrack.scan.tracker import Tracker

    real = Tracker.assess

    def assess(self, images, timings=None):
        outs = real(self, images, timings)
        variant = _copy.deepcopy(next(o for o in outs if o.name == "nn_ratio"))
        variant.name, variant.flagged = "nn_ratio_variant", variant.flagged & False
        return outs + [variant]

    monkeypatch.setattr(Tracker, "assess", assess)
    cfg = Config()
    before = _copy.deepcopy(cfg.index.embedders)
    _, card = _tiny_card(case_types=("exact",), config=cfg)
    row = card["detectors"]["nn_ratio_variant"]
    assert row["label"] == "copy" and row["cases"]["exact"]["fn"] == 3 and row["cases"]["exact"]["tp"] == 0
    assert cfg.index.embedders == before  # the caller's config is not changed


def _benchmark():
    spec = importlib.util.spec_from_file_location("detector_card_bench", ROOT / "benchmarks" / "detector_card.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_prints_a_table_then_the_card_as_one_json_line(tmp_path, capsys):
    bench = _benchmark()
    out = tmp_path / "card.json"
    card = bench.main(["--resolution", "16", "--embedders", "pixel", "--n-train", "3", "--n-novel", "2",
                       "--duplicates", "0", "--cases", "exact,novel", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["detector", "case", "n"]
    assert any(re.match(r"nn_ratio\s+exact\s+3\s+3\s+0\s+0\s+0\s+100%", ln) for ln in lines)
    assert json.loads(lines[-1]) == json.loads(out.read_text()) == card
    assert card["command"].startswith("python benchmarks/detector_card.py --resolution 16")
    assert set(card["cases"]) == {"exact", "novel"}


@pytest.mark.skipif(importlib.util.find_spec("dlib") is None, reason="needs dlib")
def test_face_cases_through_the_real_face_embedder():
    """An exact copy of a training face is a leak of that person (distance 0) and never an interpolation."""
    bench = _benchmark()
    faces = bench.face_sources(32)
    assert sorted({f.identity for f in faces}) == ["Eileen Collins", "Grace Hopper"]
    scenes = [Source(n, real_image(n)) for n in ("coffee", "chelsea")]
    gt = ground_truth(scenes + faces, [], resolution=32, duplicates=0, case_types=["exact", "morph"])
    specs = [EmbedderSpec("pixel", {"resolution": 32}), EmbedderSpec("face", {"align": "assume_aligned"})]
    card = measure_card(gt, specs)
    leak = card["detectors"]["identity_leak"]["cases"]["exact"]
    assert (leak["tp"], leak["fn"], leak["wrong_match"]) == (4, 0, 0)
    interp = card["detectors"]["identity_interpolation"]
    assert interp["cases"]["exact"]["tp"] == 0 and interp["cases"]["exact"]["fp"] == 0
    assert card["cases"]["morph"]["positives"]["identity_interpolation"] == 4
    assert card["setup"]["identities"] == ["Eileen Collins", "Grace Hopper"]


# ------------------------------------------------------------------------------------ reports


def _card(detectors=("nn_ratio", "tiled_l2")) -> dict:
    c = {"n": 4, "tp": 4, "fp": 0, "fn": 0, "tn": 0, "wrong_match": 0,
         "recall": {"value": 1.0, "ci_low": 0.51, "ci_high": 1.0, "count": 4, "n": 4}, "fpr": None, "precision": None}
    neg = {"n": 5, "tp": 0, "fp": 1, "fn": 0, "tn": 4, "wrong_match": 0, "recall": None,
           "fpr": {"value": 0.2, "ci_low": 0.04, "ci_high": 0.62, "count": 1, "n": 5}, "precision": None}
    miss = dict(c, tp=0, fn=4, recall={"value": 0.0, "ci_low": 0.0, "ci_high": 0.49, "count": 0, "n": 4})
    return {"card_version": 1, "memtrack_version": "0.1.0", "command": "python benchmarks/detector_card.py",
            "setup": {"resolution": 32, "n_train": 58, "n_duplicated": 4, "n_faces": 4, "identities": ["A", "B"],
                      "n_cases": 13},
            "cases": {"exact": {"description": f"an exact copy {XSS}", "n": 4},
                      "hflip": {"description": "mirrored", "n": 4}, "novel": {"description": "held out", "n": 5}},
            "detectors": {d: {"label": "copy", "threshold": 1 / 3, "applicable": True,
                              "cases": {"exact": c, "hflip": miss, "novel": neg}} for d in detectors},
            "not_measured": {"copy": f"no weights {XSS}"}}


def _summary(metrics=("nn_ratio",), card=None, resolution=32) -> dict:
    block = {"rate": 0.1, "ci_low": 0.05, "ci_high": 0.2, "count": 6, "n": 64}
    s = {"run": "r", "memtrack_version": "0.1.0",
         "index": {"spaces": {"pixel": {"name": "pixel", "resolution": resolution}}},
         "thresholds": {m: {"value": 1 / 3, "direction": "below", "source": "default"} for m in metrics},
         "checkpoints": [{"step": 100, "n_samples": 64, "metrics": {m: dict(block) for m in metrics}}],
         "onset": {m: {"step": None} for m in metrics}}
    if card is not None:
        s["detector_card"] = card
    return s


def _card_section(page: str) -> str:
    m = re.search(r'<section id="card">.*?</section>', page, re.S)
    assert m, "no card section"
    return m.group(0)


def test_report_shows_the_card_with_escaped_content():
    page = render_html(_summary(("nn_ratio", "clip_copy"), _card()), [])
    sec = _card_section(page)
    assert XSS not in page and "&lt;script&gt;window.__pwned=9&lt;/script&gt;" in sec
    assert "recall 4/4 (100%)" in sec and "flags 1/5 (20%)" in sec
    assert "nn_ratio: sees exact; misses hflip; false alarms on novel 20%." in sec
    assert "clip_copy is not on the card: no weights &lt;script&gt;" in sec   # per-space detector, by family
    assert 'href="#card"' in page and page.index('id="card"') < page.index('id="setup"')


def test_report_shows_only_the_detectors_the_run_used():
    sec = _card_section(render_html(_summary(("nn_ratio",), _card(("nn_ratio", "tiled_l2"))), []))
    assert "nn_ratio" in sec and "tiled_l2" not in sec
    both = _card_section(render_html(_summary(("nn_ratio", "tiled_l2"), _card(("nn_ratio", "tiled_l2"))), []))
    assert "tiled_l2: sees exact" in both
    assert report_card.card_view({"run": "r", "checkpoints": []}) is None  # nothing ran: no card section
    assert 'id="card"' not in render_html({"run": "new"}, [])


def test_report_names_where_the_run_differs_from_the_card():
    s = _summary(("nn_ratio",), _card(), resolution=64)
    s["thresholds"]["nn_ratio"]["value"] = 0.5
    sec = _card_section(render_html(s, []))
    assert "This run&#x27;s pixel space is 64 px; the card was measured at 32 px." in sec
    assert "nn_ratio ran with threshold 0.5; the card measured it at 0.333." in sec


def test_report_names_a_pixel_transform_that_differs_from_the_cards():
    """The package card is measured with mirrored views indexed: a run whose index has none must be told its
    hflip row does not apply."""
    card = _card()
    card.setdefault("setup", {})["spaces"] = {"pixel": {"transform": {"flip": True, "crop": "center"}}}
    s = _summary(("nn_ratio",), card)
    s["index"]["spaces"]["pixel"]["transform"] = {"flip": False, "crop": "center"}
    sec = _card_section(render_html(s, []))
    assert "This run&#x27;s pixel space has flip = False; the card was measured with flip = True" in sec
    s["index"]["spaces"]["pixel"]["transform"]["flip"] = True
    assert "flip = False" not in _card_section(render_html(s, []))


def test_markdown_report_carries_the_card_escaped(tmp_path):
    text = render_markdown(_summary(("nn_ratio",), _card()), [], tmp_path)
    assert "Detector card: what each detector can and cannot see" in text
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert re.search(r"\| exact \| an exact copy &lt;script&gt;.* \| recall 4/4 \\\(100%\\\) \|", text)
    assert "tiled" not in text


def test_without_its_own_card_the_report_uses_the_package_card():
    sec = _card_section(render_html(_summary(("nn_ratio",)), []))
    pkg = report_card.load_package_card()
    assert pkg is not None
    assert f"by memtrack {pkg['memtrack_version']}" in sec and "nn_ratio: sees exact" in sec


def test_a_missing_package_card_is_said_not_hidden(monkeypatch, tmp_path):
    monkeypatch.setattr(report_card, "PACKAGE_CARD", tmp_path / "gone.json")
    sec = _card_section(render_html(_summary(("nn_ratio",)), []))
    assert "No detector card is available" in sec and "--write-package-card" in sec


def test_package_card_covers_every_built_in_detector():
    """Regenerate with `python benchmarks/detector_card.py --write-package-card` when a detector is added."""
    from memtrack.detectors.registry import list_detectors

    text = report_card.PACKAGE_CARD.read_text()
    card = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert card["command"].startswith("python benchmarks/detector_card.py")
    assert "--write-package-card" in card["command"]
    assert card["memtrack_version"] and card["generated_at"] and card["card_version"] == 1
    measured, skipped = card["detectors"], card["not_measured"]
    for name in list_detectors():
        assert name in measured or name in skipped or any(d.endswith(f"_{name}") for d in measured), name
    assert all(skipped.values())
    kinds = set(card["cases"])
    assert kinds <= set(CASE_TYPES) and {"exact", "novel", "morph", "other_person"} <= kinds
    for name, entry in measured.items():
        assert set(entry["cases"]) == kinds, name
        assert entry["label"] == label_of(name)
    assert card["detectors"]["nn_ratio"]["cases"]["exact"]["recall"]["value"] == 1.0
    assert card["setup"]["resolution"] == 32 and card["setup"]["n_train"] >= 50


def test_index_build_card_is_measured_on_the_users_images_and_reaches_summary_and_report(tmp_path, train_dir):
    from memtrack.card.measure import read_index_card
    from memtrack.cli.main import main
    from memtrack.index.reference import ReferenceIndex
    from memtrack.analysis.summary import build_summary
    from memtrack.store.run_store import RunStore

    ref_dir = tmp_path / "ref"
    assert main(["index", "build", str(train_dir), "--out", str(ref_dir), "--resolution", "16", "--card"]) == 0
    card = read_index_card(ref_dir)
    assert card["scope"] == "index" and card["setup"]["n_train"] == 6 and card["setup"]["resolution"] == 16
    exact = card["detectors"]["nn_ratio"]["cases"]["exact"]
    assert (exact["n"], exact["tp"], exact["wrong_match"]) == (6, 6, 0)  # each image's own copy, matched to it
    assert card["cases"]["blend"]["positives"]["copy"] == 0 and "novel" not in card["cases"]
    json.dumps(card, allow_nan=False)
    store = RunStore.open(tmp_path / "run")
    try:
        summary = build_summary(store, tmp_path / "run", ReferenceIndex.open(ref_dir))
    finally:
        store.close()
    assert summary["detector_card"] == card
    summary["thresholds"] = {"nn_ratio": {"value": 1 / 3}}
    sec = _card_section(render_html(summary, []))
    assert "Measured on this run&#x27;s own index" in sec and "nn_ratio: sees exact" in sec
    assert read_index_card(tmp_path) is None  # no card file: nothing, not an error
