"""Calibrating the identity verification threshold on the training set's own labelled faces.

A face matcher's published threshold (dlib 0.6, ...) was set on its benchmark's people and photographs.
:func:`calibrate_threshold` replaces it with the threshold at a target false-match rate on the training
set's labelled impostor pairs, and says when there are too few pairs to do so. Its inputs are the face
vectors and :class:`memtrack.identity.detect.IdentityGroups`; the detectors that use the threshold are in
:mod:`memtrack.identity.detect`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from memtrack.identity.detect import IdentityGroups


@dataclass
class Calibration:
    """The verification threshold and where it came from, with both distance distributions.

    Attributes:
        threshold: distance below which two faces are the same person (used by both detectors).
        source: ``calibrated`` (the training set's impostor pairs at ``far_target``) or ``published``.
        far, frr: false-match / false-non-match rates of ``threshold`` on these pairs (NaN without pairs).
        far_at_published, frr_at_published: the same for the published threshold.
        genuine, impostor: ``float64`` distances of the (possibly sampled) same / different identity pairs.
        warning: why the published threshold was used, or None.
    """

    threshold: float
    source: str
    published_threshold: float
    far_target: float
    far: float
    frr: float
    far_at_published: float
    frr_at_published: float
    n_identities: int
    genuine: np.ndarray = field(repr=False)
    impostor: np.ndarray = field(repr=False)
    warning: Optional[str] = None

    def to_dict(self, distributions: bool = False) -> dict:
        out = {k: getattr(self, k) for k in ("threshold", "source", "published_threshold", "far_target", "far",
                                             "frr", "far_at_published", "frr_at_published", "n_identities",
                                             "warning")}
        out.update(n_genuine_pairs=int(self.genuine.size), n_impostor_pairs=int(self.impostor.size))
        if distributions:
            out.update(genuine=self.genuine.tolist(), impostor=self.impostor.tolist())
        return out


def _sample_pairs(ids: np.ndarray, genuine: bool, max_pairs: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """All same- (or different-) identity pairs ``i < j``, or ``max_pairs`` of them drawn uniformly."""
    m = len(ids)
    order = np.argsort(ids, kind="stable")
    counts = np.bincount(ids) if m else np.zeros(0, np.int64)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    weight = counts * (counts - 1) / 2 if genuine else counts * (m - counts) / 2.0
    total = int(round(weight.sum()))
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if total <= max_pairs:  # enumerate
        if genuine:
            parts = [np.triu_indices(c, 1) for c in counts]
            i = np.concatenate([order[s + p[0]] for s, p in zip(start, parts)])
            j = np.concatenate([order[s + p[1]] for s, p in zip(start, parts)])
            return i, j
        i = np.concatenate([np.repeat(order[s:s + c], m - s - c) for s, c in zip(start, counts)])
        j = np.concatenate([np.tile(order[s + c:], c) for s, c in zip(start, counts)])
        return np.minimum(i, j), np.maximum(i, j)
    a = rng.choice(len(counts), size=max_pairs, p=weight / weight.sum())
    r1 = (rng.random(max_pairs) * counts[a]).astype(np.int64)
    if genuine:  # a second, different member of the same identity
        r2 = (rng.random(max_pairs) * (counts[a] - 1)).astype(np.int64)
        r2 += r2 >= r1
        return order[start[a] + r1], order[start[a] + r2]
    r2 = (rng.random(max_pairs) * (m - counts[a])).astype(np.int64)  # any face outside identity a
    r2 += np.where(r2 >= start[a], counts[a], 0)
    return order[start[a] + r1], order[r2]


def _pair_distances(v: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    out = np.empty(len(i))
    for s in range(0, len(i), 65536):
        d = v[i[s:s + 65536]].astype(np.float64) - v[j[s:s + 65536]]
        out[s:s + 65536] = np.sqrt((d ** 2).sum(1))
    return out


def calibrate_threshold(vectors: np.ndarray, groups: IdentityGroups, published_threshold: float, *,
                        far: float = 1e-3, min_impostor_pairs: int | None = None, min_genuine_pairs: int = 50,
                        min_identities: int = 10, max_pairs: int = 1_000_000, seed: int = 0) -> Calibration:
    """The verification threshold at a target false-match rate, from the training set's labelled faces.

    Genuine pairs are two faces of one labelled identity, impostor pairs faces of two (clustered identities
    are left out: they were formed *at* a threshold, so calibrating on them would be circular). The
    threshold is the ``floor(far * N)``-th smallest of the N impostor distances: at most ``far * N`` impostor
    pairs lie below it. Up to ``max_pairs`` pairs of each kind are used, drawn uniformly beyond that.

    "Too few" labelled pairs -- then ``published_threshold`` is used and ``warning`` says why -- means any of:
    fewer than ``min_impostor_pairs`` impostor pairs (default ``ceil(10 / far)``, 10,000 at 0.1%: about ten
    impostor pairs are then expected below the threshold, so the rate is estimated to within ~1/sqrt(10) =
    30%); fewer than ``min_genuine_pairs`` (50) genuine pairs (the false-non-match rate would mean nothing);
    or fewer than ``min_identities`` (10) labelled identities with faces (impostor pairs from a handful of
    people measure those people's resemblance, not the matcher's).

    Example:
        >>> cal = calibrate_threshold(train_vecs, groups, face.published_threshold, far=1e-3)
        >>> cal.threshold, cal.source, cal.warning
    """
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")
    min_imp = int(np.ceil(10.0 / far)) if min_impostor_pairs is None else int(min_impostor_pairs)
    v = np.asarray(vectors, np.float64)
    keep = np.nonzero(groups.labelled[groups.face_identity])[0] if len(v) else np.zeros(0, np.int64)
    _, ids = np.unique(groups.face_identity[keep], return_inverse=True)
    rng = np.random.default_rng(seed)
    gen = _pair_distances(v[keep], *_sample_pairs(ids, True, max_pairs, rng))
    imp = _pair_distances(v[keep], *_sample_pairs(ids, False, max_pairs, rng))
    n_ids = int(len(np.unique(ids)))

    def rates(t: float) -> tuple[float, float]:
        return (float((imp < t).mean()) if imp.size else float("nan"),
                float((gen >= t).mean()) if gen.size else float("nan"))

    problems = []
    if groups.source == "clustering":
        problems.append("identities come from clustering, not labels")
    if imp.size < min_imp:
        problems.append(f"{imp.size} impostor pairs < {min_imp} needed for a false-match rate of {far:g}")
    if gen.size < min_genuine_pairs:
        problems.append(f"{gen.size} genuine pairs < {min_genuine_pairs}")
    if n_ids < min_identities:
        problems.append(f"{n_ids} labelled identities < {min_identities}")
    if problems:
        t, source = float(published_threshold), "published"
        warning = "published threshold used: " + "; ".join(problems)
    else:
        t, source, warning = float(np.sort(imp)[int(np.floor(far * imp.size))]), "calibrated", None
    return Calibration(t, source, float(published_threshold), far, *rates(t), *rates(float(published_threshold)),
                       n_ids, gen, imp, warning)
