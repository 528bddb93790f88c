"""Identities: who is in the training set, how close counts as "the same person", and the two identity
detectors (issue 4, parts 2-4). Pure functions: arrays in, records out; no model code, no files.

**Distances.** Euclidean between face vectors as the ``face`` embedder returns them: raw dlib descriptors
(same person below 0.6), unit rows for ArcFace / FaceNet (``d = sqrt(2 - 2 cos)``). The distance from a face
to an *identity* is the distance to that identity's **nearest training face**, not to its centroid:

* thresholds -- published or calibrated -- are defined on face-to-face pairs, and a centroid is not a face:
  with two identities of six faces each (dlib), held-out copies lay 0.07-0.24 from their identity's nearest
  face and 0.10-0.24 from its centroid, but the *other* person lay 0.63-0.70 from the nearest face and only
  0.58-0.70 from the centroid (averaging pulls centroids towards everyone): the genuine/impostor gap shrank
  from 0.39 to 0.34;
* an exact copy of a training face is at distance 0, and the nearest face names the training image to show
  beside the sample in the report.
Centroids are still computed (:class:`IdentityGroups`) to summarise identities and to shortlist candidate
identities in a large index; the verdicts use nearest faces.

**The detectors**, per generated face with nearest identity A at ``d1`` and second-nearest identity B at
``d2`` (``d1 <= d2``; ``d2 = inf`` when the candidates hold one identity), threshold ``tau`` and ratio ``r``:

* ``identity_interpolation``: ``d2 < tau`` (a face matcher accepts the face as A *and* as B -- the
  criterion of morphing-attack studies, Scherhag et al. 2017 "Biometric Systems under Morphing Attacks",
  MMPMR) **and** ``d1 / d2 > r`` (neither identity dominates -- Gu et al. 2023's nearest/second-nearest
  ratio, taken over identities instead of images). Default ``r = 0.6``.
* ``identity_leak``: ``d1 < tau`` and not an interpolation: the face is verified as A, and A dominates.

Measured with dlib: aligned 150-px chips of the astronaut (A) and Grace Hopper (H), 0.70 apart; morphs are
the chips blended in pixel space (share of A first); tau = 0.6, r = 0.6:

    face                                d(A)       d(H)       d1/d2       label
    copies (crop, rotation, flip,       0.06-0.24 from the source,        0.10-0.38   leak of the source
      brightness, 0.4-1x scale)         0.63-0.71 from the other
    morph 80/20                         0.27       0.61       0.43        leak of A (H not matched)
    morph 65/35                         0.43       0.52       0.82        interpolation
    morph 60/40                         0.49       0.50       0.98        interpolation
    morph 50/50                         0.59       0.44       0.74        interpolation
    morph 40/60                         0.63       0.33       0.53        leak of H
    morph 35/65                         0.64       0.29       0.45        leak of H
    morph 20/80                         0.67       0.16       0.24        leak of H

A 20/80 morph is labelled a leak of the 80% identity: it lies 0.16 from her -- inside the range of her own
augmented copies -- and 0.67 from the other person, about as far as the two people are from each other, so
no face matcher can tell it from a copy of her. The ratio ``r = 0.6`` sits in the gap between copies
(<= 0.38) and balanced morphs (>= 0.74); it also decides when both people are matched but one dominates
(80/20 against six faces per person: 0.27 / 0.58, ratio 0.46 -> a leak of A). A morph is an
interpolation only when both people are matched: with a calibrated threshold stricter than 0.59 the 50/50
morph above is matched to Hopper alone and becomes a leak of Hopper -- the report names the threshold used.
The morphs lie far off the straight segment between the two embeddings (residual 0.37 at 50/50), which is
why no segment test is used.

**Per sample.** A generated image may hold several faces; a sample is flagged when any of its faces is, and
its score and match come from the deciding face (see :func:`identity_leak`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from memtrack.detectors.types import DetectorOutput
from memtrack.identity.calibration import Calibration, calibrate_threshold  # noqa: F401  (re-exported)

_BLOCK = 1024


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[len(a), len(b)]`` as explicit differences in float64 (a copy is exactly 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.empty((len(a), len(b)))
    step = max(1, 2 ** 22 // max(1, len(b) * a.shape[1]))
    for s in range(0, len(a), step):
        out[s:s + step] = np.sqrt(((a[s:s + step, None] - b[None]) ** 2).sum(-1))
    return out


# ------------------------------------------------------------------------------------ groups


@dataclass
class IdentityGroups:
    """The training set's identities.

    Attributes:
        names: identity names (labels; ``cluster-<k>`` for identities found by clustering).
        face_identity: ``int64 [m]`` identity of every training face (index into ``names``).
        centroids: ``float32 [g, d]`` per-identity mean (re-normalised for cosine spaces).
        counts: ``int64 [g]`` faces per identity.
        source: ``labels`` | ``clustering`` | ``labels+clustering`` (unlabelled faces clustered).
        labelled: ``bool [g]`` whether each identity came from a label.
        threshold: the distance threshold used for clustering (None when none was needed).
    """

    names: list
    face_identity: np.ndarray
    centroids: np.ndarray
    counts: np.ndarray
    source: str
    labelled: np.ndarray
    threshold: Optional[float] = None

    def to_dict(self) -> dict:
        return {"source": self.source, "threshold": self.threshold, "n_identities": len(self.names),
                "identities": [{"name": n, "faces": int(c), "labelled": bool(lab)}
                               for n, c, lab in zip(self.names, self.counts, self.labelled)]}


def cluster_faces(vectors: np.ndarray, threshold: float, *, neighbours: tuple | None = None, seed: int = 0,
                  max_iter: int = 100) -> np.ndarray:
    """Cluster faces into identities: Chinese whispers (Biemann 2006) on the graph "closer than threshold".

    The algorithm dlib's face-clustering example uses: every face starts as its own cluster and repeatedly
    takes the label most common among its neighbours, so a chain of look-alikes does not merge two groups
    the way single linkage (connected components) does.

    Args:
        vectors: ``[m, d]`` face vectors.
        threshold: faces closer than this are linked (the verification threshold).
        neighbours: optional ``(ids [m, k], dists [m, k])`` from a k-NN index (-1 ids ignored); without it
            all pairwise distances are computed (O(m^2): about 15 s for 20k faces on two cores).
        seed: the visiting order's seed (the result is deterministic for a seed).

    Returns:
        ``int64 [m]`` cluster ids 0..g-1, numbered by first appearance.
    """
    v = np.asarray(vectors, np.float64)
    m = len(v)
    if neighbours is None:
        adj, sq = [], (v ** 2).sum(1)
        for s in range(0, m, _BLOCK):  # BLAS expansion: speed matters here, exactness at the edges does not
            d = np.sqrt(np.maximum(sq[s:s + _BLOCK, None] + sq[None] - 2 * v[s:s + _BLOCK] @ v.T, 0))
            adj.extend(np.nonzero((d[i] < threshold) & (np.arange(m) != s + i))[0] for i in range(len(d)))
    else:
        ids, dists = (np.asarray(x) for x in neighbours)
        adj_sets = [set() for _ in range(m)]
        for i, j in zip(*np.nonzero((dists < threshold) & (ids >= 0))):
            j = int(ids[i, j])
            if j != i:
                adj_sets[i].add(j), adj_sets[j].add(i)
        adj = [np.fromiter(sorted(a), np.int64, len(a)) for a in adj_sets]
    labels = np.arange(m)
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = 0
        for i in rng.permutation(m):
            if len(adj[i]) == 0:
                continue
            lab, cnt = np.unique(labels[adj[i]], return_counts=True)
            best = lab[cnt == cnt.max()].min()
            if best != labels[i]:
                labels[i], changed = best, changed + 1
        if not changed:
            break
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # renumber by first appearance
    return order[inverse].astype(np.int64)


def identity_groups(vectors: np.ndarray, labels: Sequence[Optional[str]] | None = None,
                    threshold: float | None = None, *, metric: str = "l2", neighbours: tuple | None = None,
                    seed: int = 0) -> IdentityGroups:
    """Group training faces into identities: by label, else by clustering at ``threshold``.

    Faces with a label (``labels[i]`` not None/empty) take it; faces without one are clustered among
    themselves (:func:`cluster_faces`) and named ``cluster-<k>``; ``source`` says which happened. A cluster
    may be the same person as a labelled identity -- they are not merged.

    Example:
        >>> g = identity_groups(vecs, labels=["ada", "ada", None], threshold=0.6)
        >>> g.source, g.names, g.counts
        ('labels+clustering', ['ada', 'cluster-0'], array([2, 1]))
    """
    v = np.asarray(vectors, np.float32)
    m = len(v)
    if labels is not None and len(labels) != m:
        raise ValueError(f"labels must have one entry per face ({m}), got {len(labels)}")
    lab = [None if (labels is None or labels[i] in (None, "")) else str(labels[i]) for i in range(m)]
    names = sorted({x for x in lab if x is not None})
    where = {x: i for i, x in enumerate(names)}
    ids = np.array([where[x] if x is not None else -1 for x in lab], dtype=np.int64).reshape(m)
    free = np.nonzero(ids < 0)[0]
    n_labelled = len(names)
    if len(free):
        if threshold is None:
            raise ValueError("unlabelled faces need a clustering threshold (the verification threshold)")
        clusters = cluster_faces(v[free], threshold, neighbours=_sub_neighbours(neighbours, free), seed=seed)
        taken = set(names)
        for k in range(int(clusters.max()) + 1):
            name = f"cluster-{k}"
            while name in taken:
                name = "_" + name
            names.append(name)
        ids[free] = n_labelled + clusters
    source = "labels" if not len(free) else ("clustering" if n_labelled == 0 else "labels+clustering")
    g = len(names)
    counts = np.bincount(ids, minlength=g).astype(np.int64)
    cent = np.zeros((g, v.shape[1] if v.ndim == 2 else 0), np.float64)
    np.add.at(cent, ids, v.astype(np.float64))
    cent /= np.maximum(counts, 1)[:, None]
    if metric == "cosine":
        cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    return IdentityGroups(names, ids, cent.astype(np.float32), counts, source,
                          np.arange(g) < n_labelled, threshold if len(free) else None)


def _sub_neighbours(neighbours: tuple | None, keep: np.ndarray) -> tuple | None:
    """Restrict a k-NN graph over all faces to the ``keep`` subset, renumbered."""
    if neighbours is None:
        return None
    ids, dists = (np.asarray(x) for x in neighbours)
    remap = np.full(len(ids), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    sub = np.where(ids >= 0, remap[np.clip(ids, 0, None)], -1)[keep]
    return sub, dists[keep]


# ------------------------------------------------------------------------------------ detectors


@dataclass
class IdentityNeighbours:
    """Per generated face: its nearest identity (``id1`` at ``d1``, via training face ``row1``) and the
    nearest *other* identity (``id2`` at ``d2``, ``row2``). ``-1`` / ``inf`` when there is none."""

    d1: np.ndarray
    d2: np.ndarray
    id1: np.ndarray
    id2: np.ndarray
    row1: np.ndarray
    row2: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return self.id1 >= 0

    @property
    def ratio(self) -> np.ndarray:
        """``d1 / d2``: 0 with a single identity (d2 = inf), 1 when both are at distance 0."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(self.d2 > 0, self.d1 / np.where(self.d2 > 0, self.d2, 1.0), 1.0)
        return np.where(np.isfinite(self.d2), r, 0.0)


