"""The content hash of a reference index: everything about the reference that a verdict depends on.

A stored verdict (``nn_ratio`` of a checkpoint, say) was computed against one reference. Adding images
(``index build --add``) or rebuilding the folder from other images keeps the path and the embedders'
fingerprints but changes the answer, so the evaluation key holds this hash instead of the path.

What is hashed (sha256, in this order; see :func:`content_hash`):

1. every training record's ``id``, ``sha256``, ``caption`` and ``identity`` (ids name the matches; captions
   and identities feed prompts and the identity detectors) -- not its path, so a moved dataset that is
   rebuilt unchanged keeps its hash;
2. per space, by name: the manifest fields in :data:`SPACE_FIELDS` (the embedder's fingerprint, which
   holds the training transform, the storage, the faiss index and its search parameters -- which decide
   the candidates a search returns), then the stored vectors and their record rows, byte for byte;
3. the train->train baselines' summaries (what thresholds calibrated on the training set are drawn from)
   and the calibrated identity-verification threshold (face spaces).

Not hashed: the creation time, the memtrack version, measured recall, memory budgets, the dataset's
location, the skipped-file list -- nothing a verdict depends on. A manifest field that starts to change
verdicts belongs in :data:`SPACE_FIELDS` (or in step 3).

The hash is computed once when an index is written (build, sharded build and ``add``) and stored in
``manifest.json`` as ``content_hash``; an index written before then gets it computed when first asked
(streaming its vector files), and not written back, so readers never modify an index folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from memtrack.utils import json_safe

#: Version of the hashing rule itself (part of the hash): bump it when what is hashed changes.
HASH_VERSION = 1
#: The manifest fields of a space that change what a search returns or how it is scored.
SPACE_FIELDS = ("fingerprint", "metric", "dim", "dtype", "divisor", "views", "index_kind", "index_type",
                "factory", "nlist", "search_params", "rerank", "train_neighbours")
_BLOCK = 16 << 20  # bytes of vectors hashed per read: bounded memory on memory-mapped files


def _update_json(h, obj) -> None:
    h.update(json.dumps(json_safe(obj), sort_keys=True, separators=(",", ":")).encode("utf-8"))
    h.update(b"\n")


def _update_array(h, arr: np.ndarray) -> None:
    """Dtype, shape and the raw bytes of ``arr`` (memory-mapped: read block by block, never all at once)."""
    _update_json(h, {"dtype": arr.dtype.str, "shape": list(arr.shape)})
    if arr.size == 0:
        return
    row_bytes = max(1, arr.itemsize * (int(np.prod(arr.shape[1:])) if arr.ndim > 1 else 1))
    step = max(1, _BLOCK // row_bytes)
    for start in range(0, len(arr), step):
        h.update(np.ascontiguousarray(arr[start:start + step]).data)


def _identity_threshold(manifest: dict) -> dict | None:
    cal = (manifest.get("identity") or {}).get("calibration") or {}
    return {k: cal.get(k) for k in ("threshold", "source")} if cal else None


def content_hash(folder: str | Path, manifest: dict, records: Sequence) -> str:
    """The ``sha256:<hex>`` content hash of the index in ``folder`` (see the module docstring).

    Args:
        folder: the index folder (or the temporary folder being written): its ``<space>.vectors.npy``
            and ``<space>.rows.npy`` are read memory-mapped.
        manifest: its manifest (``spaces`` and, for face spaces, ``identity``).
        records: its training records, in row order (:class:`~memtrack.data.dataset.Record` or dicts).
    """
    folder = Path(folder)
    h = hashlib.sha256()
    _update_json(h, {"memtrack_index_content": HASH_VERSION, "n_records": len(records)})
    # 1. the training records, in row order
    for rec in records:
        d = rec if isinstance(rec, dict) else rec.to_dict()
        _update_json(h, [d.get("id"), d.get("sha256"), d.get("caption"), d.get("identity")])
    # 2. every space: its search-relevant settings, vectors and rows
    for name in sorted(manifest.get("spaces", {})):
        meta = manifest["spaces"][name]
        _update_json(h, {"space": name, **{k: meta.get(k) for k in SPACE_FIELDS}})
        for part in ("vectors", "rows"):
            _update_array(h, np.load(folder / f"{name}.{part}.npy", mmap_mode="r"))
    # 3. what training-set calibration reads: the baselines' summaries, the identity threshold
    baselines = {name: {k: v for k, v in (b or {}).items() if k != "values"}
                 for name, b in (manifest.get("baseline") or {}).items()}
    _update_json(h, {"baseline": baselines, "identity": _identity_threshold(manifest)})
    return "sha256:" + h.hexdigest()


def short(value: str | None, n: int = 12) -> str:
    """``sha256:0123...`` -> ``0123456789ab`` for display."""
    return (value or "").split(":", 1)[-1][:n]
