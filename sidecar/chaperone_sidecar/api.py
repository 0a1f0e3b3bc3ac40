"""The chaperone.dev API's names: group, version, kinds, plurals, label and annotation keys.

One place for the strings both sides of the product must agree on. The sidecar imports it, and
so does the operator (the operator may import the sidecar package; the sidecar never imports the
operator). Environment-variable names of the injection contract live in
:mod:`chaperone_sidecar.contract`, not here.

The CRDs in ``crds/`` are the source of the group, version and plurals; these constants must
match them (``tests/sidecar/runtime/test_api_names.py`` checks that they do).
"""

from __future__ import annotations

__all__ = [
    "GROUP", "VERSION", "API_VERSION",
    "CLAUDE_CONNECTIONS", "ACCESS_POLICIES", "APPROVAL_REQUESTS",
    "KIND_CLAUDE_CONNECTION", "KIND_ACCESS_POLICY", "KIND_APPROVAL_REQUEST",
    "LABEL_INJECT", "LABEL_DIGEST", "LABEL_REQUESTER", "LABEL_SUBJECT", "LABEL_ACTION",
    "collection_path",
]

GROUP = "chaperone.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Plurals (the URL segment) and kinds.
CLAUDE_CONNECTIONS = "claudeconnections"
ACCESS_POLICIES = "accesspolicies"
APPROVAL_REQUESTS = "approvalrequests"
KIND_CLAUDE_CONNECTION = "ClaudeConnection"
KIND_ACCESS_POLICY = "AccessPolicy"
KIND_APPROVAL_REQUEST = "ApprovalRequest"

# Labels. The opt-in label a pod carries to be injected (value "true"), and the labels the
# sidecar puts on the ApprovalRequests it opens.
LABEL_INJECT = f"{GROUP}/inject"
LABEL_DIGEST = f"{GROUP}/request-digest"
LABEL_REQUESTER = f"{GROUP}/requester"
# Whose request (``subject_key``) and which classified action (``action_key``): how a retry
# from any replica of the same agent finds an earlier decision (the outcome memory).
LABEL_SUBJECT = f"{GROUP}/subject"
LABEL_ACTION = f"{GROUP}/action-key"


def collection_path(plural: str, namespace: str) -> str:
    """The REST path of a namespaced chaperone.dev collection."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
