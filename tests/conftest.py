"""Shared fixtures: small real training sets and tiny diffusers runs, built in temp folders.

Images come from packages installed for the tests (scikit-image's sample data, matplotlib's
grace_hopper.jpg) at run time; nothing is downloaded and no image is committed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MEMTRACK_NO_PROGRESS", "1")

SCENES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]


def real_image(name: str) -> Image.Image:
    """A real photograph shipped by an installed package, as RGB."""
    if name == "grace_hopper":
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            return Image.open(fh).convert("RGB")
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def write_training_set(folder: Path, size: int = 16, names=SCENES, metadata: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        real_image(name).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "text": f"a photo of {name}"})
    if metadata:
        with open(folder / "metadata.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return folder


def tiny_unet(size: int = 16, seed: int = 0):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def write_checkpoint(run: Path, step: int, seed: int, ema: bool = False, complete: bool = True) -> Path:
    """A checkpoint folder in the layout accelerate + diffusers' save hook produce."""
    ck = run / f"checkpoint-{step}"
    ck.mkdir(parents=True, exist_ok=True)
    tiny_unet(seed=seed).save_pretrained(ck / "unet")
    if ema:
        tiny_unet(seed=seed + 1000).save_pretrained(ck / "unet_ema")
    if complete:
        (ck / "random_states_0.pkl").write_bytes(b"\x80\x04N.")
    return ck


@pytest.fixture(scope="session")
def train_dir(tmp_path_factory) -> Path:
    return write_training_set(tmp_path_factory.mktemp("train") / "data")


@pytest.fixture(scope="session")
def pixel_index(tmp_path_factory, train_dir) -> Path:
    from memtrack.config import Config, EmbedderSpec
    from memtrack.data.dataset import read_dataset
    from memtrack.embedders.registry import get_embedder
    from memtrack.index.reference import ReferenceIndex

    cfg = Config()
    cfg.index.embedders = [EmbedderSpec("pixel", {"resolution": 16})]
    out = tmp_path_factory.mktemp("ref") / "ref"
    ReferenceIndex.build(read_dataset(train_dir), [get_embedder(s) for s in cfg.index.embedders], out, cfg)
    return out


@pytest.fixture()
def tiny_run(tmp_path) -> Path:
    run = tmp_path / "run"
    for i, step in enumerate((10, 20, 30)):
        write_checkpoint(run, step, seed=i)
    return run


def images_close(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


# ------------------------------------------------------------------------------ models that memorize

#: The copycat fixture's schedule: checkpoint step -> copies among 16 samples (see tests/memorizing.py).
COPYCAT_SCHEDULE = {100: 0, 200: 0, 300: 4, 400: 8, 500: 8}


@pytest.fixture()
def copycat_run(tmp_path, train_dir) -> Path:
    """A run whose samples copy ``train_dir`` on :data:`COPYCAT_SCHEDULE`: exact and sigma-0.01 copies
    (alternating) of the six distinct training images, the other samples fresh noise."""
    from memorizing import write_copycat_run

    return write_copycat_run(tmp_path / "copycat", COPYCAT_SCHEDULE, train_dir, kinds=("exact", "noise"), sigma=0.01)


@pytest.fixture()
def copycat_scanned(copycat_run, pixel_index) -> Path:
    """:func:`copycat_run`, scanned (16 samples per checkpoint) into its default store."""
    from memorizing import scan_copycat

    scan_copycat(copycat_run, pixel_index, num_samples=16)
    return copycat_run


@pytest.fixture(scope="session")
def memorized(tmp_path_factory):
    """A really trained memorizing DDPM and its 8-px pixel index (tests/memorizing.py).

    Training (600 steps on one torch thread) measured 15-20 s wall on a shared 2-core machine, 16.5 s as
    this fixture in a full test run; the index well under a second. ``.data``, ``.run``, ``.index``,
    ``.train_s`` (this session's training wall time).
    """
    from memorizing import MEMORIZING_RECIPE, build_index, train_memorizing_run

    out = train_memorizing_run(tmp_path_factory.mktemp("memorized"))
    out.index = build_index(out.data, out.run.parent / "ref", MEMORIZING_RECIPE["resolution"])
    return out


@pytest.fixture()
def copycat_sampling(monkeypatch):
    """Copycat checkpoints sample as copycats in this process, through memtrack's own builder registry."""
    from memorizing import copycat_builder
    from memtrack.sampling.registry import get_pipeline_builder, register_pipeline_builder, scheduler_source

    builtin, scheduler = get_pipeline_builder("unet"), scheduler_source("unet")
    register_pipeline_builder("unet", copycat_builder(builtin), scheduler=scheduler, overwrite=True)
    yield
    register_pipeline_builder("unet", builtin, scheduler=scheduler, overwrite=True)
