"""The embedder interface: images in, float32 vectors out, plus what it takes to compare them.

An embedder declares its ``metric``: ``"cosine"`` spaces return L2-normalised rows and are searched by
inner product; the ``"l2"`` pixel space returns raw pixel vectors and is searched by squared L2 (see
ARCHITECTURE.md, "Each space declares its metric"). Its ``fingerprint`` is a JSON-able dict (name,
weights hash, preprocessing, dim) that an index stores; a scan with a differing fingerprint is refused.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
from PIL import Image

Metric = Literal["cosine", "l2"]


@dataclasses.dataclass
class EmbedderOptions:
    """Options common to every embedder; subclasses add their own fields.

    Args:
        batch_size: images per forward pass.
    """

    batch_size: int = 64


class Embedder(ABC):
    """Base class. Subclasses set ``name``, ``metric``, an ``Options`` dataclass, and implement ``embed``.

    ``embed`` takes a sequence of RGB ``PIL.Image`` objects (any size) and returns ``float32 [n, dim]``.
    """

    name: ClassVar[str]
    metric: ClassVar[Metric]
    Options: ClassVar[type] = EmbedderOptions

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    @property
    def fingerprint(self) -> dict:
        """What must match between an index and a scan: name, metric, dim, and ``_fingerprint_extra``."""
        fp = {"name": self.name, "metric": self.metric, "dim": int(self.dim)}
        fp.update(self._fingerprint_extra())
        return fp

    def _fingerprint_extra(self) -> dict:
        return {}

    def close(self) -> None:
        """Release models (optional)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


def fingerprint_diff(expected: dict, got: dict) -> list[str]:
    """Human-readable differences between two fingerprints, e.g. ``["resolution: index 32, scan 64"]``."""
    out = []
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            out.append(f"{key}: index has {expected.get(key)!r}, this scan has {got.get(key)!r}")
    return out
