"""The reference index: the training set embedded in every space, searchable, with its own baseline.

Layout of an index folder (written to a temporary folder, then renamed into place):

    manifest.json          version, config, spaces (fingerprint, metric, dim, index choice, recall, views:
                           the most vectors one training image has), baseline
    records.jsonl          one training record per line (id, path, sha256, caption, identity, ...)
    <space>.vectors.npy    the embeddings (pixel: uint8, exact; features: float32), opened memory-mapped
    <space>.rows.npy       training-record row of every vector (several per image: the pixel space's
                           augmentation views, every face of an image; faces: some images none)
    <space>.faiss          the faiss index that proposes candidates (opened memory-mapped where faiss can)
    <space>.ivfdata        its inverted lists, when they live on disk (larger than the memory budget)
    <space>.trained.faiss  the empty trained IVF index (quantizer), reused by incremental adds
    <space>.baseline.npy   train->train statistic per vector (nearest *other* training image)

Search proposes top-k candidates; the detectors then recompute exact distances on the candidates'
stored vectors (:meth:`ReferenceIndex.candidates`), so an approximate index can lose recall but never
changes a verdict on what it finds. Which index a space gets, and its measured recall, is decided in
:mod:`memtrack.index.choice` (see docs/scale.md); sharded and resumable embedding in :mod:`memtrack.index.shards`.

Example:
    >>> ds = read_dataset("data/train")
    >>> ref = ReferenceIndex.build(ds, [get_embedder("pixel")], "ref/")
    >>> ref = ReferenceIndex.open("ref/")
    >>> scores, rows = ref.search("pixel", vectors, k=10)
    >>> ref = ref.add(read_dataset("data/more"), [get_embedder("pixel")])   # no rebuild
"""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from memtrack.index import choice as ic
from memtrack.index import files as fx
from memtrack.index import shards as sh
from memtrack.config import Config
from memtrack.data.dataset import Dataset, Record
from memtrack.embedders.registry import Embedder, fingerprint_diff
from memtrack.errors import DataError, FingerprintMismatch, IndexError_
from memtrack.index.content_hash import content_hash
from memtrack.index.files import replace_dir, write_records
from memtrack.index.space import baseline_record, embed_in_memory, prepare_vectors, write_space
from memtrack.utils import atomic_write_json, get_logger

logger = get_logger(__name__)

