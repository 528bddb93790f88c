"""Small shared helpers: the library logger, the progress bar, atomic file writes, hashing.

Library code logs through :func:`get_logger` (WARNING by default; ``MEMTRACK_VERBOSITY=info|debug`` to
change it) and never prints. Progress bars are shown on the main process only and can be turned off with
``MEMTRACK_NO_PROGRESS=1``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

_LIBRARY_LOGGER = "memtrack"


def _configure_root() -> logging.Logger:
    root = logging.getLogger(_LIBRARY_LOGGER)
    if not getattr(root, "_memtrack_configured", False):
        level = os.environ.get("MEMTRACK_VERBOSITY", "warning").upper()
        root.setLevel(getattr(logging, level, logging.WARNING))
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("memtrack %(levelname)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
        root._memtrack_configured = True  # type: ignore[attr-defined]
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger for a memtrack module (``name`` is usually ``__name__``)."""
    _configure_root()
    return logging.getLogger(name if name.startswith(_LIBRARY_LOGGER) else f"{_LIBRARY_LOGGER}.{name}")


def set_verbosity(level: str | int) -> None:
    """Set the library's log level, e.g. ``set_verbosity("info")``."""
    root = _configure_root()
    root.setLevel(getattr(logging, level.upper()) if isinstance(level, str) else level)


def is_main_process() -> bool:
    """True unless this process is a non-zero rank of a distributed launch."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool | None = None):
    """A tqdm bar with counts and rate; silent on non-main processes or with ``MEMTRACK_NO_PROGRESS=1``."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = (not is_main_process()) or os.environ.get("MEMTRACK_NO_PROGRESS", "") not in ("", "0")
    # in a log file (CI, nohup, a cluster job) a redraw is a new line: redraw every 30 s there, not 10x a second
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=not tty,
                mininterval=0.1 if tty else 30.0, maxinterval=10.0 if tty else 60.0)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    A crash or kill leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temp(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_temp(path: Path) -> Path:
    """An empty, new ``.<name>.<random>.tmp`` beside ``path``, created with the umask's permissions.

    (``tempfile.mkstemp`` would make it 0600, and the rename would carry that onto reports and thumbnails.)
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy values made plain and NaN / infinity made ``None``.

    Python's ``json`` writes NaN as the bare word ``NaN``, which is not JSON: ``jq``, JavaScript's
    ``JSON.parse`` and most other parsers reject the whole file. An undefined value (the mean score of a
    detector that saw no face) is ``null`` in everything memtrack writes for others to read.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    try:
        return json_safe(_json_default(obj))
    except TypeError:
        return obj  # left to json.dumps's own ``default=``, or its TypeError


def to_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (see :func:`json_safe`); ``kwargs`` go to ``json.dumps``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short sha256 of a JSON-serialisable object (keys sorted): the key of caches and store rows."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def parse_bytes(text: str | int | None) -> Optional[int]:
    """``"16GB"``, ``"512MiB"``, ``"2e9"`` or an int -> bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    units = {"tib": 1 << 40, "gib": 1 << 30, "mib": 1 << 20, "kib": 1 << 10,
             "tb": 10 ** 12, "gb": 10 ** 9, "mb": 10 ** 6, "kb": 10 ** 3, "t": 10 ** 12, "g": 10 ** 9,
             "m": 10 ** 6, "k": 10 ** 3, "b": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            s, scale = s[: -len(unit)], mult
            break
    else:
        scale = 1
    try:
        value = float(s) * scale
    except ValueError:
        from memtrack.errors import IndexError_

        raise IndexError_(f"memory budget {text!r} is not a size", hint="use e.g. 16GB, 512MiB or 2e9") from None
    if not math.isfinite(value) or value <= 0:
        from memtrack.errors import IndexError_

        raise IndexError_(f"memory budget must be > 0, got {text!r}")
    return int(value)
