"""The clip embedder on tiny open_clip models written to a temp folder: no downloads, seconds on a CPU.

The weights go through the same open_clip calls a user's downloaded weights take: ``pretrained=<file>``
(with the architecture registered from ``model_config``) and ``model: local-dir:<folder>``.
"""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest
from PIL import Image

from memtrack.embedders.registry import get_embedder, list_embedders
from memtrack.embedders.clip import ClipEmbedder, ClipOptions
from memtrack.errors import ConfigError, DependencyError

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import write_tiny_clip  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"), name="tiny-clip-32")


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip64"), name="tiny-clip-64", image_size=64, seed=1)


def file_spec(t, **extra):
    return {"name": "clip", "model": t.name, "model_config": str(t.config), "pretrained": str(t.weights), **extra}


def images(n, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def emb(tiny):
    return get_embedder(file_spec(tiny, batch_size=4))


def test_registered_and_built_through_the_registry(emb):
    assert "clip" in list_embedders()
    assert isinstance(emb, ClipEmbedder) and emb.metric == "cosine"
    assert emb.options.batch_size == 4


def test_dim_and_fingerprint_do_not_build_the_model(tiny):
    e = get_embedder(file_spec(tiny))
    assert e.dim == 16 and e.fingerprint["dim"] == 16
    assert e._model is None


def test_output_is_float32_unit_rows(emb):
    v = emb.embed(images(10))  # three batches of 4, 4, 2
    assert v.shape == (10, 16) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_deterministic_and_independent_of_batching(emb, tiny):
    ims = images(6)
    first, second = emb.embed(ims), emb.embed(ims)
    np.testing.assert_array_equal(first, second)
    one_batch = get_embedder(file_spec(tiny, batch_size=64)).embed(ims)
    np.testing.assert_allclose(first, one_batch, atol=1e-5)


def test_same_image_cosine_one_different_images_differ(emb):
    a, b = images(2, seed=3)
    v = emb.embed([a, b, a.copy()])
    assert v[0] @ v[2] == pytest.approx(1.0, abs=1e-6)
    assert v[0] @ v[1] < 0.999


def test_any_size_and_mode(emb):
    ims = [images(1, (17, 90))[0], images(1)[0].convert("L"), images(1)[0].convert("RGBA")]
    v = emb.embed(ims)
    assert v.shape == (3, 16) and np.isfinite(v).all()


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_batched_normalisation_is_bit_identical_to_open_clip(resize_mode):
    import open_clip
    import torch
    from torch.utils.data import default_collate

    from memtrack.embedders.clip import _Pipeline

    transform = open_clip.image_transform(32, is_train=False, resize_mode=resize_mode)
    pipeline = _Pipeline.split(transform, torch.device("cpu"))
    assert pipeline.mean is not None
    ims = images(3, (50, 41)) + [images(1)[0].convert("L")]
    dataset = pipeline.dataset(ims)
    got = pipeline.finish(default_collate([dataset[i] for i in range(len(ims))]), torch.device("cpu"))
    expected = torch.stack([transform(im.convert("RGB")) for im in ims])
    assert got.dtype == expected.dtype and got.is_contiguous()
    assert torch.equal(got, expected)


def test_unknown_transforms_run_whole_per_image():
    import torch
    from torchvision import transforms as T

    from memtrack.embedders.clip import _Pipeline

    transform = T.Compose([T.Resize(8), T.CenterCrop(8), T.PILToTensor(), T.ConvertImageDtype(torch.float32)])
    pipeline = _Pipeline.split(transform, torch.device("cpu"))
    assert pipeline.mean is None and pipeline.per_image is transform
    assert pipeline.dataset(images(1))[0].shape == (3, 8, 8)


def test_empty_input(tiny):
    e = get_embedder(file_spec(tiny))
    assert e.embed([]).shape == (0, 16)
    assert e._model is None


def test_local_dir_loads_the_same_weights(tiny, emb):
    local = get_embedder({"name": "clip", "model": f"local-dir:{tiny.local_dir}"})
    ims = images(3)
    np.testing.assert_allclose(local.embed(ims), emb.embed(ims), atol=1e-6)
    fp = local.fingerprint
    assert fp["model"] == "local-dir" and str(tiny.local_dir) not in str(fp)
    sha = hashlib.sha256((tiny.local_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert fp["weights"] == f"sha256:{sha}"


def test_fingerprint_contents(tiny, tiny64):
    e = get_embedder(file_spec(tiny))
    fp = e.fingerprint
    assert fp["weights"] == "sha256:" + hashlib.sha256(tiny.weights.read_bytes()).hexdigest()
    assert fp["model"] == tiny.name and fp["model_config"]
    assert fp["image_size"] == [32, 32] and fp["resize_mode"] == "shortest" and fp["interpolation"] == "bicubic"
    assert len(fp["mean"]) == 3 and fp["precision"] == "fp32"
    assert "device" not in fp
    assert get_embedder(file_spec(tiny, device="cuda:3")).fingerprint == fp  # same weights, same space
    assert get_embedder(file_spec(tiny, precision="bf16")).fingerprint["precision"] == "bf16"
    assert get_embedder(file_spec(tiny64)).fingerprint["image_size"] == [64, 64]
    e.embed(images(1))
    assert e.fingerprint == fp  # predicted preprocessing == what open_clip built


def test_fingerprint_follows_the_weights_file(tmp_path):
    t = write_tiny_clip(tmp_path / "a", name="tiny-clip-rw")
    before = get_embedder(file_spec(t)).fingerprint
    other = write_tiny_clip(tmp_path / "b", name="tiny-clip-rw", seed=7)
    stat = os.stat(t.weights)
    t.weights.write_bytes(other.weights.read_bytes())  # replaced in place, same size
    os.utime(t.weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = get_embedder(file_spec(t)).fingerprint
    assert after["weights"] != before["weights"]
    assert {k for k in before if before[k] != after[k]} == {"weights"}


def test_random_weights_are_seeded(tiny):
    spec = {"name": "clip", "model": tiny.name, "model_config": str(tiny.config), "pretrained": None}
    a, b = get_embedder(spec), get_embedder(spec)
    ims = images(2)
    np.testing.assert_array_equal(a.embed(ims), b.embed(ims))
    assert a.fingerprint["weights"] == "random:seed=0"


def test_bf16_autocast_on_cpu_is_close_to_fp32(tiny, emb):
    ims = images(4)
    low = get_embedder(file_spec(tiny, precision="bf16")).embed(ims)
    assert low.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, atol=1e-5)
    assert (np.sum(low * emb.embed(ims), axis=1) > 0.98).all()


def test_dataloader_workers_give_the_same_vectors(tiny, emb):
    ims = images(8)
    workers = get_embedder(file_spec(tiny, batch_size=4, num_workers=2)).embed(ims)
    np.testing.assert_allclose(workers, emb.embed(ims), atol=1e-6)


def test_default_options_need_no_network():
    e = ClipEmbedder(ClipOptions())
    assert e.dim == 512
    assert e.fingerprint["weights"] == "tag:laion2b_s34b_b79k" and e.fingerprint["image_size"] == [224, 224]


# --------------------------------------------------------------------------------------------- errors


def test_missing_weights_file_names_the_path(tiny, tmp_path):
    missing = tmp_path / "nope" / "weights.bin"
    with pytest.raises(ConfigError, match="pretrained") as err:
        get_embedder(file_spec(tiny, pretrained=str(missing)))
    assert str(missing) in str(err.value)


def test_unknown_tag_lists_the_tags():
    with pytest.raises(ConfigError, match="neither a pretrained tag") as err:
        get_embedder({"name": "clip", "model": "ViT-B-32", "pretrained": "laion9000"})
    assert "laion2b_s34b_b79k" in str(err.value)


def test_bad_model_name_suggests():
    with pytest.raises(ConfigError, match="'ViT-B-3'") as err:
        get_embedder({"name": "clip", "model": "ViT-B-3"})
    assert "ViT-B-32" in err.value.hint


def test_openai_tag_needs_quickgelu():
    with pytest.raises(ConfigError, match="QuickGELU") as err:
        get_embedder({"name": "clip", "model": "ViT-B-32", "pretrained": "openai"})
    assert "ViT-B-32-quickgelu" in err.value.hint
    assert get_embedder({"name": "clip", "model": "ViT-B-32-quickgelu", "pretrained": "openai"}).dim == 512


def test_local_dir_errors(tmp_path, tiny):
    with pytest.raises(ConfigError, match="folder not found") as err:
        get_embedder({"name": "clip", "model": f"local-dir:{tmp_path / 'missing'}"})
    assert str(tmp_path / "missing") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        get_embedder({"name": "clip", "model": f"local-dir:{tmp_path / 'empty'}"})
    (tmp_path / "empty" / "open_clip_config.json").write_text((tiny.local_dir / "open_clip_config.json").read_text())
    with pytest.raises(ConfigError, match="no weights file"):
        get_embedder({"name": "clip", "model": f"local-dir:{tmp_path / 'empty'}"})
    with pytest.raises(ConfigError, match="conflicts"):
        get_embedder({"name": "clip", "model": f"local-dir:{tiny.local_dir}", "pretrained": "openai"})


def test_model_config_must_match_model_name(tiny):
    with pytest.raises(ConfigError, match="defines the architecture") as err:
        get_embedder({"name": "clip", "model": "ViT-B-32", "model_config": str(tiny.config), "pretrained": None})
    assert tiny.name in err.value.hint


def test_weights_of_another_architecture(tiny, tmp_path):
    wrong = write_tiny_clip(tmp_path, name="tiny-clip-8", embed_dim=8)
    e = get_embedder(file_spec(tiny, pretrained=str(wrong.weights)))
    with pytest.raises(ConfigError, match="does not load into architecture"):
        e.embed(images(1))


def test_openai_weights_file_needs_quickgelu(tiny, monkeypatch):
    from memtrack.embedders import clip

    sha = hashlib.sha256(tiny.weights.read_bytes()).hexdigest()
    monkeypatch.setattr(clip, "openai_weights", lambda oc: {sha: "ViT-B-32"})  # as if tiny were OpenAI's .pt
    with pytest.raises(ConfigError, match="QuickGELU") as err:
        get_embedder(file_spec(tiny)).embed(images(1))
    assert err.value.hint == "set model: ViT-B-32-quickgelu"


def test_bad_options(tiny):
    with pytest.raises(ConfigError, match="device"):
        get_embedder(file_spec(tiny, device="gpu-please"))
    with pytest.raises(ConfigError, match="batch_size"):
        get_embedder(file_spec(tiny, batch_size=0))
    with pytest.raises(ConfigError, match="precision"):
        get_embedder(file_spec(tiny, precision="fp8"))
    with pytest.raises(ConfigError, match="unknown field"):
        get_embedder(file_spec(tiny, weights="x"))


def test_missing_open_clip_is_a_dependency_error(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(DependencyError, match="open_clip_torch"):
        get_embedder(file_spec(tiny))
