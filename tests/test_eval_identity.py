"""A stored verdict is served only for what it was computed from: the index's content, the scheduler that
sampled, and (``Tracker.step``) the live weights' content.

Samples that copy a training image are made without training: a pipeline passed to ``Tracker.evaluate``
that returns given images (the code path of ``Tracker.step(pipeline=...)``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import SCENES, tiny_unet, write_training_set
from memtrack.sampling.checkpoints import discover
from memtrack.cli.main import main
from memtrack.config import Config
from memtrack.index.reference import ReferenceIndex
from memtrack.store.run_store import RunStore
from memtrack.scan.tracker import Tracker

FAST = ["--num-samples", "4", "--steps", "2"]


class Replay:
    """A pipeline whose sample for seed s is ``images[s % len(images)]``: a model that copies, untrained."""

    def __init__(self, images):
        self.images = list(images)

    def __call__(self, *, generator, **kwargs):
        return SimpleNamespace(images=[self.images[g.initial_seed() % len(self.images)] for g in generator])


def _cfg(n: int = 4) -> Config:
    cfg = Config()
    cfg.sampling.num_samples, cfg.sampling.num_inference_steps = n, 2
    return cfg


def _build(data: Path, out: Path, *extra: str) -> Path:
    assert main(["index", "build", str(data), "--out", str(out), "--embedders", "pixel", "--resolution", "16",
                 "--json", *extra]) == 0
    return out


def _evaluate(run: Path, index: Path, pipeline=None, ck=None):
    tracker = Tracker.from_config(_cfg(), index=index, run_dir=run)
    try:
        return tracker.evaluate(ck or discover(run)[0], pipeline=pipeline)
    finally:
        tracker.close()


@pytest.fixture()
def five(tmp_path) -> Path:
    """Five training photographs; ``coins`` (the sixth scene) is left out."""
    return write_training_set(tmp_path / "five", names=SCENES[:5], metadata=False)


@pytest.fixture()
def coins(tmp_path) -> Path:
    return write_training_set(tmp_path / "more", names=["coins"], metadata=False)


def _image(folder: Path, name: str) -> Image.Image:
    return Image.open(folder / f"{name}.png").convert("RGB")


# ------------------------------------------------------------------------------------------ index


def test_an_image_added_to_the_index_is_found_by_the_next_scan_without_force(tiny_run, five, coins, tmp_path, capsys):
    ref = _build(five, tmp_path / "ref")
    copies = Replay([_image(coins, "coins")])  # every sample is the coins photograph
    before = _evaluate(tiny_run, ref, copies)
    assert not before.cached and before.metrics["nn_ratio"]["rate"] == 0.0  # not a training image yet
    assert _evaluate(tiny_run, ref, copies).cached  # same inputs: answered from the store
    hash_before = ReferenceIndex.open(ref).content_hash
    _build(coins, ref, "--add")
    capsys.readouterr()
    after = _evaluate(tiny_run, ref, copies)
    assert not after.cached, "a verdict computed against the old index was served"
    assert after.metrics["nn_ratio"]["rate"] == 1.0 and after.metrics["nn_ratio_dedup"]["rate"] == 1.0
    assert after.series != before.series
    grown = ReferenceIndex.open(ref)
    assert grown.content_hash != hash_before and grown.extends(hash_before) and grown.extends(grown.content_hash)
    assert grown.manifest["additions"][-1]["previous_content_hash"] == hash_before


def test_an_index_rebuilt_at_the_same_path_from_other_images_re_evaluates(tiny_run, five, coins, tmp_path):
    ref = _build(five, tmp_path / "ref")
    first = ReferenceIndex.open(ref).content_hash
    copies = Replay([_image(coins, "coins")])
    assert _evaluate(tiny_run, ref, copies).metrics["nn_ratio"]["rate"] == 0.0
    other = tmp_path / "other"
    shutil.copytree(five, other)
    (other / "astronaut.png").unlink()
    shutil.copy(coins / "coins.png", other / "coins.png")
    _build(other, ref, "--overwrite")  # same path, same size, same embedder: other images
    after = _evaluate(tiny_run, ref, copies)
    assert not after.cached and after.metrics["nn_ratio"]["rate"] == 1.0
    rebuilt = ReferenceIndex.open(ref)
    assert rebuilt.content_hash != first and not rebuilt.extends(first)  # its rows name other images


def test_rebuilding_the_same_images_keeps_the_content_hash_and_the_verdicts(tiny_run, five, tmp_path):
    ref = _build(five, tmp_path / "ref")
    first = ReferenceIndex.open(ref).content_hash
    copies = Replay([_image(five, "coffee")])
    assert _evaluate(tiny_run, ref, copies).metrics["nn_ratio"]["rate"] == 1.0
    _build(five, ref, "--overwrite")  # a new creation time, the same content
    assert ReferenceIndex.open(ref).content_hash == first
    assert _evaluate(tiny_run, ref, copies).cached


def test_the_content_hash_is_stored_and_an_old_manifest_gets_the_same_one(five, tmp_path, capsys):
    ref = _build(five, tmp_path / "ref")
    stored = json.loads((ref / "manifest.json").read_text())["content_hash"]
    assert stored.startswith("sha256:") and len(stored) == 7 + 64
    assert json.loads(capsys.readouterr().out)["content_hash"] == stored  # `index build --json`
    manifest = json.loads((ref / "manifest.json").read_text())
    del manifest["content_hash"]  # as an older memtrack wrote it
    (ref / "manifest.json").write_text(json.dumps(manifest))
    assert ReferenceIndex.open(ref).content_hash == stored
    assert "content_hash" not in json.loads((ref / "manifest.json").read_text())  # a reader writes nothing
    assert main(["index", "info", str(ref)]) == 0
    assert stored in capsys.readouterr().out


def test_a_sharded_build_has_the_content_hash_of_a_one_process_build(five, tmp_path):
    from memtrack.config import EmbedderSpec
    from memtrack.data.dataset import read_dataset
    from memtrack.embedders.registry import get_embedder

    cfg = Config()
    cfg.index.embedders, cfg.index.shard_size = [EmbedderSpec("pixel", {"resolution": 16})], 2
    embs = [get_embedder(s) for s in cfg.index.embedders]
    one = ReferenceIndex.build(read_dataset(five), embs, tmp_path / "one", cfg)
    sharded = ReferenceIndex.build(read_dataset(five), embs, tmp_path / "sharded", cfg, shard_dir=tmp_path / "sh")
    assert one.content_hash == sharded.content_hash
    vectors = np.load(tmp_path / "one" / "pixel.vectors.npy")
    vectors[0, 0] ^= 1  # one pixel of one training image: another reference
    np.save(tmp_path / "one" / "pixel.vectors.npy", vectors)
    from memtrack.index.content_hash import content_hash

    assert content_hash(tmp_path / "one", one.manifest, one.records) != one.content_hash


# -------------------------------------------------------------------------------------- scheduler


def _scan_lines(run, index, capsys) -> list[str]:
    capsys.readouterr()
    assert main(["scan", str(run), "--index", str(index), *FAST]) == 0
    return [ln for ln in capsys.readouterr().out.splitlines() if "step" in ln and "checkpoint-" in ln]


def test_a_scheduler_folder_that_appears_re_evaluates_when_it_changes_the_sampler(tiny_run, pixel_index, capsys):
    from diffusers import DDPMScheduler

    assert not any("stored earlier" in ln for ln in _scan_lines(tiny_run, pixel_index, capsys))
    fields = Config().sampling
    # the run saves the scheduler the config already assumed: same sampler, nothing to redo
    DDPMScheduler(num_train_timesteps=fields.num_train_timesteps, beta_schedule=fields.beta_schedule,
                  prediction_type=fields.prediction_type).save_config(tiny_run / "scheduler")
    assert all("stored earlier" in ln for ln in _scan_lines(tiny_run, pixel_index, capsys))
    # a scheduler/ folder that differs from the config's guess: every checkpoint is sampled again
    DDPMScheduler(num_train_timesteps=fields.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                  prediction_type=fields.prediction_type).save_config(tiny_run / "scheduler")
    lines = _scan_lines(tiny_run, pixel_index, capsys)
    assert len(lines) == 3 and not any("stored earlier" in ln for ln in lines)
    with RunStore.open(tiny_run, create=False) as store:
        series = store.list_series()
        assert len(series) == 2
        new, old = series  # newest first
        assert new.identity["scheduler"]["config"]["beta_schedule"] == "squaredcos_cap_v2"
        assert old.identity["scheduler"]["config"]["beta_schedule"] == fields.beta_schedule
        hashes = {s.key: [x["sha256"] for x in store.samples(store.evaluations(series=s.key)[0].id)] for s in series}
    assert hashes[new.key] != hashes[old.key]  # the samples changed: the old verdicts were for other samples


def test_the_planned_scheduler_is_the_one_that_samples(tiny_run):
    from memtrack.sampling.unconditional import scheduler_identity
    from memtrack.sampling.registry import load_pipeline, planned_scheduler

    cfg = _cfg().sampling
    for ck in discover(tiny_run):
        assert scheduler_identity(planned_scheduler(ck, cfg, tiny_run)) == \
            scheduler_identity(load_pipeline(ck, cfg, tiny_run).scheduler)


# ------------------------------------------------------------------------------------- live weights


def _step(run, index, unet):
    tracker = Tracker.from_config(_cfg(), index=index, run_dir=run)
    try:
        return tracker.step(tracker.config.tracking.every_n_steps, unet=unet)
    finally:
        tracker.close()


def test_tracker_step_is_keyed_by_the_live_weights(tmp_path, pixel_index):
    import torch

    torch.set_num_threads(1)
    run = tmp_path / "run"
    first = _step(run, pixel_index, tiny_unet(seed=0))
    assert not first.cached
    again = _step(run, pixel_index, tiny_unet(seed=0))  # a restarted process, the very same weights
    assert again.cached and again.eval_key == first.eval_key
    other = _step(run, pixel_index, tiny_unet(seed=1))  # a retrained run reaching the same step
    assert not other.cached and other.eval_key != first.eval_key
    nudged = tiny_unet(seed=0)
    with torch.no_grad():
        next(nudged.parameters()).view(-1)[0] += 1e-3  # one weight moved
    assert not _step(run, pixel_index, nudged).cached
    with RunStore.open(run, create=False) as store:
        rows = store.evaluations(latest_per_checkpoint=False)
        name = f"step-{Config().tracking.every_n_steps}"
        assert [e.checkpoint for e in rows] == [name] * 3 and len({e.series for e in rows}) == 1


def test_the_weights_hash_covers_every_tensor_and_nothing_else(tmp_path):
    import torch

    from memtrack.sampling.text_to_image import weights_hash

    a, b = tiny_unet(seed=0), tiny_unet(seed=0)
    assert weights_hash(a) == weights_hash(b)
    b.train(False)  # the mode is not the weights
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        list(b.state_dict().values())[-1].view(-1)[-1] += 1.0  # the last tensor's last value
    assert weights_hash(a) != weights_hash(b)
    assert weights_hash(a, None) == weights_hash(a) != weights_hash(a, tiny_unet(seed=3))
    assert weights_hash(a.to(torch.bfloat16)) != weights_hash(tiny_unet(seed=0))  # dtypes are hashed too


def test_text_to_image_keys_hold_the_base_pipelines_scheduler(tmp_path, pixel_index, caplog):
    pytest.importorskip("transformers")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from tiny_models import tiny_cond_unet, write_tiny_sd

    base = write_tiny_sd(tmp_path / "base")
    run = tmp_path / "run"
    tiny_cond_unet(1).save_pretrained(run / "checkpoint-5" / "unet")
    (run / "checkpoint-5" / "random_states_0.pkl").write_bytes(b"x")
    StableDiffusionPipeline.from_pretrained(base).save_pretrained(run)  # the final pipeline, its own scheduler/
    over = {"sampling.num_samples": 2, "sampling.num_inference_steps": 2, "sampling.resolution": 16,
            "sampling.pretrained_model": str(base)}

    def evaluate_all():
        tracker = Tracker.from_config(None, index=pixel_index, run_dir=run, overrides=over)
        try:
            return [tracker.evaluate(ck) for ck in discover(run)], tracker
        finally:
            tracker.close()

    caplog.set_level("WARNING", logger="memtrack")
    first, _ = evaluate_all()
    assert [r.cached for r in first] == [False, False]
    assert "other than the scheduler planned" not in caplog.text  # planned from config files = the one used
    assert [r.cached for r in evaluate_all()[0]] == [True, True]
    # the base pipeline's scheduler changes (another beta schedule): checkpoint-5 is sampled with it again;
    # the final pipeline samples with its own saved scheduler, which did not change
    DDIMScheduler.from_pretrained(base, subfolder="scheduler", beta_schedule="linear").save_pretrained(
        base / "scheduler")
    from memtrack.sampling import text_to_image as sampling_t2i

    sampling_t2i._BASE.clear()  # a new process would not have the old base loaded
    again, _ = evaluate_all()
    assert [r.cached for r in again] == [False, True]
    assert "other than the scheduler planned" not in caplog.text