def nearest_identities(query: np.ndarray, candidates: np.ndarray, candidate_identity: np.ndarray,
                       candidate_ids: np.ndarray | None = None) -> IdentityNeighbours:
    """Nearest and second-nearest identity of each face, from its k candidate training faces.

    Args:
        query: ``[m, d]`` generated faces (rows of NaN = no face, e.g. from ``FaceEmbedder.embed``).
        candidates: ``[m, k, d]`` candidate training faces from the index.
        candidate_identity: ``[m, k]`` identity of each candidate (``groups.face_identity[ids]``; -1 = none).
        candidate_ids: ``[m, k]`` training face rows of the candidates (reported as row1 / row2).

    The candidates must span at least two identities for ``d2`` to be finite: search the index with k larger
    than the biggest identity's face count, or shortlist identities by centroid and pass their faces.
    """
    q, c = np.asarray(query, np.float64), np.asarray(candidates, np.float64)
    ident = np.asarray(candidate_identity, np.int64)
    if c.ndim != 3 or c.shape[0] != q.shape[0] or c.shape[2] != q.shape[1] or ident.shape != c.shape[:2]:
        raise ValueError(f"expected query [m, d], candidates [m, k, d], candidate_identity [m, k]; got "
                         f"{q.shape}, {c.shape}, {ident.shape}")
    m, k = ident.shape
    d = np.sqrt(((c - q[:, None]) ** 2).sum(-1)) if m else np.zeros((0, k))
    d = np.where((ident >= 0) & np.isfinite(d), d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    ds, ids = np.take_along_axis(d, order, 1), np.take_along_axis(ident, order, 1)
    rows = order if candidate_ids is None else np.take_along_axis(np.asarray(candidate_ids, np.int64), order, 1)
    ar = np.arange(m)
    ok1 = np.isfinite(ds[:, 0]) if k else np.zeros(m, bool)
    other = (ids != ids[:, :1]) & np.isfinite(ds)
    j2 = np.argmax(other, axis=1) if k else np.zeros(m, np.int64)
    ok2 = other[ar, j2] if k else np.zeros(m, bool)
    pick = lambda a, j, ok, fill: np.where(ok, a[ar, j], fill) if k else np.full(m, fill)  # noqa: E731
    return IdentityNeighbours(pick(ds, 0, ok1, np.inf), pick(ds, j2, ok2, np.inf), pick(ids, 0, ok1, -1),
                              pick(ids, j2, ok2, -1), pick(rows, 0, ok1, -1), pick(rows, j2, ok2, -1))


def identity_candidates(face_vectors: np.ndarray, face_identity: np.ndarray,
                        shortlist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every training face of each query's shortlisted identities: the exact input of the detectors.

    A top-k face search can return k faces of one well-represented identity and miss the second identity
    that makes a face an interpolation. Shortlist identities instead (e.g. the few nearest centroids plus
    the identities of the top-k faces) and compare against all of their faces.

    Args:
        face_vectors: ``[N, d]`` training faces; face_identity: ``[N]`` their identities.
        shortlist: ``[m, j]`` identity ids per query (-1 = unused slot).

    Returns:
        ``candidates [m, K, d]`` (NaN padding), ``candidate_identity [m, K]`` and ``candidate_ids [m, K]``
        (training face rows; -1 padding), for :func:`nearest_identities` and the detectors.
    """
    fv, fid = np.asarray(face_vectors), np.asarray(face_identity, np.int64)
    short = np.asarray(shortlist, np.int64).reshape(len(shortlist), -1)
    order = np.argsort(fid, kind="stable")
    bounds = np.searchsorted(fid[order], np.arange(int(fid.max(initial=-1)) + 2))
    members = [[order[bounds[g]:bounds[g + 1]] for g in dict.fromkeys(r) if 0 <= g < len(bounds) - 1]
               for r in short]
    rows = [np.concatenate(x) if x else np.zeros(0, np.int64) for x in members]
    k = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), k), -1, np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    cands = np.where((ids >= 0)[..., None], fv[np.clip(ids, 0, None)] if len(fv) else np.nan, np.nan)
    return cands, np.where(ids >= 0, fid[np.clip(ids, 0, None)] if len(fid) else -1, -1), ids


def classify_faces(nb: IdentityNeighbours, threshold: float, ratio: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Per face ``(leak, interpolation)`` verdicts, mutually exclusive (definitions in the module docstring)."""
    interp = nb.valid & (nb.d2 < threshold) & (nb.ratio > ratio)
    leak = nb.valid & (nb.d1 < threshold) & ~interp
    return leak, interp


def _decide(flag: np.ndarray, key: np.ndarray, fallback: np.ndarray, valid: np.ndarray,
            image_index: np.ndarray | None, n_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The deciding face of each sample (-1 if it has none) and the sample's face count.

    Flagged faces come first, ordered by ``key``; without one, the face with the smallest ``fallback``.
    """
    m = len(flag)
    img = np.arange(m) if image_index is None else np.asarray(image_index, np.int64)
    n = (m if image_index is None else (int(img.max()) + 1 if m else 0)) if n_samples is None else int(n_samples)
    if img.shape != (m,) or (m and (img.min() < 0 or img.max() >= n)):
        raise ValueError(f"image_index must be [m] with values in [0, {n}), got shape {img.shape}")
    faces = np.nonzero(valid)[0]
    order = faces[np.lexsort((np.where(flag, key, fallback)[faces], ~flag[faces], img[faces]))]
    chosen = np.full(n, -1, np.int64)
    samples, first = np.unique(img[order], return_index=True)
    chosen[samples] = order[first]
    return chosen, np.bincount(img[faces], minlength=n).astype(np.int64)


def _take(a: np.ndarray, chosen: np.ndarray, fill) -> np.ndarray:
    return np.where(chosen >= 0, a[np.clip(chosen, 0, None)] if len(a) else fill, fill)


def _identity_outputs(query, candidates, candidate_identity, threshold, ratio, candidate_ids, image_index,
                      n_samples):
    nb = nearest_identities(query, candidates, candidate_identity, candidate_ids)
    leak, interp = classify_faces(nb, threshold, ratio)
    return nb, leak, interp, lambda flag, key: _decide(flag, key, nb.d1, nb.valid, image_index, n_samples)


def identity_leak(query: np.ndarray, candidates: np.ndarray, candidate_identity: np.ndarray, threshold: float,
                  ratio: float = 0.6, *, candidate_ids: np.ndarray | None = None,
                  image_index: np.ndarray | None = None, n_samples: int | None = None) -> DetectorOutput:
    """A generated face within ``threshold`` of a training identity that it clearly belongs to.

    Per face: ``d1 < threshold`` (distance to the identity's nearest training face) and not an
    :func:`identity_interpolation`. Identity leakage from face generators: Tinsley et al. 2021 ("This face does
    not exist... but it might be yours!"); Otroshi Shahreza & Marcel 2024 (all six synthetic face datasets
    studied leak training identities). Thresholds: dlib 0.6 (published) or :func:`calibrate_threshold`.

    Per sample (``image_index [m]`` maps faces to ``n_samples`` samples; default one face per sample): flagged
    if any face is; ``score`` is the deciding face's d1 (the closest flagged face, else the closest face;
    NaN without faces), ``match`` its nearest training face row. ``extra``: ``identity`` (index into
    ``IdentityGroups.names``), ``second_identity``, ``d1``, ``d2``, ``ratio``, ``face`` (deciding face row),
    ``n_faces``.
    """
    nb, leak, _, decide = _identity_outputs(query, candidates, candidate_identity, threshold, ratio,
                                            candidate_ids, image_index, n_samples)
    chosen, n_faces = decide(leak, nb.d1)
    return DetectorOutput("identity_leak", _take(nb.d1, chosen, np.nan), _take(leak, chosen, False).astype(bool),
                          _take(nb.row1, chosen, -1), float(threshold), "below",
                          {"identity": _take(nb.id1, chosen, -1), "second_identity": _take(nb.id2, chosen, -1),
                           "d1": _take(nb.d1, chosen, np.nan), "d2": _take(nb.d2, chosen, np.nan),
                           "ratio": _take(nb.ratio, chosen, np.nan), "face": chosen, "n_faces": n_faces})


def identity_interpolation(query: np.ndarray, candidates: np.ndarray, candidate_identity: np.ndarray,
                           threshold: float, ratio: float = 0.6, *, candidate_ids: np.ndarray | None = None,
                           image_index: np.ndarray | None = None, n_samples: int | None = None) -> DetectorOutput:
    """A generated face that blends two training identities: close to both, clearly closer to neither.

    Per face: ``d2 < threshold`` -- verified as *both* its nearest identity A and its second-nearest B (the
    MMPMR criterion of morphing-attack research, Scherhag et al. 2017) -- and ``d1 / d2 > ratio`` (default 0.6;
    the identity-space analogue of Gu et al. 2023's d1/d2 test). Measured (dlib): augmented copies 0.10-0.38,
    50/50 to 65/35 pixel morphs 0.74-0.98; a 20/80 morph (0.67 / 0.16) is a leak of the 80% person.

    Per sample: flagged if any face is; ``score`` is the deciding face's ratio (the flagged face with the
    smallest d2, else the face closest to any identity; NaN without faces) with ``threshold = ratio``,
    ``direction = "above"``; ``match`` is A's nearest training face. ``extra``: ``identity_a``,
    ``identity_b``, ``match_b`` (B's nearest training face), ``d1``, ``d2``, ``verification_threshold``,
    ``face``, ``n_faces``.
    """
    nb, _, interp, decide = _identity_outputs(query, candidates, candidate_identity, threshold, ratio,
                                              candidate_ids, image_index, n_samples)
    chosen, n_faces = decide(interp, nb.d2)
    return DetectorOutput("identity_interpolation", _take(nb.ratio, chosen, np.nan),
                          _take(interp, chosen, False).astype(bool), _take(nb.row1, chosen, -1), float(ratio), "above",
                          {"identity_a": _take(nb.id1, chosen, -1), "identity_b": _take(nb.id2, chosen, -1),
                           "match_b": _take(nb.row2, chosen, -1), "d1": _take(nb.d1, chosen, np.nan),
                           "d2": _take(nb.d2, chosen, np.nan),
                           "verification_threshold": np.full(len(chosen), float(threshold)),
                           "face": chosen, "n_faces": n_faces})


__all__ = ["IdentityGroups", "identity_groups", "cluster_faces", "Calibration", "calibrate_threshold",
           "IdentityNeighbours", "nearest_identities", "identity_candidates", "classify_faces", "identity_leak",
           "identity_interpolation", "pairwise_distances"]