MANIFEST = fx.MANIFEST
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
        """Embedding values (float32) of vector ids ``[...]`` -> ``[..., dim]``.

        A ``-1`` id ("no candidate") gives NaN, never a vector: a zero vector would enter a pixel detector
        as a black image. Detectors ignore those slots by their row (-1).
        """
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        got = np.asarray(self.vectors[np.where(flat >= 0, flat, 0)]).astype(np.float32) / np.float32(self.divisor)
        got[flat < 0] = np.nan
        return got.reshape(*ids.shape, self.dim).astype(np.float32)

    @property
    def views(self) -> int:
        """The most vectors one training record has in this space (mirrored views, crops; default 1)."""
        return max(1, int(self.info.get("views", 1)))

    @functools.cached_property
    def n_rows(self) -> int:
        """Training records with at least one vector in this space."""
        return int(len(np.unique(self.rows))) if len(self.rows) else 0

    def prepared(self, ids: np.ndarray) -> np.ndarray:
        """The vectors as the faiss index sees them (cosine spaces normalised)."""
        return prepare_vectors(self.metric, self.vectors[np.asarray(ids)], self.divisor)

    @property
    def rerank(self) -> int:
        return int(self.info.get("rerank", 1))


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
              config: Config | None = None, *, overwrite: bool = False, shard_dir: str | Path | None = None,
              state=None) -> "ReferenceIndex | None":
        """Embed ``dataset`` with each embedder and write the index folder ``out`` atomically.

        Args:
            shard_dir: embed shard by shard into this folder, so a crashed build resumes where it stopped
                (default: in memory; ``.<out>.shards`` beside ``out`` when several processes run).
            state: accelerate's ``PartialState`` of a multi-process launch (see :mod:`memtrack.index.shards`);
                every process embeds its shards, the main process builds the index. Other processes
                return None.

        Raises:
            IndexError_: ``out`` exists and is not empty (pass ``overwrite=True``), or no vectors.
        """
        config = config or Config()
        out = Path(out)
        rank, world = sh.rank_and_world(state)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise IndexError_(f"index folder {out} already exists and is not empty",
                              hint="choose another --out, or pass --overwrite to replace it")
        if len(dataset.records) < 2:
            raise DataError(f"the training set {dataset.root} has {len(dataset.records)} readable image(s); "
                            "memtrack needs at least 2", hint="nearest-neighbour tests compare two neighbours")
        records = list(dataset.records)
        sharded = shard_dir is not None or world > 1
        folder = Path(shard_dir) if shard_dir is not None else sh.default_shard_dir(out)
        plan = sh.plan(records, embedders, config.index.shard_size, config.data.max_image_pixels) if sharded else []
        if sharded:
            # 1. every process embeds its shards (finished shards of an earlier attempt are kept)
            sh.embed_shards(records, embedders, folder, plan, lambda e, recs: embed_in_memory(
                e, recs, config), rank, world)
            if state is not None:
                state.wait_for_everyone()
            if rank != 0:
                return None
            if sh.missing(folder, plan):
                raise IndexError_(f"shards {sh.missing(folder, plan)[:5]} of {folder} are missing after embedding",
                                  hint="a process failed; run the same command again to resume")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
        try:
            skipped = [s.to_dict() for s in dataset.skipped]
            spaces_meta, baseline_meta, identity_block, failed_all = {}, {}, None, {}
            for emb in embedders:
                # 2. the space's vectors: from the shards, or embedded here
                if sharded:
                    stored, rows = sh.collect(folder, plan, emb.name, tmp / f"{emb.name}.vectors.npy",
                                              emb.storage[1], emb.dim)
                    failed = sh.failed_records(folder, plan)
                else:
                    stored, rows, failed = embed_in_memory(emb, records, config)
                failed_all.update({f.path: f for f in failed})
                if emb.identities:
                    from memtrack.identity.space import select_faces

                    keep = select_faces(records, rows, emb)
                    stored, rows = np.asarray(stored)[keep], rows[keep]
                    (tmp / f"{emb.name}.vectors.npy").unlink(missing_ok=True)
                # 3-5. index, baseline, identities
                space = write_space(tmp, emb, stored, rows, records, config)
                spaces_meta[emb.name] = space["meta"]
                baseline_meta[emb.name] = baseline_record(emb, space["baseline"])
                baseline_meta.update(space["extra_baselines"])
                identity_block = space["identity"] or identity_block
                del stored
            skipped.extend(f.to_dict() for f in failed_all.values())
            manifest = _manifest(dataset, records, skipped, config, spaces_meta, baseline_meta, identity_block)
            write_records(tmp / "records.jsonl", records)
            manifest["content_hash"] = content_hash(tmp, manifest, records)  # what verdicts depend on
            atomic_write_json(tmp / MANIFEST, manifest)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if sharded:
            sh.cleanup(folder, plan, remove_folder=shard_dir is None)
        return cls.open(out)

    # --------------------------------------------------------------------------------------- open
    @classmethod
    def open(cls, path: str | Path, *, mmap: bool = True, gpu: bool = True) -> "ReferenceIndex":
        """Open an index folder. Vectors and (where faiss can) the faiss index are memory-mapped; on-disk
        inverted lists are found beside the index file. ``gpu``: search on every GPU faiss-gpu sees."""
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
        spaces = {}
        for name, meta in manifest["spaces"].items():
            try:
                vectors = np.load(path / f"{name}.vectors.npy", mmap_mode="r" if mmap else None)
                rows = np.load(path / f"{name}.rows.npy")
                index = fx.read_faiss(path / f"{name}.faiss", meta, mmap=mmap)
            except (OSError, ValueError, RuntimeError) as exc:
                raise IndexError_(f"index {path} is incomplete: space {name!r}: {exc}",
                                  hint="rebuild the index") from None
            if gpu and not meta.get("on_disk") and meta.get("index_kind") != "hnsw":
                index = fx.to_gpu(index)
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

    @property
    def content_hash(self) -> str:
        """``sha256:<hex>`` of the records, every space's vectors, rows and search settings, and the identity
        threshold (:mod:`memtrack.index.content_hash`): equal hashes, equal verdicts. Read from the manifest; an
        index written by an older memtrack gets it computed on first use (its vector files are streamed once
        per process; the folder is not modified)."""
        stored = self.manifest.get("content_hash") or self.__dict__.get("_content_hash")
        if not stored:
            logger.info("computing the content hash of %s (its manifest predates stored hashes)", self.path)
            try:
                stored = content_hash(self.path, self.manifest, self.records)
            except (OSError, ValueError) as exc:
                raise IndexError_(f"cannot read index {self.path} to hash its content: {exc}",
                                  hint="rebuild the index") from None
            self.__dict__["_content_hash"] = stored
        return stored

    def extends(self, content_hash: str | None) -> bool:
        """True when this index holds the content ``content_hash`` names, or grew from it by ``add`` alone
        (rows are only appended, so what was stored against it still names the same training images)."""
        if not content_hash:
            return False
        grown_from = [a.get("previous_content_hash") for a in self.manifest.get("additions", [])]
        return content_hash == self.content_hash or content_hash in grown_from

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
        q = prepare_vectors(sp.metric, queries, 1.0)
        k = max(1, min(k, sp.index.ntotal))
        if len(q) == 0 or sp.index.ntotal == 0:
            return np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64)
        scores, ids = ic.search_reranked(sp.index, sp.prepared, sp.metric, q, k, sp.rerank)
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

    def train_neighbours(self, space: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Every record's ``index.baseline_k`` nearest other records and their RMS distances (pixel space),
        ``[n_train, k]`` each (-1 / inf where none); None when the index has no lists."""
        try:
            return self.space_array(space, "neighbours"), self.space_array(space, "neighbour_dist")
        except IndexError_:
            return None

    def baseline_values(self, space: str) -> np.ndarray:
        return np.load(self.path / f"{space}.baseline.npy")

    def summary(self) -> dict:
        """The ``index`` block of summary.json."""
        return {"path": str(self.path), "n_train": self.n_train, "content_hash": self.content_hash,
                "n_skipped": len(self.manifest.get("skipped", [])),
                "spaces": {n: {**s.fingerprint, "index_type": s.info.get("index_type"),
                               "n_vectors": s.info.get("n_vectors"), "recall_at_k": s.info.get("recall_at_k"),
                               "search_params": s.info.get("search_params", {}),
                               **({"recall_2nd": s.info["recall_2nd"],
                                   "recall_2nd_measured": s.info.get("recall_2nd_measured")}
                                  if "recall_2nd" in s.info else {}),
                               "index_kind": s.info.get("index_kind"), "views": s.views}
                           for n, s in self.spaces.items()}}

    # -------------------------------------------------------------------------------------- add
    def add(self, data: Dataset | Sequence[Record], embedders: Sequence[Embedder],
            config: Config | None = None) -> "ReferenceIndex":
        """Add training images without rebuilding: new records are appended, vectors added to the trained
        faiss index, the baseline updated (exactly, for old and new vectors), recall re-measured and
        re-tuned only when it fell below the target. Returns the reopened index.

        The update is written to a temporary folder and swapped in, so a crash leaves the old index.
        Old vectors are copied into the new ``.vectors.npy`` (I/O proportional to the index).

        Raises:
            IndexError_: an id or an image (sha256) is already indexed, or the embedders differ.

        Example:
            >>> ref = ReferenceIndex.open("ref/").add(read_dataset("data/new"), [get_embedder("pixel")])
        """
        from memtrack.index.update import add_to_index

        return add_to_index(self, data, embedders, config)


def _manifest(dataset: Dataset, records: list[Record], skipped: list, config: Config, spaces_meta: dict,
              baseline_meta: dict, identity_block: dict | None) -> dict:
    from memtrack import __version__

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
    return manifest
