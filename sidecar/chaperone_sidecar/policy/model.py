"""The value types shared by the classifiers, the compiler/evaluator and the masker.

Kept in one small module so each part of the engine can be built and tested on its own: the
classifiers produce ``Action``; the evaluator consumes ``Action`` + ``Identity`` and produces
``Decision``. All are frozen dataclasses (hashable, safe to cache and share across flows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ConnectionType = Literal["aws", "http", "kubernetes", "anthropic"]
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


@dataclass(frozen=True)
class AnthropicAction:
    model: str = ""  # the single requested model; "" when none or when a batch mixes models
    stream: bool = False
    tools: tuple[str, ...] = ()  # declared tool names
    tool_uses: tuple[str, ...] = ()  # names in tool_use blocks of the conversation
    tool_results: int = 0  # count of tool_result blocks
    models: tuple[str, ...] = ()  # every requested model (message batches can mix them)


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
