"""The detector registry: every detector with what it is, where its definition holds, and how it runs.

A detector is a function ``fn(space_name, evidence, detectors_config) -> DetectorOutput`` registered for
the embedding space it needs (``"pixel"``), or for every cosine feature space (``space=None``, producing
``<space>_<name>`` metrics). Its spec carries everything about it: a description and citation, its
*regime* (plain words, shown in the report's detector card) with a ``check`` that returns the reason when
the evidence lies outside it -- then the detector reports "not applicable" and no rate -- whether a
flag names a reproduced training image (``reproduction``: such flags count towards the distinct training
images reproduced and the per-seed trajectories), and where its threshold comes from (:class:`Provenance`).
Built-ins register through :func:`register_detector`, like any plug-in.

Threshold provenance is one of four words, shown beside every threshold in the report:

* ``published`` -- the paper's own value (with the citation): nn_ratio's 1/3, adaptive_l2's alpha = 0.5,
  n = 50, <= 1, SSCD's 0.5 (Somepalli et al.) or 0.7 (Wen et al.), dlib's 0.6;
* ``calibrated`` -- measured on this training set (says on what): CLIP's copy threshold from the train->train
  similarities, the identity threshold at a false-match rate;
* ``config`` -- set in the config to something other than the default (names the field);
* ``memtrack`` -- memtrack's own choice, not a published value: tiled_l2's 0.15 (the paper publishes none),
  the identity-interpolation ratio 0.6, nn_ratio_dedup's use of Gu et al.'s 1/3 on a deduplicated d2.

Example:
    >>> register_detector("my_test", "pixel", my_fn, "what it flags", citation="Doe et al. 2024")
    >>> outputs = run_detectors({"pixel": evidence}, config.detectors)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

from memtrack.detectors.types import SOURCES, Check, DetectorOutput, DetectorSpec, Provenance, SpaceEvidence  # noqa: F401

_DETECTORS: dict[str, DetectorSpec] = {}


def register_detector(name: str, space: str | None, fn: Callable, description: str = "",
                      overwrite: bool = False, *, citation: str = "", regime: str = "", check: Check | None = None,
                      reproduction: bool = False, provenance: Provenance | None = None,
                      label: str | dict = "") -> None:
    """Register a detector ``fn(space_name, evidence, detectors_config) -> DetectorOutput``.

    Args:
        space: the embedding space it needs (``"pixel"``), or None to run once on every cosine (feature)
            space, producing ``<space>_<name>`` metrics.
        citation: the paper the definition follows.
        regime: where the definition holds, in words (the report's detector card shows it).
        check: ``check(space, evidence, cfg) -> reason | None``; a reason makes the output "not applicable".
        reproduction: True when a flag names the training image that was reproduced.
        provenance: where its threshold comes from (:class:`Provenance`); None reports the output's own
            ``threshold_source`` (``config`` unless the detector sets it).
        label: the plain words reports use for its metric ("near-copies"); a detector of every feature space
            (``space=None``) gives ``{space: words}``, with ``"*"`` as a pattern for other spaces.
    """
    add_detector(DetectorSpec(name, space, fn, description, citation, regime, check, reproduction, provenance,
                              label), overwrite=overwrite)


def add_detector(spec: DetectorSpec, *, overwrite: bool = False) -> None:
    """Register a ready :class:`DetectorSpec` (what :func:`register_detector` builds from its arguments)."""
    _load_builtins()
    name = spec.name
    if not re.match(r"^[a-z][a-z0-9_]{0,47}$", name):
        raise ValueError(f"detector name {name!r} must be a lowercase identifier")
    if name in _DETECTORS and not overwrite:
        raise ValueError(f"a detector named {name!r} is already registered")
    _DETECTORS[name] = spec


@functools.cache  # once: the built-ins register no more than once however often this is asked
def _load_builtins() -> None:
    """Register every built-in detector: the pixel and copy tests, and the identity tests."""
    from memtrack.detectors.builtins import BUILTINS
    from memtrack.identity.space import IDENTITY_DETECTORS

    for spec in [*BUILTINS, *IDENTITY_DETECTORS]:
        _DETECTORS.setdefault(spec.name, spec)


def metric_labels() -> dict[str, str]:
    """``{metric: plain words}`` of every registered detector, in registration (reading) order."""
    _load_builtins()
    out: dict[str, str] = {}
    for spec in _DETECTORS.values():
        out.update(spec.labels())
    return out


def metric_label(metric: str) -> str:
    """The plain words of one metric ("" when its detector has none or is not registered)."""
    spec = get_detector(metric)
    if spec is None:
        return ""
    return spec.words(metric[: -len(spec.name) - 1] if spec.space is None else spec.space)


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
                na = DetectorOutput.not_applicable(spec.metric(space), reason, len(ev.query))
                if spec.provenance is not None:
                    na.threshold_source = spec.provenance.of(space, cfg, na)[0]
                outputs.append(na)
                continue
            out = spec.fn(space, ev, cfg)
            if spec.provenance is not None:
                out.threshold_source, detail = spec.provenance.of(space, cfg, out)
                if detail:
                    out.info["threshold_detail"] = detail
            outputs.append(out)
    return outputs


def threshold_info(out: DetectorOutput) -> dict:
    """The ``thresholds`` entry of one output: value, direction, source, citation, regime, applicability."""
    spec = get_detector(out.name)
    prov = spec.provenance if spec is not None else None
    entry = {"value": out.threshold if out.applicable else None, "direction": out.direction,
             "source": out.threshold_source,
             "citation": (prov.citation if prov is not None and prov.citation else (spec.citation if spec else "")),
             "regime": spec.regime if spec is not None else "", "applicable": bool(out.applicable)}
    if out.info.get("threshold_detail"):
        entry["detail"] = out.info["threshold_detail"]
    scalars = {k: v for k, v in out.info.items() if k != "threshold_detail" and isinstance(v, (int, float, str))}
    if scalars:
        entry["parameters"] = scalars
    if not out.applicable:
        entry["reason"] = out.reason
    return entry
