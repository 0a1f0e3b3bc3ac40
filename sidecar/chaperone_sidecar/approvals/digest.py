"""Canonical request digests, action keys and ApprovalRequest names.

An ``exact``-scope grant lets through only a retry of *the same request*, so the digest must
be stable across everything a client changes when it retries (signatures, dates, SDK
invocation ids, header order, query order) and change with everything that changes what the
request does (method, target, path, query, body, the headers that select the operation).
**Decision**: significant headers are an allow-list (``SIGNIFICANT_HEADERS``), not a
deny-list: SDKs add new per-attempt headers (``amz-sdk-invocation-id``, ``amz-sdk-request``)
faster than a deny-list can follow, and a header that is not listed can at worst let an
approved retry pass with different framing, never a different operation.

An ``action``-scope grant lets through the same *classified action*: connection + canonical
action name + the resources the classifier derived (``action_key``).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from urllib.parse import parse_qsl, quote

from ..policy.classify.git import classify_git, git_resources, git_service
from ..policy.model import Action, HTTPRequest

__all__ = [
    "SIGNIFICANT_HEADERS", "IGNORED_QUERY_PARAMS", "request_digest", "mcp_payload", "canonical_query",
    "action_resources", "action_key", "named_action_key", "request_name", "short_hash", "DIGEST_RE",
]

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

# Headers that select or shape the operation. Auth, date, signature, SDK attempt ids and
# x-amz-content-sha256 (UNSIGNED-PAYLOAD vs a hash, depending on the SDK's mood) are left out
# on purpose: they change on every retry.
SIGNIFICANT_HEADERS: tuple[str, ...] = (
    "content-type",
    "content-encoding",  # with "aws-chunked" removed: the framing is undone below
    "x-amz-target",  # the operation of AWS JSON protocols
    "x-amz-copy-source",  # CopyObject's source
    "x-amz-acl",
    "x-amz-server-side-encryption",
    "x-amz-tagging",
    "x-http-method-override",
    "x-http-method",
)

# Presigned-URL query parameters (SigV4 and SigV2): they are signatures, dates and key ids.
IGNORED_QUERY_PARAMS = frozenset({
    "x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-expires",
    "x-amz-signedheaders", "x-amz-signature", "x-amz-security-token",
    "awsaccesskeyid", "signature", "expires",
})

_VERSION = "chaperone-digest-v1"  # bump when the canonical form changes (old grants then miss)
_SAFE = "-_.~"


def canonical_query(query: str) -> list[tuple[str, str]]:
    """Query parameters decoded, presign parameters dropped, sorted, re-encoded uniformly.

    ``a=1&b=2`` and ``b=2&a=1`` (and ``a=%31``) are the same request; repeated keys keep all
    values (sorted too: servers that care about the order of repeated keys are rare, and
    treating them as equal only widens an exact grant to a permutation of its own values).
    """
    pairs = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key.lower() in IGNORED_QUERY_PARAMS:
            continue
        pairs.append((quote(key, safe=_SAFE), quote(value, safe=_SAFE)))
    return sorted(pairs)


def _significant_headers(req: HTTPRequest, names: tuple[str, ...]) -> list[tuple[str, str]]:
    wanted = {n.lower() for n in names}
    out = []
    for key, value in req.headers:
        k = key.lower()
        if k not in wanted:
            continue
        v = " ".join(value.split())  # folded / padded whitespace is not a different request
        if k == "content-encoding":
            v = ",".join(e.strip().lower() for e in v.split(",")
                         if e.strip() and e.strip().lower() != "aws-chunked")
            if not v:
                continue
        elif k == "content-type":
            v = v.lower()
        out.append((k, v))
    return sorted(out)


def git_push_payload(req: HTTPRequest) -> bytes | None:
    """What a git push does, for its digest: the repository and each ref update (ref, old and
    new id) - not the pack's bytes, which ``git pack-objects`` may compress or order otherwise
    when the agent pushes again (the new ids pin the content). A push whose updates cannot be
    read (a streamed body) gets a digest of its own that no retry shares, so no grant made for
    it - its approver saw no refs - ever lets another push through. None: not a git push."""
    found = git_service(req)
    if found is None or found[0] != "push" or found[2] != "rpc":
        return None
    git = classify_git(req, [], read_pack=False)  # the commands are the digest, not the pack
    if git is None or git.commands is None:
        return b"git-push-unreadable:" + secrets.token_bytes(16)
    return json.dumps(["git-push", git.repository, [[c.ref, c.old, c.new] for c in git.commands]],
                      separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")


def _payload(req: HTTPRequest) -> bytes:
    """The body, with aws-chunked framing removed (each chunk carries a per-attempt signature);
    a git push's ref updates (:func:`git_push_payload`)."""
    git = git_push_payload(req)
    if git is not None:
        return git
    encoding = (req.header("content-encoding") or "").lower()
    sha = (req.header("x-amz-content-sha256") or "").upper()
    if req.body and ("aws-chunked" in encoding or sha.startswith("STREAMING-")):
        try:  # lazy: only AWS uploads need the credentials package
            from ..credentials.aws_chunked import decode_aws_chunked

            return decode_aws_chunked(req.body)[0]
        except Exception:  # noqa: BLE001 - malformed framing: digest the raw bytes
            return req.body
    return req.body


