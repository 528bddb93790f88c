"""The detector card: every detector's precision, recall and false-positive rate per kind of case.

:func:`measure_card` takes a labelled ground truth (:mod:`memtrack.card.cases`), builds a real
:class:`~memtrack.index.reference.ReferenceIndex` of its training images with the real embedders, and judges every
case image through :meth:`memtrack.scan.tracker.Tracker.assess` -- the embed -> search -> detect path of
``memtrack scan`` and ``memtrack check`` -- so the card describes the shipped detectors, not a copy of them.
Whatever detectors ``assess`` returns become rows: a detector registered tomorrow, or a variant of one,
appears without a change here.

Per detector x case type the card holds n, TP / FP / FN / TN, recall (TPR), false-positive rate and
precision, each with its 95% Wilson interval (``null`` where undefined: no positives, no negatives, nothing
flagged), and ``wrong_match``: flagged positives whose match is not the training image (or person) the
case reproduces. A detector that reports itself out of its regime (``applicable = False``) gets its reason
instead of numbers.

Which label a detector answers: ``identity_leak*`` -> ``identity_leak``, ``identity_interpolation*`` ->
``identity_interpolation``, everything else -> ``copy`` (:func:`register_card_label` overrides).
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from memtrack.card.cases import CASE_TYPES, LABELS, GroundTruth
from memtrack.config import Config, EmbedderSpec
from memtrack.detectors.metrics import wilson_interval
from memtrack.utils import json_safe

CARD_VERSION = 1
LABEL_DESCRIPTIONS = {
    "copy": "a reproduction of a training image (positive) or not (negative)",
    "identity_leak": "shows a training person, clearly that one person",
    "identity_interpolation": "blends two training people, dominated by neither",
}
NOT_MEASURED_REASONS = {
    "copy": "runs on feature spaces (clip, sscd, ...): memtrack ships no pretrained weights for them that could "
            "be measured offline, and CLIP with random weights would measure nothing",
}
_LABEL_PREFIXES: dict[str, str] = {"identity_interpolation": "identity_interpolation",
                                   "identity_leak": "identity_leak"}


def register_card_label(prefix: str, label: str) -> None:
    """Detectors whose name starts with ``prefix`` answer the ground-truth ``label`` (one of LABELS)."""
    if label not in LABELS:
        raise ValueError(f"label {label!r} is not one of {LABELS}")
    _LABEL_PREFIXES[prefix] = label


def label_of(detector: str) -> str:
    """The ground-truth label a detector's verdicts are scored against (longest matching prefix wins)."""
    hits = [p for p in _LABEL_PREFIXES if detector.startswith(p)]
    return _LABEL_PREFIXES[max(hits, key=len)] if hits else "copy"


def rate(count: int, n: int) -> dict | None:
    """``{"value", "ci_low", "ci_high", "count", "n"}`` with the 95% Wilson interval; None when n is 0."""
    if n == 0:
        return None
    low, high = wilson_interval(int(count), int(n))
    return {"value": count / n, "ci_low": low, "ci_high": high, "count": int(count), "n": int(n)}


def cell(tp: int, fp: int, fn: int, tn: int, wrong: int = 0) -> dict:
    """One detector x case-type entry of the card."""
    return {"n": tp + fp + fn + tn, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "wrong_match": wrong,
            "recall": rate(tp, tp + fn), "fpr": rate(fp, fp + tn), "precision": rate(tp, tp + fp)}


# ------------------------------------------------------------------------------------ measuring


