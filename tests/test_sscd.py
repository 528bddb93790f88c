"""Copy thresholds that belong to their descriptor: an `sscd` embedder (Pizzi et al. 2022) with its published
thresholds, and CLIP's calibrated on the training set's own train->train similarities.

Before: `clip_copy` applied SSCD's 0.5 (Somepalli et al.) to CLIP cosine similarity, where unrelated images
routinely score above 0.5, and there was no SSCD space at all. No SSCD weights can be downloaded here (and
they are CC-BY-NC): the tests script tiny TorchScript models, save them to files and load them through the
option a user sets (`weights:`), as with the real `sscd_disc_mixup.torchscript.pt`.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers_core import scene
from memtrack.config import Config, DetectorsConfig, EmbedderSpec
from memtrack.detectors.registry import run_detectors
from memtrack.detectors.core import SpaceEvidence
from memtrack.embedders.registry import get_embedder, list_embedders
from memtrack.errors import ConfigError

torch = pytest.importorskip("torch")


class Probe(torch.nn.Module):
    """Reports what it was fed: per-channel means and the input size (so preprocessing can be checked)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = torch.full((x.shape[0], 1), float(x.shape[2]) / 100.0)
        width = torch.full((x.shape[0], 1), float(x.shape[3]) / 100.0)
        return torch.cat([x.mean(dim=(2, 3)), size, width], dim=1)


class TinyDescriptor(torch.nn.Module):
    """A small conv net with seeded random weights, L2-normalised output, as SSCD's models end."""

    def __init__(self, dim: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)
        self.fc = torch.nn.Linear(16 * 4 * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)
        return torch.nn.functional.normalize(self.fc(h), dim=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sscd")
    torch.jit.script(Probe()).save(str(folder / "probe.torchscript.pt"))
    torch.jit.script(TinyDescriptor()).save(str(folder / "tiny.torchscript.pt"))
    return folder


def test_sscd_is_registered_and_needs_the_users_weights(tmp_path):
    assert "sscd" in list_embedders()
    with pytest.raises(ConfigError, match="needs weights") as err:
        get_embedder("sscd")
    assert "CC-BY-NC" in err.value.hint and "sscd_disc_mixup.torchscript.pt" in err.value.hint
    with pytest.raises(ConfigError, match="not found"):
        get_embedder({"name": "sscd", "weights": str(tmp_path / "missing.pt")})
    bad = tmp_path / "state_dict.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(ConfigError, match="TorchScript"):
        get_embedder({"name": "sscd", "weights": str(bad)}).dim


def test_preprocessing_follows_the_sscd_readme(weights):
    emb = get_embedder({"name": "sscd", "weights": str(weights / "probe.torchscript.pt")})
    white = Image.new("RGB", (400, 200), (255, 255, 255))
    v = emb.embed([white])[0]
    # small edge resized to 288, long edge 288 * 400 / 200 = 576; ImageNet-normalised white; L2-normalised
    expected = np.array([(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))] + [2.88, 5.76])
    np.testing.assert_allclose(v, expected / np.linalg.norm(expected), rtol=1e-5)
    assert np.linalg.norm(v) == pytest.approx(1.0)
    skew = get_embedder({"name": "sscd", "weights": str(weights / "probe.torchscript.pt"), "preprocess": "skew_320"})
    assert skew.embed([white])[0][3:] / skew.embed([white])[0][3] == pytest.approx([1.0, 1.0])  # 320 x 320


def test_a_scripted_model_loads_through_the_option_and_copies_score_one(weights):
    emb = get_embedder({"name": "sscd", "weights": str(weights / "tiny.torchscript.pt"), "batch_size": 2})
    images = [scene(n, 64) for n in ("astronaut", "coffee", "chelsea")] + [scene("astronaut", 96)]
    v = emb.embed(images)
    assert v.shape == (4, 32) == (4, emb.dim) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert float(v[0] @ v[3]) > 0.99                        # the same photo at another size
    assert emb.fingerprint["name"] == "sscd" and emb.fingerprint["weights"].startswith("sha256:")
    other = get_embedder({"name": "sscd", "weights": str(weights / "probe.torchscript.pt")})
    assert other.fingerprint["weights"] != emb.fingerprint["weights"]


