"""Embedding spaces, behind one registry.

Built-ins register through the same public function users call:

    >>> from memtrack.embedders.registry import register_embedder, get_embedder, list_embedders
    >>> list_embedders()
    ['clip', 'face', 'pixel', 'sscd']
    >>> emb = get_embedder({"name": "pixel", "resolution": 32})

Names are stored in indexes and run stores, so they must be lowercase identifiers and unique.
"""
from __future__ import annotations

import functools
import re
import warnings
from typing import Any

from memtrack.config import EmbedderSpec, from_dict
from memtrack.errors import ConfigError
from memtrack.embedders.base import Embedder, EmbedderOptions, ReferenceVectors, fingerprint_diff, l2_normalise

_REGISTRY: dict[str, type[Embedder]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def register_embedder(name: str, cls: type[Embedder], *, overwrite: bool = False) -> None:
    """Register an :class:`Embedder` subclass under ``name`` (a lowercase identifier)."""
    _load_builtins()
    if not _NAME.match(name):
        raise ConfigError(f"embedder name {name!r} must be a lowercase identifier (letters, digits, _)")
    if not (isinstance(cls, type) and issubclass(cls, Embedder)):
        raise ConfigError(f"embedder {name!r}: {cls!r} is not an Embedder subclass")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        if not overwrite:
            raise ConfigError(f"an embedder named {name!r} is already registered ({_REGISTRY[name].__name__})",
                              hint="pass overwrite=True to replace it")
        warnings.warn(f"overwriting embedder {name!r}", stacklevel=2)
    _REGISTRY[name] = cls


def list_embedders() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_embedder(spec: Any) -> Embedder:
    """Build an embedder from a name, a ``{"name": ..., **options}`` mapping, or an :class:`EmbedderSpec`."""
    _load_builtins()
    from memtrack.config import embedder_spec

    spec = embedder_spec(spec, "embedder")
    if spec.name not in _REGISTRY:
        raise ConfigError(f"unknown embedder {spec.name!r}", hint=f"available: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[spec.name]
    options = from_dict(cls.Options, dict(spec.options), f"embedder {spec.name} options")
    return cls(options)


def embedder_class(name: str) -> type[Embedder]:
    """The class registered under ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown embedder {name!r}", hint=f"available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


@functools.cache  # once: the built-ins register no more than once however often this is asked
def _load_builtins() -> None:
    # Each module imports its heavy dependencies (torch, open_clip, dlib) only when an embedder is built.
    from memtrack.embedders.clip import ClipEmbedder
    from memtrack.embedders import face_backends  # noqa: F401  (registers the ArcFace and FaceNet recognisers)
    from memtrack.embedders.face import FaceEmbedder
    from memtrack.embedders.pixel import PixelEmbedder
    from memtrack.embedders.sscd import SscdEmbedder

    for name, cls in {"pixel": PixelEmbedder, "clip": ClipEmbedder, "sscd": SscdEmbedder, "face": FaceEmbedder}.items():
        _REGISTRY.setdefault(name, cls)


__all__ = ["Embedder", "EmbedderOptions", "EmbedderSpec", "ReferenceVectors", "register_embedder", "get_embedder",
           "embedder_class", "list_embedders", "fingerprint_diff", "l2_normalise"]
