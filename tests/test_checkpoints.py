"""Checkpoint discovery in diffusers' layouts."""
from __future__ import annotations

import pytest

from conftest import tiny_unet, write_checkpoint
from memtrack.sampling.checkpoints import discover
from memtrack.errors import CheckpointError


def test_discovers_in_step_order_and_prefers_ema(tmp_path):
    run = tmp_path / "run"
    for step in (1000, 200, 30):
        write_checkpoint(run, step, seed=step, ema=True)
    cks = discover(run)
    assert [c.step for c in cks] == [30, 200, 1000]  # numeric, not lexicographic
    assert all(c.weights_name == "unet_ema" and c.weights.name == "unet_ema" for c in cks)
    assert [c.weights_name for c in discover(run, prefer_ema=False)] == ["unet"] * 3


def test_incomplete_and_unknown_checkpoints_are_left_out(tmp_path):
    run = tmp_path / "run"
    write_checkpoint(run, 10, 0)
    write_checkpoint(run, 20, 1, complete=False)  # accelerate has not written random_states_0.pkl yet
    (run / "checkpoint-30").mkdir()                 # unknown layout
    (run / "checkpoint-30" / "optimizer.bin").write_bytes(b"x")
    assert [c.step for c in discover(run)] == [10]
    assert [c.step for c in discover(run, include_incomplete=True)] == [10, 20]


def test_final_pipeline_is_added_after_the_last_checkpoint(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    run = tmp_path / "run"
    write_checkpoint(run, 10, 0)
    DDPMPipeline(unet=tiny_unet(seed=5), scheduler=DDPMScheduler()).save_pretrained(run)
    cks = discover(run)
    assert [(c.step, c.name, c.kind) for c in cks] == [(10, "checkpoint-10", "unet"), (11, "final", "pipeline")]


def test_final_pipeline_identical_to_last_checkpoint_is_not_evaluated_twice(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=3)
    DDPMPipeline(unet=tiny_unet(seed=3), scheduler=DDPMScheduler()).save_pretrained(run)
    assert [c.name for c in discover(run)] == ["checkpoint-10"]


def test_fingerprint_changes_with_weights(tmp_path):
    run = tmp_path / "run"
    ck = write_checkpoint(run, 10, 0)
    fp = discover(run)[0].fingerprint()
    tiny_unet(seed=99).save_pretrained(ck / "unet")
    assert discover(run)[0].fingerprint() != fp


def test_no_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        discover(tmp_path / "empty")
