"""The value types shared by the classifiers, the compiler/evaluator and the masker.

Kept in one small module so each part of the engine can be built and tested on its own: the
classifiers produce ``Action``; the evaluator consumes ``Action`` + ``Identity`` and produces
``Decision``. All are frozen dataclasses (hashable, safe to cache and share across flows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ConnectionType = Literal["aws", "http", "kubernetes", "anthropic", "postgres", "mcp"]
Effect = Literal["allow", "block", "require_approval", "rate_limited"]


@dataclass(frozen=True)
class HTTPRequest:
    """One request as the proxy sees it. ``headers`` keeps order and duplicates."""

    method: str
    scheme: str
    host: str
    port: int
    path: str  # without query, percent-encoding preserved
    query: str = ""  # raw query string without "?"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """First value of a header, case-insensitive."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


@dataclass(frozen=True)
class AWSAction:
    service: str  # signing name from the SigV4 scope, e.g. "s3", "iam", "secretsmanager"
    region: str
    operation: str  # botocore operation name, e.g. "DeleteBucket"; "" when unknown
    protocol: str = ""  # query | json | rest-json | rest-xml | ec2 | ""
    resources: tuple[str, ...] = ()  # bucket, bucket/key, role name, function name, secret id...
    presigned: bool = False

    @property
    def action(self) -> str:
        """IAM-style name, e.g. ``s3:DeleteBucket`` (``s3:*`` when the operation is unknown)."""
        return f"{self.service}:{self.operation or '*'}"


@dataclass(frozen=True)
class KubernetesAction:
    verb: str  # get list watch create update patch delete deletecollection (RequestInfo)
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""  # exec attach portforward log status scale ...
    namespace: str = ""
    name: str = ""
    is_resource_request: bool = True  # False for /healthz, /version, /apis discovery ...
    # exec/attach/portforward (the query, as the apiserver parses it): the ``container=``
    # parameter ("" = the pod's default container), the ``command=`` argv in order, the
    # ``ports=`` of a port-forward (a SPDY tunnel names its ports per stream instead).
    container: str = ""
    command: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()


@dataclass(frozen=True)
class AnthropicAction:
    model: str = ""  # the single requested model; "" when none or when a batch mixes models
    stream: bool = False
    tools: tuple[str, ...] = ()  # declared tool names
    tool_uses: tuple[str, ...] = ()  # names in tool_use blocks of the conversation
    tool_results: int = 0  # count of tool_result blocks
    models: tuple[str, ...] = ()  # every requested model (message batches can mix them)


@dataclass(frozen=True)
class GitCommand:
    """One ref update of a push (``<old-id> <new-id> <ref>``, policy/classify/git.py)."""

    ref: str  # as the server reads it: the bytes before a NUL, never normalised
    old: str  # hex object id; all zeros for a create
    new: str  # all zeros for a delete
    operation: Literal["create", "update", "delete"]
    # Not a fast-forward: False when the pushed pack proves new descends from old (and for
    # create/delete), None when that cannot be known from the request (forcePush rules then
    # fail closed). Never True: git's "+" is client-side only.
    force: bool | None = False
    valid: bool = True  # the ref name passes git's check-ref-format (servers refuse others)


@dataclass(frozen=True)
class GitAction:
    """A git smart-HTTP request: the ref advertisement, a fetch or a push."""

    service: Literal["push", "fetch"]
    repository: str  # the URL path before /info/refs or /git-*-pack, without "/" and ".git" ends
    phase: Literal["advertisement", "rpc"] = "rpc"
    # A push's ref updates; None when they could not be read (a streamed or malformed body):
    # ref, operation and forcePush rules then fail closed.
    commands: tuple[GitCommand, ...] | None = ()
    capabilities: tuple[str, ...] = ()
    push_options: tuple[str, ...] = ()
    protocol: str = ""  # the Git-Protocol header ("version=2"), as sent
    # A streamed push judged on its headers while its body is held back (gitgate.py): no update
    # is known yet, so only services and repositories decide; the gate judges the updates.
    pending: bool = False


