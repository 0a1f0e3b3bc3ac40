"""What a postgres unit leaves in the session recording: request, decision, approval, response.

The same four event types HTTP flows use (``recording/events.py``), one ``flow`` id per unit
(``pg-<session>-<n>``), so ``chaperone sessions replay`` shows a statement as one row:
``postgres:DELETE DELETE users ... SQL postgres://db:5432/shop | block | rule | -> ERROR 42501``.

* request: ``method`` ``SQL``, ``url`` ``postgres://host:port/database``, the action, the SQL
  text (detectors applied, bounded by the connection's ``recording.maxBodyBytes`` as a body),
  the parameters (at most :data:`MAX_PARAMS`, each cut to :data:`PARAM_CHARS` characters,
  detectors applied), and each statement's classification.
  When the pod's model asked for it, ``causedBy`` (:func:`link_statements`): the tool_use
  (``services.tool_uses``) whose input names the unit's tables and commands, as HTTP flows get
  it from the ToolUse addon - evidence, never read by a decision (docs/tool-use.md).
* decision: effect, rule, message, masks, and the refusal the agent got.
* approval: the ApprovalRequest, its state and approvers (when one was involved).
* response: ``status`` (the command tags, ``ERROR <SQLSTATE>``, or ``not run``), the row count
  (complete), the columns, and the first ``spec.postgres.maxRecordedRows`` rows (default 10)
  **after** masking, as the body.

Strict recording (the connection's ``recording.mode``, default strict): the request and
decision events must be in the spool before the statement is forwarded; if they cannot be
written the statement is refused (SQLSTATE 58000) - the same rule as HTTP flows.
"""

from __future__ import annotations

import json
from typing import Any

from ..flowctx import RecordingSettings
from ..policy.masking.detectors import DETECTOR_NAMES, resolve_rules
from ..policy.masking.spans import mask_text
from ..policy.model import Action, Identity
from ..recording.events import encode_body, new_event
from ..recording.flow_events import identity_of
from ..tool_use_ledger import ToolUseLedger, action_terms
from .decide import Verdict

__all__ = ["request_events", "response_event", "link_statements", "MAX_PARAMS", "PARAM_CHARS"]

MAX_PARAMS = 32
PARAM_CHARS = 256
_SQL_CAP = 65536
_RULES = resolve_rules(DETECTOR_NAMES)


def _masked(text: str) -> str:
    """Every built-in detector over a text that is recorded (SQL, parameters): a password in
    an INSERT is a secret in the recording too."""
    return mask_text(text.encode("utf-8", "surrogateescape"), _RULES).decode("utf-8", "replace")


def link_statements(ledger: ToolUseLedger, identity: Identity, actions: list[Action]) -> dict[str, Any] | None:
    """The ``causedBy`` of a unit: the pod's tool_use candidate best matching the terms of all
    its statements together (a unit is one thing the agent ran), or None. Cheap when the pod
    has no candidate (the common case: no LLM answer asked for anything lately)."""
    if not ledger.candidates(identity):
        return None
    terms = [t for a in actions for t in action_terms(a)]
    link = ledger.link(identity, terms)
    return link.to_event() if link is not None else None


def request_events(flow: str, *, identity: Identity, connection: str, url: str, sql: str,
                   params: list[str | None], verdict: Verdict, settings: RecordingSettings,
                   extended: bool, caused_by: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    who = identity_of(identity)
    limit = settings.body_limit if settings.body_limit else 0
    text = _masked(sql[: max(limit, 0) or _SQL_CAP])
    first = verdict.actions[0] if verdict.actions else None
    data: dict[str, Any] = {
        "method": "SQL", "url": url, "protocol": "postgres", "extended": extended,
        "connection": connection, "connectionType": "postgres",
        "action": ({"name": first.name if len(verdict.actions) == 1 else
                    "postgres:" + "+".join(a.postgres.statement for a in verdict.actions if a.postgres),
                    "summary": _masked(first.summary)} if first is not None else
                   {"name": "postgres:unparseable", "summary": _masked(sql[:200])}),
        "body": ({**(encode_body(text.encode()) or {}), "size": len(sql.encode("utf-8", "replace")),
                  **({"truncated": True} if len(text) < len(sql) else {})}
                 if limit else {"size": len(sql), "omitted": "recording.bodies is none"}),
        "statements": [{"statement": a.postgres.statement, "kind": a.postgres.kind,
                        "statements": list(a.postgres.statements), "tables": list(a.postgres.tables),
                        "functions": list(a.postgres.functions),
                        "whereMissing": a.postgres.where_missing, "opaque": a.postgres.opaque}
                       for a in verdict.actions if a.postgres is not None],
    }
    if caused_by is not None:
        data["causedBy"] = caused_by
    if params:
        data["parameters"] = [None if p is None else _masked(p[:PARAM_CHARS]) + ("..." if len(p) > PARAM_CHARS else "")
                              for p in params[:MAX_PARAMS]]
        if len(params) > MAX_PARAMS:
            data["parametersOmitted"] = len(params) - MAX_PARAMS
    events = [new_event("request", flow=flow, data=data, identity=who)]
    deciding = verdict.deciding
    decision: dict[str, Any] = {
        "effect": "block" if verdict.effect == "unparseable" else verdict.effect,
        "rule": ({"policy": deciding.rule.policy, "name": deciding.rule.rule}
                 if deciding is not None and deciding.rule is not None and verdict.effect != "allow"
                 else None),
        "message": deciding.message if deciding is not None else "",
    }
    if verdict.masks:
        decision["masks"] = [{"detectors": list(m.detectors), "fields": list(m.fields), "target": m.target,
                              "source": str(m.source) if m.source else None} for m in verdict.masks]
    if verdict.refusal is not None:
        decision["refused"] = verdict.refusal.get("C")
        decision["refusalMessage"] = verdict.refusal.get("M", "")
    events.append(new_event("decision", flow=flow, data=decision, identity=who))
    if verdict.approval is not None:
        events.append(new_event("approval", flow=flow, data=verdict.approval, identity=who))
    return events


def response_event(flow: str, *, identity: Identity, status: str, rows: int, columns: list[str],
                   sample: list[Any], masked: int, error: dict[str, str] | None,
                   duration_ms: float, sample_limit: int) -> dict[str, Any]:
    data: dict[str, Any] = {"status": status, "rows": rows, "columns": columns,
                            "sampleLimit": sample_limit, "durationMs": round(duration_ms, 3)}
    if sample:
        data["body"] = encode_body(json.dumps(sample, ensure_ascii=False, default=str).encode())
    if masked:
        data["maskedRows"] = masked
    if error:
        data["error"] = {"code": error.get("C", ""), "message": _masked(error.get("M", ""))}
    return new_event("response", flow=flow, data=data, identity=identity_of(identity))
