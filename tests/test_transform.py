"""References that see what training saw: the pixel space reproduces diffusers' training transform.

Byte-exact against torchvision pipelines built the way each script builds its own; mirrored and random-crop
views per training image; alpha dropped as ``convert("RGB")`` does; the transform recorded in the
fingerprint; the run's transform read from its command or hparams.yml and checked against the index.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps
from torchvision import transforms as T

from conftest import real_image
from memtrack.cli.main import main
from memtrack.config import Config, EmbedderSpec, load_config
from memtrack.data.dataset import open_image, read_dataset
from memtrack.embedders.registry import get_embedder
from memtrack.embedders.pixel import crop_offsets
from memtrack.errors import ConfigError, FingerprintMismatch
from memtrack.index.reference import ReferenceIndex
from memtrack.integrations.transform import (SCRIPTS, TransformMismatch, from_command, read_run_transform,
                                             verify_run_transform)

NAMES = ["coffee", "chelsea", "rocket", "astronaut", "grace_hopper"]
#: (width, height) of the training files: landscape, portrait and square, at 16-32 px after the resize
SIZES = [(45, 30), (30, 41), (40, 40), (52, 33), (33, 47)]


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    return real_image(name).resize(size, Image.Resampling.BICUBIC)


def training_set(folder, names=NAMES, sizes=SIZES):
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in zip(names, sizes):
        photo(name, size).save(folder / f"{name}.png")
    return folder


def build(tmp_path, data, **pixel) -> ReferenceIndex:
    cfg = Config()
    cfg.index.embedders = [EmbedderSpec("pixel", pixel)]
    return ReferenceIndex.build(read_dataset(data), [get_embedder({"name": "pixel", **pixel})], tmp_path / "ref", cfg)


def as_uint8(vectors) -> np.ndarray:
    return np.rint(np.asarray(vectors) * 255).astype(np.int64)


def script_pipeline(resolution: int, interpolation: str, center_crop: bool, flip: bool) -> T.Compose:
    """The spatial part of the scripts' ``train_transforms``, as train_unconditional.py / train_text_to_image.py
    build it (flip with p=1: the mirrored draw)."""
    mode = getattr(T.InterpolationMode, interpolation.upper())
    return T.Compose([T.Resize(resolution, interpolation=mode),
                      T.CenterCrop(resolution) if center_crop else T.RandomCrop(resolution),
                      T.RandomHorizontalFlip(p=1.0) if flip else T.Lambda(lambda x: x)])


def chw(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64).transpose(2, 0, 1).reshape(-1)


def tensor_to_uint8(t) -> np.ndarray:
    """The scripts' ToTensor + Normalize([0.5], [0.5]) output back on the 0..255 scale."""
    return np.rint((t.numpy() * 0.5 + 0.5) * 255).astype(np.int64).reshape(-1)


# --------------------------------------------------------------------------------------- byte-exact


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_centre_views_are_byte_identical_to_each_scripts_pipeline(script):
    """Every script's default interpolation, --center_crop, and --random_flip where the script has it."""
    d = SCRIPTS[script]
    emb = get_embedder({"name": "pixel", "resolution": 16, "interpolation": d.interpolation, "crop": "center",
                        "flip": d.flip_flag})
    for name, size in zip(NAMES, SIZES):
        image = photo(name, size)
        ref = emb.embed_reference([image])
        straight = script_pipeline(16, d.interpolation, True, False)(image.convert("RGB"))
        assert np.abs(as_uint8(ref.vectors[0]) - chw(straight)).max() == 0
        full = T.Compose([script_pipeline(16, d.interpolation, True, False), T.ToTensor(), T.Normalize([0.5], [0.5])])
        assert np.abs(as_uint8(ref.vectors[0]) - tensor_to_uint8(full(image.convert("RGB")))).max() == 0
        if d.flip_flag:
            mirrored = script_pipeline(16, d.interpolation, True, True)(image.convert("RGB"))
            assert len(ref.vectors) == 2 and np.abs(as_uint8(ref.vectors[1]) - chw(mirrored)).max() == 0
        else:
            assert len(ref.vectors) == 1


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos", "nearest", "nearest_exact", "box",
                                           "hamming"])
def test_every_interpolation_mode_matches_torchvision(interpolation):
    emb = get_embedder({"name": "pixel", "resolution": 24, "interpolation": interpolation})
    image = photo("chelsea", (61, 40))
    want = chw(script_pipeline(24, interpolation, True, False)(image))
    assert np.abs(as_uint8(emb.embed([image])[0]) - want).max() == 0