@dataclass(frozen=True)
class PostgresAction:
    """One SQL statement sent through a postgres connection (policy/classify/postgres.py)."""

    statement: str  # the top-level command: SELECT, INSERT, DELETE, DROP, DO, COPY, BEGIN ...
    kind: Literal["read", "write", "ddl", "other"]  # the strictest of every nested statement
    statements: tuple[str, ...] = ()  # every command in it, nested ones too (a CTE's DELETE)
    tables: tuple[str, ...] = ()  # relations as written, schema-qualified when they were
    functions: tuple[str, ...] = ()  # called functions (lower case); PROGRAM/FILE for COPY
    where_missing: bool = False  # an UPDATE/DELETE (or TRUNCATE) touching every row
    # What it runs cannot be seen from the text (DO, CALL, EXECUTE of a SQL PREPARE,
    # unparseable): block and requireApproval rules match it whatever they name (fail closed).
    opaque: bool = False
    database: str = ""
    text: str = ""  # the statement's own text (bounded)
    # Columns a result value is computed from, other than a plain top-level column (an alias,
    # an expression, a subquery's or CTE's list, RETURNING, SET); "(row)" for a whole-row
    # reference (row_to_json(u), u.* inside an expression): column masks read these
    # (postgres/results.py), so "SELECT password AS pw" cannot dodge "$.password".
    output_refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class MCPCall:
    """One JSON-RPC message of an MCP request body (see ``classify/mcp.py``)."""

    method: str  # "tools/call", "tools/list", "resources/read", ...; "" for a response
    id: str = ""  # the JSON-RPC id as JSON text ('1', '"a"'); "" for a notification
    tool: str = ""  # params.name of tools/call
    prompt: str = ""  # params.name of prompts/get
    uri: str = ""  # params.uri of resources/read, resources/subscribe ...
    arguments: str = ""  # params.arguments as canonical JSON ("" when absent)
    # A call made up by the sidecar to ask "would this tool be blocked whatever its arguments?"
    # (tools/list filtering): argument conditions hold for allow rules, never for others.
    probe: bool = False


@dataclass(frozen=True)
class MCPAction:
    calls: tuple[MCPCall, ...] = ()  # every element of a batch; one for a single message
    batch: bool = False
    session_id: str = ""  # Mcp-Session-Id (2025-06-18); "" on the stateless 2026-07-28 transport
    protocol_version: str = ""  # MCP-Protocol-Version header, else params._meta's
    stream: bool = False  # GET: the server->client SSE stream
    # Why the body cannot be judged (not JSON, duplicate keys, too large, header/body mismatch):
    # the sidecar refuses such a request (addons/enforce.py), fail closed.
    invalid: str = ""

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.method for c in self.calls if c.method))

    @property
    def tools(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.tool for c in self.calls if c.tool))


@dataclass(frozen=True)
class Action:
    """A request classified for policy: generic HTTP fields plus at most one typed part."""

    connection_type: ConnectionType
    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str = ""
    name: str = ""  # canonical action name: "s3:DeleteBucket", "kubernetes:delete/namespaces", "http:GET"
    summary: str = ""  # one human line for ApprovalRequests and recordings
    aws: AWSAction | None = None
    kubernetes: KubernetesAction | None = None
    anthropic: AnthropicAction | None = None
    mcp: MCPAction | None = None
    postgres: PostgresAction | None = None
    git: GitAction | None = None  # http connections: git smart-HTTP requests
    errors: tuple[str, ...] = ()  # what could not be classified (the classifier never raises)
    # The connection declared a case-insensitive upstream (spec.pathNormalization.caseInsensitive):
    # path rules then match ignoring case.
    path_case_insensitive: bool = False


@dataclass(frozen=True)
class Identity:
    """Who is calling: the pod, its creator and an optional verified on-behalf-of user."""

    service_account: str = ""  # "namespace/name"
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    creator: str = ""  # user who created the pod (admission userInfo)
    creator_groups: tuple[str, ...] = ()
    on_behalf_of: str = ""  # verified OIDC subject/username, if any
    on_behalf_of_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuleRef:
    policy: str  # "namespace/name"
    rule: str

    def __str__(self) -> str:
        return f"{self.policy}#{self.rule}"


@dataclass(frozen=True)
class Approvers:
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class ApprovalRequirement:
    approvers: Approvers
    min_approvals: int = 1
    timeout_seconds: int = 300
    mode: Literal["hold", "defer"] = "hold"
    hold_seconds: int = 120
    grant_ttl_seconds: int = 900
    grant_scope: Literal["exact", "action"] = "exact"
    # How long a denial or an expiry answers retries of the same request (exact) or action
    # (action scope) instead of opening a new ApprovalRequest: no approver is paged again.
    remember_outcome_seconds: int = 3600


@dataclass(frozen=True)
class MaskSpec:
    detectors: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()  # JSON paths
    target: Literal["response", "request", "both"] = "response"
    max_body_bytes: int = 64 * 1024 * 1024
    source: RuleRef | None = None  # None for policy-wide masking
    # Kubernetes Secret data/stringData: "mask" (the sidecar's default on kubernetes
    # connections, see addons/mask.py), "reveal" (a rule's explicit opt-out), "" (not said).
    kubernetes_secrets: Literal["", "mask", "reveal"] = ""


@dataclass(frozen=True)
class RateLimit:
    requests: int
    period_seconds: int
    per: Literal["identity", "pod", "connection"] = "identity"
    source: RuleRef | None = None


@dataclass(frozen=True)
class Decision:
    effect: Effect
    rule: RuleRef | None = None  # the deciding rule; None when a default decided
    message: str = ""
    approval: ApprovalRequirement | None = None
    masks: tuple[MaskSpec, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    explanation: tuple[str, ...] = field(default=())  # one line per step, for --explain
