"""What the sidecar's addons know about one flow, shared through ``flow.metadata``.

Each addon owns one concern (identify, route, enforce, approve, inject credentials, mask,
record, trace) and they run in a fixed order (see ``addons/__init__.py``). They talk to each
other only through this object, stored under ``flow.metadata[KEY]``, so every addon can be
tested alone with ``mitmproxy.test.tflow`` by putting a ``FlowContext`` on the flow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .policy.model import Action, Decision, Identity

KEY = "chaperone"


@dataclass
class FlowContext:
    identity: Identity = field(default_factory=Identity)
    connection: str = ""  # ClaudeConnection name; "" when no connection covers the host
    connection_type: str = ""  # aws | http | kubernetes | anthropic
    action: Action | None = None
    decision: Decision | None = None
    approval_request: str = ""  # ApprovalRequest name, when one was opened or reused
    approved_by: tuple[str, ...] = ()  # approvers whose decision released the flow
    grant: str = ""  # "exact" | "action" when a cached grant let the flow through
    refused_grants: tuple[str, ...] = ()  # cached grants refused as unproven (forgery attempts)
    refused: dict[str, Any] | None = None  # the JSON error body sent to the agent, if refused
    masked: dict[str, int] = field(default_factory=dict)  # masked kinds -> count (response)
    request_digest: str = ""  # sha256:... of the canonical request (approvals, grants)
    started: float = field(default_factory=time.monotonic)
    upstream_started: float = 0.0
    upstream_latency: float = 0.0


def get(flow) -> FlowContext | None:
    return flow.metadata.get(KEY)


def ensure(flow) -> FlowContext:
    ctx = flow.metadata.get(KEY)
    if ctx is None:
        ctx = flow.metadata[KEY] = FlowContext()
    return ctx