def test_every_random_crop_the_script_draws_is_an_indexed_view():
    """RandomCrop draws offsets 0..long-R: with resolution == train_resolution each draw is a stored view."""
    import torch

    emb = get_embedder({"name": "pixel", "resolution": 16, "crop": "random", "flip": True})
    for name, size in zip(NAMES, SIZES):
        image = photo(name, size)
        views = as_uint8(emb.embed_reference([image]).vectors)
        resized = T.Resize(16, interpolation=T.InterpolationMode.BILINEAR)(image)
        assert len(views) == 2 * (max(resized.size) - 16 + 1)
        pipe = script_pipeline(16, "bilinear", False, False)
        mirror = T.RandomHorizontalFlip(p=1.0)
        for seed in range(12):
            torch.manual_seed(seed)
            drawn = pipe(image)
            for sample in (chw(drawn), chw(mirror(drawn))):
                assert np.abs(views - sample).max(axis=1).min() == 0


def test_bicubic_default_is_gone_and_bilinear_differs_from_it():
    """The old default resized bicubic; the scripts' fixed filter is bilinear, and the two views differ."""
    image = photo("coffee", (45, 30))
    new = get_embedder({"name": "pixel", "resolution": 16}).embed([image])
    old = get_embedder({"name": "pixel", "resolution": 16, "interpolation": "bicubic"}).embed([image])
    assert get_embedder("pixel").options.interpolation == "bilinear"
    assert np.abs(new - old).max() > 0.01


# ------------------------------------------------------------------------------------------- alpha


def _rgba(tmp_path) -> tuple:
    """A PNG whose transparent half stores the photo's colours (as many exporters leave them)."""
    rgb = photo("astronaut", (32, 32))
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, 16:] = 0
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(alpha))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    return path, rgba


