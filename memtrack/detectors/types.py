"""The detectors' vocabulary: what a detector receives, what it returns, and what it says about itself.

Imports nothing of memtrack, so every layer (identity, index, the registry) can share it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import numpy as np


@dataclass
class DetectorOutput:
    """Per-sample result of one detector.

    Attributes:
        name: metric name (``nn_ratio``, ``tiled_l2``, ``clip_copy``, ...).
        score: ``[n]`` the detector's statistic (NaN where a sample was not judged).
        flagged: ``[n]`` verdicts (False where a sample was not judged).
        match: ``[n]`` the training row each sample was matched to (-1 for none).
        threshold: the threshold applied; ``direction`` says whether low or high scores are flagged.
        extra: further ``[n]`` arrays (e.g. d1 and d2).
        threshold_source: ``published`` / ``calibrated`` / ``config`` / ``memtrack`` (see the registry).
        applicable: False when the detector is outside its defined regime (then no rate is reported).
        reason: why it is not applicable.
        judged: ``[n]`` False for samples that got no verdict (None: every sample was judged).
        not_judged: ``{reason: count}`` for the samples that got no verdict.
        info: scalars about how the verdict was reached (e.g. a calibrated near-duplicate distance).
    """

    name: str
    score: np.ndarray
    flagged: np.ndarray
    match: np.ndarray
    threshold: float
    direction: Literal["below", "above"]
    extra: dict = field(default_factory=dict)
    threshold_source: str = "config"
    applicable: bool = True
    reason: str | None = None
    judged: np.ndarray | None = None
    not_judged: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # scalars the report shows beside the threshold

    @classmethod
    def not_applicable(cls, name: str, reason: str, n: int, direction: Literal["below", "above"] = "below"
                       ) -> "DetectorOutput":
        """The output of a detector outside its regime: no score, no verdict, the reason."""
        return cls(name, np.full(n, np.nan), np.zeros(n, bool), np.full(n, -1, np.int64), float("nan"),
                   direction, applicable=False, reason=reason, judged=np.zeros(n, bool))

    def judged_mask(self) -> np.ndarray:
        """``[n]`` True for the samples that got a verdict."""
        return np.ones(len(self.score), bool) if self.judged is None else np.asarray(self.judged, bool)

    def to_dict(self) -> dict:
        return {"name": self.name, "score": self.score.tolist(), "flagged": self.flagged.tolist(),
                "match": self.match.tolist(), "threshold": self.threshold, "direction": self.direction,
                "extra": {k: np.asarray(v).tolist() for k, v in self.extra.items()},
                "threshold_source": self.threshold_source, "applicable": self.applicable, "reason": self.reason,
                "judged": self.judged_mask().tolist(), "not_judged": dict(self.not_judged), "info": dict(self.info)}


@dataclass
class SpaceEvidence:
    """What the index returned for one embedding space: queries and their candidates.

    ``cand_ids`` holds training-record *rows* (-1 = no candidate; that slot's vector is meaningless), one
    or more candidates per row (views); ``n_rows`` is the number of training images in the space.
    """

    metric: str
    query: np.ndarray          # [n, d]
    cand_ids: np.ndarray       # [n, k] training rows, -1 = no candidate
    cand_vecs: np.ndarray      # [n, k, d]
    image_shape: tuple | None = None  # (C, H, W) for pixel spaces
    extra: dict = field(default_factory=dict)  # space-specific inputs (identities, thresholds, ...)
    n_rows: int | None = None  # training images in the space


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
    label: str | dict = ""  # plain words for reports; for space=None detectors {space: words, "*": "... {space}"}

    def metric(self, space: str) -> str:
        return self.name if self.space is not None else f"{space}_{self.name}"

    def words(self, space: str) -> str:
        """The plain-words name of this detector's metric in ``space`` ("" when it has none)."""
        if isinstance(self.label, dict):
            return self.label.get(space) or self.label.get("*", "").format(space=space)
        return self.label

    def labels(self) -> dict[str, str]:
        """``{metric: words}`` this detector names, in reading order (a feature-space detector: per known space)."""
        if self.space is not None:
            return {self.name: self.label} if self.label else {}
        if isinstance(self.label, dict):
            return {self.metric(s): w for s, w in self.label.items() if s != "*"}
        return {}
