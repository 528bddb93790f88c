"""Identity groups, calibration and the two identity detectors, on synthetic embeddings (pure functions).

The geometry of the detector tests reproduces distances measured with dlib on real faces (astronaut vs
Grace Hopper, see memtrack/identity/detect.py): copies 0.06-0.24 from their source, pixel morphs 50/50 at
0.44 / 0.59, 35/65 at 0.29 / 0.64, 20/80 at 0.16 / 0.67.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from memtrack.identity.detect import (calibrate_threshold, classify_faces, cluster_faces, identity_candidates,
                               identity_groups, identity_interpolation, identity_leak, nearest_identities,
                               pairwise_distances)


def people(n_ids: int, per_id: int, genuine: float = 0.35, dim: int = 128, seed: int = 0):
    """``n_ids`` identities whose centres are ~0.8 apart; two faces of one person lie ~``genuine`` apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.8 / np.sqrt(2 * dim), (n_ids, dim))
    faces = np.repeat(centres, per_id, 0) + rng.normal(0, genuine / np.sqrt(2 * dim), (n_ids * per_id, dim))
    return faces.astype(np.float32), np.repeat([f"p{i:03d}" for i in range(n_ids)], per_id).tolist()


# ------------------------------------------------------------------------------------------ groups


def test_groups_from_labels_have_centroids_and_counts():
    vecs, labels = people(3, 4)
    g = identity_groups(vecs, labels)
    assert g.source == "labels" and g.names == ["p000", "p001", "p002"] and g.counts.tolist() == [4, 4, 4]
    np.testing.assert_allclose(g.centroids[1], vecs[4:8].mean(0), atol=1e-6)
    assert g.threshold is None and g.labelled.all()
    json.dumps(g.to_dict())


def test_clustering_without_labels_finds_the_people():
    vecs, labels = people(4, 6, seed=1)
    order = np.random.default_rng(0).permutation(len(vecs))
    g = identity_groups(vecs[order], None, threshold=0.6)
    assert g.source == "clustering" and g.threshold == 0.6 and len(g.names) == 4
    truth = np.asarray(labels)[order]
    for k in range(4):  # every cluster is one person, every person one cluster
        assert len(set(truth[g.face_identity == k])) == 1
    assert sorted(g.counts.tolist()) == [6, 6, 6, 6] and not g.labelled.any()


def test_clustering_from_a_knn_graph_matches_the_dense_one():
    vecs, _ = people(3, 5, seed=2)
    d = pairwise_distances(vecs, vecs)
    ids = np.argsort(d, axis=1)[:, :8]
    dense = cluster_faces(vecs, 0.6)
    sparse = cluster_faces(vecs, 0.6, neighbours=(ids, np.take_along_axis(d, ids, 1)))
    np.testing.assert_array_equal(dense, sparse)
    assert cluster_faces(vecs[:0], 0.6).shape == (0,)


def test_a_chain_of_lookalikes_is_not_merged_into_one_person():
    # two tight groups of 6 joined by one in-between face: single linkage would make one cluster
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.01, (6, 2))
    b = rng.normal(0, 0.01, (6, 2)) + [1.0, 0]
    labels = cluster_faces(np.vstack([a, b, [[0.5, 0]]]), 0.55)
    assert len(set(labels[:6])) == 1 and len(set(labels[6:12])) == 1 and labels[0] != labels[6]


def test_unlabelled_faces_are_clustered_beside_labelled_ones():
    vecs, labels = people(3, 4, seed=3)
    labels = labels[:8] + [None] * 4
    g = identity_groups(vecs, labels, threshold=0.6)
    assert g.source == "labels+clustering" and g.names == ["p000", "p001", "cluster-0"]
    assert g.labelled.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="threshold"):
        identity_groups(vecs, labels)
    with pytest.raises(ValueError, match="one entry per face"):
        identity_groups(vecs, labels[:3])


def test_cosine_centroids_are_unit_length():
    vecs, labels = people(2, 3)
    g = identity_groups(vecs / np.linalg.norm(vecs, axis=1, keepdims=True), labels, metric="cosine")
    np.testing.assert_allclose(np.linalg.norm(g.centroids, axis=1), 1.0, atol=1e-6)


# ------------------------------------------------------------------------------------- calibration