def write_training_folder(gt: GroundTruth, folder: Path) -> Path:
    """The ground truth's training images as an ``imagefolder`` (PNGs + metadata with identities)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in gt.train:
        t.image.save(folder / t.name, format="PNG")
        row = {"file_name": t.name}
        if t.source.identity:
            row["identity"] = t.source.identity
        rows.append(row)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def measure_card(gt: GroundTruth, embedders: Sequence[EmbedderSpec], config: Config | None = None, *,
                 workdir: str | Path | None = None, batch_size: int = 64, images: str = "",
                 command: str | None = None) -> dict:
    """Build the index of ``gt.train``, judge every case through ``Tracker.assess``, return the card.

    Args:
        gt: the labelled ground truth.
        embedders: the index's spaces (e.g. pixel at the working resolution, face).
        config: detector thresholds and index settings (default: memtrack's defaults).
        workdir: where the training folder and index are written (default: a temporary folder).
        images: a sentence naming where the photographs came from (recorded in the card).
        command: the command line that produced the card (recorded in the card).
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="memtrack-card-") as tmp:
            return measure_card(gt, embedders, config, workdir=tmp, batch_size=batch_size, images=images,
                                command=command)
    from memtrack.data.dataset import read_dataset
    from memtrack.embedders.registry import get_embedder
    from memtrack.index.reference import ReferenceIndex

    cfg = copy.deepcopy(config) if config is not None else Config()  # the caller's config is left as it was
    cfg.index.embedders = list(embedders)
    work = Path(workdir)
    ds = read_dataset(write_training_folder(gt, work / "train"), cfg.data, show_progress=False)
    embs = [get_embedder(s) for s in cfg.index.embedders]
    ref = ReferenceIndex.build(ds, embs, work / "ref", cfg, overwrite=True)
    return judge_card(gt, ref, embs, cfg, batch_size=batch_size, images=images, command=command)


def judge_card(gt: GroundTruth, ref, embedders: Sequence, config: Config, *, batch_size: int = 64,
               images: str = "", command: str | None = None, scope: str = "benchmark") -> dict:
    """The card of ``gt``'s cases judged against the index ``ref`` (whose training images include ``gt.train``)."""
    from memtrack.scan.tracker import Tracker, thresholds_block

    tracker = Tracker(ref, list(embedders), config)
    verdicts, outputs_seen = _judge(tracker, gt, ref.train_ids, batch_size)
    card = {"card_version": CARD_VERSION, "memtrack_version": _version(), "command": command, "scope": scope,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "setup": _setup(gt, ref, config, images), "labels": dict(LABEL_DESCRIPTIONS),
            "cases": _cases_block(gt), "detectors": {}, "not_measured": {}}
    thresholds = thresholds_block(list(outputs_seen.values()), config)
    for name, out in outputs_seen.items():
        card["detectors"][name] = _detector_entry(name, out, thresholds.get(name, {}), gt, verdicts[name])
    card["not_measured"] = not_measured(card["detectors"], list(ref.spaces))
    return json_safe(card)


def _judge(tracker, gt: GroundTruth, train_ids: list, batch_size: int) -> tuple[dict, dict]:
    """Per detector: ``[(flagged, right_match, judged)]`` per case, and the detector's last output (for metadata)."""
    verdicts: dict[str, list] = {}
    last: dict = {}
    for start in range(0, len(gt.cases), batch_size):
        batch = gt.cases[start:start + batch_size]
        for out in tracker.assess([c.image for c in batch]):
            rows = verdicts.setdefault(out.name, [])
            applicable = bool(getattr(out, "applicable", True))
            if not applicable or out.name not in last:
                last[out.name] = out
            judged = getattr(out, "judged", None)
            for j, case in enumerate(batch):
                flagged = applicable and bool(np.asarray(out.flagged)[j])
                seen = judged is None or bool(np.asarray(judged)[j])
                rows.append((flagged, right_match(out, j, case, train_ids), seen))
    return verdicts, last


