"""A flow's recorded events as one OCSF 1.8.0 **API Activity** (``class_uid`` 6003) event.

Why from the recorded events and not from the flow: the recording is the masked, redacted form
of a flow (``flow_events``: credential headers and query parameters ``[REDACTED]``, the
decision's detectors over the rest, bodies only as Mask captured them). Mapping *that* means a
SIEM can never receive more than the recording holds - no second place where a secret could
slip through. Bodies are left out altogether (they stay in the recording, which the event
points at by ``metadata.correlation_uid`` = session and ``unmapped.recording.seq``).

:class:`FlowEvents` collects a flow's ``request`` (with its ``decision``), ``decision`` (a
re-judgement) and ``approval`` events and, at its ``response`` or ``error`` event, yields the
OCSF event (:func:`api_activity`). Pure data in, data out; the exporter
(:mod:`.ocsf_export`) runs it in its own thread.

Mapping (docs/telemetry.md has the table):

* ``activity_id`` from the classified action: AWS operations by their verb (``Get``/``List``/
  ``Describe``/``Head`` read, ``Create``/``Put``/``Run`` ... create, ``Delete``/``Terminate``
  ... delete, any other verb - ``Update``, ``Modify``, ``Attach``, ``Stop``, ``Tag`` - update;
  ``Batch`` operations by their second word), Kubernetes verbs, MCP methods
  (``tools/call`` is 99 Other: running a tool is none of CRUD), git (fetch read, push update),
  else the HTTP method (GET/HEAD/OPTIONS read, POST create, PUT/PATCH update, DELETE delete).
* ``disposition_id``: 1 Allowed (forwarded), 2 Blocked (a block rule, a refused approval, an
  unproven grant ...), 8 Approved (released by an approval or a grant), 14 Delayed (deferred:
  an approval is pending), 27 Error (refused because Chaperone could not do its part:
  recording, credentials or the approval service unavailable, a response it could not mask).
* ``status_id`` 1 Success when the request reached the upstream and the answer is below 400,
  else 2 Failure (``status_code`` the HTTP status, ``status_detail`` the refusal or error).
* ``severity_id`` 1 Informational, 2 Low when an approval was involved, 3 Medium for a
  block or a refusal (a SIEM's rules assign alert priorities; these only sort).
* ``actor.user``: the end user (OIDC ``onBehalfOf``) else the pod's creator else the pod's
  ServiceAccount (``type_id`` 1 User / 4 Service); ``actor.invoked_by`` the ServiceAccount.

PostgreSQL statements (``connectionType`` ``postgres``, recorded by ``postgres/record.py``: one
flow per unit, ``method`` ``SQL``) map to the same class (:func:`_postgres`): the activity from
the commands of every statement (:func:`postgres_activity`), ``api.operation`` the action name
(``postgres:DELETE``), the disposition from the ``decision`` event (its ``refused`` is a
SQLSTATE there), ``status_code`` the SQLSTATE (``00000`` when it ran), no ``http_request``;
``api.request.data`` holds the SQL text as recorded (detectors applied) cut to
:data:`SQL_CHARS`, the classification and the parameter *count*; ``resources`` the tables.
**Decision**: never row values - not the recorded sample rows, not the parameters (an INSERT's
values), not the server's error text (it can quote a value): only the SQLSTATE.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

__all__ = ["OCSF_VERSION", "CLASS_UID", "api_activity", "activity_of", "postgres_activity",
           "FlowEvents"]

log = logging.getLogger("chaperone.ocsf")

OCSF_VERSION = "1.8.0"
CATEGORY_UID = 6  # Application Activity
CLASS_UID = 6003  # API Activity
PRODUCT = {"name": "Chaperone", "vendor_name": "Chaperone"}

CREATE, READ, UPDATE, DELETE, OTHER = 1, 2, 3, 4, 99
_ACTIVITY_NAMES = {CREATE: "Create", READ: "Read", UPDATE: "Update", DELETE: "Delete", OTHER: "Other"}
_DISPOSITIONS = {1: "Allowed", 2: "Blocked", 8: "Approved", 14: "Delayed", 27: "Error"}
_SEVERITIES = {1: "Informational", 2: "Low", 3: "Medium"}

_AWS_VERB = re.compile(r"[A-Z][a-z]+")
_AWS_READ = {"Get", "List", "Describe", "Head", "Search", "Select", "Lookup", "Query", "Scan",
             "Check", "Test", "Validate", "Estimate", "Download", "Filter", "Simulate"}
_AWS_CREATE = {"Create", "Put", "Run", "Start", "Add", "Register", "Import", "Upload", "Copy",
               "Allocate", "Issue", "Request", "Send", "Publish", "Invoke", "Generate", "Restore",
               "Complete", "Initiate", "Assume", "Subscribe"}
_AWS_DELETE = {"Delete", "Remove", "Terminate", "Deregister", "Release", "Revoke", "Abort",
               "Unsubscribe", "Untag", "Purge", "Destroy"}
_KUBE = {"get": READ, "list": READ, "watch": READ, "create": CREATE, "update": UPDATE,
         "patch": UPDATE, "delete": DELETE, "deletecollection": DELETE}
_HTTP = {"GET": READ, "HEAD": READ, "OPTIONS": READ, "POST": CREATE, "PUT": UPDATE,
         "PATCH": UPDATE, "DELETE": DELETE}
_MCP_READ = {"tools/list", "resources/list", "resources/read", "prompts/list", "prompts/get",
             "resources/templates/list", "ping", "completion/complete"}
# SQL commands (policy/classify/postgres.py) by what they do to data; the rest is 99 Other
_SQL_DELETE = {"DELETE", "TRUNCATE", "DROP", "REVOKE"}
_SQL_UPDATE = {"UPDATE", "MERGE", "ALTER", "GRANT", "COMMENT", "SECURITY LABEL", "REFRESH",
               "REINDEX", "CLUSTER", "REASSIGN OWNED"}
_SQL_CREATE = {"INSERT", "CREATE", "SELECT INTO", "IMPORT FOREIGN SCHEMA"}
_SQL_READ = {"SELECT", "SHOW", "EXPLAIN", "FETCH", "DECLARE"}
_SQL_RANK = (DELETE, UPDATE, CREATE, READ, OTHER)  # a unit's activity: the first that applies
SQL_CHARS = 2048  # of the recorded (masked) SQL text in api.request.data
_SQL_OK = "00000"  # SQLSTATE successful_completion


def activity_of(action: str, method: str, connection_type: str) -> int:
    """The OCSF activity of a classified action (see the module docstring)."""
    service, _, operation = action.partition(":")
    if connection_type == "aws" and operation:
        words = _AWS_VERB.findall(operation) or [""]
        verb = words[1] if words[0] == "Batch" and len(words) > 1 else words[0]  # BatchGetItem
        if verb in _AWS_READ:
            return READ
        if verb in _AWS_DELETE:
            return DELETE
        if verb in _AWS_CREATE:
            return CREATE
        return UPDATE if verb else OTHER
    if connection_type == "kubernetes" and operation:
        return _KUBE.get(operation.partition("/")[0], OTHER)
    if connection_type == "mcp" and operation:
        return READ if operation in _MCP_READ else OTHER
    if service == "git" or action.startswith("git:"):
        return UPDATE if "push" in operation else READ
    return _HTTP.get(method.upper(), OTHER)


def postgres_activity(statements: Any) -> int:
    """The OCSF activity of a recorded postgres unit (``request.data.statements``): the
    strongest of its commands, nested ones included (``WITH d AS (DELETE ...) SELECT`` deletes):
    Delete (DELETE, TRUNCATE, DROP, REVOKE) > Update (UPDATE, MERGE, ALTER, GRANT ...) > Create
    (INSERT, CREATE, COPY FROM) > Read (SELECT, SHOW, EXPLAIN, COPY TO) > Other (BEGIN, SET,
    DO, CALL, unparseable)."""
    found: set[int] = set()
    for statement in statements if isinstance(statements, list) else ():
        if not isinstance(statement, Mapping):
            continue
        kind = str(statement.get("kind") or "")
        names = statement.get("statements") or [statement.get("statement")]
        for name in names if isinstance(names, list) else ():
            name = str(name or "").upper()
            if name == "COPY":  # the direction is in the kind: COPY FROM writes, COPY TO reads
                found.add(CREATE if kind == "write" else READ if kind == "read" else OTHER)
            elif name in _SQL_DELETE:
                found.add(DELETE)
            elif name in _SQL_UPDATE:
                found.add(UPDATE)
            elif name in _SQL_CREATE:
                found.add(CREATE)
            elif name in _SQL_READ:
                found.add(READ)
            else:
                found.add(OTHER)
    return next((a for a in _SQL_RANK if a in found), OTHER)


def _ms(value: Any) -> int | None:
    """RFC 3339 (as the recorder writes it) -> ms since the epoch."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _actor(identity: Mapping[str, Any]) -> dict[str, Any]:
    namespace = str(identity.get("namespace") or "")
    sa = str(identity.get("serviceAccount") or "")
    sa_user = f"system:serviceaccount:{namespace}:{sa}" if sa else ""
    human = str(identity.get("onBehalfOf") or identity.get("creator") or "")
    actor: dict[str, Any] = {}
    if human:
        user: dict[str, Any] = {"name": human, "uid": human, "type_id": 1, "type": "User"}
        groups = identity.get("onBehalfOfGroups") if identity.get("onBehalfOf") else None
        if groups:
            user["groups"] = [{"name": str(g)} for g in groups]
        actor["user"] = user
    elif sa_user:
        actor["user"] = {"name": sa_user, "uid": sa_user, "type_id": 4, "type": "Service"}
    else:
        actor["app_name"] = "chaperone-sidecar"  # the proxy itself (no identity was known)
    if sa_user:
        actor["invoked_by"] = sa_user
    return actor


