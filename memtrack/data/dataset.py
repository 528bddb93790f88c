"""Read a training set: Hugging Face ``imagefolder`` layouts and plain folders (webdataset tars and
parquet lists: :mod:`memtrack.data.sources`).

Layouts (see ``data/README.md``):

* a folder of images, read recursively; ids are the paths relative to the folder (POSIX separators);
* the ``imagefolder`` convention: the same, plus ``metadata.jsonl`` or ``metadata.csv`` at the top with a
  ``file_name`` column (relative to the folder), an optional caption column (``text`` by default) and an
  optional identity column (``identity`` by default). With metadata, only the listed files are read.

Every file is hashed (sha256 of its bytes) and decoded once to check it; unreadable, corrupt, oversized
(decompression bombs) and unsupported files are *skipped and counted*, never a crash. Metadata entries
that escape the folder (``../``, absolute paths, symlinks that resolve outside) are refused with a message
that names the entry.

Example:
    >>> ds = read_dataset("data/train")
    >>> len(ds.records), ds.skipped[:1]
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator, Optional

from memtrack.config import DataConfig
from memtrack.errors import DataError
from memtrack.utils import get_logger
from memtrack.data.records import (ALPHA_MODES, Dataset, IMAGE_EXTENSIONS, ImageTooLarge, METADATA_FILES, Record, Skipped, list_images, open_image, optional_text, outside_root, read_entries, resolve_entry, to_rgb)  # noqa: F401  (readers import them from here too)

logger = get_logger(__name__)


# ---------------------------------------------------------------------------------------- metadata


def _bounded_lines(fh, limit: int, name: str) -> Iterator[tuple[int, bytes | str]]:
    """Lines of ``fh``, refusing one longer than ``limit`` without reading all of it into memory."""
    lineno = 0
    while True:
        raw = fh.readline(limit + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > limit:
            raise DataError(f"{name} line {lineno} is over the limit of {limit:,} bytes",
                            hint="raise data.max_metadata_line_bytes if this is intended")
        yield lineno, raw


def _iter_jsonl(path: Path, cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as fh:
        for lineno, raw in _bounded_lines(fh, cfg.max_metadata_line_bytes, path.name):
            where = f"{path.name} line {lineno}"
            line = raw.strip()
            if not line:
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
                raise DataError(f"{where} is not valid JSON: {str(exc)[:200]}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _iter_csv(path: Path, cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    csv.field_size_limit(cfg.max_metadata_line_bytes)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(raw for _, raw in _bounded_lines(fh, cfg.max_metadata_line_bytes, path.name))
            if reader.fieldnames is None or "file_name" not in reader.fieldnames:
                raise DataError(f"{path.name} has no 'file_name' column (columns: {reader.fieldnames})",
                                hint="the first row must be a header naming a file_name column")
            for lineno, row in enumerate(reader, 2):
                if None in row:
                    raise DataError(f"{path.name} line {lineno} has more fields than the header")
                yield f"{path.name} line {lineno}", row
    except csv.Error as exc:
        raise DataError(f"{path.name} is not valid CSV: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name} is not UTF-8: {exc}") from None


# ------------------------------------------------------------------------------------------ reading


def read_dataset(root: str | Path, cfg: DataConfig | None = None, *, check_images: bool = True,
                 show_progress: bool = True) -> Dataset:
    """Read a training set folder into :class:`Record` objects.

    Args:
        root: the dataset folder (plain or ``imagefolder`` with metadata).
        cfg: :class:`~memtrack.config.DataConfig` (column names, limits).
        check_images: decode every image once; corrupt ones are skipped and listed.

    Raises:
        DataError: the folder is missing, or the metadata is malformed (naming the file and line).
    """
    cfg = cfg or DataConfig()
    root = Path(root)
    from memtrack.data.sources import is_parquet, is_webdataset, read_source

    if is_parquet(root) or is_webdataset(root):  # webdataset .tar shards, parquet lists (sources.py)
        return read_source(root, cfg, check_images, show_progress)
    if not root.is_dir():
        raise DataError(f"training set folder not found: {root}", hint="pass the folder that holds the images")
    meta = next((root / m for m in METADATA_FILES if (root / m).is_file()), None)
    entries: list[tuple[Path, Optional[str], Optional[str], str]] = []  # path, caption, identity, where
    if meta is not None:
        rows = _iter_jsonl(meta, cfg) if meta.suffix == ".jsonl" else _iter_csv(meta, cfg)
        seen: set[str] = set()
        for where, row in rows:
            if "file_name" not in row:
                raise DataError(f"{where}: missing the 'file_name' field", hint="each row needs file_name")
            path = resolve_entry(root, row["file_name"], where, cfg)
            key = path.as_posix()
            if key in seen:
                raise DataError(f"{where}: file_name {row['file_name']!r} is listed twice")
            seen.add(key)
            entries.append((path, optional_text(row, cfg.caption_column, where),
                            optional_text(row, cfg.identity_column, where), where))
        layout = f"imagefolder ({meta.name})"
    else:
        resolved_root = root.resolve()
        for path in list_images(root):
            if path.is_symlink() and not cfg.follow_symlinks_outside and outside_root(resolved_root, path):
                raise DataError(f"{path.relative_to(root).as_posix()} is a symlink that resolves outside the "
                                f"dataset folder (to {path.resolve()})",
                                hint="set data.follow_symlinks_outside: true to allow it")
            entries.append((path, None, None, str(path)))
        layout = "folder"
    if not entries:
        raise DataError(f"no images found in {root}",
                        hint=f"memtrack reads {', '.join(sorted(IMAGE_EXTENSIONS))} files, recursively")

    ds = Dataset(root=str(root), layout=layout)
    read_entries(ds, root, [e[:3] for e in entries], cfg, check_images, show_progress)
    if ds.skipped:
        logger.warning("skipped %d unreadable file(s) in %s, e.g. %s: %s", len(ds.skipped), root,
                       ds.skipped[0].path, ds.skipped[0].reason)
    if not ds.records:
        raise DataError(f"none of the {len(entries)} images in {root} could be read",
                        hint=f"first problem: {ds.skipped[0].path}: {ds.skipped[0].reason}")
    return ds


def read_images(folder: str | Path, max_pixels: int = 64_000_000) -> tuple[list[Path], list[Skipped]]:
    """Image files of a folder of generated images (for ``memtrack check``), with the unreadable ones."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    good, bad = [], []
    for path in list_images(folder):
        try:
            open_image(path, max_pixels)
            good.append(path)
        except DataError as exc:
            bad.append(Skipped(path.relative_to(folder).as_posix(), exc.message))
    return good, bad
