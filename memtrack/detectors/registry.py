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
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

from memtrack.detectors.core import DetectorOutput, SpaceEvidence

Check = Callable[[str, SpaceEvidence, object], Optional[str]]
SOURCES = ("published", "calibrated", "config", "memtrack")


@dataclass
class Provenance:
    """Where a detector's threshold comes from (see the module docstring).

    Args:
        source: the source of the *default* value (``published``, ``calibrated`` or ``memtrack``).
        fields: the ``detectors.*`` config fields that set it; any of them changed from its default makes
            the source ``config``.
        citation: the paper (for ``published``), or what it is calibrated on.
        note: a sentence about the value (why memtrack chose it, how it is calibrated).
        resolve: ``resolve(space, cfg, output) -> (source, detail) | None`` for thresholds decided at run time
            (a calibration that may fall back); None keeps the rule above.
    """

    source: str
    fields: tuple = ()
    citation: str = ""
    note: str = ""
    resolve: Optional[Callable] = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"threshold source must be one of {', '.join(SOURCES)}, got {self.source!r}")

    def of(self, space: str, cfg, out: DetectorOutput) -> tuple[str, str]:
        """``(source, detail)`` of the threshold ``out`` applied under ``cfg``."""
        if self.resolve is not None:
            got = self.resolve(space, cfg, out)
            if got is not None:
                return got
        changed = [f for f in self.fields if not _same(getattr(cfg, f, None), _default(cfg, f))]
        if changed:
            return "config", "set in the config: " + ", ".join(f"detectors.{f} = {getattr(cfg, f)!r}" for f in changed)
        return self.source, self.note


def _default(cfg, name: str):
    for f in dataclasses.fields(type(cfg)) if dataclasses.is_dataclass(cfg) else ():
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return None


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
        except (TypeError, ValueError):
            return False
    return a == b


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
    provenance: Provenance | None = None  # where its threshold comes from (None: the caller's, "config")

    def metric(self, space: str) -> str:
        return self.name if self.space is not None else f"{space}_{self.name}"


_DETECTORS: dict[str, DetectorSpec] = {}


def register_detector(name: str, space: str | None, fn: Callable, description: str = "",
                      overwrite: bool = False, *, citation: str = "", regime: str = "", check: Check | None = None,
                      reproduction: bool = False, provenance: Provenance | None = None) -> None:
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
    """
    if not re.match(r"^[a-z][a-z0-9_]{0,47}$", name):
        raise ValueError(f"detector name {name!r} must be a lowercase identifier")
    if name in _DETECTORS and not overwrite:
        raise ValueError(f"a detector named {name!r} is already registered")
    _DETECTORS[name] = DetectorSpec(name, space, fn, description, citation, regime, check, reproduction, provenance)


def _load_builtins() -> None:
    from memtrack.detectors import builtins as detector_builtins
    from memtrack.identity import space as identity_index


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
