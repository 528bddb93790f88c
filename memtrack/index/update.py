"""Incremental update of a reference index: add training images without rebuilding it.

New records are appended (rows continue after the old ones), their vectors added to the already trained
faiss index (on-disk inverted lists are merged into a new ``.ivfdata``), the train->train baseline updated
exactly -- new vectors against everything, old vectors against the new ones -- and recall re-measured,
re-tuned only when it fell below the target. Ids and images (sha256) already in the index are refused.

Everything is written to a temporary folder beside the index and swapped in at the end, so a crash leaves
the old index as it was. The price is I/O proportional to the index (old vectors are copied).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from memtrack.index import choice as ic
from memtrack.index import files as fx
from memtrack.index import neighbours as nb
from memtrack.index import space as spaces
from memtrack.config import Config, from_dict
from memtrack.data.dataset import Dataset, Record
from memtrack.errors import IndexError_
from memtrack.index.content_hash import content_hash
from memtrack.utils import atomic_write_json, get_logger

logger = get_logger(__name__)


def add_to_index(ref, data: Dataset | Sequence[Record], embedders: Sequence, config: Config | None = None):
    """See :meth:`memtrack.index.reference.ReferenceIndex.add`."""

    config = config or index_config(ref)
    new, skipped, source = _records_of(data)
    _refuse_duplicates(ref, new)
    if {e.name for e in embedders} != set(ref.spaces):
        raise IndexError_(f"adding to {ref.path} needs one embedder per space ({', '.join(ref.spaces)}), got "
                          f"{', '.join(e.name for e in embedders) or 'none'}",
                          hint="pass the index's own embedders (the CLI builds them from the manifest)")
    for emb in embedders:
        ref.check_embedder(emb)
    records = list(ref.records) + list(new)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ref.path.name}.adding-", dir=ref.path.parent))
    try:
        manifest = dict(ref.manifest)
        manifest["spaces"], manifest["baseline"] = dict(manifest["spaces"]), dict(manifest.get("baseline", {}))
        failed_all = {}
        for emb in embedders:
            meta, base, failed, identity, extra = _add_space(ref, emb, new, records, config, tmp)
            manifest["spaces"][emb.name] = meta
            manifest["baseline"][emb.name] = spaces.baseline_record(emb, base)
            manifest["baseline"].update(extra)
            if identity is not None:
                manifest["identity"] = identity
            failed_all.update({f.path: f for f in failed})
        added = [*skipped, *(f.to_dict() for f in failed_all.values())]
        manifest["skipped"] = list(manifest.get("skipped", [])) + added
        manifest["n_train"] = len(records)
        manifest["additions"] = list(manifest.get("additions", [])) + [
            {"source": source, "n_added": len(new), "n_skipped": len(added),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "previous_content_hash": ref.content_hash}]
        fx.write_records(tmp / "records.jsonl", records)
        for old in ref.path.iterdir():  # files this update does not rewrite (nothing is lost)
            if old.is_file() and not (tmp / old.name).exists() and old.name != fx.MANIFEST:
                shutil.copy2(old, tmp / old.name)
        manifest["content_hash"] = content_hash(tmp, manifest, records)  # new images: new verdicts
        atomic_write_json(tmp / fx.MANIFEST, manifest)
        fx.replace_dir(tmp, ref.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return type(ref).open(ref.path)


def index_config(ref) -> Config:
    """The config the index was built with (data and index sections)."""
    saved = ref.manifest.get("config", {})
    return from_dict(Config, {"data": saved.get("data", {}), "index": saved.get("index", {})})


def _records_of(data) -> tuple[list[Record], list[dict], str]:
    if isinstance(data, Dataset):
        return list(data.records), [s.to_dict() for s in data.skipped], str(Path(data.root).resolve())
    return list(data), [], "records"


def _refuse_duplicates(ref, new: Sequence[Record]) -> None:
    ids = {r.id for r in ref.records}
    shas = {r.sha256: r.id for r in ref.records}
    by_id = [r.id for r in new if r.id in ids]
    by_sha = [f"{r.id} (same image as {shas[r.sha256]})" for r in new if r.sha256 in shas and r.id not in ids]
    if by_id:
        raise IndexError_(f"{len(by_id)} record id(s) are already in the index at {ref.path}, e.g. "
                          f"{', '.join(by_id[:3])}",
                          hint="ids are paths relative to the dataset folder: put the new images under a "
                               "sub-folder (or other names), or rebuild the index")
    if by_sha:
        raise IndexError_(f"{len(by_sha)} image(s) are already in the index at {ref.path} under another id, "
                          f"e.g. {', '.join(by_sha[:3])}", hint="remove these duplicates from the new images")
    if not new:
        raise IndexError_("no new images to add", hint="check the folder given to --add")


def _add_space(ref, emb, new: Sequence[Record], records: list[Record], config: Config, tmp: Path):
    """Append one space's new vectors and rewrite its files in ``tmp``."""
    sp = ref.spaces[emb.name]
    n_old_records, m_old = len(ref.records), len(sp.vectors)
    # 1. embed the new images (rows continue after the old records)
    vec, rows, failed = spaces.embed_in_memory(emb, new, config)
    rows = np.asarray(rows, np.int64) + n_old_records
    if emb.identities:
        from memtrack.identity.space import select_faces

        keep = select_faces(records, rows, emb)
        vec, rows = vec[keep], rows[keep]
    # 2. the vectors file: old vectors copied, new ones appended
    path = tmp / f"{emb.name}.vectors.npy"
    dest = np.lib.format.open_memmap(path, mode="w+", dtype=sp.vectors.dtype, shape=(m_old + len(vec), sp.dim))
    for s in range(0, m_old, fx.BLOCK):
        dest[s:min(s + fx.BLOCK, m_old)] = sp.vectors[s:s + fx.BLOCK]
    dest[m_old:] = vec
    dest.flush()
    del dest
    stored = np.load(path, mmap_mode="r")
    all_rows = np.concatenate([sp.rows, rows])
    prepare = lambda x: spaces.prepare_vectors(sp.metric, x, sp.divisor)  # noqa: E731
    fetch = lambda ids: prepare(stored[np.asarray(ids)])  # noqa: E731
    # 3. the faiss index, extended
    index = _extend_faiss(ref.path, tmp, emb.name, sp.info, stored, m_old, prepare)
    # 4. recall (and the pixel space's 2nd-neighbour recall), re-tuned only if the update pushed it below
    #    the target
    kind = sp.info.get("index_kind", "flat")
    views = 1 if emb.identities else spaces.views_of(all_rows)
    second = None if kind == "flat" else spaces.second_neighbour_check(emb, fetch, all_rows, config.index, views)
    recall = fx.remeasure(index, kind, sp.info, sp.metric, fetch, len(stored), config.index, second)
    if emb.pixel_space and recall.recall_2nd is None:
        recall.recall_2nd = 1.0
    searcher = spaces.Searcher(index, sp.metric, fetch, recall.rerank)
    # 5. baseline (and the pixel space's neighbour lists): new vectors against all; old vectors against the
    #    new ones (the nearest other may be new)
    base, lists = _updated_baseline(ref, emb, sp, stored, m_old, searcher, all_rows, len(records), config)
    extra_baselines = {}
    if lists is not None:
        tiled = spaces.tiled_spec(emb, config, _tiled_grid(ref, emb.name))
        spaces.save_lists(tmp, emb.name, lists[0], lists[1], lists[2] if tiled else None)
        if tiled:
            keep = lists[0].shape[1]
            extra_baselines[emb.name + spaces.TILED_SUFFIX] = spaces.tiled_baseline_meta(tiled, keep, lists[2])
    identity = None
    if emb.identities:
        from memtrack.identity.space import build_identity

        arrays, identity = build_identity(records, np.asarray(stored), all_rows, emb, config)
        for key, arr in arrays.items():
            np.save(tmp / f"{emb.name}.{key}.npy", arr)
    np.save(tmp / f"{emb.name}.rows.npy", all_rows)
    np.save(tmp / f"{emb.name}.baseline.npy", base)
    ic.faiss_module().write_index(index, str(tmp / f"{emb.name}.faiss"))
    _note_if_outgrown(emb.name, sp.info, len(stored), config)
    meta = {**sp.info, "n_vectors": int(len(stored)), **spaces.recall_meta(recall, second),
            "views": max(int(sp.info.get("views", 1)), spaces.views_of(all_rows))}
    if lists is not None:
        meta["train_neighbours"] = {"k": int(lists[0].shape[1]),
                                    "statistic": "RMS pixel distance, minimum over both images' views"}
    return meta, base, failed, identity, extra_baselines


