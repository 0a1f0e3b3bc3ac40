"""What the model asked for, remembered per pod, to link the agent's next actions to it.

When an answer on an ``anthropic`` connection carries a ``tool_use`` block, the ToolUse addon
(``addons/tool_use.py``) records it and :meth:`ToolUseLedger.add` keeps it as a *candidate* for
the pod that asked. Every later flow of that pod on any other connection (aws, kubernetes, http,
mcp, postgres, git ...) is scored against the candidates of the last ``window`` seconds by
:func:`score` - whether the tool input names what the action does - and the best one above
``MIN_SCORE`` becomes the action's ``causedBy: {toolUseId, name, score, reason}`` in its
recorded ``request`` event. ``chaperone sessions replay`` prints the pair.

**Content match** (:func:`action_terms`; every needle is looked for, case-insensitively, in the
tool input's string values and its JSON; the weights add up, capped at 1):

* http (and git, mcp: their request line): the host 0.3 (0.4 for a request to
  ``/``), the path 0.4, its last segment 0.2, the method (not GET) 0.1; git: the repository
  0.4 and ``push``/``clone``/``fetch`` 0.2; mcp: the tool name 0.5;
* postgres (``postgres/record.py`` asks for each unit; no request line: a database name is
  not a path, and ``SQL`` would match every ``psql``): the statement's text as sent
  (whitespace collapsed, at least 12 characters) 0.6, each table 0.3 (as written or its last
  part: ``public.users`` is named ``users`` in a command), each command, nested ones too
  (``drop``, ``delete``) 0.2, each function 0.3, the server host and the database 0.05 each
  (context only: with the command alone they stay below ``MIN_SCORE``);
* aws: the CLI operation (``delete-bucket``) or SDK method (``delete_bucket``) 0.4, the
  ``aws s3`` high-level command (``s3 rb``, ``s3 cp`` ...) 0.4, each resource (``bucket``,
  ``bucket/key``, shown in the CLI as ``s3://bucket``) 0.4, the service after ``aws`` 0.1;
* kubernetes: kubectl's verb for the request (``delete``, ``get``, ``apply``, ``exec`` ...) 0.2,
  the resource (plural or singular) 0.2, the object name 0.4, the namespace 0.1, the exec
  command 0.4.

``MIN_SCORE`` is 0.4: one strong needle (a host, a bucket, an object name) or two weak ones. A
flow with no candidate above it gets no ``causedBy`` - there is no "the latest tool_use" guess,
which would link the agent's own background calls (telemetry, updates) to whatever ran last.

**Evidence, not authorization** (docs/tool-use.md). Candidates come only from answers the
sidecar itself parsed on an ``anthropic`` connection (the agent cannot inject one with a header
or a request body), and no policy decision reads ``causedBy``. But the agent writes the prompts:
it can make a model emit a ``tool_use`` that names anything, then do that thing, and the link
will say "the model asked". A link says the two happened close together and match in content;
it does not say the action was legitimate.

**Bounds**: ``MAX_PER_POD`` candidates per pod (the oldest drop first), ``MAX_PODS`` pods (the
least recently used drop first; one sidecar serves one pod, standalone may serve more), at most
``MAX_TEXT`` characters of each input kept for matching. Everything is in memory of the one
sidecar process, like the pod it serves; nothing is shared.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .policy.matching_tool_use import ToolUse, input_texts
from .policy.model import Action, Identity

__all__ = ["DEFAULT_WINDOW", "MIN_SCORE", "Candidate", "Link", "ToolUseLedger", "action_terms",
           "score"]

DEFAULT_WINDOW = 120.0  # seconds
MIN_SCORE = 0.4
MAX_PER_POD = 32
MAX_PODS = 256
MAX_TEXT = 4096

# kubectl's word for a Kubernetes API verb (what a tool input running kubectl says)
_KUBECTL = {"get": ("get", "describe"), "list": ("get", "describe"), "watch": ("get", "-w"),
            "create": ("create", "apply", "run", "expose"), "update": ("apply", "replace", "edit"),
            "patch": ("patch", "apply", "edit", "scale", "label", "annotate", "set"),
            "delete": ("delete",), "deletecollection": ("delete",)}
# the high-level `aws s3` commands and the operations they issue
_S3_COMMANDS = {"DeleteBucket": ("rb",), "CreateBucket": ("mb",), "DeleteObject": ("rm", "mv"),
                "DeleteObjects": ("rm",), "PutObject": ("cp", "mv", "sync"),
                "GetObject": ("cp", "sync"), "ListObjectsV2": ("ls", "sync", "rm", "rb"),
                "ListObjects": ("ls",), "ListBuckets": ("ls",), "CopyObject": ("cp", "mv", "sync"),
                "HeadObject": ("cp", "sync"), "CreateMultipartUpload": ("cp", "mv", "sync")}
_CAMEL = re.compile(r"(?<!^)(?=[A-Z][a-z])|(?<=[a-z0-9])(?=[A-Z])")


@dataclass(frozen=True)
class Candidate:
    """A tool_use the model asked for: what a later action may be linked to."""

    id: str
    name: str
    text: str  # lower-cased string values and JSON of the (masked) input, bounded
    at: float  # time.monotonic() when it was complete
    flow: str  # the LLM request's flow id
    model: str = ""
    blocked: bool = False


@dataclass(frozen=True)
class Link:
    candidate: Candidate
    score: float
    reason: str

    def to_event(self) -> dict[str, Any]:
        """The ``causedBy`` value of a recorded event."""
        c = self.candidate
        out: dict[str, Any] = {"toolUseId": c.id, "name": c.name, "score": round(self.score, 2),
                               "reason": self.reason, "flow": c.flow}
        if c.blocked:
            out["blocked"] = True  # the agent never received it
        return out


# (needle, weight, label); a needle is a substring, or several that must all be present
Term = tuple[str | tuple[str, ...], float, str]


def _kebab(operation: str) -> str:
    return _CAMEL.sub("-", operation).lower()


def action_terms(action: Action | None, method: str = "", url_host: str = "",
                 url_path: str = "") -> list[Term]:
    """(needle, weight, label) for one action; needles are lower case."""
    terms: list[Term] = []

    def add(needle: str, weight: float, label: str) -> None:
        needle = needle.strip().lower()
        if len(needle) >= 3 or (weight <= 0.2 and len(needle) >= 2):
            terms.append((needle, weight, label))

    host = (action.host if action is not None else url_host).rstrip(".")
    path = action.path if action is not None else url_path
    method = action.method if action is not None else method
    if action is None or (action.aws is None and action.postgres is None):
        # a host alone is weak evidence (every call to it matches), unless the URL is the host
        add(host, 0.4 if path in ("", "/") else 0.3, f"host {host}")
        if path not in ("", "/"):
            add(path.rstrip("/"), 0.4, f"path {path}")
            last = path.rstrip("/").rsplit("/", 1)[-1]
            if last and last != path.strip("/"):
                add(last, 0.2, f"path segment {last}")
        if method and method not in ("GET",):
            add(method, 0.1, f"method {method}")
    if action is None:
        return terms
    if action.aws is not None:
        aws = action.aws
        if aws.operation:
            add(_kebab(aws.operation), 0.4, f"AWS CLI {aws.service} {_kebab(aws.operation)}")
            add(_kebab(aws.operation).replace("-", "_"), 0.4, f"SDK {_kebab(aws.operation).replace('-', '_')}")
            if aws.service == "s3":
                for cmd in _S3_COMMANDS.get(aws.operation, ()):
                    add(f"s3 {cmd}", 0.4, f"AWS CLI s3 {cmd}")
        add(f"aws {aws.service}", 0.1, f"aws {aws.service}")
        for resource in aws.resources[:8]:
            add(resource, 0.4, f"resource {resource}")
    kube = action.kubernetes
    if kube is not None and kube.is_resource_request:
        verbs = ("exec",) if kube.subresource in ("exec", "attach") else _KUBECTL.get(kube.verb, ())
        for word in verbs:  # flags may come between (kubectl -n prod delete ...): both words
            terms.append((("kubectl", f" {word}"), 0.2, f"kubectl {word}"))
        if kube.resource:
            add(kube.resource, 0.2, f"resource {kube.resource}")
            if kube.resource.endswith("s") and len(kube.resource) > 4:
                add(kube.resource[:-1], 0.2, f"resource {kube.resource[:-1]}")
        if kube.name:
            add(kube.name, 0.4, f"name {kube.name}")
        if kube.namespace:
            add(kube.namespace, 0.1, f"namespace {kube.namespace}")
        if kube.command:
            add(" ".join(kube.command), 0.4, f"command {' '.join(kube.command)[:60]}")
    if action.git is not None:
        add(action.git.repository, 0.4, f"repository {action.git.repository}")
        for word in ("push",) if action.git.service == "push" else ("fetch", "clone", "pull"):
            add(f"git {word}", 0.2, f"git {word}")
    if action.mcp is not None:
        for tool in action.mcp.tools[:8]:
            add(tool, 0.5, f"MCP tool {tool}")
    if action.postgres is not None:
        pg = action.postgres
        text = " ".join(pg.text.split()).rstrip(";").strip()
        if 12 <= len(text) <= 400:
            add(text, 0.6, "statement text")  # not quoted: the reason is recorded unmasked
        for table in pg.tables[:8]:
            add(table, 0.3, f"table {table}")
            if "." in table:  # the same table, so the same label: counted once
                add(table.rsplit(".", 1)[-1], 0.3, f"table {table}")
        for command in pg.statements[:8] or (pg.statement,):
            add(command, 0.2, f"statement {command}")
        for function in pg.functions[:8]:
            add(function, 0.3, f"function {function}")
        add(host, 0.05, f"host {host}")
        add(pg.database or path.strip("/"), 0.05, f"database {pg.database or path.strip('/')}")
    return terms


def score(terms: Iterable[Term], text: str) -> tuple[float, str]:
    """Summed weights of the needles found in ``text`` (capped at 1) and what matched; a
    needle is a lower-case substring, or a tuple of them that must all be present. Substring
    tests only (no regex): this runs on the event loop for every flow of the pod."""
    total, found = 0.0, []
    for needle, weight, label in terms:
        hit = needle in text if isinstance(needle, str) else all(part in text for part in needle)
        if hit and label not in found:
            total += weight
            found.append(label)
    return min(total, 1.0), ", ".join(found)


def candidate_text(tool_use: ToolUse) -> str:
    """What links are matched against: the input's string values and JSON, lower case."""
    texts = input_texts(tool_use.input, tool_use.raw, tool_use.parsed)
    return "\n".join(texts).lower()[:MAX_TEXT]


