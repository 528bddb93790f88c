"""The demo's training set and training loop: files, labels, and the exact diffusers checkpoint layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")
torch = pytest.importorskip("torch")

from memtrack.data.dataset import read_dataset  # noqa: E402
from memtrack.demo.train import RECIPE, build_demo_dataset, train_demo  # noqa: E402
from memtrack.errors import CheckpointError, DataError  # noqa: E402

TINY = dict(resolution=16, batch_size=4, lr=1e-3, seed=0, ema_decay=0.9, block_out_channels=(4, 8), norm_num_groups=4,
            layers_per_block=1, progress=False)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("data"), 16)


def test_dataset_files_metadata_and_identities(demo_data):
    rows = [json.loads(line) for line in (demo_data / "metadata.jsonl").read_text().splitlines()]
    assert 8 <= len(rows) <= 10
    assert all(r["text"] for r in rows)
    identities = [r.get("identity") for r in rows]
    assert identities.count("Eileen Collins") == 2 and identities.count("Grace Hopper") == 2
    assert sum(i is None for i in identities) == len(rows) - 4
    for r in rows:
        with Image.open(demo_data / r["file_name"]) as im:
            assert im.format == "PNG" and im.size == (16, 16) and im.mode == "RGB"
    ds = read_dataset(demo_data, show_progress=False)
    assert len(ds) == len(rows) and not ds.skipped
    assert {r.identity for r in ds.records} == {"Eileen Collins", "Grace Hopper", None}


def test_dataset_images_are_distinct_and_rebuilds_identically(demo_data, tmp_path):
    ds = read_dataset(demo_data, show_progress=False)
    arrays = [np.asarray(Image.open(r.path), dtype=np.float64) / 255 for r in ds.records]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert np.sqrt(((arrays[i] - arrays[j]) ** 2).mean()) > 0.1, (ds.records[i].id, ds.records[j].id)
    again = read_dataset(build_demo_dataset(tmp_path, 16), show_progress=False)
    assert [r.sha256 for r in again.records] == [r.sha256 for r in ds.records]


def test_dataset_refuses_tiny_resolution(tmp_path):
    with pytest.raises(DataError, match="resolution must be >= 8"):
        build_demo_dataset(tmp_path, 4)


def test_training_writes_the_diffusers_layout(demo_data, tmp_path):
    from diffusers import DDPMPipeline, UNet2DModel

    out = tmp_path / "run"
    cps = train_demo(demo_data, out, max_steps=4, checkpointing_steps=2, use_ema=True, **TINY)
    assert cps == [out / "checkpoint-2", out / "checkpoint-4"]
    for cp in cps:
        for sub in ("unet", "unet_ema"):
            assert (cp / sub / "config.json").is_file()
            assert (cp / sub / "diffusion_pytorch_model.safetensors").is_file()
        assert (cp / "random_states_0.pkl").is_file()
        assert not (cp / "model.safetensors").exists()  # the hook saved the model, accelerate did not
    unet = UNet2DModel.from_pretrained(cps[0] / "unet")
    ema = UNet2DModel.from_pretrained(cps[0] / "unet_ema")
    assert unet.config.sample_size == 16 and ema.config.block_out_channels == [4, 8]
    assert (out / "model_index.json").is_file()
    pipe = DDPMPipeline.from_pretrained(out)
    final_ema = UNet2DModel.from_pretrained(cps[-1] / "unet_ema")
    for a, b in zip(pipe.unet.parameters(), final_ema.parameters()):
        assert torch.equal(a, b)  # the final pipeline carries the EMA weights, as the script does


def test_training_without_ema_is_deterministic(demo_data, tmp_path):
    from diffusers import UNet2DModel

    runs = [train_demo(demo_data, tmp_path / name, max_steps=2, checkpointing_steps=2, use_ema=False, **TINY)
            for name in ("a", "b")]
    assert not (runs[0][0] / "unet_ema").exists()
    a, b = (UNet2DModel.from_pretrained(r[0] / "unet") for r in runs)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_checkpoint_cadence_does_not_change_the_run(demo_data, tmp_path):
    from diffusers import UNet2DModel

    every2 = train_demo(demo_data, tmp_path / "a", max_steps=4, checkpointing_steps=2, use_ema=True, **TINY)
    every4 = train_demo(demo_data, tmp_path / "b", max_steps=4, checkpointing_steps=4, use_ema=True, **TINY)
    a, b = (UNet2DModel.from_pretrained(cps[-1] / "unet") for cps in (every2, every4))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_training_refuses_a_folder_with_checkpoints(demo_data, tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_demo(demo_data, tmp_path, max_steps=2, checkpointing_steps=2, use_ema=False, **TINY)


def test_recipe_matches_train_demo_arguments():
    import inspect

    params = inspect.signature(train_demo).parameters
    assert set(RECIPE["train"]) <= set(params)
    assert RECIPE["train"]["max_steps"] // RECIPE["train"]["checkpointing_steps"] >= 5


def test_loading_ema_weights_does_not_warn_about_emas_own_config_keys(demo_data, tmp_path):
    import logging

    from memtrack.sampling.unconditional import load_unet

    class Records(logging.Handler):  # diffusers' own handler may hold another test's captured stderr
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    cps = train_demo(demo_data, tmp_path / "run", max_steps=2, checkpointing_steps=2, use_ema=True, **TINY)
    ema = cps[0] / "unet_ema"
    assert "optimization_step" in json.loads((ema / "config.json").read_text())  # EMAModel wrote its settings
    log = logging.getLogger("diffusers.configuration_utils")
    seen, level = Records(), log.level
    log.addHandler(seen)
    log.setLevel(logging.WARNING)
    try:
        load_unet(ema)
        assert not [m for m in seen.messages if "were passed to UNet2DModel" in m]
        config = json.loads((ema / "config.json").read_text())
        config["not_a_unet_option"] = 1  # anything else unexpected still warns
        (ema / "config.json").write_text(json.dumps(config))
        load_unet(ema)
        assert [m for m in seen.messages if "not_a_unet_option" in m]
    finally:
        log.removeHandler(seen)
        log.setLevel(level)