def test_rgba_training_image_is_indexed_as_convert_rgb_sees_it(tmp_path):
    path, _ = _rgba(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    path.rename(data / "rgba.png")
    photo("coffee", (32, 32)).save(data / "coffee.png")
    ref = build(tmp_path, data, resolution=16)
    row = [r.id for r in ref.records].index("rgba.png")
    stored = np.asarray(ref.spaces["pixel"].vectors[ref.spaces["pixel"].rows == row][0], np.int64)
    trained = chw(script_pipeline(16, "bilinear", True, False)(Image.open(data / "rgba.png").convert("RGB")))
    composited = chw(script_pipeline(16, "bilinear", True, False)(open_image(data / "rgba.png", alpha="white")))
    assert np.abs(stored - trained).max() == 0
    assert np.sqrt(np.mean(((stored - composited) / 255.0) ** 2)) > 0.1  # the white view is another image


@pytest.mark.parametrize("kind", ["palette", "16-bit", "la"])
def test_other_modes_follow_convert_rgb(tmp_path, kind):
    base = np.asarray(photo("camera" if kind != "palette" else "coffee", (30, 20)))
    if kind == "palette":
        im = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 0
    elif kind == "16-bit":
        im = Image.fromarray((base[..., 0].astype(np.uint16) * 40))  # 0..10200: convert("RGB") clips at 255
    else:
        im = Image.fromarray(np.stack([base[..., 0], (base[..., 1] > 100).astype(np.uint8) * 255], -1), "LA")
    path = tmp_path / "x.png"
    im.save(path, transparency=0) if kind == "palette" else im.save(path)
    emb = get_embedder({"name": "pixel", "resolution": 16})
    got = as_uint8(emb.embed_reference([open_image(path, alpha=emb.alpha)]).vectors[0])
    assert np.abs(got - chw(script_pipeline(16, "bilinear", True, False)(Image.open(path).convert("RGB")))).max() == 0
    direct = as_uint8(emb.embed([Image.open(path)])[0])  # a non-RGB image handed to the embedder: the same
    assert np.abs(direct - got).max() == 0


def test_white_alpha_option_composites_and_is_in_the_fingerprint(tmp_path):
    path, rgba = _rgba(tmp_path)
    white = get_embedder({"name": "pixel", "resolution": 16, "alpha": "white"})
    drop = get_embedder({"name": "pixel", "resolution": 16})
    assert np.abs(white.embed([rgba]) - drop.embed([rgba])).max() > 0.3
    assert white.fingerprint["alpha"] == "white" and drop.fingerprint["alpha"] == "drop"


# ------------------------------------------------------------------------------------- flip, crops


def test_flipped_copy_finds_its_source_at_distance_zero_only_with_flip(tmp_path):
    data = training_set(tmp_path / "data")
    flip = build(tmp_path / "a", data, resolution=16, flip=True)
    plain = build(tmp_path / "b", data, resolution=16)
    emb = get_embedder({"name": "pixel", "resolution": 16, "flip": True})
    assert flip.spaces["pixel"].info["views"] == 2 and plain.spaces["pixel"].info["views"] == 1
    for row, rec in enumerate(flip.records):
        trained_view = emb.canonical(open_image(rec.path, alpha="drop"))
        copy = ImageOps.mirror(trained_view)  # what a model trained with --random_flip can reproduce
        q = emb.embed([copy])
        _, ids = flip.search("pixel", q, k=4)
        assert flip.record_rows("pixel", ids)[0, 0] == row
        assert np.abs(flip.candidates("pixel", ids)[0, 0] - q[0]).max() == 0
        _, ids = plain.search("pixel", q, k=1)
        d = np.sqrt(np.mean((plain.candidates("pixel", ids)[0, 0] - q[0]) ** 2))
        assert d > 0.02  # without mirrored views the nearest training vector is another picture


def test_random_crop_copy_at_an_offset_finds_its_source(tmp_path):
    data = training_set(tmp_path / "data")
    ref = build(tmp_path, data, resolution=16, crop="random")
    emb = get_embedder({"name": "pixel", "resolution": 16, "crop": "random"})
    rows = ref.spaces["pixel"].rows
    for row, rec in enumerate(ref.records):
        big = emb.resized(open_image(rec.path, alpha="drop"))
        w, h = big.size
        assert np.sum(rows == row) == max(w, h) - 16 + 1
        for offset in {min(1, max(w, h) - 16), (max(w, h) - 16) // 2, max(w, h) - 16}:
            top, left = (0, offset) if w >= h else (offset, 0)
            copy = big.crop((left, top, left + 16, top + 16))  # a 16 x 16 sample that reproduces this crop
            q = emb.embed([copy])
            _, ids = ref.search("pixel", q, k=3)
            assert ref.record_rows("pixel", ids)[0, 0] == row
            assert np.abs(ref.candidates("pixel", ids)[0, 0] - q[0]).max() == 0


def test_crops_between_stored_offsets_are_found_and_aligned_exactly(tmp_path):
    """A pixel space smaller than the training resolution stores offsets one space pixel apart: an off-grid
    crop is proposed from the nearest stored view; best_aligned recovers its offset at distance 0."""
    data = training_set(tmp_path / "data")
    ref = build(tmp_path, data, resolution=8, train_resolution=16, crop="random", flip=True)
    emb = get_embedder({"name": "pixel", "resolution": 8, "train_resolution": 16, "crop": "random", "flip": True})
    assert emb.crop_stride == 2 and ref.spaces["pixel"].fingerprint["transform"]["crop_stride"] == 2
    rec = ref.records[0]  # coffee: 45 x 30 -> 24 x 16, offsets 0..8
    image = open_image(rec.path, alpha="drop")
    big = emb.resized(image)
    copy = ImageOps.mirror(big.crop((3, 0, 19, 16)))  # offset 3, mirrored: between the stored 2 and 4
    q = emb.embed([copy])
    _, ids = ref.search("pixel", q, k=3)
    assert ref.record_rows("pixel", ids)[0, 0] == 0
    nearest = np.sqrt(np.mean((ref.candidates("pixel", ids)[0, 0] - q[0]) ** 2))
    assert 0 < nearest < 0.1
    best = emb.best_aligned(image, q[0])
    assert (best.distance, best.offset, best.mirrored) == (0.0, 3, True) and np.abs(best.vector - q[0]).max() == 0
    near = emb.best_aligned(image, q[0], near=4)
    assert (near.distance, near.offset, near.mirrored) == (0.0, 3, True)


def test_crop_offsets():
    assert crop_offsets(16, 16, 1) == [0]
    assert crop_offsets(24, 16, 1) == list(range(9))
    assert crop_offsets(24, 16, 3) == [0, 3, 6, 8]


# ------------------------------------------------------------------------------------- fingerprint


def test_an_index_built_for_another_transform_is_refused_naming_the_difference(tmp_path):
    data = training_set(tmp_path / "data")
    ref = build(tmp_path, data, resolution=16, flip=True, interpolation="lanczos")
    ref.check_embedder(get_embedder({"name": "pixel", "resolution": 16, "flip": True, "interpolation": "lanczos"}))
    with pytest.raises(FingerprintMismatch) as exc:
        ref.check_embedder(get_embedder({"name": "pixel", "resolution": 16}))
    msg = exc.value.message
    assert "transform.flip: index has True, this scan has False" in msg
    assert "transform.interpolation: index has 'lanczos', this scan has 'bilinear'" in msg
    assert ref.spaces["pixel"].fingerprint["transform"] == {"resolution": 16, "interpolation": "lanczos",
                                                            "crop": "center", "flip": True}


def test_old_resample_option_still_loads_as_interpolation():
    emb = get_embedder({"name": "pixel", "resolution": 16, "resample": "bicubic"})
    assert emb.options.interpolation == "bicubic" and emb.fingerprint["transform"]["interpolation"] == "bicubic"
    with pytest.raises(ConfigError, match="disagree"):
        get_embedder({"name": "pixel", "resample": "bicubic", "interpolation": "lanczos"})


def test_pixel_space_cannot_exceed_the_training_resolution():
    with pytest.raises(ConfigError, match="train_resolution"):
        get_embedder({"name": "pixel", "resolution": 32, "train_resolution": 16})


# ----------------------------------------------------------------------------------- index build CLI


def test_index_build_flags_give_the_pixel_space_the_transform(tmp_path, capsys):
    data = training_set(tmp_path / "data")
    out = tmp_path / "ref"
    assert main(["index", "build", str(data), "--out", str(out), "--resolution", "16", "--random-flip",
                 "--center-crop", "--interpolation", "lanczos"]) == 0
    assert "RandomHorizontalFlip" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    opts, sp = manifest["spaces"]["pixel"]["options"], manifest["spaces"]["pixel"]
    assert (opts["flip"], opts["crop"], opts["interpolation"]) == (True, "center", "lanczos")
    assert sp["views"] == 2 and sp["n_vectors"] == 2 * len(NAMES)
    assert manifest["config"]["data"]["transform"]["flip"] is True
    # --train-resolution alone: the space is as large as the training view, up to the default 32
    assert main(["index", "build", str(data), "--out", str(tmp_path / "r2"), "--train-resolution", "16",
                 "--random-crop"]) == 0
    opts = json.loads((tmp_path / "r2" / "manifest.json").read_text())["spaces"]["pixel"]["options"]
    assert (opts["resolution"], opts["train_resolution"], opts["crop"]) == (16, 16, "random")


def test_index_build_refuses_conflicting_flags(tmp_path, capsys):
    data = training_set(tmp_path / "data", NAMES[:2], SIZES[:2])
    with pytest.raises(SystemExit) as exc:
        main(["index", "build", str(data), "--out", str(tmp_path / "r"), "--center-crop", "--random-crop"])
    assert exc.value.code == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text("index:\n  embedders:\n    - name: pixel\n      flip: false\n")
    assert main(["index", "build", str(data), "--out", str(tmp_path / "r"), "--config", str(cfg),
                 "--random-flip"]) == 2
    assert "contradicts data.transform.flip" in capsys.readouterr().err


# --------------------------------------------------------------------------------- the run's transform


def test_transform_read_from_a_command_line():
    cmd = ["accelerate", "launch", "--num_processes", "2", "examples/train_unconditional.py", "--resolution", "64",
           "--center_crop", "--random_flip", "--output_dir", "runs/x"]
    got = from_command(cmd)
    assert {k: s.value for k, s in got.items()} == {"resolution": 64, "crop": "center", "flip": True,
                                                   "interpolation": "bilinear"}
    assert got["flip"].source == "command: --random_flip"
    # defaults of the script for flags left out: random crops, no flip, lanczos (text-to-image)
    t2i = from_command(["python", "train_text_to_image.py", "--output_dir", "o"])
    assert {k: s.value for k, s in t2i.items()} == {"resolution": 512, "crop": "random", "flip": False,
                                                   "interpolation": "lanczos"}
    assert "default" in t2i["crop"].source
    lora = from_command(["python", "train_dreambooth_lora.py", "--resolution=256", "--image_interpolation_mode",
                         "bicubic"])
    assert lora["resolution"].value == 256 and lora["interpolation"].value == "bicubic"
    assert lora["flip"].value is False and "never flips" in lora["flip"].source
    # an unknown script: only the flags it is given
    assert set(from_command(["python", "my_train.py", "--random_flip"])) == {"flip"}


def _hparams(run, values, project="text2image-fine-tune"):
    """hparams.yml as accelerate's tensorboard tracker writes it from a script's init_trackers(config=...)."""
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker(project, run / "logs")
    tracker.start()
    tracker.store_init_configuration(values)
    tracker.finish()
    return next((run / "logs" / project).glob("*/hparams.yml"))


def test_transform_read_from_hparams_yml(tmp_path):
    run = tmp_path / "run"
    path = _hparams(run, {"resolution": 32, "center_crop": False, "random_flip": True,
                          "image_interpolation_mode": "lanczos", "output_dir": str(run), "logging_dir": "logs"})
    got = read_run_transform(Config(), run_dir=run)
    assert got.values() == {"resolution": 32, "crop": "random", "flip": True, "interpolation": "lanczos"}
    assert str(path) in got.fields["flip"].source
    # DreamBooth records no random_flip / image_interpolation_mode argument: it never flips, resizes bilinear
    db = tmp_path / "db"
    _hparams(db, {"resolution": 64, "center_crop": True, "instance_prompt": "a sks dog"}, project="dreambooth")
    assert read_run_transform(Config(), run_dir=db).values() == {"resolution": 64, "crop": "center", "flip": False,
                                                                 "interpolation": "bilinear"}
    # the config wins over what the run recorded
    cfg = load_config(None, {"data.transform.flip": False})
    got = read_run_transform(cfg, run_dir=run)
    assert got.fields["flip"].value is False and got.fields["flip"].source == "config: data.transform.flip"


def test_hparams_with_python_tags_are_read(tmp_path):
    path = tmp_path / "run" / "logs" / "p" / "1700000000.0" / "hparams.yml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.dump({"resolution": 16, "center_crop": True, "random_flip": False,
                               "cache_dir": __import__("pathlib").PurePosixPath("/x")}))
    assert "python/object" in path.read_text()
    assert read_run_transform(Config(), run_dir=tmp_path / "run").values()["resolution"] == 16


