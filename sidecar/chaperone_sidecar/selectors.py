"""Kubernetes LabelSelector matching, shared by the webhook and the sidecar.

The webhook decides which ClaudeConnections a pod is given (``podSelector``) and the sidecar
checks again against the pod's live labels; one implementation keeps the two from ever
disagreeing. Standard library only, so the operator can import it without the sidecar's
dependencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics; an absent or empty selector matches every pod."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In":
            ok = present and labels[key] in values
        elif op == "NotIn":
            ok = not present or labels[key] not in values
        elif op == "Exists":
            ok = present
        elif op == "DoesNotExist":
            ok = not present
        else:  # unknown operator: the connection does not apply (fewer rights, never more)
            ok = False
        if not ok:
            return False
    return True