class ToolUseLedger:
    """The recent tool_use blocks of each pod (bounded), and the link of an action to one."""

    def __init__(self, window: float = DEFAULT_WINDOW, *, min_score: float = MIN_SCORE,
                 per_pod: int = MAX_PER_POD, pods: int = MAX_PODS) -> None:
        self.window = window
        self.min_score = min_score
        self.per_pod = per_pod
        self.pods = pods
        self._by_pod: OrderedDict[tuple[str, str, str], deque[Candidate]] = OrderedDict()

    @staticmethod
    def _key(identity: Identity) -> tuple[str, str, str]:
        return (identity.pod_namespace, identity.pod_name, identity.pod_uid)

    def add(self, identity: Identity, candidate: Candidate) -> None:
        key = self._key(identity)
        entries = self._by_pod.get(key)
        if entries is None:
            entries = self._by_pod[key] = deque(maxlen=self.per_pod)
            while len(self._by_pod) > self.pods:
                self._by_pod.popitem(last=False)
        self._by_pod.move_to_end(key)
        entries.append(candidate)

    def candidates(self, identity: Identity, now: float | None = None) -> list[Candidate]:
        """The pod's candidates inside the window, newest first."""
        entries = self._by_pod.get(self._key(identity))
        if not entries:
            return []
        now = time.monotonic() if now is None else now
        while entries and now - entries[0].at > self.window:
            entries.popleft()
        return list(reversed(entries))

    def link(self, identity: Identity, terms: list[Term],
             now: float | None = None) -> Link | None:
        """The best-matching candidate (newest on a tie) at or above ``min_score``."""
        if not terms:
            return None
        best: Link | None = None
        for candidate in self.candidates(identity, now):
            value, reason = score(terms, candidate.text)
            if value >= self.min_score and (best is None or value > best.score):
                best = Link(candidate, value, reason)
        return best
