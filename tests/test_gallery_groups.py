"""The report's gallery, one card per reproduced training image (issue 13 part 8).

The demo's camera was shown five times (once per seed that copied it); the gallery now groups matches by
training image -- how many seeds, the first step, the strongest example -- and leaves the per-seed view to
the trajectory map.
"""
from __future__ import annotations

import base64
import re

from memtrack.cli.main import main
from memtrack.report.html import render_html
from memtrack.report.html_gallery import group_matches, margin, reproductions
from report_samples import make_summary, png


def item(tid, seed, step, score, threshold=1 / 3, direction="below", detector="nn_ratio", **kw):
    return {"train_id": tid, "seed": seed, "step": step, "score": score, "threshold": threshold,
            "direction": direction, "detector": detector, "sample_png": png(seed), "train_png": png(100),
            "caption": None, "identity": None, "blend": None, **kw}


CAMERA = [item("camera.png", s, 1500 - 100 * (s % 3), 0.05 + 0.02 * s) for s in (3, 1, 4, 0, 2)]
TRAJ = {"steps": [500, 1000, 1500], "seeds": [0, 1, 2, 3, 4, 5, 6],
        "matches": [[None, "camera.png", "camera.png"], [None, None, "camera.png"], ["camera.png", None, None],
                    [None, None, "camera.png"], [None, "camera.png", "camera.png"], [None, None, "cat.png"],
                    [None, "camera.png", "camera.png"]]}


def test_reproductions_collect_every_seed_and_the_first_step():
    assert reproductions(TRAJ) == {"camera.png": {"seeds": [0, 1, 2, 3, 4, 6], "first_step": 500},
                                   "cat.png": {"seeds": [5], "first_step": 1500}}
    assert reproductions(None) == {} and reproductions({"steps": [], "seeds": [], "matches": []}) == {}


def test_five_seeds_on_one_image_make_one_group_with_its_best_example():
    groups = group_matches(CAMERA)
    assert len(groups) == 1
    g = groups[0]
    assert (g["train_id"], g["n_seeds"], g["seeds"], g["n_examples"]) == ("camera.png", 5, [0, 1, 2, 3, 4], 5)
    assert g["first_step"] == min(c["step"] for c in CAMERA) and g["from_trajectories"] is False
    assert g["best"]["seed"] == 0                           # score 0.05: furthest below the threshold


def test_trajectories_give_the_run_wide_seeds_and_first_step():
    g = group_matches(CAMERA, TRAJ)[0]
    assert g["from_trajectories"] and g["seeds"] == [0, 1, 2, 3, 4, 6] and g["first_step"] == 500
    assert g["best"]["seed"] == 0                           # the example still comes from the items


def test_best_example_is_compared_by_margin_across_detectors():
    below = item("x.png", 1, 100, 0.30)                                  # 10% under 1/3
    above = item("x.png", 2, 100, 0.90, threshold=0.5, direction="above", detector="copy")  # 80% over 0.5
    assert margin(above) > margin(below)
    assert group_matches([below, above])[0]["best"]["seed"] == 2
    assert margin({"score": None, "threshold": 0.3}) == float("-inf")
    tie = [item("y.png", 7, 900, 0.1), item("y.png", 8, 800, 0.1)]
    assert group_matches(tie)[0]["best"]["seed"] == 7                    # ties: the earlier (later step) item


def test_groups_order_by_seeds_then_first_step_and_unknown_images_stay_apart():
    items = [item("a.png", 1, 300, 0.1), item(None, 2, 200, 0.1), item(None, 3, 200, 0.1),
             *[item("b.png", s, 400 + s, 0.2) for s in (4, 5)], item("c.png", 6, 100, 0.1)]
    groups = group_matches(items)
    assert [g["train_id"] for g in groups] == ["b.png", "c.png", None, None, "a.png"]
    assert [g["n_seeds"] for g in groups] == [2, 1, 1, 1, 1]
    assert group_matches([]) == []


def matches_html(page: str) -> str:
    return re.search(r'<section id="matches">(.*?)</section>', page, re.S).group(1)


def test_rendered_gallery_has_one_card_per_image_and_keeps_the_trajectory_map():
    summary = make_summary()
    summary["trajectories"] = TRAJ
    other = item("cat.png", 5, 1500, 0.2, sample_png=png(55), train_png=png(56))
    page = render_html(summary, [*CAMERA, other])
    body = matches_html(page)
    cards = body.split('<figure class="card">')[1:]
    assert len(cards) == 2 and body.count("training: <code>camera.png</code>") == 1
    assert "Reproduced training images" in page and 'href="#trajectories"' in body
    assert '<section id="trajectories">' in page                         # the per-seed view stays
    camera = cards[0]
    assert "<strong>6 of 7 seeds</strong> (0, 1, 2, 3, 4, 6); first at step 500" in camera
    pngs = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', camera)]
    assert pngs[:2] == [png(0), png(100)]                                # best example (seed 0), training image
    assert "seed 0</p>" in camera
    assert "<strong>1 of 7 seed</strong> (5); first at step 1,500" in cards[1]


def test_without_trajectories_the_card_says_its_counts_are_from_the_matches():
    summary = make_summary(with_trajectories=False)
    body = matches_html(render_html(summary, CAMERA))
    assert "<strong>5 seeds</strong> among the strongest matches (0, 1, 2, 3, 4)" in body
    assert 'href="#trajectories"' not in body


def test_report_of_a_copying_run_shows_each_copied_image_once_with_all_its_seeds(copycat_scanned, train_dir, tmp_path):
    from conftest import COPYCAT_SCHEDULE
    from memorizing import training_images

    out = tmp_path / "report.html"
    assert main(["report", str(copycat_scanned), "--out", str(out), "--quiet"]) == 0
    body = matches_html(out.read_text())
    names = sorted(dict(training_images(train_dir)))
    last = COPYCAT_SCHEDULE[max(COPYCAT_SCHEDULE)]
    copied = {n: [s for s in range(last) if names[s % len(names)] == n] for n in names}
    copied = {n: seeds for n, seeds in copied.items() if seeds}
    shown = re.findall(r"training: <code>(.*?)</code>", body)
    # once each; an image appears only if one of its copies is among some checkpoint's top_matches (8)
    assert len(shown) == len(set(shown)) >= 4 and set(shown) <= set(copied)
    cards = re.findall(r"training: <code>(.*?)</code>.*?seeds?</strong> \(([\d, ]+)\)", body, re.S)
    assert len(cards) == len(shown)
    for tid, seeds in cards:
        assert [int(s) for s in seeds.split(", ")] == copied[tid], tid
