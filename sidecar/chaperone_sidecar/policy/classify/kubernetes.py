"""Classify a Kubernetes API request the way the kube-apiserver itself does.

This is a port of ``NewRequestInfo`` in k8s.io/apiserver/pkg/endpoints/request/requestinfo.go,
so a policy about ``delete namespaces`` means exactly what RBAC means by it:

* resource paths are ``/api/VERSION/...`` (core group) and ``/apis/GROUP/VERSION/...``; fewer
  parts (``/api``, ``/apis``, ``/apis/apps``, ``/apis/apps/v1``) and anything else
  (``/healthz``, ``/version``, ``/openapi/v2``) are non-resource requests whose verb is the
  lower-cased HTTP method;
* ``/watch/...`` and ``/proxy/...`` after the version are special verbs (deprecated, still served);
* the verb comes from the method: POST create, GET/HEAD get, PUT update, PATCH patch, DELETE
  delete; a GET without a name is list, or watch with ``?watch=`` anything but ``0``/``false``;
  a DELETE without a name is deletecollection;
* ``namespaces/NAME`` is the namespace object itself unless followed by another resource;
  only ``status`` and ``finalize`` are subresources of a namespace;
* parts after the name are the subresource (``exec``, ``attach``, ``portforward``, ``log``,
  ``status``, ``scale``, ``eviction``, ``proxy``...);
* a list/watch with ``fieldSelector=metadata.name=X`` is about the object X (as since 1.18),
  which is how ``kubectl get pod X --watch`` asks.

One deliberate difference, the **connect subresources**. ``exec``, ``attach`` and
``portforward`` open an interactive stream into a container. Over SPDY (``POST`` +
``Upgrade: SPDY/3.1``) RequestInfo calls that ``create``; over WebSocket - kubectl's default
since 1.30 - the handshake is a ``GET``, which RequestInfo calls ``get``, so a policy about
``create pods/exec`` would not see it. Kubernetes closed the same gap with a second, synthetic
authorization of ``create`` on these three subresources (feature gate
``AuthorizePodWebsocketUpgradeCreatePermission``, KEP-4006, kubernetes/kubernetes#134577: on
by default since 1.35). Here every request to them is ``create``, whatever its method and
whether or not it carries upgrade headers (an agent may leave them out, or use another
method). The ``proxy`` subresource (``pods/proxy``, ``services/proxy``, ``nodes/proxy``) keeps
its method's verb - a plain proxied ``GET`` is a read - except when it asks for a protocol
upgrade (``Upgrade``/``Connection: upgrade`` headers or ``CONNECT``): the upgraded stream is
opaque to the sidecar, and through ``nodes/proxy`` it reaches the kubelet's own ``/exec``, so
it is ``create`` as well.

Go's ``URL.Path`` is percent-decoded before splitting, so the path is decoded here as well.

**What a connect request asks for** (issue 15): the container (``container=``), the command
(``command=``, repeated, one argv element each) and the ports of a port-forward (``ports=``)
come from the query, parsed exactly as Go's ``url.ParseQuery`` (what the apiserver and the
kubelet decode ``PodExecOptions`` with): pairs split on ``&`` only, ``+`` is a space, a pair
whose key or value holds an invalid percent escape or whose key holds ``;`` is **dropped**
(Go's ``URL.Query()`` ignores the error and skips the pair). Python's ``parse_qsl`` would keep
``%zz`` literally, so an agent could show the policy an argv the kubelet never runs.

:func:`command_units` turns an argv into the *simple commands* a ``match.kubernetes.commands``
rule is tested against; see its docstring for the shell and wrapper forms it sees through.
"""

from __future__ import annotations

import os.path
import re
import shlex
from dataclasses import replace
from functools import lru_cache
from urllib.parse import parse_qsl, unquote

from ..model import HTTPRequest, KubernetesAction

_API_PREFIXES = ("api", "apis")
_GROUPLESS_PREFIXES = ("api",)
_SPECIAL_VERBS = ("proxy", "watch")
_SPECIAL_VERBS_NO_SUBRESOURCES = ("proxy",)
_NAMESPACE_SUBRESOURCES = ("status", "finalize")
CONNECT_SUBRESOURCES = frozenset({"exec", "attach", "portforward"})
_METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}


