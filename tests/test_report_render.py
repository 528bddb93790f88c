"""The report renderers are pure: a summary dict and image bytes in, text out. Fast checks of what the
HTML, Markdown and terminal reports say, that they load nothing remote and escape every data string."""
from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from memtrack.report import svg
from memtrack.report.html import render_html
from memtrack.report.markdown import md, render_markdown
from memtrack.report.terminal import render_table
from memtrack.report.text import onset_sentences
from report_samples import (XSS_CAPTION, XSS_FILE, XSS_IDENTITY, XSS_RUN, XSS_SPACE, make_gallery,
                            make_summary)

REMOTE = re.compile(r'(?:src|href)\s*=\s*["\']\s*(?:https?:)?//[^"\']+')  # as in checks/summary_rises.py
SAFE_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "header", "nav", "a", "section", "h1",
             "h2", "h3", "p", "div", "dl", "dt", "dd", "table", "caption", "thead", "tbody", "tr", "th", "td",
             "span", "strong", "code", "br", "figure", "figcaption", "img", "details", "summary", "footer",
             "svg", "desc", "line", "text", "polyline", "polygon", "circle", "rect", "path"}


class _Tags(HTMLParser):
    """Every element and attribute the browser would build from the page."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags_of(page: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(page)
    return p.tags


@pytest.fixture(scope="module")
def summary():
    return make_summary()


@pytest.fixture(scope="module")
def page(summary):
    return render_html(summary, make_gallery())


def section_ids(page: str) -> set[str]:
    return {a["id"] for t, a in tags_of(page) if t == "section" and "id" in a}


def test_sections_in_reading_order(page):
    ids = [a["id"] for t, a in tags_of(page) if t == "section"]
    assert ids == ["verdict", "latest", "curves", "matches", "identities", "trajectories", "distributions", "card",
                   "setup"]


def test_onset_summary_comes_first_in_plain_words(page):
    text = re.sub(r"<[^>]+>", " ", page)
    assert ("Near-copies (nn_ratio) began at step 4,500 (between 4,000 and 4,500); tiled near-copies (tiled_l2) "
            "at step 5,500 (between 5,000 and 5,500); identity leakage (identity_leak) at step 6,000 "
            "(between 5,500 and 6,000); 3 identities leaked.") in text
    assert "No onset detected for semantic copies (clip_copy) through step 8,000." in text
    assert "Recommended checkpoint: step 4,000 (last checkpoint before any onset)." in text
    assert "2 new checkpoints (steps 7,500, 8,000)" in text
    assert page.index('id="verdict"') < page.index('id="curves"') < page.index('id="setup"')


def test_header_shows_index_thresholds_and_their_source(page):
    assert "ViT-B-32/laion2b" in page and "clip:9f8e7d" in page and "resolution: 32" in page
    assert "not measured" in page and "n_vectors" not in page
    assert "num_inference_steps: 50" in page and "exceeds 1% and stays above it for the next 2" in page
    assert "Skipped checkpoints (1)" in page and "half-written: &lt;no unet&gt;" in page
    assert "Gu et al. 2023" in page and "Carlini et al. 2023" in page
    assert '<span class="badge calibrated">calibrated</span>' in page
    assert '<span class="badge default">default</span>' in page
    assert "score &lt; 0.333" in page and "score &gt; 0.5" in page
    assert "7.4 s per checkpoint (median of 16): sampling 5.0 s · clip 1.9 s" in page


def test_self_contained(page):
    assert not REMOTE.findall(page)
    tags = tags_of(page)
    assert {t for t, _ in tags} <= SAFE_TAGS, {t for t, _ in tags} - SAFE_TAGS
    assert not any(t in ("script", "link", "iframe", "object") for t, _ in tags)
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert imgs and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in imgs)
    assert "@import" not in page and "url(" not in page
    hrefs = [a["href"] for t, a in tags if t == "a"]
    assert hrefs and all(h.startswith("#") for h in hrefs)


def test_every_data_string_is_escaped(page):
    for payload in (XSS_CAPTION, XSS_FILE, XSS_RUN, XSS_IDENTITY, XSS_SPACE):
        assert payload not in page
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;a photo of a cat" in page
    assert "&quot;&gt;&lt;img src=x onerror=&quot;window.__pwned=2;alert(1)&quot;&gt;.png" in page
    for tag, attrs in tags_of(page):
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        assert tag not in ("script", "iframe") and not (tag == "style" and attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/")
    assert sum(1 for t, _ in tags_of(page) if t == "style") == 1


def test_attribute_values_are_escaped():
    s = make_summary()
    s["onset"]['x" onmouseover="window.__pwned=5'] = {"step": None, "between": None}
    s["checkpoints"][-1]["metrics"]['x" onmouseover="window.__pwned=5'] = {"rate": 0.1, "ci_low": 0, "ci_high": 0.2,
                                                                        "count": 1, "n": 10}
    page = render_html(s, [])
    assert 'data-metric="x&quot; onmouseover=&quot;window.__pwned=5"' in page
    assert not any(k.startswith("on") for _, a in tags_of(page) for k in a)


def test_curves_have_bands_and_onset_markers_and_tolerate_missing_metrics(page):
    figs = re.findall(r'<figure class="metric" data-metric="([^"]+)">(.*?)</figure>', page, re.S)
    by = dict(figs)
    assert list(by) == ["nn_ratio", "tiled_l2", "clip_copy", "identity_leak", "distinct_train_images"]
    for metric in ("nn_ratio", "tiled_l2", "identity_leak"):
        assert 'class="onset"' in by[metric] and "<polygon" in by[metric]
    assert 'class="onset"' not in by["clip_copy"]
    assert by["clip_copy"].count("<circle") == 13          # measured from step 2,000 only
    assert "not measured" in page                          # rates table, earlier checkpoints


def test_galleries_show_file_name_caption_scores_and_blends(page):
    assert "training: <code>train/img_0001.png</code>" in page
    assert "0.05 &lt; 0.333" in page and "0.93 &gt; 0.5" in page
    assert 'aria-label="nearest training image missing.png: no image"' in page
    assert page.count('<div class="imgs three">') == 1
    assert "person_042" in page and "Leaked identities (3)" in page


def test_trajectory_heat_map_and_distributions(page):
    assert "Per-seed trajectories" in page and "cat_0003.png" in page and "locked on" in page
    assert "threshold 0.6" in page and "same identity (genuine), 200 pairs" in page
    assert "false-accept rate 0.10%" in page
    assert "Train &rarr; train: pixel" in page


def test_unconfirmed_onsets_and_nan_rates():
    s = make_summary(with_identities=False)
    s["onset"]["tiled_l2"]["confirmed"] = False
    s["checkpoints"][3]["metrics"]["nn_ratio"].update(rate=float("nan"), ci_low=float("nan"))
    page = render_html(s, [])
    assert "onset 5,500?" in page and "(between 5,000 and 5,500), not yet confirmed by later checkpoints" in page
    assert "nan" not in re.sub(r"<[^>]+>", "", "".join(re.findall(r"<svg.*?</svg>", page, re.S))).lower()
    assert not re.search(r'(points|d|x|y|cx|cy|x1|y1)="[^"]*nan', page)


def test_missing_sections_are_omitted():
    s = {"run": "bare", "checkpoints": [{"step": 100, "n_samples": 8, "metrics": {
        "nn_ratio": {"rate": 0.0, "ci_low": 0.0, "ci_high": 0.32, "count": 0, "n": 8}}}],
         "onset": {"nn_ratio": {"step": None, "between": None}}}
    page = render_html(s, [])
    assert section_ids(page) == {"verdict", "latest", "curves", "card", "setup"}
    assert "No onset detected for any metric through step 100." in page
    assert 'href="#matches"' not in page and 'href="#trajectories"' not in page
    assert "Recommended" not in page and "Since" not in page
    empty = render_html({"run": "new"}, [])
    assert "No checkpoints evaluated yet." in empty and section_ids(empty) == {"verdict", "setup"}


def test_images_that_are_not_images_become_placeholders():
    g = make_gallery()[:1]
    g[0]["sample_png"] = b"<script>alert(1)</script>"
    page = render_html(make_summary(), g)
    assert "data:image/png;base64,PHNjcmlwdD" not in page
    assert "image format not shown" in page


def test_multi_run_overlay():
    a, b = make_summary("no-dedup", shift=-1500), make_summary("dedup", shift=1500, seed=1, with_identities=False)
    page = render_html(a, [], runs=[a, b])
    fig = re.search(r'data-metric="nn_ratio">(.*?)</figure>', page, re.S).group(1)
    assert fig.count("<polyline") == 2 and fig.count('class="onset"') == 2
    assert "onset 3,000" in fig and "onset 6,000" in fig
    assert 'class="legend"' in fig and "no-dedup" in fig and "dedup" in fig
    assert 'stroke-dasharray="7 4"' in fig                 # runs differ by dash as well as colour
    leak = re.search(r'data-metric="identity_leak">(.*?)</figure>', page, re.S).group(1)
    assert leak.count("<polyline") == 1                    # a run without the metric is skipped
    assert 'id="runs"' in page and "Memorization report: no-dedup vs dedup" in page
    assert render_html(a, [], runs=[b]).count("<polyline") == page.count("<polyline")  # primary added


def test_duplicate_run_names_are_numbered():
    a, b = make_summary("same"), make_summary("same", shift=500)
    page = render_html(a, [], runs=[a, b])
    assert "same (1)" in page and "same (2)" in page


def test_onset_sentences_edge_cases():
    s = make_summary(with_identities=False)
    s["onset"] = {"nn_ratio": {"step": 500, "between": None}}
    assert onset_sentences(s) == ["Near-copies (nn_ratio) began at step 500 (already at the first checkpoint "
                                  "evaluated)."]
    s["onset"] = {}
    assert onset_sentences(s) == ["No onset detected through step 8,000."]


def test_markdown_writes_images_next_to_it(tmp_path):
    s = make_summary()
    text = render_markdown(s, make_gallery(), tmp_path, runs=[s, make_summary("b", shift=1000)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "memtrack-rates.png" in files and "memtrack-match-1-generated.png" in files
    assert "memtrack-match-7-identity-b.png" in files and "memtrack-match-5-training.png" not in files
    for name in re.findall(r'(?:src="|\]\()(memtrack-[^")]+)', text):
        assert (tmp_path / name).is_file()
        Image.open(tmp_path / name).verify()
    assert "| near-copies \\(nn\\_ratio\\) | 28.1% | [18.6%, 40.1%] | 18/64 | 4,500 |" in text
    assert "**Near-copies" in text and "Recommended checkpoint: step 4,000" in text
    assert "<script" not in text and "<iframe" not in text and "<svg" not in text
    assert "&lt;script&gt;window.\\_\\_pwned=1&lt;/script&gt;" in text


def test_markdown_escapes_links_and_tables():
    assert md("[x](http://evil)|y") == "\\[x\\]\\(http://evil\\)\\|y"
    assert md('<a href="x">\n') == "&lt;a href=&quot;x&quot;&gt;"


def test_markdown_without_gallery_lists_top_matches(tmp_path):
    text = render_markdown(make_summary(), [], tmp_path)
    assert "Top matches at the latest checkpoint" in text
    assert "&quot;&gt;&lt;img src=x" in text


def test_terminal_table():
    out = render_table(make_summary("my-run"))
    lines = out.splitlines()
    assert lines[0] == "run my-run: step 8,000 (64 samples, unet_ema), 16 checkpoints"
    assert re.match(r"metric\s+flagged\s+95% CI\s+count/n\s+onset$", lines[1])
    row = next(line for line in lines if line.startswith("near-copies (nn_ratio)"))
    assert row.split() == ["near-copies", "(nn_ratio)", "28.1%", "[18.6%,", "40.1%]", "18/64", "step", "4,500",
                           "(4,000-4,500)"]
    assert re.search(r"semantic copies \(clip_copy\)\s+0%\s+\[0%, 5.7%\]\s+0/64\s+none", out)
    assert "Near-copies (nn_ratio) began at step 4,500" in out
    assert "\x1b" not in render_table(make_summary("evil\x1b[2J"))
    assert render_table({"run": "new", "checkpoints": []}) == "run new: no checkpoints evaluated yet."


def test_terminal_table_metric_not_measured_at_latest():
    s = make_summary()
    del s["checkpoints"][-1]["metrics"]["clip_copy"]
    assert re.search(r"semantic copies \(clip_copy\)\s+not measured", render_table(s))


def test_nice_ticks_and_empty_charts():
    assert svg.nice_ticks(0, 0.28) == [0.0, 0.1, 0.2, 0.3]
    assert svg.nice_ticks(500, 8000)[0] == 0 and svg.nice_ticks(500, 8000)[-1] >= 8000
    assert svg.line_chart([], title="x") == "" and svg.histogram([], title="x", xlabel="x") == ""
    assert svg.heatmap([], [], {}, title="x") == ""


def test_a_rise_that_falls_back_is_named_but_is_not_an_onset():
    def cp(step, rate, low):
        return {"step": step, "n_samples": 64, "metrics": {
            "identity_interpolation": {"rate": rate, "ci_low": low, "ci_high": rate + 0.1, "count": 1, "n": 64},
            "nn_ratio": {"rate": 0.0, "ci_low": 0.0, "ci_high": 0.06, "count": 0, "n": 64}}}
    s = {"run": "r", "checkpoints": [cp(375, 0.0, 0.0), cp(750, 0.078, 0.034), cp(1125, 0.078, 0.034),
                                     cp(1500, 0.031, 0.0086), cp(1875, 0.016, float("nan"))],
         "onset": {"identity_interpolation": {"step": None, "between": None}, "nn_ratio": {"step": None}},
         "onset_rule": {"baseline_rate": 0.01, "persistence": 2}}
    text = onset_sentences(s)
    assert text[0] == "No onset detected for any metric through step 1,875."
    assert text[1] == ("Identity blending (identity_interpolation) rose above 1% at 2 checkpoints between steps 750 "
                       "and 1,125 (peak 7.8% at step 750) but did not stay above it, so no onset is declared.")
    assert len(text) == 2  # nn_ratio never rose: nothing more is said about it
    assert "(peak 7.8% at step 750) but did not stay above it, so no onset is declared." in render_html(s, [])