def _feature_evidence(space_sims, query_sim, published=None, default=None):
    """A cosine space: unit features whose nearest-other similarities are ``space_sims``; one query."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(3, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    u = np.linalg.svd(feats)[2][-1]                       # a unit vector orthogonal to every training feature
    q = (feats[0] * query_sim + np.sqrt(1 - query_sim ** 2) * u)[None]  # cosine query_sim to image 0, less to others
    extra = {"train_similarity": np.asarray(space_sims, float), "published_copy": published, "copy_default": default}
    return SpaceEvidence("cosine", q, np.arange(3)[None], feats[None], extra=extra, n_rows=len(space_sims))


def test_sscd_copy_uses_its_published_thresholds():
    from memtrack.embedders.sscd import SscdEmbedder

    pub, d = SscdEmbedder.published_copy_thresholds, SscdEmbedder.copy_threshold
    ev = {"sscd": _feature_evidence([0.3] * 20, 0.6, pub, d)}
    out = {o.name: o for o in run_detectors(ev, DetectorsConfig())}["sscd_copy"]
    assert out.threshold == 0.5 and out.threshold_source == "published" and "Somepalli" in out.info["threshold_detail"]
    assert out.flagged[0]                                     # 0.6 > 0.5: a (loose) copy by SSCD's measure
    wen = {o.name: o for o in run_detectors(ev, DetectorsConfig(copy_thresholds={"sscd": 0.7}))}["sscd_copy"]
    assert wen.threshold_source == "published" and "Wen et al." in wen.info["threshold_detail"] and not wen.flagged[0]
    mine = {o.name: o for o in run_detectors(ev, DetectorsConfig(copy_thresholds={"sscd": 0.65}))}["sscd_copy"]
    assert mine.threshold_source == "config"


def test_clip_copy_is_calibrated_on_train_to_train_not_given_sscds_threshold():
    # unrelated images score 0.6-0.8 in this CLIP-like space: SSCD's 0.5 would call every one a copy
    train_sims = np.linspace(0.6, 0.85, 40)
    ev = {"clip": _feature_evidence(train_sims, 0.75)}
    out = {o.name: o for o in run_detectors(ev, DetectorsConfig())}["clip_copy"]
    assert out.threshold_source == "calibrated" and out.threshold == pytest.approx(np.quantile(train_sims, 0.99))
    assert "99th percentile of 40 training images" in out.info["threshold_detail"]
    assert out.score[0] == pytest.approx(0.75) and not out.flagged[0]
    copy = {o.name: o for o in run_detectors({"clip": _feature_evidence(train_sims, 0.999)}, DetectorsConfig())}
    assert copy["clip_copy"].flagged[0]
    # too few training images to calibrate on: not applicable, with the way out
    few = {o.name: o for o in run_detectors({"clip": _feature_evidence([0.7] * 6, 0.75)}, DetectorsConfig())}
    assert not few["clip_copy"].applicable and "detectors.copy_thresholds.clip" in few["clip_copy"].reason
    # a global detectors.copy is the user's choice for every space
    cfg = {o.name: o for o in run_detectors(ev, DetectorsConfig(copy=0.5))}["clip_copy"]
    assert cfg.threshold == 0.5 and cfg.threshold_source == "config" and cfg.flagged[0]


def test_an_sscd_index_scans_end_to_end(weights, tmp_path):
    from memtrack.data.dataset import read_dataset
    from memtrack.index.reference import ReferenceIndex
    from memtrack.scan.tracker import Tracker, thresholds_block

    folder = tmp_path / "data"
    folder.mkdir()
    for n in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        scene(n, 64).save(folder / f"{n}.png")
    c = Config()
    c.index.embedders = [EmbedderSpec("pixel", {"resolution": 32}),
                         EmbedderSpec("sscd", {"weights": str(weights / "tiny.torchscript.pt")})]
    embs = [get_embedder(s) for s in c.index.embedders]
    ref = ReferenceIndex.build(read_dataset(folder), embs, tmp_path / "ref", c)
    assert ref.spaces["sscd"].metric == "cosine" and ref.spaces["sscd"].dim == 32
    outs = Tracker(ref, embs, c).assess([scene("coffee", 64), Image.new("RGB", (64, 64), (200, 10, 10))])
    by = {o.name: o for o in outs}
    assert by["sscd_copy"].flagged[0] and by["sscd_copy"].score[0] == pytest.approx(1.0, abs=1e-5)
    assert ref.records[by["sscd_copy"].match[0]].id == "coffee.png"
    th = thresholds_block(outs, c)["sscd_copy"]
    assert th["value"] == 0.5 and th["source"] == "published" and "Somepalli" in th["detail"]
