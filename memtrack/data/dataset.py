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
import hashlib
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image, ImageOps

from memtrack.config import DataConfig
from memtrack.errors import DataError
from memtrack.utils import get_logger, progress_bar

logger = get_logger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass
class Record:
    """One training image. ``id`` is stable: the path relative to the dataset root."""

    id: str
    path: str
    sha256: str
    caption: Optional[str] = None
    identity: Optional[str] = None
    width: int = 0
    height: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Skipped:
    """A file that was not read, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Dataset:
    root: str
    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    layout: str = "folder"

    def __len__(self) -> int:
        return len(self.records)


# ------------------------------------------------------------------------------------------ images


class ImageTooLarge(DataError):
    pass


def open_image(source: str | Path | bytes, max_pixels: int = 64_000_000, alpha: str = "white") -> Image.Image:
    """Decode an image safely: bounded pixel count, EXIF orientation applied, converted to RGB.

    Grayscale, palette, CMYK and RGBA images all come back as RGB. ``alpha`` says how (see :func:`to_rgb`):
    ``white`` composites transparency on white and scales 16-bit samples (how the image looks);
    ``drop`` is PIL's ``convert("RGB")``, what diffusers' training scripts feed the model (they open the
    image, apply its EXIF orientation -- the ``datasets`` image loader and the DreamBooth scripts both do
    -- and call ``image.convert("RGB")``).

    Raises:
        DataError: the file cannot be read or decoded, or it exceeds ``max_pixels`` (a decompression bomb).
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if isinstance(source, str) and source.startswith("tar-member:"):  # a webdataset member (sources.py)
        from memtrack.data.sources import read_member

        source = read_member(source)
    if not isinstance(source, bytes):
        _require_regular_file(Path(source))
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as exc:
        raise DataError(f"cannot open image {name}: {exc.strerror or exc}") from None
    with fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = Image.open(fh)
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageTooLarge(f"image {name} has {w}x{h} = {w * h:,} pixels, over the limit of "
                                        f"{max_pixels:,}", hint="raise data.max_image_pixels if this is intended")
                im.load()
        except DataError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image {name} refused as a decompression bomb: {exc}") from None
        except Exception as exc:  # PIL raises many types for corrupt data
            raise DataError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not cost the image
        pass
    try:
        return to_rgb(im, alpha)
    except Exception as exc:  # an exotic mode PIL cannot convert
        raise DataError(f"cannot convert image {name} ({im.mode}) to RGB: {exc}") from None


def _require_regular_file(path: Path) -> None:
    """Refuse FIFOs, devices and folders: reading a FIFO named ``x.png`` would block forever."""
    if path.exists() and not path.is_file():
        raise DataError(f"cannot read {path}: not a regular file")


ALPHA_MODES = ("white", "drop")


def to_rgb(im: Image.Image, alpha: str = "white") -> Image.Image:
    """RGB ``im``. ``alpha='drop'``: ``im.convert("RGB")`` exactly, as the training scripts do (transparency
    discarded, 16-bit samples clipped at 255). ``alpha='white'``: transparency composited on white, 16-bit
    samples mapped from 0..65535 onto 0..255."""
    if im.mode == "RGB":
        return im
    if alpha == "drop":
        return im.convert("RGB")
    if alpha != "white":
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        # 16-bit samples are on a 0..65535 scale: map that range onto 0..255, as image viewers do, so a dark
        # 16-bit image stays dark (scaling by its own maximum would brighten it). 32-bit "I" images beyond
        # 16 bits have no standard scale; they are clipped.
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype("uint8"), "L")
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------- metadata


def _outside(root: Path, path: Path) -> bool:
    """True when ``path`` resolves outside ``root``. A symlink loop points nowhere (Path.resolve raises):
    it is not outside, and reading it fails, so it is skipped as unreadable."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return False
    return not _within(root.resolve(), resolved)


def _within(root: Path, candidate: Path) -> bool:
    try:
        candidate.relative_to(root)
        return True
    except ValueError:
        return False


def _resolve_entry(root: Path, file_name: object, where: str, cfg: DataConfig) -> Path:
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{where}: 'file_name' must be a non-empty string, got {file_name!r}"[:300])
    if "\x00" in file_name:
        raise DataError(f"{where}: 'file_name' contains a NUL byte")
    rel = Path(file_name)
    if rel.is_absolute() or file_name.startswith(("/", "\\")) or ".." in rel.parts:
        raise DataError(f"{where}: file_name {file_name!r} escapes the dataset folder",
                        hint="file_name must be a path relative to the folder holding the metadata file")
    path = root / rel
    if not cfg.follow_symlinks_outside and _outside(root, path):
        raise DataError(f"{where}: file_name {file_name!r} resolves outside the dataset folder "
                        f"(to {path.resolve()})", hint="set data.follow_symlinks_outside: true to allow it")
    return path


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


def _optional_text(row: dict, column: str, where: str) -> Optional[str]:
    value = row.get(column)
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------ reading


def _hash_and_check(path: Path, cfg: DataConfig) -> tuple[str, int, int]:
    _require_regular_file(path)
    data = path.read_bytes()
    im = open_image(data, cfg.max_image_pixels)
    return hashlib.sha256(data).hexdigest(), im.size[0], im.size[1]


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted; hidden files and folders are ignored."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith(".") and Path(fn).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / fn)
    return out


def read_entries(ds: Dataset, root: Path, entries: list, cfg: DataConfig, check_images: bool,
                 show_progress: bool) -> None:
    """Hash (and decode-check) each ``(path, caption, identity)`` entry into ``ds``: a record, or a skip."""
    for path, caption, identity in progress_bar(entries, desc="reading training set", unit="img",
                                                disable=None if show_progress else True):
        rel = path.relative_to(root).as_posix()
        try:
            if check_images:
                sha, w, h = _hash_and_check(path, cfg)
            else:
                _require_regular_file(path)
                sha, w, h = hashlib.sha256(path.read_bytes()).hexdigest(), 0, 0
        except DataError as exc:
            ds.skipped.append(Skipped(rel, exc.message))
            continue
        except OSError as exc:
            ds.skipped.append(Skipped(rel, f"cannot read: {exc.strerror or exc}"))
            continue
        ds.records.append(Record(rel, str(path), sha, caption, identity, w, h))


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
            path = _resolve_entry(root, row["file_name"], where, cfg)
            key = path.as_posix()
            if key in seen:
                raise DataError(f"{where}: file_name {row['file_name']!r} is listed twice")
            seen.add(key)
            entries.append((path, _optional_text(row, cfg.caption_column, where),
                            _optional_text(row, cfg.identity_column, where), where))
        layout = f"imagefolder ({meta.name})"
    else:
        resolved_root = root.resolve()
        for path in list_images(root):
            if path.is_symlink() and not cfg.follow_symlinks_outside and _outside(resolved_root, path):
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