def test_calibration_at_a_false_match_rate():
    vecs, labels = people(60, 8, seed=4)
    g = identity_groups(vecs, labels)
    cal = calibrate_threshold(vecs, g, published_threshold=0.6, far=1e-3)
    assert cal.source == "calibrated" and cal.warning is None and cal.n_identities == 60
    assert cal.genuine.size == 60 * 28 and cal.impostor.size == (480 * 479) // 2 - 60 * 28
    k = int(np.floor(1e-3 * cal.impostor.size))
    assert cal.threshold == np.sort(cal.impostor)[k]
    assert cal.far <= 1e-3 and (cal.impostor < cal.threshold).sum() <= k
    assert cal.genuine.max() < cal.threshold < cal.impostor.max()  # separable people: no false non-match
    assert cal.frr == 0.0
    # dlib's 0.6 lies below every impostor pair here (nearest 0.64) and above every genuine pair (at most 0.42)
    assert cal.impostor.min() > 0.6 > cal.genuine.max()
    assert cal.far_at_published == 0.0 and cal.frr_at_published == 0.0
    # a published threshold inside both distributions: its rates are those of that threshold, not of the
    # calibrated one (measured on the very same pairs)
    mid = calibrate_threshold(vecs, g, published_threshold=0.8, far=1e-3)
    assert mid.threshold == cal.threshold and mid.far == cal.far
    assert mid.far_at_published == (cal.impostor < 0.8).mean() and 0.05 < mid.far_at_published < 0.5
    low = calibrate_threshold(vecs, g, published_threshold=float(np.median(cal.genuine)), far=1e-3)
    assert low.frr_at_published == (cal.genuine >= np.median(cal.genuine)).mean() == 0.5
    d = cal.to_dict()
    assert d["n_impostor_pairs"] == cal.impostor.size and "genuine" not in d
    json.dumps(cal.to_dict(distributions=True))


def test_calibration_samples_pairs_beyond_max_pairs():
    vecs, labels = people(30, 15, seed=5)  # 3,150 genuine and 97,875 impostor pairs
    g = identity_groups(vecs, labels)
    cal = calibrate_threshold(vecs, g, 0.6, far=1e-2, max_pairs=2000)
    assert cal.source == "calibrated" and cal.genuine.size == 2000 and cal.impostor.size == 2000
    assert cal.genuine.max() < 0.5 < cal.impostor.min()  # sampled pairs are of the right kind
    lab = np.asarray(labels)
    d = pairwise_distances(vecs, vecs)
    same = lab[:, None] == lab[None]
    full = np.sort(d[np.triu(~same, 1)])[int(0.01 * (~same).sum() / 2)]
    assert abs(cal.threshold - full) < 0.05  # the sampled quantile is close to the exact one


def test_too_few_labelled_pairs_fall_back_to_the_published_threshold():
    vecs, labels = people(2, 3)
    cal = calibrate_threshold(vecs, identity_groups(vecs, labels), published_threshold=0.6)
    assert cal.source == "published" and cal.threshold == 0.6
    assert "9 impostor pairs < 10000" in cal.warning and "6 genuine pairs < 50" in cal.warning
    assert cal.genuine.size == 6 and cal.impostor.size == 9  # both distributions are still returned


def test_clustered_identities_are_not_used_for_calibration():
    vecs, _ = people(40, 6, seed=6)
    g = identity_groups(vecs, None, threshold=0.6)
    cal = calibrate_threshold(vecs, g, 0.6, min_impostor_pairs=10)
    assert cal.source == "published" and "clustering" in cal.warning and cal.genuine.size == 0


# --------------------------------------------------------------------------------------- detectors


def geometry(pairs):
    """Faces at given distances (dA, dH) from two training faces A and H that are 0.70 apart."""
    a, h = np.zeros(2), np.array([0.70, 0.0])
    out = []
    for da, dh in pairs:  # intersect the circles around A and H
        x = (da ** 2 - dh ** 2 + 0.70 ** 2) / (2 * 0.70)
        out.append([x, np.sqrt(max(da ** 2 - x ** 2, 0.0))])
    q = np.asarray(out)
    return q, np.repeat(np.stack([a, h])[None], len(q), 0), np.repeat([[0, 1]], len(q), 0)


MEASURED = {  # (d to astronaut, d to Hopper) -> label, from dlib on real faces
    "copy of A": ((0.11, 0.70), "leak", 0),
    "copy of H, flipped": ((0.66, 0.20), "leak", 1),
    "morph 65/35": ((0.43, 0.52), "interpolation", None),
    "morph 50/50": ((0.59, 0.44), "interpolation", None),
    "morph 35/65": ((0.64, 0.29), "leak", 1),
    "morph 20/80": ((0.67, 0.16), "leak", 1),
    "stranger": ((0.78, 0.74), "none", None),
}


@pytest.mark.parametrize("case", list(MEASURED))
def test_measured_faces_get_the_documented_label(case):
    dists, label, who = MEASURED[case]
    q, c, ident = geometry([dists])
    leak = identity_leak(q, c, ident, threshold=0.6)
    interp = identity_interpolation(q, c, ident, threshold=0.6)
    assert leak.flagged[0] == (label == "leak") and interp.flagged[0] == (label == "interpolation")
    if label == "leak":
        assert leak.extra["identity"][0] == who and leak.score[0] == pytest.approx(min(dists), abs=1e-9)
    if label == "interpolation":
        assert {interp.extra["identity_a"][0], interp.extra["identity_b"][0]} == {0, 1}
        assert interp.score[0] == pytest.approx(min(dists) / max(dists), abs=1e-9)