def _index_for(tmp_path, **pixel):
    data = training_set(tmp_path / "data", NAMES[:3], SIZES[:3])
    return build(tmp_path, data, **pixel)


def test_run_and_index_mismatch_is_refused_with_both_and_the_rebuild_command(tmp_path):
    ref = _index_for(tmp_path, resolution=16)
    run = tmp_path / "run"
    _hparams(run, {"resolution": 16, "center_crop": True, "random_flip": True, "image_interpolation_mode": "bilinear"})
    with pytest.raises(TransformMismatch) as exc:
        verify_run_transform(ref, Config(), run)
    msg, hint = exc.value.message, exc.value.hint
    assert "flip: the run has True (hparams:" in msg and "the index False" in msg
    assert "memtrack index build" in hint and "--random-flip" in hint and "--center-crop" in hint
    assert "--interpolation bilinear" in hint and "--train-resolution 16" in hint
    # the same run against an index built with flip passes, and the record names every source
    ok = _index_for(tmp_path / "b", resolution=16, flip=True)
    record = verify_run_transform(ok, Config(), run)
    assert record["run"]["flip"]["value"] is True and record["unknown"] == []
    assert record["index"]["pixel"]["flip"] is True and "flip" in record["checked"]


def test_scan_cli_refuses_a_mismatching_run_with_exit_2(tmp_path, capsys):
    from conftest import write_checkpoint

    ref = _index_for(tmp_path, resolution=16)
    run = tmp_path / "run"
    write_checkpoint(run, 2, seed=0)
    _hparams(run, {"resolution": 16, "center_crop": False, "random_flip": False,
                   "image_interpolation_mode": "bilinear"})
    assert main(["scan", str(run), "--index", str(ref.path), "--num-samples", "2", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "crop: the run has 'random'" in err and "--random-crop" in err
    assert not (run / "memtrack").exists()  # refused before anything was stored


def test_launch_refuses_before_training_starts(tmp_path, capsys):
    ref = _index_for(tmp_path, resolution=16)
    run = tmp_path / "run"
    marker = tmp_path / "started"
    cmd = ["python", "-c", f"open({str(marker)!r}, 'w')", "train_unconditional.py", "--output_dir", str(run),
           "--resolution", "16", "--center_crop", "--random_flip"]
    assert main(["launch", "--index", str(ref.path), "--", *cmd]) == 2
    assert "flip: the run has True (command: --random_flip)" in capsys.readouterr().err
    assert not marker.exists()


def test_run_transform_is_recorded_in_summary_json(tmp_path):
    from memtrack.analysis.summary import build_summary
    from memtrack.store.run_store import RunStore

    ref = _index_for(tmp_path, resolution=16, flip=True, crop="random")
    run = tmp_path / "run"
    _hparams(run, {"resolution": 16, "center_crop": False, "random_flip": True})
    store = RunStore.open(run)
    try:
        verify_run_transform(ref, Config(), run, store=store)
        summary = build_summary(store, run, ref)
    finally:
        store.close()
    block = summary["index"]["training_transform"]
    assert block["run"]["crop"] == {"value": "random", "source": block["run"]["crop"]["source"]}
    assert "hparams" in block["run"]["crop"]["source"] and block["unknown"] == []
    assert block["run"]["interpolation"]["value"] == "bilinear"  # no image_interpolation_mode argument recorded
    assert "no image_interpolation_mode argument" in block["run"]["interpolation"]["source"]
    assert summary["index"]["spaces"]["pixel"]["transform"]["crop"] == "random"
    assert summary["index"]["spaces"]["pixel"]["views"] == max(np.bincount(ref.spaces["pixel"].rows))
    json.dumps(summary)
    from memtrack.report.html import render_html

    page = render_html(summary, [])
    assert "training transform" in page and "crop random (hparams:" in page


# ------------------------------------------------------------------------------------- end to end


def test_detectors_flag_a_flipped_copy_only_when_the_index_has_mirrored_views(tmp_path):
    """nn_ratio and tiled_l2 on an exact mirrored copy of a training view. Without mirrored views neither
    flags it. With them the copy's nearest vector is its source's mirrored view at distance 0, so both flag
    it (at 32 px: tiled_l2 needs tiles of >= 8 px). NOTE: after the candidates helper's per-row reduction, nn_ratio's d2 is the next *training image*
    (not the same image's unmirrored view); the verdict is the same (d1 = 0), this test keeps checking it."""
    from memtrack.scan.tracker import Tracker

    data = training_set(tmp_path / "data")
    emb = get_embedder({"name": "pixel", "resolution": 32, "flip": True})
    paths = sorted(data.glob("*.png"))  # record order
    copies = [ImageOps.mirror(emb.canonical(open_image(p, alpha="drop"))) for p in paths]
    cfg = Config()
    cfg.detectors.calibrate = False
    verdicts = {}
    for flip in (False, True):
        ref = build(tmp_path / str(flip), data, resolution=32, flip=flip)
        outs = Tracker(ref, [get_embedder({"name": "pixel", "resolution": 32, "flip": flip})], cfg).assess(copies)
        verdicts[flip] = {o.name: o for o in outs}
    for name in ("nn_ratio", "tiled_l2"):
        assert not verdicts[False][name].flagged.any(), name
        assert verdicts[True][name].flagged.all(), name
        assert (verdicts[True][name].match == np.arange(len(NAMES))).all(), name


def test_an_index_from_before_the_transform_was_recorded_is_refused(tmp_path):
    """Indexes built when the pixel space resized bicubic with no transform record: rebuild, not a silent scan."""
    from memtrack.scan.tracker import embedders_for

    ref = _index_for(tmp_path, resolution=16)
    mpath = ref.path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    sp = manifest["spaces"]["pixel"]
    sp["options"] = {"batch_size": 64, "resolution": 16, "crop": "center", "resample": "bicubic"}
    sp["fingerprint"] = {"name": "pixel", "metric": "l2", "dim": 768, "resolution": 16, "crop": "center",
                         "resample": "bicubic", "scale": "[0,1] from uint8", "layout": "CHW"}
    mpath.write_text(json.dumps(manifest))
    old = ReferenceIndex.open(ref.path)
    emb = embedders_for(old, Config())[0]
    assert emb.options.interpolation == "bicubic"
    with pytest.raises(FingerprintMismatch, match="transform: index has None"):
        old.check_embedder(emb)
