"""Request classifiers: turn one proxied HTTP request into an ``Action`` for the policy engine.

``classify(request, connection_type, rules)`` is the only entry point the sidecar needs. The
connection's type (from its ClaudeConnection) picks the typed classifier:

* ``aws``        -> ``aws``: service/region from the SigV4 scope, operation from botocore models
* ``kubernetes`` -> ``kubernetes``: the apiserver's own RequestInfo rules
* ``anthropic``  -> ``anthropic``: model, streaming, declared and used tools
* ``mcp``        -> ``mcp``: every JSON-RPC message of the body (method, tool, arguments)
* ``http``       -> ``http``: the generic fields only; git smart-HTTP requests also get
  ``Action.git`` (``git``: push/fetch, repository, ref updates; ``git:push``/``git:fetch``)

Every Action carries the generic HTTP fields, a canonical ``name`` (``s3:DeleteBucket``,
``kubernetes:delete/namespaces``, ``http:GET``, ``anthropic:messages``) and a one-line
``summary`` for approvals and recordings.

Every type classifies the **canonical path** (:func:`.paths.canonical_path` with the
connection's :class:`.paths.PathRules`): ``//admin``, ``/x/../admin`` and ``/%61dmin`` are all
``/admin``. A path that stays ambiguous (``%2F``, ``\\``, ``%25`` double encoding, ``;``...) is
classified as sent, with the reason in ``Action.errors``; the sidecar refuses such a request
before it is classified (addons/route.py), so this only shows in ``chaperone policy test``.

``classify`` is total: it is called on every flow, with whatever an agent chose to send, and an
exception there would break the flow or, worse, the policy decision. Any failure inside a typed
classifier is recorded in ``Action.errors`` and the generic action is returned; the evaluator
decides what an incomplete classification means (typically: no typed rule matches).
"""

from __future__ import annotations

from dataclasses import replace

from ..model import Action, HTTPRequest
from .anthropic import anthropic_summary, classify_anthropic
from .aws import classify_aws
from .git import classify_git, git_name, git_summary
from .http import base_action, sanitize, shorten
from .kubernetes import classify_kubernetes, kubernetes_name, kubernetes_summary
from .mcp import classify_mcp, mcp_name, mcp_summary
from .paths import PathRules, canonical_path, path_rules

__all__ = ["classify", "CONNECTION_TYPES"]

CONNECTION_TYPES = ("aws", "http", "kubernetes", "anthropic", "mcp", "postgres")
_MAX_ERROR = 300


def _error_text(where: str, exc: BaseException) -> str:
    return shorten(f"{where} classifier failed: {type(exc).__name__}: {exc}", _MAX_ERROR)


def _fallback(request, connection_type: str, errors: list[str]) -> Action:
    """Last resort when even the generic fields could not be read: every field is safe."""

    def text(name: str) -> str:
        value = getattr(request, name, "")
        return value if isinstance(value, str) else ""

    port = getattr(request, "port", 0)
    method = text("method").upper()
    return Action(
        connection_type=connection_type,  # type: ignore[arg-type]
        method=method,
        scheme=text("scheme"),
        host=text("host").lower(),
        port=port if isinstance(port, int) else 0,
        path=text("path"),
        query=text("query"),
        name=f"http:{method or '?'}",
        summary=shorten(f"{method or '?'} {text('host')}{text('path')}"),
        errors=tuple(errors),
    )


def classify(request: HTTPRequest, connection_type: str, rules: PathRules | None = None) -> Action:
    """Classify one request for policy evaluation. Never raises.

    ``rules``: the connection's path rules (``path_rules(type, spec)``); the type's defaults
    when not given.
    """
    errors: list[str] = []
    if connection_type not in CONNECTION_TYPES:
        errors.append(f"unknown connection type {str(connection_type)[:50]!r}; classified as http")
        connection_type = "http"
    rules = rules or path_rules(connection_type)
    try:
        request = sanitize(request, errors)
        canonical, problem = canonical_path(request.path, rules)
        if problem:
            errors.append(problem)
        elif canonical != request.path:
            request = replace(request, path=canonical)
        base = base_action(request, connection_type, errors)
        if rules.case_insensitive:
            base = replace(base, path_case_insensitive=True)
    except Exception as exc:  # noqa: BLE001 - totality is the contract
        errors.append(_error_text("http", exc))
        return _fallback(request, connection_type, errors)
    if connection_type == "postgres":
        # SQL is classified per statement by .postgres (the sidecar's postgres listeners); an
        # HTTP request on such a connection has only the generic fields.
        return base
    if connection_type == "http":
        try:
            git = classify_git(request, errors)
        except Exception as exc:  # noqa: BLE001 - totality is the contract
            errors.append(_error_text("git", exc))
            return replace(base, errors=tuple(errors))
        if git is None:
            return base
        return replace(base, name=git_name(git), summary=shorten(git_summary(git), 1000), git=git,
                       errors=tuple(errors))
    try:
        return _typed(request, connection_type, base, errors)
    except Exception as exc:  # noqa: BLE001 - totality is the contract
        errors.append(_error_text(connection_type, exc))
        return replace(base, errors=tuple(errors))


def _typed(request: HTTPRequest, connection_type: str, base: Action, errors: list[str]) -> Action:
    if connection_type == "aws":
        aws, described = classify_aws(request, errors)
        name = aws.action if aws.service else "aws:unknown"
        summary = " ".join(part for part in (name, described) if part)
        if aws.region:
            summary += f" ({aws.region})"
        if aws.presigned:
            summary += " presigned"
        return replace(base, name=name, summary=shorten(summary), aws=aws, errors=tuple(errors))
    if connection_type == "kubernetes":
        kube = classify_kubernetes(request, errors)
        return replace(
            base,
            name=kubernetes_name(kube, request.path),
            summary=shorten(kubernetes_summary(kube, request)),
            kubernetes=kube,
            errors=tuple(errors),
        )
    if connection_type == "mcp":
        mcp = classify_mcp(request, errors)
        return replace(base, name=mcp_name(mcp, request.method),
                       summary=shorten(mcp_summary(mcp, mcp_name(mcp, request.method)), 1000),
                       mcp=mcp, errors=tuple(errors))
    anthropic, endpoint = classify_anthropic(request, errors)
    name = f"anthropic:{endpoint}"
    return replace(
        base,
        name=name,
        summary=shorten(anthropic_summary(anthropic, name)),
        anthropic=anthropic,
        errors=tuple(errors),
    )