def right_match(out, j: int, case, train_ids: list) -> bool:
    """Whether sample ``j``'s match names what ``case`` reproduces (its training image, person or pair)."""
    label = label_of(out.name)
    if label == "identity_leak":
        names = out.extra.get("identity_name")
        return names is not None and names[j] in case.identities
    if label == "identity_interpolation":
        a, b = out.extra.get("identity_a_name"), out.extra.get("identity_b_name")
        return a is not None and b is not None and {a[j], b[j]} == set(case.identities)
    row = int(np.asarray(out.match)[j])
    return 0 <= row < len(train_ids) and train_ids[row] in case.targets


def _detector_entry(name: str, out, threshold: dict, gt: GroundTruth, verdicts: list) -> dict:
    label = label_of(name)
    entry = {"label": label, "threshold": threshold.get("value"), "direction": threshold.get("direction"),
             "threshold_source": threshold.get("source"), "citation": threshold.get("citation"),
             "applicable": bool(getattr(out, "applicable", True)), "reason": getattr(out, "reason", None),
             "cases": {}}
    if not entry["applicable"]:
        entry["cases"] = {k: {"applicable": False, "reason": entry["reason"]} for k in gt.case_types}
        entry["all"] = {"applicable": False, "reason": entry["reason"]}
        return entry
    totals, not_judged_total = np.zeros(5, np.int64), 0
    for kind in gt.case_types:
        counts = np.zeros(5, np.int64)  # tp, fp, fn, tn, wrong
        unjudged = 0  # samples the detector gave no verdict (counted as not flagged, and said)
        for case, (flagged, right, judged) in zip(gt.cases, verdicts):
            if case.kind == kind:
                truth = bool(case.labels[label])
                counts += _confusion(truth, flagged, right)
                unjudged += not judged
        entry["cases"][kind] = {**cell(*map(int, counts)), **({"not_judged": unjudged} if unjudged else {})}
        not_judged_total += unjudged
        totals += counts
    entry["all"] = {**cell(*map(int, totals)), **({"not_judged": not_judged_total} if not_judged_total else {})}
    return entry


def _confusion(truth: bool, flagged: bool, right: bool) -> np.ndarray:
    return np.array([truth and flagged, flagged and not truth, truth and not flagged,
                     not truth and not flagged, truth and flagged and not right], np.int64)


def not_measured(detectors: dict, spaces: Sequence[str]) -> dict:
    """Registered detectors with no row in the card, and why (their embedding space was not indexed)."""
    from memtrack.detectors.registry import list_detectors

    out = {}
    for name in list_detectors():
        if name in detectors or any(d.endswith(f"_{name}") for d in detectors):
            continue
        out[name] = NOT_MEASURED_REASONS.get(
            name, f"its embedding space was not in the card's index (spaces: {', '.join(spaces)})")
    return out


def _setup(gt: GroundTruth, ref, cfg: Config, images: str) -> dict:
    identities = sorted({t.source.identity for t in gt.train if t.source.identity})
    spaces = {n: {k: v for k, v in sp.items() if k != "search_params"} for n, sp in ref.summary()["spaces"].items()}
    return {"resolution": gt.resolution, "n_train": ref.n_train, "n_sources": len(gt.train),
            "n_duplicated": sum(t.duplicate_of is not None for t in gt.train),
            "n_faces": sum(t.source.identity is not None for t in gt.train), "identities": identities,
            "n_cases": len(gt.cases), "seed": gt.seed, "images": images,
            "embedders": [{"name": n, "options": dict(sp.info.get("options", {}))} for n, sp in ref.spaces.items()],
            "spaces": spaces, "detectors_config": cfg.to_dict()["detectors"], "index_k": cfg.index.k}


def _cases_block(gt: GroundTruth) -> dict:
    out = {}
    for kind in gt.case_types:
        cases = [c for c in gt.cases if c.kind == kind]
        out[kind] = {"description": CASE_TYPES[kind].description, "n": len(cases),
                     "positives": {lab: sum(bool(c.labels[lab]) for c in cases) for lab in LABELS}}
    return out


def _version() -> str:
    from memtrack import __version__

    return __version__


# ------------------------------------------------------------------------------------ a user's own index

