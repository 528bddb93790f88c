"""Candidates the detectors can trust: never padded, reduced per training image, exact where it matters.

Every case here failed on the code before this file existed: an IVF index with sparse inverted lists
returned ids -1 whose slots reached the detectors as all-zero (black) images; several vectors of one
training image (views) counted as different images, so a mirrored view could be "the 2nd nearest".
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import real_image
from memtrack.index import choice as ic
from memtrack.config import Config, DetectorsConfig, EmbedderSpec
from memtrack.data.dataset import read_dataset
from memtrack.detectors.registry import run_detectors
from memtrack.detectors.core import SpaceEvidence, adaptive_l2, copy_score, nn_ratio, per_row, tiled_l2
from memtrack.embedders.pixel import PixelEmbedder, PixelOptions
from memtrack.index.reference import ReferenceIndex
from memtrack.detectors.metrics import aggregate
from memtrack.scan.tracker import Tracker

RES = 8


def write_crops(folder, n: int = 300, size: int = 16, seed: int = 0):
    """``n`` distinct real-photo crops, several per photo (they cluster like a real training set)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [np.asarray(real_image(name).resize((128, 128))) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, 128 - size, 2)
        Image.fromarray(p[y:y + size, x:x + size]).save(folder / f"img{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return write_crops(tmp_path_factory.mktemp("crops") / "data")


def config(**index) -> Config:
    c = Config()
    c.index.embedders = [EmbedderSpec("pixel", {"resolution": RES})]
    for key, value in index.items():
        setattr(c.index, key, value)
    return c


@pytest.fixture(scope="module")
def sparse_ivf(crops, tmp_path_factory):
    """An IVF-Flat pixel index searched with nprobe=1: its lists hold fewer vectors than a scan asks for."""
    ref = ReferenceIndex.build(read_dataset(crops), [PixelEmbedder(PixelOptions(resolution=RES))],
                               tmp_path_factory.mktemp("ivf") / "ref", config(index_type="ivf_flat",
                                                                              recall_queries=100))
    ic.set_search_params(ref.spaces["pixel"].index, {"nprobe": 1})
    return ref


def _capture(monkeypatch):
    """Record the evidence the tracker hands to the detectors."""
    import memtrack.scan.tracker as tr

    seen = {}

    def spy(evidence, cfg):
        seen.update(evidence)
        return run_detectors(evidence, cfg)

    monkeypatch.setattr(tr, "run_detectors", spy)
    return seen


# -------------------------------------------------------------------------------- no padding, ever


def test_sparse_ivf_lists_give_missing_candidates_and_no_zero_vector_reaches_a_detector(sparse_ivf, monkeypatch):
    seen = _capture(monkeypatch)
    images = [Image.new("RGB", (16, 16), (0, 0, 0)), Image.new("RGB", (16, 16), (40, 30, 20))]
    images += [Image.open(p).convert("RGB") for p in sorted(read_dataset_paths(sparse_ivf))[:6]]
    cfg = config(k=60)  # more candidates than one IVF list holds
    outputs = {o.name: o for o in Tracker(sparse_ivf, [PixelEmbedder(PixelOptions(resolution=RES))], cfg)
               .assess(images)}
    ev = seen["pixel"]
    missing = ev.cand_ids < 0
    assert missing.any(), "the premise: nprobe=1 over short lists returns fewer than k candidates"
    # the slots of missing candidates carry no vector at all (NaN), never a zero (black) image
    assert np.isnan(ev.cand_vecs[missing]).all()
    assert not (ev.cand_vecs[~missing] != ev.cand_vecs[~missing]).any()
    # and no detector depends on them: zeros or random values in those slots change nothing
    for fill in (0.0, 0.5):
        filled = SpaceEvidence(ev.metric, ev.query, ev.cand_ids, np.where(missing[..., None], fill, ev.cand_vecs),
                               ev.image_shape, dict(ev.extra), ev.n_rows)
        again = {o.name: o for o in run_detectors({"pixel": filled}, cfg.detectors)}
        for name, out in outputs.items():
            np.testing.assert_array_equal(again[name].flagged, out.flagged, err_msg=name)
            np.testing.assert_array_equal(again[name].match, out.match, err_msg=name)
            np.testing.assert_allclose(again[name].score, out.score, equal_nan=True, err_msg=name)
    # a black sample is not "a copy" of a missing candidate (a zero vector would be at distance 0 from it):
    # its d1 is the exact distance to a real training image
    nn = outputs["nn_ratio"]
    space = sparse_ivf.spaces["pixel"]
    nearest = space.vectors_at(np.flatnonzero(space.rows == nn.match[0]))
    assert nn.match[0] >= 0 and nn.extra["d1"][0] > 0
    assert nn.extra["d1"][0] == pytest.approx(np.sqrt(((ev.query[0] - nearest) ** 2).mean(1)).min(), rel=1e-6)


def read_dataset_paths(ref: ReferenceIndex):
    return [r.path for r in ref.records]


def test_fewer_candidates_than_needed_are_reported_not_guessed():
    # two samples; the second has a single candidate training image left (the other slot is -1)
    q = np.array([[0.0, 0.0], [0.0, 0.0]])
    cand = np.array([[[0.1, 0.0], [1.0, 0.0]], [[0.1, 0.0], [np.nan, np.nan]]])
    ids = np.array([[3, 4], [3, -1]])
    out = nn_ratio(q, cand, candidate_ids=ids)
    assert out.judged_mask().tolist() == [True, False]
    assert out.flagged.tolist() == [True, False] and np.isnan(out.score[1])
    assert sum(out.not_judged.values()) == 1
    block = aggregate([out])["metrics"]["nn_ratio"]
    assert block["n"] == 1 and block["count"] == 1 and block["rate"] == 1.0
    assert list(block["not_judged"].values()) == [1]


def test_no_candidate_at_all_makes_the_metric_not_applicable_not_zero():
    q = np.zeros((2, 2))
    cand = np.full((2, 2, 2), np.nan)
    out = nn_ratio(q, cand, candidate_ids=np.full((2, 2), -1))
    block = aggregate([out])["metrics"]["nn_ratio"]
    assert block["applicable"] is False and "rate" not in block and "could be judged" in block["reason"]


# --------------------------------------------------------------------------- several vectors per image


def _views_case():
    """Rows: 0 = image A with two vectors (itself and its mirror), 1 = image B, 2 = image C."""
    rng = np.random.default_rng(4)
    a, b, c = (rng.random((3, 16, 16)) for _ in range(3))
    mirror = a[:, :, ::-1]
    vecs = np.stack([a, mirror, b, c])                  # [4 vectors, 3, 4, 4]
    rows = np.array([0, 0, 1, 2])
    return a, mirror, b, c, vecs, rows


def test_views_of_one_image_count_once_and_d2_is_another_image():
    a, mirror, b, c, vecs, rows = _views_case()
    query = (a + 0.01)[None]                            # close to A; A's mirror is a *view*, not a 2nd image
    cand, ids = vecs[None], rows[None]
    out = nn_ratio(query.reshape(1, -1), cand.reshape(1, 4, -1), candidate_ids=ids)
    d = lambda x, y: np.sqrt(((x - y) ** 2).mean())  # noqa: E731
    assert out.match[0] == 0
    assert out.extra["d1"][0] == pytest.approx(d(query[0], a))
    assert out.extra["d2"][0] == pytest.approx(min(d(query[0], b), d(query[0], c)))  # not d(query, mirror)
    # the per-row reduction itself: one entry per image, the minimum over its views, nearest first
    ds, rs = per_row(np.array([[0.5, 0.2, 0.9, 0.7]]), ids)
    assert rs.tolist() == [[0, 2, 1, -1]] and ds[0, :3].tolist() == [0.2, 0.7, 0.9] and ds[0, 3] == np.inf


def test_every_detector_takes_the_minimum_over_an_images_views():
    a, mirror, b, c, vecs, rows = _views_case()
    query = mirror[None] + 0.0                          # the sample is the mirrored training image
    cand, ids = vecs[None], rows[None]
    tiled = tiled_l2(query, cand, grid=2, candidate_ids=ids)
    assert tiled.score[0] == 0.0 and tiled.match[0] == 0 and tiled.flagged[0]
    flat = query.reshape(1, -1), cand.reshape(1, 4, -1)
    nn = nn_ratio(*flat, candidate_ids=ids)
    assert nn.extra["d1"][0] == 0.0 and nn.match[0] == 0 and nn.flagged[0] and nn.extra["d2"][0] > 0
    cos = copy_score(*flat, candidate_ids=ids)
    assert cos.score[0] == pytest.approx(1.0) and cos.match[0] == 0
    ad = adaptive_l2(*flat, np.ones((3, 2)), n_neighbours=3, candidate_ids=ids)
    assert ad.match[0] == 0 and ad.score[0] == 0.0


def test_the_scan_asks_for_k_times_views_vectors(sparse_ivf, monkeypatch):
    space = sparse_ivf.spaces["pixel"]
    monkeypatch.setitem(space.info, "views", 3)
    asked = []
    original = sparse_ivf.search

    def spy(name, q, k):
        asked.append(k)
        return original(name, q, k)

    monkeypatch.setattr(sparse_ivf, "search", spy)
    tracker = Tracker(sparse_ivf, [PixelEmbedder(PixelOptions(resolution=RES))], config())
    tracker.assess([Image.new("RGB", (16, 16), (9, 9, 9))])
    assert asked == [tracker._k("pixel") * 3]


def test_registered_detectors_ignore_missing_slots_in_hand_made_evidence():
    a, mirror, b, c, vecs, rows = _views_case()
    query = np.stack([a, b]).reshape(2, -1).astype(np.float32)
    cand = np.stack([vecs, vecs]).reshape(2, 4, -1).astype(np.float32)
    ids = np.stack([rows, rows])
    cand[1, 3] = np.nan
    ids[1, 3] = -1                                      # sample 1 lost its 4th candidate (image C)
    ev = SpaceEvidence("l2", query, ids, cand, (3, 16, 16), n_rows=3)
    cfg = DetectorsConfig(tiled_grid=2)
    with np.errstate(all="raise"):
        outs = {o.name: o for o in run_detectors({"pixel": ev}, cfg)}
    assert outs["nn_ratio"].match.tolist() == [0, 1] and outs["nn_ratio"].flagged.all()
    assert outs["tiled_l2"].match.tolist() == [0, 1] and (outs["tiled_l2"].score == 0).all()


# ------------------------------------------------------------------ exact pixel search, 2nd-neighbour recall


@pytest.mark.parametrize("n,dim", [(50_000, 3 * 32 * 32), (70_000, 3 * 64 * 64), (30_000, 3 * 32 * 32)])
def test_cifar_and_ffhq_sized_pixel_sets_are_searched_exactly(n, dim):
    # before: `auto` gave these HNSW (an approximate index that can miss nn_ratio's 2nd neighbour)
    assert ic.choose_index(n, dim, 64 << 30).kind == "hnsw"           # a feature space of that size
    choice = ic.choose_index(n, dim, 64 << 30, exact=True)            # the pixel space
    assert choice.kind == "flat" and "pixel space" in choice.reason


def test_exact_pixel_search_ends_where_it_stops_being_affordable():
    assert ic.choose_index(1_000_000, 3072, 64 << 30, exact=True).kind != "flat"   # train->train ~ 2.6 days here
    assert ic.choose_index(50_000, 3072, 100 << 20, exact=True).kind != "flat"     # float32 copy over the budget
    assert ic.choose_index(50_000, 3072, 64 << 30, "hnsw", exact=True).kind == "hnsw"  # an explicit choice wins


def test_a_build_keeps_the_pixel_space_exact_where_other_spaces_go_approximate(crops, tmp_path, monkeypatch):
    monkeypatch.setattr(ic, "FLAT_MAX_BYTES", 0)  # as if this small set were CIFAR-sized for feature spaces
    ref = ReferenceIndex.build(read_dataset(crops), [PixelEmbedder(PixelOptions(resolution=RES))], tmp_path / "r",
                               config())
    info = ref.manifest["spaces"]["pixel"]
    assert info["index_kind"] == "flat" and "pixel space" in info["choice_reason"]
    assert info["recall_2nd"] == 1.0 and info["recall_2nd_measured"]["exact"]
    assert ref.summary()["spaces"]["pixel"]["recall_2nd"] == 1.0


def _exact_ratio(space, q):
    """nn_ratio's d1/d2 of queries ``q`` by brute force over every stored vector (per training image)."""
    x = space.vectors_at(np.arange(len(space.rows))).astype(np.float64)
    d = np.sqrt(((q[:, None, :].astype(np.float64) - x[None]) ** 2).mean(-1))
    ds, _ = per_row(d, np.broadcast_to(space.rows, d.shape))
    return ds[:, 0] / ds[:, 1]


def test_an_approximate_pixel_index_is_tuned_until_the_2nd_neighbour_of_generated_like_queries_is_found(
        crops, tmp_path):
    from memtrack.index.recall import SecondNeighbour

    ref = ReferenceIndex.build(read_dataset(crops), [PixelEmbedder(PixelOptions(resolution=RES))], tmp_path / "r",
                               config(index_type="ivf_flat", recall_target=1.0, recall_queries=300))
    space = ref.spaces["pixel"]
    info = ref.manifest["spaces"]["pixel"]
    fetch = lambda ids: space.vectors_at(np.asarray(ids))  # noqa: E731
    second = SecondNeighbour(fetch, space.rows, 10, 300)
    # the premise: probing one list misses the 2nd neighbour of generated-like queries, and a missed 2nd
    # neighbour can only make d2 larger -- d1/d2 smaller, towards a false "memorized"
    tuned = dict(info["search_params"])
    ic.set_search_params(space.index, {"nprobe": 1})
    search = lambda q, k: ref.search("pixel", q, k)[1]  # noqa: E731
    assert second(search) < 0.9
    ids = search(second.queries, 10)
    found = np.sqrt(second._second(ids) / space.dim)
    assert (found >= np.sqrt(second.exact / space.dim) - 1e-9).all()
    # as built (tuned to the target on those queries): every 2nd neighbour found, every ratio exact
    ic.set_search_params(space.index, tuned)
    assert info["recall_2nd"] == 1.0 and info["recall"]["met"] and info["recall_2nd_measured"]["n_queries"] == 300
    assert second(search) == 1.0
    ids = search(second.queries, 10)
    out = nn_ratio(second.queries, space.vectors_at(ids), candidate_ids=ref.record_rows("pixel", ids))
    np.testing.assert_allclose(out.score, _exact_ratio(space, second.queries), rtol=1e-6)
    assert ref.summary()["spaces"]["pixel"]["recall_2nd"] == 1.0


def test_index_info_reports_the_2nd_neighbour_recall(crops, tmp_path, capsys):
    import json

    from memtrack.cli.main import main

    ReferenceIndex.build(read_dataset(crops), [PixelEmbedder(PixelOptions(resolution=RES))], tmp_path / "r",
                         config(index_type="hnsw", recall_queries=120))
    assert main(["index", "info", str(tmp_path / "r"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["spaces"]["pixel"]
    assert 0.0 <= info["recall_2nd"] <= 1.0
    assert main(["index", "info", str(tmp_path / "r")]) == 0
    assert "2nd-nearest training image of generated-like queries found" in capsys.readouterr().out


# ------------------------------------------------------------------------ duplicated training images


def _five_photos(size: int = 32) -> np.ndarray:
    from helpers_core import training_images

    return training_images(size)  # [5, 3, size, size] in [0, 1], pairwise RMS > 0.25


def _noisy(x: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return np.clip(x + np.random.default_rng(seed).normal(0, sigma, x.shape), 0, 1)


def _lists(train: np.ndarray):
    """Exact train->train lists (every other image, nearest first) of ``train`` [n, D]."""
    n = len(train)
    d = np.sqrt(((train[:, None] - train[None]) ** 2).mean(-1))
    d[np.arange(n), np.arange(n)] = np.inf
    order = np.argsort(d, axis=1)[:, :n - 1]
    return order, np.take_along_axis(d, order, 1)


def test_a_noisy_duplicate_defeats_nn_ratio_and_the_dedup_variant_catches_it():
    from memtrack.detectors.core import duplicate_distance, nn_ratio_dedup

    photos = _five_photos()
    twin = _noisy(photos[0], 0.01, seed=1)                       # the astronaut, seen twice (sigma = 0.01)
    train = np.concatenate([photos, twin[None]]).reshape(6, -1)
    samples = np.stack([_noisy(photos[0], 0.01, seed=2),          # a memorized (noisy) astronaut
                        0.5 * (photos[0] + twin),                 # the average of the two copies
                        0.5 * (photos[1] + photos[2]),            # a blend of two different photos
                        np.random.default_rng(3).random(photos[0].shape)]).reshape(4, -1)
    cand = np.broadcast_to(train, (4, *train.shape)).copy()
    plain = nn_ratio(samples, cand)
    assert plain.score[0] > 0.6 and plain.score[1] == pytest.approx(1.0, abs=1e-9)  # "ratio 1.0, not flagged"
    assert not plain.flagged[:2].any()
    rows, dist = _lists(train)
    dup = duplicate_distance(dist)
    assert dist[0, 0] < dup < 0.25 / 3 + 0.05                    # the twin is a near-duplicate; photos are not
    out = nn_ratio_dedup(samples, cand, rows, dist, dup)
    assert out.flagged.tolist() == [True, True, False, False]
    assert set(out.match[:2].tolist()) <= {0, 5}
    assert out.extra["duplicates_skipped"][:2].tolist() == [1.0, 1.0]
    assert out.extra["d2"][0] > 0.2                               # past the twin: the nearest other photo
    assert out.score[2] == pytest.approx(plain.score[2]) and out.score[3] == pytest.approx(plain.score[3])


def test_the_dedup_variant_end_to_end_on_a_built_index(tmp_path):
    from memtrack.embedders.registry import get_embedder

    photos = _five_photos()
    folder = tmp_path / "data"
    folder.mkdir()
    for i, img in enumerate(list(photos) + [_noisy(photos[0], 0.01, seed=1)]):
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(folder / f"img{i}.png")
    c = Config()
    c.index.embedders = [EmbedderSpec("pixel", {"resolution": 32})]
    ref = ReferenceIndex.build(read_dataset(folder), [get_embedder(s) for s in c.index.embedders], tmp_path / "r", c)
    rows, dist = ref.train_neighbours("pixel")
    assert rows.shape == (6, c.index.baseline_k) and (rows[:, :5] >= 0).all() and (rows[:, 5:] == -1).all()
    ids = {r.id: i for i, r in enumerate(ref.records)}
    assert rows[ids["img0.png"], 0] == ids["img5.png"]            # the twin is each other's nearest image
    sample = Image.fromarray((_noisy(photos[0], 0.01, 2).transpose(1, 2, 0) * 255).round().astype(np.uint8))
    outs = {o.name: o for o in Tracker(ref, [get_embedder(s) for s in c.index.embedders], c).assess([sample])}
    assert not outs["nn_ratio"].flagged[0] and outs["nn_ratio_dedup"].flagged[0]
    assert ref.records[outs["nn_ratio_dedup"].match[0]].id in ("img0.png", "img5.png")


def test_train_lists_and_baseline_exclude_the_same_record_not_just_the_same_vector():
    from memtrack.index import neighbours as nb

    a, mirror, b, c, vecs, rows = _views_case()
    stored = (vecs.reshape(4, -1) * 255).round().astype(np.uint8)
    x = stored.astype(np.float32) / 255
    search = lambda q, k: np.argsort(((q[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, :k]  # noqa: E731
    tn = nb.compute("l2", stored, 255.0, rows, np.arange(4), search, nb.raw_fetch(stored, 255.0), rows, keep=2,
                    views=2, lists=True, tiled=((3, 16, 16), 2))
    d = lambda i, j: np.sqrt(((x[i].astype(np.float64) - x[j]) ** 2).mean())  # noqa: E731
    # the baseline of A's two vectors is the nearest *other image* (B or C), never A's own mirror
    assert tn.base[0] == pytest.approx(min(d(0, 2), d(0, 3)))
    assert tn.base[1] == pytest.approx(min(d(1, 2), d(1, 3)))
    # A's list holds B and C once each, at the minimum over A's two views; B's holds A at min over A's views
    assert sorted(tn.rows[0].tolist()) == [1, 2] and -1 not in tn.rows[0]
    assert tn.dist[0].min() == pytest.approx(min(d(0, 2), d(1, 2), d(0, 3), d(1, 3)))
    b_to_a = tn.dist[1][tn.rows[1].tolist().index(0)]
    assert b_to_a == pytest.approx(min(d(2, 0), d(2, 1)))
    assert (tn.tiled > 0).all()


def test_the_tiled_baseline_exists_and_baseline_k_is_read(crops, tmp_path):
    ref = ReferenceIndex.build(read_dataset(crops), [PixelEmbedder(PixelOptions(resolution=RES))], tmp_path / "r",
                               config(baseline_k=7))
    rows, dist = ref.train_neighbours("pixel")
    assert rows.shape == (300, 7) and ref.manifest["spaces"]["pixel"]["train_neighbours"]["k"] == 7
    assert (np.diff(dist, axis=1) >= 0).all() and (rows >= 0).all()
    tiled = ref.manifest["baseline"]["pixel_tiled"]
    assert tiled["grid"] == 4 and tiled["n"] == 300 and "tiled L2" in tiled["statistic"]
    values = ref.baseline_values("pixel_tiled")
    assert values.shape == (300,) and (values >= 0).all()
    # the tiled distance to the nearest image is at least its RMS distance (max over tiles >= overall RMS)
    assert (values >= dist[:, 0] - 1e-6).all()
