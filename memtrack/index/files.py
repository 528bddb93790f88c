"""faiss index files of a space: build (train on a sample, fill block by block), on-disk merge, memory-mapped
open, tuning of a built index, and GPU search when faiss-gpu is installed.

Which index is built, and how recall is measured and tuned, is :mod:`memtrack.index.choice`.

Example:
    >>> built = build_faiss(folder, "clip", "cosine", 512, vectors, prepare, config.index)
    >>> recall = tune_built(built, "cosine", fetch, len(vectors), config.index)
    >>> write_built(built, folder / "clip.faiss")
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from memtrack.errors import IndexError_
from memtrack.index.choice import (QUANTIZER_EF_MIN, IndexChoice, RecallResult, has_hnsw_quantizer, choose_index,
                           default_memory_budget, faiss_module, held_out, make_index, measure_recall, parse_bytes,
                           search_reranked, set_search_params, training_sample, tune)
from memtrack.utils import get_logger

MANIFEST = "manifest.json"  # an index folder's description (spaces, records, hashes)

logger = get_logger(__name__)




@dataclass
class Built:
    """A filled faiss index and how it was chosen."""

    index: object
    choice: IndexChoice
    budget: int

    def meta(self) -> dict:
        c = self.choice
        return {"index_kind": c.kind, "factory": c.factory, "choice_reason": c.reason, "on_disk": c.on_disk,
                "est_bytes": c.est_bytes, "memory_budget": self.budget, "nlist": c.nlist}


def build_faiss(folder: Path, name: str, metric: str, dim: int, stored, prepare: Callable, icfg,
                exact: bool = False) -> Built:
    """Choose, train (on a sample) and fill the index of one space; ``stored`` may be memory-mapped.

    ``exact``: the space needs its exact 2nd neighbours (pixel): Flat while affordable (index_choice).
    IVF indexes also leave ``<name>.trained.faiss`` (the empty trained index) in ``folder``; on-disk ones
    their inverted lists in ``<name>.ivfdata``.
    """
    faiss = faiss_module()
    n = len(stored)
    budget = parse_bytes(icfg.memory_budget) or default_memory_budget()
    choice = choose_index(n, dim, budget, icfg.index_type, icfg.on_disk, exact=exact)
    index = make_index(choice, metric, dim)
    if not index.is_trained:
        # 1. train the quantizer on a sample (rows read in order from a memory-mapped file)
        index.train(prepare(stored[training_sample(n, choice)]))
        if has_hnsw_quantizer(index):  # accurate list assignment when adding
            set_search_params(index, {"quantizer_efSearch": QUANTIZER_EF_MIN})
        faiss.write_index(index, str(Path(folder) / f"{name}.trained.faiss"))
    # 2. add every vector, block by block; on disk: one IVF part per block, merged into one file
    if choice.on_disk:
        parts = write_parts(index, stored, prepare, Path(folder), name, start_id=0)
        merge_parts(index, parts, Path(folder) / f"{name}.ivfdata")
        for p in parts:
            p.unlink()
    else:
        for s in range(0, n, BLOCK):
            index.add(prepare(stored[s:s + BLOCK]))
    return Built(index, choice, budget)


BLOCK = 65536


def write_parts(trained, stored, prepare: Callable, folder: Path, name: str, start_id: int) -> list[Path]:
    """IVF parts of ``stored`` (ids from ``start_id``), each a clone of the empty trained index."""
    faiss = faiss_module()
    parts = []
    for s in range(0, len(stored), BLOCK):
        part = faiss.clone_index(trained)
        block = prepare(stored[s:s + BLOCK])
        part.add_with_ids(block, np.arange(start_id + s, start_id + s + len(block), dtype=np.int64))
        path = folder / f".{name}.part{len(parts):05d}.faiss"
        faiss.write_index(part, str(path))
        parts.append(path)
    return parts


def merge_parts(trained, parts: list[Path], ivfdata: Path, on_disk: tuple = ()) -> None:
    """``faiss.contrib.ondisk.merge_ondisk``, where a part listed in ``on_disk`` is itself an on-disk index
    (an earlier build, maybe in a renamed folder): read with ``IO_FLAG_ONDISK_SAME_DIR`` to find its
    ``.ivfdata`` (and without ``IO_FLAG_MMAP``, which faiss 1.15 does not support on on-disk lists)."""
    faiss = faiss_module()
    lists, keep = [], []
    for path in parts:
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if path in on_disk else faiss.IO_FLAG_MMAP
        part = faiss.read_index(str(path), flags)
        ivf = faiss.extract_index_ivf(part)
        ivf.own_invlists = False  # the lists outlive their index until the merge is done
        lists.append(ivf.invlists)
        keep.append(part)
    ivf = faiss.extract_index_ivf(trained)
    if trained.ntotal != 0:
        raise IndexError_("internal: on-disk merge needs an empty trained index")
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    vec = faiss.InvertedListsPtrVector()
    for inv in lists:
        vec.push_back(inv)
    ntotal = ondisk.merge_from_multiple(vec.data(), vec.size(), False)
    trained.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()


def write_built(built: Built, path: Path) -> None:
    faiss_module().write_index(built.index, str(path))


def read_faiss(path: Path, meta: dict, mmap: bool = True):
    """Read a space's index: IVF lists memory-mapped (``IO_FLAG_MMAP``), flat codes memory-mapped
    (``IO_FLAG_MMAP_IFC``), on-disk lists found beside the file (``IO_FLAG_ONDISK_SAME_DIR``); the
    tuned search parameters applied."""
    faiss = faiss_module()
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR  # on-disk lists are memory-mapped by faiss itself
    if mmap and not meta.get("on_disk"):
        ivf = str(meta.get("index_kind", "flat")).startswith("ivf")
        flags |= faiss.IO_FLAG_MMAP if ivf else getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
    index = faiss.read_index(str(path), flags)
    set_search_params(index, meta.get("search_params") or {})
    return index


def _rerank_options(kind: str, rr: int, second) -> tuple:
    """Candidates re-ranked per requested one: PQ codes always; pixel spaces until the 2nd neighbour is found."""
    if kind == "ivf_pq":
        return (rr, rr * 4, rr * 8) if second is not None else (rr, rr * 4)
    return (1, 2, 4, 8, 16) if second is not None else (1,)


def _exact_result(icfg, second) -> RecallResult:
    return RecallResult(1.0, 1.0, icfg.k, 0, {}, icfg.recall_target, True, False, 1,
                        1.0 if second is not None else None)


def tune_built(built: Built, metric: str, fetch: Callable, n: int, icfg, second=None) -> RecallResult:
    """Tune the search parameters of ``built`` to ``icfg.recall_target`` (exact indexes: recall 1).

    ``second``: a :class:`memtrack.index.recall.SecondNeighbour` whose recall must reach the target too.
    """
    kind = built.choice.kind
    if kind == "flat" or n < 2:
        return _exact_result(icfg, second)
    return tune(built.index, kind, lambda q, k, r: search_reranked(built.index, fetch, metric, q, k, r)[1],
                fetch, n, metric, icfg.k, icfg.recall_target, icfg.recall_queries,
                _rerank_options(kind, built.choice.rerank, second), second)


def remeasure(index, kind: str, meta: dict, metric: str, fetch: Callable, n: int, icfg, second=None) -> RecallResult:
    """Recall of an existing index as it is set now; re-tuned only when it fell below the target."""
    if kind == "flat" or n < 2:
        return _exact_result(icfg, second)
    rr = int(meta.get("rerank", 1))
    kk = max(1, min(icfg.k, n - 1))
    qids = held_out(n, icfg.recall_queries)
    search = lambda q, k: search_reranked(index, fetch, metric, q, k, rr)[1]  # noqa: E731
    r = measure_recall(search, fetch, n, metric, kk, qids)
    r2 = second(search) if second is not None else None
    if r[0] >= icfg.recall_target and (r2 is None or r2 >= icfg.recall_target):
        return RecallResult(r[0], r[1], kk, len(qids), dict(meta.get("search_params") or {}), icfg.recall_target,
                            True, False, rr, r2)
    logger.info("recall@%d fell to %.3f after the update; re-tuning", kk, r[0])
    return tune(index, kind, lambda q, k, r_: search_reranked(index, fetch, metric, q, k, r_)[1], fetch, n, metric,
                icfg.k, icfg.recall_target, icfg.recall_queries, _rerank_options(kind, rr, second), second)


# --------------------------------------------------------------------------------------- GPU (optional)


def to_gpu(index, enabled: bool = True):
    """Move ``index`` onto every GPU faiss sees (faiss-gpu only); unchanged otherwise.

    Untested here: the development machines have no GPU and faiss-cpu's ``get_num_gpus()`` is 0.
    On-disk and HNSW indexes stay on the CPU (faiss-gpu cannot hold them).
    """
    faiss = faiss_module()
    if not enabled or not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() <= 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as exc:  # unsupported index type on GPU
        logger.warning("faiss-gpu cannot hold this index (%s); searching on the CPU", str(exc).splitlines()[0])
        return index


def write_records(path: Path, records: Sequence) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder onto ``out``; an old ``out`` is removed only after the swap."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def prepare_vectors(metric: str, vectors: np.ndarray, divisor: float) -> np.ndarray:
    """Stored vectors as faiss takes them: float32, divided back to [0, 1] pixels, unit length for cosine."""
    x = np.ascontiguousarray(np.asarray(vectors).astype(np.float32) / np.float32(divisor))
    if metric == "cosine":
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x
