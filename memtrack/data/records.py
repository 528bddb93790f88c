"""Training records and the images behind them: what a reader yields, and how one image is opened.

A record's ``path`` is a file, or a webdataset tar member's locator (:data:`MEMBER_PREFIX`); every reader
(:mod:`memtrack.data.dataset` for folders, :mod:`memtrack.data.sources` for webdataset and parquet) builds
records with the same checks: ids stable, entries that escape the folder refused, images decoded once.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps

from memtrack.config import DataConfig
from memtrack.errors import DataError
from memtrack.utils import get_logger, progress_bar

logger = get_logger(__name__)

MEMBER_PREFIX = "tar-member:"  # Record.path of a tar member: tar-member:<offset>:<size>:<tar path>

MAX_MEMBER_BYTES = 1 << 30

def read_member(locator: str) -> bytes:
    """The bytes of a tar member from its :data:`MEMBER_PREFIX` locator (one seek and one read)."""
    try:
        offset, size, tar = locator[len(MEMBER_PREFIX):].split(":", 2)
        offset_i, size_i = int(offset), int(size)
    except ValueError:
        raise DataError(f"malformed tar member locator {locator[:200]!r}") from None
    try:
        with open(tar, "rb") as fh:
            fh.seek(offset_i)
            data = fh.read(size_i)
    except OSError as exc:
        raise DataError(f"cannot read {tar}: {exc.strerror or exc}") from None
    if len(data) != size_i:
        raise DataError(f"{tar} is truncated: member at byte {offset_i} is short")
    return data


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


def outside_root(root: Path, path: Path) -> bool:
    """True when ``path`` resolves outside ``root``. A symlink loop points nowhere (Path.resolve raises):
    it is not outside, and reading it fails, so it is skipped as unreadable."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return False
    return not within(root.resolve(), resolved)


def within(root: Path, candidate: Path) -> bool:
    try:
        candidate.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_entry(root: Path, file_name: object, where: str, cfg: DataConfig) -> Path:
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{where}: 'file_name' must be a non-empty string, got {file_name!r}"[:300])
    if "\x00" in file_name:
        raise DataError(f"{where}: 'file_name' contains a NUL byte")
    rel = Path(file_name)
    if rel.is_absolute() or file_name.startswith(("/", "\\")) or ".." in rel.parts:
        raise DataError(f"{where}: file_name {file_name!r} escapes the dataset folder",
                        hint="file_name must be a path relative to the folder holding the metadata file")
    path = root / rel
    if not cfg.follow_symlinks_outside and outside_root(root, path):
        raise DataError(f"{where}: file_name {file_name!r} resolves outside the dataset folder "
                        f"(to {path.resolve()})", hint="set data.follow_symlinks_outside: true to allow it")
    return path


def optional_text(row: dict, column: str, where: str) -> Optional[str]:
    value = row.get(column)
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    return value


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

