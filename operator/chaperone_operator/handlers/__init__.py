"""kopf handlers, one module per kind; importing this package registers all of them.

Handlers are thin: they gather inputs (the admission request, the clock, a few API reads) and
call pure functions. Each admission handler has a fixed ``id``, which kopf's webhook server
uses as the URL path, so the chart's webhook configurations can name them (``WEBHOOKS``).
A request whose path names no handler would be allowed by kopf, so the ids and the chart must
agree; tests/charts/test_chart_operator.py and tests/operator/test_operator_cli.py check it.
"""

from __future__ import annotations

from chaperone_sidecar.api import ACCESS_POLICIES, APPROVAL_REQUESTS, CLAUDE_CONNECTIONS

from . import accesspolicies, approvalrequests, claudeconnections, pods  # noqa: F401

# URL path (= handler id) -> (kind of webhook, plural). The chart renders the same table
# (templates/webhooks.yaml); tests/charts/test_chart_operator.py checks that they agree.
WEBHOOKS = {
    "pod-mutate": ("mutating", "pods"),
    "approvalrequest-mutate": ("mutating", APPROVAL_REQUESTS),
    "approvalrequest-validate": ("validating", APPROVAL_REQUESTS),
    "approvalrequest-delete": ("validating", APPROVAL_REQUESTS),
    "accesspolicy-validate": ("validating", ACCESS_POLICIES),
    "claudeconnection-validate": ("validating", CLAUDE_CONNECTIONS),
}
