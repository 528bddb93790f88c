"""The probes and per-seed dynamics as a scan runs them: stored per checkpoint, summarised for the report."""
from __future__ import annotations

import json

import pytest

from conftest import write_training_set
from memtrack.sampling.checkpoints import discover
from memtrack.cli.main import main
from memtrack.errors import ConfigError
from memtrack.report.write import run_summary
from memtrack.scan.tracker import Tracker
from tiny_models import tiny_cond_unet, write_tiny_sd


def test_scan_with_loss_gap_stores_it_and_summarises_onsets(tiny_run, pixel_index, tmp_path):
    held = write_training_set(tmp_path / "held", names=["hubble_deep_field", "immunohistochemistry", "clock"],
                              metadata=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dynamics:\n  loss_gap: true\n  heldout_dir: {held}\n  loss_gap_images: 3\n"
                   "  loss_gap_timesteps: 3\n")
    assert main(["scan", str(tiny_run), "--index", str(pixel_index), "--config", str(cfg),
                 "--num-samples", "4", "--steps", "2"]) == 0
    summary = run_summary(tiny_run)
    cks = summary["checkpoints"]
    assert [c["step"] for c in cks] == [10, 20, 30]
    for c in cks:
        g = c["loss_gap"]
        assert len(g["timesteps"]) == 3 and g["n_train"] == 3 and g["n_heldout"] == 3
        assert g["gap_mean"] == pytest.approx(g["heldout_mean"] - g["train_mean"])
    block = summary["loss_gap"]
    assert block["steps"] == [10, 20, 30] and set(block["onset"]) >= {"step", "between", "confirmed", "rule"}
    json.dumps(summary)  # the whole summary stays JSON


def test_loss_gap_without_heldout_folder_is_a_config_error(pixel_index):
    from memtrack.config import load_config

    with pytest.raises(ConfigError, match="heldout_dir"):
        Tracker.from_config(load_config(overrides={"dynamics.loss_gap": True}), index=pixel_index)


def test_trajectories_and_which_images_in_the_summary(tiny_run, pixel_index):
    assert main(["scan", str(tiny_run), "--index", str(pixel_index), "--num-samples", "4", "--steps", "2"]) == 0
    s = run_summary(tiny_run)
    t = s["trajectories"]
    assert t["steps"] == [10, 20, 30] and t["seeds"] == [0, 1, 2, 3]
    assert len(t["matches"]) == 4 and all(len(row) == 3 for row in t["matches"])
    imgs = s["which_images"]["images"]
    assert len(imgs) == 6 and all(m["near_duplicates"] == 0 for m in imgs)  # six distinct photographs
    assert all(m["bytes_per_pixel"] > 0 for m in imgs)


def test_noise_magnitude_per_prompt_on_text_to_image(tmp_path, pixel_index):
    pytest.importorskip("transformers")
    base = write_tiny_sd(tmp_path / "base")
    run = tmp_path / "run"
    tiny_cond_unet(1).save_pretrained(run / "checkpoint-5" / "unet")
    (run / "checkpoint-5" / "random_states_0.pkl").write_bytes(b"x")
    tracker = Tracker.from_config(None, index=pixel_index, run_dir=run, overrides={
        "sampling.num_samples": 4, "sampling.num_inference_steps": 2, "sampling.resolution": 16,
        "sampling.pretrained_model": str(base), "dynamics.noise_magnitude": True})
    res = tracker.evaluate(discover(run)[0])
    tracker.close()
    block = res.probes["noise_magnitude"]
    prompts = [r.caption for r in tracker.index.records][:4]
    assert set(block["per_prompt"]) == set(prompts) and block["n"] == 4
    assert all(v > 0 for v in block["per_prompt"].values())
    assert block["top"][0]["magnitude"] == max(block["per_prompt"].values())
    summary = run_summary(run)
    assert summary["noise_magnitude"]["steps"] == [5]


def test_report_renders_probe_and_reproduction_sections():
    from memtrack.report.html import render_html

    summary = {"run": "r", "checkpoints": [{"step": s, "n_samples": 8, "metrics": {}} for s in (100, 200, 300)],
               "onset": {"nn_ratio": {"step": 300, "between": [200, 300], "confirmed": False}},
               "loss_gap": {"steps": [100, 200, 300], "gap_mean": [0.0, 0.02, 0.05], "heldout_mean": [0.1] * 3,
                            "train_mean": [0.1, 0.08, 0.05], "timesteps": [0, 500],
                            "onset": {"step": 200, "between": [100, 200], "confirmed": False, "rule": "gap > ..."},
                            "citation": "Favero et al. 2025"},
               "noise_magnitude": {"steps": [100, 300], "p50": [1.0, 1.2], "p95": [2.0, 3.0], "max": [2.5, 9.0],
                                   "top_latest": [{"rank": 1, "prompt": "<b>a cat</b>", "magnitude": 9.0}],
                                   "citation": "Wen et al., ICLR 2024"},
               "which_images": {"images": [{"train_id": "cat.png", "reproduced": True, "first_step": 300, "n_seeds": 2,
                                            "near_duplicates": 1, "bytes_per_pixel": 1.5, "risk_rank": 1}],
                                "summary": {"reproduced": {"n": 1}, "not_reproduced": {"n": 5}}}}
    html = render_html(summary, [])
    for text in ("Loss gap", "Onsets side by side", "Noise magnitude", "Which training images were reproduced",
                 "cat.png", "&lt;b&gt;a cat&lt;/b&gt;"):
        assert text in html, text
    assert "<b>a cat</b>" not in html