def _split_path(path: str) -> list[str]:
    path = unquote(path, errors="replace").strip("/")
    return path.split("/") if path else []


def is_upgrade(request: HTTPRequest) -> bool:
    """Whether the request asks to switch protocols (WebSocket, SPDY, h2c, extended CONNECT).

    Any ``Upgrade`` header, or ``upgrade`` among the ``Connection`` tokens: Go's
    ``httpstream.IsUpgradeRequest`` looks at ``Connection`` only, other servers at ``Upgrade``,
    so either counts.
    """
    if request.method.upper() == "CONNECT":
        return True
    for key, value in request.headers:
        name = key.lower()
        if name == "upgrade" and value.strip():
            return True
        if name == "connection" and any(t.strip().lower() == "upgrade" for t in value.split(",")):
            return True
    return False


def _query(query: str) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, errors="replace"):
        result.setdefault(key, []).append(value)
    return result


_HEX = frozenset("0123456789abcdefABCDEF")


def _go_unescape(text: str) -> str | None:
    """Go's ``url.QueryUnescape``: ``+`` is a space, ``%XX`` a byte; None when an escape is
    invalid (Go returns an error). Bytes that are not UTF-8 become U+FFFD."""
    if "%" not in text:
        return text.replace("+", " ")
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "%":
            pair = text[i + 1:i + 3]
            if len(pair) != 2 or not all(c in _HEX for c in pair):
                return None
            out.append(int(pair, 16))
            i += 3
            continue
        out += b" " if ch == "+" else ch.encode("utf-8", "surrogateescape")
        i += 1
    return out.decode("utf-8", "replace")


def go_query(query: str) -> dict[str, list[str]]:
    """The query as Go's ``url.ParseQuery`` sees it (pairs it rejects are dropped, as the
    apiserver's ``URL.Query()`` drops them); values in order."""
    result: dict[str, list[str]] = {}
    for pair in query.split("&"):
        if not pair or ";" in pair.partition("=")[0]:
            continue
        key, _, value = pair.partition("=")
        k, v = _go_unescape(key), _go_unescape(value)
        if k is None or v is None:
            continue
        result.setdefault(k, []).append(v)
    return result


# Shells whose ``-c`` argument is a script; wrappers that run their arguments as a command.
_SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "yash", "fish", "busybox"})
_WRAPPERS = frozenset({"env", "nice", "nohup", "exec", "command", "sudo", "doas", "timeout",
                       "stdbuf", "setsid", "ionice", "time", "xargs", "chroot", "nsenter",
                       "unshare", "su", "runuser", "watch", "script", "flock", "taskset",
                       "chrt", "busybox"})
_WRAPPER_ARGS = {"timeout": 1, "chroot": 1, "taskset": 1, "chrt": 1, "flock": 1}  # operands first
_SEPARATORS = re.compile(r"\|\||&&|[;|&\n()`{}]|\$\(")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SPACE = re.compile(r"\s+")
_SUBSTITUTION = re.compile(r"\$\(|`|\n")
_PUNCTUATION = frozenset(";&|(){}<>")
_MAX_UNITS = 64
_MAX_DEPTH = 4


def _script_commands(script: str) -> list[list[str]]:
    """A shell script's simple commands as word lists. Command substitution (``$(``, back
    quotes) runs even inside double quotes, so it always starts a command; the rest is split
    by a shell-like lexer (quotes honoured) at ``;``, ``&``, ``|``, brackets. Unbalanced
    quotes: split on every separator character instead (more units, never fewer)."""
    script = _SUBSTITUTION.sub(" ; ", script)
    try:
        lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|(){}<>")
        lexer.whitespace_split = True
        lexer.commenters = ""
        tokens = list(lexer)
    except ValueError:
        return [piece.split() for piece in _SEPARATORS.split(script)]
    commands: list[list[str]] = [[]]
    for token in tokens:
        if token and set(token) <= _PUNCTUATION:
            if not set(token) <= set("<>"):  # a redirection keeps the command going
                commands.append([])
            continue
        commands[-1].append(token)
    return [c for c in commands if c]


def _form(argv: list[str] | tuple[str, ...]) -> str:
    return _SPACE.sub(" ", " ".join(argv)).strip()