def _headers(headers: Any) -> list[dict[str, str]]:
    out = []
    for pair in headers or ():
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            out.append({"name": str(pair[0]), "value": str(pair[1])})
    return out


def _disposition(effect: str, refused: str, approval: Mapping[str, Any] | None) -> int:
    if refused:
        if refused == "chaperone_approval_pending":  # deferred: retried once approved
            return 14
        if refused in ("chaperone_recording_unavailable", "chaperone_credentials_unavailable",
                       "chaperone_approval_unavailable", "chaperone_response_unmaskable"):
            return 27
        return 2
    if approval is not None and approval.get("state") in ("approved", "granted"):
        return 8
    if effect == "block":
        return 2
    return 1


def api_activity(request: Mapping[str, Any], end: Mapping[str, Any],
                 extra: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """One OCSF API Activity event from a flow's recorded ``request`` event, its ``response`` or
    ``error`` event and the ``decision``/``approval`` events in between (sealed or not)."""
    req = request.get("data") or {}
    data = end.get("data") or {}
    identity = request.get("identity") or end.get("identity") or {}
    decision: Mapping[str, Any] = req.get("decision") or {}
    approval: Mapping[str, Any] | None = None
    for other in extra:
        if other.get("type") == "decision":
            decision = other.get("data") or decision
        elif other.get("type") == "approval":
            approval = other.get("data") or {}
    action = req.get("action") or {}
    action_name = str(action.get("name") or f"http:{req.get('method', '')}")
    connection_type = str(req.get("connectionType") or "")
    method = str(req.get("method") or "")
    postgres = connection_type == "postgres"
    activity = postgres_activity(req.get("statements")) if postgres else \
        activity_of(action_name, method, connection_type)
    refused = str(data.get("refused") or decision.get("refused") or "")
    effect = str(decision.get("effect") or "")
    disposition = _postgres_disposition(effect, refused, approval, data) if postgres else \
        _disposition(effect, refused, approval)
    is_error = end.get("type") == "error"
    status_code = data.get("status")
    success = not refused and not is_error and isinstance(status_code, int) and status_code < 400
    if postgres:
        success = not refused and not is_error and isinstance(status_code, str) and \
            not status_code.startswith("ERROR") and status_code != "not run"
    severity = 3 if disposition in (2, 27) else 2 if approval is not None else 1
    url = str(req.get("url") or "")
    split = urlsplit(url)
    start = _ms(request.get("time"))
    end_ms = _ms(end.get("time")) or start
    when = start or end_ms or 0
    service = action_name.partition(":")[0] if ":" in action_name else connection_type or "http"
    api: dict[str, Any] = {"operation": action_name, "service": {"name": service},
                           "request": {"uid": str(end.get("flow") or request.get("flow") or "")}}
    if isinstance(status_code, int):
        api["response"] = {"code": status_code}
    http_request: dict[str, Any] = {
        "http_method": method,
        "url": {k: v for k, v in {
            "url_string": url, "scheme": split.scheme, "hostname": split.hostname or "",
            "port": split.port, "path": split.path or "/", "query_string": split.query,
        }.items() if v not in (None, "")},
        "version": str(req.get("httpVersion") or ""),
        "http_headers": _headers(req.get("headers")),
    }
    for pair in http_request["http_headers"]:
        if pair["name"].lower() == "user-agent":
            http_request["user_agent"] = pair["value"]
    event: dict[str, Any] = {
        "class_uid": CLASS_UID, "class_name": "API Activity",
        "category_uid": CATEGORY_UID, "category_name": "Application Activity",
        "activity_id": activity, "activity_name": _ACTIVITY_NAMES[activity],
        "type_uid": CLASS_UID * 100 + activity,
        "type_name": f"API Activity: {_ACTIVITY_NAMES[activity]}",
        "time": when,
        "severity_id": severity, "severity": _SEVERITIES[severity],
        "status_id": 1 if success else 2, "status": "Success" if success else "Failure",
        "disposition_id": disposition, "disposition": _DISPOSITIONS[disposition],
        "action_id": 2 if disposition in (2, 14, 27) else 1,
        "action": "Denied" if disposition in (2, 14, 27) else "Allowed",
        "message": str(action.get("summary") or f"{method} {url}"),
        "actor": _actor(identity),
        "api": api,
        "src_endpoint": {k: v for k, v in {
            "name": identity.get("pod") or "chaperone-local", "uid": identity.get("podUID"),
            "hostname": identity.get("pod"),
        }.items() if v},
        "dst_endpoint": {k: v for k, v in {
            "hostname": split.hostname, "port": split.port or (443 if split.scheme == "https" else
                                                            80 if split.scheme == "http" else None),
            "svc_name": req.get("connection"),
        }.items() if v},
        "http_request": {k: v for k, v in http_request.items() if v not in ("", [], None)},
        "metadata": {
            "version": OCSF_VERSION, "product": dict(PRODUCT),
            "uid": str(end.get("flow") or request.get("flow") or ""),
            "log_name": "chaperone.flows",
            "profiles": ["security_control"],
        },
        "unmapped": {},
    }
    if start is not None and end_ms is not None:
        event["start_time"], event["end_time"] = start, end_ms
        event["duration"] = max(0, end_ms - start)
    if isinstance(status_code, int):
        event["status_code"] = str(status_code)
        event["http_response"] = {"code": status_code}
        if data.get("reason"):
            event["http_response"]["message"] = str(data["reason"])
        if isinstance(data.get("upstreamLatencyMs"), int):
            event["http_response"]["latency"] = data["upstreamLatencyMs"]
    detail = refused or (str(data.get("message") or "") if is_error else "")
    if detail:
        event["status_detail"] = detail
    session = end.get("session") or request.get("session")
    if session:
        event["metadata"]["correlation_uid"] = str(session)
    if isinstance(end.get("seq"), int):
        event["metadata"]["sequence"] = end["seq"]
    rule = decision.get("rule") or None
    if isinstance(rule, Mapping) and rule.get("policy"):
        event["policy"] = {"name": str(rule["policy"]), "uid": f"{rule['policy']}#{rule.get('name', '')}",
                           "is_applied": True,
                           "data": {"rule": rule.get("name"), "effect": effect}}
        if decision.get("message"):
            event["policy"]["desc"] = str(decision["message"])
    unmapped = event["unmapped"]
    unmapped["chaperone"] = {k: v for k, v in {
        "connection": req.get("connection"), "connectionType": connection_type or None,
        "effect": effect or None, "refused": refused or None,
        "approval": {k: v for k, v in (approval or {}).items() if v} or None,
        "masked": data.get("masked") or None, "causedBy": req.get("causedBy"),
        "identity": dict(identity) or None,
        "recording": {"session": session, "seq": end.get("seq")} if session else None,
    }.items() if v is not None}
    if postgres:
        _postgres(event, req, data, decision, success)
    return event


def _postgres_disposition(effect: str, refused: str, approval: Mapping[str, Any] | None,
                          end: Mapping[str, Any]) -> int:
    """Disposition of a postgres unit: its ``decision`` event's effect and refusal (a
    SQLSTATE), its ``approval`` event, and the response's error code."""
    state = (approval or {}).get("state")
    error: Mapping[str, Any] = end["error"] if isinstance(end.get("error"), Mapping) else {}
    if str(error.get("code") or "") == "58000" or (effect == "require_approval" and refused
                                                    and approval is None):
        return 27  # recording unavailable (strict), or no approval service (fail closed)
    if refused:
        return 14 if state == "pending" else 2
    if state in ("approved", "granted"):
        return 8
    return 2 if effect in ("block", "rate_limited") else 1


def _postgres(event: dict[str, Any], req: Mapping[str, Any], data: Mapping[str, Any],
              decision: Mapping[str, Any], success: bool) -> None:
    """The postgres parts of an API Activity event (module docstring): SQL, not HTTP."""
    event.pop("http_request", None)
    statements = [s for s in req.get("statements") or () if isinstance(s, Mapping)]
    request: dict[str, Any] = {"statements": [
        {k: s.get(k) for k in ("statement", "kind", "statements", "tables", "functions",
                               "whereMissing", "opaque") if s.get(k) not in (None, [], False)}
        for s in statements]}
    body: Mapping[str, Any] = req["body"] if isinstance(req.get("body"), Mapping) else {}
    text = body.get("text")
    if isinstance(text, str):
        request["sql"] = text[:SQL_CHARS]
        if len(text) > SQL_CHARS or body.get("truncated"):
            request["sqlTruncated"] = True
    if req.get("parameters"):
        request["parameters"] = len(req["parameters"]) + int(req.get("parametersOmitted") or 0)
    event["api"]["request"]["data"] = request
    error: Mapping[str, Any] = data["error"] if isinstance(data.get("error"), Mapping) else {}
    status = data.get("status")
    response: dict[str, Any] = {}
    if isinstance(status, str) and status:
        response["message"] = status  # command tags (DELETE 3), ERROR <SQLSTATE>, not run
    if error.get("code"):
        response["error"] = str(error["code"])
    if response:
        event["api"]["response"] = response
    event["status_code"] = str(error.get("code") or "") or (_SQL_OK if success else "")
    if not event["status_code"]:
        del event["status_code"]
    if decision.get("refusalMessage"):  # Chaperone's own refusal text (names the rule)
        event["status_detail"] = str(decision["refusalMessage"])[:1024]
    if isinstance(data.get("rows"), int):
        event["unmapped"]["chaperone"]["rows"] = data["rows"]
    tables = list(dict.fromkeys(t for s in statements for t in s.get("tables") or () if isinstance(t, str)))
    if tables:
        url = urlsplit(str(req.get("url") or ""))
        event["resources"] = [{"name": t, "type": "table", **({"namespace": url.path.strip("/")}
                                                               if url.path.strip("/") else {})}
                              for t in tables[:32]]


class FlowEvents:
    """Pairs each flow's recorded events; :meth:`add` returns the OCSF events of the flows that
    ended. At most ``limit`` flows wait for their end (the oldest is dropped, counted in
    ``orphaned``): a flow whose end was never recorded must not grow memory."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.pending: OrderedDict[str, list[Mapping[str, Any]]] = OrderedDict()
        self.orphaned = 0
        self.failed = 0

    def add(self, events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for event in events:
            flow = event.get("flow")
            kind = event.get("type")
            if not flow or kind not in ("request", "decision", "approval", "response", "error"):
                continue
            if kind in ("response", "error"):
                seen = self.pending.pop(flow, [])
                request = next((e for e in seen if e.get("type") == "request"), None)
                if request is None:
                    continue  # its request was never seen (recording off for it, or dropped)
                try:
                    out.append(api_activity(request, event, [e for e in seen if e is not request]))
                except Exception:  # one odd flow must not cost the others of its batch
                    self.failed += 1
                    log.exception("mapping flow %s to OCSF failed", flow)
                continue
            self.pending.setdefault(flow, []).append(event)
            if len(self.pending) > self.limit:
                self.pending.popitem(last=False)
                self.orphaned += 1
        return out
