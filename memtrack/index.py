"""The reference index: the training set embedded in every space, searchable, with its own baseline.

Layout of an index folder (written to a temporary folder, then renamed into place):

    manifest.json          version, config, spaces (fingerprint, metric, dim, files), baseline stats, skipped
    records.jsonl          one training record per line (id, path, sha256, caption, identity, ...)
    <space>.vectors.npy    the embeddings (pixel: uint8, exact; features: float32), opened memory-mapped
    <space>.rows.npy       training-record row of every vector (faces: several per image, some none)
    <space>.faiss          the faiss index that proposes candidates
    <space>.baseline.npy   train->train statistic per vector (nearest *other* training image)

Search proposes top-k candidates; the detectors then recompute exact distances on the candidates'
stored vectors (:meth:`ReferenceIndex.candidates`), so an approximate index can lose recall but never
changes a verdict on what it finds.

Example:
    >>> ds = read_dataset("data/train")
    >>> ref = ReferenceIndex.build(ds, [get_embedder("pixel")], "ref/")
    >>> ref = ReferenceIndex.open("ref/")
    >>> scores, rows = ref.search("pixel", vectors, k=10)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .config import Config, IndexConfig
from .data import Dataset, Record, Skipped, open_image
from .detectors import exact_rms_distances, summarise
from .embedders import Embedder, fingerprint_diff
from .errors import DataError, FingerprintMismatch, IndexError_
from .utils import atomic_write_json, get_logger, progress_bar

logger = get_logger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class Space:
    """One embedding space of an index."""

    name: str
    fingerprint: dict
    metric: str
    dim: int
    vectors: np.ndarray            # [m, dim] (uint8 for pixel spaces; scale 1/255)
    rows: np.ndarray               # [m] record row of each vector
    index: object                  # faiss index
    divisor: float = 1.0           # vectors / divisor = embedding values (pixel: 255)
    info: dict = field(default_factory=dict)

    def vectors_at(self, ids: np.ndarray) -> np.ndarray:
        """Embedding values (float32) of vector ids ``[...]`` -> ``[..., dim]``; -1 ids give zeros."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        got = np.asarray(self.vectors[np.where(flat >= 0, flat, 0)]).astype(np.float32) / np.float32(self.divisor)
        got[flat < 0] = 0
        return got.reshape(*ids.shape, self.dim).astype(np.float32)


# ------------------------------------------------------------------------------------- faiss helpers


def _faiss():
    try:
        import faiss  # noqa: WPS433
    except ImportError as exc:  # pragma: no cover - core dependency
        from .errors import DependencyError

        raise DependencyError("faiss is not installed", hint="pip install faiss-cpu") from exc
    return faiss


def make_faiss_index(metric: str, dim: int, n: int, index_type: str = "flat"):
    """The faiss index for a space. ``flat`` is exact; ``auto`` chooses by size (see docs/scale.md).

    This is the seam where the index choice lives; exact search is used for every size unless a
    larger-scale choice is configured.
    """
    faiss = _faiss()
    if index_type in ("flat", "auto"):
        return faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    raise IndexError_(f"unknown index_type {index_type!r}", hint="use flat or auto")


def _prepare(metric: str, vectors: np.ndarray, divisor: float) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors).astype(np.float32) / np.float32(divisor))
    if metric == "cosine":
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


# -------------------------------------------------------------------------------------------- build