def _units(argv: list[str], depth: int, out: list[tuple[str, ...]]) -> None:
    while argv and _ASSIGNMENT.match(argv[0]):  # VAR=x cmd (in a shell script)
        argv = argv[1:]
    if not argv or len(out) >= _MAX_UNITS:
        return
    base = os.path.basename(argv[0]) or argv[0]
    forms = dict.fromkeys((_form([base, *argv[1:]]), _form(argv), base, argv[0]))
    out.append(tuple(f for f in forms if f))
    if depth >= _MAX_DEPTH:
        return
    if base in _SHELLS:
        rest = argv[1:]
        if base == "busybox" and rest and os.path.basename(rest[0]) in _SHELLS:
            rest = rest[1:]
        for i, arg in enumerate(rest):
            if not arg.startswith("-") or arg.startswith("--"):
                break
            if "c" in arg[1:] and i + 1 < len(rest):  # -c, -ec, -lc ...: the script follows
                for words in _script_commands(rest[i + 1]):
                    _units(words, depth + 1, out)
                break
    if base in _WRAPPERS:
        rest = argv[1:]
        while rest and (rest[0].startswith("-") or _ASSIGNMENT.match(rest[0])):
            rest = rest[1:]
        rest = rest[_WRAPPER_ARGS.get(base, 0):]
        _units(rest, depth + 1, out)


