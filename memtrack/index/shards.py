"""Sharded, resumable embedding of a training set, one process or many (``accelerate launch``).

The records are cut into shards of ``index.shard_size`` consecutive records. Shard ``i`` belongs to process
``i % num_processes``; each process embeds its shards and writes one folder per shard:

    <shard_dir>/<i:06d>-<key>/<space>.vectors.npy, <space>.rows.npy, failed.json, done.json

A shard is written into a temporary folder and renamed into place with ``done.json`` already inside, so a
folder under its final name is complete. Its ``key`` hashes the shard's records (ids and sha256) and every
embedder's fingerprint: after a crash, a rerun finds the finished shards and embeds only the rest, and a
changed image or embedder gives a new key instead of stale vectors. The main process then waits for every
process (``accelerate``'s ``wait_for_everyone``) and concatenates the shards in record order, so a sharded
build writes the same vectors, rows and index as a one-process build.

Example (two GPUs; the same command without ``accelerate launch`` runs in one process):
    accelerate launch --num_processes 2 -m memtrack index build data/ --out ref/ --embedders clip
"""
from __future__ import annotations

import json
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from memtrack.data.dataset import Record, Skipped, open_image
from memtrack.errors import DataError
from memtrack.utils import atomic_write_json, get_logger, progress_bar, stable_hash

logger = get_logger(__name__)

DONE = "done.json"
# (embedder, records) -> (stored vectors, rows local to the records, failed)
EmbedFn = Callable[[object, Sequence[Record]], tuple[np.ndarray, np.ndarray, list]]


def distributed_state():
    """accelerate's ``PartialState`` when launched with several processes, else None (no process group)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    import torch
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)  # embedding runs on each embedder's own device; this only joins the group


def _load_batch(records: Sequence[Record], start: int, batch_size: int, max_pixels: int, alpha: str = "white"):
    images, idx, failed = [], [], []
    for j, rec in enumerate(records[start:start + batch_size]):
        try:
            images.append(open_image(rec.path, max_pixels, alpha))
            idx.append(start + j)
        except DataError as exc:
            failed.append(Skipped(rec.id, exc.message))
    return images, idx, failed


def _batches(records: Sequence[Record], batch_size: int, max_pixels: int, workers: int, alpha: str = "white"):
    """Decoded batches in order; ``workers`` threads read and decode the next batches while one embeds
    (PIL releases the GIL while decoding, so this overlaps I/O and decoding with the model)."""
    starts = range(0, len(records), batch_size)
    if workers <= 0:
        for start in starts:
            yield _load_batch(records, start, batch_size, max_pixels, alpha)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="memtrack-read") as pool:
        pending: deque = deque()
        for start in starts:
            pending.append(pool.submit(_load_batch, records, start, batch_size, max_pixels, alpha))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def embed_records(embedder, records: Sequence[Record], batch_size: int, max_pixels: int,
                  workers: int = 0) -> tuple[np.ndarray, np.ndarray, list[Skipped]]:
    """Embed every record; returns (vectors, record rows, records that failed).

    Each image is decoded as the embedder asks (``embedder.alpha``) and gives the vectors of
    :meth:`~memtrack.embedders.base.Embedder.embed_reference`: one, several (augmentation views, faces)
    or none; ``rows`` names the record of each vector."""
    chunks, rows, failed = [], [], []
    alpha = getattr(embedder, "alpha", "white")
    bar = progress_bar(total=len(records), desc=f"embedding [{embedder.name}]", unit="img")
    for images, idx, bad in _batches(records, batch_size, max_pixels, workers, alpha):
        failed.extend(bad)
        if images:
            ref = embedder.embed_reference(images)
            chunks.append(np.asarray(ref.vectors, dtype=np.float32).reshape(-1, embedder.dim))
            rows.append(np.asarray(idx, dtype=np.int64)[np.asarray(ref.image_index, dtype=np.int64)])
        bar.update(len(images) + len(bad))
    bar.close()
    dim = embedder.dim
    vec = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    row = np.concatenate(rows) if rows else np.zeros((0,), np.int64)
    return vec, row, failed


@dataclass
class Shard:
    index: int
    start: int
    stop: int
    key: str

    @property
    def name(self) -> str:
        return f"{self.index:06d}-{self.key}"


def plan(records: Sequence[Record], embedders: Sequence, shard_size: int, max_pixels: int) -> list[Shard]:
    """The shards of ``records``, each keyed by its records and the embedders' fingerprints."""
    prints = [e.fingerprint for e in embedders]
    out = []
    for i, start in enumerate(range(0, len(records), shard_size)):
        chunk = records[start:start + shard_size]
        key = stable_hash({"records": [(r.id, r.sha256) for r in chunk], "embedders": prints,
                           "max_pixels": max_pixels})
        out.append(Shard(i, start, min(start + shard_size, len(records)), key))
    return out


