"""What ``kubectl chaperone`` prints: tables, the approver's view of one request, decision results.

PURE (objects and the clock in, text out) so every line an approver reads is unit-tested without
an apiserver. Phase and approval counts come from :func:`approval_status.desired_status`, the
function the operator writes ``status`` with, so the plugin agrees with the operator even
before the operator has caught up (status is written asynchronously).

Why everything shown is passed through :func:`clean`: summaries, paths, resources and body
previews are derived from the *agent's* request. An agent that can put terminal escape sequences
or bidirectional-override characters into what the approver reads could make a dangerous action
look harmless; control and format characters are therefore printed escaped, never interpreted.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from chaperone_sidecar.api import GROUP, KIND_APPROVAL_REQUEST
from chaperone_sidecar.timefmt import parse_rfc3339

from .approval_status import desired_status
from .approvals import APPROVED, PENDING, describe_approvers

__all__ = [
    "TABLE_COLUMNS", "clean", "decision_result", "describe", "human_duration", "phase_of",
    "requester_of", "sort_requests", "table", "table_rows",
]

TABLE_COLUMNS = ("NAME", "REQUESTER", "ACTION", "PHASE", "APPROVALS", "EXPIRES-IN")
ACTION_WIDTH = 60  # the summary column is cut here; `show` prints it whole
KIND = f"{KIND_APPROVAL_REQUEST.lower()}.{GROUP}"  # kubectl's TYPE/NAME form
LABEL_WIDTH = 20  # `show`: values start in this column


def clean(value: Any, *, multiline: bool = False) -> str:
    """``value`` as text with control/format characters escaped (``\\x1b``, ``\\u202e``).

    Newlines survive only with ``multiline`` (the body preview); tabs become a space.
    """
    text = "" if value is None else str(value)
    out = []
    for ch in text:
        if ch == "\n" and multiline:
            out.append(ch)
        elif ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def human_duration(seconds: float) -> str:
    """kubectl-style age: 45s, 4m12s, 2h5m, 3d4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60}m" if (s % 3600) // 60 else f"{s // 3600}h"
    return f"{s // 86400}d{(s % 86400) // 3600}h" if (s % 86400) // 3600 else f"{s // 86400}d"


def _spec(obj: Mapping) -> dict:
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def _meta(obj: Mapping) -> dict:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def phase_of(obj: Mapping, now: dt.datetime) -> tuple[str, str]:
    """(phase, "given/needed") as the operator computes them from spec and clock."""
    status = desired_status(obj, now)
    return status["phase"], status["approvals"]


def requester_of(spec: Mapping) -> str:
    """The person the action is attributable to: on-behalf-of, else the pod creator, else the
    pod's service account (``system:serviceaccount:ns:name`` shortened to ``sa:ns/name``)."""
    req = spec.get("requester") or {}
    if req.get("onBehalfOf"):
        return str(req["onBehalfOf"])
    if req.get("creator"):
        return str(req["creator"])
    sa = str(req.get("serviceAccount") or "")
    parts = sa.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return f"sa:{parts[2]}/{parts[3]}"
    return sa or "-"


def sort_requests(items: Iterable[Mapping], now: dt.datetime) -> list[Mapping]:
    """Pending first (soonest deadline first), then the rest (most recently requested first)."""
    def key(obj: Mapping):
        spec = _spec(obj)
        pending = phase_of(obj, now)[0] == PENDING
        if pending:
            expires = parse_rfc3339(spec.get("expiresAt")) or dt.datetime.max.replace(tzinfo=dt.UTC)
            return (0, expires.timestamp(), _meta(obj).get("name", ""))
        requested = parse_rfc3339(spec.get("requestedAt"))
        return (1, -(requested.timestamp() if requested else 0), _meta(obj).get("name", ""))
    return sorted(items, key=key)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def table_rows(items: Iterable[Mapping], now: dt.datetime, *,
               with_namespace: bool = False) -> list[list[str]]:
    """One row per request in TABLE_COLUMNS order (NAMESPACE first with ``-A``)."""
    rows = []
    for obj in items:
        spec = _spec(obj)
        phase, approvals = phase_of(obj, now)
        expires = parse_rfc3339(spec.get("expiresAt"))
        if phase == PENDING and expires is not None:
            expires_in = human_duration((expires - now).total_seconds())
        else:
            expires_in = "-"
        action = (spec.get("action") or {}).get("summary") or (spec.get("action") or {}).get("name")
        row = [clean(_meta(obj).get("name", "")), clean(requester_of(spec)),
               _cut(clean(action or "-"), ACTION_WIDTH), phase, approvals, expires_in]
        if with_namespace:
            row.insert(0, clean(_meta(obj).get("namespace", "")))
        rows.append(row)
    return rows


def table(headers: Iterable[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by three spaces, like kubectl's printer."""
    headers = list(headers)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["   ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
             for line in [headers, *rows]]
    return "\n".join(lines) + "\n"


def _when(value: Any, now: dt.datetime) -> str:
    when = parse_rfc3339(value)
    if when is None:
        return clean(value) if value else "-"
    delta = (when - now).total_seconds()
    rel = f"in {human_duration(delta)}" if delta > 0 else f"{human_duration(-delta)} ago"
    return f"{clean(value)} ({rel})"


def describe(obj: Mapping, now: dt.datetime) -> str:
    """Everything an approver needs to decide one request, and how to decide it."""
    meta, spec = _meta(obj), _spec(obj)
    name, ns = clean(meta.get("name", "")), clean(meta.get("namespace", ""))
    req = spec.get("requester") or {}
    pod = req.get("pod") or {}
    action = spec.get("action") or {}
    rule = spec.get("rule") or {}
    grant = spec.get("grant") or {}
    phase, approvals = phase_of(obj, now)
    lines: list[str] = []

    def field(label: str, value: Any, indent: int = 0) -> None:
        lines.append(f"{' ' * indent}{label + ':':<{LABEL_WIDTH - indent}}{value}")

    field("Name", name)
    field("Namespace", ns)
    field("Phase", f"{phase} ({approvals} approvals)")
    field("Requested", _when(spec.get("requestedAt"), now))
    field("Expires", _when(spec.get("expiresAt"), now))
    lines.append("Requester:")
    field("Service account", clean(req.get("serviceAccount") or "-"), 2)
    pod_text = f"{clean(pod.get('namespace', ''))}/{clean(pod.get('name', ''))}"
    field("Pod", pod_text + (f" (uid {clean(pod['uid'])})" if pod.get("uid") else ""), 2)
    field("Pod created by", clean(req.get("creator") or "-"), 2)
    field("On behalf of", clean(req.get("onBehalfOf") or "-"), 2)
    if req.get("groups"):
        field("Groups", clean(", ".join(map(str, req["groups"]))), 2)
    field("Connection", clean(spec.get("connection") or "-"))
    if spec.get("sessionID"):
        field("Session", clean(spec["sessionID"]))
    lines.append("Action:")
    field("Summary", clean(action.get("summary") or "-"), 2)
    field("Name", clean(action.get("name") or "-"), 2)
    for label, key in (("Method", "method"), ("Host", "host"), ("Path", "path")):
        if action.get(key):
            field(label, clean(action[key]), 2)
    if action.get("resources"):
        field("Resources", clean(", ".join(map(str, action["resources"]))), 2)
    field("Request digest", clean(spec.get("requestDigest") or "-"), 2)
    if action.get("bodyPreview"):
        lines.append("  Body preview (masked):")
        lines.extend("    " + line for line in clean(action["bodyPreview"], multiline=True).split("\n"))
    field("Rule", f"{clean(rule.get('name', '-'))} (policy {clean(rule.get('policy', '-'))})")
    field("Approvers", clean(describe_approvers(spec)))
    field("Needs", f"{spec.get('minApprovals') or 1} distinct approval(s); any denial is final")
    if grant:
        field("Grant", f"scope {clean(grant.get('scope', 'exact'))} for "
                       f"{human_duration(grant.get('ttlSeconds', 900) or 0)}")
    reviews = [r for r in spec.get("reviews") or () if isinstance(r, dict)]
    if reviews:
        lines.append("Reviews:")
        for r in reviews:
            text = f"  {clean(r.get('user'))}: {clean(r.get('decision'))} at {clean(r.get('time'))}"
            if r.get("reason"):
                text += f" ({clean(r['reason'])})"
            lines.append(text)
    if spec.get("decision"):
        text = f"{clean(spec['decision'])} by {clean(spec.get('decidedBy') or '?')}"
        if spec.get("decidedAt"):
            text += f" at {clean(spec['decidedAt'])}"
        if spec.get("reason"):
            text += f" ({clean(spec['reason'])})"
        field("Decision", text)
    if phase == PENDING:
        lines.append("To decide:")
        lines.append(f"  kubectl chaperone approve {name} -n {ns} [--reason TEXT]")
        lines.append(f"  kubectl chaperone deny {name} -n {ns} [--reason TEXT]")
        lines.append(f"  (same as: kubectl patch ar {name} -n {ns} --type=merge "
                     "-p '{\"spec\":{\"decision\":\"Approved\"}}')")
    return "\n".join(lines) + "\n"


def decision_result(obj: Mapping, asked: str) -> str:
    """One line on what the apiserver stored after ``asked`` (Approved/Denied) was patched."""
    meta, spec = _meta(obj), _spec(obj)
    ref = f"{KIND}/{clean(meta.get('name', ''))}"
    decision = spec.get("decision")
    if decision:
        return f"{ref} {clean(decision)} by {clean(spec.get('decidedBy') or '?')}"
    reviews = [r for r in spec.get("reviews") or () if isinstance(r, dict)]
    approved = [clean(r.get("user")) for r in reviews if r.get("decision") == APPROVED]
    needed = spec.get("minApprovals") or 1
    if asked == APPROVED and approved:
        more = max(0, needed - len(approved))
        return (f"{ref}: {len(approved)}/{needed} approvals recorded ({', '.join(approved)}); "
                f"waiting for {more} more approver(s)")
    return (f"{ref}: patched, but no decision or review was recorded "
            "(is the Chaperone operator's admission webhook registered?)")