def _embed_dataset(embedder: Embedder, records: Sequence[Record], batch_size: int,
                   max_pixels: int) -> tuple[np.ndarray, np.ndarray, list[Skipped]]:
    """Embed every record; returns (vectors, record rows, records that failed)."""
    chunks, rows, failed = [], [], []
    multi = hasattr(embedder, "embed_faces")
    bar = progress_bar(total=len(records), desc=f"embedding [{embedder.name}]", unit="img")
    for start in range(0, len(records), batch_size):
        batch_recs = records[start:start + batch_size]
        images, idx = [], []
        for j, rec in enumerate(batch_recs):
            try:
                images.append(open_image(rec.path, max_pixels))
                idx.append(start + j)
            except DataError as exc:
                failed.append(Skipped(rec.id, exc.message))
        if images:
            if multi:
                fb = embedder.embed_faces(images)
                chunks.append(np.asarray(fb.vectors, dtype=np.float32))
                rows.append(np.asarray(idx, dtype=np.int64)[np.asarray(fb.image_index, dtype=np.int64)])
            else:
                chunks.append(np.asarray(embedder.embed(images), dtype=np.float32))
                rows.append(np.asarray(idx, dtype=np.int64))
        bar.update(len(batch_recs))
    bar.close()
    dim = embedder.dim
    vec = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    row = np.concatenate(rows) if rows else np.zeros((0,), np.int64)
    return vec, row, failed


def _baseline(metric: str, vectors: np.ndarray, divisor: float, faiss_index, k: int, rms: bool = True) -> np.ndarray:
    """Each vector's statistic to its nearest *other* training vector (exact re-check on candidates).

    cosine spaces: the top cosine similarity (Somepalli et al.'s train->train baseline);
    l2 spaces: the distance to the nearest other vector -- RMS per pixel for the pixel space (``rms``),
    plain Euclidean otherwise (face descriptors, whose thresholds are Euclidean).
    """
    m = len(vectors)
    if m < 2:
        return np.full(m, np.nan)
    k = min(k + 1, m)
    out = np.empty(m, dtype=np.float64)
    for s in range(0, m, 256):
        q = _prepare(metric, vectors[s:s + 256], divisor)
        _, ids = faiss_index.search(q, k)
        for i in range(len(q)):
            others = [j for j in ids[i] if j >= 0 and j != s + i]
            if not others:
                out[s + i] = np.nan
                continue
            cand = np.asarray(vectors[others], dtype=np.float64) / divisor
            if metric == "cosine":
                qn = q[i].astype(np.float64)
                cn = cand / np.maximum(np.linalg.norm(cand, axis=1, keepdims=True), 1e-12)
                out[s + i] = float((cn @ qn).max())
            else:
                qi = np.asarray(vectors[s + i], dtype=np.float64) / divisor
                d = float(exact_rms_distances(qi[None], cand[None])[0].min())
                out[s + i] = d if rms else d * np.sqrt(cand.shape[1])
    return out