def _extend_faiss(old_dir: Path, tmp: Path, name: str, info: dict, stored, m_old: int, prepare):
    faiss = ic.faiss_module()
    new = stored[m_old:]
    if info.get("on_disk"):
        trained = faiss.read_index(str(old_dir / f"{name}.trained.faiss"))
        parts = fx.write_parts(trained, new, prepare, tmp, name, start_id=m_old)
        old = old_dir / f"{name}.faiss"
        fx.merge_parts(trained, [old, *parts], tmp / f"{name}.ivfdata", on_disk=(old,))
        for p in parts:
            p.unlink()
        ic.set_search_params(trained, info.get("search_params") or {})
        return trained
    index = fx.read_faiss(old_dir / f"{name}.faiss", info, mmap=False)
    for s in range(0, len(new), fx.BLOCK):
        index.add(prepare(new[s:s + fx.BLOCK]))
    return index


def _updated_baseline(ref, emb, sp, stored, m_old: int, searcher, all_rows: np.ndarray, n_records: int,
                      config: Config):
    """The train->train statistics after the add: new vectors against all; old vectors against the new ones
    (the nearest other record may be new) -- exact, never a rebuild. Returns ``(baseline per vector,
    (neighbour rows, distances, tiled baseline) per record or None)``."""
    pixel = emb.pixel_space
    keep = int((sp.info.get("train_neighbours") or {}).get("k", config.index.baseline_k)) if pixel else 1
    tiled = spaces.tiled_spec(emb, config, _tiled_grid(ref, emb.name))
    rms, m, views = pixel, len(stored), spaces.views_of(all_rows)
    old_base = np.asarray(ref.baseline_values(emb.name), np.float64)
    old_lists = _old_lists(ref, emb.name, n_records, keep) if pixel else None
    if m - m_old == 0:
        return old_base, old_lists
    fetch_all = nb.raw_fetch(stored, sp.divisor)
    search_all = lambda q, k: searcher.search(q, min(k, m))[1]  # noqa: E731
    if m_old == 0 or (pixel and old_lists is None):  # nothing old, or an index from before the lists
        tn = nb.compute(sp.metric, stored, sp.divisor, all_rows, np.arange(m), search_all, fetch_all, all_rows,
                        keep, views, rms, pixel, tiled)
        return tn.base, (spaces.full_lists(tn, n_records, keep) if pixel else None)
    new = nb.compute(sp.metric, stored, sp.divisor, all_rows, np.arange(m_old, m), search_all, fetch_all,
                     all_rows, keep, views, rms, pixel, tiled)
    # exact: every old vector against every new one (cost m_old x m_new x dim)
    faiss = ic.faiss_module()
    flat = faiss.IndexFlatIP(sp.dim) if sp.metric == "cosine" else faiss.IndexFlatL2(sp.dim)
    new_stored = stored[m_old:]
    flat.add(spaces.prepare_vectors(sp.metric, new_stored, sp.divisor))
    via = nb.compute(sp.metric, stored, sp.divisor, all_rows, np.arange(m_old),
                     lambda q, k: flat.search(q, min(k, m - m_old))[1], nb.raw_fetch(new_stored, sp.divisor),
                     all_rows[m_old:], keep, views, rms, pixel, tiled)
    combine = np.fmax if sp.metric == "cosine" else np.fmin
    base = np.concatenate([combine(old_base, via.base), new.base])
    if not pixel:
        return base, None
    rows, dist, tiled_base = old_lists
    for tn in (via, new):
        r, d, t = spaces.full_lists(tn, n_records, keep)
        have = tn.records
        rows[have], dist[have] = nb.merge(rows[have], dist[have], r[have], d[have])
        tiled_base[have] = np.fmin(tiled_base[have], t[have])
    return base, (rows, dist, tiled_base)


