"""Kubernetes-style status conditions, merged so lastTransitionTime only moves on real changes.

Shared by the AccessPolicy and ClaudeConnection status handlers; pure (the clock is passed in).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

__all__ = ["condition", "merge_conditions", "status_differs"]


def condition(type_: str, ok: bool | None, reason: str, message: str,
              generation: int | None = None) -> dict:
    """A condition without its transition time (``ok`` None means Unknown)."""
    cond: dict[str, str | int] = {"type": type_, "status": "Unknown" if ok is None else ("True" if ok else "False"),
            "reason": reason, "message": message}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def merge_conditions(existing: Iterable[Mapping] | None, wanted: Iterable[dict],
                     now: dt.datetime) -> list[dict]:
    """``wanted`` conditions, keeping each one's lastTransitionTime while its status is unchanged."""
    old = {c.get("type"): c for c in existing or () if isinstance(c, Mapping)}
    stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = []
    for cond in wanted:
        prev = old.get(cond["type"])
        keep = prev is not None and prev.get("status") == cond["status"] and prev.get("lastTransitionTime")
        out.append({**cond, "lastTransitionTime": prev["lastTransitionTime"] if prev is not None and keep else stamp})
    return out


def status_differs(current: Mapping | None, desired: Mapping) -> bool:
    """True when patching ``desired`` into ``current`` would change anything that matters.

    Conditions are compared without lastTransitionTime (merge_conditions keeps it stable).
    """
    current = current or {}
    for key, value in desired.items():
        if key == "conditions":
            if _strip(current.get(key)) != _strip(value):
                return True
        elif current.get(key) != value:
            return True
    return False


def _strip(conditions) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions or ()]
