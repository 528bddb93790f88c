"""The identity space of the reference index, and the evidence the identity detectors need at scan time.

At build time (:func:`build_identity`): the training faces get identities -- the metadata's ``identity``
label for each image's most confident face, clustering at the verification threshold for the rest -- and
the verification threshold is calibrated on the labelled genuine / impostor pairs (or the model's published
threshold is used, with the reason). Both are stored with the index.

At scan time (:func:`face_evidence`): every face of every sample is embedded; its candidate identities are
shortlisted (the identities of its top-k training faces plus the nearest identity centroids) and compared
against *all* faces of those identities, so a well-represented identity cannot crowd the second identity of
a blend out of a top-k list. The detectors themselves are :func:`memtrack.identity.detect.identity_leak` and
:func:`memtrack.identity.detect.identity_interpolation`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from memtrack.config import Config
from memtrack.detectors.types import DetectorSpec, Provenance
from memtrack.detectors.types import DetectorOutput, SpaceEvidence
from memtrack.identity.detect import calibrate_threshold, identity_candidates, identity_groups, identity_interpolation, identity_leak
from memtrack.utils import get_logger

logger = get_logger(__name__)

CENTROID_SHORTLIST = 3


def select_faces(records: Sequence, rows: np.ndarray, embedder) -> np.ndarray:
    """Which embedded training faces to index (a boolean mask over ``rows``).

    With ``align: assume_aligned`` every image is taken as an aligned face chip. When the training set
    labels identities, only the labelled images are faces: a mixed set (faces and scenes) marks its faces
    with the ``identity`` column, and a scene taken as a "face" would form a fake identity. Without any
    label every image is a face (a CelebA/FFHQ-style crop set) and identities come from clustering.
    """
    if getattr(embedder.options, "align", "detect") != "assume_aligned":
        return np.ones(len(rows), bool)
    labelled = np.array([bool(r.identity) for r in records], bool)
    if not labelled.any():
        return np.ones(len(rows), bool)
    return labelled[rows] if len(rows) else np.zeros(0, bool)


def build_identity(records: Sequence, vectors: np.ndarray, rows: np.ndarray, embedder, config: Config
                   ) -> tuple[dict, dict]:
    """Identities and the calibrated threshold of the training faces.

    Returns ``(arrays, meta)``: arrays ``identity`` (per face) and ``centroids`` (per identity) to save
    beside the index, and the manifest block ``{"groups", "names", "calibration"}``.
    """
    labels: list = [None] * len(vectors)
    seen: set[int] = set()
    for i, row in enumerate(rows.tolist()):  # faces come best-first per image: label the first one
        if row not in seen:
            seen.add(row)
            labels[i] = records[row].identity
    published = float(embedder.published_threshold)
    groups = identity_groups(vectors, labels, published, metric=embedder.metric)
    cal = calibrate_threshold(vectors, groups, published, far=config.detectors.identity_far)
    if cal.warning:
        logger.warning("identity threshold: %s", cal.warning)
    meta = {"groups": groups.to_dict(), "names": list(groups.names), "calibration": cal.to_dict(distributions=True)}
    return {"identity": groups.face_identity, "centroids": groups.centroids}, meta


def identity_threshold(index, config: Config) -> tuple[float, str]:
    """The verification threshold to use and its source: config override > calibrated > published."""
    if config.detectors.identity_threshold is not None:
        return float(config.detectors.identity_threshold), "config"
    cal = index.manifest.get("identity", {}).get("calibration", {})
    if "threshold" not in cal:
        raise ValueError("the index has no identity calibration")
    return float(cal["threshold"]), cal.get("source", "published")


def face_evidence(index, embedder, images: Sequence, config: Config) -> SpaceEvidence:
    """Embed every face of ``images`` and gather each face's candidate identities with all their faces."""
    space = index.spaces[embedder.name]
    fb = embedder.embed_faces(list(images))
    q = np.asarray(fb.vectors, np.float32)
    face_identity = index.space_array(embedder.name, "identity")
    centroids = index.space_array(embedder.name, "centroids")
    if len(q) and space.index.ntotal:
        k = min(config.index.k, space.index.ntotal)
        _, ids = index.search(embedder.name, q, k)
        near_ids = np.where(ids >= 0, face_identity[np.clip(ids, 0, None)], -1)
        d_cent = np.sqrt(((q[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1))
        near_cent = np.argsort(d_cent, axis=1)[:, :CENTROID_SHORTLIST]
        shortlist = np.concatenate([near_ids, near_cent], axis=1)
        cands, cand_identity, cand_rows = identity_candidates(np.asarray(space.vectors), face_identity, shortlist)
    else:
        cands = np.zeros((len(q), 0, space.dim), np.float32)
        cand_identity = cand_rows = np.zeros((len(q), 0), np.int64)
    threshold, source = identity_threshold(index, config)
    return SpaceEvidence(embedder.metric, q, cand_rows, cands, None,
                         extra={"candidate_identity": cand_identity, "image_index": fb.image_index,
                                "n_samples": len(images), "threshold": threshold, "threshold_source": source,
                                "names": index.manifest["identity"]["names"], "face_rows": space.rows})


def _finish(out: DetectorOutput, ev: SpaceEvidence, pair: bool) -> DetectorOutput:
    """Map face rows to training-record rows and identity ids to names; note the threshold's source."""
    x = ev.extra
    rows, names = x["face_rows"], x["names"]
    to_record = lambda a: np.where(a >= 0, rows[np.clip(a, 0, None)], -1) if len(rows) else a  # noqa: E731
    out.match = to_record(np.asarray(out.match, np.int64))
    name = lambda a: np.array([names[i] if i >= 0 else None for i in np.asarray(a, np.int64)], dtype=object)  # noqa: E731
    if pair:
        out.extra["match_b"] = to_record(np.asarray(out.extra["match_b"], np.int64))
        out.extra["identity_a_name"] = name(out.extra["identity_a"])
        out.extra["identity_b_name"] = name(out.extra["identity_b"])
    else:
        out.extra["identity_name"] = name(out.extra["identity"])
    out.threshold_source = x["threshold_source"]
    return out


def _leak(space: str, ev: SpaceEvidence, cfg) -> DetectorOutput:
    x = ev.extra
    out = identity_leak(ev.query, ev.cand_vecs, x["candidate_identity"], x["threshold"], cfg.identity_ratio,
                        candidate_ids=ev.cand_ids, image_index=x["image_index"], n_samples=x["n_samples"])
    return _finish(out, ev, pair=False)


def _interpolation(space: str, ev: SpaceEvidence, cfg) -> DetectorOutput:
    x = ev.extra
    out = identity_interpolation(ev.query, ev.cand_vecs, x["candidate_identity"], x["threshold"],
                                 cfg.identity_ratio, candidate_ids=ev.cand_ids, image_index=x["image_index"],
                                 n_samples=x["n_samples"])
    out.extra["verification_threshold_source"] = np.full(len(out.score), x["threshold_source"], dtype=object)
    return _finish(out, ev, pair=True)


LEAK_CITE = ("verification threshold of the face model (dlib: 0.6) or calibrated at the target false-match rate; "
             "Tinsley et al. 2021, Otroshi Shahreza & Marcel 2024")
INTERP_CITE = ("both identities verified (MMPMR, Scherhag et al. 2017) and d1/d2 > r (Gu et al. 2023's ratio over "
               "identities); r is memtrack's choice")


def _leak_source(space: str, cfg, out: DetectorOutput):
    """identity_leak's threshold is the verification threshold: config > calibrated > published."""
    return None if not out.applicable else (out.threshold_source, "")


def _interp_detail(space: str, cfg, out: DetectorOutput):
    if not out.applicable:
        return None
    src = out.extra.get("verification_threshold_source")
    verify = f"; the verification threshold is {src[0]}" if src is not None and len(src) else ""
    if abs(cfg.identity_ratio - 0.6) > 1e-12:
        return "config", f"set in the config: detectors.identity_ratio = {cfg.identity_ratio!r}{verify}"
    return "memtrack", ("0.6 sits between copies (<= 0.38 on the identity ratio) and balanced morphs (>= 0.74) "
                        "measured with dlib" + verify)


IDENTITY_DETECTORS: list[DetectorSpec] = []  # registered by memtrack.detectors.registry


def _declare(*args, **kwargs) -> None:
    IDENTITY_DETECTORS.append(DetectorSpec(*args, **kwargs))


_declare("identity_leak", "face", _leak,
                  "a generated face within the verification threshold of a training identity it clearly belongs to",
                  citation=LEAK_CITE, provenance=Provenance("published", (), LEAK_CITE, resolve=_leak_source),
                  regime="generated faces found by the face detector; calibration needs >= 10 labelled identities",
         label="identity leakage")
_declare("identity_interpolation", "face", _interpolation,
                  "a generated face accepted as two training identities, dominated by neither (d1/d2 > r)",
                  citation=INTERP_CITE,
                  provenance=Provenance("memtrack", ("identity_ratio",), INTERP_CITE, resolve=_interp_detail),
                  regime="generated faces found by the face detector, two or more training identities",
         label="identity blending")