class ReferenceIndex:
    """A built reference index (see the module docstring for its files)."""

    def __init__(self, path: Path, manifest: dict, records: list[Record], spaces: dict[str, Space]):
        self.path = Path(path)
        self.manifest = manifest
        self.records = records
        self.spaces = spaces

    # -------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, dataset: Dataset, embedders: Sequence[Embedder], out: str | Path,
              config: Config | None = None, *, overwrite: bool = False) -> "ReferenceIndex":
        """Embed ``dataset`` with each embedder and write the index folder ``out`` atomically.

        Raises:
            IndexError_: ``out`` exists and is not empty (pass ``overwrite=True``), or no vectors.
        """
        config = config or Config()
        icfg: IndexConfig = config.index
        out = Path(out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise IndexError_(f"index folder {out} already exists and is not empty",
                              hint="choose another --out, or pass --overwrite to replace it")
        if len(dataset.records) < 2:
            raise DataError(f"the training set {dataset.root} has {len(dataset.records)} readable image(s); "
                            "memtrack needs at least 2", hint="nearest-neighbour tests compare two neighbours")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
        try:
            records = list(dataset.records)
            skipped = [s.to_dict() for s in dataset.skipped]
            spaces_meta, baseline_meta, identity_block = {}, {}, None
            for emb in embedders:
                # 1. embed the training set
                vec, rows, failed = _embed_dataset(emb, records, icfg.batch_size, config.data.max_image_pixels)
                skipped.extend(f.to_dict() for f in failed)
                if hasattr(emb, "embed_faces"):
                    from .identity_index import select_faces

                    keep = select_faces(records, rows, emb)
                    vec, rows = vec[keep], rows[keep]
                if emb.metric == "l2" and emb.name == "pixel":
                    stored, divisor, dtype = np.rint(vec * 255.0).clip(0, 255).astype(np.uint8), 255.0, "uint8"
                else:
                    stored, divisor, dtype = vec.astype(np.float32), 1.0, "float32"
                # 2. the faiss index
                index = make_faiss_index(emb.metric, emb.dim, len(stored), icfg.index_type)
                if len(stored):
                    index.add(_prepare(emb.metric, stored, divisor))
                # 3. the train->train baseline
                base = _baseline(emb.metric, stored, divisor, index, 1, rms=emb.name == "pixel")
                # 4. identities and the calibrated verification threshold (face spaces)
                if hasattr(emb, "embed_faces"):
                    from .identity_index import build_identity

                    arrays, identity_meta = build_identity(records, stored, rows, emb, config)
                    for key, arr in arrays.items():
                        np.save(tmp / f"{emb.name}.{key}.npy", arr)
                    identity_block = identity_meta
                np.save(tmp / f"{emb.name}.vectors.npy", stored)
                np.save(tmp / f"{emb.name}.rows.npy", rows)
                np.save(tmp / f"{emb.name}.baseline.npy", base)
                _faiss().write_index(index, str(tmp / f"{emb.name}.faiss"))
                spaces_meta[emb.name] = {"fingerprint": emb.fingerprint, "options": dataclasses.asdict(emb.options),
                                         "metric": emb.metric, "dim": emb.dim,
                                         "n_vectors": int(len(stored)), "dtype": dtype, "divisor": divisor,
                                         "index_type": type(index).__name__, "recall_at_k": 1.0}
                stat = ("cosine to nearest other" if emb.metric == "cosine" else "RMS pixel distance to nearest other"
                        if emb.name == "pixel" else "distance to nearest other")
                baseline_meta[emb.name] = {"statistic": stat, **summarise(base)}
            with open(tmp / "records.jsonl", "w", encoding="utf-8") as fh:
                for rec in records:
                    fh.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
            from . import __version__

            manifest = {
                "format_version": FORMAT_VERSION, "memtrack_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "dataset": {"root": str(Path(dataset.root).resolve()), "layout": dataset.layout,
                            "n_train": len(records), "n_skipped": len(skipped)},
                "n_train": len(records), "skipped": skipped,
                "config": {"data": config.to_dict()["data"], "index": config.to_dict()["index"]},
                "spaces": spaces_meta, "baseline": baseline_meta,
            }
            if identity_block is not None:
                manifest["identity"] = identity_block
            atomic_write_json(tmp / MANIFEST, manifest)
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(out)

    # --------------------------------------------------------------------------------------- open
    @classmethod
    def open(cls, path: str | Path, *, mmap: bool = True) -> "ReferenceIndex":
        """Open an index folder. Vectors are memory-mapped; nothing is embedded again."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise IndexError_(f"no memtrack index at {path} (missing {MANIFEST})",
                              hint="build one with `memtrack index build DATA --out DIR`")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise IndexError_(f"cannot read {mpath}: {exc}", hint="rebuild the index") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexError_(f"{mpath} has format version {manifest.get('format_version')!r}; this memtrack "
                              f"reads version {FORMAT_VERSION}", hint="rebuild the index with this version")
        records = []
        with open(path / "records.jsonl", encoding="utf-8") as fh:
            for line in fh:
                records.append(Record(**json.loads(line)))
        faiss = _faiss()
        spaces = {}
        for name, meta in manifest["spaces"].items():
            try:
                vectors = np.load(path / f"{name}.vectors.npy", mmap_mode="r" if mmap else None)
                rows = np.load(path / f"{name}.rows.npy")
                index = faiss.read_index(str(path / f"{name}.faiss"))
            except (OSError, ValueError, RuntimeError) as exc:
                raise IndexError_(f"index {path} is incomplete: space {name!r}: {exc}",
                                  hint="rebuild the index") from None
            spaces[name] = Space(name, meta["fingerprint"], meta["metric"], int(meta["dim"]), vectors, rows,
                                 index, float(meta.get("divisor", 1.0)), meta)
        return cls(path, manifest, records, spaces)

    # ------------------------------------------------------------------------------------- checks
    @property
    def n_train(self) -> int:
        return len(self.records)

    @property
    def train_ids(self) -> list[str]:
        return [r.id for r in self.records]

    @property
    def fingerprint(self) -> dict:
        return {name: s.fingerprint for name, s in self.spaces.items()}

    def check_embedder(self, embedder: Embedder) -> None:
        """Refuse an embedder whose fingerprint differs from the index's, naming every difference."""
        if embedder.name not in self.spaces:
            raise FingerprintMismatch(f"the index at {self.path} has no {embedder.name!r} space "
                                      f"(it has: {', '.join(self.spaces)})",
                                      hint=f"rebuild the index with --embedders {','.join([*self.spaces, embedder.name])}")
        diff = fingerprint_diff(self.spaces[embedder.name].fingerprint, embedder.fingerprint)
        if diff:
            raise FingerprintMismatch(f"the {embedder.name!r} embedder differs from the one the index at "
                                      f"{self.path} was built with: " + "; ".join(diff),
                                      hint="use the index's embedder settings, or rebuild the index with these")

    # ------------------------------------------------------------------------------------- search
    def search(self, space: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k candidates: ``(scores [n, k], vector ids [n, k])``; ids are -1 where fewer exist.

        Scores are faiss's (inner product for cosine spaces, squared L2 otherwise); use them only to rank.
        """
        sp = self.spaces[space]
        q = _prepare(sp.metric, queries, 1.0)
        k = max(1, min(k, sp.index.ntotal))
        if len(q) == 0 or sp.index.ntotal == 0:
            return np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64)
        scores, ids = sp.index.search(q, k)
        return scores, ids.astype(np.int64)

    def candidates(self, space: str, ids: np.ndarray) -> np.ndarray:
        """The stored embedding values of candidate ids ``[n, k]`` -> ``[n, k, dim]`` for exact re-checks."""
        return self.spaces[space].vectors_at(ids)

    def record_rows(self, space: str, ids: np.ndarray) -> np.ndarray:
        """Training-record rows of vector ids (faces map to the image they came from); -1 stays -1."""
        rows = self.spaces[space].rows
        ids = np.asarray(ids)
        return np.where(ids >= 0, rows[np.where(ids >= 0, ids, 0)], -1)

    def space_array(self, space: str, key: str) -> np.ndarray:
        """A per-space array saved beside the index (e.g. ``face.identity.npy``), loaded once."""
        cache = self.__dict__.setdefault("_arrays", {})
        if (space, key) not in cache:
            try:
                cache[(space, key)] = np.load(self.path / f"{space}.{key}.npy")
            except OSError as exc:
                raise IndexError_(f"index {self.path} has no {key!r} array for space {space!r}: {exc}",
                                  hint="rebuild the index") from None
        return cache[(space, key)]

    def baseline_values(self, space: str) -> np.ndarray:
        return np.load(self.path / f"{space}.baseline.npy")

    def summary(self) -> dict:
        """The ``index`` block of summary.json."""
        return {"path": str(self.path), "n_train": self.n_train,
                "n_skipped": len(self.manifest.get("skipped", [])),
                "spaces": {n: {**s.fingerprint, "index_type": s.info.get("index_type"),
                               "n_vectors": s.info.get("n_vectors"), "recall_at_k": s.info.get("recall_at_k")}
                           for n, s in self.spaces.items()}}


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder onto ``out``; an old ``out`` is removed only after the swap."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
