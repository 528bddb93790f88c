"""The reference index: build, open, search, exact candidates, baseline, fingerprints, atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_training_set
from memtrack.data.dataset import read_dataset
from memtrack.embedders.registry import get_embedder
from memtrack.errors import DataError, FingerprintMismatch, IndexError_
from memtrack.index.reference import ReferenceIndex


def test_open_reads_back_everything(pixel_index, train_dir):
    ref = ReferenceIndex.open(pixel_index)
    assert ref.n_train == 6
    assert sorted(r.id for r in ref.records) == sorted(p.name for p in train_dir.glob("*.png"))
    sp = ref.spaces["pixel"]
    assert sp.metric == "l2" and sp.dim == 3 * 16 * 16
    assert sp.vectors.dtype == np.uint8 and sp.vectors.shape == (6, 768)
    assert ref.manifest["spaces"]["pixel"]["options"]["resolution"] == 16
    assert all(r.caption.startswith("a photo of") for r in ref.records)


def test_search_finds_exact_copies_at_distance_zero(pixel_index, train_dir):
    from memtrack.data.dataset import open_image
    from memtrack.detectors.core import exact_rms_distances

    ref = ReferenceIndex.open(pixel_index)
    emb = get_embedder({"name": "pixel", "resolution": 16})
    paths = sorted(train_dir.glob("*.png"))
    q = emb.embed([open_image(p) for p in paths])
    _, ids = ref.search("pixel", q, k=3)
    rows = ref.record_rows("pixel", ids)
    assert [ref.records[r].id for r in rows[:, 0]] == [p.name for p in paths]
    d = exact_rms_distances(q, ref.candidates("pixel", ids))
    assert np.all(d[:, 0] == 0.0)
    assert np.all(d[:, 1] > 0.05)


def test_baseline_is_nearest_other_image(pixel_index):
    ref = ReferenceIndex.open(pixel_index)
    base = ref.baseline_values("pixel")
    assert base.shape == (6,)
    assert np.all(base > 0)  # six different photographs: nobody's nearest *other* image is itself
    stats = ref.manifest["baseline"]["pixel"]
    assert stats["n"] == 6 and stats["p50"] == pytest.approx(np.percentile(base, 50))


def test_duplicate_training_images_have_zero_baseline(tmp_path):
    data = write_training_set(tmp_path / "d", names=["astronaut", "coffee", "chelsea"], metadata=False)
    (data / "astronaut_copy.png").write_bytes((data / "astronaut.png").read_bytes())
    ref = ReferenceIndex.build(read_dataset(data), [get_embedder({"name": "pixel", "resolution": 16})],
                               tmp_path / "ref")
    base = dict(zip([r.id for r in ref.records], ref.baseline_values("pixel")))
    assert base["astronaut.png"] == 0.0 and base["astronaut_copy.png"] == 0.0
    assert base["coffee.png"] > 0


def test_fingerprint_mismatch_names_the_difference(pixel_index):
    ref = ReferenceIndex.open(pixel_index)
    with pytest.raises(FingerprintMismatch) as exc:
        ref.check_embedder(get_embedder({"name": "pixel", "resolution": 32}))
    assert "resolution" in str(exc.value) and "16" in str(exc.value) and "32" in str(exc.value)
    ref.check_embedder(get_embedder({"name": "pixel", "resolution": 16}))  # the same one passes


def test_existing_index_is_not_overwritten_without_flag(pixel_index, train_dir):
    before = (pixel_index / "manifest.json").read_bytes()
    with pytest.raises(IndexError_, match="already exists"):
        ReferenceIndex.build(read_dataset(train_dir), [get_embedder({"name": "pixel", "resolution": 16})],
                             pixel_index)
    assert (pixel_index / "manifest.json").read_bytes() == before


def test_overwrite_replaces_atomically(tmp_path, train_dir):
    out = tmp_path / "ref"
    emb = [get_embedder({"name": "pixel", "resolution": 16})]
    ReferenceIndex.build(read_dataset(train_dir), emb, out)
    ReferenceIndex.build(read_dataset(train_dir), [get_embedder({"name": "pixel", "resolution": 8})], out,
                         overwrite=True)
    assert ReferenceIndex.open(out).spaces["pixel"].dim == 3 * 8 * 8
    assert [p.name for p in tmp_path.iterdir()] == ["ref"]  # no temp or old folders left behind


def test_failed_build_leaves_nothing(tmp_path, train_dir, monkeypatch):
    import memtrack.index.space as space_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(space_mod, "_baseline", boom)
    with pytest.raises(RuntimeError):
        ReferenceIndex.build(read_dataset(train_dir), [get_embedder({"name": "pixel", "resolution": 16})],
                             tmp_path / "ref")
    assert list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_index_is_a_clear_error(tmp_path, pixel_index):
    with pytest.raises(IndexError_, match="no memtrack index"):
        ReferenceIndex.open(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(IndexError_, match="cannot read"):
        ReferenceIndex.open(bad)


def test_too_few_images_refused(tmp_path):
    data = write_training_set(tmp_path / "d", names=["coffee"], metadata=False)
    with pytest.raises(DataError, match="at least 2"):
        ReferenceIndex.build(read_dataset(data), [get_embedder("pixel")], tmp_path / "ref")


def test_skipped_files_listed_in_manifest(tmp_path):
    data = write_training_set(tmp_path / "d", names=["coffee", "rocket", "camera"], metadata=False)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ref = ReferenceIndex.build(read_dataset(data), [get_embedder({"name": "pixel", "resolution": 16})],
                               tmp_path / "ref")
    assert ref.n_train == 3
    skipped = json.loads((tmp_path / "ref" / "manifest.json").read_text())["skipped"]
    assert [s["path"] for s in skipped] == ["broken.png"] and "decode" in skipped[0]["reason"]