def mcp_payload(action: Action | None) -> bytes | None:
    """What an MCP request does, for its digest: each call's method, tool/prompt/URI and
    canonical arguments - not the JSON-RPC ids, ``params._meta`` (progress tokens) or key order,
    which an MCP client changes on every retry. None for other actions."""
    mcp = action.mcp if action is not None else None
    if mcp is None or not mcp.calls:
        return None
    calls = [[c.method, c.id if not c.method else "", c.tool, c.prompt, c.uri, c.arguments]
             for c in mcp.calls]
    return json.dumps(["mcp", mcp.batch, calls], separators=(",", ":")).encode()  # ASCII: any str encodes


def request_digest(req: HTTPRequest, *,
                   significant_headers: tuple[str, ...] = SIGNIFICANT_HEADERS,
                   payload: bytes | None = None) -> str:
    """``sha256:<hex>`` of the canonical request (see the module docstring); ``payload``
    replaces the body when the caller has its canonical form (:func:`mcp_payload`)."""
    host = req.host.lower().rstrip(".")
    head = json.dumps([
        _VERSION, req.method.upper(), req.scheme.lower(), host, int(req.port),
        req.path or "/", canonical_query(req.query),
        _significant_headers(req, significant_headers),
    ], separators=(",", ":"), ensure_ascii=True)
    h = hashlib.sha256(head.encode())
    h.update(b"\n")  # the JSON head is self-delimiting; the body is everything after it
    h.update(_payload(req) if payload is None else payload)
    return "sha256:" + h.hexdigest()


def action_resources(action: Action) -> tuple[str, ...]:
    """What the action is about, for ``action`` grants and ``spec.action.resources``.

    AWS: the classifier's resources (bucket, bucket/key, role...). Kubernetes: one
    ``group/resource[/subresource]:namespace/name`` string. Other connections: the host and
    path, because their action names (``http:GET``) say nothing about the target and an
    action grant must never mean "any GET on this connection". git: the repository and every
    ref update with its full ids, so an action grant for a push is that push's ref updates.
    """
    if action.aws is not None and action.aws.resources:
        return tuple(action.aws.resources)
    if action.kubernetes is not None and action.kubernetes.is_resource_request:
        k = action.kubernetes
        kind = "/".join(p for p in (k.api_group or "core", k.resource, k.subresource) if p)
        return (f"{kind}:{k.namespace}/{k.name}",)
    if action.anthropic is not None:
        return (action.anthropic.model,) if action.anthropic.model else ()
    if action.mcp is not None and action.mcp.calls:  # each call's method and tool/prompt/URI
        return tuple(dict.fromkeys(f"{c.method}:{c.tool or c.prompt or c.uri}"
                                   for c in action.mcp.calls if c.method))
    if action.git is not None:  # the repository and each full ref update (old..new ids)
        return git_resources(action.git)
    return (f"{action.host.lower()}:{action.port}{action.path}",)


def action_key(connection: str, action: Action) -> str:
    """``sha256:<hex>`` naming the classified action: connection + action name + resources."""
    return named_action_key(connection, action.name, action_resources(action))


def named_action_key(connection: str, name: str, resources) -> str:
    """:func:`action_key` from the parts as an ApprovalRequest stores them (``spec.connection``,
    ``spec.action.name``, ``spec.action.resources``): how a grant's action is checked against
    the request that was approved."""
    doc = json.dumps([_VERSION, "action", connection, name, list(resources)],
                     separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


def short_hash(*parts: str, length: int = 32) -> str:
    """A label-safe hash of ``parts`` (hex, at most 63 characters)."""
    doc = json.dumps(list(parts), separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:min(length, 63)]


_SLUG_BAD = re.compile(r"[^a-z0-9]+")
_ALPHABET = string.ascii_lowercase + string.digits
NAME_MAX = 63  # a DNS-1123 label: the name also ends up in label values and Event messages
_SUFFIX = 5


def request_name(action_name: str, digest: str) -> str:
    """``<action-slug>-<digest[:10]>-<random>``: readable, groups retries, never collides.

    The slug and the digest part make ``kubectl get ar`` readable and let a human see which
    requests are retries of one another; the random suffix keeps a *new* request for the same
    action (after a denial or expiry) from colliding with the old object.
    """
    hexpart = digest.split(":", 1)[-1][:10] or "0000000000"
    budget = NAME_MAX - len(hexpart) - _SUFFIX - 2
    slug = _SLUG_BAD.sub("-", action_name.lower()).strip("-")[:budget].strip("-") or "request"
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(_SUFFIX))
    return f"{slug}-{hexpart}-{suffix}"