def is_done(folder: Path, shard: Shard) -> bool:
    return (Path(folder) / shard.name / DONE).is_file()


def embed_shards(records: Sequence[Record], embedders: Sequence, folder: str | Path, shards: list[Shard],
                 embed_fn: EmbedFn, rank: int = 0, world: int = 1) -> int:
    """Embed this process's unfinished shards; returns how many were embedded now."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = 0
    for shard in shards[rank::world]:
        if is_done(folder, shard):
            logger.info("shard %d is already embedded (%s); skipping it", shard.index, shard.name)
            continue
        _write_shard(folder, shard, records[shard.start:shard.stop], embedders, embed_fn)
        done += 1
    return done


def _write_shard(folder: Path, shard: Shard, records: Sequence[Record], embedders: Sequence,
                 embed_fn: EmbedFn) -> None:
    tmp = folder / f".{shard.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        failed: dict[str, Skipped] = {}
        counts = {}
        for emb in embedders:
            # 1. embed (rows are made global: the shard's first record is row shard.start)
            vec, rows, bad = embed_fn(emb, records)
            np.save(tmp / f"{emb.name}.vectors.npy", vec)
            np.save(tmp / f"{emb.name}.rows.npy", np.asarray(rows, np.int64) + shard.start)
            failed.update({s.path: s for s in bad})
            counts[emb.name] = int(len(vec))
        # 2. the completion marker goes in before the rename, so the final name means "complete"
        atomic_write_json(tmp / "failed.json", [s.to_dict() for s in failed.values()])
        atomic_write_json(tmp / DONE, {"key": shard.key, "start": shard.start, "stop": shard.stop,
                                       "vectors": counts})
        final = folder / shard.name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def collect(folder: str | Path, shards: list[Shard], space: str, out: Path, dtype: str, dim: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate a space's shard vectors into ``out`` (written chunk by chunk) -> (memmap, rows)."""
    folder = Path(folder)
    parts = [np.load(folder / s.name / f"{space}.vectors.npy", mmap_mode="r") for s in shards]
    total = sum(len(p) for p in parts)
    dest = np.lib.format.open_memmap(out, mode="w+", dtype=np.dtype(dtype), shape=(total, dim))
    pos = 0
    for p in parts:
        dest[pos:pos + len(p)] = p
        pos += len(p)
    dest.flush()
    del dest
    rows = [np.load(folder / s.name / f"{space}.rows.npy") for s in shards]
    return np.load(out, mmap_mode="r"), (np.concatenate(rows) if rows else np.zeros(0, np.int64))


def failed_records(folder: str | Path, shards: list[Shard]) -> list[Skipped]:
    out = []
    for s in shards:
        out.extend(Skipped(**d) for d in json.loads((Path(folder) / s.name / "failed.json").read_text()))
    return out


def missing(folder: str | Path, shards: list[Shard]) -> list[int]:
    return [s.index for s in shards if not is_done(Path(folder), s)]


def cleanup(folder: str | Path, shards: list[Shard], remove_folder: bool) -> None:
    """Remove the shards of a finished build (and the folder itself when memtrack chose it)."""
    folder = Path(folder)
    for s in shards:
        shutil.rmtree(folder / s.name, ignore_errors=True)
    if remove_folder:
        shutil.rmtree(folder, ignore_errors=True)


def default_shard_dir(out: Path) -> Path:
    """Beside the index folder, so a rerun of the same command finds it: ``.<name>.shards``."""
    return out.parent / f".{out.name}.shards"


def rank_and_world(state: Optional[object]) -> tuple[int, int]:
    if state is None:
        return 0, 1
    return int(state.process_index), int(state.num_processes)