@lru_cache(maxsize=1024)
def command_units(argv: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The simple commands an exec's argv runs, each as the forms a rule may name.

    A unit's forms: the argv joined by spaces with ``argv[0]`` as its base name
    (``rm -rf /tmp/x`` for ``/bin/rm -rf /tmp/x``), joined as sent, ``argv[0]``'s base name,
    and ``argv[0]`` (whitespace runs become one space, so a tab cannot split a pattern).
    Seen through, so an agent cannot hide a command behind a wrapper:

    * a shell's ``-c`` script (``sh -c 'cd /; rm -rf x'``, ``bash -ec``, ``busybox sh -c``):
      split on ``;``, ``&&``, ``||``, ``|``, ``&``, newlines, ``$(``, backquotes, brackets,
      and each piece split into words as the shell would (quotes honoured), recursively;
    * wrappers that run their arguments (``env A=1 rm``, ``nice``, ``timeout 5 rm``,
      ``sudo``, ``xargs``, ``busybox rm`` ...) and leading ``VAR=value`` assignments.

    The first unit is the argv itself. A script that only an interpreter reads
    (``python -c``, ``perl -e``) or the stdin of an interactive shell is not seen: block
    those interpreters (docs/exec-sessions.md).
    """
    out: list[tuple[str, ...]] = []
    _units(list(argv), 0, out)
    return tuple(dict.fromkeys(out))


def connect_options(action: KubernetesAction, query: str) -> KubernetesAction:
    """The container, command and ports a connect request asks for (``go_query``)."""
    if action.subresource not in CONNECT_SUBRESOURCES:
        return action
    params = go_query(query)
    containers = params.get("container") or [""]
    ports: list[str] = []
    for value in params.get("ports", ()):
        ports.extend(p.strip() for p in value.split(","))
    return replace(action, container=containers[0],
                   command=tuple(params.get("command", ())) if action.subresource == "exec" else (),
                   ports=tuple(dict.fromkeys(ports)) if action.subresource == "portforward" else ())


def _name_from_field_selector(selector: str) -> str:
    """X from ``metadata.name=X`` (or ``==``) in an AND-ed field selector, else ""."""
    for term in selector.split(","):
        field, op, value = term.partition("==") if "==" in term else term.partition("=")
        if op and field.strip() == "metadata.name" and not field.endswith("!"):
            value = value.strip()
            # path.IsValidPathSegmentName: the name must be usable as one path segment.
            if value and value not in (".", "..") and "/" not in value and "%" not in value \
                    and "\\" not in value:
                return value
    return ""


def classify_kubernetes(request: HTTPRequest, errors: list[str]) -> KubernetesAction:
    method = request.method.upper()
    parts = _split_path(request.path)
    non_resource = KubernetesAction(verb=method.lower(), is_resource_request=False)
    if len(parts) < 3 or parts[0] not in _API_PREFIXES:
        return non_resource
    prefix, parts = parts[0], parts[1:]
    group = ""
    if prefix not in _GROUPLESS_PREFIXES:
        if len(parts) < 3:  # /apis/GROUP/VERSION is discovery
            return non_resource
        group, parts = parts[0], parts[1:]
    version, parts = parts[0], parts[1:]

    if parts[0] in _SPECIAL_VERBS:
        if len(parts) < 2:
            errors.append(f"unable to determine kind and namespace from {request.path!r}")
            return KubernetesAction(verb=method.lower(), api_group=group, api_version=version)
        verb, parts = parts[0], parts[1:]
    else:
        verb = _METHOD_VERBS.get(method, "")
        if not verb:
            errors.append(f"HTTP method {method!r} has no Kubernetes verb")

    namespace = ""
    if parts[0] == "namespaces" and len(parts) > 1:
        namespace = parts[1]
        if len(parts) > 2 and parts[2] not in _NAMESPACE_SUBRESOURCES:
            parts = parts[2:]

    subresource = name = resource = ""
    if len(parts) >= 3 and verb not in _SPECIAL_VERBS_NO_SUBRESOURCES:
        subresource = parts[2]
    if len(parts) >= 2:
        name = parts[1]
    resource = parts[0]

    if not name and verb == "get":
        query = _query(request.query)
        watch = query.get("watch")
        verb = "watch" if watch and watch[0].lower() not in ("false", "0") else "list"
        for selector in query.get("fieldSelector", [])[:1]:
            name = _name_from_field_selector(selector)
    if not name and verb == "delete":
        verb = "deletecollection"
    if subresource in CONNECT_SUBRESOURCES or (subresource == "proxy" and is_upgrade(request)):
        verb = "create"  # see the module docstring: what the WebSocket handshake really does

    return connect_options(KubernetesAction(
        verb=verb,
        api_group=group,
        api_version=version,
        resource=resource,
        subresource=subresource,
        namespace=namespace,
        name=name,
        is_resource_request=True,
    ), request.query)


def is_connect_request(request: HTTPRequest) -> bool:
    """A request to ``exec``/``attach``/``portforward``: one action, ``create``, whether it
    comes as the WebSocket ``GET`` or the SPDY ``POST`` kubectl falls back to."""
    return classify_kubernetes(request, []).subresource in CONNECT_SUBRESOURCES


def kubernetes_name(action: KubernetesAction, path: str) -> str:
    """``kubernetes:delete/namespaces``, ``kubernetes:create/pods/exec``,
    ``kubernetes:get:/version`` (non-resource: the path, as RBAC's nonResourceURLs)."""
    verb = action.verb or "unknown"  # a method RequestInfo has no verb for (OPTIONS...)
    if not action.is_resource_request:
        return f"kubernetes:{verb}:{unquote(path, errors='replace') or '/'}"
    resource = action.resource + (f"/{action.subresource}" if action.subresource else "")
    return f"kubernetes:{verb}/{resource}"


def kubernetes_summary(action: KubernetesAction, request: HTTPRequest) -> str:
    """``delete namespaces/prod``, ``create pods/p/exec in ns (command: sh -c id)``."""
    if not action.is_resource_request:
        return f"{action.verb} {unquote(request.path, errors='replace') or '/'}"
    resource = action.resource + (f".{action.api_group}" if action.api_group else "")
    target = resource + (f"/{action.name}" if action.name else "")
    target += f"/{action.subresource}" if action.subresource else ""
    text = f"{action.verb or 'unknown'} {target}"
    if action.namespace and action.resource != "namespaces":  # the name says it already
        text += f" in {action.namespace}"
    if action.subresource in CONNECT_SUBRESOURCES:
        # What an approver must see: the container (the pod's default when the agent names
        # none) and the command, each argv element quoted as a shell would need it.
        details = [] if action.subresource == "portforward" else [
            f"container: {action.container or '(default)'}"]
        if action.command:
            details.append(f"command: {shlex.join(action.command)}")
        if action.ports:
            details.append(f"ports: {','.join(action.ports)}")
        if details:
            text += f" ({'; '.join(details)})"
    return text
