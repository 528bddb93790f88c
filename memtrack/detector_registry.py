"""The detector registry: every detector with what it is, where its definition holds, and how it runs.

A detector is a function ``fn(space_name, evidence, detectors_config) -> DetectorOutput`` registered for
the embedding space it needs (``"pixel"``), or for every cosine feature space (``space=None``, producing
``<space>_<name>`` metrics). Its spec carries everything about it: a description and citation, its
*regime* (plain words, shown in the report's detector card) with a ``check`` that returns the reason when
the evidence lies outside it -- then the detector reports "not applicable" and no rate -- and whether a
flag names a reproduced training image (``reproduction``: such flags count towards the distinct training
images reproduced and the per-seed trajectories). Built-ins register through :func:`register_detector`,
like any plug-in.

Example:
    >>> register_detector("my_test", "pixel", my_fn, "what it flags", citation="Doe et al. 2024")
    >>> outputs = run_detectors({"pixel": evidence}, config.detectors)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from .detectors import DetectorOutput, SpaceEvidence

Check = Callable[[str, SpaceEvidence, object], Optional[str]]


@dataclass
class DetectorSpec:
    """One registered detector (see the module docstring)."""

    name: str
    space: str | None            # the embedder space it needs; None = every cosine feature space
    fn: Callable[[str, SpaceEvidence, object], DetectorOutput]
    description: str = ""
    citation: str = ""
    regime: str = ""             # where the definition holds, in words
    check: Check | None = None   # the reason the evidence is outside the regime, or None
    reproduction: bool = False   # a flag names the training image it reproduces

    def metric(self, space: str) -> str:
        return self.name if self.space is not None else f"{space}_{self.name}"


_DETECTORS: dict[str, DetectorSpec] = {}


def register_detector(name: str, space: str | None, fn: Callable, description: str = "",
                      overwrite: bool = False, *, citation: str = "", regime: str = "", check: Check | None = None,
                      reproduction: bool = False) -> None:
    """Register a detector ``fn(space_name, evidence, detectors_config) -> DetectorOutput``.

    Args:
        space: the embedding space it needs (``"pixel"``), or None to run once on every cosine (feature)
            space, producing ``<space>_<name>`` metrics.
        citation: the paper the definition follows.
        regime: where the definition holds, in words (the report's detector card shows it).
        check: ``check(space, evidence, cfg) -> reason | None``; a reason makes the output "not applicable".
        reproduction: True when a flag names the training image that was reproduced.
    """
    if not re.match(r"^[a-z][a-z0-9_]{0,47}$", name):
        raise ValueError(f"detector name {name!r} must be a lowercase identifier")
    if name in _DETECTORS and not overwrite:
        raise ValueError(f"a detector named {name!r} is already registered")
    _DETECTORS[name] = DetectorSpec(name, space, fn, description, citation, regime, check, reproduction)


def _load_builtins() -> None:
    from . import detector_builtins, identity_index  # noqa: F401  (register themselves)


def list_detectors() -> list[str]:
    _load_builtins()
    return sorted(_DETECTORS)


def get_detector(metric: str) -> DetectorSpec | None:
    """The spec behind a metric name (``nn_ratio``, ``clip_copy`` -> ``copy``), or None."""
    _load_builtins()
    if metric in _DETECTORS:
        return _DETECTORS[metric]
    for spec in _DETECTORS.values():
        if spec.space is None and metric.endswith("_" + spec.name):
            return spec
    return None


def is_reproduction(metric: str) -> bool:
    """Whether a flag of ``metric`` names a reproduced training image."""
    spec = get_detector(metric)
    return bool(spec and spec.reproduction)


def _spaces_for(spec: DetectorSpec, evidence: dict[str, SpaceEvidence]) -> list[str]:
    if spec.space is not None:
        return [spec.space] if spec.space in evidence else []
    return [s for s, ev in evidence.items() if ev.metric == "cosine" and s != "face"]


def run_detectors(evidence: dict[str, SpaceEvidence], cfg) -> list[DetectorOutput]:
    """Run every registered detector whose space is present; returns one output per metric.

    A detector whose ``check`` finds the evidence outside its regime returns
    :meth:`DetectorOutput.not_applicable` with that reason instead of running.
    """
    _load_builtins()
    outputs = []
    for spec in _DETECTORS.values():
        for space in _spaces_for(spec, evidence):
            ev = evidence[space]
            reason = spec.check(space, ev, cfg) if spec.check is not None else None
            if reason:
                outputs.append(DetectorOutput.not_applicable(spec.metric(space), reason, len(ev.query)))
                continue
            outputs.append(spec.fn(space, ev, cfg))
    return outputs