INDEX_CARD = "detector_card.json"      # the card of an index, in its folder (``memtrack index build --card``)
INDEX_CARD_IMAGES = 16
INDEX_CASE_TYPES = ("exact", "hflip", "crop_center", "crop_offset", "shift_2px", "jpeg_q75", "noise_0.05", "jitter",
                    "blend", "face_augmented", "morph")


def record_identities(ref) -> dict[int, str]:
    """Training-record row -> identity name of its best face, from the index's face space (empty without one)."""
    if "face" not in ref.spaces or "identity" not in ref.manifest:
        return {}
    names = ref.manifest["identity"].get("names", [])
    ids = ref.space_array("face", "identity")
    out: dict[int, str] = {}
    for row, ident in zip(np.asarray(ref.spaces["face"].rows).tolist(), np.asarray(ids).tolist()):
        if 0 <= ident < len(names):
            out.setdefault(int(row), str(names[ident]))
    return out


def pick_records(n_train: int, identities: dict[int, str], max_images: int) -> list[int]:
    """Up to ``max_images`` rows: faces first (round-robin over identities, at most half), then the rest
    evenly spaced through the training set."""
    by_person: dict[str, list[int]] = {}
    for row, name in sorted(identities.items()):
        by_person.setdefault(name, []).append(row)
    faces: list[int] = []
    queues = [list(v) for v in by_person.values()]
    while queues and len(faces) < max_images // 2:
        queues = [q for q in queues if q]
        for q in queues:
            if q and len(faces) < max_images // 2:
                faces.append(q.pop(0))
    rest = [r for r in range(n_train) if r not in identities]
    take = max_images - len(faces)
    if take > 0 and rest:
        rest = [rest[int(i)] for i in np.unique(np.linspace(0, len(rest) - 1, min(take, len(rest))).round())]
    return faces + rest[:max(0, take)]


def index_card(ref, config: Config | None = None, *, max_images: int = INDEX_CARD_IMAGES,
               case_types: Sequence[str] = INDEX_CASE_TYPES, seed: int = 0) -> dict:
    """A card measured on the index's own training images, judged against the index itself.

    Up to ``max_images`` training images (faces first) are turned into the cases of ``case_types``; every
    case is judged by the index's embedders and the detectors, as a scan would judge a generated image.
    What it cannot hold: duplicated images and novel images (no held-out set is known), so its negatives
    are blends (and morphs for the copy detectors). Cost: about ``max_images x len(case_types)`` images
    through ``Tracker.assess``.
    """
    from memtrack.data.dataset import open_image
    from memtrack.scan.tracker import embedders_for
    from memtrack.card.cases import Source, ground_truth

    cfg = config or Config()
    identities = record_identities(ref)
    rows = pick_records(ref.n_train, identities, max_images)
    sources = [Source(Path(ref.records[r].id).stem, open_image(ref.records[r].path), identities.get(r),
                      ref.records[r].id) for r in rows]
    embedders = embedders_for(ref, Config())
    pixel = next((e for e in embedders if e.pixel_space), None)
    res = int(pixel.options.resolution) if pixel is not None else 64
    # the cases are made from the training images as the index's pixel space sees them (its own transform)
    prepare = pixel.canonical if pixel is not None else None
    gt = ground_truth(sources, resolution=res, duplicates=0, case_types=list(case_types), seed=seed, prepare=prepare)
    return judge_card(gt, ref, embedders, cfg, scope="index",
                      images=f"{len(sources)} of this index's {ref.n_train} training images "
                             f"({sum(s.identity is not None for s in sources)} faces)",
                      command="memtrack index build ... --card")


def read_index_card(path: str | Path) -> dict | None:
    """The card stored in an index folder, or None when there is none (or it cannot be read)."""
    try:
        card = json.loads((Path(path) / INDEX_CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and isinstance(card.get("detectors"), dict) else None
