"""More training-set inputs: webdataset ``.tar`` shards (img2dataset's layout) and parquet lists of paths.

Both give the same :class:`~memtrack.data.dataset.Record` objects as a folder, with the same guarantees: ids are
stable relative names, corrupt images are skipped and listed, entries that escape their folder are refused.

* **webdataset** -- a ``.tar`` file, or a folder of them (read recursively, sorted). Members are grouped by
  key (the member path up to the first dot of its file name, webdataset's rule); a group's image is its
  first member with an image extension, its caption the ``.txt`` member or else the ``.json`` member's
  caption column (``text``, then ``caption``, img2dataset's name), its identity the ``.json`` member's
  identity column. A record's id is ``<tar path relative to the root>/<image member>``; its ``path``
  locates the member's bytes inside the tar (:func:`read_member`), so nothing is extracted. Member names
  with ``..`` or a leading ``/`` are refused; links, devices and oversized members are skipped and listed;
  a truncated or corrupt tar is listed as skipped after the members read before the damage.
* **parquet** -- a ``.parquet`` file with a ``file_name`` (or ``path``) column, and optional caption and
  identity columns (``data.caption_column``, ``data.identity_column``). Relative paths are resolved against
  the parquet file's folder; absolute paths must lie inside it. Needs ``pyarrow`` (``pip install pyarrow``).

Example:
    >>> ds = read_dataset("laion-shards/")          # a folder of img2dataset .tar shards
    >>> ds = read_dataset("lists/train.parquet")    # local paths listed in a parquet file
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional

from memtrack.config import DataConfig
from memtrack.data.records import (IMAGE_EXTENSIONS, MAX_MEMBER_BYTES, MEMBER_PREFIX, Dataset, Record, Skipped, open_image, optional_text,
                                   read_entries, read_member, resolve_entry)
from memtrack.errors import DataError, DependencyError
from memtrack.utils import get_logger, progress_bar

logger = get_logger(__name__)



def is_webdataset(root: Path) -> bool:
    root = Path(root)
    if root.is_file():
        return root.suffix == ".tar"
    return root.is_dir() and any(p.suffix == ".tar" and p.is_file() for p in root.iterdir()) \
        and not _has_plain_images(root)


def _has_plain_images(root: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file())


def is_parquet(root: Path) -> bool:
    return Path(root).is_file() and Path(root).suffix == ".parquet"


def read_source(root: str | Path, cfg: DataConfig, check_images: bool = True, show_progress: bool = True) -> Dataset:
    """Read a webdataset or parquet training set (see the module docstring)."""
    root = Path(root)
    if is_parquet(root):
        ds = _read_parquet(root, cfg, check_images, show_progress)
    elif is_webdataset(root):
        ds = _read_webdataset(root, cfg, check_images, show_progress)
    else:
        raise DataError(f"{root} is neither a .tar / folder of .tar shards nor a .parquet file")
    if ds.skipped:
        logger.warning("skipped %d unreadable entr(ies) in %s, e.g. %s: %s", len(ds.skipped), root,
                       ds.skipped[0].path, ds.skipped[0].reason)
    if not ds.records:
        hint = f"first problem: {ds.skipped[0].path}: {ds.skipped[0].reason}" if ds.skipped else None
        raise DataError(f"no readable images in {root}", hint=hint)
    return ds


# -------------------------------------------------------------------------------------------- webdataset




def _key_and_ext(name: str) -> tuple[str, str]:
    path = PurePosixPath(name)
    base, _, ext = path.name.partition(".")
    return str(path.parent / base) if str(path.parent) != "." else base, ext.lower()


def _check_member_name(tar_id: str, name: str) -> None:
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or "\x00" in name:
        raise DataError(f"{tar_id}: member {name!r} escapes the archive", hint="the tar shard is malformed or hostile")


def _iter_groups(tar_path: Path, tar_id: str, skipped: list[Skipped]) -> Iterator[tuple[str, dict]]:
    """(key, {ext: TarInfo}) in archive order; a damaged archive ends with a skipped entry."""
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(tar_path, mode="r:") as tf:
            for info in tf:
                _check_member_name(tar_id, info.name)
                if info.isdir():
                    continue
                if not info.isfile():
                    skipped.append(Skipped(f"{tar_id}/{info.name}", "not a regular file (link or device)"))
                    continue
                key, ext = _key_and_ext(info.name)
                groups.setdefault(key, {})[ext] = info
    except (tarfile.TarError, OSError, EOFError) as exc:
        skipped.append(Skipped(tar_id, f"damaged tar after {len(groups)} sample(s): {type(exc).__name__}: {exc}"))
    yield from groups.items()


def _sidecar(fh, info: Optional[tarfile.TarInfo], limit: int, where: str) -> Optional[bytes]:
    if info is None:
        return None
    if info.size > limit:
        raise DataError(f"{where} is over the limit of {limit:,} bytes",
                        hint="raise data.max_metadata_line_bytes if this is intended")
    fh.seek(info.offset_data)
    return fh.read(info.size)


def _read_webdataset(root: Path, cfg: DataConfig, check_images: bool, show_progress: bool) -> Dataset:
    tars = [root] if root.is_file() else sorted(root.rglob("*.tar"))
    base = root.parent if root.is_file() else root
    ds = Dataset(root=str(root), layout="webdataset")
    for tar in progress_bar(tars, desc="reading tar shards", unit="tar", disable=None if show_progress else True):
        tar_id = tar.relative_to(base).as_posix()
        with open(tar, "rb") as fh:
            for key, members in _iter_groups(tar, tar_id, ds.skipped):
                rec = _group_record(fh, tar, tar_id, key, members, cfg, check_images, ds.skipped)
                if rec is not None:
                    ds.records.append(rec)
    return ds


def _group_record(fh, tar: Path, tar_id: str, key: str, members: dict, cfg: DataConfig, check_images: bool,
                  skipped: list[Skipped]) -> Optional[Record]:
    image = next((members[e] for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if image is None:
        return None  # a sample without an image (img2dataset writes .json for failed downloads)
    rid = f"{tar_id}/{image.name}"
    if image.size > MAX_MEMBER_BYTES:
        skipped.append(Skipped(rid, f"member of {image.size:,} bytes is over the limit of {MAX_MEMBER_BYTES:,}"))
        return None
    where = f"{tar_id}/{key}"
    txt = _sidecar(fh, members.get("txt"), cfg.max_metadata_line_bytes, f"{where}.txt")
    raw = _sidecar(fh, members.get("json"), cfg.max_metadata_line_bytes, f"{where}.json")
    meta = {}
    if raw is not None:
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{where}.json is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{where}.json: expected a JSON object, got {type(meta).__name__}")
    try:
        caption = txt.decode("utf-8").strip() if txt is not None else (
            optional_text(meta, cfg.caption_column, f"{where}.json")
            or optional_text(meta, "caption", f"{where}.json"))
    except UnicodeDecodeError:
        raise DataError(f"{where}.txt is not UTF-8") from None
    identity = optional_text(meta, cfg.identity_column, f"{where}.json")
    fh.seek(image.offset_data)
    data = fh.read(image.size)
    w = h = 0
    if check_images:
        try:
            im = open_image(data, cfg.max_image_pixels)
            w, h = im.size
        except DataError as exc:
            skipped.append(Skipped(rid, exc.message))
            return None
    locator = f"{MEMBER_PREFIX}{image.offset_data}:{image.size}:{tar.resolve()}"
    return Record(rid, locator, hashlib.sha256(data).hexdigest(), caption or None, identity, w, h)


# ----------------------------------------------------------------------------------------------- parquet


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DependencyError("reading parquet lists needs pyarrow", hint="pip install pyarrow") from None
    return pq


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    pq = _pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
        columns = pf.schema_arrow.names
        col = next((c for c in ("file_name", "path") if c in columns), None)
        if col is None:
            raise DataError(f"{path.name} has no 'file_name' or 'path' column (columns: {columns[:20]})",
                            hint="name the column of image paths file_name")
        line = 0
        for batch in pf.iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                line += 1
                row["file_name"] = row.get(col)
                yield f"{path.name} row {line}", row
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise DataError(f"{path} is not a readable parquet file: {str(exc)[:200]}") from None


def _parquet_entry(root: Path, row: dict, where: str, cfg: DataConfig) -> Path:
    name = row.get("file_name")
    if isinstance(name, str) and Path(name).is_absolute():
        try:  # an absolute path is accepted only inside the list's folder, and named relative to it
            name = Path(name).relative_to(root.resolve()).as_posix()
        except ValueError:
            raise DataError(f"{where}: path {row['file_name']!r} is outside the folder of the parquet file "
                            f"({root})", hint="put the parquet file in the folder that holds the images") from None
    return resolve_entry(root, name, where, cfg)


def _read_parquet(path: Path, cfg: DataConfig, check_images: bool, show_progress: bool) -> Dataset:
    root = path.parent
    ds = Dataset(root=str(root), layout=f"parquet ({path.name})")
    seen: set[str] = set()
    entries = []
    for where, row in _iter_parquet(path):
        file = _parquet_entry(root, row, where, cfg)
        if file.as_posix() in seen:
            raise DataError(f"{where}: {row['file_name']!r} is listed twice")
        seen.add(file.as_posix())
        entries.append((file, optional_text(row, cfg.caption_column, where),
                        optional_text(row, cfg.identity_column, where)))
    read_entries(ds, root, entries, cfg, check_images, show_progress)
    return ds
