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
"""

from __future__ import annotations

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

    return KubernetesAction(
        verb=verb,
        api_group=group,
        api_version=version,
        resource=resource,
        subresource=subresource,
        namespace=namespace,
        name=name,
        is_resource_request=True,
    )


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
    if action.subresource in ("exec", "attach"):
        command = _query(request.query).get("command")
        if command:
            text += f" (command: {' '.join(command)})"
    return text
