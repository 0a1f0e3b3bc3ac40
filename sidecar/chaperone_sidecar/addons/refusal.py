"""Refusals: the JSON answer an agent gets instead of a forwarded request.

Every addon that refuses a flow builds its answer here, so an LLM agent sees one shape whatever
refused it, and can act on it without knowing Chaperone's internals::

    {
      "error": "chaperone_blocked",              # "chaperone_" + kind
      "message": "Deleting buckets needs a human",  # the rule's message, or a default
      "rule": {"policy": "team-a/s3", "name": "no-delete"},  # null when no rule decided
      "action": {"name": "s3:DeleteBucket",      # the action as classified ("" if unknown)
                 "summary": "delete S3 bucket logs",
                 "connection": "aws-prod"},       # "" when no connection covers the host
      "how_to_get_access": "..."                 # what to do next, naming policy/approvers
      ...                                        # kind-specific fields, see KINDS
    }

The response carries ``Content-Type: application/json``, ``X-Chaperone-Refused: <kind>`` and
``Cache-Control: no-store``; a rate-limit refusal also ``Retry-After``. So that the agent's own
client shows *why* (kubectl, the AWS CLI hide bodies they cannot decode), fields are added - never
removed - by connection type (see :func:`for_client`): a kubernetes refusal is also a
``metav1.Status``; an AWS json/rest-json refusal carries ``__type``; AWS refusals set
``x-amzn-ErrorType`` and ``X-Chaperone-Reason``. A git smart-HTTP request (``Action.git``)
is answered in git's wire format instead (:func:`git_response`: a report-status with
``ng <ref> <reason>`` for a push, an ``ERR`` pkt-line otherwise; docs/git.md), and the JSON
body is what ``FlowContext.refused`` keeps for the recording. A refused MCP request with JSON-RPC
ids is answered HTTP 200 with a JSON-RPC error per request (code -32030, the refusal in
``error.data``; :mod:`chaperone_sidecar.mcpwire` says why). Setting
``flow.response`` in a ``request``/``requestheaders`` hook makes mitmproxy answer the client
itself: the upstream is never contacted. A request refused in ``requestheaders`` whose body
was going to stream is switched back to reading the body (mitmproxy cannot answer a request it
streams, it raises): the body is read and dropped, then the refusal is sent. **Caveat**
(mitmproxy 11 and 12): once such a body grows past ``stream_large_bodies`` while being read,
mitmproxy tries to stream it again and logs "mitmproxy has crashed!" (about once per
``stream_large_bodies`` of body); the data is dropped, nothing reaches the upstream and the
refusal still arrives at the end of the body. The body is also stored in
``FlowContext.refused`` for the recorder and telemetry.

Kinds and their status codes (``KINDS``): ``blocked`` 403, ``rate_limited`` 429,
``approval_pending`` / ``approval_denied`` / ``approval_expired`` 403,
``approval_unavailable`` 503, ``no_connection`` 403, ``unauthenticated`` 401,
``recording_unavailable`` 503, ``credentials_unavailable`` 503, ``invalid_request`` 400,
``response_unmaskable`` 502 (Mask: the upstream's response could not be masked, so it was
withheld - the request itself *was* forwarded; this replaces a response, see :mod:`.mask`).
**Decision**: 403 (not 202 or 409) for a pending approval, as the design fixes it: agents and
SDKs treat 403 as "do not blindly retry", which is what we want until a human decided; the body
says when and how to retry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mitmproxy import http

from .. import flowctx
from ..gitwire import err_pkt, report_status, sideband_error
from ..mcpwire import jsonrpc_refusal
from ..policy.model import Action, GitAction, RuleRef

__all__ = ["KINDS", "HEADER", "build", "make_response", "refuse", "for_client", "rule_info",
           "action_info", "default_guidance", "git_response"]

HEADER = "X-Chaperone-Refused"

KINDS: Mapping[str, int] = {
    "blocked": 403,
    "rate_limited": 429,
    "approval_pending": 403,
    "approval_denied": 403,
    "approval_expired": 403,
    "approval_unavailable": 503,
    "no_connection": 403,
    "unauthenticated": 401,
    "recording_unavailable": 503,
    "credentials_unavailable": 503,
    "invalid_request": 400,
    "response_unmaskable": 502,
}

_DEFAULT_MESSAGES: Mapping[str, str] = {
    "blocked": "Chaperone's access policy blocks this request.",
    "rate_limited": "Chaperone's access policy limits how often this request may be made.",
    "approval_pending": "This request needs a human's approval, which has not been given yet.",
    "approval_denied": "An approver denied this request.",
    "approval_expired": "Nobody decided on this request's approval in time.",
    "approval_unavailable": "This request needs approval, but no approval could be requested.",
    "no_connection": "No ClaudeConnection covers this host, so Chaperone does not let it through.",
    "unauthenticated": "Chaperone could not verify who is making this request.",
    "recording_unavailable": "The session recording cannot be written; traffic is refused "
                             "until it can (strict recording).",
    "credentials_unavailable": "The credentials for this connection are not available right "
                               "now; the request was not sent.",
    "invalid_request": "Chaperone could not prepare this request for its target.",
    "response_unmaskable": "The response to this request could not be masked, so Chaperone "
                           "withheld it. The request itself was sent to the target.",
}

_UNSET: Any = object()


def rule_info(rule: RuleRef | None) -> dict[str, str] | None:
    """``{"policy": "ns/name", "name": rule}``, or None when no rule decided."""
    if rule is None:
        return None
    return {"policy": rule.policy, "name": rule.rule}


def action_info(action: Action | None, connection: str = "",
                request: http.Request | None = None) -> dict[str, str]:
    """The action as classified; without a classification, the request line stands in."""
    if action is not None:
        summary = action.summary or _request_line(action.method, action.scheme, action.host,
                                                  action.port, action.path, action.query)
        return {"name": action.name, "summary": summary, "connection": connection}
    summary = ""
    if request is not None:
        path, _, query = request.path.partition("?")
        summary = _request_line(request.method, request.scheme, request.pretty_host,
                                request.port, path, query)
    return {"name": "", "summary": summary, "connection": connection}


def _request_line(method: str, scheme: str, host: str, port: int, path: str, query: str) -> str:
    default = (scheme, port) in (("https", 443), ("http", 80)) or not port
    netloc = host if default else f"{host}:{port}"
    return f"{method} {scheme}://{netloc}{path}{'?' + query if query else ''}"


def default_guidance(kind: str, rule: RuleRef | None = None, connection: str = "") -> str:
    """A generic ``how_to_get_access`` when the refusing addon has nothing more specific."""
    where = f"AccessPolicy {rule.policy} (rule {rule.rule!r})" if rule else \
        "the AccessPolicies of this namespace"
    conn = f"ClaudeConnection {connection!r}" if connection else "a ClaudeConnection"
    if kind == "blocked":
        return (f"This is governed by {where}. Retrying unchanged will be refused again. "
                f"Ask the team that owns that policy to allow this action, or to make it "
                f"require approval so a human can approve it case by case.")
    if kind == "rate_limited":
        return ("Wait for the number of seconds in retry_after_seconds (the Retry-After "
                f"header), then retry. The limit is set by {where}.")
    if kind == "no_connection":
        return (f"Only hosts covered by {conn} reachable from this pod are let through. Ask "
                "your platform team to add a ClaudeConnection for this host (and an "
                "AccessPolicy for it), or use a host that is already covered.")
    if kind == "unauthenticated":
        return ("Send a valid on-behalf-of token (X-Chaperone-On-Behalf-Of) from the "
                "configured issuer, or none at all.")
    if kind in ("recording_unavailable", "credentials_unavailable", "approval_unavailable"):
        return ("This is a temporary problem on Chaperone's side, not a policy decision: retry "
                "in a little while; if it persists, tell the operators of this cluster.")
    if kind == "invalid_request":
        return "Fix the request (see message) and send it again."
    if kind == "response_unmaskable":
        return ("The request already took effect: check its outcome before repeating it. Ask "
                "for a smaller or uncompressed response; the masking limit is the policy's "
                "masking.maxBodyBytes.")
    return f"This is governed by {where}."


def build(kind: str, message: str = "", *, rule: RuleRef | None = None,
          action: Action | None = None, connection: str = "",
          request: http.Request | None = None, how_to_get_access: str = "",
          **extra: Any) -> dict[str, Any]:
    """The JSON body of a refusal (see the module docstring); ``extra`` adds kind-specific keys."""
    if kind not in KINDS:
        raise ValueError(f"unknown refusal kind {kind!r}")
    body: dict[str, Any] = {
        "error": f"chaperone_{kind}",
        "message": message or _DEFAULT_MESSAGES[kind],
        "rule": rule_info(rule),
        "action": action_info(action, connection, request),
        "how_to_get_access": how_to_get_access or default_guidance(kind, rule, connection),
    }
    for key, value in extra.items():
        if key in body:
            raise ValueError(f"refusal field {key!r} is fixed")
        body[key] = value
    return body


def make_response(kind: str, body: Mapping[str, Any], *, status: int | None = None,
                  headers: Mapping[str, str] | None = None) -> http.Response:
    """The HTTP response for a refusal body: JSON, ``X-Chaperone-Refused``, never cached."""
    if kind not in KINDS:
        raise ValueError(f"unknown refusal kind {kind!r}")
    content = json.dumps(body, indent=2, ensure_ascii=False).encode() + b"\n"
    fields = {"Content-Type": "application/json", HEADER: kind, "Cache-Control": "no-store"}
    fields.update(headers or {})
    return http.Response.make(status or KINDS[kind], content, fields)


def refuse(flow: http.HTTPFlow, kind: str, message: str = "", *, rule: RuleRef | None = _UNSET,
           status: int | None = None, headers: Mapping[str, str] | None = None,
           how_to_get_access: str = "", **extra: Any) -> dict[str, Any]:
    """Answer ``flow`` with a refusal instead of forwarding it; returns the body.

    The action, connection and (unless ``rule`` is given) the deciding rule come from the
    flow's ``FlowContext``. ``flow.response`` is set, so mitmproxy never contacts the upstream
    (when called from ``request`` or ``requestheaders``).
    """
    ctx = flowctx.ensure(flow)
    if rule is _UNSET:
        rule = ctx.decision.rule if ctx.decision is not None else None
    body = build(kind, message, rule=rule, action=ctx.action, connection=ctx.connection,
                 request=flow.request, how_to_get_access=how_to_get_access, **extra)
    if flow.request.stream and flow.response is None:
        # Refused before a streamed body was read: mitmproxy cannot answer a request it is
        # streaming upstream (it raises), so the body is read and dropped instead, then the
        # refusal is sent (see the module docstring). The upstream is never contacted.
        flow.request.stream = False
    status = status or KINDS[kind]
    body, client_headers = for_client(body, status, ctx)
    mcp = ctx.action.mcp if ctx.action is not None else None
    rpc = jsonrpc_refusal((c.id for c in mcp.calls if c.method), mcp.batch, body) if mcp else None
    git = ctx.action.git if ctx.action is not None else None
    if git is not None:  # git prints only its own wire format (gitwire.py)
        flow.response = git_response(kind, body, git, headers={**client_headers, **(headers or {})})
    elif rpc is not None:  # an MCP client raises JSON-RPC errors, not HTTP ones (mcpwire.py)
        flow.response = http.Response.make(200, rpc, {"Content-Type": "application/json", HEADER: kind,
                                                      "Cache-Control": "no-store", **client_headers,
                                                      **(headers or {})})
    else:
        flow.response = make_response(kind, body, status=status,
                                      headers={**client_headers, **(headers or {})})
    ctx.refused = body
    return body


def git_response(kind: str, body: Mapping[str, Any], git: GitAction, *,
                 headers: Mapping[str, str] | None = None) -> http.Response:
    """A refusal as git's own answer, so ``git`` prints it (the JSON body stays the record).

    HTTP 200 (git shows only "HTTP 403" for anything else). A push whose ref updates are known
    and whose client asked for report-status gets ``ng <ref> <reason>`` for every ref (the whole
    push is refused) and, with side-band, the explanation on band 2 (``remote: ...``). Another
    push gets a side-band 3 error when its client demultiplexes (it asked for side-band, or its
    capabilities were not read: git always asks), otherwise an ``ERR`` pkt-line; fetches and
    advertisements an ``ERR`` pkt-line. Either way git prints ``remote error: ...``.
    """
    rule = body.get("rule")
    where = f" (rule {rule['name']} of AccessPolicy {rule['policy']})" if rule else ""
    reason = f"{body.get('error', '')}: {body.get('message', '')}{where}"
    service = "receive-pack" if git.service == "push" else "upload-pack"
    caps = set(git.capabilities)
    push = git.phase == "rpc" and git.service == "push"
    if push and git.commands and caps & {"report-status", "report-status-v2"}:
        progress = [f"Chaperone refused this push: {reason}",
                    f"How to get access: {body.get('how_to_get_access', '')}"]
        if command := body.get("approve_command"):
            progress.append(f"Approve with: {command}")
        content = report_status([(c.ref, reason) for c in git.commands],
                                capabilities=git.capabilities, progress=progress)
    else:
        text = f"{reason} - {body.get('how_to_get_access', '')}"
        if push and git.commands is None:
            text = (f"{reason} - this push's ref updates were not read (a Content-Encoding git "
                    "does not read, or commands that are not pkt-lines or do not fit in the "
                    "first 4 MiB), so rules on refs judged it as any ref (docs/git.md). "
                    f"{body.get('how_to_get_access', '')}")
        # Capabilities not read (yet): git always asks for side-band, so it demultiplexes.
        demux = push and (git.commands is None or git.pending or caps & {"side-band-64k", "side-band"})
        content = sideband_error(text) if demux else err_pkt(text)
    suffix = "advertisement" if git.phase == "advertisement" else "result"
    fields = {"Content-Type": f"application/x-git-{service}-{suffix}", HEADER: kind,
              "Cache-Control": "no-store"}
    fields.update(headers or {})
    return http.Response.make(200, content, fields)


# -- making the refusal readable by the agent's own client ------------------------------------

# HTTP status -> metav1.Status reason (k8s.io/apimachinery/pkg/apis/meta/v1 StatusReason*).
_K8S_REASONS: Mapping[int, str] = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
    409: "Conflict", 413: "RequestEntityTooLarge", 429: "TooManyRequests",
    500: "InternalError", 502: "InternalError", 503: "ServiceUnavailable",
    504: "Timeout",
}
_AWS_JSON_PROTOCOLS = ("json", "rest-json")
_REASON_HEADER = "X-Chaperone-Reason"


def for_client(body: dict[str, Any], status: int,
               ctx: flowctx.FlowContext) -> tuple[dict[str, Any], dict[str, str]]:
    """Add the fields (and headers) that let the agent's client show *why* it was refused.

    Nothing is removed and the body stays JSON; only fields are added:

    * ``kubernetes`` connections: the body is also a ``metav1.Status`` (``kind: Status``,
      ``apiVersion: v1``, ``status: Failure``, ``reason``, ``code``), which client-go decodes
      from an error response with ``Content-Type: application/json`` - so kubectl prints
      ``Error from server (Forbidden): <message>`` instead of ``unknown (...)``. ``message``
      becomes the whole human text (the refusal's message, the rule, how to get access), since
      that is all kubectl prints. A kind-specific ``reason`` (approval denied/expired) would
      clash with Status's ``reason``: it moves to ``refusal_reason``.
    * ``aws`` connections with a JSON protocol (json, rest-json): ``__type`` and the
      ``x-amzn-ErrorType`` header (``AccessDeniedException``, ``ThrottlingException``, ...), so
      botocore raises ``ClientError`` with that code and our ``message``. For the XML protocols
      (query, ec2, rest-xml) the body stays JSON - botocore cannot parse it and falls back to
      the HTTP status (``An error occurred (403) ... Forbidden``); the ``x-amzn-ErrorType`` and
      a one-line ``X-Chaperone-Reason`` header are set for clients that look at headers
      (botocore keeps them in ``ResponseMetadata.HTTPHeaders``, it does not print them).
    """
    if ctx.connection_type == "kubernetes":
        return _kubernetes_status(body, status), {}
    if ctx.connection_type == "aws":
        aws = ctx.action.aws if ctx.action is not None else None
        protocol = aws.protocol if aws is not None else ""
        headers = {_REASON_HEADER: _one_line(body)}
        if protocol in _AWS_JSON_PROTOCOLS:
            code = _aws_code(status, json_protocol=True)
            body = {**body, "__type": code} if "__type" not in body else body
        else:
            code = _aws_code(status, json_protocol=False)
        headers["x-amzn-ErrorType"] = code
        return body, headers
    return body, {}


def _kubernetes_status(body: dict[str, Any], status: int) -> dict[str, Any]:
    out = dict(body)
    if "reason" in out:
        out["refusal_reason"] = out.pop("reason")
    rule = body.get("rule")
    parts = [str(body.get("message") or "").rstrip()]
    if rule:
        parts.append(f"[Chaperone refused {body.get('action', {}).get('summary') or 'this request'}"
                     f"; rule {rule['name']!r} of AccessPolicy {rule['policy']}]")
    else:
        parts.append(f"[Chaperone refused {body.get('action', {}).get('summary') or 'this request'}]")
    if body.get("how_to_get_access"):
        parts.append(f"How to get access: {body['how_to_get_access']}")
    out["message"] = " ".join(p for p in parts if p)
    out.update({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": _K8S_REASONS.get(status, ""), "code": status})
    retry_after = body.get("retry_after_seconds")
    if isinstance(retry_after, int) and "details" not in out:
        out["details"] = {"retryAfterSeconds": retry_after}
    return out


def _aws_code(status: int, *, json_protocol: bool) -> str:
    if status == 429:
        code = "Throttling"
    elif status >= 500:
        code = "ServiceUnavailable"
    elif status == 400:
        return "ValidationException" if json_protocol else "ValidationError"
    else:
        code = "AccessDenied"
    return code + "Exception" if json_protocol else code


def _one_line(body: Mapping[str, Any]) -> str:
    """The refusal in one ASCII header line: error, message and rule."""
    rule = body.get("rule")
    text = f"{body.get('error', '')}: {body.get('message', '')}"
    if rule:
        text += f" (rule {rule['name']!r} of AccessPolicy {rule['policy']})"
    text = " ".join(text.split())
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= 512 else text[:509] + "..."