def test_a_stricter_threshold_turns_a_weak_morph_into_a_leak_of_one_person():
    q, c, ident = geometry([(0.59, 0.44)])
    assert identity_interpolation(q, c, ident, 0.6).flagged[0]
    leak = identity_leak(q, c, ident, 0.55)
    assert leak.flagged[0] and leak.extra["identity"][0] == 1


def test_nearest_identities_uses_each_identitys_nearest_face():
    q = np.zeros((1, 2))
    c = np.array([[[0.3, 0], [0.1, 0], [0.5, 0], [0.2, 0], [0.05, 0]]])
    ident = np.array([[0, 0, 1, 1, -1]])  # the closest candidate has no identity: ignored
    nb = nearest_identities(q, c, ident, candidate_ids=np.array([[10, 11, 12, 13, 14]]))
    assert (nb.id1[0], nb.d1[0], nb.row1[0]) == (0, pytest.approx(0.1), 11)
    assert (nb.id2[0], nb.d2[0], nb.row2[0]) == (1, pytest.approx(0.2), 13)
    assert nb.ratio[0] == pytest.approx(0.5)


def test_one_identity_among_candidates_and_exact_copies():
    q = np.zeros((2, 3))
    c = np.zeros((2, 2, 3))
    c[1, 1] = 1.0
    nb = nearest_identities(q, c, np.array([[4, 4], [2, 5]]))
    assert np.isinf(nb.d2[0]) and nb.ratio[0] == 0.0 and nb.id2[0] == -1
    leak, interp = classify_faces(nb, 0.6)
    assert leak.tolist() == [True, True] and not interp.any()
    twins = nearest_identities(q[:1], np.zeros((1, 2, 3)), np.array([[0, 1]]))  # two labels, one face
    assert twins.ratio[0] == 1.0 and classify_faces(twins, 0.6)[1][0]


def test_a_sample_is_flagged_when_any_of_its_faces_is():
    # faces: sample 0 has a stranger and a copy of H; sample 1 has none; sample 2 a 50/50 morph; 3 a NaN row
    q, c, ident = geometry([(0.78, 0.74), (0.66, 0.20), (0.59, 0.44), (0.1, 0.7)])
    q[3] = np.nan
    kw = dict(image_index=np.array([0, 0, 2, 3]), n_samples=4, candidate_ids=np.repeat([[7, 9]], 4, 0))
    leak = identity_leak(q, c, ident, 0.6, **kw)
    interp = identity_interpolation(q, c, ident, 0.6, **kw)
    assert leak.flagged.tolist() == [True, False, False, False]
    assert interp.flagged.tolist() == [False, False, True, False]
    assert leak.extra["face"].tolist() == [1, -1, 2, -1] and leak.extra["n_faces"].tolist() == [2, 0, 1, 0]
    assert leak.match.tolist() == [9, -1, 9, -1] and interp.extra["match_b"][2] == 7
    assert np.isnan(leak.score[1]) and np.isnan(leak.score[3])
    assert leak.score[2] == pytest.approx(0.44)  # unflagged samples still report their nearest distance
    assert interp.threshold == 0.6 and interp.direction == "above" and leak.direction == "below"
    json.dumps(leak.to_dict()), json.dumps(interp.to_dict())


def test_bad_shapes_are_refused():
    q, c, ident = geometry([(0.1, 0.7)])
    with pytest.raises(ValueError, match="candidate_identity"):
        identity_leak(q, c, ident[:, :1], 0.6)
    with pytest.raises(ValueError, match="image_index"):
        identity_leak(q, c, ident, 0.6, image_index=np.array([5]), n_samples=2)


def test_identity_candidates_bring_every_face_of_the_shortlisted_identities():
    # identity 0 has many faces near the query: a top-3 face search would never see identity 1
    vecs = np.array([[0.1, 0], [0.12, 0], [0.14, 0], [0.16, 0], [0.5, 0], [0.9, 0]], np.float32)
    fid = np.array([0, 0, 0, 0, 1, 2])
    cands, ident, rows = identity_candidates(vecs, fid, np.array([[0, 1], [2, -1]]))
    assert cands.shape == (2, 5, 2) and ident[0].tolist() == [0, 0, 0, 0, 1] and rows[1].tolist() == [5, -1, -1, -1, -1]
    assert np.isnan(cands[1, 1:]).all()
    q = np.zeros((2, 2), np.float32)
    nb = nearest_identities(q, cands, ident, rows)
    assert nb.id2[0] == 1 and nb.d2[0] == pytest.approx(0.5) and nb.row1[0] == 0
    assert nb.id1[1] == 2 and np.isinf(nb.d2[1])
