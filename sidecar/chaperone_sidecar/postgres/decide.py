"""Judge what the agent is about to run: policy per statement, then approvals; the refusal text.

One call per unit the server would run - a simple Query (all its statements), or a Bind of
the extended protocol (the statement(s) its name may mean, with the parameters; session.py says
why Bind and not Execute). Every statement
is evaluated with the connection's policies (``policy.evaluator.evaluate`` on the
:func:`~chaperone_sidecar.policy.classify.postgres.statement_action`); the unit's outcome is the
strictest:

* any statement blocked, unparseable or not classifiable -> refused (nothing of the unit runs,
  as a failing statement of a PostgreSQL multi-statement query makes the whole query fail);
* else a ``rateLimit`` rule of any statement exhausted (the services' limiter, Redis when
  configured; each unit counts once per rule) -> refused with SQLSTATE ``53400`` and when to
  retry; a limiter that cannot count refuses too;
* else any statement requiring approval -> the approvals service (``approvals/service.py``,
  the same ApprovalRequests, grants and remembered outcomes as HTTP flows): approved (or a
  grant) -> runs; pending, denied, expired -> refused, naming the ApprovalRequest and who may
  approve. **Decision**: statements of one unit that need approval under *different* rules are
  refused with a request to send them one at a time - one ApprovalRequest must name exactly
  what its approvers agree to.
* else allowed, with the masks of every statement's decision.

The approval digest is the exact unit (``request_digest`` over method ``SQL``, the server, the
database and the SQL text plus its parameters), so an ``exact`` grant lets exactly the same
statement with the same parameters through; an ``action`` grant lets the same command on the
same server and database through (``postgres:DROP`` on ``/shop``).

Hold or defer: the rule's ``mode``; a hold is capped by the pod's
``CHAPERONE_APPROVAL_TIMEOUT_SECONDS``. A held statement holds only its own connection (the
session awaits the decision; every other connection keeps going).

Refusals are ErrorResponse fields: SQLSTATE ``42501`` (insufficient_privilege), a message that
names the rule, detail with the statement, hint with the ApprovalRequest and who may approve;
``42601`` (syntax_error) for SQL the parser could not read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from ..addons.approve import approve_command
from ..approvals import ApprovalUnavailable
from ..approvals.digest import request_digest
from ..approvals.objects import approvers_text
from ..approvals.ratelimit import MemoryRateLimiter, check_limits
from ..policy.classify.postgres import Statement, statement_action
from ..policy.evaluator import evaluate
from ..policy.masking.detectors import DETECTOR_NAMES, resolve_rules
from ..policy.masking.spans import mask_text
from ..policy.model import Action, Decision, HTTPRequest, Identity, MaskSpec, PostgresAction, RateLimit
from ..services import SidecarServices

__all__ = ["Verdict", "decide", "opaque_statement", "INSUFFICIENT_PRIVILEGE", "SYNTAX_ERROR"]

log = logging.getLogger("chaperone.postgres")

INSUFFICIENT_PRIVILEGE = "42501"
SYNTAX_ERROR = "42601"
RATE_LIMITED = "53400"  # configuration_limit_exceeded
_FALLBACK_LIMITER = MemoryRateLimiter()  # services built without one (tests): still counted
PREVIEW_CHARS = 2048


@dataclass
class Verdict:
    """What happens to one unit, and what the recording says about it."""

    allowed: bool
    actions: list[Action] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    masks: tuple[MaskSpec, ...] = ()
    refusal: dict[str, str] | None = None  # ErrorResponse fields when refused
    effect: str = "allow"  # allow | block | rate_limited | require_approval | unparseable
    approval: dict[str, Any] | None = None  # the approval event's data, when one was involved

    @property
    def deciding(self) -> Decision | None:
        rank = {"block": 3, "require_approval": 2, "allow": 1}
        return max(self.decisions, key=lambda d: rank.get(d.effect, 0), default=None)


def opaque_statement(text: str, database: str) -> Statement:
    """A statement whose text the sidecar never saw (a portal or prepared statement made by
    SQL, not by the protocol): opaque, the strictest."""
    return Statement(text, PostgresAction(statement="EXECUTE", kind="other", statements=("EXECUTE",),
                                          opaque=True, database=database, text=text))


def _preview(sql: str) -> str:
    head = sql[:PREVIEW_CHARS * 2].encode("utf-8", "replace")
    text = mask_text(head, resolve_rules(DETECTOR_NAMES)).decode("utf-8", "replace")
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "..."


def unit_digest(host: str, port: int, database: str, sql: str, params: list[str | None]) -> str:
    body = sql.encode("utf-8", "surrogateescape")
    for p in params:
        body += b"\0" + (b"\xff" if p is None else p.encode("utf-8", "surrogateescape"))
    return request_digest(HTTPRequest(method="SQL", scheme="postgres", host=host, port=port,
                                      path=f"/{database}", body=body))


async def decide(services: SidecarServices, *, connection: str, identity: Identity,
                 host: str, port: int, database: str, sql: str, statements: list[Statement] | None,
                 params: list[str | None], parse_error: str | None = None) -> Verdict:
    """The verdict for one unit (see the module docstring). Never raises."""
    if parse_error is not None or statements is None:
        return Verdict(False, effect="unparseable", refusal={
            "S": "ERROR", "V": "ERROR", "C": SYNTAX_ERROR,
            "M": f"chaperone cannot read this SQL, so it was not sent: {parse_error}",
            "H": "Send SQL PostgreSQL's parser reads as the server will; chaperone judges every statement "
                 "before the server sees it and refuses what it cannot read."})
    snapshot = services.snapshot()
    conn = snapshot.connection(connection)
    if conn is None or conn.type != "postgres":  # deleted (or retyped) while the session ran
        return Verdict(False, effect="block", refusal={
            "S": "ERROR", "V": "ERROR", "C": INSUFFICIENT_PRIVILEGE,
            "M": f"chaperone refused this statement: connection {connection!r} no longer exists "
                 "in this pod's configuration (fail closed)",
            "H": "Its ClaudeConnection was removed; sessions opened before stay refused."})
    actions = [statement_action(s.action, host=host, port=port, database=database) for s in statements]
    decisions = [evaluate(snapshot.policies, a, identity, connection) for a in actions]
    masks = tuple(m for d in decisions for m in d.masks)
    verdict = Verdict(True, actions, decisions, masks)
    for action, decision in zip(actions, decisions, strict=True):
        if decision.effect == "block":
            rule = f" (rule {decision.rule})" if decision.rule else ""
            verdict.allowed, verdict.effect = False, "block"
            verdict.refusal = {
                "S": "ERROR", "V": "ERROR", "C": INSUFFICIENT_PRIVILEGE,
                "M": f"chaperone refused {action.postgres.statement if action.postgres else 'this statement'}"
                     f": {decision.message}{rule}",
                "D": f"Refused statement: {action.summary}",
                "H": "An AccessPolicy forbids this statement on this connection; nothing of "
                     "this query was run. Change the statement, or ask the policy's owner."}
            return verdict
    if any(m.fields and m.target != "request" for m in masks) and any(
            a.postgres is not None and a.postgres.statement == "COPY" and a.postgres.kind == "read"
            for a in actions):
        # COPY ... TO STDOUT sends lines, not rows with labelled columns: field masks cannot apply.
        verdict.allowed, verdict.effect = False, "block"
        verdict.refusal = {"S": "ERROR", "V": "ERROR", "C": INSUFFICIENT_PRIVILEGE,
                           "M": "chaperone refused COPY ... TO STDOUT: this connection masks columns "
                                "by name, which cannot be applied to COPY output",
                           "H": "Read the rows with SELECT instead."}
        return verdict
    limits = list({(lim.source, lim.requests, lim.period_seconds, lim.per): lim
                   for d in decisions for lim in d.rate_limits}.values())
    if limits and (refusal := await _rate_limited(services, limits, identity, connection)) is not None:
        verdict.allowed, verdict.effect, verdict.refusal = False, "rate_limited", refusal
        return verdict
    pending = [(a, d) for a, d in zip(actions, decisions, strict=True) if d.effect == "require_approval"]
    if not pending:
        return verdict
    verdict.effect = "require_approval"
    rules = {str(d.rule) for _, d in pending}
    if len(rules) > 1:
        verdict.allowed = False
        verdict.refusal = {
            "S": "ERROR", "V": "ERROR", "C": INSUFFICIENT_PRIVILEGE,
            "M": "chaperone refused this query: its statements need approval under different "
                 f"rules ({', '.join(sorted(rules))})",
            "H": "Send them one at a time, so each ApprovalRequest names what its approvers "
                 "agree to."}
        return verdict
    return await _approve(services, verdict, pending[0][0], pending[0][1], connection=connection,
                          identity=identity, host=host, port=port, database=database, sql=sql,
                          params=params)


async def _rate_limited(services: SidecarServices, limits: list[RateLimit], identity: Identity,
                       connection: str) -> dict[str, str] | None:
    """The refusal when a rateLimit rule is exhausted (each unit counts once per rule), or when
    the limiter cannot count (fail closed, as Enforce does for HTTP); None within the limits."""
    limiter = services.rate_limiter if services.rate_limiter is not None else _FALLBACK_LIMITER
    try:
        result, limit = await check_limits(limiter, limits, identity, connection)
    except Exception as exc:  # noqa: BLE001 - Redis down or similar: refuse, never exceed
        return {"S": "ERROR", "V": "ERROR", "C": RATE_LIMITED,
                "M": f"chaperone cannot count this statement's rate limit right now "
                     f"({type(exc).__name__}); refusing rather than exceeding it",
                "H": "A temporary problem of the gateway: retry in a few seconds."}
    if result.allowed or limit is None:
        return None
    rule = f" (rule {limit.source})" if limit.source is not None else ""
    return {"S": "ERROR", "V": "ERROR", "C": RATE_LIMITED,
            "M": f"chaperone: rate limit exceeded: at most {limit.requests} statement"
                 f"{'s' if limit.requests != 1 else ''} per {limit.period_seconds}s per {limit.per}{rule}",
            "H": f"Retry in {result.retry_after_header} seconds; nothing of this query was run."}


async def _approve(services: SidecarServices, verdict: Verdict, action: Action, decision: Decision, *,
                   connection: str, identity: Identity, host: str, port: int, database: str,
                   sql: str, params: list[str | None]) -> Verdict:
    def refuse(message: str, hint: str = "", detail: str = "") -> Verdict:
        verdict.allowed = False
        verdict.refusal = {"S": "ERROR", "V": "ERROR", "C": INSUFFICIENT_PRIVILEGE, "M": message,
                           "D": detail or f"Statement: {action.summary}", "H": hint}
        return verdict

    service, requirement = services.approvals, decision.approval
    if service is None or requirement is None or decision.rule is None:
        return refuse("chaperone refused this statement: it needs approval but this gateway "
                      "cannot open ApprovalRequests (fail closed)")
    config = services.config
    requirement = replace(requirement, hold_seconds=max(0, min(requirement.hold_seconds,
                                                                config.approval_timeout_seconds)))
    digest = unit_digest(host, port, database, sql, params)
    recorder = services.recorder
    try:
        outcome = await service.request(
            identity=identity, connection=connection, action=action, digest=digest,
            rule=decision.rule, requirement=requirement,
            session_id=recorder.session_id if recorder is not None else "",
            body_preview=_preview(sql))
    except ApprovalUnavailable as exc:
        return refuse(f"chaperone refused this statement: no ApprovalRequest could be opened: {exc}")
    except Exception as exc:  # noqa: BLE001 - whatever failed, never run it unapproved
        log.exception("approval failed")
        return refuse(f"chaperone refused this statement: the approval could not be processed: "
                      f"{type(exc).__name__}: {exc}")
    backend = services.approval_backend
    namespace = (backend.namespace if backend is not None else "") or config.pod_namespace
    verdict.approval = {"name": outcome.name or None, "state": outcome.state,
                        "approver": ", ".join(outcome.approvers) or None,
                        "approvedBy": list(outcome.approvers), "grant": outcome.grant or None,
                        "digest": digest}
    if outcome.state == "approved":
        verdict.allowed = True
        return verdict
    who = approvers_text(requirement)
    command = approve_command(outcome.name, namespace, standalone=config.standalone)
    if outcome.state == "pending":
        waited = f" (held {requirement.hold_seconds}s without a decision)" if requirement.mode == "hold" else ""
        return refuse(
            f"chaperone: {decision.message} (rule {decision.rule}): ApprovalRequest {outcome.name} "
            f"in namespace {namespace} is waiting for {who}{waited}",
            hint=f"Ask an approver ({who}) to approve ApprovalRequest {outcome.name}: {command} - "
                 "then run the same statement again (same text and parameters); it passes on "
                 "the approval's grant.")
    state = "denied" if outcome.state == "denied" else "expired"
    decided = f" by {outcome.approvers[0]}" if outcome.approvers else ""
    return refuse(
        f"chaperone: ApprovalRequest {outcome.name} was {state}{decided} "
        f"({outcome.reason or state}); the statement was not run (rule {decision.rule})",
        hint=(f"Do not retry it unchanged; ask {outcome.approvers[0] if outcome.approvers else 'the approver'} "
              "why." if state == "denied" else f"Ask an approver ({who}) to be ready, then retry."))