def _tiled_grid(ref, name: str) -> int | None:
    """The tile grid the index's tiled baseline was computed with (None: the config's)."""
    return (ref.manifest.get("baseline", {}).get(name + spaces.TILED_SUFFIX) or {}).get("grid")


def _old_lists(ref, name: str, n_records: int, keep: int):
    """The index's per-record lists, padded to ``n_records`` (None when it was built without them)."""
    try:
        rows, dist = ref.space_array(name, "neighbours"), ref.space_array(name, "neighbour_dist")
    except IndexError_:
        return None
    try:
        tiled = np.load(ref.path / f"{name}{spaces.TILED_SUFFIX}.baseline.npy")
    except OSError:
        tiled = np.full(len(rows), np.nan, np.float32)
    out_r = np.full((n_records, keep), -1, np.int64)
    out_d = np.full((n_records, keep), np.inf)
    out_t = np.full(n_records, np.nan)
    w = min(keep, rows.shape[1])
    out_r[:len(rows), :w], out_d[:len(rows), :w], out_t[:len(rows)] = rows[:, :w], dist[:, :w], tiled
    return out_r, out_d, out_t


def _note_if_outgrown(name: str, info: dict, n: int, config: Config) -> None:
    choice = ic.choose_index(n, int(info["dim"]), ic.parse_bytes(config.index.memory_budget), config.index.index_type,
                             exact=info.get("dtype") == "uint8")
    if choice.kind != info.get("index_kind", "flat"):
        logger.warning("space %s now holds %s vectors: a fresh build would choose %s instead of %s "
                       "(rebuild with --overwrite when convenient)", name, f"{n:,}", choice.factory,
                       info.get("factory", info.get("index_type")))
