"""Gates for nightly jobs: ``--fail-on "nn_ratio.rate > 0.01"``.

Grammar (whitespace-insensitive): ``METRIC.FIELD OP VALUE`` where FIELD is one of ``rate``, ``ci_low``,
``ci_high``, ``count``, ``distinct`` (read from the latest checkpoint) or ``onset`` (the *confirmed* onset
step, or null: a provisional rise at the last checkpoints does not trip ``onset != null``); OP is one of ``> >= < <= == !=``; VALUE is a number or ``null``. No ``eval``: a hand-written parser,
so a gate string cannot run code.

A gate on a metric that is **not applicable** in this run (a detector outside its regime, e.g.
``adaptive_l2`` on fewer than 50 training images) is an error (:class:`GateError`, exit 2), like a field
the metric does not have: it could never trip, and passing silently would let a nightly job believe it
is guarded. The message gives the detector's reason; gate on an applicable detector instead.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Optional

from memtrack.errors import GateError

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
        "!=": operator.ne}
FIELDS = ("rate", "ci_low", "ci_high", "count", "distinct", "onset")
_GATE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\.([a-z_]+)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


@dataclass
class Gate:
    text: str
    metric: str
    field: str
    op: str
    value: Optional[float]

    def evaluate(self, summary: dict) -> tuple[bool, object]:
        """(tripped, observed value) on a summary dict."""
        observed = observe(summary, self.metric, self.field)
        if self.value is None or observed is None:
            if self.op not in ("==", "!="):
                return False, observed
            same = observed is None and self.value is None
            return (same if self.op == "==" else not same), observed
        return bool(_OPS[self.op](observed, self.value)), observed


def parse_gate(text: str) -> Gate:
    """Parse one ``--fail-on`` expression; :class:`GateError` names what is wrong."""
    if not isinstance(text, str) or len(text) > 200:
        raise GateError(f"gate {str(text)[:60]!r} is not a short expression like 'nn_ratio.rate > 0.01'")
    m = _GATE.match(text)
    if not m:
        raise GateError(f"cannot parse gate {text!r}",
                        hint="write METRIC.FIELD OP VALUE, e.g. 'nn_ratio.rate > 0.01' or 'identity_leak.onset != null'")
    metric, fld, op, raw = m.groups()
    if fld not in FIELDS:
        raise GateError(f"gate {text!r}: unknown field {fld!r}", hint=f"fields: {', '.join(FIELDS)}")
    if raw.lower() in ("null", "none"):
        value = None
        if op not in ("==", "!="):
            raise GateError(f"gate {text!r}: null can only be compared with == or !=")
    else:
        try:
            value = float(raw)
        except ValueError:
            raise GateError(f"gate {text!r}: {raw!r} is not a number or null") from None
        if not math.isfinite(value):
            raise GateError(f"gate {text!r}: the value must be finite")
    return Gate(text.strip(), metric, fld, op, value)


def observe(summary: dict, metric: str, fld: str):
    cks = sorted(summary.get("checkpoints", []), key=lambda c: c["step"])
    known = set(summary.get("onset", {}))
    for ck in cks:
        known.update(ck.get("metrics", {}))
    if metric not in known:
        raise GateError(f"gate names unknown metric {metric!r}",
                        hint=f"metrics in this run: {', '.join(sorted(known)) or 'none'}")
    latest = next((c["metrics"][metric] for c in reversed(cks) if metric in (c.get("metrics") or {})), {})
    on = summary.get("onset", {}).get(metric) or {}
    if latest.get("applicable") is False or on.get("applicable") is False:
        reason = latest.get("reason") or on.get("reason") or "outside the detector's regime"
        raise GateError(f"gate on {metric!r}: the metric is not applicable in this run ({reason})",
                        hint="a gate on it could never trip; gate on a detector that applies here")
    if fld == "onset":  # a confirmed onset only; a provisional rise (or an old unconfirmed step) is none
        return on.get("step") if on.get("confirmed", True) is not False else None
    if not cks:
        return None
    block = cks[-1].get("metrics", {}).get(metric, {})
    if block and fld not in block:  # e.g. distinct_train_images.rate: a gate that could never trip
        raise GateError(f"metric {metric!r} has no field {fld!r}",
                        hint=f"its fields: {', '.join(f for f in FIELDS if f in block or f == 'onset')}")
    return block.get(fld)


def check_gates(summary: dict, gates: list[str]) -> list[tuple[Gate, bool, object]]:
    """Parse every gate first (so a typo fails before anything is judged), then evaluate each."""
    parsed = [parse_gate(g) for g in gates]
    return [(g, *g.evaluate(summary)) for g in parsed]
