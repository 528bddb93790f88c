"""Scale (issue 6): index choice, recall tuning, sharded / resumable / distributed builds, mmap, incremental add."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import real_image
from memtrack.index import choice as ic
from memtrack.config import Config, EmbedderSpec
from memtrack.data.dataset import Dataset, read_dataset
from memtrack.embedders.pixel import PixelEmbedder, PixelOptions
from memtrack.errors import IndexError_
from memtrack.index.reference import ReferenceIndex

RES = 8


def write_crops(folder: Path, n: int = 300, size: int = 16, seed: int = 0) -> Path:
    """``n`` small, distinct real-photo crops (several per photo, so they cluster like a real set)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [np.asarray(real_image(name).resize((128, 128))) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, 128 - size, 2)
        Image.fromarray(p[y:y + size, x:x + size]).save(folder / f"img{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    return write_crops(tmp_path_factory.mktemp("crops") / "data")


def cfg(**index) -> Config:
    c = Config()
    c.index.embedders = [EmbedderSpec("pixel", {"resolution": RES})]
    for key, value in index.items():
        setattr(c.index, key, value)
    return c


class CountingPixel(PixelEmbedder):
    """The pixel embedder, counting its calls; raises on call ``fail_at`` (a simulated crash)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(PixelOptions(resolution=RES))
        self.calls, self.fail_at = 0, fail_at

    def embed(self, images):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("simulated crash")
        return super().embed(images)


def clustered(n: int, d: int, clusters: int, seed: int = 0, noise: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ choice


@pytest.mark.parametrize("n,dim,budget,kind", [
    (500, 512, None, "flat"),
    (100_000, 512, None, "flat"),           # 200 MB of float32: exact search is still cheap
    (21_000, 3072, None, "flat"),           # the 32x32 pixel space
    (30_000, 3072, 64 << 30, "hnsw"),
    (200_000, 512, 64 << 30, "hnsw"),
    (500_000, 512, 64 << 30, "ivf_flat"),
    (2_000_000, 512, 64 << 30, "ivf_pq"),
    (500_000, 512, 200 << 20, "ivf_pq"),    # IVF-Flat would need ~1 GB: the budget forces codes
])
def test_index_choice_by_size_and_budget(n, dim, budget, kind):
    choice = ic.choose_index(n, dim, budget)
    assert choice.kind == kind, choice.reason
    if kind == "ivf_pq":
        assert choice.rerank > 1 and "PQ" in choice.factory and choice.est_bytes <= (budget or 1 << 62)
    if kind.startswith("ivf"):
        assert choice.nlist & (choice.nlist - 1) == 0  # a power of two, ~4 sqrt(n)


def test_over_budget_ivf_goes_on_disk():
    assert ic.choose_index(50_000, 512, 1 << 20, "ivf_flat").on_disk
    assert not ic.choose_index(50_000, 512, 1 << 30, "ivf_flat").on_disk
    with pytest.raises(IndexError_, match="on-disk inverted lists need an IVF"):
        ic.choose_index(100, 512, None, "flat", on_disk=True)


def test_parse_bytes():
    assert ic.parse_bytes("16GB") == 16 * 10 ** 9 and ic.parse_bytes("512MiB") == 512 << 20
    with pytest.raises(IndexError_, match="not a size"):
        ic.parse_bytes("lots")


# ------------------------------------------------------------------------------------------ recall


def _ivf(x: np.ndarray, nlist: int):
    faiss = ic.faiss_module()
    index = faiss.index_factory(x.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    return index


def test_recall_is_measured_and_tuned_to_the_target():
    x = clustered(8000, 32, 40)
    index = _ivf(x, 64)
    fetch = lambda ids: x[np.asarray(ids)]  # noqa: E731
    search = lambda q, k: index.search(q, k)[1]  # noqa: E731
    qids = ic.held_out(len(x), 300)
    ic.set_search_params(index, {"nprobe": 1})
    r1, _ = ic.measure_recall(search, fetch, len(x), "cosine", 10, qids)
    assert r1 < 0.9
    res = ic.tune(index, "ivf_flat", lambda q, k, r: index.search(q, k)[1], fetch, len(x), "cosine", 10, 0.95, 300)
    assert res.met and res.recall_at_k >= 0.95 and res.params["nprobe"] > 1
    assert ic.faiss_module().extract_index_ivf(index).nprobe == res.params["nprobe"]
    ic.set_search_params(index, {"nprobe": res.params["nprobe"] - 1})  # the smallest that meets it
    assert ic.measure_recall(search, fetch, len(x), "cosine", 10, qids)[0] < 0.95


def _coarse_pq_index():
    """A deliberately coarse IVF-PQ index over clustered vectors (its recall needs tuning), its data, a fetch."""
    faiss = ic.faiss_module()
    x = clustered(4000, 32, 20, noise=1.0)
    index = faiss.index_factory(32, "IVF16,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    return index, x, lambda ids: x[np.asarray(ids)]


def test_unreachable_target_warns_never_silently(caplog):
    index, x, fetch = _coarse_pq_index()
    with caplog.at_level(logging.WARNING, logger="memtrack"):
        res = ic.tune(index, "ivf_pq", lambda q, k, r: index.search(q, k)[1], fetch, len(x), "cosine", 10, 0.99, 200)
    assert not res.met and res.recall_at_k < 0.99
    assert "recall target 0.99 not reached" in caplog.text


def test_pq_rerank_reaches_the_target():
    index, x, fetch = _coarse_pq_index()
    res = ic.tune(index, "ivf_pq", lambda q, k, r: ic.search_reranked(index, fetch, "cosine", q, k, r)[1],
                  fetch, len(x), "cosine", 10, 0.95, 200, rerank_options=(8, 32))
    assert res.met and res.rerank in (8, 32)


# ------------------------------------------------------------------------------------ built indexes


def _same_search(a: ReferenceIndex, b: ReferenceIndex, k: int = 5) -> None:
    q = a.spaces["pixel"].vectors_at(np.arange(0, a.spaces["pixel"].index.ntotal, 7))
    sa, ia = a.search("pixel", q, k)
    sb, ib = b.search("pixel", q, k)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)


def test_auto_small_set_is_exact_flat(crops, tmp_path):
    ref = ReferenceIndex.build(read_dataset(crops), [PixelEmbedder(PixelOptions(resolution=RES))], tmp_path / "r",
                               cfg())
    info = ref.manifest["spaces"]["pixel"]
    assert info["index_kind"] == "flat" and info["recall_at_k"] == 1.0 and info["search_params"] == {}


def test_ivf_build_stores_measured_recall_and_params(crops, tmp_path):
    ref = ReferenceIndex.build(read_dataset(crops), [PixelEmbedder(PixelOptions(resolution=RES))], tmp_path / "r",
                               cfg(index_type="ivf_flat", recall_queries=200))
    info = ref.manifest["spaces"]["pixel"]
    assert info["index_kind"] == "ivf_flat" and info["factory"].startswith("IVF")
    assert info["recall_at_k"] >= 0.95 and info["recall"]["met"] and "nprobe" in info["search_params"]
    assert ref.summary()["spaces"]["pixel"]["recall_at_k"] == info["recall_at_k"]
    nprobe = ic.faiss_module().extract_index_ivf(ref.spaces["pixel"].index).nprobe
    assert nprobe == info["search_params"]["nprobe"]  # applied again on open


def test_sharded_on_disk_build_equals_single_build_and_opens_mmapped(crops, tmp_path):
    ds = read_dataset(crops)
    emb = [PixelEmbedder(PixelOptions(resolution=RES))]
    single = ReferenceIndex.build(ds, emb, tmp_path / "single", cfg(index_type="ivf_flat", recall_queries=100))
    sharded = ReferenceIndex.build(ds, emb, tmp_path / "sharded", cfg(index_type="ivf_flat", recall_queries=100,
                                                                      shard_size=64, on_disk=True),
                                   shard_dir=tmp_path / "shards")
    a, b = single.spaces["pixel"], sharded.spaces["pixel"]
    np.testing.assert_array_equal(np.asarray(a.vectors), np.asarray(b.vectors))
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_allclose(single.baseline_values("pixel"), sharded.baseline_values("pixel"))
    _same_search(single, sharded)
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())
    # on disk, memory-mapped, and still found after the folder moves
    assert (tmp_path / "sharded" / "pixel.ivfdata").is_file() and b.info["on_disk"]
    moved = tmp_path / "moved"
    os.replace(tmp_path / "sharded", moved)
    reopened = ReferenceIndex.open(moved)
    sp = reopened.spaces["pixel"]
    assert isinstance(sp.vectors, np.memmap)
    _same_search(single, reopened)
    # the reopened index's inverted lists are faiss's on-disk lists, mapped from the moved folder's file
    faiss = ic.faiss_module()
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(sp.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists), type(lists).__name__
    assert Path(lists.filename).resolve() == (moved / "pixel.ivfdata").resolve()
    assert lists.compute_ntotal() == sp.index.ntotal == 300
    # and searches read that file: the same index with its .ivfdata zeroed finds other neighbours
    zeroed = tmp_path / "zeroed"
    shutil.copytree(moved, zeroed)
    size = (zeroed / "pixel.ivfdata").stat().st_size
    (zeroed / "pixel.ivfdata").write_bytes(bytes(size))
    q = single.spaces["pixel"].vectors_at(np.arange(0, 300, 7))
    ids = ReferenceIndex.open(zeroed).search("pixel", q, 5)[1]
    assert not np.array_equal(ids, single.search("pixel", q, 5)[1])


def test_resume_after_crash_does_not_redo_finished_shards(crops, tmp_path):
    ds = read_dataset(crops)  # 300 records: 5 shards of 64, one embed call each (batch 64)
    c = cfg(shard_size=64)
    crashing = CountingPixel(fail_at=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ReferenceIndex.build(ds, [crashing], tmp_path / "r", c, shard_dir=tmp_path / "shards")
    assert not (tmp_path / "r").exists()
    done = [p for p in (tmp_path / "shards").iterdir() if (p / "done.json").is_file()]
    assert len(done) == 2
    again = CountingPixel()
    ref = ReferenceIndex.build(ds, [again], tmp_path / "r", c, shard_dir=tmp_path / "shards")
    assert again.calls == 3  # shards 2, 3, 4 only
    clean = ReferenceIndex.build(ds, [CountingPixel()], tmp_path / "clean", c)
    np.testing.assert_array_equal(np.asarray(ref.spaces["pixel"].vectors), np.asarray(clean.spaces["pixel"].vectors))
    _same_search(ref, clean)


def test_incremental_add_equals_full_build(crops, tmp_path):
    full_ds = read_dataset(crops)
    first = Dataset(root=full_ds.root, records=full_ds.records[:200])
    rest = Dataset(root=full_ds.root, records=full_ds.records[200:])
    emb = [PixelEmbedder(PixelOptions(resolution=RES))]
    full = ReferenceIndex.build(full_ds, emb, tmp_path / "full", cfg())
    grown = ReferenceIndex.build(first, emb, tmp_path / "grown", cfg()).add(rest, emb)
    assert grown.n_train == full.n_train and grown.train_ids == full.train_ids
    np.testing.assert_array_equal(np.asarray(grown.spaces["pixel"].vectors), np.asarray(full.spaces["pixel"].vectors))
    np.testing.assert_allclose(grown.baseline_values("pixel"), full.baseline_values("pixel"))
    _same_search(full, grown)
    assert grown.manifest["additions"][0]["n_added"] == 100
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_add_to_on_disk_ivf_index_finds_new_images(crops, tmp_path):
    full_ds = read_dataset(crops)
    first = Dataset(root=full_ds.root, records=full_ds.records[:250])
    rest = Dataset(root=full_ds.root, records=full_ds.records[250:])
    emb = [PixelEmbedder(PixelOptions(resolution=RES))]
    ref = ReferenceIndex.build(first, emb, tmp_path / "r", cfg(index_type="ivf_flat", on_disk=True,
                                                               recall_queries=100)).add(rest, emb)
    sp = ref.spaces["pixel"]
    assert sp.index.ntotal == 300 and sp.info["on_disk"]
    q = sp.vectors_at(np.arange(250, 300))
    _, ids = ref.search("pixel", q, 1)
    assert (ref.record_rows("pixel", ids)[:, 0] >= 250).all()
    assert ref.manifest["spaces"]["pixel"]["recall_at_k"] >= 0.9


def test_add_refuses_duplicates_and_a_crash_keeps_the_old_index(crops, tmp_path, monkeypatch):
    import memtrack.index.update as upd

    full_ds = read_dataset(crops)
    emb = [PixelEmbedder(PixelOptions(resolution=RES))]
    ref = ReferenceIndex.build(Dataset(root=full_ds.root, records=full_ds.records[:100]), emb, tmp_path / "r", cfg())
    with pytest.raises(IndexError_, match="already in the index"):
        ref.add(Dataset(root=full_ds.root, records=full_ds.records[90:110]), emb)
    clone = [type(r)(**{**r.to_dict(), "id": "other/" + r.id}) for r in full_ds.records[:1]]
    with pytest.raises(IndexError_, match="under another id"):
        ref.add(clone, emb)
    before = (tmp_path / "r" / "manifest.json").read_bytes()
    monkeypatch.setattr(upd, "_updated_baseline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("power cut")))
    with pytest.raises(RuntimeError, match="power cut"):
        ref.add(Dataset(root=full_ds.root, records=full_ds.records[100:]), emb)
    assert (tmp_path / "r" / "manifest.json").read_bytes() == before
    assert ReferenceIndex.open(tmp_path / "r").n_train == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_cli_add(crops, tmp_path, capsys):
    from memtrack.cli.main import main

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    (second / "more").mkdir(parents=True)
    for i, p in enumerate(sorted(crops.glob("*.png"))[:12]):
        shutil.copy(p, (first if i < 8 else second / "more") / p.name)
    assert main(["index", "build", str(first), "--out", str(tmp_path / "ref"), "--resolution", str(RES)]) == 0
    assert main(["index", "build", str(second), "--out", str(tmp_path / "ref"), "--add"]) == 0
    assert "added 4 training images" in capsys.readouterr().out
    assert ReferenceIndex.open(tmp_path / "ref").n_train == 12
    assert main(["index", "build", str(second), "--out", str(tmp_path / "ref"), "--add"]) == 2  # duplicates
    assert "already in the index" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sharded_build_equals_one_process(crops, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed beside this python")
    (tmp_path / "c.yaml").write_text("index:\n  shard_size: 50\n")
    common = [str(crops), "--embedders", "pixel", "--resolution", str(RES), "--config", str(tmp_path / "c.yaml")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "MEMTRACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "memtrack", "index", "build", *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("indexed 300 training images") == 1  # the main process alone reports
    from memtrack.cli.main import main

    assert main(["index", "build", *common, "--out", str(tmp_path / "one")]) == 0
    one, two = ReferenceIndex.open(tmp_path / "one"), ReferenceIndex.open(tmp_path / "two")
    assert one.train_ids == two.train_ids
    np.testing.assert_array_equal(np.asarray(one.spaces["pixel"].vectors), np.asarray(two.spaces["pixel"].vectors))
    _same_search(one, two)
    assert not (tmp_path / ".two.shards").exists()
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["n_train"] == 300
